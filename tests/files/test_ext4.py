"""ext4 guests (made with mke2fs -d, no mount) backed up, then listed and extracted through
the CLI: byte-identical files, modes and times, sparse files, links, odd names, hostile
names, a corrupted chunk under one file, and random trees (hypothesis)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.files.extract import extract
from engine.files.point import PointFiles
from engine.stack import Stack
from tests.cli import ok as _ok
from tests.cli import run as _run
from tests.files.images import MiB, backup_images, digest, ext4_image, sh

GiB = 1 << 30


def ok(*args, **kw):
    return _ok(*args, errors="surrogateescape", **kw)  # guest names need not be UTF-8


def run(*args, **kw):
    return _run(*args, errors="surrogateescape", **kw)


def rich_tree(src: Path, many: int = 2000) -> None:
    """Files of every kind an ext4 guest holds."""
    src.mkdir()
    (src / "empty").write_bytes(b"")
    (src / "hello.txt").write_text("hello, world\n")
    (src / "random.bin").write_bytes(os.urandom(3 * MiB + 17))
    with open(src / "sparse-1g", "wb") as f:  # 1 GiB, two islands of data
        f.truncate(GiB)
        f.seek(5 * MiB)
        f.write(b"island one")
        f.seek(GiB - 4)
        f.write(b"end!")
    os.chmod(src / "hello.txt", 0o640)
    os.chmod(src / "random.bin", 0o755)
    deep = src
    for i in range(40):
        deep = deep / f"level{i}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("deep\n")
    (src / "utf8-ÄÖÜ-日本語-😀.txt").write_text("unicode name\n")
    (src / ("L" * 255)).write_text("long name\n")
    os.symlink("hello.txt", src / "link-rel")
    os.symlink("/etc/passwd", src / "link-abs")
    os.symlink("../../../../../../outside", src / "link-out")
    os.symlink("does/not/exist", src / "link-dangling")
    os.link(src / "hello.txt", src / "hardlink-to-hello")
    (src / "sub").mkdir(mode=0o750)
    os.link(src / "hello.txt", src / "sub" / "another-hardlink")
    (src / os.fsdecode(b"latin1-\xe9t\xe9")).write_bytes(b"not utf-8 name\n")
    os.mkfifo(src / "a-fifo")
    (src / "owned").write_text("someone else's\n")
    if os.geteuid() == 0:
        os.chown(src / "owned", 1234, 5678)
        os.chown(src / "link-rel", 4321, 8765, follow_symlinks=False)
    big = src / "many"
    big.mkdir()
    for i in range(many):
        (big / f"f{i:06d}").write_text(str(i))
    for p in [src / "hello.txt", src / "sub", src / "empty"]:
        os.utime(p, (1_600_000_000, 1_500_000_000), follow_symlinks=False)


def compare_trees(src: Path, out: Path, *, times: bool = True, modes: bool = True, owners: bool = False) -> int:
    """Assert ``out`` holds what ``src`` does (fifos left out); the number of entries compared."""
    n = 0
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for name in dirs + files:
            s, o = Path(dirpath) / name, out / rel / name
            ss = os.lstat(s)
            if stat.S_ISFIFO(ss.st_mode):
                assert not os.path.lexists(o)
                continue
            os_ = os.lstat(o)
            assert stat.S_IFMT(ss.st_mode) == stat.S_IFMT(os_.st_mode), s
            if stat.S_ISLNK(ss.st_mode):
                assert os.readlink(s) == os.readlink(o)
            elif stat.S_ISREG(ss.st_mode):
                assert ss.st_size == os_.st_size, s
                assert digest(s) == digest(o), s
            if modes and not stat.S_ISLNK(ss.st_mode):
                assert stat.S_IMODE(ss.st_mode) == stat.S_IMODE(os_.st_mode), s
            if times:
                assert int(ss.st_mtime) == os_.st_mtime_ns // 10**9, s  # mke2fs -d keeps seconds
            if owners:
                assert (ss.st_uid, ss.st_gid) == (os_.st_uid, os_.st_gid), s
            n += 1
    return n


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rich")
    rich_tree(tmp / "src")
    img = ext4_image(tmp / "disk.img", tmp / "src", 256 * MiB)
    point = backup_images(tmp / "repo", [img], vm="web01")
    return tmp, point


def test_get_of_the_whole_tree_is_identical_with_modes_times_links_and_holes(rich):
    tmp, point = rich
    out = tmp / "out-preserve"
    r = ok("files", "get", "--repo", tmp / "repo", point, "/", "-o", out, "--preserve", "--json")
    res = r.json()
    assert res["failed"] == [] and res["filesystem"] == "ext4"
    assert "journal not replayed" in res["journal"]
    assert [s["path"] for s in res["skipped"]] == ["/a-fifo"]
    assert compare_trees(tmp / "src", out, owners=os.geteuid() == 0) > 2000  # owners: as root only
    # hard links stay hard links inside the target
    ino = {os.stat(out / p).st_ino for p in ("hello.txt", "hardlink-to-hello", "sub/another-hardlink")}
    assert len(ino) == 1 and res["hardlinks"] == 2
    # the sparse file stays sparse: only its two islands are allocated
    st_ = os.stat(out / "sparse-1g")
    assert st_.st_size == GiB and st_.st_blocks * 512 < 2 * MiB
    assert (out / "lost+found").is_dir()


def test_get_without_preserve_keeps_contents_and_gives_default_modes(rich):
    tmp, point = rich
    out = tmp / "out-plain"
    ok("files", "get", "--repo", tmp / "repo", point, "disk0", "/sub", "/hello.txt", "/random.bin", "-o", out)
    assert (out / "hello.txt").read_text() == "hello, world\n"
    assert (out / "sub" / "another-hardlink").read_text() == "hello, world\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out / "hello.txt").st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(out / "random.bin").st_mode) == 0o777 & ~umask
    # never overwrites: a second run fails for each file and changes nothing
    r = run("files", "get", "--repo", tmp / "repo", point, "/hello.txt", "-o", out)
    assert r.rc == 1 and "already exists in the target" in r.err


def test_ls_long_json_cat_and_find(rich):
    tmp, point = rich
    repo = tmp / "repo"
    r = ok("files", "ls", "--repo", repo, "web01@latest")
    names = r.out.split("\n")
    assert "hello.txt" in names and "sub/" in names and "utf8-ÄÖÜ-日本語-😀.txt" in names
    assert "journal not replayed" in r.err
    r = ok("files", "ls", "--repo", repo, point, "/", "--long")
    assert r.out.startswith("# disk0 (ext4): journal not replayed")
    line = next(x for x in r.out.splitlines() if " link-rel " in x)
    assert line.startswith("lrwxrwxrwx") and line.split("  [inode")[0].endswith("link-rel -> hello.txt")
    hello = next(x for x in r.out.splitlines() if x.split("  [inode")[0].endswith(" hello.txt"))
    assert hello.startswith("-rw-r-----   3 ")
    doc = ok("files", "ls", "--repo", repo, point, "/sub", "--json").json()
    assert doc["volume"] == "disk0" and doc["filesystem"] == "ext4" and doc["path"] == "/sub"
    (e,) = doc["entries"]
    assert e["name"] == "another-hardlink" and e["nlink"] == 3 and e["mode"] == "0640" and e["mtime"] == 1_500_000_000
    many = ok("files", "ls", "--repo", repo, point, "/many", "--json").json()["entries"]
    assert len(many) == 2000
    odd = ok("files", "ls", "--repo", repo, point, "/", "--json").json()["entries"]
    assert {"latin1-\udce9t\udce9"} <= {x["name"] for x in odd}  # surrogate escapes in JSON
    assert ok("files", "cat", "--repo", repo, point, "/hello.txt").out == "hello, world\n"
    assert ok("files", "cat", "--repo", repo, point, "/" + "L" * 255).out == "long name\n"
    found = ok("files", "find", "--repo", repo, point, "--name", "bottom").out.split()
    assert found == ["/" + "/".join(f"level{i}" for i in range(40)) + "/bottom"]
    newer = ok("files", "find", "--repo", repo, point, "/", "--newer", "2018-01-01", "--name", "*.txt").out.split("\n")
    assert "/hello.txt" not in newer and "/utf8-ÄÖÜ-日本語-😀.txt" in newer  # hello.txt: mtime 2017
    js = ok("files", "find", "--repo", repo, point, "/many", "--name", "f00000[0-4]", "--json").json()
    assert sorted(x["path"] for x in js["entries"]) == [f"/many/f{i:06d}" for i in range(5)]
    r = run("files", "cat", "--repo", repo, point, "/sub")
    assert r.rc != 0 and "is a dir, not a file" in r.err
    r = run("files", "ls", "--repo", repo, point, "/nope")
    assert r.rc != 0 and "no '/nope'" in r.err and "Traceback" not in r.err
    r = run("files", "ls", "--repo", repo, point, "disk3")
    assert r.rc != 0 and "no volume 'disk3' (volumes: disk0)" in r.err
    assert ok("files", "cat", "--repo", repo, point, "web01", "/hello.txt").out == "hello, world\n"  # the disk's name


def test_a_name_of_non_utf8_bytes_is_extracted_as_those_bytes(rich):
    tmp, point = rich
    out = tmp / "out-latin1"
    ok("files", "get", "--repo", tmp / "repo", point, "/latin1-\udce9t\udce9", "-o", out)
    assert os.listdir(os.fsencode(out)) == [b"latin1-\xe9t\xe9"]


def test_hostile_names_never_leave_the_target(tmp_path):
    """Names patched into the directory blocks: 'a/b', 'c<NUL>d' and '..'; a pre-existing
    symlink in the target where a directory goes; symlinks pointing out."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "slashXname").write_text("slash\n")
    (src / "nulXXname").write_text("nul\n")
    (src / "zz").write_text("dotdot\n")
    (src / "sub").mkdir()
    (src / "sub" / "inside").write_text("inside\n")
    os.symlink("../../../../../tmp", src / "escape")
    img = ext4_image(tmp_path / "d.img", src, 32 * MiB, "-O", "^metadata_csum,^dir_index")
    data = bytearray(img.read_bytes())
    for old, new in [(b"slashXname", b"slash/name"), (b"nulXXname", b"nul\0Xname"), (b"\x02\x01zz", b"\x02\x01..")]:
        assert data.count(old) == 1, old
        data[data.index(old) : data.index(old) + len(old)] = new
    img.write_bytes(data)
    point = backup_images(tmp_path / "repo", [img])
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    os.symlink(outside, out / "sub")  # planted: extraction must not write through it
    r = run("files", "get", "--repo", tmp_path / "repo", point, "/", "-o", out)
    assert r.rc == 1, r.err
    assert "FAILED /sub: cannot enter the directory: a symlink or file of that name is in the way" in r.err
    assert "renamed '/slash/name' to 'slash%2Fname'" in r.err
    # TSK hands names over as C strings: a name with a NUL reaches us cut at the NUL ('nul');
    # the '..' entry is left out of the listing like the real one
    assert sorted(os.listdir(out)) == ["escape", "lost+found", "nul", "slash%2Fname", "sub"]
    assert os.listdir(outside) == []
    assert os.readlink(out / "escape") == "../../../../../tmp"
    assert (out / "slash%2Fname").read_text() == "slash\n"


def _corrupt_chunk_under(repo: Path, point: str, disk_offset: int) -> None:
    from engine.repo.format import pack_name
    from engine.repo.packs import HDR
    from engine.repo.repository import Repository

    with Repository.open(repo) as r:
        bm = r.point(point).open_blockmap(0)
        pack, clen, rec = bm.entry(disk_offset >> bm.shift)
        path = r.packs_dir / pack_name(pack)
    with open(path, "r+b") as f:
        f.seek(rec + HDR + clen // 2)
        b = f.read(1)
        f.seek(rec + HDR + clen // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_corrupted_chunk_fails_its_file_only_and_names_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(4 * MiB))
    (src / "b.bin").write_bytes(os.urandom(4 * MiB))
    (src / "c.txt").write_text("small\n")
    img = ext4_image(tmp_path / "d.img", src, 64 * MiB)
    stat_out = sh("debugfs", "-R", "stat /a.bin", img).stdout.decode()
    first = int(re.search(r"\(0-\d+\):(\d+)-", stat_out).group(1))
    bad = first * 4096 + 2 * MiB  # the middle of a.bin: a repository block of a.bin's only
    point = backup_images(tmp_path / "repo", [img])
    _corrupt_chunk_under(tmp_path / "repo", point, bad)
    out = tmp_path / "out"
    r = run("files", "get", "--repo", tmp_path / "repo", point, "/a.bin", "/b.bin", "/c.txt", "-o", out)
    assert r.rc == 1
    block = 256 * 1024
    m = re.search(r"FAILED /a\.bin: disk0: /a\.bin: bytes (\d+)\.\.(\d+) unreadable \(filesystem block (\d+), "
                  r"disk0 offset (\d+)\): chunk at pack \S+ offset \d+: checksum mismatch", r.err)
    assert m, r.err
    assert int(m.group(4)) // block == bad // block and int(m.group(3)) == int(m.group(4)) // 4096
    assert "1 FAILED" in r.out
    assert sorted(os.listdir(out)) == ["b.bin", "c.txt"]  # nothing half-made of a.bin
    assert (out / "b.bin").read_bytes() == (src / "b.bin").read_bytes()
    r = run("files", "cat", "--repo", tmp_path / "repo", point, "/a.bin")
    assert r.rc == 3 and "/a.bin" in r.err and "checksum mismatch" in r.err


# -- random trees --------------------------------------------------------------------------

names = st.text(alphabet=st.sampled_from("abcXYZ09-_. äé日😀"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and s.strip() == s)
trees = st.recursive(
    st.one_of(st.binary(max_size=3000), st.tuples(st.just("link"), names), st.tuples(st.just("sparse"), st.integers(1, 4))),
    lambda kids: st.dictionaries(names, kids, max_size=5),
    max_leaves=20,
)


def _write(at: Path, node) -> None:
    if isinstance(node, dict):
        at.mkdir()
        for k, v in node.items():
            _write(at / k, v)
    elif isinstance(node, bytes):
        at.write_bytes(node)
    elif node[0] == "link":
        os.symlink(node[1], at)
    else:
        with open(at, "wb") as f:
            f.truncate(node[1] * MiB)
            f.seek(node[1] * MiB // 2)
            f.write(b"x")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(names, trees, max_size=6), mode=st.sampled_from([0o600, 0o644, 0o755]))
def test_random_trees_extract_identically(tree, mode):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        _write(src, tree)
        for dirpath, _dirs, files in os.walk(src):
            for f in files:
                p = Path(dirpath) / f
                if not p.is_symlink():
                    os.chmod(p, mode)
        img = ext4_image(tmp / "d.img", src, 64 * MiB)
        point_id = backup_images(tmp / "repo", [img])
        with Stack.open(tmp / "repo", cache_bytes=8 * MiB) as stack:
            pf = PointFiles(stack, stack.repo.point(point_id))
            fs = pf.filesystem(None)
            listed = {e.path for e in fs.walk("/")} - {"/lost+found"}
            want = {"/" + str(Path(d, n).relative_to(src)) for d, ds, fs_ in os.walk(src) for n in ds + fs_}
            assert listed == want
            res = extract(fs, [fs.stat("/")], tmp / "out", preserve=True)
        assert res.failed == []
        shutil.rmtree(tmp / "out" / "lost+found")
        compare_trees(src, tmp / "out")


def test_a_corrupted_chunk_under_a_directory_fails_that_directory_only(tmp_path):
    src = tmp_path / "src"
    (src / "d1").mkdir(parents=True)
    for i in range(1500):  # 14 directory blocks, far from the root's
        (src / "d1" / f"name-with-some-length-{i:05d}").write_bytes(b"")
    (src / "ok-empty").write_bytes(b"")
    os.symlink("d1", src / "lnk")
    img = ext4_image(tmp_path / "d.img", src, 64 * MiB)
    blocks = [int(b) for b in sh("debugfs", "-R", "blocks /d1", img).stdout.split()]
    assert blocks[0] * 4096 >= 1 * MiB  # not in the chunk of the root directory and inode table
    point = backup_images(tmp_path / "repo", [img])
    _corrupt_chunk_under(tmp_path / "repo", point, blocks[len(blocks) // 2] * 4096)
    r = run("files", "ls", "--repo", tmp_path / "repo", point, "/d1")
    assert r.rc == 3 and re.search(r"disk0: /d1: unreadable \(filesystem block \d+, disk0 offset \d+\): chunk at pack", r.err), r.err
    out = tmp_path / "out"
    r = run("files", "get", "--repo", tmp_path / "repo", point, "/", "-o", out)
    assert r.rc == 1 and "FAILED /d1: disk0: /d1" in r.err
    assert os.readlink(out / "lnk") == "d1" and (out / "ok-empty").exists()
