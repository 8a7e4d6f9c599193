"""The portmapper (RFC 1833): program 100000 version 2, plus rpcbind v3/v4 GETADDR.

Clients ask it where MOUNT and NFS listen (QEMU's libnfs and ESXi always ask port 111).
The table holds (prog, vers, protocol, port) rows; rpcbind's (netid, universal address)
view is derived from them: netid "tcp"/"udp", address "h1.h2.h3.h4.p1.p2" with the
address the question arrived on when the service listens on every address.

SET and UNSET follow rpcbind. The caller's identity comes from the transport, never
from what it claims: root on this host ("superuser": a loopback caller from a reserved
port below 1024, or uid 0 on the AF_UNIX socket) or a local uid (a non-root caller on
the AF_UNIX socket, whose peer credentials the transport reads); anyone else (a remote
caller, a local one from an unreserved port) may not SET or UNSET (FALSE). A SET never
replaces an existing registration of the same (program, version, protocol) and records
the caller as its owner; an UNSET removes only what the caller owns (root owns all; for
rpcbind v3/v4 ``r_owner`` must also name the caller). So other local servers (a peer NFS
server in a benchmark) can register, and no unprivileged user can remove or redirect
ours.

When port 111 is held by a system rpcbind, the daemon does not run this program and
registers its services there instead (``register_with``, a small client of v2 SET/UNSET
that calls from a reserved port when running as root).
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass

from engine.nfs.portmap_types import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    PMAP_PROG,
    PMAPPROC,
    RPCBPROC,
    mapping,
    pmaplist,
    rp__list,
    rpcb,
)
from engine.nfs.rpc import CallContext, Proc, Program, is_local
from engine.nfs.xdr import Packer, Unpacker, uint32

_NETIDS = {IPPROTO_TCP: b"tcp", IPPROTO_UDP: b"udp"}
_PROTOS = {b"tcp": IPPROTO_TCP, b"udp": IPPROTO_UDP, b"tcp6": IPPROTO_TCP, b"udp6": IPPROTO_UDP}


@dataclass(frozen=True, slots=True)
class Registration:
    prog: int
    vers: int
    prot: int
    port: int
    addr: str  # the address the service listens on ("0.0.0.0": all)
    owner: bytes = b"instantnfs"


SUPERUSER = b"superuser"


def caller_owner(ctx: CallContext) -> bytes | None:
    """Who the caller is for SET/UNSET: SUPERUSER, a local uid, or None (may do neither).

    On the AF_UNIX socket the transport puts the peer's uid in ``ctx.port``."""
    if ctx.client == "unix":
        if ctx.port == 0:
            return SUPERUSER
        return str(ctx.port).encode() if ctx.port > 0 else None
    if is_local(ctx.client) and 0 < ctx.port < 1024:
        return SUPERUSER
    return None


def uaddr(host: str, port: int) -> bytes:
    return f"{host}.{port >> 8}.{port & 255}".encode()


def parse_uaddr(u: bytes) -> tuple[str, int]:
    parts = u.decode("ascii").rsplit(".", 2)
    if len(parts) != 3:
        raise ValueError(f"bad universal address {u!r}")
    return parts[0], int(parts[1]) * 256 + int(parts[2])


class PortMapper:
    def __init__(self) -> None:
        self.table: list[Registration] = []

    def register(self, prog: int, vers: int, prot: int, port: int, addr: str = "0.0.0.0", owner: bytes = b"instantnfs") -> bool:
        for r in self.table:
            if r.prog == prog and r.vers == vers and r.prot == prot:
                # never over an existing registration; the same service again from its
                # owner (e.g. its tcp6 twin) is fine
                return r.port == port and r.owner == owner
        self.table.append(Registration(prog, vers, prot, port, addr, owner))
        return True

    def unregister(self, prog: int, vers: int, prot: int | None = None, owner: bytes | None = None) -> bool:
        """Remove (prog, vers[, prot]) rows; only those of ``owner`` when one is given."""
        before = len(self.table)
        self.table = [r for r in self.table if not (r.prog == prog and r.vers == vers and (prot is None or r.prot == prot)
                                                    and (owner is None or r.owner == owner))]
        return len(self.table) != before

    def getport(self, prog: int, vers: int, prot: int) -> int:
        for r in self.table:
            if r.prog == prog and r.vers == vers and r.prot == prot:
                return r.port
        return 0

    # -- v2 ------------------------------------------------------------------------------

    def pmap_null(self, args: None, ctx: CallContext) -> None:
        return None

    def pmap_set(self, m, ctx: CallContext) -> bool:
        owner = caller_owner(ctx)
        if owner is None or m.prot not in _NETIDS:  # TCP and UDP only: the netids rpcbind's view can name
            return False
        return self.register(m.prog, m.vers, m.prot, m.port, ctx.local or "0.0.0.0", owner)

    def pmap_unset(self, m, ctx: CallContext) -> bool:
        owner = caller_owner(ctx)
        if owner is None:
            return False
        return self.unregister(m.prog, m.vers, None, None if owner == SUPERUSER else owner)

    def pmap_getport(self, m, ctx: CallContext) -> int:
        return self.getport(m.prog, m.vers, m.prot)

    def pmap_dump(self, args: None, ctx: CallContext) -> list:
        return [mapping(r.prog, r.vers, r.prot, r.port) for r in self.table]

    # -- rpcbind v3 / v4 -----------------------------------------------------------------

    def _addr_for(self, r: Registration, ctx: CallContext) -> bytes:
        host = r.addr
        if host in ("0.0.0.0", "::", ""):
            host = ctx.local or "127.0.0.1"
        if host.startswith("::ffff:"):
            host = host[7:]
        return uaddr(host, r.port)

    def rpcb_set(self, b, ctx: CallContext) -> bool:
        owner = caller_owner(ctx)  # as rpcbind: the transport says who, not r_owner
        if owner is None or b.r_netid not in _PROTOS:
            return False
        try:
            host, port = parse_uaddr(b.r_addr)
        except (ValueError, UnicodeDecodeError):
            return False
        return self.register(b.r_prog, b.r_vers, _PROTOS[b.r_netid], port, host, owner)

    def rpcb_unset(self, b, ctx: CallContext) -> bool:
        owner = caller_owner(ctx)
        if owner is None or (owner != SUPERUSER and b.r_owner != owner):
            return False
        if b.r_netid and b.r_netid not in _PROTOS:
            return False
        prot = _PROTOS[b.r_netid] if b.r_netid else None
        return self.unregister(b.r_prog, b.r_vers, prot, None if owner == SUPERUSER else owner)

    def rpcb_getaddr(self, b, ctx: CallContext) -> bytes:
        want = _PROTOS.get(b.r_netid, IPPROTO_TCP)
        for r in self.table:
            if r.prog == b.r_prog and r.prot == want and (r.vers == b.r_vers or b.r_vers == 0):
                return self._addr_for(r, ctx)
        return b""

    def rpcb_dump(self, args: None, ctx: CallContext) -> list:
        return [rpcb(r.prog, r.vers, _NETIDS[r.prot], self._addr_for(r, ctx), r.owner) for r in self.table]

    def rpcb_gettime(self, args: None, ctx: CallContext) -> int:
        return int(time.time()) & 0xFFFFFFFF

    def program(self) -> Program:
        none = lambda u: None  # noqa: E731
        nothing = lambda p, v: None  # noqa: E731
        pbool = lambda p, v: p.bool(v)  # noqa: E731
        pu32 = lambda p, v: p.u32(v)  # noqa: E731
        pstr = lambda p, v: p.opaque(v)  # noqa: E731
        v2 = {
            PMAPPROC.NULL: Proc("NULL", none, self.pmap_null, nothing),
            PMAPPROC.SET: Proc("SET", mapping.unpack, self.pmap_set, pbool),
            PMAPPROC.UNSET: Proc("UNSET", mapping.unpack, self.pmap_unset, pbool),
            PMAPPROC.GETPORT: Proc("GETPORT", mapping.unpack, self.pmap_getport, pu32),
            PMAPPROC.DUMP: Proc("DUMP", none, self.pmap_dump, pmaplist.pack),
        }
        v34 = {
            RPCBPROC.NULL: Proc("NULL", none, self.pmap_null, nothing),
            RPCBPROC.SET: Proc("RPCB_SET", rpcb.unpack, self.rpcb_set, pbool),
            RPCBPROC.UNSET: Proc("RPCB_UNSET", rpcb.unpack, self.rpcb_unset, pbool),
            RPCBPROC.GETADDR: Proc("RPCB_GETADDR", rpcb.unpack, self.rpcb_getaddr, pstr),
            RPCBPROC.DUMP: Proc("RPCB_DUMP", none, self.rpcb_dump, rp__list.pack),
            RPCBPROC.GETTIME: Proc("RPCB_GETTIME", none, self.rpcb_gettime, pu32),
        }
        t2 = {int(k): v for k, v in v2.items()}
        t34 = {int(k): v for k, v in v34.items()}
        return Program(PMAP_PROG, "portmap", {2: t2, 3: t34, 4: dict(t34)})


# -- registering with another portmapper (a system rpcbind on 111) -------------------------


async def pmap_call(host: str, port: int, proc: int, m, timeout: float = 3.0) -> int:
    """One portmap v2 call over TCP (AUTH_NONE); returns the decoded u32/bool result."""
    p = Packer()
    xid = int(time.monotonic_ns() & 0x7FFFFFFF)
    p.buf += struct.pack(">IIIIIIIIII", xid, 0, 2, PMAP_PROG, 2, proc, 0, 0, 0, 0)
    mapping.pack(p, m)
    body = p.getvalue()
    reader, writer = await asyncio.wait_for(_open_privileged(host, port), timeout)
    try:
        writer.write(struct.pack(">I", 0x80000000 | len(body)) + body)
        hdr = await asyncio.wait_for(reader.readexactly(4), timeout)
        n = struct.unpack(">I", hdr)[0] & 0x7FFFFFFF
        rep = await asyncio.wait_for(reader.readexactly(n), timeout)
    finally:
        writer.close()
    u = Unpacker(rep)
    rxid, mtype, rstat = u.u32(), u.u32(), u.u32()
    if rxid != xid or mtype != 1 or rstat != 0:
        raise ConnectionError(f"portmapper at {host}:{port} denied the call")
    u.u32()
    u.opaque(400)
    if u.u32() != 0:
        raise ConnectionError(f"portmapper at {host}:{port} did not accept the call")
    return uint32.unpack(u)


async def _open_privileged(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from a reserved source port when we are root (portmappers accept SET
    and UNSET only from privileged callers), else from any port."""
    if os.geteuid() != 0:
        return await asyncio.open_connection(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for src in range(1023, 511, -1):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind(("", src))
            await loop.sock_connect(sock, (host, port))
        except OSError as e:
            sock.close()
            if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                last = e
                continue
            raise
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)
    raise ConnectionError(f"no free reserved port to call the portmapper at {host}:{port} from ({last})")


async def register_with(host: str, port: int, regs: list[tuple[int, int, int, int]]) -> None:
    """Register (prog, vers, prot, port) rows with the portmapper at host:port."""
    for prog, vers, prot, _p in regs:
        await pmap_call(host, port, PMAPPROC.UNSET, mapping(prog, vers, prot, 0))
    for prog, vers, prot, p in regs:
        ok = await pmap_call(host, port, PMAPPROC.SET, mapping(prog, vers, prot, p))
        if not ok:
            raise ConnectionError(f"portmapper at {host}:{port} refused to register program {prog} v{vers}")


async def unregister_with(host: str, port: int, regs: list[tuple[int, int, int, int]]) -> None:
    for prog, vers, prot, _p in regs:
        try:
            await pmap_call(host, port, PMAPPROC.UNSET, mapping(prog, vers, prot, 0))
        except (TimeoutError, OSError, ConnectionError):
            return


# -- a standalone portmapper (python -m engine.nfs.portmap) ----------------------------------


async def serve_standalone(bind: str, port: int, unix: str | None = None) -> None:
    """Only the portmapper, TCP and UDP, until SIGTERM/SIGINT: for peer servers in benchmarks."""
    import signal

    from engine.nfs.rpc import RpcServer
    from engine.nfs.transport import RpcDatagramProtocol, RpcStreamProtocol

    pm = PortMapper()
    rpc = RpcServer()
    rpc.add(pm.program())
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: RpcStreamProtocol(rpc), bind, port, reuse_address=True)
    udp, _ = await loop.create_datagram_endpoint(lambda: RpcDatagramProtocol(rpc), local_addr=(bind, port))
    usrv = None
    if unix:
        if os.path.exists(unix):
            os.unlink(unix)
        usrv = await loop.create_unix_server(lambda: RpcStreamProtocol(rpc), unix)
        os.chmod(unix, 0o666)
    for v in (2, 3, 4):
        for prot in (IPPROTO_TCP, IPPROTO_UDP):
            pm.register(PMAP_PROG, v, prot, port, bind, b"superuser")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"portmapper listening on {bind}:{port}" + (f" and {unix}" if unix else ""), flush=True)
    await stop.wait()
    srv.close()
    udp.close()
    if usrv is not None and unix:
        usrv.close()
        os.unlink(unix)


if __name__ == "__main__":
    import argparse
    import sys

    import uvloop

    ap = argparse.ArgumentParser(prog="python -m engine.nfs.portmap", description="run a standalone portmapper")
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=111)
    ap.add_argument("--unix", help="also listen on this AF_UNIX stream socket (e.g. /run/rpcbind.sock)")
    a = ap.parse_args()
    try:
        uvloop.run(serve_standalone(a.bind, a.port, a.unix))
    except OSError as e:
        print(f"portmap: cannot listen on {a.bind}:{a.port}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
