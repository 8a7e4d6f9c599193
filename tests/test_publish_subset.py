"""Instant disk recovery (``publish --disk``) and sessions with a time to live, at the
datastore: one disk of a two-disk point published alone, its cache named by the point's
disk index, kept across a restart with its writes; ``ttl`` listed by ``expired`` and
kept across a restart; bad disk names and ttls refused."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.datastore import Datastore
from engine.errors import NotFound, SessionError
from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack
from tests.images import make_image

BLOCK = 256 << 10


@pytest.fixture
def two_disks(tmp_path: Path) -> dict:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    da = make_image(a, ["random", "zero", "text"], BLOCK, seed=1)
    db = make_image(b, ["text", "random"], BLOCK, seed=2)
    repo = Repository.init(tmp_path / "repo", BLOCK)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="two"), [str(a), str(b)])
    return {"repo": repo, "point": m["id"], "data": [da, db], "names": [d["name"] for d in m["disks"]]}


def _ds(stack: Stack, tmp_path: Path) -> Datastore:
    ds = Datastore(stack, tmp_path / "cache", reserve=0)
    ds.load()
    return ds


def test_one_disk_published_alone_survives_a_restart(two_disks: dict, tmp_path: Path) -> None:
    second = two_disks["names"][1]
    with Stack.open(two_disks["repo"]) as stack:
        ds = _ds(stack, tmp_path)
        s = ds.publish(two_disks["point"], "only-b", disks=[second])
        assert [d.name for d in s.disks] == [second]
        assert s.point_indexes == [1]
        assert s.caches[0].path == s.cache_path(1)
        assert s.caches[0].read(0, BLOCK) == two_disks["data"][1][:BLOCK]
        s.caches[0].write(5, b"written")
        s.caches[0].commit()
        vmx = (s.dir / "two.vmx").read_text()
        assert f'{second}.vmdk' in vmx and f'{two_disks["names"][0]}.vmdk' not in vmx
        assert sorted(p.name for p in s.dir.glob("*.vmdk")) == [f"{second}.vmdk"]
        ds.close()
        ds2 = _ds(stack, tmp_path)
        s2 = ds2.sessions["only-b"]
        assert s2.point_indexes == [1]
        assert s2.caches[0].read(0, 12) == two_disks["data"][1][:5] + b"written"
        ds2.unpublish("only-b")
        ds2.close()


def test_disk_by_index_and_bad_names(two_disks: dict, tmp_path: Path) -> None:
    with Stack.open(two_disks["repo"]) as stack:
        ds = _ds(stack, tmp_path)
        s = ds.publish(two_disks["point"], "by-index", disks=["0"])
        assert [d.name for d in s.disks] == [two_disks["names"][0]]
        with pytest.raises(NotFound, match="no disk 'nope'"):
            ds.publish(two_disks["point"], "bad", disks=["nope"])
        with pytest.raises(NotFound):
            ds.publish(two_disks["point"], "bad", disks=["2"])
        with pytest.raises(SessionError, match="twice"):
            ds.publish(two_disks["point"], "bad", disks=["0", two_disks["names"][0]])
        assert "bad" not in ds.sessions
        ds.close()


def test_ttl_expires_and_is_kept_across_a_restart(two_disks: dict, tmp_path: Path) -> None:
    with Stack.open(two_disks["repo"]) as stack:
        ds = _ds(stack, tmp_path)
        t0 = time.time()
        ds.publish(two_disks["point"], "short", ttl=60)
        ds.publish(two_disks["point"], "long", ttl=3600)
        ds.publish(two_disks["point"], "forever")
        assert ds.registry.expired(t0) == []
        assert ds.registry.expired(t0 + 120) == ["short"]
        assert ds.registry.expired(t0 + 7200) == ["long", "short"]
        with pytest.raises(SessionError, match="more than 0"):
            ds.publish(two_disks["point"], "neg", ttl=0)
        ds.close()
        ds2 = _ds(stack, tmp_path)
        assert ds2.registry.expired(t0 + 120) == ["short"]
        assert ds2.sessions["forever"].expires is None
        for n in ("short", "long", "forever"):
            ds2.unpublish(n)
        ds2.close()
