"""The recovery product end to end, with a real guest booting out of a backup over our own
NFS server (TCG here): recover, migrate (copy and live), restart, sandboxes.

One daemon per module on a loopback address of its own (QEMU's libnfs asks the
portmapper on port 111 there); the guest (``engine.vm.guest``) is backed up once. Each
test names what it proves; booted guests are shared between checks where the checks
allow, since a TCG boot takes 10-30 s.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from engine.repo.ingest import BackupSettings, backup
from engine.repo.repository import Repository
from engine.vm import guest as vmguest
from tests.conftest import require, require_tool
from tests.images import repository_data
from tests.nfs.conftest import Daemon, give_address, take_address

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BOOT_S = 300.0  # a TCG boot on a loaded 2-core machine: generous, never a measure


def _tools() -> None:
    require_tool("qemu-system-x86_64", "qemu-img", "sfdisk", "mkfs.ext4", "debugfs", "mcopy", "syslinux")
    require(os.access("/bin/busybox", os.X_OK), "busybox-static is missing (bash scripts/system-deps.sh test)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    _tools()
    base = tmp_path_factory.mktemp("recovery")
    g = vmguest.ensure_guest()
    src = base / "guest.img"
    shutil.copyfile(g.disk, src)
    repo = base / "repo"
    Repository.init(repo)
    with Repository.open(repo) as r:
        m = backup(r, BackupSettings(vm="guest", cpus=1, memory_mib=256), [str(src)])
    src.unlink()
    exports = base / "exports"
    exports.mkdir()
    addr = take_address()
    d = Daemon(repo, base / "cache", addr, extra=["--export-dir", str(exports)])
    d.start(timeout=60)

    class Lab:
        daemon = d
        point = m["id"]
        disk = m["disks"][0]["name"]
        before = repository_data(repo)
        exports_dir = exports
        work = base

    try:
        yield Lab
    finally:
        for vm in _safe(lambda: d.api("GET", "/vms")) or []:
            _safe(lambda vm=vm: d.api("POST", f"/sessions/{vm['name']}/stop", {"discard": True}))
        d.stop()
        give_address(addr)
        after = repository_data(repo)  # the backup is sacred, whatever ran (a test may add a point)
        assert {k: after.get(k) for k in Lab.before} == Lab.before


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - clean-up
        return None


def console(d: Daemon, vm: str) -> str:
    return d.api("GET", f"/vms/{vm}/console?offset=0")["text"]


def wait_console(d: Daemon, vm: str, pattern: str, timeout: float = BOOT_S, count: int = 1) -> str:
    """The console once ``pattern`` (regex) has appeared ``count`` times; fails with its tail."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = console(d, vm)
        if len(re.findall(pattern, text)) >= count:
            return text
        state = d.api("GET", f"/vms/{vm}")["state"]
        if state not in ("running", "paused"):
            break
        time.sleep(0.5)
    pytest.fail(f"{vm}: no {pattern!r} x{count} on the console; its tail:\n{text[-3000:]}")


def wait_state(d: Daemon, vm: str, states: tuple[str, ...], timeout: float = BOOT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = d.api("GET", f"/vms/{vm}")
        if v["state"] in states:
            return v
        time.sleep(0.5)
    pytest.fail(f"{vm} not {states} after {timeout} s: {v}")


def wait_job(d: Daemon, job: dict, timeout: float = 600.0, confirm: bool = False) -> dict:
    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        if confirm and job["phase"] == "waiting":
            d.api("POST", f"/jobs/{job['id']}/confirm", {})
            confirm = False
        time.sleep(0.3)
        job = d.api("GET", f"/jobs/{job['id']}")
    assert job["state"] == "done", job
    return job


def counters(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"GUEST-COUNTER (\d+)", text)]


# -- recover, oneshot, copy migrate ------------------------------------------------------------


def test_recover_boot_then_migrate_exports_what_the_guest_wrote(lab: Any) -> None:
    """recover --boot: the heartbeat appears; the guest writes the value it was given and
    powers off; migrate (the VM has ended: a copy, confirmed) exports the disk; the value
    is in the exported image's filesystem, read without mounting."""
    d = lab.daemon
    value = f"rec-{os.getpid()}-{int(time.time())}"
    cfg = vmguest.guest_config("rec-run", value=value, mode="oneshot").decode()
    r = d.api("POST", "/recover", {"point": lab.point, "name": "rec", "boot": True, "guest_config": cfg})
    assert r["session"]["name"] == "rec" and r["vm"]["name"] == "rec"
    assert r["vm"]["state"] in ("running", "exited")
    text = wait_console(d, "rec", vmguest.DONE)
    assert f"{vmguest.HEARTBEAT} ok rec-run" in text
    assert "GUEST-DATACHECK ok" in text  # every data file read back through NFS matched
    wait_state(d, "rec", ("exited",))
    assert d.api("GET", "/sessions/rec")["disks"][0]["dirty_bytes"] > 0
    job = d.api("POST", "/sessions/rec/migrate", {"to": str(lab.exports_dir / "rec")})
    job = wait_job(d, job, confirm=True)
    assert job["result"]["mode"] == "copy"
    out = Path(job["result"]["disks"][0]["path"])
    assert out.parent == lab.exports_dir / "rec"
    assert vmguest.read_guest_file(out, "/var/heartbeat.txt").decode().strip() == value
    assert vmguest.read_guest_file(out, "/var/bootcount").decode().strip() == "1"
    # a second migrate to the same place is refused, never overwrites
    with pytest.raises(Exception, match="403"):
        d.api("POST", "/sessions/rec/migrate", {"to": str(lab.exports_dir / "rec")})
    d.api("POST", "/sessions/rec/stop", {"discard": True})
    assert all(s["name"] != "rec" for s in d.api("GET", "/sessions"))


# -- live migrate of a VM we run ----------------------------------------------------------------


def test_live_migrate_while_the_guest_counts(lab: Any) -> None:
    """A VM we run writes a counter every 100 ms; migrate mirrors its disk live and pivots:
    the counter goes on through the pivot with no value lost or repeated, the session is
    unpublished under the running VM, and after it the disk is the migrated file."""
    d = lab.daemon
    cfg = vmguest.guest_config("mig-run", mode="run", counter=True).decode()
    r = d.api("POST", "/recover", {"point": lab.point, "name": "mig", "boot": True, "guest_config": cfg})
    assert r["vm"]["state"] == "running"
    wait_console(d, "mig", r"GUEST-COUNTER \d+", count=5)
    job = d.api("POST", "/sessions/mig/migrate", {"to": str(lab.exports_dir / "mig")})
    job = wait_job(d, job)
    res = job["result"]
    assert res["mode"] == "live" and res["vm"] == "mig"
    target = Path(res["disks"][0]["target"] if "target" in res["disks"][0] else res["disks"][0]["path"])
    assert target.exists()
    at_pivot = max(counters(console(d, "mig")))
    # the session goes; the VM keeps running from the migrated file
    d.api("DELETE", "/sessions/mig")
    text = wait_console(d, "mig", r"GUEST-COUNTER \d+", count=at_pivot + 20)
    seen = counters(text)
    assert seen == list(range(1, len(seen) + 1)), "counter values lost or repeated on the console"
    assert d.api("GET", "/vms/mig")["state"] == "running"
    v = d.api("POST", "/sessions/mig/stop", {"discard": True})
    assert v["vm"]["state"] == "exited"
    logged = [int(x) for x in vmguest.read_guest_file(target, "/var/counter.log", replay_journal=True).split()]
    assert logged == list(range(1, len(logged) + 1)), "the migrated disk's counter has gaps or repeats"
    assert len(logged) >= max(seen)  # every value the guest announced was durable in the target


# -- daemon restart ----------------------------------------------------------------------------


def test_restart_between_boots_and_a_running_vm_survives(lab: Any) -> None:
    """Stop and start the daemon between two boots of an instant session: the second boot
    sees the first's writes (the first under OVMF, the second under SeaBIOS: the firmware
    is the caller's choice). A VM writing every 100 ms through the restart keeps running
    (its own process group), is adopted by the new daemon, and its counter goes on with
    no value lost or repeated (an NFS outage pauses its disk, never fails it)."""
    d = lab.daemon
    one = vmguest.guest_config("boot-1", value="first", mode="oneshot").decode()
    d.api("POST", "/recover", {"point": lab.point, "name": "twice", "boot": True, "guest_config": one,
                               "firmware": "efi"})
    wait_console(d, "twice", vmguest.DONE)
    wait_state(d, "twice", ("exited",))
    runner = vmguest.guest_config("alive", mode="run", heartbeat_s=1, counter=True).decode()
    d.api("POST", "/recover", {"point": lab.point, "name": "alive", "boot": True, "guest_config": runner})
    wait_console(d, "alive", r"GUEST-COUNTER \d+", count=5)
    pid = d.api("GET", "/vms/alive")["pid"]
    d.stop()
    time.sleep(2)  # the NFS server is gone for a while
    d.start(timeout=60)
    v = d.api("GET", "/vms/alive")
    assert v["pid"] == pid and v["state"] in ("running", "paused")
    before = max(counters(console(d, "alive")))
    text = wait_console(d, "alive", r"GUEST-COUNTER \d+", count=before + 20)
    seen = counters(text)
    assert seen == list(range(1, len(seen) + 1)), "counter values lost or repeated across the restart"
    assert d.api("GET", "/vms/alive")["state"] == "running"
    two = vmguest.guest_config("boot-2", value="second", mode="oneshot").decode()
    d.api("POST", "/sessions/twice/boot", {"guest_config": two})
    text = wait_console(d, "twice", vmguest.DONE)
    assert "boots=2" in text, text[-2000:]  # /var/bootcount from the first boot was there
    for n in ("twice", "alive"):
        d.api("POST", f"/sessions/{n}/stop", {"discard": True})


# -- sandboxes ---------------------------------------------------------------------------------


def test_three_sandboxes_at_once_each_its_own_and_expiring(lab: Any) -> None:
    """Three sandboxes of one point boot at once (on SATA disks); each writes its own value (its name) and
    reads back its own; --ttl ends them (VMs stopped, sessions gone); the daemon's RSS
    stays bounded by its cache settings."""
    d = lab.daemon
    # ${VM} becomes each VM's name in the daemon: every sandbox gets a value of its own
    cfg = vmguest.guest_config("sbx", mode="run", heartbeat_s=2).decode() + "value=${VM}\n"
    out = d.api("POST", "/sandboxes", {"point": lab.point, "count": 3, "ttl_s": 3600, "boot": True, "name": "sbx",
                                       "guest_config": cfg, "disk_bus": "sata"})
    names = [s["session"] for s in out]
    assert len(set(names)) == 3
    for n in names:
        text = wait_console(d, n, r"GUEST-READBACK \S+")
        assert f"GUEST-READBACK {n}" in text, text[-1500:]
        for other in set(names) - {n}:
            assert f"GUEST-READBACK {other}" not in text
    rss = _rss_mib(d.proc.pid)
    assert rss < 1024 + 400, f"daemon RSS {rss} MiB with a 1 GiB chunk cache"
    # expiry: a ttl of 1 s from now; the daemon's housekeeping stops the VMs and unpublishes
    for n in names:
        d.api("POST", f"/sessions/{n}/ttl", {"ttl_s": 1})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(s["name"] in names for s in d.api("GET", "/sessions")):
        time.sleep(1)
    assert not any(s["name"] in names for s in d.api("GET", "/sessions")), "sandboxes outlived their ttl"
    for n in names:
        assert _safe(lambda n=n: d.api("GET", f"/vms/{n}")) is None  # stopped and removed


def test_ttl_is_kept_across_a_restart(lab: Any) -> None:
    """A sandbox's expiry survives a daemon restart: it ends after the restart, on time."""
    d = lab.daemon
    out = d.api("POST", "/sandboxes", {"point": lab.point, "count": 2, "ttl_s": 600, "name": "ttl"})
    names = [s["session"] for s in out]
    d.api("POST", f"/sessions/{names[0]}/ttl", {"ttl_s": 8})
    d.stop()
    d.start(timeout=60)
    assert {s["name"] for s in d.api("GET", "/sessions")} >= set(names)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and any(s["name"] == names[0] for s in d.api("GET", "/sessions")):
        time.sleep(1)
    left = {s["name"] for s in d.api("GET", "/sessions")}
    assert names[0] not in left and names[1] in left
    d.api("POST", f"/sessions/{names[1]}/stop", {"discard": True})


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _listener() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(0.2)
    return s, s.getsockname()[1]


# -- verify ------------------------------------------------------------------------------------


def _verify(d: Daemon, point: str, body: dict, timeout: float = 900.0) -> dict:
    job = d.api("POST", f"/points/{point}/verify", body)
    deadline = time.monotonic() + timeout
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        job = d.api("GET", f"/jobs/{job['id']}")
    assert job["state"] == "done", job
    return job["result"]


def test_verify_good_point_with_tests_and_isolation(lab: Any) -> None:
    """A good point passes: every chunk, the filesystems, the boot, a TCP port and an HTTP
    URL of the guest reached through the lab's forwards. A port nothing listens on fails.
    Isolation: a sentinel on the host's loopback is reachable from a guest on plain user
    networking (10.0.2.2) and never from a verify sandbox."""
    d = lab.daemon
    sentinel, port = _listener()
    try:
        cfg = vmguest.guest_config("vfy", mode="run", tcp=[22], http=[80], probe=[f"10.0.2.2:{port}"]).decode()
        good = _verify(d, lab.point, {"boot": True, "tests": ["tcp:22", "http:80"], "guest_config": cfg,
                                      "timeout_s": BOOT_S})
        assert good["passed"], good
        assert all(t["passed"] for t in good["tests"]) and len(good["tests"]) == 2
        assert not good["data"]["bad_blocks"]
        assert any(v.get("filesystem") == "ext4" for v in good["volumes"])
        assert _accepted(sentinel) == 0, "a verify sandbox reached the host's loopback"
        assert f"GUEST-PROBE 10.0.2.2:{port} closed" in good["boot"]["console"]

        bad = _verify(d, lab.point, {"boot": True, "tests": ["tcp:22", "tcp:2222"], "guest_config": cfg,
                                     "timeout_s": BOOT_S})
        assert not bad["passed"]
        by = {t["test"]: t["passed"] for t in bad["tests"]}
        assert by == {"tcp:22": True, "tcp:2222": False}, bad["tests"]
        assert _accepted(sentinel) == 0
        assert all(s["name"].startswith("guest") is False or s["mode"] != "sandbox" for s in d.api("GET", "/sessions"))

        # the same guest on plain user networking does reach it: the probe is a real one
        d.api("POST", "/recover", {"point": lab.point, "name": "open-net", "boot": True, "net": "user",
                                   "guest_config": cfg})
        text = wait_console(d, "open-net", rf"GUEST-PROBE 10\.0\.2\.2:{port} \w+")
        assert f"GUEST-PROBE 10.0.2.2:{port} open" in text
        assert _accepted(sentinel) >= 1
        d.api("POST", "/sessions/open-net/stop", {"discard": True})
    finally:
        sentinel.close()


def _accepted(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            c, _ = sock.accept()
        except (TimeoutError, BlockingIOError):
            return n
        c.close()
        n += 1


def test_verify_a_disk_that_does_not_boot_times_out(lab: Any, tmp_path: Path) -> None:
    """A point whose disk holds no bootable system: the data check passes, the boot check
    fails with a timeout, and the report says so."""
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(32 << 20)
    with Repository.open(lab.daemon.repo) as r:
        m = backup(r, BackupSettings(vm="blank"), [str(blank)])
    rep = _verify(lab.daemon, m["id"], {"boot": True, "timeout_s": 25})
    assert not rep["passed"]
    assert not rep["data"]["bad_blocks"]
    assert not rep["boot"]["ok"] and "timeout" in rep["boot"]["detail"].lower(), rep["boot"]


def test_verify_names_the_bad_block_and_the_file(lab: Any, tmp_path: Path) -> None:
    """A copy of the repository with one chunk of /data/random-4m.bin corrupted on purpose:
    verify (the CLI, as an operator runs it) fails, and its report names the bad block and
    the guest file that uses it."""
    import json
    import subprocess
    import sys

    from engine.files.point import PointFiles
    from engine.repo.format import pack_name
    from engine.repo.packs import HDR
    from engine.stack import Stack
    from tests.nfs.conftest import ROOT

    repo = tmp_path / "repo"
    shutil.copytree(lab.daemon.repo, repo, ignore=shutil.ignore_patterns("pins", "pins.lock"))
    with Stack.open(repo) as st:
        pf = PointFiles(st, st.repo.point(lab.point))
        root = [f for f in pf.found() if f.filesystem == "ext4"]
        assert len(root) == 1, pf.found()
        vol = root[0].volume
        fs = pf.filesystem(vol.name)
        f = fs.open_file(fs.stat("/data/random-4m.bin"))
        _file_off, vol_off, length = f.volume_runs()[0]
        assert len(vol.extents) == 1 and vol.extents[0].offset == 0  # a partition: one extent
        bad = vol.extents[0].disk_offset + vol_off + length // 2
        bm = st.repo.point(lab.point).open_blockmap(0)
        pack, clen, rec = bm.entry(bad >> bm.shift)
        path = st.repo.packs_dir / pack_name(pack)
    with open(path, "r+b") as fh:
        fh.seek(rec + HDR + clen // 2)
        b = fh.read(1)
        fh.seek(rec + HDR + clen // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    addr = take_address()
    d = Daemon(repo, tmp_path / "cache", addr)
    try:
        d.start(timeout=60)
        report = tmp_path / "report.json"
        p = subprocess.run([sys.executable, "-m", "engine.control.cli", "verify", lab.point, "--server", d.url,
                            "--report", str(report), "-q"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "FAIL" in p.stdout and "/data/random-4m.bin" in p.stdout, p.stdout
        rep = json.loads(report.read_text())
        assert not rep["passed"]
        blocks = rep["data"]["bad_blocks"]
        assert len(blocks) == 1
        assert blocks[0]["offset"] <= bad < blocks[0]["offset"] + blocks[0]["length"]
        assert any(x.endswith(":/data/random-4m.bin") for x in blocks[0]["files"]), blocks
    finally:
        d.stop()
        give_address(addr)
