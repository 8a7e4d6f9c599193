"""The control API: HTTP/JSON over aiohttp, on the daemon's event loop.

Endpoints (all under ``/api/v1``; the OpenAPI document at ``/api/v1/openapi.json``):
``GET status``, ``GET points``, ``GET sessions``, ``POST sessions`` (publish),
``GET sessions/{name}``, ``DELETE sessions/{name}`` (unpublish). Errors are
``{"error": "<one line>"}`` with 400 (bad request), 404 (no such thing), 409 (name taken).

Access: on a loopback address anyone local may call it; on any other address every
request needs ``Authorization: Bearer <control.token>`` (the daemon refuses to start
on a non-loopback address without a token).

Handlers run on the loop thread, like the NFS handlers, so they see the datastore in a
consistent state without locks. Publishing opens block maps with mmap: O(1) in the disk
size.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import time
from typing import Any

from aiohttp import web

from engine.datastore import Datastore, Session
from engine.errors import InstantNFSError, NotFound, SessionError
from engine.nfs.server import NFSServices

API = "/api/v1"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def advertised_host(bind: str) -> str:
    if bind not in ("0.0.0.0", "::", ""):
        return bind
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


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
            "delete": {"summary": "Unpublish a session", "responses": {"200": {"description": "unpublished"}, "404": {"description": "no such session"}}},
        },
    },
}


class ControlAPI:
    def __init__(self, ds: Datastore, services: NFSServices, cfg: dict[str, Any]) -> None:
        self.ds = ds
        self.services = services
        self.cfg = cfg
        self.started = time.time()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.token = cfg["control"]["token"]
        self.host = advertised_host(cfg["server"]["bind"])

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
        return out

    def status_view(self) -> dict:
        p = self.services.ports
        srv = self.cfg["server"]
        cache = self.ds.repo.cache
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

    async def h_publish(self, req: web.Request) -> web.Response:
        try:
            body = await req.json()
        except ValueError:
            return self._error(400, "the request body must be JSON: {\"point\": ID, \"name\": NAME}")
        if not isinstance(body, dict) or not isinstance(body.get("point"), str):
            return self._error(400, "'point' (a restore point id, prefix or 'latest') is required")
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            return self._error(400, "'name' must be a string")
        try:
            s = self.ds.publish(body["point"], name)
        except NotFound as e:
            return self._error(404, str(e))
        except SessionError as e:
            return self._error(409 if "already published" in str(e) else 400, str(e))
        except InstantNFSError as e:
            return self._error(400, str(e))
        return web.json_response(self.session_view(s), status=201)

    async def h_unpublish(self, req: web.Request) -> web.Response:
        name = req.match_info["name"]
        if name not in self.ds.sessions:
            return self._error(404, f"no published session {name!r}")
        self.ds.unpublish(name)
        return web.json_response({"unpublished": name})

    async def h_openapi(self, req: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    @web.middleware
    async def auth(self, req: web.Request, handler: Any) -> web.StreamResponse:
        if self.token:
            got = req.headers.get("Authorization", "")
            peer = req.remote or ""
            if not _is_loopback(peer) and not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
                return self._error(401, "a bearer token is required (control.token)")
        return await handler(req)

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
                web.get(f"{API}/openapi.json", self.h_openapi),
            ]
        )
        return app

    async def start(self, bind: str, port: int) -> int:
        if not _is_loopback(bind) and not self.token:
            raise SessionError(f"the control API on {bind} (not loopback) needs control.token set")
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, bind, port, reuse_address=True)
        await site.start()
        server = site._server  # noqa: SLF001 - the only way to learn an ephemeral port
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
