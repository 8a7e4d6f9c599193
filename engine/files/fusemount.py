"""A restore point's filesystem as a read-only FUSE mount (pyfuse3), for tools that want a path.

``mount(fs, dir)`` serves one ``engine.files.fs.FileSystem`` (what ``files ls`` and
``files get`` read) at ``dir`` until it is unmounted (``fusermount3 -u dir``) or the
process gets SIGINT, SIGTERM or SIGHUP, which unmount it. Nothing is ever written: the
mount is ``ro`` (the kernel answers EROFS to every write before it reaches us) and
``default_permissions`` (the kernel checks the guest's modes and owners).

Inodes: FUSE's root is 1; every other entry is its filesystem inode + 2 (so no inode
of the guest lands on 1), so a hard link shows as one inode. The kernel learns an inode
from a lookup or a READDIRPLUS reply and forgets it later: ``_known`` holds the entries
the kernel knows, with its lookup count, and nothing else; it is what getattr answers
from. A name that is not there is answered with inode 0, which the kernel caches too. An open directory holds its listing's iterator, where the last reply stopped, and
at most one batch of entries: a directory of 100k names is never held whole. A reply
that restarts at another offset lists the directory again from its start.

Concurrency: pyfuse3 runs the handlers as trio tasks on one thread. Every call into the
filesystem (TSK, the stack's reads) runs in a worker thread (``trio.to_thread``), one
at a time (a ``CapacityLimiter`` of 1: a ``FileSystem`` is not thread-safe), so the trio
loop never blocks on a read; a getattr of a known inode never waits for a read.

A guest filesystem is hostile input: every failure of a handler becomes an errno for
that one request (ENOENT for a missing name, EIO for a damaged one, logged with the
file and the block), never an exception out of ``pyfuse3.main``, which would end the
mount. Names the kernel cannot take (with '/' or NUL) are left out of listings, logged.
``st_blocks`` is the size rounded up (TSK gives allocation only by walking a file's
runs), so a sparse file looks allocated to ``du``; its holes still read as zeros.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import stat as st
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import InstantNFSError, NotFound, UsageError
from engine.files.fs import Entry, File, FileSystem, join
from engine.fsutil import is_mounted

log = logging.getLogger("instantnfs.files.mount")

ROOT = 1
BATCH = 256  # directory entries fetched per trip to the worker thread
TIMEOUT = 3600.0  # seconds the kernel may cache entries and attributes: nothing changes
T = TypeVar("T")


class MountError(InstantNFSError):
    """The filesystem cannot be mounted."""


def fuse_problem() -> str | None:
    """Why FUSE cannot be used here (the binding, the device, fusermount), or None."""
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        return (f"the FUSE binding is missing ({e}): pip install 'pyfuse3>=3.3' "
                "(it builds against libfuse3: apt-get install libfuse3-dev pkg-config fuse3)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return (f"/dev/fuse cannot be opened ({e.strerror}): load the fuse module (modprobe fuse), "
                "or give a container the device (--device /dev/fuse --cap-add SYS_ADMIN)")
    if os.geteuid() != 0 and not any(os.access(os.path.join(d, "fusermount3"), os.X_OK)
                                     for d in os.environ.get("PATH", "").split(os.pathsep) if d):
        return "fusermount3 is missing (Debian package fuse3), which FUSE needs to mount without root"
    return None


def check_mountpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` as a mount point: an existing, empty directory that is not mounted on."""
    p = Path(path)
    try:
        if not p.is_dir():
            raise UsageError(f"{p} is not a directory" if p.exists() else f"{p} does not exist: make an empty directory first")
        if is_mounted(p.resolve()):
            raise UsageError(f"{p} is a mount point already (unmount it with: fusermount3 -u {p})")
        with os.scandir(p) as it:
            if next(it, None) is not None:
                raise UsageError(f"{p} is not empty: mount on an empty directory")
    except PermissionError as e:
        raise UsageError(f"{p}: {e.strerror}") from None
    return p.resolve()


def fuse_inode(fs_inode: int, root: int) -> int:
    return ROOT if fs_inode == root else fs_inode + 2


class _Listing:
    """An open directory: where its listing is, and the next entries not yet replied."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.it: Iterator[Entry] | None = None
        self.pos = 0  # entries of the listing consumed so far (the next reply's start_id)
        self.buf: deque[Entry] = deque()
        self.done = False


def _operations() -> type:
    import pyfuse3
    import trio

    class ReadOnlyFS(pyfuse3.Operations):
        """pyfuse3 handlers over one ``FileSystem``; see the module's note."""

        enable_writeback_cache = False
        enable_acl = False

        def __init__(self, fs: FileSystem, root: Entry) -> None:
            super().__init__()
            self.fs = fs
            self.root_inode = root.inode
            self._known: dict[int, list[Any]] = {ROOT: [root, 1]}  # fuse inode -> [Entry, lookups]
            self._dirs: dict[int, _Listing] = {}
            self._files: dict[int, File] = {}
            self._next_fh = 1
            self._limiter = trio.CapacityLimiter(1)

        # -- helpers ------------------------------------------------------------------------

        async def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
            """``fn(*args)`` in the worker thread; a failure becomes the request's errno."""
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
            except NotFound:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except InstantNFSError as e:  # a damaged filesystem, an unreadable chunk (named)
                log.error("%s: %s", what, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except Exception as e:  # noqa: BLE001 - a hostile filesystem must not end the mount
                log.error("%s: unexpected %s: %s", what, type(e).__name__, e)
                raise pyfuse3.FUSEError(errno.EIO) from None

        def _entry(self, inode: int) -> Entry:
            try:
                return self._known[inode][0]  # type: ignore[no-any-return]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        def _remember(self, e: Entry) -> int:
            ino = fuse_inode(e.inode, self.root_inode)
            known = self._known.get(ino)
            if known is None:
                self._known[ino] = [e, 1]
            else:
                known[1] += 1
            return ino

        def _attrs(self, e: Entry, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.generation = 0
            a.entry_timeout = TIMEOUT
            a.attr_timeout = TIMEOUT
            a.st_mode = e.st_mode if st.S_IFMT(e.st_mode) else st.S_IFREG | e.mode  # devices show as such (nodev)
            a.st_nlink = max(1, e.nlink)
            a.st_uid = e.uid
            a.st_gid = e.gid
            a.st_rdev = 0
            a.st_size = max(0, e.size)
            a.st_blksize = 1 << 17
            a.st_blocks = (a.st_size + 511) // 512
            a.st_atime_ns = e.atime_ns
            a.st_mtime_ns = e.mtime_ns
            a.st_ctime_ns = e.ctime_ns
            return a

        def _handle(self) -> int:
            fh = self._next_fh
            self._next_fh += 1
            return fh

        # -- the handlers -------------------------------------------------------------------

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
            parent = self._entry(parent_inode)
            if parent.type != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if name in (b".", b"..") or b"/" in name or b"\0" in name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            path = join(parent.path, name)
            try:
                e = await self._call(f"{self.fs.name}: {path}", self.fs.stat, path)
            except pyfuse3.FUSEError as err:
                if err.errno != errno.ENOENT:
                    raise
                none = pyfuse3.EntryAttributes()  # inode 0: the kernel keeps "no such name" too
                none.st_ino = 0
                none.entry_timeout = TIMEOUT
                return none
            ino = self._remember(e)
            return self._attrs(e, ino)

        async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
            for ino, n in inode_list:
                known = self._known.get(ino)
                if known is None or ino == ROOT:
                    continue
                known[1] -= n
                if known[1] <= 0:
                    del self._known[ino]

        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            return self._attrs(self._entry(inode), inode)

        async def readlink(self, inode: int, ctx: Any = None) -> bytes:
            e = self._entry(inode)
            if e.type != "symlink":
                raise pyfuse3.FUSEError(errno.EINVAL)
            return e.link

        async def opendir(self, inode: int, ctx: Any = None) -> int:
            e = self._entry(inode)
            if e.type != "dir":
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            fh = self._handle()
            self._dirs[fh] = _Listing(e)
            return fh

        def _more(self, d: _Listing, skip: int) -> list[Entry]:
            """(worker thread) The next batch of ``d``'s entries, after skipping ``skip``."""
            if d.it is None:
                d.it = self.fs.listdir(d.entry)
            for _ in range(skip):
                if next(d.it, None) is None:
                    break
            out = []
            for e in d.it:
                out.append(e)
                if len(out) == BATCH:
                    break
            return out

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            d = self._dirs.get(fh)
            if d is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            skip = 0
            if start_id != d.pos:  # a reply that starts elsewhere (seekdir, rewinddir): list again
                d.it, d.buf, d.done, d.pos, skip = None, deque(), False, start_id, start_id
            where = f"{self.fs.name}: {d.entry.path}"
            while True:
                if not d.buf:
                    if d.done:
                        return
                    batch = await self._call(where, self._more, d, skip)
                    skip = 0
                    if not batch:
                        d.done = True
                        return
                    d.buf.extend(batch)
                e = d.buf[0]
                if b"/" in e.name or b"\0" in e.name:
                    log.warning("%s: left out a name the kernel cannot take: %r", where, e.name)
                else:
                    ino = fuse_inode(e.inode, self.root_inode)
                    if not pyfuse3.readdir_reply(token, e.name, self._attrs(e, ino), d.pos + 1):
                        return  # the reply is full: this entry starts the next one
                    self._remember(e)
                d.buf.popleft()
                d.pos += 1

        async def releasedir(self, fh: int) -> None:
            self._dirs.pop(fh, None)

        async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
            e = self._entry(inode)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EROFS)
            if e.type != "file":
                raise pyfuse3.FUSEError(errno.EISDIR if e.type == "dir" else errno.EACCES)
            f = await self._call(f"{self.fs.name}: {e.path}", self.fs.open_file, e)
            fh = self._handle()
            self._files[fh] = f
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)  # the bytes never change

        async def read(self, fh: int, off: int, size: int) -> bytes:
            f = self._files.get(fh)
            if f is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            return await self._call(f"{self.fs.name}: {f.entry.path}", f.read, off, size)

        async def release(self, fh: int) -> None:
            self._files.pop(fh, None)

        async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
            s = pyfuse3.StatvfsData()
            bs = max(512, self.fs.block_size)
            s.f_bsize = s.f_frsize = bs
            s.f_blocks = self.fs.src.size // bs
            s.f_bfree = s.f_bavail = 0
            s.f_ffree = s.f_favail = 0
            s.f_namemax = 255
            return s

    return ReadOnlyFS


def mount(fs: FileSystem, mountpoint: str | os.PathLike[str], fsname: str = "instantnfs",
          ready: Callable[[Path], None] | None = None) -> None:
    """Serve ``fs`` read-only at ``mountpoint`` until it is unmounted, or until SIGINT,
    SIGTERM or SIGHUP (which unmount it). ``ready(mountpoint)`` is called once mounted."""
    why = fuse_problem()
    if why:
        raise MountError(f"cannot mount with FUSE: {why}")
    import pyfuse3
    import trio

    mnt = check_mountpoint(mountpoint)
    root = fs.stat("/")
    ops = _operations()(fs, root)
    options = set(pyfuse3.default_options) | {"ro", f"fsname={fsname.replace(',', '_')}", "subtype=instantnfs"}
    try:
        pyfuse3.init(ops, str(mnt), options)
    except (RuntimeError, OSError) as e:
        raise MountError(f"cannot mount {mnt} with FUSE: {e}") from None

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                    task_status.started()
                    async for signum in signals:
                        log.info("%s: unmounting (%s)", mnt, signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            async def main() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()  # unmounted from outside (fusermount3 -u)

            await nursery.start(stop_on_signal)
            nursery.start_soon(main)
            if ready is not None:
                ready(mnt)

    try:
        trio.run(serve)
    finally:
        # not os.path.ismount: a stat of the mount point would ask this very process, which no longer answers
        pyfuse3.close(unmount=is_mounted(mnt))
