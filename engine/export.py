"""Export a disk (a write cache over a backup, or any ``Disk``) to a raw or qcow2 file.

The copy runs while writers keep writing, the way storage migration does:

1. Start a ``DirtyTracker`` on the write cache, then copy the whole disk (pass 1),
   skipping zero runs so the raw output is sparse.
2. Take the tracker's bitmap (the granules written since the pass began) and copy those
   granules again; repeat while a pass still finds granules and the passes shrink, up to
   ``max_passes``.
3. Pause new writes (``WriteCache.writes_paused``: in-progress writes finish, reads go
   on), copy what the tracker holds, and let writes resume. The output is then exactly
   the disk's content at that moment, the moment the export finished copying.

Why it converges to the right bytes: a write sets its tracker bits after its data is in
the cache file, under the same lock as a tracker swap (``DirtyTracker.take``). A granule
written during pass k therefore either has its bit in the bitmap pass k+1 takes, or was
written before pass k's swap, in which case pass k read it after the write. The final
pass runs with no write in progress or starting, so nothing escapes it.

The raw image is written to ``<output>.part`` and renamed into place after an fsync, so a
failed export never leaves a half-written file under the final name. qcow2 goes through
a sparse raw temporary file beside the output and ``qemu-img convert``.

Concurrency: pass 1 reads ``chunk`` bytes per task in a small thread pool (the base
decompresses with the GIL released) and pwrites at the same offsets, so order does not
matter. What it assumes of the disk: ``readv`` is thread-safe and returns the newest
bytes of the range.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.blockmap import bits_runs
from engine.disk import Disk
from engine.errors import NoSpace, SourceError, UsageError
from engine.fsutil import fsync_dir, pwrite_all
from engine.writecache import WriteCache

FORMATS = ("raw", "qcow2")
CHUNK = 8 << 20
ZERO_GRAIN = 64 << 10  # zero detection granularity of the sparse raw output
MAX_PASSES = 8
RECOPY_BATCH = 4 << 20  # bytes of re-copied granules per read
RECOPY_GAP = 64 << 10  # dirty runs closer than this are re-copied in one read

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): phase "copy" (bytes of pass 1), "recopy" (granules of a
later pass, in bytes), "final" (the paused pass), "convert" (qemu-img, percent x 100)."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: str
    format: str
    size: int
    data_bytes: int  # bytes written to the raw image (non-zero data, incl. re-copies)
    passes: int  # copy passes, the paused final pass included
    recopied_bytes: int
    seconds: float


def export_disk(
    disk: Disk,
    output: str | os.PathLike,
    fmt: str = "raw",
    progress: Progress | None = None,
    *,
    chunk: int = CHUNK,
    workers: int | None = None,
    max_passes: int = MAX_PASSES,
) -> ExportResult:
    """Write the merged disk to ``output`` (raw sparse or qcow2) while writers go on."""
    if fmt not in FORMATS:
        raise UsageError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if chunk <= 0 or chunk % ZERO_GRAIN:
        raise ValueError(f"chunk must be a positive multiple of {ZERO_GRAIN}")
    out = Path(output)
    started = time.monotonic()
    raw_path = out.with_name(out.name + ".part") if fmt == "raw" else out.with_name(f".{out.name}.raw.part")
    try:
        copier = _Copier(disk, raw_path, progress, chunk, workers or min(4, max(2, os.cpu_count() or 2)))
        try:
            passes, recopied = copier.run(max_passes)
        finally:
            copier.close()
        if fmt == "raw":
            os.rename(raw_path, out)
            fsync_dir(out.parent)
        else:
            _convert_qcow2(raw_path, out, progress)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left for the export to {out}") from e
        raise
    finally:
        if raw_path.exists():
            raw_path.unlink()
    return ExportResult(
        path=str(out),
        format=fmt,
        size=disk.size,
        data_bytes=copier.data_bytes,
        passes=passes,
        recopied_bytes=recopied,
        seconds=time.monotonic() - started,
    )


class _Copier:
    def __init__(self, disk: Disk, path: Path, progress: Progress | None, chunk: int, workers: int) -> None:
        self.disk = disk
        self.progress = progress
        self.chunk = chunk
        self.workers = workers
        self.data_bytes = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.ftruncate(self.fd, disk.size)

    def close(self) -> None:
        os.close(self.fd)

    def run(self, max_passes: int) -> tuple[int, int]:
        disk = self.disk
        if not isinstance(disk, WriteCache):
            self._copy_all()
            os.fsync(self.fd)
            return 1, 0
        recopied = 0
        with disk.track() as tracker:
            self._copy_all()
            passes = 1
            last = None
            while passes < max_passes:
                bits = tracker.take()
                count = int(np.unpackbits(bits).sum())
                if count == 0:
                    break
                passes += 1
                recopied += self._copy_granules(disk, bits, "recopy")
                if last is not None and count >= last:
                    break  # not shrinking: writers outpace us, finish with writes paused
                last = count
            with disk.writes_paused():
                recopied += self._copy_granules(disk, tracker.take(), "final")
                passes += 1
                os.fsync(self.fd)
        return passes, recopied

    def _copy_all(self) -> None:
        size, chunk = self.disk.size, self.chunk
        offsets = range(0, size, chunk)
        done = 0
        with ThreadPoolExecutor(self.workers, thread_name_prefix="export") as pool:
            window = self.workers * 2
            pending = []
            for off in offsets:
                pending.append(pool.submit(self._copy_sparse, off, min(chunk, size - off)))
                if len(pending) >= window:
                    done += self._collect(pending.pop(0).result())
                    self._report("copy", done, size)
            for fut in pending:
                done += self._collect(fut.result())
                self._report("copy", done, size)

    def _collect(self, result: tuple[int, int]) -> int:
        length, written = result
        self.data_bytes += written
        return length

    def _copy_sparse(self, offset: int, length: int) -> tuple[int, int]:
        """Copy one range, leaving holes where ZERO_GRAIN-sized pieces are all zero."""
        pos = offset
        written = 0
        for part in self.disk.readv(offset, length):
            n = len(part)
            arr = np.frombuffer(part, dtype=np.uint8)
            if n % ZERO_GRAIN == 0 and n >= ZERO_GRAIN:
                nonzero = arr.view(np.uint64).reshape(-1, ZERO_GRAIN // 8).any(axis=1)
                if nonzero.all():
                    pwrite_all(self.fd, part, pos)
                    written += n
                elif nonzero.any():
                    edges = np.flatnonzero(np.diff(np.concatenate(([0], nonzero.view(np.int8), [0]))))
                    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
                        pwrite_all(self.fd, part[a * ZERO_GRAIN : b * ZERO_GRAIN], pos + a * ZERO_GRAIN)
                        written += (b - a) * ZERO_GRAIN
            elif arr.any():
                pwrite_all(self.fd, part, pos)
                written += n
            pos += n
        return length, written

    def _copy_granules(self, cache: WriteCache, bits: np.ndarray, phase: str) -> int:
        """Copy every granule set in ``bits`` (zeros included: they may overwrite data)."""
        g = cache.granule
        ngran = -(-cache.size // g)
        runs: list[tuple[int, int]] = []
        gap = max(1, RECOPY_GAP // g)
        for s, c, v in bits_runs(bits, 0, ngran).tolist():
            if not v:
                continue
            if runs and s - (runs[-1][0] + runs[-1][1]) <= gap:
                # a small clean gap is copied along: one read instead of many, and
                # copying a granule again only writes its current content again
                runs[-1] = (runs[-1][0], s + c - runs[-1][0])
            else:
                runs.append((s, c))
        total = sum(c for _s, c in runs) * g
        done = 0
        batch = max(1, RECOPY_BATCH // g)
        self._report(phase, 0, total)
        for start, count in runs:
            for s in range(start, start + count, batch):
                a = s * g
                b = min((min(start + count, s + batch)) * g, cache.size)
                pos = a
                for part in cache.readv(a, b - a):
                    pwrite_all(self.fd, part, pos)
                    pos += len(part)
                done += b - a
                self._report(phase, done, total)
        self.data_bytes += done
        return done

    def _report(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _convert_qcow2(raw: Path, out: Path, progress: Progress | None) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SourceError("qcow2 export needs qemu-img (install qemu-utils)")
    part = out.with_name(out.name + ".part")
    cmd = [qemu_img, "convert", "-p", "-f", "raw", "-O", "qcow2", str(raw), str(part)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    buf = b""
    while True:
        data = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not data:
            break
        buf = (buf + data)[-256:]
        found = _PERCENT.findall(buf)
        if found and progress is not None:
            progress("convert", int(float(found[-1]) * 100), 10000)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        if part.exists():
            part.unlink()
        if "No space left" in err:
            raise NoSpace(f"no space left for the export to {out}")
        raise SourceError(f"qemu-img convert to {out} failed: {err.strip()}")
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(part, out)
    fsync_dir(out.parent)

