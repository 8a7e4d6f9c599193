"""Repository check and garbage collection.

``check`` verifies structure (configuration, manifests, block maps, pack indexes, that
every block map entry points at an indexed record of the same length) and, with
``verify_data``, reads every stored record: CRC32C, decompression to the exact block
size, and the BLAKE3 fingerprint. A bad chunk is reported with every restore point,
disk and disk offset that uses it. A pack whose index is missing or unreadable is
damage when any restore point uses it (named with those points), garbage otherwise.
Garbage (packs without an index that nothing uses, unreferenced chunks, leftovers in
tmp/) is reported separately: it is what an interrupted writer leaves, harmless, and
what ``gc`` removes. Pins (``engine.repo.pins``) are listed, with those whose daemon is
gone ("stale").

``gc`` runs under the writer lock, so no backup can add references while it decides.
A chunk is live when a restore point uses it or a pinned point does: a pinned point's
directory is looked for in tmp/ too (a ``points delete`` that crashed half way), and
such a leftover is kept. It never moves a live chunk (block maps store chunk locations
and are immutable):
packs with no live chunk are deleted; in packs with some, the index is first rewritten
to list only live chunks (so no later backup dedups against a chunk about to vanish)
and then the byte ranges outside live records are punched out of the file
(``fallocate(PUNCH_HOLE)``), which frees the space without changing any live offset.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.blockmap import ZERO_PACK
from engine.errors import InstantNFSError, RepositoryError
from engine.repo.format import (
    IDX_DTYPE,
    PACK_HEADER,
    PACK_HEADER_V1,
    PACK_MAGIC,
    fingerprints,
    idx_bytes,
    idx_name,
    pack_header_size,
    pack_name,
    read_idx_uid,
    write_file_atomic,
)
from engine.repo.packs import HDR, PackReader
from engine.repo.pins import Pin, list_pins, stale_pins
from engine.repo.repository import Repository, RestorePoint


@dataclass
class BadChunk:
    pack: int
    offset: int
    error: str
    users: list[tuple[str, str, int]] = field(default_factory=list)  # (point, disk, disk offset)

    def to_json(self) -> dict:
        return {
            "pack": pack_name(self.pack),
            "offset": self.offset,
            "error": self.error,
            "used_by": [{"point": p, "disk": d, "disk_offset": o} for p, d, o in self.users],
        }


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    bad_chunks: list[BadChunk] = field(default_factory=list)
    points: int = 0
    chunks: int = 0
    chunks_verified: int = 0
    pins: list[Pin] = field(default_factory=list)
    stale_pins: list[Pin] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.bad_chunks

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "points": self.points,
            "chunks": self.chunks,
            "chunks_verified": self.chunks_verified,
            "errors": self.errors,
            "garbage": self.garbage,
            "bad_chunks": [b.to_json() for b in self.bad_chunks],
            "pins": [p.to_json() for p in self.pins],
            "stale_pins": [p.to_json() for p in self.stale_pins],
        }


@dataclass
class _Maps:
    """Every block map of every restore point, loaded."""

    points: list[RestorePoint]
    maps: list[tuple[str, str, np.ndarray]]  # (point id, disk name, entries)


def _load_indexes(repo: Repository, report: CheckReport | None,
                  bad: dict[int, str] | None = None) -> tuple[dict[int, np.ndarray], dict[int, bytes | None]]:
    """pack -> index entries, and pack -> uid, of every readable index; with a report,
    the unreadable ones go into ``bad`` (pack -> why) to be judged by who uses them."""
    indexes: dict[int, np.ndarray] = {}
    uids: dict[int, bytes | None] = {}
    for path in sorted(repo.packs_dir.glob("*.idx")):
        try:
            pack, entries, uid = read_idx_uid(path)
        except RepositoryError as e:
            if report is None:
                raise
            try:
                bad_pack = int(path.stem, 16)
            except ValueError:
                report.errors.append(str(e))
                continue
            if bad is not None:
                bad[bad_pack] = str(e)
            continue
        if path.name != idx_name(pack):
            msg = f"pack index {path.name} names pack {pack}"
            if report is None:
                raise RepositoryError(msg)
            report.errors.append(msg)
            continue
        indexes[pack] = entries
        uids[pack] = uid
    return indexes, uids


def _load_maps(repo: Repository, report: CheckReport | None, extra: list | None = None) -> _Maps:
    """The block maps of every restore point (and of the point directories in ``extra``)."""
    points: list[RestorePoint] = []
    maps = []
    dirs = [d for d in sorted(repo.points_dir.iterdir()) if not d.name.startswith(".")]
    for d in dirs + list(extra or []):
        try:
            pt = repo._load_point(d)
            for i, info in enumerate(pt.disks):
                maps.append((pt.id, info.name, np.asarray(pt.open_blockmap(i).entries)))
        except (InstantNFSError, KeyError, TypeError) as e:
            if report is None:
                raise RepositoryError(f"restore point {d.name} is unreadable: {e}") from e
            report.errors.append(f"restore point {d.name}: {e}")
            continue
        points.append(pt)
    return _Maps(points, maps)


def _references(maps: _Maps) -> dict[int, dict[int, int]]:
    """pack -> {record offset: clen} over every block map."""
    refs: dict[int, dict[int, int]] = defaultdict(dict)
    for _pid, _disk, entries in maps.maps:
        stored = entries[entries["pack"] != ZERO_PACK]
        if not len(stored):
            continue
        for pack in np.unique(stored["pack"]).tolist():
            sel = stored[stored["pack"] == pack]
            offs, idx = np.unique(sel["offset"], return_index=True)
            refs[pack].update(zip(offs.tolist(), sel["clen"][idx].tolist()))
    return refs


def _users(maps: _Maps, pack: int) -> list[str]:
    """'point/disk' of every block map that uses ``pack``."""
    return [f"{pid}/{disk}" for pid, disk, m in maps.maps if bool((m["pack"] == pack).any())]


def check(repo: Repository, verify_data: bool = False, progress: Callable[[int], None] | None = None) -> CheckReport:
    report = CheckReport()
    unreadable: dict[int, str] = {}
    indexes, _uids = _load_indexes(repo, report, unreadable)
    maps = _load_maps(repo, report)
    report.points = len(maps.points)
    report.pins = list_pins(repo)
    report.stale_pins = stale_pins(repo)
    packs_on_disk = {int(p.stem, 16) for p in repo.packs_dir.glob("*.pack") if len(p.stem) == 8}
    refs = _references(maps)
    pinned = {p.point for p in report.pins}
    for point in sorted(pinned - {pt.id for pt in maps.points}):
        report.errors.append(f"restore point {point} is pinned (published) but missing from points/")

    for pack in sorted(packs_on_disk - set(indexes)):
        why = unreadable.get(pack, "its index is missing")
        if pack in refs:
            users = _users(maps, pack)
            report.errors.append(
                f"pack {pack_name(pack)} holds {len(refs[pack])} chunk(s) that restore points use, but {why}: "
                f"used by {', '.join(users)}"
            )
        elif pack in unreadable:
            report.garbage.append(f"pack {pack_name(pack)}: {why}; no restore point uses it")
        else:
            report.garbage.append(f"pack {pack_name(pack)} has no index (left by an interrupted backup)")
    for pack in sorted(set(unreadable) - packs_on_disk):
        report.errors.append(unreadable[pack])
    for pack in sorted(set(indexes) - packs_on_disk):
        report.errors.append(f"pack {pack_name(pack)} is missing but its index exists")
    for entry in sorted(repo.tmp_dir.iterdir()):
        report.garbage.append(f"tmp/{entry.name} (left by an interrupted writer)")

    bad: dict[tuple[int, int], BadChunk] = {}
    for pack, used in sorted(refs.items()):
        entries = indexes.get(pack)
        known = dict(zip(entries["offset"].tolist(), entries["clen"].tolist())) if entries is not None else {}
        for off, clen in used.items():
            if known.get(off) != clen:
                why = "its pack is missing" if pack not in packs_on_disk else "no such record in the pack index"
                bad[(pack, off)] = BadChunk(pack, off, f"referenced chunk not found: {why}")
    for pack, entries in sorted(indexes.items()):
        live = refs.get(pack, {})
        dead = sum(1 for o in entries["offset"].tolist() if o not in live)
        if dead:
            report.garbage.append(f"pack {pack_name(pack)}: {dead} chunk(s) no restore point uses")
        report.chunks += len(entries)

    if verify_data:
        buf = bytearray(repo.block_size)
        for pack, entries in sorted(indexes.items()):
            if pack not in packs_on_disk:
                continue
            for fp, off, clen in zip(fingerprints(entries), entries["offset"].tolist(), entries["clen"].tolist()):
                err = verify_chunk(repo.reader, pack, off, clen, fp, buf)
                report.chunks_verified += 1
                if err and (pack, off) not in bad:
                    bad[(pack, off)] = BadChunk(pack, off, err)
                if progress:
                    progress(clen + HDR)

    if bad:
        for pid, disk, m in maps.maps:
            for (pack, off), b in bad.items():
                hits = np.flatnonzero((m["pack"] == pack) & (m["offset"] == off))
                b.users.extend((pid, disk, int(i) * repo.block_size) for i in hits.tolist())
        report.bad_chunks = sorted(bad.values(), key=lambda b: (b.pack, b.offset))
    return report


def verify_chunk(reader: PackReader, pack: int, off: int, clen: int, fp: bytes,
                 out: bytearray | None = None) -> str | None:
    """Why the record at (pack, off) is not the chunk ``fp`` names, or None when it is:
    CRC32C of header and payload, decompression to exactly the block size, the record's
    fingerprint against ``fp`` (the pack index's) and BLAKE3 of the content against it.
    ``out``: a block-sized buffer to decompress into (reused by the caller); it holds
    the chunk after a None. Reads only. Shared by ``check`` and backup verification
    (``engine.vm.verify``)."""
    try:
        reader.read_chunk(pack, off, clen, out, fingerprint=fp)
    except InstantNFSError as e:
        return str(e)
    return None


# -- garbage collection ----------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _allocated(path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def gc(repo: Repository) -> dict:
    """Remove what no restore point references; returns what was done."""
    out: dict[str, Any] = {"packs_removed": 0, "chunks_removed": 0, "bytes_reclaimed": 0, "tmp_removed": 0, "notes": []}
    with repo.lock("gc"):
        # pinned points cannot be deleted; still, a pinned point found only in tmp/ (a
        # delete that crashed half way) keeps its chunks and its directory
        live_ids = {d.name for d in repo.points_dir.iterdir()}
        keep_tmp = {f"deleted-{p.point}" for p in list_pins(repo) if p.point not in live_ids}
        kept = [repo.tmp_dir / n for n in sorted(keep_tmp) if (repo.tmp_dir / n / "manifest.json").is_file()]
        maps = _load_maps(repo, None, kept)
        indexes, uids = _load_indexes(repo, None)
        refs = _references(maps)
        for pack, used in refs.items():
            entries = indexes.get(pack)
            have = set(entries["offset"].tolist()) if entries is not None else set()
            missing = set(used) - have
            if missing:
                raise RepositoryError(
                    f"restore points reference {len(missing)} chunk(s) of pack {pack_name(pack)} that its index lacks; "
                    "gc stops here: run 'instantnfs repo check' first"
                )
        for entry in sorted(repo.tmp_dir.iterdir()):
            if entry.name in keep_tmp:
                out["notes"].append(f"tmp/{entry.name} is a pinned restore point: kept")
                continue
            before = sum(_allocated(p) for p in entry.rglob("*")) if entry.is_dir() else _allocated(entry)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            out["tmp_removed"] += 1
            out["bytes_reclaimed"] += before
        for path in sorted(repo.packs_dir.glob("*.pack")):
            pack = int(path.stem, 16)
            idx_path = repo.packs_dir / idx_name(pack)
            live = refs.get(pack, {})
            entries = indexes.get(pack)
            before = _allocated(path) + _allocated(idx_path)
            if not live:
                idx_path.unlink(missing_ok=True)  # the index first: dedup must not find these chunks
                path.unlink()
                out["packs_removed"] += 1
                out["chunks_removed"] += 0 if entries is None else len(entries)
                out["bytes_reclaimed"] += before
                continue
            assert entries is not None
            keep = np.isin(entries["offset"], np.fromiter(live.keys(), dtype=np.uint64))
            if keep.all():
                continue
            write_file_atomic(idx_path, idx_bytes(pack, np.ascontiguousarray(entries[keep], dtype=IDX_DTYPE), uids[pack]))
            out["chunks_removed"] += int((~keep).sum())
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                head = os.pread(fd, PACK_HEADER.size, 0)
                if len(head) < PACK_HEADER_V1.size or head[:8] != PACK_MAGIC:
                    raise RepositoryError(f"pack {path} has a bad header; gc leaves it alone")
                pos = pack_header_size(PACK_HEADER_V1.unpack_from(head)[1])
                for off in sorted(live):
                    punch_hole(fd, pos, off - pos)
                    pos = off + HDR + live[off]
                punch_hole(fd, pos, os.fstat(fd).st_size - pos)
                os.fsync(fd)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                out["notes"].append(
                    f"{repo.packs_dir} cannot punch holes: dead chunks of {path.name} stay until none of its chunks is used"
                )
            finally:
                os.close(fd)
            out["bytes_reclaimed"] += max(0, before - _allocated(path) - _allocated(idx_path))
        for idx_path in sorted(repo.packs_dir.glob("*.idx")):
            if not idx_path.with_suffix(".pack").exists():
                idx_path.unlink()
    return out
