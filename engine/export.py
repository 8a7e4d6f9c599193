"""Export a disk (a write cache over a backup, or any ``Disk``) to a raw or qcow2 file.

The copy runs while writers keep writing, the way storage migration does:

1. Start a ``DirtyTracker`` on the write cache, then copy the whole disk (pass 1),
   skipping zero runs so the raw output is sparse.
2. Take the tracker's bitmap (the granules written since the pass began) and copy those
   granules again; repeat while a pass still finds granules and the passes shrink, up to
   ``max_passes``.
3. With ``before_final`` (a migrate of a VM run elsewhere), call it and copy what was
   written meanwhile: it returns once the caller confirms the VM has stopped, so this
   last pass is the short one.
4. Pause new writes (``WriteCache.writes_paused``: in-progress writes finish, reads go
   on), copy what the tracker holds, and let writes resume. The output is then exactly
   the disk's content at that moment, the moment the export finished copying.

Why it converges to the right bytes: a write sets its tracker bits after its data is in
the cache file, under the same lock as a tracker swap (``DirtyTracker.take``). A granule
written during pass k therefore either has its bit in the bitmap pass k+1 takes, or was
written before pass k's swap, in which case pass k read it after the write. The final
pass runs with no write in progress or starting, so nothing escapes it.

Output files (the daemon runs as root and writes where a client asks): an output must
not exist yet and, when ``allowed_dirs`` is given (the daemon's ``export_dirs``), must
lie in one of them once its parent directory is resolved (``realpath``, then the
directory is opened with ``O_NOFOLLOW`` and where it really is is checked again). Every
file is made relative to that open directory, never by path: the raw image is written
to a new temporary ``.<name>.<random>.part`` (``O_CREAT|O_EXCL|O_NOFOLLOW``) and, after
an fsync, linked to the final name (``link`` never replaces an existing name, nor
follows a symlink there) and unlinked. qcow2 goes through that raw file and ``qemu-img
convert`` into a private 0700 directory beside the output (reached through
``/proc/self/fd``, so qemu-img resolves no path anyone else can change), then is linked
into place the same way. A failed or cancelled export leaves no file behind.

Cancel: ``cancel`` (a ``threading.Event``) is checked between chunks and batches and
while qemu-img runs (it is killed); the export then raises ``Cancelled``.

Concurrency: pass 1 reads ``chunk`` bytes per task in a small thread pool of its own
(the base decompresses with the GIL released, loading chunk misses in the repository's
decompression pool, which waits for nothing: no task waits for work queued behind it in
its own pool) and pwrites at the same offsets, so order does not matter. What it assumes of the disk: ``readv`` is thread-safe and returns the newest
bytes of the range.
"""
from __future__ import annotations

import os
import re
import secrets
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.blockmap import bits_runs
from engine.disk import Disk
from engine.errors import Cancelled, NoSpace, OutputRefused, SourceError, UsageError
from engine.fsutil import no_space, pwrite_all
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
    cancel: threading.Event | None = None,
    allowed_dirs: Sequence[str | os.PathLike] | None = None,
    before_final: Callable[[], None] | None = None,
) -> ExportResult:
    """Write the merged disk to ``output`` (raw sparse or qcow2, a new file) while writers
    go on; ``before_final`` (blocking, may raise ``Cancelled``) runs before the last pass."""
    if fmt not in FORMATS:
        raise UsageError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if chunk <= 0 or chunk % ZERO_GRAIN:
        raise ValueError(f"chunk must be a positive multiple of {ZERO_GRAIN}")
    out = Path(os.path.abspath(output))
    started = time.monotonic()
    dfd, name = open_output_dir(out, allowed_dirs)
    part = f".{name[:200]}.{secrets.token_hex(4)}.part"
    fd = -1
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            copier = _Copier(disk, fd, progress, chunk, workers or min(4, max(2, os.cpu_count() or 2)), cancel)
            passes, recopied = copier.run(max_passes, before_final)
            if fmt == "raw":
                _link_new(dfd, part, dfd, name, out)
            else:
                _convert_qcow2(fd, dfd, name, out, progress, cancel)
            os.fsync(dfd)
        finally:
            os.close(fd)
            try:
                os.unlink(part, dir_fd=dfd)
            except FileNotFoundError:
                pass
    except OSError as e:
        no_space(e, f"for the export to {out}")
    finally:
        os.close(dfd)
    return ExportResult(
        path=str(out),
        format=fmt,
        size=disk.size,
        data_bytes=copier.data_bytes,
        passes=passes,
        recopied_bytes=recopied,
        seconds=time.monotonic() - started,
    )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def open_output_dir(output: str | os.PathLike, allowed_dirs: Sequence[str | os.PathLike] | None = None) -> tuple[int, str]:
    """Check that ``output`` may be written (a new name, in an allowed directory); return
    its directory, opened (``O_DIRECTORY|O_NOFOLLOW``), and the file's name in it.
    Blocking (a path someone else chose): call it in a thread, never on the event loop."""
    out = Path(os.path.abspath(output))
    name = out.name
    if name in ("", ".", "..") or "\0" in str(out):
        raise OutputRefused(f"{output} is not a file name")
    parent = os.path.realpath(out.parent)
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"the directory of {out} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot open the directory of {out}: {e.strerror}") from None
    try:
        where = os.readlink(f"/proc/self/fd/{dfd}")  # where the open directory really is
        if allowed_dirs is not None:
            roots = [os.path.realpath(d) for d in allowed_dirs]
            if not any(_inside(where, r) and _inside(parent, r) for r in roots):
                raise OutputRefused(
                    f"{out} is not in an export directory ({', '.join(roots) or 'none configured'}): "
                    "export into one of them (server.export_dirs)"
                )
        try:
            os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        else:
            raise OutputRefused(f"{out} exists: an export never replaces a file; remove it or choose another name")
    except BaseException:
        os.close(dfd)
        raise
    return dfd, name


def _link_new(src_dir: int, src: str, dst_dir: int, dst: str, out: Path) -> None:
    """Give the finished file its final name; an existing name (or symlink) is never replaced."""
    try:
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    except FileExistsError:
        raise OutputRefused(f"{out} appeared while the export ran: it was left alone, the export discarded") from None


class _Copier:
    def __init__(self, disk: Disk, fd: int, progress: Progress | None, chunk: int, workers: int,
                 cancel: threading.Event | None) -> None:
        self.disk = disk
        self.progress = progress
        self.chunk = chunk
        self.workers = workers
        self.cancel = cancel
        self.data_bytes = 0
        self.fd = fd
        os.ftruncate(self.fd, disk.size)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("export cancelled: no output file was left")

    def run(self, max_passes: int, before_final: Callable[[], None] | None = None) -> tuple[int, int]:
        disk = self.disk
        if not isinstance(disk, WriteCache):
            self._copy_all()
            if before_final is not None:
                before_final()
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
            if before_final is not None:
                self._report("waiting", 0, 0)
                before_final()
                self._check_cancel()
                passes += 1
                recopied += self._copy_granules(disk, tracker.take(), "after-stop")
            with disk.writes_paused():
                recopied += self._copy_granules(disk, tracker.take(), "final")
                passes += 1
                os.fsync(self.fd)
        return passes, recopied

    def _copy_all(self) -> None:
        size, chunk = self.disk.size, self.chunk
        offsets = range(0, size, chunk)
        done = 0
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="export")
        try:
            window = self.workers * 2
            pending = []
            for off in offsets:
                self._check_cancel()
                pending.append(pool.submit(self._copy_sparse, off, min(chunk, size - off)))
                if len(pending) >= window:
                    done += self._collect(pending.pop(0).result())
                    self._report("copy", done, size)
            for fut in pending:
                self._check_cancel()
                done += self._collect(fut.result())
                self._report("copy", done, size)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # only the chunks being copied: short

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
                self._check_cancel()
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


QCOW2_NAME = "out.qcow2"


def _convert_qcow2(raw_fd: int, dfd: int, name: str, out: Path, progress: Progress | None,
                   cancel: threading.Event | None) -> None:
    """``qemu-img convert`` the raw file into a private directory, then link it into place."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SourceError("qcow2 export needs qemu-img (install qemu-utils)")
    private = f".{name[:200]}.{secrets.token_hex(4)}.d"
    os.mkdir(private, 0o700, dir_fd=dfd)
    tfd = -1
    try:
        tfd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        cmd = [qemu_img, "convert", "-p", "-f", "raw", "-O", "qcow2", f"/proc/self/fd/{raw_fd}", f"/proc/self/fd/{tfd}/{QCOW2_NAME}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(raw_fd, tfd))
        try:
            err = _follow(proc, progress, cancel)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            if "No space left" in err:
                raise NoSpace(f"no space left for the export to {out}")
            raise SourceError(f"qemu-img convert to {out} failed: {err.strip()}")
        fd = os.open(QCOW2_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tfd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _link_new(tfd, QCOW2_NAME, dfd, name, out)
    finally:
        if tfd >= 0:
            try:
                os.unlink(QCOW2_NAME, dir_fd=tfd)
            except FileNotFoundError:
                pass
            os.close(tfd)
        os.rmdir(private, dir_fd=dfd)


def _follow(proc: subprocess.Popen, progress: Progress | None, cancel: threading.Event | None) -> str:
    """qemu-img's progress until it exits (killed when cancelled); its stderr."""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.fileno(), proc.stderr.fileno()
    open_fds = {out, err}
    buf, errbuf = b"", b""
    while open_fds:
        if cancel is not None and cancel.is_set():
            proc.kill()
            proc.wait()
            raise Cancelled("export cancelled: no output file was left")
        ready, _, _ = select.select(list(open_fds), [], [], 0.2)
        for f in ready:
            data = os.read(f, 4096)
            if not data:
                open_fds.discard(f)
            elif f == out:
                buf = (buf + data)[-256:]
                found = _PERCENT.findall(buf)
                if found and progress is not None:
                    progress("convert", int(float(found[-1]) * 100), 10000)
            else:
                errbuf = (errbuf + data)[-8192:]
    proc.wait()
    return errbuf.decode(errors="replace")
