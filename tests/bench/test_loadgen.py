"""The load generator against a real instantnfs daemon (and local files): what it counts
is what was moved, the server saw every call it counted, writes land where it says, and
a target that cannot be reached, or a server that dies mid-run, is a clear RuntimeError.

The daemon serves one restore point of a small generated disk, published as a writable
session; the control API's per-procedure call counters are the server's side of the
count. No figure of speed is asserted.
"""
from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.bench.core import FileTarget, NfsTarget
from engine.bench.loadgen import LoadSpec, getattr_latency, percentiles, run_load, write_pattern
from engine.nfs.client import NFSClient
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from tests.images import make_image
from tests.nfs.conftest import Daemon, give_address, take_address

BLOCK = 1 << 20
QUICK = {"seconds": 0.5, "warmup": 0.2}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("loadgen")
    img = d / "disk.raw"
    data = make_image(img, ["random", "text", "zero", "random", "hole", "repeat", "text", "random"], BLOCK, seed=7)
    repo = Repository.init(d / "repo", BLOCK)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="lg"), [str(img)])
    return {"dir": d, "repo": repo, "point": m["id"], "disk": m["disks"][0]["name"], "size": len(data), "data": data}


def start(repo: dict[str, Any], cache: Path, session: str = "lg") -> Daemon:
    addr = take_address()
    try:
        dmn = Daemon(repo["repo"], cache, addr).start()
    except BaseException:
        give_address(addr)
        raise
    dmn.api("POST", "/sessions", {"point": repo["point"], "name": session})
    return dmn


def stop(dmn: Daemon) -> None:
    dmn.stop()
    give_address(dmn.addr)


@pytest.fixture(scope="module")
def served(repo: dict[str, Any]):
    dmn = start(repo, repo["dir"] / "cache")
    try:
        yield dmn
    finally:
        stop(dmn)


def target(dmn: Daemon, repo: dict[str, Any], session: str = "lg") -> NfsTarget:
    return NfsTarget(dmn.addr, dmn.mount_port, dmn.nfs_port, "/instantnfs", f"{session}/{repo['disk']}.img", repo["size"])


def reads_served(dmn: Daemon) -> int:
    return dmn.api("GET", "/status")["rpc"]["nfs_procs"].get("READ", 0)


def read_back(dmn: Daemon, t: NfsTarget, offset: int, count: int) -> bytes:
    async def main() -> bytes:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            fh = await c.walk(await c.mount(t.export), t.path)
            data, _ = await c.read(fh, offset, count)
            return data
        finally:
            await c.close()

    return asyncio.run(main())


def check_counts(m: Any, spec: LoadSpec) -> None:
    x = m.extra
    assert x["errors"] == 0, x.get("note")
    assert x["ops"] > 0
    assert x["bytes"] == x["ops"] * spec.size
    assert m.value == pytest.approx(x["ops"] / x["seconds"])
    assert x["ops"] + x["warmup_ops"] <= x["calls"]
    assert x["connections"] == spec.connections and x["depth"] == spec.depth and x["size"] == spec.size
    lat = x["lat_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"]
    assert x["client_cpu_seconds"] > 0
    assert x["client_cpu_share"] == pytest.approx(x["client_cpu_seconds"] / (x["seconds"] * x["processes"]), abs=1e-4)
    assert isinstance(x["client_bound"], bool)


@pytest.mark.parametrize(("connections", "depth", "size"), [(1, 1, 4096), (1, 8, 4096), (2, 8, 4096), (2, 1, 65536)])
def test_reads_count_what_the_server_served(served, repo, connections, depth, size):
    spec = LoadSpec(op="read", size=size, depth=depth, connections=connections, **QUICK)
    before = reads_served(served)
    m = run_load(target(served, repo), spec)
    served_now = reads_served(served) - before
    check_counts(m, spec)
    assert m.extra["processes"] == min(connections, os.cpu_count() or 1)
    # every call sent was answered before the run ended (the drain): the server saw exactly
    # them, warmup and drain included, so at least the bytes counted in the window
    assert served_now == m.extra["calls"]
    assert served_now * size >= m.extra["bytes"]


def test_many_targets_share_the_connections(served, repo):
    served.api("POST", "/sessions", {"point": repo["point"], "name": "lg2"})
    try:
        spec = LoadSpec(op="read", depth=4, connections=3, processes=1, **QUICK)
        before = reads_served(served)
        m = run_load([target(served, repo), target(served, repo, "lg2")], spec)
        check_counts(m, spec)
        assert m.extra["targets"] == 2 and m.extra["processes"] == 1
        assert reads_served(served) - before == m.extra["calls"]
    finally:
        served.api("DELETE", "/sessions/lg2")


@pytest.mark.parametrize("stable", ["file_sync", "unstable"])
def test_writes_land_the_seeded_pattern_where_they_say(repo, tmp_path, stable):
    dmn = start(repo, tmp_path / "cache")
    try:
        t = target(dmn, repo)
        span = (2 * BLOCK + 8192, 16 * 4096)  # 16 positions: a short run writes every one
        spec = LoadSpec(op="write", size=4096, depth=4, connections=2, stable=stable, span=span, seed=5, **QUICK)
        m = run_load(t, spec)
        check_counts(m, spec)
        assert m.extra["op"] == f"write {stable}"
        got = read_back(dmn, t, span[0], span[1])
        for k in range(16):
            off = span[0] + k * 4096
            assert got[k * 4096:(k + 1) * 4096] == write_pattern(5, 4096, off), f"position {k}"
        # outside the span the disk is what was backed up
        assert read_back(dmn, t, span[0] - 4096, 4096) == repo["data"][span[0] - 4096:span[0]]
        assert read_back(dmn, t, span[0] + span[1], 4096) == repo["data"][span[0] + span[1]:span[0] + span[1] + 4096]
    finally:
        stop(dmn)


def test_refused_writes_are_counted_errors_not_a_hang(repo, tmp_path):
    addr = take_address()
    try:
        dmn = Daemon(repo["repo"], tmp_path / "cache", addr, ["--read-only"]).start()
        try:
            dmn.api("POST", "/sessions", {"point": repo["point"], "name": "lg"})
            m = run_load(target(dmn, repo), LoadSpec(op="write", depth=4, connections=1, stable="file_sync", **QUICK))
        finally:
            dmn.stop()
    finally:
        give_address(addr)
    x = m.extra
    assert x["ops"] == 0 and m.value == 0 and x["bytes"] == 0
    assert x["errors"] == x["calls"] > 0
    assert x["error_statuses"] == {"NFS3ERR_ROFS": x["calls"]}
    assert "NFS3ERR_ROFS" in x["note"]


def test_getattr_latency_one_at_a_time(served, repo):
    lat = getattr_latency(target(served, repo), 0.3, interval=0.01)
    assert 1 <= len(lat) <= 31
    assert all(0 < x < 5 for x in lat)


# -- local files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("op", "stable"), [("read", "unstable"), ("write", "file_sync"), ("write", "unstable")])
def test_file_target_counts_and_pattern(tmp_path, op, stable):
    f = tmp_path / "disk.img"
    f.write_bytes(os.urandom(4 * BLOCK))
    t = FileTarget(str(f), 4 * BLOCK)
    span = (BLOCK, 8 * 4096) if op == "write" else None
    spec = LoadSpec(op=op, size=4096, depth=2, connections=2, stable=stable, span=span, seed=3, **QUICK)
    m = run_load(t, spec)
    check_counts(m, spec)
    if op == "write":
        data = f.read_bytes()
        for k in range(8):
            off = BLOCK + k * 4096
            assert data[off:off + 4096] == write_pattern(3, 4096, off)


# -- failures ---------------------------------------------------------------------------------------


def _closed_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def test_unreachable_target_is_a_clear_error():
    addr = take_address()
    try:
        port = _closed_port(addr)
        t = NfsTarget(addr, port, port, "/instantnfs", "x/disk.img", 1 << 20)
        with pytest.raises(RuntimeError, match=rf"cannot reach the MOUNT service at {addr}:{port}"):
            run_load(t, LoadSpec(**QUICK))
    finally:
        give_address(addr)


def test_wrong_export_or_path_is_a_clear_error(served, repo):
    good = target(served, repo)
    with pytest.raises(RuntimeError, match="MOUNT of '/nothing' refused.*MNT3ERR_NOENT"):
        run_load(NfsTarget(good.host, good.mount_port, good.nfs_port, "/nothing", good.path, good.size), LoadSpec(**QUICK))
    with pytest.raises(RuntimeError, match="LOOKUP of /instantnfs/lg/nope.img failed.*NFS3ERR_NOENT"):
        run_load(NfsTarget(good.host, good.mount_port, good.nfs_port, good.export, "lg/nope.img", good.size), LoadSpec(**QUICK))
    with pytest.raises(ValueError, match="does not fit"):
        run_load(good, LoadSpec(span=(0, 2 * good.size), **QUICK))


def test_server_dying_mid_run_ends_the_run_with_an_error(repo, tmp_path):
    dmn = start(repo, tmp_path / "cache")
    try:
        t = target(dmn, repo)
        pid = dmn.proc.pid if dmn.proc else 0
        killer = threading.Timer(1.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:  # the kill lands mid-run (or, on a slow machine, before the workers connect)
            with pytest.raises(RuntimeError, match=re.escape(dmn.addr)):
                run_load(t, LoadSpec(depth=4, connections=1, seconds=20, warmup=0.1))
        finally:
            killer.cancel()
    finally:
        stop(dmn)


def test_bad_specs_are_refused(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(bytes(8192))
    t = FileTarget(str(f), 8192)
    for bad in (LoadSpec(op="trim"), LoadSpec(stable="async"), LoadSpec(depth=0), LoadSpec(size=16384),
                LoadSpec(op="write", size=4)):
        with pytest.raises(ValueError):
            run_load(t, bad)
    with pytest.raises(ValueError, match="at least as many connections"):
        run_load([t, t], LoadSpec(connections=1))


# -- percentiles ------------------------------------------------------------------------------------


def test_percentiles_of_a_known_list():
    p = percentiles(list(range(1, 101)))
    assert p == {"p50": pytest.approx(50.5), "p99": pytest.approx(99.01), "p999": pytest.approx(99.901)}
    assert percentiles([7.0]) == {"p50": 7.0, "p99": 7.0, "p999": 7.0}
    assert percentiles([3, 1, 2], ps=(0, 100)) == {"p0": 1, "p100": 3}
    assert all(math.isnan(v) for v in percentiles([]).values())
    with pytest.raises(ValueError):
        percentiles([1, 2], ps=(101,))
