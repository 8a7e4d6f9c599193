"""Export: raw (sparse) and qcow2, of a quiet disk and of one being written to."""
from __future__ import annotations

import os
import subprocess
import threading

import numpy as np
import pytest

from engine.errors import UsageError
from engine.export import export_disk
from engine.writecache import WriteCache
from tests.conftest import require_tool
from tests.writecache.model import pattern


def test_export_raw_is_sparse_and_exact(backup_repo, tmp_path):
    base = backup_repo.disk()
    expected = bytearray(backup_repo.image)
    with WriteCache.temporary(base, tmp_path) as wc:
        for i, off in enumerate([0, 5000, 3 << 20, wc.size - 777]):
            data = pattern(i, min(70000, wc.size - off))
            wc.write(off, data)
            expected[off : off + len(data)] = data
        # zeros written over data must be exported as zeros
        wc.write(6 << 20, bytes(300000))
        expected[6 << 20 : (6 << 20) + 300000] = bytes(300000)
        seen = []
        res = export_disk(wc, tmp_path / "out.raw", progress=lambda *a: seen.append(a))
    out = tmp_path / "out.raw"
    assert out.read_bytes() == bytes(expected)
    assert res.size == len(expected) and res.format == "raw"
    assert seen and seen[-1][0] == "final"
    assert [s for s in seen if s[0] == "copy"][-1][1:] == (len(expected), len(expected))
    # a quarter of the image's blocks are zero, and an eighth more are half zero
    assert os.stat(out).st_blocks * 512 < len(expected) * 0.8
    assert not (tmp_path / "out.raw.part").exists()


def test_export_of_backup_disk(backup_repo, tmp_path):
    res = export_disk(backup_repo.disk(), tmp_path / "b.raw")
    assert (tmp_path / "b.raw").read_bytes() == backup_repo.image
    assert res.passes == 1


def test_export_bad_format(backup_repo, tmp_path):
    with pytest.raises(UsageError):
        export_disk(backup_repo.disk(), tmp_path / "x", "vmdk")


class Writer(threading.Thread):
    """One thread writing scattered patterns, recording each write in order."""

    def __init__(self, wc: WriteCache) -> None:
        super().__init__(daemon=True)
        self.wc = wc
        self.log: list[tuple[int, bytes]] = []
        self.done = 0
        self.stop = threading.Event()
        self.progress = threading.Condition()
        self.rng = np.random.default_rng(5)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            off = int(self.rng.integers(0, self.wc.size - 1))
            n = min(int(self.rng.integers(1, 40000)), self.wc.size - off)
            data = pattern(10_000 + i, n)
            self.log.append((off, data))
            self.wc.write(off, data, stable=i % 16 == 0)
            with self.progress:
                self.done += 1
                self.progress.notify_all()

    def wait_for(self, count: int) -> None:
        with self.progress:
            self.progress.wait_for(lambda: self.done >= count or not self.is_alive(), timeout=60)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_while_writing_equals_disk_at_the_end(backup_repo, tmp_path, fmt):
    if fmt == "qcow2":
        require_tool("qemu-img")
    base = backup_repo.disk()
    with WriteCache.temporary(base, tmp_path) as wc:
        writer = Writer(wc)
        at_final: list[int] = []

        def progress(phase, done, total):
            if phase == "copy":
                # let the writer land a few writes during every step of pass 1
                writer.wait_for(writer.done + 3)
            elif phase == "final" and not at_final:
                at_final.append(wc.writes)  # writes are paused: this count is exact

        writer.start()
        out = tmp_path / f"out.{fmt}"
        res = export_disk(wc, out, fmt, progress=progress, chunk=256 << 10)
        writer.stop.set()
        writer.join()
        final = wc.read(0, wc.size)
    assert at_final, "the export never ran its final pass"
    k = at_final[0]
    assert k < len(writer.log), "no write happened after the export: the test proves nothing"
    expected = bytearray(backup_repo.image)
    for off, data in writer.log[:k]:
        expected[off : off + len(data)] = data
    assert bytes(expected) != final
    assert res.passes >= 2 and res.recopied_bytes > 0
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(expected))
    if fmt == "raw":
        assert out.read_bytes() == bytes(expected)
    else:
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        info = subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True, text=True, check=True)
        assert '"format": "qcow2"' in info.stdout


def test_qcow2_export_compares_with_expected(backup_repo, tmp_path):
    require_tool("qemu-img")
    base = backup_repo.disk()
    expected = bytearray(backup_repo.image)
    with WriteCache.temporary(base, tmp_path, granule=512) as wc:
        for i in range(50):
            off = (i * 333_333) % (wc.size - 5000)
            data = pattern(i, 4999)
            wc.write(off, data)
            expected[off : off + 4999] = data
        export_disk(wc, tmp_path / "o.qcow2", "qcow2")
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(expected))
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(tmp_path / "o.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # and a byte changed in the expectation must make qemu-img compare fail
    expected[12345] ^= 0xFF
    raw.write_bytes(bytes(expected))
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(tmp_path / "o.qcow2")], capture_output=True, text=True)
    assert r.returncode == 1
