"""End to end: guest disk -> backup() -> read back through the repository -> boot it.

The restored disk is produced only by ``open_disk(0).read()`` (the API the NFS server
serves from), so a boot that prints its heartbeat, passes its own data check and leaves
the value we gave it in /var/heartbeat.txt proves the read path returns a bootable,
byte-exact disk. The repository must not change while it is read.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.stack import Stack
from engine.vm.guest import ensure_guest, missing_tools, read_guest_file
from tests.conftest import require, require_tool
from tests.guest.boot import boot_guest
from tests.images import sha256_tree

MIB = 1 << 20




def _restore(repo_dir: Path, out: Path) -> str:
    """Write disk 0 of the latest point to a sparse raw file; returns its sha256."""
    h = hashlib.sha256()
    with Stack.open(repo_dir) as stack:
        repo = stack.repo
        disk = stack.backup_disk(repo.point("latest"), 0)
        with open(out, "wb") as f:
            f.truncate(disk.size)
            for off in range(0, disk.size, MIB):
                data = disk.read(off, MIB)
                assert len(data) == min(MIB, disk.size - off)
                h.update(data)
                if data.count(0) != len(data):
                    os.pwrite(f.fileno(), data, off)
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_backup_restore_boot(tmp_path):
    require_tool("qemu-system-x86_64")
    require(not missing_tools(), f"the guest builder lacks: {missing_tools()}")
    art = ensure_guest()
    src = tmp_path / "guest.img"
    shutil.copyfile(art.disk, src)
    src_sha = hashlib.sha256(src.read_bytes()).hexdigest()

    repo_dir = tmp_path / "repo"
    Repository.init(repo_dir)
    with Repository.open(repo_dir) as repo:
        manifest = backup(repo, BackupSettings(vm="guest"), [str(src)])
    assert manifest["disks"][0]["size"] == src.stat().st_size
    assert manifest["stats"]["zero_blocks"] > 0  # the empty tail of the disk is not stored
    before = sha256_tree(repo_dir)

    restored = tmp_path / "restored.img"
    assert _restore(repo_dir, restored) == src_sha

    value = f"e2e-{uuid.uuid4().hex[:12]}"
    result = boot_guest(restored, value, timeout=600, log_dir=tmp_path / "logs")
    assert f"GUEST-HEARTBEAT ok {result.run_id}" in result.console_log
    assert "GUEST-DONE" in result.console_log
    assert result.datacheck_ok, result.console_log[-2000:]
    assert read_guest_file(restored, "/var/heartbeat.txt").decode().strip() == value
    assert read_guest_file(restored, "/var/bootcount").decode().strip() == "1"
    # the boot wrote to the restored copy only
    assert hashlib.sha256(restored.read_bytes()).hexdigest() != src_sha
    assert sha256_tree(repo_dir) == before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_boot_fails_without_a_bootable_disk(tmp_path):
    """boot_guest succeeds only on the markers: a blank disk must raise, not pass."""
    require_tool("qemu-system-x86_64")
    require(not missing_tools(), f"the guest builder lacks: {missing_tools()}")
    from tests.guest.boot import BootError

    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(64 * MIB)
    with pytest.raises(BootError) as e:
        boot_guest(blank, "never", timeout=45, log_dir=tmp_path / "logs")
    # SeaBIOS finds nothing to boot and gives up (QEMU exits), or the wait times out
    assert "GUEST-HEARTBEAT" in str(e.value)
    assert "qemu exited" in str(e.value) or "timeout" in str(e.value)
