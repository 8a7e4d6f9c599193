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
empty), as a file read is. ``readv`` and ``aread`` return a list of buffers (slices of
cached chunks and of a shared zero block) so a server can send them without copying.
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
    """Decompressed chunks by key (``pack << KEY_SHIFT | record offset``) or location."""

    def peek(self, key: int) -> bytes | None: ...

    def get(self, pack: int, rec: int, clen: int) -> bytes: ...

    def get_future(self, pack: int, rec: int, clen: int) -> Future[bytes]: ...


class SequentialHint(Protocol):
    """A disk's readahead: told which blocks each read covered."""

    next_block: int

    def after(self, first: int, last: int) -> None: ...


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
        """The disk's bytes in [offset, offset + length), cut at the end of the disk."""
        key = self.map.locate(offset, length)
        if key >= 0:  # the common case: inside one stored block
            data = self._cache.peek(key)
            block = offset >> self._shift
            if data is not None:
                if block != self._ra.next_block - 1:
                    self._ra.after(block, block)
            else:
                self._ra.after(block, block)
                pack, clen, rec = self.map.entry(block)
                data = self._cache.get(pack, rec, clen)
            skip = offset & self._mask
            return data[skip : skip + length]  # a whole block is the cached object itself
        elif key == -1:
            self._ra.next_block = (offset >> self._shift) + 1
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
        self._ra.after(offset >> self._shift, (offset + length - 1) >> self._shift)
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
        """``aread``'s buffers when it would not wait: a range inside one block that is
        cached or a hole (counted for readahead as ``aread`` counts it); None otherwise."""
        key = self.map.locate(offset, length)
        if key >= 0:
            data = self._cache.peek(key)
            if data is None:
                return None
            block = offset >> self._shift
            if block != self._ra.next_block - 1:
                self._ra.after(block, block)
            skip = offset & self._mask
            return [memoryview(data)[skip : skip + length]]
        if key == -1:
            self._ra.next_block = (offset >> self._shift) + 1
            return self._zeros(length)
        return None

    async def aread(self, offset: int, length: int) -> list[memoryview]:
        """``readv`` for the event loop: cached chunks at once, misses in the thread pool."""
        key = self.map.locate(offset, length)
        if key >= 0:  # inside one stored block, and cached: no translate, no awaiting
            data = self._cache.peek(key)
            if data is not None:
                block = offset >> self._shift
                if block != self._ra.next_block - 1:
                    self._ra.after(block, block)
                skip = offset & self._mask
                return [memoryview(data)[skip : skip + length]]
        elif key == -1:
            self._ra.next_block = (offset >> self._shift) + 1
            return self._zeros(length)
        length = self._clip(offset, length)
        if length == 0:
            return []
        self._ra.after(offset >> self._shift, (offset + length - 1) >> self._shift)
        rows = self.map.translate(offset, length).tolist()
        cache = self._cache
        chunks: list[bytes | asyncio.Future[bytes] | None] = []
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
