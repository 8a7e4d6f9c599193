"""The guest builder: reproducible, unmounted, with the files and modules it promises."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import require, require_tool
from tests.guest import make_guest_disk as mgd
from tests.guest.boot import read_guest_file


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def tools():
    require_tool("sfdisk", "mkfs.ext4", "debugfs")
    require(os.access(mgd.BUSYBOX, os.X_OK), f"{mgd.BUSYBOX} is missing (apt-get install busybox-static)")


def test_disk_is_byte_identical_across_builds(tmp_path, tools):
    a = mgd.build_disk(tmp_path / "a.img")
    time.sleep(1.1)  # a wall-clock second apart, so a leaked timestamp shows
    b = mgd.build_disk(tmp_path / "b.img")
    assert a.stat().st_size == mgd.DEFAULT_SIZE_MB << 20
    assert _sha(a) == _sha(b)


def test_disk_has_mbr_clean_ext4_and_known_files(tmp_path, tools):
    require_tool("e2fsck")
    img = mgd.build_disk(tmp_path / "g.img", size_mb=32)
    dump = subprocess.run(["sfdisk", "-d", str(img)], capture_output=True, text=True, check=True).stdout
    assert "label: dos" in dump and f"label-id: {mgd.MBR_ID}" in dump
    assert f"start={mgd.PART_START_SECTOR:>12}" in dump and "type=83" in dump
    # the ext4 root is clean (fsck -n exits 0) and carries the fixed UUID
    p1 = tmp_path / "p1.img"
    with open(img, "rb") as src, open(p1, "wb") as dst:
        src.seek(mgd.PART_OFFSET)
        shutil.copyfileobj(src, dst)
    fsck = subprocess.run(["e2fsck", "-fn", str(p1)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # every data file reads back with the sha256 the guest will check
    for path, digest in mgd.expected_sha256().items():
        assert hashlib.sha256(read_guest_file(img, path)).hexdigest() == digest, path
    manifest = read_guest_file(img, "/etc/guest/manifest.sha256").decode()
    assert manifest.count("\n") == len(mgd.DATA_FILES)
    init = read_guest_file(img, "/sbin/init").decode()
    assert "GUEST-HEARTBEAT ok" in init and "GUEST-DONE" in init
    with pytest.raises(FileNotFoundError):
        read_guest_file(img, "/var/heartbeat.txt")  # written only by a boot


def test_initramfs_holds_only_the_root_drivers(tmp_path, tools):
    kernel = mgd.host_kernel()
    kver = mgd.kernel_version(kernel)
    require(os.path.isdir(f"/lib/modules/{kver}"), f"no /lib/modules/{kver}")
    out = mgd.build_initramfs(tmp_path / "i.cpio", kver)
    files = mgd.cpio_names(out)
    mods = [n.rsplit("/", 1)[1].split(".ko")[0] for n in files if n.startswith("lib/modules/") and ".ko" in n]
    for m in ("virtio_pci", "virtio_blk", "ext4", "jbd2", "virtio", "virtio_ring", "crc32c_generic"):
        assert m in mods
    assert len(mods) <= 15, mods
    order = files["modules.order"].decode().split()
    # dependencies load before their users
    assert order.index("virtio.ko") < order.index("virtio_blk.ko")
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    assert order.index("crc32c_generic.ko") < order.index("jbd2.ko")
    assert files["bin/busybox"] == open(mgd.BUSYBOX, "rb").read()
    assert b"switch_root" in files["init"]
    assert "dev/console" in files
    assert out.stat().st_size < 8 << 20
    assert _sha(out) == _sha(mgd.build_initramfs(tmp_path / "j.cpio", kver))


def test_module_closure_resolves_softdeps_and_aliases(tmp_path):
    base = tmp_path / "1.0"
    base.mkdir()
    (base / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n"
        "kernel/x_generic.ko:\nkernel/x-fast.ko:\nkernel/unused.ko:\n")
    (base / "modules.alias").write_text("alias crypto-x x_fast\nalias crypto-x x_generic\n")
    (base / "modules.softdep").write_text("softdep a pre: crypto-x post: unused\n")
    order = mgd.module_closure("1.0", ("a",), str(tmp_path))
    assert order == ["kernel/x_generic.ko", "kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]
    with pytest.raises(mgd.BuildError):
        mgd.module_closure("1.0", ("nosuch",), str(tmp_path))
