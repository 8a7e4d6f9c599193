"""The copy-on-write write cache: a writable layer over a read-only disk.

A ``WriteCache`` lives in one directory and holds two files:

``data``
    A sparse file as large as the disk, addressed by the disk's own offsets: the newest
    bytes of every *dirty* granule sit at the granule's offset. Clean granules are holes
    (or stale bytes left by a write that never became dirty, see below) and are never read.
``bitmap``
    A 4 KiB header page (little-endian: magic ``INFS-WC\\0``, version, granule size,
    disk size, granule count, a 32-byte base tag chosen by the caller, CRC32 of the
    preceding fields), then the dirty bitmap, one bit per granule (LSB first, as in
    ``engine.blockmap``), preallocated so that persisting it never needs new space.

Invariants

- A granule's bit is set in memory only after its whole granule is in ``data`` (the
  first write to a clean granule writes all of it: the new bytes plus the base's bytes
  around them, copy on write). So a dirty granule's ``data`` bytes are its content, and a
  clean granule's content is the base's.
- Bits are never cleared, so persisted bits only go 0 -> 1: ``commit`` fdatasyncs
  ``data`` first, then writes the changed bitmap pages in place and fdatasyncs
  ``bitmap``. A persisted dirty bit always has its data on disk, and a torn bitmap page
  holds only bits whose data is already durable. After a crash, ``open`` restores every
  committed write; an uncommitted write to a clean granule is forgotten (its bit was not
  persisted), an uncommitted write to a committed-dirty granule may or may not survive,
  per byte, which is what NFSv3 allows for UNSTABLE writes (the verifier changes).
- A failing write (ENOSPC, EDQUOT) raises ``NoSpace``; it writes newly allocated
  granules before it touches any already-dirty one, and it sets no bit unless all of it
  was written, so everything written before it reads back unchanged.
- The base is never written: the layer only calls ``base.read``/``readv``/``aread``.

Concurrency

Granules are grouped in lock regions of ``LOCK_SPAN`` granules, mapped onto
``STRIPES`` locks. A write holds the locks of every region it touches (taken in stripe
order, so two writers never deadlock) from the copy-on-write read of the base until its
bits are set; a read that touches a dirty granule holds them while it reads. So
overlapping reads and writes see each region either before or after a write, and two
partial writes to one clean granule never both copy it from the base. Bits, export
trackers and the set of bitmap pages to persist change together under one short
``_meta`` lock. Commits are serialised, and a commit whose writes an earlier commit
already covered returns at once (group commit). The async variants run the blocking
work (pwrite, fsync, copy on write) in an executor; a read of clean granules only goes
straight to ``base.aread``.

What it assumes of the base: ``base.size`` is fixed, and ``base.read`` returns the same
bytes for the same range every time (a restore point is immutable), is thread-safe, and
``aread``/``readv`` return buffers that stay valid after the call. It must be the same
base on every ``open``: the caller's ``base_tag`` (e.g. a hash of restore point id and
disk name) is checked against the one stored at creation.

A failed ``fdatasync`` is final: Linux may drop the dirty pages it could not write and
report success to a retried fsync, so the cache no longer knows what is durable. The
cache is then *failed*: the commit raises ``WriteCacheError`` (NFS3ERR_IO), and so does
every later write and commit, with one log line naming the cache; reads go on (the page
cache still holds what the client wrote, so the disk can be exported) and ``stats()``
says ``failed: "fdatasync: EIO"``. It stays so until the cache is closed (the session
unpublished). ``_fdatasync`` is the one place the cache syncs: tests replace it.

Pools (no task ever waits for work queued behind itself in its own pool): the async
variants run writes and dirty reads in the caller's write-cache I/O ``executor``; those
tasks wait only for chunk loads in the repository's decompression pool. A write that
arrives through ``awrite`` while writes are paused waits on the event loop (an asyncio
future woken when the pause ends), not in a pool thread: an export or commit of one
session never holds the threads every session's writes need. Only the synchronous
``write`` (called in a thread) waits on the pause in its thread, and so does an
``awrite`` already handed to its thread when the pause began (for that pause only).

Temporary caches (sandboxes, verification) live in a fresh directory that ``close``
removes; they are not durable (``commit`` only counts), since nothing survives their
session anyway.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from engine.blockmap import bits_count, bits_runs, bits_set
from engine.disk import Disk
from engine.errors import FileTooLarge, WriteCacheError
from engine.fsutil import fsync_dir, no_space, pwrite_all

MAGIC = b"INFS-WC\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")  # magic, version, granule, disk size, granules, base tag
HEADER_SIZE = 4096  # the bitmap starts at this offset in the bitmap file
PAGE = 4096  # bitmap bytes persisted together
DEFAULT_GRANULE = 4096
MIN_GRANULE = 512
MAX_GRANULE = 1 << 20
LOCK_SPAN = 64  # granules per lock region
STRIPES = 64
FRAGMENTED_RUNS = 16  # a read with more clean/dirty runs than this is merged with numpy
DATA_FILE = "data"
BITMAP_FILE = "bitmap"
TEMP_PREFIX = "instantnfs-wc-"

log = logging.getLogger("instantnfs.writecache")


def _fdatasync(fd: int) -> None:
    """Every sync of the write cache goes through here (tests replace it to fail)."""
    os.fdatasync(fd)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(frozen=True, slots=True)
class WriteCacheStats:
    size: int
    granule: int
    dirty_granules: int
    dirty_bytes: int
    allocated_bytes: int
    writes: int
    bytes_written: int
    commits: int
    failed: str | None = None  # why the cache can no longer be written, e.g. "fdatasync: EIO"


class DirtyTracker:
    """Granules written since the tracker started or since its last ``take``.

    Export uses one to find what changed while it copied; ``WriteCache.write`` marks
    every granule it writes in every live tracker, under the same lock as the dirty bits.
    """

    def __init__(self, cache: WriteCache) -> None:
        self._cache = cache
        self.bits = np.zeros(len(cache._bits), dtype=np.uint8)

    def take(self) -> np.ndarray:
        """The granules written since the last take (a bitmap), and start afresh."""
        fresh = np.zeros_like(self.bits)
        with self._cache._meta:
            bits, self.bits = self.bits, fresh
        return bits

    def close(self) -> None:
        with self._cache._meta:
            if self in self._cache._trackers:
                self._cache._trackers.remove(self)

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reraise(e: OSError, what: str) -> NoReturn:
    """A full volume (ENOSPC, EDQUOT) as NoSpace; any other OSError as itself."""
    no_space(e, f"on the write cache volume: {what} failed ({e.strerror})")




def _pread_exact(fd: int, length: int, offset: int) -> bytearray:
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise WriteCacheError(f"the write cache data file is shorter than the disk (at {offset + got})")
        got += n
    return buf


class WriteCache:
    """A writable disk: ``base`` plus the granules written since the cache was created."""

    def __init__(
        self,
        base: Disk,
        path: Path,
        data_fd: int,
        bitmap_fd: int,
        granule: int,
        bits: np.ndarray,
        *,
        temporary: bool,
        verifier: bytes | None,
        executor: Executor | None,
    ) -> None:
        self.base = base
        self.path = path
        self.size = base.size
        self.granule = granule
        self.durable = not temporary
        self.is_temporary = temporary
        self.verifier = verifier if verifier is not None else os.urandom(8)
        if len(self.verifier) != 8:
            raise ValueError("a write verifier is 8 bytes")
        self._shift = granule.bit_length() - 1
        self._granules = -(-self.size // granule)
        self._data_fd = data_fd
        self._bitmap_fd = bitmap_fd
        self._bits = bits
        self._executor = executor
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        self._meta = threading.Lock()
        self._commit_lock = threading.Lock()
        self._gate = threading.Condition()
        self._writers = 0
        self._frozen = 0
        self._paused_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.failed: str | None = None
        self._unpersisted: set[int] = set()
        self._trackers: list[DirtyTracker] = []
        self._write_gen = 0
        self._durable_gen = 0
        self._closed = False
        self.writes = 0
        self.bytes_written = 0
        self.commits = 0

    # -- creating and opening ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        base: Disk,
        *,
        granule: int = DEFAULT_GRANULE,
        base_tag: bytes = b"",
        verifier: bytes | None = None,
        executor: Executor | None = None,
        _temporary: bool = False,
    ) -> WriteCache:
        """A new, empty cache in directory ``path`` (created; it must not hold a cache)."""
        if granule < MIN_GRANULE or granule > MAX_GRANULE or granule & (granule - 1):
            raise ValueError(f"granule {granule} is not a power of two from {MIN_GRANULE} to {MAX_GRANULE}")
        if len(base_tag) > 32:
            raise ValueError("a base tag is at most 32 bytes")
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        if (p / BITMAP_FILE).exists():
            raise WriteCacheError(f"{p} already holds a write cache")
        size = base.size
        ngran = -(-size // granule)
        nbytes = -(-ngran // 8)
        data_fd = bitmap_fd = -1
        try:
            data_fd = os.open(p / DATA_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(data_fd, size)
            os.fsync(data_fd)
            tmp = p / (BITMAP_FILE + ".new")
            bfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                head = HEADER.pack(MAGIC, VERSION, granule, size, ngran, base_tag.ljust(32, b"\0"))
                head += struct.pack("<I", zlib.crc32(head))
                os.posix_fallocate(bfd, 0, HEADER_SIZE + nbytes)
                pwrite_all(bfd, head.ljust(HEADER_SIZE, b"\0") + bytes(nbytes), 0)
                os.fsync(bfd)
            finally:
                os.close(bfd)
            os.rename(tmp, p / BITMAP_FILE)
            fsync_dir(p)
            bitmap_fd = os.open(p / BITMAP_FILE, os.O_RDWR | os.O_CLOEXEC)
            _lock_file(bitmap_fd, p)
        except OSError as e:
            for fd in (data_fd, bitmap_fd):
                if fd >= 0:
                    os.close(fd)
            _reraise(e, f"creating the write cache in {p}")
        bits = np.zeros(nbytes, dtype=np.uint8)
        return cls(base, p, data_fd, bitmap_fd, granule, bits, temporary=_temporary, verifier=verifier, executor=executor)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        base: Disk,
        *,
        base_tag: bytes | None = None,
        verifier: bytes | None = None,
        executor: Executor | None = None,
    ) -> WriteCache:
        """The cache in ``path`` as last committed (a new verifier unless one is given)."""
        p = Path(path)
        try:
            bitmap_fd = os.open(p / BITMAP_FILE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise WriteCacheError(f"no write cache in {p}") from None
        data_fd = -1
        try:
            _lock_file(bitmap_fd, p)
            head = os.pread(bitmap_fd, HEADER.size + 4, 0)
            if len(head) < HEADER.size + 4 or head[:8] != MAGIC:
                raise WriteCacheError(f"{p / BITMAP_FILE} is not a write cache bitmap")
            (crc,) = struct.unpack_from("<I", head, HEADER.size)
            if zlib.crc32(head[: HEADER.size]) != crc:
                raise WriteCacheError(f"{p / BITMAP_FILE} has a damaged header (CRC mismatch)")
            _magic, version, granule, size, ngran, tag = HEADER.unpack_from(head)
            if version != VERSION:
                raise WriteCacheError(f"{p} is a version {version} write cache; this instantnfs reads version {VERSION}")
            if size != base.size:
                raise WriteCacheError(f"{p} caches a {size}-byte disk, not this {base.size}-byte one")
            if base_tag is not None and tag != base_tag.ljust(32, b"\0"):
                raise WriteCacheError(f"{p} caches another disk (base tag mismatch)")
            if granule < MIN_GRANULE or granule & (granule - 1) or ngran != -(-size // granule):
                raise WriteCacheError(f"{p} has an invalid granule size {granule}")
            nbytes = -(-ngran // 8)
            raw = _pread_exact(bitmap_fd, nbytes, HEADER_SIZE)
            data_fd = os.open(p / DATA_FILE, os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(data_fd).st_size != size:
                raise WriteCacheError(f"{p / DATA_FILE} does not have the disk's size")
        except OSError as e:
            for fd in (data_fd, bitmap_fd):
                if fd >= 0:
                    os.close(fd)
            raise WriteCacheError(f"cannot open the write cache in {p}: {e.strerror}") from e
        except BaseException:
            for fd in (data_fd, bitmap_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        bits = np.frombuffer(raw, dtype=np.uint8)
        tail = ngran & 7
        if tail:
            bits[-1] &= (1 << tail) - 1  # bits past the last granule mean nothing
        return cls(base, p, data_fd, bitmap_fd, granule, bits, temporary=False, verifier=verifier, executor=executor)

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, base: Disk, **kw) -> WriteCache:
        """Instant recovery: reopen the session's cache after a restart, or start one."""
        if (Path(path) / BITMAP_FILE).exists():
            granule = kw.pop("granule", None)
            cache = cls.open(path, base, **kw)
            if granule is not None and granule != cache.granule:
                cache.close()
                raise WriteCacheError(f"{path} uses {cache.granule}-byte granules, not {granule}")
            return cache
        return cls.create(path, base, **kw)

    @classmethod
    def temporary(cls, base: Disk, parent: str | os.PathLike | None = None, **kw) -> WriteCache:
        """Sandbox / verification: a cache in a new directory under ``parent``, removed on close."""
        d = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
        try:
            return cls.create(d, base, _temporary=True, **kw)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise

    def close(self) -> None:
        """Commit (durable caches) and close; a temporary cache's directory is removed."""
        if self._closed:
            return
        try:
            if self.durable and self.failed is None:
                self.commit()
        finally:
            self._closed = True
            os.close(self._data_fd)
            os.close(self._bitmap_fd)
            if self.is_temporary:
                shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> WriteCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        return max(0, min(length, self.size - offset))

    def _stripes(self, g0: int, g1: int) -> list[threading.Lock]:
        r0, r1 = g0 // LOCK_SPAN, g1 // LOCK_SPAN
        if r1 - r0 + 1 >= STRIPES:
            return self._locks
        return [self._locks[i] for i in sorted({r % STRIPES for r in range(r0, r1 + 1)})]

    def needs_no_copy(self, offset: int, n: int) -> bool:
        """Whether a write covers whole granules, or dirty ones at its unaligned edges
        (dirty bits never clear, so the answer cannot go stale)."""
        g = self.granule
        end = offset + n
        if offset % g and not self.is_dirty(offset, 1):
            return False
        return not (end % g and end < self.size and not self.is_dirty(end - 1, 1))

    def is_dirty(self, offset: int, length: int) -> bool:
        """Whether any granule in the range was written."""
        length = self._clip(offset, length)
        if length == 0:
            return False
        g0 = offset >> self._shift
        return bits_count(self._bits, g0, ((offset + length - 1) >> self._shift) - g0 + 1) > 0

    def read(self, offset: int, length: int) -> bytes:
        """The disk's newest bytes in [offset, offset + length), cut at the end of the disk."""
        parts = self.readv(offset, length)
        if len(parts) == 1:
            return parts[0].tobytes()
        return b"".join(parts)

    def readv(self, offset: int, length: int) -> list[memoryview]:
        """The same bytes as ``read``, as a list of buffers (cache file + base)."""
        self._check_open()
        length = self._clip(offset, length)
        if length == 0:
            return []
        g0 = offset >> self._shift
        g1 = (offset + length - 1) >> self._shift
        if bits_count(self._bits, g0, g1 - g0 + 1) == 0:
            return self.base.readv(offset, length)
        locks = self._stripes(g0, g1)
        for lk in locks:
            lk.acquire()
        try:
            return self._read_locked(offset, length, g0, g1)
        finally:
            for lk in reversed(locks):
                lk.release()

    def _read_locked(self, offset: int, length: int, g0: int, g1: int) -> list[memoryview]:
        runs = bits_runs(self._bits, g0, g1 - g0 + 1).tolist()
        end = offset + length
        if len(runs) > FRAGMENTED_RUNS:
            return [self._read_fragmented(offset, length, g0, g1)]
        sh = self._shift
        out: list[memoryview] = []
        for start, count, dirty in runs:
            lo = max(offset, start << sh)
            hi = min(end, (start + count) << sh)
            if dirty:
                out.append(memoryview(_pread_exact(self._data_fd, hi - lo, lo)))
            else:
                out.extend(self.base.readv(lo, hi - lo))
        return out

    def _read_fragmented(self, offset: int, length: int, g0: int, g1: int) -> memoryview:
        """Many small clean/dirty runs: one pread of the span, then the clean granules
        copied over it from the base as whole rows (numpy, no per-run Python)."""
        sh, n = self._shift, g1 - g0 + 1
        a = g0 << sh
        b = min((g1 + 1) << sh, self.size)
        span = n << sh
        cache = _pread_exact(self._data_fd, b - a, a)
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
        first = g0 >> 3
        dirty = np.unpackbits(self._bits[first : (g1 >> 3) + 1], bitorder="little")[g0 - (first << 3) :][:n]
        clean = np.flatnonzero(dirty == 0)
        rows = np.frombuffer(cache, dtype=np.uint8).reshape(n, 1 << sh)
        rows[clean] = base.reshape(n, 1 << sh)[clean]  # whole granules: row copies
        return memoryview(cache)[offset - a : offset - a + length]

    async def aread(self, offset: int, length: int) -> list[memoryview]:
        """``readv`` for the event loop: clean ranges straight from the base, else in the executor."""
        self._check_open()
        if not self.is_dirty(offset, length):
            return await self.base.aread(offset, length)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.readv, offset, length)

    # -- writing -------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview, stable: bool = False) -> None:
        """Write ``data`` at ``offset``; ``stable`` returns only once it is durable (FILE_SYNC)."""
        self._check_writable()
        view = memoryview(data).cast("B")
        n = len(view)
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if offset + n > self.size:
            raise FileTooLarge(f"a write of {n} bytes at {offset} goes past the end of the {self.size}-byte disk")
        if n:
            with self._gate:
                while self._frozen:
                    self._gate.wait()
                self._writers += 1
            try:
                self._write(offset, view)
            finally:
                with self._gate:
                    self._writers -= 1
                    self._gate.notify_all()
        if stable:
            self.commit()

    def _write(self, offset: int, view: memoryview) -> None:
        sh = self._shift
        end = offset + len(view)
        g0, g1 = offset >> sh, (end - 1) >> sh
        locks = self._stripes(g0, g1)
        for lk in locks:
            lk.acquire()
        try:
            runs = bits_runs(self._bits, g0, g1 - g0 + 1).tolist()
            clean = [(s, c) for s, c, v in runs if not v]
            try:
                # Newly dirty granules first: if the volume is full, nothing that was
                # already dirty has been touched, and no bit is set below.
                for start, count in clean:
                    self._write_clean(view, offset, end, start, count)
                for start, count, v in runs:
                    if v:
                        lo, hi = max(offset, start << sh), min(end, (start + count) << sh)
                        pwrite_all(self._data_fd, view[lo - offset : hi - offset], lo)
            except OSError as e:
                _reraise(e, f"a write of {len(view)} bytes at {offset}")
            pages = range((g0 >> 3) // PAGE, (g1 >> 3) // PAGE + 1)
            with self._meta:
                for start, count in clean:
                    bits_set(self._bits, start, count)
                for t in self._trackers:
                    bits_set(t.bits, g0, g1 - g0 + 1)
                if clean:
                    self._unpersisted.update(pages)
                self._write_gen += 1
                self.writes += 1
                self.bytes_written += len(view)
        finally:
            for lk in reversed(locks):
                lk.release()

    def _write_clean(self, view: memoryview, offset: int, end: int, start: int, count: int) -> None:
        """Write the clean granules [start, start + count): whole granules, copy on write at the edges."""
        sh, g = self._shift, self.granule
        a = start << sh
        b = min((start + count) << sh, self.size)
        lo, hi = max(offset, a), min(end, b)
        fd = self._data_fd
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
            pwrite_all(fd, view[mid_lo - offset : mid_hi - offset], mid_lo)

    def _copy_on_write(self, view: memoryview, offset: int, a: int, b: int) -> None:
        """Write the granule [a, b): the base's bytes with the new ones laid over."""
        buf = bytearray(b - a)
        pos = 0
        for part in self.base.readv(a, b - a):
            buf[pos : pos + len(part)] = part
            pos += len(part)
        lo, hi = max(offset, a), min(offset + len(view), b)
        buf[lo - a : hi - a] = view[lo - offset : hi - offset]
        pwrite_all(self._data_fd, buf, a)

    async def awrite(self, offset: int, data: bytes | bytearray | memoryview, stable: bool = False) -> None:
        """``write`` in the executor (copy on write and fsync never block the loop); while
        writes are paused it waits here, on the loop, holding no executor thread."""
        self._check_writable()
        loop = asyncio.get_running_loop()
        while True:
            with self._gate:
                if not self._frozen:
                    break
                fut = loop.create_future()
                self._paused_waiters.append((loop, fut))
            await fut
        await loop.run_in_executor(self._executor, self.write, offset, data, stable)

    # -- durability ----------------------------------------------------------------------

    def commit(self) -> None:
        """Make every write that returned before this call durable: data, then bitmap."""
        self._check_writable()
        with self._meta:
            target = self._write_gen
        with self._commit_lock:
            self._check_writable()  # an earlier commit may have failed while this one waited
            if self._durable_gen >= target:
                return
            with self._meta:
                pages = sorted(self._unpersisted)
                self._unpersisted = set()
                gen = self._write_gen
                snap = [(p, self._bits[p * PAGE : (p + 1) * PAGE].tobytes()) for p in pages]
            if not self.durable:
                self._durable_gen = gen
                self.commits += 1
                return
            try:
                _fdatasync(self._data_fd)
            except OSError as e:
                self._fail("fdatasync", e)
            try:
                for p, raw in snap:
                    pwrite_all(self._bitmap_fd, raw, HEADER_SIZE + p * PAGE)
            except OSError as e:
                with self._meta:
                    self._unpersisted.update(pages)
                _reraise(e, "committing the write cache")
            if snap:
                try:
                    _fdatasync(self._bitmap_fd)
                except OSError as e:
                    self._fail("fdatasync", e)
            self._durable_gen = gen
            self.commits += 1

    async def acommit(self) -> None:
        """``commit`` in the executor."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.commit)

    # -- export support ------------------------------------------------------------------

    def track(self) -> DirtyTracker:
        """Start recording which granules are written (see ``DirtyTracker``)."""
        t = DirtyTracker(self)
        with self._meta:
            self._trackers.append(t)
        return t

    @contextmanager
    def writes_paused(self) -> Iterator[None]:
        """Hold new writes back and wait for the ones in progress; reads go on. Call it
        in a thread, never on the event loop (``awrite`` callers wait on the loop)."""
        with self._gate:
            self._frozen += 1
            while self._writers:
                self._gate.wait()
        try:
            yield
        finally:
            waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
            with self._gate:
                self._frozen -= 1
                self._gate.notify_all()
                if not self._frozen:
                    waiters, self._paused_waiters = self._paused_waiters, []
            for loop, fut in waiters:
                try:
                    loop.call_soon_threadsafe(_wake, fut)
                except RuntimeError:
                    pass  # that loop is closed: nobody waits there any more

    def dirty_bitmap(self) -> np.ndarray:
        """A copy of the dirty bitmap (one bit per granule, LSB first)."""
        with self._meta:
            return self._bits.copy()

    # -- figures -------------------------------------------------------------------------

    def stats(self) -> WriteCacheStats:
        dirty = bits_count(self._bits, 0, self._granules)
        dirty_bytes = dirty * self.granule
        if dirty and bits_count(self._bits, self._granules - 1, 1):
            dirty_bytes -= self._granules * self.granule - self.size
        allocated = 0 if self._closed else os.fstat(self._data_fd).st_blocks * 512
        return WriteCacheStats(
            size=self.size,
            granule=self.granule,
            dirty_granules=dirty,
            dirty_bytes=dirty_bytes,
            allocated_bytes=allocated,
            writes=self.writes,
            bytes_written=self.bytes_written,
            commits=self.commits,
            failed=self.failed,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the write cache in {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.failed is not None:
            raise WriteCacheError(
                f"the write cache in {self.path} failed ({self.failed}) and may have lost acknowledged writes: "
                "it takes no more writes; export the disk, then unpublish the session"
            )

    def _fail(self, what: str, e: OSError) -> NoReturn:
        """A sync failed: from now on the cache refuses writes and commits (see the design note)."""
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.failed = f"{what}: {name}"
        log.error("write cache %s failed: %s (%s); its writes and commits fail from now on", self.path, self.failed, e.strerror)
        raise WriteCacheError(f"the write cache in {self.path} failed: {self.failed}; the data written since the last commit may be lost") from e


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




def _lock_file(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WriteCacheError(f"the write cache in {path} is in use by another process") from None
