"""The guest builder (engine.vm.guest): reproducible, unmounted, bootable layout, the
files and modules it promises, the agent's config blob. No QEMU here."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine.errors import GuestBuildError
from engine.vm import guest as g
from tests.conftest import require, require_tool


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def tools():
    require(not g.missing_tools(), f"the guest builder lacks: {g.missing_tools()} (scripts/system-deps.sh test)")


@pytest.fixture()
def host_kernel(tools):
    k = g.host_kernel()
    require(k is not None, "no readable /boot/vmlinuz-* with its modules (the debian path is a slow test)")
    return k


# ---------------------------------------------------------------------- config blob


def test_config_blob_round_trips_every_field():
    blob = g.guest_config("run-1", value="v.42", mode="run", heartbeat_s=0.5, counter=True,
                          tcp=(22, 7000), http=(8080,), probe=("10.0.2.2:4000", "localhost:1"))
    assert blob.endswith(b"\n") and b"\n\n" not in blob
    assert g.parse_config(blob) == {"run": "run-1", "mode": "run", "heartbeat_s": "0.5", "counter": "1",
                                    "value": "v.42", "tcp": "22 7000", "http": "8080",
                                    "probe": "10.0.2.2:4000 localhost:1"}
    plain = g.parse_config(g.guest_config("r", mode="oneshot"))
    assert plain == {"run": "r", "mode": "oneshot", "heartbeat_s": "5", "counter": "0"}  # no value: nothing written


@pytest.mark.parametrize("kwargs", [
    {"run": "two words"}, {"run": ""}, {"run": "a\nmode=oneshot"}, {"run": "r", "value": "x=y"},
    {"run": "r", "mode": "reboot"}, {"run": "r", "tcp": (0,)}, {"run": "r", "http": (70000,)},
    {"run": "r", "tcp": (True,)}, {"run": "r", "probe": ("10.0.2.2",)}, {"run": "r", "probe": ("Host;rm:1",)},
    {"run": "r", "heartbeat_s": 0.0},
])
def test_config_refuses_what_the_agent_could_not_parse(kwargs):
    run = kwargs.pop("run")
    with pytest.raises(ValueError):
        g.guest_config(run, **kwargs)


def test_fw_cfg_args_write_the_blob_and_escape_commas(tmp_path):
    path = tmp_path / "a,b" / "cfg"
    path.parent.mkdir()
    blob = g.guest_config("r1", value="v")
    args = g.fw_cfg_args(blob, path)
    assert path.read_bytes() == blob
    assert args == ["-fw_cfg", f"name={g.FW_CFG_NAME},file={tmp_path}/a,,b/cfg"]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INSTANTNFS_GUEST_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert g.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("INSTANTNFS_GUEST_CACHE")
    assert g.default_cache_dir() == tmp_path / "xdg" / "instantnfs" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert g.default_cache_dir() == tmp_path / "home" / ".cache" / "instantnfs" / "guest"


# ---------------------------------------------------------------------- initramfs, modules


def test_module_closure_resolves_softdeps_aliases_and_builtins(tmp_path):
    base = tmp_path / "1.0"
    base.mkdir()
    (base / "modules.dep").write_text(
        "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n"
        "kernel/x_generic.ko:\nkernel/x-fast.ko:\nkernel/unused.ko:\n")
    (base / "modules.alias").write_text("alias crypto-x x_fast\nalias crypto-x x_generic\n")
    (base / "modules.softdep").write_text("softdep a pre: crypto-x post: unused\n")
    (base / "modules.builtin").write_text("kernel/drivers/inside.ko\n")
    order = g.module_closure("1.0", ("a", "inside"), tmp_path)
    assert order == ["kernel/x_generic.ko", "kernel/c.ko", "kernel/b.ko", "kernel/a.ko"]
    cfg = tmp_path / "config"
    cfg.write_text("CONFIG_VIRTIO_BLK=y\n")
    assert g.module_closure("1.0", ("virtio_blk",), tmp_path, cfg) == []  # built in: nothing to load
    with pytest.raises(GuestBuildError):
        g.module_closure("1.0", ("nosuch",), tmp_path)
    with pytest.raises(GuestBuildError):
        g.module_closure("1.0", ("virtio_blk",), tmp_path)  # neither a module nor built in


def test_initramfs_holds_every_bus_driver_dependencies_first(host_kernel):
    blob = g.build_initramfs(host_kernel)
    assert blob == g.build_initramfs(host_kernel)  # reproducible
    assert len(blob) % 512 == 0 and len(blob) < 16 << 20
    files = g.cpio_names(blob)
    order = files["modules.order"].decode().split()
    mods = [n.split(".ko")[0] for n in order]
    for m in ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "libata", "libahci", "ata_piix",
              "virtio_net", "qemu_fw_cfg", "ext4", "jbd2", "crc32c_generic", "scsi_mod"):
        assert m in mods, m
    assert sorted(n.removeprefix("lib/modules/") for n in files if n.startswith("lib/modules/") and ".ko" in n) \
        == sorted(order)
    assert len(mods) <= 30, mods  # the closure, not the module tree
    for dep, user in (("virtio", "virtio_blk"), ("scsi_mod", "sd_mod"), ("scsi_mod", "virtio_scsi"),
                      ("libata", "ahci"), ("libahci", "ahci"), ("libata", "ata_piix"), ("jbd2", "ext4"),
                      ("crc32c_generic", "jbd2"), ("virtio_ring", "virtio_net")):
        assert mods.index(dep) < mods.index(user), (dep, user)
    assert files["bin/busybox"] == Path(g.BUSYBOX).read_bytes()
    init = files["init"].decode()
    assert "findfs" in init and "switch_root" in init and f"LABEL={g.ROOT_LABEL}" in init
    assert "dev/console" in files and files["bin/findfs"] == b"busybox"


def test_cpio_reader_refuses_garbage():
    with pytest.raises(ValueError):
        g.cpio_names(b"070702" + b"0" * 200)


# ---------------------------------------------------------------------- the disk


def _mtools(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, check=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})


def test_same_inputs_give_the_same_bytes(tmp_path, host_kernel):
    a = g.ensure_guest(tmp_path / "a")
    time.sleep(1.1)  # a wall-clock second apart, so a leaked timestamp shows
    b = g.ensure_guest(tmp_path / "b")
    assert a.size == b.size == g.DISK_SIZE == a.disk.stat().st_size
    assert a.kver == b.kver == host_kernel.kver
    assert _sha(a.disk) == _sha(b.disk)
    assert json.loads((a.disk.parent / "guest.json").read_text())["disk_sha256"] == _sha(a.disk)


def test_disk_boots_from_mbr_fat_and_finds_ext4_root(tmp_path, host_kernel):
    require_tool("e2fsck", "dumpe2fs", "mtype", "mdir")
    guest = g.ensure_guest(tmp_path / "cache")
    img = guest.disk
    parts = g.partitions(img)
    assert parts == [(g.BOOT_PART_TYPE, g.BOOT_OFFSET, g.BOOT_SECTORS * 512, True),
                     (0x83, g.ROOT_OFFSET, g.DISK_SIZE - g.ROOT_OFFSET, False)]
    assert g.root_offset(img) == g.ROOT_OFFSET
    head = img.read_bytes()[:512]
    mbr = next(Path(p) for p in g.SYSLINUX_MBR if Path(p).exists())
    assert head[:440] == mbr.read_bytes()[:440]  # syslinux's MBR code, then our disk id
    assert head[440:444] == int(g.MBR_ID, 16).to_bytes(4, "little")
    # the FAT: BIOS syslinux, EFI syslinux, kernel, initramfs, one config for both
    fat = f"{img}@@{g.BOOT_OFFSET}"
    listing = _mtools(["mdir", "-a", "-b", "-i", fat, "::/"]).stdout.decode().split()
    for name in ("::/ldlinux.sys", "::/ldlinux.c32", "::/vmlinuz", "::/initrd.img", "::/syslinux.cfg"):
        assert name in listing, listing
    cfg = _mtools(["mtype", "-i", fat, "::/syslinux.cfg"]).stdout.decode()
    assert f"root=LABEL={g.ROOT_LABEL}" in cfg and "console=ttyS0" in cfg and "INITRD /initrd.img" in cfg
    assert _mtools(["mtype", "-i", fat, "::/EFI/BOOT/syslinux.cfg"]).stdout.decode() == cfg
    assert _mtools(["mtype", "-i", fat, "::/EFI/BOOT/BOOTX64.EFI"]).stdout == Path(g.SYSLINUX_EFI).read_bytes()
    assert _mtools(["mtype", "-i", fat, "::/EFI/BOOT/ldlinux.e64"]).stdout == Path(g.LDLINUX_E64).read_bytes()
    assert _mtools(["mtype", "-i", fat, "::/vmlinuz"]).stdout == host_kernel.vmlinuz.read_bytes()
    initrd = g.cpio_names(_mtools(["mtype", "-i", fat, "::/initrd.img"]).stdout)
    assert "qemu_fw_cfg.ko" in initrd["modules.order"].decode()
    # the ext4 root: clean, labelled, the data files the guest checks, the agent
    p2 = tmp_path / "p2.img"
    with open(img, "rb") as src, open(p2, "wb") as dst:
        src.seek(g.ROOT_OFFSET)
        shutil.copyfileobj(src, dst)
    fsck = subprocess.run(["e2fsck", "-fn", str(p2)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = subprocess.run(["dumpe2fs", "-h", str(p2)], capture_output=True, text=True, check=True).stdout
    assert f"Filesystem volume name:   {g.ROOT_LABEL}" in dump and g.FS_UUID in dump
    for path, digest in g.expected_sha256().items():
        assert hashlib.sha256(g.read_guest_file(img, path)).hexdigest() == digest, path
    manifest = g.read_guest_file(img, "/etc/guest/manifest.sha256").decode()
    assert manifest.count("\n") == len(g.DATA_FILES)
    init = g.read_guest_file(img, "/sbin/init").decode()
    for marker in ("GUEST-HEARTBEAT ok", "GUEST-DONE", "GUEST-READY", "GUEST-COUNTER", "GUEST-PROBE",
                   "/sys/firmware/qemu_fw_cfg/by_name/" + g.FW_CFG_NAME + "/raw"):
        assert marker in init, marker
    with pytest.raises(FileNotFoundError):
        g.read_guest_file(img, "/var/heartbeat.txt")  # written only by a boot


def test_replayed_read_matches_and_leaves_the_image_alone(tmp_path, host_kernel):
    require_tool("e2fsck")
    img = tmp_path / "g.img"
    shutil.copyfile(g.ensure_guest(tmp_path / "cache").disk, img)
    before = _sha(img)
    assert g.read_guest_file(img, "/data/lines.txt", replay_journal=True) == g.read_guest_file(img, "/data/lines.txt")
    with pytest.raises(FileNotFoundError):
        g.read_guest_file(img, "/var/counter.log", replay_journal=True)
    assert _sha(img) == before
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4096))
    with pytest.raises(ValueError):
        g.read_guest_file(blank, "/etc/hostname")  # no MBR


def test_two_builders_at_once_share_one_result(tmp_path, host_kernel):
    cache = tmp_path / "cache"
    results: list[g.Guest] = []
    errors: list[BaseException] = []
    phases: list[str] = []

    def build() -> None:
        try:
            results.append(g.ensure_guest(cache, progress=lambda phase, _detail: phases.append(phase)))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == results[1]
    assert _sha(results[0].disk) == json.loads((results[0].disk.parent / "guest.json").read_text())["disk_sha256"]
    assert sorted(p.name for p in cache.iterdir()) == [results[0].disk.parent.name]  # no temporary left
    assert {"kernel", "initramfs", "root", "boot", "done"} <= set(phases)
    phases.clear()
    assert g.ensure_guest(cache, progress=lambda phase, _detail: phases.append(phase)) == results[0]
    assert phases == ["done"]  # reused, not rebuilt


def test_build_refuses_a_small_disk_and_a_dynamic_busybox(tmp_path, host_kernel, monkeypatch):
    with pytest.raises(GuestBuildError):
        g.build_disk(tmp_path / "x.img", host_kernel, b"", size=32 << 20)
    monkeypatch.setattr(g, "BUSYBOX", "/bin/ls")  # dynamically linked
    with pytest.raises(GuestBuildError, match="busybox-static"):
        g.build_initramfs(host_kernel)


def test_command_line_builds_with_progress_and_prints_the_disk(tmp_path, host_kernel, capsys):
    assert g.main(["--cache-dir", str(tmp_path), "--progress"]) == 0
    out, err = capsys.readouterr()
    disk = Path(out.strip())
    assert disk.parent.parent == tmp_path and disk.stat().st_size == g.DISK_SIZE
    assert [ln.split(":")[1] for ln in err.splitlines()] == [" kernel", " initramfs", " root", " boot", " done"]
    assert g.main(["--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr() == (out, "")  # reused, silently


def test_a_killed_builders_leftovers_are_swept(tmp_path, host_kernel):
    import os

    cache = tmp_path / "cache"
    stale = cache / ".0123456789abcdef-dead"
    fresh = cache / ".0123456789abcdef-busy"  # another builder at work right now
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "guest.img").write_bytes(b"half")
    old = time.time() - g.STALE_BUILD_S - 60
    os.utime(stale, (old, old))
    g.ensure_guest(cache)
    assert not stale.exists() and fresh.exists()
