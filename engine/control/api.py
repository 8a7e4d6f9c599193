"""The control API: HTTP/JSON over aiohttp, on the daemon's event loop.

Endpoints (all under ``/api/v1``; the OpenAPI document at ``/api/v1/openapi.json``):
``GET status``, ``GET points``, ``GET sessions``, ``POST sessions`` (publish),
``GET sessions/{name}``, ``DELETE sessions/{name}`` (unpublish), ``POST
sessions/{name}/export`` and ``POST sessions/{name}/commit`` (start a job), ``GET
jobs`` and ``GET jobs/{id}`` (a job's state and progress), ``DELETE jobs/{id}`` (cancel
a running job), and file-level recovery (``engine.control.files_api``): ``GET
points/{id}/files``, ``GET points/{id}/files/{vol}/ls|download|tar?path=``, and the recovery product
(``engine.control.vms_api``): ``POST recover``, ``GET vms``, ``GET vms/{name}[/console]``,
``POST sessions/{name}/boot|stop|migrate|ttl``, ``POST jobs/{id}/confirm``, ``POST
sandboxes``, ``POST points/{id}/verify``. ``POST sessions`` also takes ``disks`` (instant
disk recovery) and ``ttl_s``. Errors
are ``{"error": "<one line>"}`` with 400 (bad request), 403 (an export output outside
the export directories, or existing), 404 (no such thing), 409 (name taken, session
busy, job already ended), 422 (a volume with no filesystem this reads).

Jobs (export, commit) are ``engine.jobs``'s: a handler checks the request, starts one
there and answers 202 with its state; ``GET jobs/{id}`` reports it, ``DELETE jobs/{id}``
cancels it (waiting ``CANCEL_WAIT`` for it to end: 200 if it has, else 202). A session
with a running job cannot be unpublished (409).

Monitoring (``engine.control.metrics``), outside ``/api/v1``: ``GET /healthz`` (200 when
the daemon serves, else 503; open to all) and ``GET /metrics`` (Prometheus text format;
no token needed from loopback, the bearer token from anywhere else).

Access: every other request but ``GET openapi.json`` needs ``Authorization: Bearer <token>``,
from loopback too (``engine.control.auth`` says where the token comes from and where
the daemon writes it for the CLI); a missing or wrong token is 401. Request bodies are
checked field by field: an unknown field is a 400 naming it, so a typo is never
silently ignored.

Handlers run on the loop thread, like the NFS handlers, so they see the datastore in a
consistent state without locks. Publishing opens block maps with mmap: O(1) in the disk
size.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from typing import Any

from aiohttp import web

from engine.control import auth as authmod
from engine.control import metrics
from engine.control.files_api import FilesAPI
from engine.control.vms_api import OPENAPI_PATHS as VMS_PATHS
from engine.control.vms_api import VMsAPI
from engine.datastore import MODES, Datastore, GiB, Session
from engine.errors import InstantNFSError, NoSpace, NotFound, OutputRefused, SessionError
from engine.export import FORMATS
from engine.fsutil import NO_SPACE_ERRNOS
from engine.jobs import Jobs
from engine.nfs.server import NFSServices
from engine.recovery import Recovery

log = logging.getLogger("instantnfs.api")

API = "/api/v1"
CANCEL_WAIT = 5.0  # seconds DELETE jobs/{id} waits for the job to end before answering 202


def advertised_host(bind: str) -> str:
    if bind not in ("0.0.0.0", "::", ""):
        return bind
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _no_space(e: BaseException | None) -> bool:
    """Whether ``e``, or an error it was raised from, is a full volume."""
    while e is not None:
        if isinstance(e, NoSpace) or (isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS):
            return True
        e = e.__cause__
    return False


class BadRequest(Exception):
    """A request body the API cannot take (answered 400 with this message)."""


_PUBLISH_FIELDS: dict[str, tuple[type, ...]] = {
    "point": (str,), "name": (str,), "mode": (str,), "cache_dir": (str,), "reserve_gib": (int, float), "force": (bool,),
    "disks": (list,), "ttl_s": (int, float),
}

_EXPORT_FIELDS: dict[str, tuple[type, ...]] = {"disk": (str, int), "output": (str,), "format": (str,)}

_JOB_SCHEMA = {"type": "object", "description": "a job: state running|done|failed|cancelled, phase, done/total, result or error"}

_POINT_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                "description": "restore point id, unique prefix, 'latest' or 'VM@latest'"}
_VOL_PARAM = {"name": "vol", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "volume: disk0, disk0:1, disk0:vg0/root (as 'files' lists them), or '-' for the only filesystem"}
_PATH_PARAM = {"name": "path", "in": "query", "required": False, "schema": {"type": "string", "default": "/"},
               "description": "absolute path in the guest filesystem"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "instantnfs control API", "version": "1"},
    "paths": {
        f"{API}/status": {"get": {"summary": "Server status: ports, export, sessions, counters", "responses": {"200": {"description": "status"}}}},
        f"{API}/points": {"get": {"summary": "Restore points in the served repository", "responses": {"200": {"description": "points"}}}},
        f"{API}/sessions": {
            "get": {"summary": "Published sessions with their files and nfs:// URLs", "responses": {"200": {"description": "sessions"}}},
            "post": {
                "summary": "Publish a restore point",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["point"],
                                "properties": {
                                    "point": {"type": "string", "description": "id, unique id prefix, 'latest' or 'VM@latest'"},
                                    "name": {"type": "string", "description": "session name (directory in the export)"},
                                    "mode": {"type": "string", "enum": list(MODES), "description": "instant (default): the write cache survives restarts; sandbox: a temporary cache removed at unpublish or daemon stop"},
                                    "cache_dir": {"type": "string", "description": "directory for this session's write caches (default: the daemon's)"},
                                    "reserve_gib": {"type": "number", "description": "free space the cache volume must have (default cache.reserve_gib)"},
                                    "force": {"type": "boolean", "description": "publish even when the cache volume has less free space than the reserve"},
                                    "disks": {"type": "array", "items": {"type": "string"},
                                              "description": "only these disks of the point (names or indexes): instant disk recovery, to attach to another VM"},
                                    "ttl_s": {"type": "number", "description": "seconds after which the daemon unpublishes the session (and stops its VM)"},
                                },
                            }
                        }
                    },
                },
                "responses": {"201": {"description": "the session"}, "404": {"description": "no such point"}, "409": {"description": "name taken"}},
            },
        },
        f"{API}/sessions/{{name}}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "One session", "responses": {"200": {"description": "the session"}, "404": {"description": "no such session"}}},
            "delete": {"summary": "Unpublish a session (its write caches are removed)", "responses": {"200": {"description": "unpublished"}, "404": {"description": "no such session"}, "409": {"description": "a job is running on it"}}},
        },
        f"{API}/sessions/{{name}}/export": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {
                "summary": "Start exporting one disk (backup + write cache) to a file on the daemon's host, while clients keep writing",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["disk", "output"],
                    "properties": {
                        "disk": {"type": "string", "description": "disk name or index"},
                        "output": {"type": "string", "description": "absolute path of a new file in one of the daemon's export directories (server.export_dirs)"},
                        "format": {"type": "string", "enum": list(FORMATS), "default": "raw"},
                    },
                }}}},
                "responses": {"202": {"description": "the job", "content": {"application/json": {"schema": _JOB_SCHEMA}}},
                              "400": {"description": "bad request"}, "403": {"description": "output exists or is outside the export directories"},
                              "404": {"description": "no such session or disk"}},
            },
        },
        f"{API}/sessions/{{name}}/commit": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {
                "summary": "Start storing the session's merged disks as a new restore point of its VM",
                "responses": {"202": {"description": "the job; its result is the new point's manifest summary", "content": {"application/json": {"schema": _JOB_SCHEMA}}},
                              "404": {"description": "no such session"},
                              "409": {"description": "the session publishes only some of its point's disks"}},
            },
        },
        f"{API}/points/{{id}}/files": {
            "parameters": [_POINT_PARAM],
            "get": {"summary": "The point's disks, partitions and LVM volumes, with the filesystem each holds (or why none)",
                    "responses": {"200": {"description": "{point, volumes: [{name, kind, size, label, disk, filesystem, note...}]}"},
                                  "404": {"description": "no such point"}}},
        },
        f"{API}/points/{{id}}/files/{{vol}}/ls": {
            "parameters": [_POINT_PARAM, _VOL_PARAM, _PATH_PARAM],
            "get": {"summary": "A directory's entries (or the one file), streamed as they are read",
                    "responses": {"200": {"description": "{point, volume, filesystem, journal, path, entries: [{name, path, type, inode, size, mode, uid, gid, nlink, mtime, atime, ctime, link?}], error?}"},
                                  "400": {"description": "bad path or volume"}, "404": {"description": "no such point, volume or path"},
                                  "422": {"description": "no filesystem this reads on the volume"}}},
        },
        f"{API}/points/{{id}}/files/{{vol}}/download": {
            "parameters": [_POINT_PARAM, _VOL_PARAM, _PATH_PARAM],
            "get": {"summary": "A file's bytes, streamed (Content-Length given; a read failure part-way closes the connection early)",
                    "responses": {"200": {"description": "the bytes", "content": {"application/octet-stream": {}}},
                                  "400": {"description": "not a regular file"}, "404": {"description": "no such point, volume or path"}}},
        },
        f"{API}/points/{{id}}/files/{{vol}}/tar": {
            "parameters": [_POINT_PARAM, _VOL_PARAM, _PATH_PARAM],
            "get": {"summary": "A tar (PAX) of a tree, streamed: names relative and sanitised as 'files get' does, symlinks as "
                               "symlinks, hard links as hard-link members, special files, xattrs and ACLs left out",
                    "responses": {"200": {"description": "the tar", "content": {"application/x-tar": {}}},
                                  "404": {"description": "no such point, volume or path"}}},
        },
        f"{API}/openapi.json": {"get": {"summary": "This document. No token needed", "security": [],
                                        "responses": {"200": {"description": "the OpenAPI 3 document"}}}},
        "/healthz": {"get": {
            "summary": "Whether the daemon serves: NFS and MOUNT listening, the repository readable. No token needed",
            "security": [],
            "responses": {"200": {"description": '{"status": "ok", "nfs": true, "repository": true}'},
                          "503": {"description": '{"status": "unavailable", "nfs": ..., "repository": ..., "reason": "..."}'}}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format 0.0.4): RPC calls and latency histograms per procedure, bytes, "
                       "decompression cache, write caches per session, sessions, jobs, connections. No token needed "
                       "from loopback; the bearer token from any other address",
            "responses": {"200": {"description": "the metrics", "content": {"text/plain": {}}},
                          "401": {"description": "no valid token, from an address other than loopback"}}}},
        f"{API}/jobs": {"get": {"summary": "Export and commit jobs of this daemon", "responses": {"200": {"description": "jobs"}}}},
        f"{API}/jobs/{{id}}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "One job: state, phase, progress (done/total), result or error",
                    "responses": {"200": {"description": "the job", "content": {"application/json": {"schema": _JOB_SCHEMA}}}, "404": {"description": "no such job"}}},
            "delete": {"summary": "Cancel a running job: it ends 'cancelled', leaving no output file and no restore point",
                       "responses": {"200": {"description": "the job, ended", "content": {"application/json": {"schema": _JOB_SCHEMA}}},
                                     "202": {"description": "the job, still ending", "content": {"application/json": {"schema": _JOB_SCHEMA}}},
                                     "404": {"description": "no such job"}, "409": {"description": "the job has already ended"}}},
        },
    },
}


OPENAPI["paths"].update({API + path: spec for path, spec in VMS_PATHS.items()})


class ControlAPI:
    def __init__(self, ds: Datastore, services: NFSServices, jobs: Jobs, cfg: dict[str, Any],
                 recovery: Recovery) -> None:
        self.ds = ds
        self.services = services
        self.jobs = jobs
        self.cfg = cfg
        self.recovery = recovery
        self.started = time.time()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.token: str = cfg["control"]["token"] or authmod.new_token()
        self._token_files: list = []
        self.host = advertised_host(cfg["server"]["bind"])
        self.files = FilesAPI(ds.stack, API)
        self.vms = VMsAPI(recovery, API, self._body, self._error, self.session_view)
        self.metrics = metrics.registry(metrics.DaemonCollector(ds, services, jobs))

    # -- views -------------------------------------------------------------------------------

    def urls(self, s: Session, filename: str) -> dict[str, str]:
        export = self.services.mount3.export
        ports = self.services.ports
        base = f"nfs://{self.host}{export}/{s.name}/{filename}"
        return {"url": base, "url_libnfs": f"{base}?version=3&nfsport={ports.nfs}&mountport={ports.mount}"}

    def session_view(self, s: Session) -> dict:
        out = self.ds.session_json(s)
        export = self.services.mount3.export
        out["path"] = f"{export}/{s.name}"
        for d in out["disks"]:
            d["files"] = {
                "vmdk": f"{export}/{s.name}/{d['name']}.vmdk",
                "flat": f"{export}/{s.name}/{d['name']}-flat.vmdk",
                "img": f"{export}/{s.name}/{d['name']}.img",
            }
            d.update(self.urls(s, f"{d['name']}.img"))
        out["vmx"] = f"{export}/{s.name}/{s.point.vm}.vmx"
        vm = self.recovery.vm_of(s.name)
        out["vm"] = vm.to_json() if vm is not None else None
        return out

    def status_view(self) -> dict:
        p = self.services.ports
        srv = self.cfg["server"]
        cache = self.ds.stack.cache
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "repo": str(self.ds.repo.path),
            "cache_dir": str(self.ds.cache_dir),
            "export": self.services.mount3.export,
            "bind": srv["bind"],
            "host": self.host,
            "ports": {
                "portmap": p.portmap,
                "portmap_registered_with": p.portmap_external,
                "mount": p.mount,
                "nfs": p.nfs,
                "control": self.port,
            },
            "sessions": len(self.ds.sessions),
            "rpc": {
                "nfs_calls": self.services.nfs_rpc.calls,
                "nfs_io_calls": self.services.nfs_rpc.io_calls,
                "nfs_procs": self._nfs_stats(),
                "mount_calls": self.services.mount_rpc.calls,
                "drc_hits": self.services.nfs_rpc.drc.hits,
            },
            "chunk_cache": {"bytes": cache.size, "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses},
        }

    def _nfs_stats(self) -> dict[str, int]:
        prog = self.services.nfs_rpc.programs.get(100003)
        return dict(prog.stats) if prog else {}

    # -- handlers ----------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, msg: str) -> web.Response:
        return web.json_response({"error": msg}, status=status)

    async def h_status(self, req: web.Request) -> web.Response:
        return web.json_response(self.status_view())

    async def h_points(self, req: web.Request) -> web.Response:
        return web.json_response([p.to_json() for p in self.ds.repo.points()])

    async def h_sessions(self, req: web.Request) -> web.Response:
        return web.json_response([self.session_view(s) for s in sorted(self.ds.sessions.values(), key=lambda s: s.name)])

    async def h_session(self, req: web.Request) -> web.Response:
        s = self.ds.sessions.get(req.match_info["name"])
        if s is None:
            return self._error(404, f"no published session {req.match_info['name']!r}")
        return web.json_response(self.session_view(s))

    async def _body(self, req: web.Request, fields: dict[str, tuple[type, ...]], required: tuple[str, ...], usage: str) -> dict:
        """The request's JSON object, each field of an allowed type; raises BadRequest."""
        try:
            body = await req.json() if req.can_read_body else {}
        except ValueError:
            raise BadRequest(f"the request body must be JSON: {usage}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the request body must be a JSON object: {usage}")
        for k, v in body.items():
            if k not in fields:
                raise BadRequest(f"unknown field {k!r} (allowed: {', '.join(fields)})")
            types = fields[k]
            if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
                raise BadRequest(f"field {k!r} must be {' or '.join(t.__name__ for t in types)}, not {type(v).__name__}")
        for k in required:
            if body.get(k) is None:
                raise BadRequest(f"field {k!r} is required: {usage}")
        return body

    async def h_publish(self, req: web.Request) -> web.Response:
        try:
            body = await self._body(req, _PUBLISH_FIELDS, ("point",), '{"point": ID, "name": NAME}')
        except BadRequest as e:
            return self._error(400, str(e))
        name = body.get("name")
        mode = body.get("mode") or "instant"
        cache_dir = body.get("cache_dir")
        reserve = body.get("reserve_gib")
        force = bool(body.get("force", False))
        if mode not in MODES:
            return self._error(400, f"'mode' must be one of {', '.join(MODES)}")
        if cache_dir is not None and not os.path.isabs(cache_dir):
            return self._error(400, "'cache_dir' must be an absolute path")
        if reserve is not None and reserve < 0:
            return self._error(400, "'reserve_gib' must be a number of GiB, 0 or more")
        disks = body.get("disks")
        if disks is not None and (not disks or not all(isinstance(d, (str, int)) and not isinstance(d, bool) for d in disks)):
            return self._error(400, "'disks' must be a non-empty list of disk names or indexes")
        ttl = body.get("ttl_s")
        if ttl is not None and not ttl > 0:
            return self._error(400, "'ttl_s' must be a number of seconds, more than 0")
        try:
            s = await self.ds.apublish(body["point"], name, mode=mode, cache_dir=cache_dir,
                                       reserve=None if reserve is None else int(reserve * GiB), force=force,
                                       disks=None if disks is None else [str(d) for d in disks], ttl=ttl)
        except (InstantNFSError, OSError) as e:
            if _no_space(e):
                return self._error(507, str(e) if isinstance(e, InstantNFSError) else
                                   f"cannot publish {body['point']}: no space left on the cache volume ({e.filename or ''})")
            if isinstance(e, NotFound):
                return self._error(404, str(e))
            if isinstance(e, SessionError):
                return self._error(409 if "already published" in str(e) else 400, str(e))
            if isinstance(e, InstantNFSError):
                return self._error(400, str(e))
            log.warning("publish of %s failed: %s", body["point"], e)
            return self._error(400, f"cannot publish {body['point']}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
        return web.json_response(self.session_view(s), status=201)

    async def h_unpublish(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        if name not in self.ds.sessions:
            return self._error(404, f"no published session {name!r}")
        try:
            await self.ds.aunpublish(name)
        except SessionError as e:
            return self._error(409, str(e))
        return web.json_response({"unpublished": name})

    # -- jobs ----------------------------------------------------------------------------------

    def _job_session(self, req: web.Request) -> Session:
        s = self.ds.sessions.get(req.match_info["name"])
        if s is None:
            raise NotFound(f"no published session {req.match_info['name']!r}")
        return s

    async def h_export(self, req: web.Request) -> web.Response:
        try:
            s = self._job_session(req)
        except NotFound as e:
            return self._error(404, str(e))
        try:
            body = await self._body(req, _EXPORT_FIELDS, ("disk", "output"),
                                    '{"disk": NAME, "output": PATH, "format": "raw"}')
        except BadRequest as e:
            return self._error(400, str(e))
        fmt = body.get("format") or "raw"
        out = body.get("output")
        if fmt not in FORMATS:
            return self._error(400, f"'format' must be one of {', '.join(FORMATS)}")
        if not isinstance(out, str) or not os.path.isabs(out) or "\0" in out:
            return self._error(400, "'output' must be an absolute path on the daemon's host")
        try:
            job = await self.jobs.export(s, str(body.get("disk", "")), out, fmt)
        except NotFound as e:
            return self._error(404, str(e))
        except OutputRefused as e:
            return self._error(403, str(e))
        except InstantNFSError as e:
            return self._error(400, str(e))
        return web.json_response(job.view(), status=202)

    async def h_commit(self, req: web.Request) -> web.Response:
        try:
            s = self._job_session(req)
        except NotFound as e:
            return self._error(404, str(e))
        try:
            await self._body(req, {}, (), "{} (commit takes no options)")
        except BadRequest as e:
            return self._error(400, str(e))
        try:
            job = self.jobs.commit(s)
        except SessionError as e:
            return self._error(409, str(e))
        return web.json_response(job.view(), status=202)

    async def h_jobs(self, req: web.Request) -> web.Response:
        return web.json_response([j.view() for j in self.jobs.all()])

    async def h_job(self, req: web.Request) -> web.Response:
        j = self.jobs.get(req.match_info["id"])
        if j is None:
            return self._error(404, f"no job {req.match_info['id']!r}")
        return web.json_response(j.view())

    async def h_cancel(self, req: web.Request) -> web.Response:
        j = self.jobs.get(req.match_info["id"])
        if j is None:
            return self._error(404, f"no job {req.match_info['id']!r}")
        if j.state != "running":
            return self._error(409, f"job {j.id} has already ended ({j.state})")
        await self.jobs.cancel(j, CANCEL_WAIT)
        return web.json_response(j.view(), status=200 if j.state != "running" else 202)

    async def h_openapi(self, req: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def h_healthz(self, req: web.Request) -> web.Response:
        status, body = await metrics.health(self.services, self.ds.repo.path)
        return web.json_response(body, status=status)

    async def h_metrics(self, req: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.metrics), headers={"Content-Type": metrics.CONTENT_TYPE})

    @web.middleware
    async def auth(self, req: web.Request, handler: Any) -> web.StreamResponse:
        if req.path != f"{API}/openapi.json" and not metrics.open_route(req.path, req.remote):
            got = req.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(errors="replace"), f"Bearer {self.token}".encode()):
                return self._error(401, "a valid bearer token is required: the CLI reads it from the file the daemon "
                                        "writes (see 'instantnfs serve --help'), or set $INSTANTNFS_TOKEN")
        try:
            return await handler(req)
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - a bug: one line to the caller, the traceback to the log
            log.exception("control API %s %s failed", req.method, req.path)
            return self._error(500, f"internal error: {e!r} (see the daemon's log)")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth])  # type: ignore[list-item]
        app.add_routes(
            [
                web.get(f"{API}/status", self.h_status),
                web.get(f"{API}/points", self.h_points),
                web.get(f"{API}/sessions", self.h_sessions),
                web.post(f"{API}/sessions", self.h_publish),
                web.get(f"{API}/sessions/{{name}}", self.h_session),
                web.delete(f"{API}/sessions/{{name}}", self.h_unpublish),
                web.post(f"{API}/sessions/{{name}}/export", self.h_export),
                web.post(f"{API}/sessions/{{name}}/commit", self.h_commit),
                web.get(f"{API}/jobs", self.h_jobs),
                web.get(f"{API}/jobs/{{id}}", self.h_job),
                web.delete(f"{API}/jobs/{{id}}", self.h_cancel),
                web.get(f"{API}/openapi.json", self.h_openapi),
                web.get("/healthz", self.h_healthz),
                web.get("/metrics", self.h_metrics),
                *self.files.routes(),
                *self.vms.routes(),
            ]
        )
        return app

    async def start(self, bind: str, port: int) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, bind, port, reuse_address=True)
        await site.start()
        server = site._server  # noqa: SLF001 - the only way to learn an ephemeral port
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port  # type: ignore[attr-defined]
        hosts = ["127.0.0.1", "localhost", "::1"] if bind in ("0.0.0.0", "::", "") else [bind]
        self._token_files = [authmod.default_token_file(self.cfg)] + [authmod.index_path(h, self.port) for h in hosts]
        written = 0
        for path in self._token_files:
            try:
                await asyncio.get_running_loop().run_in_executor(None, authmod.write_token, path, self.token)
                written += 1
            except OSError as e:  # e.g. a full cache volume: serve anyway (the index entry may still be there)
                log.warning("cannot write the control token to %s: %s", path, e.strerror or e)
            except InstantNFSError:
                await self._runner.cleanup()
                raise
        if not written:
            log.warning("the control token was written nowhere: give it to the CLI by hand ($INSTANTNFS_TOKEN) "
                        "or set control.token in the configuration")
        return self.port

    async def stop(self) -> None:
        """Stop answering (the daemon has stopped the jobs first: ``Jobs.stop``) and remove
        the per-user token index entries."""
        if self._runner is not None:
            await self._runner.cleanup()
        self.files.stop()
        for path in self._token_files[1:]:  # the index entry; token_file stays for the next start
            authmod.remove_token(path, self.token)
