"""Repository benchmark (issue 3): our backup and read path beside borgbackup, one run.

What it runs, in this order, on one generated disk image (``bench/gen_disk.py``; the
image is read once first, so every backup reads its source from the page cache):

1. ours: ``backup()`` through the Python API into a fresh repository (the lead's
   ``engine.repo.ingest``), block size and worker count as given; time and repository
   size (sum of file sizes under the repository directory);
2. borg ``create --compression lz4`` with its default chunker and with
   ``--chunker-params fixed,1048576`` (encryption none; BORG_BASE_DIR and the
   repositories under the work directory); time and repository size;
3. ours, reads through ``Stack.backup_disk(point, 0).read()``, the stack the NFS server reads through:
   - sequential 1 MiB reads over the whole disk, "cold": a fresh ``Repository`` object
     (empty chunk cache) and the pack files' pages dropped from the kernel page cache
     (``posix_fadvise(DONTNEED)``); and again with a fresh object but the packs in the
     page cache ("chunk cache cold");
   - random 4 KiB reads at 4 KiB-aligned offsets over the whole disk (holes included),
     warm: every chunk already in the decompression cache (sized to hold the disk);
   - ``BlockMap.translate()`` calls per second (4 KiB ranges at random offsets, and
     1 MiB ranges), called from a Python loop, as the read path calls it;
   - a correctness pass: the sha256 of the whole disk read back equals the source's;
4. optionally ``borg mount`` sequential read (needs borg's FUSE module; skipped with
   the reason when it is missing).

It prints a table and writes everything (figures, settings, machine) as JSON to
``bench/out/repo-bench-<UTC time>.json``. Phases can be chosen with ``--phases`` so a
profiler can watch one of them, e.g.::

    py-spy record -o backup.svg -- .venv/bin/python bench/repo_bench.py --phases ours-backup
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from engine.bench import diskgen as gen_disk  # noqa: E402
from benchlib import machine  # noqa: E402

from engine import blockmap as blockmap_mod  # noqa: E402
from engine.repo.ingest import BackupSettings, backup  # noqa: E402
from engine.repo.repository import Repository  # noqa: E402
from engine.stack import Stack  # noqa: E402
from engine.tuning import tune_malloc  # noqa: E402

MIB = 1 << 20
ALL_PHASES = ("ours-backup", "borg", "ours-read", "borg-mount")


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under path (what a copy of the repository costs)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_size
    return total


def drop_page_cache(path: Path) -> int:
    """Drop the clean pages of every file under path; returns how many files."""
    n = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()




# ------------------------------------------------------------------------ ours


def ours_backup(disk: Path, repo_dir: Path, block_size: int, workers: int | None) -> dict:
    Repository.init(repo_dir, block_size=block_size)
    repo = Repository.open(repo_dir)
    try:
        t0 = time.perf_counter()
        manifest = backup(repo, BackupSettings(vm="bench"), [str(disk)])
        elapsed = time.perf_counter() - t0
    finally:
        repo.close()
    size = os.stat(disk).st_size
    return {
        "seconds": round(elapsed, 3),
        "MB_per_s": round(size / elapsed / 1e6, 1),
        "repo_bytes": tree_bytes(repo_dir),
        "stats": manifest["stats"],
        "point": manifest["id"],
    }


def seq_read(repo_dir: Path, cache_bytes: int, workers: int | None, drop: bool, io: int) -> dict:
    if drop:
        drop_page_cache(repo_dir / "packs")
    stack = Stack.open(repo_dir, cache_bytes=cache_bytes, workers=workers)
    try:
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        size = disk.size
        t0 = time.perf_counter()
        n = 0
        for off in range(0, size, io):
            n += len(disk.read(off, io))
        elapsed = time.perf_counter() - t0
        stats = stack.cache.stats()
    finally:
        stack.close()
    assert n == size, (n, size)
    return {
        "io_bytes": io,
        "page_cache_dropped": drop,
        "seconds": round(elapsed, 3),
        "MB_per_s": round(size / elapsed / 1e6, 1),
        "cache": stats,
    }


def random_reads(repo_dir: Path, cache_bytes: int, workers: int | None, count: int, io: int, seed: int) -> dict:
    stack = Stack.open(repo_dir, cache_bytes=cache_bytes, workers=workers)
    try:
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        size = disk.size
        # warm: every chunk into the decompression cache
        for off in range(0, size, MIB):
            disk.read(off, MIB)
        rng = np.random.default_rng(seed)
        offsets = (rng.integers(0, size // io, count) * io).tolist()
        read = disk.read
        before = stack.cache.stats()
        t0 = time.perf_counter()
        for off in offsets:
            read(off, io)
        elapsed = time.perf_counter() - t0
        after = stack.cache.stats()
    finally:
        stack.close()
    return {
        "io_bytes": io,
        "reads": count,
        "seconds": round(elapsed, 3),
        "reads_per_s": round(count / elapsed),
        "loads_during_timing": after["loads"] - before["loads"],
        "cache": after,
    }


def translate_rate(repo_dir: Path, count: int, seed: int) -> dict:
    repo = Repository.open(repo_dir)
    try:
        bm = repo.point("latest").open_blockmap(0)
    finally:
        repo.close()
    size = bm.disk_size
    rng = np.random.default_rng(seed)
    out = {"implementation": blockmap_mod.IMPLEMENTATION}
    for name, io in (("4k", 4096), ("1m", MIB)):
        offsets = rng.integers(0, (size - io) // 512, count) * 512
        offsets = offsets.tolist()
        tr = bm.translate
        t0 = time.perf_counter()
        for off in offsets:
            tr(off, io)
        elapsed = time.perf_counter() - t0
        out[f"calls_per_s_{name}"] = round(count / elapsed)
    out["calls"] = count
    return out


def verify_read(repo_dir: Path, workers: int | None) -> str:
    stack = Stack.open(repo_dir, workers=workers)
    try:
        disk = stack.backup_disk(stack.repo.point("latest"), 0)
        h = hashlib.sha256()
        for off in range(0, disk.size, 4 * MIB):
            h.update(disk.read(off, 4 * MIB))
    finally:
        stack.close()
    return h.hexdigest()


# ------------------------------------------------------------------------ borg


def borg_env(base: Path) -> dict:
    env = dict(os.environ)
    env.update(
        BORG_BASE_DIR=str(base / "borg-base"),
        BORG_CACHE_DIR=str(base / "borg-base" / "cache"),
        BORG_CONFIG_DIR=str(base / "borg-base" / "config"),
        BORG_SECURITY_DIR=str(base / "borg-base" / "security"),
        BORG_KEYS_DIR=str(base / "borg-base" / "keys"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_PASSPHRASE="",
    )
    return env


def borg_version() -> str | None:
    if shutil.which("borg") is None:
        return None
    return subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout.strip()


def borg_backup(disk: Path, work: Path, name: str, chunker: list[str]) -> dict:
    env = borg_env(work)
    repo = work / f"borg-{name}"
    subprocess.run(["borg", "init", "--encryption=none", str(repo)], env=env, check=True, capture_output=True)
    cmd = ["borg", "create", "--compression", "lz4", *chunker, f"{repo}::img", str(disk)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    size = os.stat(disk).st_size
    return {
        "command": " ".join(cmd[:-2] + ["REPO::img", "DISK"]),
        "seconds": round(elapsed, 3),
        "MB_per_s": round(size / elapsed / 1e6, 1),
        "repo_bytes": tree_bytes(repo),
        "repo": str(repo),
    }


def borg_mount_seq(disk: Path, work: Path, repo: Path, io: int) -> dict:
    """Sequential read of the disk file through ``borg mount`` (FUSE), pages dropped."""
    env = borg_env(work)
    mnt = work / f"mnt-{repo.name}"
    mnt.mkdir(exist_ok=True)
    log = open(work / f"{repo.name}-mount.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(["borg", "mount", "-f", f"{repo}::img", str(mnt)], env=env, stdout=log, stderr=log)
    target = mnt / str(disk.resolve()).lstrip("/")
    try:
        deadline = time.monotonic() + 30
        while not target.exists():
            if proc.poll() is not None:
                log.close()
                msg = (work / f"{repo.name}-mount.log").read_text().strip().splitlines()
                return {"skipped": f"borg mount exited {proc.returncode}: {msg[-1] if msg else ''}"}
            if time.monotonic() > deadline:
                return {"skipped": "borg mount did not show the file within 30 s"}
            time.sleep(0.05)
        ready = time.perf_counter() - t0
        fd = os.open(target, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(fd).st_size
            t1 = time.perf_counter()
            off = 0
            while off < size:
                off += len(os.pread(fd, io, off))
            elapsed = time.perf_counter() - t1
        finally:
            os.close(fd)
        return {"mount_to_file_s": round(ready, 3), "seconds": round(elapsed, 3), "MB_per_s": round(size / elapsed / 1e6, 1)}
    finally:
        if proc.poll() is None:
            subprocess.run(["fusermount3" if shutil.which("fusermount3") else "fusermount", "-u", str(mnt)],
                           capture_output=True)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
        log.close()


# ------------------------------------------------------------------------ main


def fmt_mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:,.0f} MB"


def table(res: dict) -> str:
    ob = res.get("ours_backup", {})
    bd = res.get("borg_default", {})
    bf = res.get("borg_fixed_1m", {})
    rd = res.get("ours_read", {})
    bm = res.get("borg_mount", {})
    size = res["disk"]["size"]

    def t(r: dict) -> str:
        return f"{r['seconds']:.2f} s ({r['MB_per_s']:,.0f} MB/s)" if "seconds" in r else "—"

    rows = [
        ("figure", "ours", "borg default", "borg fixed 1 MiB"),
        (f"backup time, {size / (1 << 30):.3g} GiB", t(ob), t(bd), t(bf)),
        ("repository size", fmt_mb(ob.get("repo_bytes")), fmt_mb(bd.get("repo_bytes")), fmt_mb(bf.get("repo_bytes"))),
    ]
    if rd:
        cold, ccold = rd["seq_cold"], rd["seq_chunk_cache_cold"]
        mount = f"{bm['MB_per_s']:,.0f} MB/s (borg mount)" if "MB_per_s" in bm else "—"
        rows += [
            ("seq 1 MiB disk.read, nothing cached", f"{cold['MB_per_s']:,.0f} MB/s", mount, ""),
            ("seq 1 MiB disk.read, packs in page cache", f"{ccold['MB_per_s']:,.0f} MB/s", "", ""),
            ("random 4 KiB disk.read, warm", f"{rd['random_4k_warm']['reads_per_s']:,} reads/s", "", ""),
            ("translate() 4 KiB / 1 MiB", f"{rd['translate']['calls_per_s_4k']:,} / {rd['translate']['calls_per_s_1m']:,} calls/s", "", ""),
            ("read-back sha256 == source", str(rd["verified"]), "", ""),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # as the instantnfs command line does
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk", help="image to use (default: generate one with gen_disk into the cache dir)")
    ap.add_argument("--size", type=gen_disk.parse_size, default=2 << 30, help="size of a generated image (2G)")
    ap.add_argument("--seed", type=int, default=1, help="seed of a generated image (1)")
    ap.add_argument("--work", help="work directory (default: a new one under /var/tmp, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--block-size", type=gen_disk.parse_size, default=MIB, help="our repository block size (1M)")
    ap.add_argument("--workers", type=int, default=None, help="our thread pool size (default: the repository's)")
    ap.add_argument("--random-reads", type=int, default=200_000)
    ap.add_argument("--translate-calls", type=int, default=500_000)
    ap.add_argument("--phases", default="ours-backup,borg,ours-read,borg-mount",
                    help=f"comma-separated subset of {','.join(ALL_PHASES)}")
    ap.add_argument("--out", default=str(HERE / "out"), help="directory for the JSON result")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    for p in phases:
        if p not in ALL_PHASES:
            ap.error(f"unknown phase {p!r}")

    if args.disk:
        disk = Path(args.disk)
        gen_info = None
    else:
        cache = Path(os.environ.get("INSTANTNFS_BENCH_CACHE", "/var/tmp/instantnfs-bench"))
        cache.mkdir(parents=True, exist_ok=True)
        disk = cache / f"disk-{args.size}-s{args.seed}-v{gen_disk.GENERATOR_VERSION}.img"
        meta = disk.with_suffix(".json")
        if not (disk.exists() and meta.exists()):
            print(f"generating {disk} ...", file=sys.stderr)
            gen_info = gen_disk.generate(str(disk), args.size, args.seed, quiet=True)
            meta.write_text(json.dumps(gen_info, indent=2))
        gen_info = json.loads(meta.read_text())

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="repo-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    ours = work / "ours"
    print(f"disk {disk}, work dir {work}", file=sys.stderr)
    print("reading the source once (page cache) and hashing it ...", file=sys.stderr)
    src_sha = file_sha256(disk)
    st = os.stat(disk)
    res: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "disk": {"path": str(disk), "size": st.st_size, "allocated": st.st_blocks * 512, "sha256": src_sha,
                 "generator": gen_info},
        "settings": {"block_size": args.block_size, "workers": args.workers, "phases": phases,
                     "blockmap": blockmap_mod.IMPLEMENTATION, "borg": borg_version(),
                     "source": "in the page cache for every backup"},
    }
    try:
        if "ours-backup" in phases or "ours-read" in phases:
            print("ours: backup ...", file=sys.stderr)
            res["ours_backup"] = ours_backup(disk, ours, args.block_size, args.workers)
        if "borg" in phases or "borg-mount" in phases:
            if res["settings"]["borg"] is None:
                res["borg_skipped"] = "borg is not installed"
            else:
                print("borg: create, default chunker ...", file=sys.stderr)
                res["borg_default"] = borg_backup(disk, work, "default", [])
                print("borg: create, fixed 1 MiB chunker ...", file=sys.stderr)
                res["borg_fixed_1m"] = borg_backup(disk, work, "fixed1m", ["--chunker-params", "fixed,1048576"])
        if "ours-read" in phases:
            cache_bytes = max(1 << 30, 2 * st.st_size)
            rd: dict = {"cache_bytes": cache_bytes}
            print("ours: sequential read, nothing cached ...", file=sys.stderr)
            rd["seq_cold"] = seq_read(ours, cache_bytes, args.workers, True, MIB)
            print("ours: sequential read, packs in page cache ...", file=sys.stderr)
            rd["seq_chunk_cache_cold"] = seq_read(ours, cache_bytes, args.workers, False, MIB)
            print("ours: random 4 KiB reads, warm ...", file=sys.stderr)
            rd["random_4k_warm"] = random_reads(ours, cache_bytes, args.workers, args.random_reads, 4096, args.seed)
            print("ours: translate() ...", file=sys.stderr)
            rd["translate"] = translate_rate(ours, args.translate_calls, args.seed)
            print("ours: read back and compare ...", file=sys.stderr)
            rd["verified"] = verify_read(ours, args.workers) == src_sha
            res["ours_read"] = rd
        if "borg-mount" in phases and "borg_fixed_1m" in res:
            print("borg: mount, sequential read ...", file=sys.stderr)
            res["borg_mount"] = borg_mount_seq(disk, work, Path(res["borg_fixed_1m"]["repo"]), MIB)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"repo-bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\nload average at start {res['machine']['loadavg_1_5_15']}, at end {res['loadavg_at_end']}"
          f" ({res['machine']['cpus']} CPUs): other work on the machine skews the figures")
    print(f"\nJSON: {out}")
    if "ours_read" in res and not res["ours_read"]["verified"]:
        print("ERROR: the disk read back through the repository differs from the source", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
