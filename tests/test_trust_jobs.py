"""Issue 8, long jobs: commit never deadlocks (pools split by kind of work), every job can
be cancelled and the daemon stops within 10 s, a commit is a point in time, paused
writes hold no pool thread, and export outputs stay inside the export directories."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from engine.repo.ingest import BackupSettings, backup, backup_disks, dirty_extents
from engine.repo.repository import Repository
from engine.stack import Stack
from engine.writecache import WriteCache
from tests.nfs.conftest import ROOT, Daemon, give_address, take_address

BS = 1 << 20
HANG = 90  # seconds: a hang detector, never a speed requirement


def make_repo(root: Path, size: int, seed: int = 3, vm: str = "big") -> tuple[Path, str, bytes]:
    """A repository with one point of one incompressible disk of ``size`` bytes (1 MiB blocks)."""
    img = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    src = root / f"{vm}.img"
    src.write_bytes(img)
    repo = Repository.init(root / "repo", BS)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm=vm), [str(src)])
    src.unlink()
    return repo, m["id"], img


def run_with_hang_detector(fn, timeout: float = HANG):
    """Run ``fn()`` in a daemon thread; fail (not hang) if it does not end in ``timeout``."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"still running after {timeout} s: a deadlock")
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- 1. commit with a cold chunk cache never waits on work queued behind itself -------------


@pytest.mark.timeout(300)
def test_commit_of_a_cold_cache_with_one_decompression_worker_finishes(tmp_path):
    repo_dir, point_id, img = make_repo(tmp_path, 32 << 20)
    expected = bytearray(img)
    with Stack.open(repo_dir) as r_st:
        r = r_st.repo
        wc = WriteCache.create(tmp_path / "wc", r_st.backup_disk(r.point(point_id), 0))
        for b in (1, 2, 3, 4, 5, 6, 7, 8, 12, 20, 31):  # runs of consecutive blocks: readahead
            data = bytes([b]) * 4096
            wc.write(b * BS + 4096, data)
            expected[b * BS + 4096 : b * BS + 8192] = data
        wc.close()
    # a restarted daemon: a cold chunk cache, one decompression thread
    stack = Stack.open(repo_dir, workers=1)
    repo = stack.repo
    hung = True
    try:
        point = repo.point(point_id)
        wc = WriteCache.open(tmp_path / "wc", stack.backup_disk(point, 0))
        m = run_with_hang_detector(lambda: backup_disks(repo, BackupSettings(vm="big"), [wc], parent=point,
                                                         changed=[dirty_extents(wc)]))
        hung = False
        wc.close()
        got = stack.backup_disk(repo.point(m["id"]), 0).read(0, len(img))
        assert got == bytes(expected)
    finally:
        if hung:
            stack.executor.shutdown(wait=False)
        else:
            stack.close()


async def _nfs_write(dmn: Daemon, session: str, disk: str, writes: list[tuple[int, bytes]]) -> None:
    from engine.nfs.client import NFSClient

    c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
    try:
        root = await c.mount(f"/instantnfs/{session}")
        fh = await c.lookup(root, f"{disk}.img")
        for off, data in writes:
            await c.write(fh, off, data, stable=2)
    finally:
        await c.close()


def cli(dmn: Daemon, *args: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.control.cli", *args, "--server", dmn.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def points(repo: Path) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "engine.control.cli", "points", "--repo", str(repo), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(r.stdout)


def repo_check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.control.cli", "repo", "check", "--repo", str(repo)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def addr():
    a = take_address()
    yield a
    give_address(a)


@pytest.mark.timeout(400)
def test_cli_commit_after_a_restart_finishes(tmp_path, addr):
    """The issue's reproduction: 64 MiB disk, 4 KiB into several 1 MiB blocks, restart, commit."""
    repo, point_id, img = make_repo(tmp_path, 64 << 20)
    cache = tmp_path / "cache"
    dmn = Daemon(repo, cache, addr).start()
    try:
        s = dmn.api("POST", "/sessions", {"point": point_id, "name": "s"})
        disk = s["disks"][0]["name"]
        writes = [(b * BS + 8192, bytes([b]) * 4096) for b in (1, 2, 3, 4, 5, 6, 9, 10, 11, 40, 63)]
        asyncio.run(_nfs_write(dmn, "s", disk, writes))
    finally:
        dmn.stop()
    dmn = Daemon(repo, cache, addr).start()  # cold chunk cache
    try:
        r = cli(dmn, "commit", "s", "--json", "-q")
        assert r.returncode == 0, r.stderr
        new = json.loads(r.stdout)["point"]
        t0 = time.monotonic()
        assert dmn.stop() == 0
        assert time.monotonic() - t0 < 15, "the daemon took more than 10 s to stop"
    finally:
        dmn.stop()
    expected = bytearray(img)
    for off, data in writes:
        expected[off : off + len(data)] = data
    with Stack.open(repo) as r2_st:
        r2 = r2_st.repo
        assert r2_st.backup_disk(r2.point(new), 0).read(0, len(img)) == bytes(expected)


# -- 3. a commit is the disks at one instant -------------------------------------------------

STAMPED = 24  # blocks the writer stamps, one generation per write


def _stamp(gen: int) -> bytes:
    return np.full(STAMPED * BS // 8, gen, dtype="<u8").tobytes()


@pytest.mark.timeout(300)
def test_commit_while_a_writer_runs_is_one_generation(tmp_path):
    repo_dir, point_id, img = make_repo(tmp_path, 32 << 20)
    from engine.repo.ingest import commit_caches

    with Stack.open(repo_dir) as stack:
        repo = stack.repo
        point = repo.point(point_id)
        wc = WriteCache.create(tmp_path / "wc", stack.backup_disk(point, 0))
        wc.write(0, _stamp(1))
        written = [1]
        stop = threading.Event()
        go = threading.Event()
        stepped = threading.Event()

        def writer() -> None:
            gen = 1
            while not stop.is_set():
                if go.is_set() or gen > 1:
                    gen += 1
                    wc.write(0, _stamp(gen))  # one write: atomic with respect to a pause
                    written.append(gen)
                    stepped.set()
                else:
                    go.wait(0.05)

        calls = [0]

        def start(total: int):
            def advance(n: int) -> None:
                calls[0] += 1
                if calls[0] == 2:  # early in the first pass: let the writer run from here on
                    go.set()
                    assert stepped.wait(30), "the writer did not write"
            return advance

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            m, info = run_with_hang_detector(lambda: commit_caches(repo, BackupSettings(vm="big"), [wc], point,
                                                                    progress_start=start))
        finally:
            stop.set()
            t.join(30)
        assert len(written) > 2, "the writer wrote during the commit: else the test proves nothing"
        got = np.frombuffer(stack.backup_disk(repo.point(m["id"]), 0).read(0, STAMPED * BS), dtype="<u8")
        gens = np.unique(got)
        assert len(gens) == 1, f"the committed point mixes generations {gens.tolist()[:10]}: it is torn"
        assert int(gens[0]) in written
        assert bytes(stack.backup_disk(repo.point(m["id"]), 0).read(STAMPED * BS, len(img) - STAMPED * BS)) == img[STAMPED * BS :]
        assert info["passes"] >= 2
        wc.close()


# -- 4. paused writes hold no pool thread ---------------------------------------------------


@pytest.mark.timeout(120)
def test_paused_writes_of_one_cache_do_not_starve_another(tmp_path):
    repo_dir, point_id, _img = make_repo(tmp_path, 8 << 20)
    threads = 4  # the shared write-cache I/O pool (IO_THREADS in the daemon)
    pool = ThreadPoolExecutor(threads)
    with Stack.open(repo_dir) as stack:
        point = stack.repo.point(point_id)
        a = WriteCache.create(tmp_path / "a", stack.backup_disk(point, 0), executor=pool)
        b = WriteCache.create(tmp_path / "b", stack.backup_disk(point, 0), executor=pool)
        paused, release = threading.Event(), threading.Event()

        def exporter() -> None:  # what an export or commit of session a does
            with a.writes_paused():
                paused.set()
                release.wait(60)

        t = threading.Thread(target=exporter, daemon=True)
        t.start()
        assert paused.wait(10)

        async def go() -> None:
            queued = [asyncio.ensure_future(a.awrite(i * 4096, b"A" * 4096)) for i in range(3 * threads)]
            await asyncio.sleep(0.2)
            assert not any(f.done() for f in queued), "a paused cache took a write"
            # another session's writes and commits go on while a's are paused
            await asyncio.wait_for(b.awrite(0, b"B" * 4096, stable=True), 10)
            await asyncio.wait_for(b.aread(0, 4096), 10)
            release.set()
            await asyncio.wait_for(asyncio.gather(*queued), 30)

        try:
            asyncio.run(go())
        finally:
            release.set()
            t.join(10)
        assert a.read(0, 4096) == b"A" * 4096 and b.read(0, 4096) == b"B" * 4096
        a.close()
        b.close()
    pool.shutdown()


# -- 6. export outputs: new files inside the export directories, no symlinks ---------------


@pytest.fixture
def small_disk(tmp_path):
    (tmp_path / "r").mkdir()
    repo_dir, point_id, img = make_repo(tmp_path / "r", 4 << 20)
    stack = Stack.open(repo_dir)
    yield stack.backup_disk(stack.repo.point(point_id), 0), img
    stack.close()


def test_export_output_rules(small_disk, tmp_path):
    from engine.errors import OutputRefused
    from engine.export import export_disk

    disk, img = small_disk
    allowed = tmp_path / "exports"
    allowed.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    # an existing file is never replaced
    (allowed / "exists.raw").write_bytes(b"old")
    with pytest.raises(OutputRefused, match="exists"):
        export_disk(disk, allowed / "exists.raw", allowed_dirs=[allowed])
    assert (allowed / "exists.raw").read_bytes() == b"old"
    # outside the export directories
    with pytest.raises(OutputRefused, match="not in an export directory"):
        export_disk(disk, outside / "new.raw", allowed_dirs=[allowed])
    assert not (outside / "new.raw").exists()
    # a symlink as the final component, even a dangling one
    (allowed / "link.raw").symlink_to(victim)
    (allowed / "dangling.raw").symlink_to(outside / "created-through-link")
    for name in ("link.raw", "dangling.raw"):
        with pytest.raises(OutputRefused, match="exists"):
            export_disk(disk, allowed / name, allowed_dirs=[allowed])
    assert victim.read_bytes() == b"precious" and not (outside / "created-through-link").exists()
    # a parent directory that is a symlink pointing outside
    (allowed / "sub").symlink_to(outside)
    with pytest.raises(OutputRefused, match="not in an export directory"):
        export_disk(disk, allowed / "sub" / "new.raw", allowed_dirs=[allowed])
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    # '..' out of the directory
    with pytest.raises(OutputRefused):
        export_disk(disk, str(allowed) + "/../outside/x.raw", allowed_dirs=[allowed])
    # a new file inside: written, and nothing else left beside it
    res = export_disk(disk, allowed / "ok.raw", allowed_dirs=[allowed])
    assert (allowed / "ok.raw").read_bytes() == img and res.path == str(allowed / "ok.raw")
    assert sorted(p.name for p in allowed.iterdir()) == ["dangling.raw", "exists.raw", "link.raw", "ok.raw", "sub"]


def test_export_cancelled_leaves_no_file(small_disk, tmp_path):
    from engine.errors import Cancelled
    from engine.export import export_disk

    disk, _img = small_disk
    cancel = threading.Event()
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"c.{fmt}"

        def progress(phase: str, done: int, total: int) -> None:
            cancel.set()  # after the first chunk

        cancel.clear()
        with pytest.raises(Cancelled):
            export_disk(disk, out, fmt, progress, chunk=1 << 20, cancel=cancel)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".c.{fmt}")], list(tmp_path.iterdir())


def test_qcow2_export_leaves_only_the_output(small_disk, tmp_path):
    from tests.conftest import require_tool

    require_tool("qemu-img")
    from engine.export import export_disk

    disk, img = small_disk
    d = tmp_path / "q"
    d.mkdir()
    export_disk(disk, d / "o.qcow2", "qcow2", allowed_dirs=[d])
    assert [p.name for p in d.iterdir()] == ["o.qcow2"]
    raw = tmp_path / "expected.raw"
    raw.write_bytes(img)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(d / "o.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- 2. the daemon stops within 10 s; jobs cancel and leave nothing --------------------------

DELAY = "2"  # INSTANTNFS_TEST_JOB_DELAY: seconds per progress step, so the jobs are long


def _wait_running(dmn: Daemon, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = dmn.api("GET", f"/jobs/{job_id}")
        assert j["state"] == "running", j
        if j["done"] > 0:
            return j
        time.sleep(0.1)
    pytest.fail(f"job {job_id} made no progress in {timeout} s")


def _sigterm_within(dmn: Daemon, limit: float = 10) -> int:
    assert dmn.proc is not None
    p, dmn.proc = dmn.proc, None
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    try:
        rc = p.wait(limit)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        pytest.fail(f"the daemon ignored SIGTERM for {limit} s with a job running")
    assert time.monotonic() - t0 <= limit
    return rc


def _dir_listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def long_jobs(tmp_path, addr, monkeypatch):
    """A daemon whose jobs wait DELAY s per progress step, a session 's' with written blocks."""
    monkeypatch.setenv("INSTANTNFS_TEST_JOB_DELAY", DELAY)
    repo, point_id, img = make_repo(tmp_path, 24 << 20)
    exports = tmp_path / "exports"
    exports.mkdir()
    cache = tmp_path / "cache"
    extra = ["--export-dir", str(exports)]
    dmn = Daemon(repo, cache, addr, extra).start()
    s = dmn.api("POST", "/sessions", {"point": point_id, "name": "s"})
    asyncio.run(_nfs_write(dmn, "s", s["disks"][0]["name"], [(b * BS, bytes([b]) * 4096) for b in range(0, 24, 2)]))
    box = {"dmn": dmn, "repo": repo, "exports": exports, "cache": cache, "extra": extra, "addr": addr}
    yield box
    box["dmn"].stop()


@pytest.mark.timeout(300)
def test_sigterm_during_a_long_export_and_a_long_commit(long_jobs):
    dmn, repo, exports = long_jobs["dmn"], long_jobs["repo"], long_jobs["exports"]
    before_points = [p["id"] for p in points(repo)]
    before_repo = _dir_listing(repo)
    job = dmn.api("POST", "/sessions/s/export", {"disk": "0", "output": str(exports / "e.raw")})
    _wait_running(dmn, job["id"])
    assert _sigterm_within(dmn) == 0
    assert _dir_listing(exports) == [], "a stopped export left a file"
    dmn = long_jobs["dmn"] = Daemon(repo, long_jobs["cache"], long_jobs["addr"], long_jobs["extra"]).start()
    job = dmn.api("POST", "/sessions/s/commit", {})
    _wait_running(dmn, job["id"])
    assert _sigterm_within(dmn) == 0
    assert [p["id"] for p in points(repo)] == before_points, "a stopped commit left a restore point"
    assert _dir_listing(repo) == before_repo, "a stopped commit left files in the repository"
    r = repo_check(repo)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_cancel_a_job_through_the_api_and_the_cli(long_jobs):
    import urllib.error

    dmn, repo, exports = long_jobs["dmn"], long_jobs["repo"], long_jobs["exports"]
    before_points = [p["id"] for p in points(repo)]
    before_repo = _dir_listing(repo)
    job = dmn.api("POST", "/sessions/s/commit", {})
    _wait_running(dmn, job["id"])
    j = dmn.api("DELETE", f"/jobs/{job['id']}")
    assert j["state"] == "cancelled" and j["cancel_requested"], j
    assert dmn.api("GET", f"/jobs/{job['id']}")["state"] == "cancelled"
    for path, code in ((f"/jobs/{job['id']}", 409), ("/jobs/commit-999", 404)):
        with pytest.raises(urllib.error.HTTPError) as ei:
            dmn.api("DELETE", path)
        assert ei.value.code == code
        assert "\n" not in json.loads(ei.value.read())["error"]
    assert [p["id"] for p in points(repo)] == before_points
    assert _dir_listing(repo) == before_repo
    # Ctrl-C on 'instantnfs export' cancels the job in the daemon
    out = exports / "cli.raw"
    p = subprocess.Popen([sys.executable, "-m", "engine.control.cli", "export", "s", "0", "-o", str(out), "-q",
                          "--server", dmn.url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        running: list[dict] = []
        while not running and time.monotonic() < deadline:
            running = [j for j in dmn.api("GET", "/jobs") if j["kind"] == "export" and j["state"] == "running" and j["done"] > 0]
            time.sleep(0.1)
        assert running, "the CLI's export never ran"
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "cancelling job" in err and "cancelled" in err, err
    assert dmn.api("GET", f"/jobs/{running[0]['id']}")["state"] == "cancelled"
    assert _dir_listing(exports) == []
    # the CLI lists jobs
    r = cli(dmn, "jobs")
    assert r.returncode == 0 and job["id"] in r.stdout and "cancelled" in r.stdout


@pytest.mark.timeout(300)
def test_export_outputs_through_the_daemon(tmp_path, addr):
    import urllib.error

    repo, point_id, img = make_repo(tmp_path, 4 << 20)
    exports = tmp_path / "exports"
    exports.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious")
    (exports / "link.raw").symlink_to(victim)
    (exports / "up").symlink_to(outside)
    (exports / "exists.raw").write_bytes(b"old")
    dmn = Daemon(repo, tmp_path / "cache", addr, ["--export-dir", str(exports)]).start()
    try:
        dmn.api("POST", "/sessions", {"point": point_id, "name": "s"})
        for out in (outside / "x.raw", exports / "link.raw", exports / "up" / "x.raw", exports / "exists.raw",
                    Path("/etc/passwd")):
            with pytest.raises(urllib.error.HTTPError) as ei:
                dmn.api("POST", "/sessions/s/export", {"disk": "0", "output": str(out)})
            assert ei.value.code == 403, out
            msg = json.loads(ei.value.read())["error"]
            assert "\n" not in msg and ("exists" in msg or "not in an export directory" in msg), msg
        assert victim.read_bytes() == b"precious" and _dir_listing(outside) == ["victim"]
        assert (exports / "exists.raw").read_bytes() == b"old"
        r = cli(dmn, "export", "s", "0", "-o", str(exports / "exists.raw"), "--force")
        assert r.returncode != 0 and "never overwrites" in r.stderr and r.stderr.count("\n") == 1
        r = cli(dmn, "export", "s", "0", "-o", str(exports / "ok.raw"), "--json")
        assert r.returncode == 0, r.stderr
        assert (exports / "ok.raw").read_bytes() == img
    finally:
        dmn.stop()
    # the default export directory is on the cache volume
    dmn = Daemon(repo, tmp_path / "cache2", addr).start()
    try:
        dmn.api("POST", "/sessions", {"point": point_id, "name": "s"})
        with pytest.raises(urllib.error.HTTPError) as ei:
            dmn.api("POST", "/sessions/s/export", {"disk": "0", "output": str(tmp_path / "x.raw")})
        assert ei.value.code == 403
        assert str(tmp_path / "cache2" / "exports") in json.loads(ei.value.read())["error"]
        r = cli(dmn, "export", "s", "0", "-o", str(tmp_path / "cache2" / "exports" / "d.raw"))
        assert r.returncode == 0, r.stderr
    finally:
        dmn.stop()


def test_export_dirs_config(tmp_path):
    from engine import config
    from engine.errors import UsageError

    cfg = config.load()
    cfg["cache"]["dir"] = str(tmp_path / "c")
    assert config.validate(cfg)["server"]["export_dirs"] == [str(tmp_path / "c" / "exports")]
    f = tmp_path / "x.toml"
    f.write_text(f'[server]\nexport_dirs = ["{tmp_path}/a", "{tmp_path}/b"]\n')
    assert config.validate(config.load(f))["server"]["export_dirs"] == [f"{tmp_path}/a", f"{tmp_path}/b"]
    f.write_text("[server]\nexport_dirs = [1]\n")
    with pytest.raises(UsageError, match="export_dirs"):
        config.validate(config.load(f))
