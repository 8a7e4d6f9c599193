"""The recovery product's API and CLI without booting anything (fast): every endpoint's
error paths, and the success paths that need no guest (recover without boot, stop,
sandboxes and their ttl, a copy migrate confirmed by the caller, verify without boot,
publish --disk). The booting paths are in tests/vm/test_recovery_e2e.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest

from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from tests.images import make_image, repository_data
from tests.nfs.conftest import ROOT, Daemon, give_address, take_address

BLOCK = 256 << 10


@pytest.fixture(scope="module")
def dmn(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("vmsapi")
    a, b = base / "a.raw", base / "b.raw"
    da = make_image(a, ["random", "text", "zero", "random"], BLOCK, seed=3)
    make_image(b, ["text", "random"], BLOCK, seed=4)
    repo = Repository.init(base / "repo", BLOCK)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="two", cpus=2, memory_mib=512), [str(a), str(b)])
        m2 = backup(r, BackupSettings(vm="two", cpus=2, memory_mib=512), [str(a), str(b)])
    exports = base / "exports"
    exports.mkdir()
    addr = take_address()
    d = Daemon(repo, base / "cache", addr, extra=["--export-dir", str(exports)]).start(timeout=60)
    d.point, d.point2, d.disks, d.data = m["id"], m2["id"], [x["name"] for x in m["disks"]], da
    d.exports, d.before = exports, repository_data(repo)
    try:
        yield d
    finally:
        d.stop()
        give_address(addr)
        after = repository_data(repo)
        assert {k: after.get(k) for k in d.before} == d.before


def call(d: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        return 200, d.api(method, path, body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def err(d: Daemon, method: str, path: str, body: Any, status: int, text: str) -> None:
    code, out = call(d, method, path, body)
    assert code == status, (code, out)
    assert text in out["error"], out


def test_recover_without_boot_then_stop_discard(dmn: Daemon) -> None:
    code, r = call(dmn, "POST", "/recover", {"point": dmn.point, "name": "r1"})
    assert code == 200 and r["vm"] is None and r["session"]["name"] == "r1" and r["session"]["mode"] == "instant"
    assert len(r["session"]["disks"]) == 2
    err(dmn, "POST", "/recover", {"point": dmn.point, "name": "r1"}, 409, "already published")
    code, out = call(dmn, "POST", "/sessions/r1/stop", {})
    assert out == {"session": "r1", "vm": None, "unpublished": False}
    assert any(s["name"] == "r1" for s in dmn.api("GET", "/sessions"))
    code, out = call(dmn, "POST", "/sessions/r1/stop", {"discard": True})
    assert out["unpublished"] is True
    assert not any(s["name"] == "r1" for s in dmn.api("GET", "/sessions"))


def test_recover_and_boot_errors(dmn: Daemon) -> None:
    err(dmn, "POST", "/recover", {}, 400, "'point' is required")
    err(dmn, "POST", "/recover", {"point": dmn.point, "bogus": 1}, 400, "unknown field 'bogus'")
    err(dmn, "POST", "/recover", {"point": "nope"}, 404, "nope")
    err(dmn, "POST", "/recover", {"point": dmn.point, "boot": True, "disk_bus": "floppy", "name": "bad-bus"}, 400,
        "--disk-bus must be one of")
    assert not any(s["name"] == "bad-bus" for s in dmn.api("GET", "/sessions"))  # nothing half-made is left
    err(dmn, "POST", "/recover", {"point": dmn.point, "boot": True, "net": "tap0", "name": "bad-net"}, 400, "--net")
    err(dmn, "POST", "/recover", {"point": dmn.point, "boot": True, "guest_config": "x" * 5000, "name": "big"}, 400,
        "at most 4096")
    err(dmn, "POST", "/sessions/none/boot", {}, 404, "no published session 'none'")
    err(dmn, "POST", "/sessions/none/stop", {}, 404, "no published session or VM 'none'")
    err(dmn, "POST", "/sessions/none/stop", {"discard": "yes"}, 400, "must be bool")
    err(dmn, "GET", "/vms/none", None, 404, "no VM 'none'")
    err(dmn, "GET", "/vms/none/console", None, 404, "no VM 'none'")
    assert dmn.api("GET", "/vms") == []


def test_publish_one_disk_and_its_commit_refused(dmn: Daemon) -> None:
    s = dmn.api("POST", "/sessions", {"point": dmn.point, "name": "only-b", "disks": [dmn.disks[1]]})
    assert [d["name"] for d in s["disks"]] == [dmn.disks[1]]
    err(dmn, "POST", "/sessions/only-b/commit", {}, 409, "only some disks")
    err(dmn, "POST", "/sessions", {"point": dmn.point, "name": "x", "disks": []}, 400, "non-empty list")
    err(dmn, "POST", "/sessions", {"point": dmn.point, "name": "x", "disks": ["zz"]}, 404, "no disk 'zz'")
    out = subprocess.run([sys.executable, "-m", "engine.control.cli", "publish", dmn.point, "--name", "only-a",
                          "--disk", "0", "--ttl", "2h", "--server", dmn.url, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    v = json.loads(out.stdout)
    assert [d["name"] for d in v["disks"]] == [dmn.disks[0]] and v["expires"]
    for n in ("only-a", "only-b"):
        dmn.api("DELETE", f"/sessions/{n}")


def test_copy_migrate_waits_for_the_confirmation(dmn: Daemon) -> None:
    dmn.api("POST", "/sessions", {"point": dmn.point, "name": "mv"})
    err(dmn, "POST", "/sessions/mv/migrate", {"to": "/tmp/elsewhere"}, 403, "outside the export directories")
    err(dmn, "POST", "/sessions/mv/migrate", {"to": str(dmn.exports / "m"), "format": "vmdk"}, 400, "raw or qcow2")
    err(dmn, "POST", "/sessions/mv/migrate", {}, 400, "'to' is required")
    err(dmn, "POST", "/sessions/none/migrate", {"to": str(dmn.exports / "m")}, 404, "no published session")
    err(dmn, "POST", "/jobs/export-999/confirm", {}, 404, "no migrate job")
    job = dmn.api("POST", "/sessions/mv/migrate", {"to": str(dmn.exports / "m")})
    deadline = time.monotonic() + 60
    while job["phase"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = dmn.api("GET", f"/jobs/{job['id']}")
    assert job["state"] == "running" and job["phase"] == "waiting"
    time.sleep(0.5)
    assert dmn.api("GET", f"/jobs/{job['id']}")["state"] == "running"  # it waits for the caller
    dmn.api("POST", f"/jobs/{job['id']}/confirm", {})
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = dmn.api("GET", f"/jobs/{job['id']}")
    assert job["state"] == "done", job
    r = job["result"]
    assert r["mode"] == "copy" and len(r["disks"]) == 2
    first = Path(r["disks"][0]["path"])
    assert first == dmn.exports / "m" / f"{dmn.disks[0]}.img"
    assert first.read_bytes()[: len(dmn.data)] == dmn.data
    err(dmn, "POST", f"/jobs/{job['id']}/confirm", {}, 404, "no migrate job")
    err(dmn, "POST", "/sessions/mv/migrate", {"to": str(dmn.exports / "m")}, 403, "exists")
    dmn.api("DELETE", "/sessions/mv")


def test_cancelled_copy_migrate_leaves_nothing(dmn: Daemon) -> None:
    dmn.api("POST", "/sessions", {"point": dmn.point, "name": "mc"})
    job = dmn.api("POST", "/sessions/mc/migrate", {"to": str(dmn.exports / "mc")})
    deadline = time.monotonic() + 60
    while job["phase"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = dmn.api("GET", f"/jobs/{job['id']}")
    dmn.api("DELETE", f"/jobs/{job['id']}")
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = dmn.api("GET", f"/jobs/{job['id']}")
    assert job["state"] == "cancelled"
    assert [p for p in (dmn.exports / "mc").iterdir() if not p.name.startswith(".")] == []
    dmn.api("DELETE", "/sessions/mc")


def test_sandboxes_and_their_ttl(dmn: Daemon) -> None:
    err(dmn, "POST", "/sandboxes", {"point": dmn.point, "count": 0, "ttl_s": 60}, 400, "--count")
    err(dmn, "POST", "/sandboxes", {"point": dmn.point, "count": 2, "ttl_s": -1}, 400, "more than 0")
    err(dmn, "POST", "/sandboxes", {"point": dmn.point, "count": 2}, 400, "'ttl_s' is required")
    err(dmn, "POST", "/sandboxes", {"point": "nope", "count": 2, "ttl_s": 5}, 404, "nope")
    out = dmn.api("POST", "/sandboxes", {"point": dmn.point, "count": 2, "ttl_s": 600, "name": "sb"})
    names = [s["session"] for s in out]
    assert names == ["sb-1", "sb-2"] and all(s["vm"] is None and s["expires"] for s in out)
    again = dmn.api("POST", "/sandboxes", {"point": dmn.point, "count": 1, "ttl_s": 600, "name": "sb"})
    assert again[0]["session"] == "sb-1-2"  # names never collide
    err(dmn, "POST", "/sessions/sb-1/ttl", {"ttl_s": 0}, 400, "more than 0")
    err(dmn, "POST", "/sessions/none/ttl", {"ttl_s": 5}, 404, "no published session")
    dmn.api("POST", "/sessions/sb-1/ttl", {"ttl_s": 1})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(s["name"] == "sb-1" for s in dmn.api("GET", "/sessions")):
        time.sleep(0.5)
    left = {s["name"] for s in dmn.api("GET", "/sessions")}
    assert "sb-1" not in left and {"sb-2", "sb-1-2"} <= left
    v = dmn.api("POST", "/sessions/sb-2/ttl", {"ttl_s": None})
    assert v["expires"] is None
    for n in ("sb-2", "sb-1-2"):
        dmn.api("DELETE", f"/sessions/{n}")


def test_verify_without_boot_and_its_errors(dmn: Daemon) -> None:
    err(dmn, "POST", "/points/nope/verify", {}, 404, "nope")
    err(dmn, "POST", f"/points/{dmn.point}/verify", {"tests": ["tcp:22"]}, 400, "add --boot")
    err(dmn, "POST", f"/points/{dmn.point}/verify", {"boot": True, "tests": ["ftp:21"]}, 400, "ftp:21")
    err(dmn, "POST", f"/points/{dmn.point}/verify", {"boot": True, "script": "relative.sh"}, 400, "absolute path")
    err(dmn, "POST", f"/points/{dmn.point}/verify", {"timeout_s": -5}, 400, "more than 0")
    job = dmn.api("POST", f"/points/{dmn.point}/verify", {})
    deadline = time.monotonic() + 120
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = dmn.api("GET", f"/jobs/{job['id']}")
    assert job["state"] == "done", job
    rep = job["result"]
    # raw test images hold no filesystem: the data is intact, the verdict says no filesystem is readable
    assert rep["data"]["ok"] and rep["data"]["chunks_verified"] == rep["data"]["chunks"] > 0
    assert rep["boot"] is None and rep["tests"] == []
    assert "PASS  data" in rep["summary"]
    assert not any(s["mode"] == "sandbox" for s in dmn.api("GET", "/sessions"))  # its sandbox is gone


def test_verify_cli_many_points_writes_one_report(dmn: Daemon, tmp_path: Path) -> None:
    report = tmp_path / "all.json"
    p = subprocess.run([sys.executable, "-m", "engine.control.cli", "verify", "--vm", "two", "--all", "--parallel", "2",
                        "--report", str(report), "--server", dmn.url, "-q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    doc = json.loads(report.read_text())
    assert [r["point"] for r in doc["points"]] == [dmn.point, dmn.point2]
    assert all(r["data"]["ok"] for r in doc["points"])
    assert p.returncode == (0 if doc["passed"] else 1), p.stdout + p.stderr
    assert "restore points passed" in p.stdout
    p = subprocess.run([sys.executable, "-m", "engine.control.cli", "verify", "--vm", "two", "--latest", "1",
                        "--json", "--server", dmn.url, "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert json.loads(p.stdout)["point"] == dmn.point2
    p = subprocess.run([sys.executable, "-m", "engine.control.cli", "verify", "--server", dmn.url],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "verify needs a POINT" in p.stderr
    p = subprocess.run([sys.executable, "-m", "engine.control.cli", "verify", "--vm", "ghost", "--all", "--server",
                        dmn.url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no restore point of VM 'ghost'" in p.stderr


def test_cli_vms_stop_and_sandbox(dmn: Daemon) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.control.cli", *args, "--server", dmn.url],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert cli("vms").stdout.strip() == "no VMs"
    p = cli("sandbox", dmn.point, "--count", "2", "--ttl", "30m", "--name", "cli")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("sandbox cli-") == 2
    p = cli("sandbox", dmn.point, "--ttl", "soon")
    assert p.returncode == 2 and "not a duration" in p.stderr
    p = cli("stop", "cli-1", "--discard")
    assert p.returncode == 0 and "session unpublished" in p.stdout
    p = cli("stop", "cli-9")
    assert p.returncode != 0 and "no published session or VM 'cli-9'" in p.stderr
    cli("stop", "cli-2", "--discard")
