"""The control API's file routes against a real daemon on loopback: volumes, listings,
a byte-identical download, a tar whose members match the tree (names sanitised, links
kept), and a 2 GiB file streamed with the daemon's memory bounded."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.files.hostile_fs import hostile_fs
from tests.files.images import MiB, backup_images, ext4_image
from tests.nfs.conftest import Daemon, give_address, take_address

GiB = 1 << 30
BIG_ISLANDS = 24  # 2 MiB of random data each, spread over the 2 GiB file


def make_tree(src: Path) -> None:
    src.mkdir()
    (src / "random.bin").write_bytes(os.urandom(5 * MiB + 123))
    tree = src / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "deep.txt").write_text("deep\n")
    (tree / "hello.txt").write_text("hello\n")
    os.chmod(tree / "hello.txt", 0o640)
    (tree / "empty").write_bytes(b"")
    (tree / "utf8-日本語.txt").write_text("unicode\n")
    (tree / os.fsdecode(b"latin1-\xe9t\xe9")).write_bytes(b"not utf-8\n")
    os.symlink("../../etc/passwd", tree / "escape-link")
    os.symlink("hello.txt", tree / "link")
    os.link(tree / "hello.txt", tree / "a" / "hard")
    os.mkfifo(tree / "fifo")
    (src / "many").mkdir()
    for i in range(3000):  # more than a dozen of the listing's batches
        (src / "many" / f"f{i:05d}").write_text(str(i))
    with open(src / "big.bin", "wb") as f:
        f.truncate(2 * GiB)
        for i in range(BIG_ISLANDS):
            f.seek(i * (2 * GiB // BIG_ISLANDS) + 4096 * i)
            f.write(os.urandom(2 * MiB))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    make_tree(tmp / "src")
    img = ext4_image(tmp / "disk.img", tmp / "src", 256 * MiB)
    point = backup_images(tmp / "repo", [img], vm="web01")
    img.unlink()
    addr = take_address()
    dmn = Daemon(tmp / "repo", tmp / "cache", addr)
    try:
        dmn.start()
        yield tmp, point, dmn
    finally:
        dmn.stop()
        give_address(addr)


def get(dmn: Daemon, route: str, **query: str):
    url = dmn.url + "/api/v1" + route + ("?" + urllib.parse.urlencode(query) if query else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {dmn.token}"})
    return urllib.request.urlopen(req, timeout=60)


def status_of(dmn: Daemon, route: str, **query: str) -> tuple[int, dict]:
    try:
        with get(dmn, route, **query) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_volumes_and_listing(daemon):
    tmp, point, dmn = daemon
    code, vols = status_of(dmn, f"/points/{point}/files")
    assert code == 200 and [(v["name"], v["filesystem"]) for v in vols["volumes"]] == [("disk0", "ext4")]
    code, ls = status_of(dmn, f"/points/{point}/files/disk0/ls", path="/tree")
    assert code == 200 and ls["filesystem"] == "ext4" and ls["path"] == "/tree"
    names = {e["name"]: e for e in ls["entries"]}
    assert set(names) == {os.fsdecode(n) for n in os.listdir(os.fsencode(tmp / "src" / "tree"))}
    assert names["hello.txt"]["mode"] == "0640" and names["hello.txt"]["size"] == 6
    assert names["link"]["type"] == "symlink" and names["link"]["link"] == "hello.txt"
    code, many = status_of(dmn, f"/points/{point}/files/disk0/ls", path="/many")
    assert code == 200 and sorted(e["name"] for e in many["entries"]) == [f"f{i:05d}" for i in range(3000)]
    assert "error" not in many
    # '-' is the only filesystem; a file lists as itself
    code, one = status_of(dmn, f"/points/{point}/files/-/ls", path="/random.bin")
    assert code == 200 and [e["path"] for e in one["entries"]] == ["/random.bin"]


def test_errors_are_json_with_their_status(daemon):
    _, point, dmn = daemon
    assert status_of(dmn, f"/points/{point}/files/disk0/ls", path="/nope")[0] == 404
    assert status_of(dmn, "/points/nosuchpoint/files")[0] == 404
    assert status_of(dmn, f"/points/{point}/files/disk7/ls")[0] == 404
    code, body = status_of(dmn, f"/points/{point}/files/disk0/ls", path="relative")
    assert code == 400 and "absolute" in body["error"]
    code, body = status_of(dmn, f"/points/{point}/files/disk0/download", path="/tree")
    assert code == 400 and "not a file" in body["error"]
    req = urllib.request.Request(dmn.url + f"/api/v1/points/{point}/files")  # no token
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401
    doc = dmn.api("GET", "/openapi.json")
    assert "/api/v1/points/{id}/files/{vol}/tar" in doc["paths"]


def test_download_is_byte_identical(daemon):
    tmp, point, dmn = daemon
    with get(dmn, f"/points/{point}/files/disk0/download", path="/random.bin") as r:
        assert int(r.headers["Content-Length"]) == 5 * MiB + 123
        assert r.read() == (tmp / "src" / "random.bin").read_bytes()


def test_tar_members_match_the_tree(daemon):
    tmp, point, dmn = daemon
    with get(dmn, f"/points/{point}/files/disk0/tar", path="/tree") as r:
        data = r.read()
    src = tmp / "src" / "tree"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as t:
        members = {m.name: m for m in t.getmembers()}
        expected = {"tree"}
        for dirpath, dirs, files in os.walk(src):
            rel = Path(dirpath).relative_to(src.parent)
            expected |= {str(rel / n) for n in dirs + files if n != "fifo"}
        assert set(members) == expected
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in members)
        assert members["tree/escape-link"].issym() and members["tree/escape-link"].linkname == "../../etc/passwd"
        assert members["tree/link"].issym() and members["tree/link"].linkname == "hello.txt"
        hard = [members["tree/a/hard"], members["tree/hello.txt"]]  # one of the two names is the link
        assert sorted(m.islnk() for m in hard) == [False, True]
        assert {m.linkname for m in hard if m.islnk()} <= {"tree/a/hard", "tree/hello.txt"}
        for name, m in members.items():
            if m.isfile():
                assert t.extractfile(m).read() == (src.parent / name).read_bytes(), name  # type: ignore[union-attr]
            if m.isreg() or m.isdir():
                assert m.mode == os.stat(src.parent / name).st_mode & 0o7777, name
        latin = os.fsdecode(b"tree/latin1-\xe9t\xe9")
        assert members[latin].isfile()


def _proc(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_2gib_file_streams_with_the_daemon_memory_bounded(daemon):
    tmp, point, dmn = daemon
    assert dmn.proc is not None
    pid = dmn.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = _proc(pid, "VmRSS")
    h, n = hashlib.sha256(), 0
    with get(dmn, f"/points/{point}/files/disk0/download", path="/big.bin") as r:
        assert int(r.headers["Content-Length"]) == 2 * GiB
        while piece := r.read(4 * MiB):
            h.update(piece)
            n += len(piece)
    peak = _proc(pid, "VmHWM")
    assert n == 2 * GiB
    want = hashlib.sha256()
    with open(tmp / "src" / "big.bin", "rb") as f:
        while piece := f.read(4 * MiB):
            want.update(piece)
    assert h.hexdigest() == want.hexdigest()
    assert peak - before < 200 * MiB, f"the daemon grew by {(peak - before) // MiB} MiB streaming 2 GiB"


def test_tar_names_of_a_hostile_filesystem_are_sanitised():
    from engine.control.files_api import tar_stream

    fs = hostile_fs()
    data = b"".join(bytes(p) for p in tar_stream(fs, fs.stat("/")))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        got = {m.name: (m.type, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()}  # type: ignore[union-attr]
    assert got == {
        "a%2Fb": (tarfile.REGTYPE, b"slash"), "x%00y": (tarfile.REGTYPE, b"nul"), "d": (tarfile.DIRTYPE, None),
        "d/inner": (tarfile.REGTYPE, b"inner"), "d/loop": (tarfile.DIRTYPE, None),  # the loop is not entered
    }
