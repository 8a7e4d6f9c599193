"""XDR (RFC 4506) encoding and the wire types of ONC RPC, portmap, MOUNT v3 and NFSv3.

Types keep the RFCs' spelling (``READ3args``, ``fattr3``, ``nfsstat3``). Every type is
an ``XType`` with ``pack(p, value)`` and ``unpack(u) -> value``; struct types also build
their values (``READ3args(file=..., offset=..., count=...)`` is a frozen, slotted
dataclass instance), so the server decodes arguments and the in-repo client decodes
results with the same declarations, and a round trip is ``unpack(pack(v)) == v``.

Invariants: big-endian, 4-byte alignment with zero padding; every variable-length item
has a maximum and a decoder never allocates more than the bytes it was given (a length
is checked against what is left before anything is sliced). A decode error is
``XDRError``; the RPC dispatcher turns it into GARBAGE_ARGS.

The ``Packer`` collects a list of buffers rather than one bytearray: ``append_buffers``
puts caller-owned buffers (READ data: memoryviews of cached chunks) into the output
without copying them; the transport writes the list with ``writelines``.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Any

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class XDRError(ValueError):
    """The bytes are not valid XDR for the expected type."""


class Packer:
    """An XDR encoder producing a list of buffers (zero-copy for appended buffers)."""

    __slots__ = ("buf", "chunks", "extra")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.chunks: list[Any] = []
        self.extra = 0  # bytes in chunks

    def u32(self, v: int) -> None:
        self.buf += _U32.pack(v)

    def i32(self, v: int) -> None:
        self.buf += _I32.pack(v)

    def u64(self, v: int) -> None:
        self.buf += _U64.pack(v)

    def i64(self, v: int) -> None:
        self.buf += _I64.pack(v)

    def bool(self, v: bool) -> None:
        self.buf += b"\0\0\0\1" if v else b"\0\0\0\0"

    def fixed(self, data: bytes) -> None:
        self.buf += data
        self.buf += _PAD[len(data) & 3]

    def opaque(self, data: bytes) -> None:
        self.buf += _U32.pack(len(data))
        self.buf += data
        self.buf += _PAD[len(data) & 3]

    def raw(self, data: bytes) -> None:
        self.buf += data

    def append_buffers(self, bufs: Iterable[Any], total: int) -> None:
        """Append ``total`` bytes held in ``bufs`` as variable-length opaque, uncopied."""
        self.buf += _U32.pack(total)
        if self.buf:
            self.chunks.append(self.buf)
            self.extra += len(self.buf)
        for b in bufs:
            self.chunks.append(b)
        self.extra += total
        self.buf = bytearray(_PAD[total & 3])

    def size(self) -> int:
        return self.extra + len(self.buf)

    def buffers(self) -> list[Any]:
        if not self.chunks:
            return [self.buf]
        return [*self.chunks, self.buf] if self.buf else list(self.chunks)

    def getvalue(self) -> bytes:
        return b"".join(bytes(b) for b in self.buffers())


class Unpacker:
    """An XDR decoder over one buffer; every read is bounds-checked."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data) if not isinstance(data, memoryview) else data
        self.pos = pos
        self.end = len(self.data)

    def _take(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise XDRError(f"truncated: need {n} bytes at {p}, have {self.end - p}")
        self.pos = p + n
        return p

    def u32(self) -> int:
        return _U32.unpack_from(self.data, self._take(4))[0]

    def i32(self) -> int:
        return _I32.unpack_from(self.data, self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.data, self._take(8))[0]

    def i64(self) -> int:
        return _I64.unpack_from(self.data, self._take(8))[0]

    def bool(self) -> bool:
        v = self.u32()
        if v > 1:
            raise XDRError(f"bool is {v}")
        return v == 1

    def fixed(self, n: int) -> bytes:
        p = self._take(n + (-n & 3))
        return bytes(self.data[p : p + n])

    def opaque(self, maxlen: int) -> bytes:
        n = self.u32()
        if n > maxlen:
            raise XDRError(f"opaque length {n} > {maxlen}")
        return self.fixed(n)

    def opaque_view(self, maxlen: int) -> memoryview:
        n = self.u32()
        if n > maxlen:
            raise XDRError(f"opaque length {n} > {maxlen}")
        p = self._take(n + (-n & 3))
        return self.data[p : p + n]

    def remaining(self) -> int:
        return self.end - self.pos

    def rest(self) -> memoryview:
        return self.data[self.pos : self.end]


# -- type descriptors --------------------------------------------------------------------


class XType:
    name = "?"

    def pack(self, p: Packer, v: Any) -> None:
        raise NotImplementedError

    def unpack(self, u: Unpacker) -> Any:
        raise NotImplementedError

    def encode(self, v: Any) -> bytes:
        p = Packer()
        self.pack(p, v)
        return p.getvalue()

    def decode(self, data: bytes) -> Any:
        u = Unpacker(data)
        v = self.unpack(u)
        if u.remaining():
            raise XDRError(f"{u.remaining()} trailing bytes after {self.name}")
        return v


class _Prim(XType):
    def __init__(self, name: str, packf: Callable, unpackf: Callable) -> None:
        self.name = name
        self._p = packf
        self._u = unpackf

    def pack(self, p: Packer, v: Any) -> None:
        self._p(p, v)

    def unpack(self, u: Unpacker) -> Any:
        return self._u(u)


uint32 = _Prim("uint32", Packer.u32, Unpacker.u32)
int32 = _Prim("int32", Packer.i32, Unpacker.i32)
uint64 = _Prim("uint64", Packer.u64, Unpacker.u64)
int64 = _Prim("int64", Packer.i64, Unpacker.i64)
boolean = _Prim("bool", Packer.bool, Unpacker.bool)
void = _Prim("void", lambda p, v: None, lambda u: None)


class Enum(XType):
    def __init__(self, cls: type[IntEnum]) -> None:
        self.cls = cls
        self.name = cls.__name__
        self._values = {int(m) for m in cls}

    def pack(self, p: Packer, v: Any) -> None:
        p.u32(int(v) & 0xFFFFFFFF)

    def unpack(self, u: Unpacker) -> Any:
        raw = u.i32()
        if raw not in self._values:
            raise XDRError(f"{raw} is not a {self.name}")
        return self.cls(raw)


class Opaque(XType):
    def __init__(self, maxlen: int = 0xFFFFFFFF, name: str = "opaque") -> None:
        self.maxlen = maxlen
        self.name = name

    def pack(self, p: Packer, v: bytes) -> None:
        if len(v) > self.maxlen:
            raise XDRError(f"{self.name}: {len(v)} bytes > {self.maxlen}")
        p.opaque(v)

    def unpack(self, u: Unpacker) -> bytes:
        return u.opaque(self.maxlen)


class String(Opaque):
    """XDR string, kept as bytes (NFS names are bytes, not text)."""


class Fixed(XType):
    def __init__(self, n: int, name: str = "opaque_fixed") -> None:
        self.n = n
        self.name = name

    def pack(self, p: Packer, v: bytes) -> None:
        if len(v) != self.n:
            raise XDRError(f"{self.name}: {len(v)} bytes, want {self.n}")
        p.fixed(v)

    def unpack(self, u: Unpacker) -> bytes:
        return u.fixed(self.n)


class Optional(XType):
    """``T *`` / an optional value (bool discriminant): None when absent."""

    def __init__(self, t: XType) -> None:
        self.t = t
        self.name = f"{t.name}*"

    def pack(self, p: Packer, v: Any) -> None:
        if v is None:
            p.u32(0)
        else:
            p.u32(1)
            self.t.pack(p, v)

    def unpack(self, u: Unpacker) -> Any:
        return self.t.unpack(u) if u.bool() else None


class Array(XType):
    def __init__(self, t: XType, maxlen: int = 0xFFFFFFFF) -> None:
        self.t = t
        self.maxlen = maxlen
        self.name = f"{t.name}<>"

    def pack(self, p: Packer, v: list) -> None:
        if len(v) > self.maxlen:
            raise XDRError(f"{self.name}: {len(v)} items > {self.maxlen}")
        p.u32(len(v))
        for x in v:
            self.t.pack(p, x)

    def unpack(self, u: Unpacker) -> list:
        n = u.u32()
        if n > self.maxlen or n > u.remaining():
            raise XDRError(f"{self.name}: {n} items")
        return [self.t.unpack(u) for _ in range(n)]


class List(XType):
    """An XDR linked list (``entry *next``): a bool before each item, FALSE at the end."""

    def __init__(self, t: XType) -> None:
        self.t = t
        self.name = f"{t.name}-list"

    def pack(self, p: Packer, v: list) -> None:
        for x in v:
            p.u32(1)
            self.t.pack(p, x)
        p.u32(0)

    def unpack(self, u: Unpacker) -> list:
        out = []
        while u.bool():
            out.append(self.t.unpack(u))
        return out


class Struct(XType):
    """A struct; calling it builds a value (a frozen, slotted dataclass)."""

    def __init__(self, name: str, fields: list[tuple[str, XType]]) -> None:
        self.name = name
        self.fields = fields
        self.cls = dataclasses.make_dataclass(name, [f for f, _ in fields], frozen=True, slots=True)
        self._names = [f for f, _ in fields]

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.cls(*args, **kw)

    def pack(self, p: Packer, v: Any) -> None:
        for fname, t in self.fields:
            t.pack(p, getattr(v, fname))

    def unpack(self, u: Unpacker) -> Any:
        return self.cls(*[t.unpack(u) for _, t in self.fields])


@dataclasses.dataclass(frozen=True, slots=True)
class UnionValue:
    """A discriminated union's value: the discriminant and the arm's value."""

    tag: int
    body: Any = None


class Union(XType):
    """A discriminated union; arms map a discriminant to a type, ``default`` the rest."""

    def __init__(self, name: str, disc: XType, arms: dict[int, XType], default: XType | None = None) -> None:
        self.name = name
        self.disc = disc
        self.arms = arms
        self.default = default

    def pack(self, p: Packer, v: UnionValue) -> None:
        self.disc.pack(p, v.tag)
        arm = self.arms.get(int(v.tag), self.default)
        if arm is None:
            raise XDRError(f"{self.name}: no arm for {v.tag}")
        arm.pack(p, v.body)

    def unpack(self, u: Unpacker) -> UnionValue:
        tag = self.disc.unpack(u)
        arm = self.arms.get(int(tag), self.default)
        if arm is None:
            raise XDRError(f"{self.name}: no arm for {tag}")
        return UnionValue(tag, arm.unpack(u))


# -- ONC RPC (RFC 5531) ------------------------------------------------------------------

RPC_VERSION = 2


class msg_type(IntEnum):
    CALL = 0
    REPLY = 1


class reply_stat(IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class accept_stat(IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class reject_stat(IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class auth_stat(IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5
    AUTH_INVALIDRESP = 6
    AUTH_FAILED = 7
    AUTH_KERB_GENERIC = 8
    AUTH_TIMEEXPIRE = 9
    AUTH_TKT_FILE = 10
    AUTH_DECODE = 11
    AUTH_NET_ADDR = 12
    RPCSEC_GSS_CREDPROBLEM = 13
    RPCSEC_GSS_CTXPROBLEM = 14


class auth_flavor(IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3
    RPCSEC_GSS = 6


opaque_auth = Struct("opaque_auth", [("flavor", uint32), ("body", Opaque(400))])

authsys_parms = Struct(
    "authsys_parms",
    [
        ("stamp", uint32),
        ("machinename", String(255)),
        ("uid", uint32),
        ("gid", uint32),
        ("gids", Array(uint32, 16)),
    ],
)

# -- portmapper / rpcbind (RFC 1833) -----------------------------------------------------

PMAP_PROG = 100000
IPPROTO_TCP = 6
IPPROTO_UDP = 17


class PMAPPROC(IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETPORT = 3
    DUMP = 4
    CALLIT = 5


class RPCBPROC(IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETADDR = 3
    DUMP = 4
    CALLIT = 5
    GETTIME = 6
    UADDR2TADDR = 7
    TADDR2UADDR = 8


mapping = Struct("mapping", [("prog", uint32), ("vers", uint32), ("prot", uint32), ("port", uint32)])
pmaplist = List(mapping)
rpcb = Struct(
    "rpcb",
    [("r_prog", uint32), ("r_vers", uint32), ("r_netid", String(255)), ("r_addr", String(255)), ("r_owner", String(255))],
)
rp__list = List(rpcb)

# -- NFSv3 and MOUNT v3 (RFC 1813) -------------------------------------------------------

NFS_PROGRAM = 100003
NFS_V3 = 3
MOUNT_PROGRAM = 100005
MOUNT_V3 = 3

NFS3_FHSIZE = 64
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8
MNTPATHLEN = 1024
MNTNAMLEN = 255
FHSIZE3 = 64
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


class mountstat3(IntEnum):
    MNT3_OK = 0
    MNT3ERR_PERM = 1
    MNT3ERR_NOENT = 2
    MNT3ERR_IO = 5
    MNT3ERR_ACCES = 13
    MNT3ERR_NOTDIR = 20
    MNT3ERR_INVAL = 22
    MNT3ERR_NAMETOOLONG = 63
    MNT3ERR_NOTSUPP = 10004
    MNT3ERR_SERVERFAULT = 10006


class MOUNTPROC3(IntEnum):
    NULL = 0
    MNT = 1
    DUMP = 2
    UMNT = 3
    UMNTALL = 4
    EXPORT = 5


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

# MOUNT v3
# dirpath<MNTPATHLEN>: a longer path still decodes, so MNT can answer MNT3ERR_NAMETOOLONG
dirpath = String(0xFFFFFFFF, "dirpath")
name = String(MNTNAMLEN, "name")
fhandle3 = Opaque(FHSIZE3, "fhandle3")
mountres3_ok = Struct("mountres3_ok", [("fhandle", fhandle3), ("auth_flavors", Array(uint32, 64))])
mountres3 = Union("mountres3", Enum(mountstat3), {mountstat3.MNT3_OK: mountres3_ok}, void)
mountbody = Struct("mountbody", [("ml_hostname", name), ("ml_directory", dirpath)])
mountlist = List(mountbody)
groupnode = Struct("groupnode", [("gr_name", name)])
exportnode = Struct("exportnode", [("ex_dir", dirpath), ("ex_groups", List(groupnode))])
exports = List(exportnode)


def status_result(name: str, status_enum: type[IntEnum], ok: XType, fail: XType, ok_value: int = 0) -> Union:
    """The ``<PROC>3res`` union: the ok arm for status 0, the failure body otherwise."""
    return Union(name, Enum(status_enum), {ok_value: ok}, fail)
