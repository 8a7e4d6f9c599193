"""Crashes: a subprocess owns the WriteCache and is SIGKILLed, between requests or in the
middle of one. After each crash the cache is opened again: every write acknowledged as
stable or covered by an acknowledged commit reads back; every other byte is either
durable or from an unstable write that no commit covered (hypothesis state machine).

SIGKILL keeps the page cache, so it cannot show a wrong fsync order. The power-loss
variant runs the owner on ``powerloss.PowerLossOS``: unsynced writes live only in the
process, a kill loses them all, and an armed power loss (at the n-th pwrite/fsync, so
also between a commit's data sync and its bitmap write) lets a random subset through.
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
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from engine.writecache import WriteCache
from tests.writecache.model import DiskModel, pattern
from tests.writecache.strategies import lengths, offsets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Owner:
    """The owner subprocess and its pipe."""

    def __init__(self, repo: str, cache: str, mode: str, granule: int, powerloss: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.writecache.owner", repo, cache, mode, str(granule)]
            + (["powerloss"] if powerloss else []),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.verifier = self._reply()["ready"]

    def _reply(self) -> dict:
        line = self.reply_or_death()
        assert line is not None, f"the owner process died (exit {self.proc.poll()})"
        return line

    def reply_or_death(self) -> dict | None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

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


def make_machine(backup_repo, powerloss: bool = False):
    image = backup_repo.image
    size = len(image)
    repo = str(backup_repo.root)

    class CrashMachine(RuleBasedStateMachine):
        @initialize(granule=st.sampled_from([4096, 65536]))
        def start(self, granule):
            self.dir = tempfile.mkdtemp(prefix="wc-crash-")
            self.cache = os.path.join(self.dir, "c")
            self.granule = granule
            self.owner = Owner(repo, self.cache, "create", granule, powerloss)
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
            self.owner = Owner(repo, self.cache, "open", self.granule, powerloss)
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

        if powerloss:

            @rule(data=st.data(), op=st.sampled_from(["write", "stable", "commit"]), after=st.integers(1, 6), seed=st.integers(0, 1 << 30))
            def power_fails_during(self, data, op, after, seed):
                """The power fails at the after-th pwrite/fsync of the next request."""
                assert self.owner.call(op="arm", after=after, seed=seed) == {"ok": True}
                if op == "commit":
                    self.owner.send(op="commit")
                else:
                    off, n, wseed = self._write_args(data)
                    self.owner.send(op="write", off=off, len=n, seed=wseed, stable=op == "stable")
                    self.model.write(off, pattern(wseed, n), False)  # may or may not land
                reply = self.owner.reply_or_death()
                if reply is None:
                    self.owner.proc.wait()
                    self._recover()
                    return
                assert reply == {"ok": True}
                assert self.owner.call(op="arm", after=-1, seed=0) == {"ok": True}
                if op == "commit":
                    self.model.commit()
                elif op == "stable":
                    # it was acknowledged: it is durable (the model holds it as uncovered
                    # above; make it durable now)
                    self.model.durable[off : off + n] = np.frombuffer(pattern(wseed, n), dtype=np.uint8)

    return CrashMachine


def test_crashes_keep_committed_writes(backup_repo):
    machine = make_machine(backup_repo)
    machine.TestCase.settings = settings(
        max_examples=10, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()


def test_power_loss_keeps_committed_writes(backup_repo):
    machine = make_machine(backup_repo, powerloss=True)
    machine.TestCase.settings = settings(
        max_examples=10, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()


@pytest.mark.slow
def test_power_loss_keeps_committed_writes_long(backup_repo):
    machine = make_machine(backup_repo, powerloss=True)
    machine.TestCase.settings = settings(
        max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()


@pytest.mark.slow
def test_crashes_keep_committed_writes_long(backup_repo):
    machine = make_machine(backup_repo)
    machine.TestCase.settings = settings(
        max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
    )
    machine.TestCase().runTest()


@pytest.mark.parametrize("op", ["commit", "stable"])
def test_power_loss_at_every_point_of_a_commit(backup_repo, tmp_path, op):
    """The power fails at each pwrite/fsync in turn (several writeback subsets each):
    what a completed commit covered survives, a dirty bit never shows missing data."""
    image = backup_repo.image
    size = len(image)
    repo = str(backup_repo.root)
    writes1 = [(5000, 20000), (1 << 20, 4096), (3 << 20, 300000)]
    writes2 = [(12000, 9000), (2 << 20, 70000), (5 << 20, 4097), (size - 3000, 3000)]
    points = 0
    for after in range(1, 8):  # a commit is 3 pwrite/fsync points, a stable write up to 6
        for seed in range(2):
            cache = str(tmp_path / f"c-{op}-{after}-{seed}")
            owner = Owner(repo, cache, "create", 4096, powerloss=True)
            model = DiskModel(image)
            for i, (off, n) in enumerate(writes1):
                assert owner.call(op="write", off=off, len=n, seed=i, stable=False) == {"ok": True}
                model.write(off, pattern(i, n), False)
            assert owner.call(op="commit") == {"ok": True}
            model.commit()
            for i, (off, n) in enumerate(writes2[:-1], 100):
                assert owner.call(op="write", off=off, len=n, seed=i, stable=False) == {"ok": True}
                model.write(off, pattern(i, n), False)
            assert owner.call(op="arm", after=after, seed=seed) == {"ok": True}
            off, n = writes2[-1]
            if op == "commit":
                owner.send(op="commit")
            else:
                owner.send(op="write", off=off, len=n, seed=999, stable=True)
                model.write(off, pattern(999, n), False)
            reply = owner.reply_or_death()
            owner.kill()  # a completed request: the power fails right after it
            if reply is not None and op == "commit":
                model.commit()
            elif reply is not None:
                # a stable write makes itself durable (RFC 1813 FILE_SYNC), not the
                # unstable writes before it: those wait for a COMMIT
                model.durable[off : off + n] = np.frombuffer(pattern(999, n), dtype=np.uint8)
            else:
                points += 1
            with WriteCache.open(cache, backup_repo.disk()) as wc:
                model.check_after_crash(wc.read(0, size))
            shutil.rmtree(cache)
    assert points >= 3, "the power never failed inside the request"
