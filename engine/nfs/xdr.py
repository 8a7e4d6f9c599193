"""XDR (RFC 4506): the codec and the type descriptors protocol declarations are built from.

Every type is an ``XType`` with ``pack(p, value)`` and ``unpack(u) -> value``; struct
types also build their values (``READ3args(file=..., offset=..., count=...)`` is a frozen,
slotted dataclass instance), so the server decodes arguments and the in-repo client
decodes results with the same declarations, and a round trip is ``unpack(pack(v)) == v``.
The declarations themselves live in one module per protocol, in the RFCs' spelling:
``rpc_types`` (ONC RPC, RFC 5531), ``portmap_types`` (RFC 1833), ``mount_types`` and
``nfs3_types`` (RFC 1813). This module knows no protocol.

Invariants: big-endian, 4-byte alignment with zero padding; every variable-length item
has a maximum and a decoder never allocates more than the bytes it was given (a length
is checked against what is left before anything is sliced). A decode error is
``XDRError``; the RPC dispatcher turns it into GARBAGE_ARGS.

The ``Packer`` collects a list of buffers rather than one bytearray: ``append_buffers``
puts caller-owned buffers (READ data: memoryviews of cached chunks) into the output
without copying them; the transport writes the list with ``writelines``.
"""

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



def status_result(name: str, status_enum: type[IntEnum], ok: XType, fail: XType, ok_value: int = 0) -> Union:
    """The ``<PROC>3res`` union: the ok arm for status 0, the failure body otherwise."""
    return Union(name, Enum(status_enum), {ok_value: ok}, fail)
