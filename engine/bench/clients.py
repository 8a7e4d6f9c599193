"""The stock clients the suite drives: QEMU's ``qemu-img`` over ``nfs://`` or on a file.

``qemu-img bench`` is what a hypervisor's block layer does, through QEMU's own libnfs
driver: it prints the time of its I/O loop alone ("Run completed in X seconds"), which is
the figure taken (start-up and the MOUNT are not in it). Over NFS it opens with
``-t none`` (no host cache; over NFS there is none anyway); on a local or FUSE file with
``-t writeback`` (O_DIRECT is what FUSE mounts refuse, and the page cache is the
local file's speed).
"""
from __future__ import annotations

import re
import subprocess
import time

from engine.bench.core import Measure, Target

_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def _cache_mode(url: str) -> str:
    return "none" if url.startswith("nfs://") else "writeback"


def qemu_bench(target: Target, size: int, depth: int, count: int, step: int | None = None,
               write: bool = False, timeout: float = 1800) -> Measure:
    """MB/s (decimal) of ``count`` sequential requests of ``size`` bytes, ``depth`` in flight.

    Writes (``write``) use a fixed pattern and include the flush qemu-img ends with.
    """
    cmd = ["qemu-img", "bench", "-f", "raw", "-t", _cache_mode(target.url), "-c", str(count), "-d", str(depth),
           "-s", str(size)]
    if write:
        cmd += ["-w", "--pattern", "0x5a"]
    if step:
        cmd += ["-S", str(step)]
    t0 = time.monotonic()
    r = subprocess.run([*cmd, target.url], capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    m = _DONE.search(r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"qemu-img bench on {target.url} failed: {(r.stdout + r.stderr).strip()[-500:]}")
    seconds = wall if write else float(m.group(1))  # a write's figure includes its final flush
    nbytes = size * count
    return Measure(nbytes / seconds / 1e6, {"seconds": round(seconds, 4), "bytes": nbytes, "ops": count,
                                            "iops": round(count / seconds, 1)})


def qemu_convert(source: Target, out: str, fmt: str = "raw", timeout: float = 1800) -> Measure:
    """MB/s of ``qemu-img convert`` of the whole source into a new ``fmt`` file ``out``."""
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", fmt, "-T", _cache_mode(source.url), "-t", "writeback", source.url, out]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img convert of {source.url} failed: {(r.stdout + r.stderr).strip()[-500:]}")
    return Measure(source.size / seconds / 1e6, {"seconds": round(seconds, 3), "bytes": source.size})
