"""The VMs the daemon runs: start, list, stop, remove, and get back after a restart.

What: one ``Supervisor`` per daemon over a state directory (``<cache_dir>/vms``); each VM
has its own directory ``<state_dir>/<name>/`` with ``vm.json`` (spec, pid, start time,
QEMU version, accel, forwards, the disks' current sources, how it ended), ``qmp.sock``,
``serial.log`` (the guest's console, a file: never a pipe, the VM outlives the daemon),
``qemu.log`` (QEMU's own output), ``qemu.pid``. ``vm.json`` is replaced atomically.

Lifetime: QEMU runs in a session of its own (``start_new_session``), stdin from
/dev/null, so a SIGINT or SIGTERM to the daemon's process group never reaches it and a
daemon restart leaves it running. ``close`` (daemon stop) only closes the QMP
connections. ``adopt`` (daemon start) reads every ``vm.json``: a VM whose pid is alive
AND whose ``/proc/PID/cmdline`` is QEMU with this VM's ``-name`` and ``-pidfile`` (a
reused pid is not ours) gets its QMP connection back and its state from
``query-status``; the others are "exited". A VM that ends by itself (guest poweroff) is
reaped: ``waitpid`` through its ``Popen`` when this process started it (exit status
known), ``/proc`` otherwise.

States: ``running``; ``paused`` (``status`` says why: ``io-error`` when ``werror=stop``
/ ``rerror=stop`` stopped it on a failed disk request, e.g. during an NFS outage;
``paused`` for a QMP ``stop``; ...); ``exited`` (``exit_status`` when known).
``resume_paused`` sends ``cont`` to every VM paused on an I/O error: QEMU retries the
failed requests, and if they fail again the VM pauses again, so the daemon can call it
periodically.

Threads: the daemon calls every method from its worker threads (never its event loop):
the supervisor's lock guards the table of VMs, each VM's QMP client has its own lock
around each exchange, and a VM's ``_lock`` serialises its reaping and state changes.
Every wait is bounded (``timeout``) or cancellable.

It refuses: a second VM with a running VM's name, ``remove`` of a running VM, names that
are not one path component (``check_spec``), and it never signals a pid whose
``cmdline`` is not this VM's QEMU.
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from engine.errors import Cancelled, NotFound, UsageError, VMError, VMTimeout
from engine.fsutil import write_file_atomic
from engine.vm.qemu import (
    QEMU,
    DiskSpec,
    VMFiles,
    VMSpec,
    accel_verdict,
    check_spec,
    command_line,
    esc,
    prepare_files,
    qemu_version,
    resolve_forwards,
)
from engine.vm.qmp import QMP

log = logging.getLogger("instantnfs.vm")

START_TIMEOUT = 15.0  # QEMU start -> its QMP monitor answers
SERIAL_POLL_S = 0.1
QUIT_S = 0.5  # share of a stop's timeout for QMP quit; then SIGTERM (0.3), then SIGKILL


class VM:
    """One supervised QEMU process. Read its fields; change it through the Supervisor."""

    def __init__(self, spec: VMSpec, files: VMFiles, *, pid: int, started: float, qemu_version: str,
                 accel: str, forwards: dict[int, int], disks: list[DiskSpec],
                 proc: subprocess.Popen | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.files = files
        self.pid = pid
        self.started = started
        self.qemu_version = qemu_version
        self.accel = accel
        self.forwards = forwards  # guest port -> actual host port on 127.0.0.1
        self.disks = disks  # current sources (a migrate pivots one)
        self.state = "running"  # running | paused | exited
        self.status = "running"  # QEMU's run state (query-status), or "exited"
        self.exit_status: int | None = None  # the exit code (-N: killed by signal N), when known
        self.exited_at: float | None = None
        self._proc = proc
        self._qmp = QMP(files.qmp)
        self._lock = threading.RLock()

    @property
    def serial_log(self) -> Path:
        return self.files.serial

    @property
    def qemu_log(self) -> Path:
        return self.files.qemu_log

    def to_json(self) -> dict[str, Any]:
        """What vm.json holds (and the API can show)."""
        return {"version": 1, "name": self.name, "spec": self.spec.to_json(), "pid": self.pid,
                "started": self.started, "qemu_version": self.qemu_version, "accel": self.accel,
                "forwards": {str(g): h for g, h in self.forwards.items()},
                "disks": [d.to_json() for d in self.disks], "state": self.state, "status": self.status,
                "exit_status": self.exit_status, "exited_at": self.exited_at,
                "serial_log": str(self.serial_log)}

    def save(self) -> None:
        with self._lock:
            write_file_atomic(self.files.vm_json, json.dumps(self.to_json(), indent=1).encode())

    def serial_text(self, max_bytes: int = 1 << 20) -> str:
        """The console output so far (its last ``max_bytes``), carriage returns removed."""
        try:
            with open(self.serial_log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - max_bytes))
                return f.read().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def console_from(self, offset: int, max_bytes: int = -1) -> bytes:
        """The console's raw bytes from byte ``offset`` on (at most ``max_bytes``), for a
        caller that follows it; empty before QEMU has written any."""
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(offset)
                return f.read(max_bytes)
        except FileNotFoundError:
            return b""

    def wait_for(self, pattern: str, timeout: float, cancel: threading.Event | None = None) -> str:
        """The first console line (read from ``serial.log``, the unfinished last line
        too: a login prompt has no newline) that contains ``pattern`` or matches it as a
        regular expression. ``VMTimeout`` after ``timeout`` seconds, ``VMError`` if the VM
        exits first, ``Cancelled`` when ``cancel`` is set."""
        try:
            rx: re.Pattern[str] | None = re.compile(pattern)
        except re.error:
            rx = None

        def hit(line: str) -> bool:
            return pattern in line or (rx is not None and rx.search(line) is not None)

        deadline = time.monotonic() + timeout
        pos, partial = 0, ""
        while True:
            alive = self.refresh(query=False) != "exited"
            try:
                with open(self.serial_log, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            pos += len(data)
            text = partial + data.decode(errors="replace").replace("\r", "")
            *lines, partial = text.split("\n")
            for line in lines:
                if hit(line):
                    return line
            if partial and hit(partial):
                return partial
            if not alive:
                raise VMError(f"VM {self.name} exited ({self.exit_status}) before its console showed {pattern!r}")
            if time.monotonic() >= deadline:
                raise VMTimeout(f"timeout: VM {self.name} showed no console line matching {pattern!r} within {timeout:.0f} s")
            if cancel is not None and cancel.wait(SERIAL_POLL_S):
                raise Cancelled()
            elif cancel is None:
                time.sleep(SERIAL_POLL_S)

    def qmp(self) -> QMP:
        """This VM's QMP client, connected (reconnected if the connection dropped)."""
        with self._lock:
            if self.state == "exited":
                raise VMError(f"VM {self.name} is not running")
            if not self._qmp.connected:
                self._qmp.connect(timeout=START_TIMEOUT, alive=self._alive)
            return self._qmp

    def refresh(self, query: bool = True) -> str:
        """Reap the process if it ended; with ``query``, the run state from QMP. The state."""
        with self._lock:
            if self.state == "exited":
                return self.state
            if not self._alive():
                self._mark_exited()
                return self.state
            if query:
                try:
                    st = self.qmp().execute("query-status", timeout=5.0)
                except VMError:
                    if not self._alive():
                        self._mark_exited()
                    return self.state
                self.status = str(st.get("status", ""))
                self.state = "running" if st.get("running") else "paused"
            return self.state

    # -- process bookkeeping (under self._lock) --

    def _alive(self) -> bool:
        if self._proc is not None:
            rc = self._proc.poll()
            if rc is not None:
                self.exit_status = rc
                return False
            return True
        return is_our_qemu(self.pid, self.files, self.name)

    def _mark_exited(self) -> None:
        self._qmp.close()
        self.state = self.status = "exited"
        self.exited_at = self.exited_at or time.time()
        try:
            self.save()
        except OSError as e:  # removed under us, or a full volume: the state is in memory still
            log.warning("VM %s: cannot record its exit in %s: %s", self.name, self.files.vm_json, e)

    def _close(self) -> None:
        with self._lock:
            self._qmp.close()
            self._proc = None  # a next daemon reaps through /proc; this one no longer owns it


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def is_our_qemu(pid: int, files: VMFiles, name: str) -> bool:
    """Whether ``pid`` is alive and is the QEMU of VM ``name`` (not a reused pid, not a
    zombie: a zombie's cmdline is empty)."""
    if pid <= 0:
        return False
    argv = proc_cmdline(pid)
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False

    def value(opt: str) -> str | None:
        return argv[argv.index(opt) + 1] if opt in argv[:-1] else None

    return value("-name") == esc(name) and value("-pidfile") == str(files.pidfile)


class Supervisor:
    """The daemon's VMs, under ``state_dir`` (one directory per VM)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self._vms: dict[str, VM] = {}
        self._lock = threading.Lock()

    def files(self, name: str) -> VMFiles:
        return VMFiles(self.state_dir / name)

    def start(self, spec: VMSpec) -> VM:
        """Start ``spec`` under QEMU and return it once its monitor answers ("running").
        ``VMError`` with the end of ``qemu.log`` when QEMU refuses to start."""
        check_spec(spec)
        files = self.files(spec.name)
        accel = spec.accel if spec.accel != "auto" else accel_verdict(self.state_dir)  # a probe: not under the lock
        version = qemu_version()
        with self._lock:
            old = self._vms.get(spec.name)
            if old is not None and old.refresh(query=False) != "exited":
                raise UsageError(f"a VM named {spec.name!r} is running (pid {old.pid})")
            if old is None and files.vm_json.exists():
                prev = self._load(files)
                if prev is not None and prev.state != "exited":
                    raise UsageError(f"a VM named {spec.name!r} is running (pid {prev.pid})")
            self._vms.pop(spec.name, None)
            prepare_files(spec, files)
            forwards = resolve_forwards(spec.forwards)
            cmd = command_line(spec, files, accel=accel, forwards=forwards)
            for stale in (files.qmp, files.pidfile):
                stale.unlink(missing_ok=True)
            files.serial.write_bytes(b"")
            with open(files.qemu_log, "wb") as qlog:
                qlog.write(("instantnfs: " + " ".join(cmd) + "\n").encode())
                qlog.flush()
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                        start_new_session=True, close_fds=True, cwd=files.dir)
            vm = VM(spec, files, pid=proc.pid, started=time.time(), qemu_version=version, accel=accel,
                    forwards=forwards, disks=[DiskSpec(d.source, d.fmt, d.bus) for d in spec.disks], proc=proc)
            vm.save()
            self._vms[spec.name] = vm
        try:
            vm.qmp()
            vm.refresh()
        except VMError as e:
            with vm._lock:
                if vm._alive():
                    proc.kill()
                    proc.wait(10)
                vm._mark_exited()
            tail = files.qemu_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise VMError(f"QEMU did not start VM {spec.name}: {e}; qemu.log: {' | '.join(tail)}") from e
        log.info("VM %s started: pid %d, %s, %d disk(s), net %s", spec.name, vm.pid, accel, len(spec.disks), spec.net)
        return vm

    def get(self, name: str) -> VM | None:
        with self._lock:
            vm = self._vms.get(name)
        if vm is not None:
            vm.refresh()
        return vm

    def peek(self, name: str) -> VM | None:
        """VM ``name`` without asking QEMU (its process checked, no QMP): safe on an event loop."""
        with self._lock:
            vm = self._vms.get(name)
        if vm is not None:
            vm.refresh(query=False)
        return vm

    def list(self) -> list[VM]:
        with self._lock:
            vms = sorted(self._vms.values(), key=lambda v: v.name)
        for vm in vms:
            vm.refresh()
        return vms

    def _need(self, name: str) -> VM:
        with self._lock:
            vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"no VM named {name!r}")
        return vm

    def stop(self, name: str, timeout: float = 10.0) -> VM:
        """Stop VM ``name``: QMP ``quit``, then SIGTERM, then SIGKILL, each waited for a
        share of ``timeout``. The VM, "exited"."""
        vm = self._need(name)
        with vm._lock:
            if vm.refresh(query=False) == "exited":
                return vm
            try:
                vm.qmp().execute("quit", timeout=min(5.0, timeout * QUIT_S))
            except VMError as e:
                log.info("VM %s: QMP quit failed (%s), signalling it", name, e)
            for sig, share in ((None, QUIT_S), (signal.SIGTERM, 0.3), (signal.SIGKILL, 0.2)):
                if sig is not None and vm._alive():
                    log.warning("VM %s did not exit: sending %s", name, sig.name)
                    os.kill(vm.pid, sig)
                end = time.monotonic() + timeout * share
                while vm._alive() and time.monotonic() < end:
                    time.sleep(0.05)
                if not vm._alive():
                    break
            else:
                raise VMError(f"VM {name} (pid {vm.pid}) survived SIGKILL")
            vm._mark_exited()
        log.info("VM %s stopped (exit status %s)", name, vm.exit_status)
        return vm

    def remove(self, name: str) -> None:
        """Forget VM ``name`` and delete its state directory; refused while it runs."""
        vm = self._need(name)
        with vm._lock:
            if vm.refresh(query=False) != "exited":
                raise UsageError(f"VM {name!r} is running: stop it first")
            with self._lock:
                self._vms.pop(name, None)
            shutil.rmtree(vm.files.dir, ignore_errors=True)

    def resume_paused(self) -> builtins.list[str]:
        """``cont`` for each VM paused on an I/O error; the names it resumed."""
        resumed = []
        with self._lock:
            vms = list(self._vms.values())
        for vm in vms:
            with vm._lock:
                if vm.refresh() != "paused" or vm.status != "io-error":
                    continue
                try:
                    vm.qmp().execute("cont", timeout=5.0)
                except VMError as e:
                    log.warning("VM %s: cannot resume after an I/O error: %s", vm.name, e)
                    continue
                log.info("VM %s resumed after an I/O error", vm.name)
                resumed.append(vm.name)
                vm.refresh()
        return resumed

    def adopt(self) -> builtins.list[VM]:
        """Load every VM of the state directory (daemon start): those still running come
        back with their QMP connection, the others are "exited". All of them, by name."""
        found = []
        if self.state_dir.is_dir():
            for d in sorted(self.state_dir.iterdir()):
                files = VMFiles(d)
                if not files.vm_json.is_file():
                    continue
                with self._lock:
                    known = self._vms.get(d.name)
                if known is not None:
                    found.append(known)
                    continue
                vm = self._load(files)
                if vm is None:
                    continue
                with self._lock:
                    self._vms.setdefault(vm.name, vm)
                if vm.state != "exited":
                    try:
                        vm.refresh()
                    except VMError as e:
                        log.warning("VM %s (pid %d) runs but its monitor does not answer: %s", vm.name, vm.pid, e)
                    log.info("VM %s adopted: pid %d, %s", vm.name, vm.pid, vm.status)
                found.append(vm)
        return found

    def _load(self, files: VMFiles) -> VM | None:
        try:
            d = json.loads(files.vm_json.read_text())
            spec = VMSpec.from_json(d["spec"])
            if spec.name != files.dir.name:
                raise ValueError(f"names {spec.name!r}, in directory {files.dir.name!r}")
            vm = VM(spec, files, pid=int(d["pid"]), started=float(d["started"]), qemu_version=str(d.get("qemu_version", "")),
                    accel=str(d.get("accel", "")), forwards={int(g): int(h) for g, h in (d.get("forwards") or {}).items()},
                    disks=[DiskSpec.from_json(x) for x in d.get("disks") or d["spec"]["disks"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s: %s", files.vm_json, e)
            return None
        vm.exit_status = d.get("exit_status")
        vm.exited_at = d.get("exited_at")
        if d.get("state") == "exited" or not is_our_qemu(vm.pid, files, vm.name):
            vm.state = vm.status = "exited"
            if d.get("state") != "exited":
                vm._mark_exited()
        return vm

    def close(self) -> None:
        """Daemon stop: close every QMP connection, leave the VMs running."""
        with self._lock:
            vms = list(self._vms.values())
            self._vms.clear()
        for vm in vms:
            vm._close()


__all__ = ["QEMU", "VM", "Supervisor", "is_our_qemu"]
