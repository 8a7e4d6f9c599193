"""The CLI's commands that talk to a running daemon's control API: publish, unpublish,
sessions, status, export, commit, jobs, cancel.

The daemon is found from ``--server URL``, else ``$INSTANTNFS_SERVER``, else the config's
control address; its token as ``engine.control.auth.find_token`` says. ``export`` and
``commit`` start a job in the daemon (which owns the write caches) and poll it, showing
its progress on a terminal, until it ends; Ctrl-C cancels the job in the daemon.
``jobs`` lists the daemon's jobs, ``cancel JOB`` cancels one.

Every command takes one path: ``api_call`` makes each request and turns every failure
(the daemon's one-line error, no daemon, something there that is not one) into an
InstantNFSError of one line; the ``command`` decorator prints the command's answer
(``--json``: the JSON document, else the command's human form) or that one line on
stderr with a non-zero exit status. A command body only calls and returns.
"""
from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
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


_NOT_A_DAEMON = "is it an instantnfs daemon? (--server takes e.g. http://127.0.0.1:6161)"


def api_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One request to the daemon's control API: its JSON answer. Every failure is an
    InstantNFSError of one line: the daemon's own message, no daemon there, or something
    there that is not one (an HTTP error without the API's error body, an answer that is
    not JSON, or no HTTP at all)."""
    from engine.control.auth import find_token

    base = server_url(args)
    what = f"{method} /api/v1{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + "/api/v1" + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    cfg = configmod.validate(configmod.load(getattr(args, "config", None)))
    token = find_token(base, cfg, getattr(args, "token_file", None))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        answer = _json_body(e)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise InstantNFSError(answer["error"]) from None
        raise InstantNFSError(f"{base} answered HTTP {e.code} ({e.reason}) to {what}: {_NOT_A_DAEMON}") from None
    except http.client.HTTPException as e:
        raise InstantNFSError(f"{base} did not answer {what} in HTTP ({type(e).__name__}): {_NOT_A_DAEMON}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InstantNFSError(f"no instantnfs daemon at {base} ({reason}); start one with 'instantnfs serve'") from None
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise InstantNFSError(f"{base} answered {what} with something that is not JSON: {_NOT_A_DAEMON}") from None


def _json_body(e: urllib.error.HTTPError) -> Any:
    """An HTTP error's JSON body, or None (not JSON, or not readable)."""
    try:
        return json.loads(e.read())
    except (ValueError, OSError, http.client.HTTPException):
        return None


Show = Callable[[argparse.Namespace, Any], None]


def command(show: Show) -> Callable[[Callable[[argparse.Namespace], Any]], Callable[[argparse.Namespace], int]]:
    """The one way a client command ends. The command makes its calls (``api_call``) and
    returns the answer; this prints it, as JSON with ``--json``, else with
    ``show(args, answer)``, and returns 0; or it prints the command's failure (an
    InstantNFSError: ``api_call``'s one line, a failed job) as one line on stderr and
    returns its exit status."""
    def wrap(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                answer = fn(args)
            except InstantNFSError as e:
                print(f"instantnfs: {e}", file=sys.stderr)
                return e.exit_code
            if getattr(args, "json", False):
                print(json.dumps(answer, indent=2))
            else:
                show(args, answer)
            return 0
        return run
    return wrap


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


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# -- sessions and status -------------------------------------------------------------------


@command(lambda args, s: _print_session(s))
def cmd_publish(args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"point": args.point, "mode": args.mode, "force": args.force}
    if args.name:
        body["name"] = args.name
    if args.cache_dir:
        body["cache_dir"] = os.path.abspath(args.cache_dir)
    if args.reserve_gib is not None:
        body["reserve_gib"] = args.reserve_gib
    if args.disk:
        body["disks"] = args.disk
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    return api_call(args, "POST", "/sessions", body)


@command(lambda args, _answer: print(f"unpublished {args.name}"))
def cmd_unpublish(args: argparse.Namespace) -> Any:
    return api_call(args, "DELETE", f"/sessions/{_quoted(args.name)}")


def _show_sessions(args: argparse.Namespace, sessions: list[dict]) -> None:
    if not sessions:
        print("no sessions published")
    for s in sessions:
        _print_session(s)


@command(_show_sessions)
def cmd_sessions(args: argparse.Namespace) -> Any:
    return api_call(args, "GET", "/sessions")


def _show_status(args: argparse.Namespace, st: dict) -> None:
    p = st["ports"]
    pm = p["portmap"] or (f"registered with port {p['portmap_registered_with']}" if p["portmap_registered_with"] else "off")
    print(f"instantnfs pid {st['pid']}, up {st['uptime_s']} s, repository {st['repo']}")
    print(f"  export {st['export']} on {st['bind']}: portmap {pm}, mount {p['mount']}, nfs {p['nfs']}, control {p['control']}")
    print(f"  sessions {st['sessions']}, NFS calls {st['rpc']['nfs_calls']}, cache dir {st['cache_dir']}")


@command(_show_status)
def cmd_status(args: argparse.Namespace) -> Any:
    return api_call(args, "GET", "/status")


# -- jobs ----------------------------------------------------------------------------------


def wait_job(args: argparse.Namespace, job: dict, desc: str) -> dict:
    """Poll a job until it ends, with a progress bar on a terminal; its final state.
    Ctrl-C cancels the job in the daemon (and waits for it to end)."""
    from engine.control.progress import Progress

    quiet = getattr(args, "quiet", False) or getattr(args, "json", False)
    advance: Any = None
    phase, shown = "", 0
    path = f"/jobs/{_quoted(job['id'])}"
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
    path = f"/jobs/{_quoted(job_id)}"
    try:
        job = api_call(args, "DELETE", path)
    except InstantNFSError:
        job = api_call(args, "GET", path)  # it ended meanwhile (409)
    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = api_call(args, "GET", path)
    return job


@command(lambda args, r: print(f"exported {args.session}/{args.disk} to {r['path']} ({r['format']}, {r['size']} bytes, "
                               f"{r['passes']} passes, {_mib(r['recopied_bytes'])} copied again, {r['seconds']} s)"))
def cmd_export(args: argparse.Namespace) -> Any:
    out = os.path.abspath(args.output)
    if args.force:
        raise UsageError("--force is gone: an export never overwrites a file; remove it first or choose a new name")
    body = {"disk": args.disk, "output": out, "format": args.format}
    job = api_call(args, "POST", f"/sessions/{_quoted(args.session)}/export", body)
    return wait_job(args, job, f"export {args.session}/{args.disk}")["result"]


@command(lambda args, r: print(f"committed session {args.session} as restore point {r['point']} of VM {r['vm']} "
                               f"(parent {r['parent']}, {_mib(r['changed_bytes'])} changed, {r['passes']} passes)"))
def cmd_commit(args: argparse.Namespace) -> Any:
    job = api_call(args, "POST", f"/sessions/{_quoted(args.session)}/commit", {})
    return wait_job(args, job, f"commit {args.session}")["result"]


def _show_jobs(args: argparse.Namespace, jobs: list[dict]) -> None:
    if not jobs:
        print("no jobs")
    for j in jobs:
        progress = f"{j['phase']} {_mib(j['done'])} of {_mib(j['total'])}" if j["state"] == "running" else (j["error"] or "")
        print(f"{j['id']}  {j['kind']}  session {j['session']}  {j['state']}  {progress}".rstrip())


@command(_show_jobs)
def cmd_jobs(args: argparse.Namespace) -> Any:
    return api_call(args, "GET", "/jobs")


@command(lambda args, job: print(f"job {args.job} {job['state']}"))
def cmd_cancel(args: argparse.Namespace) -> Any:
    job = _cancel_and_wait(args, args.job)
    if job["state"] == "running":
        raise InstantNFSError(f"job {args.job} is still ending; see 'instantnfs jobs'")
    return job
