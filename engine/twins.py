"""Which build runs: a Cython module, or its pure-Python twin (the readable specification).

The hot parts of the engine exist twice: compiled (``engine._blockmap``, ``engine._codec``,
``engine.nfs._wire``, and the builds of ``engine/nfs/fastlane.py`` and ``transport.py``)
and as Python that says the same thing plainly. ``INSTANTNFS_PURE=1`` runs every twin
(the test suite runs once each way); otherwise the compiled builds run, and a missing
build, or one older than the Python source it was compiled from, is an ``ImportError``
that says how to make it: never a silent fall back to the slow path.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

PURE = os.environ.get("INSTANTNFS_PURE") == "1"


@contextmanager
def required(name: str) -> Iterator[None]:
    """Around the import of compiled module ``name``: a missing build says how to make it."""
    try:
        yield
    except ImportError as e:  # pragma: no cover - depends on the build
        raise ImportError(
            f"{name} is not built: run 'python setup.py build_ext --inplace' (or scripts/setup.sh), "
            "or set INSTANTNFS_PURE=1 to run the pure-Python twins"
        ) from e


def not_older(mod: ModuleType, source: str) -> ModuleType:
    """``mod``, a build of the Python file ``source``, unless the file is newer than it
    (a stale build would run yesterday's code)."""
    built = mod.__file__ or source
    if os.path.getmtime(source) > os.path.getmtime(built):  # pragma: no cover - depends on the build
        raise ImportError(f"{mod.__name__} is older than {source}: rebuild it with "
                          "'python setup.py build_ext --inplace' (or scripts/setup.sh)")
    return mod
