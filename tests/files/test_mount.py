"""``instantnfs files mount``: an ext4 guest (mke2fs -d, no kernel mount of it) backed up,
mounted through FUSE and compared with its source tree: contents, types, modes, owners,
times, symlink targets, hard links, a directory larger than one READDIR reply. Writes
get EROFS; SIGTERM (to the PID the test started) and SIGINT unmount; bad mount points
and a missing /dev/fuse give clear errors."""
from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.files import fusemount
from engine.files.fusemount import is_mounted
from tests.cli import run
from tests.conftest import require, require_tool
from tests.files.images import MiB, backup_images, digest, ext4_image, sh
from tests.files.test_ext4 import _corrupt_chunk_under

pytestmark = pytest.mark.timeout(300)
MANY = 3000  # names in one directory: many READDIR replies


def _tree(src: Path) -> None:
    src.mkdir()
    (src / "hello.txt").write_text("hello, world\n")
    os.chmod(src / "hello.txt", 0o640)
    (src / "random.bin").write_bytes(os.urandom(5 * MiB + 123))
    os.chmod(src / "random.bin", 0o751)
    (src / "empty").write_bytes(b"")
    with open(src / "sparse", "wb") as f:
        f.truncate(64 * MiB)
        f.seek(40 * MiB)
        f.write(b"island")
    (src / "sub" / "deeper").mkdir(parents=True)
    os.chmod(src / "sub", 0o750)
    (src / "sub" / "deeper" / "setuid").write_text("s\n")
    os.chmod(src / "sub" / "deeper" / "setuid", 0o4755)
    os.symlink("hello.txt", src / "link-rel")
    os.symlink("/etc/passwd", src / "link-abs")
    os.symlink("../../../outside", src / "link-out")
    os.link(src / "hello.txt", src / "sub" / "hardlink")
    (src / "utf8-ÄÖÜ-日本語.txt").write_text("unicode\n")
    (src / os.fsdecode(b"latin1-\xe9t\xe9")).write_text("bytes\n")
    os.mkfifo(src / "a-fifo")
    if os.geteuid() == 0:
        os.chown(src / "random.bin", 1234, 5678)
    many = src / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"file-with-a-longish-name-{i:06d}").write_text(str(i))
    os.utime(src / "hello.txt", (1_600_000_000, 1_500_000_000))


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    require_tool("mke2fs", "fusermount3")
    require(fusemount.fuse_problem() is None, f"FUSE is not usable here: {fusemount.fuse_problem()}")
    tmp = tmp_path_factory.mktemp("mount")
    _tree(tmp / "src")
    img = ext4_image(tmp / "disk.img", tmp / "src", 128 * MiB)
    return tmp, backup_images(tmp / "repo", [img], vm="web01")


class Mount:
    """``files mount --foreground`` as a process of ours: stopped by its PID."""

    def __init__(self, repo: Path, point: str, mnt: Path, *extra: str) -> None:
        mnt.mkdir(exist_ok=True)
        self.mnt = mnt
        self.log = mnt.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "engine.control.cli", "files", "mount", "--repo", str(repo),
                                          point, *extra, str(mnt), "--foreground"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not is_mounted(mnt.resolve()):
            assert self.proc.poll() is None, f"the mount exited {self.proc.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"not mounted after 60 s: {self.log.read_text()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if is_mounted(self.mnt.resolve()):
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)


def test_a_mounted_point_shows_the_source_tree(point):
    tmp, pid = point
    src = tmp / "src"
    m = Mount(tmp / "repo", pid, tmp / "mnt")
    try:
        mnt = m.mnt
        seen = 0
        for dirpath, dirs, files in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            assert sorted(os.listdir(mnt / rel)) == sorted(dirs + files + (["lost+found"] if rel == Path(".") else []))
            for name in dirs + files:
                s, o = os.lstat(Path(dirpath) / name), os.lstat(mnt / rel / name)
                assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(o.st_mode), rel / name
                assert (s.st_uid, s.st_gid) == (o.st_uid, o.st_gid), rel / name
                assert int(s.st_mtime) == o.st_mtime_ns // 10**9, rel / name
                if stat.S_ISLNK(s.st_mode):
                    assert os.readlink(Path(dirpath) / name) == os.readlink(mnt / rel / name)
                    continue
                assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(o.st_mode), rel / name
                if stat.S_ISREG(s.st_mode):
                    assert s.st_size == o.st_size and s.st_nlink == o.st_nlink, rel / name
                    assert digest(Path(dirpath) / name) == digest(mnt / rel / name), rel / name
                seen += 1
        assert seen > MANY
        # one inode for two names of a hard link; a range read in the middle of a sparse file
        assert os.stat(mnt / "hello.txt").st_ino == os.stat(mnt / "sub" / "hardlink").st_ino
        with open(mnt / "sparse", "rb") as f:
            assert os.pread(f.fileno(), 10, 40 * MiB - 2) == b"\0\0island\0\0"
        assert os.listdir(os.fsencode(mnt)).count(b"latin1-\xe9t\xe9") == 1
        assert (mnt / "link-rel").read_text() == "hello, world\n"  # resolved inside the mount
        # read-only: the kernel refuses every write with EROFS
        for attempt in (lambda: open(mnt / "hello.txt", "a"), lambda: open(mnt / "new", "w"),
                        lambda: os.mkdir(mnt / "d"), lambda: os.unlink(mnt / "empty"),
                        lambda: os.chmod(mnt / "hello.txt", 0o777), lambda: os.rename(mnt / "empty", mnt / "e2")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "no-such-name")
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize == 128 * MiB and st.f_bavail == 0
    finally:
        rc = m.stop(signal.SIGTERM)
    assert rc == 0, m.log.read_text()
    assert not is_mounted(m.mnt.resolve()) and os.listdir(m.mnt) == []
    assert "mounted ext4 disk0" in m.log.read_text() and "Traceback" not in m.log.read_text()


def test_ctrl_c_unmounts_and_a_volume_can_be_named(point):
    tmp, pid = point
    m = Mount(tmp / "repo", pid, tmp / "mnt-int", "disk0")
    try:
        assert (m.mnt / "sub" / "deeper" / "setuid").read_text() == "s\n"
    finally:
        rc = m.stop(signal.SIGINT)
    assert rc == 0 and not is_mounted(m.mnt.resolve()), m.log.read_text()


def test_in_the_background_it_prints_its_pid_and_stops_on_sigterm(point):
    tmp, pid = point
    mnt = tmp / "mnt-bg"
    mnt.mkdir()
    r = run("files", "mount", "--repo", tmp / "repo", pid, mnt, timeout=120)
    assert r.rc == 0, r.err
    found = re.search(r"read-only at (\S+) \(pid (\d+)\)", r.out)
    assert found and found.group(1) == str(mnt.resolve()), r.out
    daemon = int(found.group(2))
    try:
        assert is_mounted(mnt.resolve())
        assert (mnt / "hello.txt").read_text() == "hello, world\n"
    finally:
        os.kill(daemon, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_mounted(mnt.resolve()):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    assert not os.path.exists(f"/proc/{daemon}") and not is_mounted(mnt.resolve())


def test_bad_mount_points_give_clear_errors(point):
    tmp, pid = point
    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("x")
    for target, says in ((full, "is not empty"), (tmp / "missing", "does not exist"),
                         (tmp / "src" / "hello.txt", "is not a directory")):
        r = run("files", "mount", "--repo", tmp / "repo", pid, target, "--foreground", timeout=60)
        assert r.rc == 2 and says in r.err and "Traceback" not in r.err, r.err
    (tmp / "mnt-none").mkdir()
    r = run("files", "mount", "--repo", tmp / "repo", pid, "disk0:7", tmp / "mnt-none", "--foreground", timeout=60)
    assert r.rc == 2 and "no volume 'disk0:7'" in r.err and not is_mounted((tmp / "mnt-none").resolve())
    r = run("files", "mount", "--repo", tmp / "repo", pid, "disk0", tmp / "a", tmp / "b", timeout=60)
    assert r.rc == 2 and "one directory" in r.err


def test_a_corrupted_chunk_is_eio_for_its_file_only_and_the_mount_stays(point, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(4 * MiB))
    (src / "b.bin").write_bytes(os.urandom(4 * MiB))
    img = ext4_image(tmp_path / "d.img", src, 64 * MiB)
    first = int(re.search(r"\(0-\d+\):(\d+)-", sh("debugfs", "-R", "stat /a.bin", img).stdout.decode()).group(1))
    pid = backup_images(tmp_path / "repo", [img])
    _corrupt_chunk_under(tmp_path / "repo", pid, first * 4096 + 2 * MiB)  # the middle of a.bin
    m = Mount(tmp_path / "repo", pid, tmp_path / "mnt")
    try:
        with open(m.mnt / "a.bin", "rb") as f:
            assert f.read(4096) == (src / "a.bin").read_bytes()[:4096]  # its good part reads
            with pytest.raises(OSError) as e:
                f.seek(2 * MiB)
                f.read(4096)
            assert e.value.errno == errno.EIO
        assert (m.mnt / "b.bin").read_bytes() == (src / "b.bin").read_bytes()
    finally:
        rc = m.stop()
    log = m.log.read_text()
    assert rc == 0 and "/a.bin" in log and "checksum mismatch" in log and "Traceback" not in log, log


def test_without_dev_fuse_the_error_says_what_is_missing(monkeypatch):
    real = os.open

    def no_fuse(path, *a, **kw):
        if str(path) == "/dev/fuse":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "open", no_fuse)
    why = fusemount.fuse_problem()
    assert why is not None and "/dev/fuse cannot be opened" in why and "modprobe fuse" in why
