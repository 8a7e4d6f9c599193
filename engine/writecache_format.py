"""The write cache's files: their layout on disk, the bitmap as the process holds it, the
data file's reads and writes over the base, the lock that keeps a cache to one process,
and the temporaries a killed daemon leaves.

A cache directory holds three files:

``data``
    A sparse file as large as the disk, addressed by the disk's own offsets: the newest
    bytes of every *dirty* granule sit at the granule's offset. Clean granules are holes
    (or stale bytes left by a write that never became dirty) and are never read.
``bitmap``
    A 4 KiB header page (little-endian: magic ``INFS-WC\\0``, version, granule size,
    disk size, granule count, a 32-byte base tag chosen by the caller, CRC32 of the
    preceding fields), then the dirty bitmap, one bit per granule (LSB first, as in
    ``engine.blockmap``), preallocated so that persisting it never needs new space.
    Bits past the last granule mean nothing and are cleared on open.
``journal`` (version 2)
    The stable writes since the last commit, each one record carrying its granules'
    whole newest content, so that a stable (FILE_SYNC) write is durable after one
    pwrite of its record and one fdatasync of the journal (``Journal``). Two header
    slots (pages 0 and 1, little-endian: magic ``INFS-WJ\\0``, version, epoch, an 8-byte
    random nonce, CRC32 of those): the slot with the highest epoch and a good CRC is
    current. Records follow from ``JOURNAL_START``, each at a multiple of
    ``JOURNAL_ALIGN``: a 64-byte head (magic ``WJR\\1``, CRC32 of the rest of the head
    and the data, the epoch's nonce, sequence number, first granule, granule count,
    data length), then the data. A record counts only if its nonce is the current
    epoch's and its CRC holds, so a torn record, a slot reserved but never written and
    a record of an earlier epoch are all skipped (records are found by searching for
    the nonce, which no client can know). A commit makes the data and the bitmap
    durable, then starts a new epoch (the other slot, synced), which voids every record.
    Records are written over zeros laid down a few MiB ahead of them (the file grows to
    at most ``JOURNAL_BYTES`` and a step), so the journal's fdatasync writes data, not
    allocation: one durable step, which concurrent writers' syncs share in the kernel.

Replay (``open_files``): the current epoch's records, in sequence order, are written
over ``data`` and their granules marked dirty; then ``data`` is synced, the bitmap
written and synced, and a new epoch started. A crash during replay replays again.

Version 1 caches (no journal) open as they are: ``open_files`` gives them an empty
journal and then rewrites their header as version 2, so a live instant session's cache
survives a daemon upgrade (the older daemon refuses a version 2 cache, which may hold
stable writes only in its journal).

``create_files`` makes the three and syncs them (the journal and then the bitmap are
written under temporary names and renamed, so a directory holds a bitmap only once the
cache is whole). Its cost does not grow with the disk: ``data`` is only truncated to
size, and the bitmap is preallocated (allocated space reads as zeros) with only its
header page written;
``open_files`` checks the header against the disk it is opened over. Both take the lock:
an exclusive ``flock`` on the bitmap, held while the file descriptor is open, so one
process at a time owns a cache and ``remove_stale_temporaries`` can tell a live
temporary cache (locked) from one a killed daemon left (unlocked).

``DirtyMap`` is the bitmap in memory with what hangs on it (export trackers, the pages
a commit must write, the write generation, the count of dirty granules); ``DataFile`` reads and writes runs of
granules in ``data``, copying clean granules from the base at a write's unaligned
edges. Neither takes the granule locks nor decides when to sync: that, the order of a
commit and what a failure means are ``engine.writecache``'s design note, and its
``WriteCache`` is the only caller. Everything here blocks (open, fsync, fallocate,
rmtree, pread/pwrite): callers run it in a thread.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from engine.blockmap import bit_get, bits_count, bits_runs, bits_set
from engine.disk import Disk
from engine.errors import WriteCacheError
from engine.fsutil import fsync_dir, no_space, pwrite_all

MAGIC = b"INFS-WC\x00"
VERSION = 2  # 2: the journal file; 1 (no journal) is still read, and upgraded on open
READ_VERSIONS = (1, 2)
HEADER = struct.Struct("<8sIIQQ32s")  # magic, version, granule, disk size, granules, base tag
CRC = struct.Struct("<I")  # CRC32 of the HEADER fields, right after them
HEADER_SIZE = 4096  # the bitmap starts at this offset in the bitmap file
PAGE = 4096  # bitmap bytes persisted together
DEFAULT_GRANULE = 4096
MIN_GRANULE = 512
MAX_GRANULE = 1 << 20
TAG_SIZE = 32
DATA_FILE = "data"
BITMAP_FILE = "bitmap"
JOURNAL_FILE = "journal"
JMAGIC = b"INFS-WJ\x00"
JVERSION = 1
JSLOT = struct.Struct("<8sIIQ8s")  # magic, version, 0, epoch, nonce; then CRC32 of them
JREC = struct.Struct("<4sI8sQQII")  # magic, CRC32, nonce, sequence, first granule, granules, data bytes
JREC_MAGIC = b"WJR\x01"
JREC_HEAD = 64  # a record's head, padded
JOURNAL_ALIGN = 512  # records start at multiples of this
JOURNAL_START = 2 * PAGE  # after the two header slots
JOURNAL_BYTES = 32 << 20  # record space per epoch; a full journal is committed and starts afresh
JOURNAL_ZERO_STEP = 4 << 20  # the journal is filled with zeros this far ahead of its records
TEMP_PREFIX = "instantnfs-wc-"
FRAGMENTED_RUNS = 16  # a read with more clean/dirty runs than this is merged with numpy


def volume_error(e: OSError, what: str) -> NoReturn:
    """A full volume (ENOSPC, EDQUOT) as NoSpace; any other OSError as itself."""
    no_space(e, f"on the write cache volume: {what} failed ({e.strerror})")


def pread_exact(fd: int, length: int, offset: int) -> bytearray:
    """``length`` bytes at ``offset``; a file that ends sooner is a damaged cache."""
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise WriteCacheError(f"the write cache data file is shorter than the disk (at {offset + got})")
        got += n
    return buf


def check_granule(granule: int) -> None:
    """A granule is a power of two from MIN_GRANULE to MAX_GRANULE bytes (ValueError if not)."""
    if granule < MIN_GRANULE or granule > MAX_GRANULE or granule & (granule - 1):
        raise ValueError(f"granule {granule} is not a power of two from {MIN_GRANULE} to {MAX_GRANULE}")


@dataclass(frozen=True, slots=True)
class Header:
    """The bitmap file's first page, as fields."""

    granule: int
    size: int  # the disk's size in bytes
    granules: int
    base_tag: bytes  # padded with zeros to TAG_SIZE bytes
    version: int = VERSION

    @classmethod
    def new(cls, size: int, granule: int, base_tag: bytes) -> Header:
        if len(base_tag) > TAG_SIZE:
            raise ValueError(f"a base tag is at most {TAG_SIZE} bytes")
        return cls(granule, size, -(-size // granule), base_tag.ljust(TAG_SIZE, b"\0"))

    @property
    def bitmap_bytes(self) -> int:
        return -(-self.granules // 8)

    def encode(self) -> bytes:
        """The header page: the fields, their CRC32, zeros to HEADER_SIZE."""
        head = HEADER.pack(MAGIC, self.version, self.granule, self.size, self.granules, self.base_tag)
        return (head + CRC.pack(zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes, where: Path) -> Header:
        """The fields of a header read from ``where``, whose magic, CRC and version are checked."""
        if len(raw) < HEADER.size + CRC.size or raw[:8] != MAGIC:
            raise WriteCacheError(f"{where} is not a write cache bitmap")
        (crc,) = CRC.unpack_from(raw, HEADER.size)
        if zlib.crc32(raw[: HEADER.size]) != crc:
            raise WriteCacheError(f"{where} has a damaged header (CRC mismatch)")
        _magic, version, granule, size, ngran, tag = HEADER.unpack_from(raw)
        if version not in READ_VERSIONS:
            raise WriteCacheError(
                f"{where.parent} is a version {version} write cache; this instantnfs reads versions {READ_VERSIONS}"
            )
        return cls(granule, size, ngran, tag, version)

    def check(self, where: Path, size: int, base_tag: bytes | None) -> None:
        """That the cache in ``where`` belongs over a ``size``-byte disk tagged ``base_tag``."""
        if self.size != size:
            raise WriteCacheError(f"{where} caches a {self.size}-byte disk, not this {size}-byte one")
        if base_tag is not None and self.base_tag != base_tag.ljust(TAG_SIZE, b"\0"):
            raise WriteCacheError(f"{where} caches another disk (base tag mismatch)")
        g = self.granule
        if g < MIN_GRANULE or g & (g - 1) or self.granules != -(-self.size // g):
            raise WriteCacheError(f"{where} has an invalid granule size {g}")


@dataclass(frozen=True, slots=True)
class CacheFiles:
    """An open, locked cache directory: its two files and the bitmap as last committed."""

    data_fd: int
    bitmap_fd: int
    granule: int
    bits: np.ndarray
    journal: Journal
    dirty: int | None = None  # set bits in ``bits`` when known (0 for a new cache), else counted


class DirtyTracker:
    """Granules written since the tracker started or since its last ``take``.

    Export uses one to find what changed while it copied; ``WriteCache.write`` marks
    every granule it writes in every live tracker, under the same lock as the dirty bits.
    """

    def __init__(self, dirty: DirtyMap) -> None:
        self._dirty = dirty
        self.bits = np.zeros(len(dirty.bits), dtype=np.uint8)

    def take(self) -> np.ndarray:
        """The granules written since the last take (a bitmap), and start afresh."""
        fresh = np.zeros_like(self.bits)
        with self._dirty.meta:
            bits, self.bits = self.bits, fresh
        return bits

    def close(self) -> None:
        with self._dirty.meta:
            if self in self._dirty.trackers:
                self._dirty.trackers.remove(self)

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirtyMap:
    """The bitmap in memory, and what depends on it: the dirty bits (they only go
    0 -> 1), the export trackers, the bitmap pages a commit has yet to persist, and
    the write generation a commit syncs up to.

    ``meta`` guards the bits, the trackers, the pages and the generation together; it is
    held only for in-memory work, never across I/O.
    """

    def __init__(self, bits: np.ndarray, granule: int, size: int, dirty: int | None = None) -> None:
        self.bits = bits
        self.granules = -(-size // granule)
        # dirty granules, kept up to date by ``mark`` so that ``stats`` never walks the
        # bitmap (32 MiB for a 1 TiB disk); counted once here unless the caller knows it
        self.dirty = bits_count(bits, 0, self.granules) if dirty is None else dirty
        self.meta = threading.Lock()
        self.trackers: list[DirtyTracker] = []
        self.gen = 0  # writes marked so far
        self._unpersisted: set[int] = set()

    def count(self, g0: int, g1: int) -> int:
        """How many of the granules [g0, g1] are dirty."""
        return bits_count(self.bits, g0, g1 - g0 + 1)

    def runs(self, g0: int, g1: int) -> list[list[int]]:
        """The granules [g0, g1] as ``[start, count, dirty]`` runs."""
        if g0 == g1:  # one granule (a 4 KiB write): no array to build
            return [[g0, 1, bit_get(self.bits, g0)]]
        return bits_runs(self.bits, g0, g1 - g0 + 1).tolist()

    def clean_rows(self, g0: int, g1: int) -> np.ndarray:
        """The indexes, counted from ``g0``, of the clean granules in [g0, g1]."""
        first = g0 >> 3
        dirty = np.unpackbits(self.bits[first : (g1 >> 3) + 1], bitorder="little")[g0 - (first << 3) :][: g1 - g0 + 1]
        return np.flatnonzero(dirty == 0)

    def mark(self, clean: list[tuple[int, int]], g0: int, g1: int) -> None:
        """A write of the granules [g0, g1] is in the data file; its ``clean`` runs
        ``(start, count)`` are now dirty. Call it with ``meta`` held."""
        for start, count in clean:
            self.dirty += count - bits_count(self.bits, start, count)
            bits_set(self.bits, start, count)
        for t in self.trackers:
            bits_set(t.bits, g0, g1 - g0 + 1)
        if clean:
            self._unpersisted.update(range((g0 >> 3) // PAGE, (g1 >> 3) // PAGE + 1))
        self.gen += 1

    def take_pages(self) -> tuple[int, list[int], list[tuple[int, bytes]]]:
        """For a commit: the generation it covers, the bitmap pages to persist (now no
        longer pending) and their bytes as of now."""
        with self.meta:
            pages = sorted(self._unpersisted)
            self._unpersisted = set()
            snap = [(p, self.bits[p * PAGE : (p + 1) * PAGE].tobytes()) for p in pages]
            return self.gen, pages, snap

    def return_pages(self, pages: list[int]) -> None:
        """A commit could not write ``pages``: the next one persists them."""
        with self.meta:
            self._unpersisted.update(pages)

    def track(self) -> DirtyTracker:
        t = DirtyTracker(self)
        with self.meta:
            self.trackers.append(t)
        return t

    def copy(self) -> np.ndarray:
        with self.meta:
            return self.bits.copy()


class DataFile:
    """The ``data`` file over the base: reads and writes of granule runs, the caller
    holding the locks of their regions (``WriteCache`` does). The base is only read."""

    def __init__(self, fd: int, base: Disk, granule: int) -> None:
        self.fd = fd
        self.base = base
        self.size = base.size
        self.granule = granule
        self.shift = granule.bit_length() - 1

    def read(self, offset: int, length: int, runs: list[list[int]], dirty: DirtyMap) -> list[memoryview]:
        """[offset, offset + length), whose granules are the ``[start, count, dirty]`` ``runs``:
        dirty runs from the file, clean ones from the base."""
        sh = self.shift
        end = offset + length
        if len(runs) > FRAGMENTED_RUNS:
            return [self._read_fragmented(offset, length, offset >> sh, (end - 1) >> sh, dirty)]
        out: list[memoryview] = []
        for start, count, is_dirty in runs:
            lo = max(offset, start << sh)
            hi = min(end, (start + count) << sh)
            if is_dirty:
                out.append(memoryview(pread_exact(self.fd, hi - lo, lo)))
            else:
                out.extend(self.base.readv(lo, hi - lo))
        return out

    def _read_fragmented(self, offset: int, length: int, g0: int, g1: int, dirty: DirtyMap) -> memoryview:
        """Many small clean/dirty runs: one pread of the span, then the clean granules
        copied over it from the base as whole rows (numpy, no per-run Python)."""
        sh, n = self.shift, g1 - g0 + 1
        a = g0 << sh
        b = min((g1 + 1) << sh, self.size)
        span = n << sh
        cache = pread_exact(self.fd, b - a, a)
        if span > b - a:
            cache.extend(bytes(span - (b - a)))  # the partial last granule, padded
        parts = self.base.readv(a, b - a)
        if len(parts) == 1 and span == b - a:
            base = np.frombuffer(parts[0], dtype=np.uint8)
        else:
            base = np.zeros(span, dtype=np.uint8)
            pos = 0
            for part in parts:
                base[pos : pos + len(part)] = np.frombuffer(part, dtype=np.uint8)
                pos += len(part)
        clean = dirty.clean_rows(g0, g1)
        rows = np.frombuffer(cache, dtype=np.uint8).reshape(n, 1 << sh)
        rows[clean] = base.reshape(n, 1 << sh)[clean]  # whole granules: row copies
        return memoryview(cache)[offset - a : offset - a + length]

    def write(self, offset: int, view: memoryview, runs: list[list[int]]) -> None:
        """Write ``view`` at ``offset``, whose granules are the ``[start, count, dirty]``
        ``runs``: the clean runs first, whole (copy on write at their edges), then the
        dirty ones. So if the volume is full (OSError), no dirty granule was touched."""
        sh = self.shift
        end = offset + len(view)
        for start, count, is_dirty in runs:
            if not is_dirty:
                self._write_clean(view, offset, end, start, count)
        for start, count, is_dirty in runs:
            if is_dirty:
                lo, hi = max(offset, start << sh), min(end, (start + count) << sh)
                pwrite_all(self.fd, view[lo - offset : hi - offset], lo)

    def _write_clean(self, view: memoryview, offset: int, end: int, start: int, count: int) -> None:
        """Write the clean granules [start, start + count): whole granules, copy on write at the edges."""
        sh, g = self.shift, self.granule
        a = start << sh
        b = min((start + count) << sh, self.size)
        lo, hi = max(offset, a), min(end, b)
        mid_lo, mid_hi = a, b
        first_end = min(a + g, b)
        if lo > a or hi < first_end:
            self._copy_on_write(view, offset, a, first_end)
            mid_lo = first_end
        if mid_lo < b and hi < b:
            last = max(mid_lo, ((b - 1) >> sh) << sh)
            self._copy_on_write(view, offset, last, b)
            mid_hi = last
        if mid_lo < mid_hi:
            pwrite_all(self.fd, view[mid_lo - offset : mid_hi - offset], mid_lo)

    def _copy_on_write(self, view: memoryview, offset: int, a: int, b: int) -> None:
        """Write the granule [a, b): the base's bytes with the new ones laid over."""
        buf = bytearray(b - a)
        pos = 0
        for part in self.base.readv(a, b - a):
            buf[pos : pos + len(part)] = part
            pos += len(part)
        lo, hi = max(offset, a), min(offset + len(view), b)
        buf[lo - a : hi - a] = view[lo - offset : hi - offset]
        pwrite_all(self.fd, buf, a)

def encode_slot(epoch: int, nonce: bytes) -> bytes:
    """A journal header slot: the fields, their CRC32, zeros to a page."""
    head = JSLOT.pack(JMAGIC, JVERSION, 0, epoch, nonce)
    return (head + CRC.pack(zlib.crc32(head))).ljust(PAGE, b"\0")


def decode_slot(raw: bytes) -> tuple[int, bytes] | None:
    """(epoch, nonce) of a slot, or None if it is torn, empty or not a slot."""
    if len(raw) < JSLOT.size + CRC.size or raw[:8] != JMAGIC:
        return None
    (crc,) = CRC.unpack_from(raw, JSLOT.size)
    if zlib.crc32(raw[: JSLOT.size]) != crc:
        return None
    _magic, version, _zero, epoch, nonce = JSLOT.unpack_from(raw)
    if version != JVERSION:
        return None
    return epoch, nonce


def record_size(nbytes: int) -> int:
    """The journal space a record of ``nbytes`` data bytes takes (its head, aligned)."""
    return -(-(JREC_HEAD + nbytes) // JOURNAL_ALIGN) * JOURNAL_ALIGN


def encode_record(nonce: bytes, seq: int, granule: int, count: int, data: memoryview | bytes | bytearray) -> bytearray:
    """A journal record: the head (CRC32 over the rest of the head and the data), then the data."""
    rec = bytearray(JREC_HEAD + len(data))
    JREC.pack_into(rec, 0, JREC_MAGIC, 0, nonce, seq, granule, count, len(data))
    rec[JREC_HEAD:] = data
    crc = zlib.crc32(memoryview(rec)[8:])
    CRC.pack_into(rec, 4, crc)
    return rec


@dataclass(frozen=True, slots=True)
class JournalRecord:
    seq: int
    granule: int  # the first granule
    count: int
    data: memoryview  # the granules' whole content (the last granule of the disk may be short)


def scan_records(buf: bytes | bytearray, nonce: bytes) -> list[JournalRecord]:
    """The records of the epoch ``nonce`` in ``buf`` (the journal from JOURNAL_START), in
    sequence order. A record whose head or data does not match its CRC is skipped."""
    out: list[JournalRecord] = []
    view = memoryview(buf)
    i = buf.find(nonce)
    while i >= 0:
        start = i - 8
        nxt = i + 1
        if start >= 0 and start % JOURNAL_ALIGN == 0 and start + JREC_HEAD <= len(buf) and buf[start : start + 4] == JREC_MAGIC:
            _m, crc, _n, seq, granule, count, length = JREC.unpack_from(buf, start)
            end = start + JREC_HEAD + length
            if end <= len(buf) and zlib.crc32(view[start + 8 : end]) == crc:
                out.append(JournalRecord(seq, granule, count, view[start + JREC_HEAD : end]))
                nxt = start + record_size(length)
        i = buf.find(nonce, nxt)
    out.sort(key=lambda r: r.seq)
    return out


class Journal:
    """The journal file of an open cache: where the next record goes, and the gate
    between appends and a commit that starts a new epoch.

    ``reserve`` gives a record its place and sequence number and counts an append in
    progress (the caller holds the locks of the record's granules, so sequence order is
    the order of the writes to each granule); ``append`` writes the record and ends the
    count. ``exclusive`` holds new reservations back and waits for the appends in
    progress (an append of an old epoch must not land over a record of the new one);
    ``new_epoch``, called under it, voids every record. Syncing is the caller's.
    """

    def __init__(self, fd: int, epoch: int, nonce: bytes, capacity: int = JOURNAL_BYTES) -> None:
        self.fd = fd
        self.epoch = epoch
        self.nonce = nonce
        self.capacity = capacity
        self.pos = JOURNAL_START  # where the next record goes
        self.seq = 0
        self.appends = 0  # records appended in this process (figures)
        self.zeroed = max(JOURNAL_START, os.fstat(fd).st_size)  # written up to here: a record below is an overwrite
        self._zero_lock = threading.Lock()
        self._cond = threading.Condition()
        self._appending = 0
        self._held = False

    @property
    def used(self) -> bool:
        """Whether the current epoch has records (reserved or written)."""
        return self.pos > JOURNAL_START

    def reserve(self, nbytes: int, wait: bool = True) -> tuple[int, int, bytes] | None:
        """(position, sequence number, nonce) for a record of ``nbytes`` data bytes, or
        None when the epoch has no room left for it, or (``wait`` false) when a commit
        holds the journal: the caller commits instead."""
        size = record_size(nbytes)
        with self._cond:
            while self._held:
                if not wait:
                    return None
                self._cond.wait()
            if self.pos + size > JOURNAL_START + self.capacity:
                return None
            pos, seq = self.pos, self.seq
            self.pos += size
            self.seq += 1
            self._appending += 1
            return pos, seq, self.nonce

    def filled(self, ticket: tuple[int, int, bytes], nbytes: int) -> bool:
        """Whether the record ``ticket`` reserved lies over zeros already written (its
        append then never fills ahead: one pwrite into the page cache)."""
        return ticket[0] + JREC_HEAD + nbytes <= self.zeroed

    def append(self, ticket: tuple[int, int, bytes], granule: int, count: int, data: memoryview | bytes | bytearray) -> None:
        """Write the record ``ticket`` reserved (OSError as pwrite raises it); the append
        in progress ends either way."""
        pos, seq, nonce = ticket
        try:
            rec = encode_record(nonce, seq, granule, count, data)
            if pos + len(rec) > self.zeroed:
                self._write_ahead(rec, pos)
            else:
                pwrite_all(self.fd, rec, pos)
        finally:
            with self._cond:
                self._appending -= 1
                self.appends += 1
                if not self._appending:
                    self._cond.notify_all()

    def _zero_to(self, end: int) -> None:
        """Fill the journal with zeros past ``end``, ``JOURNAL_ZERO_STEP`` at a time: the
        record writes that follow overwrite allocated blocks, so the fdatasync after
        each carries no allocation (one in every few hundred records pays for it). A
        record in the range being filled waits here, so the zeros never land over it."""
        with self._zero_lock:
            while self.zeroed < end:
                pwrite_all(self.fd, bytes(JOURNAL_ZERO_STEP), self.zeroed)
                self.zeroed += JOURNAL_ZERO_STEP

    def _write_ahead(self, rec: bytearray, pos: int) -> None:
        """Write a record that ends past the zeros: fill ahead first, or, on a volume too
        full for that, give the zeros that fit back and write the record alone (its
        sync then carries its allocation); nothing is ever zeroed below ``zeroed``."""
        try:
            self._zero_to(pos + len(rec))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            with self._zero_lock:
                if self.zeroed < pos + len(rec):
                    os.ftruncate(self.fd, self.zeroed)  # no record lies past zeroed
                    pwrite_all(self.fd, rec, pos)
                    self.zeroed = pos + len(rec)
                    return
        pwrite_all(self.fd, rec, pos)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """No reservation while inside, and every append reserved before has been written."""
        with self._cond:
            while self._held:
                self._cond.wait()
            self._held = True
            while self._appending:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def new_epoch(self) -> None:
        """Write the next epoch's header slot (a new nonce: every record so far is void)
        and start its records afresh; the caller syncs the file, under ``exclusive``."""
        epoch, nonce = self.epoch + 1, os.urandom(8)
        pwrite_all(self.fd, encode_slot(epoch, nonce), (epoch % 2) * PAGE)
        self.epoch, self.nonce = epoch, nonce
        self.pos, self.seq = JOURNAL_START, 0


def create_journal(p: Path) -> None:
    """A new journal in directory ``p`` (epoch 0, no records), synced; the caller syncs
    the directory. It is written under a temporary name and renamed."""
    tmp = p / (JOURNAL_FILE + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pwrite_all(fd, encode_slot(0, os.urandom(8)) + bytes(PAGE), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, p / JOURNAL_FILE)


def open_journal(p: Path) -> Journal:
    """The journal of directory ``p`` at its current epoch (records not yet replayed)."""
    fd = os.open(p / JOURNAL_FILE, os.O_RDWR | os.O_CLOEXEC)
    try:
        raw = pread_exact(fd, 2 * PAGE, 0)
        slots = [s for s in (decode_slot(bytes(raw[:PAGE])), decode_slot(bytes(raw[PAGE:]))) if s is not None]
        if not slots:
            raise WriteCacheError(f"{p / JOURNAL_FILE} has no valid header")
        epoch, nonce = max(slots)
    except BaseException:
        os.close(fd)
        raise
    return Journal(fd, epoch, nonce)


def replay_journal(journal: Journal, data_fd: int, bitmap_fd: int, bits: np.ndarray, head: Header, where: Path) -> int:
    """Write the current epoch's records over ``data`` and mark their granules in
    ``bits``; then sync data, persist the bitmap pages they changed, sync, and start a
    new epoch. Returns how many records it replayed."""
    end = os.fstat(journal.fd).st_size
    if end <= JOURNAL_START:
        return 0
    recs = scan_records(pread_exact(journal.fd, end - JOURNAL_START, JOURNAL_START), journal.nonce)
    if not recs:
        return 0
    g = head.granule
    pages: set[int] = set()
    for r in recs:
        if r.count < 1 or r.granule + r.count > head.granules or len(r.data) != min(r.count * g, head.size - r.granule * g):
            raise WriteCacheError(f"{where / JOURNAL_FILE} holds a record outside the disk (granule {r.granule})")
        pwrite_all(data_fd, r.data, r.granule * g)
        bits_set(bits, r.granule, r.count)
        pages.update(range((r.granule >> 3) // PAGE, ((r.granule + r.count - 1) >> 3) // PAGE + 1))
    os.fdatasync(data_fd)
    for pg in sorted(pages):
        pwrite_all(bitmap_fd, bits[pg * PAGE : (pg + 1) * PAGE].tobytes(), HEADER_SIZE + pg * PAGE)
    os.fdatasync(bitmap_fd)
    journal.new_epoch()
    os.fdatasync(journal.fd)
    return len(recs)


def _close_all(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def create_files(p: Path, size: int, granule: int, base_tag: bytes) -> CacheFiles:
    """A new, empty cache in directory ``p`` (created; it must not hold a cache), locked."""
    check_granule(granule)
    head = Header.new(size, granule, base_tag)
    p.mkdir(parents=True, exist_ok=True)
    if (p / BITMAP_FILE).exists():
        raise WriteCacheError(f"{p} already holds a write cache")
    nbytes = head.bitmap_bytes
    data_fd = bitmap_fd = -1
    try:
        data_fd = os.open(p / DATA_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(data_fd, size)
        os.fsync(data_fd)
        create_journal(p)
        tmp = p / (BITMAP_FILE + ".new")
        bfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # allocated space reads as zeros: the bitmap of an empty cache needs no writing,
            # so creating one costs the same for a 1 GiB and a 1 TiB disk
            os.posix_fallocate(bfd, 0, HEADER_SIZE + nbytes)
            pwrite_all(bfd, head.encode(), 0)
            os.fsync(bfd)
        finally:
            os.close(bfd)
        os.rename(tmp, p / BITMAP_FILE)
        fsync_dir(p)
        bitmap_fd = os.open(p / BITMAP_FILE, os.O_RDWR | os.O_CLOEXEC)
        lock_file(bitmap_fd, p)
        journal = open_journal(p)
    except OSError as e:
        _close_all(data_fd, bitmap_fd)
        volume_error(e, f"creating the write cache in {p}")
    except BaseException:
        _close_all(data_fd, bitmap_fd)
        raise
    return CacheFiles(data_fd, bitmap_fd, granule, np.zeros(nbytes, dtype=np.uint8), journal, dirty=0)


def open_files(p: Path, size: int, base_tag: bytes | None) -> CacheFiles:
    """The cache in ``p`` as last committed, checked to cache a ``size``-byte disk, locked."""
    try:
        bitmap_fd = os.open(p / BITMAP_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise WriteCacheError(f"no write cache in {p}") from None
    data_fd = journal_fd = -1
    try:
        lock_file(bitmap_fd, p)
        head = Header.decode(os.pread(bitmap_fd, HEADER.size + CRC.size, 0), p / BITMAP_FILE)
        head.check(p, size, base_tag)
        raw = pread_exact(bitmap_fd, head.bitmap_bytes, HEADER_SIZE)
        data_fd = os.open(p / DATA_FILE, os.O_RDWR | os.O_CLOEXEC)
        if os.fstat(data_fd).st_size != size:
            raise WriteCacheError(f"{p / DATA_FILE} does not have the disk's size")
        if head.version == 1:
            # a cache of an older daemon: give it an empty journal, then call it version 2
            create_journal(p)
            fsync_dir(p)
            pwrite_all(bitmap_fd, Header(head.granule, head.size, head.granules, head.base_tag, VERSION).encode(), 0)
            os.fsync(bitmap_fd)
        journal = open_journal(p)
        journal_fd = journal.fd
        bits = np.frombuffer(raw, dtype=np.uint8)
        tail = head.granules & 7
        if tail:
            bits[-1] &= (1 << tail) - 1  # bits past the last granule mean nothing
        replay_journal(journal, data_fd, bitmap_fd, bits, head, p)
    except OSError as e:
        _close_all(data_fd, bitmap_fd, journal_fd)
        raise WriteCacheError(f"cannot open the write cache in {p}: {e.strerror}") from e
    except BaseException:
        _close_all(data_fd, bitmap_fd, journal_fd)
        raise
    return CacheFiles(data_fd, bitmap_fd, head.granule, bits, journal)


def holds_cache(p: str | os.PathLike) -> bool:
    """Whether directory ``p`` holds a write cache (its bitmap exists)."""
    return (Path(p) / BITMAP_FILE).exists()


def make_temporary_dir(parent: str | os.PathLike | None) -> Path:
    """A new directory for a temporary cache under ``parent`` (default: the system's)."""
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))


def lock_file(fd: int, path: Path) -> None:
    """Take the cache's lock on its bitmap ``fd`` (held until the fd is closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WriteCacheError(f"the write cache in {path} is in use by another process") from None


def remove_stale_temporaries(parent: str | os.PathLike | None = None) -> list[Path]:
    """Remove the temporary caches a killed daemon left under ``parent`` (default: the
    system temporary directory). A cache still open somewhere holds the lock on its
    bitmap and is kept; so is a directory still being created (no bitmap yet)."""
    removed: list[Path] = []
    root = Path(parent if parent is not None else tempfile.gettempdir())
    for d in root.glob(TEMP_PREFIX + "*"):
        try:
            fd = os.open(d / BITMAP_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
