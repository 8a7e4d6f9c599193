"""Raw ONC RPC helpers shared by the protocol and hostile-client tests.

Calls are built with ``engine.nfs.client.build_call`` and replies are read as bytes, so a
test can assert the exact words a server sends (golden replies) or pick out one field
(``accept_stat_of``, ``status_of_reply``) without trusting the client's decoder. The
NFS helpers (``dirop``, ``workdir``) build the arguments most tests need. ``dispatch``
drives an ``RpcServer`` in-process, without a socket; ``NoHandles`` is the datastore
stand-in for such tests: one export directory, and no NFS handle it resolves.
"""
from __future__ import annotations

import socket
import stat
import struct
from types import SimpleNamespace
from typing import Any

from engine.errors import BadHandle
from engine.nfs.client import NFSClient, RpcClient, auth_sys, build_call
from engine.nfs.nfs3_types import NFSPROC3, SATTR3_NONE, MKDIR3args, diropargs3, nfs_fh3, nfsstat3
from engine.nfs.rpc import RpcServer
from tests.nfs.conftest import run


def words(*w: int) -> bytes:
    """Big-endian 32-bit words: how golden replies are spelled."""
    return struct.pack(f">{len(w)}I", *w)


def accept_stat_of(rep: bytes) -> tuple[int, int]:
    """(reply_stat, accept_stat or reject_stat) of a reply record."""
    _xid, _mtype, rstat = struct.unpack_from(">III", rep)
    if rstat != 0:
        return rstat, struct.unpack_from(">I", rep, 12)[0]
    vlen = struct.unpack_from(">I", rep, 16)[0]
    return 0, struct.unpack_from(">I", rep, 20 + vlen + (-vlen & 3))[0]


def status_of_reply(rep: bytes) -> int:
    """The procedure's status word; fails when the call was not accepted (an RPC reject)."""
    rstat, astat = accept_stat_of(rep)
    assert (rstat, astat) == (0, 0), f"RPC-level reject {rstat}/{astat}, not a procedure status"
    vlen = struct.unpack_from(">I", rep, 16)[0]
    return struct.unpack_from(">I", rep, 24 + vlen + (-vlen & 3))[0]


async def raw(c: RpcClient, prog: int, proc: int, args: bytes, vers: int = 3) -> bytes:
    """One AUTH_SYS call on an open connection; the reply record."""
    return await c.call_raw(build_call(c.next_xid(), prog, vers, proc, args, auth_sys()))


def raw_exchange(served: Any, port: int, record: bytes) -> bytes:
    """One call record of the caller's making on a new TCP connection; the reply record."""

    async def main() -> bytes:
        c = await RpcClient.connect(served.addr, port)
        try:
            return await c.call_raw(record)
        finally:
            await c.close()

    return run(main())


def udp_call(host: str, port: int, record: bytes) -> bytes:
    """One call record in one datagram; the reply datagram."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(record, (host, port))
        return s.recv(65536)


def dispatch(rpc: RpcServer, record: bytes, client: str = "127.0.0.1") -> bytes:
    """One call record through a dispatcher in-process, from ``client`` port 900; the reply."""
    return b"".join(bytes(b) for b in run(rpc.handle(record, (client, 900))))


class NoHandles:
    """A datastore stand-in for dispatcher tests: one export directory, no valid NFS handle."""

    fsid = 1

    def root(self) -> str:
        return "root"

    def getattr(self, node: Any) -> Any:
        return SimpleNamespace(mode=stat.S_IFDIR | 0o755)

    def handle(self, node: Any) -> bytes:
        return b"H" * 16

    def resolve(self, fh: bytes) -> Any:
        raise BadHandle()


def dirop(d: bytes, name: str | bytes) -> Any:
    return diropargs3(nfs_fh3(d), name.encode() if isinstance(name, str) else name)


async def workdir(c: NFSClient, sess: bytes, name: str) -> bytes:
    """The handle of directory ``name`` in ``sess``, made when missing."""
    r = await c.call(NFSPROC3.MKDIR, MKDIR3args(dirop(sess, name), SATTR3_NONE), check=False)
    if r.tag == nfsstat3.NFS3ERR_EXIST:
        return await c.lookup(sess, name)
    assert r.tag == nfsstat3.NFS3_OK
    return r.body.obj.data
