"""Live storage migration of a running VM's disk: QEMU's own block mirror.

What: ``mirror(vm, disk_index, target, fmt, progress, cancel)`` copies disk ``diskN`` of a
VM the supervisor runs to ``target`` while the guest runs, then pivots: from then on the
VM's disk IS the target (the guest never stops, keeps its memory, sees no error), and
the old source (an ``nfs://`` URL of a session) is no longer open, so the session can be
unpublished under it.

How: the target is a new file (raw: created with the disk's size; qcow2: ``qemu-img
create -f qcow2``) or an existing block device; ``blockdev-add`` opens it (``file`` or
``host_device`` node under a ``raw`` / ``qcow2`` node, the same cache mode as the
source); ``blockdev-mirror`` ``sync=full`` copies the whole disk and keeps mirroring the
guest's writes; progress polls ``query-block-jobs`` (``offset`` / ``len``: ``len`` grows
when the guest dirties what was copied, so the final ``offset`` is every byte copied,
twice-copied ones twice); once the job is ``ready`` (source and target in sync),
``block-job-complete`` pivots and ``BLOCK_JOB_COMPLETED`` ends it. After that the VM's
``vm.json`` names the target as the disk's source.

Failure and cancel: an error event (``BLOCK_JOB_COMPLETED`` with ``error``, or the VM
exiting) raises ``VMError``; a ``cancel`` before the pivot sends ``block-job-cancel`` and
raises ``Cancelled``. Either way the target node is deleted and a target file this
function created is removed: nothing half-made is left. After ``block-job-complete`` was
sent a cancel is too late and is ignored (the pivot is a moment away).

Refuses (``OutputRefused``): a target path that exists and is not a block device, a
block device smaller than the disk. The caller checks the allowed directories and
devices (config ``migrate_devices``) first.

Threads: blocking, from a job thread; each QMP exchange takes the VM's QMP lock, so
the supervisor's ``query-status`` calls interleave with the polling. ``progress(phase,
done, total, eta_s)`` is called from this thread (phase "mirror", "ready", "pivot";
``eta_s`` from the copy rate so far, ``None`` until there is one).
"""
from __future__ import annotations

import os
import secrets
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.errors import Cancelled, OutputRefused, QMPError, UsageError, VMError
from engine.vm.qemu import DiskSpec, drive_cache
from engine.vm.supervisor import VM

Progress = Callable[[str, int, int, "float | None"], None]
POLL_S = 0.2
COMPLETE_TIMEOUT = 120.0  # block-job-complete -> BLOCK_JOB_COMPLETED
READY_TIMEOUT = 24 * 3600.0  # a copy that makes no headway for this long is given up


def _disk_size(vm: VM, device: str) -> int:
    for b in vm.qmp().execute("query-block"):
        if b.get("device") == device and b.get("inserted"):
            return int(b["inserted"]["image"]["virtual-size"])
    raise VMError(f"VM {vm.name} has no disk {device}")


def _make_target(target: str, fmt: str, size: int) -> tuple[str, bool]:
    """Create (or check) the target; (its QEMU protocol driver, whether we created it)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISBLK(st.st_mode):
            raise OutputRefused(f"{target} exists: the migrate target must be a new file or a block device")
        with open(target, "rb") as f:
            dev_size = f.seek(0, os.SEEK_END)
        if dev_size < size:
            raise OutputRefused(f"block device {target} holds {dev_size} bytes, the disk {size}")
        if fmt == "qcow2":
            _qemu_img_create(target, size)
        return "host_device", False
    if fmt == "raw":
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(target)
            raise
        os.close(fd)
    else:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)  # claimed the name; qemu-img writes into it
        try:
            _qemu_img_create(target, size)
        except BaseException:
            os.unlink(target)
            raise
    return "file", True


def _qemu_img_create(target: str, size: int) -> None:
    p = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", target, str(size)], capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        raise VMError(f"qemu-img create -f qcow2 {target}: {p.stderr.strip()[-300:]}")


def mirror(vm: VM, disk_index: int, target: str, fmt: str = "raw", progress: Progress | None = None,
           cancel: threading.Event | None = None, *, speed: int = 0) -> dict[str, Any]:
    """Mirror disk ``disk_index`` of the running ``vm`` to ``target`` and pivot to it.
    ``speed``: a copy rate limit in bytes/s (0: none). Returns ``{target, format, bytes
    (the disk's size), seconds, bytes_copied}``."""
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"migrate format {fmt!r}: raw or qcow2")
    if not 0 <= disk_index < len(vm.disks):
        raise UsageError(f"VM {vm.name} has no disk {disk_index} ({len(vm.disks)} disks)")
    target = os.path.abspath(target)
    device = f"disk{disk_index}"
    if vm.refresh() == "exited":
        raise VMError(f"VM {vm.name} is not running")
    q = vm.qmp()
    size = _disk_size(vm, device)
    driver, created = _make_target(target, fmt, size)
    node = f"mig{disk_index}-{secrets.token_hex(4)}"
    job = f"migrate-{device}-{node}"
    direct = drive_cache(target) == "none" if driver == "file" else True
    t0 = time.monotonic()
    added = started = completing = False
    try:
        q.execute("blockdev-add", {"driver": fmt, "node-name": node,
                                   "file": {"driver": driver, "filename": target,
                                            "cache": {"direct": direct, "no-flush": False}},
                                   "cache": {"direct": direct, "no-flush": False}})
        added = True
        q.take_events("BLOCK_JOB_COMPLETED")
        args: dict[str, Any] = {"job-id": job, "device": device, "target": node, "sync": "full"}
        if speed:
            args["speed"] = int(speed)
        q.execute("blockdev-mirror", args)
        started = True
        done = total = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if vm.refresh(query=False) == "exited":
                raise VMError(f"VM {vm.name} exited during the migration of {device}")
            info = next((j for j in q.execute("query-block-jobs") if j.get("device") == job), None)
            if info is None:
                ev = q.wait_event("BLOCK_JOB_COMPLETED", 1.0, match=lambda e: e["data"].get("device") == job)
                raise VMError(f"the mirror of {device} ended early: {ev['data'].get('error', 'no error given')}")
            done, total = int(info["offset"]), int(info["len"])
            elapsed = time.monotonic() - t0
            eta = (total - done) / (done / elapsed) if done and elapsed > 0 else None
            if info.get("ready") or info.get("status") == "ready":
                if progress:
                    progress("ready", done, total, 0.0)
                break
            if info.get("status") in ("aborting", "concluded", "null"):
                raise VMError(f"the mirror of {device} stopped: {info.get('error') or info.get('status')}")
            if progress:
                progress("mirror", done, total, eta)
            if elapsed > READY_TIMEOUT:
                raise VMError(f"the mirror of {device} is not in sync after {READY_TIMEOUT:.0f} s")
            if cancel is not None:
                cancel.wait(POLL_S)
            else:
                time.sleep(POLL_S)
        completing = True
        if progress:
            progress("pivot", done, total, 0.0)
        q.execute("block-job-complete", {"device": job})
        ev = q.wait_event("BLOCK_JOB_COMPLETED", COMPLETE_TIMEOUT, match=lambda e: e["data"].get("device") == job)
        if ev["data"].get("error"):
            raise VMError(f"the mirror of {device} failed at the pivot: {ev['data']['error']}")
        copied = int(ev["data"].get("offset", done))
    except BaseException:
        if not completing or not _pivoted(vm, device, node):
            _undo(vm, job if started else None, node if added else None, target if created else None)
        else:  # an error after the pivot happened: the target is the disk now
            _record(vm, disk_index, target, fmt)
        raise
    _record(vm, disk_index, target, fmt)
    return {"target": target, "format": fmt, "bytes": size, "seconds": round(time.monotonic() - t0, 3),
            "bytes_copied": copied}


def _pivoted(vm: VM, device: str, node: str) -> bool:
    try:
        for b in vm.qmp().execute("query-block", timeout=5.0):
            if b.get("device") == device and b.get("inserted"):
                return b["inserted"].get("node-name") == node
    except VMError:
        pass
    return False


def _record(vm: VM, disk_index: int, target: str, fmt: str) -> None:
    with vm._lock:
        old = vm.disks[disk_index]
        vm.disks[disk_index] = DiskSpec(target, fmt, old.bus)
        vm.save()


def _undo(vm: VM, job: str | None, node: str | None, created: str | None) -> None:
    """Cancel the job, delete the target node, remove a target file we made; best effort
    (QEMU may be gone), each step bounded."""
    try:
        q = vm.qmp()
        if job is not None:
            try:
                q.execute("block-job-cancel", {"device": job, "force": True}, timeout=10.0)
                q.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), 30.0,
                             match=lambda e: e["data"].get("device") == job)
            except QMPError:
                pass  # already gone
        if node is not None:
            q.execute("blockdev-del", {"node-name": node}, timeout=10.0)
    except VMError as e:
        if vm.refresh(query=False) != "exited":
            raise VMError(f"VM {vm.name}: cannot undo the mirror to {created or node}: {e}") from e
    finally:
        if created is not None:
            try:
                os.unlink(created)
            except FileNotFoundError:
                pass
