"""A simulated power loss for the owner process: a stand-in for the ``os`` module of
``engine.writecache``, ``engine.writecache_format`` and ``engine.fsutil`` (whose
``pwrite_all`` does the cache's pwrites) that keeps every pwrite in memory until the
fd is fsynced.

Reads see pending writes (as the page cache does). ``fdatasync``/``fsync`` write the
fd's pending writes to the real file and sync it. At power loss an arbitrary subset of
the pending writes reaches the file (writeback happens in any order), then the process
dies without a word. ``arm(n)`` makes the power fail at the n-th pwrite/fsync from now,
so it can fail inside a commit, between the data sync and the bitmap write.
"""
from __future__ import annotations

import os
import random
from types import SimpleNamespace


class PowerLossOS(SimpleNamespace):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self._pending: dict[int, list[tuple[int, bytes]]] = {}
        self._countdown = -1
        self._rng = random.Random(seed)

    def __getattr__(self, name: str):
        return getattr(os, name)

    def arm(self, after: int, seed: int) -> None:
        self._countdown = after
        self._rng = random.Random(seed)

    def _tick(self) -> None:
        if self._countdown > 0:
            self._countdown -= 1
            if self._countdown == 0:
                self.power_loss()

    def power_loss(self) -> None:
        for fd, writes in self._pending.items():
            for offset, data in writes:
                if self._rng.random() < 0.5:
                    os.pwrite(fd, data, offset)
        os._exit(137)

    def pwrite(self, fd: int, data, offset: int) -> int:
        self._tick()
        self._pending.setdefault(fd, []).append((offset, bytes(data)))
        return len(data)

    def preadv(self, fd: int, buffers, offset: int) -> int:
        n = os.preadv(fd, buffers, offset)
        writes = self._pending.get(fd)
        if writes:
            views = [memoryview(b).cast("B") for b in buffers]
            total = sum(len(v) for v in views)
            end = offset + total
            flat = bytearray(total)
            pos = 0
            for v in views:
                flat[pos : pos + len(v)] = v
                pos += len(v)
            for woff, data in writes:
                lo, hi = max(offset, woff), min(end, woff + len(data))
                if lo < hi:
                    flat[lo - offset : hi - offset] = data[lo - woff : hi - woff]
                    n = max(n, hi - offset)
            pos = 0
            for v in views:
                v[:] = flat[pos : pos + len(v)]
                pos += len(v)
        return n

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        n = self.preadv(fd, [buf], offset)
        return bytes(buf[:n])

    def _sync(self, fd: int, real) -> None:
        self._tick()
        for offset, data in self._pending.pop(fd, []):
            os.pwrite(fd, data, offset)
        real(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, os.fdatasync)

    def fsync(self, fd: int) -> None:
        self._sync(fd, os.fsync)

    def close(self, fd: int) -> None:
        self._pending.pop(fd, None)  # never synced: as good as lost
        os.close(fd)
