"""Shared test fixtures.

``require_tool(name)``: a test that needs an external program (qemu-img, nfs-ls, ...)
skips locally with the reason when it is missing, and fails under ``CI=true``: a skip
in CI is a failure.
"""
from __future__ import annotations

import os
import shutil

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


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    if IN_CI:
        for item in items:
            for mark in item.iter_markers("skip"):
                item.add_marker(pytest.mark.xfail(reason="skip marker under CI", strict=True))


def pytest_runtest_logreport(report):
    if IN_CI and report.skipped and report.when in ("setup", "call") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a skip in CI is a failure): {report.longrepr}"
