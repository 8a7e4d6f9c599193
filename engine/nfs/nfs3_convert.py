"""The datastore's vocabulary in NFSv3 terms: attributes, times and errors.

``to_fattr3`` / ``nfstime`` turn the datastore's ``Attr`` (nanosecond times, a POSIX
mode) into the wire's ``fattr3`` / ``nfstime3``; ``to_setattr`` turns a client's
``sattr3`` into the datastore's ``SetAttr``; ``status_of`` is the one place that maps an
error the datastore (or the OS below it) raises to an ``nfsstat3``, and logs where it
maps: an expected error gets its status, anything else is a bug (None: the dispatcher
logs it with its traceback and answers SYSTEM_ERR). Pure functions, no state.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any

from engine.datastore import NOW, Attr, SetAttr
from engine.errors import (
    BadCookie,
    BadHandle,
    BadType,
    FileTooLarge,
    IntegrityError,
    NoSpace,
    StaleHandle,
    TooSmall,
    WriteCacheError,
)
from engine.nfs.nfs3_types import fattr3, ftype3, nfsstat3, nfstime3, specdata3, time_how

log = logging.getLogger("instantnfs.nfs3")

_ERRNO = {
    errno.EPERM: nfsstat3.NFS3ERR_PERM,
    errno.ENOENT: nfsstat3.NFS3ERR_NOENT,
    errno.EIO: nfsstat3.NFS3ERR_IO,
    errno.ENXIO: nfsstat3.NFS3ERR_NXIO,
    errno.EACCES: nfsstat3.NFS3ERR_ACCES,
    errno.EEXIST: nfsstat3.NFS3ERR_EXIST,
    errno.EXDEV: nfsstat3.NFS3ERR_XDEV,
    errno.ENODEV: nfsstat3.NFS3ERR_NODEV,
    errno.ENOTDIR: nfsstat3.NFS3ERR_NOTDIR,
    errno.EISDIR: nfsstat3.NFS3ERR_ISDIR,
    errno.EINVAL: nfsstat3.NFS3ERR_INVAL,
    errno.ELOOP: nfsstat3.NFS3ERR_INVAL,
    errno.EFBIG: nfsstat3.NFS3ERR_FBIG,
    errno.ENOSPC: nfsstat3.NFS3ERR_NOSPC,
    errno.EROFS: nfsstat3.NFS3ERR_ROFS,
    errno.EMLINK: nfsstat3.NFS3ERR_MLINK,
    errno.ENAMETOOLONG: nfsstat3.NFS3ERR_NAMETOOLONG,
    errno.ENOTEMPTY: nfsstat3.NFS3ERR_NOTEMPTY,
    errno.EDQUOT: nfsstat3.NFS3ERR_DQUOT,
    errno.ENOTSUP: nfsstat3.NFS3ERR_NOTSUPP,
}


def status_of(e: BaseException) -> nfsstat3 | None:
    """The nfsstat3 for an expected error, None for a bug (the dispatcher logs it)."""
    if isinstance(e, StaleHandle):
        return nfsstat3.NFS3ERR_STALE
    if isinstance(e, BadHandle):
        return nfsstat3.NFS3ERR_BADHANDLE
    if isinstance(e, BadCookie):
        return nfsstat3.NFS3ERR_BAD_COOKIE
    if isinstance(e, TooSmall):
        return nfsstat3.NFS3ERR_TOOSMALL
    if isinstance(e, BadType):
        return nfsstat3.NFS3ERR_BADTYPE
    if isinstance(e, NoSpace):
        log.warning("write refused, no space: %s", e)
        return nfsstat3.NFS3ERR_NOSPC
    if isinstance(e, FileTooLarge):
        return nfsstat3.NFS3ERR_FBIG
    if isinstance(e, (IntegrityError, WriteCacheError)):
        log.error("I/O error sent to the client: %s", e)
        return nfsstat3.NFS3ERR_IO
    if isinstance(e, OSError):
        st = _ERRNO.get(e.errno or 0)
        if st is None:
            log.error("unexpected OS error sent as NFS3ERR_IO: %s", e)
            return nfsstat3.NFS3ERR_IO
        log.debug("nfs error %s: %s", st.name, e)
        return st
    return None


_FTYPE = {
    stat.S_IFREG: ftype3.NF3REG,
    stat.S_IFDIR: ftype3.NF3DIR,
    stat.S_IFBLK: ftype3.NF3BLK,
    stat.S_IFCHR: ftype3.NF3CHR,
    stat.S_IFLNK: ftype3.NF3LNK,
    stat.S_IFSOCK: ftype3.NF3SOCK,
    stat.S_IFIFO: ftype3.NF3FIFO,
}


def nfstime(ns: int) -> Any:
    """A time in nanoseconds as an nfstime3 (seconds wrap at 2^32, as the wire has 32 bits)."""
    return nfstime3((ns // 1_000_000_000) & 0xFFFFFFFF, ns % 1_000_000_000)


def to_fattr3(a: Attr, fsid: int) -> Any:
    """The datastore's attributes of one file as the wire's fattr3."""
    return fattr3(
        _FTYPE.get(stat.S_IFMT(a.mode), ftype3.NF3REG), a.mode & 0o7777, a.nlink, a.uid, a.gid, a.size, a.used,
        specdata3(os.major(a.rdev), os.minor(a.rdev)), fsid, a.fileid, nfstime(a.atime_ns), nfstime(a.mtime_ns), nfstime(a.ctime_ns),
    )


def _settime(v: Any) -> int | str | None:
    if v.tag == time_how.DONT_CHANGE:
        return None
    if v.tag == time_how.SET_TO_SERVER_TIME:
        return NOW
    return v.body.seconds * 1_000_000_000 + v.body.nseconds


def to_setattr(s: Any) -> SetAttr:
    """A client's sattr3 as the datastore's SetAttr (None: leave that attribute alone)."""
    return SetAttr(s.mode, s.uid, s.gid, s.size, _settime(s.atime), _settime(s.mtime))
