"""A repository of restore points: open it, list and open points, lock it for writing.

Readers (restore, the NFS server) never take the lock and never write: everything they
read is immutable once committed (a restore point directory appears by an atomic
rename, and its packs were fsynced and indexed before). Writers (backup, points delete,
gc) hold an exclusive ``flock`` on ``lock`` for their whole run; the kernel drops it
when the process dies, so a crashed writer leaves no stale lock. Writers take pack ids
from ``allocate_pack_id`` (a persisted counter: an id is never handed out twice).

The one exception to "readers never write" is a pin (``engine.repo.pins``): a daemon
publishing a point records it under the short ``pins.lock``, never the writer lock, so
publishing works while a backup runs. ``delete_point`` takes the pins lock too, checks
the point's pins and moves the point away before releasing it: a point is deleted only
if no pin names it, and a pin is added only if its point still exists.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.blockmap import BlockMap
from engine.errors import (
    NotFound,
    PointPinned,
    RepositoryError,
    RepositoryLocked,
    RepositoryNotFound,
    RepositoryVersionError,
    UsageError,
)
from engine.repo.format import (
    DEFAULT_BLOCK,
    MANIFEST_FORMAT,
    MAX_BLOCK,
    MIN_BLOCK,
    PACK_COUNTER,
    REPO_MAGIC,
    REPO_VERSION,
    fsync_dir,
    load_map,
    write_file_atomic,
)
from engine.repo.packs import PackReader, PackWriter
from engine.repo.pins import describe_pins, pins_locked, point_pins


@dataclass(frozen=True, slots=True)
class DiskInfo:
    name: str
    size: int
    map_file: str
    source: str
    source_format: str
    stored_blocks: int
    zero_blocks: int


class RestorePoint:
    """One committed, immutable restore point."""

    def __init__(self, repo: Repository, path: Path, manifest: dict) -> None:
        self.repo = repo
        self.path = path
        self.manifest = manifest
        self.id: str = manifest["id"]
        self.vm: str = manifest["vm"]
        self.created: str = manifest["created"]
        self.seq: int = manifest.get("seq", 0)  # commit order: two points can share a second
        self.disks = [DiskInfo(**d) for d in manifest["disks"]]

    def disk_info(self, which: str | int) -> DiskInfo:
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            i = int(which)
            if 0 <= i < len(self.disks):
                return self.disks[i]
        for d in self.disks:
            if d.name == which:
                return d
        names = ", ".join(d.name for d in self.disks)
        raise NotFound(f"restore point {self.id} has no disk {which!r} (disks: {names})")

    def open_blockmap(self, which: str | int) -> BlockMap:
        """The block map of disk ``which``: a read-only memory map of its file, checked
        against the manifest. Nothing is read but the header, so it costs the same for
        a 1 GiB and a 1 TiB disk; entries are paged in when a read first touches them
        (the file never changes: a restore point is immutable)."""
        info = self.disk_info(which)
        mapinfo, entries = load_map(self.path / info.map_file)
        if mapinfo.block_size != self.repo.block_size or mapinfo.disk_size != info.size:
            raise RepositoryError(f"block map {self.path / info.map_file} does not match its manifest")
        return BlockMap(entries, mapinfo.block_size, mapinfo.disk_size)

    def to_json(self) -> dict:
        m = self.manifest
        return {
            "id": self.id,
            "vm": self.vm,
            "created": self.created,
            "parent": m.get("parent"),
            "cpus": m.get("cpus"),
            "memory_mib": m.get("memory_mib"),
            "firmware": m.get("firmware"),
            "guest_os": m.get("guest_os"),
            "disks": [{"name": d.name, "size": d.size, "source": d.source} for d in self.disks],
            "stats": m.get("stats", {}),
        }


class Repository:
    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.config = config
        self.block_size: int = config["block_size"]
        self.id: str = config["id"]
        self.packs_dir = path / "packs"
        self.points_dir = path / "points"
        self.tmp_dir = path / "tmp"
        self.uid = repo_uid(self.id)
        self.reader = PackReader(self.packs_dir, self.block_size, self.uid)

    # -- creation and opening ------------------------------------------------------------

    @staticmethod
    def init(path: str | os.PathLike, block_size: int = DEFAULT_BLOCK) -> Path:
        p = Path(path)
        if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
            raise UsageError(
                f"block size {block_size} is not allowed: use a power of two from 256K to 4M"
            )
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{p} exists and is not a directory")
            if any(p.iterdir()):
                raise UsageError(f"{p} is not empty: a repository needs an empty or new directory")
        try:
            p.mkdir(parents=True, exist_ok=True)
            for sub in ("packs", "points", "tmp"):
                (p / sub).mkdir()
            (p / "lock").touch()
            config = {"magic": REPO_MAGIC, "version": REPO_VERSION, "id": uuid.uuid4().hex, "block_size": block_size}
            write_file_atomic(p / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        except OSError as e:
            raise RepositoryError(f"cannot create a repository at {p}: {e.strerror}") from e
        return p

    @classmethod
    def open(cls, path: str | os.PathLike) -> Repository:
        p = Path(path)
        cfg_path = p / "config.json"
        try:
            raw = cfg_path.read_text()
        except FileNotFoundError:
            raise RepositoryNotFound(f"no instantnfs repository at {p} (create one with 'instantnfs repo init {p}')") from None
        except OSError as e:
            raise RepositoryError(f"cannot read {cfg_path}: {e.strerror}") from e
        try:
            config = json.loads(raw)
            magic, version = config["magic"], config["version"]
        except (ValueError, KeyError, TypeError):
            raise RepositoryError(f"{cfg_path} is not an instantnfs repository configuration") from None
        if magic != REPO_MAGIC:
            raise RepositoryNotFound(f"{p} is not an instantnfs repository")
        if version != REPO_VERSION:
            raise RepositoryVersionError(
                f"repository {p} has format version {version}; this instantnfs reads version {REPO_VERSION}"
            )
        bs = config.get("block_size")
        if not isinstance(bs, int) or bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
            raise RepositoryError(f"{cfg_path} has an invalid block size {bs!r}")
        for sub in ("packs", "points", "tmp"):
            if not (p / sub).is_dir():
                raise RepositoryError(f"repository {p} is damaged: {sub}/ is missing")
        return cls(p, config)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restore points ------------------------------------------------------------------

    def _load_point(self, d: Path) -> RestorePoint:
        mpath = d / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise RepositoryError(f"restore point {d.name} is unreadable: {mpath}: {e}") from e
        if manifest.get("format") != MANIFEST_FORMAT:
            raise RepositoryVersionError(f"restore point {d.name} has unknown manifest format {manifest.get('format')!r}")
        return RestorePoint(self, d, manifest)

    def points(self, vm: str | None = None) -> list[RestorePoint]:
        out = []
        for d in sorted(self.points_dir.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            pt = self._load_point(d)
            if vm is None or pt.vm == vm:
                out.append(pt)
        out.sort(key=lambda p: (p.seq, p.created, p.id))
        return out

    def point(self, ident: str) -> RestorePoint:
        """A restore point by id or unique id prefix, or 'VM@latest' / 'latest'."""
        if ident == "latest" or ident.endswith("@latest"):
            vm = None if ident == "latest" else ident[: -len("@latest")]
            pts = self.points(vm)
            if not pts:
                raise NotFound(f"no restore points{' of VM ' + vm if vm else ''} in {self.path}")
            return pts[-1]
        exact = self.points_dir / ident
        if ident and "/" not in ident and (exact / "manifest.json").is_file():
            return self._load_point(exact)
        matches = [d for d in self.points_dir.iterdir() if d.name.startswith(ident) and not d.name.startswith(".")] if ident else []
        if len(matches) == 1:
            return self._load_point(matches[0])
        if len(matches) > 1:
            raise UsageError(f"restore point id {ident!r} is ambiguous ({len(matches)} match)")
        raise NotFound(f"no restore point {ident!r} in {self.path} (see 'instantnfs points')")

    def next_seq(self) -> int:
        """The commit sequence number for a new restore point (call under the writer lock)."""
        return max((p.seq for p in self.points()), default=0) + 1

    def latest_point(self, vm: str) -> RestorePoint | None:
        pts = self.points(vm)
        return pts[-1] if pts else None

    # -- writing -------------------------------------------------------------------------

    def allocate_pack_id(self) -> int:
        """A pack id never handed out before (call under the writer lock).

        The counter file is rewritten (fsynced, renamed, directory fsynced) before the id
        is returned, so a crash after this can skip the id but never reuse it. A
        repository without the counter starts it after the highest id present.
        """
        path = self.path / PACK_COUNTER
        try:
            stored = int(path.read_text().strip())
        except FileNotFoundError:
            stored = 0
        except (OSError, ValueError) as e:
            raise RepositoryError(
                f"the pack-id counter {path} is unreadable ({e}); remove it and it is rebuilt "
                "from the packs present (ids of packs gc removed may then be reused by new packs: "
                "restart the daemons serving this repository)"
            ) from None
        present = [int(p.stem, 16) for p in self.packs_dir.iterdir()
                   if p.suffix in (".pack", ".idx") and len(p.stem) == 8 and _is_hex(p.stem)]
        pack = max(stored, max(present, default=0) + 1, 1)
        if pack >= 1 << 23:  # chunk keys are pack << 40 | offset in 63 bits
            raise RepositoryError(f"repository {self.path} has used every pack id; copy it into a new repository")
        write_file_atomic(path, f"{pack + 1}\n".encode())
        return pack

    def pack_writer(self, pack_limit: int = 1 << 30) -> PackWriter:
        """A writer of new packs, their ids from ``allocate_pack_id`` (under the writer lock)."""
        return PackWriter(self.packs_dir, self.allocate_pack_id, self.uid, pack_limit)

    @contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Hold the exclusive writer lock; fail at once if another writer has it."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
                pid, _, what = holder.partition(" ")
                raise RepositoryLocked(
                    f"repository {self.path} is locked by PID {pid}{' (' + what + ')' if what else ''}; "
                    "try again when it has finished"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {purpose}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def delete_point(self, ident: str) -> RestorePoint:
        """Delete a restore point; refused (``PointPinned``) while a pin names it."""
        with self.lock("points delete"):
            pt = self.point(ident)
            trash = self.tmp_dir / f"deleted-{pt.id}"
            with pins_locked(self):
                pins = point_pins(self, pt.id)
                if pins:
                    raise PointPinned(
                        f"restore point {pt.id} is published ({describe_pins(pins)}): unpublish it first, "
                        "or use 'points delete --force' to unpublish through the daemon"
                    )
                os.replace(pt.path, trash)
                fsync_dir(self.points_dir)
            shutil.rmtree(trash, ignore_errors=True)
            return pt


def repo_uid(ident: str) -> bytes:
    """The 16-byte repository id written into pack headers (config.json's "id")."""
    try:
        raw = bytes.fromhex(ident)
    except ValueError:
        raw = b""
    return raw if len(raw) == 16 else hashlib.blake2b(ident.encode(), digest_size=16).digest()


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
