"""What the datastore's operations speak in: nodes, attributes, and their limits.

A ``Node`` is one name of the namespace (see ``engine.datastore``): the export root
(``ROOT``), a real file or directory in a session directory (``REAL``: its path,
inode and generation), or one of a session's virtual disk files (``VDISK``: the disk
file index, two per disk). ``Attr`` and ``SetAttr`` are filesystem-neutral attributes;
the NFS layer converts them to its wire types. Errors are ``OSError`` with the errno a
local filesystem would give (``err``) or an ``engine.errors`` datastore error.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.datastore.sessions import Session

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
