"""The CLI's commands that talk to a running daemon's control API: publish, unpublish,
sessions, status, export, commit, jobs, cancel.

The daemon is found from ``--server URL``, else ``$INSTANTNFS_SERVER``, else the config's
control address; its token as ``engine.control.auth.find_token`` says. ``export`` and
``commit`` start a job in the daemon (which owns the write caches) and poll it, showing
its progress on a terminal, until it ends; Ctrl-C cancels the job in the daemon.
``jobs`` lists the daemon's jobs, ``cancel JOB`` cancels one. Every failure (the
daemon's one-line error, no daemon, something else answering) is one line on stderr
and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from engine import config as configmod
from engine.errors import InstantNFSError, UsageError


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
