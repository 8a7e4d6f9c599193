"""instantnfs under test: the daemon as a process, driven over its HTTP API.

The suite measures what a user runs: ``python -m engine.control.cli serve`` in its own
process (uvloop; the Cython block map unless ``INSTANTNFS_PURE=1``), with a portmapper
on port 111 of its own loopback address so that QEMU's ``nfs://`` driver finds it. The
configuration is written into the work directory: a known API token, no free-space
reserve (a benchmark publishes many sessions on a small volume), the chunk cache size
the scenario asks for.

"Cold" rows restart the daemon (an empty decompression cache) and, for the second cold
row, drop the repository's pack files from the kernel page cache
(``posix_fadvise(DONTNEED)``), so decompression and the disk are measured, not memory.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from engine.bench.core import NfsTarget
from engine.bench.pagecache import drop_file_pages, files_under

READY = "instantnfs serving"


class ApiError(RuntimeError):
    pass


class OurDaemon:
    """One instantnfs daemon serving ``repo`` on ``address`` (a loopback address)."""

    def __init__(self, work: Path, repo: Path, address: str = "127.0.0.2", cache_bytes: int = 1 << 30,
                 env: dict[str, str] | None = None) -> None:
        self.work = work
        self.repo = repo
        self.address = address
        self.cache_bytes = cache_bytes
        self.env = dict(os.environ, **(env or {}))
        self.token = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.export = "/instantnfs"
        self.log = work / "instantnfs.log"
        self.control_port = 6161

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        if self.proc is not None:
            raise RuntimeError("the daemon is already running")
        self.work.mkdir(parents=True, exist_ok=True)
        cache = self.work / "cache"
        cfg = self.work / "instantnfs.toml"
        cfg.write_text(
            "[cache]\n"
            f"chunk_cache_mib = {max(1, self.cache_bytes >> 20)}\n"
            "reserve_gib = 0\n"
            "[control]\n"
            f'token = "{self.token}"\n'
            f'token_file = "{self.work / "control.token"}"\n'
        )
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine.control.cli", "serve", "--repo", str(self.repo), "--cache-dir", str(cache),
                 "--bind", self.address, "--control-bind", self.address, "--config", str(cfg)],
                stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[start:].decode(errors="replace")
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"instantnfs exited at start: {text[-1500:]}")
            if READY in text:
                st = self.api("GET", "/status")
                self.ports = {k: v for k, v in st["ports"].items() if isinstance(v, int)}
                self.export = st["export"]
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"instantnfs did not start within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def restart(self) -> None:
        """Stop and start again: an empty chunk cache, the published sessions reloaded."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the daemon is not running")
        return self.proc.pid

    def __enter__(self) -> OurDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API ------------------------------------------------------------------------------

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        req = urllib.request.Request(
            f"http://{self.address}:{self.control_port}/api/v1{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(data) if data else None

    def metrics(self) -> dict[str, float]:
        """The daemon's unlabelled ``/metrics`` samples (Prometheus text), by name."""
        req = urllib.request.Request(f"http://{self.address}:{self.control_port}/metrics",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return parse_metrics(r.read().decode())

    def publish(self, point: str, name: str) -> list[NfsTarget]:
        """Publish ``point`` as session ``name``: one target per disk (its ``.img`` file)."""
        view = self.api("POST", "/sessions", {"point": point, "name": name})
        return [self.target(name, d["name"], d["size"]) for d in view["disks"]]

    def target(self, session: str, disk: str, size: int) -> NfsTarget:
        return NfsTarget(self.address, self.ports["mount"], self.ports["nfs"], self.export, f"{session}/{disk}.img", size)

    def unpublish(self, name: str) -> None:
        self.api("DELETE", f"/sessions/{name}")

    def sessions(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/sessions"))

    def memory(self) -> dict[str, int]:
        """The daemon's resident set now and at its peak (bytes, from /proc)."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def drop_pack_pages(self) -> int:
        return drop_file_pages(files_under(self.repo))


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition: name -> value (comments,
    labelled samples and unparsable values left out)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        try:
            out[name] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def export_disk(d: OurDaemon, session: str, disk: str, output: Path, timeout: float = 1800.0) -> dict[str, Any]:
    """Run an export job of ``disk`` of ``session`` into ``output`` and wait for its end."""
    job = d.api("POST", f"/sessions/{session}/export", {"disk": disk, "output": str(output), "format": "raw"})
    deadline = time.monotonic() + timeout
    while job["state"] == "running":
        if time.monotonic() > deadline:
            d.api("DELETE", f"/jobs/{job['id']}")
            raise RuntimeError(f"the export of {session}/{disk} did not end within {timeout:.0f} s")
        time.sleep(0.05)
        job = d.api("GET", f"/jobs/{job['id']}")
    if job["state"] != "done":
        raise RuntimeError(f"the export of {session}/{disk} ended {job['state']}: {job.get('error')}")
    return dict(job)


def cli_backup(repo: Path, vm: str, image: Path, extents: Path | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """``instantnfs backup --json`` of ``image`` as VM ``vm`` (only ``extents`` read when
    given, as from changed block tracking); the command's JSON result."""
    cmd = [sys.executable, "-m", "engine.control.cli", "backup", "--repo", str(repo), "--vm", vm, "--json", "-q"]
    if extents is not None:
        cmd += ["--changed-extents", str(extents)]
    r = subprocess.run([*cmd, str(image)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"instantnfs backup of {vm} failed: {r.stderr.strip()[-500:]}")
    return dict(json.loads(r.stdout))
