"""Shared test fixtures.

``require_tool(name)``: a test that needs an external program (qemu-img, nfs-ls, ...)
skips locally with the reason when it is missing, and fails under ``CI=true``: a skip
in CI is a failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            msg = f"{name} is not installed (bash scripts/system-deps.sh test installs it)"
            if IN_CI:
                pytest.fail(msg + " -- CI=true: missing tools fail, never skip")
            pytest.skip(msg)


def require(condition: bool, reason: str) -> None:
    """Skip locally, fail under CI=true, when ``condition`` is false."""
    if not condition:
        if IN_CI:
            pytest.fail(reason + " -- CI=true: this test must run")
        pytest.skip(reason)


@contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "4m") mounted at the new directory ``mnt``, for tests of
    full volumes; needs root (skipped locally, failed under CI=true, without it)."""
    mnt.mkdir()
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001
    """Under CI=true a skip, however it was made, is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a skip in CI is a failure): {report.longrepr}"
