"""Backup verification without boot, through the API: GB/s of logical disk.

``POST /points/{id}/verify`` (no boot) of the run's benchmark point (the seeded mixed
disk the suite backs up: 2 GiB, 256 MiB with ``--quick``), then ``GET /jobs/{id}`` every
50 ms until the job ends. What the job does (``engine.vm.verify``): publish a sandbox,
read and check every distinct chunk the point uses once (CRC32C, LZ4, BLAKE3; zero
blocks free), recognise the partition table and filesystems (the seeded disk has none:
a short step), unpublish. The figure is the disk's logical size over the time from the
request to the job's end, in GB/s (10^9). The packs are in the page cache (the backup
just wrote them); ``bench/verify_bench.py`` measures ``check_data`` alone, warm or cold.
A job that ends in anything but "done", or whose report says the data is bad, is the
row's error. Goal (issue 13): >= 1 GB/s.

Threads: none of its own.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

from engine.bench.core import OURS, Goal, Measure, Row

NAME = "verify"
GROUP = "backup verification"
PEERS: tuple[str, ...] = ()
TIMEOUT = 1800.0


def rows(ctx) -> int:  # noqa: ANN001, ARG001
    return 1


def wait_job(d, job: dict[str, Any], timeout: float = TIMEOUT, poll: float = 0.05) -> dict[str, Any]:  # noqa: ANN001
    """Poll ``job`` until it ends; ``RuntimeError`` unless it ends "done"."""
    deadline = time.monotonic() + timeout
    while job["state"] == "running":
        if time.monotonic() > deadline:
            d.api("DELETE", f"/jobs/{job['id']}")
            raise RuntimeError(f"job {job['id']} ({job['kind']}) did not end within {timeout:.0f} s")
        time.sleep(poll)
        job = d.api("GET", f"/jobs/{job['id']}")
    if job["state"] != "done":
        raise RuntimeError(f"job {job['id']} ({job['kind']}) ended {job['state']}: {job.get('error')}")
    return job


def one(ctx) -> Measure:  # noqa: ANN001
    d = ctx.ours
    t0 = time.perf_counter()
    job = wait_job(d, d.api("POST", f"/points/{ctx.point}/verify", {}))
    seconds = time.perf_counter() - t0
    res = job["result"] or {}
    data = res.get("data") or {}
    if not data.get("ok"):  # the seeded disk has no filesystem: the data check is what must pass
        raise RuntimeError(f"verify found the benchmark point's data bad: {res.get('summary') or res}")
    logical = int(data.get("logical_bytes") or ctx.size)
    return Measure(logical / seconds / 1e9, {"seconds": round(seconds, 3), "logical_bytes": logical,
                                             "chunks": data.get("chunks"), "stored_bytes": data.get("stored_bytes"),
                                             "check_data_s": data.get("seconds"), "passed": res.get("passed")})


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    row = ctx.row("verify/no-boot", "verify without boot (every chunk checked, filesystems recognised): logical GB/s",
                  GROUP, "GB/s", "higher",
                  {"client": "control API: POST /points/{id}/verify, GET /jobs/{id} every 50 ms",
                   "cache": "packs in the page cache (just backed up)", "disk_size": ctx.size},
                  Goal("≥ 1 GB/s of logical disk", absolute=1.0))
    yield ctx.measure(row, {OURS: partial(one, ctx)})
