"""Pack files: append-only chunk records, written by one writer, read by many.

Writer: records are appended in order through a buffered file; a pack is rolled when it
passes ``pack_limit``. Each pack's id comes from the repository's persisted counter
(``allocate``, never an id used before) and its header carries a fresh random uid and
the repository id. ``seal()`` flushes and fsyncs each pack, then writes its index
(carrying the same uid) atomically; only then may a manifest reference its records
(see ``format``).

Reader: ``read_chunk`` is one ``preadv`` of header + payload, a CRC32C check over both,
a decompression to exactly the block size and (``VERIFY_FINGERPRINT``) a BLAKE3 check of
the result against the record's fingerprint. It writes into a buffer the caller gives
(the chunk cache reuses evicted ones) and allocates nothing per record: a raw record
(``clen`` equal to the block size) is read straight into that buffer, a compressed one
into a per-thread scratch buffer and decompressed from there by liblz4's block API with
the GIL released (``engine.codec``; ``INSTANTNFS_PURE=1``: the python-lz4 twin). Every failure (short read, bad magic,
length mismatch, CRC or fingerprint mismatch, decompressor error) raises
``IntegrityError`` naming the pack and offset: wrong bytes are never returned. A pack is
opened once and its header checked (magic, pack id, repository id, and the uid its index
names): a pack that is not the one its id names is an ``IntegrityError``. Descriptors
are shared across threads and reference-counted, so one is never closed under a pread.

Packs that gc deleted: every ``SWEEP_INTERVAL`` seconds the open descriptors are
fstat()ed and those whose file has no link left are closed (their space is then freed),
and every ``on_close`` listener is told (a chunk cache above drops the pack's entries). The sweep runs on a
reading thread when one is due, and on a small thread of its own (started with the
first open pack, stopped by ``close``) so an idle daemon frees the space too; never on
an event loop. Nothing here opens a file
or calls ``posix_fadvise`` unless called from a worker thread: ``submit_hints`` hands the
readahead hints to an executor.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import blake3
import crc32c
import lz4.block
import numpy as np

from engine.codec import lz4_decompress_into
from engine.errors import InstantNFSError, IntegrityError, RepositoryError
from engine.fsutil import no_space
from engine.repo.format import (
    CODEC_LZ4,
    CODEC_RAW,
    IDX_DTYPE,
    IDX_HEADER,
    PACK_HEADER,
    PACK_HEADER_V1,
    PACK_MAGIC,
    PACK_VERSION,
    RECORD_CRC_SPAN,
    RECORD_HEADER,
    RECORD_MAGIC,
    UID_SIZE,
    fsync_dir,
    idx_bytes,
    idx_name,
    pack_name,
    parse_idx_header,
    write_file_atomic,
)

HDR = RECORD_HEADER.size

# BLAKE3 of every decompressed chunk against its record's fingerprint before it enters
# the cache: about 0.3 ms per MiB on one core (LZ4 decompression of the same MiB: about
# 1 ms), paid on cache misses only. It is the one end-to-end check of the bytes served:
# the CRC covers the compressed payload, not what the decompressor made of it.
VERIFY_FINGERPRINT = True
SWEEP_INTERVAL = 2.0  # seconds between checks for packs that gc deleted
MAX_HINT_TASKS = 2  # readahead hint tasks queued at once; more are dropped (only hints)


def record_header(codec: int, payload: bytes, ulen: int, fingerprint: bytes) -> bytes:
    """The 52-byte header of a record, its CRC32C covering header and payload."""
    head = RECORD_HEADER.pack(RECORD_MAGIC, codec, len(payload), ulen, fingerprint, 0)[:RECORD_CRC_SPAN]
    crc = crc32c.crc32c(payload, crc32c.crc32c(head))
    return head + crc.to_bytes(4, "little")


def encode_record(codec: int, payload: bytes, ulen: int, fingerprint: bytes) -> bytes:
    return record_header(codec, payload, ulen, fingerprint) + payload


SAMPLE = 64 * 1024


def compress_block(block: bytes | memoryview) -> tuple[int, bytes]:
    """LZ4 when it saves space, the raw bytes otherwise.

    A block whose first 64 KiB do not compress at all (media, archives, encrypted data)
    is stored raw without compressing the rest: a quarter of a typical disk, at a
    fifteenth of the cost.
    """
    if len(block) > 2 * SAMPLE:
        probe = lz4.block.compress(memoryview(block)[:SAMPLE], store_size=False)
        if len(probe) >= SAMPLE - SAMPLE // 64:
            return CODEC_RAW, bytes(block)
    packed = lz4.block.compress(block, store_size=False)
    if len(packed) < len(block):
        return CODEC_LZ4, packed
    return CODEC_RAW, bytes(block)


class PackWriter:
    """Append records to new pack files of one repository (one writer at a time)."""

    def __init__(self, packs_dir: Path, allocate: Callable[[], int], repo_uid: bytes, pack_limit: int = 1 << 30) -> None:
        if len(repo_uid) != UID_SIZE:
            raise ValueError("the repository uid is 16 bytes")
        self.dir = packs_dir
        self.allocate = allocate  # the repository's pack-id counter (under the writer lock)
        self.repo_uid = repo_uid
        self.pack_limit = pack_limit
        self._fd = -1
        self._pack = -1
        self._uid = b""
        self.uids: dict[int, bytes] = {}
        self._pos = 0
        self._records: list[tuple[bytes, int, int, int]] = []
        self.finished: list[tuple[int, bytes, list[tuple[bytes, int, int, int]]]] = []
        self.created: list[Path] = []
        self.bytes_written = 0

    def _open(self) -> None:
        self._pack = self.allocate()
        self._uid = secrets.token_bytes(UID_SIZE)
        path = self.dir / pack_name(self._pack)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise RepositoryError(f"pack {path} exists although the pack-id counter handed out its id; run 'instantnfs repo check'") from None
        self.created.append(path)
        self._pos = 0
        self._write([PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, self._pack, self._uid, self.repo_uid)])

    def _write(self, parts: list[bytes | memoryview]) -> None:
        """Write all of ``parts`` at the pack's end (no user-space copy: writev)."""
        try:
            todo = sum(len(p) for p in parts)
            while todo:
                n = os.pwritev(self._fd, parts, self._pos)
                self._pos += n
                todo -= n
                if todo:  # a short write: drop what went out and go on
                    while n >= len(parts[0]):
                        n -= len(parts[0])
                        parts = parts[1:]
                    parts = [memoryview(parts[0])[n:], *parts[1:]]
        except OSError as e:
            no_space(e, f"for pack {self.dir / pack_name(self._pack)}")

    def append(self, header: bytes, payload: bytes, fingerprint: bytes) -> tuple[int, int, int]:
        """Store one record (``header`` from ``record_header``); returns (pack, record offset, clen)."""
        if self._fd < 0 or self._pos >= self.pack_limit:
            self._close_current()
            self._open()
        offset = self._pos
        self._write([header, payload])
        self.bytes_written += len(header) + len(payload)
        self._records.append((fingerprint, offset, len(payload), RECORD_HEADER.unpack_from(header)[3]))
        return self._pack, offset, len(payload)

    def _close_current(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        except OSError as e:
            no_space(e, f"to finish pack {self.dir / pack_name(self._pack)}")
        finally:
            os.close(fd)
        self.finished.append((self._pack, self._uid, self._records))
        self.uids[self._pack] = self._uid
        self._records = []

    def seal(self) -> None:
        """Make every record durable: fsync the packs, then write their indexes."""
        self._close_current()
        fsync_dir(self.dir)
        for pack, uid, records in self.finished:
            entries = np.array(records, dtype=IDX_DTYPE)
            try:
                write_file_atomic(self.dir / idx_name(pack), idx_bytes(pack, entries, uid))
            except OSError as e:
                no_space(e, f"for pack index {idx_name(pack)}")
        self.finished = []

    def abort(self) -> None:
        """Remove everything this writer created (nothing references it yet)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for path in self.created:
            for p in (path, path.with_suffix(".idx")):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass


class _Open:
    """One open pack: its descriptor, the reads using it, and whether it is to close."""

    __slots__ = ("fd", "users", "dead")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dead = False


class PackReader:
    """Read and verify chunk records; shares one descriptor per pack across threads."""

    def __init__(self, packs_dir: Path, block_size: int, repo_uid: bytes | None = None) -> None:
        self.dir = packs_dir
        self.block_size = block_size
        self.repo_uid = repo_uid  # None: the repository id is not checked (tools, tests)
        # told the pack id of a pack closed because gc removed it (or replaced behind its id)
        self.on_close: list[Callable[[int], object]] = []
        self._open: dict[int, _Open] = {}
        self._uids: dict[int, bytes | None] = {}  # uid of each pack opened so far
        self._lock = threading.Lock()
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self._hint_tasks = 0
        self._local = threading.local()  # per reading thread: a scratch buffer
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.closed_deleted = 0

    # -- descriptors ---------------------------------------------------------------------

    def _open_checked(self, pack: int) -> tuple[int, bytes | None]:
        """Open a pack and check it is the pack its id names: (fd, uid)."""
        path = self.dir / pack_name(pack)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise IntegrityError(f"pack {path} is missing") from e
        except OSError as e:
            raise RepositoryError(f"cannot open pack {path}: {e.strerror}") from e
        try:
            return fd, self._check_header(fd, pack, path)
        except BaseException:
            os.close(fd)
            raise

    def _check_header(self, fd: int, pack: int, path: Path) -> bytes | None:
        try:
            head = os.pread(fd, PACK_HEADER.size, 0)
        except OSError as e:
            raise IntegrityError(f"pack {path}: header read failed: {e.strerror}") from e
        if len(head) < PACK_HEADER_V1.size:
            raise IntegrityError(f"pack {path} has a truncated header")
        magic, version, pid = PACK_HEADER_V1.unpack_from(head)
        if magic != PACK_MAGIC:
            raise IntegrityError(f"pack {path} has a bad header (not a pack file)")
        if pid != pack:
            raise IntegrityError(f"pack {path} names itself pack {pid}: it is not the pack its name says")
        if version == 1:
            return None
        if version != PACK_VERSION:
            raise RepositoryError(f"pack {path} has unsupported version {version}; upgrade instantnfs")
        if len(head) < PACK_HEADER.size:
            raise IntegrityError(f"pack {path} has a truncated header")
        _m, _v, _p, uid, repo_uid = PACK_HEADER.unpack_from(head)
        if self.repo_uid is not None and repo_uid != self.repo_uid:
            raise IntegrityError(f"pack {path} belongs to another repository ({repo_uid.hex()})")
        idx_path = self.dir / idx_name(pack)
        try:
            with open(idx_path, "rb") as f:
                raw = f.read(IDX_HEADER.size)
            _size, ipack, _count, iuid = parse_idx_header(raw, idx_path)
        except FileNotFoundError:
            raise IntegrityError(f"pack {path} has no index: it is unfinished or was removed by gc") from None
        except OSError as e:
            raise RepositoryError(f"cannot read pack index {idx_path}: {e.strerror}") from e
        except RepositoryError as e:
            raise IntegrityError(f"pack {path}: {e}") from e
        if ipack != pack or iuid != uid:
            raise IntegrityError(f"pack {path} is not the pack its index {idx_path.name} describes (uid differs)")
        return bytes(uid)

    def _acquire(self, pack: int) -> _Open:
        with self._lock:
            h = self._open.get(pack)
            if h is not None:
                h.users += 1
                return h
        fd, uid = self._open_checked(pack)  # outside the lock: other packs' reads go on
        changed = False
        with self._lock:
            h = self._open.get(pack)
            if h is None:
                h = self._open[pack] = _Open(fd)
                fd = -1
                changed = pack in self._uids and self._uids[pack] != uid
                self._uids[pack] = uid
                if self._sweeper is None and not self._stop.is_set():
                    self._sweeper = threading.Thread(target=self._sweep_loop, name="pack-sweep", daemon=True)
                    self._sweeper.start()
            h.users += 1
        if fd >= 0:
            os.close(fd)  # another thread opened it first
        if changed:
            for listener in self.on_close:
                listener(pack)  # a different pack behind a known id: forget the old bytes
        return h

    def _release(self, h: _Open) -> None:
        with self._lock:
            h.users -= 1
            if h.dead and h.users == 0:
                os.close(h.fd)

    def is_open(self, pack: int) -> bool:
        with self._lock:
            return pack in self._open

    def sweep(self) -> list[int]:
        """Close the packs whose files were deleted (by gc); returns their ids. Blocking
        (one fstat per open pack): call it from a worker thread."""
        with self._lock:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            handles = list(self._open.items())
        gone = []
        for pack, h in handles:
            try:
                if os.fstat(h.fd).st_nlink > 0:
                    continue
            except OSError:
                pass  # closed meanwhile: dropped below only if it is still this handle
            with self._lock:
                if self._open.get(pack) is not h:
                    continue
                del self._open[pack]
                h.dead = True
                if h.users == 0:
                    os.close(h.fd)
                self.closed_deleted += 1
            gone.append(pack)
        for pack in gone:
            for listener in self.on_close:
                listener(pack)
        return gone

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_INTERVAL):
            if time.monotonic() >= self._next_sweep:
                self.sweep()

    def _maybe_sweep(self) -> None:
        if time.monotonic() >= self._next_sweep:
            with self._lock:
                if time.monotonic() < self._next_sweep:
                    return
                self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            self.sweep()

    # -- reading -------------------------------------------------------------------------

    def read_record(self, pack: int, offset: int, clen: int) -> tuple[int, bytes, memoryview, int]:
        """Read and CRC-check one record: (codec, fingerprint, payload, ulen)."""
        self._maybe_sweep()
        where = f"pack {pack_name(pack)} offset {offset}"
        h = self._acquire(pack)
        try:
            raw = os.pread(h.fd, HDR + clen, offset)
        except OSError as e:
            raise IntegrityError(f"chunk at {where}: read failed: {e.strerror}") from e
        finally:
            self._release(h)
        if len(raw) != HDR + clen:
            raise IntegrityError(f"chunk at {where}: record is truncated")
        magic, codec, rclen, ulen, fingerprint, crc = RECORD_HEADER.unpack_from(raw)
        if magic != RECORD_MAGIC or rclen != clen:
            raise IntegrityError(f"chunk at {where}: no record here (bad magic or length)")
        view = memoryview(raw)
        payload = view[HDR:]
        if crc32c.crc32c(payload, crc32c.crc32c(view[:RECORD_CRC_SPAN])) != crc:
            raise IntegrityError(f"chunk at {where}: checksum mismatch")
        return codec, fingerprint, payload, ulen

    def willneed(self, pack: int, offset: int, clen: int) -> None:
        """Ask the kernel to start reading a record into the page cache. Blocking (it may
        open the pack): call it from a worker thread, or use ``submit_hints``."""
        try:
            h = self._acquire(pack)
        except InstantNFSError:
            return  # only a hint: the read itself reports what is wrong
        try:
            os.posix_fadvise(h.fd, offset, HDR + clen, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            self._release(h)

    def _hint_task(self, records: Sequence[tuple[int, int, int]]) -> None:
        try:
            for pack, offset, clen in records:
                self.willneed(pack, offset, clen)
        finally:
            with self._lock:
                self._hint_tasks -= 1

    def submit_hints(self, executor: Executor, records: Sequence[tuple[int, int, int]]) -> None:
        """Queue ``willneed`` of (pack, offset, clen) records in ``executor``; never blocks
        (at most ``MAX_HINT_TASKS`` queued, further hints are dropped)."""
        if not records:
            return
        with self._lock:
            if self._hint_tasks >= MAX_HINT_TASKS:
                return
            self._hint_tasks += 1
        try:
            executor.submit(self._hint_task, list(records))
        except RuntimeError:  # the executor is shut down: no hints any more
            with self._lock:
                self._hint_tasks -= 1

    def _scratch(self, size: int) -> bytearray:
        """This thread's buffer for a record header and a compressed payload (reused)."""
        if size > HDR + self.block_size:  # longer than any record our writers make: not kept
            return bytearray(size)
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(HDR + self.block_size)
        return buf

    def read_chunk(self, pack: int, offset: int, clen: int, out: bytearray | None = None,
                   fingerprint: bytes | None = None) -> bytearray:
        """The decompressed block stored at (pack, offset), exactly block_size bytes,
        written into ``out`` (a bytearray of block_size, reused by the caller) or a new
        bytearray; returns it. After an error ``out`` holds garbage.

        ``fingerprint``: what the caller expects the chunk to be (its pack index entry:
        repository check, backup verification). The record's fingerprint must equal it,
        and the content is hashed whatever ``VERIFY_FINGERPRINT`` says.

        One ``preadv``: a raw record's payload lands straight in ``out`` (no copy); a
        compressed one in this thread's scratch buffer, decompressed from there into
        ``out`` (liblz4, GIL released). Then the same checks as ``read_record`` +
        ``decode``, with the same messages."""
        bs = self.block_size
        if out is None:
            out = bytearray(bs)
        elif len(out) != bs:
            raise ValueError(f"the output buffer holds {len(out)} bytes, not the block size {bs}")
        self._maybe_sweep()
        where = f"pack {pack_name(pack)} offset {offset}"
        scratch = memoryview(self._scratch(HDR + clen))
        head = scratch[:HDR]
        direct = clen == bs  # a raw record: its payload is the block
        body = memoryview(out) if direct else scratch[HDR : HDR + clen]
        h = self._acquire(pack)
        try:
            n = os.preadv(h.fd, [head, body], offset)
        except OSError as e:
            raise IntegrityError(f"chunk at {where}: read failed: {e.strerror}") from e
        finally:
            self._release(h)
        if n != HDR + clen:
            raise IntegrityError(f"chunk at {where}: record is truncated")
        magic, codec, rclen, ulen, rec_fp, crc = RECORD_HEADER.unpack_from(head)
        if magic != RECORD_MAGIC or rclen != clen:
            raise IntegrityError(f"chunk at {where}: no record here (bad magic or length)")
        if crc32c.crc32c(body, crc32c.crc32c(head[:RECORD_CRC_SPAN])) != crc:
            raise IntegrityError(f"chunk at {where}: checksum mismatch")
        if fingerprint is not None and rec_fp != fingerprint:
            raise IntegrityError(f"chunk at {where}: fingerprint differs from the pack index")
        if direct and codec != CODEC_RAW:  # a compressed payload as long as a block: not from
            scratch[HDR : HDR + clen] = body  # compress_block, but readable: decode from scratch
            body = scratch[HDR : HDR + clen]
        self.decode_into(pack, offset, codec, body, ulen, out)
        if (VERIFY_FINGERPRINT or fingerprint is not None) and blake3.blake3(out, max_threads=1).digest() != rec_fp:
            raise IntegrityError(f"chunk at {where}: content does not match its fingerprint")
        return out

    def decode(self, pack: int, offset: int, codec: int, payload: memoryview, ulen: int) -> bytearray:
        """A record's payload decoded into a new buffer (see ``decode_into``)."""
        out = bytearray(self.block_size)
        self.decode_into(pack, offset, codec, payload, ulen, out)
        return out

    def decode_into(self, pack: int, offset: int, codec: int, payload: memoryview, ulen: int, out: bytearray) -> None:
        """Decode a CRC-checked payload into ``out`` (block_size bytes). A raw payload that
        already is ``out``'s memory (``read_chunk``'s direct read) is left where it is."""
        where = f"pack {pack_name(pack)} offset {offset}"
        if ulen != self.block_size:
            raise IntegrityError(f"chunk at {where}: size {ulen} is not the block size {self.block_size}")
        if codec == CODEC_RAW:
            if len(payload) != ulen:
                raise IntegrityError(f"chunk at {where}: raw payload has the wrong size")
            if payload.obj is not out:
                out[:] = payload
            return
        if codec != CODEC_LZ4:
            raise IntegrityError(f"chunk at {where}: unknown codec {codec}")
        n = lz4_decompress_into(payload, out)
        if n < 0:
            raise IntegrityError(f"chunk at {where}: LZ4 data is corrupt")
        if n != ulen:
            raise IntegrityError(f"chunk at {where}: decompressed to {n} bytes, expected {ulen}")

    def close(self) -> None:
        self._stop.set()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.join(10)
        with self._lock:
            for h in self._open.values():
                h.dead = True
                if h.users == 0:
                    os.close(h.fd)
            self._open.clear()
