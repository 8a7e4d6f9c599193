"""Backup verification without boot: check_data's speed in logical disk bytes per second.

What it runs: ``engine.vm.verify.check_data`` (every distinct chunk read from its pack
through the repository's pack reader, CRC32C + LZ4 + BLAKE3, each once; zero blocks
free) over the single restore point of a repository holding the benchmark disk
(``engine.bench.diskgen``, 2 GiB, seed 1, 1 MiB blocks), made on the first run:

    python bench/verify_bench.py [--repo /var/tmp/verify-bench/repo] [--workers 2] [--runs 3]

It prints, per run, logical bytes/s (the disk's size over the wall time) and the
stored bytes read. The packs are in the page cache after the first run (warm); the
first run after the backup is warm too (the backup just wrote them). ``--cold`` drops
the packs' pages (fadvise DONTNEED on them only, nothing system-wide) before each run. With the
extension built (``python setup.py build_ext --inplace``) or without it
(``INSTANTNFS_PURE=1``) the figures are the same: nothing here goes through the block
map's Cython code. Goal (issue 13): >= 1 GB/s. Never asserted.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from engine.bench.diskgen import cached_image
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack
from engine.vm.verify import check_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("/var/tmp/verify-bench/repo"))
    ap.add_argument("--size", type=int, default=2 << 30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the packs' pages (fadvise DONTNEED) before each run")
    a = ap.parse_args()
    if not a.repo.exists():
        img, _meta = cached_image(a.size, 1, print)
        Repository.init(a.repo, 1 << 20)
        with Repository.open(a.repo) as r:
            backup(r, BackupSettings(vm="bench"), [str(img)])
    with Stack.open(a.repo) as stack:
        point = stack.repo.points()[-1]
        for i in range(a.runs):
            if a.cold:
                for p in stack.repo.packs_dir.glob("*.pack"):
                    fd = os.open(p, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
            t0 = time.perf_counter()
            res = check_data(stack, point, workers=a.workers)
            s = time.perf_counter() - t0
            print(f"run {i + 1}: {res.logical_bytes / s / 1e9:.2f} GB/s logical ({res.logical_bytes / 2**30:.2f} GiB in "
                  f"{s:.2f} s; {res.chunks} distinct chunks, {res.stored_bytes / 1e6:.0f} MB stored read, "
                  f"{res.zero_bytes / 2**30:.2f} GiB zeros; workers={a.workers}; ok={res.ok})")


if __name__ == "__main__":
    main()
