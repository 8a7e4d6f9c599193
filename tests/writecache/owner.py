"""A process that owns one WriteCache and obeys JSON lines on stdin (crash tests).

    python -m tests.writecache.owner REPO CACHE_DIR create|open GRANULE [powerloss]

Prints {"ready": verifier} once open, then one JSON reply per request:
{"op": "write", "off", "len", "seed", "stable"} -> {"ok": true}
{"op": "commit"} -> {"ok": true}
{"op": "read", "off", "len"} -> {"sha": sha256 of the bytes}
{"op": "arm", "after", "seed"} -> {"ok": true}: (powerloss mode) the power fails at
    the after-th pwrite/fsync of the write cache from now on (see ``powerloss.py``)
The test kills it with SIGKILL at any moment; nothing is closed cleanly. With
``powerloss`` the write cache's writes stay in memory until fsynced, so a kill loses
them all, and an armed power loss writes a random subset of them first.
"""
from __future__ import annotations

import hashlib
import json
import sys

from engine.stack import Stack
from engine.writecache import WriteCache
from tests.writecache.model import pattern


def main() -> None:
    repo_dir, cache_dir, mode, granule = sys.argv[1:5]
    sim = None
    if sys.argv[5:6] == ["powerloss"]:
        import engine.fsutil
        import engine.writecache
        import engine.writecache_format
        from tests.writecache.powerloss import PowerLossOS

        sim = PowerLossOS(0)
        # every module the write cache does its I/O through: its pwrites are
        # engine.fsutil.pwrite_all's (the owner only reads the repository)
        for mod in (engine.writecache, engine.writecache_format, engine.fsutil):
            mod.os = sim  # type: ignore[attr-defined]
    stack = Stack.open(repo_dir, cache_bytes=32 << 20)
    base = stack.backup_disk(stack.repo.point("latest"), 0)
    if mode == "create":
        wc = WriteCache.create(cache_dir, base, granule=int(granule))
    else:
        wc = WriteCache.open(cache_dir, base)
    out = sys.stdout
    out.write(json.dumps({"ready": wc.verifier.hex()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "write":
            wc.write(req["off"], pattern(req["seed"], req["len"]), stable=req["stable"])
            reply = {"ok": True}
        elif op == "commit":
            wc.commit()
            reply = {"ok": True}
        elif op == "arm" and sim is not None:
            sim.arm(req["after"], req["seed"])
            reply = {"ok": True}
        elif op == "read":
            reply = {"sha": hashlib.sha256(wc.read(req["off"], req["len"])).hexdigest()}
        else:
            reply = {"error": f"unknown op {op}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
