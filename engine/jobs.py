"""The daemon's long operations: export and commit (later issues add more), each a
``Job`` with a phase, progress (done/total) and a cancel event.

``Jobs`` starts them, keeps them (in memory, until the daemon stops), reports them and
cancels them; the control API and, through it, the CLI only start, watch and cancel.
Its methods are called on the event loop thread (so they see the datastore in a
consistent state without locks); the work itself runs in a small thread pool of its own
(long jobs: nothing else runs there, and they wait only for the write-cache, ingest and
decompression pools), never on the loop. A job's thread writes only its own ``Job``'s
progress fields; the loop reads them.

- An export copies one merged disk (backup + write cache) while the client keeps writing
  (``engine.export``), into a new file in one of ``export_dirs``; the output path is the
  client's, so it is checked in a thread, never on the loop.
- A commit stores the session's merged disks as a new restore point equal to them at one
  instant through ``engine.repo.ingest.commit_caches`` (parent: the session's point),
  under the repository's writer lock.

A session counts its running jobs (``Session.jobs``): the datastore refuses to unpublish
it meanwhile. Every job's cancel event is checked between blocks: ``cancel`` and ``stop``
set it, and the job ends "cancelled" leaving nothing (no output file, no restore point).
``stop`` waits for the jobs a bounded time (``JOB_STOP_TIMEOUT``), so that they end
before the daemon closes their caches.

Test seam (tests only, never set in production): ``INSTANTNFS_TEST_JOB_DELAY`` seconds
each job waits at every progress step, so a test can stop a daemon in the middle of one.

This module sits beside the datastore: it imports nothing of ``engine.control`` or
``engine.nfs``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from engine.datastore import Datastore, Session
from engine.datastore.sessions import disk_index
from engine.errors import Cancelled, InstantNFSError, NotFound, SessionError
from engine.export import export_disk, open_output_dir
from engine.repo.ingest import BackupSettings, commit_caches

log = logging.getLogger("instantnfs.jobs")

JOB_STOP_TIMEOUT = 5.0  # seconds stop() waits for cancelled jobs to end


JOB_STATES = ("running", "done", "failed", "cancelled")


@dataclass
class Job:
    """An export or commit running in the job pool; progress fields are set by its thread."""

    id: str
    kind: str  # "export" | "commit" | "migrate" | "verify" (engine.recovery)
    session: str
    state: str = "running"  # running | done | failed | cancelled
    phase: str = ""
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: dict | None = None
    error: str | None = None
    eta: float | None = None  # seconds left, when the job can tell
    label: str = ""  # what the job is about beyond its session (verify: the restore point)
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None

    def view(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "session": self.session, "state": self.state, "phase": self.phase,
            "done": self.done, "total": self.total, "started": self.started, "finished": self.finished,
            "result": self.result, "error": self.error, "cancel_requested": self.cancel.is_set(),
            "eta_s": None if self.eta is None else round(self.eta, 1), "label": self.label,
        }


class Jobs:
    """The daemon's jobs: start (``export``, ``commit``), look up, ``cancel``, ``stop``."""

    def __init__(self, ds: Datastore, export_dirs: Sequence[str] | None = None) -> None:
        self.ds = ds
        self.default_export_dir = str(ds.cache_dir / "exports")
        self.export_dirs: list[str] = list(export_dirs or [self.default_export_dir])
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        # long jobs only: exports, commits, migrates, verifies (each waits only for other pools)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="job")
        self._tasks: set[asyncio.Task] = set()
        self._test_delay = float(os.environ.get("INSTANTNFS_TEST_JOB_DELAY") or 0)  # tests only: see the design note

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self.jobs.values())

    # -- starting ------------------------------------------------------------------------------

    def start(self, kind: str, s: Session, fn: Callable[[Job], dict], label: str = "") -> Job:
        """Run ``fn(job)`` in the job pool; the session counts it until it ends."""
        job = Job(f"{kind}-{next(self._ids)}", kind, s.name, label=label)
        self.jobs[job.id] = job
        s.jobs += 1

        async def run() -> None:
            try:
                job.result = await asyncio.get_running_loop().run_in_executor(self._pool, fn, job)
                job.state = "done"
                log.info("job %s on session %s done: %s", job.id, s.name, job.result)
            except Cancelled as e:
                job.state, job.error = "cancelled", str(e)
                log.info("job %s on session %s cancelled", job.id, s.name)
            except InstantNFSError as e:
                job.state, job.error = "failed", str(e)
                log.error("job %s on session %s failed: %s", job.id, s.name, e)
            except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, reported
                job.state, job.error = "failed", f"internal error: {e!r}"
                log.exception("job %s on session %s failed", job.id, s.name)
            finally:
                job.finished = time.time()
                s.jobs -= 1

        task = asyncio.get_running_loop().create_task(run())
        job.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _step(self, job: Job) -> None:
        """Every progress step of a job (tests only: a delay, cut short by a cancel)."""
        if self._test_delay:
            job.cancel.wait(self._test_delay)

    def _check_output(self, out: str) -> None:
        """In a thread (the path is the client's): the export output may be written."""
        try:
            if self.default_export_dir in self.export_dirs:
                os.makedirs(self.default_export_dir, exist_ok=True)
            dfd, _name = open_output_dir(out, self.export_dirs)
            os.close(dfd)
        except OSError as e:
            raise InstantNFSError(f"cannot create the export directory {self.default_export_dir}: {e.strerror}") from e

    async def export(self, s: Session, disk: str, out: str, fmt: str) -> Job:
        """Start exporting disk ``disk`` (name or index) of session ``s`` to the new file
        ``out`` (absolute) in format ``fmt``. Raises NotFound (no such disk, or the session
        was unpublished meanwhile), OutputRefused (outside the export directories, or
        existing), InstantNFSError (any other reason the output cannot be written)."""
        i = disk_index([d.name for d in s.disks], disk, f"session {s.name!r}")
        await asyncio.get_running_loop().run_in_executor(None, self._check_output, out)
        if self.ds.sessions.get(s.name) is not s:
            raise NotFound(f"no published session {s.name!r}")
        cache = s.caches[i]
        dirs = list(self.export_dirs)

        def work(job: Job) -> dict:
            def progress(phase: str, done: int, total: int) -> None:
                job.phase, job.done, job.total = phase, done, total
                self._step(job)

            r = export_disk(cache, out, fmt, progress, cancel=job.cancel, allowed_dirs=dirs)
            return {"path": r.path, "format": r.format, "size": r.size, "data_bytes": r.data_bytes,
                    "passes": r.passes, "recopied_bytes": r.recopied_bytes, "seconds": round(r.seconds, 3)}

        return self.start("export", s, work)

    def commit(self, s: Session) -> Job:
        """Start storing session ``s``'s merged disks as a new restore point of its VM.
        Raises SessionError for a session that publishes only some of its point's disks."""
        if s.indexes is not None and len(s.indexes) != len(s.point.disks):
            raise SessionError(f"session {s.name!r} publishes only some disks of its restore point: export them "
                               "instead (a restore point holds all of a VM's disks)")
        repo, point = self.ds.repo, s.point
        m = point.manifest
        settings = BackupSettings(vm=point.vm, cpus=m.get("cpus") or 1, memory_mib=m.get("memory_mib") or 1024,
                                  firmware=m.get("firmware") or "bios", guest_os=m.get("guest_os") or "other-64")
        caches = list(s.caches)

        def work(job: Job) -> dict:
            job.phase = "store"

            def start(total: int) -> Callable[[int], None]:
                job.total = total

                def advance(n: int) -> None:
                    job.done += n
                    self._step(job)
                return advance

            def phase(name: str) -> None:
                job.phase = name

            manifest, info = commit_caches(repo, settings, caches, point, progress_start=start, cancel=job.cancel,
                                           on_phase=phase)
            return {
                "point": manifest["id"], "vm": manifest["vm"], "parent": manifest["parent"],
                "changed_bytes": info["changed_bytes"], "passes": info["passes"],
                "reread_bytes": info["reread_bytes"],
            }

        return self.start("commit", s, work)

    # -- cancelling ----------------------------------------------------------------------------

    async def cancel(self, job: Job, wait: float) -> Job:
        """Ask a running job to stop and wait for it to end, at most ``wait`` seconds; the
        job (``state`` still "running" if it has not ended by then)."""
        job.cancel.set()
        log.info("job %s on session %s: cancel requested", job.id, job.session)
        if job.task is not None:
            await asyncio.wait({job.task}, timeout=wait)
        return job

    async def stop(self, timeout: float = JOB_STOP_TIMEOUT) -> None:
        """Cancel the running jobs and wait for them (at most ``timeout``), so that they
        end before their caches close; then let the pool go."""
        running = [j for j in self.jobs.values() if j.state == "running"]
        for j in running:
            j.cancel.set()
        if running:
            log.info("cancelling %d running job(s): %s", len(running), ", ".join(j.id for j in running))
        tasks = set(self._tasks)
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=timeout)
            if late:
                log.error("%d job(s) did not end within %.0f s of their cancel; stopping without them", len(late), timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
