"""The cost of one NFS call inside the daemon, without sockets: two checkouts side by side.

What it measures: warm 4 KiB READs and 4 KiB UNSTABLE WRITEs of a published disk, fed
as raw ONC RPC records straight into the dispatcher (``RpcServer.handle_start``) on one
event loop, microseconds per call (best of ``--rounds`` passes of ``--calls`` calls).
That is the path of ``transport.py`` minus the socket: decoding, the duplicate request
cache, nfs3, the datastore, the write cache, the disk and the chunk cache; every chunk
is cached, so it is the Python cost of the layers, not decompression or I/O.

With ``--vs OTHER_CHECKOUT`` it runs the same measurement on this checkout and on the
other one, alternately (A B A B ...), each in a fresh process, and prints the ratio of
the medians: the machine is shared and noisy, so only a side-by-side ratio means
anything. It works on checkouts from before ``engine/stack.py`` existed (issue 9), so a
re-layout can be compared with the code it started from::

    python bench/dispatch_bench.py                       # this checkout
    python bench/dispatch_bench.py --vs /tmp/before      # A/B against another checkout

Each checkout needs its Cython extension built (``python setup.py build_ext --inplace``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISK = 16 << 20
IO = 4096
SPAN = 256  # distinct 4 KiB offsets cycled through (all warm)


def measure(calls: int, rounds: int) -> dict:
    """Run in the checkout on PYTHONPATH: build a repository, publish, time the calls."""
    import asyncio

    from engine.datastore import Datastore
    from engine.nfs.nfs3 import NFS3
    from engine.nfs.rpc import RpcServer
    from engine.repo.ingest import BackupSettings, backup
    from engine.repo.repository import Repository

    work = Path(tempfile.mkdtemp(prefix="instantnfs-dispatch-", dir="/var/tmp"))
    img = work / "disk.img"
    img.write_bytes(os.urandom(DISK))
    Repository.init(work / "repo", 1 << 20)
    with Repository.open(work / "repo") as r:
        backup(r, BackupSettings(vm="bench"), [str(img)])
    try:
        from engine.stack import Stack
        base: object = Stack.open(work / "repo")
    except ImportError:  # before the stack existed, the repository composed disks
        base = Repository.open(work / "repo")
    ds = Datastore(base, work / "cache", reserve=0)  # type: ignore[arg-type]
    ds.load()
    session = ds.publish("latest", "b")
    node = ds.lookup(ds.lookup(ds.root(), b"b"), f"{session.disks[0].name}.img".encode())
    fh = ds.handle(node)
    fh_xdr = struct.pack(">I", len(fh)) + fh + b"\0" * (-len(fh) % 4)
    rpc = RpcServer()
    rpc.add(NFS3(ds).program())
    cred = struct.pack(">IIII", 1, 20, 0, 0) + struct.pack(">III", 0, 0, 0)  # AUTH_UNIX, root

    def record(xid: int, proc: int, body: bytes) -> bytes:
        return struct.pack(">IIIIII", xid, 0, 2, 100003, 3, proc) + cred + struct.pack(">II", 0, 0) + body

    def read(i: int) -> bytes:
        return record(i + 1, 6, fh_xdr + struct.pack(">QI", (i % SPAN) * IO, IO))

    data = os.urandom(IO)

    def write(i: int) -> bytes:
        return record(i + 1, 7, fh_xdr + struct.pack(">QIII", (1 << 20) + (i % SPAN) * IO, IO, 0, IO) + data)

    async def run(n: int, make) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            r = rpc.handle_start(make(i), ("127.0.0.1", 700))
            if inspect.isawaitable(r):
                r = await r
        return time.perf_counter() - t0

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run(SPAN * 4, read))  # every chunk cached
        loop.run_until_complete(run(SPAN * 4, write))  # every granule written once
        reply = loop.run_until_complete(rpc.handle_start(read(0), ("127.0.0.1", 700)))
        size = sum(len(b) for b in reply) if isinstance(reply, list) else len(reply)
        if size < IO:
            raise SystemExit(f"dispatch_bench: a READ answered {size} bytes, not a {IO}-byte read")
        out = {}
        for name, make in (("read_4k_us", read), ("write_4k_us", write)):
            out[name] = round(min(loop.run_until_complete(run(calls, make)) for _ in range(rounds)) / calls * 1e6, 2)
        return out
    finally:
        ds.close()
        loop.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def one(tree: Path, calls: int, rounds: int) -> dict:
    """``measure`` in a fresh process on checkout ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, __file__, "--measure", "--calls", str(calls), "--rounds", str(rounds)],
                       cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"dispatch_bench: the run on {tree} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vs", type=Path, help="another checkout to compare with, alternately in one run")
    ap.add_argument("--pairs", type=int, default=3, help="A/B pairs with --vs (3)")
    ap.add_argument("--calls", type=int, default=20000, help="calls per timed pass (20000)")
    ap.add_argument("--rounds", type=int, default=5, help="timed passes per process; the best counts (5)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.calls, args.rounds)))
        return 0
    if args.vs is None:
        print(json.dumps(one(ROOT, args.calls, args.rounds)))
        return 0
    a_runs, b_runs = [], []
    for _ in range(args.pairs):
        a_runs.append(one(ROOT, args.calls, args.rounds))
        b_runs.append(one(args.vs.resolve(), args.calls, args.rounds))
    # the median says what a typical run costs; the minimum, what the code costs when the
    # machine lets it run (noise only ever adds time)
    print(f"{'µs per call':<14}{'this':>34}{'other':>34}{'median ratio':>14}{'min ratio':>11}")
    for key in ("read_4k_us", "write_4k_us"):
        a = [r[key] for r in a_runs]
        b = [r[key] for r in b_runs]
        print(f"{key:<14}  {', '.join(map(str, a)):>32}  {', '.join(map(str, b)):>32}"
              f"{statistics.median(a) / statistics.median(b):>14.2f}{min(a) / min(b):>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
