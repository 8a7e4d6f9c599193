"""Sandboxes: 1, 4 and 8 copies of one point booted at once, and the decompression they share.

What a test lab does: ``POST /sandboxes`` with ``count=N``, ``boot=true`` and a run-mode
guest configuration, for the test guest's point (``guestvm.guest_point``). The clock runs
from the request to the moment every VM's console (``GET /vms/{name}/console``) shows
its first ``GUEST-HEARTBEAT``. The daemon is restarted before each run (an empty chunk
cache), and ``instantnfs_chunk_cache_loaded_bytes`` from ``/metrics`` (bytes the chunk
loads produced: what was decompressed) is read before the request and when the last
heartbeat shows: its growth over N is the decompression per VM, which should fall as VMs
are added, since the copies share one cache. Each VM gets 128 MiB (the guest boots with
it), one CPU, QEMU user networking with ``restrict=on`` (the sandboxes' default).

N = 1 and 4 with ``--quick`` (8 TCG guests at once on 2 cores take minutes); 1, 4 and 8
otherwise. One run per N with ``--quick``, two otherwise. Two rows per N from the same
runs: the time to all heartbeats, and the MiB decompressed per VM.

Threads: none of its own. Every VM is stopped and its session unpublished after a run,
whatever happened.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from engine.bench import guestvm
from engine.bench.core import OURS, Measure, Row, Samples

NAME = "sandboxes"
GROUP = "sandboxes"
PEERS: tuple[str, ...] = ()
MIB = 1 << 20
MEMORY_MIB = 128
LOADED = "instantnfs_chunk_cache_loaded_bytes"


def counts(ctx) -> tuple[int, ...]:  # noqa: ANN001
    return (1, 4) if ctx.quick else (1, 4, 8)


def runs(ctx) -> int:  # noqa: ANN001
    return 1 if ctx.quick else 2


def rows(ctx) -> int:  # noqa: ANN001
    return 2 * len(counts(ctx))


def loaded_bytes(metrics: dict[str, float]) -> float:
    """The decompressed-bytes counter, whichever name the exposition gave it (``_total``)."""
    for k in (LOADED + "_total", LOADED):
        if k in metrics:
            return metrics[k]
    raise RuntimeError(f"/metrics has no {LOADED}")


def per_vm(before: float, after: float, n: int) -> float:
    """Bytes decompressed per VM between two readings of the counter."""
    if n < 1 or after < before:
        raise ValueError(f"bad reading: {before} -> {after} for {n} VMs")
    return (after - before) / n


def one(ctx, point: str, n: int) -> Measure:  # noqa: ANN001
    from engine.vm.guest import HEARTBEAT, guest_config

    d = ctx.ours
    ctx.step(f"sandboxes: restarting instantnfs (an empty chunk cache) for {n}")
    d.restart()
    base = ctx.session_name("sbx")
    cfg = guest_config("bench-sbx", mode="run", heartbeat_s=5.0).decode()
    before = loaded_bytes(d.metrics())
    names: list[str] = []
    t0 = time.perf_counter()
    try:
        out = d.api("POST", "/sandboxes", {"point": point, "count": n, "ttl_s": 3600, "boot": True, "name": base,
                                           "memory_mib": MEMORY_MIB, "cpus": 1, "guest_config": cfg}, timeout=600)
        names = [s["session"] for s in out]
        started = time.perf_counter() - t0
        ctx.step(f"sandboxes: waiting for {n} heartbeats")
        seen = guestvm.wait_console_api(d, names, HEARTBEAT, t0=t0)
        seconds = max(seen.values())
        after = loaded_bytes(d.metrics())
    finally:
        for s in names:
            guestvm.stop_api(d, s, ctx.log)
    return Measure(seconds, {"vms": n, "request_s": round(started, 3),
                             "heartbeat_s": sorted(round(v, 3) for v in seen.values()),
                             "decompressed_bytes": int(after - before),
                             "decompressed_per_vm": int(per_vm(before, after, n))})


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    conditions = {"disk": "the test guest's 128 MiB raw disk (not the seeded disk)",
                  "client": "QEMU's nfs:// driver (libnfs), one QEMU per sandbox", "memory_mib": MEMORY_MIB, "cpus": 1,
                  "net": "user-restricted", "disk_bus": "virtio",
                  "guest": "engine.vm.guest, run mode (heartbeat, data check, READY)",
                  "cache": "daemon restarted before each run (empty chunk cache)", "runs": runs(ctx)}
    err: str | None = None
    try:
        point, _image = guestvm.guest_point(ctx)
    except Exception as e:  # noqa: BLE001 - every row says why there is no guest
        point, err = "", f"{type(e).__name__}: {e}"
    for n in counts(ctx):
        row = ctx.row(f"sandboxes/heartbeats-{n}", f"{n} sandbox(es) booted at once: request → every first heartbeat",
                      GROUP, "s", "lower", {**conditions, "sandboxes": n})
        per = ctx.row(f"sandboxes/decompressed-per-vm-{n}", f"{n} sandbox(es) at once: MiB decompressed per VM "
                      "(chunk cache loads, /metrics) until every heartbeat", GROUP, "MiB", "lower",
                      {**conditions, "sandboxes": n,
                       "figure": "growth of instantnfs_chunk_cache_loaded_bytes / N (should fall as N grows)"})
        if err is not None:
            row.error = per.error = err
        else:
            ctx.measure(row, {OURS: lambda n=n: one(ctx, point, n)}, pairs=runs(ctx))
            per.error = row.error
            if OURS in row.results:
                s = Samples()
                for x in row.results[OURS].extras:
                    s.add(Measure(x["decompressed_per_vm"] / MIB, {"decompressed_bytes": x["decompressed_bytes"]}))
                per.results[OURS] = s
            per.seconds = 0.0
        yield row
        yield per
