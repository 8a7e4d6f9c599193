"""Fixtures for the NFS server tests: a repository of generated images, and daemons.

Every daemon runs as a subprocess (``python -m engine.control.cli serve``) on a
loopback address of its own from 127.0.0.61-127.0.0.84 (the range kept for these tests;
127.0.0.85-90 belong to the guest test), with its portmapper on port 111
of that address (QEMU's libnfs always asks port 111 of the URL's host), MOUNT, NFS and
the control API on their default ports there (they move on if taken; the fixture reads
the ports in use from ``/api/v1/status``). Teardown stops each daemon by its PID. Test
daemons publish with no free-space reserve (``--reserve-gib 0``) unless a test gives one.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from engine.control.auth import index_path
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from tests.images import make_image

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 1 << 20

_pool_lock = threading.Lock()
_free = [f"127.0.0.{i}" for i in range(61, 85)]


def _port_free(addr: str, port: int = 111) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError:
            return False
    return True


def take_address() -> str:
    """A loopback address of the pool whose ports 111 and 6161 are free (another test run on
    this machine may hold some: they are skipped)."""
    with _pool_lock:
        for addr in list(_free):
            if _port_free(addr) and _port_free(addr, 6161):  # the portmapper's and the control API's fixed ports
                _free.remove(addr)
                return addr
        raise RuntimeError("no loopback address left for another test daemon (port 111 taken on all)")


def give_address(addr: str) -> None:
    with _pool_lock:
        _free.append(addr)


class Daemon:
    """One instantnfs daemon subprocess."""

    def __init__(self, repo: Path, cache_dir: Path, addr: str, extra: list[str] | None = None, portmap_port: int = 111) -> None:
        self.repo, self.cache_dir, self.addr = repo, cache_dir, addr
        self.extra = extra or []
        self.portmap_port = portmap_port
        self.proc: subprocess.Popen | None = None
        self.log = cache_dir.parent / f"daemon-{addr}-{cache_dir.name}.log"
        self.status: dict[str, Any] = {}
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.status['ports']['control']}" if self.status else f"http://{self.addr}:6161"

    def start(self, timeout: float = 20.0) -> Daemon:
        cmd = [
            sys.executable, "-m", "engine.control.cli", "serve",
            "--repo", str(self.repo), "--cache-dir", str(self.cache_dir),
            "--bind", self.addr, "--control-bind", self.addr,
            "--portmap-port", str(self.portmap_port), "--reserve-gib", "0", *self.extra,
        ]
        start_at = self.log.stat().st_size if self.log.exists() else 0
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            text = self.log.read_bytes()[start_at:].decode(errors="replace")
            if "instantnfs serving" in text:
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"daemon did not start: {self.log.read_text()[-2000:]}")
        line = [ln for ln in text.splitlines() if "instantnfs serving" in ln][-1]
        port = int(line.split("control http://")[1].split("/")[0].rsplit(":", 1)[1])
        # written before "serving", to <cache_dir>/control.token and to the per-user index entry,
        # which stays writable when a test fills the cache volume
        self.token = index_path(self.addr, port).read_text().strip()
        self.status = self.get_at(f"http://{self.addr}:{port}", "/status")
        return self

    def get_at(self, base: str, path: str) -> Any:
        req = urllib.request.Request(base + "/api/v1" + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """A control API call with the daemon's token (the CLI finds it by itself)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + "/api/v1" + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    @property
    def mount_port(self) -> int:
        return self.status["ports"]["mount"]

    @property
    def nfs_port(self) -> int:
        return self.status["ports"]["nfs"]

    def libnfs_url(self, path: str) -> str:
        return f"nfs://{self.addr}{path}?version=3&nfsport={self.nfs_port}&mountport={self.mount_port}"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        p, self.proc = self.proc, None
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        return p.returncode


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two generated disk images and a repository with one restore point of both."""
    d = tmp_path_factory.mktemp("nfsrepo")
    kinds0 = ["random", "zero", "text", "repeat", "hole", "partial", "random", "repeat"] * 3
    img0, img1 = d / "disk0.raw", d / "disk1.raw"
    data0 = make_image(img0, kinds0, BLOCK, seed=1)
    data1 = make_image(img1, ["text", "random", "hole", "random", "zero"], BLOCK, tail=4096, seed=2)
    repo = Repository.init(d / "repo", BLOCK)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="testvm", cpus=2, memory_mib=512), [str(img0), str(img1)])
    return {
        "repo": repo,
        "point": m["id"],
        "vm": "testvm",
        "disks": [
            {"name": m["disks"][0]["name"], "path": img0, "size": len(data0), "sha256": hashlib.sha256(data0).hexdigest()},
            {"name": m["disks"][1]["name"], "path": img1, "size": len(data1), "sha256": hashlib.sha256(data1).hexdigest()},
        ],
        "data": [data0, data1],
    }


@pytest.fixture
def daemon_factory(tmp_path: Path, images: dict[str, Any]):
    """Start daemons (``factory(cache_dir=None, extra=[...])``); all stopped at teardown."""
    started: list[Daemon] = []
    addrs: list[str] = []

    def factory(cache_dir: Path | None = None, extra: list[str] | None = None, addr: str | None = None,
                portmap_port: int = 111) -> Daemon:
        if addr is None:
            addr = take_address()
            addrs.append(addr)
        c = cache_dir or tmp_path / f"cache-{len(started)}"
        dmn = Daemon(images["repo"], c, addr, extra, portmap_port)
        started.append(dmn)
        return dmn.start()

    yield factory
    for dmn in started:
        dmn.stop()
    for a in addrs:
        give_address(a)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Any]):
    """A module-wide daemon with the test point published as session 'sess'."""
    addr = take_address()
    d = tmp_path_factory.mktemp("served")
    dmn = Daemon(images["repo"], d / "cache", addr).start()
    try:
        dmn.api("POST", "/sessions", {"point": images["point"], "name": "sess"})
        yield dmn
    finally:
        dmn.stop()
        give_address(addr)


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh event loop (tests are plain functions)."""
    return asyncio.run(coro)
