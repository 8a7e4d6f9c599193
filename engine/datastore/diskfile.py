"""Disk files: the virtual files through which a session's disks are read and written.

Each disk of a published point is listed twice in its session directory,
``<disk>-flat.vmdk`` (for ESXi, named by the generated descriptor) and ``<disk>.img``
(for QEMU/KVM): disk file index ``2 * disk`` and ``2 * disk + 1``, both the same write
cache over the restore point's backup disk (``engine.stack``). Reads return the newest
bytes; writes land in the cache, never in the repository. The disk's size is fixed
(SETATTR to another size is EINVAL, the error a block device gives; a write past the
end EFBIG); its owner and mode are the daemon's (EPERM); its times may be set.

Attributes: a disk file's change only with its mtime, which a write moves in whole
milliseconds (``MTIME_STEP``), so a burst of writes shares one attribute version. The
``Attr`` of each version is built once and kept here; the NFS layer may keep its wire
form per ``Attr`` object.

Operations count as in flight on their session (``Session.inflight``) while they wait
in a pool, so an unpublish never closes a cache under them (the last one to finish on
an unpublished session tells ``Sessions.last_op_ended``). A small UNSTABLE
write that needs no copy on write (``WriteCache.needs_no_copy``) runs on the loop: one
pwrite into the page cache is cheaper than a thread hand-off; a small stable one too
(``WriteCache.awrite_inline``: only its fdatasync runs in a thread, shared by the stable
writes waiting then).
"""
from __future__ import annotations

import asyncio
import errno
import stat
import time
from typing import Any

from engine.datastore.nodes import NOW, Attr, Node, Session, SetAttr, err, fileid
from engine.datastore.sessions import Sessions

MTIME_STEP = 1_000_000  # ns: a disk file's mtime moves in whole milliseconds
INLINE_WRITE = 64 << 10  # UNSTABLE writes up to this size that need no copy on write run on the loop
ATTR_CACHE_MAX = 4096


class DiskFiles:
    """Reads, writes, commits and attributes of the disk files (loop thread)."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self._attrs: dict[tuple[int, int], Attr] = {}  # (session id, disk file index) -> newest version

    def getattr(self, node: Node) -> Attr:
        s = node.session
        assert s is not None
        t = s.mtimes[node.ino // 2]
        key = (s.sid, node.ino)
        a = self._attrs.get(key)
        if a is None or a.mtime_ns != t:
            if len(self._attrs) > ATTR_CACHE_MAX:
                self._attrs.clear()
            size = s.disks[node.ino // 2].size
            a = self._attrs[key] = Attr(stat.S_IFREG | 0o644, 1, 0, 0, size, size, 0, fileid(node), t, t, t)
        return a

    def setattr(self, node: Node, sa: SetAttr) -> None:
        s = node.session
        assert s is not None
        i = node.ino // 2
        if sa.size is not None and sa.size != s.disks[i].size:
            raise err(errno.EINVAL, f"the disk's size is fixed at {s.disks[i].size} bytes")
        if (sa.mode is not None and sa.mode & 0o7777 != 0o644) or sa.uid not in (None, 0) or sa.gid not in (None, 0):
            raise err(errno.EPERM, "a disk file's owner and mode cannot change")
        if sa.mtime_ns is not None:
            m = time.time_ns() if sa.mtime_ns == NOW else int(sa.mtime_ns)
            s.mtimes[i] = m

    def _op_ended(self, s: Session) -> None:
        """A disk operation counted in ``s.inflight`` ended; the last one of an
        unpublished session lets it end."""
        s.inflight -= 1
        if s.ended and not s.inflight:
            self.sessions.last_op_ended(s)

    @staticmethod
    def _touch(s: Session, i: int) -> None:
        """A write changes the disk's mtime (and ctime), kept to whole milliseconds."""
        now = time.time_ns()
        if now - s.mtimes[i] >= MTIME_STEP:
            s.mtimes[i] = now - now % MTIME_STEP

    def read_now(self, node: Node, offset: int, count: int) -> tuple[list[Any], int, bool] | None:
        """``read``'s result when it needs no wait (every byte cached, a hole, or clean and
        cached under the writes); None: await ``read``."""
        s = node.session
        assert s is not None
        disk = s.caches[node.ino // 2]
        bufs = disk.peekv(offset, count)
        if bufs is None:
            return None
        return self._read_done(s, disk.size, offset, bufs)

    async def read(self, node: Node, offset: int, count: int) -> tuple[list[Any], int, bool]:
        """(buffers, total length, eof)."""
        s = node.session
        assert s is not None
        disk = s.caches[node.ino // 2]
        s.inflight += 1
        try:
            bufs = await disk.aread(offset, count)
        finally:
            self._op_ended(s)
        return self._read_done(s, disk.size, offset, bufs)

    @staticmethod
    def _read_done(s: Session, size: int, offset: int, bufs: list[Any]) -> tuple[list[Any], int, bool]:
        n = 0
        for b in bufs:
            n += len(b)
        s.read_ops += 1
        s.read_bytes += n
        return bufs, n, offset + n >= size

    async def write(self, node: Node, offset: int, data: Any, stable: int) -> tuple[int, int]:
        """Write; ``stable`` is the stable_how value asked (0 UNSTABLE, 1 DATA_SYNC,
        2 FILE_SYNC). Returns (bytes written, the stable_how the data reached)."""
        r = self.write_now(node, offset, data, stable)
        if r is not None:
            return r
        s = node.session
        assert s is not None
        i = node.ino // 2
        cache = s.caches[i]
        s.inflight += 1
        try:
            if stable and self._inline(s, cache, offset, len(data)):
                # a small stable one: its pwrites here, its fdatasync in the cache's group sync
                await cache.awrite_inline(offset, data)
            else:
                await cache.awrite(offset, data, stable != 0)
        finally:
            self._op_ended(s)
        return self._wrote(s, i, len(data), stable)

    def write_now(self, node: Node, offset: int, data: Any, stable: int) -> tuple[int, int] | None:
        """``write`` when it runs here, on the loop: a small UNSTABLE write that reads
        nothing from the backup is one pwrite into the page cache, cheaper than a thread
        hand-off (and no export is running, so it never waits for paused writes). None:
        await ``write``."""
        s = node.session
        assert s is not None
        i = node.ino // 2
        cache = s.caches[i]
        if stable == 0 and self._inline(s, cache, offset, len(data)):
            cache.write(offset, data)
            return self._wrote(s, i, len(data), stable)
        return None

    @staticmethod
    def _inline(s: Session, cache: Any, offset: int, n: int) -> bool:
        """Whether a write's pwrites may run on the loop: small, reading nothing from the
        backup, and no export running (so it never waits for paused writes)."""
        return n <= INLINE_WRITE and not s.jobs and cache.needs_no_copy(offset, n)

    def _wrote(self, s: Session, i: int, n: int, stable: int) -> tuple[int, int]:
        self._touch(s, i)
        s.write_ops += 1
        s.write_bytes += n
        # a stable write commits data, then the bitmap (the cache's metadata): FILE_SYNC
        return n, 0 if stable == 0 else 2

    async def commit(self, node: Node) -> None:
        s = node.session
        assert s is not None
        s.inflight += 1
        try:
            await asyncio.get_running_loop().run_in_executor(self.sessions.sync_pool, s.caches[node.ino // 2].commit)
        finally:
            self._op_ended(s)
