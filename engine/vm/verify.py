"""Backup verification without the boot: every chunk of a point checked, its volumes
recognised, the files behind a bad block named, the checker's tests, the report.

What it does. ``check_data`` reads every chunk the point's block maps reference, each
distinct chunk once however many blocks (of however many disks) use it, in (pack, record
offset) order so the packs are read front to back; zero blocks cost nothing. Each chunk
goes through ``engine.repo.check.verify_chunk``, the repository check's own code: CRC32C
of the record, decompression to exactly the block size, the record's fingerprint
against the pack index's and BLAKE3 of the content against it. A chunk that fails (or
whose pack is missing, whose index is unreadable or lacks the record) becomes one
``BadBlock`` per run of disk blocks of this point that use it: a chunk dedup shares
between two offsets is read once and reported at both. ``recognise`` lists each volume
with its filesystem or why there is none (``engine.files.point``). ``files_at`` names the
files whose data lies in each bad block: it walks each affected filesystem once, maps
each file's runs (``File.volume_runs``) against the bad ranges turned into volume
offsets through the ``Volume``'s extents, and stops naming files of a block after
``MAX_FILES``. ``run_tests`` runs the checker's tests against the ports a booted guest
forwards to 127.0.0.1. ``verify_point`` orchestrates all of it, with the boot given as a
callable by the caller (the daemon's VM supervisor), and returns a ``Report``.

The verdict (``Report.passed``): no bad block and every block map readable; at least one
filesystem recognised when the point has any volume (a volume holding no filesystem
this tool reads -- swap, an encrypted volume, a raw database disk -- is a warning, not a
failure; a point where no volume holds a filesystem this tool reads fails); with a
boot, the boot succeeded and every test passed.

The backup is sacred: nothing here writes to the repository. ``check_data`` reads
through the repository's pack reader, not the stack's decompression cache, so a
verification neither evicts what running VMs read nor fills the cache with chunks
nobody else wants (the kernel's page cache does keep the packs' pages; on a host short
of memory that is the kernel's to reclaim). ``recognise`` and ``files_at`` read
filesystem metadata through the stack's disks (``PointFiles``), so those few blocks do
go through the shared cache, as they do for file-level recovery.

Threads. ``check_data`` runs ``workers`` threads of its own (never the stack's
decompression pool, which serves the NFS clients): each takes the next batch of chunks
in pack order from a shared cursor, so the reads in flight stay close together, and
first asks the kernel (fadvise WILLNEED) for the batch after it: two threads preading
one file confuse its readahead, the hints keep the disk busy (on the 2 GiB bench disk,
pages dropped: 1.15 GB/s without them, 1.9 GB/s with; bench/verify_bench.py); pread,
CRC32C, LZ4 and BLAKE3 release the GIL, so they use the cores. Progress and
cancellation are seen by the calling thread between batches (``cancel`` set: the workers
stop after their batch and ``Cancelled`` is raised). Everything else runs in the calling
thread; all of it blocks: call it from a job thread, never from the event loop.

A tcp test passes when 127.0.0.1:<forwarded port> accepts a connection that then answers
or stays open for ``TCP_SETTLE`` seconds: QEMU's user network accepts every connection
to a forwarded port first and closes it at once when nothing listens in the guest.
tcp and http tests are retried until they pass or their timeout passes (a service may
start after the heartbeat); urllib runs without proxies.

What it refuses: tests without a boot (nothing to test against); a test naming a port
the boot did not forward fails rather than reaching any other address. Tests only
connect to 127.0.0.1.
"""
from __future__ import annotations

import bisect
import datetime as dt
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np

from engine.blockmap import KEY_SHIFT, ZERO_PACK
from engine.errors import Cancelled, InstantNFSError, RepositoryError, UsageError
from engine.files.fs import Entry, FileSystem, UnrecognisedFilesystem
from engine.files.point import PointFiles
from engine.files.volumes import Volume
from engine.repo.check import verify_chunk
from engine.repo.format import fingerprints, idx_name, pack_name, read_idx_uid
from engine.repo.repository import RestorePoint
from engine.stack import Stack

BATCH = 16  # chunks a worker takes at once (consecutive in pack order)
MAX_FILES = 20  # files named per bad block before files_at stops looking for more
OUTPUT_LIMIT = 16 << 10  # bytes of a test script's output kept in its result
# seconds a tcp test waits to see a forwarded connection stay open: QEMU closes it when the
# guest answers the forwarded SYN with a reset, which an emulated (TCG) guest on a loaded
# host may take a second or more to do; 1 s let a closed port pass under load
TCP_SETTLE = 3.0
RETRY_PAUSE = 0.5  # seconds between two tries of a tcp/http test that failed
CONSOLE_TAIL = 4000  # characters of the guest console kept in the report
# what says a booted guest is up when the caller gives no pattern: a login prompt (any
# Linux or BSD getty), or the test guest's heartbeat marker
DEFAULT_HEARTBEAT = r"(login:|GUEST-HEARTBEAT)"

Progress = Callable[[int, int], object]  # (logical bytes done, logical bytes in all)


# -- the data check -----------------------------------------------------------------------


@dataclass
class BadBlock:
    """A range of one disk of the point whose data cannot be trusted (one chunk's use)."""

    disk: str  # the restore point's name of the disk
    offset: int
    length: int
    chunk: str  # "pack 00000003.pack offset 4096"
    error: str
    files: list[str] = field(default_factory=list)  # "disk0:1:/data/random-4m.bin"
    notes: list[str] = field(default_factory=list)  # metadata, no filesystem, stopped after N...

    def to_json(self) -> dict:
        return {"disk": self.disk, "offset": self.offset, "length": self.length, "chunk": self.chunk,
                "error": self.error, "files": list(self.files), "notes": list(self.notes)}


@dataclass
class DataResult:
    """What ``check_data`` found: the counts, and every bad block."""

    point: str
    logical_bytes: int = 0  # the disks' sizes, summed
    zero_bytes: int = 0  # of which all-zero blocks (not stored, nothing to read)
    chunks: int = 0  # distinct chunks the point uses
    chunks_verified: int = 0  # of which read and found intact
    stored_bytes: int = 0  # bytes of the distinct records (what was read from the packs)
    seconds: float = 0.0
    bad: list[BadBlock] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a block map that cannot be read

    @property
    def ok(self) -> bool:
        return not self.bad and not self.errors

    def to_json(self) -> dict:
        return {"ok": self.ok, "point": self.point, "logical_bytes": self.logical_bytes,
                "zero_bytes": self.zero_bytes, "chunks": self.chunks, "chunks_verified": self.chunks_verified,
                "stored_bytes": self.stored_bytes, "seconds": round(self.seconds, 3),
                "bad_blocks": [b.to_json() for b in self.bad], "errors": list(self.errors)}


def _chunk_name(pack: int, offset: int) -> str:
    return f"pack {pack_name(pack)} offset {offset}"


def _pack_problems(stack: Stack, packs: Sequence[int]) -> tuple[dict[int, str], dict[int, np.ndarray]]:
    """For each pack: why none of its chunks can be read, or its index entries sorted by offset."""
    why: dict[int, str] = {}
    idx: dict[int, np.ndarray] = {}
    pdir = stack.repo.packs_dir
    for pack in packs:
        if not (pdir / pack_name(pack)).is_file():
            why[pack] = f"pack {pdir / pack_name(pack)} is missing"
            continue
        path = pdir / idx_name(pack)
        try:
            got, entries, _uid = read_idx_uid(path)
        except FileNotFoundError:
            why[pack] = f"pack {pdir / pack_name(pack)} has no index"
            continue
        except (OSError, RepositoryError) as e:
            why[pack] = f"pack index {path} is unreadable: {e}"
            continue
        if got != pack:
            why[pack] = f"pack index {path} names pack {got}"
            continue
        idx[pack] = entries[np.argsort(entries["offset"], kind="stable")]
    return why, idx


def check_data(stack: Stack, point: RestorePoint, *, workers: int = 2, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> DataResult:
    """Read and verify every chunk ``point`` uses, each once, in pack order (see above)."""
    t0 = time.monotonic()
    repo = stack.repo
    bs = repo.block_size
    res = DataResult(point.id)
    # every stored block of every disk: its chunk key, clen, disk and block number
    keys, clens, disks, blocks, lens = [], [], [], [], []
    for i, info in enumerate(point.disks):
        res.logical_bytes += info.size
        try:
            entries = np.asarray(point.open_blockmap(i).entries)
        except InstantNFSError as e:
            res.errors.append(f"disk {info.name}: its block map cannot be read: {e}")
            continue
        stored = np.flatnonzero(entries["pack"] != ZERO_PACK)
        sel = entries[stored]
        keys.append((sel["pack"].astype(np.uint64) << np.uint64(KEY_SHIFT)) | sel["offset"].astype(np.uint64))
        clens.append(sel["clen"].astype(np.uint64))
        disks.append(np.full(len(stored), i, dtype=np.int32))
        blocks.append(stored.astype(np.int64))
        ln = np.full(len(stored), bs, dtype=np.int64)
        if len(stored) and int(stored[-1]) == len(entries) - 1:
            ln[-1] = info.size - int(stored[-1]) * bs  # a disk's last block may be partial
        lens.append(ln)
        res.zero_bytes += info.size - int(ln.sum())
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    all_clens = np.concatenate(clens) if clens else np.zeros(0, np.uint64)
    all_disks = np.concatenate(disks) if disks else np.zeros(0, np.int32)
    all_blocks = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
    all_lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)

    uniq, first, inverse = np.unique(all_keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    res.chunks = len(uniq)
    u_pack = (uniq >> np.uint64(KEY_SHIFT)).astype(np.int64)
    u_off = (uniq & np.uint64((1 << KEY_SHIFT) - 1)).astype(np.int64)
    u_clen = all_clens[first].astype(np.int64)
    u_logical = np.bincount(inverse, weights=all_lens, minlength=len(uniq)).astype(np.int64)
    res.stored_bytes = int(u_clen.sum())

    # chunks that fail before any read: pack missing, index unreadable, record not indexed
    errors: dict[int, str] = {}
    fps: list[bytes | None] = [None] * len(uniq)
    packs = np.unique(u_pack).tolist()
    why, idx = _pack_problems(stack, packs)
    for pack in packs:  # the chunks of one pack are a run of uniq (sorted by key)
        lo, hi = np.searchsorted(u_pack, [pack, pack + 1]).tolist()
        if pack in why:
            errors.update(dict.fromkeys(range(lo, hi), why[pack]))
            continue
        ent = idx[pack]
        offs = u_off[lo:hi]
        if len(ent):
            j = np.minimum(np.searchsorted(ent["offset"], offs), len(ent) - 1)
            found = ent["offset"][j].astype(np.int64) == offs
            same = found & (ent["clen"][j].astype(np.int64) == u_clen[lo:hi])
            got = fingerprints(ent[j])
        else:
            found = same = np.zeros(hi - lo, dtype=bool)
            got = []
        for k in range(hi - lo):
            u = lo + k
            if not found[k]:
                errors[u] = f"chunk at {_chunk_name(pack, int(u_off[u]))}: no such record in the pack index"
            elif not same[k]:
                errors[u] = (f"chunk at {_chunk_name(pack, int(u_off[u]))}: the block map's length {int(u_clen[u])} "
                             f"differs from the pack index's")
            else:
                fps[u] = got[k]
    todo = [u for u in range(len(uniq)) if u not in errors]

    total = res.logical_bytes
    done = [res.zero_bytes + int(u_logical[list(errors)].sum()) if errors else res.zero_bytes]
    verified = [0]
    lock = threading.Lock()
    cursor = iter(range(0, len(todo), BATCH))
    stop = threading.Event()

    def work() -> None:
        buf = bytearray(bs)
        reader = repo.reader
        while not stop.is_set() and not (cancel is not None and cancel.is_set()):
            with lock:
                start = next(cursor, None)
            if start is None:
                return
            batch = todo[start : start + BATCH]
            nxt = todo[start + BATCH : start + 2 * BATCH]
            if nxt:  # the kernel reads the next batch's records while this one is checked
                for u in nxt:
                    reader.willneed(int(u_pack[u]), int(u_off[u]), int(u_clen[u]))
            got: list[tuple[int, str]] = []
            nbytes = 0
            for u in batch:
                fp = fps[u]
                assert fp is not None
                err = verify_chunk(reader, int(u_pack[u]), int(u_off[u]), int(u_clen[u]), fp, buf)
                if err is not None:
                    got.append((u, err))
                nbytes += int(u_logical[u])
            with lock:
                errors.update(got)
                done[0] += nbytes
                verified[0] += len(batch) - len(got)

    if todo:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
            futs = [pool.submit(work) for _ in range(max(1, min(workers, len(todo))))]
            try:
                while wait(futs, timeout=0.2, return_when=FIRST_EXCEPTION).not_done:
                    if any(f.done() and f.exception() for f in futs):
                        break
                    if progress is not None:
                        progress(min(done[0], total), total)
            finally:
                stop.set()  # on an error or an interrupt: the other workers stop after their batch
            for f in futs:
                f.result()
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"verification of restore point {point.id} was cancelled")
    res.chunks_verified = verified[0]
    if progress is not None:
        progress(total, total)

    # each bad chunk: every run of blocks of this point that uses it
    if errors:
        order = np.argsort(inverse, kind="stable")
        sorted_inv = inverse[order]
        for u in sorted(errors, key=lambda u: (int(u_pack[u]), int(u_off[u]))):
            lo, hi = np.searchsorted(sorted_inv, [u, u + 1])
            uses = sorted((int(all_disks[k]), int(all_blocks[k])) for k in order[lo:hi].tolist())
            runs: list[list[int]] = []  # [disk, first block, last block]
            for d, b in uses:
                if runs and runs[-1][0] == d and runs[-1][2] == b - 1:
                    runs[-1][2] = b
                else:
                    runs.append([d, b, b])
            for d, b0, b1 in runs:
                info = point.disks[d]
                start = b0 * bs
                res.bad.append(BadBlock(info.name, start, min(info.size, (b1 + 1) * bs) - start,
                                        _chunk_name(int(u_pack[u]), int(u_off[u])), errors[u]))
        res.bad.sort(key=lambda b: ([d.name for d in point.disks].index(b.disk), b.offset))
    res.seconds = time.monotonic() - t0
    return res


# -- volumes and the files behind bad blocks ------------------------------------------------


def recognise(stack: Stack, point: RestorePoint) -> list[dict]:
    """Every volume of the point with its filesystem, or why it has none (JSON-able)."""
    pf = PointFiles(stack, point)
    try:
        return [f.to_json() for f in pf.found()]
    except InstantNFSError as e:  # a partition table or LVM label in a bad chunk
        return [{"name": "?", "disk": None, "filesystem": None, "readable": False,
                 "note": f"the volumes of restore point {point.id} cannot be read: {e}"}]


def _bad_in_volume(v: Volume, disk: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The parts of bytes [offset, offset+length) of disk ``disk`` that lie in volume ``v``,
    as (start, end) volume offsets."""
    out = []
    for e in v.extents:
        if e.disk != disk:
            continue
        a, b = max(offset, e.disk_offset), min(offset + length, e.disk_offset + e.length)
        if a < b:
            out.append((e.offset + a - e.disk_offset, e.offset + b - e.disk_offset))
    return out


def _walk(fs: FileSystem, failures: list[str]) -> Iterator[Entry]:
    """Every entry of ``fs``; a directory that cannot be read is noted in ``failures`` and
    skipped, the rest of the walk goes on. A directory met twice is entered once."""
    root = fs.stat("/")
    seen = {root.inode}
    dirs = [root]
    while dirs:
        d = dirs.pop()
        try:
            children = list(fs.listdir(d))
        except InstantNFSError as e:
            failures.append(str(e))
            continue
        for c in children:
            yield c
            if c.type == "dir" and c.inode not in seen:
                seen.add(c.inode)
                dirs.append(c)


def files_at(stack: Stack, point: RestorePoint, bad: list[BadBlock], *, max_files: int = MAX_FILES) -> None:
    """Fill ``files`` (and ``notes``) of each bad block: the files whose data lies in it,
    or that it is filesystem metadata or free space, or why that cannot be told."""
    if not bad:
        return
    pf = PointFiles(stack, point)
    names = [d.name for d in point.disks]
    try:
        volumes = pf.layout.volumes
    except InstantNFSError as e:
        for b in bad:
            b.notes.append(f"the point's volumes cannot be read, so no file can be named: {e}")
        return
    # volume -> [(volume start, volume end, bad block)]
    hits: dict[str, list[tuple[int, int, BadBlock]]] = {}
    by_name = {v.name: v for v in volumes}
    for b in bad:
        d = names.index(b.disk)
        inside = [(v, r) for v in volumes if v.readable and not v.contains
                  for r in _bad_in_volume(v, d, b.offset, b.length)]
        if not inside:
            b.notes.append(f"not in any volume that can hold a filesystem (partition table, boot code or "
                           f"unpartitioned space of disk{d})")
        for v, (lo, hi) in inside:
            hits.setdefault(v.name, []).append((lo, hi, b))
    for vname, ranges in hits.items():
        v = by_name[vname]
        try:
            fs = pf.filesystem(vname)
        except UnrecognisedFilesystem as e:
            for _a, _e, b in ranges:
                b.notes.append(f"in {vname}, which holds no filesystem this tool reads: {e}")
            continue
        except InstantNFSError as e:
            for _a, _e, b in ranges:
                b.notes.append(f"in {vname}, whose filesystem cannot be read: {e}")
            continue
        ranges.sort(key=lambda r: r[0])
        starts = [r[0] for r in ranges]
        longest = max(r[1] - r[0] for r in ranges)
        found: dict[int, int] = {id(b): 0 for _a, _e, b in ranges}  # files named per block (id: blocks are unhashable)
        full: set[int] = set()
        failures: list[str] = []
        unmapped = 0
        for entry in _walk(fs, failures):
            if entry.type != "file" or not entry.size:
                continue
            try:
                runs = fs.open_file(entry).volume_runs()
            except InstantNFSError as e:
                failures.append(str(e))
                continue
            if runs is None:
                unmapped += 1  # resident, inline or compressed: its bytes are not plain volume runs
                continue
            for _foff, voff, length in runs:
                # ranges that may overlap [voff, voff+length): those starting before its end
                j = bisect.bisect_left(starts, voff - longest)
                while j < len(ranges) and ranges[j][0] < voff + length:
                    _lo, hi, b = ranges[j]
                    j += 1
                    if hi <= voff or id(b) in full:
                        continue
                    name = f"{vname}:{entry.path}"
                    if name in b.files:
                        continue
                    b.files.append(name)
                    found[id(b)] += 1
                    if found[id(b)] >= max_files:
                        full.add(id(b))
                        b.notes.append(f"stopped looking after {max_files} files in this block")
            if len(full) == len(found):
                break  # every block has all the files it will name
        for _a, _e, b in ranges:
            if id(b) in full:
                continue
            if not found[id(b)]:
                b.notes.append(f"filesystem metadata or free space of {vname}")
            for f in failures[:3]:
                b.notes.append(f"part of {vname} could not be walked, files there are not named: {f}")
            if unmapped:
                b.notes.append(f"{unmapped} file(s) of {vname} store their data inline or compressed and were not "
                               "mapped")


# -- the checker's tests -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestSpec:
    """One test of a booted guest: a TCP port answers, an HTTP URL gives 200, a script passes."""

    __test__ = False  # not a pytest test class

    kind: str  # tcp | http | script
    port: int | None = None  # the guest's port (forwarded to one on 127.0.0.1)
    path: str = "/"
    script: str | None = None

    def __str__(self) -> str:
        if self.kind == "script":
            return f"script:{self.script}"
        return f"{self.kind}:{self.port}" + (self.path if self.kind == "http" and self.path != "/" else "")


def parse_test(text: str) -> TestSpec:
    """'tcp:22', 'http:80', 'http:8080/health', 'script:/path/to/check'."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    if not sep or kind not in ("tcp", "http", "script"):
        raise UsageError(f"not a test: {text!r} (examples: tcp:22, http:80, http:8080/health, script:/path/check)")
    if kind == "script":
        if not rest:
            raise UsageError(f"not a test: {text!r}: name the script (script:/path/check)")
        return TestSpec("script", None, "/", rest)
    port_text, slash, path = rest.partition("/")
    if kind == "tcp" and slash:
        raise UsageError(f"not a test: {text!r}: a tcp test takes a port only (tcp:22)")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"not a test: {text!r}: the port must be a number from 1 to 65535")
    return TestSpec(kind, int(port_text), "/" + path if slash else "/")


def _tcp_once(port: int, timeout: float) -> tuple[bool, str]:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=max(0.1, timeout))
    except OSError as e:
        return False, f"connect to 127.0.0.1:{port}: {e.strerror or e}"
    with s:
        # a user-network forwarder accepts first and connects to the guest after: a port
        # nothing listens on in the guest shows as a connection closed at once
        s.settimeout(max(0.05, min(TCP_SETTLE, timeout)))
        try:
            data = s.recv(1)
        except TimeoutError:
            return True, f"127.0.0.1:{port} accepted the connection and kept it open"
        except OSError as e:
            return False, f"127.0.0.1:{port} accepted, then the connection failed: {e.strerror or e}"
    if data:
        return True, f"127.0.0.1:{port} answered"
    return False, f"127.0.0.1:{port} accepted, then closed the connection at once (nothing listens in the guest?)"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def _http_once(port: int, path: str, timeout: float) -> tuple[bool, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with _NO_PROXY.open(url, timeout=max(0.1, timeout)) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        return False, f"GET {url}: {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        return False, f"GET {url}: {why}"
    if status == 200:
        return True, f"GET {url}: 200"
    return False, f"GET {url}: {status}"


def _drain(stream, keep: bytearray, limit: int, dropped: list[int]) -> None:  # type: ignore[no-untyped-def]
    while chunk := stream.read(65536):
        room = limit - len(keep)
        keep += chunk[: max(0, room)]
        dropped[0] += max(0, len(chunk) - max(0, room))


def _script(path: str, forwards: dict[int, int], timeout: float, env_extra: dict[str, str] | None) -> tuple[bool, str]:
    env = {**os.environ, **(env_extra or {}), "INSTANTNFS_VERIFY_HOST": "127.0.0.1"}
    env.update({f"INSTANTNFS_VERIFY_PORT_{g}": str(h) for g, h in forwards.items()})
    try:
        proc = subprocess.Popen([path], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return False, f"cannot run {path}: {e.strerror or e}"
    out = bytearray()
    dropped = [0]
    reader = threading.Thread(target=_drain, args=(proc.stdout, out, OUTPUT_LIMIT, dropped), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    try:  # its own session: the script, and whatever it left running, end with the test
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    reader.join(5)
    if proc.stdout is not None:
        proc.stdout.close()
    text = out.decode(errors="replace")
    if dropped[0]:
        text += f"\n[{dropped[0]} more bytes of output not kept]"
    if timed_out:
        return False, f"{path} did not finish within {timeout:g} s (killed); output:\n{text}"
    if proc.returncode == 0:
        return True, f"{path} exited 0; output:\n{text}"
    return False, f"{path} exited with status {proc.returncode}; output:\n{text}"


def run_tests(tests: Sequence[TestSpec], forwards: dict[int, int], *, timeout: float,
              env_extra: dict[str, str] | None = None) -> list[dict]:
    """Run each test against 127.0.0.1 (``forwards``: guest port -> host port). A tcp or
    http test is tried until it passes or ``timeout`` seconds pass (the guest's service may
    start after its heartbeat); a script runs once, in a session of its own that is killed
    when it ends or at ``timeout`` (nothing it started outlives its test)."""
    results = []
    for t in tests:
        t0 = time.monotonic()
        if t.kind == "script":
            assert t.script is not None
            passed, detail = _script(t.script, forwards, timeout, env_extra)
        elif t.port not in forwards:
            passed, detail = False, f"guest port {t.port} is not forwarded (forwarded: {sorted(forwards) or 'none'})"
        else:
            host_port = forwards[t.port]
            deadline = t0 + timeout
            while True:
                left = deadline - time.monotonic()
                if t.kind == "tcp":
                    passed, detail = _tcp_once(host_port, left)
                else:
                    passed, detail = _http_once(host_port, t.path, left)
                if passed or time.monotonic() + RETRY_PAUSE >= deadline:
                    break
                time.sleep(RETRY_PAUSE)
        results.append({"test": str(t), "passed": passed, "detail": detail, "seconds": round(time.monotonic() - t0, 3)})
    return results


# -- the report ----------------------------------------------------------------------------


Boot = Callable[[Sequence[int]], AbstractContextManager[tuple[dict[int, int], Callable[[], str]]]]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Report:
    point: str
    vm: str
    started: str
    finished: str = ""
    data: DataResult | None = None
    volumes: list[dict] = field(default_factory=list)
    boot: dict | None = None  # {"ok", "seconds", "detail", "console"}; None: not booted
    tests: list[dict] = field(default_factory=list)
    passed: bool = False
    errors: list[str] = field(default_factory=list)  # why it failed, one line each
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"point": self.point, "vm": self.vm, "started": self.started, "finished": self.finished,
                "passed": self.passed, "data": self.data.to_json() if self.data else None,
                "volumes": self.volumes, "boot": self.boot, "tests": self.tests,
                "errors": list(self.errors), "warnings": list(self.warnings)}

    def summary(self) -> str:
        """A readable text for a terminal: one line per check, then details."""
        def mark(ok: bool) -> str:
            return "PASS" if ok else "FAIL"

        lines = [f"verify {self.vm} restore point {self.point}: {mark(self.passed)}"]
        d = self.data
        if d is not None:
            lines.append(f"  {mark(d.ok)}  data: {d.chunks_verified}/{d.chunks} chunks intact, "
                         f"{_size(d.logical_bytes)} of disk ({_size(d.zero_bytes)} zeros) in {d.seconds:.1f} s"
                         + (f", {len(d.bad)} bad block(s)" if d.bad else ""))
            for b in d.bad:
                lines.append(f"        bad block {b.disk} offset {b.offset} length {b.length} ({b.chunk}): {b.error}")
                lines.extend(f"          file {f}" for f in b.files)
                lines.extend(f"          {n}" for n in b.notes)
            lines.extend(f"        {e}" for e in d.errors)
        readable = [v for v in self.volumes if v.get("filesystem")]
        vol_ok = bool(readable) or not self.volumes
        lines.append(f"  {mark(vol_ok)}  filesystems: {len(readable)} of {len(self.volumes)} volume(s) recognised")
        for v in self.volumes:
            what = v.get("filesystem") or v.get("note") or "no filesystem"
            lines.append(f"        {v.get('name')}: {what}")
        if self.boot is not None:
            lines.append(f"  {mark(bool(self.boot.get('ok')))}  boot: {self.boot.get('detail')}")
        for t in self.tests:
            first = str(t["detail"]).splitlines()[0] if t["detail"] else ""
            lines.append(f"  {mark(t['passed'])}  test {t['test']}: {first} ({t['seconds']:.1f} s)")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        lines.extend(f"  error: {e}" for e in self.errors)
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def verify_point(stack: Stack, point: RestorePoint, *, boot: Boot | None = None, tests: Sequence[TestSpec] = (),
                 ports: Sequence[int] = (), timeout: float = 60.0, workers: int = 2,
                 progress: Progress | None = None, cancel: threading.Event | None = None,
                 env_extra: dict[str, str] | None = None) -> Report:
    """Verify ``point``: the data check, the volumes, the files behind bad blocks; then,
    with ``boot``, boot it and run ``tests`` (each with ``timeout`` seconds).

    ``boot(forward_ports)`` is the caller's: a context manager that boots the point with
    those guest ports forwarded to 127.0.0.1 and yields ``(forwards, console_text)``
    once the guest is up (its heartbeat seen), or raises saying why the boot failed; the
    VM is powered off when it exits. ``ports``: guest ports to forward besides the tcp
    and http tests' (for scripts)."""
    if tests and boot is None:
        raise UsageError("tests need a booted guest: verify with a boot to run them")
    rep = Report(point.id, point.vm, _now())

    def cancelled() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"verification of restore point {point.id} was cancelled")

    rep.data = check_data(stack, point, workers=workers, progress=progress, cancel=cancel)
    for b in rep.data.bad:
        rep.errors.append(f"bad block: {b.disk} offset {b.offset} length {b.length}: {b.error}")
    rep.errors.extend(rep.data.errors)
    cancelled()
    rep.volumes = recognise(stack, point)
    cancelled()
    if rep.data.bad:
        files_at(stack, point, rep.data.bad)
    cancelled()
    with_fs = [v for v in rep.volumes if v.get("filesystem")]
    for v in rep.volumes:
        if not v.get("filesystem") and not v.get("contains"):
            rep.warnings.append(f"{v.get('name')}: no filesystem this tool reads ({v.get('note') or 'unrecognised'})")
    if rep.volumes and not with_fs:
        rep.errors.append("no volume of the point holds a filesystem this tool reads")

    if boot is not None:
        want = sorted({t.port for t in tests if t.port is not None} | set(ports))
        t0 = time.monotonic()
        console: Callable[[], str] | None = None
        try:
            with boot(want) as (forwards, console):
                rep.boot = {"ok": True, "seconds": round(time.monotonic() - t0, 3), "detail": "the guest is up",
                            "forwards": {str(k): v for k, v in forwards.items()}}
                cancelled()
                rep.tests = run_tests(tests, forwards, timeout=timeout, env_extra=env_extra)
                rep.boot["console"] = console()[-CONSOLE_TAIL:]
        except Cancelled:
            raise
        except Exception as e:  # the boot's failure, whatever the supervisor raised: it is the verdict
            if rep.boot is None:
                rep.boot = {"ok": False, "seconds": round(time.monotonic() - t0, 3),
                            "detail": f"the boot failed: {e}", "forwards": {}}
                rep.boot["console"] = (console()[-CONSOLE_TAIL:] if console else getattr(e, "console", ""))
                rep.tests = [{"test": str(t), "passed": False, "detail": "not run: the boot failed", "seconds": 0.0}
                             for t in tests]
            else:
                rep.errors.append(f"the guest failed while being tested: {e}")
        if not rep.boot["ok"]:
            rep.errors.append(str(rep.boot["detail"]))
        rep.errors.extend(f"test {t['test']} failed" for t in rep.tests if not t["passed"])
    rep.passed = not rep.errors
    rep.finished = _now()
    return rep
