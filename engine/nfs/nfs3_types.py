"""NFSv3 wire types (RFC 1813): constants, enums, structs and each procedure's results.

Declarations only, in the RFC's spelling (``READ3args``, ``fattr3``, ``nfsstat3``): the
server (``engine.nfs.nfs3``) decodes arguments and encodes results with them and the
in-repo client (``engine.nfs.client``) does the reverse, so both read one declaration.
``fattr3`` is packed with one struct call (it is on every reply's hot path).
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

from engine.nfs.xdr import (
    Enum,
    Fixed,
    List,
    Opaque,
    Optional,
    Packer,
    String,
    Struct,
    Union,
    UnionValue,
    Unpacker,
    XDRError,
    XType,
    boolean,
    status_result,
    uint32,
    uint64,
    void,
)

NFS_PROGRAM = 100003
NFS_V3 = 3

NFS3_FHSIZE = 64
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8
NAME_MAX = 255
PATH_MAX = 1024


class nfsstat3(IntEnum):
    NFS3_OK = 0
    NFS3ERR_PERM = 1
    NFS3ERR_NOENT = 2
    NFS3ERR_IO = 5
    NFS3ERR_NXIO = 6
    NFS3ERR_ACCES = 13
    NFS3ERR_EXIST = 17
    NFS3ERR_XDEV = 18
    NFS3ERR_NODEV = 19
    NFS3ERR_NOTDIR = 20
    NFS3ERR_ISDIR = 21
    NFS3ERR_INVAL = 22
    NFS3ERR_FBIG = 27
    NFS3ERR_NOSPC = 28
    NFS3ERR_ROFS = 30
    NFS3ERR_MLINK = 31
    NFS3ERR_NAMETOOLONG = 63
    NFS3ERR_NOTEMPTY = 66
    NFS3ERR_DQUOT = 69
    NFS3ERR_STALE = 70
    NFS3ERR_REMOTE = 71
    NFS3ERR_BADHANDLE = 10001
    NFS3ERR_NOT_SYNC = 10002
    NFS3ERR_BAD_COOKIE = 10003
    NFS3ERR_NOTSUPP = 10004
    NFS3ERR_TOOSMALL = 10005
    NFS3ERR_SERVERFAULT = 10006
    NFS3ERR_BADTYPE = 10007
    NFS3ERR_JUKEBOX = 10008


class ftype3(IntEnum):
    NF3REG = 1
    NF3DIR = 2
    NF3BLK = 3
    NF3CHR = 4
    NF3LNK = 5
    NF3SOCK = 6
    NF3FIFO = 7


class stable_how(IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


class createmode3(IntEnum):
    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class time_how(IntEnum):
    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


class NFSPROC3(IntEnum):
    NULL = 0
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    MKDIR = 9
    SYMLINK = 10
    MKNOD = 11
    REMOVE = 12
    RMDIR = 13
    RENAME = 14
    LINK = 15
    READDIR = 16
    READDIRPLUS = 17
    FSSTAT = 18
    FSINFO = 19
    PATHCONF = 20
    COMMIT = 21


ACCESS3_READ = 0x0001
ACCESS3_LOOKUP = 0x0002
ACCESS3_MODIFY = 0x0004
ACCESS3_EXTEND = 0x0008
ACCESS3_DELETE = 0x0010
ACCESS3_EXECUTE = 0x0020

FSF3_LINK = 0x0001
FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010

# filename3 and nfspath3 have no bound in RFC 1813: a name of any length (within the RPC
# record cap) decodes, and the datastore answers NAMETOOLONG, never GARBAGE_ARGS.
filename3 = String(0xFFFFFFFF, "filename3")
nfspath3 = String(0xFFFFFFFF, "nfspath3")
cookieverf3 = Fixed(NFS3_COOKIEVERFSIZE, "cookieverf3")
createverf3 = Fixed(NFS3_CREATEVERFSIZE, "createverf3")
writeverf3 = Fixed(NFS3_WRITEVERFSIZE, "writeverf3")
nfs_fh3 = Struct("nfs_fh3", [("data", Opaque(NFS3_FHSIZE, "nfs_fh3"))])
nfstime3 = Struct("nfstime3", [("seconds", uint32), ("nseconds", uint32)])
specdata3 = Struct("specdata3", [("specdata1", uint32), ("specdata2", uint32)])

_FATTR3 = struct.Struct(">IIIIIQQIIQQIIIIII")


class _Fattr3Type(Struct):
    """fattr3, packed with one struct call (it is on every reply's hot path)."""

    def pack(self, p: Packer, v: Any) -> None:
        p.buf += _FATTR3.pack(
            v.type, v.mode, v.nlink, v.uid, v.gid, v.size, v.used, v.rdev.specdata1, v.rdev.specdata2,
            v.fsid, v.fileid, v.atime.seconds, v.atime.nseconds, v.mtime.seconds, v.mtime.nseconds,
            v.ctime.seconds, v.ctime.nseconds,
        )

    def unpack(self, u: Unpacker) -> Any:
        f = _FATTR3.unpack_from(u.data, u._take(_FATTR3.size))
        if f[0] not in _FTYPES:
            raise XDRError(f"{f[0]} is not a ftype3")
        return self.cls(
            ftype3(f[0]), f[1], f[2], f[3], f[4], f[5], f[6], specdata3(f[7], f[8]), f[9], f[10],
            nfstime3(f[11], f[12]), nfstime3(f[13], f[14]), nfstime3(f[15], f[16]),
        )


_FTYPES = {int(t) for t in ftype3}

fattr3 = _Fattr3Type(
    "fattr3",
    [
        ("type", Enum(ftype3)),
        ("mode", uint32),
        ("nlink", uint32),
        ("uid", uint32),
        ("gid", uint32),
        ("size", uint64),
        ("used", uint64),
        ("rdev", specdata3),
        ("fsid", uint64),
        ("fileid", uint64),
        ("atime", nfstime3),
        ("mtime", nfstime3),
        ("ctime", nfstime3),
    ],
)
post_op_attr = Optional(fattr3)
wcc_attr = Struct("wcc_attr", [("size", uint64), ("mtime", nfstime3), ("ctime", nfstime3)])
pre_op_attr = Optional(wcc_attr)
wcc_data = Struct("wcc_data", [("before", pre_op_attr), ("after", post_op_attr)])
post_op_fh3 = Optional(nfs_fh3)

set_mode3 = Optional(uint32)
set_uid3 = Optional(uint32)
set_gid3 = Optional(uint32)
set_size3 = Optional(uint64)
_TIME_HOW = Enum(time_how)
set_atime = Union("set_atime", _TIME_HOW, {time_how.SET_TO_CLIENT_TIME: nfstime3}, void)
set_mtime = Union("set_mtime", _TIME_HOW, {time_how.SET_TO_CLIENT_TIME: nfstime3}, void)
sattr3 = Struct(
    "sattr3",
    [("mode", set_mode3), ("uid", set_uid3), ("gid", set_gid3), ("size", set_size3), ("atime", set_atime), ("mtime", set_mtime)],
)
DONT_CHANGE_TIME = UnionValue(time_how.DONT_CHANGE)
SATTR3_NONE = sattr3(None, None, None, None, DONT_CHANGE_TIME, DONT_CHANGE_TIME)

diropargs3 = Struct("diropargs3", [("dir", nfs_fh3), ("name", filename3)])
sattrguard3 = Optional(nfstime3)

GETATTR3args = Struct("GETATTR3args", [("object", nfs_fh3)])
GETATTR3resok = Struct("GETATTR3resok", [("obj_attributes", fattr3)])
SETATTR3args = Struct("SETATTR3args", [("object", nfs_fh3), ("new_attributes", sattr3), ("guard", sattrguard3)])
SETATTR3resok = Struct("SETATTR3resok", [("obj_wcc", wcc_data)])
LOOKUP3args = Struct("LOOKUP3args", [("what", diropargs3)])
LOOKUP3resok = Struct("LOOKUP3resok", [("object", nfs_fh3), ("obj_attributes", post_op_attr), ("dir_attributes", post_op_attr)])
ACCESS3args = Struct("ACCESS3args", [("object", nfs_fh3), ("access", uint32)])
ACCESS3resok = Struct("ACCESS3resok", [("obj_attributes", post_op_attr), ("access", uint32)])
READLINK3args = Struct("READLINK3args", [("symlink", nfs_fh3)])
READLINK3resok = Struct("READLINK3resok", [("symlink_attributes", post_op_attr), ("data", nfspath3)])
READ3args = Struct("READ3args", [("file", nfs_fh3), ("offset", uint64), ("count", uint32)])
READ3resok = Struct("READ3resok", [("file_attributes", post_op_attr), ("count", uint32), ("eof", boolean), ("data", Opaque())])
WRITE3args = Struct(
    "WRITE3args",
    [("file", nfs_fh3), ("offset", uint64), ("count", uint32), ("stable", Enum(stable_how)), ("data", Opaque())],
)
WRITE3resok = Struct(
    "WRITE3resok", [("file_wcc", wcc_data), ("count", uint32), ("committed", Enum(stable_how)), ("verf", writeverf3)]
)
createhow3 = Union(
    "createhow3",
    Enum(createmode3),
    {createmode3.UNCHECKED: sattr3, createmode3.GUARDED: sattr3, createmode3.EXCLUSIVE: createverf3},
)
CREATE3args = Struct("CREATE3args", [("where", diropargs3), ("how", createhow3)])
CREATE3resok = Struct("CREATE3resok", [("obj", post_op_fh3), ("obj_attributes", post_op_attr), ("dir_wcc", wcc_data)])
MKDIR3args = Struct("MKDIR3args", [("where", diropargs3), ("attributes", sattr3)])
MKDIR3resok = CREATE3resok
symlinkdata3 = Struct("symlinkdata3", [("symlink_attributes", sattr3), ("symlink_data", nfspath3)])
SYMLINK3args = Struct("SYMLINK3args", [("where", diropargs3), ("symlink", symlinkdata3)])
SYMLINK3resok = CREATE3resok
devicedata3 = Struct("devicedata3", [("dev_attributes", sattr3), ("spec", specdata3)])
mknoddata3 = Union(
    "mknoddata3",
    Enum(ftype3),
    {
        ftype3.NF3CHR: devicedata3,
        ftype3.NF3BLK: devicedata3,
        ftype3.NF3SOCK: sattr3,
        ftype3.NF3FIFO: sattr3,
    },
    void,
)
MKNOD3args = Struct("MKNOD3args", [("where", diropargs3), ("what", mknoddata3)])
MKNOD3resok = CREATE3resok
REMOVE3args = Struct("REMOVE3args", [("object", diropargs3)])
REMOVE3resok = Struct("REMOVE3resok", [("dir_wcc", wcc_data)])
RMDIR3args = REMOVE3args
RMDIR3resok = REMOVE3resok
RENAME3args = Struct("RENAME3args", [("from_", diropargs3), ("to", diropargs3)])
RENAME3resok = Struct("RENAME3resok", [("fromdir_wcc", wcc_data), ("todir_wcc", wcc_data)])
LINK3args = Struct("LINK3args", [("file", nfs_fh3), ("link", diropargs3)])
LINK3resok = Struct("LINK3resok", [("file_attributes", post_op_attr), ("linkdir_wcc", wcc_data)])
READDIR3args = Struct("READDIR3args", [("dir", nfs_fh3), ("cookie", uint64), ("cookieverf", cookieverf3), ("count", uint32)])
entry3 = Struct("entry3", [("fileid", uint64), ("name", filename3), ("cookie", uint64)])
dirlist3 = Struct("dirlist3", [("entries", List(entry3)), ("eof", boolean)])
READDIR3resok = Struct("READDIR3resok", [("dir_attributes", post_op_attr), ("cookieverf", cookieverf3), ("reply", dirlist3)])
READDIRPLUS3args = Struct(
    "READDIRPLUS3args",
    [("dir", nfs_fh3), ("cookie", uint64), ("cookieverf", cookieverf3), ("dircount", uint32), ("maxcount", uint32)],
)
entryplus3 = Struct(
    "entryplus3",
    [("fileid", uint64), ("name", filename3), ("cookie", uint64), ("name_attributes", post_op_attr), ("name_handle", post_op_fh3)],
)
dirlistplus3 = Struct("dirlistplus3", [("entries", List(entryplus3)), ("eof", boolean)])
READDIRPLUS3resok = Struct(
    "READDIRPLUS3resok", [("dir_attributes", post_op_attr), ("cookieverf", cookieverf3), ("reply", dirlistplus3)]
)
FSSTAT3args = Struct("FSSTAT3args", [("fsroot", nfs_fh3)])
FSSTAT3resok = Struct(
    "FSSTAT3resok",
    [
        ("obj_attributes", post_op_attr),
        ("tbytes", uint64),
        ("fbytes", uint64),
        ("abytes", uint64),
        ("tfiles", uint64),
        ("ffiles", uint64),
        ("afiles", uint64),
        ("invarsec", uint32),
    ],
)
FSINFO3args = Struct("FSINFO3args", [("fsroot", nfs_fh3)])
FSINFO3resok = Struct(
    "FSINFO3resok",
    [
        ("obj_attributes", post_op_attr),
        ("rtmax", uint32),
        ("rtpref", uint32),
        ("rtmult", uint32),
        ("wtmax", uint32),
        ("wtpref", uint32),
        ("wtmult", uint32),
        ("dtpref", uint32),
        ("maxfilesize", uint64),
        ("time_delta", nfstime3),
        ("properties", uint32),
    ],
)
PATHCONF3args = Struct("PATHCONF3args", [("object", nfs_fh3)])
PATHCONF3resok = Struct(
    "PATHCONF3resok",
    [
        ("obj_attributes", post_op_attr),
        ("linkmax", uint32),
        ("name_max", uint32),
        ("no_trunc", boolean),
        ("chown_restricted", boolean),
        ("case_insensitive", boolean),
        ("case_preserving", boolean),
    ],
)
COMMIT3args = Struct("COMMIT3args", [("file", nfs_fh3), ("offset", uint64), ("count", uint32)])
COMMIT3resok = Struct("COMMIT3resok", [("file_wcc", wcc_data), ("verf", writeverf3)])

# -- results: <PROC>3res is the resok arm for NFS3_OK, the procedure's failure body otherwise --

RENAME3resfail = Struct("RENAME3resfail", [("fromdir_wcc", wcc_data), ("todir_wcc", wcc_data)])
LINK3resfail = Struct("LINK3resfail", [("file_attributes", post_op_attr), ("linkdir_wcc", wcc_data)])

GETATTR3res = status_result("GETATTR3res", nfsstat3, GETATTR3resok, void)
SETATTR3res = status_result("SETATTR3res", nfsstat3, SETATTR3resok, wcc_data)
LOOKUP3res = status_result("LOOKUP3res", nfsstat3, LOOKUP3resok, post_op_attr)
ACCESS3res = status_result("ACCESS3res", nfsstat3, ACCESS3resok, post_op_attr)
READLINK3res = status_result("READLINK3res", nfsstat3, READLINK3resok, post_op_attr)
READ3res = status_result("READ3res", nfsstat3, READ3resok, post_op_attr)
WRITE3res = status_result("WRITE3res", nfsstat3, WRITE3resok, wcc_data)
CREATE3res = status_result("CREATE3res", nfsstat3, CREATE3resok, wcc_data)
MKDIR3res = status_result("MKDIR3res", nfsstat3, CREATE3resok, wcc_data)
SYMLINK3res = status_result("SYMLINK3res", nfsstat3, CREATE3resok, wcc_data)
MKNOD3res = status_result("MKNOD3res", nfsstat3, CREATE3resok, wcc_data)
REMOVE3res = status_result("REMOVE3res", nfsstat3, REMOVE3resok, wcc_data)
RMDIR3res = status_result("RMDIR3res", nfsstat3, REMOVE3resok, wcc_data)
RENAME3res = status_result("RENAME3res", nfsstat3, RENAME3resok, RENAME3resfail)
LINK3res = status_result("LINK3res", nfsstat3, LINK3resok, LINK3resfail)
READDIR3res = status_result("READDIR3res", nfsstat3, READDIR3resok, post_op_attr)
READDIRPLUS3res = status_result("READDIRPLUS3res", nfsstat3, READDIRPLUS3resok, post_op_attr)
FSSTAT3res = status_result("FSSTAT3res", nfsstat3, FSSTAT3resok, post_op_attr)
FSINFO3res = status_result("FSINFO3res", nfsstat3, FSINFO3resok, post_op_attr)
PATHCONF3res = status_result("PATHCONF3res", nfsstat3, PATHCONF3resok, post_op_attr)
COMMIT3res = status_result("COMMIT3res", nfsstat3, COMMIT3resok, wcc_data)

#: per procedure: (argument type, result type), as a client encodes and decodes them
RES: dict[int, tuple[XType, XType]] = {
    NFSPROC3.NULL: (void, void),
    NFSPROC3.GETATTR: (GETATTR3args, GETATTR3res),
    NFSPROC3.SETATTR: (SETATTR3args, SETATTR3res),
    NFSPROC3.LOOKUP: (LOOKUP3args, LOOKUP3res),
    NFSPROC3.ACCESS: (ACCESS3args, ACCESS3res),
    NFSPROC3.READLINK: (READLINK3args, READLINK3res),
    NFSPROC3.READ: (READ3args, READ3res),
    NFSPROC3.WRITE: (WRITE3args, WRITE3res),
    NFSPROC3.CREATE: (CREATE3args, CREATE3res),
    NFSPROC3.MKDIR: (MKDIR3args, MKDIR3res),
    NFSPROC3.SYMLINK: (SYMLINK3args, SYMLINK3res),
    NFSPROC3.MKNOD: (MKNOD3args, MKNOD3res),
    NFSPROC3.REMOVE: (REMOVE3args, REMOVE3res),
    NFSPROC3.RMDIR: (RMDIR3args, RMDIR3res),
    NFSPROC3.RENAME: (RENAME3args, RENAME3res),
    NFSPROC3.LINK: (LINK3args, LINK3res),
    NFSPROC3.READDIR: (READDIR3args, READDIR3res),
    NFSPROC3.READDIRPLUS: (READDIRPLUS3args, READDIRPLUS3res),
    NFSPROC3.FSSTAT: (FSSTAT3args, FSSTAT3res),
    NFSPROC3.FSINFO: (FSINFO3args, FSINFO3res),
    NFSPROC3.PATHCONF: (PATHCONF3args, PATHCONF3res),
    NFSPROC3.COMMIT: (COMMIT3args, COMMIT3res),
}
