"""Crash safety and writer/reader concurrency, with real processes."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.stack import Stack
from tests.cli import ok, run
from tests.images import make_image

BS = 256 * 1024


def backup_proc(repo, vm, src):
    return subprocess.Popen(
        [sys.executable, "-m", "engine.control.cli", "backup", "--repo", str(repo), "--vm", vm, "-q", "--json", str(src)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_sigkill_during_backup_leaves_a_usable_repository(tmp_path):
    repo = tmp_path / "repo"
    ok("repo", "init", repo, "--block-size", "256K")
    rng = random.Random(1234)
    kinds = ["random", "text", "text", "repeat", "hole", "random", "text", "zero"] * 24  # 48 MiB
    images = {}
    # one uninterrupted run tells how long a backup takes
    src0 = tmp_path / "t0.img"
    images["t0"] = make_image(src0, kinds, BS, seed=0)
    t = time.monotonic()
    ok("backup", "--repo", repo, "--vm", "t0", "-q", src0)
    duration = time.monotonic() - t
    killed = 0
    for i in range(1, 7):
        src = tmp_path / f"t{i}.img"
        images[f"t{i}"] = make_image(src, kinds, BS, seed=i)
        p = backup_proc(repo, f"t{i}", src)
        time.sleep(rng.uniform(0.05, duration))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        # after every crash: the repository opens and every committed point reads back exactly
        with Stack.open(repo) as stack:
            for pt in stack.repo.points():
                disk = stack.backup_disk(pt, 0)
                assert disk.read(0, disk.size) == images[pt.vm], pt.vm
    assert killed >= 3, "the kills must land while backups run"
    report = run("repo", "check", "--repo", repo, "--verify-data", "--json").json()
    assert report["ok"], (report["errors"], report["bad_chunks"])
    ok("repo", "gc", "--repo", repo)
    report = ok("repo", "check", "--repo", repo, "--verify-data", "--json").json()
    assert report["ok"] and report["garbage"] == [], report
    with Stack.open(repo) as stack:
        for pt in stack.repo.points():
            assert stack.backup_disk(pt, 0).read(0, len(images[pt.vm])) == images[pt.vm]


@pytest.mark.slow
def test_gc_refused_while_backup_runs_and_readers_unaffected_by_gc(tmp_path):
    repo = tmp_path / "repo"
    ok("repo", "init", repo, "--block-size", "256K")
    keep_src, old_src, big_src = tmp_path / "keep.img", tmp_path / "old.img", tmp_path / "big.img"
    keep = make_image(keep_src, ["text", "random", "repeat", "text"] * 8, BS, seed=1)
    make_image(old_src, ["random"] * 32, BS, seed=2)
    make_image(big_src, ["random", "text"] * 160, BS, seed=3)  # 80 MiB: a backup that lasts a while
    ok("backup", "--repo", repo, "--vm", "keep", "-q", keep_src)
    old = ok("backup", "--repo", repo, "--vm", "old", "--json", old_src).json()["id"]

    # freeze the backup while it holds the lock (SIGSTOP), so the test never races it
    for _attempt in range(5):
        p = backup_proc(repo, "big", big_src)
        deadline = time.monotonic() + 20
        while (repo / "lock").read_text().split(" ")[:1] != [str(p.pid)] and p.poll() is None:
            assert time.monotonic() < deadline, "backup never took the lock"
            time.sleep(0.002)
        p.send_signal(signal.SIGSTOP)
        if (repo / "lock").read_text().split(" ")[:1] == [str(p.pid)]:
            break
        p.send_signal(signal.SIGCONT)  # it finished in between: try again
        p.wait()
    else:
        pytest.fail("could not catch a backup while it held the lock")
    try:
        r = run("repo", "gc", "--repo", repo)
        assert r.rc != 0 and f"locked by PID {p.pid}" in r.err
        r = run("points", "delete", "--repo", repo, old)
        assert r.rc != 0 and "locked" in r.err
    finally:
        p.send_signal(signal.SIGCONT)
        p.wait()
    assert p.returncode == 0, p.stderr

    ok("points", "delete", "--repo", repo, old)
    errors: list[str] = []
    stop = threading.Event()
    reads = 0

    def reader():
        nonlocal reads
        with Stack.open(repo, cache_bytes=BS) as r_st:  # tiny cache: every read goes to the packs
            r = r_st.repo
            disk = r_st.backup_disk(r.point("keep@latest"), 0)
            rng = random.Random(5)
            while not stop.is_set():
                off = rng.randrange(len(keep))
                if disk.read(off, 70000) != keep[off : off + 70000]:
                    errors.append(f"wrong bytes at {off}")
                reads += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        g = ok("repo", "gc", "--repo", repo, "--json").json()
    finally:
        stop.set()
        t.join()
    assert g["chunks_removed"] == 32
    assert not errors and reads > 0
    with Stack.open(repo) as r_st:
        r = r_st.repo
        assert r_st.backup_disk(r.point("keep@latest"), 0).read(0, len(keep)) == keep
