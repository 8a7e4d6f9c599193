"""Write cache benchmark, local (no NFS): the layer the NFS WRITE/COMMIT/READ handlers call.

    .venv/bin/python bench/writecache_bench.py                 # 2 GiB disk, ~1-2 minutes
    .venv/bin/python bench/writecache_bench.py --size 256M     # quick look

What it runs, in one process, one thread unless said (Python API, no client, no network):

- base: a restore point of a seeded 2 GiB image (``bench/gen_disk.py``, reused from
  ``$INSTANTNFS_BENCH_CACHE`` or ``/var/tmp/instantnfs-bench`` when there), 1 MiB
  blocks, read through ``BackupDisk`` with a decompression cache that holds the disk;
- the write cache in ``--work`` (default a directory under /var/tmp: a real disk, so
  fsync costs what it costs there; the file system type is recorded);
- 4 KiB random writes (4 KiB-aligned), UNSTABLE, COMMIT every 256 writes (the commit
  time included);
- 4 KiB random writes, FILE_SYNC (``stable=True``: each returns after fdatasync of the
  data and of the bitmap page), one thread and 4 threads (group commit);
- 1 MiB sequential writes of 1 GiB, UNSTABLE, one COMMIT at the end (included), the
  better of two fresh caches;
- reads, 1 MiB sequential through ``readv`` (the list of buffers a server sends), the
  bytes copied once into a sink (as a socket send copies them into the kernel): a clean disk, a half-dirty disk with dirty 1 MiB extents alternating
  with clean ones, and a half-dirty disk where every other 4 KiB granule is dirty (the
  worst case: 256 runs per read). Everything warm (chunk cache and page cache), best of
  three passes;
- export of the half-dirty disk to a raw sparse file, no writer (GB/s of disk size, the
  better of two runs: on a VM the first touch of fresh memory is much slower):
  to tmpfs (``--export-fast-dir``, what the engine does) and to the work volume (the
  final fsync of the output included: the disk's write speed); then on the work volume
  with an unthrottled writer thread running (4 KiB writes at random offsets).
- glibc's heap trimming is turned off first (``mallopt``, see ``tune_malloc``; the
  daemon should do the same at start), unless ``--no-malloc-tuning``.

Output: a table and ``bench/out/writecache-bench-<UTC time>.json`` (figures, settings,
machine, load average at start and end). Figures are never asserted anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.bench.diskgen import cached_image  # noqa: E402
from engine.bench.machine import describe as machine  # noqa: E402
from engine.blockmap import IMPLEMENTATION  # noqa: E402
from engine.export import export_disk  # noqa: E402
from engine.repo.ingest import BackupSettings, backup  # noqa: E402
from engine.repo.repository import Repository  # noqa: E402
from engine.stack import Stack  # noqa: E402
from engine.tuning import tune_malloc  # noqa: E402
from engine.writecache import WriteCache  # noqa: E402

MIB = 1 << 20





def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1:] in units else int(t)




def fs_type(path: Path) -> str:
    r = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True)
    return r.stdout.split()[-1] if r.returncode == 0 else "?"


def source_image(size: int, seed: int) -> Path:
    return cached_image(size, seed, log=print)[0]


def rate(n_ops: int, nbytes: int, seconds: float) -> dict:
    return {"ops": n_ops, "bytes": nbytes, "seconds": round(seconds, 4), "iops": round(n_ops / seconds), "mb_s": round(nbytes / seconds / 1e6, 1)}


def random_writes(wc: WriteCache, count: int, rng: np.random.Generator, stable: bool, commit_every: int) -> dict:
    offsets = (rng.integers(0, wc.size // 4096, count) * 4096).tolist()
    data = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    for i, off in enumerate(offsets, 1):
        wc.write(off, data, stable=stable)
        if commit_every and i % commit_every == 0:
            wc.commit()
    wc.commit()
    return rate(count, count * 4096, time.perf_counter() - t)


def stable_writes_threads(wc: WriteCache, count: int, threads: int, seed: int) -> dict:
    per = count // threads
    data = bytes(range(256)) * 16

    def work(k: int) -> None:
        rng = np.random.default_rng(seed + k)
        for off in (rng.integers(0, wc.size // 4096, per) * 4096).tolist():
            wc.write(off, data, stable=True)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    commits0 = wc.commits
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    r = rate(per * threads, per * threads * 4096, time.perf_counter() - t)
    r["threads"] = threads
    r["commits"] = wc.commits - commits0
    return r


def sequential_writes(wc: WriteCache, total: int) -> dict:
    data = np.random.default_rng(9).integers(0, 256, MIB, dtype=np.uint8).tobytes()
    n = min(total, wc.size) // MIB
    t = time.perf_counter()
    for i in range(n):
        wc.write(i * MIB, data)
    wc.commit()
    return rate(n, n * MIB, time.perf_counter() - t)


def read_pass(disk, io: int = MIB) -> dict:
    """Sequential ``readv`` of the whole disk; every buffer is copied once into a sink,
    as a socket send copies it into the kernel (a zero-copy slice is not free there)."""
    sink = bytearray(io)
    total = 0
    t = time.perf_counter()
    for off in range(0, disk.size, io):
        pos = 0
        for part in disk.readv(off, io):
            n = len(part)
            sink[pos : pos + n] = part
            pos += n
        total += pos
    return rate(disk.size // io, total, time.perf_counter() - t)


def best_of(fn, n: int = 3) -> dict:
    runs = [fn() for _ in range(n)]
    return max(runs, key=lambda r: r["mb_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=2 << 30, help="disk size (default 2G)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--disk", type=Path, help="use this raw image instead of the generated one")
    ap.add_argument("--work", type=Path, help="work directory (default: new one under /var/tmp)")
    ap.add_argument("--writes", type=int, default=20000, help="4 KiB writes per random-write phase")
    ap.add_argument("--sync-writes", type=int, default=2000, help="4 KiB FILE_SYNC writes per phase")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default trim/mmap thresholds")
    ap.add_argument("--export-fast-dir", type=Path, default=Path("/dev/shm"), help="tmpfs for the engine-bound export figure")
    args = ap.parse_args(argv)
    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()

    work = args.work or Path(tempfile.mkdtemp(prefix="wc-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "settings": {
            "size": args.size, "seed": args.seed, "block_size": MIB, "granule": 4096,
            "blockmap": IMPLEMENTATION, "work": str(work), "work_fs": fs_type(work),
            "client": "none: engine.writecache Python API in-process, no NFS",
            "malloc_tuned": malloc_tuned,
        },
        "machine": machine(),
    }
    try:
        img = args.disk or source_image(args.size, args.seed)
        res["settings"]["image"] = str(img)
        repo_dir = work / "repo"
        Repository.init(repo_dir, MIB)
        with Repository.open(repo_dir) as repo:
            backup(repo, BackupSettings(vm="bench"), [str(img)])
        stack = Stack.open(repo_dir, cache_bytes=args.size + (256 << 20))
        base = stack.backup_disk(stack.repo.point("latest"), 0)
        size = base.size
        rng = np.random.default_rng(args.seed)
        print(f"disk {size / 2**30:.2f} GiB, cache on {work} ({res['settings']['work_fs']}), block map {IMPLEMENTATION}")

        read_pass(base)  # warm the chunk cache
        res["read_clean"] = best_of(lambda: read_pass(base))

        with WriteCache.create(work / "w-rand", base) as wc:
            res["write_4k_unstable_commit256"] = random_writes(wc, args.writes, rng, False, 256)
        with WriteCache.create(work / "w-sync", base) as wc:
            res["write_4k_file_sync"] = random_writes(wc, args.sync_writes, rng, True, 0)
            res["write_4k_file_sync_4threads"] = stable_writes_threads(wc, args.sync_writes, 4, args.seed)
        seq = []
        for k in range(2):  # better of two fresh caches (first touch of memory, other tenants' I/O)
            with WriteCache.create(work / f"w-seq{k}", base) as wc:
                seq.append(sequential_writes(wc, min(size, 1 << 30)))
            shutil.rmtree(work / f"w-seq{k}")
        res["write_1m_sequential"] = max(seq, key=lambda r: r["mb_s"])
        res["write_1m_sequential"]["all_mb_s"] = [r["mb_s"] for r in seq]

        # half dirty, 1 MiB extents: every other MiB written
        with WriteCache.create(work / "half-extents", base) as wc:
            for off in range(0, size, 2 * MIB):
                wc.write(off, base.read(off, MIB)[::-1])
            wc.commit()
            read_pass(wc)
            res["read_half_dirty_1m_extents"] = best_of(lambda: read_pass(wc))
            for key, dest in (("export_raw_half_dirty_tmpfs", args.export_fast_dir), ("export_raw_half_dirty_same_volume", work)):
                runs = []
                for _ in range(2):  # the first run pays for first-touch of fresh memory
                    marks: dict[str, float] = {}
                    t = time.perf_counter()

                    def mark(phase: str, _done: int, _total: int, marks=marks, t=t) -> None:
                        marks[phase] = time.perf_counter() - t

                    ex = export_disk(wc, dest / "wc-bench-export.raw", progress=mark)
                    secs = time.perf_counter() - t
                    runs.append({
                        "target": str(dest), "target_fs": fs_type(dest), "seconds": round(secs, 3), "gb_s": round(size / secs / 1e9, 2),
                        "copy_seconds": round(marks.get("copy", secs), 3), "data_bytes": ex.data_bytes, "passes": ex.passes,
                    })
                    (dest / "wc-bench-export.raw").unlink()
                res[key] = max(runs, key=lambda r: r["gb_s"])
                res[key]["all_seconds"] = [r["seconds"] for r in runs]

            stop = threading.Event()
            count = [0]

            def writer() -> None:
                r = np.random.default_rng(3)
                while not stop.is_set():
                    wc.write(int(r.integers(0, size // 4096)) * 4096, bytes(4096))
                    count[0] += 1

            th = threading.Thread(target=writer)
            th.start()
            t = time.perf_counter()
            ex = export_disk(wc, work / "export.raw")
            secs = time.perf_counter() - t
            stop.set()
            th.join()
            res["export_raw_with_writer"] = {"seconds": round(secs, 3), "gb_s": round(size / secs / 1e9, 2), "passes": ex.passes, "recopied_bytes": ex.recopied_bytes, "writer_writes": count[0]}
            (work / "export.raw").unlink()

        # half dirty, every other granule
        with WriteCache.create(work / "half-granules", base) as wc:
            buf = bytes(range(256)) * 16
            for off in range(0, size, 8192):
                wc.write(off, buf)
            wc.commit()
            read_pass(wc)
            res["read_half_dirty_alternate_4k"] = best_of(lambda: read_pass(wc))

        clean = res["read_clean"]["mb_s"]
        res["ratio_half_dirty_extents_vs_clean"] = round(res["read_half_dirty_1m_extents"]["mb_s"] / clean, 2)
        res["ratio_half_dirty_alternate_4k_vs_clean"] = round(res["read_half_dirty_alternate_4k"]["mb_s"] / clean, 2)
        stack.close()
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    rows = [
        ("4 KiB random writes, UNSTABLE + COMMIT/256", "write_4k_unstable_commit256"),
        ("4 KiB random writes, FILE_SYNC, 1 thread", "write_4k_file_sync"),
        ("4 KiB random writes, FILE_SYNC, 4 threads", "write_4k_file_sync_4threads"),
        ("1 MiB sequential writes + COMMIT", "write_1m_sequential"),
        ("1 MiB reads, clean disk", "read_clean"),
        ("1 MiB reads, half dirty (1 MiB extents)", "read_half_dirty_1m_extents"),
        ("1 MiB reads, half dirty (every other 4 KiB)", "read_half_dirty_alternate_4k"),
    ]
    print(f"\n{'phase':50} {'IOPS':>9} {'MB/s':>9}")
    for name, key in rows:
        r = res[key]
        print(f"{name:50} {r['iops']:>9} {r['mb_s']:>9}")
    print(f"read ratio half-dirty/clean: extents {res['ratio_half_dirty_extents_vs_clean']}, alternate 4 KiB {res['ratio_half_dirty_alternate_4k_vs_clean']}")
    for key in ("export_raw_half_dirty_tmpfs", "export_raw_half_dirty_same_volume"):
        e = res[key]
        print(f"export raw, half-dirty disk -> {e['target']} ({e['target_fs']}): {e['gb_s']} GB/s, {e['seconds']} s (copy {e['copy_seconds']} s, the rest is fsync)")
    w = res["export_raw_with_writer"]
    print(f"export raw with a writer thread (4 KiB writes, unthrottled): {w['gb_s']} GB/s, {w['passes']} passes, {w['recopied_bytes']} bytes re-copied, {w['writer_writes']} writes during it")
    print(f"malloc tuned: {malloc_tuned}")
    print(f"load average at start {res['machine']['loadavg_1_5_15']}, at end {res['loadavg_at_end']} ({res['machine']['cpus']} CPUs)")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"writecache-bench-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
