"""The fast lane's wire codec, in Python: the readable specification of ``engine.nfs._wire``.

The fast lane (``engine.nfs.fastlane``) decodes the calls that dominate a VM's traffic
and encodes their successful replies with these functions instead of the generic XDR
declarations: no ``Unpacker``, no argument dataclasses, no ``Packer``. Each decoder
reads exactly what the generic decoder reads (RFC 5531 call header, RFC 1813 argument
structs; an opaque's padding must be present but is not checked) and returns None where
the generic decoder would raise: the call then takes the generic path, which answers it
(GARBAGE_ARGS, AUTH_ERROR, ...). Each encoder returns the bytes the generic encoder
produces for the same values (tests compare the two, byte for byte, over hypothesis'
calls). The Cython build ``engine/nfs/_wire.pyx`` has the same functions and results;
``engine.nfs.wire`` picks one (``INSTANTNFS_PURE=1``: this one).

Attributes come in wire form: ``fattr`` is a packed fattr3 (84 bytes), ``before`` a packed
wcc_attr (24 bytes), either None when absent; ``fh`` and ``name`` are bytes.
"""
from __future__ import annotations

import struct
from typing import Any

CALL = 0
REPLY = 1
RPC_VERSION = 2
MAX_AUTH = 400  # RFC 5531: an opaque_auth body is at most 400 bytes
FHSIZE = 64  # NFS3_FHSIZE

_CALL_HEAD = struct.Struct(">8I")  # xid, CALL, rpcvers, prog, vers, proc, cred flavor, cred length
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_QI = struct.Struct(">QI")  # offset3, count3
_QIi = struct.Struct(">QIi")  # offset3, count3, stable_how
_OK = struct.Struct(">7I")  # xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier (flavor, length), SUCCESS, NFS3_OK
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_TRUE = b"\0\0\0\1"
_FALSE = b"\0\0\0\0"


def call_head(rec: Any) -> tuple[int, int, int, int, int, int, int, int] | None:
    """(xid, prog, vers, proc, cred flavor, cred start, cred end, args start) of a
    well-formed RPC version 2 CALL whose credential and verifier are at most 400 bytes;
    None for anything else."""
    n = len(rec)
    if n < 40:
        return None
    xid, mtype, rpcvers, prog, vers, proc, cflavor, clen = _CALL_HEAD.unpack_from(rec)
    if mtype != CALL or rpcvers != RPC_VERSION or clen > MAX_AUTH:
        return None
    p = 32 + clen + (-clen & 3)
    if p + 8 > n:
        return None
    vlen = _U32.unpack_from(rec, p + 4)[0]
    if vlen > MAX_AUTH:
        return None
    q = p + 8 + vlen + (-vlen & 3)
    if q > n:
        return None
    return xid, prog, vers, proc, cflavor, 32, 32 + clen, q


def _opaque(rec: Any, pos: int, maxlen: int) -> tuple[int, int] | None:
    """(start, length) of the opaque at ``pos``, whose padding must fit the record."""
    n = len(rec)
    if pos + 4 > n:
        return None
    ln = _U32.unpack_from(rec, pos)[0]
    if ln > maxlen or pos + 4 + ln + (-ln & 3) > n:
        return None
    return pos + 4, ln


def fh_arg(rec: Any, pos: int) -> tuple[bytes, int] | None:
    """An nfs_fh3 (GETATTR3args): (handle, position after it)."""
    o = _opaque(rec, pos, FHSIZE)
    if o is None:
        return None
    a, ln = o
    return bytes(rec[a : a + ln]), a + ln + (-ln & 3)


def read_args(rec: Any, pos: int) -> tuple[bytes, int, int] | None:
    """READ3args and COMMIT3args: (handle, offset, count)."""
    f = fh_arg(rec, pos)
    if f is None:
        return None
    fh, p = f
    if p + 12 > len(rec):
        return None
    offset, count = _QI.unpack_from(rec, p)
    return fh, offset, count


def access_args(rec: Any, pos: int) -> tuple[bytes, int] | None:
    """ACCESS3args: (handle, access bits asked)."""
    f = fh_arg(rec, pos)
    if f is None:
        return None
    fh, p = f
    if p + 4 > len(rec):
        return None
    return fh, _U32.unpack_from(rec, p)[0]


def lookup_args(rec: Any, pos: int) -> tuple[bytes, bytes] | None:
    """LOOKUP3args: (directory handle, name)."""
    f = fh_arg(rec, pos)
    if f is None:
        return None
    fh, p = f
    o = _opaque(rec, p, 0xFFFFFFFF)
    if o is None:
        return None
    a, ln = o
    return fh, bytes(rec[a : a + ln])


def write_args(rec: Any, pos: int) -> tuple[bytes, int, int, int, int, int] | None:
    """WRITE3args: (handle, offset, count, stable_how, data start, data length); the
    data stays in the record."""
    f = fh_arg(rec, pos)
    if f is None:
        return None
    fh, p = f
    if p + 16 > len(rec):
        return None
    offset, count, stable = _QIi.unpack_from(rec, p)
    if not 0 <= stable <= 2:
        return None
    o = _opaque(rec, p + 16, 0xFFFFFFFF)
    if o is None:
        return None
    return fh, offset, count, stable, o[0], o[1]


def _post_op(fattr: bytes | None) -> bytes:
    return _TRUE + fattr if fattr is not None else _FALSE


def _wcc(before: bytes | None, fattr: bytes | None) -> bytes:
    return (_TRUE + before if before is not None else _FALSE) + _post_op(fattr)


def ok_head(xid: int) -> bytes:
    """An accepted, successful RPC reply head and the status NFS3_OK."""
    return _OK.pack(xid, REPLY, 0, 0, 0, 0, 0)


def getattr_reply(xid: int, fattr: bytes) -> bytes:
    return ok_head(xid) + fattr


def read_reply_head(xid: int, fattr: bytes | None, count: int, eof: bool) -> bytes:
    """Everything of a READ reply before its data (which ends with ``pad(count)``)."""
    return ok_head(xid) + _post_op(fattr) + _U32.pack(count) + (_TRUE if eof else _FALSE) + _U32.pack(count)


def pad(n: int) -> bytes:
    """The zero bytes that end an opaque of ``n`` bytes."""
    return _PAD[n & 3]


def access_reply(xid: int, fattr: bytes | None, access: int) -> bytes:
    return ok_head(xid) + _post_op(fattr) + _U32.pack(access)


def lookup_reply(xid: int, fh: bytes, fattr: bytes | None, dir_fattr: bytes | None) -> bytes:
    return ok_head(xid) + _U32.pack(len(fh)) + fh + _PAD[len(fh) & 3] + _post_op(fattr) + _post_op(dir_fattr)


def write_reply(xid: int, before: bytes | None, fattr: bytes | None, count: int, committed: int, verf: bytes) -> bytes:
    return ok_head(xid) + _wcc(before, fattr) + _U32.pack(count) + _I32.pack(committed) + verf


def commit_reply(xid: int, before: bytes | None, fattr: bytes | None, verf: bytes) -> bytes:
    return ok_head(xid) + _wcc(before, fattr) + verf
