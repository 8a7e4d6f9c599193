"""The QMP client against a scripted monitor (greeting, ids, late replies, events, errors,
EOF, reconnect) and ``VM.wait_for`` on a console log (plain text, regex, the unfinished
last line, timeout, cancel, exit)."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from engine.errors import Cancelled, QMPError, VMError, VMTimeout
from engine.vm.qemu import DiskSpec, VMFiles, VMSpec
from engine.vm.qmp import QMP
from engine.vm.supervisor import VM


class FakeMonitor:
    """A unix-socket QMP server; ``script(cmd, args)`` returns the lines to send back
    (dicts, with "$id" replaced by the command's id)."""

    def __init__(self, path, script):
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.script = script
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rwb")
                f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                f.flush()
                for line in f:
                    msg = json.loads(line)
                    self.seen.append(msg["execute"])
                    replies = self.script(msg["execute"], msg.get("arguments") or {})
                    if replies is None:
                        f.close()  # hang up
                        break
                    for r in replies:
                        f.write(json.dumps(r).replace('"$id"', str(msg["id"])).encode() + b"\n")
                    f.flush()

    def close(self):
        self.srv.close()


def ev(name, **data):
    return {"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}}


def script(cmd, args):
    if cmd == "qmp_capabilities":
        return [{"return": {}, "id": "$id"}]
    if cmd == "query-status":  # an event first, a late reply of an old command, then ours
        return [ev("STOP"), {"return": "stale", "id": 999}, {"return": {"status": "paused", "running": False},
                                                             "id": "$id"}]
    if cmd == "nope":
        return [{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": "$id"}]
    if cmd == "slow":
        return []  # never answers
    if cmd == "fire":
        return [{"return": {}, "id": "$id"}, ev("BLOCK_JOB_READY", device="j1"), ev("BLOCK_JOB_COMPLETED", device="j1")]
    if cmd == "quit":
        return None
    raise AssertionError(cmd)


def test_qmp_client(tmp_path):
    path = tmp_path / "q.sock"
    mon = FakeMonitor(path, script)
    q = QMP(path)
    try:
        assert "QMP" in q.connect(timeout=5)
        assert q.execute("query-status") == {"status": "paused", "running": False}
        assert [e["event"] for e in q.events] == ["STOP"]
        with pytest.raises(QMPError) as e:
            q.execute("nope")
        assert e.value.error_class == "CommandNotFound" and "nope" in str(e.value)
        with pytest.raises(VMTimeout):
            q.execute("slow", timeout=0.3)
        assert q.execute("fire") == {}  # the stream is in step after a timeout
        got = q.wait_event("BLOCK_JOB_COMPLETED", 5, match=lambda e: e["data"]["device"] == "j1")
        assert got["data"]["device"] == "j1"
        assert [e["event"] for e in q.take_events()] == ["STOP", "BLOCK_JOB_READY"] and not q.events
        with pytest.raises(VMTimeout):
            q.wait_event("SHUTDOWN", 0.3)
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(Cancelled):
            q.wait_event("SHUTDOWN", 5, cancel=cancel)
        with pytest.raises(VMError, match="closed"):
            q.execute("quit")
        assert not q.connected
        with pytest.raises(VMError):
            q.execute("query-status")
        q.connect(timeout=5)  # the monitor takes the next client
        assert q.execute("query-status")["status"] == "paused"
    finally:
        q.close()
        mon.close()
    with pytest.raises(VMTimeout):
        QMP(tmp_path / "none.sock").connect(timeout=0.3)
    with pytest.raises(VMError, match="exited"):
        QMP(tmp_path / "none.sock").connect(timeout=5, alive=lambda: False)


@pytest.fixture
def fake_vm(tmp_path):
    files = VMFiles(tmp_path / "vm")
    files.dir.mkdir()
    files.serial.write_bytes(b"")
    proc = subprocess.Popen(["sleep", "60"])
    vm = VM(VMSpec("f", [DiskSpec("/dev/null")]), files, pid=proc.pid, started=time.time(), qemu_version="x",
            accel="tcg", forwards={}, disks=[DiskSpec("/dev/null")], proc=proc)
    yield vm, proc
    proc.kill()
    proc.wait()


def test_wait_for(fake_vm):
    vm, proc = fake_vm

    def later(data, delay=0.3):
        def write():
            time.sleep(delay)
            with open(vm.serial_log, "ab") as f:
                f.write(data)
        threading.Thread(target=write, daemon=True).start()

    later(b"SeaBIOS\r\nGUEST-HEARTBEAT ok run1 n=1\r\nguest login: ")
    assert vm.wait_for("GUEST-HEARTBEAT ok run1", 10) == "GUEST-HEARTBEAT ok run1 n=1"
    assert vm.wait_for(r"login:\s*$", 10) == "guest login: "  # the unfinished last line
    assert vm.wait_for(r"n=\d+", 1) == "GUEST-HEARTBEAT ok run1 n=1"  # from the start of the log
    with pytest.raises(VMTimeout):
        vm.wait_for("GUEST-DONE", 0.3)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(Cancelled):
        vm.wait_for("GUEST-DONE", 10, cancel)
    later(b"\nx[y\n", 0)
    assert vm.wait_for("x[y", 5) == "x[y"  # not a valid regex: plain text
    assert "\r" not in vm.serial_text() and vm.serial_text().startswith("SeaBIOS\n")
    proc.kill()
    with pytest.raises(VMError, match="exited"):
        vm.wait_for("GUEST-DONE", 10)
    assert vm.state == "exited" and vm.exit_status == -9
