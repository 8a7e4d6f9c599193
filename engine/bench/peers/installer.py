"""Installing the peers (``--install-peers``): Debian packages with their services held.

Debian's nfs-ganesha pulls in rpcbind and nfs-common, whose services would take ports
111 and 2049 on every address the moment they are installed. So apt-get runs with a
``/usr/sbin/policy-rc.d`` that exits 101 ("action forbidden": invoke-rc.d and
deb-systemd-invoke start nothing); an existing policy-rc.d (Docker images ship one) is
put back byte for byte afterwards, and ours is removed only if we created it. Where
systemd runs, any unit that started anyway (socket activation of rpcbind) is stopped
and disabled. Afterwards no new listener may be on 111 or 2049: that is checked and an
error names what to stop. The peers themselves run only in a private network namespace
(see ``ganesha``) or need no network (FUSE mounts).

borg comes from Debian too (borgbackup 1.2.4 with python3-pyfuse3; all three peers took
48 s to install here):
a pip build of borgbackup[pyfuse3] 1.4 into a venv needs five -dev packages and a
compiler, took 154 s here, and read no faster through its mount (256 MiB disk, pages
dropped, 3 alternating runs: fixed 1 MiB chunks 220-240 vs 233-235 MB/s sequential,
635-708 vs 616-697 random 4 KiB reads/s; default chunker 308-391 vs 315-364 MB/s,
119-123 vs 109-116 reads/s). ``Borg`` still prefers a borg installed in
``fuse.VENV`` by hand, for whoever wants a newer one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from engine.bench.peers.base import PeerError

POLICY = Path("/usr/sbin/policy-rc.d")
POLICY_TEXT = "#!/bin/sh\n# instantnfs bench: no service starts while peers are installed\nexit 101\n"
UNITS = ("rpcbind.socket", "rpcbind.service", "nfs-ganesha.service", "nfs-ganesha-lock.service",
         "rpc-statd.service", "nfs-blkmap.service", "nfs-client.target")
WATCHED_PORTS = (111, 2049)


def install_command(names: Sequence[str]) -> str:
    return f"{sys.executable} -m engine.bench.peers install {' '.join(names)}"


def dpkg_installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip().endswith("install ok installed")


@contextlib.contextmanager
def services_held() -> Iterator[None]:
    """A policy-rc.d that forbids starting services, for the duration of the block."""
    saved = POLICY.read_bytes() if POLICY.exists() else None
    mode = POLICY.stat().st_mode & 0o7777 if saved is not None else 0o755
    POLICY.write_text(POLICY_TEXT)
    POLICY.chmod(0o755)
    try:
        yield
    finally:
        if saved is None:
            POLICY.unlink(missing_ok=True)
        else:
            POLICY.write_bytes(saved)
            POLICY.chmod(mode)


def listeners(ports: Sequence[int] = WATCHED_PORTS) -> set[tuple[str, int]]:
    """(protocol, port) of every TCP listener and UDP socket on ``ports`` in this namespace."""
    out = set()
    for proto, files in (("tcp", ("/proc/net/tcp", "/proc/net/tcp6")), ("udp", ("/proc/net/udp", "/proc/net/udp6"))):
        for name in files:
            try:
                lines = Path(name).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                port = int(f[1].rsplit(":", 1)[1], 16)
                if port in ports and (proto == "udp" or f[3] == "0A"):  # 0A: LISTEN
                    out.add((proto, port))
    return out


def stop_units(log: Callable[[str], None]) -> None:
    """Stop and disable whatever unit of rpcbind, nfs-common or Ganesha started anyway."""
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return  # no systemd running: policy-rc.d was the only way in
    for unit in UNITS:
        r = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True)
        if r.stdout.strip() in ("active", "activating"):
            log(f"stopping {unit}, which started despite policy-rc.d")
        subprocess.run(["systemctl", "stop", unit], capture_output=True)
        subprocess.run(["systemctl", "disable", unit], capture_output=True)


def apt_install(packages: Sequence[str], log: Callable[[str], None]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    missing = [p for p in dict.fromkeys(packages) if not dpkg_installed(p)]
    if not missing:
        log("peers: every Debian package is already installed")
        return
    if shutil.which("apt-get") is None:
        raise PeerError(f"no apt-get on this machine: install these Debian packages by hand: {' '.join(missing)}")
    log(f"peers: apt-get install {' '.join(missing)} (services held by {POLICY})")
    with services_held():
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise PeerError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{(r.stderr or r.stdout)[-2000:]}")


def install(names: Sequence[str], log: Callable[[str], None] = print) -> None:
    """Install the named peers (as root), their services kept from starting."""
    from engine.bench.peers import find_peers

    peers = find_peers(names)
    if os.geteuid() != 0:
        raise PeerError(f"installing the peers needs root; run as root: {install_command(list(peers))}")
    packages = [p for peer in peers.values() for p in peer.apt]
    t0 = time.monotonic()
    before = listeners()
    apt_install(packages, log)
    stop_units(log)
    new = listeners() - before
    if new:
        what = ", ".join(f"{proto} port {port}" for proto, port in sorted(new))
        raise PeerError(f"after installing the peers something listens on {what}: stop it (systemctl stop "
                        "rpcbind.socket rpcbind nfs-ganesha; systemctl disable them) before benchmarking")
    for peer in peers.values():
        if not peer.installed():
            raise PeerError(f"{peer.name} is still not usable after installing {peer.packages}")
        log(f"peers: {peer.title} ready")
    log(f"peers: installed {', '.join(peers)} in {time.monotonic() - t0:.1f} s")
