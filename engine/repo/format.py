"""On-disk formats of the repository. Everything is little-endian and versioned.

Layout of a repository directory::

    config.json                  {"magic": "instantnfs-repository", "version": 1, "id", "block_size"}
    lock                         flock()ed by writers; holds the writer's PID
    next-pack                    the pack-id counter: the next id to hand out (decimal)
    pins.lock                    flock()ed for milliseconds by add_pin and points delete
    pins/<point>.<daemon>.<session>.pin   a published point's pin (``engine.repo.pins``)
    packs/<pack:08x>.pack        append-only chunk records; sealed once its .idx exists
    packs/<pack:08x>.idx         the pack's index: fingerprint -> record (for dedup, check, gc)
    points/<id>/manifest.json    one restore point: VM settings, disks, stats
    points/<id>/<n>.map          one block map per disk (mmap-able)
    tmp/                         work in progress; anything here is garbage after a crash

Pack ids are handed out by a persisted, monotonic counter (``next-pack``, written under
the writer lock and fsynced before the pack it names is created): a crash may skip ids,
none is ever used twice, so (pack id, record offset) names one immutable record forever.
A repository without the counter (written by an older instantnfs) starts it at the
highest pack or index id present plus one.

Pack file, version 2: a 48-byte header ``b"INFSPACK", u32 version, u32 pack id, 16 bytes
pack uid (random, unique to this pack), 16 bytes repository id (config.json's "id")``,
then records. Version 1 (still read): a 16-byte header ``b"INFSPACK", u32 version,
u32 pack id``, then records. A reader opening a pack checks magic, pack id and, for
version 2, the repository id and that the uid equals the one in the pack's index.

Record: a 52-byte header then ``clen`` payload bytes::

    u32 magic "INFR" | u8 codec (0 raw, 1 lz4 block) | 3 pad | u32 clen | u32 ulen
    | 32 bytes BLAKE3 fingerprint of the uncompressed block | u32 CRC32C

The CRC32C covers the first 48 header bytes and the payload. ``ulen`` is always the
repository's block size (a disk's last, partial block is stored zero-padded).

Pack index, version 2: a 48-byte header ``b"INFSPIDX", u32 version, u32 pack id,
u64 count, 16 bytes pack uid (the pack header's), 8 pad``; version 1 (indexes of
version 1 packs, still read and written for them): a 32-byte header ``b"INFSPIDX",
u32 version, u32 pack id, u64 count, 8 pad``. Then ``count`` 48-byte entries
``32s fingerprint, u64 record offset, u32 clen, u32 ulen``.
An index is written (and fsynced) only after its pack is complete and fsynced; a pack
without an index was cut short by a crash and is garbage.

Block map: a 64-byte header ``b"INFSBMAP", u32 version, u32 block size, u64 disk size,
u64 block count, 32 pad``, then one 16-byte entry per block: ``u32 pack, u32 clen,
u64 record offset``; ``pack == 0xFFFFFFFF`` marks an all-zero block that is not stored.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.blockmap import ENTRY_DTYPE, ZERO_PACK
from engine.errors import RepositoryError
from engine.fsutil import fsync_dir, write_file_atomic  # noqa: F401  (re-exported for engine.repo)

REPO_MAGIC = "instantnfs-repository"
REPO_VERSION = 1
MIN_BLOCK = 256 * 1024
MAX_BLOCK = 4 * 1024 * 1024
DEFAULT_BLOCK = 1024 * 1024

PACK_MAGIC = b"INFSPACK"
PACK_VERSION = 2
PACK_HEADER_V1 = struct.Struct("<8sII")
PACK_HEADER = struct.Struct("<8sII16s16s")
UID_SIZE = 16

RECORD_MAGIC = 0x52464E49  # b"INFR" read as little-endian u32
RECORD_HEADER = struct.Struct("<IB3xII32sI")
RECORD_CRC_SPAN = RECORD_HEADER.size - 4
CODEC_RAW = 0
CODEC_LZ4 = 1

IDX_MAGIC = b"INFSPIDX"
IDX_VERSION = 2
IDX_HEADER_V1 = struct.Struct("<8sIIQ8x")
IDX_HEADER = struct.Struct("<8sIIQ16s8x")
IDX_DTYPE = np.dtype([("fp", "S32"), ("offset", "<u8"), ("clen", "<u4"), ("ulen", "<u4")])

MAP_MAGIC = b"INFSBMAP"
MAP_VERSION = 1
MAP_HEADER = struct.Struct("<8sIIQQ32x")

MANIFEST_FORMAT = 1

PACK_COUNTER = "next-pack"


def pack_name(pack: int) -> str:
    return f"{pack:08x}.pack"


def idx_name(pack: int) -> str:
    return f"{pack:08x}.idx"


# -- block maps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MapInfo:
    block_size: int
    disk_size: int
    nblocks: int


def map_bytes(entries: np.ndarray, block_size: int, disk_size: int) -> bytes:
    header = MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, block_size, disk_size, len(entries))
    return header + np.ascontiguousarray(entries, dtype=ENTRY_DTYPE).tobytes()


def read_map_header(raw: bytes | memoryview, path: Path) -> MapInfo:
    if len(raw) < MAP_HEADER.size:
        raise RepositoryError(f"block map {path} is truncated")
    magic, version, block_size, disk_size, nblocks = MAP_HEADER.unpack_from(raw)
    if magic != MAP_MAGIC:
        raise RepositoryError(f"{path} is not a block map (bad magic)")
    if version != MAP_VERSION:
        raise RepositoryError(f"block map {path} has unsupported version {version}")
    if block_size <= 0 or nblocks != -(-disk_size // block_size):
        raise RepositoryError(f"block map {path} has a wrong block count")
    return MapInfo(block_size, disk_size, nblocks)


def load_map(path: Path) -> tuple[MapInfo, np.ndarray]:
    """Map a block map file read-only; costs O(1) whatever the disk size."""
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise RepositoryError(f"cannot open block map {path}: {e}") from e
    info = read_map_header(mm[: MAP_HEADER.size].tobytes(), path)
    if len(mm) != MAP_HEADER.size + info.nblocks * ENTRY_DTYPE.itemsize:
        raise RepositoryError(f"block map {path} is truncated or has a wrong block count")
    entries = mm[MAP_HEADER.size :].view(ENTRY_DTYPE)
    return info, entries


def zero_entries(nblocks: int) -> np.ndarray:
    entries = np.zeros(nblocks, dtype=ENTRY_DTYPE)
    entries["pack"] = ZERO_PACK
    return entries


# -- pack indexes -----------------------------------------------------------------------


def fingerprints(entries: np.ndarray) -> list[bytes]:
    """The 32-byte fingerprints of index entries, exactly (numpy's 'S' type would strip
    trailing NUL bytes from a value, and 1 fingerprint in 256 ends with one)."""
    raw = np.ascontiguousarray(entries["fp"]).tobytes()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def idx_bytes(pack: int, entries: np.ndarray, uid: bytes | None = None) -> bytes:
    """An index file's bytes: version 2 with the pack's uid, version 1 for a version 1
    pack (``uid`` None)."""
    if uid is None:
        head = IDX_HEADER_V1.pack(IDX_MAGIC, 1, pack, len(entries))
    else:
        head = IDX_HEADER.pack(IDX_MAGIC, IDX_VERSION, pack, len(entries), uid)
    return head + entries.tobytes()


def parse_idx_header(raw: bytes, path: Path) -> tuple[int, int, int, bytes | None]:
    """(header size, pack id, count, pack uid or None for version 1) of an index."""
    if len(raw) < IDX_HEADER_V1.size:
        raise RepositoryError(f"pack index {path} is truncated")
    magic, version, pack, count = IDX_HEADER_V1.unpack_from(raw)
    if magic != IDX_MAGIC:
        raise RepositoryError(f"{path} is not a pack index (bad magic)")
    if version == 1:
        return IDX_HEADER_V1.size, pack, count, None
    if version != IDX_VERSION:
        raise RepositoryError(f"pack index {path} has unsupported version {version}")
    if len(raw) < IDX_HEADER.size:
        raise RepositoryError(f"pack index {path} is truncated")
    uid: bytes = IDX_HEADER.unpack_from(raw)[4]
    return IDX_HEADER.size, pack, count, uid


def read_idx_uid(path: Path) -> tuple[int, np.ndarray, bytes | None]:
    """(pack id, entries, pack uid or None for a version 1 index)."""
    raw = path.read_bytes()
    size, pack, count, uid = parse_idx_header(raw, path)
    if len(raw) != size + count * IDX_DTYPE.itemsize:
        raise RepositoryError(f"pack index {path} is truncated")
    return pack, np.frombuffer(raw, dtype=IDX_DTYPE, offset=size).copy(), uid


def read_idx(path: Path) -> tuple[int, np.ndarray]:
    pack, entries, _uid = read_idx_uid(path)
    return pack, entries


def pack_header_size(version: int) -> int:
    return PACK_HEADER_V1.size if version == 1 else PACK_HEADER.size


# -- manifests --------------------------------------------------------------------------


def dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
