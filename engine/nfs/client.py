"""A small asynchronous ONC RPC / NFSv3 client: for tests, benchmarks and diagnostics.

``RpcClient`` keeps one TCP connection with record marking and any number of calls in
flight, matched to replies by xid (replies may come in any order). ``call_raw`` sends a
complete call record of the caller's making and returns the reply record as bytes,
which is what the byte-exact reject tests need. ``NFSClient`` wraps a MOUNT and an NFS
connection and decodes every NFSv3 result with the same XDR declarations the server
uses (``nfs3_types.RES[proc]``: each procedure's arguments and ``<PROC>3res``).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import struct
from typing import Any

from engine.nfs.mount_types import MOUNT_PROGRAM, MOUNTPROC3, mountres3, mountstat3
from engine.nfs.nfs3_types import (
    NFS_PROGRAM,
    NFSPROC3,
    RES,
    SATTR3_NONE,
    CREATE3args,
    GETATTR3args,
    LOOKUP3args,
    READ3args,
    READDIR3args,
    READDIRPLUS3args,
    REMOVE3args,
    WRITE3args,
    createmode3,
    diropargs3,
    nfs_fh3,
    nfsstat3,
)
from engine.nfs.rpc_types import accept_stat, auth_flavor, authsys_parms
from engine.nfs.xdr import Packer, UnionValue, Unpacker

_U32 = struct.Struct(">I")


class RpcError(Exception):
    """The server did not accept the call (the reply's status is in ``reply``)."""

    def __init__(self, msg: str, reply: bytes) -> None:
        super().__init__(msg)
        self.reply = reply


def auth_sys(uid: int = 0, gid: int = 0, gids: tuple[int, ...] = (), machine: bytes = b"instantnfs-client") -> tuple[int, bytes]:
    return auth_flavor.AUTH_SYS, authsys_parms.encode(authsys_parms(0, machine, uid, gid, list(gids)))


AUTH_NONE = (auth_flavor.AUTH_NONE, b"")


def build_call(xid: int, prog: int, vers: int, proc: int, args: bytes = b"", cred: tuple[int, bytes] = AUTH_NONE,
               verf: tuple[int, bytes] = AUTH_NONE, rpcvers: int = 2) -> bytes:
    p = Packer()
    p.buf += struct.pack(">IIIIII", xid, 0, rpcvers, prog, vers, proc)
    p.u32(cred[0])
    p.opaque(cred[1])
    p.u32(verf[0])
    p.opaque(verf[1])
    p.raw(args)
    return p.getvalue()


def frame(record: bytes) -> bytes:
    return _U32.pack(0x80000000 | len(record)) + record


def parse_reply(rep: bytes) -> Unpacker:
    """An Unpacker at the results of an accepted SUCCESS reply; RpcError otherwise."""
    u = Unpacker(rep)
    u.u32()
    if u.u32() != 1:
        raise RpcError("not a reply", rep)
    if u.u32() != 0:
        raise RpcError("call denied", rep)
    u.u32()
    u.opaque(400)
    st = u.u32()
    if st != accept_stat.SUCCESS:
        raise RpcError(f"call not accepted: {accept_stat(st).name}", rep)
    return u


class RpcClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cred: tuple[int, bytes]) -> None:
        self.reader = reader
        self.writer = writer
        self.cred = cred
        self._xids = itertools.count(int.from_bytes(os.urandom(3), "big") << 4)
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, cred: tuple[int, bytes] | None = None) -> RpcClient:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w, cred or auth_sys())

    def next_xid(self) -> int:
        return next(self._xids) & 0xFFFFFFFF

    async def _read_loop(self) -> None:
        try:
            while True:
                parts = []
                while True:
                    hdr = _U32.unpack(await self.reader.readexactly(4))[0]
                    parts.append(await self.reader.readexactly(hdr & 0x7FFFFFFF))
                    if hdr & 0x80000000:
                        break
                rep = b"".join(parts)
                xid = _U32.unpack_from(rep)[0] if len(rep) >= 4 else -1
                fut = self._waiting.pop(xid, None)
                if fut is not None and not fut.done():
                    fut.set_result(rep)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection closed: {e}"))
            self._waiting.clear()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def call_raw(self, record: bytes, timeout: float = 10.0) -> bytes:
        """Send one complete call record (its xid is the first 4 bytes); the reply record."""
        xid = _U32.unpack_from(record)[0]
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[xid] = fut
        self.writer.write(frame(record))
        return await asyncio.wait_for(fut, timeout)

    async def call(self, prog: int, vers: int, proc: int, args: bytes = b"", cred: tuple[int, bytes] | None = None,
                   xid: int | None = None, timeout: float = 10.0) -> Unpacker:
        xid = self.next_xid() if xid is None else xid
        rep = await self.call_raw(build_call(xid, prog, vers, proc, args, cred or self.cred), timeout)
        return parse_reply(rep)

    @property
    def closed(self) -> bool:
        return self._task.done()

    async def close(self) -> None:
        self._task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class NFSError(Exception):
    def __init__(self, proc: str, res: UnionValue) -> None:
        super().__init__(f"{proc}: {nfsstat3(res.tag).name}")
        self.status = nfsstat3(res.tag)
        self.res = res


class NFSClient:
    """MOUNT + NFSv3 over two RPC connections."""

    def __init__(self, mnt: RpcClient, nfs: RpcClient) -> None:
        self.mnt = mnt
        self.rpc = nfs

    @classmethod
    async def connect(cls, host: str, mount_port: int, nfs_port: int, cred: tuple[int, bytes] | None = None) -> NFSClient:
        m = await RpcClient.connect(host, mount_port, cred)
        n = await RpcClient.connect(host, nfs_port, cred)
        return cls(m, n)

    async def close(self) -> None:
        await self.mnt.close()
        await self.rpc.close()

    async def mount(self, path: str | bytes) -> bytes:
        p = Packer()
        p.opaque(path.encode() if isinstance(path, str) else path)
        res = mountres3.unpack(await self.mnt.call(MOUNT_PROGRAM, 3, MOUNTPROC3.MNT, p.getvalue()))
        if res.tag != mountstat3.MNT3_OK:
            raise NFSError("MNT", UnionValue(int(res.tag)))
        return res.body.fhandle

    async def call(self, proc: int, args: Any, check: bool = True, **kw: Any) -> UnionValue:
        argt, rest = RES[proc]
        u = await self.rpc.call(NFS_PROGRAM, 3, proc, argt.encode(args), **kw)
        res = rest.unpack(u)
        if proc == NFSPROC3.NULL:
            return UnionValue(0)
        if check and res.tag != nfsstat3.NFS3_OK:
            raise NFSError(NFSPROC3(proc).name, res)
        return res

    # conveniences -----------------------------------------------------------------------

    async def getattr(self, fh: bytes) -> Any:
        return (await self.call(NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(fh)))).body.obj_attributes

    async def lookup(self, dirfh: bytes, name: str | bytes) -> bytes:
        n = name.encode() if isinstance(name, str) else name
        return (await self.call(NFSPROC3.LOOKUP, LOOKUP3args(diropargs3(nfs_fh3(dirfh), n)))).body.object.data

    async def walk(self, fh: bytes, path: str) -> bytes:
        for part in path.strip("/").split("/"):
            if part:
                fh = await self.lookup(fh, part)
        return fh

    async def read(self, fh: bytes, offset: int, count: int) -> tuple[bytes, bool]:
        b = (await self.call(NFSPROC3.READ, READ3args(nfs_fh3(fh), offset, count))).body
        return b.data, b.eof

    async def read_all(self, fh: bytes, chunk: int = 1 << 20) -> bytes:
        out, off = [], 0
        while True:
            data, eof = await self.read(fh, off, chunk)
            out.append(data)
            off += len(data)
            if eof or not data:
                return b"".join(out)

    async def write(self, fh: bytes, offset: int, data: bytes, stable: int = 2) -> Any:
        return (await self.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(fh), offset, len(data), stable, data))).body

    async def create(self, dirfh: bytes, name: str, mode: int = createmode3.UNCHECKED, how_body: Any = None, **kw: Any) -> UnionValue:
        body = how_body if how_body is not None else SATTR3_NONE
        args = CREATE3args(diropargs3(nfs_fh3(dirfh), name.encode()), UnionValue(mode, body))
        return await self.call(NFSPROC3.CREATE, args, **kw)

    async def remove(self, dirfh: bytes, name: str, **kw: Any) -> UnionValue:
        return await self.call(NFSPROC3.REMOVE, REMOVE3args(diropargs3(nfs_fh3(dirfh), name.encode())), **kw)

    async def readdir_all(self, dirfh: bytes, count: int = 4096, plus: bool = False) -> tuple[list[Any], int]:
        """Every entry of a directory, following cookies; (entries, number of calls)."""
        cookie, verf, out, calls = 0, b"\0" * 8, [], 0
        while True:
            calls += 1
            if plus:
                b = (await self.call(NFSPROC3.READDIRPLUS, READDIRPLUS3args(nfs_fh3(dirfh), cookie, verf, count, count))).body
            else:
                b = (await self.call(NFSPROC3.READDIR, READDIR3args(nfs_fh3(dirfh), cookie, verf, count))).body
            out += b.reply.entries
            verf = b.cookieverf
            if b.reply.eof or not b.reply.entries:
                return out, calls
            cookie = b.reply.entries[-1].cookie
