"""A published disk against a bytearray model, through a real daemon subprocess.

hypothesis drives WRITEs at any offset and length (unaligned, across granules and 1 MiB
blocks, over dirty/clean edges) with any stability, READs, COMMITs, clean restarts
(SIGTERM) and crashes (SIGKILL). After a crash every write acknowledged FILE_SYNC or
DATA_SYNC, or covered by a COMMIT that returned, reads back; a byte may differ from the
durable model only where an UNSTABLE write since the last COMMIT put that value, and
the write verifier changes.
"""
from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from engine.nfs.client import NFSClient
from engine.nfs.nfs3_types import NFSPROC3, COMMIT3args, WRITE3args, nfs_fh3
from tests.nfs.conftest import Daemon, give_address, take_address

BLOCK = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_disk_against_a_model_with_restarts_and_crashes(images, tmp_path):
    d = images["disks"][1]
    size = d["size"]
    base = np.frombuffer(images["data"][1], dtype=np.uint8)
    addr = take_address()
    counter = [0]

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            counter[0] += 1
            self.cache = tmp_path / f"model-{counter[0]}"
            self.dmn = Daemon(images["repo"], self.cache, addr).start()
            self.dmn.api("POST", "/sessions", {"point": images["point"], "name": "m"})
            self.loop = asyncio.new_event_loop()
            self.current = base.copy()  # what reads must return now
            self.durable = base.copy()  # what a crash must keep
            self.unstable: list[tuple[int, np.ndarray]] = []  # UNSTABLE writes since the last COMMIT
            self.verf: bytes | None = None
            self._connect()

        def _run(self, coro: Any) -> Any:
            return self.loop.run_until_complete(coro)

        def _connect(self) -> None:
            async def go() -> tuple[NFSClient, bytes]:
                c = await NFSClient.connect(self.dmn.addr, self.dmn.mount_port, self.dmn.nfs_port)
                sess = await c.mount("/instantnfs/m")
                return c, await c.lookup(sess, f"{d['name']}.img")
            self.client, self.fh = self._run(go())

        def _close(self) -> None:
            self._run(self.client.close())

        @rule(data=st.data(), stable=st.sampled_from([0, 0, 1, 2]))
        def write(self, data: Any, stable: int) -> None:
            near = data.draw(st.sampled_from([0, 4096, BLOCK, 2 * BLOCK, size - 1]))
            off = max(0, min(size - 1, near + data.draw(st.integers(-9000, 9000))))
            n = data.draw(st.integers(1, min(3 * 4096 + 100, size - off)))
            payload = np.frombuffer(os.urandom(n), dtype=np.uint8)
            r = self._run(self.client.call(NFSPROC3.WRITE, WRITE3args(nfs_fh3(self.fh), off, n, stable, payload.tobytes())))
            assert r.body.count == n and r.body.committed == (0 if stable == 0 else 2)
            if self.verf is None:
                self.verf = r.body.verf
            assert r.body.verf == self.verf
            self.current[off : off + n] = payload
            if stable:
                # a stable write makes itself durable (RFC 1813), not the UNSTABLE writes
                # before it: those wait for a COMMIT
                self.durable[off : off + n] = payload
            else:
                self.unstable.append((off, payload))

        @rule()
        def commit(self) -> None:
            r = self._run(self.client.call(NFSPROC3.COMMIT, COMMIT3args(nfs_fh3(self.fh), 0, 0)))
            assert self.verf is None or r.body.verf == self.verf
            self.durable[:] = self.current
            self.unstable = []

        @rule(data=st.data())
        def read(self, data: Any) -> None:
            off = data.draw(st.integers(0, size - 1))
            n = data.draw(st.integers(1, 3 * BLOCK))
            got, _ = self._run(self.client.read(self.fh, off, n))
            assert len(got) == min(n, BLOCK, size - off)  # rtmax is 1 MiB: a longer READ is cut
            assert got == self.current[off : off + len(got)].tobytes()

        @rule()
        def restart(self) -> None:
            self._close()
            self.dmn.stop()  # SIGTERM: the caches are committed on the way out
            self.dmn.start()
            self._connect()
            self.durable[:] = self.current
            self.unstable = []
            self.verf = self._new_verifier()

        @rule()
        def crash(self) -> None:
            self._close()
            assert self.dmn.proc is not None
            os.kill(self.dmn.proc.pid, signal.SIGKILL)
            self.dmn.proc.wait(10)
            self.dmn.proc = None
            self.dmn.start()
            self._connect()
            got = np.frombuffer(self._run(self.client.read_all(self.fh)), dtype=np.uint8)
            ok = got == self.durable
            for off, payload in self.unstable:
                ok[off : off + len(payload)] |= got[off : off + len(payload)] == payload
            bad = np.flatnonzero(~ok)
            assert not len(bad), f"{len(bad)} bytes differ from every allowed value, first at {bad[0]}"
            self.current = got.copy()
            self.durable = got.copy()
            self.unstable = []
            self.verf = self._new_verifier()

        def _new_verifier(self) -> bytes:
            old = self.verf
            r = self._run(self.client.call(NFSPROC3.COMMIT, COMMIT3args(nfs_fh3(self.fh), 0, 0)))
            assert old is None or r.body.verf != old  # a new daemon: a new verifier
            return r.body.verf

        @invariant()
        def alive(self) -> None:
            assert self.dmn.proc is not None and self.dmn.proc.poll() is None

        def teardown(self) -> None:
            try:
                self._close()
            finally:
                self.dmn.stop()
                self.loop.close()

    try:
        run_state_machine_as_test(Machine, settings=settings(max_examples=8, stateful_step_count=25, deadline=None,
                                                             suppress_health_check=list(HealthCheck)))
    finally:
        give_address(addr)
