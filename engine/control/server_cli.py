"""Command-line commands for the daemon: serve, publish, unpublish, sessions, status,
export, commit.

``add_commands(subparsers)`` adds them to the main ``instantnfs`` parser; each sets
``func`` to a callable taking the parsed args and returning the exit code. Run alone,
``python -m engine.control.server_cli ...`` builds its own parser.

``serve`` runs in the foreground on uvloop (logs to stderr, stops cleanly on SIGTERM /
SIGINT within ``SHUTDOWN_LIMIT`` seconds: running jobs are cancelled, disk operations in
flight get a bounded wait, and a watchdog ends the process if anything still hangs).
The other commands talk to a running daemon's control API, found from ``--server
URL``, else ``$INSTANTNFS_SERVER``, else the config's control address.
``export`` and ``commit`` start a job in the daemon (which owns the write caches) and
poll it, showing its progress on a terminal, until it ends; Ctrl-C cancels the job in
the daemon. ``jobs`` lists the daemon's jobs, ``cancel JOB`` cancels one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from engine import config as configmod
from engine.errors import InstantNFSError, UsageError

log = logging.getLogger("instantnfs")

SHUTDOWN_LIMIT = 10.0  # seconds from SIGTERM/SIGINT to the end of the process
DRAIN_TIMEOUT = 2.0  # seconds the disk operations in flight get at stop


# -- serve ---------------------------------------------------------------------------------


def _serve_config(args: argparse.Namespace) -> dict[str, Any]:
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


async def run_daemon(cfg: dict[str, Any], ready: asyncio.Future | None = None, exit_limit: float | None = None) -> int:
    """The daemon: open the repository, restore sessions, start services, wait for a signal.

    Stopping: jobs cancelled (``Jobs.stop``, bounded), services stopped, disk
    operations in flight given ``DRAIN_TIMEOUT``, caches committed and closed. With
    ``exit_limit`` (the ``serve`` command), a watchdog ends the process that long after
    the signal whatever still runs."""
    from engine.control.api import ControlAPI
    from engine.datastore import Datastore
    from engine.jobs import Jobs
    from engine.nfs.server import NFSServices
    from engine.repo.repository import Repository

    repo = Repository.open(cfg["repo"]["path"], cache_bytes=cfg["cache"]["chunk_cache_mib"] << 20)
    try:
        ds = Datastore(repo, cfg["cache"]["dir"], cfg["cache"]["write_dir"] or None, int(cfg["cache"]["reserve_gib"] * (1 << 30)))
        ds.load()
        services = NFSServices(ds, cfg["server"])
        ports = await services.start()
        jobs = Jobs(ds, cfg["server"].get("export_dirs"))
        api = ControlAPI(ds, services, jobs, cfg)
        try:
            control_port = await api.start(cfg["control"]["bind"], cfg["control"]["port"])
        except OSError as e:
            await services.stop()
            raise InstantNFSError(f"cannot listen for the control API on {cfg['control']['bind']}:{cfg['control']['port']}: {e.strerror}") from e
        bind = cfg["server"]["bind"]
        pm = f"{bind}:{ports.portmap}" if ports.portmap else (f"registered with the portmapper on port {ports.portmap_external}" if ports.portmap_external else "off")
        log.info(
            "instantnfs serving %s: portmap %s, mount %s:%d (tcp+udp), nfs %s:%d (tcp), control http://%s:%d%s, %d session(s)",
            repo.path, pm, bind, ports.mount, bind, ports.nfs, cfg["control"]["bind"], control_port, "/api/v1",
            len(ds.sessions),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None and not ready.done():
            ready.set_result((ports, control_port, api))
        await stop.wait()
        log.info("stopping")
        if exit_limit is not None:
            _arm_watchdog(exit_limit)
        await jobs.stop()
        await api.stop()
        await services.stop()
        await ds.aclose(timeout=DRAIN_TIMEOUT)
    finally:
        repo.close()
    log.info("stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = _serve_config(args)
        import uvloop

        from engine.tuning import tune_malloc

        tune_malloc()  # 1 MiB READ/WRITE buffers stay in the heap
        return uvloop.run(run_daemon(cfg, exit_limit=SHUTDOWN_LIMIT))
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code


# -- demo ------------------------------------------------------------------------------------------

DEMO_VM = "demo-vm"
DEMO_SESSION = "demo"
DEMO_SIZE = 256 << 20


def make_demo_disk(path: str, size: int = DEMO_SIZE) -> None:
    """A sparse sample disk: a boot sector, text, incompressible and repeated blocks, holes."""
    import random

    rng = random.Random(4)
    block = 1 << 20
    words = [b"instant", b"recovery", b"backup", b"restore", b"virtual", b"machine", b"disk", b"nfs", b"\n"]
    text = b" ".join(rng.choice(words) for _ in range(200_000))[:block]
    noise = rng.randbytes(block)
    with open(path, "wb") as f:
        f.truncate(size)
        boot = bytearray(512)
        boot[3:11] = b"INSTANTN"
        boot[510:512] = b"\x55\xaa"
        f.write(boot)
        for i in range(1, size // block):
            kind = i % 8
            if kind in (0, 5):
                continue  # holes: all zeros, not stored
            f.seek(i * block)
            f.write(noise if kind == 3 else text if kind != 7 else rng.randbytes(block))


def _demo_repo(base: str) -> tuple[str, bool]:
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    repo = os.path.join(base, "repo")
    if os.path.exists(os.path.join(repo, "config.json")):
        with Repository.open(repo) as r:
            if r.points(DEMO_VM):
                return repo, False
    os.makedirs(base, exist_ok=True)
    if not os.path.exists(os.path.join(repo, "config.json")):
        Repository.init(repo, 1 << 20)
    img = os.path.join(base, "sample.img")
    make_demo_disk(img)
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm=DEMO_VM, cpus=1, memory_mib=512), [img])
    os.unlink(img)
    return repo, True


def cmd_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = os.path.expanduser(args.dir or "~/.cache/instantnfs-demo")
        repo, made = _demo_repo(base)
        print(("created" if made else "reusing") + f" the demo repository {repo}", flush=True)
        args.repo = repo
        if not args.cache_dir:
            args.cache_dir = os.path.join(base, "cache")
        cfg = _serve_config(args)
        import uvloop

        return uvloop.run(_demo_main(cfg))
    except InstantNFSError as e:
        print(f"instantnfs: {e}", file=sys.stderr)
        return e.exit_code


async def _demo_main(cfg: dict[str, Any]) -> int:
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    daemon = asyncio.get_running_loop().create_task(run_daemon(cfg, ready, exit_limit=SHUTDOWN_LIMIT))
    done, _ = await asyncio.wait({daemon, ready}, return_when=asyncio.FIRST_COMPLETED)
    if daemon in done:
        return daemon.result()
    ports, control_port, api = ready.result()
    # the demo disk is 256 MiB: no 100 GiB reserve for it
    s = api.ds.sessions.get(DEMO_SESSION) or await api.ds.apublish(f"{DEMO_VM}@latest", DEMO_SESSION, reserve=1 << 30)
    view = api.session_view(s)
    host = api.host
    d = view["disks"][0]
    pm = ports.portmap or ports.portmap_external
    lines = [
        "",
        f"instantnfs demo: restore point {s.point.id} of VM {s.point.vm} is published as {view['path']}",
        "",
        f"  QEMU/KVM disk:   {d['url']}",
        f"  try:             qemu-img info {d['url']}",
        f"                   qemu-img convert -f raw -O qcow2 {d['url']} /tmp/demo-vm.qcow2",
        f"  libnfs-utils:    nfs-ls '{d['url_libnfs'].replace(d['name'] + '.img', '')}'",
        f"                   nfs-cat '{d['url_libnfs']}' | head -c 512 | od -c | head",
        "",
        "  VMware ESXi, Storage > New datastore > Mount NFS datastore, NFS 3:",
        f"      Name: instantnfs-demo    NFS server: {host}    NFS share: {api.services.mount3.export}",
        f"      then register {view['vmx']} as a VM",
        "",
        f"  ports: portmap {pm or 'off'}, mount {ports.mount}, nfs {ports.nfs}; control API http://{cfg['control']['bind']}:{control_port}/api/v1",
        "  Ctrl-C stops the server.",
        "",
    ]
    if not pm:
        lines.insert(4, "  (no portmapper: QEMU needs one on port 111; use the libnfs URL)")
    print("\n".join(lines), flush=True)
    return await daemon


# -- client commands -------------------------------------------------------------------------


def server_url(args: argparse.Namespace) -> str:
    """The daemon's base URL, from --server, $INSTANTNFS_SERVER or the config; a URL
    given with the API's ``/api/v1`` suffix (as the docs print it) is taken too."""
    url = getattr(args, "server", None) or os.environ.get("INSTANTNFS_SERVER")
    if not url:
        cfg = configmod.load(getattr(args, "config", None))
        bind = cfg["control"]["bind"]
        host = "127.0.0.1" if bind in ("0.0.0.0", "") else "::1" if bind == "::" else bind
        url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg['control']['port']}"
    url = url.rstrip("/")
    if url.endswith("/api/v1"):
        url = url[: -len("/api/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def api_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One request to the daemon's control API: its JSON answer, or InstantNFSError with
    the daemon's one-line message."""
    from engine.control.auth import find_token

    base = server_url(args)
    url = base + "/api/v1" + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    cfg = configmod.validate(configmod.load(getattr(args, "config", None)))
    token = find_token(base, cfg, getattr(args, "token_file", None))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read())
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise InstantNFSError(answer["error"]) from None
        raise InstantNFSError(f"{base} answered HTTP {e.code} ({e.reason}) to {method} /api/v1{path}: "
                              "is it an instantnfs daemon? (--server takes e.g. http://127.0.0.1:6161)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InstantNFSError(f"no instantnfs daemon at {server_url(args)} ({reason}); start one with 'instantnfs serve'") from None


def _client(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except InstantNFSError as e:
            print(f"instantnfs: {e}", file=sys.stderr)
            return e.exit_code
    return run


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _print_session(s: dict) -> None:
    print(f"{s['name']}  VM {s['vm']}  point {s['point'][:12]}  {s['path']}")
    c = s["cache"]
    print(f"  mode {s['mode']}, write cache {s['cache_dir']}: {_mib(c['allocated_bytes'])} used, {_mib(c['dirty_bytes'])} dirty")
    for d in s["disks"]:
        print(f"  {d['name']}  {d['size']} bytes, {_mib(d['dirty_bytes'])} dirty, cache {_mib(d['allocated_bytes'])}")
        if d.get("failed"):
            print(f"    FAILED:     {d['failed']}: writes since the last commit may be lost; export the disk, then unpublish")
        print(f"    QEMU:       {d['url']}")
        print(f"    libnfs:     {d['url_libnfs']}")
        print(f"    ESXi:       {d['files']['vmdk']}")


@_client
def cmd_publish(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"point": args.point, "mode": args.mode, "force": args.force}
    if args.name:
        body["name"] = args.name
    if args.cache_dir:
        body["cache_dir"] = os.path.abspath(args.cache_dir)
    if args.reserve_gib is not None:
        body["reserve_gib"] = args.reserve_gib
    s = api_call(args, "POST", "/sessions", body)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print_session(s)
    return 0


@_client
def cmd_unpublish(args: argparse.Namespace) -> int:
    api_call(args, "DELETE", f"/sessions/{urllib.parse.quote(args.name, safe='')}")
    print(f"unpublished {args.name}")
    return 0


@_client
def cmd_sessions(args: argparse.Namespace) -> int:
    sessions = api_call(args, "GET", "/sessions")
    if args.json:
        print(json.dumps(sessions, indent=2))
    elif not sessions:
        print("no sessions published")
    else:
        for s in sessions:
            _print_session(s)
    return 0


def wait_job(args: argparse.Namespace, job: dict, desc: str) -> dict:
    """Poll a job until it ends, with a progress bar on a terminal; its final state.
    Ctrl-C cancels the job in the daemon (and waits for it to end)."""
    from engine.control.progress import Progress

    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    advance: Any = None
    phase, shown = "", 0
    path = f"/jobs/{urllib.parse.quote(job['id'], safe='')}"
    try:
        with Progress(desc, enabled=False if quiet else None) as prog:
            while job["state"] == "running":
                time.sleep(0.2)
                job = api_call(args, "GET", path)
                if job["phase"] != phase and job["total"]:  # a new phase: a new bar
                    prog.close()
                    phase, shown = job["phase"], 0
                    prog.desc = f"{desc}: {phase}"
                    advance = prog.start(job["total"])
                if advance is not None and job["done"] > shown:
                    advance(job["done"] - shown)
                    shown = job["done"]
    except KeyboardInterrupt:
        print(f"instantnfs: interrupted: cancelling job {job['id']} in the daemon", file=sys.stderr, flush=True)
        job = _cancel_and_wait(args, job["id"])
    if job["state"] == "failed":
        raise InstantNFSError(job["error"] or f"job {job['id']} failed")
    if job["state"] == "cancelled":
        raise InstantNFSError(f"job {job['id']} cancelled: {job['error'] or 'nothing was left behind'}")
    return job


def _cancel_and_wait(args: argparse.Namespace, job_id: str, timeout: float = 30.0) -> dict:
    """Cancel a job and poll it until it has ended (or ``timeout``)."""
    path = f"/jobs/{urllib.parse.quote(job_id, safe='')}"
    try:
        job = api_call(args, "DELETE", path)
    except InstantNFSError:
        job = api_call(args, "GET", path)  # it ended meanwhile (409)
    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = api_call(args, "GET", path)
    return job


@_client
def cmd_export(args: argparse.Namespace) -> int:
    out = os.path.abspath(args.output)
    if args.force:
        raise UsageError("--force is gone: an export never overwrites a file; remove it first or choose a new name")
    body = {"disk": args.disk, "output": out, "format": args.format}
    job = api_call(args, "POST", f"/sessions/{urllib.parse.quote(args.session, safe='')}/export", body)
    job = wait_job(args, job, f"export {args.session}/{args.disk}")
    r = job["result"]
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"exported {args.session}/{args.disk} to {r['path']} ({r['format']}, {r['size']} bytes, "
              f"{r['passes']} passes, {_mib(r['recopied_bytes'])} copied again, {r['seconds']} s)")
    return 0


@_client
def cmd_commit(args: argparse.Namespace) -> int:
    job = api_call(args, "POST", f"/sessions/{urllib.parse.quote(args.session, safe='')}/commit", {})
    job = wait_job(args, job, f"commit {args.session}")
    r = job["result"]
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"committed session {args.session} as restore point {r['point']} of VM {r['vm']} "
              f"(parent {r['parent']}, {_mib(r['changed_bytes'])} changed, {r['passes']} passes)")
    return 0


@_client
def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = api_call(args, "GET", "/jobs")
    if args.json:
        print(json.dumps(jobs, indent=2))
    elif not jobs:
        print("no jobs")
    else:
        for j in jobs:
            progress = f"{j['phase']} {_mib(j['done'])} of {_mib(j['total'])}" if j["state"] == "running" else (j["error"] or "")
            print(f"{j['id']}  {j['kind']}  session {j['session']}  {j['state']}  {progress}".rstrip())
    return 0


@_client
def cmd_cancel(args: argparse.Namespace) -> int:
    job = _cancel_and_wait(args, args.job)
    if job["state"] == "running":
        raise InstantNFSError(f"job {args.job} is still ending; see 'instantnfs jobs'")
    print(f"job {args.job} {job['state']}")
    return 0


@_client
def cmd_status(args: argparse.Namespace) -> int:
    st = api_call(args, "GET", "/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    p = st["ports"]
    pm = p["portmap"] or (f"registered with port {p['portmap_registered_with']}" if p["portmap_registered_with"] else "off")
    print(f"instantnfs pid {st['pid']}, up {st['uptime_s']} s, repository {st['repo']}")
    print(f"  export {st['export']} on {st['bind']}: portmap {pm}, mount {p['mount']}, nfs {p['nfs']}, control {p['control']}")
    print(f"  sessions {st['sessions']}, NFS calls {st['rpc']['nfs_calls']}, cache dir {st['cache_dir']}")
    return 0


# -- argparse wiring -----------------------------------------------------------------------------


def _client_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="control API URL, e.g. http://127.0.0.1:6161 (default: $INSTANTNFS_SERVER, else the config's control address)")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--token-file", help="file holding the control API token (default: the one the daemon wrote for this "
                                        "server under ~/.local/state/instantnfs/tokens/, else control.token_file; "
                                        "or set $INSTANTNFS_TOKEN)")


def _serve_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--bind", help="address for portmap, MOUNT and NFS (default 0.0.0.0)")
    p.add_argument("--portmap", choices=("on", "off"), help="run a portmapper (or register with the one on its port)")
    p.add_argument("--portmap-port", type=int, help="portmapper port (default 111)")
    p.add_argument("--mount-port", type=int, help="MOUNT port (default 1058, next free if taken)")
    p.add_argument("--nfs-port", type=int, help="NFS port (default 2049, next free if taken)")
    p.add_argument("--export", help="export path (default /instantnfs)")
    p.add_argument("--allow", action="append", metavar="CIDR", help="allowed client network (repeatable)")
    p.add_argument("--read-only", action="store_true", default=None, help="refuse every change (NFS3ERR_ROFS)")
    p.add_argument("--export-dir", action="append", metavar="DIR",
                   help="directory exports may write into (repeatable; default <cache-dir>/exports)")
    p.add_argument("--cache-dir", help="session state and client files (default ~/.cache/instantnfs)")
    p.add_argument("--write-dir", help="default directory of the write caches (default <cache-dir>/writecache)")
    p.add_argument("--reserve-gib", type=int, help="free space a publish needs on the write-cache volume (default 100)")
    p.add_argument("--control-bind", help="control API address (default 127.0.0.1)")
    p.add_argument("--control-port", type=int, help="control API port (default 6161)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="run the NFS daemon in the foreground",
        description="Run the NFS daemon in the foreground (SIGTERM or Ctrl-C stops it).",
        epilog="The control API needs a bearer token on every request, from loopback too: control.token "
               "from the config, else a random one made at each start. The daemon writes it (mode 0600) to "
               "control.token_file (default <cache-dir>/control.token) and to "
               "~/.local/state/instantnfs/tokens/<control-bind>_<port>, where the CLI of the same user finds it.")
    p.add_argument("--repo", help="repository to serve")
    _serve_opts(p)
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "demo", help="make a demo repository from a generated disk (reused later), serve it and publish it"
    )
    p.add_argument("--dir", help="demo repository and cache (default ~/.cache/instantnfs-demo)")
    _serve_opts(p)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("publish", help="publish a restore point in the running daemon's export")
    p.add_argument("point", help="restore point id, unique prefix, 'latest' or 'VM@latest'")
    p.add_argument("--name", help="session name (directory in the export)")
    p.add_argument("--mode", choices=("instant", "sandbox"), default="instant",
                   help="instant (default): the write cache survives daemon restarts; sandbox: a temporary cache removed at unpublish or stop")
    p.add_argument("--cache-dir", help="directory for this session's write caches (default: the daemon's)")
    p.add_argument("--reserve-gib", type=float, help="free space the cache volume must have (default: the daemon's, 100)")
    p.add_argument("--force", action="store_true", help="publish even when the cache volume has less free space than the reserve")
    p.add_argument("--json", action="store_true", help="print the session as JSON")
    _client_opts(p)
    p.set_defaults(func=cmd_publish)

    p = subparsers.add_parser("unpublish", help="remove a session from the export")
    p.add_argument("name")
    _client_opts(p)
    p.set_defaults(func=cmd_unpublish)

    p = subparsers.add_parser("sessions", help="list published sessions with their nfs:// URLs")
    p.add_argument("--json", action="store_true")
    _client_opts(p)
    p.set_defaults(func=cmd_sessions)

    p = subparsers.add_parser("export", help="write a published disk (backup + write cache) to a raw or qcow2 file, while the VM runs")
    p.add_argument("session")
    p.add_argument("disk", help="disk name or index (0 = first)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="new file to write on the daemon's host, in one of its export directories (server.export_dirs)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # refused: exports never overwrite
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _client_opts(p)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("commit", help="store a session's disks (backup + write cache) as a new restore point")
    p.add_argument("session")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _client_opts(p)
    p.set_defaults(func=cmd_commit)

    p = subparsers.add_parser("jobs", help="the running daemon's export and commit jobs")
    p.add_argument("--json", action="store_true")
    _client_opts(p)
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("cancel", help="cancel a running export or commit job (it leaves nothing behind)")
    p.add_argument("job", help="job id, as 'instantnfs jobs' lists it")
    _client_opts(p)
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("status", help="the running daemon's ports and counters")
    p.add_argument("--json", action="store_true")
    _client_opts(p)
    p.set_defaults(func=cmd_status)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instantnfs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
