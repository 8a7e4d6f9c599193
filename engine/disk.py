"""Disks: the interface every layer of the read/write path offers, and the backup disk.

``Disk`` is the one interface between layers (size, read; writable layers add write and
flush). ``BackupDisk`` is the bottom of the stack: one disk of one restore point, read
through its block map and the chunk source it is given (``engine.stack`` gives it the
shared decompression cache, ``engine.cache.ChunkCache``, and a readahead of its own).
Nothing here knows packs, files or the repository: this module imports only the block
map.

``BackupDisk`` assumes of the layers below that the block map never changes (restore
points are immutable) and that the chunk source returns the same bytes for a chunk key
every time or raises ``IntegrityError`` (pack ids are never reused: see ``engine.cache``).
Nothing it does on the caller's thread opens a file or makes a blocking system call
when the chunk is cached or read through ``aread``: loads and readahead hints go to the
source's executor. It holds no lock of its own: the source is thread-safe, and the
sequential-read detector is a hint whose races only cost a prefetch.

Reads past the end of the disk are cut at the end (a read starting at or past it is
empty), as a file read is. ``readv``, ``aread`` and ``peekv`` return a list of buffers
(read-only use: slices of cached chunks and of a shared zero block) so a server can send
them without copying; a view keeps its chunk's buffer from being reused by the cache
(``engine.cache``) for as long as it lives. ``read`` returns a copy.

Every read is reported to the readahead once (``after(offset, length)``), after the
read's own misses were queued, so the prefetch it triggers never runs ahead of it.
``peekv`` is the non-blocking lookup a server's fast lane tries first: the buffers
``aread`` would return when every block is cached or zero, else None (then it counted
nothing, and the caller's ``aread`` counts the read).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Protocol

from engine.blockmap import KEY_SHIFT, BlockMap


class Disk(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def readv(self, offset: int, length: int) -> list[memoryview]: ...

    async def aread(self, offset: int, length: int) -> list[memoryview]: ...


class ChunkSource(Protocol):
    """Decompressed chunks by key (``pack << KEY_SHIFT | record offset``) or location.
    A chunk is a block-sized buffer nobody writes while it is referenced."""

    def peek(self, key: int) -> bytes | bytearray | None: ...

    def get(self, pack: int, rec: int, clen: int) -> bytes | bytearray: ...

    def get_future(self, pack: int, rec: int, clen: int) -> Future[bytearray]: ...


class SequentialHint(Protocol):
    """A disk's readahead: told the byte range of every read, after its own loads."""

    def after(self, offset: int, length: int) -> None: ...


class BackupDisk:
    """One disk of a restore point, read-only, byte-exact with the source image."""

    def __init__(self, name: str, blockmap: BlockMap, chunks: ChunkSource, readahead: SequentialHint) -> None:
        self.name = name
        self.map = blockmap
        self.size = blockmap.disk_size
        self.block_size = blockmap.block_size
        self._shift = blockmap.shift
        self._mask = blockmap.block_size - 1
        self._cache = chunks
        self._ra = readahead
        self._zero = memoryview(bytes(blockmap.block_size))

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        return max(0, min(length, self.size - offset))

    def read(self, offset: int, length: int) -> bytes:
        """The disk's bytes in [offset, offset + length), cut at the end of the disk (a
        copy: cached chunks are reused buffers, never handed out whole)."""
        key = self.map.locate(offset, length)
        if key >= 0:  # the common case: inside one stored block
            data = self._cache.peek(key)
            if data is None:
                self._ra.after(offset, length)  # prefetch alongside this thread's own load
                pack, clen, rec = self.map.entry(offset >> self._shift)
                data = self._cache.get(pack, rec, clen)
            else:
                self._ra.after(offset, length)
            skip = offset & self._mask
            return bytes(memoryview(data)[skip : skip + length])
        elif key == -1:
            self._ra.after(offset, length)
            return bytes(length)
        length = self._clip(offset, length)
        if length == 0:
            return b""
        return b"".join(self.readv(offset, length))

    def readv(self, offset: int, length: int) -> list[memoryview]:
        """The same bytes as ``read``, as a list of buffers (blocking on misses)."""
        length = self._clip(offset, length)
        if length == 0:
            return []
        self._ra.after(offset, length)  # prefetches run alongside this thread's loads
        out: list[memoryview] = []
        cache = self._cache
        for pack, rec, clen, skip, take in self.map.translate(offset, length).tolist():
            if pack < 0:
                out.extend(self._zeros(take))
            else:
                chunk = cache.get(pack, rec, clen)
                out.append(memoryview(chunk)[skip : skip + take])
        return out

    def peekv(self, offset: int, length: int) -> list[memoryview] | None:
        """What ``aread`` would return, when no block of the range needs a load: every
        block is cached or a zero block. Otherwise None, and nothing is counted for
        readahead (the caller then calls ``aread``, which counts the read once); the
        chunks looked at before the miss count as uses in the cache, nothing more.
        Never blocks, never awaits: for a server's fast lane."""
        key = self.map.locate(offset, length)
        if key >= 0:
            data = self._cache.peek(key)
            if data is None:
                return None
            self._ra.after(offset, length)
            skip = offset & self._mask
            return [memoryview(data)[skip : skip + length]]
        elif key == -1:
            self._ra.after(offset, length)
            return self._zeros(length)
        length = self._clip(offset, length)
        if length == 0:
            return []
        out: list[memoryview] = []
        cache = self._cache
        for pack, rec, _clen, skip, take in self.map.translate(offset, length).tolist():
            if pack < 0:
                out.extend(self._zeros(take))
                continue
            data = cache.peek(pack << KEY_SHIFT | rec)
            if data is None:
                return None
            out.append(memoryview(data)[skip : skip + take])
        self._ra.after(offset, length)
        return out

    async def aread(self, offset: int, length: int) -> list[memoryview]:
        """``readv`` for the event loop: cached chunks at once, misses in the thread pool
        (queued before the readahead this read triggers)."""
        bufs = self.peekv(offset, length)
        if bufs is not None:  # every block cached or a hole: no awaiting
            return bufs
        length = self._clip(offset, length)
        rows = self.map.translate(offset, length).tolist()
        cache = self._cache
        chunks: list[bytes | bytearray | asyncio.Future[bytearray] | None] = []
        pending = False
        for pack, rec, clen, _skip, _take in rows:
            if pack < 0:
                chunks.append(None)
                continue
            data = cache.peek(pack << KEY_SHIFT | rec)
            if data is None:
                chunks.append(asyncio.wrap_future(cache.get_future(pack, rec, clen)))
                pending = True
            else:
                chunks.append(data)
        self._ra.after(offset, length)  # after this read's own loads: never ahead of them
        if pending:
            for i, c in enumerate(chunks):
                if isinstance(c, asyncio.Future):
                    chunks[i] = await c
        out: list[memoryview] = []
        for (_pack, _rec, _clen, skip, take), chunk in zip(rows, chunks):
            if chunk is None:
                out.extend(self._zeros(take))
            else:
                out.append(memoryview(chunk)[skip : skip + take])  # type: ignore[arg-type]
        return out

    def _zeros(self, length: int) -> list[memoryview]:
        bs = self.block_size
        return [self._zero[: min(bs, length - i)] for i in range(0, length, bs)]
