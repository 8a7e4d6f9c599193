"""Writable published disks end to end: real clients (qemu-io, qemu-img, our NFS client)
against daemon subprocesses; the repository's files are hashed before and after every
write test and must not change."""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.nfs.client import NFSClient
from engine.nfs.nfs3_types import (
    NFSPROC3,
    COMMIT3args,
    FSSTAT3args,
    GETATTR3args,
    WRITE3args,
    nfs_fh3,
    nfsstat3,
)
from tests.conftest import require, require_tool
from tests.images import repository_data, sha256_tree
from tests.nfs.conftest import ROOT, Daemon, give_address, run, take_address

GRANULE = 4096




@pytest.fixture
def untouched(images):
    """Asserts at teardown that no stored repository file changed during the test."""
    before = repository_data(images["repo"])
    yield
    assert repository_data(images["repo"]) == before


def cli(dmn: Daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.control.cli", *args, "--server", dmn.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def sh(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


async def connect(dmn: Daemon, session: str) -> tuple[NFSClient, bytes]:
    c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
    return c, await c.mount(f"/instantnfs/{session}")


def wargs(fh: bytes, off: int, data: bytes, stable: int) -> Any:
    return WRITE3args(nfs_fh3(fh), off, len(data), stable, data)


def nfs_io(dmn: Daemon, session: str, fn: Any) -> Any:
    async def main() -> Any:
        c, sess = await connect(dmn, session)
        try:
            return await fn(c, sess)
        finally:
            await c.close()
    return run(main())


# -- qemu-io / qemu-img --------------------------------------------------------------------------


def test_qemu_io_patterns_at_scattered_offsets_and_export_compare(daemon_factory, images, tmp_path, untouched):
    require_tool("qemu-io", "qemu-img")
    dmn = daemon_factory(extra=["--export-dir", str(tmp_path)])  # exports go to tmp_path
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "qio"})
    d = images["disks"][0]
    url = f"nfs://{dmn.addr}/instantnfs/qio/{d['name']}.img"
    rng = random.Random(5)
    size = d["size"]
    # unaligned, crossing granules and 1 MiB blocks, the first and the last bytes of the disk
    spots = [(0, 512), (4095, 2), ((1 << 20) - 100, 300), (size - 4096, 4096), (size - 7, 7), (3 * (1 << 20) + 17, 70_000)]
    spots += [(rng.randrange(0, size - 65536), rng.randrange(1, 65536)) for _ in range(14)]
    expected = bytearray(images["data"][0])
    cmds: list[str] = []
    for i, (off, n) in enumerate(spots):
        pat = 0x11 + i * 7
        cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
        expected[off : off + n] = bytes([pat]) * n
    r = sh("qemu-io", "-f", "raw", *cmds, url)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    # read back in a second qemu-io (a new connection): the newest pattern of every byte
    reads: list[str] = []
    for off, n in spots:
        pat = expected[off]
        if expected[off : off + n] == bytes([pat]) * n:
            reads += ["-c", f"read -P {pat:#x} {off} {n}"]
    r = sh("qemu-io", "-f", "raw", *reads, url)
    assert r.returncode == 0 and "verification failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.stdout.count("read ") == len(reads) // 2
    want = tmp_path / "expected.raw"
    want.write_bytes(expected)
    r = sh("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(want))
    assert r.returncode == 0, r.stdout + r.stderr
    # the exported disk (qcow2, through the daemon) is the expected image
    out = tmp_path / "export.qcow2"
    r = cli(dmn, "export", "qio", d["name"], "-o", str(out), "--format", "qcow2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "qcow2"
    r = sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(want))
    assert r.returncode == 0, r.stdout + r.stderr
    s = dmn.api("GET", "/sessions/qio")
    assert s["disks"][0]["dirty_bytes"] > 0 and s["disks"][1]["dirty_bytes"] == 0


# -- persistence -----------------------------------------------------------------------------------


def test_restart_keeps_instant_data_and_handles(daemon_factory, images, tmp_path, untouched):
    cache = tmp_path / "inst"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "inst"})
    d = images["disks"][1]

    async def before(c: NFSClient, sess: bytes) -> dict:
        fh = await c.lookup(sess, f"{d['name']}-flat.vmdk")
        w1 = await c.call(NFSPROC3.WRITE, wargs(fh, 10_000, b"A" * 9000, 0))
        await c.call(NFSPROC3.WRITE, wargs(fh, d["size"] - 100, b"Z" * 100, 0))
        cm = await c.call(NFSPROC3.COMMIT, COMMIT3args(nfs_fh3(fh), 0, 0))
        assert cm.body.verf == w1.body.verf
        return {"fh": fh, "verf": w1.body.verf}

    got = nfs_io(dmn, "inst", before)
    dmn.stop()
    dmn2 = daemon_factory(cache_dir=cache, addr=dmn.addr)

    async def after(c: NFSClient, sess: bytes) -> None:
        fh = got["fh"]  # the handle from before the restart
        assert (await c.getattr(fh)).size == d["size"]
        assert (await c.read(fh, 10_000, 9000))[0] == b"A" * 9000
        assert (await c.read(fh, d["size"] - 100, 100))[0] == b"Z" * 100
        assert (await c.read(fh, 0, 10_000))[0] == images["data"][1][:10_000]
        w = await c.call(NFSPROC3.WRITE, wargs(fh, 0, b"new", 2))
        assert w.body.verf != got["verf"]  # a new daemon: clients resend what was not committed

    nfs_io(dmn2, "inst", after)
    s = dmn2.api("GET", "/sessions/inst")
    assert s["mode"] == "instant" and s["disks"][1]["dirty_bytes"] == 5 * GRANULE


def test_sigkill_after_commit_keeps_committed_data(daemon_factory, images, tmp_path, untouched):
    cache = tmp_path / "kill"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "kill"})
    d = images["disks"][0]
    payload = os.urandom(300_000)

    async def write(c: NFSClient, sess: bytes) -> bytes:
        fh = await c.lookup(sess, f"{d['name']}.img")
        for i in range(0, len(payload), 65536):
            await c.call(NFSPROC3.WRITE, wargs(fh, 2_000_001 + i, payload[i : i + 65536], 0))
        await c.call(NFSPROC3.COMMIT, COMMIT3args(nfs_fh3(fh), 0, 0))
        await c.call(NFSPROC3.WRITE, wargs(fh, 7_777_777, b"stable-write", 1))
        return fh

    fh = nfs_io(dmn, "kill", write)
    assert dmn.proc is not None
    os.kill(dmn.proc.pid, signal.SIGKILL)
    dmn.proc.wait(10)
    dmn.proc = None
    dmn2 = daemon_factory(cache_dir=cache, addr=dmn.addr)

    async def check(c: NFSClient, sess: bytes) -> None:
        assert await c.read_all(fh) == (
            images["data"][0][:2_000_001] + payload + images["data"][0][2_300_001:7_777_777] + b"stable-write"
            + images["data"][0][7_777_789:]
        )

    nfs_io(dmn2, "kill", check)


# -- space -------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    require_tool("mount", "umount")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = sh("mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt))
    require(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        sh("umount", "-l", str(mnt))


def test_cache_full_gives_nospc_and_keeps_what_was_written(daemon_factory, images, small_tmpfs, untouched):
    dmn = daemon_factory()
    # the reserve refuses a small volume; --force publishes anyway
    with pytest.raises(Exception) as e:
        dmn.api("POST", "/sessions", {"point": images["point"], "name": "full", "cache_dir": str(small_tmpfs), "reserve_gib": 1})
    assert "reserve" in e.value.read().decode()  # type: ignore[attr-defined]
    s = dmn.api("POST", "/sessions", {"point": images["point"], "name": "full", "cache_dir": str(small_tmpfs),
                                      "reserve_gib": 1, "force": True})
    assert s["cache_dir"] == str(small_tmpfs)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "other"})
    d = images["disks"][0]
    chunk = 256 << 10

    async def fill(c: NFSClient, sess: bytes) -> None:
        fh = await c.lookup(sess, f"{d['name']}.img")
        st = (await c.call(NFSPROC3.FSSTAT, FSSTAT3args(nfs_fh3(fh)))).body
        v = os.statvfs(small_tmpfs)
        assert st.tbytes == v.f_blocks * v.f_frsize  # FSSTAT: the cache volume's space
        written: list[tuple[int, bytes]] = []
        status = nfsstat3.NFS3_OK
        for i in range(d["size"] // chunk):
            data = bytes([i % 251 + 1]) * chunk
            r = await c.call(NFSPROC3.WRITE, wargs(fh, i * chunk, data, 2), check=False)
            status = nfsstat3(r.tag)
            if status != nfsstat3.NFS3_OK:
                break
            written.append((i * chunk, data))
        assert status == nfsstat3.NFS3ERR_NOSPC
        assert len(written) >= 4
        # everything acknowledged before reads back; the failed range still reads the backup
        for off, data in written:
            assert (await c.read(fh, off, chunk))[0] == data
        fail = len(written) * chunk
        assert (await c.read(fh, fail, chunk))[0] == images["data"][0][fail : fail + chunk]
        # rewriting already-dirty data needs no new space; the server answers everything else
        r = await c.call(NFSPROC3.WRITE, wargs(fh, 0, b"\xee" * 4096, 2))
        assert r.tag == nfsstat3.NFS3_OK
        assert (await c.read(fh, 0, 4096))[0] == b"\xee" * 4096
        assert (await c.call(NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(fh)))).tag == nfsstat3.NFS3_OK

    nfs_io(dmn, "full", fill)

    async def other(c: NFSClient, sess: bytes) -> None:
        fh = await c.lookup(sess, f"{d['name']}.img")
        assert await c.read_all(fh) == images["data"][0]

    nfs_io(dmn, "other", other)
    dmn.api("DELETE", "/sessions/full")
    assert not any(small_tmpfs.iterdir())


# -- sandboxes -----------------------------------------------------------------------------------


def test_two_sandboxes_of_one_point(daemon_factory, images, tmp_path, untouched):
    parent = tmp_path / "sandboxes"
    cache = tmp_path / "sbcache"
    dmn = daemon_factory(cache_dir=cache)
    views = [dmn.api("POST", "/sessions", {"point": images["point"], "name": n, "mode": "sandbox", "cache_dir": str(parent)})
             for n in ("sb1", "sb2")]
    dirs = [Path(v["disks"][0]["cache_path"]) for v in views]
    assert all(v["mode"] == "sandbox" for v in views) and dirs[0] != dirs[1] and all(p.is_dir() for p in dirs)
    d = images["disks"][0]

    def write(session: str, byte: bytes) -> None:
        async def fn(c: NFSClient, sess: bytes) -> None:
            fh = await c.lookup(sess, f"{d['name']}.img")
            await c.call(NFSPROC3.WRITE, wargs(fh, 123_456, byte * 50_000, 0))
        nfs_io(dmn, session, fn)

    async def read(c: NFSClient, sess: bytes) -> bytes:
        return (await c.read(await c.lookup(sess, f"{d['name']}.img"), 123_456, 50_000))[0]

    write("sb1", b"1")
    write("sb2", b"2")
    assert nfs_io(dmn, "sb1", read) == b"1" * 50_000
    assert nfs_io(dmn, "sb2", read) == b"2" * 50_000
    out = cli(dmn, "sessions")
    assert out.returncode == 0 and "mode sandbox" in out.stdout and "dirty" in out.stdout, out.stdout
    dmn.api("DELETE", "/sessions/sb1")
    assert not dirs[0].exists() and dirs[1].is_dir()
    assert nfs_io(dmn, "sb2", read) == b"2" * 50_000
    # daemon stop ends a sandbox too: its directory is gone and it does not come back
    dmn.stop()
    assert not dirs[1].exists() and not list(parent.iterdir())
    dmn2 = daemon_factory(cache_dir=cache, addr=dmn.addr)
    assert dmn2.api("GET", "/sessions") == []


# -- export while writing, commit ------------------------------------------------------------------


def test_export_while_a_writer_runs_equals_the_disk_at_the_end(daemon_factory, images, tmp_path, untouched):
    dmn = daemon_factory(extra=["--export-dir", str(tmp_path)])  # exports go to tmp_path
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "exp"})
    d = images["disks"][0]
    size = d["size"]
    stop = threading.Event()
    started = threading.Event()
    acked: list[tuple[int, bytes]] = []
    errors: list[BaseException] = []

    def writer() -> None:
        async def main() -> None:
            c, sess = await connect(dmn, "exp")
            try:
                fh = await c.lookup(sess, f"{d['name']}.img")
                rng = random.Random(9)
                i = 0
                while not stop.is_set():
                    off = rng.randrange(0, size - 8192)
                    data = f"write {i:08d} ".encode().ljust(rng.randrange(20, 8192), b"#")
                    await c.call(NFSPROC3.WRITE, wargs(fh, off, data, 0))
                    acked.append((off, data))
                    i += 1
                    if i == 20:
                        started.set()
            finally:
                await c.close()
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            started.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert started.wait(30)
        n_before = len(acked)
        out = tmp_path / "exp.raw"
        r = cli(dmn, "export", "exp", "0", "-o", str(out))
        assert r.returncode == 0, r.stderr
        n_after = len(acked)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    got = out.read_bytes()
    # one writer, one write in flight: the export is the disk after the first k writes
    k = max((i for i, (off, data) in enumerate(acked) if got[off : off + len(data)] == data), default=-1) + 1
    assert n_before <= k and n_after > n_before
    model = bytearray(images["data"][0])
    for off, data in acked[:k]:
        model[off : off + len(data)] = data
    assert got == bytes(model)


def test_commit_creates_a_point_with_the_merged_disks(images, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(images["repo"], repo)
    before = sha256_tree(repo)
    addr = take_address()
    dmn = Daemon(repo, tmp_path / "cache", addr)
    try:
        dmn.start()
        dmn.api("POST", "/sessions", {"point": images["point"], "name": "cm"})
        d0, d1 = images["disks"]
        want0, want1 = bytearray(images["data"][0]), bytearray(images["data"][1])

        async def write(c: NFSClient, sess: bytes) -> None:
            f0 = await c.lookup(sess, f"{d0['name']}.img")
            f1 = await c.lookup(sess, f"{d1['name']}.img")
            for off, n in ((5, 100), (2 << 20, 1 << 20), (d0["size"] - 4000, 4000)):
                data = os.urandom(n)
                await c.call(NFSPROC3.WRITE, wargs(f0, off, data, 0))
                want0[off : off + n] = data
            await c.call(NFSPROC3.WRITE, wargs(f1, d1["size"] - 10, b"0123456789", 0))
            want1[-10:] = b"0123456789"

        nfs_io(dmn, "cm", write)
        r = cli(dmn, "commit", "cm", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["parent"] == images["point"] and res["vm"] == images["vm"]
        points = {p["id"] for p in dmn.api("GET", "/points")}
        assert res["point"] in points and images["point"] in points
        dmn.api("POST", "/sessions", {"point": res["point"], "name": "after"})

        async def read(c: NFSClient, sess: bytes) -> tuple[bytes, bytes]:
            return (await c.read_all(await c.lookup(sess, f"{d0['name']}.img")),
                    await c.read_all(await c.lookup(sess, f"{d1['name']}.img")))

        assert nfs_io(dmn, "after", read) == (bytes(want0), bytes(want1))
        openapi = dmn.api("GET", "/openapi.json")
        assert "/api/v1/sessions/{name}/commit" in openapi["paths"] and "/api/v1/sessions/{name}/export" in openapi["paths"]
    finally:
        dmn.stop()
        give_address(addr)
    after = sha256_tree(repo)
    # the commit only added files: every file that was there is unchanged (the lock file and
    # the pack-id counter aside: a commit takes new pack ids)
    moving = ("lock", "next-pack")
    assert {k: v for k, v in after.items() if k in before and k not in moving} == {k: v for k, v in before.items() if k not in moving}


# -- the session's life around its caches ----------------------------------------------------------


def test_unpublish_with_writes_in_flight(daemon_factory, images, tmp_path, untouched):
    """Unpublish while WRITEs run in the thread pool: each gets OK or STALE, the caches
    close after the last one, the directories go, the daemon keeps serving."""
    dmn = daemon_factory()
    view = dmn.api("POST", "/sessions", {"point": images["point"], "name": "busy"})
    cache_dir = Path(view["disks"][0]["cache_path"]).parent
    d = images["disks"][0]

    async def main() -> list[int]:
        c, sess = await connect(dmn, "busy")
        try:
            fh = await c.lookup(sess, f"{d['name']}.img")
            data = os.urandom(200_000)  # > 64 KiB and unaligned: the thread pool, with copy on write
            writes = [asyncio.ensure_future(c.call(NFSPROC3.WRITE, wargs(fh, 1000 + i * 300_001, data, i % 3), check=False))
                      for i in range(60)]
            await asyncio.sleep(0.005)
            await asyncio.get_running_loop().run_in_executor(None, dmn.api, "DELETE", "/sessions/busy")
            return [r.tag for r in await asyncio.gather(*writes)]
        finally:
            await c.close()

    tags = run(main())
    assert set(tags) <= {nfsstat3.NFS3_OK, nfsstat3.NFS3ERR_STALE}, tags
    assert not cache_dir.exists()
    assert dmn.api("GET", "/sessions") == []
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "again"})

    async def read(c: NFSClient, sess: bytes) -> bytes:
        return (await c.read(await c.lookup(sess, f"{d['name']}.img"), 0, 1 << 20))[0]

    assert nfs_io(dmn, "again", read) == images["data"][0][: 1 << 20]


def test_sandbox_left_by_a_killed_daemon_is_removed_at_start(daemon_factory, images, tmp_path, untouched):
    cache = tmp_path / "killsb"
    dmn = daemon_factory(cache_dir=cache)
    view = dmn.api("POST", "/sessions", {"point": images["point"], "name": "sbk", "mode": "sandbox"})
    inst = dmn.api("POST", "/sessions", {"point": images["point"], "name": "keep"})
    sb_dir = Path(view["disks"][0]["cache_path"])
    assert sb_dir.is_dir()
    assert dmn.proc is not None
    os.kill(dmn.proc.pid, signal.SIGKILL)
    dmn.proc.wait(10)
    dmn.proc = None
    assert sb_dir.is_dir()  # nobody removed it
    dmn2 = daemon_factory(cache_dir=cache, addr=dmn.addr)
    assert not sb_dir.exists()
    assert [s["name"] for s in dmn2.api("GET", "/sessions")] == ["keep"]
    assert Path(inst["disks"][0]["cache_path"]).is_dir()


def test_cli_publish_modes_reserve_and_job_errors(daemon_factory, images, tmp_path, untouched):
    dmn = daemon_factory(extra=["--export-dir", str(tmp_path)])  # exports go to tmp_path
    r = cli(dmn, "publish", images["point"], "--name", "big", "--reserve-gib", "1000000")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "less than the 1000000.0 GiB reserve" in r.stderr, r.stderr
    r = cli(dmn, "publish", images["point"], "--name", "big", "--reserve-gib", "1000000", "--force", "--mode", "sandbox", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "sandbox"
    r = cli(dmn, "export", "big", "nosuchdisk", "-o", str(tmp_path / "x.raw"))
    assert r.returncode != 0 and "has no disk 'nosuchdisk'" in r.stderr
    r = cli(dmn, "export", "big", "0", "-o", str(tmp_path / "missing-dir" / "x.raw"))
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = cli(dmn, "commit", "nosession")
    assert r.returncode != 0 and "no published session 'nosession'" in r.stderr


def test_commit_while_the_repository_is_locked_fails_clearly(images, tmp_path):
    from engine.repo.repository import Repository

    repo = tmp_path / "repo"
    shutil.copytree(images["repo"], repo)
    addr = take_address()
    dmn = Daemon(repo, tmp_path / "cache", addr)
    try:
        dmn.start()
        dmn.api("POST", "/sessions", {"point": images["point"], "name": "lk"})
        with Repository.open(repo) as r, r.lock("backup testvm"):
            res = cli(dmn, "commit", "lk")
        assert res.returncode != 0 and f"locked by PID {os.getpid()}" in res.stderr, res.stderr
        jobs = dmn.api("GET", "/jobs")
        assert jobs[-1]["kind"] == "commit" and jobs[-1]["state"] == "failed"
        assert len(dmn.api("GET", "/points")) == 1
    finally:
        dmn.stop()
        give_address(addr)


def test_instant_session_whose_cache_is_missing_is_kept_not_emptied(daemon_factory, images, tmp_path, untouched):
    """A restart that cannot find a session's cache (a volume not mounted) must not start
    an empty one in its place: the session stays out, kept in the state for a later start."""
    cache, wdir = tmp_path / "state", tmp_path / "vol"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "vm", "cache_dir": str(wdir)})

    async def write(c: NFSClient, sess: bytes) -> None:
        await c.call(NFSPROC3.WRITE, wargs(await c.lookup(sess, f"{images['disks'][0]['name']}.img"), 0, b"kept", 2))

    nfs_io(dmn, "vm", write)
    dmn.stop()
    wdir.rename(tmp_path / "vol-away")
    dmn2 = daemon_factory(cache_dir=cache, addr=dmn.addr)
    assert dmn2.api("GET", "/sessions") == []
    with pytest.raises(Exception) as e:
        dmn2.api("POST", "/sessions", {"point": images["point"], "name": "vm"})
    assert "could not be restored" in e.value.read().decode()  # type: ignore[attr-defined]
    dmn2.stop()
    (tmp_path / "vol-away").rename(wdir)
    dmn3 = daemon_factory(cache_dir=cache, addr=dmn.addr)

    async def read(c: NFSClient, sess: bytes) -> bytes:
        return (await c.read(await c.lookup(sess, f"{images['disks'][0]['name']}.img"), 0, 4))[0]

    assert nfs_io(dmn3, "vm", read) == b"kept"
