"""The network services of one daemon: portmapper, MOUNT and NFS listeners.

``NFSServices.start()`` binds, in order: the portmapper on its fixed port (TCP and
UDP; when the port is held by another portmapper we register with that one instead;
``portmap = "off"`` skips both), MOUNT (TCP and UDP on one port) and NFS (TCP), each
moving to the next free port when its configured one is taken, then registers MOUNT
and NFS with the portmapper. All TCP listeners share one ``ConnectionLimits`` (per
client address and in total) and give each connection the [server] limits (reply bytes
queued, fragments per record, idle timeout); MOUNT and NFS close a connection from an
address outside ``allowed_clients`` at accept. ``start()`` first raises the open-file
soft limit to the hard limit. ``stop()`` closes the listeners and unregisters from an
outside portmapper. Each service has its own dispatcher (so a call for NFS on the
MOUNT port is PROG_UNAVAIL, as on other servers).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import weakref
from dataclasses import dataclass, field
from typing import Any

from engine.datastore import Datastore
from engine.errors import PortInUse
from engine.nfs import portmap
from engine.nfs.compiled import ConnectionLimits, FastLane, RpcDatagramProtocol, RpcStreamProtocol
from engine.nfs.mount import Mount3
from engine.nfs.mount_types import MOUNT_PROGRAM
from engine.nfs.nfs3 import NFS3
from engine.nfs.nfs3_types import NFS_PROGRAM
from engine.nfs.portmap_types import IPPROTO_TCP, IPPROTO_UDP, PMAP_PROG
from engine.nfs.rpc import AllowList, RpcServer
from engine.nfs.transport import DEFAULT_MAX_FRAGMENTS, DEFAULT_MAX_QUEUED

log = logging.getLogger("instantnfs.server")

PORT_SEARCH = 100


@dataclass
class Ports:
    portmap: int | None = None  # our own portmapper's port, None when off / registered elsewhere
    portmap_external: int | None = None  # the outside portmapper we registered with
    mount: int = 0
    nfs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class NFSServices:
    def __init__(self, ds: Datastore, server_cfg: dict[str, Any]) -> None:
        self.ds = ds
        self.cfg = server_cfg
        self.bind = server_cfg["bind"]
        allow = AllowList(server_cfg["allowed_clients"])
        self.nfs3 = NFS3(ds, read_only=server_cfg.get("read_only", False))
        self.mount3 = Mount3(ds, server_cfg["export"], server_cfg["allowed_clients"])
        self.pmap = portmap.PortMapper()
        self.nfs_rpc = RpcServer(allow)
        program = self.nfs3.program()
        self.nfs_rpc.add(program)
        self.nfs_rpc.fast = FastLane(self.nfs3, self.nfs_rpc, program)
        self.mount_rpc = RpcServer(allow)
        self.mount_rpc.add(self.mount3.program())
        self.pmap_rpc = RpcServer()
        self.pmap_rpc.add(self.pmap.program())
        self.ports = Ports()
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[asyncio.BaseTransport] = []
        self._registered: list[tuple[int, int, int, int]] = []
        self._conns: weakref.WeakSet[RpcStreamProtocol] = weakref.WeakSet()
        self.max_inflight = server_cfg.get("max_inflight", 64)
        self.max_queued = server_cfg.get("max_reply_queue_mib", DEFAULT_MAX_QUEUED >> 20) << 20
        self.max_fragments = server_cfg.get("max_fragments", DEFAULT_MAX_FRAGMENTS)
        self.idle_timeout = server_cfg.get("idle_timeout", 600)
        self.limits = ConnectionLimits(server_cfg.get("max_connections_per_client", 128), server_cfg.get("max_connections", 4096))

    def _stream(self, rpc: RpcServer, check_allowed: bool) -> Any:
        def make() -> RpcStreamProtocol:
            proto = RpcStreamProtocol(rpc, max_inflight=self.max_inflight, max_queued=self.max_queued,
                                      max_fragments=self.max_fragments, idle_timeout=self.idle_timeout,
                                      limits=self.limits, check_allowed=check_allowed)
            self._conns.add(proto)
            return proto
        return make

    async def _tcp(self, rpc: RpcServer, port: int) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        # MOUNT and NFS close connections of clients outside allowed_clients at accept;
        # the portmapper answers everyone
        return await loop.create_server(self._stream(rpc, rpc is not self.pmap_rpc), self.bind, port,
                                        reuse_address=True, backlog=1024)

    async def _udp_bind(self, rpc: RpcServer, port: int) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        tr, _ = await loop.create_datagram_endpoint(lambda: RpcDatagramProtocol(rpc), local_addr=(self.bind, port))
        return tr

    async def _bind_pair(self, rpc: RpcServer, port: int, udp: bool, what: str) -> int:
        """TCP (and UDP) on ``port`` or the next free one; returns the port."""
        last: OSError | None = None
        for _ in range(PORT_SEARCH if port else 10):
            try:
                srv = await self._tcp(rpc, port)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise PortInUse(f"cannot listen for {what} on {self.bind}:{port}: {e.strerror}") from e
                last = e
                port += 1
                continue
            actual = srv.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            if udp:
                try:
                    self._udp.append(await self._udp_bind(rpc, actual))
                except OSError as e:
                    srv.close()
                    last = e
                    port = actual + 1 if port else 0
                    continue
            self._servers.append(srv)
            return actual
        raise PortInUse(f"no free port for {what} on {self.bind} ({last})")

    async def start(self) -> Ports:
        cfg = self.cfg
        nofile = raise_nofile_limit()
        if nofile < self.limits.total + 256:
            log.warning("the open-file limit is %d, below server.max_connections %d plus the daemon's own files: "
                        "raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower server.max_connections",
                        nofile, self.limits.total)
        pm_port = cfg["portmap_port"]
        if cfg["portmap"] == "on":
            try:
                srv = await self._tcp(self.pmap_rpc, pm_port)
                self._servers.append(srv)
                self._udp.append(await self._udp_bind(self.pmap_rpc, pm_port))
                self.ports.portmap = pm_port
                for v in (2, 3, 4):
                    for prot in (IPPROTO_TCP, IPPROTO_UDP):
                        self.pmap.register(PMAP_PROG, v, prot, pm_port, self.bind, b"superuser")
            except OSError as e:
                if e.errno == errno.EACCES:
                    raise PortInUse(f"cannot listen for the portmapper on {self.bind}:{pm_port}: permission denied "
                                    "(run as root, or set portmap_port / portmap = \"off\")") from e
                if e.errno != errno.EADDRINUSE:
                    raise PortInUse(f"cannot listen for the portmapper on {self.bind}:{pm_port}: {e.strerror}") from e
                await self._close()
                self.ports.portmap_external = pm_port
                log.info("port %d is held by another portmapper: registering our services with it", pm_port)
        self.ports.mount = await self._bind_pair(self.mount_rpc, cfg["mount_port"], True, "MOUNT")
        self.ports.nfs = await self._bind_pair(self.nfs_rpc, cfg["nfs_port"], False, "NFS")
        regs = [
            (MOUNT_PROGRAM, 3, IPPROTO_TCP, self.ports.mount),
            (MOUNT_PROGRAM, 3, IPPROTO_UDP, self.ports.mount),
            (NFS_PROGRAM, 3, IPPROTO_TCP, self.ports.nfs),
        ]
        if self.ports.portmap is not None:
            for r in regs:
                self.pmap.register(*r, addr=self.bind)
        elif self.ports.portmap_external is not None:
            host = self._pmap_host()
            try:
                await portmap.register_with(host, pm_port, regs)
            except (TimeoutError, OSError, ConnectionError) as e:
                await self._close()
                raise PortInUse(
                    f"port {pm_port} on {self.bind} is taken by something that would not register our services ({e}); "
                    "stop it, or set portmap_port / portmap = \"off\""
                ) from e
            self._registered = regs
        return self.ports

    def serving(self) -> bool:
        """Whether the MOUNT and NFS listeners are open (started and not stopped)."""
        return bool(self.ports.nfs) and len(self._servers) >= 2 and all(s.is_serving() for s in self._servers)

    def _pmap_host(self) -> str:
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind

    async def _close(self) -> None:
        for s in self._servers:
            s.close()
        for t in self._udp:
            t.close()
        for proto in list(self._conns):  # clients reconnect and retransmit after a restart
            if proto.transport is not None and not proto.closed:
                proto.transport.abort()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except TimeoutError:
                pass
        self._servers, self._udp = [], []

    async def stop(self) -> None:
        if self._registered and self.ports.portmap_external is not None:
            await portmap.unregister_with(self._pmap_host(), self.ports.portmap_external, self._registered)
            self._registered = []
        await self._close()


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard one (Debian's soft limit is 1024, below
    server.max_connections); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
