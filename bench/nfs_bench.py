"""NFS serving benchmark: instantnfs beside NFS-Ganesha and the local file, in one run.

What it runs (everything inside a private network namespace, so fixed ports such as 111
and 2049 are ours alone; re-executes itself under ``unshare --net --mount``):

- the input: a generated 2 GiB disk (``bench/gen_disk.py``, seed 1: holes, random, text,
  repeated blocks), backed up into an instantnfs repository (1 MiB blocks, LZ4, dedup);
- instantnfs: ``engine.control.cli serve`` on 127.0.0.2 (portmapper on 111),
  uvloop, block map build as reported, chunk cache sized to hold the whole disk for the
  "warm" figures; the "cold" figure restarts the daemon first (empty chunk cache; the
  pack files may still be in the kernel page cache: decompression is what is measured);
- NFS-Ganesha 4.x (VFS FSAL, NFSv3, TCP) serving the uncompressed raw image from the
  page cache on 127.0.0.1, registered with our standalone portmapper on 127.0.0.1:111;
- the local file (page cache) as the physical reference.

Clients: ``qemu-img bench`` (QEMU's libnfs driver over ``nfs://``; sequential reads,
``-t none``), and for random 4 KiB reads and GETATTR latency the in-repo asyncio client
(``engine.nfs.client``) with several connections. Figures are medians of ``--runs``.
Client and servers share the machine's cores, so only side-by-side ratios matter.

    python bench/nfs_bench.py [--work /var/tmp/instantnfs-nfsbench] [--runs 3] [--profile]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable
OURS = "127.0.0.2"
PEER = "127.0.0.1"
GIB = 1 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_private_netns() -> bool:
    return os.environ.get("INSTANTNFS_BENCH_NETNS") == "1"


def reexec_in_netns() -> None:
    if shutil.which("unshare") is None:
        sys.exit("nfs_bench: 'unshare' is needed to run in a private network namespace")
    env = dict(os.environ, INSTANTNFS_BENCH_NETNS="1")
    os.execvpe("unshare", ["unshare", "--net", "--mount", PY, *sys.argv], env)


def setup_namespace() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # hide any host rpcbind's unix socket: Ganesha must register with our portmapper
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)


# -- inputs -------------------------------------------------------------------------------------


def prepare(work: Path, size: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    img = work / "disk.img"
    meta = work / "inputs.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("size") == size and img.exists() and Path(m["repo"]).exists():
            return m
    log(f"generating the {size} disk")
    subprocess.run([PY, "-m", "engine.bench.diskgen", "-o", str(img), "--size", size, "--seed", "1", "-q"], check=True, stdout=sys.stderr)
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    repo = work / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    Repository.init(repo, 1 << 20)
    log("backing it up into the repository")
    with Repository.open(repo) as r:
        p = backup(r, BackupSettings(vm="bench"), [str(img)])
        huge = work / "huge.img"
        with open(huge, "wb") as f:  # 1 TiB sparse disk with a little data
            f.truncate(1 << 40)
            f.seek(0)
            f.write(os.urandom(1 << 20))
            f.seek(1 << 39)
            f.write(os.urandom(1 << 20))
        t0 = time.monotonic()
        ph = backup(r, BackupSettings(vm="huge"), [str(huge)])
        log(f"1 TiB sparse disk backed up in {time.monotonic() - t0:.1f} s")
        huge.unlink()
    m = {"size": size, "image": str(img), "repo": str(repo), "point": p["id"], "huge_point": ph["id"],
         "disk": p["disks"][0]["name"], "huge_disk": ph["disks"][0]["name"], "bytes": os.path.getsize(img),
         "stored_bytes": p["stats"].get("stored_bytes")}
    meta.write_text(json.dumps(m, indent=2))
    return m


# -- servers ----------------------------------------------------------------------------------------


class Proc:
    def __init__(self, cmd: list[str], logfile: Path, ready: str, cwd: Path = ROOT, timeout: float = 60) -> None:
        self.logfile = logfile
        start = logfile.stat().st_size if logfile.exists() else 0
        with open(logfile, "ab") as f:
            self.p = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {logfile.read_bytes()[start:].decode(errors='replace')[-1500:]}")
            if ready in logfile.read_bytes()[start:].decode(errors="replace"):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{cmd[0]} did not become ready, see {logfile}")

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait()


def start_ours(work: Path, m: dict) -> tuple[Proc, int]:
    cfg = work / "instantnfs.toml"
    cache_mib = max(1024, int(m["bytes"] * 1.25) >> 20)
    cfg.write_text(f"[cache]\nchunk_cache_mib = {cache_mib}\nreserve_gib = 0\n")  # a benchmark, not a VM: no free-space reserve
    shutil.rmtree(work / "cache", ignore_errors=True)  # no sessions left from an earlier run
    p = Proc([PY, "-m", "engine.control.cli", "serve", "--repo", m["repo"], "--cache-dir", str(work / "cache"),
              "--bind", OURS, "--control-bind", OURS, "--config", str(cfg)], work / "instantnfs.log", "instantnfs serving")
    return p, cache_mib


def api(method: str, path: str, body: dict | None = None) -> dict:
    from engine.control.auth import index_path, read_token

    token = read_token(index_path(OURS, 6161)) or ""  # the daemon writes it for its user at start
    req = urllib.request.Request(f"http://{OURS}:6161/api/v1{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


GANESHA_NFS_PORT = 2050  # all addresses (no Bind_addr: name lookups fail in the namespace); ours has 2049
GANESHA_MNT_PORT = 20048
GANESHA_CONF = """
NFS_CORE_PARAM {{
    Protocols = 3;
    NFS_Port = {nfs_port};
    MNT_Port = {mnt_port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    mount_path_pseudo = true;
    Plugins_Dir = /usr/lib/x86_64-linux-gnu/ganesha;
}}
NFSv4 {{ Graceless = true; RecoveryRoot = {work}/recov; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1;
    Path = {work}/export;
    Pseudo = /export;
    Protocols = 3;
    Transports = TCP;
    Access_Type = RO;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


def start_ganesha(work: Path, m: dict) -> list[Proc]:
    if shutil.which("ganesha.nfsd") is None:
        raise RuntimeError("ganesha.nfsd is not installed (apt-get install nfs-ganesha nfs-ganesha-vfs)")
    g = work / "ganesha"
    (g / "export").mkdir(parents=True, exist_ok=True)
    (g / "recov").mkdir(exist_ok=True)
    link = g / "export" / "disk.img"
    if not link.exists():
        os.link(m["image"], link)
    (g / "ganesha.conf").write_text(GANESHA_CONF.format(nfs_port=GANESHA_NFS_PORT, mnt_port=GANESHA_MNT_PORT, work=g))
    pm = Proc([PY, "-m", "engine.nfs.portmap", "--bind", PEER, "--port", "111", "--unix", "/run/rpcbind.sock"], work / "portmap.log", "portmapper listening")
    gan = Proc(["ganesha.nfsd", "-F", "-f", str(g / "ganesha.conf"), "-L", str(g / "ganesha.log"), "-p", str(g / "ganesha.pid"),
                "-N", "NIV_EVENT"], work / "ganesha.out", "", timeout=5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = subprocess.run(["rpcinfo", "-p", PEER], capture_output=True, text=True)
        if " 100005 " in r.stdout and " 100003 " in r.stdout:
            return [gan, pm]
        if gan.p.poll() is not None:
            break
        time.sleep(0.2)
    gan.stop()
    pm.stop()
    raise RuntimeError(f"Ganesha did not register with the portmapper; see {g / 'ganesha.log'}")


# -- clients -------------------------------------------------------------------------------------


def qemu_bench(url: str, size: int, depth: int, count: int, step: int | None = None, fmt: str = "raw") -> float:
    """Seconds for qemu-img bench's I/O loop (the local file is read through the page cache)."""
    cache = "none" if url.startswith("nfs://") else "writeback"
    cmd = ["qemu-img", "bench", "-f", fmt, "-t", cache, "-c", str(count), "-d", str(depth), "-s", str(size)]
    if step:
        cmd += ["-S", str(step)]
    r = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=900)
    mm = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if r.returncode != 0 or not mm:
        raise RuntimeError(f"qemu-img bench failed: {r.stdout}{r.stderr}")
    return float(mm.group(1))


async def random_reads(host: str, mount_port: int, nfs_port: int, export: str, name: str, disk_size: int,
                       conns: int, depth: int, seconds: float, size: int = 4096) -> float:
    """IOPS of random ``size`` reads: ``conns`` connections x ``depth`` in flight each."""
    from engine.nfs.client import NFSClient
    from engine.nfs.nfs3_types import NFSPROC3, READ3args, nfs_fh3

    clients = [await NFSClient.connect(host, mount_port, nfs_port) for _ in range(conns)]
    try:
        root = await clients[0].mount(export)
        fh = await clients[0].walk(root, name)
        blocks = disk_size // size
        done = 0
        stop = time.monotonic() + seconds

        async def worker(c: NFSClient, seed: int) -> None:
            nonlocal done
            rnd = random.Random(seed)
            while time.monotonic() < stop:
                await c.call(NFSPROC3.READ, READ3args(nfs_fh3(fh), rnd.randrange(blocks) * size, size))
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(c, i * 100 + j) for i, c in enumerate(clients) for j in range(depth)))
        return done / (time.monotonic() - t0)
    finally:
        for c in clients:
            await c.close()


async def getattr_latency(host: str, mount_port: int, nfs_port: int, export: str, seconds: float) -> list[float]:
    from engine.nfs.client import NFSClient

    c = await NFSClient.connect(host, mount_port, nfs_port)
    try:
        root = await c.mount(export)
        lat = []
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            await c.getattr(root)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)
        return lat
    finally:
        await c.close()


def getattr_under_load(url: str, host: str, mport: int, nport: int, export: str, disk_bytes: int) -> dict:
    count = max(64, (4 * disk_bytes) >> 20)
    load = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", "16", "-s", "1M", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    lat = asyncio.run(getattr_latency(host, mport, nport, export, 5.0))
    out = load.communicate(timeout=900)[0]
    mm = re.search(r"Run completed in ([0-9.]+) seconds", out)
    lat.sort()
    return {
        "n": len(lat),
        "p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 2),
        "max_ms": round(lat[-1] * 1e3, 2),
        "load_GBps": round(count * (1 << 20) / float(mm.group(1)) / 1e9, 2) if mm else None,
    }


async def publish_to_first_byte(point: str, disk: str) -> float:
    from engine.nfs.client import NFSClient

    st = api("GET", "/status")
    c = await NFSClient.connect(OURS, st["ports"]["mount"], st["ports"]["nfs"])
    try:
        root = await c.mount("/instantnfs")
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, lambda: api("POST", "/sessions", {"point": point, "name": "huge"}))
        sess = await c.lookup(root, "huge")
        fh = await c.lookup(sess, f"{disk}.img")
        data, _ = await c.read(fh, 0, 4096)
        dt = time.perf_counter() - t0
        assert len(data) == 4096
        return dt
    finally:
        await c.close()
        api("DELETE", "/sessions/huge")


# -- the run --------------------------------------------------------------------------------------


def median_of(runs: int, fn, *args, **kw) -> float:
    return statistics.median(fn(*args, **kw) for _ in range(runs))


def profile(pid: int, out: Path, seconds: int, load) -> None:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    p = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load()
    p.wait(timeout=seconds + 60)


def summarize_profile(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    """Share of samples per leaf function (self time) from py-spy's raw (folded) output."""
    total, leaves = 0, {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        leaf = stack.split(";")[-1]
        leaves[leaf] = leaves.get(leaf, 0) + k
    return [(f, round(100 * k / total, 1)) for f, k in sorted(leaves.items(), key=lambda x: -x[1])[:top]] if total else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/var/tmp/instantnfs-nfsbench", help="inputs and logs (reused between runs)")
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also record py-spy profiles of the daemon under load")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    if not in_private_netns():
        reexec_in_netns()
    setup_namespace()
    work = Path(a.work)
    m = prepare(work, a.size)
    import engine.blockmap as bm

    results: dict = {"setup": {
        "disk_bytes": m["bytes"], "stored_bytes": m["stored_bytes"], "block_map": getattr(bm, "IMPLEMENTATION", "?"),
        "loop": "uvloop", "client": subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "cpus": os.cpu_count(), "runs": a.runs}}
    size = m["bytes"]
    mib = size >> 20
    ours, cache_mib = start_ours(work, m)
    results["setup"]["chunk_cache_mib"] = cache_mib
    procs = [ours]
    try:
        api("POST", "/sessions", {"point": m["point"], "name": "bench"})
        st = api("GET", "/status")
        oport, omount = st["ports"]["nfs"], st["ports"]["mount"]
        url_ours = f"nfs://{OURS}/instantnfs/bench/{m['disk']}.img"
        # cold: nothing decompressed yet
        log("instantnfs: 1 MiB reads QD16, cold chunk cache")
        t = qemu_bench(url_ours, 1 << 20, 16, mib)
        results["cold_1M_qd16_GBps"] = round(size / t / 1e9, 2)
        gan = start_ganesha(work, m)
        procs += gan
        url_gan = f"nfs://{PEER}/export/disk.img"
        targets = {"instantnfs": url_ours, "ganesha": url_gan, "local": m["image"]}
        for name, url in targets.items():
            qemu_bench(url, 1 << 20, 16, mib)  # warm-up
            r = results.setdefault(name, {})
            log(f"{name}: sequential reads")
            r["1M_qd16_GBps"] = round(size / median_of(a.runs, qemu_bench, url, 1 << 20, 16, mib) / 1e9, 2)
            r["1M_qd1_GBps"] = round(size / median_of(a.runs, qemu_bench, url, 1 << 20, 1, mib) / 1e9, 2)
            n4 = 100_000
            r["4K_qd16_IOPS"] = round(n4 / median_of(a.runs, qemu_bench, url, 4096, 16, n4, step=(size // n4) & ~4095))
            r["4K_qd1_IOPS"] = round(20_000 / median_of(a.runs, qemu_bench, url, 4096, 1, 20_000, step=(size // 20_000) & ~4095))
        log("random 4 KiB reads, in-repo client, 4 connections x 8")
        results["instantnfs"]["rand4K_4x8_IOPS"] = round(statistics.median(
            asyncio.run(random_reads(OURS, omount, oport, "/instantnfs/bench", f"{m['disk']}.img", size, 4, 8, 4.0)) for _ in range(a.runs)))
        results["ganesha"]["rand4K_4x8_IOPS"] = round(statistics.median(
            asyncio.run(random_reads(PEER, GANESHA_MNT_PORT, GANESHA_NFS_PORT, "/export", "disk.img", size, 4, 8, 4.0)) for _ in range(a.runs)))
        log("GETATTR latency while 1 MiB reads saturate each server")
        results["instantnfs"]["getattr_under_load"] = getattr_under_load(url_ours, OURS, omount, oport, "/instantnfs", size)
        results["ganesha"]["getattr_under_load"] = getattr_under_load(url_gan, PEER, GANESHA_MNT_PORT, GANESHA_NFS_PORT, "/export", size)
        log("publish -> first byte, 1 TiB sparse disk")
        results["instantnfs"]["publish_1TiB_first_byte_ms"] = round(
            1e3 * statistics.median(asyncio.run(publish_to_first_byte(m["huge_point"], m["huge_disk"])) for _ in range(a.runs)), 1)
        if a.profile:
            log("py-spy profiles of the daemon")
            prof = {}
            for label, fn in (("1M_qd16", lambda: [qemu_bench(url_ours, 1 << 20, 16, mib) for _ in range(3)]),
                              ("4K_qd16", lambda: qemu_bench(url_ours, 4096, 16, 100_000, step=(size // 100_000) & ~4095))):
                out = work / f"pyspy-{label}.txt"
                profile(ours.pid, out, 8, fn)
                prof[label] = summarize_profile(out)
            results["profile_self_time_pct"] = prof
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
