"""What every peer shares: the workspace, the base class, its processes and mounts.

A peer is a system a user runs today to reach a VM disk (a server of the raw image, a
FUSE mount of a backup, the local file). The suite drives each one through ``Peer``:
``setup`` starts it (idempotent: a second call finds it running), ``read_target`` /
``write_target`` say where a client reaches the disk, ``drop_caches`` makes the next
read cold, ``close`` stops everything. Every process a peer starts is a ``Process``
(its PID, its log file), stopped by that PID; every FUSE mount is unmounted on close,
after errors too, and ``close`` is safe to call twice.

Assumes Linux (``/proc/self/mountinfo``, ``/proc/self/net/dev``, ``posix_fadvise``).
Peers keep all their state under ``Workspace.work / peer.name``; nothing is written to
the user's home directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from engine.bench.core import Measure, Target
from engine.bench.pagecache import drop_file_pages
from engine.errors import InstantNFSError
from engine.fsutil import is_mounted

MIB = 1 << 20
READY_TIMEOUT = 120.0  # seconds a server or a mount may take to come up
UNMOUNTED_GRACE = 20.0  # seconds a FUSE process whose mount was taken away gets to exit by itself


def _quiet(_line: str) -> None:
    pass


@dataclass
class Workspace:
    """What the runner gives every peer: a state directory, the disk image, a log."""

    work: Path  # each peer keeps its state in work / peer.name
    image: Path  # the raw disk image
    size: int  # its size in bytes
    log: Callable[[str], None] = field(default=_quiet)


class PeerError(InstantNFSError):
    """A benchmark peer failed."""


class PeerNotInstalled(PeerError):
    """A benchmark peer is not installed."""


class PeerFailed(PeerError):
    """A benchmark peer did not start, mount or back up."""


# -- processes and mounts ---------------------------------------------------------------------


class Process:
    """A process a peer started: its PID and its log; stopped by that PID, never by name."""

    def __init__(self, name: str, cmd: list[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as f:
            # a session of its own: a ^C at the terminal reaches the runner, which stops us
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                          env=env, cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process wrote to its log (this run's part only)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.output().strip().splitlines()[-lines:])

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> None:
        """Poll ``ready()`` until it holds; a clear error if the process exits or time runs out.

        ``what`` names what is awaited ("the portmapper's 'listening' line")."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if not self.alive():
                raise PeerFailed(f"{self.name} exited with status {self.popen.returncode} while we waited for "
                                 f"{what}; its log {self.log} ends:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise PeerFailed(f"{self.name}: still no {what} after {timeout:.0f} s; its log {self.log} ends:\n"
                                 f"{self.tail()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 20.0, *, grace: float = 0.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; reaps the process. Safe to call twice.

        ``grace`` seconds are first given to a process that is already on its way out (a
        FUSE daemon whose mount was just taken away), so it can release what it holds (a
        repository lock) instead of being cut off halfway."""
        if grace > 0:
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass
        self.popen.wait()


def unmount(path: Path) -> None:
    """Unmount a FUSE mount: fusermount3 -u, fusermount -u, then a lazy umount as a last resort."""
    tries = [[t, "-u", str(path)] for t in ("fusermount3", "fusermount") if shutil.which(t)]
    tries += [[t, "-uz", str(path)] for t in ("fusermount3", "fusermount") if shutil.which(t)]
    if os.geteuid() == 0 and shutil.which("umount"):
        tries.append(["umount", "-l", str(path)])
    for cmd in tries:
        if not is_mounted(path):
            return
        subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if is_mounted(path):
        raise PeerFailed(f"{path} is still mounted; unmount it with: fusermount3 -u {path}")


def copy_sparse(src: Path, dst: Path) -> None:
    """A separate copy of src (reflinked where the file system can, holes kept)."""
    tmp = dst.with_name(dst.name + ".part")
    tmp.unlink(missing_ok=True)
    r = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(src), str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerFailed(f"could not copy {src} to {tmp}: {r.stderr.strip()}")
    os.replace(tmp, dst)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst names the same bytes as src: a hard link, or a copy across file systems."""
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        copy_sparse(src, dst)


def wait_file(path: Path, size: int, proc: Process, what: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``path`` exists with ``size`` bytes (a mount is ready), or fail clearly."""

    def ready() -> bool:
        try:
            return os.stat(path).st_size == size
        except OSError:
            return False

    try:
        proc.wait_for(ready, f"{path} with {size} bytes ({what})", timeout)
    except PeerFailed as e:
        try:
            seen = os.stat(path).st_size
        except OSError:
            raise e from None  # not there at all: the process's own story
        raise PeerFailed(f"{path} has {seen} bytes, not {size}: {what}") from None


def in_private_namespace() -> bool:
    """True when this process's network namespace has no interface but loopback.

    The runner re-executes itself under ``unshare --net --mount``; there, fixed ports
    (111, 2049) are ours and nothing a server binds can be reached from another host.
    ``/proc/self/net/dev`` lists this namespace's interfaces (``/sys/class/net`` would show
    the namespace that mounted sysfs).
    """
    try:
        with open("/proc/self/net/dev") as f:
            names = {line.split(":", 1)[0].strip() for line in f.readlines()[2:] if ":" in line}
    except OSError:
        return False
    return names == {"lo"}


def run_checked(cmd: list[str], what: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if r.returncode != 0:
        out = (r.stderr.strip() or r.stdout.strip())[-2000:]
        raise PeerFailed(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{out}")
    return r


# -- the base class ---------------------------------------------------------------------------


class Peer:
    """One system the suite compares instantnfs with. Subclasses fill in the hooks."""

    name: ClassVar[str]
    product: ClassVar[str]  # "NFS-Ganesha"
    detail: ClassVar[str] = ""  # "raw image, VFS"
    packages: ClassVar[str] = ""  # what install() puts on the machine, for the report
    apt: ClassVar[tuple[str, ...]] = ()  # the Debian packages install() adds

    def __init__(self) -> None:
        self.procs: list[Process] = []
        self.mounts: list[Path] = []
        self.ws: Workspace | None = None
        self._ready = False
        self._version: str | None = None
        self._version_known = False

    # -- what it is ---------------------------------------------------------------------------

    @property
    def install_command(self) -> str:
        """The shell command (as root) that installs this peer with its services held."""
        import sys

        return f"{sys.executable} -m engine.bench.peers install {self.name}"

    @property
    def title(self) -> str:
        v = self.version()
        head = f"{self.product} {v}" if v else self.product
        return f"{head} ({self.detail})" if self.detail else head

    def installed(self) -> bool:
        raise NotImplementedError

    def _find_version(self) -> str | None:
        return None

    def version(self) -> str | None:
        if not self._version_known:
            self._version = self._find_version() if self.installed() else None
            self._version_known = True
        return self._version

    def status(self) -> dict[str, object]:
        ok = self.installed()
        return {"installed": ok, "version": self.version() if ok else None, "install": self.install_command,
                "packages": self.packages, "title": self.title}

    def require_installed(self) -> None:
        if not self.installed():
            raise PeerNotInstalled(f"{self.name} is not installed; install it (as root) with: {self.install_command}")

    # -- running it ---------------------------------------------------------------------------

    def state_dir(self, ws: Workspace) -> Path:
        d = ws.work / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def setup(self, ws: Workspace) -> None:
        """Start the peer for ``ws`` (back up, copy, start, mount); a no-op while it runs."""
        if self._ready and self.ws == ws and all(p.alive() for p in self.procs):
            return
        self.close()
        self.require_installed()
        self.ws = ws
        try:
            self._setup(ws)
        except BaseException:
            self.close()
            raise
        self._ready = True

    def _setup(self, ws: Workspace) -> None:
        raise NotImplementedError

    def _ws(self) -> Workspace:
        if self.ws is None or not self._ready:
            raise PeerFailed(f"{self.name} is not set up: call setup(workspace) first")
        return self.ws

    def read_target(self) -> Target:
        raise NotImplementedError

    def write_target(self) -> Target | None:
        return None

    def cache_files(self) -> list[Path]:
        """The files the peer reads from, whose pages drop_caches drops."""
        return []

    def drop_caches(self) -> None:
        """Make the next read cold: drop the pages of every file the peer reads from."""
        self._ws()
        drop_file_pages(self.cache_files())

    def backup(self, ws: Workspace, image: Path, name: str, *, increment_of: str | None = None) -> Measure | None:
        return None

    def mount_first_byte(self, ws: Workspace) -> Measure | None:
        return None

    def start(self, name: str, cmd: list[str], log: Path, **kw: object) -> Process:
        p = Process(name, cmd, log, **kw)  # type: ignore[arg-type]
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Unmount every mount, stop every process by PID. Safe to call twice; raises the
        first failure only after trying everything."""
        self._ready = False
        first: BaseException | None = None
        for m in reversed(self.mounts):
            try:
                # a clean unmount lets the FUSE process exit by itself
                unmount(m)
            except Exception as e:  # noqa: BLE001 - keep going, report the first
                first = first or e
        grace = UNMOUNTED_GRACE if self.mounts else 0.0
        for p in reversed(self.procs):
            try:
                p.stop(grace=grace)
            except Exception as e:  # noqa: BLE001
                first = first or e
        for m in reversed(self.mounts):
            try:
                unmount(m)  # a killed FUSE process leaves a dead mount behind
            except Exception as e:  # noqa: BLE001
                first = first or e
        self.mounts.clear()
        self.procs.clear()
        if first is not None:
            raise first

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
