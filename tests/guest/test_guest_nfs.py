"""The guest boots straight out of the repository over our own NFS server.

The daemon runs as a subprocess on a loopback address of its own (127.0.0.85-90, the
range kept for these tests; QEMU's libnfs asks the portmapper on port 111 of the URL's
host), the guest's restore point is published (instant mode), and QEMU boots
``nfs://ADDR/...img`` read-write: every write of the guest lands in the session's write
cache. The proof: the guest's markers and its own data check (sha256 of its files, read
through NFS), then the disk exported through the daemon holds the heartbeat value the
guest wrote, and no file of the repository changed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.vm.guest import ensure_guest, missing_tools, read_guest_file
from tests.conftest import require, require_tool
from tests.guest.boot import boot_guest
from tests.images import repository_data

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = [f"127.0.0.{i}" for i in range(85, 91)]


def _free_address() -> str:
    for addr in ADDRESSES:
        with socket.socket() as s:
            try:
                s.bind((addr, 111))
            except OSError:
                continue
            return addr
    raise RuntimeError("no free loopback address in 127.0.0.85-90 (port 111 taken on all)")


def _serve(repo: Path, work: Path, addr: str) -> tuple[subprocess.Popen, str, Path]:
    log = work / "daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.control.cli", "serve", "--repo", str(repo),
             "--cache-dir", str(work / "cache"), "--reserve-gib", "0", "--bind", addr, "--control-bind", addr, "--portmap-port", "111",
             "--export-dir", str(work)],
            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "instantnfs serving" in text:
            line = [ln for ln in text.splitlines() if "instantnfs serving" in ln][-1]
            control = line.split("control ")[1].split("/api")[0]
            return proc, control, log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    _stop(proc)
    raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_guest_boots_over_instantnfs(tmp_path):
    require_tool("qemu-system-x86_64")
    require(not missing_tools(), f"the guest builder lacks: {missing_tools()}")
    art = ensure_guest()
    src = tmp_path / "guest.img"
    shutil.copyfile(art.disk, src)
    repo = tmp_path / "repo"
    Repository.init(repo)
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm="guest"), [str(src)])

    before = repository_data(repo)

    proc, control, log = _serve(repo, tmp_path, _free_address())
    exported = tmp_path / "exported.img"
    try:
        out = subprocess.run(
            [sys.executable, "-m", "engine.control.cli", "publish", "latest", "--name", "boot",
             "--server", control, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        session = json.loads(out.stdout)
        assert session["mode"] == "instant"
        disk = session["disks"][0]
        url = disk["url"]
        assert url.startswith("nfs://") and url.endswith(".img")
        value = f"nfs-{os.getpid()}-{int(time.time())}"
        result = boot_guest(url, value, timeout=600, log_dir=tmp_path / "logs")
        assert f"GUEST-HEARTBEAT ok {result.run_id}" in result.console_log
        assert "GUEST-DONE" in result.console_log
        assert result.datacheck_ok, result.console_log[-2000:]
        assert proc.poll() is None, log.read_text()[-2000:]
        out = subprocess.run(
            [sys.executable, "-m", "engine.control.cli", "export", "boot", disk["name"], "-o", str(exported),
             "--server", control, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        sessions = json.loads(subprocess.run(
            [sys.executable, "-m", "engine.control.cli", "sessions", "--server", control, "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout)
        assert sessions[0]["disks"][0]["dirty_bytes"] > 0  # the guest wrote into the cache
    finally:
        _stop(proc)
    # the guest's write is in the exported disk; the source and the repository are intact
    assert read_guest_file(exported, "/var/heartbeat.txt").decode().strip() == value
    assert src.read_bytes() == art.disk.read_bytes()
    assert repository_data(repo) == before
