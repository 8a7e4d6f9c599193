"""Never a wrong byte, on the repository side (issue 8, findings 1, 2, 7 and 13).

Pack ids are never reused and each pack is checked to be the pack its id names, so a
daemon that keeps its chunk cache and pack descriptors across ``points delete``, ``gc``
and a new backup serves the new backup's bytes; packs gc removed are closed; the event
loop never opens a pack nor calls fadvise; restore survives short writes; ``repo check``
calls a live pack with a broken index damage, not garbage.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.errors import IntegrityError
from engine.repo.check import gc
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack
from tests.cli import ok, run

BS = 256 * 1024
SIZE = 4 * BS


def _image(path: Path, byte: bytes, size: int = SIZE) -> bytes:
    data = byte * size
    path.write_bytes(data)
    return data


def _pack_ids(repo: Path) -> set[int]:
    return {int(p.stem, 16) for p in (repo / "packs").glob("*.pack")}


def _fds_to(path: Path) -> int:
    """How many of this process's descriptors point at ``path`` (deleted or not)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target in (str(path), f"{path} (deleted)"):
            n += 1
    return n


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return Repository.init(tmp_path / "repo", BS)


# -- finding 1: wrong bytes after gc ---------------------------------------------------------


def test_delete_gc_backup_with_a_long_lived_reader_reads_the_new_bytes(tmp_path, repo):
    """The exact scenario of finding 1 at the library level: the daemon's repository
    object (reader, descriptors, chunk cache) stays open across delete, gc and backup."""
    a = _image(tmp_path / "a.img", b"A")
    b = _image(tmp_path / "b.img", b"B")
    with Repository.open(repo) as w:
        pa = backup(w, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
    served_st = Stack.open(repo)
    served = served_st.repo
    try:
        disk = served_st.backup_disk(served.point("va@latest"), 0)
        assert disk.read(0, SIZE) == a
        old_packs = _pack_ids(repo)
        with Repository.open(repo) as w:
            w.delete_point(pa["id"])
            assert gc(w)["packs_removed"] == len(old_packs)
            backup(w, BackupSettings(vm="vb"), [str(tmp_path / "b.img")])
        assert not old_packs & _pack_ids(repo), "a new pack took the id of a pack gc removed"
        vb = served_st.backup_disk(served.point("vb@latest"), 0)
        assert vb.read(0, SIZE) == b
        assert b"".join(vb.readv(0, SIZE)) == b

        async def aread() -> bytes:
            return b"".join(bytes(x) for x in await vb.aread(0, SIZE))

        assert asyncio.run(aread()) == b
    finally:
        served_st.close()


def test_pack_ids_come_from_a_persisted_counter(tmp_path, repo):
    _image(tmp_path / "a.img", b"A")
    _image(tmp_path / "c.img", b"C")
    with Repository.open(repo) as r:
        p1 = backup(r, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
        first = _pack_ids(repo)
        assert (repo / "next-pack").read_text().strip() == str(max(first) + 1)
        r.delete_point(p1["id"])
        gc(r)
        assert _pack_ids(repo) == set()
        backup(r, BackupSettings(vm="vc"), [str(tmp_path / "c.img")])
        second = _pack_ids(repo)
        assert min(second) > max(first)
        # an allocation whose pack never got written (a crash) skips the id, never reuses it
        with r.lock("test"):
            skipped = r.allocate_pack_id()
            assert r.allocate_pack_id() == skipped + 1
        # a repository of an older instantnfs (no counter) starts after the highest id present
        (repo / "next-pack").unlink()
        with r.lock("test"):
            assert r.allocate_pack_id() == max(second) + 1


def test_a_pack_that_is_not_the_one_its_id_names_is_refused(tmp_path, repo):
    """Pack header: pack id, repository id and the uid recorded in the index are checked
    when the pack is opened."""
    _image(tmp_path / "a.img", b"A")
    with Repository.open(repo) as r:
        backup(r, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
    (pack,) = _pack_ids(repo)
    pack_path = repo / "packs" / f"{pack:08x}.pack"
    idx_path = repo / "packs" / f"{pack:08x}.idx"
    good_idx = idx_path.read_bytes()

    def read_fails(match: str) -> None:
        with Stack.open(repo) as r_st:
            r = r_st.repo
            with pytest.raises(IntegrityError, match=match):
                r_st.backup_disk(r.point("va@latest"), 0).read(0, SIZE)

    # the index names another uid (a different pack behind the same id)
    raw = bytearray(good_idx)
    raw[24:40] = bytes(16)
    idx_path.write_bytes(bytes(raw))
    read_fails("uid differs")
    idx_path.write_bytes(good_idx)
    # a pack of another repository, with the same id
    other = Repository.init(tmp_path / "other", BS)
    with Repository.open(other) as r:
        backup(r, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
    good_pack = pack_path.read_bytes()
    pack_path.write_bytes((other / "packs" / pack_path.name).read_bytes())
    idx_path.write_bytes((other / "packs" / idx_path.name).read_bytes())
    read_fails("another repository")
    pack_path.write_bytes(good_pack)
    idx_path.write_bytes(good_idx)
    with Stack.open(repo) as r_st:
        r = r_st.repo
        assert r_st.backup_disk(r.point("va@latest"), 0).read(0, SIZE) == b"A" * SIZE


def test_version_1_packs_and_indexes_stay_readable(tmp_path):
    from engine.repo.format import IDX_DTYPE, PACK_HEADER_V1, PACK_MAGIC, idx_bytes, read_idx_uid
    from engine.repo.packs import PackReader, compress_block, encode_record

    d = tmp_path / "packs"
    d.mkdir()
    block = os.urandom(BS // 2) * 2
    import blake3

    fp = blake3.blake3(block).digest()
    codec, payload = compress_block(block)
    rec = encode_record(codec, payload, BS, fp)
    (d / "00000007.pack").write_bytes(PACK_HEADER_V1.pack(PACK_MAGIC, 1, 7) + rec)
    entries = np.array([(fp, PACK_HEADER_V1.size, len(payload), BS)], dtype=IDX_DTYPE)
    (d / "00000007.idx").write_bytes(idx_bytes(7, entries))
    pack, back, uid = read_idx_uid(d / "00000007.idx")
    assert (pack, uid) == (7, None) and back.tobytes() == entries.tobytes()
    reader = PackReader(d, BS, repo_uid=os.urandom(16))
    try:
        assert reader.read_chunk(7, PACK_HEADER_V1.size, len(payload)) == block
    finally:
        reader.close()


def test_a_record_whose_content_does_not_match_its_fingerprint_is_an_integrity_error(tmp_path):
    from engine.repo.packs import PackReader, PackWriter, compress_block, record_header

    d = tmp_path / "packs"
    d.mkdir()
    ids = iter(range(1, 10))
    uid = os.urandom(16)
    w = PackWriter(d, lambda: next(ids), uid)
    block = b"x" * BS
    codec, payload = compress_block(block)
    # a valid CRC over a wrong fingerprint: only the BLAKE3 check of the result sees it
    pack, off, clen = w.append(record_header(codec, payload, BS, bytes(32)), payload, bytes(32))
    w.seal()
    reader = PackReader(d, BS, uid)
    try:
        with pytest.raises(IntegrityError, match="does not match its fingerprint"):
            reader.read_chunk(pack, off, clen)
    finally:
        reader.close()


def test_a_pack_removed_by_gc_is_closed_and_its_cache_entries_dropped(tmp_path, repo):
    a = _image(tmp_path / "a.img", b"A")
    b = _image(tmp_path / "b.img", b"B")
    with Repository.open(repo) as w:
        pa = backup(w, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
        backup(w, BackupSettings(vm="vb"), [str(tmp_path / "b.img")])
    (apack,) = {e for e in _pack_ids(repo) if e == min(_pack_ids(repo))}
    apath = repo / "packs" / f"{apack:08x}.pack"
    served_st = Stack.open(repo)
    served = served_st.repo
    try:
        assert served_st.backup_disk(served.point("va@latest"), 0).read(0, SIZE) == a
        assert _fds_to(apath) == 1
        with Repository.open(repo) as w:
            w.delete_point(pa["id"])
            gc(w)
        assert not apath.exists()
        served.reader._next_sweep = 0.0  # the sweep is due (it runs every few seconds)
        assert served_st.backup_disk(served.point("vb@latest"), 0).read(0, SIZE) == b
        assert _fds_to(apath) == 0, "the daemon keeps a pack gc deleted open: its space is never freed"
        assert not served.reader.is_open(apack)
        assert served.reader.closed_deleted == 1
        assert not [k for k in served_st.cache._lru if k >> 40 == apack]
    finally:
        served_st.close()


def test_an_idle_reader_closes_a_pack_removed_by_gc(tmp_path, repo, monkeypatch):
    """No read after gc: the sweeper thread frees the space anyway."""
    import time

    from engine.repo import packs

    a = _image(tmp_path / "a.img", b"A")
    with Repository.open(repo) as w:
        pa = backup(w, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
    (apack,) = _pack_ids(repo)
    apath = repo / "packs" / f"{apack:08x}.pack"
    monkeypatch.setattr(packs, "SWEEP_INTERVAL", 0.05)
    with Stack.open(repo) as served_st:
        served = served_st.repo
        assert served_st.backup_disk(served.point(pa["id"]), 0).read(0, SIZE) == a
        assert _fds_to(apath) == 1
        with Repository.open(repo) as w:
            w.delete_point(pa["id"])
            gc(w)
        deadline = time.monotonic() + 10
        while _fds_to(apath) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _fds_to(apath) == 0


def test_a_pack_is_never_closed_under_a_read_in_progress(tmp_path, repo):
    """The sweep marks a deleted pack dead; its descriptor closes after the last read."""
    _image(tmp_path / "a.img", b"A")
    with Repository.open(repo) as w:
        backup(w, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
    (pack,) = _pack_ids(repo)
    with Repository.open(repo) as r:
        h = r.reader._acquire(pack)
        (repo / "packs" / f"{pack:08x}.pack").unlink()
        assert r.reader.sweep() == [pack]
        os.fstat(h.fd)  # still open: a pread in progress would not hit a reused descriptor
        r.reader._release(h)
        with pytest.raises(OSError):
            os.fstat(h.fd)


# -- the event loop never opens a pack nor calls fadvise -------------------------------------


def test_reads_on_the_event_loop_never_open_packs_or_fadvise(tmp_path, repo, monkeypatch):
    img = tmp_path / "r.img"
    img.write_bytes(os.urandom(40 * BS))
    with Repository.open(repo) as w:
        backup(w, BackupSettings(vm="vr"), [str(img)])
    data = img.read_bytes()
    calls: list[tuple[str, int]] = []
    real_open, real_fadvise = os.open, os.posix_fadvise

    def spy_open(path, *a, **kw):
        if str(path).endswith((".pack", ".idx")):
            calls.append(("open", threading.get_ident()))
        return real_open(path, *a, **kw)

    def spy_fadvise(*a, **kw):
        calls.append(("fadvise", threading.get_ident()))
        return real_fadvise(*a, **kw)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "posix_fadvise", spy_fadvise)
    with Stack.open(repo) as r_st:
        r = r_st.repo
        disk = r_st.backup_disk(r.point("vr@latest"), 0)

        async def main() -> int:
            loop_thread = threading.get_ident()
            out = bytearray()
            for off in range(0, len(data), 64 * 1024):
                out += b"".join(bytes(x) for x in await disk.aread(off, 64 * 1024))
            assert bytes(out) == data
            return loop_thread

        loop_thread = asyncio.run(main())
    assert calls, "the spies saw nothing: the test does not test anything"
    assert not [c for c in calls if c[1] == loop_thread], f"on the event loop: {sorted({c[0] for c in calls if c[1] == loop_thread})}"


def test_a_warm_disk_sends_no_readahead_hints(tmp_path, repo, monkeypatch):
    """Readahead hints (fadvise WILLNEED, in the executor) are for chunks not decompressed
    yet: once every chunk is cached a sequential reader costs no hint at all (they had
    become 15 % of the daemon's samples under 4 KiB reads)."""
    img = tmp_path / "w.img"
    img.write_bytes(os.urandom(40 * BS))
    with Repository.open(repo) as w:
        backup(w, BackupSettings(vm="vw"), [str(img)])
    data = img.read_bytes()
    with Stack.open(repo) as r_st:
        r = r_st.repo
        disk = r_st.backup_disk(r.point("vw@latest"), 0)
        assert disk.read(0, len(data)) == data  # the first pass decompresses (and may hint)
        fadvised: list[int] = []
        real = os.posix_fadvise
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (fadvised.append(off), real(fd, off, n, advice)))
        disk2 = r_st.backup_disk(r.point("vw@latest"), 0)  # a new reader of the same cache
        for off in range(0, len(data), 4096):
            assert disk2.read(off, 4096) == data[off : off + 4096]
        r_st.executor.submit(lambda: None).result(timeout=10)  # queued hint tasks have run
    assert fadvised == []


# -- finding 7: restore ignores short writes --------------------------------------------------


def test_restore_writes_everything_despite_short_writes(tmp_path, repo, monkeypatch):
    from engine.repo.restore import restore_disk

    img = tmp_path / "s.img"
    img.write_bytes(os.urandom(3 * BS) + bytes(BS) + os.urandom(BS // 2))
    with Repository.open(repo) as w:
        backup(w, BackupSettings(vm="vs"), [str(img)])
    real = os.pwrite
    short = []

    def half(fd: int, data, offset: int) -> int:
        view = memoryview(data)
        if len(view) > 1:
            short.append(len(view))
            view = view[: len(view) // 2]
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", half)
    with Stack.open(repo) as stack:
        point = stack.repo.point("vs@latest")
        restore_disk(point, stack.backup_disk(point, 0), str(tmp_path / "out.img"))
    assert short
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()


# -- finding 13: a live pack with a broken index is damage, not garbage -------------------------


def test_check_calls_a_live_pack_with_a_truncated_index_damage(tmp_path, repo):
    _image(tmp_path / "a.img", b"A")
    dead = tmp_path / "d.img"
    dead.write_bytes(os.urandom(SIZE))
    with Repository.open(repo) as w:
        pa = backup(w, BackupSettings(vm="va"), [str(tmp_path / "a.img")])
        pd = backup(w, BackupSettings(vm="vd"), [str(dead)])
        w.delete_point(pd["id"])
    live, unused = sorted(_pack_ids(repo))
    for p in (live, unused):
        idx = repo / "packs" / f"{p:08x}.idx"
        idx.write_bytes(idx.read_bytes()[:40])
    r = run("repo", "check", "--repo", repo)
    assert r.rc == 1, r.out
    live_lines = [ln for ln in r.out.splitlines() if f"{live:08x}.pack" in ln]
    assert live_lines and not [ln for ln in live_lines if ln.startswith("garbage")], r.out
    assert any(pa["id"] in ln and ln.startswith("ERROR") for ln in live_lines), r.out
    assert any(ln.startswith("garbage") for ln in r.out.splitlines() if f"{unused:08x}.pack" in ln), r.out
    doc = run("repo", "check", "--repo", repo, "--json").json()
    assert not doc["ok"] and any(pa["id"] in e for e in doc["errors"])
    assert not any(f"{live:08x}" in g for g in doc["garbage"])


# -- finding 1 end to end: a real daemon -----------------------------------------------------


def test_daemon_serves_the_new_backup_after_delete_gc_backup(tmp_path):
    from engine.nfs.client import NFSClient
    from tests.nfs.conftest import Daemon, give_address, take_address

    repo = Repository.init(tmp_path / "repo", BS)
    a = _image(tmp_path / "a.img", b"A")
    b = _image(tmp_path / "b.img", b"B")
    pa = ok("backup", "--repo", repo, "--vm", "va", "--json", "-q", tmp_path / "a.img").json()
    addr = take_address()
    dmn = Daemon(repo, tmp_path / "cache", addr)

    async def read_disk(session: str, disk: str) -> bytes:
        c = await NFSClient.connect(dmn.addr, dmn.mount_port, dmn.nfs_port)
        try:
            sess = await c.mount(f"/instantnfs/{session}")
            fh = await c.lookup(sess, f"{disk}.img")
            return await c.read_all(fh)
        finally:
            await c.close()

    try:
        dmn.start()
        dmn.api("POST", "/sessions", {"point": pa["id"], "name": "sa"})
        assert asyncio.run(read_disk("sa", pa["disks"][0]["name"])) == a
        dmn.api("DELETE", "/sessions/sa")
        ok("points", "delete", "--repo", repo, pa["id"])
        gcout = ok("repo", "gc", "--repo", repo, "--json").json()
        assert gcout["packs_removed"] >= 1
        pb = ok("backup", "--repo", repo, "--vm", "vb", "--json", "-q", tmp_path / "b.img").json()
        dmn.api("POST", "/sessions", {"point": "vb@latest", "name": "sb"})
        assert asyncio.run(read_disk("sb", pb["disks"][0]["name"])) == b
        out = tmp_path / "restored.img"
        ok("restore", "--repo", repo, "vb@latest", "0", "-o", out, "-q")
        assert out.read_bytes() == b
    finally:
        dmn.stop()
        give_address(addr)


def test_points_delete_force_unpublishes_through_the_daemon(tmp_path):
    from engine.repo.pins import list_pins
    from tests.nfs.conftest import Daemon, give_address, take_address

    repo = Repository.init(tmp_path / "repo", BS)
    _image(tmp_path / "a.img", b"A")
    pa = ok("backup", "--repo", repo, "--vm", "va", "--json", "-q", tmp_path / "a.img").json()
    addr = take_address()
    dmn = Daemon(repo, tmp_path / "cache", addr)
    try:
        dmn.start()
        s = dmn.api("POST", "/sessions", {"point": pa["id"], "name": "forceme"})
        with Repository.open(repo) as r:  # publish pinned the point, naming the session and its sid
            assert [(p.point, p.session, p.sid) for p in list_pins(r)] == [(pa["id"], "forceme", s["sid"])]
        res = run("points", "delete", "--repo", repo, pa["id"])
        assert res.rc != 0 and "forceme" in res.err
        dead = run("points", "delete", "--repo", repo, pa["id"], "--force", "--server", "http://127.0.0.1:9")
        assert dead.rc != 0 and "not deleted" in dead.err
        ok("points", "delete", "--repo", repo, pa["id"], "--force", "--server", dmn.url)
        assert [x["name"] for x in dmn.api("GET", "/sessions")] == []
        with Repository.open(repo) as r:
            assert r.points() == [] and list_pins(r) == []
    finally:
        dmn.stop()
        give_address(addr)


def test_state_json_shape_the_pins_rely_on(tmp_path):
    """stale_pins reads the daemon's state.json: keep the fields it uses in sight."""
    from engine.repo.pins import Pin, pin_is_stale

    cache = tmp_path / "c"
    cache.mkdir()
    pin = Pin("p1", "s", 3, "ab", str(cache), socket.gethostname(), 1, "t")
    (cache / "state.json").write_text(json.dumps({"format": 1, "secret": "00", "next_sid": 4,
                                                  "sessions": [{"name": "s", "sid": 3, "point": "p1"}]}))
    assert not pin_is_stale(pin)
