"""NFS write benchmark: instantnfs's write cache beside NFS-Ganesha writing a plain file.

What it runs (in a private network namespace, like ``bench/nfs_bench.py``, whose inputs,
server start-up and qemu-img client it reuses):

- the input: the generated 2 GiB disk of ``nfs_bench.py`` (seed 1), backed up into a
  repository (1 MiB blocks, LZ4, dedup);
- instantnfs: ``serve`` on 127.0.0.2 (portmapper on 111), uvloop, chunk cache sized to
  hold the disk; each figure writes a fresh ``instant`` session (durable write cache:
  data file + bitmap, fdatasync on COMMIT / stable writes) in the work directory;
- NFS-Ganesha 4.x (VFS FSAL, NFSv3, TCP, read-write export) writing a plain copy of the
  raw image in the same work directory (same volume), registered with our portmapper.

Figures (medians of ``--runs``; client and servers share the machine's cores, so only
side-by-side ratios matter):

- 4 KiB random writes, UNSTABLE, a COMMIT every 256 writes per worker (in-repo asyncio
  client, 4 connections x 8 in flight);
- 4 KiB random FILE_SYNC writes (same client, 4 x 8);
- 1 MiB sequential writes (``qemu-img bench -w -t none -d 16``, QEMU's libnfs driver);
- 1 MiB sequential reads (``qemu-img bench``, QD16, warm chunk cache) of a clean disk and
  of a half-dirty one (64 KiB written in every 128 KiB);
- export of the 2 GiB half-dirty disk to a raw file on the same volume (control API job,
  fsync of the output included).

Each figure starts after ``sync`` (no writeback backlog from the previous one). The
sequential-write figures cover 2 GiB, past the point (~1.5 GB of dirty pages here) where
the kernel throttles every writer to the disk's speed, for Ganesha as for us.

    python bench/nfs_write_bench.py [--work /var/tmp/instantnfs-nfsbench] [--runs 3] [--seconds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nfs_bench as nb  # noqa: E402 - the read benchmark's inputs, servers and clients

GANESHA_RW = nb.GANESHA_CONF.replace("Access_Type = RO;", "Access_Type = RW;")
COMMIT_EVERY = 256


def start_ganesha_rw(work: Path, m: dict) -> list[nb.Proc]:
    """Ganesha exporting a writable plain copy of the raw image (same volume as our cache)."""
    if shutil.which("ganesha.nfsd") is None:
        raise RuntimeError("ganesha.nfsd is not installed (apt-get install nfs-ganesha nfs-ganesha-vfs)")
    g = work / "ganesha-rw"
    (g / "export").mkdir(parents=True, exist_ok=True)
    (g / "recov").mkdir(exist_ok=True)
    target = g / "export" / "disk.img"
    if not target.exists() or target.stat().st_size != m["bytes"]:
        nb.log("copying the raw image for Ganesha to write")
        shutil.copyfile(m["image"], target)
    (g / "ganesha.conf").write_text(GANESHA_RW.format(nfs_port=nb.GANESHA_NFS_PORT, mnt_port=nb.GANESHA_MNT_PORT, work=g))
    pm = nb.Proc([nb.PY, "-m", "engine.nfs.portmap", "--bind", nb.PEER, "--port", "111", "--unix", "/run/rpcbind.sock"],
                 work / "portmap.log", "portmapper listening")
    gan = nb.Proc(["ganesha.nfsd", "-F", "-f", str(g / "ganesha.conf"), "-L", str(g / "ganesha.log"), "-p", str(g / "ganesha.pid"),
                   "-N", "NIV_EVENT"], work / "ganesha.out", "", timeout=5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = subprocess.run(["rpcinfo", "-p", nb.PEER], capture_output=True, text=True)
        if " 100005 " in r.stdout and " 100003 " in r.stdout:
            return [gan, pm]
        if gan.p.poll() is not None:
            break
        time.sleep(0.2)
    gan.stop()
    pm.stop()
    raise RuntimeError(f"Ganesha did not register with the portmapper; see {g / 'ganesha.log'}")


async def random_writes(host: str, mount_port: int, nfs_port: int, export: str, name: str, disk_size: int,
                        conns: int, depth: int, seconds: float, stable: int, size: int = 4096) -> float:
    """IOPS of random aligned ``size`` writes (``stable``: 0 UNSTABLE + COMMIT every
    ``COMMIT_EVERY`` writes per worker, 2 FILE_SYNC); the time includes the last COMMIT."""
    from engine.nfs.client import NFSClient
    from engine.nfs.nfs3_types import NFSPROC3, COMMIT3args, WRITE3args, nfs_fh3

    clients = [await NFSClient.connect(host, mount_port, nfs_port) for _ in range(conns)]
    try:
        root = await clients[0].mount(export)
        fh = nfs_fh3(await clients[0].walk(root, name))
        blocks = disk_size // size
        done = 0
        stop = time.monotonic() + seconds

        async def worker(c: NFSClient, seed: int) -> None:
            nonlocal done
            rnd = random.Random(seed)
            payload = rnd.randbytes(size)
            n = 0
            while time.monotonic() < stop:
                await c.call(NFSPROC3.WRITE, WRITE3args(fh, rnd.randrange(blocks) * size, size, stable, payload))
                done += 1
                n += 1
                if stable == 0 and n % COMMIT_EVERY == 0:
                    await c.call(NFSPROC3.COMMIT, COMMIT3args(fh, 0, 0))
            if stable == 0:
                await c.call(NFSPROC3.COMMIT, COMMIT3args(fh, 0, 0))

        t0 = time.monotonic()
        await asyncio.gather(*(worker(c, i * 100 + j) for i, c in enumerate(clients) for j in range(depth)))
        return done / (time.monotonic() - t0)
    finally:
        for c in clients:
            await c.close()


def settle() -> None:
    """Write back every dirty page first: each figure starts with no writeback backlog
    (past ~1.5 GB of dirty pages the kernel throttles writers to the disk's speed)."""
    os.sync()


def qemu_write(url: str, size: int, depth: int, count: int, step: int | None = None) -> float:
    """Seconds of ``qemu-img bench -w`` (writes, then the flush qemu-img ends with)."""
    cmd = ["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(depth), "-s", str(size),
           "--pattern", "0x5a"]
    if step:
        cmd += ["-S", str(step)]
    t0 = time.monotonic()
    r = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or "Run completed" not in r.stdout:
        raise RuntimeError(f"qemu-img bench -w failed: {r.stdout}{r.stderr}")
    return time.monotonic() - t0


class Ours:
    """The daemon and fresh sessions of the bench point."""

    def __init__(self, work: Path, m: dict) -> None:
        cfg = work / "instantnfs-write.toml"
        self.cache_mib = max(1024, int(m["bytes"] * 1.25) >> 20)
        cfg.write_text(f"[cache]\nchunk_cache_mib = {self.cache_mib}\nreserve_gib = 0\n")
        self.cache = work / "write-cache"
        shutil.rmtree(self.cache, ignore_errors=True)
        self.proc = nb.Proc([nb.PY, "-m", "engine.control.cli", "serve", "--repo", m["repo"], "--cache-dir", str(self.cache),
                             "--bind", nb.OURS, "--control-bind", nb.OURS, "--config", str(cfg)], work / "instantnfs-write.log",
                            "instantnfs serving")
        st = nb.api("GET", "/status")
        self.nfs, self.mount = st["ports"]["nfs"], st["ports"]["mount"]
        self.m = m
        self.n = 0

    def session(self) -> str:
        self.n += 1
        name = f"w{self.n}"
        nb.api("POST", "/sessions", {"point": self.m["point"], "name": name})
        return name

    def drop(self, name: str) -> None:
        nb.api("DELETE", f"/sessions/{name}")

    def url(self, name: str) -> str:
        return f"nfs://{nb.OURS}/instantnfs/{name}/{self.m['disk']}.img"

    def export(self, name: str, out: Path) -> dict:
        job = nb.api("POST", f"/sessions/{name}/export", {"disk": self.m["disk"], "output": str(out)})
        while job["state"] == "running":
            time.sleep(0.1)
            job = nb.api("GET", f"/jobs/{job['id']}")
        if job["state"] != "done":
            raise RuntimeError(f"export failed: {job['error']}")
        return job["result"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/var/tmp/instantnfs-nfsbench", help="inputs and logs (shared with nfs_bench.py)")
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each random-write run")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    if not nb.in_private_netns():
        nb.reexec_in_netns()
    nb.setup_namespace()
    work = Path(a.work)
    m = nb.prepare(work, a.size)
    import engine.blockmap as bm

    size = m["bytes"]
    mib = size >> 20
    results: dict = {"setup": {
        "disk_bytes": size, "block_map": bm.IMPLEMENTATION, "loop": "uvloop", "granule": 4096,
        "client": subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        + " (qemu-img bench over nfs://); in-repo asyncio client 4 connections x 8 for 4 KiB",
        "cpus": os.cpu_count(), "runs": a.runs, "volume": str(work)}}
    ours = Ours(work, m)
    procs: list[nb.Proc] = [ours.proc]
    results["setup"]["chunk_cache_mib"] = ours.cache_mib
    try:
        procs += start_ganesha_rw(work, m)
        url_gan = f"nfs://{nb.PEER}/export/disk.img"
        r_o, r_g = results.setdefault("instantnfs", {}), results.setdefault("ganesha", {})

        def ours_rand(stable: int) -> float:
            s = ours.session()
            settle()
            try:
                return asyncio.run(random_writes(nb.OURS, ours.mount, ours.nfs, f"/instantnfs/{s}", f"{m['disk']}.img", size,
                                                 4, 8, a.seconds, stable))
            finally:
                ours.drop(s)

        def gan_rand(stable: int) -> float:
            settle()
            return asyncio.run(random_writes(nb.PEER, nb.GANESHA_MNT_PORT, nb.GANESHA_NFS_PORT, "/export", "disk.img", size,
                                             4, 8, a.seconds, stable))

        for label, stable in (("rand4K_unstable_commit_IOPS", 0), ("rand4K_filesync_IOPS", 2)):
            nb.log(f"random 4 KiB writes, {label}")
            r_o[label] = round(statistics.median(ours_rand(stable) for _ in range(a.runs)))
            r_g[label] = round(statistics.median(gan_rand(stable) for _ in range(a.runs)))

        def ours_seq() -> float:
            s = ours.session()
            settle()
            try:
                return size / qemu_write(ours.url(s), 1 << 20, 16, mib) / 1e9
            finally:
                ours.drop(s)

        nb.log("1 MiB sequential writes, QD16")
        r_o["seq1M_qd16_write_GBps"] = round(statistics.median(ours_seq() for _ in range(a.runs)), 2)
        def gan_seq() -> float:
            settle()
            return size / qemu_write(url_gan, 1 << 20, 16, mib) / 1e9

        r_g["seq1M_qd16_write_GBps"] = round(statistics.median(gan_seq() for _ in range(a.runs)), 2)

        nb.log("reads: clean disk vs half-dirty disk (64 KiB written in every 128 KiB)")
        clean = ours.session()
        half = ours.session()
        qemu_write(ours.url(half), 64 << 10, 16, size // (128 << 10), step=128 << 10)
        for s in (clean, half):
            nb.qemu_bench(ours.url(s), 1 << 20, 16, mib)  # warm the chunk cache (and the page cache)
        r_o["read1M_qd16_clean_GBps"] = round(size / nb.median_of(a.runs, nb.qemu_bench, ours.url(clean), 1 << 20, 16, mib) / 1e9, 2)
        r_o["read1M_qd16_half_dirty_GBps"] = round(size / nb.median_of(a.runs, nb.qemu_bench, ours.url(half), 1 << 20, 16, mib) / 1e9, 2)
        r_o["half_dirty_over_clean"] = round(r_o["read1M_qd16_half_dirty_GBps"] / r_o["read1M_qd16_clean_GBps"], 2)
        st = nb.api("GET", f"/sessions/{half}")
        r_o["half_dirty_bytes"] = st["cache"]["dirty_bytes"]

        nb.log("export of the half-dirty 2 GiB disk (raw, same volume)")
        exports = []
        for i in range(a.runs):
            settle()
            out = work / f"export-{i}.raw"
            res = ours.export(half, out)
            exports.append(size / res["seconds"] / 1e9)
            out.unlink()
        r_o["export_half_dirty_raw_GBps"] = round(statistics.median(exports), 2)
        ours.drop(clean)
        ours.drop(half)
    finally:
        for p in reversed(procs):
            p.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
