"""Client files: the real files and directories a client makes in a session directory.

Everything in a session directory except the disk files is an ordinary file there, so
client-created files (ESXi's ``.lck-*``, ``.vswp``, logs, a ``.vmx`` renamed over the
generated one) survive a restart. This module is every POSIX operation on them and
the names of the namespace (lookup, create, remove, rename, link, listing), with the
disk files (``engine.datastore.diskfile``) listed beside the real entries and refused
as targets (EROFS/EEXIST): the disk files' names are reserved.

Real files are never opened through a symbolic link (``O_NOFOLLOW``, ``lstat``): a
client may create symlinks, and they stay names, never paths the daemon follows. Nor is
anything but a regular file ever opened: opens are ``O_NONBLOCK`` and checked with
``fstat`` (a FIFO would block the thread, a device act), and MKNOD is refused (ENOTSUP,
BadType for devices): ESXi and QEMU never make special files.

Every file a client meets gets a generation in its session's handle table (``_real``),
and removing its last link drops it (the inode may be reused: old handles go STALE).
Metadata calls (lstat, mkdir, rename, a handle-table append) run on the event loop
thread; reads and writes of file data run in the session pools (``io_pool``; stable
writes and COMMIT in ``sync_pool``).
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import struct
import time
from typing import Any

from engine.datastore.nodes import (
    MAX_FILE_SIZE,
    MODE_MASK,
    NOW,
    REAL,
    ROOT,
    VDISK,
    VIRTUAL_FILEID,
    Attr,
    Node,
    Session,
    SetAttr,
    check_name,
    err,
    fileid,
)
from engine.datastore.sessions import Sessions
from engine.errors import BadCookie, BadType
from engine.fsutil import pwrite_all


def _open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """Open a client file that must be a regular file: never through a symbolic link, and
    never waiting (a FIFO or a device is refused, not opened for good: O_NONBLOCK, then
    fstat). EISDIR / EINVAL for anything but a regular file, ENXIO for an unread FIFO."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise err(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_file(path: str, count: int, offset: int) -> tuple[bytes, int]:
    fd = _open_regular(path, os.O_RDONLY)
    try:
        return os.pread(fd, count, offset), os.fstat(fd).st_size
    finally:
        os.close(fd)


def _pwrite_file(path: str, data: Any, offset: int, stable: int) -> None:
    fd = _open_regular(path, os.O_WRONLY)
    try:
        pwrite_all(fd, data, offset)
        if stable:
            (os.fsync if stable == 2 else os.fdatasync)(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except OSError:
        return  # not a regular file (any more): nothing of it to commit
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_attributes(p: str, sa: SetAttr) -> None:
    """SETATTR of a real file at ``p``: never through a symbolic link (a link's own
    times and owner; its mode and size cannot be set)."""
    is_link = stat.S_ISLNK(os.lstat(p).st_mode)
    if sa.size is not None:
        if is_link:
            raise err(errno.EINVAL)
        if sa.size > MAX_FILE_SIZE:  # a size3 is a uint64; files end before 2**63
            raise err(errno.EFBIG)
        fd = _open_regular(p, os.O_WRONLY)
        try:
            os.ftruncate(fd, sa.size)
        finally:
            os.close(fd)
    if sa.mode is not None and not is_link:
        os.chmod(p, sa.mode & MODE_MASK)
    if sa.uid is not None or sa.gid is not None:
        os.chown(p, -1 if sa.uid is None else sa.uid, -1 if sa.gid is None else sa.gid, follow_symlinks=False)
    if sa.atime_ns is not None or sa.mtime_ns is not None:
        st = os.lstat(p)
        now = time.time_ns()
        a = st.st_atime_ns if sa.atime_ns is None else now if sa.atime_ns == NOW else int(sa.atime_ns)
        m = st.st_mtime_ns if sa.mtime_ns is None else now if sa.mtime_ns == NOW else int(sa.mtime_ns)
        os.utime(p, ns=(a, m), follow_symlinks=False)


def _client_file(node: Node) -> os.stat_result:
    """The stat of a client-created regular file; EISDIR / EINVAL for anything else."""
    if node.kind == ROOT:
        raise err(errno.EISDIR)
    st = os.lstat(node.path)
    if stat.S_ISDIR(st.st_mode):
        raise err(errno.EISDIR)
    if not stat.S_ISREG(st.st_mode):
        raise err(errno.EINVAL)
    return st


class ClientFiles:
    """The names of the namespace and the client files' data (loop thread)."""

    def __init__(self, registry: Sessions) -> None:
        self.registry = registry  # the root's entries and stamps
        self.sessions = registry.by_name  # published sessions by name
        self.io_pool = registry.io_pool
        self.sync_pool = registry.sync_pool

    def root_attr(self) -> Attr:
        t = self.registry.root_mtime_ns
        return Attr(stat.S_IFDIR | 0o755, 2 + len(self.sessions), 0, 0, 4096, 4096, 0, VIRTUAL_FILEID, t, t, t)

    def getattr(self, node: Node) -> Attr:
        """A real file's attributes (lstat: a symbolic link's own)."""
        st = os.lstat(node.path)
        return Attr(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blocks * 512,
                    st.st_rdev, st.st_ino, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)

    def access(self, node: Node) -> tuple[bool, bool, bool]:
        """(readable, writable, lookup/executable) of a real file, for any client allowed in."""
        st = os.lstat(node.path)
        return True, True, stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)

    def _real(self, s: Session, path: str, parent_ino: int | None = None, st: os.stat_result | None = None) -> Node:
        """The node of a real file (lstat), with its generation (given or taken now)."""
        if st is None:
            st = os.lstat(path)
        assert s.handles is not None
        if path == str(s.dir):
            gen = s.handles.seen(st.st_ino, 0, "")
        else:
            if parent_ino is None:
                parent_ino = os.lstat(os.path.dirname(path)).st_ino
            gen = s.handles.seen(st.st_ino, parent_ino, os.path.basename(path))
        return Node(REAL, s, st.st_ino, path, gen)

    # -- attributes

    def setattr(self, node: Node, sa: SetAttr) -> None:
        if node.kind != REAL:
            if sa == SetAttr():
                return
            raise err(errno.EACCES)
        set_attributes(node.path, sa)

    def _dir(self, node: Node) -> None:
        if node.kind == VDISK or (node.kind == REAL and not stat.S_ISDIR(os.lstat(node.path).st_mode)):
            raise err(errno.ENOTDIR)

    def parent(self, node: Node) -> Node:
        if node.kind == ROOT or node.session is None:
            return Node(ROOT)
        if node.kind == REAL and node.path != str(node.session.dir):
            return self._real(node.session, os.path.dirname(node.path))
        return Node(ROOT)

    def lookup(self, dirnode: Node, name: bytes) -> Node:
        self._dir(dirnode)
        if name == b".":
            return dirnode
        if name == b"..":
            return self.parent(dirnode)
        n = check_name(name)
        if dirnode.kind == ROOT:
            s = self.sessions.get(n)
            if s is None:
                raise err(errno.ENOENT)
            return self._real(s, str(s.dir))
        s = dirnode.session
        assert s is not None
        if dirnode.path == str(s.dir):
            i = s.vdisk_index(n)
            if i >= 0:
                return Node(VDISK, s, i)
        return self._real(s, os.path.join(dirnode.path, n), dirnode.ino)

    def _target(self, dirnode: Node, name: bytes) -> tuple[Session, str, str]:
        """The session and path a create/remove names, refusing the root and disk files."""
        self._dir(dirnode)
        if name in (b".", b".."):
            raise err(errno.EEXIST if name == b"." else errno.EACCES)
        n = check_name(name)
        if dirnode.kind == ROOT:
            raise err(errno.EACCES, "the export root holds sessions only")
        s = dirnode.session
        assert s is not None
        if dirnode.path == str(s.dir) and s.vdisk_index(n) >= 0:
            raise err(errno.EEXIST, "a backup disk file")
        return s, n, os.path.join(dirnode.path, n)

    def _apply_create_attrs(self, node: Node, sa: SetAttr | None) -> None:
        if sa is not None and sa != SetAttr():
            self.setattr(node, sa)

    def create(self, dirnode: Node, name: bytes, mode: str, sa: SetAttr | None = None, verf: bytes = b"") -> Node:
        """mode: 'unchecked' | 'guarded' | 'exclusive' (with ``verf``, 8 bytes)."""
        if dirnode.kind != ROOT and dirnode.session is not None and dirnode.path == str(dirnode.session.dir):
            if check_name(name) in dirnode.session.vdisk_names() and mode == "unchecked":
                raise err(errno.EROFS, "a backup disk file")
        s, _n, path = self._target(dirnode, name)
        perm = (sa.mode if sa and sa.mode is not None else 0o644) & MODE_MASK
        if mode == "exclusive":
            a, m = struct.unpack(">II", verf)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and int(st.st_atime) == a and int(st.st_mtime) == m:
                    return self._real(s, path, dirnode.ino)  # the same EXCLUSIVE create, replayed
                raise
            os.close(fd)
            os.utime(path, (a, m), follow_symlinks=False)
            return self._real(s, path, dirnode.ino)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:  # never opened unless a regular file (a FIFO would block, a device act)
            if mode == "guarded":
                raise err(errno.EEXIST)
            if not stat.S_ISREG(st.st_mode):
                raise err(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, "not a regular file")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if mode == "guarded" else 0)
        os.close(_open_regular(path, flags, perm))
        node = self._real(s, path, dirnode.ino)
        if sa is not None:
            self._apply_create_attrs(node, SetAttr(None, sa.uid, sa.gid, sa.size, sa.atime_ns, sa.mtime_ns))
        return node

    def mkdir(self, dirnode: Node, name: bytes, sa: SetAttr | None = None) -> Node:
        s, _n, path = self._target(dirnode, name)
        os.mkdir(path, (sa.mode if sa and sa.mode is not None else 0o755) & MODE_MASK)
        node = self._real(s, path, dirnode.ino)
        if sa is not None:
            self._apply_create_attrs(node, SetAttr(None, sa.uid, sa.gid, None, sa.atime_ns, sa.mtime_ns))
        return node

    def symlink(self, dirnode: Node, name: bytes, target: bytes, sa: SetAttr | None = None) -> Node:
        s, _n, path = self._target(dirnode, name)
        if not target or b"\0" in target:
            raise err(errno.EINVAL)
        os.symlink(os.fsdecode(target), path)
        return self._real(s, path, dirnode.ino)

    def mknod(self, dirnode: Node, name: bytes, kind: str, sa: SetAttr | None = None) -> Node:
        """Refused: ESXi and QEMU never make special files, and one in a session directory
        could only serve to block or trick the daemon (ENOTSUP; BadType for devices)."""
        self._target(dirnode, name)
        if kind in ("fifo", "socket"):
            raise err(errno.ENOTSUP, f"no {kind} special files in the datastore")
        raise BadType(f"cannot create a {kind} special file in the datastore")

    def readlink(self, node: Node) -> bytes:
        if node.kind != REAL or not stat.S_ISLNK(os.lstat(node.path).st_mode):
            raise err(errno.EINVAL)
        return os.fsencode(os.readlink(node.path))

    def remove(self, dirnode: Node, name: bytes) -> None:
        s, n, path = self._target_existing(dirnode, name)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise err(errno.EISDIR)
        os.unlink(path)
        if st.st_nlink <= 1:  # its inode is free for reuse: its handles go STALE
            assert s.handles is not None
            s.handles.dropped(st.st_ino)

    def rmdir(self, dirnode: Node, name: bytes) -> None:
        if name == b".":
            raise err(errno.EINVAL)
        if name == b"..":
            raise err(errno.ENOTEMPTY)
        s, n, path = self._target_existing(dirnode, name)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise err(errno.ENOTDIR)
        os.rmdir(path)
        assert s.handles is not None
        s.handles.dropped(st.st_ino)

    def _target_existing(self, dirnode: Node, name: bytes) -> tuple[Session, str, str]:
        self._dir(dirnode)
        if name in (b".", b".."):
            raise err(errno.EACCES)
        n = check_name(name)
        if dirnode.kind == ROOT:
            if n in self.sessions:
                raise err(errno.EACCES, "unpublish a session through the control API")
            raise err(errno.ENOENT)
        s = dirnode.session
        assert s is not None
        if dirnode.path == str(s.dir) and s.vdisk_index(n) >= 0:
            raise err(errno.EROFS, "a backup disk file")
        return s, n, os.path.join(dirnode.path, n)

    def rename(self, fromdir: Node, fromname: bytes, todir: Node, toname: bytes) -> None:
        s1, fname, src = self._target_existing(fromdir, fromname)
        self._dir(todir)
        if toname in (b".", b".."):
            raise err(errno.EINVAL)
        tn = check_name(toname)
        if todir.kind == ROOT:
            raise err(errno.EACCES)
        s2 = todir.session
        assert s2 is not None
        if s2 is not s1:
            raise err(errno.EXDEV)
        if todir.path == str(s2.dir) and s2.vdisk_index(tn) >= 0:
            raise err(errno.EROFS, "a backup disk file")
        dst = os.path.join(todir.path, tn)
        st = os.lstat(src)
        try:
            over: os.stat_result | None = os.lstat(dst)
        except FileNotFoundError:
            over = None
        os.rename(src, dst)
        assert s1.handles is not None
        if over is not None and over.st_ino != st.st_ino and (over.st_nlink <= 1 or stat.S_ISDIR(over.st_mode)):
            s1.handles.dropped(over.st_ino)  # replaced: its inode is free for reuse
        s1.handles.renamed(st.st_ino, fromdir.ino, fname, todir.ino, tn)

    def link(self, node: Node, todir: Node, name: bytes) -> None:
        if node.kind != REAL:
            raise err(errno.EROFS if node.kind == VDISK else errno.EACCES)
        s, _n, path = self._target(todir, name)
        if s is not node.session:
            raise err(errno.EXDEV)
        if stat.S_ISDIR(os.lstat(node.path).st_mode):
            raise err(errno.EISDIR)
        os.link(node.path, path, follow_symlinks=False)

    # -- directories

    def listdir(self, dirnode: Node) -> tuple[list[tuple[str, Node | None, int]], bytes]:
        """[(name, node or None for '.'/'..' , fileid)], and the cookie verifier."""
        self._dir(dirnode)
        me = fileid(dirnode)
        up = self.parent(dirnode)
        out: list[tuple[str, Node | None, int]] = [(".", dirnode, me), ("..", up, fileid(up))]
        if dirnode.kind == ROOT:
            for n in sorted(self.sessions):
                s = self.sessions[n]
                node = self._real(s, str(s.dir), st=os.lstat(s.dir))
                out.append((n, node, node.ino))
            return out, struct.pack(">Q", self.registry.root_gen)
        sess = dirnode.session
        assert sess is not None
        s = sess
        st = os.lstat(dirnode.path)
        names: list[tuple[str, Node]] = []
        assert s.handles is not None
        with os.scandir(dirnode.path) as it:
            for e in it:
                ino = e.inode()
                names.append((e.name, Node(REAL, s, ino, e.path, s.handles.seen(ino, dirnode.ino, e.name))))
        if dirnode.path == str(s.dir):
            names += [(n, Node(VDISK, s, i)) for i, n in enumerate(s.vdisk_names())]
        names.sort(key=lambda x: x[0])
        out += [(n, node, fileid(node)) for n, node in names]
        verf = hashlib.blake2b(struct.pack(">QQ", st.st_mtime_ns, st.st_ino), digest_size=8).digest()
        return out, verf

    def check_cookie(self, cookie: int, verf: bytes, current: bytes, count: int) -> None:
        if cookie == 0:
            return
        if verf != current or cookie > count:
            raise BadCookie()

    # -- data

    async def read(self, node: Node, offset: int, count: int) -> tuple[list[Any], int, bool]:
        """(buffers, total length, eof) of a client file."""
        _client_file(node)
        data, size = await asyncio.get_running_loop().run_in_executor(self.io_pool, _pread_file, node.path, count, offset)
        assert node.session is not None
        node.session.read_ops += 1
        node.session.read_bytes += len(data)
        return [data], len(data), offset + len(data) >= size

    async def write(self, node: Node, offset: int, data: Any, stable: int) -> tuple[int, int]:
        """Write a client file (fsync'd for a stable write); (bytes written, stable_how)."""
        _client_file(node)
        # open, pwrite (and fsync) in a thread: a .vswp write may wait for the disk
        pool = self.sync_pool if stable else self.io_pool
        await asyncio.get_running_loop().run_in_executor(pool, _pwrite_file, node.path, data, offset, stable)
        n = len(data)
        assert node.session is not None
        node.session.write_ops += 1
        node.session.write_bytes += n
        return n, stable

    async def commit(self, node: Node) -> None:
        if node.kind != REAL:
            return
        await asyncio.get_running_loop().run_in_executor(self.sync_pool, _fsync_file, node.path)
