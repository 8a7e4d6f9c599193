"""Crashes: a subprocess owns the WriteCache and is SIGKILLed, between requests or in the
middle of one. After each crash the cache is opened again: every write acknowledged as
stable or covered by an acknowledged commit reads back; every other byte is either
durable or from an unstable write that no commit covered (hypothesis state machine).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from engine.writecache import WriteCache
from tests.writecache.model import DiskModel, pattern
from tests.writecache.strategies import lengths, offsets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Owner:
    """The owner subprocess and its pipe."""

    def __init__(self, repo: str, cache: str, mode: str, granule: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.writecache.owner", repo, cache, mode, str(granule)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.verifier = self._reply()["ready"]

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the owner process died (exit {self.proc.poll()})"
        return json.loads(line)

    def send(self, **req) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def call(self, **req) -> dict:
        self.send(**req)
        reply = self._reply()
        assert "error" not in reply, reply
        return reply

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except BrokenPipeError:
                    pass


def make_machine(backup_repo):
    image = backup_repo.image
    size = len(image)
    repo = str(backup_repo.root)

    class CrashMachine(RuleBasedStateMachine):
        @initialize(granule=st.sampled_from([4096, 65536]))
        def start(self, granule):
            self.dir = tempfile.mkdtemp(prefix="wc-crash-")
            self.cache = os.path.join(self.dir, "c")
            self.granule = granule
            self.owner = Owner(repo, self.cache, "create", granule)
            self.model = DiskModel(image)
            self.offsets = offsets(size, granule)
            self.lengths = lengths(granule)
            self.seed = 1000

        def teardown(self):
            if hasattr(self, "owner"):
                self.owner.kill()
                shutil.rmtree(self.dir, ignore_errors=True)

        def _write_args(self, data) -> tuple[int, int, int]:
            off = data.draw(self.offsets, label="offset")
            n = min(data.draw(self.lengths, label="length"), size - off)
            self.seed += 1
            return off, n, self.seed

        @rule(data=st.data(), stable=st.booleans())
        def write(self, data, stable):
            off, n, seed = self._write_args(data)
            assert self.owner.call(op="write", off=off, len=n, seed=seed, stable=stable) == {"ok": True}
            self.model.write(off, pattern(seed, n), stable)

        @rule()
        def commit(self):
            assert self.owner.call(op="commit") == {"ok": True}
            self.model.commit()

        @rule(data=st.data())
        def read(self, data):
            import hashlib

            off = data.draw(self.offsets, label="offset")
            n = data.draw(self.lengths, label="length")
            got = self.owner.call(op="read", off=off, len=n)["sha"]
            assert got == hashlib.sha256(self.model.read(off, n)).hexdigest()

        def _recover(self) -> None:
            old = self.owner.verifier
            base = backup_repo.disk()
            with WriteCache.open(self.cache, base) as wc:
                self.model.check_after_crash(wc.read(0, size))
            self.owner = Owner(repo, self.cache, "open", self.granule)
            assert self.owner.verifier != old

        @rule()
        def crash(self):
            self.owner.kill()
            self._recover()

        @rule(data=st.data(), stable=st.booleans(), delay=st.sampled_from([0, 0.001, 0.005]))
        def crash_during_write(self, data, stable, delay):
            """Kill while a write (and maybe its commit) is in progress: it may or may not land."""
            off, n, seed = self._write_args(data)
            self.owner.send(op="write", off=off, len=n, seed=seed, stable=stable)
            time.sleep(delay)
            self.owner.kill()
            self.model.write(off, pattern(seed, n), False)
            self._recover()

        @rule(data=st.data())
        def crash_during_commit(self, data):
            self.owner.send(op="commit")
            time.sleep(data.draw(st.sampled_from([0, 0.001])))
            self.owner.kill()
            self._recover()

    return CrashMachine


def test_crashes_keep_committed_writes(backup_repo):
    machine = make_machine(backup_repo)
    machine.TestCase.settings = settings(
        max_examples=12, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()


@pytest.mark.slow
def test_crashes_keep_committed_writes_long(backup_repo):
    machine = make_machine(backup_repo)
    machine.TestCase.settings = settings(
        max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()
