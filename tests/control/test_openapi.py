"""The OpenAPI document against the routes the control API really has: every route is
documented with its method, every documented path and method has a route."""
from __future__ import annotations

from engine.control.api import API, OPENAPI, ControlAPI
from engine.control.files_api import FilesAPI
from engine.control.vms_api import VMsAPI

METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def routes() -> set[tuple[str, str]]:
    """(canonical path, method) of every route of the app (aiohttp's automatic HEAD of a
    GET left out: it is part of GET, as OpenAPI has it)."""
    api = ControlAPI.__new__(ControlAPI)  # the routing only: no datastore, no listener
    api.files = FilesAPI(None, API)  # type: ignore[arg-type]
    api.vms = VMsAPI(None, API, None, None, None)  # type: ignore[arg-type]
    try:
        app = api.app()
    finally:
        api.files.stop()
    out = set()
    for r in app.router.routes():
        if r.method == "HEAD":
            continue
        out.add((r.resource.canonical, r.method.lower()))
    return out


def documented() -> set[tuple[str, str]]:
    return {(path, m) for path, item in OPENAPI["paths"].items() for m in item if m in METHODS}


def test_every_route_is_documented_and_every_documented_route_exists():
    have, doc = routes(), documented()
    assert have - doc == set(), f"routes missing from the OpenAPI document: {sorted(have - doc)}"
    assert doc - have == set(), f"documented but not routed: {sorted(doc - have)}"
    assert ("/metrics", "get") in have and ("/healthz", "get") in have


def test_path_parameters_are_declared():
    """Each {param} of a documented path is declared as a path parameter (on the path or
    on each of its operations)."""
    for path, item in OPENAPI["paths"].items():
        names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        shared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        for m, op in item.items():
            if m not in METHODS:
                continue
            own = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == shared | own, (path, m, names, shared | own)


def test_every_operation_has_a_summary_and_responses():
    for path, item in OPENAPI["paths"].items():
        for m, op in item.items():
            if m in METHODS:
                assert op.get("summary") and op.get("responses"), (path, m)
