"""The fast lane: the NFSv3 calls a running VM makes most, answered without the generic path.

A booting or running guest reads and writes its disk in small pieces, and the hypervisor
polls attributes: READ, WRITE, GETATTR, ACCESS, LOOKUP and COMMIT are nearly all of the
traffic. The generic dispatcher (``RpcServer.handle_start`` over ``NFS3.procs``) builds
a call context, argument dataclasses, a coroutine chain and a ``Packer`` for each; here
the call header and arguments are decoded and the reply encoded by ``engine.nfs.wire``
(C, or its pure-Python twin), a READ of cached or zero data and a GETATTR answer at
once (no coroutine), and only a call that must wait (a READ that loads chunks, a WRITE
that goes to the pool, a COMMIT) gets one coroutine of its own.

What it keeps of the generic path, exactly: the same checks in the same order (a
credential the dispatcher has already parsed and accepted, a client in the allowed list,
no write on a read-only export, the handle's MAC and generation through
``Datastore.resolve``), the same counters (calls, per procedure, I/O calls), the same
bytes in every reply (tests compare the two lanes call for call), the same latency
buckets (``RpcServer.timed``, set where the call is counted), and the same error
replies: an error after the call has had an effect (a failing write, a READ whose chunk
is corrupt) is answered by the dispatcher's own ``finish_error``.

What it does not do is decide anything new: any call it cannot answer with certainty
(an unknown credential, a client outside the list, a malformed argument, a stale or
forged handle, a client file, a LOOKUP of a missing name, ...) is handed back
(``NOT_MINE``) before it has had any effect, and the generic path answers it.

Record buffers: the transport hands over a view of its receive buffer, valid only
during the call; the fast lane copies what it keeps past that (handles, and the data of
a WRITE that waits).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from engine.datastore import VDISK, Attr, Node
from engine.nfs.nfs3 import MAX_IO, MAX_OFFSET, NFS3, attr_memo, wcc_attr_of
from engine.nfs.nfs3_convert import to_fattr3
from engine.nfs.nfs3_types import (
    NFS_PROGRAM,
    NFS_V3,
    NFSPROC3,
    COMMIT3args,
    READ3args,
    fattr3,
    nfs_fh3,
    stable_how,
    wcc_attr,
)
from engine.nfs.rpc import NOT_MINE, CallContext, Cred, Program, RpcServer
from engine.nfs.wire import (
    access_args,
    access_reply,
    call_head,
    commit_reply,
    fh_arg,
    getattr_reply,
    lookup_args,
    lookup_reply,
    pad,
    read_args,
    read_reply_head,
    write_args,
    write_reply,
)
from engine.nfs.xdr import Packer

ALLOWED_MEMO = 4096  # client addresses whose allowed-list answer is kept

_GETATTR = int(NFSPROC3.GETATTR)
_LOOKUP = int(NFSPROC3.LOOKUP)
_ACCESS = int(NFSPROC3.ACCESS)
_READ = int(NFSPROC3.READ)
_WRITE = int(NFSPROC3.WRITE)
_COMMIT = int(NFSPROC3.COMMIT)


def _fattr_bytes(a: Attr, fsid: int) -> bytes:
    p = Packer()
    fattr3.pack(p, to_fattr3(a, fsid))
    return bytes(p.buf)


def _wcc_bytes(a: Attr) -> bytes:
    p = Packer()
    wcc_attr.pack(p, wcc_attr_of(a))
    return bytes(p.buf)


class FastLane:
    """The fast procedures of one NFS program; ``lane(record, client, local)`` returns a
    reply (a list of buffers), a coroutine that returns one, or ``NOT_MINE``."""

    def __init__(self, nfs: NFS3, server: RpcServer, program: Program) -> None:
        self.nfs = nfs
        self.ds = nfs.ds
        self.disks = nfs.ds.disks
        self.server = server
        self.program = program
        self.procs = program.versions[NFS_V3]
        self.read_only = program.refuse_write is not None
        self._creds = server.creds  # the credentials the dispatcher parsed and accepted
        self._fattr: dict[int, tuple[Attr, bytes]] = {}
        self._wcc: dict[int, tuple[Attr, bytes]] = {}
        self._allowed: dict[str, bool] = {}
        self._table: dict[int, Callable[..., Any]] = {
            _GETATTR: self._getattr, _LOOKUP: self._lookup, _ACCESS: self._access,
            _READ: self._read, _WRITE: self._write, _COMMIT: self._commit,
        }
        self._lat = {p: server.latency[(NFS_PROGRAM, NFS_V3, p)] for p in self._table}

    def __call__(self, rec: Any, client: tuple[str, int], local: str = "") -> Any:
        h = call_head(rec)
        if h is None:
            return NOT_MINE
        xid, prog, vers, procnum, cflavor, c0, c1, pos = h
        if prog != NFS_PROGRAM or vers != NFS_V3:
            return NOT_MINE
        fn = self._table.get(procnum)
        if fn is None:
            return NOT_MINE
        cred = self._creds.get((cflavor, bytes(rec[c0:c1])))
        if cred is None:
            return NOT_MINE
        allowed = self._allowed.get(client[0])
        if allowed is None:  # the list is fixed for the dispatcher's life: remembered per address
            if len(self._allowed) > ALLOWED_MEMO:
                self._allowed.clear()
            allowed = self._allowed[client[0]] = client[0] in self.server.allow
        if not allowed:
            return NOT_MINE
        return fn(rec, pos, xid, client, cred)

    # -- shared pieces -------------------------------------------------------------------

    def _count(self, name: str, procnum: int, io: bool = False) -> None:
        self.server.calls += 1
        self.server.timed = self._lat[procnum]
        stats = self.program.stats
        stats[name] = stats.get(name, 0) + 1
        if io:
            self.server.io_calls += 1

    def _attr(self, a: Attr) -> bytes:
        return attr_memo(self._fattr, a, _fattr_bytes, self.ds.fsid)

    def _post_op(self, node: Node) -> bytes | None:
        try:
            return self._attr(self.ds.getattr(node))
        except OSError:
            return None

    def _pre_op(self, node: Node) -> bytes | None:
        try:
            a = self.ds.getattr(node)
        except OSError:
            return None
        return attr_memo(self._wcc, a, _wcc_bytes)

    def _error(self, procnum: int, args: Any, xid: int, client: tuple[str, int], cred: Cred, e: BaseException) -> list[Any]:
        """The generic path's reply to an error raised after the call had an effect."""
        ctx = CallContext(xid, NFS_PROGRAM, NFS_V3, procnum, cred, client[0], client[1], True)
        return self.server.finish_error(self.program, self.procs[procnum], args, ctx, e)

    # -- the procedures ------------------------------------------------------------------

    def _getattr(self, rec: Any, pos: int, xid: int, client: tuple[str, int], cred: Cred) -> Any:
        a = fh_arg(rec, pos)
        if a is None:
            return NOT_MINE
        try:
            attr = self.ds.getattr(self.ds.resolve(a[0]))
        except Exception:  # noqa: BLE001 - the generic path answers it
            return NOT_MINE
        self._count("GETATTR", _GETATTR)
        return [getattr_reply(xid, self._attr(attr))]

    def _access(self, rec: Any, pos: int, xid: int, client: tuple[str, int], cred: Cred) -> Any:
        a = access_args(rec, pos)
        if a is None:
            return NOT_MINE
        try:
            node = self.ds.resolve(a[0])
            granted = self.nfs.granted(node)
        except Exception:  # noqa: BLE001
            return NOT_MINE
        self._count("ACCESS", _ACCESS)
        return [access_reply(xid, self._post_op(node), a[1] & granted)]

    def _lookup(self, rec: Any, pos: int, xid: int, client: tuple[str, int], cred: Cred) -> Any:
        a = lookup_args(rec, pos)
        if a is None:
            return NOT_MINE
        try:
            d = self.ds.resolve(a[0])
            node = self.ds.lookup(d, a[1])
            fh = self.ds.handle(node)
        except Exception:  # noqa: BLE001 - a missing name too: the generic path answers it
            return NOT_MINE
        self._count("LOOKUP", _LOOKUP)
        return [lookup_reply(xid, fh, self._post_op(node), self._post_op(d))]

    def _read(self, rec: Any, pos: int, xid: int, client: tuple[str, int], cred: Cred) -> Any:
        a = read_args(rec, pos)
        if a is None:
            return NOT_MINE
        fh, offset, count = a
        try:
            node = self.ds.resolve(fh)
        except Exception:  # noqa: BLE001
            return NOT_MINE
        if node.kind != VDISK or offset > MAX_OFFSET:
            return NOT_MINE
        count = min(count, MAX_IO)
        self._count("READ", _READ, io=True)
        try:
            r = self.disks.read_now(node, offset, count)
        except Exception as e:  # noqa: BLE001
            return self._error(_READ, READ3args(nfs_fh3(fh), offset, count), xid, client, cred, e)
        if r is None:
            return self._read_wait(node, fh, offset, count, xid, client, cred)
        return self._read_reply(xid, node, *r)

    def _read_reply(self, xid: int, node: Node, bufs: list[Any], n: int, eof: bool) -> list[Any]:
        out = [read_reply_head(xid, self._post_op(node), n, eof), *bufs]
        if n & 3:
            out.append(pad(n))
        return out

    async def _read_wait(self, node: Node, fh: bytes, offset: int, count: int, xid: int,
                         client: tuple[str, int], cred: Cred) -> list[Any]:
        try:
            bufs, n, eof = await self.disks.read(node, offset, count)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 - mapped as the generic path maps it
            return self._error(_READ, READ3args(nfs_fh3(fh), offset, count), xid, client, cred, e)
        return self._read_reply(xid, node, bufs, n, eof)

    def _write(self, rec: Any, pos: int, xid: int, client: tuple[str, int], cred: Cred) -> Any:
        a = write_args(rec, pos)
        if a is None or self.read_only:
            return NOT_MINE
        fh, offset, count, stable, d0, dlen = a
        if count > dlen or offset + min(count, MAX_IO) > MAX_OFFSET:
            return NOT_MINE  # INVAL / FBIG: the generic path answers them
        try:
            node = self.ds.resolve(fh)
        except Exception:  # noqa: BLE001
            return NOT_MINE
        if node.kind != VDISK:
            return NOT_MINE
        count = min(count, MAX_IO)  # over wtmax: write what fits, the client sends the rest
        data = memoryview(rec)[d0 : d0 + count]
        before = self._pre_op(node)
        self._count("WRITE", _WRITE, io=True)
        try:
            r = self.disks.write_now(node, offset, data, stable)
        except Exception as e:  # noqa: BLE001
            return self._error(_WRITE, (nfs_fh3(fh), offset, count, stable_how(stable), data), xid, client, cred, e)
        if r is None:  # it waits: keep a copy, the record's buffer is the transport's
            return self._write_wait(node, fh, offset, bytes(data), stable, before, xid, client, cred)
        return [write_reply(xid, before, self._post_op(node), r[0], r[1], self.ds.write_verf)]

    async def _write_wait(self, node: Node, fh: bytes, offset: int, data: bytes, stable: int, before: bytes | None,
                          xid: int, client: tuple[str, int], cred: Cred) -> list[Any]:
        try:
            n, committed = await self.disks.write(node, offset, data, stable)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001
            args = (nfs_fh3(fh), offset, len(data), stable_how(stable), memoryview(data))
            return self._error(_WRITE, args, xid, client, cred, e)
        return [write_reply(xid, before, self._post_op(node), n, committed, self.ds.write_verf)]

    def _commit(self, rec: Any, pos: int, xid: int, client: tuple[str, int], cred: Cred) -> Any:
        a = read_args(rec, pos)  # COMMIT3args: the same layout as READ3args
        if a is None or self.read_only:
            return NOT_MINE
        try:
            node = self.ds.resolve(a[0])
        except Exception:  # noqa: BLE001
            return NOT_MINE
        before = self._pre_op(node)
        self._count("COMMIT", _COMMIT)
        return self._commit_wait(node, a, before, xid, client, cred)

    async def _commit_wait(self, node: Node, a: tuple[bytes, int, int], before: bytes | None,
                           xid: int, client: tuple[str, int], cred: Cred) -> list[Any]:
        try:
            await self.ds.commit(node)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001
            return self._error(_COMMIT, COMMIT3args(nfs_fh3(a[0]), a[1], a[2]), xid, client, cred, e)
        return [commit_reply(xid, before, self._post_op(node), self.ds.write_verf)]
