"""scripts/callpath.py, the tool that measures module crossings (issue 9): it runs a daemon in
its own process, and what it reports of a READ is the path to the pack file, the same at
every run. Plus its counting rules on made-up events."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "callpath.py"


def callpath(*args: str, pure: bool = False) -> dict[str, Any]:
    env = dict(os.environ, INSTANTNFS_PURE="1") if pure else None
    p = subprocess.run([sys.executable, str(SCRIPT), "--json", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_read_goes_from_the_nfs_program_to_the_pack_file() -> None:
    # the Python sources (the compiled fast lane and transports are invisible to a profiler)
    read = callpath("--op", "read", pure=True)["ops"]["read"]
    mods = read["modules"]
    assert "engine.nfs.fastlane" in mods, mods  # a READ takes the fast lane, not engine.nfs.nfs3
    repo = [m for m in mods if m.startswith("engine.repo.")]
    assert repo, f"the READ never reached a repo module: {mods}"
    assert mods.index("engine.nfs.fastlane") < mods.index(repo[0])
    assert read["chunk_cache_misses"] >= 1  # a block never read before: a cache miss
    assert read["crossings"] > 0
    assert read["crossings"] == sum(read["edges"].values())
    assert read["transitions"] >= read["entries"]


def test_numbers_are_the_same_at_every_run() -> None:
    keys = ("modules", "calls", "crossings", "transitions", "edges", "back_ups")
    first, second = callpath()["ops"], callpath()["ops"]
    assert set(first) == {"read", "write", "publish"}
    for op in first:
        assert {k: first[op][k] for k in keys} == {k: second[op][k] for k in keys}, op
    assert any(m.startswith("engine.control.") for m in first["publish"]["modules"])  # it came in over HTTP


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("callpath", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counting_rules() -> None:
    cp = _script()
    layers = cp.parse_layers("control,nfs,disk/cache,repo")
    assert cp.layer_of("engine.nfs.rpc", layers) == 1
    assert cp.layer_of("engine.cache", layers) == 2
    assert cp.layer_of("engine.writecache", layers) == 4  # prefix match stops at a dot: unknown, last
    assert cp.layer_of("engine.repo.packs", layers) == 3
    events = [
        (None, "engine.nfs.rpc", 1),  # entered from the event loop
        ("engine.nfs.rpc", "engine.nfs.nfs3", 1),
        ("engine.nfs.nfs3", "engine.disk", 1),
        ("engine.disk", "engine.disk", 1),  # within a module: no crossing
        ("engine.nfs.nfs3", "engine.nfs.rpc", 1),  # back to rpc: A->B->A
        (None, "engine.repo.packs", 2),  # a worker thread
        ("engine.repo.packs", "engine.cache", 2),  # climbs back up
        (None, "engine.nfs.rpc", 1),  # entered again from the event loop
        ("engine.nfs.rpc", "engine.nfs.xdr", 1),
    ]
    r = cp.analyse(events, layers)
    assert r["modules"] == ["engine.nfs.rpc", "engine.nfs.nfs3", "engine.disk", "engine.repo.packs", "engine.cache",
                            "engine.nfs.xdr"]
    assert r["calls"] == 9
    assert r["crossings"] == 5
    assert r["path"] == [["engine.nfs.rpc", "engine.nfs.nfs3", "engine.disk", "engine.nfs.nfs3", "engine.nfs.rpc"],
                         ["engine.repo.packs", "engine.cache"], ["engine.nfs.rpc", "engine.nfs.xdr"]]
    assert r["transitions"] == 6
    assert r["entries"] == 3
    assert r["back_ups"] == {"engine.repo.packs->engine.cache": 1}
