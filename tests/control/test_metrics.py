"""``/metrics`` and ``/healthz`` (engine.control.metrics) against a real daemon and real
NFS clients (nfs-cat, qemu-io over libnfs), and who may read them."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from engine.control import metrics
from engine.control.api import ControlAPI
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from tests.conftest import require_tool
from tests.nfs.conftest import Daemon, give_address, run, take_address


def _get(dmn: Daemon, path: str, token: str | None = None) -> tuple[int, str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(dmn.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def scrape(dmn: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics (fetched from loopback, without a token), parsed by
    prometheus-client's own parser: {(sample name, sorted labels): value}."""
    code, text, headers = _get(dmn, "/metrics")
    assert code == 200, text
    assert headers["Content-Type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_with_traffic(daemon_factory, images):
    require_tool("nfs-cat", "qemu-io")
    dmn = daemon_factory()
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "m"})
    d = images["disks"][0]
    before = scrape(dmn)
    assert val(before, "instantnfs_sessions", mode="instant") == 1
    assert val(before, "instantnfs_chunk_cache_capacity_bytes") > 0
    assert ("process_resident_memory_bytes", ()) in before
    for state in ("running", "done", "failed", "cancelled"):
        assert ("instantnfs_jobs", (("kind", "export"), ("state", state))) in before

    out = subprocess.run(["nfs-cat", dmn.libnfs_url(f"/instantnfs/m/{d['name']}.img")], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == images["data"][0]
    after = scrape(dmn)
    reads = val(after, "instantnfs_rpc_requests_total", program="nfs", procedure="READ") - \
        val(before, "instantnfs_rpc_requests_total", program="nfs", procedure="READ")
    assert reads >= d["size"] / (1 << 20)  # nfs-cat reads at most 1 MiB a call
    # every READ counted is timed once, whichever lane answered it
    hist = val(after, "instantnfs_rpc_request_duration_seconds_count", program="nfs", procedure="READ") - \
        val(before, "instantnfs_rpc_request_duration_seconds_count", program="nfs", procedure="READ")
    assert hist == reads
    inf = val(after, "instantnfs_rpc_request_duration_seconds_bucket", program="nfs", procedure="READ", le="+Inf")
    assert inf == val(after, "instantnfs_rpc_request_duration_seconds_count", program="nfs", procedure="READ")
    assert val(after, "instantnfs_rpc_request_duration_seconds_sum", program="nfs", procedure="READ") > 0
    assert val(after, "instantnfs_rpc_requests_total", program="mount", procedure="MNT") >= 1
    assert val(after, "instantnfs_read_bytes_total") - val(before, "instantnfs_read_bytes_total") >= d["size"]
    assert val(after, "instantnfs_session_read_bytes_total", session="m") >= d["size"]
    # the first read of a backup decompresses: misses, loads and their bytes move
    assert val(after, "instantnfs_chunk_cache_misses_total") > val(before, "instantnfs_chunk_cache_misses_total")
    assert val(after, "instantnfs_chunk_cache_loaded_bytes_total") > val(before, "instantnfs_chunk_cache_loaded_bytes_total")
    assert val(after, "instantnfs_chunk_cache_bytes") > 0

    # a second read of the same disk is served from the cache: hits move, misses do not
    out = subprocess.run(["nfs-cat", dmn.libnfs_url(f"/instantnfs/m/{d['name']}.img")], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    again = scrape(dmn)
    assert val(again, "instantnfs_chunk_cache_hits_total") > val(after, "instantnfs_chunk_cache_hits_total")
    assert val(again, "instantnfs_chunk_cache_misses_total") == val(after, "instantnfs_chunk_cache_misses_total")

    # a write: WRITE counted and timed, bytes written, the write cache's dirty bytes
    url = f"nfs://{dmn.addr}/instantnfs/m/{d['name']}.img"  # QEMU asks the portmapper on port 111
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65536 131072", "-c", "flush", url],
                       capture_output=True, timeout=120, text=True)
    assert w.returncode == 0, w.stderr
    wrote = scrape(dmn)
    assert val(wrote, "instantnfs_rpc_requests_total", program="nfs", procedure="WRITE") >= 1
    assert val(wrote, "instantnfs_rpc_request_duration_seconds_count", program="nfs", procedure="WRITE") == \
        val(wrote, "instantnfs_rpc_requests_total", program="nfs", procedure="WRITE")
    assert val(wrote, "instantnfs_written_bytes_total") >= 131072
    assert val(wrote, "instantnfs_session_written_bytes_total", session="m") >= 131072
    assert val(wrote, "instantnfs_session_write_cache_dirty_bytes", session="m", disk=d["name"]) >= 131072

    # a job: an export ends 'done' and the jobs gauge says so
    job = dmn.api("POST", "/sessions/m/export", {"disk": d["name"], "output": str(dmn.cache_dir / "exports" / "m.raw")})
    deadline = time.monotonic() + 60
    while dmn.api("GET", f"/jobs/{job['id']}")["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert val(scrape(dmn), "instantnfs_jobs", kind="export", state="done") == 1

    # unpublished, the session's own series go, the daemon's byte totals stay
    total = val(wrote, "instantnfs_read_bytes_total")
    dmn.api("DELETE", "/sessions/m")
    gone = scrape(dmn)
    assert ("instantnfs_session_read_bytes_total", (("session", "m"),)) not in gone
    assert val(gone, "instantnfs_read_bytes_total") >= total
    assert val(gone, "instantnfs_sessions", mode="instant") == 0


def test_metrics_open_on_loopback_the_api_still_wants_the_token(daemon_factory):
    dmn = daemon_factory()
    code, text, _ = _get(dmn, "/metrics")
    assert code == 200 and "instantnfs_rpc_requests_total" in text
    code, body, _ = _get(dmn, "/api/v1/status")
    assert code == 401 and "token" in json.loads(body)["error"]
    code, body, _ = _get(dmn, "/healthz")
    assert code == 200 and json.loads(body) == {"status": "ok", "nfs": True, "repository": True}


def test_open_route_decision():
    for path, remote, ok in [
        ("/healthz", "192.0.2.7", True), ("/healthz", None, True),
        ("/metrics", "127.0.0.1", True), ("/metrics", "127.0.0.61", True), ("/metrics", "::1", True),
        ("/metrics", "::ffff:127.0.0.1", True),
        ("/metrics", "192.0.2.7", False), ("/metrics", "::ffff:192.0.2.7", False), ("/metrics", "2001:db8::1", False),
        ("/metrics", None, False), ("/metrics", "", False), ("/metrics", "not-an-address", False),
        ("/api/v1/status", "127.0.0.1", False), ("/metrics/", "127.0.0.1", False), ("/api/v1/metrics", "127.0.0.1", False),
    ]:
        assert metrics.open_route(path, remote) is ok, (path, remote)


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("peer,token,want", [
    (("192.0.2.7", 40000), None, 401),
    (("192.0.2.7", 40000), "wrong", 401),
    (("192.0.2.7", 40000), "secret", 200),
    (("127.0.0.1", 40000), None, 200),
])
def test_metrics_from_another_address_needs_the_token(peer, token, want):
    """The API's own middleware, given a request whose peer is not on loopback (the test
    machine has only loopback to offer, so the peer is simulated)."""
    api = ControlAPI.__new__(ControlAPI)
    api.token = "secret"
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = make_mocked_request("GET", "/metrics", headers=headers, transport=_Transport(peer))
    assert req.remote == peer[0]

    async def handler(_req: Any) -> Any:
        from aiohttp import web
        return web.Response(text="metrics")

    resp = run(api.auth(req, handler))
    assert resp.status == want


class _Services:
    def __init__(self, up: bool) -> None:
        self.up = up

    def serving(self) -> bool:
        return self.up


def test_health_function(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    assert run(metrics.health(_Services(True), repo)) == (200, {"status": "ok", "nfs": True, "repository": True})
    code, body = run(metrics.health(_Services(False), repo))
    assert code == 503 and body["nfs"] is False and body["status"] == "unavailable" and "NFS" in body["reason"]
    code, body = run(metrics.health(_Services(True), tmp_path / "nothing"))
    assert code == 503 and body["repository"] is False and "not readable" in body["reason"]


def test_healthz_503_while_the_repository_is_gone(tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(b"x" * (1 << 20))
    repo = Repository.init(tmp_path / "repo")
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm="h", cpus=1, memory_mib=64), [str(img)])
    addr = take_address()
    dmn = Daemon(repo, tmp_path / "cache", addr).start()
    try:
        code, body, _ = _get(dmn, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        moved = Path(str(repo) + ".away")
        repo.rename(moved)
        try:
            code, body, _ = _get(dmn, "/healthz")
            doc = json.loads(body)
            assert code == 503 and doc["repository"] is False and doc["nfs"] is True and doc["status"] == "unavailable"
        finally:
            moved.rename(repo)
        code, body, _ = _get(dmn, "/healthz")
        assert code == 200
    finally:
        dmn.stop()
        give_address(addr)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_observe_buckets_and_histogram(monkeypatch):
    """A call's bucket is the bit length of its microseconds; the histogram built at
    scrape time is cumulative with power-of-two bounds, count and sum exact (a fake
    clock: no timing in the test). The pure-Python transport is the specification of
    the compiled one."""
    from engine.nfs import transport
    from engine.nfs.rpc import LAT_BUCKETS, LAT_SLOTS, Proc, Program, RpcServer

    clock = [0]
    monkeypatch.setattr(transport, "_now", lambda: clock[0])
    lat = [0] * LAT_SLOTS
    for elapsed_ns in (0, 999, 1000, 1999, 2000, 3_999, 4_000, 1 << 40):
        clock[0] = 10**12 + elapsed_ns
        transport.observe(lat, 10**12)
    transport.observe(None, 0)  # an uncounted call: nothing
    assert lat[0] == 2 and lat[1] == 2 and lat[2] == 2 and lat[3] == 1  # <1 us, <2 us, <4 us, <8 us
    assert lat[LAT_BUCKETS] == 1  # 1.1e12 ns: slower than the last finite bucket
    assert lat[LAT_BUCKETS + 1] == 0 + 999 + 1000 + 1999 + 2000 + 3999 + 4000 + (1 << 40)

    rpc = RpcServer()
    rpc.add(Program(7, "toy", {1: {3: Proc("PING", None, None, None)}}))  # type: ignore[arg-type]
    rpc.latency[(7, 1, 3)][:] = lat
    fam = metrics._histogram("h", "doc", [("toy", rpc)])
    samples = {(s.name, s.labels.get("le")): s.value for s in fam.samples}
    assert samples[("h_bucket", "1e-06")] == 2
    assert samples[("h_bucket", "2e-06")] == 4
    assert samples[("h_bucket", "4e-06")] == 6
    assert samples[("h_bucket", "8e-06")] == 7
    assert samples[("h_bucket", "+Inf")] == samples[("h_count", None)] == 8
    assert samples[("h_sum", None)] == pytest.approx(lat[LAT_BUCKETS + 1] / 1e9)
    assert {s.labels["procedure"] for s in fam.samples} == {"PING"}
