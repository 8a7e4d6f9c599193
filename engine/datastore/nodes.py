"""What the datastore's operations speak in: sessions, nodes, attributes, and their limits.

A ``Session`` is one published restore point (made and ended by
``engine.datastore.sessions``): its disks, their write caches, its directory and handle
table, its counters. A ``Node`` is one name of the namespace (see ``engine.datastore``): the export root
(``ROOT``), a real file or directory in a session directory (``REAL``: its path,
inode and generation), or one of a session's virtual disk files (``VDISK``: the disk
file index, two per disk). ``Attr`` and ``SetAttr`` are filesystem-neutral attributes;
the NFS layer converts them to its wire types. Errors are ``OSError`` with the errno a
local filesystem would give (``err``) or an ``engine.errors`` datastore error.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.datastore.handletable import HandleTable
from engine.disk import BackupDisk
from engine.repo.repository import RestorePoint
from engine.writecache import WriteCache

log = logging.getLogger("instantnfs.datastore")

ROOT, REAL, VDISK = 1, 2, 3
VIRTUAL_FILEID = 1 << 63  # the root's and the disk files' fileids carry this bit
MAX_FILE_SIZE = (1 << 63) - 1  # what ftruncate takes (FSINFO's maxfilesize)
NAME_MAX = 255
# set-user/group-ID bits are dropped: clients act with the daemon's rights (root), and a
# setuid-root file in the cache directory would hand those rights to local users
MODE_MASK = 0o1777
GiB = 1 << 30
NOW = "now"


def err(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code), what)


def check_name(name: bytes) -> str:
    """A name a client gave: one path component, or EACCES / ENAMETOOLONG."""
    if not name or b"/" in name or b"\0" in name:
        raise err(errno.EACCES, "invalid name")
    if len(name) > NAME_MAX:
        raise err(errno.ENAMETOOLONG)
    return os.fsdecode(name)


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
    mtimes: list[int] = field(default_factory=list)  # per disk: last write or time set (engine.datastore.diskfile)
    jobs: int = 0  # export/commit jobs running on this session (unpublish waits for none)
    inflight: int = 0  # disk reads/writes/commits in the executor: caches close after the last
    ended: bool = False  # unpublished; the caches close when inflight drops to 0
    idle: asyncio.Event | None = None  # set when inflight drops to 0 after an aunpublish
    handles: HandleTable | None = None  # generations of the client files (REAL nodes)
    root_ino: int = 0  # of the session directory: live while published, so its handle needs no generation
    # the point's disks this session publishes, by index (``publish --disk``): disks[j],
    # caches[j] and the disk files j are the point's disk indexes[j]; None: all of them
    indexes: list[int] | None = None
    expires: float | None = None  # unix time after which the daemon ends it (sandboxes' --ttl)
    read_ops: int = 0
    read_bytes: int = 0
    write_ops: int = 0
    write_bytes: int = 0

    @property
    def cache_root(self) -> Path:
        """Where an instant session's write caches live, one directory per disk."""
        return self.cache_parent / f"{self.name}.{self.sid}"

    def cache_path(self, disk: int) -> Path:
        """The cache directory of the point's disk ``disk`` (its index in the point)."""
        return self.cache_root / f"disk{disk}"

    @property
    def point_indexes(self) -> list[int]:
        """The point's disk index of each published disk, in order."""
        return list(range(len(self.point.disks))) if self.indexes is None else list(self.indexes)

    def close_caches(self) -> None:
        for c in self.caches:
            try:
                c.close()
            except Exception as e:  # noqa: BLE001 - close the others; the error is logged
                log.error("session %s: closing the write cache %s failed: %s", self.name, c.path, e)

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


@dataclass(frozen=True, slots=True)
class Node:
    kind: int
    session: Session | None = None
    ino: int = 0  # REAL: inode number; VDISK: disk file index
    path: str = ""  # REAL: absolute path
    gen: int = 0  # REAL: generation (see engine.datastore.handles.HandleTable)


def fileid(node: Node) -> int:
    """A node's fileid: a real file's inode; the root and the disk files carry
    ``VIRTUAL_FILEID`` (a disk file's also its session id and index), so they never
    collide with an inode."""
    if node.kind == REAL:
        return node.ino
    if node.kind == ROOT:
        return VIRTUAL_FILEID
    assert node.session is not None
    return VIRTUAL_FILEID | node.session.sid << 20 | node.ino
