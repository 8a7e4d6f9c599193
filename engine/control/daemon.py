"""The daemon's composition root: configuration -> repository, datastore, jobs, NFS
services, control API; run until SIGTERM/SIGINT, then stop them in order.

``serve`` runs in the foreground on uvloop (logs to stderr, stops cleanly on SIGTERM /
SIGINT within ``SHUTDOWN_LIMIT`` seconds: running jobs are cancelled, disk operations in
flight get a bounded wait, and a watchdog ends the process if anything still hangs).
``serve_config`` turns the command line's options into a validated configuration (the
demo uses it too). Under systemd (``Type=notify``, contrib/systemd) it tells the service
manager ``READY=1`` once it serves and ``STOPPING=1`` when a stop begins (``sd_notify``:
one datagram to ``$NOTIFY_SOCKET``; nothing without it). The heavy modules (aiohttp, the
datastore, the NFS services) are imported when the daemon starts, so the CLI's other
commands do not pay for them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from engine import config as configmod
from engine.errors import InstantNFSError, UsageError

log = logging.getLogger("instantnfs")

SHUTDOWN_LIMIT = 10.0  # seconds from SIGTERM/SIGINT to the end of the process
DRAIN_TIMEOUT = 2.0  # seconds the disk operations in flight get at stop
HOUSEKEEPING_S = 5.0  # seconds between checks for expired sessions and VMs paused on an I/O error


def log_to_stderr(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = configmod.load(args.config)
    o = configmod.override
    o(cfg, "repo", "path", args.repo)
    o(cfg, "server", "bind", args.bind)
    o(cfg, "server", "portmap_port", args.portmap_port)
    o(cfg, "server", "mount_port", args.mount_port)
    o(cfg, "server", "nfs_port", args.nfs_port)
    o(cfg, "server", "export", args.export)
    o(cfg, "server", "portmap", args.portmap)
    if args.allow:
        cfg["server"]["allowed_clients"] = args.allow
    if args.read_only:
        cfg["server"]["read_only"] = True
    if getattr(args, "export_dir", None):
        cfg["server"]["export_dirs"] = args.export_dir
    o(cfg, "cache", "dir", args.cache_dir)
    o(cfg, "cache", "write_dir", args.write_dir)
    o(cfg, "cache", "reserve_gib", args.reserve_gib)
    o(cfg, "control", "bind", args.control_bind)
    o(cfg, "control", "port", args.control_port)
    configmod.validate(cfg)
    if not cfg["repo"]["path"]:
        raise UsageError("no repository: give --repo PATH or set repo.path in the config")
    return cfg


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd's notification socket, if it gave one
    ($NOTIFY_SOCKET: a path, or "@name" in the abstract namespace); whether it was sent.
    A failure is logged, never raised: the daemon serves with or without systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as e:
        log.warning("cannot notify systemd (%s) of %s: %s", addr, state.split("\n")[0], e.strerror or e)
        return False
    return True


def _arm_watchdog(limit: float) -> None:
    """End the process ``limit`` seconds from now if it has not ended by then (a stop
    whose jobs or disk operations hang must not leave a daemon that ignores SIGTERM).
    What was committed stays committed: the write caches are crash-safe."""
    def expire() -> None:
        log.error("shutdown took more than %.0f s: exiting with work still running", limit)
        logging.shutdown()
        os._exit(1)

    t = threading.Timer(limit, expire)
    t.daemon = True
    t.start()


async def run_daemon(cfg: dict[str, Any], ready: asyncio.Future | None = None, exit_limit: float | None = None,
                     before_stop: Callable[[], Awaitable[None]] | None = None) -> int:
    """The daemon: open the repository, restore sessions, start services, wait for a signal.

    Stopping: jobs cancelled (``Jobs.stop``, bounded), services stopped, disk
    operations in flight given ``DRAIN_TIMEOUT``, caches committed and closed. With
    ``exit_limit`` (the ``serve`` command), a watchdog ends the process that long after
    the signal whatever still runs. ``before_stop`` (the demo: power its VM off) runs
    first, while everything still serves."""
    from engine.control.api import ControlAPI
    from engine.datastore import Datastore
    from engine.jobs import Jobs
    from engine.nfs.server import NFSServices
    from engine.recovery import Recovery
    from engine.stack import Stack
    from engine.vm.supervisor import Supervisor

    stack = Stack.open(cfg["repo"]["path"], cache_bytes=cfg["cache"]["chunk_cache_mib"] << 20)
    try:
        ds = Datastore(stack, cfg["cache"]["dir"], cfg["cache"]["write_dir"] or None, int(cfg["cache"]["reserve_gib"] * (1 << 30)))
        ds.load()
        services = NFSServices(ds, cfg["server"])
        ports = await services.start()
        jobs = Jobs(ds, cfg["server"].get("export_dirs"))
        loop = asyncio.get_running_loop()
        supervisor = Supervisor(ds.cache_dir / "vms")
        adopted = await loop.run_in_executor(ds.registry.admin_pool, supervisor.adopt)
        nfs_host = qemu_host(cfg["server"]["bind"])

        def disk_url(s: Any, j: int) -> str:
            return f"nfs://{nfs_host}{services.mount3.export}/{s.name}/{s.disks[j].name}.img"

        recovery = Recovery(ds, jobs, supervisor, disk_url, cfg)
        api = ControlAPI(ds, services, jobs, cfg, recovery)
        try:
            control_port = await api.start(cfg["control"]["bind"], cfg["control"]["port"])
        except OSError as e:
            await services.stop()
            raise InstantNFSError(f"cannot listen for the control API on {cfg['control']['bind']}:{cfg['control']['port']}: {e.strerror}") from e
        bind = cfg["server"]["bind"]
        pm = f"{bind}:{ports.portmap}" if ports.portmap else (f"registered with the portmapper on port {ports.portmap_external}" if ports.portmap_external else "off")
        log.info(
            "instantnfs serving %s: portmap %s, mount %s:%d (tcp+udp), nfs %s:%d (tcp), control http://%s:%d%s, %d session(s)",
            stack.repo.path, pm, bind, ports.mount, bind, ports.nfs, cfg["control"]["bind"], control_port, "/api/v1",
            len(ds.sessions),
        )
        if adopted:
            log.info("%d VM(s) still running from before the restart: %s", len(adopted), ", ".join(v.name for v in adopted))
        house = loop.create_task(housekeeping(recovery, supervisor, ds))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None and not ready.done():
            ready.set_result((ports, control_port, api))
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {len(ds.sessions)} session(s)")
        await stop.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
        if exit_limit is not None:
            _arm_watchdog(exit_limit)
        if before_stop is not None:
            try:
                await before_stop()
            except Exception:  # noqa: BLE001 - the stop goes on; the error is logged
                log.exception("stopping: the last work before the stop failed")
        house.cancel()
        await jobs.stop()
        await api.stop()
        supervisor.close()  # the VMs run on; the next start adopts them
        await services.stop()
        await ds.aclose(timeout=DRAIN_TIMEOUT)
    finally:
        stack.close()
    log.info("stopped")
    return 0


def qemu_host(bind: str) -> str:
    """The address QEMU on this host opens our nfs:// URLs at (its libnfs asks the
    portmapper on port 111 there)."""
    return "127.0.0.1" if bind in ("0.0.0.0", "", "::") else bind


async def housekeeping(recovery: Any, supervisor: Any, ds: Any) -> None:
    """Every few seconds: end expired sessions (sandboxes' ttl) and resume VMs that an
    NFS outage paused (werror/rerror=stop) now that the daemon serves again."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            await recovery.expire()
            resumed = await loop.run_in_executor(ds.registry.admin_pool, supervisor.resume_paused)
            if resumed:
                log.info("resumed VM(s) paused on an I/O error: %s", ", ".join(resumed))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - housekeeping must go on; the error is logged
            log.exception("housekeeping failed")
        await asyncio.sleep(HOUSEKEEPING_S)


def cmd_serve(args: argparse.Namespace) -> int:
    log_to_stderr(args.verbose)
    try:
        cfg = serve_config(args)
        import uvloop

        return uvloop.run(run_daemon(cfg, exit_limit=SHUTDOWN_LIMIT))  # main has tuned malloc
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code
