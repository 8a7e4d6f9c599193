"""Pins: a published restore point cannot be deleted, and gc keeps its chunks (issue 8
finding 2); stale pins are listed by repo check and removable."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from engine.errors import NotFound, PointPinned
from engine.repo.check import gc
from engine.repo.ingest import BackupSettings, backup
from engine.repo.pins import Pin, add_pin, list_pins, remove_pin, stale_pins
from engine.repo.repository import Repository
from engine.stack import Stack
from tests.cli import ok, run

BS = 256 * 1024
HOST = socket.gethostname()


def _pin(point: str, session: str = "s1", sid: int = 1, daemon: str = "d00d", cache_dir: str = "/nonexistent",
         host: str = HOST) -> Pin:
    return Pin(point, session, sid, daemon, cache_dir, host, os.getpid(), "2026-11-30T00:00:00Z")


def _state(cache: Path, *sessions: tuple[str, int]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "state.json").write_text(json.dumps({
        "format": 1, "secret": "00" * 32, "next_sid": 9,
        "sessions": [{"name": n, "sid": s, "point": "x", "created_ns": 0, "mode": "instant", "cache_parent": str(cache)}
                     for n, s in sessions],
    }))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return Repository.init(tmp_path / "repo", BS)


def _backup(repo: Path, tmp: Path, vm: str, data: bytes) -> str:
    img = tmp / f"{vm}.img"
    img.write_bytes(data)
    with Repository.open(repo) as r:
        return backup(r, BackupSettings(vm=vm), [str(img)])["id"]


def test_add_list_remove_and_stale(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(2 * BS))
    p2 = _backup(repo, tmp_path, "vb", os.urandom(2 * BS))
    live_cache, gone_cache = tmp_path / "live", tmp_path / "gone"
    _state(live_cache, ("s1", 1))
    with Repository.open(repo) as r:
        live = _pin(p1, "s1", 1, "aa11", str(live_cache))
        add_pin(r, live)
        add_pin(r, live)  # idempotent
        wrong_sid = _pin(p1, "s1", 2, "bb22", str(live_cache))
        gone = _pin(p2, "old", 5, "cc33", str(gone_cache))
        elsewhere = _pin(p2, "far", 1, "dd44", str(gone_cache), host=HOST + "-not-this-one")
        for p in (wrong_sid, gone, elsewhere):
            add_pin(r, p)
        assert list_pins(r, p1) == [live, wrong_sid]
        assert len(list_pins(r)) == 4
        assert set(stale_pins(r)) == {wrong_sid, gone}  # other hosts' pins are not judged
        with pytest.raises(NotFound):
            add_pin(r, _pin("20990101T000000Z-000000"))
        remove_pin(r, p1, "bb22", "s1")
        remove_pin(r, p1, "bb22", "s1")  # idempotent
        assert list_pins(r, p1) == [live]
        # the daemon goes away: its pin turns stale
        (live_cache / "state.json").unlink()
        assert live in stale_pins(r)


def test_an_unreadable_pin_file_still_protects_its_point(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(BS))
    with Repository.open(repo) as r:
        add_pin(r, _pin(p1, "s1", 1, "ab"))
        (path,) = (repo / "pins").glob("*.pin")
        path.write_text("{not json")
        (pin,) = list_pins(r)
        assert (pin.point, pin.daemon, pin.session) == (p1, "ab", "s1")
        with pytest.raises(PointPinned):
            r.delete_point(p1)
        assert stale_pins(r) == []  # cannot be judged: never called stale


def test_points_delete_of_a_pinned_point_is_refused_naming_the_session(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(BS))
    with Repository.open(repo) as r:
        add_pin(r, _pin(p1, "nightly-web", 3, "beef"))
    res = run("points", "delete", "--repo", repo, p1)
    assert res.rc != 0
    assert "nightly-web" in res.err and "beef" in res.err and res.err.count("\n") == 1
    pts = ok("points", "--repo", repo, "--json").json()
    assert [p["id"] for p in pts] == [p1] and pts[0]["pinned_by"][0]["session"] == "nightly-web"
    assert "nightly-web" in ok("points", "--repo", repo).out
    with Repository.open(repo) as r:
        remove_pin(r, p1, "beef", "nightly-web")
    ok("points", "delete", "--repo", repo, p1)
    assert ok("points", "--repo", repo, "--json").json() == []


def test_publish_does_not_wait_for_the_writer_lock(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(BS))
    fd = os.open(repo / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a backup running for an hour
        with Repository.open(repo) as r:
            add_pin(r, _pin(p1))
            assert list_pins(r) == [_pin(p1)]
            remove_pin(r, p1, "d00d", "s1")
    finally:
        os.close(fd)


def test_add_pin_and_delete_point_race(tmp_path, repo):
    """Whatever the interleaving, a pin never names a deleted point."""
    rounds = 12
    points = [_backup(repo, tmp_path, f"v{i}", os.urandom(BS)) for i in range(rounds)]
    outcomes = {"pinned": 0, "deleted": 0}
    with Repository.open(repo) as r:
        for i, point in enumerate(points):
            barrier = threading.Barrier(2)
            result: dict[str, object] = {}

            def pinner(point=point, barrier=barrier, result=result, i=i) -> None:
                barrier.wait()
                try:
                    add_pin(r, _pin(point, f"s{i}"))
                    result["pin"] = True
                except NotFound:
                    result["pin"] = False

            def deleter(point=point, barrier=barrier, result=result) -> None:
                barrier.wait()
                try:
                    r.delete_point(point)
                    result["deleted"] = True
                except PointPinned:
                    result["deleted"] = False

            threads = [threading.Thread(target=pinner), threading.Thread(target=deleter)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert result["pin"] != result["deleted"], result  # exactly one of them won
            exists = (repo / "points" / point / "manifest.json").is_file()
            pins = list_pins(r, point)
            assert bool(pins) == exists, (point, pins, exists)
            outcomes["pinned" if exists else "deleted"] += 1
    assert sum(outcomes.values()) == rounds


def test_gc_keeps_the_chunks_of_a_pinned_point_even_half_deleted(tmp_path, repo):
    data = os.urandom(3 * BS)
    p1 = _backup(repo, tmp_path, "va", data)
    with Stack.open(repo) as r_st:
        r = r_st.repo
        add_pin(r, _pin(p1))
        with pytest.raises(PointPinned):
            r.delete_point(p1)
        gc(r)
        assert r_st.backup_disk(r.point(p1), 0).read(0, len(data)) == data
        # a crash half way through a delete (it cannot happen to a pinned point through
        # delete_point, but gc must not rely on that): the point sits in tmp/
        os.rename(repo / "points" / p1, repo / "tmp" / f"deleted-{p1}")
        out = gc(r)
        assert out["packs_removed"] == 0 and out["chunks_removed"] == 0
        assert (repo / "tmp" / f"deleted-{p1}").is_dir()
        os.rename(repo / "tmp" / f"deleted-{p1}", repo / "points" / p1)
    with Stack.open(repo) as r_st:
        r = r_st.repo
        assert r_st.backup_disk(r.point(p1), 0).read(0, len(data)) == data


def test_repo_check_lists_stale_pins_and_unpin_removes_them(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(BS))
    live_cache = tmp_path / "live"
    _state(live_cache, ("web", 4))
    with Repository.open(repo) as r:
        add_pin(r, _pin(p1, "web", 4, "aaaa", str(live_cache)))
        add_pin(r, _pin(p1, "gone", 2, "bbbb", str(tmp_path / "nothing-here")))
    doc = ok("repo", "check", "--repo", repo, "--json").json()
    assert doc["ok"]
    assert {p["session"] for p in doc["pins"]} == {"web", "gone"}
    assert [p["session"] for p in doc["stale_pins"]] == ["gone"]
    text = ok("repo", "check", "--repo", repo).out
    assert "STALE PIN" in text and "gone" in text and "repo unpin" in text
    # a live pin is not removed without --force
    res = run("repo", "unpin", "--repo", repo, p1, "--session", "web")
    assert res.rc != 0 and "live" in res.err
    ok("repo", "unpin", "--repo", repo, p1, "--session", "gone")
    doc = ok("repo", "check", "--repo", repo, "--json").json()
    assert doc["stale_pins"] == [] and [p["session"] for p in doc["pins"]] == ["web"]
    ok("repo", "unpin", "--repo", repo, p1, "--session", "web", "--force")
    ok("points", "delete", "--repo", repo, p1)


def test_repo_check_remove_stale_pins_keeps_live_ones(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(BS))
    live_cache = tmp_path / "live"
    _state(live_cache, ("web", 4))
    with Repository.open(repo) as r:
        add_pin(r, _pin(p1, "web", 4, "aaaa", str(live_cache)))
        add_pin(r, _pin(p1, "gone", 2, "bbbb", str(tmp_path / "nothing-here")))
    doc = ok("repo", "check", "--repo", repo, "--json", "--remove-stale-pins").json()
    assert [p["session"] for p in doc["removed_pins"]] == ["gone"]
    with Repository.open(repo) as r:
        assert [p.session for p in list_pins(r)] == ["web"]
    assert "removed stale pin" not in ok("repo", "check", "--repo", repo, "--remove-stale-pins").out


def test_old_repository_without_pins_dir(tmp_path, repo):
    p1 = _backup(repo, tmp_path, "va", os.urandom(BS))
    shutil.rmtree(repo / "pins", ignore_errors=True)
    with Repository.open(repo) as r:
        assert list_pins(r) == [] and stale_pins(r) == []
        add_pin(r, _pin(p1))
        assert (repo / "pins").is_dir() and len(list_pins(r)) == 1
