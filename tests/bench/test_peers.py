"""The benchmark peers: found, reported, installed, set up and closed.

CI installs no peer (Ganesha, borg, restic), so everything here runs without them: the
local file end to end, the reports of a missing peer, the refusal to install without
root, the services being held during an install, the Ganesha configuration, and the
process and mount helpers every peer uses. The one end-to-end test of the real peers
checks whichever are installed and, for those that are not, that they say so with the
command that installs them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import fsutil
from engine.bench.core import FileTarget, NfsTarget
from engine.bench.peers import (
    PEERS,
    Borg,
    Ganesha,
    LocalFile,
    PeerError,
    PeerFailed,
    PeerNotInstalled,
    Restic,
    Workspace,
    find_peers,
    ganesha_config,
    install,
)
from engine.bench.peers import base as peers_base
from engine.bench.peers import fuse as peers_fuse
from engine.bench.peers import ganesha as peers_ganesha
from engine.bench.peers import installer as peers_install
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def make_image(path: Path, size: int = 4 * MIB) -> bytes:
    """A disk with data, a hole and a repeated block; returns its bytes."""
    data = bytearray(size)
    data[:MIB] = os.urandom(MIB)
    data[2 * MIB : 3 * MIB] = data[:MIB]  # MIB..2 MIB stays a hole
    data[3 * MIB :] = (b"some text\n" * (MIB // 10 + 1))[:MIB]
    with open(path, "wb") as f:
        f.write(data[:MIB])
        f.seek(2 * MIB)
        f.write(data[2 * MIB :])
    return bytes(data)


@pytest.fixture
def ws(tmp_path: Path) -> tuple[Workspace, bytes]:
    image = tmp_path / "disk.img"
    data = make_image(image)
    lines: list[str] = []
    return Workspace(tmp_path / "work", image, len(data), lines.append), data


# -- the local file, end to end ---------------------------------------------------------------


def test_local_file_reads_the_image_and_writes_a_separate_copy(ws: tuple[Workspace, bytes],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    w, data = ws
    peer = find_peers(["local"])["local"]
    assert isinstance(peer, LocalFile) and peer.installed() and peer.status()["installed"] is True
    peer.setup(w)
    try:
        rt = peer.read_target()
        assert isinstance(rt, FileTarget) and rt.size == len(data)
        assert Path(rt.path).read_bytes() == data
        wt = peer.write_target()
        assert isinstance(wt, FileTarget) and wt.size == len(data)
        assert not os.path.samefile(wt.path, rt.path)
        assert Path(wt.path).read_bytes() == data
        with open(wt.path, "r+b") as f:  # a write to the copy leaves the image alone
            f.seek(MIB + 4096)
            f.write(b"\xab" * 4096)
        assert Path(rt.path).read_bytes() == data
        assert Path(wt.path).stat().st_blocks * 512 < len(data), "the copy keeps the hole"

        ino = os.stat(wt.path).st_ino
        peer.setup(w)  # idempotent: the copy (and what was written to it) stays
        assert os.stat(wt.path).st_ino == ino

        dropped: list[tuple[str, int]] = []
        real = os.posix_fadvise

        def spy(fd: int, off: int, length: int, advice: int) -> None:
            dropped.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
            real(fd, off, length, advice)

        monkeypatch.setattr(os, "posix_fadvise", spy)
        peer.drop_caches()
        assert sorted(dropped) == sorted([(str(w.image), os.POSIX_FADV_DONTNEED), (wt.path, os.POSIX_FADV_DONTNEED)])
    finally:
        peer.close()
    peer.close()  # twice is fine
    with pytest.raises(PeerFailed, match="setup"):
        peer.read_target()
    assert peer.backup(w, w.image, "x") is None and peer.mount_first_byte(w) is None


def test_local_file_setup_makes_a_fresh_copy(ws: tuple[Workspace, bytes]) -> None:
    w, data = ws
    with LocalFile() as peer:
        peer.setup(w)
        wt = peer.write_target()
        assert wt is not None
        Path(wt.path).write_bytes(b"dirty")
    with LocalFile() as again:
        again.setup(w)
        wt2 = again.write_target()
        assert wt2 is not None and Path(wt2.path).read_bytes() == data


# -- finding peers, and what a missing one says -----------------------------------------------


def test_find_peers_in_report_order_and_unknown_names() -> None:
    assert list(PEERS) == ["ganesha", "borg", "borg-fixed", "restic", "local"]
    assert list(find_peers(["local", "ganesha"])) == ["ganesha", "local"]
    with pytest.raises(ValueError) as e:
        find_peers(["ganesha", "nfsd", "zfs"])
    msg = str(e.value)
    assert "'nfsd'" in msg and "'zfs'" in msg
    for known in PEERS:
        assert known in msg


def hide_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH with none of the peers' programs, and no pip-installed borg."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(peers_fuse, "VENV", tmp_path / "no-venv")
    monkeypatch.setattr(peers_ganesha, "plugins_dir", lambda: None)


@pytest.mark.parametrize("name", ["ganesha", "borg", "borg-fixed", "restic"])
def test_a_missing_peer_says_how_to_install_it(name: str, ws: tuple[Workspace, bytes], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    hide_binaries(monkeypatch, tmp_path)
    peer = find_peers([name])[name]
    st = peer.status()
    assert st["installed"] is False and st["version"] is None
    assert st["install"] == peer.install_command
    assert peer.install_command.endswith(f"-m engine.bench.peers install {name}")
    assert sys.executable in peer.install_command
    assert peer.title.startswith(peer.product) and "None" not in peer.title
    with pytest.raises(PeerNotInstalled) as e:
        peer.setup(ws[0])
    assert peer.install_command in str(e.value)
    assert peer.procs == [] and peer.mounts == []


def test_the_install_command_runs(tmp_path: Path) -> None:
    """``python -m engine.bench.peers status`` answers, so the printed command is real."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "engine.bench.peers", "status", "local"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"installed": true' in r.stdout
    r = subprocess.run([sys.executable, "-m", "engine.bench.peers", "status", "nope"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "the peers are: ganesha" in r.stderr


# -- installing -------------------------------------------------------------------------------


def test_install_without_root_names_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ran: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: ran.append(cmd))
    with pytest.raises(PeerError) as e:
        install(["ganesha", "borg"], log=lambda _l: None)
    msg = str(e.value)
    assert "root" in msg
    assert f"{sys.executable} -m engine.bench.peers install ganesha borg" in msg
    assert ran == [], "nothing is run without root"
    with pytest.raises(ValueError, match="unknown peer"):
        install(["nfsd"], log=lambda _l: None)


def test_services_are_held_during_an_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(peers_install, "POLICY", policy)
    with peers_install.services_held():
        assert policy.read_text().rstrip().endswith("exit 101")
        assert os.access(policy, os.X_OK)
        r = subprocess.run([str(policy), "rpcbind", "start"])
        assert r.returncode == 101  # invoke-rc.d: "action forbidden"
    assert not policy.exists(), "ours is removed"

    policy.write_bytes(b"#!/bin/sh\n# the image's own\nexit 0\n")
    policy.chmod(0o700)
    with pytest.raises(RuntimeError), peers_install.services_held():
        assert policy.read_text().rstrip().endswith("exit 101")
        raise RuntimeError("apt-get failed")
    assert policy.read_bytes() == b"#!/bin/sh\n# the image's own\nexit 0\n", "an existing one is put back"
    assert policy.stat().st_mode & 0o777 == 0o700


def test_install_holds_services_and_checks_the_ports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As root, with apt-get and the ports faked: the packages, the held services, the check."""
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(peers_install, "POLICY", policy)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(peers_install, "dpkg_installed", lambda p: p == "fuse3")
    monkeypatch.setattr(peers_install, "stop_units", lambda log: None)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    calls: list[tuple[list[str], bool]] = []

    def fake_run(cmd: list[str], *a: object, **k: object) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, policy.exists()))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    seen = iter([set(), {("tcp", 111)}])
    monkeypatch.setattr(peers_install, "listeners", lambda: next(seen))
    with pytest.raises(PeerError, match="tcp port 111"):
        install(["restic", "ganesha"], log=lambda _l: None)
    assert [c for c, _held in calls] == [
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nfs-ganesha", "nfs-ganesha-vfs", "restic"],
    ]
    assert all(held for _c, held in calls), "apt-get runs only while policy-rc.d forbids starting services"
    assert not policy.exists()


def test_listeners_reads_this_namespace() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        assert ("tcp", port) in peers_install.listeners([port])
    finally:
        s.close()


# -- Ganesha's configuration ------------------------------------------------------------------


def test_ganesha_config_exports_and_stays_on_loopback(tmp_path: Path) -> None:
    text = ganesha_config(tmp_path, plugins="/usr/lib/x86_64-linux-gnu/ganesha")
    exports = re.findall(r"EXPORT \{(.*?)\n\}", text, re.S)
    assert len(exports) == 2
    ro, rw = exports
    assert f"Path = {tmp_path / 'ro'};" in ro and "Pseudo = /export;" in ro and "Access_Type = RO;" in ro
    assert f"Path = {tmp_path / 'rw'};" in rw and "Pseudo = /export-rw;" in rw and "Access_Type = RW;" in rw
    for e in exports:
        assert "Protocols = 3;" in e and "Transports = TCP;" in e and "Name = VFS;" in e
        assert "Clients = 127.0.0.0/8;" in e
        assert re.search(r"^\s*Access_Type = None;", e, re.M), "no access but through the loopback CLIENT block"
    for off in ("Enable_NLM = false;", "Enable_RQUOTA = false;", "Enable_UDP = false;", "Graceless = true;"):
        assert off in text
    assert f"RecoveryRoot = {tmp_path}/recovery;" in text
    assert "Plugins_Dir = /usr/lib/x86_64-linux-gnu/ganesha;" in text
    # no listener beyond loopback: no Bind_addr at all in the namespace, and no address
    # anywhere that is not a loopback one
    assert "Bind_addr" not in text
    for addr in re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", text):
        assert addr.startswith("127."), addr
    assert re.findall(r"NFS_Port = (\d+);", text) == [str(peers_ganesha.NFS_PORT)]
    assert re.findall(r"MNT_Port = (\d+);", text) == [str(peers_ganesha.MNT_PORT)]
    assert "Bind_addr = 127.0.0.1;" in ganesha_config(tmp_path, bind="127.0.0.1")


def test_ganesha_runs_only_in_a_private_namespace(ws: tuple[Workspace, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Ganesha, "installed", lambda self: True)
    monkeypatch.setattr(peers_ganesha, "in_private_namespace", lambda: False)
    g = Ganesha()
    with pytest.raises(PeerFailed, match="unshare --net --mount"):
        g.setup(ws[0])
    assert g.procs == []


def test_ganesha_targets(ws: tuple[Workspace, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    g = Ganesha()
    g.ws, g._ready = ws[0], True  # what setup leaves behind, without a server
    rt, wt = g.read_target(), g.write_target()
    assert isinstance(rt, NfsTarget) and isinstance(wt, NfsTarget)
    assert rt.url == "nfs://127.0.0.1/export/disk.img" and wt.url == "nfs://127.0.0.1/export-rw/disk.img"
    assert rt.size == ws[0].size and (rt.nfs_port, rt.mount_port) == (peers_ganesha.NFS_PORT, peers_ganesha.MNT_PORT)


def test_a_dead_portmappers_socket_is_stale(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "rpcbind.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    assert not peers_ganesha._stale(path), "someone listens: not ours to remove"
    s.close()
    assert peers_ganesha._stale(path)


def test_private_namespace_is_recognised() -> None:
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root and unshare")
    code = "from engine.bench.peers import in_private_namespace as f; print(f())"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "True", r.stderr


# -- processes and mounts ---------------------------------------------------------------------


def test_a_process_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    p = peers_base.Process("fake", ["sh", "-c", "echo starting; echo port 111 taken >&2; exit 3"], tmp_path / "f.log")
    with pytest.raises(PeerFailed) as e:
        p.wait_for(lambda: False, "its 'listening' line")
    assert "fake exited with status 3 while we waited for its 'listening' line" in str(e.value) and "port 111 taken" in str(e.value)


def test_a_process_is_stopped_by_its_pid(tmp_path: Path) -> None:
    log = tmp_path / "s.log"
    log.write_text("an earlier run's line\n")
    p = peers_base.Process("sleeper", ["sh", "-c", "echo ready; exec sleep 60"], log)
    p.wait_for(lambda: "ready" in p.output(), "'ready' line", timeout=30)
    assert "earlier" not in p.output()
    with pytest.raises(PeerFailed, match="sleeper: still no 'done' line after 0 s"):
        p.wait_for(lambda: False, "'done' line", timeout=0.05)
    p.stop()
    assert not p.alive() and p.popen.returncode == -15
    p.stop()


def test_a_mount_that_never_shows_the_file_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait for a mount: the wrong size is named, and the mount's process is stopped on close."""
    target = tmp_path / "disk.img"
    target.write_bytes(b"x" * 100)
    peer = Restic()
    proc = peer.start("restic mount", ["sleep", "60"], tmp_path / "m.log")
    with pytest.raises(PeerFailed, match="has 100 bytes, not 4096"):
        peers_base.wait_file(target, 4096, proc, "the mount is ready", timeout=0.1)
    with pytest.raises(PeerFailed, match=r"restic mount: still no .*/absent.img with 4096 bytes \(the mount is ready\)"):
        peers_base.wait_file(tmp_path / "absent.img", 4096, proc, "the mount is ready", timeout=0.1)
    peer.close()
    assert not proc.alive() and peer.procs == []


def test_mounted_paths_are_read_from_mountinfo() -> None:
    # the kernel's other list of the same mounts (another file, another format) agrees; "/"
    # itself is no mount point in a chroot, so the test takes whatever is mounted here
    with open("/proc/self/mounts") as f:
        listed = {line.split(" ")[1].encode().decode("unicode_escape") for line in f if line.strip()}
    assert listed and fsutil.mount_points() == listed
    some = sorted(listed)[0]
    assert fsutil.is_mounted(Path(some))
    assert not fsutil.is_mounted(Path("/nonexistent-mount-point"))
    peers_base.unmount(Path("/nonexistent-mount-point"))  # not mounted: nothing to do


def test_borg_finds_a_pip_installed_borg_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "borg"
    fake.write_text("#!/bin/sh\necho 'borg 1.4.9'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(peers_fuse, "VENV", venv)
    b = Borg()
    assert b.tool() == str(fake)
    assert b._find_version() == "1.4.9"
    cmd = b.create_cmd(Path("/r"), "disk", Path("/images/disk.img"))
    assert cmd == [str(fake), "create", "--compression", "lz4", "/r::disk", "disk.img"]
    fixed = find_peers(["borg-fixed"])["borg-fixed"]
    assert "--chunker-params" in fixed.create_cmd(Path("/r"), "disk", Path("/i/d.img"))
    assert fixed.file_in(Path("/m"), Path("/i/d.img")) == Path("/m/d.img")
    assert Restic().file_in(Path("/m"), Path("/i/d.img")) == Path("/m/snapshots/latest/d.img")


# -- the real peers, where installed ----------------------------------------------------------

E2E = textwrap.dedent("""
    import hashlib, os, subprocess, sys
    from pathlib import Path
    from engine.bench.core import NfsTarget
    from engine.bench.peers import Workspace, find_peers
    from engine.fsutil import mount_points
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    image, work, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    want = hashlib.sha256(image.read_bytes()).hexdigest()
    before = mount_points()
    peer = find_peers([name])[name]
    try:
        peer.setup(Workspace(work, image, image.stat().st_size))
        for t in (peer.read_target(), peer.write_target()):
            if isinstance(t, NfsTarget):
                subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", t.url, str(image)], check=True)
            elif t is not None:
                assert hashlib.sha256(Path(t.path).read_bytes()).hexdigest() == want, t
        peer.drop_caches()
        pids = [p.pid for p in peer.procs]
    finally:
        peer.close()
    assert mount_points() == before, "a mount was left"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    print("served", name)
""")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ganesha", "borg", "borg-fixed", "restic"])
def test_installed_peers_serve_the_image(name: str, ws: tuple[Workspace, bytes], tmp_path: Path) -> None:
    """Where the peer is installed, it serves the image's exact bytes and leaves nothing behind.

    CI does not install the peers; there this checks that the peer says it is not
    installed, with the command that installs it, instead of skipping.
    """
    peer = find_peers([name])[name]
    if not peer.installed():
        with pytest.raises(PeerNotInstalled, match=re.escape(peer.install_command)):
            peer.setup(ws[0])
        return
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "needs root for a private namespace")
    if name == "ganesha":
        require(shutil.which("qemu-img") is not None, "qemu-img is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(["unshare", "--net", "--mount", sys.executable, "-c", E2E, str(ws[0].image),
                        str(tmp_path / "work"), name], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and f"served {name}" in r.stdout, r.stdout + r.stderr
