"""The model the write cache is held against: a bytearray and what durability allows.

``content`` is the disk as the client last wrote it. ``durable`` is what must survive a
crash: the content at the last commit plus every stable write since. ``uncovered`` are
the unstable writes since the last commit: after a crash each byte must equal
``durable`` or the byte of one of them (NFSv3: the verifier changed, clients resend).
"""
from __future__ import annotations

import numpy as np


def pattern(seed: int, length: int) -> bytes:
    """Reproducible, position-dependent bytes (a misplaced write shows)."""
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


class DiskModel:
    def __init__(self, image: bytes) -> None:
        self.content = np.frombuffer(bytearray(image), dtype=np.uint8)
        self.durable = self.content.copy()
        self.uncovered: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes, stable: bool) -> None:
        arr = np.frombuffer(data, dtype=np.uint8)
        self.content[offset : offset + len(data)] = arr
        if stable:
            self.durable[offset : offset + len(data)] = arr
        else:
            self.uncovered.append((offset, data))

    def commit(self) -> None:
        self.durable = self.content.copy()
        self.uncovered = []

    def read(self, offset: int, length: int) -> bytes:
        return self.content[offset : offset + length].tobytes()

    def check_after_crash(self, actual: bytes) -> None:
        """Assert ``actual`` is a state a crash may leave; it becomes the new model."""
        got = np.frombuffer(actual, dtype=np.uint8)
        assert len(got) == len(self.content)
        ok = got == self.durable
        for offset, data in self.uncovered:
            ok[offset : offset + len(data)] |= got[offset : offset + len(data)] == np.frombuffer(data, dtype=np.uint8)
        bad = np.flatnonzero(~ok)
        assert len(bad) == 0, (
            f"{len(bad)} bytes after the crash are neither durable nor from an uncommitted write, "
            f"first at {int(bad[0])}: got {int(got[bad[0]])}, durable {int(self.durable[bad[0]])}"
        )
        self.content = got.copy()
        self.durable = got.copy()
        self.uncovered = []
