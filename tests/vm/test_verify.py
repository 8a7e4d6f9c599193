"""Backup verification without a boot (engine.vm.verify): the chunk check against chunks
corrupted on purpose in copies of a repository, the files named behind a bad block, the
volumes, the checker's tests against real listeners on 127.0.0.1, and the report with a
fake boot. The point is the test guest's disk (engine/vm/guest.py: MBR, a FAT boot partition and an
ext4 partition with known files), backed up with 256 KiB blocks."""
from __future__ import annotations

import contextlib
import http.server
import json
import random
import re
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import Cancelled, UsageError
from engine.repo.format import idx_bytes, idx_name, pack_name, read_idx_uid
from engine.repo.packs import HDR
from engine.stack import Stack
from engine.vm import guest as vmguest
from engine.vm.verify import (
    BadBlock,
    TestSpec,
    check_data,
    files_at,
    parse_test,
    recognise,
    run_tests,
    verify_point,
)
from tests.conftest import require, require_tool
from tests.files.images import backup_images
from tests.images import repository_data

BS = 256 * 1024
PART_OFFSET = 32 << 20  # the guest's ext4 root: its second partition (the first is the FAT boot partition)
MiB = 1 << 20


# -- the point -------------------------------------------------------------------------------


def _file_blocks(img: Path, path: str) -> list[int]:
    """The filesystem blocks (4 KiB) of ``path`` in the guest disk, as debugfs reads them."""
    out = subprocess.run(["debugfs", "-R", f"blocks {path}", f"{img}?offset={PART_OFFSET}"],
                         check=True, capture_output=True, text=True).stdout
    return [int(b) for b in out.split()]


def _inode_blocks(img: Path, inode: int) -> list[int]:
    out = subprocess.run(["debugfs", "-R", f"blocks <{inode}>", f"{img}?offset={PART_OFFSET}"],
                         check=True, capture_output=True, text=True).stdout
    return [int(b) for b in out.split()]


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> dict:
    """The guest disk backed up once: image, pristine repository, point id."""
    missing = vmguest.missing_tools()
    require(not missing, f"the guest builder needs: {', '.join(missing)} (bash scripts/system-deps.sh test)")
    require_tool("debugfs")
    base = tmp_path_factory.mktemp("verify")
    img = base / "guest.img"
    shutil.copyfile(vmguest.ensure_guest().disk, img)
    assert vmguest.root_offset(img) == PART_OFFSET
    repo = base / "repo"
    point = backup_images(repo, [img], vm="guest", block_size=BS)
    return {"img": img, "repo": repo, "point": point}


@pytest.fixture
def copy(guest, tmp_path) -> Path:
    """A copy of the guest's repository, to corrupt."""
    dst = tmp_path / "repo"
    shutil.copytree(guest["repo"], dst)
    return dst


@contextlib.contextmanager
def opened(repo: Path, point: str) -> Iterator[tuple[Stack, object]]:
    with Stack.open(repo, cache_bytes=16 * MiB, workers=2) as stack:
        yield stack, stack.repo.point(point)


def flip(repo: Path, point: str, disk_offset: int, where: str = "payload", disk: int = 0) -> tuple[int, int]:
    """Flip one byte of the record the block map gives for ``disk_offset``: (pack, record offset)."""
    with opened(repo, point) as (stack, pt):
        bm = pt.open_blockmap(disk)
        pack, clen, rec = bm.entry(disk_offset // BS)
        path = stack.repo.packs_dir / pack_name(pack)
    at = rec + HDR + clen // 2 if where == "payload" else rec + 5  # 5: a pad byte of the header
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))
    return pack, rec


# -- check_data ------------------------------------------------------------------------------


def test_an_intact_point_passes_and_nothing_is_written(guest):
    before = repository_data(guest["repo"])
    seen: list[tuple[int, int]] = []
    with opened(guest["repo"], guest["point"]) as (stack, pt):
        res = check_data(stack, pt, progress=lambda d, t: seen.append((d, t)))
        cache_loads = stack.cache.stats()
    assert res.ok and not res.bad and not res.errors
    assert res.chunks > 0 and res.chunks_verified == res.chunks
    assert res.logical_bytes == guest["img"].stat().st_size
    assert 0 < res.zero_bytes < res.logical_bytes
    assert seen[-1] == (res.logical_bytes, res.logical_bytes)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))  # progress never goes back
    assert repository_data(guest["repo"]) == before
    assert cache_loads["loads"] == 0 and cache_loads["entries"] == 0  # the decompression cache is bypassed


def test_a_corrupted_chunk_of_a_file_is_named_with_its_file(guest, copy):
    blocks = _file_blocks(guest["img"], "/data/random-4m.bin")
    bad_at = PART_OFFSET + blocks[len(blocks) // 2] * 4096  # the middle of the file
    pack, rec = flip(copy, guest["point"], bad_at)
    before = repository_data(copy)
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
        assert len(res.bad) == 1
        b = res.bad[0]
        assert (b.disk, b.offset, b.length) == (pt.disks[0].name, bad_at // BS * BS, BS)
        assert b.chunk == f"pack {pack_name(pack)} offset {rec}"
        assert "checksum mismatch" in b.error
        assert res.chunks_verified == res.chunks - 1
        files_at(stack, pt, res.bad)
    assert b.files == ["disk0:2:/data/random-4m.bin"]
    assert not any("metadata" in n for n in b.notes)
    assert repository_data(copy) == before  # the check wrote nothing


def test_a_corrupted_header_byte_is_found_too(guest, copy):
    blocks = _file_blocks(guest["img"], "/data/random-4m.bin")
    bad_at = PART_OFFSET + blocks[len(blocks) // 4] * 4096
    flip(copy, guest["point"], bad_at, where="header")
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
        files_at(stack, pt, res.bad)
    assert [b.offset for b in res.bad] == [bad_at // BS * BS]
    assert res.bad[0].files == ["disk0:2:/data/random-4m.bin"]


def test_a_bad_directory_block_says_its_files_cannot_be_named(guest, copy):
    (dblock,) = _file_blocks(guest["img"], "/data")
    bad_at = PART_OFFSET + dblock * 4096
    flip(copy, guest["point"], bad_at + 100 if (bad_at + 100) // BS == bad_at // BS else bad_at)
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
        files_at(stack, pt, res.bad)
    (b,) = res.bad
    assert not any(f.startswith("disk0:2:/data/") for f in b.files)  # /data cannot be listed
    assert any("could not be walked" in n and "/data" in n for n in b.notes), b.notes


def test_a_corrupted_chunk_under_no_file_says_metadata_or_free_space(guest, tmp_path):
    # free space holding old bytes (as a real disk's does): a chunk no file's data uses
    img = tmp_path / "guest.img"
    shutil.copyfile(guest["img"], img)
    total = int(re.search(r"Block count:\s+(\d+)", subprocess.run(
        ["debugfs", "-R", "stats", f"{img}?offset={PART_OFFSET}"], capture_output=True, text=True).stdout).group(1))
    first = (total - 2 * (BS // 4096)) // (BS // 4096) * (BS // 4096)  # a chunk-aligned run near the end
    used = subprocess.run(["debugfs", "-R", f"testb {first} {BS // 4096}", f"{img}?offset={PART_OFFSET}"],
                          capture_output=True, text=True).stdout
    assert "marked in use" not in used  # free, as the filesystem says
    with open(img, "r+b") as f:
        f.seek(PART_OFFSET + first * 4096)
        f.write(random.Random(3).randbytes(BS))
    point = backup_images(tmp_path / "repo", [img], block_size=BS)
    bad_at = PART_OFFSET + first * 4096
    flip(tmp_path / "repo", point, bad_at)
    with opened(tmp_path / "repo", point) as (stack, pt):
        res = check_data(stack, pt)
        files_at(stack, pt, res.bad)
    assert [b.offset for b in res.bad] == [bad_at]
    assert res.bad[0].files == []
    assert "filesystem metadata or free space of disk0:2" in res.bad[0].notes


def test_a_corrupted_partition_start_says_nothing_can_be_named(guest, copy):
    flip(copy, guest["point"], PART_OFFSET)  # the chunk holding the ext4 superblock (and where an LVM label would be)
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
        files_at(stack, pt, res.bad)
        vols = recognise(stack, pt)
    assert [b.offset for b in res.bad] == [PART_OFFSET]
    assert res.bad[0].files == []
    assert any("cannot be read" in n and "checksum mismatch" in n for n in res.bad[0].notes), res.bad[0].notes
    assert not any(v["filesystem"] for v in vols)
    assert any("checksum mismatch" in (v["note"] or "") for v in vols)


def test_a_missing_pack_makes_every_block_it_holds_bad(guest, copy):
    with opened(copy, guest["point"]) as (stack, pt):
        entries = pt.open_blockmap(0).entries
        stored = int((entries["pack"] != 0xFFFFFFFF).sum())
        packs = sorted(set(entries["pack"][entries["pack"] != 0xFFFFFFFF].tolist()))
    (copy / "packs" / pack_name(packs[0])).unlink()
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
    assert not res.ok
    assert all("is missing" in b.error for b in res.bad)
    if len(packs) == 1:
        assert sum(b.length for b in res.bad) == stored * BS
        assert res.chunks_verified == 0


def test_an_unreadable_index_is_reported_per_block(guest, copy):
    idx = next((copy / "packs").glob("*.idx"))
    idx.write_bytes(b"not an index")
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
    assert res.bad and all("unreadable" in b.error for b in res.bad)


def test_a_record_missing_from_its_index_is_bad(guest, copy):
    blocks = _file_blocks(guest["img"], "/data/random-4m.bin")
    bad_at = PART_OFFSET + blocks[len(blocks) // 2] * 4096
    with opened(copy, guest["point"]) as (stack, pt):
        pack, _clen, rec = pt.open_blockmap(0).entry(bad_at // BS)
    path = copy / "packs" / idx_name(pack)
    _pack, entries, uid = read_idx_uid(path)
    path.write_bytes(idx_bytes(pack, entries[entries["offset"] != rec], uid))
    with opened(copy, guest["point"]) as (stack, pt):
        res = check_data(stack, pt)
    assert [(b.offset, b.error) for b in res.bad] == [
        (bad_at // BS * BS, f"chunk at pack {pack_name(pack)} offset {rec}: no such record in the pack index")]


def test_an_all_zero_disk_reads_nothing_and_a_bad_chunk_of_a_raw_disk_names_no_file(tmp_path):
    zero = tmp_path / "zero.img"
    with open(zero, "wb") as f:
        f.truncate(4 * MiB)
    raw = tmp_path / "raw.img"
    raw.write_bytes(random.Random(5).randbytes(4 * MiB))
    point = backup_images(tmp_path / "repo", [zero, raw], block_size=BS)
    flip(tmp_path / "repo", point, 3 * MiB, disk=1)  # past what filesystem probes read
    with opened(tmp_path / "repo", point) as (stack, pt):
        res = check_data(stack, pt)
        files_at(stack, pt, res.bad)
    assert res.zero_bytes == 4 * MiB and res.logical_bytes == 8 * MiB and res.chunks == 16
    (b,) = res.bad
    assert (b.disk, b.offset, b.files) == (pt.disks[1].name, 3 * MiB, [])
    assert any(n.startswith("in disk1, which holds no filesystem this tool reads") for n in b.notes), b.notes


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruptions_are_all_reported_and_nothing_else(guest, copy, data):
    with opened(copy, guest["point"]) as (stack, pt):
        e = pt.open_blockmap(0).entries
        uses: dict[tuple[int, int, int], list[int]] = {}
        for blk, (pack, clen, off) in enumerate(zip(e["pack"].tolist(), e["clen"].tolist(), e["offset"].tolist())):
            if pack != 0xFFFFFFFF:
                uses.setdefault((pack, off, clen), []).append(blk)
        chunks = sorted(uses)
        picked = data.draw(st.lists(st.sampled_from(chunks), min_size=1, max_size=4, unique=True))
        flips = []
        for pack, off, clen in picked:
            at = off + data.draw(st.integers(0, HDR + clen - 1))
            bit = 1 << data.draw(st.integers(0, 7))
            flips.append((stack.repo.packs_dir / pack_name(pack), at, bit))

        def apply() -> None:
            for path, at, bit in flips:
                with open(path, "r+b") as f:
                    f.seek(at)
                    b = f.read(1)
                    f.seek(at)
                    f.write(bytes([b[0] ^ bit]))

        apply()
        try:
            res = check_data(stack, pt)
        finally:
            apply()  # flipped back: the copy is intact again for the next example
    want = {f"pack {pack_name(p)} offset {o}" for p, o, _c in picked}
    assert {b.chunk for b in res.bad} == want
    for p, o, _c in picked:  # every block using a bad chunk is covered, and only those
        covered = {blk for b in res.bad if b.chunk == f"pack {pack_name(p)} offset {o}"
                   for blk in range(b.offset // BS, (b.offset + b.length + BS - 1) // BS)}
        assert covered == set(uses[(p, o, _c)])
    assert res.chunks_verified == res.chunks - len(picked)


def test_a_chunk_used_twice_is_read_once_and_reported_at_both(tmp_path):
    rng = random.Random(7)
    blk = [rng.randbytes(BS) for _ in range(4)]
    # blocks: A, B, A, C, zeros, C, C  -> A at 0 and 2; C at 3, 5 and 6 (5-6 adjacent)
    layout = [blk[0], blk[1], blk[0], blk[2], bytes(BS), blk[2], blk[2]]
    img = tmp_path / "dedup.img"
    img.write_bytes(b"".join(layout) + blk[3][:1024])  # and a partial last block
    point = backup_images(tmp_path / "repo", [img], block_size=BS)
    with opened(tmp_path / "repo", point) as (stack, pt):
        reads: dict[tuple[int, int], int] = {}
        real = stack.repo.reader.read_chunk

        def counting(pack, off, clen, out=None, fingerprint=None):
            reads[(pack, off)] = reads.get((pack, off), 0) + 1
            return real(pack, off, clen, out, fingerprint=fingerprint)

        stack.repo.reader.read_chunk = counting  # type: ignore[method-assign]
        res = check_data(stack, pt)
        assert res.ok and res.chunks == 4 and set(reads.values()) == {1}
        assert res.logical_bytes == 7 * BS + 1024 and res.zero_bytes == BS
    flip(tmp_path / "repo", point, 0)
    flip(tmp_path / "repo", point, 3 * BS)
    with opened(tmp_path / "repo", point) as (stack, pt):
        res = check_data(stack, pt)
    got = [(b.offset, b.length) for b in res.bad]
    assert got == [(0, BS), (2 * BS, BS), (3 * BS, BS), (5 * BS, 2 * BS)]
    assert res.bad[0].chunk == res.bad[1].chunk != res.bad[2].chunk == res.bad[3].chunk


def test_cancel_stops_the_check(guest):
    ev = threading.Event()
    ev.set()
    with opened(guest["repo"], guest["point"]) as (stack, pt), pytest.raises(Cancelled):
        check_data(stack, pt, cancel=ev)


# -- volumes -----------------------------------------------------------------------------------


def test_recognise_names_each_volume_and_why_not(guest, tmp_path):
    with opened(guest["repo"], guest["point"]) as (stack, pt):
        vols = {v["name"]: v for v in recognise(stack, pt)}
    assert vols["disk0:2"]["filesystem"] == "ext4"
    assert vols["disk0:1"]["filesystem"] == "fat16"  # the boot partition
    assert vols["disk0"]["contains"] == "a partition table"
    json.dumps(vols)
    raw = tmp_path / "raw.img"
    raw.write_bytes(random.Random(1).randbytes(2 * MiB))
    point = backup_images(tmp_path / "repo2", [raw], block_size=BS)
    with opened(tmp_path / "repo2", point) as (stack, pt):
        (v,) = recognise(stack, pt)
    assert v["name"] == "disk0" and v["filesystem"] is None and "unrecognised" in v["note"]


# -- the checker's tests ---------------------------------------------------------------------


def test_parse_test():
    assert parse_test("tcp:22") == TestSpec("tcp", 22)
    assert parse_test("http:80") == TestSpec("http", 80, "/")
    assert parse_test("http:8080/health") == TestSpec("http", 8080, "/health")
    assert parse_test("HTTP:8080/a/b?c=d") == TestSpec("http", 8080, "/a/b?c=d")
    assert parse_test("script:/opt/check.sh") == TestSpec("script", None, "/", "/opt/check.sh")
    assert str(parse_test("http:8080/health")) == "http:8080/health"
    for bad in ("tcp", "tcp:", "tcp:x", "tcp:0", "tcp:65536", "tcp:22/x", "udp:53", "http:", "script:", ":22", ""):
        with pytest.raises(UsageError, match="not a test"):
            parse_test(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def listener(close_at_once: bool = False) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that holds each connection (or closes it at once, as a
    user-network forwarder does when nothing listens in the guest)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if close_at_once:
                c.close()
            else:
                held.append(c)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()
        for c in held:
            c.close()


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            code = 200 if self.path == "/ok" else 500
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *a) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_tcp_tests_against_real_listeners():
    with listener() as open_port, listener(close_at_once=True) as closing_port:
        closed_port = _free_port()
        fw = {22: open_port, 23: closed_port, 24: closing_port}
        res = run_tests([TestSpec("tcp", 22), TestSpec("tcp", 23), TestSpec("tcp", 24), TestSpec("tcp", 25)],
                        fw, timeout=1.0)
    assert [r["passed"] for r in res] == [True, False, False, False]
    assert [r["test"] for r in res] == ["tcp:22", "tcp:23", "tcp:24", "tcp:25"]
    assert "refused" in res[1]["detail"].lower()
    assert "closed the connection at once" in res[2]["detail"]
    assert "not forwarded" in res[3]["detail"]
    assert all(set(r) == {"test", "passed", "detail", "seconds"} for r in res)


def test_http_tests_against_a_real_server(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy must never be used
    with http_server() as port:
        res = run_tests([TestSpec("http", 80, "/ok"), TestSpec("http", 80, "/broken")], {80: port}, timeout=1.0)
    assert [r["passed"] for r in res] == [True, False]
    assert "200" in res[0]["detail"] and "500" in res[1]["detail"]


def _script(tmp_path: Path, body: str) -> str:
    p = tmp_path / f"check-{abs(hash(body))}.sh"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_scripts_get_the_forwarded_ports_and_their_verdict(tmp_path):
    ok = _script(tmp_path, 'echo "host=$INSTANTNFS_VERIFY_HOST p22=$INSTANTNFS_VERIFY_PORT_22 '
                           'p80=$INSTANTNFS_VERIFY_PORT_80 extra=$EXTRA"\n'
                           '[ "$INSTANTNFS_VERIFY_PORT_22" = 40022 ] && [ "$INSTANTNFS_VERIFY_HOST" = 127.0.0.1 ]\n')
    fail = _script(tmp_path, "echo failing >&2\nexit 3\n")
    slow = _script(tmp_path, "echo started\nsleep 30\n")
    loud = _script(tmp_path, "head -c 100000 /dev/zero | tr '\\0' x\n")
    res = run_tests([TestSpec("script", None, "/", p) for p in (ok, fail, slow, loud)] +
                    [TestSpec("script", None, "/", str(tmp_path / "absent"))],
                    {22: 40022, 80: 40080}, timeout=1.5, env_extra={"EXTRA": "yes"})
    assert [r["passed"] for r in res] == [True, False, False, True, False]
    assert "host=127.0.0.1 p22=40022 p80=40080 extra=yes" in res[0]["detail"]
    assert "status 3" in res[1]["detail"] and "failing" in res[1]["detail"]
    assert "killed" in res[2]["detail"] and "started" in res[2]["detail"]
    assert res[2]["seconds"] < 30  # killed at the timeout, not waited for
    assert len(res[3]["detail"]) < 20000 and "more bytes of output not kept" in res[3]["detail"]
    assert "cannot run" in res[4]["detail"]


# -- the report, with a fake boot --------------------------------------------------------------


def fake_boot(forwards: dict[int, int], console: str = "GUEST-HEARTBEAT ok run n=1\n", fail: str | None = None):
    asked: list[list[int]] = []

    @contextlib.contextmanager
    def boot(ports):
        asked.append(list(ports))
        if fail:
            raise TimeoutError(fail)
        yield forwards, (lambda: console)

    return boot, asked


def test_verify_point_passes_with_a_boot_and_tests(guest):
    with listener() as port, opened(guest["repo"], guest["point"]) as (stack, pt):
        boot, asked = fake_boot({22: port, 8080: port})
        rep = verify_point(stack, pt, boot=boot, tests=[parse_test("tcp:22")], ports=[8080], timeout=1.0)
    assert rep.passed, rep.summary()
    assert asked == [[22, 8080]]
    assert rep.boot is not None and rep.boot["ok"] and "GUEST-HEARTBEAT" in rep.boot["console"]
    assert [t["passed"] for t in rep.tests] == [True]
    doc = json.loads(json.dumps(rep.to_json()))
    assert doc["passed"] and doc["data"]["ok"] and doc["point"] == guest["point"]
    text = rep.summary()
    assert re.search(r"^  PASS  data: ", text, re.M) and re.search(r"^  PASS  boot: ", text, re.M)
    assert re.search(r"^  PASS  test tcp:22: ", text, re.M)
    assert "disk0:2: ext4" in text


def test_verify_point_fails_when_the_boot_fails(guest):
    boot, _asked = fake_boot({}, fail="no heartbeat within 5 s")
    with opened(guest["repo"], guest["point"]) as (stack, pt):
        rep = verify_point(stack, pt, boot=boot, tests=[parse_test("tcp:22")], timeout=1.0)
    assert not rep.passed
    assert rep.boot is not None and not rep.boot["ok"] and "no heartbeat within 5 s" in rep.boot["detail"]
    assert rep.tests == [{"test": "tcp:22", "passed": False, "detail": "not run: the boot failed", "seconds": 0.0}]
    assert re.search(r"^  FAIL  boot: the boot failed: no heartbeat", rep.summary(), re.M)


def test_verify_point_fails_on_a_failing_test(guest):
    with opened(guest["repo"], guest["point"]) as (stack, pt):
        boot, _ = fake_boot({22: _free_port()})
        rep = verify_point(stack, pt, boot=boot, tests=[parse_test("tcp:22")], timeout=0.5)
    assert not rep.passed and rep.boot["ok"] and rep.errors == ["test tcp:22 failed"]


def test_verify_point_names_the_file_of_a_bad_block(guest, copy):
    blocks = _file_blocks(guest["img"], "/data/random-512k.bin")
    flip(copy, guest["point"], PART_OFFSET + blocks[0] * 4096)
    with opened(copy, guest["point"]) as (stack, pt):
        rep = verify_point(stack, pt)
    assert not rep.passed and rep.boot is None
    assert rep.data is not None and len(rep.data.bad) == 1
    assert "disk0:2:/data/random-512k.bin" in rep.data.bad[0].files
    text = rep.summary()
    assert re.search(r"^  FAIL  data: ", text, re.M)
    assert "file disk0:2:/data/random-512k.bin" in text
    assert "disk0:2:/data/random-512k.bin" in json.loads(json.dumps(rep.to_json()))["data"]["bad_blocks"][0]["files"]


def test_a_point_without_any_filesystem_fails_and_tests_need_a_boot(tmp_path, guest):
    raw = tmp_path / "raw.img"
    raw.write_bytes(random.Random(2).randbytes(MiB))
    point = backup_images(tmp_path / "repo", [raw], block_size=BS)
    with opened(tmp_path / "repo", point) as (stack, pt):
        rep = verify_point(stack, pt)
        with pytest.raises(UsageError, match="need a booted guest"):
            verify_point(stack, pt, tests=[parse_test("tcp:22")])
    assert rep.data is not None and rep.data.ok
    assert not rep.passed
    assert "no volume of the point holds a filesystem this tool reads" in rep.errors
    assert rep.warnings and rep.warnings[0].startswith("disk0: no filesystem")


def test_bad_block_json_round_trip():
    b = BadBlock("d", 0, 10, "pack 00000001.pack offset 48", "checksum mismatch", ["disk0:1:/x"], ["n"])
    assert json.loads(json.dumps(b.to_json()))["files"] == ["disk0:1:/x"]


def test_files_at_of_nothing_reads_nothing(guest):
    with opened(guest["repo"], guest["point"]) as (stack, pt):
        files_at(stack, pt, [])
        assert stack.cache.stats()["loads"] == 0
