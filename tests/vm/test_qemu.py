"""QEMU command lines per bus, firmware and network; option escaping; forwards; the
accel probe's verdict, its memory and its override; the probe's boot program matches
its source."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from engine.errors import UsageError
from engine.vm import qemu
from engine.vm.qemu import (
    BOOT_PROGRAM,
    BOOT_PROGRAM_S,
    DiskSpec,
    VMFiles,
    VMSpec,
    command_line,
    esc,
)
from tests.conftest import require, require_tool


def files(tmp_path: Path) -> VMFiles:
    return VMFiles(tmp_path / "vm")


def opt(cmd: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == flag]


def devices(cmd: list[str]) -> list[str]:
    return opt(cmd, "-device")


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(b"\0" * 4096)
    return str(p)


def test_virtio_bios_basics(tmp_path, disk):
    spec = VMSpec("web-1", [DiskSpec(disk), DiskSpec(disk, "qcow2")], memory_mib=512, cpus=2)
    f = files(tmp_path)
    cmd = command_line(spec, f, accel="tcg")
    assert opt(cmd, "-name") == ["web-1"]
    assert opt(cmd, "-machine") == ["q35"]
    assert opt(cmd, "-accel") == ["tcg"] and opt(cmd, "-cpu") == ["max"]
    assert opt(cmd, "-m") == ["512"] and opt(cmd, "-smp") == ["2"]
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in cmd
    assert opt(cmd, "-display") == ["none"]
    assert opt(cmd, "-pidfile") == [str(f.pidfile)]
    chardevs = opt(cmd, "-chardev")
    assert f"file,id=serial0,path={f.serial}" in chardevs
    assert "socket,id=qmp0,path=qmp.sock,server=on,wait=off" in chardevs  # relative to f.dir, where QEMU runs
    assert opt(cmd, "-mon") == ["chardev=qmp0,mode=control"]
    drives = opt(cmd, "-drive")
    assert len(drives) == 2
    assert drives[0].startswith(f"file={disk},format=raw,if=none,id=disk0,werror=stop,rerror=stop,cache=")
    assert ",format=qcow2," in drives[1] and "id=disk1" in drives[1]
    assert devices(cmd) == ["virtio-blk-pci,drive=disk0,id=dev0,bootindex=0", "virtio-blk-pci,drive=disk1,id=dev1"]
    rel = command_line(VMSpec("r", [DiskSpec(os.path.relpath(disk))]), f, accel="tcg")
    assert opt(rel, "-drive")[0].startswith(f"file={disk},")  # QEMU runs in the VM's directory: absolute
    assert "-netdev" not in cmd and "-fw_cfg" not in cmd and "pflash" not in " ".join(cmd)
    assert opt(command_line(spec, f, accel="kvm"), "-cpu") == ["host"]


def test_scsi_sata_ide(tmp_path, disk):
    f = files(tmp_path)
    scsi = command_line(VMSpec("a", [DiskSpec(disk, bus="scsi"), DiskSpec(disk, bus="scsi")]), f, accel="tcg")
    assert devices(scsi) == ["virtio-scsi-pci,id=scsi0",
                             "scsi-hd,drive=disk0,id=dev0,bus=scsi0.0,channel=0,scsi-id=0,lun=0,bootindex=0",
                             "scsi-hd,drive=disk1,id=dev1,bus=scsi0.0,channel=0,scsi-id=1,lun=0"]
    sata = command_line(VMSpec("a", [DiskSpec(disk, bus="sata"), DiskSpec(disk, bus="sata")]), f, accel="tcg")
    assert opt(sata, "-machine") == ["q35"]  # ICH9's own AHCI ports
    assert devices(sata) == ["ide-hd,drive=disk0,id=dev0,bus=ide.0,bootindex=0", "ide-hd,drive=disk1,id=dev1,bus=ide.1"]
    ide = command_line(VMSpec("a", [DiskSpec(disk, bus="ide")] * 3 + [DiskSpec(disk, bus="sata")]), f, accel="tcg")
    assert opt(ide, "-machine") == ["pc"]  # real IDE: PIIX
    assert devices(ide) == ["ahci,id=ahci0",
                            "ide-hd,drive=disk0,id=dev0,bus=ide.0,unit=0,bootindex=0",
                            "ide-hd,drive=disk1,id=dev1,bus=ide.0,unit=1",
                            "ide-hd,drive=disk2,id=dev2,bus=ide.1,unit=0",
                            "ide-hd,drive=disk3,id=dev3,bus=ahci0.0"]
    with pytest.raises(UsageError, match="at most 4"):
        command_line(VMSpec("a", [DiskSpec(disk, bus="ide")] * 5), f, accel="tcg")
    with pytest.raises(UsageError, match="bus"):
        command_line(VMSpec("a", [DiskSpec(disk, bus="nvme")]), f, accel="tcg")


def test_efi_and_fw_cfg(tmp_path, disk):
    require(qemu.OVMF_VARS.is_file() and qemu.OVMF_CODE.is_file(), "OVMF is not installed (apt-get install ovmf)")
    f = files(tmp_path)
    spec = VMSpec("e", [DiskSpec(disk)], firmware="efi", fw_cfg=b"run=x\n")
    qemu.prepare_files(spec, f)
    assert f.fw_cfg.read_bytes() == b"run=x\n"
    assert f.efi_vars.read_bytes() == qemu.OVMF_VARS.read_bytes()
    cmd = command_line(spec, f, accel="tcg")
    assert opt(cmd, "-drive")[:2] == [f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_CODE}",
                                      f"if=pflash,format=raw,unit=1,file={f.efi_vars}"]
    assert opt(cmd, "-fw_cfg") == [f"name=opt/instantnfs/config,file={f.fw_cfg}"]
    f.efi_vars.write_bytes(b"nvram")  # the VM's own variables survive the next start
    qemu.prepare_files(spec, f)
    assert f.efi_vars.read_bytes() == b"nvram"


def test_commas_are_doubled(tmp_path):
    d = tmp_path / "a,b"
    d.mkdir()
    img = d / "x,y.img"
    img.write_bytes(b"\0" * 512)
    f = VMFiles(d / "vm,1")
    cmd = command_line(VMSpec("c", [DiskSpec(str(img)), DiskSpec("nfs://127.0.0.1/exp/s,1/disk.img")],
                              fw_cfg=b""), f, accel="tcg")
    drives = opt(cmd, "-drive")
    assert drives[0].startswith(f"file={tmp_path}/a,,b/x,,y.img,format=raw,")
    assert drives[1].startswith("file=nfs://127.0.0.1/exp/s,,1/disk.img,format=raw,") and "cache=none" in drives[1]
    assert f"file,id=serial0,path={tmp_path}/a,,b/vm,,1/serial.log" in opt(cmd, "-chardev")
    assert opt(cmd, "-fw_cfg") == [f"name=opt/instantnfs/config,file={tmp_path}/a,,b/vm,,1/fw_cfg.bin"]
    assert esc("a,,b") == "a,,,,b"
    with pytest.raises(UsageError):
        command_line(VMSpec("bad,name", [DiskSpec(str(img))]), f, accel="tcg")
    with pytest.raises(UsageError):
        command_line(VMSpec("../up", [DiskSpec(str(img))]), f, accel="tcg")


def test_networks_and_forwards(tmp_path, disk):
    f = files(tmp_path)
    user = command_line(VMSpec("n", [DiskSpec(disk)], net="user", forwards={80: 8080}), f, accel="tcg")
    assert opt(user, "-netdev") == ["user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80"]
    assert "virtio-net-pci,netdev=n0" in devices(user)
    fwd = qemu.resolve_forwards({22: 0, 80: 0, 443: 5443})
    assert fwd[443] == 5443 and fwd[22] != fwd[80] and all(1024 <= fwd[p] <= 65535 for p in (22, 80))
    with socket.socket() as s:  # a picked port was free
        s.bind(("127.0.0.1", fwd[22]))
    lab = command_line(VMSpec("n", [DiskSpec(disk)], net="user-restricted", forwards={22: 0, 80: 0}), f,
                       accel="tcg", forwards={22: fwd[22], 80: fwd[80]})
    assert opt(lab, "-netdev") == [f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{fwd[22]}-:22,"
                                   f"hostfwd=tcp:127.0.0.1:{fwd[80]}-:80"]
    with pytest.raises(UsageError, match="user network"):
        command_line(VMSpec("n", [DiskSpec(disk)], net="none", forwards={22: 0}), f, accel="tcg")
    with pytest.raises(UsageError, match="no bridge"):
        command_line(VMSpec("n", [DiskSpec(disk)], net="bridge:nosuchbr0"), f, accel="tcg")
    with pytest.raises(UsageError, match="interface name"):
        command_line(VMSpec("n", [DiskSpec(disk)], net="bridge:a,b"), f, accel="tcg")


def test_bridge_args(tmp_path, disk, monkeypatch):
    real = Path.is_dir
    monkeypatch.setattr(Path, "is_dir", lambda p: str(p) == "/sys/class/net/br7/bridge" or real(p))
    cmd = command_line(VMSpec("b", [DiskSpec(disk)], net="bridge:br7"), files(tmp_path), accel="tcg")
    assert opt(cmd, "-netdev") == ["bridge,id=n0,br=br7"]
    assert "virtio-net-pci,netdev=n0" in devices(cmd)


def test_spec_round_trip():
    spec = VMSpec("r", [DiskSpec("nfs://h/e/d", "qcow2", "sata")], 1024, 2, "efi", "user", {22: 0}, b"\0\x01k=v",
                  "tcg", "sandbox:x")
    assert VMSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_accel_forced_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTANTNFS_VM_ACCEL", "tcg")
    assert qemu.accel_verdict(tmp_path) == "tcg"
    monkeypatch.setenv("INSTANTNFS_VM_ACCEL", "kvm")
    assert qemu.accel_verdict(tmp_path) == "kvm"
    monkeypatch.setenv("INSTANTNFS_VM_ACCEL", "fast")
    with pytest.raises(UsageError):
        qemu.accel_verdict(tmp_path)
    monkeypatch.delenv("INSTANTNFS_VM_ACCEL")
    monkeypatch.setattr(qemu, "kvm_accessible", lambda: True)
    monkeypatch.setattr(qemu, "qemu_version", lambda *a: "9.9.9")
    probes = []
    monkeypatch.setattr(qemu, "probe_kvm", lambda d, k=None: probes.append(d) or (False, "test says no"))
    assert qemu.accel_verdict(tmp_path) == "tcg"
    assert qemu.accel_verdict(tmp_path) == "tcg"
    assert len(probes) == 1  # remembered
    assert json.loads((tmp_path / "accel.json").read_text())["9.9.9"]["reason"] == "test says no"
    monkeypatch.setattr(qemu, "qemu_version", lambda *a: "10.0.0")  # another QEMU probes again
    monkeypatch.setattr(qemu, "probe_kvm", lambda d, k=None: probes.append(d) or (True, "fine"))
    assert qemu.accel_verdict(tmp_path) == "kvm"
    assert len(probes) == 2
    monkeypatch.setattr(qemu, "kvm_accessible", lambda: False)
    assert qemu.accel_verdict(tmp_path) == "tcg"  # no /dev/kvm: no probe needed


def test_boot_program_is_its_source(tmp_path):
    require_tool("as", "ld")
    (tmp_path / "b.S").write_text(BOOT_PROGRAM_S)
    subprocess.run(["as", "--64", "-o", "b.o", "b.S"], cwd=tmp_path, check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", "0x7c00", "--oformat", "binary", "-o", "b.bin", "b.o"],
                   cwd=tmp_path, check=True)
    assert (tmp_path / "b.bin").read_bytes() == BOOT_PROGRAM
    assert len(BOOT_PROGRAM) == 512 and BOOT_PROGRAM[510:] == b"\x55\xaa"


def test_drive_cache(tmp_path):
    assert qemu.drive_cache("nfs://127.0.0.1/e/d") == "none"
    p = tmp_path / "x"
    p.write_bytes(b"\0" * 4096)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
        expect = "none"
    except OSError:
        expect = "writeback"
    assert qemu.drive_cache(str(p)) == expect
