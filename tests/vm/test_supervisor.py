"""Supervised QEMU without a guest OS: the probe's boot program (``BOOT_PROGRAM``: prints
``B``, writes a sector and prints ``W`` or ``E``, then ``PLM`` and halts) keeps QEMU
running and proves the guest's disk writes; a patterned 64 MiB data disk is mirrored.

- start from a separate "daemon" process, SIGTERM to that process's group, the VM lives
  on and a new Supervisor adopts it (QMP back, state from query-status); list; live
  mirror with writes during the copy (HMP ``qemu-io``), pivot, writes after it land in
  the target only; a cancelled mirror leaves no target; an existing target is refused;
  stop; a third Supervisor sees it exited; remove.
- a VM that dies by itself is reaped with its exit status; close + adopt in one process;
  a running name is refused; wait_for raises when the VM exits.
- werror=stop: the disk is a sparse file on a full 8 MiB tmpfs, the guest's write fails
  with ENOSPC, the VM pauses with status io-error; resume_paused() while still full
  pauses it again; once space is freed resume_paused() lets the write through.
- accel_verdict with the real probe: one of the two, remembered; the environment wins.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.errors import Cancelled, OutputRefused, UsageError, VMError
from engine.vm import qemu
from engine.vm.migrate import mirror
from engine.vm.qemu import BOOT_PROGRAM, DiskSpec, VMSpec
from engine.vm.supervisor import Supervisor, is_our_qemu
from tests.conftest import require, require_tool, small_tmpfs

pytestmark = pytest.mark.slow
MiB = 1 << 20
BOOTED = r"B[WE]PLM"


def boot_disk(path: Path, size: int = 4 * MiB) -> Path:
    with open(path, "wb") as f:
        f.write(BOOT_PROGRAM)
        f.truncate(size)
    return path


def patterned(path: Path, size: int = 64 * MiB) -> bytearray:
    data = bytearray(np.arange(size // 4, dtype="<u4").tobytes())
    path.write_bytes(data)
    return data


def qemu_io_write(vm, disk: int, off: int, length: int, byte: int) -> None:
    out = vm.qmp().hmp(f'qemu-io disk{disk} "write -P {byte:#x} {off} {length}"')
    assert "error" not in out.lower() and "fail" not in out.lower(), out  # (its report goes to stdout)


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.05)


STARTER = """
import json, sys
from engine.vm.qemu import DiskSpec, VMSpec
from engine.vm.supervisor import Supervisor
sup = Supervisor(sys.argv[1])
vm = sup.start(VMSpec("a", [DiskSpec(sys.argv[2]), DiskSpec(sys.argv[3], bus="sata")], memory_mib=64, accel="tcg",
                      owner="test"))
vm.wait_for("PLM", 60)
print(json.dumps({"pid": vm.pid}), flush=True)
sys.stdin.read()
"""


def test_adopt_survive_mirror_stop(tmp_path):
    require_tool(qemu.QEMU, "qemu-img")
    state = tmp_path / "vms"
    disk0 = boot_disk(tmp_path / "boot.img")
    disk1 = tmp_path / "data.img"
    expected = patterned(disk1)

    # the "daemon" starts the VM in its own process group, then its group gets SIGTERM
    daemon = subprocess.Popen([sys.executable, "-c", STARTER, str(state), str(disk0), str(disk1)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        line = daemon.stdout.readline()
        assert line, f"the starter failed (exit {daemon.wait(30)})"
        pid = json.loads(line)["pid"]
        os.killpg(daemon.pid, signal.SIGTERM)
        assert daemon.wait(10) == -signal.SIGTERM
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    sup = Supervisor(state)
    try:
        time.sleep(0.3)  # a signal to the group would have arrived by now
        assert is_our_qemu(pid, sup.files("a"), "a"), "QEMU died with the process group that started it"
        assert not is_our_qemu(os.getpid(), sup.files("a"), "a")

        [vm] = sup.adopt()
        assert (vm.name, vm.pid, vm.state, vm.status, vm.accel, vm.spec.owner) == ("a", pid, "running", "running",
                                                                                  "tcg", "test")
        assert vm.qmp().execute("query-status")["status"] == "running"
        assert [v.name for v in sup.list()] == ["a"]
        assert sup.get("a") is vm and sup.get("b") is None
        assert vm.wait_for(BOOTED, 5) == "BWPLM"
        with open(disk0, "rb") as f:  # the guest's own write, through virtio-blk
            f.seek(MiB)
            assert f.read(512) == BOOT_PROGRAM

        # live mirror of the data disk, the guest's disk written during the copy
        target = tmp_path / "prod" / "data.raw"
        target.parent.mkdir()
        writes = [(0, 65536, 0x5A), (32 * MiB + 4096, 8192, 0x11), (63 * MiB, MiB, 0x22)]
        phases: list[tuple[str, int, int]] = []

        etas: list[float] = []

        def progress(phase, done, total, eta):
            phases.append((phase, done, total))
            if phase == "mirror" and eta is not None:
                etas.append(eta)
            if phase == "mirror" and writes:
                off, n, b = writes.pop(0)
                qemu_io_write(vm, 1, off, n, b)
                expected[off:off + n] = bytes([b]) * n

        r = mirror(vm, 1, str(target), "raw", progress, speed=16 * MiB)
        assert not writes, f"the copy was over before the writes: {phases}"
        assert r["target"] == str(target) and r["bytes"] == 64 * MiB and r["bytes_copied"] >= 64 * MiB
        assert phases[-1][0] == "pivot" and any(p[0] == "ready" for p in phases)
        assert etas and all(e >= 0 for e in etas)  # from the rate, while copying
        assert all(0 <= d <= t for _, d, t in phases)
        assert target.read_bytes() == expected
        src_after = disk1.read_bytes()
        qemu_io_write(vm, 1, 5 * MiB, 4096, 0x77)  # after the pivot: the target, not the source
        expected[5 * MiB:5 * MiB + 4096] = b"\x77" * 4096
        assert target.read_bytes() == expected
        assert disk1.read_bytes() == src_after
        assert vm.disks[1].source == str(target)
        saved = json.loads(sup.files("a").vm_json.read_text())
        assert saved["disks"][1]["source"] == str(target) and saved["spec"]["disks"][1]["source"] == str(disk1)
        assert vm.refresh() == "running"

        # a cancelled mirror leaves no target and the disk where it was
        target2 = tmp_path / "prod" / "again.qcow2"
        cancel = threading.Event()
        with pytest.raises(Cancelled):
            mirror(vm, 1, str(target2), "qcow2", lambda *a: cancel.set(), cancel, speed=MiB)
        assert not target2.exists()
        qemu_io_write(vm, 1, 6 * MiB, 4096, 0x78)
        expected[6 * MiB:6 * MiB + 4096] = b"\x78" * 4096
        assert target.read_bytes() == expected
        assert not [n for n in vm.qmp().execute("query-named-block-nodes") if n["node-name"].startswith("mig1-")
                    and n["file"] != str(target)]
        with pytest.raises(OutputRefused):
            mirror(vm, 1, str(disk0), "raw")
        assert disk0.stat().st_size == 4 * MiB

        stopped = sup.stop("a")
        assert stopped.state == "exited" and not is_our_qemu(pid, sup.files("a"), "a")
        sup.close()
        sup = Supervisor(state)
        [again] = sup.adopt()
        assert again.state == "exited" and again.disks[1].source == str(target)
        with pytest.raises(VMError):
            again.qmp()
        sup.remove("a")
        assert not sup.files("a").dir.exists() and sup.list() == []
    finally:
        if is_our_qemu(pid, sup.files("a"), "a"):
            os.kill(pid, signal.SIGKILL)
        sup.close()


def test_exit_reaped_close_adopt(tmp_path):
    require_tool(qemu.QEMU)
    state = tmp_path / ("long-" + "d" * 100) / "vms"  # the QMP socket's path is longer than 107 bytes
    sup = Supervisor(state)
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * MiB)
    spec = VMSpec("b", [DiskSpec(str(boot_disk(tmp_path / "b.img")), bus="ide"), DiskSpec(str(blank), bus="scsi")],
                  memory_mib=64, accel="tcg", net="user-restricted", forwards={22: 0})
    vm = sup.start(spec)
    try:
        assert vm.wait_for(BOOTED, 60) == "BWPLM"  # IDE on pc's PIIX: the guest's write worked
        port = vm.forwards[22]
        assert port > 0 and json.loads(sup.files("b").vm_json.read_text())["forwards"] == {"22": port}
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # QEMU listens there for the guest
        with pytest.raises(UsageError, match="running"):
            sup.start(spec)
        sup.close()  # the daemon stops; the VM does not
        assert is_our_qemu(vm.pid, sup.files("b"), "b")
        sup2 = Supervisor(state)
        with pytest.raises(UsageError, match="running"):
            sup2.start(spec)  # not adopted yet, but its vm.json says it runs
        [vm2] = sup2.adopt()
        assert vm2.state == "running" and vm2.pid == vm.pid and len(str(sup2.files("b").qmp)) > 107
        vm2.qmp().execute("stop")
        assert sup2.get("b").state == "paused" and vm2.status == "paused"
        assert sup2.resume_paused() == []  # paused by hand, not by an I/O error
        vm2.qmp().execute("cont")
        assert vm2.refresh() == "running"
        sup2.stop("b")

        vm3 = sup2.start(spec)  # same name again, after it exited
        os.kill(vm3.pid, signal.SIGKILL)  # it dies by itself, as far as the supervisor knows
        with pytest.raises(VMError, match="exited"):
            vm3.wait_for("never printed", 30)
        assert vm3.state == "exited" and vm3.exit_status == -signal.SIGKILL
        assert json.loads(sup2.files("b").vm_json.read_text())["exit_status"] == -signal.SIGKILL
        sup2.remove("b")

        with pytest.raises(VMError, match="nosuch.img"):  # QEMU's own words, from qemu.log
            sup2.start(VMSpec("c", [DiskSpec(str(tmp_path / "nosuch.img"))], memory_mib=64, accel="tcg"))
        assert json.loads(sup2.files("c").vm_json.read_text())["state"] == "exited"
        assert sup2.get("c").state == "exited"
    finally:
        for v in (vm,):
            if is_our_qemu(v.pid, sup.files("b"), "b"):
                os.kill(v.pid, signal.SIGKILL)


@pytest.fixture
def full_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "small", "8m") as mnt:
        yield mnt


def test_io_error_pauses_and_resumes(tmp_path, full_tmpfs):
    require_tool(qemu.QEMU)
    disk = boot_disk(full_tmpfs / "disk.img")  # sparse: only its first page is allocated
    filler = full_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\xff" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the tmpfs is full
    finally:
        os.close(fd)
    sup = Supervisor(tmp_path / "vms")
    vm = sup.start(VMSpec("w", [DiskSpec(str(disk))], memory_mib=64, accel="tcg"))
    try:
        vm.wait_for("B", 60)
        ev = vm.qmp().wait_event("BLOCK_IO_ERROR", 60)
        assert ev["data"]["device"] == "disk0" and ev["data"]["action"] == "stop" and ev["data"].get("nospace")
        assert vm.refresh() == "paused" and vm.status == "io-error"
        assert "W" not in vm.serial_text()
        assert sup.resume_paused() == ["w"]  # still full: QEMU retries, fails, pauses again
        vm.qmp().wait_event("BLOCK_IO_ERROR", 60)
        assert vm.refresh() == "paused" and vm.status == "io-error"
        filler.unlink()
        assert sup.resume_paused() == ["w"]
        assert vm.wait_for(BOOTED, 60) == "BWPLM"
        assert vm.refresh() == "running"
        with open(disk, "rb") as f:
            f.seek(MiB)
            assert f.read(512) == BOOT_PROGRAM
        assert sup.resume_paused() == []

        # a mirror whose target runs out of space fails and leaves nothing behind
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\xff" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        target = full_tmpfs / "target.raw"
        with pytest.raises(VMError, match="mirror"):
            mirror(vm, 0, str(target), "raw")
        assert not target.exists()
        assert vm.refresh() == "running" and vm.disks[0].source == str(disk)
        assert not [n for n in vm.qmp().execute("query-named-block-nodes") if n["node-name"].startswith("mig")]
        assert (sup.files("w").dir.stat().st_mode & 0o777) == 0o700
    finally:
        sup.stop("w")
        sup.close()


def test_accel_verdict_probe(tmp_path, monkeypatch):
    require_tool(qemu.QEMU)
    monkeypatch.delenv("INSTANTNFS_VM_ACCEL", raising=False)
    verdict = qemu.accel_verdict(tmp_path)
    assert verdict in ("kvm", "tcg")
    if qemu.kvm_accessible():
        record = json.loads((tmp_path / "accel.json").read_text())[qemu.qemu_version()]
        assert record["verdict"] == verdict and record["reason"]
        print(f"accel verdict: {verdict}: {record['reason']}")
        monkeypatch.setattr(qemu, "probe_kvm", lambda *a: pytest.fail("probed twice"))
        assert qemu.accel_verdict(tmp_path) == verdict
    assert not list(tmp_path.glob("kvm-probe-*"))  # the probe's files are gone
    other = "kvm" if verdict == "tcg" else "tcg"
    monkeypatch.setenv("INSTANTNFS_VM_ACCEL", other)
    assert qemu.accel_verdict(tmp_path) == other


def test_efi_firmware_runs(tmp_path):
    require_tool(qemu.QEMU)
    require(qemu.OVMF_CODE.is_file(), "OVMF is not installed (apt-get install ovmf)")
    sup = Supervisor(tmp_path / "vms")
    vm = sup.start(VMSpec("e", [DiskSpec(str(boot_disk(tmp_path / "e.img")), bus="sata")], memory_mib=128,
                          firmware="efi", accel="tcg", fw_cfg=b"run=efi\n"))
    try:
        assert "BdsDxe" in vm.wait_for("BdsDxe", 120)  # OVMF's boot manager on the serial console
        assert sup.files("e").efi_vars.stat().st_size == qemu.OVMF_VARS.stat().st_size
        assert "BWPLM" not in vm.serial_text()  # a BIOS boot sector does not run under EFI
    finally:
        sup.stop("e")
        sup.close()
