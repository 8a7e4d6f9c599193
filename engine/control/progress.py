"""Progress bars for long operations: on a terminal only, never in --json output."""
from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


class Progress:
    """A byte-counting progress bar (MB/s and ETA) on stderr, or nothing."""

    def __init__(self, desc: str, enabled: bool | None = None) -> None:
        self.desc = desc
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar: tqdm | None = None

    def start(self, total: int) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        self._bar = tqdm(
            total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024,
            dynamic_ncols=True, file=sys.stderr, leave=False, smoothing=0.1,
        )
        return self._bar.update

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
