"""The guest boots straight out of the repository over our own NFS server.

The daemon runs as a subprocess on a loopback address of its own (127.0.0.50-60, the
range kept for these tests; QEMU's libnfs asks the portmapper on port 111 of the URL's
host), the guest's restore point is published, and QEMU boots ``nfs://ADDR/...img``.
The published disk files are read-only until the write cache is wired in, so QEMU
sends the guest's writes to a throw-away overlay (``snapshot=on``); the guest's own
data check (sha256 of its files, read through NFS) and its markers are the proof.
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
from tests.conftest import require, require_tool
from tests.guest import make_guest_disk as mgd
from tests.guest.boot import boot_guest

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = [f"127.0.0.{i}" for i in range(50, 61)]


def _free_address() -> str:
    for addr in ADDRESSES:
        with socket.socket() as s:
            try:
                s.bind((addr, 111))
            except OSError:
                continue
            return addr
    raise RuntimeError("no free loopback address in 127.0.0.50-60 (port 111 taken on all)")


def _serve(repo: Path, work: Path, addr: str) -> tuple[subprocess.Popen, str, Path]:
    log = work / "daemon.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.control.server_cli", "serve", "--repo", str(repo),
             "--cache-dir", str(work / "cache"), "--bind", addr, "--control-bind", addr, "--portmap-port", "111"],
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
    require_tool("qemu-system-x86_64", "sfdisk", "mkfs.ext4", "debugfs")
    require(os.access(mgd.BUSYBOX, os.X_OK), f"{mgd.BUSYBOX} is missing (apt-get install busybox-static)")
    art = mgd.ensure_guest()
    src = tmp_path / "guest.img"
    shutil.copyfile(art.disk, src)
    repo = tmp_path / "repo"
    Repository.init(repo)
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm="guest"), [str(src)])

    proc, control, log = _serve(repo, tmp_path, _free_address())
    try:
        out = subprocess.run(
            [sys.executable, "-m", "engine.control.server_cli", "publish", "latest", "--name", "boot",
             "--server", control, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        url = json.loads(out.stdout)["disks"][0]["url"]
        assert url.startswith("nfs://") and url.endswith(".img")
        result = boot_guest(url, "over-nfs", timeout=600, log_dir=tmp_path / "logs", snapshot=True)
        assert f"GUEST-HEARTBEAT ok {result.run_id}" in result.console_log
        assert "GUEST-DONE" in result.console_log
        assert result.datacheck_ok, result.console_log[-2000:]
        assert proc.poll() is None, log.read_text()[-2000:]
    finally:
        _stop(proc)
    # the guest's writes stayed in QEMU's overlay: the source and repository are intact
    assert src.read_bytes() == art.disk.read_bytes()
