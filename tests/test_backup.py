"""The backup command and the repository's life cycle, through the command line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.repo.repository import Repository
from engine.stack import Stack
from tests.cli import ok, run
from tests.conftest import require, require_tool
from tests.images import make_image, sha256_tree

BS = 256 * 1024


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    ok("repo", "init", path, "--block-size", "256K")
    return path


def restore_bytes(repo: Path, point: str, disk: str, tmp: Path) -> bytes:
    out = tmp / f"restored-{point}-{disk}.img"
    ok("restore", "--repo", repo, point, disk, "-o", out, "--force", "-q")
    return out.read_bytes()


def test_init_refuses_non_empty_and_bad_block_size(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hi")
    r = run("repo", "init", tmp_path / "x")
    assert r.rc != 0 and "not empty" in r.err and r.err.count("\n") == 1
    r = run("repo", "init", tmp_path / "y", "--block-size", "3M")
    assert r.rc != 0 and "power of two" in r.err
    r = run("repo", "init", tmp_path / "z", "--block-size", "8M")
    assert r.rc != 0 and "256K to 4M" in r.err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_full_then_second_backup_stores_only_new_chunks(tmp_path, repo):
    src = tmp_path / "d.img"
    first = make_image(src, ["random", "text", "hole", "repeat", "repeat", "zero", "text"], BS, tail=4096, seed=1)
    r1 = ok("backup", "--repo", repo, "--vm", "web", "--cpus", "2", "--memory", "2048", "--json", src).json()
    assert r1["logical_bytes"] == len(first) and r1["new_chunks"] > 0 and r1["parent"] is None
    # change two blocks, back up again
    with open(src, "r+b") as f:
        f.seek(1 * BS + 10)
        f.write(b"changed!")
        f.seek(2 * BS)
        f.write(os.urandom(BS))
    second = src.read_bytes()
    r2 = ok("backup", "--repo", repo, "--vm", "web", "--json", src).json()
    assert r2["new_chunks"] == 2 and r2["parent"] == r1["id"]
    assert restore_bytes(repo, r1["id"], "0", tmp_path) == first
    assert restore_bytes(repo, r2["id"], "web", tmp_path) == second
    pts = ok("points", "--repo", repo, "--json").json()
    assert [p["id"] for p in pts] == [r1["id"], r2["id"]]
    assert pts[0]["cpus"] == 2 and pts[0]["memory_mib"] == 2048
    assert ok("points", "--repo", repo, "--vm", "nope", "--json").json() == []


def test_changed_extents_read_only_those_regions(tmp_path, repo):
    src = tmp_path / "d.img"
    make_image(src, ["text"] * 8, BS, seed=2)
    r1 = ok("backup", "--repo", repo, "--vm", "db", "--json", src).json()
    with open(src, "r+b") as f:
        f.seek(3 * BS + 100)
        f.write(b"A" * 5000)
        # a change the CBT list does not mention must not be picked up (proves only extents are read)
        f.seek(6 * BS)
        f.write(b"B" * 100)
    cbt = tmp_path / "cbt.txt"
    cbt.write_text(f"# changed since {r1['id']}\n{3 * BS + 100} 5000\n")
    r2 = ok("backup", "--repo", repo, "--vm", "db", "--changed-extents", cbt, "--json", src).json()
    assert r2["read_bytes"] == BS and r2["new_chunks"] == 1
    now = src.read_bytes()
    expect = now[: 6 * BS] + restore_bytes(repo, r1["id"], "0", tmp_path)[6 * BS : 6 * BS + 100] + now[6 * BS + 100 :]
    assert restore_bytes(repo, r2["id"], "0", tmp_path) == expect


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 100\n50 100\n", "overlaps"),
        (f"{BS} 10\n0 10\n", "not sorted"),
        (f"{8 * BS - 5} 10\n", "past the end"),
        ("12\n", "expected 'offset length'"),
        ("x 10\n", "integers"),
        ("10 0\n", "length > 0"),
    ],
)
def test_bad_changed_extents_rejected(tmp_path, repo, text, message):
    src = tmp_path / "d.img"
    make_image(src, ["text"] * 8, BS, seed=3)
    ok("backup", "--repo", repo, "--vm", "db", "-q", src)
    cbt = tmp_path / "cbt.txt"
    cbt.write_text(text)
    before = sha256_tree(repo)
    r = run("backup", "--repo", repo, "--vm", "db", "--changed-extents", cbt, src)
    assert r.rc != 0 and message in r.err and "line" in r.err
    assert len(ok("points", "--repo", repo, "--json").json()) == 1
    assert sha256_tree(repo) == before


def test_changed_extents_need_a_parent(tmp_path, repo):
    src = tmp_path / "d.img"
    make_image(src, ["text"] * 2, BS)
    cbt = tmp_path / "cbt.txt"
    cbt.write_text("0 10\n")
    r = run("backup", "--repo", repo, "--vm", "new", "--changed-extents", cbt, src)
    assert r.rc != 0 and "previous restore point" in r.err


def test_multi_disk_and_points_delete_and_gc(tmp_path, repo):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    da = make_image(a, ["random", "text"], BS, seed=10)
    db = make_image(b, ["random", "hole", "text"], BS, seed=11)
    r1 = ok("backup", "--repo", repo, "--vm", "two disks", "--json", a, b).json()
    assert [d["name"] for d in r1["disks"]] == ["two_disks", "two_disks_1"]
    make_image(a, ["random", "random"], BS, seed=12)
    r2 = ok("backup", "--repo", repo, "--vm", "two disks", "--json", a, b).json()
    assert restore_bytes(repo, r1["id"], "two_disks_1", tmp_path) == db
    ok("points", "delete", "--repo", repo, r1["id"][:20])
    packs_before = sum(p.stat().st_blocks for p in (repo / "packs").glob("*.pack"))
    g = ok("repo", "gc", "--repo", repo, "--json").json()
    assert g["chunks_removed"] >= 2  # the first point's own blocks of disk a
    assert sum(p.stat().st_blocks for p in (repo / "packs").glob("*.pack")) < packs_before
    assert restore_bytes(repo, r2["id"], "1", tmp_path) == db
    assert ok("repo", "check", "--repo", repo, "--verify-data", "--json").json()["ok"]
    assert ok("repo", "gc", "--repo", repo, "--json").json()["chunks_removed"] == 0
    r = run("restore", "--repo", repo, r1["id"], "0", "-o", tmp_path / "gone.img")
    assert r.rc != 0 and "no restore point" in r.err
    assert restore_bytes(repo, r2["id"], "0", tmp_path) != da


def test_corrupt_chunk_is_an_integrity_error_and_check_names_it(tmp_path, repo):
    src = tmp_path / "d.img"
    data = make_image(src, ["text", "random", "text", "repeat", "repeat"], BS, seed=20)
    pid = ok("backup", "--repo", repo, "--vm", "vm", "--json", src).json()["id"]
    with Repository.open(repo) as r:
        pack, clen, rec = r.point(pid).open_blockmap(0).entry(3)
    pack_path = repo / "packs" / f"{pack:08x}.pack"
    raw = bytearray(pack_path.read_bytes())
    raw[rec + 52 + clen // 2] ^= 0x40
    pack_path.write_bytes(raw)
    with Stack.open(repo) as r_st:
        r = r_st.repo
        disk = r_st.backup_disk(r.point(pid), 0)
        from engine.errors import IntegrityError

        with pytest.raises(IntegrityError, match=rf"pack {pack:08x}.pack offset {rec}: checksum mismatch"):
            disk.read(3 * BS + 5, 10)
        with pytest.raises(IntegrityError):
            disk.read(4 * BS, 10)  # the same chunk (repeated block)
        for i in (0, 1, 2):
            assert disk.read(i * BS, BS) == data[i * BS : (i + 1) * BS]
    r = run("repo", "check", "--repo", repo, "--verify-data", "--json")
    assert r.rc == 1
    report = r.json()
    assert not report["ok"] and len(report["bad_chunks"]) == 1
    bad = report["bad_chunks"][0]
    assert bad["offset"] == rec and "checksum" in bad["error"]
    assert sorted(u["disk_offset"] for u in bad["used_by"]) == [3 * BS, 4 * BS]
    assert {u["point"] for u in bad["used_by"]} == {pid}
    text = run("repo", "check", "--repo", repo, "--verify-data")
    assert text.rc == 1 and f"at offset {3 * BS}" in text.out and "DAMAGED" in text.out
    assert run("repo", "check", "--repo", repo).rc == 0  # structure alone is fine
    r = run("restore", "--repo", repo, pid, "0", "-o", tmp_path / "out.img")
    assert r.rc == 3 and "checksum mismatch" in r.err


def test_bad_sources_give_one_line_errors(tmp_path, repo):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a disk\n")
    empty = tmp_path / "empty.img"
    empty.touch()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (tmp_path / "missing.img", "no such file"),
        (text, "not a disk image"),
        (empty, "empty"),
        (tmp_path, "is a directory"),
        (fifo, "neither a regular file nor a block device"),
    ]
    before = sha256_tree(repo)
    for path, msg in cases:
        r = run("backup", "--repo", repo, "--vm", "vm", path)
        assert r.rc != 0, path
        assert msg in r.err and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert sha256_tree(repo) == before
    assert not list((repo / "points").iterdir())


def test_unreadable_source(tmp_path, repo):
    require(os.geteuid() == 0 and subprocess.run(["which", "setpriv"], capture_output=True).returncode == 0,
            "needs root and setpriv to run the CLI as an unprivileged user")
    src = tmp_path / "secret.img"
    make_image(src, ["text"], BS)
    src.chmod(0o600)
    for p in (tmp_path, repo, *repo.rglob("*")):
        p.chmod(0o777 if p.is_dir() else 0o666)
    project = Path(__file__).resolve().parent.parent
    # the unprivileged user must reach the interpreter, the project and the repository
    # (a clone under /root is not): let it traverse their parents for this test only
    changed = []
    for path in (Path(sys.executable), project, tmp_path):
        for d in path.resolve().parents:
            mode = d.stat().st_mode
            if not mode & 0o001:
                d.chmod(mode | 0o001)
                changed.append((d, mode))
    try:
        p = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "engine.control.cli", "backup", "--repo", str(repo), "--vm", "vm", str(src)],
            capture_output=True, text=True, cwd=project,
        )
    finally:
        for d, mode in reversed(changed):
            d.chmod(mode)
    assert p.returncode != 0 and "Permission denied" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "secret.img" in p.stderr


def test_unknown_repository_version_and_missing_repo(tmp_path, repo):
    cfg = repo / "config.json"
    cfg.write_text(cfg.read_text().replace('"version": 1', '"version": 9'))
    r = run("points", "--repo", repo)
    assert r.rc != 0 and "format version 9" in r.err
    r = run("points", "--repo", tmp_path / "nothing")
    assert r.rc != 0 and "no instantnfs repository" in r.err


def test_qcow2_source_through_qemu_img(tmp_path, repo):
    require_tool("qemu-img", "qemu-io")
    q = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xab 1M 300k", "-c", "write -P 0x11 5M 4k", q], check=True, capture_output=True)
    raw = tmp_path / "expect.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", q, raw], check=True)
    r = ok("backup", "--repo", repo, "--vm", "q", "--json", q).json()
    assert r["logical_bytes"] == 8 << 20
    assert restore_bytes(repo, r["id"], "0", tmp_path) == raw.read_bytes()
    pts = ok("points", "--repo", repo, "--json").json()
    assert not list((repo / "tmp").iterdir())  # the temporary raw conversion is gone
    assert pts[0]["disks"][0]["size"] == 8 << 20


def test_full_disk_during_backup_commits_nothing(tmp_path):
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
    try:
        repo = mnt / "repo"
        ok("repo", "init", repo, "--block-size", "256K")
        src = tmp_path / "big.img"
        make_image(src, ["random"] * 24, BS, seed=30)  # 6 MiB of incompressible data
        r = run("backup", "--repo", repo, "--vm", "vm", src)
        assert r.rc != 0 and "no space left" in r.err and "nothing was committed" in r.err
        assert r.err.count("\n") == 1
        assert not list((repo / "points").iterdir())
        assert not list((repo / "packs").iterdir())  # its own partial pack was removed
        small = tmp_path / "small.img"
        data = make_image(small, ["text"] * 2, BS, seed=31)
        pid = ok("backup", "--repo", repo, "--vm", "vm", "--json", small).json()["id"]
        assert restore_bytes(repo, pid, "0", tmp_path) == data
    finally:
        subprocess.run(["umount", "-l", mnt])


def test_writer_lock_names_the_holder(tmp_path, repo):
    with Repository.open(repo) as r:
        with r.lock("backup test"):
            res = run("repo", "gc", "--repo", repo)
            assert res.rc != 0 and f"locked by PID {os.getpid()}" in res.err
    assert run("repo", "gc", "--repo", repo).rc == 0


def test_help_answers(tmp_path):
    for args in (["--help"], ["backup", "--help"], ["repo", "check", "--help"], ["restore", "--help"]):
        r = run(*args)
        assert r.rc == 0 and "usage: instantnfs" in r.out
    assert "--changed-extents" in run("backup", "--help").out


def test_fingerprints_ending_in_nul_survive_the_pack_index(tmp_path):
    """numpy's 'S32' strips trailing NULs on the way out; the index must return all 32 bytes."""
    import numpy as np

    from engine.repo.format import IDX_DTYPE, fingerprints, idx_bytes, read_idx

    fps = [bytes(range(1, 32)) + b"\x00", b"\x00" * 32, bytes(range(32))]
    entries = np.array([(fp, i * 100, 10, BS) for i, fp in enumerate(fps)], dtype=IDX_DTYPE)
    path = tmp_path / "00000001.idx"
    path.write_bytes(idx_bytes(1, entries))
    _pack, back = read_idx(path)
    assert fingerprints(back) == fps


class MemDisk:
    """The simplest Disk: bytes in memory."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.data, self.size = name, data, len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def test_backup_disks_commits_changed_extents_over_a_parent(tmp_path, repo):
    from engine.repo.ingest import BackupSettings, backup_disks

    src = tmp_path / "d.img"
    base = make_image(src, ["text", "random", "hole", "text"], BS, seed=40)
    r1 = ok("backup", "--repo", repo, "--vm", "app", "--memory", "512", "--json", src).json()
    merged = bytearray(base)
    merged[BS + 7 : BS + 20] = b"written by VM"
    merged[2 * BS + 4096 : 2 * BS + 8192] = b"\xab" * 4096
    merged[3 * BS + 5] = 0x01  # changed but NOT in the extent list: must stay the parent's
    with Stack.open(repo) as r_st:
        r = r_st.repo
        parent = r.point(r1["id"])
        m = backup_disks(
            r, BackupSettings(vm="app", memory_mib=512), [MemDisk("app", bytes(merged))],
            parent=parent, changed=[[(BS + 7, 13), (2 * BS + 4096, 4096)]],
        )
        assert m["parent"] == r1["id"] and m["incremental"] and m["stats"]["read_bytes"] == 2 * BS
        got = r_st.backup_disk(r.point(m["id"]), 0).read(0, len(base))
    expect = bytes(merged[: 3 * BS]) + base[3 * BS :]
    assert got == expect
    assert restore_bytes(repo, r1["id"], "0", tmp_path) == base  # the parent is untouched
    with Repository.open(repo) as r, pytest.raises(Exception, match="out of order"):
        backup_disks(r, BackupSettings(vm="app"), [MemDisk("app", bytes(merged))],
                     parent=r.point(r1["id"]), changed=[[(BS, 10), (5, 10)]])


def test_block_device_source_and_restore_target(tmp_path, repo):
    require(os.geteuid() == 0 and subprocess.run(["losetup", "--version"], capture_output=True).returncode == 0,
            "needs root and losetup for loop devices")
    img = tmp_path / "dev.img"
    data = make_image(img, ["text", "hole", "random", "zero"], BS, seed=50)
    target = tmp_path / "target.img"
    target.write_bytes(os.urandom(len(data)))  # old contents a restore must overwrite, zeros included
    loops = []
    try:
        for f in (img, target):
            p = subprocess.run(["losetup", "-f", "--show", f], capture_output=True, text=True)
            require(p.returncode == 0, f"losetup failed: {p.stderr.strip()}")
            loops.append(p.stdout.strip())
        r = ok("backup", "--repo", repo, "--vm", "dev", "--json", loops[0]).json()
        assert r["logical_bytes"] == len(data) and r["zero_blocks"] == 2
        ok("restore", "--repo", repo, r["id"], "0", "-o", loops[1], "-q")
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev])
    assert target.read_bytes() == data
