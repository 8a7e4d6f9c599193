"""Issue 8, the datastore's part: generations in client-file handles (finding 4), special
files never opened (finding 8), nothing blocking on the event loop (finding 7), start on
a full cache volume (finding 12), pins of published points (finding 2)."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.datastore import REAL, Datastore, Node
from engine.errors import StaleHandle
from engine.nfs.client import NFSClient, NFSError
from engine.nfs.nfs3_types import (
    NFSPROC3,
    SATTR3_NONE,
    GETATTR3args,
    MKNOD3args,
    READ3args,
    SETATTR3args,
    WRITE3args,
    createmode3,
    devicedata3,
    diropargs3,
    ftype3,
    nfs_fh3,
    nfsstat3,
    sattr3,
    specdata3,
    time_how,
)
from engine.nfs.xdr import UnionValue
from engine.repo.ingest import BackupSettings, backup
from engine.repo.pins import list_pins
from engine.repo.repository import Repository
from engine.stack import Stack
from tests.conftest import require, small_tmpfs
from tests.images import make_image
from tests.nfs.conftest import BLOCK, run

MAX_ESXI_HANDLE = 56


def dirop(d: bytes, name: str) -> Any:
    return diropargs3(nfs_fh3(d), name.encode())


async def status(c: NFSClient, proc: int, args: Any, timeout: float = 5.0) -> nfsstat3:
    return nfsstat3((await c.call(proc, args, check=False, timeout=timeout)).tag)


async def connect(dmn: Any) -> NFSClient:
    return await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)


def _size_attr(size: int) -> Any:
    dont = UnionValue(time_how.DONT_CHANGE)
    return sattr3(None, None, None, size, dont, dont)


@pytest.fixture
def small_repo(tmp_path: Path) -> dict[str, Any]:
    """A repository of its own (tests here delete points)."""
    img = tmp_path / "small.raw"
    data = make_image(img, ["random", "text", "zero", "random"], BLOCK, seed=7)
    repo = Repository.init(tmp_path / "repo", BLOCK)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="smallvm"), [str(img)])
    return {"repo": repo, "point": m["id"], "data": data}


def loaded_datastore(stack: Stack, tmp_path: Path) -> Datastore:
    """A datastore over ``stack`` with its cache directory in ``tmp_path``, state loaded."""
    ds = Datastore(stack, tmp_path / "cache", reserve=0)
    ds.load()
    return ds


# -- finding 4: generations -------------------------------------------------------------------


def test_reused_inode_is_stale_in_the_datastore(tmp_path, images, monkeypatch):
    with Stack.open(images["repo"]) as stack:
        ds = loaded_datastore(stack, tmp_path)
        try:
            s = ds.publish(images["point"], "gen")
            sdir = ds.lookup(ds.root(), b"gen")
            a = ds.create(sdir, b".lck-a", "unchecked")
            old = ds.handle(a)
            assert len(old) <= MAX_ESXI_HANDLE
            assert ds.resolve(old).path == a.path
            ds.remove(sdir, b".lck-a")
            reused = None
            for i in range(50):
                b = ds.create(sdir, f".lck-b{i}".encode(), "unchecked")
                if b.ino == a.ino:
                    reused = b
                    break
            require(reused is not None, "the filesystem of the test directory did not reuse a freed inode")
            assert reused is not None
            with pytest.raises(StaleHandle):
                ds.resolve(old)
            assert ds.resolve(ds.handle(reused)).path == reused.path
            # an unknown (inode, generation) is STALE without walking the session directory
            def no_walk(*a: Any, **k: Any) -> Any:
                raise AssertionError("a directory walk while resolving a handle")
            monkeypatch.setattr(os, "walk", no_walk)
            monkeypatch.setattr(os, "scandir", no_walk)
            monkeypatch.setattr(os, "listdir", no_walk)
            for fake in (Node(REAL, s, 987654321, a.path, 1), Node(REAL, s, a.ino, a.path, 1 << 40)):
                with pytest.raises(StaleHandle):
                    ds.resolve(ds.handle(fake))
            # the session directory and the disks keep the handles of daemons before generations
            import struct
            assert len(ds.handle(sdir)) == 32 and ds.resolve(ds.handle(sdir)).path == str(s.dir)
            old_style = struct.pack(">BBHIQ", 1, REAL, 0, s.sid, reused.ino)
            with pytest.raises(StaleHandle):  # a client file's handle without a generation
                ds.resolve(old_style + ds.handles._mac(old_style))
        finally:
            ds.close()


def test_reused_inode_is_stale_over_nfs(daemon_factory, images):
    dmn = daemon_factory()
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "lck"})

    async def main() -> None:
        c = await connect(dmn)
        try:
            sess = await c.mount("/instantnfs/lck")
            a = (await c.create(sess, ".lck-0001")).body.obj.data
            assert len(a) <= MAX_ESXI_HANDLE
            ino = (await c.getattr(a)).fileid
            await c.write(a, 0, b"A" * 84)
            await c.remove(sess, ".lck-0001")
            found = None
            for i in range(50):
                b = (await c.create(sess, f".lck-{i:04x}b")).body.obj.data
                if (await c.getattr(b)).fileid == ino:
                    found = b
                    break
            require(found is not None, "the cache filesystem did not reuse the freed inode")
            assert found is not None and found != a
            await c.write(found, 0, b"B" * 84)
            assert await status(c, NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(a))) == nfsstat3.NFS3ERR_STALE
            assert await status(c, NFSPROC3.READ, READ3args(nfs_fh3(a), 0, 84)) == nfsstat3.NFS3ERR_STALE
            w = WRITE3args(nfs_fh3(a), 0, 3, 2, b"AAA")
            assert await status(c, NFSPROC3.WRITE, w) == nfsstat3.NFS3ERR_STALE
            assert (await c.read(found, 0, 84))[0] == b"B" * 84
        finally:
            await c.close()

    run(main())


def test_client_file_handle_survives_restart(daemon_factory, images, tmp_path):
    cache = tmp_path / "cache-restart"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "keep"})

    async def before() -> dict[str, bytes]:
        c = await connect(dmn)
        try:
            sess = await c.mount("/instantnfs/keep")
            sub = (await c.call(NFSPROC3.MKDIR, __import__("engine.nfs.nfs3_types", fromlist=["MKDIR3args"]).MKDIR3args(
                dirop(sess, "logs"), SATTR3_NONE))).body.obj.data
            f = (await c.create(sub, "vmware.log")).body.obj.data
            await c.write(f, 0, b"log line\n")
            img = await c.lookup(sess, f"{images['disks'][0]['name']}.img")
            return {"sess": sess, "sub": sub, "f": f, "img": img}
        finally:
            await c.close()

    h = run(before())
    addr = dmn.addr
    assert dmn.stop() == 0
    dmn2 = daemon_factory(cache_dir=cache, addr=addr)

    async def after() -> None:
        c = await connect(dmn2)
        try:
            assert await c.lookup(await c.mount("/instantnfs"), "keep") == h["sess"]
            assert (await c.read(h["f"], 0, 100))[0] == b"log line\n"
            assert await c.lookup(h["sess"], "logs") == h["sub"]
            assert await c.lookup(h["sub"], "vmware.log") == h["f"]
            assert (await c.getattr(h["img"])).size == images["disks"][0]["size"]
        finally:
            await c.close()

    run(after())


# -- finding 8: special files -----------------------------------------------------------------


def test_mknod_is_refused(daemon_factory, images):
    dmn = daemon_factory()
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "nod"})

    async def main() -> None:
        c = await connect(dmn)
        try:
            sess = await c.mount("/instantnfs/nod")
            fifo = MKNOD3args(dirop(sess, "p"), UnionValue(ftype3.NF3FIFO, SATTR3_NONE))
            assert await status(c, NFSPROC3.MKNOD, fifo) == nfsstat3.NFS3ERR_NOTSUPP
            sock = MKNOD3args(dirop(sess, "s"), UnionValue(ftype3.NF3SOCK, SATTR3_NONE))
            assert await status(c, NFSPROC3.MKNOD, sock) == nfsstat3.NFS3ERR_NOTSUPP
            dev = MKNOD3args(dirop(sess, "d"), UnionValue(ftype3.NF3CHR, devicedata3(SATTR3_NONE, specdata3(1, 3))))
            assert await status(c, NFSPROC3.MKNOD, dev) == nfsstat3.NFS3ERR_BADTYPE
            for n in ("p", "s", "d"):
                assert await status(c, NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(sess))) == nfsstat3.NFS3_OK
                with pytest.raises(NFSError):
                    await c.lookup(sess, n)
        finally:
            await c.close()

    run(main())


def test_special_files_are_never_opened(daemon_factory, images, tmp_path):
    require(os.geteuid() == 0, "making a device node needs root")
    cache = tmp_path / "cache-special"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "spec"})
    sdir = cache / "sessions" / "spec"
    outside_fifo = tmp_path / "outside.fifo"
    os.mkfifo(outside_fifo)
    os.mkfifo(sdir / "fifo")
    os.mknod(sdir / "sock", 0o644 | stat.S_IFSOCK)
    os.mknod(sdir / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink(str(outside_fifo), sdir / "link")
    os.symlink("fifo", sdir / "rel")

    def unblock() -> None:
        """If the daemon blocked in open(O_WRONLY) of a FIFO, a reader frees it."""
        for p in (sdir / "fifo", outside_fifo):
            try:
                os.close(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                pass

    async def main() -> None:
        c = await connect(dmn)
        probe = await connect(dmn)
        try:
            sess = await c.mount("/instantnfs/spec")
            await probe.mount("/instantnfs/spec")
            for name in ("fifo", "sock", "null", "link", "rel"):
                fh = await c.lookup(sess, name)
                calls = [
                    (NFSPROC3.SETATTR, SETATTR3args(nfs_fh3(fh), _size_attr(0), None)),
                    (NFSPROC3.WRITE, WRITE3args(nfs_fh3(fh), 0, 4, 2, b"data")),
                    (NFSPROC3.READ, READ3args(nfs_fh3(fh), 0, 4)),
                ]
                for proc, args in calls:
                    task = asyncio.ensure_future(c.call(proc, args, check=False, timeout=30))
                    try:
                        # the hang detector: another connection is answered while the call runs
                        st = await probe.call(NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(sess)), check=False, timeout=5)
                        assert st.tag == nfsstat3.NFS3_OK
                        res = await asyncio.wait_for(task, 5)
                    except TimeoutError:
                        unblock()
                        raise AssertionError(f"{NFSPROC3(proc).name} of {name} blocked the daemon") from None
                    assert res.tag != nfsstat3.NFS3_OK, f"{NFSPROC3(proc).name} of {name} succeeded"
                task = asyncio.ensure_future(c.create(sess, name, createmode3.UNCHECKED, check=False, timeout=30))
                try:
                    st = await probe.call(NFSPROC3.GETATTR, GETATTR3args(nfs_fh3(sess)), check=False, timeout=5)
                    assert st.tag == nfsstat3.NFS3_OK
                    res = await asyncio.wait_for(task, 5)
                except TimeoutError:
                    unblock()
                    raise AssertionError(f"CREATE UNCHECKED of {name} blocked the daemon") from None
                assert res.tag != nfsstat3.NFS3_OK, f"CREATE UNCHECKED of {name} succeeded"
                assert stat.S_IFMT(os.lstat(sdir / name).st_mode) != stat.S_IFREG
        finally:
            await c.close()
            await probe.close()

    run(main())
    assert stat.S_ISFIFO(os.stat(outside_fifo).st_mode)


# -- finding 7: nothing blocking on the loop --------------------------------------------------


def test_publish_unpublish_and_client_files_run_off_the_loop(tmp_path, images, monkeypatch):
    on_loop: list[str] = []
    loop_thread: list[int] = []

    def spy(mod: Any, name: str) -> None:
        real = getattr(mod, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            if loop_thread and threading.get_ident() == loop_thread[0]:
                on_loop.append(name)
            return real(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)

    for name in ("fsync", "fdatasync", "posix_fallocate", "pread", "pwrite"):
        spy(os, name)
    spy(shutil, "rmtree")

    async def main(ds: Datastore) -> None:
        loop_thread.append(threading.get_ident())
        s = await ds.apublish(images["point"], "offloop", mode="instant")
        assert ds.sessions["offloop"] is s
        sb = await ds.apublish(images["point"], "sandbox", mode="sandbox")
        sdir = ds.lookup(ds.root(), b"offloop")
        f = ds.create(sdir, b"x.vswp", "unchecked")
        await ds.write(f, 0, b"v" * 8192, 0)
        await ds.write(f, 8192, b"w" * 100, 2)
        await ds.commit(f)
        bufs, n, _eof = await ds.read(f, 0, 9000)
        assert n == 8292 and b"".join(bytes(b) for b in bufs) == b"v" * 8192 + b"w" * 100
        await ds.aunpublish("offloop")
        assert "offloop" not in ds.sessions  # hidden at once
        await ds.aunpublish(sb.name)
        for _ in range(500):  # the clean-up finishes off the loop
            if not s.dir.exists() and not (s.cache_parent / f"{s.name}.{s.sid}").exists():
                break
            await asyncio.sleep(0.01)
        assert not s.dir.exists()
        assert not (s.cache_parent / f"{s.name}.{s.sid}").exists()
        await ds.aclose()

    with Stack.open(images["repo"]) as stack:
        ds = loaded_datastore(stack, tmp_path)
        run(main(ds))
    assert on_loop == [], f"blocking calls on the event loop: {sorted(set(on_loop))}"


# -- finding 12: a full cache volume ----------------------------------------------------------


@pytest.fixture
def small_volume(tmp_path):
    with small_tmpfs(tmp_path / "vol", "4m") as mnt:
        yield mnt


def _fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, bytes(4096))
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return
    finally:
        os.close(fd)


def test_daemon_starts_on_a_full_cache_volume(daemon_factory, images, small_volume):
    cache = small_volume / "cache"
    dmn = daemon_factory(cache_dir=cache)
    dmn.api("POST", "/sessions", {"point": images["point"], "name": "full"})
    name = images["disks"][0]["name"]
    written = bytes(range(256)) * 256  # 64 KiB

    async def write_some() -> None:
        c = await connect(dmn)
        try:
            img = await c.lookup(await c.mount("/instantnfs/full"), f"{name}.img")
            await c.write(img, 1 << 20, written, stable=2)
        finally:
            await c.close()

    run(write_some())
    addr = dmn.addr
    assert dmn.stop() == 0
    filler = small_volume / "filler"
    _fill(filler)
    dmn2 = daemon_factory(cache_dir=cache, addr=addr)
    assert [s["name"] for s in dmn2.api("GET", "/sessions")] == ["full"]

    async def serve_full() -> None:
        c = await connect(dmn2)
        try:
            img = await c.lookup(await c.mount("/instantnfs/full"), f"{name}.img")
            assert (await c.read(img, 1 << 20, len(written)))[0] == written
            assert (await c.read(img, 0, 4096))[0] == images["data"][0][:4096]
            w = WRITE3args(nfs_fh3(img), 8 << 20, 1 << 20, 2, bytes([7]) * (1 << 20))
            assert await status(c, NFSPROC3.WRITE, w) == nfsstat3.NFS3ERR_NOSPC
            filler.unlink()
            r = await c.write(img, 8 << 20, bytes([7]) * (1 << 20), stable=2)
            assert r.count == 1 << 20
            assert (await c.read(img, 8 << 20, 4096))[0] == bytes([7]) * 4096
        finally:
            await c.close()

    run(serve_full())
    log_text = dmn2.log.read_text()
    assert "No space left" in log_text or "full" in log_text


def test_load_does_not_rewrite_unchanged_state(tmp_path, images):
    with Stack.open(images["repo"]) as stack:
        ds = loaded_datastore(stack, tmp_path)
        ds.publish(images["point"], "same")
        ds.close()
        st = (tmp_path / "cache" / "state.json").stat()
        ds2 = loaded_datastore(stack, tmp_path)
        try:
            st2 = (tmp_path / "cache" / "state.json").stat()
            assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
            assert "same" in ds2.sessions
        finally:
            ds2.close()


# -- finding 2: pins --------------------------------------------------------------------------


def test_publish_pins_and_unpublish_unpins(tmp_path, small_repo):
    with Stack.open(small_repo["repo"]) as stack:
        repo = stack.repo
        ds = loaded_datastore(stack, tmp_path)
        try:
            s = ds.publish(small_repo["point"], "pinned")
            pins = list_pins(repo, small_repo["point"])
            assert [(p.session, p.sid, p.daemon) for p in pins] == [("pinned", s.sid, ds.daemon_id)]
            assert pins[0].pid == os.getpid() and pins[0].cache_dir == str(ds.cache_dir)
            sb = run(ds.apublish(small_repo["point"], "sb", mode="sandbox"))
            assert {p.session for p in list_pins(repo, small_repo["point"])} == {"pinned", "sb"}
            ds.unpublish("pinned")
            assert [p.session for p in list_pins(repo, small_repo["point"])] == ["sb"]
            ds.unpublish(sb.name)
            assert list_pins(repo, small_repo["point"]) == []
        finally:
            ds.close()


def test_load_repins_and_drops_pins_of_gone_sessions(tmp_path, small_repo):
    from engine.repo.pins import Pin, add_pin, remove_pin

    with Stack.open(small_repo["repo"]) as stack:
        repo = stack.repo
        ds = loaded_datastore(stack, tmp_path)
        s = ds.publish(small_repo["point"], "inst")
        ds.publish(small_repo["point"], "sand", mode="sandbox")
        daemon = ds.daemon_id
        # a killed daemon: nothing closed, the sandbox's pin stays
        remove_pin(repo, small_repo["point"], daemon, "inst")  # lost: load puts it back
        ghost = Pin(small_repo["point"], "ghost", 999, daemon, str(ds.cache_dir), "h", 1, "2026-01-01T00:00:00Z")
        add_pin(repo, ghost)
        other = Pin(small_repo["point"], "theirs", 5, "0123456789abcdef", "/elsewhere", "h", 1, "2026-01-01T00:00:00Z")
        add_pin(repo, other)
        for c in s.caches + ds.sessions["sand"].caches:
            c.close()
        ds2 = loaded_datastore(stack, tmp_path)
        try:
            assert ds2.daemon_id == daemon
            got = {(p.session, p.daemon) for p in list_pins(repo, small_repo["point"])}
            assert got == {("inst", daemon), ("theirs", "0123456789abcdef")}
        finally:
            ds2.close()


def test_session_of_a_force_deleted_point_is_not_restored(tmp_path, small_repo, caplog):
    with Stack.open(small_repo["repo"]) as stack:
        repo = stack.repo
        ds = loaded_datastore(stack, tmp_path)
        ds.publish(small_repo["point"], "doomed")
        ds.close()
        from engine.repo.pins import remove_pin
        remove_pin(repo, small_repo["point"], ds.daemon_id, "doomed")  # what --force does first
        repo.delete_point(small_repo["point"])
        ds2 = Datastore(stack, tmp_path / "cache", reserve=0)
        with caplog.at_level(logging.ERROR, logger="instantnfs.datastore"):
            ds2.load()
        try:
            assert "doomed" not in ds2.sessions
            assert any("doomed" in r.getMessage() and small_repo["point"][:8] in r.getMessage() for r in caplog.records)
            assert list_pins(repo) == []
        finally:
            ds2.close()


def test_a_failed_write_cache_shows_in_the_session_view(tmp_path, small_repo, monkeypatch, capsys):
    """Finding 7: an operator sees that a session's cache failed its fdatasync."""
    import errno as _errno

    from engine import writecache
    from engine.control.client import _print_session
    from engine.errors import WriteCacheError

    def eio(fd: int) -> None:
        raise OSError(_errno.EIO, os.strerror(_errno.EIO))

    with Stack.open(small_repo["repo"]) as stack:
        ds = loaded_datastore(stack, tmp_path)
        try:
            s = ds.publish(small_repo["point"], "f")
            assert [d["failed"] for d in ds.session_json(s)["disks"]] == [None] * len(s.disks)
            s.caches[0].write(0, b"z" * 4096)
            monkeypatch.setattr(writecache, "_fdatasync", eio)
            with pytest.raises(WriteCacheError):
                s.caches[0].commit()
            view = ds.session_json(s)
            assert view["disks"][0]["failed"] == "fdatasync: EIO"
            view["path"] = "/instantnfs/f"
            for d in view["disks"]:
                d.update(url="nfs://x", url_libnfs="nfs://x?y", files={"vmdk": "v"})
            _print_session(view)
            out = capsys.readouterr().out
            assert "FAILED" in out and "fdatasync: EIO" in out
        finally:
            ds.close()
