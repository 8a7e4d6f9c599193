"""The control API of the recovery product (``engine.recovery``): recover, the VMs,
boot, stop, migrate, sandboxes, verify.

Routes (under ``/api/v1``, behind the bearer token like every other; documented in
``OPENAPI_PATHS``, which the API merges into its OpenAPI document):

- ``POST recover`` {point, name?, cache_dir?, boot?, memory_mib?, cpus?, disk_bus?, net?,
  firmware?, disks?} -> 201 {session, vm}: publish (instant) and boot.
- ``GET vms``, ``GET vms/{name}``, ``GET vms/{name}/console?offset=N`` (the serial
  console from byte N: {text, offset}, so a caller follows it).
- ``POST sessions/{name}/boot`` {hardware as recover} -> 201 the VM.
- ``POST sessions/{name}/stop`` {discard?} -> 200.
- ``POST sessions/{name}/migrate`` {to, format?} -> 202 a job; ``POST jobs/{id}/confirm``
  (a copy migrate: the VM run elsewhere has stopped) -> 200 the job.
- ``POST sandboxes`` {point, count, ttl_s, boot?, name?, ...hardware} -> 201 [{session, vm, expires}];
  ``POST sessions/{name}/ttl`` {ttl_s} gives one a new time to live (extend or end soon).
- ``POST points/{id}/verify`` {boot?, timeout_s?, tests?, script?, heartbeat?, disk_bus?,
  memory_mib?} -> 202 a job whose result is the report.

Errors as everywhere in the API: ``{"error": ...}`` with 400 (bad field), 403 (a
target outside the export directories and devices), 404, 409 (a VM already running, a
job already ended). Blocking work happens in ``Recovery`` (admin pool or jobs), never
on the loop; reading a console is a bounded read in the default executor.
"""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from engine.errors import InstantNFSError, NotFound, OutputRefused, SessionError, UsageError
from engine.recovery import Recovery, vm_view

CONSOLE_MAX = 1 << 20  # bytes of serial console one GET returns at most

_HW = {"memory_mib": (int,), "cpus": (int,), "disk_bus": (str,), "net": (str,), "firmware": (str,),
       "guest_config": (str,)}
RECOVER_FIELDS: dict[str, tuple[type, ...]] = {"point": (str,), "name": (str,), "cache_dir": (str,), "boot": (bool,),
                                               "disks": (list,), **_HW}
BOOT_FIELDS: dict[str, tuple[type, ...]] = dict(_HW)
STOP_FIELDS: dict[str, tuple[type, ...]] = {"discard": (bool,)}
MIGRATE_FIELDS: dict[str, tuple[type, ...]] = {"to": (str,), "format": (str,)}
SANDBOX_FIELDS: dict[str, tuple[type, ...]] = {"point": (str,), "count": (int,), "ttl_s": (int, float), "boot": (bool,),
                                               "name": (str,), "cache_dir": (str,), **_HW}
VERIFY_FIELDS: dict[str, tuple[type, ...]] = {"boot": (bool,), "timeout_s": (int, float), "tests": (list,),
                                              "script": (str,), "heartbeat": (str,), "disk_bus": (str,),
                                              "memory_mib": (int,), "guest_config": (str,)}

_HW_PROPS = {
    "memory_mib": {"type": "integer", "description": "memory (default: as recorded at backup)"},
    "cpus": {"type": "integer", "description": "virtual CPUs (default: as recorded at backup)"},
    "disk_bus": {"type": "string", "enum": ["virtio", "scsi", "sata", "ide"], "default": "virtio"},
    "net": {"type": "string", "description": "none | user | bridge:NAME (default user)"},
    "firmware": {"type": "string", "enum": ["bios", "efi"], "description": "default: as recorded at backup"},
    "guest_config": {"type": "string", "description": "text (at most 4 KiB) the guest reads as QEMU fw_cfg "
                                                       "opt/instantnfs/config; ${VM} becomes the VM's name"},
}
_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_JOB = {"description": "the job", "content": {"application/json": {"schema": {"type": "object"}}}}


def _body_schema(props: dict, required: list[str]) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"type": "object", "required": required,
                                                                          "properties": props}}}}


OPENAPI_PATHS: dict[str, dict] = {
    "/recover": {"post": {
        "summary": "Instant VM recovery: publish a point (instant mode) and, with boot, run it under QEMU from nfs://",
        "requestBody": _body_schema({"point": {"type": "string"}, "name": {"type": "string"},
                                     "cache_dir": {"type": "string"}, "boot": {"type": "boolean"},
                                     "disks": {"type": "array", "items": {"type": "string"}}, **_HW_PROPS}, ["point"]),
        "responses": {"201": {"description": "{session, vm}"}, "400": {"description": "bad request"},
                      "404": {"description": "no such point"}, "409": {"description": "name taken"}}}},
    "/vms": {"get": {"summary": "The VMs this daemon runs (and ran): state, pid, disks, forwards",
                     "responses": {"200": {"description": "VMs"}}}},
    "/vms/{name}": {"parameters": _NAME, "get": {
        "summary": "One VM", "responses": {"200": {"description": "the VM"}, "404": {"description": "no such VM"}}}},
    "/vms/{name}/console": {"parameters": _NAME + [{"name": "offset", "in": "query", "required": False,
                                                     "schema": {"type": "integer", "default": 0}}],
                            "get": {"summary": "The VM's serial console from byte offset (at most 1 MiB): {text, offset}",
                                    "responses": {"200": {"description": "{text, offset: where to go on from}"},
                                                  "404": {"description": "no such VM"}}}},
    "/sessions/{name}/boot": {"parameters": _NAME, "post": {
        "summary": "Run the session's VM under QEMU (disks from nfs://, werror/rerror=stop, its own process group)",
        "requestBody": _body_schema(_HW_PROPS, []),
        "responses": {"201": {"description": "the VM"}, "404": {"description": "no such session"},
                      "409": {"description": "its VM is already running"}}}},
    "/sessions/{name}/stop": {"parameters": _NAME, "post": {
        "summary": "Power the session's VM off; with discard, unpublish the session too (its writes are lost)",
        "requestBody": _body_schema({"discard": {"type": "boolean"}}, []),
        "responses": {"200": {"description": "{session, vm, unpublished}"}, "404": {"description": "no such session"}}}},
    "/sessions/{name}/migrate": {"parameters": _NAME, "post": {
        "summary": "Move the session's disks to production storage while the VM runs: live mirror for a VM this daemon "
                   "runs; for one run elsewhere, copy, then wait for POST jobs/{id}/confirm, then a final pass",
        "requestBody": _body_schema({"to": {"type": "string", "description": "a directory in the export directories, "
                                                                            "or a device in server.migrate_devices"},
                                     "format": {"type": "string", "enum": ["raw", "qcow2"], "default": "raw"}}, ["to"]),
        "responses": {"202": _JOB, "400": {"description": "bad request"},
                      "403": {"description": "target outside the export directories and devices, or existing"},
                      "404": {"description": "no such session"}}}},
    "/sessions/{name}/ttl": {"parameters": _NAME, "post": {
        "summary": "A new time to live for a session (a sandbox), from now; null: no expiry. Kept across restarts",
        "requestBody": _body_schema({"ttl_s": {"type": "number", "nullable": True}}, []),
        "responses": {"200": {"description": "the session"}, "400": {"description": "bad ttl"},
                      "404": {"description": "no such session"}}}},
    "/jobs/{id}/confirm": {"parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                           "post": {"summary": "Confirm a copy migrate's VM has stopped: its final pass runs",
                                    "responses": {"200": _JOB, "404": {"description": "no such migrate job waiting"},
                                                  "409": {"description": "the job has ended"}}}},
    "/sandboxes": {"post": {
        "summary": "N throw-away copies of one point, sharing the decompression cache, ended after ttl_s (also "
                   "across daemon restarts); with boot, each runs isolated (no route out)",
        "requestBody": _body_schema({"point": {"type": "string"}, "count": {"type": "integer"},
                                     "ttl_s": {"type": "number"}, "boot": {"type": "boolean"},
                                     "name": {"type": "string"}, "cache_dir": {"type": "string"}, **_HW_PROPS},
                                    ["point", "count", "ttl_s"]),
        "responses": {"201": {"description": "[{session, vm, expires}]"}, "400": {"description": "bad request"},
                      "404": {"description": "no such point"}}}},
    "/points/{id}/verify": {"parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                            "post": {
        "summary": "Verify a backup: every chunk read and checked, the filesystems recognised (a bad block named with "
                   "its file); with boot, an isolated boot, the heartbeat, the tests. The job's result is the report",
        "requestBody": _body_schema({"boot": {"type": "boolean"}, "timeout_s": {"type": "number"},
                                     "tests": {"type": "array", "items": {"type": "string"},
                                               "description": "tcp:PORT, http:PORT[/path]"},
                                     "script": {"type": "string", "description": "an executable on the daemon's host"},
                                     "heartbeat": {"type": "string", "description": "console regex (default: a login "
                                                                                    "prompt or GUEST-HEARTBEAT)"},
                                     "disk_bus": {"type": "string"}, "memory_mib": {"type": "integer"},
                                     "guest_config": _HW_PROPS["guest_config"]}, []),
        "responses": {"202": _JOB, "400": {"description": "bad request"}, "404": {"description": "no such point"}}}},
}


class VMsAPI:
    def __init__(self, rec: Recovery, prefix: str, body: Any, error: Any, session_view: Any) -> None:
        self.rec = rec
        self.prefix = prefix
        self._body = body  # ControlAPI._body: the request's JSON object, checked field by field
        self._error = error
        self._session_view = session_view

    def routes(self) -> list[web.RouteDef]:
        p = self.prefix
        return [
            web.post(f"{p}/recover", self.h_recover),
            web.get(f"{p}/vms", self.h_vms),
            web.get(f"{p}/vms/{{name}}", self.h_vm),
            web.get(f"{p}/vms/{{name}}/console", self.h_console),
            web.post(f"{p}/sessions/{{name}}/boot", self.h_boot),
            web.post(f"{p}/sessions/{{name}}/stop", self.h_stop),
            web.post(f"{p}/sessions/{{name}}/migrate", self.h_migrate),
            web.post(f"{p}/sessions/{{name}}/ttl", self.h_ttl),
            web.post(f"{p}/jobs/{{id}}/confirm", self.h_confirm),
            web.post(f"{p}/sandboxes", self.h_sandboxes),
            web.post(f"{p}/points/{{id}}/verify", self.h_verify),
        ]

    def _fail(self, e: Exception) -> web.Response:
        if isinstance(e, NotFound):
            return self._error(404, str(e))
        if isinstance(e, OutputRefused):
            return self._error(403, str(e))
        if isinstance(e, SessionError) and ("already" in str(e) or "ended" in str(e)):
            return self._error(409, str(e))
        return self._error(400, str(e))

    async def _checked(self, req: web.Request, fields: dict, required: tuple[str, ...], usage: str) -> dict:
        from engine.control.api import BadRequest

        try:
            return await self._body(req, fields, required, usage)
        except BadRequest as e:
            raise UsageError(str(e)) from None

    @staticmethod
    def _hw(body: dict) -> dict:
        return {k: body[k] for k in _HW if body.get(k) is not None}

    async def h_recover(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, RECOVER_FIELDS, ("point",), '{"point": ID, "boot": true}')
            hw = self._hw(body)
            disks = body.get("disks")
            s = await self.rec.ds.apublish(body["point"], body.get("name"), mode="instant", cache_dir=body.get("cache_dir"),
                                           disks=None if disks is None else [str(d) for d in disks])
            vm = None
            if body.get("boot"):
                try:
                    vm = await self.rec.boot(s.name, **hw)
                except BaseException:
                    await self.rec.ds.aunpublish(s.name, force=True)  # nothing half-made is left
                    raise
        except (InstantNFSError, OSError) as e:
            return self._fail(e if isinstance(e, InstantNFSError) else InstantNFSError(f"cannot recover: {e}"))
        return web.json_response({"session": self._session_view(s), "vm": vm_view(vm) if vm else None}, status=201)

    async def h_vms(self, req: web.Request) -> web.Response:
        vms = await asyncio.get_running_loop().run_in_executor(None, self.rec.vms.list)  # QMP: off the loop
        return web.json_response([vm_view(v) for v in vms])

    async def h_vm(self, req: web.Request) -> web.Response:
        vm = await asyncio.get_running_loop().run_in_executor(None, self.rec.vms.get, req.match_info["name"])
        if vm is None:
            return self._error(404, f"no VM {req.match_info['name']!r}")
        return web.json_response(vm_view(vm))

    async def h_console(self, req: web.Request) -> web.Response:
        vm = self.rec.vms.peek(req.match_info["name"])
        if vm is None:
            return self._error(404, f"no VM {req.match_info['name']!r}")
        try:
            offset = int(req.query.get("offset", "0"))
            if offset < 0:
                raise ValueError
        except ValueError:
            return self._error(400, "offset must be a byte offset, 0 or more")

        data = await asyncio.get_running_loop().run_in_executor(None, vm.console_from, offset, CONSOLE_MAX)
        return web.json_response({"text": data.decode(errors="replace"), "offset": offset + len(data),
                                  "state": vm.state})

    async def h_boot(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, BOOT_FIELDS, (), "{} or hardware fields")
            vm = await self.rec.boot(req.match_info["name"], **self._hw(body))
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(vm_view(vm), status=201)

    async def h_stop(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, STOP_FIELDS, (), '{"discard": false}')
            out = await self.rec.stop(req.match_info["name"], bool(body.get("discard")))
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(out)

    async def h_ttl(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, {"ttl_s": (int, float)}, (), '{"ttl_s": 3600} (null: no expiry)')
            ttl = body.get("ttl_s")
            if ttl is not None and not ttl > 0:
                raise UsageError("'ttl_s' must be more than 0 seconds, or null for no expiry")
            s = await self.rec.ds.registry.aset_ttl(req.match_info["name"], None if ttl is None else float(ttl))
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(self._session_view(s))

    async def h_migrate(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, MIGRATE_FIELDS, ("to",), '{"to": DIR_OR_DEVICE, "format": "raw"}')
            job = await self.rec.migrate(req.match_info["name"], body["to"], body.get("format") or "raw")
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(job.view(), status=202)

    async def h_confirm(self, req: web.Request) -> web.Response:
        try:
            job = self.rec.confirm(req.match_info["id"])
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(job.view())

    async def h_sandboxes(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, SANDBOX_FIELDS, ("point", "count", "ttl_s"),
                                       '{"point": ID, "count": 3, "ttl_s": 7200, "boot": true}')
            if not body["ttl_s"] > 0:
                raise UsageError("'ttl_s' must be more than 0 seconds")
            out = await self.rec.sandboxes(body["point"], body["count"], float(body["ttl_s"]), bool(body.get("boot")),
                                           name=body.get("name"), cache_dir=body.get("cache_dir"), **self._hw(body))
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(out, status=201)

    async def h_verify(self, req: web.Request) -> web.Response:
        try:
            body = await self._checked(req, VERIFY_FIELDS, (), '{"boot": true, "tests": ["tcp:22"]}')
            tests = body.get("tests") or []
            if not all(isinstance(t, str) for t in tests):
                raise UsageError("'tests' must be a list of strings like 'tcp:22' or 'http:80/health'")
            timeout = float(body.get("timeout_s") or self.rec.cfg["vm"]["verify_timeout"])
            if not timeout > 0:
                raise UsageError("'timeout_s' must be more than 0 seconds")
            job = await self.rec.verify(req.match_info["id"], boot=bool(body.get("boot")), timeout=timeout, tests=tests,
                                        script=body.get("script"), heartbeat=body.get("heartbeat"),
                                        disk_bus=body.get("disk_bus") or "virtio", memory_mib=body.get("memory_mib"),
                                        guest_config=body.get("guest_config"))
        except InstantNFSError as e:
            return self._fail(e)
        return web.json_response(job.view(), status=202)
