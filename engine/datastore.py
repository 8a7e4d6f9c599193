"""Sessions and the namespace NFS clients see: the one place that defines the datastore.

::

    /                               the export root: one directory per published session
    /<session>/<vm>.vmx             generated at publish, then an ordinary file
    /<session>/<disk>.vmdk          generated descriptor (createType "vmfs"), ordinary file
    /<session>/<disk>-flat.vmdk     the disk, backed by the restore point (read-only here)
    /<session>/<disk>.img           the same disk for QEMU/KVM
    /<session>/...                  whatever the client creates: ordinary files and dirs

A session directory is a real directory, ``<cache_dir>/sessions/<name>``; everything in
it except the disk files is an ordinary file there, so client-created files (ESXi's
``.lck-*``, ``.vswp``, logs, a ``.vmx`` renamed over the generated one) survive a
restart. The disk files are virtual: listed beside the real entries, each disk one
``WriteCache`` over the restore point's ``BackupDisk`` (both file names of a disk are
the same cache). Reads return the newest bytes; writes land in the cache, never in the
repository; the disk's size is fixed (SETATTR to another size is EINVAL, a write past
the end EFBIG). Real files are
never opened through a symbolic link (``O_NOFOLLOW``, ``lstat``): a client may create
symlinks, and they stay names, never paths the daemon follows. Nor is anything but a
regular file ever opened: opens are ``O_NONBLOCK`` and checked with ``fstat`` (a FIFO
would block the thread, a device act), and MKNOD is refused (ENOTSUP, BadType for
devices): ESXi and QEMU never make special files.

File handles carry a 16-byte keyed BLAKE2b MAC under a secret persisted in
``<cache_dir>/state.json``. The root, the disk files and the session directories have
32-byte handles (version 1: kind, session id, disk file index or the session
directory's inode), as before generations existed, so they survive an upgrade. A
client file's handle is 40 bytes (version 2: session id, inode, generation; ESXi
refuses handles over 56): its generation comes from the session's ``HandleTable``, so a
handle of a removed file whose inode the filesystem reused is STALE, and resolving a
handle never walks a directory. The same file has the same handle after a restart; a
forged or altered handle is ``BadHandle``; a handle of an unpublished session or a
deleted file is ``StaleHandle``. Session ids are never reused, so a republished name
gets new handles.

Write-cache modes (``Session.mode``):

- ``instant``: the caches live in ``<cache parent>/<session>.<sid>/disk<i>`` and are
  listed in ``state.json``; after a restart the session comes back with its caches
  (everything committed, per ``WriteCache``) and its file handles.
- ``sandbox``: each disk's cache is a ``WriteCache.temporary`` directory under the cache
  parent, removed at unpublish and at daemon stop (``close``); a sandbox a killed daemon
  left behind is removed at the next start. Several sandboxes of one point coexist.

The cache parent is the publish's ``cache_dir`` or ``<cache_dir>/writecache``. Publish
refuses when its volume has less free space than the reserve (unless forced). Every
cache uses the datastore's write verifier, new at each start.

A published point is pinned in the repository (``engine.repo.pins``) under this
daemon's id (derived from the secret, so stable across restarts): the pin is written
before the session becomes visible (a point deleted meanwhile fails the publish with
NotFound) and removed after its caches are gone; at start, restored instant sessions
are pinned again (a point force-deleted meanwhile leaves its session unrestored, with
a log line) and this daemon's pins of sessions it no longer has are removed.

state.json is rewritten only when it changes (publish, unpublish, a new secret, a
sandbox a killed daemon left), never merely because the daemon starts. If it cannot be
written at start because the volume is full (ENOSPC, EDQUOT), the daemon starts anyway
with a warning and serves every session's acknowledged data; WRITEs that need new
space answer NFS3ERR_NOSPC (``NoSpace`` from the write cache) until space is freed.

Errors are ``OSError`` with the errno a local filesystem would give (EROFS, EEXIST,
ENOTDIR, ...) or the ``engine.errors`` datastore errors; ``engine.nfs.nfs3`` maps both
to ``nfsstat3`` in one function. The namespace (sessions, handle tables) changes on the
event loop thread only, so it needs no lock; nothing there blocks: metadata calls
(lstat, mkdir, rename, an append to a handle table) run on the loop, everything that
can wait for a disk runs in a pool of its kind, so that no task waits for work queued
behind itself: write-cache writes, dirty reads and client-file reads and unstable writes
in ``io_pool``; COMMITs and stable writes (fsync) in ``sync_pool``; publish and
unpublish work (state.json's fsync, cache creation with its fallocate, pins, rmtree of
session directories and caches) in ``admin_pool``. ``apublish`` builds a session there
and makes it visible on the loop once its pin, caches and files exist; ``aunpublish``
hides it at once, then saves the state and cleans up there. state.json is written by
any of those threads: ``_save`` snapshots the state under ``_state_lock`` and writes one
snapshot at a time, so the newest state wins. ``publish``/``unpublish`` do the same
blocking, for tests and tools. A session counts its disk operations in flight, and its
caches are closed only when none is left (``aunpublish`` waits for them).
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.disk import BackupDisk
from engine.errors import (
    BadCookie,
    BadHandle,
    BadType,
    InstantNFSError,
    NotFound,
    RepositoryError,
    SessionError,
    StaleHandle,
)
from engine.fsutil import NO_SPACE_ERRNOS, pwrite_all, write_file_atomic
from engine.repo.pins import Pin, add_pin, list_pins, remove_pin
from engine.repo.repository import Repository, RestorePoint
from engine.writecache import WriteCache, remove_stale_temporaries

log = logging.getLogger("instantnfs.datastore")

ROOT, REAL, VDISK = 1, 2, 3
HANDLE_VERSION = 1  # the root and disk files: version, kind, 0, session id, disk file index
_HEAD = struct.Struct(">BBHIQ")
REAL_HANDLE_VERSION = 2  # client files: version, kind, 0, session id, inode, generation
_REAL_HEAD = struct.Struct(">BBHIQQ")
MAC_SIZE = 16
HANDLE_SIZE = _HEAD.size + MAC_SIZE  # 32
REAL_HANDLE_SIZE = _REAL_HEAD.size + MAC_SIZE  # 40: ESXi refuses handles over 56 bytes
GEN_EPOCH = 1 << 32  # each start of a session's table hands out generations from a new epoch
MAX_DEPTH = 4096  # of a client-made directory tree (a handle table never walks further)
ADMIN_THREADS = 2
UNPUBLISH_WAIT = 30  # s an unpublish waits for the disk operations in progress
VIRTUAL_FILEID = 1 << 63
MAX_FILE_SIZE = (1 << 63) - 1  # what ftruncate takes (FSINFO's maxfilesize)
NAME_MAX = 255
# set-user/group-ID bits are dropped: clients act with the daemon's rights (root), and a
# setuid-root file in the cache directory would hand those rights to local users
MODE_MASK = 0o1777
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATE_FORMAT = 1
MODES = ("instant", "sandbox")
GiB = 1 << 30
IO_THREADS = 32
MTIME_STEP = 1_000_000  # ns: a disk file's mtime moves in whole milliseconds
INLINE_WRITE = 64 << 10  # UNSTABLE writes up to this size that need no copy on write run on the loop
SYNC_THREADS = 4
DEFAULT_RESERVE = 100 * GiB


def _err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass(frozen=True, slots=True)
class Attr:
    """A file's attributes, filesystem-neutral (mode carries the S_IF* type bits)."""

    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: int
    fileid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True, slots=True)
class SetAttr:
    """What to change; None leaves a field alone; a time is ns or ``NOW``."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | str | None = None
    mtime_ns: int | str | None = None


NOW = "now"


@dataclass(frozen=True, slots=True)
class Node:
    kind: int
    session: Session | None = None
    ino: int = 0  # REAL: inode number; VDISK: disk file index
    path: str = ""  # REAL: absolute path
    gen: int = 0  # REAL: generation (see HandleTable)


@dataclass
class Session:
    name: str
    sid: int
    point: RestorePoint
    created_ns: int
    dir: Path
    disks: list[BackupDisk]
    mode: str = "instant"
    cache_parent: Path = Path()  # the volume the write caches live on
    caches: list[WriteCache] = field(default_factory=list)  # one per disk, over disks[i]
    mtimes: list[int] = field(default_factory=list)  # per disk: last write or time set
    jobs: int = 0  # export/commit jobs running on this session (unpublish waits for none)
    inflight: int = 0  # disk reads/writes/commits in the executor: caches close after the last
    ended: bool = False  # unpublished; the caches close when inflight drops to 0
    idle: asyncio.Event | None = None  # set when inflight drops to 0 after an aunpublish
    handles: HandleTable | None = None  # generations of the client files (REAL nodes)
    root_ino: int = 0  # of the session directory: live while published, so its handle needs no generation
    read_ops: int = 0
    read_bytes: int = 0
    write_ops: int = 0
    write_bytes: int = 0

    def vdisk_names(self) -> list[str]:
        out = []
        for d in self.disks:
            out += [f"{d.name}-flat.vmdk", f"{d.name}.img"]
        return out

    def vdisk_index(self, name: str) -> int:
        try:
            return self.vdisk_names().index(name)
        except ValueError:
            return -1


def vmx_text(point: RestorePoint) -> str:
    m = point.manifest
    lines = [
        '.encoding = "UTF-8"',
        'config.version = "8"',
        'virtualHW.version = "14"',
        f'displayName = "{point.vm}"',
        f'guestOS = "{m.get("guest_os") or "other-64"}"',
        f'numvcpus = "{m.get("cpus") or 1}"',
        f'memSize = "{m.get("memory_mib") or 1024}"',
        'scsi0.present = "TRUE"',
        'scsi0.virtualDev = "pvscsi"',
    ]
    if (m.get("firmware") or "bios") == "efi":
        lines.append('firmware = "efi"')
    for i, d in enumerate(point.disks):
        lines += [f'scsi0:{i}.present = "TRUE"', f'scsi0:{i}.fileName = "{d.name}.vmdk"', f'scsi0:{i}.deviceType = "scsi-hardDisk"']
    lines += [
        'ethernet0.present = "TRUE"',
        'ethernet0.virtualDev = "vmxnet3"',
        'ethernet0.networkName = "VM Network"',
        'ethernet0.startConnected = "FALSE"',
        'instantnfs.restorePoint = "' + point.id + '"',
    ]
    return "\n".join(lines) + "\n"


def vmdk_descriptor(name: str, size: int, cid: int) -> str:
    sectors = (size + 511) // 512
    cylinders = max(1, min(65535, sectors // (255 * 63)))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{name}-flat.vmdk"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.virtualHWVersion = "14"\n'
    )


def check_name(name: bytes) -> str:
    """A name a client gave: one path component, or EACCES / ENAMETOOLONG."""
    if not name or b"/" in name or b"\0" in name:
        raise _err(errno.EACCES, "invalid name")
    if len(name) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG)
    return os.fsdecode(name)


def _open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """Open a client file that must be a regular file: never through a symbolic link, and
    never waiting (a FIFO or a device is refused, not opened for good: O_NONBLOCK, then
    fstat). EISDIR / EINVAL for anything but a regular file, ENXIO for an unread FIFO."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _err(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, "not a regular file")
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


@dataclass(slots=True)
class _Entry:
    gen: int
    parent: int  # inode of the directory holding ``name``; 0 for the session directory
    name: str


class HandleTable:
    """The generations of one session's client files: inode -> (generation, parent, name).

    A client file's handle names (inode, generation); it resolves only while the table
    gives that inode that generation and the file found at the entry's path (followed
    through the parents' entries, never by walking a directory) has that inode. A file
    gets its generation when the server creates it or first sees it (LOOKUP, READDIR);
    REMOVE of its last link, RMDIR and a RENAME over it drop its entry, so an inode the
    filesystem reuses gets a new generation: the old handles are STALE. A file met under
    a name other than its entry's whose entry's name no longer reaches it (renamed or
    replaced behind the daemon's back) is treated as new, too.

    The table is persisted as an append-only log of JSON lines beside the session
    directory, ``sessions/.<name>.handles`` (not in it: clients never see it), so
    handles survive a restart: ``[ino, gen, parent, name]`` sets an entry, ``[ino, gen]``
    drops one, ``["gen", n]`` says generations below ``n`` may be in use. Lines are
    appended on the loop thread (a short write, no fsync); the log is compacted, fsynced,
    at each start, which also starts a new epoch of ``GEN_EPOCH`` generations: a
    generation handed out before a power loss that lost its line is never handed out
    again. User xattrs would keep the generation with the inode, but tmpfs has them only
    since Linux 6.6, symbolic links never: one mechanism for every filesystem.
    """

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root
        self.entries: dict[int, _Entry] = {}
        self.next_gen = 1
        self._fd = -1
        self._warned = False

    @classmethod
    def create(cls, path: Path, root: Path) -> HandleTable:
        """A new table for a new session directory ``root`` (blocking: fsyncs)."""
        t = cls(path, root)
        t.entries[os.lstat(root).st_ino] = _Entry(t._take(), 0, "")
        t._rewrite(t.next_gen)
        return t

    @classmethod
    def load(cls, path: Path, root: Path) -> HandleTable:
        """The table as persisted; entries that no longer reach their file are dropped;
        compacted into a new log (blocking: fsyncs). On a full volume the old log stays."""
        t = cls(path, root)
        top = 0
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
                if rec[0] == "gen":
                    top = max(top, int(rec[1]))
                elif len(rec) == 4:
                    t.entries[int(rec[0])] = _Entry(int(rec[1]), int(rec[2]), str(rec[3]))
                    top = max(top, int(rec[1]))
                else:
                    t.entries.pop(int(rec[0]), None)
                    top = max(top, int(rec[1]))
            except (ValueError, TypeError, IndexError, KeyError):
                continue  # a line torn by a crash
        root_ino = os.lstat(root).st_ino
        for ino in list(t.entries):
            p = t.path_of(ino)
            try:
                if p is None or os.lstat(p).st_ino != ino:
                    del t.entries[ino]
            except OSError:
                del t.entries[ino]
        t.next_gen = (top // GEN_EPOCH + 1) * GEN_EPOCH
        if root_ino not in t.entries:
            t.entries[root_ino] = _Entry(t._take(), 0, "")
        try:
            t._rewrite(t.next_gen)
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                raise
            t._fallback_epoch(e)
        return t

    def _fallback_epoch(self, e: OSError) -> None:
        """The new epoch cannot be made durable (a full volume): append it to the old log;
        failing that, take a random epoch far above any counted one."""
        try:
            self._open()
            self._append(["gen", self.next_gen])
            os.fsync(self._fd)
        except OSError:
            self.next_gen = (1 << 62) + secrets.randbelow(1 << 29) * GEN_EPOCH
            log.warning("%s cannot be written (%s): client-file handles will not survive the next restart", self.path, e.strerror)

    def _take(self) -> int:
        g = self.next_gen
        self.next_gen += 1
        return g

    def _rewrite(self, start: int) -> None:
        lines = [json.dumps(["gen", start])] + [json.dumps([ino, e.gen, e.parent, e.name]) for ino, e in self.entries.items()]
        self.close()
        write_file_atomic(self.path, ("\n".join(lines) + "\n").encode())
        self._open()

    def _open(self) -> None:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _append(self, rec: list) -> None:
        try:
            self._open()
            os.write(self._fd, (json.dumps(rec) + "\n").encode())
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("%s cannot be written (%s): handles of files created now are STALE after a restart",
                            self.path, e.strerror)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def path_of(self, ino: int) -> str | None:
        """Where the entry of ``ino`` says the file is (through its parents' entries)."""
        parts: list[str] = []
        cur = ino
        for _ in range(MAX_DEPTH):
            e = self.entries.get(cur)
            if e is None:
                return None
            if e.parent == 0:
                return os.path.join(self.root, *reversed(parts)) if parts else str(self.root)
            parts.append(e.name)
            cur = e.parent
        return None

    def resolve(self, ino: int, gen: int) -> str | None:
        """The path of the file (ino, gen) names, or None: that file is gone."""
        e = self.entries.get(ino)
        if e is None or e.gen != gen:
            return None
        p = self.path_of(ino)
        if p is None:
            return None
        try:
            return p if os.lstat(p).st_ino == ino else None
        except OSError:
            return None

    def seen(self, ino: int, parent: int, name: str) -> int:
        """The generation of the file ``ino`` found as ``name`` in directory ``parent``."""
        e = self.entries.get(ino)
        if e is not None:
            if e.parent == parent and e.name == name:
                return e.gen
            if e.parent != 0 and self.resolve(ino, e.gen) is not None:
                return e.gen  # another hard link of the same file
        gen = self._take()
        self.entries[ino] = _Entry(gen, parent, name)
        self._append([ino, gen, parent, name])
        return gen

    def renamed(self, ino: int, parent: int, name: str, new_parent: int, new_name: str) -> None:
        e = self.entries.get(ino)
        if e is not None and e.parent == parent and e.name == name:
            e.parent, e.name = new_parent, new_name
            self._append([ino, e.gen, new_parent, new_name])

    def dropped(self, ino: int) -> None:
        e = self.entries.pop(ino, None)
        if e is not None:
            self._append([ino, e.gen])


def _log_failure(what: str) -> Callable[[Any], None]:
    def done(fut: Any) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.error("%s failed: %s", what, fut.exception())
    return done


class Datastore:
    """The published sessions of one repository, and every file operation on them."""

    def __init__(self, repo: Repository, cache_dir: str | os.PathLike, write_dir: str | os.PathLike | None = None,
                 reserve: int = DEFAULT_RESERVE) -> None:
        self.repo = repo
        self.cache_dir = Path(cache_dir)
        self.write_dir = Path(write_dir) if write_dir else self.cache_dir / "writecache"
        self.reserve = reserve  # default free-space reserve of a publish
        self.sessions_dir = self.cache_dir / "sessions"
        self.state_path = self.cache_dir / "state.json"
        self.sessions: dict[str, Session] = {}
        self.by_sid: dict[int, Session] = {}
        self.next_sid = 1
        self.secret = b""
        self.daemon_id = ""  # names this daemon's pins in the repository (from the secret: stable)
        self.root_mtime_ns = time.time_ns()
        self.root_gen = 1
        self.fsid = 0
        self.unrestored: list[dict] = []  # state entries of sessions that could not be restored
        self._fh_cache: dict[bytes, Node] = {}  # verified handles of disk files
        self._publishing: set[str] = set()  # names of publishes in progress
        # what state.json lists: name -> entry; changed on the loop, written by any thread
        self._persist: dict[str, dict] = {}
        self._state_lock = threading.Lock()  # guards _persist and next_sid for a snapshot
        self._save_lock = threading.Lock()  # one state.json write at a time, each of the newest state
        self.write_verf = secrets.token_bytes(8)  # changes every start: clients resend uncommitted writes
        # Work off the loop, by kind, so that no task waits for work queued behind itself:
        # write-cache writes, dirty reads and client-file I/O in one pool; COMMITs and
        # stable writes (fsync) in another, so a burst of slow fsyncs never leaves writes
        # waiting for a thread; publish/unpublish (state fsync, cache creation, pins,
        # rmtree of session directories and caches) in a small one of their own.
        self.io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="wc-io")
        self.sync_pool = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="wc-sync")
        self.admin_pool = ThreadPoolExecutor(max_workers=ADMIN_THREADS, thread_name_prefix="ds-admin")

    # -- state -----------------------------------------------------------------------------

    def load(self) -> None:
        """Create or read the cache directory's state; bring persisted sessions back.

        state.json is written only if something changed (a new secret, a sandbox a killed
        daemon left); on a full volume the daemon starts anyway, with a warning."""
        try:
            self.sessions_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SessionError(f"cannot create the cache directory {self.cache_dir}: {e.strerror}") from e
        state: dict[str, Any] = {}
        changed = False
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
                if state.get("format") != STATE_FORMAT:
                    raise ValueError(f"unknown format {state.get('format')!r}")
                self.secret = bytes.fromhex(state["secret"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SessionError(f"{self.state_path} is unreadable ({e}); move it away to start afresh") from e
        if not self.secret:
            self.secret = secrets.token_bytes(32)
            changed = True
        self.fsid = int.from_bytes(hashlib.blake2b(self.secret, digest_size=8, person=b"fsid").digest(), "big") >> 1
        self.daemon_id = hashlib.blake2b(self.secret, digest_size=8, person=b"daemon").hexdigest()
        self.next_sid = int(state.get("next_sid", 1))
        for s in state.get("sessions", []):
            mode = s.get("mode", "instant")
            parent = Path(s.get("cache_parent") or self.default_cache_parent)
            if mode == "sandbox":  # a daemon that was killed left it: throw it away
                shutil.rmtree(self.sessions_dir / s["name"], ignore_errors=True)
                self._handles_path(s["name"]).unlink(missing_ok=True)
                for d in remove_stale_temporaries(parent):
                    log.info("removed the sandbox cache %s left by a stopped daemon", d)
                log.info("sandbox session %s ended with the daemon that ran it", s.get("name"))
                changed = True
                continue
            try:
                try:
                    point = self.repo.point(s["point"])
                except NotFound:
                    raise SessionError(f"its restore point {s['point']} was deleted from the repository") from None
                ses = self._open_session(s["name"], int(s["sid"]), point, int(s["created_ns"]), mode, parent, restore=True)
                try:
                    add_pin(self.repo, self._pin(ses))
                except NotFound:
                    self._end(ses, unpin=False, remove=False)
                    raise SessionError(f"its restore point {point.id} was deleted from the repository") from None
                except BaseException:
                    self._end(ses, unpin=False, remove=False)
                    raise
                self._register(ses)
            except Exception as e:  # noqa: BLE001 - one broken session must not stop the daemon
                # kept in the state: its caches may come back (a volume not mounted yet)
                log.error("session %s (restore point %s) cannot be restored (kept for the next start): %s",
                          s.get("name"), s.get("point"), e)
                self.unrestored.append(s)
                self._persist[s["name"]] = s
        self._drop_foreign_pins()
        if changed:
            try:
                self._save()
            except OSError as e:
                if e.errno not in NO_SPACE_ERRNOS:
                    raise SessionError(f"cannot write {self.state_path}: {e.strerror}") from e
                log.warning("the cache volume of %s is full (%s): starting anyway, serving every session's data; "
                            "WRITEs get NFS3ERR_NOSPC until space is freed", self.cache_dir, e.strerror)

    def _drop_foreign_pins(self) -> None:
        """Remove this daemon's pins of sessions it does not have (sandboxes of a killed daemon)."""
        keep = {(e.get("name"), e.get("point")) for e in self._persist.values()}
        try:
            for p in list_pins(self.repo):
                if p.daemon == self.daemon_id and (p.session, p.point) not in keep:
                    remove_pin(self.repo, p.point, p.daemon, p.session)
                    log.info("removed the pin of restore point %s held by session %s, which is gone", p.point, p.session)
        except (OSError, RepositoryError) as e:
            log.warning("the pins of this daemon (%s) could not be checked: %s", self.daemon_id, e)

    def _pin(self, s: Session) -> Pin:
        return Pin(s.point.id, s.name, s.sid, self.daemon_id, str(self.cache_dir), socket.gethostname(), os.getpid(),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.created_ns / 1e9)))

    @property
    def default_cache_parent(self) -> Path:
        return self.write_dir

    def close(self) -> None:
        """Daemon stop: sandboxes end (their caches removed), instant caches are committed."""
        for s in list(self.sessions.values()):
            if s.mode == "sandbox":
                self.unpublish(s.name, force=True)
            else:
                self._close_caches(s)
                if s.handles is not None:
                    s.handles.close()

    @staticmethod
    def _close_caches(s: Session) -> None:
        for c in s.caches:
            try:
                c.close()
            except Exception as e:  # noqa: BLE001 - close the others; the error is logged
                log.error("session %s: closing the write cache %s failed: %s", s.name, c.path, e)

    @staticmethod
    def _entry(s: Session) -> dict:
        return {"name": s.name, "sid": s.sid, "point": s.point.id, "created_ns": s.created_ns,
                "mode": s.mode, "cache_parent": str(s.cache_parent)}

    def _save(self) -> None:
        """Write state.json (blocking: fsync), from any thread: the newest state wins."""
        with self._save_lock:
            with self._state_lock:
                state = {
                    "format": STATE_FORMAT,
                    "secret": self.secret.hex(),
                    "next_sid": self.next_sid,
                    "sessions": sorted(self._persist.values(), key=lambda e: int(e.get("sid", 0))),
                }
                data = (json.dumps(state, indent=2) + "\n").encode()
            write_file_atomic(self.state_path, data)

    def cache_path(self, s: Session, disk: int) -> Path:
        """Where an instant session's write cache of ``disk`` lives."""
        return s.cache_parent / f"{s.name}.{s.sid}" / f"disk{disk}"

    def _handles_path(self, name: str) -> Path:
        return self.sessions_dir / f".{name}.handles"  # a session name never starts with '.'

    def _open_session(self, name: str, sid: int, point: RestorePoint, created_ns: int, mode: str, parent: Path,
                      restore: bool = False) -> Session:
        """Open a session's disks, caches and handle table (blocking; touches no shared
        state). ``restore``: its instant caches must exist (never start an empty cache in
        place of one that is missing)."""
        disks = [point.open_disk(i) for i in range(len(point.disks))]
        d = self.sessions_dir / name
        s = Session(name, sid, point, created_ns, d, disks, mode, parent)
        try:
            for i, disk in enumerate(disks):
                tag = hashlib.blake2b(f"{point.id}/{disk.name}".encode(), digest_size=32).digest()
                if mode == "sandbox":
                    c = WriteCache.temporary(disk, parent, base_tag=tag, verifier=self.write_verf, executor=self.io_pool)
                else:
                    path = self.cache_path(s, i)
                    if restore:
                        c = WriteCache.open(path, disk, base_tag=tag, verifier=self.write_verf, executor=self.io_pool)
                    else:
                        c = WriteCache.create(path, disk, base_tag=tag, verifier=self.write_verf, executor=self.io_pool)
                s.caches.append(c)
            s.mtimes = [created_ns] * len(disks)
            d.mkdir(exist_ok=True)
            hp = self._handles_path(name)
            s.handles = HandleTable.load(hp, d) if restore else HandleTable.create(hp, d)
            s.root_ino = os.lstat(d).st_ino
        except BaseException:
            self._close_caches(s)
            raise
        return s

    def _register(self, s: Session) -> None:
        """Make a session visible (loop thread)."""
        self.sessions[s.name] = s
        self.by_sid[s.sid] = s
        with self._state_lock:
            self._persist[s.name] = self._entry(s)

    # -- publishing ------------------------------------------------------------------------

    def _claim(self, point: RestorePoint, name: str | None, mode: str) -> tuple[str, int]:
        """Check the name (or make one) and take a session id (loop thread)."""
        if mode not in MODES:
            raise SessionError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        taken = set(self.sessions) | self._publishing
        if name is None:
            base = re.sub(r"[^A-Za-z0-9._-]", "_", point.vm)[:100] or "vm"
            name = f"{base}-{point.id[:8]}"
            n = 2
            while name in taken:
                name = f"{base}-{point.id[:8]}-{n}"
                n += 1
        if not _SESSION_RE.match(name):
            raise SessionError(f"session name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-'")
        if name in taken:
            raise SessionError(f"a session named {name!r} is already published (unpublish it or pick another --name)")
        if any(u.get("name") == name for u in self.unrestored):
            raise SessionError(f"session {name!r} could not be restored at start (see the daemon's log); pick another --name")
        with self._state_lock:
            sid = self.next_sid
            self.next_sid += 1
        self._publishing.add(name)
        return name, sid

    def _build(self, point: RestorePoint, name: str, sid: int, mode: str, cache_dir: str | os.PathLike | None,
               reserve: int | None, force: bool) -> Session:
        """Everything a publish does before the session is visible (blocking): the free
        space check, the pin, the caches, the session directory and its files."""
        self._save()  # the sid is taken even if the publish fails: ids are never reused
        parent = Path(os.path.abspath(os.path.expanduser(cache_dir))) if cache_dir else self.default_cache_parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            v = os.statvfs(parent)
        except OSError as e:
            raise SessionError(f"cannot use the cache directory {parent}: {e.strerror}") from e
        free = v.f_bavail * v.f_frsize
        if reserve is None:
            reserve = self.reserve
        if free < reserve and not force:
            raise SessionError(
                f"the cache volume of {parent} has {free / GiB:.1f} GiB free, less than the {reserve / GiB:.1f} GiB reserve: "
                "free space, pick another --cache-dir, lower the reserve, or publish with --force"
            )
        d = self.sessions_dir / name
        if d.exists():
            shutil.rmtree(d)  # left behind by an unpublish that crashed half way
        created_ns = time.time_ns()
        stub = Session(name, sid, point, created_ns, d, [], mode, parent)
        add_pin(self.repo, self._pin(stub))  # NotFound: the point is gone or being deleted
        s: Session | None = None
        try:
            s = self._open_session(name, sid, point, created_ns, mode, parent)
            (d / f"{point.vm}.vmx").write_text(vmx_text(point))
            for info in point.disks:
                cid = int.from_bytes(hashlib.blake2b(f"{point.id}/{info.name}".encode(), digest_size=4).digest(), "big")
                (d / f"{info.name}.vmdk").write_text(vmdk_descriptor(info.name, info.size, cid))
            with self._state_lock:
                self._persist[name] = self._entry(s)
            self._save()
        except BaseException as e:
            with self._state_lock:
                self._persist.pop(name, None)
            self._end(s or stub)
            if isinstance(e, OSError):
                raise SessionError(f"cannot publish {point.id}: {e.strerror} ({e.filename or parent})") from e
            if isinstance(e, InstantNFSError) and not isinstance(e, SessionError):
                raise SessionError(f"cannot publish {point.id}: {e}") from e
            raise
        return s

    def _published(self, s: Session) -> Session:
        self._publishing.discard(s.name)
        self._register(s)
        self._root_changed()
        log.info("published restore point %s (VM %s) as session %s (%s, cache in %s)", s.point.id, s.point.vm, s.name,
                 s.mode, s.cache_parent)
        return s

    def publish(self, point_ident: str, name: str | None = None, *, mode: str = "instant",
                cache_dir: str | os.PathLike | None = None, reserve: int | None = None, force: bool = False) -> Session:
        """Publish a restore point; the write caches go to ``cache_dir`` (default the
        daemon's), whose volume must have ``reserve`` bytes free unless ``force``.
        Blocking: for tests and tools; the daemon calls ``apublish``."""
        point = self.repo.point(point_ident)
        name, sid = self._claim(point, name, mode)
        try:
            s = self._build(point, name, sid, mode, cache_dir, reserve, force)
        except BaseException:
            self._publishing.discard(name)
            raise
        return self._published(s)

    async def apublish(self, point_ident: str, name: str | None = None, *, mode: str = "instant",
                       cache_dir: str | os.PathLike | None = None, reserve: int | None = None, force: bool = False) -> Session:
        """``publish`` with every blocking step off the loop; the session is visible once
        its pin, caches and files exist."""
        loop = asyncio.get_running_loop()
        point = await loop.run_in_executor(self.admin_pool, self.repo.point, point_ident)
        name, sid = self._claim(point, name, mode)
        try:
            s = await loop.run_in_executor(self.admin_pool, self._build, point, name, sid, mode, cache_dir, reserve, force)
        except BaseException:
            self._publishing.discard(name)
            raise
        return self._published(s)

    def _hide(self, name: str, force: bool) -> Session:
        """Take a session out of the namespace at once (loop thread)."""
        s = self.sessions.get(name)
        if s is None:
            raise SessionError(f"no published session {name!r}")
        if s.jobs and not force:
            raise SessionError(f"session {name!r} has an export or commit running; wait for it to finish")
        del self.sessions[name]
        del self.by_sid[s.sid]
        with self._state_lock:
            self._persist.pop(name, None)
        self._fh_cache.clear()
        self._root_changed()
        s.ended = True
        log.info("unpublished session %s", name)
        return s

    def unpublish(self, name: str, force: bool = False) -> None:
        """End a session: its files and its write caches are removed (export or commit
        first). Blocking: for tests, tools and the daemon's stop; the API calls ``aunpublish``."""
        s = self._hide(name, force)
        if s.inflight == 0:  # else the last disk operation in progress ends it
            self._save_then(lambda: self._end(s))
        else:
            self._save_then(lambda: None)

    def _save_then(self, end: Callable[[], None]) -> None:
        """Save the state, then ``end`` (blocking). On a full volume, ``end`` first (it
        frees the session's space) and the save again: a session is never left listed
        in state.json because the volume was full."""
        try:
            self._save()
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                end()
                raise
            end()
            try:
                self._save()
            except OSError as e2:
                log.error("%s cannot be written (%s): an unpublished session may be listed at the next start",
                          self.state_path, e2.strerror)
            return
        end()

    async def aunpublish(self, name: str, force: bool = False) -> None:
        """``unpublish``: hidden at once; the state write and the clean-up run off the loop."""
        s = self._hide(name, force)
        loop = asyncio.get_running_loop()
        if s.inflight:  # the operations in progress finish first (they get their replies)
            s.idle = asyncio.Event()
            try:
                await asyncio.wait_for(s.idle.wait(), UNPUBLISH_WAIT)
            except TimeoutError:
                s.idle = None
                log.warning("session %s: disk operations still running after %d s; the last one ends the session",
                            s.name, UNPUBLISH_WAIT)
                await loop.run_in_executor(self.admin_pool, self._save_then, lambda: None)
                return
        await loop.run_in_executor(self.admin_pool, self._save_then, lambda: self._end(s))

    def _end(self, s: Session, unpin: bool = True, remove: bool = True) -> None:
        """Close an unpublished session's caches (a sandbox's directories go with them),
        then remove its directories and its pin (blocking). Never while a cache call runs
        in a thread: its file descriptors would be closed under it."""
        self._close_caches(s)
        if s.handles is not None:
            s.handles.close()
        if remove:
            if s.mode == "instant":
                shutil.rmtree(s.cache_parent / f"{s.name}.{s.sid}", ignore_errors=True)
            shutil.rmtree(s.dir, ignore_errors=True)
            self._handles_path(s.name).unlink(missing_ok=True)
        if unpin:
            try:
                remove_pin(self.repo, s.point.id, self.daemon_id, s.name)
            except (OSError, RepositoryError) as e:
                log.error("session %s: its pin of restore point %s cannot be removed: %s", s.name, s.point.id, e)

    def _op_done(self, s: Session) -> None:
        s.inflight -= 1
        if s.ended and s.inflight == 0:
            if s.idle is not None:  # aunpublish waits for this and ends the session
                s.idle.set()
                return
            fut = asyncio.get_running_loop().run_in_executor(self.admin_pool, self._end, s)
            fut.add_done_callback(_log_failure(f"ending session {s.name}"))

    @staticmethod
    def _no_copy_on_write(cache: WriteCache, offset: int, n: int) -> bool:
        """Whether a write covers whole granules, or dirty ones at its unaligned edges
        (dirty bits never clear, so the answer cannot go stale)."""
        g = cache.granule
        end = offset + n
        if offset % g and not cache.is_dirty(offset, 1):
            return False
        return not (end % g and end < cache.size and not cache.is_dirty(end - 1, 1))

    async def aclose(self, timeout: float = 30.0) -> None:
        """``close`` (off the loop) once the disk operations in progress have finished (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while any(s.inflight for s in self.sessions.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.close)
        self.io_pool.shutdown(wait=False)
        self.sync_pool.shutdown(wait=False)
        self.admin_pool.shutdown(wait=False)

    def _root_changed(self) -> None:
        self.root_mtime_ns = max(time.time_ns(), self.root_mtime_ns + 1)
        self.root_gen += 1

    # -- file handles ----------------------------------------------------------------------

    def _mac(self, head: bytes) -> bytes:
        return hashlib.blake2b(head, key=self.secret, digest_size=MAC_SIZE).digest()

    def handle(self, node: Node) -> bytes:
        sid = node.session.sid if node.session else 0
        if node.kind == REAL and not (node.session is not None and node.ino == node.session.root_ino):
            head = _REAL_HEAD.pack(REAL_HANDLE_VERSION, REAL, 0, sid, node.ino, node.gen)
        else:
            head = _HEAD.pack(HANDLE_VERSION, node.kind, 0, sid, node.ino)
        return head + self._mac(head)

    def root(self) -> Node:
        return Node(ROOT)

    def resolve(self, fh: bytes) -> Node:
        """The node a handle names; BadHandle if forged, StaleHandle if its file is gone.
        Never walks a directory: a client file is found through its session's table."""
        node = self._fh_cache.get(fh)
        if node is not None:
            return node
        if len(fh) == HANDLE_SIZE:
            head, mac = fh[: _HEAD.size], fh[_HEAD.size :]
        elif len(fh) == REAL_HANDLE_SIZE:
            head, mac = fh[: _REAL_HEAD.size], fh[_REAL_HEAD.size :]
        else:
            raise BadHandle()
        if not hmac.compare_digest(self._mac(head), mac):
            raise BadHandle()
        if len(fh) == REAL_HANDLE_SIZE:
            ver, kind, _pad, sid, ino, gen = _REAL_HEAD.unpack(head)
            if ver != REAL_HANDLE_VERSION or kind != REAL:
                raise BadHandle()
            s = self.by_sid.get(sid)
            if s is None or s.handles is None:
                raise StaleHandle()
            path = s.handles.resolve(ino, gen)
            if path is None:
                raise StaleHandle()
            return Node(REAL, s, ino, path, gen)
        ver, kind, _pad, sid, ino = _HEAD.unpack(head)
        if ver != HANDLE_VERSION:
            raise BadHandle()
        if kind == ROOT:
            return Node(ROOT)
        s = self.by_sid.get(sid)
        if kind == REAL:  # a session directory (the same handle as before generations)
            if s is None or ino != s.root_ino or s.handles is None:
                raise StaleHandle()  # or a client file's handle of an older daemon: LOOKUP it again
            return Node(REAL, s, ino, str(s.dir), s.handles.entries[ino].gen)
        if kind != VDISK:
            raise BadHandle()
        if s is None:
            raise StaleHandle()
        if ino >= 2 * len(s.disks):
            raise BadHandle()
        node = Node(VDISK, s, ino)
        if len(self._fh_cache) > 65536:
            self._fh_cache.clear()
        self._fh_cache[bytes(fh)] = node  # immutable while the session is published
        return node

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

    # -- attributes ------------------------------------------------------------------------

    def getattr(self, node: Node) -> Attr:
        if node.kind == REAL:
            st = os.lstat(node.path)
            return Attr(st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_blocks * 512,
                        st.st_rdev, st.st_ino, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        if node.kind == ROOT:
            t = self.root_mtime_ns
            return Attr(stat.S_IFDIR | 0o755, 2 + len(self.sessions), 0, 0, 4096, 4096, 0, VIRTUAL_FILEID, t, t, t)
        s = node.session
        assert s is not None
        disk = s.disks[node.ino // 2]
        t = s.mtimes[node.ino // 2]
        return Attr(stat.S_IFREG | 0o644, 1, 0, 0, disk.size, disk.size, 0, self.fileid(node), t, t, t)

    def fileid(self, node: Node) -> int:
        if node.kind == REAL:
            return node.ino
        if node.kind == ROOT:
            return VIRTUAL_FILEID
        assert node.session is not None
        return VIRTUAL_FILEID | node.session.sid << 20 | node.ino

    def setattr(self, node: Node, sa: SetAttr) -> None:
        if node.kind == VDISK:
            self._setattr_disk(node, sa)
            return
        if node.kind != REAL:
            if sa == SetAttr():
                return
            raise _err(errno.EACCES)
        p = node.path
        is_link = stat.S_ISLNK(os.lstat(p).st_mode)
        if sa.size is not None:
            if is_link:
                raise _err(errno.EINVAL)
            if sa.size > MAX_FILE_SIZE:  # a size3 is a uint64; files end before 2**63
                raise _err(errno.EFBIG)
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

    def _setattr_disk(self, node: Node, sa: SetAttr) -> None:
        """A disk file: its size is fixed (EINVAL for another size, the error a block
        device gives), its owner and mode are the daemon's (EPERM), times may be set."""
        s = node.session
        assert s is not None
        i = node.ino // 2
        if sa.size is not None and sa.size != s.disks[i].size:
            raise _err(errno.EINVAL, f"the disk's size is fixed at {s.disks[i].size} bytes")
        if (sa.mode is not None and sa.mode & 0o7777 != 0o644) or sa.uid not in (None, 0) or sa.gid not in (None, 0):
            raise _err(errno.EPERM, "a disk file's owner and mode cannot change")
        if sa.mtime_ns is not None:
            m = time.time_ns() if sa.mtime_ns == NOW else int(sa.mtime_ns)
            s.mtimes[i] = m

    def _touch(self, s: Session, i: int) -> None:
        """A write changes the disk's mtime (and ctime), kept to whole milliseconds so that
        a burst of writes shares one attribute version (built once, see NFS3.post_op)."""
        now = time.time_ns()
        if now - s.mtimes[i] >= MTIME_STEP:
            s.mtimes[i] = now - now % MTIME_STEP

    def access(self, node: Node) -> tuple[bool, bool, bool]:
        """(readable, writable, lookup/executable) for any client allowed in."""
        if node.kind == ROOT:
            return True, False, True
        if node.kind == VDISK:
            return True, True, False
        st = os.lstat(node.path)
        return True, True, stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)

    # -- names -----------------------------------------------------------------------------

    def _dir(self, node: Node) -> None:
        if node.kind == VDISK or (node.kind == REAL and not stat.S_ISDIR(os.lstat(node.path).st_mode)):
            raise _err(errno.ENOTDIR)

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
                raise _err(errno.ENOENT)
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
            raise _err(errno.EEXIST if name == b"." else errno.EACCES)
        n = check_name(name)
        if dirnode.kind == ROOT:
            raise _err(errno.EACCES, "the export root holds sessions only")
        s = dirnode.session
        assert s is not None
        if dirnode.path == str(s.dir) and s.vdisk_index(n) >= 0:
            raise _err(errno.EEXIST, "a backup disk file")
        return s, n, os.path.join(dirnode.path, n)

    def _apply_create_attrs(self, node: Node, sa: SetAttr | None) -> None:
        if sa is not None and sa != SetAttr():
            self.setattr(node, sa)

    def create(self, dirnode: Node, name: bytes, mode: str, sa: SetAttr | None = None, verf: bytes = b"") -> Node:
        """mode: 'unchecked' | 'guarded' | 'exclusive' (with ``verf``, 8 bytes)."""
        if dirnode.kind != ROOT and dirnode.session is not None and dirnode.path == str(dirnode.session.dir):
            if check_name(name) in dirnode.session.vdisk_names() and mode == "unchecked":
                raise _err(errno.EROFS, "a backup disk file")
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
                raise _err(errno.EEXIST)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, "not a regular file")
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
            raise _err(errno.EINVAL)
        os.symlink(os.fsdecode(target), path)
        return self._real(s, path, dirnode.ino)

    def mknod(self, dirnode: Node, name: bytes, kind: str, sa: SetAttr | None = None) -> Node:
        """Refused: ESXi and QEMU never make special files, and one in a session directory
        could only serve to block or trick the daemon (ENOTSUP; BadType for devices)."""
        self._target(dirnode, name)
        if kind in ("fifo", "socket"):
            raise _err(errno.ENOTSUP, f"no {kind} special files in the datastore")
        raise BadType(f"cannot create a {kind} special file in the datastore")

    def readlink(self, node: Node) -> bytes:
        if node.kind != REAL or not stat.S_ISLNK(os.lstat(node.path).st_mode):
            raise _err(errno.EINVAL)
        return os.fsencode(os.readlink(node.path))

    def remove(self, dirnode: Node, name: bytes) -> None:
        s, n, path = self._target_existing(dirnode, name)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            raise _err(errno.EISDIR)
        os.unlink(path)
        if st.st_nlink <= 1:  # its inode is free for reuse: its handles go STALE
            assert s.handles is not None
            s.handles.dropped(st.st_ino)

    def rmdir(self, dirnode: Node, name: bytes) -> None:
        if name == b".":
            raise _err(errno.EINVAL)
        if name == b"..":
            raise _err(errno.ENOTEMPTY)
        s, n, path = self._target_existing(dirnode, name)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise _err(errno.ENOTDIR)
        os.rmdir(path)
        assert s.handles is not None
        s.handles.dropped(st.st_ino)

    def _target_existing(self, dirnode: Node, name: bytes) -> tuple[Session, str, str]:
        self._dir(dirnode)
        if name in (b".", b".."):
            raise _err(errno.EACCES)
        n = check_name(name)
        if dirnode.kind == ROOT:
            if n in self.sessions:
                raise _err(errno.EACCES, "unpublish a session through the control API")
            raise _err(errno.ENOENT)
        s = dirnode.session
        assert s is not None
        if dirnode.path == str(s.dir) and s.vdisk_index(n) >= 0:
            raise _err(errno.EROFS, "a backup disk file")
        return s, n, os.path.join(dirnode.path, n)

    def rename(self, fromdir: Node, fromname: bytes, todir: Node, toname: bytes) -> None:
        s1, fname, src = self._target_existing(fromdir, fromname)
        self._dir(todir)
        if toname in (b".", b".."):
            raise _err(errno.EINVAL)
        tn = check_name(toname)
        if todir.kind == ROOT:
            raise _err(errno.EACCES)
        s2 = todir.session
        assert s2 is not None
        if s2 is not s1:
            raise _err(errno.EXDEV)
        if todir.path == str(s2.dir) and s2.vdisk_index(tn) >= 0:
            raise _err(errno.EROFS, "a backup disk file")
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
            raise _err(errno.EROFS if node.kind == VDISK else errno.EACCES)
        s, _n, path = self._target(todir, name)
        if s is not node.session:
            raise _err(errno.EXDEV)
        if stat.S_ISDIR(os.lstat(node.path).st_mode):
            raise _err(errno.EISDIR)
        os.link(node.path, path, follow_symlinks=False)

    # -- directories -----------------------------------------------------------------------

    def listdir(self, dirnode: Node) -> tuple[list[tuple[str, Node | None, int]], bytes]:
        """[(name, node or None for '.'/'..' , fileid)], and the cookie verifier."""
        self._dir(dirnode)
        me = self.fileid(dirnode)
        up = self.parent(dirnode)
        out: list[tuple[str, Node | None, int]] = [(".", dirnode, me), ("..", up, self.fileid(up))]
        if dirnode.kind == ROOT:
            for n in sorted(self.sessions):
                s = self.sessions[n]
                node = self._real(s, str(s.dir), st=os.lstat(s.dir))
                out.append((n, node, node.ino))
            return out, struct.pack(">Q", self.root_gen)
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
        out += [(n, node, self.fileid(node)) for n, node in names]
        verf = hashlib.blake2b(struct.pack(">QQ", st.st_mtime_ns, st.st_ino), digest_size=8).digest()
        return out, verf

    def check_cookie(self, cookie: int, verf: bytes, current: bytes, count: int) -> None:
        if cookie == 0:
            return
        if verf != current or cookie > count:
            raise BadCookie()

    # -- data ------------------------------------------------------------------------------

    async def read(self, node: Node, offset: int, count: int) -> tuple[list[Any], int, bool]:
        """(buffers, total length, eof)."""
        if node.kind == VDISK:
            s = node.session
            assert s is not None
            disk = s.caches[node.ino // 2]
            s.inflight += 1
            try:
                bufs = await disk.aread(offset, count)
            finally:
                self._op_done(s)
            n = sum(len(b) for b in bufs)
            s.read_ops += 1
            s.read_bytes += n
            return bufs, n, offset + n >= disk.size
        self._client_file(node)
        data, size = await asyncio.get_running_loop().run_in_executor(self.io_pool, _pread_file, node.path, count, offset)
        assert node.session is not None
        node.session.read_ops += 1
        node.session.read_bytes += len(data)
        return [data], len(data), offset + len(data) >= size

    @staticmethod
    def _client_file(node: Node) -> os.stat_result:
        """The stat of a client-created regular file; EISDIR / EINVAL for anything else."""
        if node.kind == ROOT:
            raise _err(errno.EISDIR)
        st = os.lstat(node.path)
        if stat.S_ISDIR(st.st_mode):
            raise _err(errno.EISDIR)
        if not stat.S_ISREG(st.st_mode):
            raise _err(errno.EINVAL)
        return st

    async def write(self, node: Node, offset: int, data: Any, stable: int) -> tuple[int, int]:
        """Write; ``stable`` is the stable_how value asked (0 UNSTABLE, 1 DATA_SYNC,
        2 FILE_SYNC). Returns (bytes written, the stable_how the data reached)."""
        if node.kind == VDISK:
            s = node.session
            assert s is not None
            i = node.ino // 2
            cache = s.caches[i]
            if stable == 0 and len(data) <= INLINE_WRITE and not s.jobs and self._no_copy_on_write(cache, offset, len(data)):
                # a small UNSTABLE write that reads nothing from the backup is one pwrite
                # into the page cache: cheaper here than a thread hand-off (no export is
                # running, so it can never wait for paused writes)
                cache.write(offset, data)
            else:
                s.inflight += 1
                try:
                    await cache.awrite(offset, data, stable != 0)
                finally:
                    self._op_done(s)
            self._touch(s, i)
            s.write_ops += 1
            s.write_bytes += len(data)
            # a stable write commits data, then the bitmap (the cache's metadata): FILE_SYNC
            return len(data), 0 if stable == 0 else 2
        self._client_file(node)
        # open, pwrite (and fsync) in a thread: a .vswp write may wait for the disk
        pool = self.sync_pool if stable else self.io_pool
        await asyncio.get_running_loop().run_in_executor(pool, _pwrite_file, node.path, data, offset, stable)
        n = len(data)
        assert node.session is not None
        node.session.write_ops += 1
        node.session.write_bytes += n
        return n, stable

    async def commit(self, node: Node) -> None:
        if node.kind == VDISK:
            s = node.session
            assert s is not None
            s.inflight += 1
            try:
                await asyncio.get_running_loop().run_in_executor(self.sync_pool, s.caches[node.ino // 2].commit)
            finally:
                self._op_done(s)
            return
        if node.kind != REAL:
            return
        await asyncio.get_running_loop().run_in_executor(self.sync_pool, _fsync_file, node.path)

    def fsstat(self, node: Node) -> os.statvfs_result:
        """The volume a node's writes go to: its session's write caches, else the cache dir."""
        if node.session is not None:
            return os.statvfs(node.session.cache_parent)
        return os.statvfs(self.cache_dir)

    # -- reporting -------------------------------------------------------------------------

    def session_json(self, s: Session) -> dict:
        stats = [c.stats() for c in s.caches]
        return {
            "name": s.name,
            "sid": s.sid,
            "point": s.point.id,
            "vm": s.point.vm,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.created_ns / 1e9)),
            "mode": s.mode,
            "files_dir": str(s.dir),
            "cache_dir": str(s.cache_parent),
            "cache": {
                "allocated_bytes": sum(st.allocated_bytes for st in stats),
                "dirty_bytes": sum(st.dirty_bytes for st in stats),
            },
            "disks": [
                {"name": d.name, "size": d.size, "cache_path": str(c.path), "granule": st.granule,
                 "allocated_bytes": st.allocated_bytes, "dirty_bytes": st.dirty_bytes, "commits": st.commits,
                 "failed": st.failed}
                for d, c, st in zip(s.disks, s.caches, stats)
            ],
            "io": {"read_ops": s.read_ops, "read_bytes": s.read_bytes, "write_ops": s.write_ops, "write_bytes": s.write_bytes},
        }
