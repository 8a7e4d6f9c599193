"""Pack files: append-only chunk records, written by one writer, read by many.

Writer: records are appended in order through a buffered file; a pack is rolled when it
passes ``pack_limit``. ``seal()`` flushes and fsyncs each pack, then writes its index
atomically; only then may a manifest reference its records (see ``format``).

Reader: ``read_chunk`` is one ``pread`` of header + payload, a CRC32C check over both,
and a decompression to exactly the block size. Every failure (short read, bad magic,
length mismatch, CRC mismatch, decompressor error) raises ``IntegrityError`` naming the
pack and offset: wrong bytes are never returned. It is thread-safe (pread on shared
descriptors) and the hashing and decompression release the GIL, so the chunk cache
runs it in a thread pool.
"""
from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import crc32c
import lz4.block
import numpy as np

from engine.errors import InstantNFSError, IntegrityError, NoSpace, RepositoryError
from engine.repo.format import (
    CODEC_LZ4,
    CODEC_RAW,
    IDX_DTYPE,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_VERSION,
    RECORD_CRC_SPAN,
    RECORD_HEADER,
    RECORD_MAGIC,
    fsync_dir,
    idx_bytes,
    idx_name,
    pack_name,
    write_file_atomic,
)

HDR = RECORD_HEADER.size


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

    def __init__(self, packs_dir: Path, first_pack: int, pack_limit: int = 1 << 30) -> None:
        self.dir = packs_dir
        self.next_pack = first_pack
        self.pack_limit = pack_limit
        self._fd = -1
        self._pack = -1
        self._pos = 0
        self._records: list[tuple[bytes, int, int, int]] = []
        self.finished: list[tuple[int, list[tuple[bytes, int, int, int]]]] = []
        self.created: list[Path] = []
        self.bytes_written = 0

    def _open(self) -> None:
        self._pack = self.next_pack
        self.next_pack += 1
        path = self.dir / pack_name(self._pack)
        self.created.append(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._pos = 0
        self._write([PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, self._pack)])

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
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left for pack {self.dir / pack_name(self._pack)}") from e
            raise

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
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left to finish pack {self.dir / pack_name(self._pack)}") from e
            raise
        finally:
            os.close(fd)
        self.finished.append((self._pack, self._records))
        self._records = []

    def seal(self) -> None:
        """Make every record durable: fsync the packs, then write their indexes."""
        self._close_current()
        fsync_dir(self.dir)
        for pack, records in self.finished:
            entries = np.array(records, dtype=IDX_DTYPE)
            try:
                write_file_atomic(self.dir / idx_name(pack), idx_bytes(pack, entries))
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"no space left for pack index {idx_name(pack)}") from e
                raise
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


class PackReader:
    """Read and verify chunk records; shares one descriptor per pack across threads."""

    def __init__(self, packs_dir: Path, block_size: int) -> None:
        self.dir = packs_dir
        self.block_size = block_size
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _fd(self, pack: int) -> int:
        fd = self._fds.get(pack)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                path = self.dir / pack_name(pack)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError as e:
                    raise IntegrityError(f"pack {path} is missing") from e
                except OSError as e:
                    raise RepositoryError(f"cannot open pack {path}: {e.strerror}") from e
                self._fds[pack] = fd
        return fd

    def read_record(self, pack: int, offset: int, clen: int) -> tuple[int, bytes, memoryview, int]:
        """Read and CRC-check one record: (codec, fingerprint, payload, ulen)."""
        where = f"pack {pack_name(pack)} offset {offset}"
        try:
            raw = os.pread(self._fd(pack), HDR + clen, offset)
        except OSError as e:
            raise IntegrityError(f"chunk at {where}: read failed: {e.strerror}") from e
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
        """Ask the kernel to start reading a record into the page cache (no waiting)."""
        try:
            os.posix_fadvise(self._fd(pack), offset, HDR + clen, os.POSIX_FADV_WILLNEED)
        except (OSError, InstantNFSError):
            pass  # only a hint: the read itself reports what is wrong

    def read_chunk(self, pack: int, offset: int, clen: int) -> bytes:
        """The decompressed block stored at (pack, offset): exactly block_size bytes."""
        codec, _fp, payload, ulen = self.read_record(pack, offset, clen)
        return self.decode(pack, offset, codec, payload, ulen)

    def decode(self, pack: int, offset: int, codec: int, payload: memoryview, ulen: int) -> bytes:
        where = f"pack {pack_name(pack)} offset {offset}"
        if ulen != self.block_size:
            raise IntegrityError(f"chunk at {where}: size {ulen} is not the block size {self.block_size}")
        if codec == CODEC_RAW:
            if len(payload) != ulen:
                raise IntegrityError(f"chunk at {where}: raw payload has the wrong size")
            return payload.tobytes()
        if codec != CODEC_LZ4:
            raise IntegrityError(f"chunk at {where}: unknown codec {codec}")
        try:
            data = lz4.block.decompress(payload, uncompressed_size=ulen)
        except lz4.block.LZ4BlockError as e:
            raise IntegrityError(f"chunk at {where}: LZ4 data is corrupt") from e
        if len(data) != ulen:
            raise IntegrityError(f"chunk at {where}: decompressed to {len(data)} bytes, expected {ulen}")
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
