"""The recovery product: the VMs the daemon runs out of its sessions, and what is done
with them (recover, boot, stop, migrate, sandboxes, verify).

- **recover** = publish a point (instant mode: the writes survive restarts) and, with
  ``boot``, run it under QEMU (``engine.vm``) with its disks from the daemon's own
  ``nfs://`` URLs and the CPUs, memory and firmware its backup recorded. **boot** runs
  an existing session's VM again (after a stop, or a daemon restart).
- **stop** powers a session's VM off (the session and its writes stay); ``discard`` also
  unpublishes it, throwing its writes away.
- **migrate** moves a session's disks to production storage while the VM runs. A VM the
  daemon runs is mirrored live by QEMU (``engine.vm.migrate.mirror``: the guest never
  stops; after the pivot its disks are the targets and the session can be unpublished
  under it). A VM run elsewhere (ESXi, another QEMU) is copied with ``engine.export``
  while it runs; the job then waits (phase "waiting") until the caller confirms the VM
  has stopped (``confirm``), copies what was written meanwhile and ends. Targets: a new
  file in one of the export directories (DIR/<disk>.<format>) or a block device listed in
  ``server.migrate_devices``.
- **sandbox** publishes N throw-away copies of one point with a time to live (they share
  the daemon's decompression cache, like every session) and boots each with no route
  out, if asked; ``expire`` ends what has run out, across restarts too (the expiry is in
  state.json and the VMs outlive the daemon).
- **verify** publishes a sandbox, checks the point's data and filesystems and, with
  ``boot``, boots it in an isolated lab (QEMU user networking with ``restrict=on``, only
  the tested ports forwarded to the host's loopback), runs the tests, powers off and
  unpublishes (``engine.vm.verify``).

Threads: the control API calls these on the event loop; what blocks (QEMU start and
stop, QMP, the copies) runs in the jobs' pool (long work, as a ``Job`` with progress and
a cancel event) or the datastore's admin pool (short work), never on the loop. One VM per
session, named after it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from engine.datastore import Datastore, Session
from engine.errors import (
    Cancelled,
    InstantNFSError,
    NotFound,
    OutputRefused,
    SessionError,
    UsageError,
)
from engine.export import export_disk
from engine.jobs import Job, Jobs
from engine.vm import migrate as vm_migrate
from engine.vm import verify as vm_verify
from engine.vm.supervisor import VM, DiskSpec, Supervisor, VMSpec

log = logging.getLogger("instantnfs.recovery")

BUSES = ("virtio", "scsi", "sata", "ide")
FIRMWARES = ("bios", "efi")
GUEST_CONFIG_MAX = 4096  # bytes of guest configuration (fw_cfg) a request may give
STOP_TIMEOUT = 15.0
TEST_TIMEOUT = 60.0  # s one verify test may take (retried until then: a service may start after the heartbeat)  # s a VM gets to end at a stop before it is killed
CONFIRM_TIMEOUT = 24 * 3600.0  # s a copy migrate waits for the caller to say the VM stopped


def check_net(net: str) -> str:
    if net in ("none", "user", "user-restricted") or (net.startswith("bridge:") and len(net) > 7):
        return net
    raise UsageError(f"--net must be none, user or bridge:NAME, not {net!r}")


class Recovery:
    """The daemon's VMs and the recovery operations on its sessions."""

    def __init__(self, ds: Datastore, jobs: Jobs, supervisor: Supervisor, disk_url: Callable[[Session, int], str],
                 cfg: dict[str, Any]) -> None:
        self.ds = ds
        self.jobs = jobs
        self.vms = supervisor
        self.disk_url = disk_url  # session, disk position -> the nfs:// URL QEMU opens
        self.cfg = cfg
        self.export_dirs: list[str] = list(cfg["server"]["export_dirs"])
        self.devices: list[str] = list(cfg["server"].get("migrate_devices") or [])
        self.accel: str = cfg["vm"]["accel"]
        self._confirm: dict[str, threading.Event] = {}

    # -- VMs of sessions -------------------------------------------------------------------------

    def vm_of(self, session: str) -> VM | None:
        """The session's VM as last seen (no QMP round trip: callable on the loop)."""
        return self.vms.peek(session)

    def spec(self, s: Session, *, memory_mib: int | None = None, cpus: int | None = None, disk_bus: str = "virtio",
             net: str = "user", firmware: str | None = None, forwards: dict[int, int] | None = None,
             guest_config: str | None = None, owner: str = "") -> VMSpec:
        """The QEMU VM of session ``s``: its disks from our NFS URLs, the hardware its backup recorded."""
        m = s.point.manifest
        if disk_bus not in BUSES:
            raise UsageError(f"--disk-bus must be one of {', '.join(BUSES)}, not {disk_bus!r}")
        fw = firmware or m.get("firmware") or "bios"
        if fw not in FIRMWARES:
            raise UsageError(f"firmware must be one of {', '.join(FIRMWARES)}, not {fw!r}")
        mem = int(memory_mib or m.get("memory_mib") or 1024)
        ncpu = int(cpus or m.get("cpus") or 1)
        if mem < 16 or ncpu < 1:
            raise UsageError("a VM needs at least 16 MiB of memory and one CPU")
        fw_cfg = None
        if guest_config is not None:
            fw_cfg = guest_config.replace("${VM}", s.name).encode()
            if len(fw_cfg) > GUEST_CONFIG_MAX:
                raise UsageError(f"guest_config is {len(fw_cfg)} bytes: at most {GUEST_CONFIG_MAX}")
        return VMSpec(
            name=s.name,
            disks=[DiskSpec(self.disk_url(s, j), "raw", disk_bus) for j in range(len(s.disks))],
            memory_mib=mem, cpus=ncpu, firmware=fw, net=check_net(net), forwards=dict(forwards or {}),
            fw_cfg=fw_cfg, accel=self.accel, owner=owner or f"session:{s.name}",
        )

    def start_vm(self, spec: VMSpec) -> VM:
        """Start a VM (blocking); a running VM of that session is refused."""
        vm = self.vms.peek(spec.name)
        if vm is not None and vm.state in ("running", "paused"):
            raise SessionError(f"session {spec.name!r} already has a running VM (pid {vm.pid}); stop it first")
        return self.vms.start(spec)

    def stop_vm(self, session: str) -> VM | None:
        """Power the session's VM off (blocking); None if it has none."""
        vm = self.vms.peek(session)
        if vm is None:
            return None
        if vm.state in ("running", "paused"):
            vm = self.vms.stop(session, timeout=STOP_TIMEOUT)
        return vm

    async def stop(self, session: str, discard: bool) -> dict:
        """``instantnfs stop``: the VM powered off; with ``discard`` the session unpublished too."""
        s = self.ds.sessions.get(session)
        if s is None and self.vms.peek(session) is None:
            raise NotFound(f"no published session or VM {session!r}")
        loop = asyncio.get_running_loop()
        vm = await loop.run_in_executor(self.ds.registry.admin_pool, self.stop_vm, session)
        out: dict[str, Any] = {"session": session, "vm": vm_view(vm) if vm else None, "unpublished": False}
        if discard:
            if vm is not None:
                await loop.run_in_executor(self.ds.registry.admin_pool, self.vms.remove, session)
            if s is not None:
                await self.ds.aunpublish(session)
                out["unpublished"] = True
        return out

    async def boot(self, session: str, **hw: Any) -> VM:
        s = self.ds.sessions.get(session)
        if s is None:
            raise NotFound(f"no published session {session!r}")
        spec = self.spec(s, **hw)
        return await asyncio.get_running_loop().run_in_executor(self.ds.registry.admin_pool, self.start_vm, spec)

    async def expire(self) -> list[str]:
        """End the sessions whose time to live ran out: VM stopped, session unpublished."""
        ended = []
        for name in self.ds.registry.expired():
            try:
                await self.stop(name, discard=True)
                ended.append(name)
                log.info("session %s expired: its VM stopped, the session unpublished", name)
            except (InstantNFSError, OSError) as e:
                log.error("session %s expired but could not be ended: %s", name, e)
        return ended

    # -- migrate -------------------------------------------------------------------------------------

    def _targets(self, s: Session, to: str, fmt: str) -> list[tuple[str, bool]]:
        """(path, is_device) per disk, checked (in a thread: the path is the client's)."""
        real = os.path.realpath(to)
        if to in self.devices or real in [os.path.realpath(d) for d in self.devices]:
            try:
                st = os.stat(real)
            except OSError as e:
                raise OutputRefused(f"migrate target {to}: {e.strerror}") from e
            if not stat.S_ISBLK(st.st_mode):
                raise OutputRefused(f"migrate target {to} is listed in server.migrate_devices but is not a block device")
            if len(s.disks) != 1:
                raise UsageError(f"session {s.name!r} has {len(s.disks)} disks: a block device takes one (publish --disk)")
            if fmt != "raw":
                raise UsageError("a block device takes the raw format")
            return [(real, True)]
        if os.path.exists(to) and not os.path.isdir(to):
            raise OutputRefused(f"migrate target {to} exists and is not a directory (block devices must be listed in "
                                "server.migrate_devices)")
        if not any(real == d or real.startswith(d.rstrip("/") + "/") for d in map(os.path.realpath, self.export_dirs)):
            raise OutputRefused(f"migrate target {to} is outside the export directories ({', '.join(self.export_dirs)}) "
                                "and not a device listed in server.migrate_devices")
        os.makedirs(real, exist_ok=True)
        out = []
        for d in s.disks:
            path = os.path.join(real, f"{d.name}.{'img' if fmt == 'raw' else 'qcow2'}")
            if os.path.lexists(path):
                raise OutputRefused(f"{path} exists: a migrate never overwrites a file")
            out.append((path, False))
        return out

    async def migrate(self, session: str, to: str, fmt: str) -> Job:
        s = self.ds.sessions.get(session)
        if s is None:
            raise NotFound(f"no published session {session!r}")
        if fmt not in ("raw", "qcow2"):
            raise UsageError(f"format must be raw or qcow2, not {fmt!r}")
        loop = asyncio.get_running_loop()
        targets = await loop.run_in_executor(self.ds.registry.admin_pool, self._targets, s, to, fmt)
        vm = self.vms.peek(session)
        if vm is not None and vm.state in ("running", "paused"):
            return self.jobs.start("migrate", s, lambda job: self._mirror(job, vm, targets, fmt))
        if any(dev for _p, dev in targets):
            raise UsageError("a VM run elsewhere migrates to files (a block device target needs a VM the daemon "
                             "runs: 'instantnfs boot' or 'recover --boot')")
        caches = list(s.caches)
        confirm = threading.Event()
        job = self.jobs.start("migrate", s, lambda job: self._copy(job, caches, targets, fmt, confirm))
        self._confirm[job.id] = confirm
        return job

    def confirm(self, job_id: str) -> Job:
        """The caller says the VM of a copy migrate has stopped: the final pass may run."""
        job = self.jobs.get(job_id)
        if job is None or job_id not in self._confirm:
            raise NotFound(f"no migrate job {job_id!r} waiting for a confirmation")
        if job.state != "running":
            raise SessionError(f"job {job_id} has already ended ({job.state})")
        self._confirm[job_id].set()
        return job

    def _mirror(self, job: Job, vm: VM, targets: list[tuple[str, bool]], fmt: str) -> dict:
        results = []
        for i, (path, _dev) in enumerate(targets):
            def progress(phase: str, done: int, total: int, eta: float | None, i: int = i) -> None:
                job.phase, job.done, job.total = f"{phase} disk {i}", done, total
                job.eta = eta
            results.append(vm_migrate.mirror(vm, i, path, fmt, progress, job.cancel))
        return {"mode": "live", "vm": vm.name, "disks": results,
                "bytes_copied": sum(r.get("bytes_copied", 0) for r in results)}

    def _copy(self, job: Job, caches: list, targets: list[tuple[str, bool]], fmt: str, confirm: threading.Event) -> dict:
        results: list[dict] = []
        waited = [False]

        def progress(phase: str, done: int, total: int) -> None:
            job.phase, job.done, job.total = phase, done, total

        def gate() -> None:
            # every disk's first passes are done (the last disk waits for all): the VM may stop now
            if waited[0]:
                return
            job.phase, job.done, job.total = "waiting", 0, 0
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while not confirm.wait(0.5):
                if job.cancel.is_set():
                    raise Cancelled("migrate cancelled while waiting for the VM to stop: no file was left")
                if time.monotonic() > deadline:
                    raise Cancelled(f"nobody confirmed the VM stopped within {CONFIRM_TIMEOUT:.0f} s")
            waited[0] = True

        done_paths: list[str] = []
        try:
            for cache, (path, _dev) in zip(caches, targets):
                r = export_disk(cache, path, fmt, progress, cancel=job.cancel, allowed_dirs=self.export_dirs,
                                before_final=gate)
                done_paths.append(r.path)
                results.append({"path": r.path, "format": r.format, "size": r.size, "passes": r.passes,
                                "recopied_bytes": r.recopied_bytes, "seconds": round(r.seconds, 3)})
        except BaseException:
            for p in done_paths:  # all or nothing
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        finally:
            self._confirm.pop(job.id, None)
        return {"mode": "copy", "disks": results, "bytes_copied": sum(r["size"] for r in results),
                "recopied_bytes": sum(r["recopied_bytes"] for r in results)}

    # -- sandboxes -----------------------------------------------------------------------------------

    async def sandboxes(self, point: str, count: int, ttl: float, boot: bool, *, name: str | None = None,
                        cache_dir: str | None = None, **hw: Any) -> list[dict]:
        if not 1 <= count <= 64:
            raise UsageError("--count must be from 1 to 64")
        p = await asyncio.get_running_loop().run_in_executor(self.ds.registry.admin_pool, self.ds.repo.point, point)
        base = name or f"{p.vm}-sandbox"
        out = []
        made: list[str] = []
        try:
            for k in range(1, count + 1):
                n = f"{base}-{k}"
                i = 2
                while n in self.ds.sessions:
                    n = f"{base}-{k}-{i}"
                    i += 1
                s = await self.ds.apublish(p.id, n, mode="instant", cache_dir=cache_dir, reserve=0, ttl=ttl)
                made.append(s.name)
                vm = None
                if boot:
                    hw.setdefault("net", "user-restricted")
                    vm = await self.boot(s.name, **hw)
                out.append({"session": s.name, "vm": vm_view(vm) if vm else None, "expires": s.expires})
        except BaseException:
            for n in made:
                try:
                    await self.stop(n, discard=True)
                except (InstantNFSError, OSError) as e:
                    log.error("sandbox %s could not be removed after a failed sandbox request: %s", n, e)
            raise
        return out

    # -- verify --------------------------------------------------------------------------------------

    async def verify(self, point: str, *, boot: bool, timeout: float, tests: Sequence[str], script: str | None,
                     heartbeat: str | None, disk_bus: str = "virtio", memory_mib: int | None = None,
                     guest_config: str | None = None) -> Job:
        p = await asyncio.get_running_loop().run_in_executor(self.ds.registry.admin_pool, self.ds.repo.point, point)
        specs = [vm_verify.parse_test(t) for t in tests]
        if (specs or script) and not boot:
            raise UsageError("tests (--test, --script) run against a booted guest: add --boot")
        if script:
            if not os.path.isabs(script) or not os.access(script, os.X_OK):
                raise UsageError(f"--script {script} must be an absolute path of an executable file on the daemon's host")
            specs.append(vm_verify.TestSpec("script", None, script=script))
        s = await self.ds.apublish(p.id, None, mode="sandbox", reserve=0)
        loop = asyncio.get_running_loop()
        stack = self.ds.stack

        def work(job: Job) -> dict:
            def progress(phase: str, done: int, total: int) -> None:
                job.phase, job.done, job.total = phase, done, total

            booter = self._lab_boot(s, timeout, heartbeat, disk_bus, memory_mib, guest_config, job) if boot else None
            try:
                report = vm_verify.verify_point(stack, p, boot=booter, tests=specs, timeout=min(timeout, TEST_TIMEOUT),
                                                progress=lambda done, total: progress("data", done, total),
                                                cancel=job.cancel)
            finally:
                self.stop_vm(s.name)
                if self.vms.peek(s.name) is not None:
                    self.vms.remove(s.name)
                fut = asyncio.run_coroutine_threadsafe(self.ds.aunpublish(s.name, force=True), loop)
                try:
                    fut.result(timeout=60)
                except Exception as e:  # noqa: BLE001 - the report stands; the sandbox is logged
                    log.error("verify of %s: its sandbox %s could not be unpublished: %s", p.id, s.name, e)
            return {**report.to_json(), "summary": report.summary()}

        return self.jobs.start("verify", s, work, label=p.id)

    def _lab_boot(self, s: Session, timeout: float, heartbeat: str | None, disk_bus: str,
                  memory_mib: int | None, guest_config: str | None, job: Job) -> vm_verify.Boot:
        """The boot callable ``verify_point`` takes: the VM in the isolated lab, forwards
        of the tested ports, waiting for the heartbeat; powered off at the end."""
        pattern = heartbeat or vm_verify.DEFAULT_HEARTBEAT

        @contextmanager
        def booted(ports: Sequence[int]) -> Iterator[tuple[dict[int, int], Callable[[], str]]]:
            spec = self.spec(s, net="user-restricted", forwards={p: 0 for p in ports}, disk_bus=disk_bus,
                             memory_mib=memory_mib, guest_config=guest_config, owner=f"verify:{job.id}")
            vm = self.start_vm(spec)
            try:
                job.phase = "boot"
                vm.wait_for(pattern, timeout, cancel=job.cancel)
                yield dict(vm.forwards), vm.serial_text
            finally:
                self.stop_vm(s.name)

        return booted


def vm_view(vm: VM) -> dict:
    """What the API shows of a VM (vm.json's content)."""
    return vm.to_json()
