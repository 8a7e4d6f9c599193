"""The guest boots from its own disk under QEMU (no -kernel), on every bus and firmware,
and its agent does what its fw_cfg config says. Slow: one TCG boot each (~12 s), with the
checks that can share a boot put into one (the run-mode boot checks networking, the
listeners, the probes and the counter)."""
from __future__ import annotations

import http.client
import shutil
import socket
import threading
import uuid
from pathlib import Path

import pytest

from engine.vm import guest as g
from tests.conftest import require, require_tool
from tests.guest.boot import boot_guest, start_guest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pristine() -> Path:
    require_tool("qemu-system-x86_64")
    require(not g.missing_tools(), f"the guest builder lacks: {g.missing_tools()} (scripts/system-deps.sh test)")
    return g.ensure_guest().disk


def _copy(pristine: Path, tmp_path: Path) -> Path:
    disk = tmp_path / "guest.img"
    shutil.copyfile(pristine, disk)
    return disk


def test_virtio_oneshot_writes_its_value(pristine, tmp_path):
    disk = _copy(pristine, tmp_path)
    value = f"v-{uuid.uuid4().hex[:12]}"
    r = boot_guest(disk, value, timeout=240, bus="virtio", log_dir=tmp_path / "logs")
    assert r.datacheck_ok, r.console_log[-2000:]
    assert "root=/dev/vda2 ext4" in r.console_log  # found by label on the virtio disk
    assert g.read_guest_file(disk, "/var/heartbeat.txt").decode().strip() == value
    assert g.read_guest_file(disk, "/var/bootcount").decode().strip() == "1"
    assert f"run={r.run_id} value={value}" in g.read_guest_file(disk, "/var/heartbeat.log").decode()


@pytest.mark.parametrize(("bus", "firmware"), [("scsi", "bios"), ("sata", "bios"), ("efi-virtio", "efi")])
def test_other_buses_and_efi_boot_to_done(pristine, tmp_path, bus, firmware):
    if firmware == "efi":
        require(Path(g.OVMF_CODE).exists() and Path(g.OVMF_VARS).exists(), "no OVMF (apt-get install ovmf)")
        bus = "virtio"
    disk = _copy(pristine, tmp_path)
    r = boot_guest(disk, f"{bus}-{firmware}", timeout=240, bus=bus, firmware=firmware, log_dir=tmp_path / "logs")
    assert r.datacheck_ok, r.console_log[-2000:]
    expect = "/dev/vda2" if bus == "virtio" else "/dev/sda2"
    assert f"root={expect} ext4" in r.console_log
    if firmware == "efi":
        assert "BdsDxe: starting" in r.console_log  # OVMF, not SeaBIOS, started the loader
    assert g.read_guest_file(disk, "/var/heartbeat.txt").decode().strip() == f"{bus}-{firmware}"


def test_ide_without_config_runs_as_the_demo(pristine, tmp_path):
    """No fw_cfg blob: mode run, run id none, heartbeats go on until QEMU is stopped."""
    disk = _copy(pristine, tmp_path)
    guest = start_guest(disk, bus="ide", work_dir=tmp_path / "logs")
    try:
        guest.wait_for(rf"^{g.HEARTBEAT} ok none n=1$", 240)
        assert "root=/dev/sda2 ext4" in guest.wait_for(r"^GUEST-INFO kernel=.* mode=run ", 30)
        assert guest.wait_for(rf"^{g.DATACHECK} ", 60) == f"{g.DATACHECK} ok"
        guest.wait_for(rf"^{g.READY} none$", 60)
        guest.wait_for(rf"^{g.HEARTBEAT} ok none n=2$", 30)  # every 5 s by default
    finally:
        guest.kill()


def _sentinel() -> tuple[socket.socket, int, threading.Event]:
    """A listener on the host's loopback that accepts and closes (the probe's target)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return s, s.getsockname()[1], stop


def test_run_mode_network_listeners_probes_and_durable_counter(pristine, tmp_path):
    disk = _copy(pristine, tmp_path)
    sentinel, open_port, stop = _sentinel()
    closed = socket.socket()  # bound, never listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    run = uuid.uuid4().hex[:12]
    config = g.guest_config(run, value="running", heartbeat_s=1.0, counter=True, tcp=(7000,), http=(8080,),
                            probe=(f"10.0.2.2:{open_port}", f"10.0.2.2:{closed_port}"))
    guest = start_guest(disk, config=config, run_id=run, forwards={7000: 0, 8080: 0}, work_dir=tmp_path / "logs")
    try:
        guest.wait_for(rf"^{g.HEARTBEAT} ok {run} n=1$", 240)
        assert guest.wait_for(r"^GUEST-INFO net ", 60) == "GUEST-INFO net eth0 10.0.2.15/24 gw 10.0.2.2"
        assert guest.wait_for(rf"^{g.PROBE} 10.0.2.2:{open_port} ", 60).endswith(" open")
        assert guest.wait_for(rf"^{g.PROBE} 10.0.2.2:{closed_port} ", 60).endswith(" closed")
        guest.wait_for(rf"^{g.READY} {run}$", 60)
        # the listeners answer through the forwards, from the host
        with socket.create_connection(("127.0.0.1", guest.forwards[7000]), timeout=20) as c:
            c.settimeout(20)
            assert c.recv(100).startswith(b"instantnfs-guest")
        conn = http.client.HTTPConnection("127.0.0.1", guest.forwards[8080], timeout=20)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read().strip() == f"instantnfs guest {run}".encode()
        conn.close()
        guest.wait_for(rf"^{g.COUNTER} 8$", 60)
        guest.wait_for(rf"^{g.HEARTBEAT} ok {run} n=3$", 30)
    finally:
        guest.kill()  # a power cut: the counter's metadata is left in the journal
        stop.set()
        sentinel.close()
        closed.close()
    printed = [int(ln.split()[1]) for ln in guest.text().splitlines() if ln.startswith(f"{g.COUNTER} ")]
    assert printed == list(range(1, len(printed) + 1))
    logged = [int(x) for x in g.read_guest_file(disk, "/var/counter.log", replay_journal=True).split()]
    # every printed value was durable: consecutive from 1, at least up to the last printed
    assert logged == list(range(1, len(logged) + 1))
    assert len(logged) >= printed[-1] >= 8
    assert g.read_guest_file(disk, "/var/heartbeat.txt", replay_journal=True).decode().strip() == "running"
