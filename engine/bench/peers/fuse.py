"""borg mount and restic mount: what a user reads a VM disk out of a backup with today.

Each peer backs the image up into a repository of its own under ``work / name`` (reused
by the next setup while the image is unchanged: its size, mtime and inode are recorded
beside the repository), then mounts it with its FUSE front end, in the foreground, as a
process whose PID we stop. A mount is ready when the disk file shows under it with the
image's size; ``setup`` waits for that (with a timeout and the tool's own last words).

- borg (Debian's 1.2, pyfuse3): ``borg create --compression lz4``, encryption none,
  with its default chunker (``borg``) or fixed 1 MiB chunks (``borg-fixed``, its best
  case on a disk image); every piece of borg state (base, cache, config, security, keys)
  under the work directory. The image is backed up by its bare name from its own
  directory, so it shows as ``MNT/<name>`` (an absolute path would show without its
  leading slash).
- restic (Debian's 0.14): repository format 2, ``--compression auto``, a fixed password
  (restic always encrypts), the cache under the work directory. Its snapshot tree
  mirrors the path given to ``restic backup`` (an absolute one shows as
  ``snapshots/latest/var/...``), and the bare name is given from the image's directory,
  so the file shows as ``MNT/snapshots/latest/<name>``.

File-level restores (the ``files`` scenario): ``backup`` of a directory stores it by its
bare name the same way, and ``extract`` runs ``borg extract`` (into the target as its
working directory) or ``restic restore latest --target T --include /<dir>/<path>``.

Cold reads: borg mounts with keep_cache, so the kernel keeps the file's pages between
opens; ``drop_caches`` drops them (``posix_fadvise`` on the mounted file) and the
repository's files. What the tools keep in their own memory (borg's chunk LRU, restic's
blob cache) stays: only a remount empties it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import ClassVar

from engine.bench.core import FileTarget, Measure, Target, Timer
from engine.bench.pagecache import files_under, tree_bytes
from engine.bench.peers.base import (
    READY_TIMEOUT,
    UNMOUNTED_GRACE,
    Peer,
    PeerFailed,
    Workspace,
    is_mounted,
    run_checked,
    unmount,
    wait_file,
)

VENV = Path("/var/lib/instantnfs-bench/peers/venv")  # a pip-installed borg, found first if present
ARCHIVE = "disk"


def fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def image_stamp(image: Path) -> dict[str, object]:
    st = os.stat(image)
    return {"image": str(image.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


class FuseBackupPeer(Peer):
    """A backup tool whose FUSE mount shows the disk as a file. Subclasses say how."""

    variant: ClassVar[str] = ""

    def tool(self) -> str | None:
        raise NotImplementedError

    def env(self, home: Path) -> dict[str, str]:
        raise NotImplementedError

    def init_cmd(self, repo: Path) -> list[str]:
        raise NotImplementedError

    def create_cmd(self, repo: Path, archive: str, image: Path) -> list[str]:
        raise NotImplementedError

    def mount_cmd(self, repo: Path, archive: str, mnt: Path) -> list[str]:
        raise NotImplementedError

    def file_in(self, mnt: Path, image: Path) -> Path:
        raise NotImplementedError

    def _tool(self) -> str:
        t = self.tool()
        if t is None:
            self.require_installed()
            raise PeerFailed(f"{self.name}: no binary found")
        return t

    # -- backing up ---------------------------------------------------------------------------

    def _make_repo(self, repo: Path, home: Path, image: Path, archive: str, fresh: bool) -> float:
        """Back image up into repo (made fresh unless ``fresh`` is False); returns the seconds."""
        env = self.env(home)
        if fresh:
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True)
            repo.parent.mkdir(parents=True, exist_ok=True)
            run_checked(self.init_cmd(repo), f"{self.name}: creating the repository", env=env)
        elif not repo.exists():
            raise PeerFailed(f"{self.name}: no repository at {repo} to add an increment to")
        with Timer() as t:
            # by its bare name from its own directory: the archive holds "disk.img", not a path
            run_checked(self.create_cmd(repo, archive, image), f"{self.name}: backing up {image}", env=env,
                        cwd=image.parent)
        return t.seconds

    def _ensure_backup(self, ws: Workspace) -> None:
        d = self.state_dir(ws)
        stamp = dict(image_stamp(ws.image), variant=self.variant, version=self.version())
        marker = d / "backup.json"
        if (d / "repo").exists() and marker.exists():
            try:
                if json.loads(marker.read_text()) == stamp:
                    ws.log(f"{self.name}: reusing the repository of the same image in {d / 'repo'}")
                    return
            except ValueError:
                pass
        marker.unlink(missing_ok=True)
        ws.log(f"{self.name}: backing up the image into {d / 'repo'}")
        seconds = self._make_repo(d / "repo", d / "home", ws.image, ARCHIVE, fresh=True)
        ws.log(f"{self.name}: backed up in {seconds:.1f} s, repository {tree_bytes(d / 'repo') / 1e6:.0f} MB")
        marker.write_text(json.dumps(stamp))

    def backup(self, ws: Workspace, image: Path, name: str, *, increment_of: str | None = None) -> Measure | None:
        """Seconds to back ``image`` up into a fresh repository named ``name`` (or, with
        ``increment_of``, into the repository of that earlier backup, as a CBT-like increment)."""
        self.require_installed()
        ingest = self.state_dir(ws) / "ingest"
        repo = ingest / (increment_of or name)
        seconds = self._make_repo(repo, ingest / f"{increment_of or name}.home", image, name, fresh=increment_of is None)
        return Measure(seconds, {"seconds": seconds, "repo_bytes": tree_bytes(repo),
                                 "command": " ".join(self.create_cmd(Path("REPO"), name, image))})

    def extract_cmd(self, repo: Path, archive: str, paths: list[str], target: Path) -> list[str]:
        raise NotImplementedError

    def extract(self, ws: Workspace, name: str, paths: list[str], target: Path) -> Measure:
        """Seconds to extract ``paths`` of the backup ``name`` (made by ``backup``; paths as
        backed up: the directory's bare name first) into ``target``, the tool's usual way."""
        self.require_installed()
        ingest = self.state_dir(ws) / "ingest"
        target.mkdir(parents=True, exist_ok=True)
        cmd = self.extract_cmd(ingest / name, name, paths, target)
        with Timer() as t:
            run_checked(cmd, f"{self.name}: extracting {' '.join(paths)}", env=self.env(ingest / f"{name}.home"),
                        cwd=target)
        return Measure(t.seconds, {"seconds": t.seconds, "command": " ".join(cmd)})

    # -- mounting -----------------------------------------------------------------------------

    def _mount(self, ws: Workspace, mnt: Path, what: str) -> tuple[Path, float]:
        """Mount the repository at mnt, wait for the disk file; (its path, seconds to show it)."""
        d = self.state_dir(ws)
        if is_mounted(mnt):
            unmount(mnt)  # left by an earlier run that was killed
        mnt.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        proc = self.start(f"{self.name} mount", self.mount_cmd(d / "repo", ARCHIVE, mnt), d / f"{mnt.name}.log",
                          env=self.env(d / "home"))
        self.mounts.append(mnt)
        f = self.file_in(mnt, ws.image)
        wait_file(f, ws.size, proc, what)
        return f, time.perf_counter() - t0

    def _setup(self, ws: Workspace) -> None:
        if fusermount() is None:
            raise PeerFailed(f"{self.name} needs fusermount3 (Debian package fuse3): {self.install_command}")
        self._ensure_backup(ws)
        self.file, seconds = self._mount(ws, self.state_dir(ws) / "mnt", "the mount is ready")
        ws.log(f"{self.name}: mounted in {seconds:.2f} s, disk at {self.file}")

    def read_target(self) -> Target:
        ws = self._ws()
        return FileTarget(str(self.file), ws.size)

    def cache_files(self) -> list[Path]:
        ws = self._ws()
        return [*files_under(self.state_dir(ws) / "repo"), self.file]

    def mount_first_byte(self, ws: Workspace) -> Measure | None:
        """Seconds from starting a second mount to reading the disk's first 4 KiB through it."""
        self.require_installed()
        self._ensure_backup(ws)
        d = self.state_dir(ws)
        mnt = d / "mnt-first-byte"
        if is_mounted(mnt):
            unmount(mnt)
        mnt.mkdir(exist_ok=True)
        f = self.file_in(mnt, ws.image)
        t0 = time.perf_counter()
        proc = self.start(f"{self.name} mount", self.mount_cmd(d / "repo", ARCHIVE, mnt), d / "mnt-first-byte.log",
                          env=self.env(d / "home"))
        self.mounts.append(mnt)
        got: list[bytes] = []

        def first_byte() -> bool:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                return False
            try:
                got.append(os.pread(fd, 4096, 0))
                return True
            finally:
                os.close(fd)

        try:
            proc.wait_for(first_byte, f"first 4 KiB read from {f}", READY_TIMEOUT)
            seconds = time.perf_counter() - t0
        finally:
            unmount(mnt)
            proc.stop(grace=UNMOUNTED_GRACE)  # borg exits by itself once unmounted, releasing its repository lock
            self.mounts.remove(mnt)
            self.procs.remove(proc)
        if len(got[0]) != min(4096, ws.size):
            raise PeerFailed(f"{self.name}: the first read of {f} returned {len(got[0])} bytes")
        return Measure(seconds, {"seconds": seconds})


class Borg(FuseBackupPeer):
    name = "borg"
    product = "borg"
    detail = "mount, lz4, default chunker"
    packages = "apt-get install borgbackup python3-pyfuse3 fuse3"
    apt = ("borgbackup", "python3-pyfuse3", "fuse3")
    chunker: ClassVar[tuple[str, ...]] = ()

    def tool(self) -> str | None:
        venv = VENV / "bin" / "borg"
        return str(venv) if os.access(venv, os.X_OK) else shutil.which("borg")

    def installed(self) -> bool:
        """borg, a FUSE binding its Python can import, and fusermount."""
        if getattr(self, "_installed", None) is None:
            self._installed = self._check()
        return self._installed

    def _check(self) -> bool:
        t = self.tool()
        if t is None or fusermount() is None:
            return False
        try:
            with open(t, "rb") as f:
                first = f.readline().decode(errors="replace")
        except OSError:
            return False
        py = first[2:].strip().split()[0] if first.startswith("#!") and first[2:].strip() else None
        if py is None:
            return True  # a frozen binary: it carries its own binding
        r = subprocess.run([py, "-c", "import importlib.util as u, sys; "
                                      "sys.exit(not (u.find_spec('pyfuse3') or u.find_spec('llfuse')))"],
                           capture_output=True)
        return r.returncode == 0

    def _find_version(self) -> str | None:
        r = subprocess.run([self._tool(), "--version"], capture_output=True, text=True, timeout=60)
        m = re.search(r"([0-9]+\.[0-9]+[\w.]*)", r.stdout)
        return m.group(1) if m else None

    def env(self, home: Path) -> dict[str, str]:
        return dict(os.environ, BORG_BASE_DIR=str(home), BORG_CACHE_DIR=str(home / "cache"),
                    BORG_CONFIG_DIR=str(home / "config"), BORG_SECURITY_DIR=str(home / "security"),
                    BORG_KEYS_DIR=str(home / "keys"), BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", BORG_PASSPHRASE="")

    def init_cmd(self, repo: Path) -> list[str]:
        return [self._tool(), "init", "--encryption=none", str(repo)]

    def create_cmd(self, repo: Path, archive: str, image: Path) -> list[str]:
        return [self._tool(), "create", "--compression", "lz4", *self.chunker, f"{repo}::{archive}", image.name]

    def mount_cmd(self, repo: Path, archive: str, mnt: Path) -> list[str]:
        # a mount only reads, but borg still takes the repository lock for a moment: wait for it
        # (a second mount of the same repository, or one still shutting down) rather than fail
        return [self._tool(), "mount", "-f", "--lock-wait", str(int(READY_TIMEOUT)), f"{repo}::{archive}", str(mnt)]

    def file_in(self, mnt: Path, image: Path) -> Path:
        return mnt / image.name

    def extract_cmd(self, repo: Path, archive: str, paths: list[str], target: Path) -> list[str]:
        return [self._tool(), "extract", f"{repo}::{archive}", *paths]  # into the working directory


class BorgFixed(Borg):
    name = "borg-fixed"
    detail = "mount, lz4, fixed 1 MiB chunks"
    variant = "fixed,1048576"
    chunker = ("--chunker-params", "fixed,1048576")


class Restic(FuseBackupPeer):
    name = "restic"
    product = "restic"
    detail = "mount, compression auto"
    packages = "apt-get install restic fuse3"
    apt = ("restic", "fuse3")
    PASSWORD = "instantnfs-bench"  # restic always encrypts; the benchmark key is no secret

    def tool(self) -> str | None:
        return shutil.which("restic")

    def installed(self) -> bool:
        return self.tool() is not None and fusermount() is not None

    def _find_version(self) -> str | None:
        r = subprocess.run([self._tool(), "version"], capture_output=True, text=True, timeout=60)
        m = re.search(r"restic ([0-9][\w.]*)", r.stdout)
        return m.group(1) if m else None

    def env(self, home: Path) -> dict[str, str]:
        return dict(os.environ, RESTIC_PASSWORD=self.PASSWORD, RESTIC_CACHE_DIR=str(home / "cache"),
                    XDG_CACHE_HOME=str(home / "cache"), HOME=str(home))

    def init_cmd(self, repo: Path) -> list[str]:
        return [self._tool(), "--repo", str(repo), "init", "--repository-version", "2"]

    def create_cmd(self, repo: Path, archive: str, image: Path) -> list[str]:
        return [self._tool(), "--repo", str(repo), "--compression", "auto", "backup", "--host", "bench",
                "--tag", archive, image.name]

    def mount_cmd(self, repo: Path, archive: str, mnt: Path) -> list[str]:
        return [self._tool(), "--repo", str(repo), "mount", str(mnt)]

    def file_in(self, mnt: Path, image: Path) -> Path:
        return mnt / "snapshots" / "latest" / image.name

    def extract_cmd(self, repo: Path, archive: str, paths: list[str], target: Path) -> list[str]:
        # the snapshot holds the bare names given to backup at its root: /<dir>/...
        return [self._tool(), "--repo", str(repo), "restore", "latest", "--target", str(target),
                *(a for p in paths for a in ("--include", "/" + p.lstrip("/")))]
