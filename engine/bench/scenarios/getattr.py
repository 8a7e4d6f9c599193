"""GETATTR latency, alone and under each read load: the datastore heartbeat's view.

ESXi's datastore heartbeat is a GETATTR; if it waits behind bulk reads the host marks the
datastore inaccessible. One probe connection sends a GETATTR of the disk file every
10 ms (``loadgen.getattr_latency``) for the measured window, while:

- nothing else runs ("alone");
- ``qemu-img bench`` reads 1 MiB blocks at queue depth 16 on another connection;
- the load generator reads random 4 KiB blocks at queue depth 16.

Each run yields p50, p99 and p99.9; they become three rows per load (the runs are
shared). Peer: Ganesha serving the raw image (the probe and the load both go to it).
"""
from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

from engine.bench import loadgen
from engine.bench.core import OURS, Goal, Measure, NfsTarget, Row, Samples

NAME = "getattr"
GROUP = "GETATTR latency"
PEERS = ("ganesha",)
MIB = 1 << 20
LOADS = ("alone", "seq-1M-qd16", "rand-4K-qd16")
PERCENTILES = ("p50", "p99", "p999")
LABEL = {"p50": "p50", "p99": "p99", "p999": "p99.9"}


def goal(load: str, pct: str) -> Goal | None:
    if pct == "p99":
        return Goal("≤ Ganesha's p99", peer="ganesha", ratio=1.0)
    if pct == "p50":
        return Goal("≤ 1 ms", absolute=1.0)
    return None


def rows(ctx) -> int:  # noqa: ANN001
    return len(LOADS) * len(PERCENTILES)


def probe(target: NfsTarget, load: str, seconds: float) -> Measure:
    """Latency percentiles (ms) of GETATTR while ``load`` runs against ``target``."""
    stop_load: Callable[[], dict] = dict
    if load == "seq-1M-qd16":
        count = max(256, (8 * target.size) // MIB)  # qemu-img bench wraps round the disk
        p = subprocess.Popen(["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", "16", "-s", "1M", target.url],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop_seq() -> dict:
            alive = p.poll() is None
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            return {"load_ran_whole_window": alive}

        stop_load = stop_seq
    elif load == "rand-4K-qd16":
        box: dict = {}
        spec = loadgen.LoadSpec(op="read", size=4096, depth=16, connections=1, seconds=seconds + 1.0, warmup=0.2)
        t = threading.Thread(target=lambda: box.update(m=loadgen.run_load(target, spec)), daemon=True)
        t.start()

        def stop_rand() -> dict:
            t.join(seconds + 60)
            m = box.get("m")
            return {"load_iops": round(m.value) if m else None}

        stop_load = stop_rand
    try:
        time.sleep(0.5 if load != "alone" else 0)  # the load reaches its pace
        lat = loadgen.getattr_latency(target, seconds)
    finally:
        extra = stop_load()
    if not lat:
        raise RuntimeError("no GETATTR completed in the window")
    extra.update(loadgen.percentiles([x * 1e3 for x in lat], (50, 99, 99.9)), n=len(lat))
    return Measure(extra["p99"], extra)


def run(ctx) -> Iterator[Row]:  # noqa: ANN001
    session = ctx.session_name("getattr")
    targets: dict[str, NfsTarget] = {OURS: ctx.ours.publish(ctx.point, session)[0]}
    if "ganesha" in ctx.peers:
        targets["ganesha"] = ctx.peers["ganesha"].read_target()
    seconds = max(2.0, ctx.settings.seconds)
    try:
        for load in LOADS:
            base = ctx.row(f"getattr/{load}", "", GROUP, "ms", "lower",
                           {"client": "in-repo GETATTR probe, one call every 10 ms", "load": load, "connections": 1,
                            "queue_depth": 1, "cache": "warm"}, peers=PEERS)
            systems = {n: partial(probe, t, load, seconds) for n, t in targets.items()}
            ctx.measure(base, systems)
            for pct in PERCENTILES:
                row = ctx.row(f"getattr/{LABEL[pct]}/{load}", f"GETATTR {LABEL[pct]} latency, {load.replace('-', ' ')}",
                              GROUP, "ms", "lower", base.conditions, goal(load, pct), peers=PEERS)
                row.error, row.seconds = base.error, base.seconds / len(PERCENTILES)
                for n, s in base.results.items():
                    out = Samples()
                    for extra in s.extras:
                        out.add(Measure(extra[pct], extra))
                    row.results[n] = out
                yield row
    finally:
        ctx.unpublish(session)
