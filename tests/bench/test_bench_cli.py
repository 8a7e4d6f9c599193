"""``instantnfs bench`` as a user runs it: the quick run end to end, and its option errors.

The quick run is what CI runs: every instantnfs scenario but the two that boot the test
guest many times (``boot``, ``sandboxes``: minutes of TCG boots) must produce a figure, and the
report and plots must be written. No figure's size is asserted anywhere (speed is
measured in bench/, never in tests). Peers are measured only where installed; CI
installs none, and a missing peer is a line in the report, not a skip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench import runner
from tests.conftest import require, require_tool

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.control.cli", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_help_names_every_scenario_and_peer() -> None:
    r = _run(["--help"])
    assert r.returncode == 0
    for name in (*runner.SCENARIOS, *runner.DEFAULT_PEERS, "--quick", "--install-peers", "--out"):
        assert name in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--only", "seq-read,bogus"], "unknown scenario bogus; choose from seq-read"),
    (["--peers", "nfsd"], "unknown peer nfsd; choose from ganesha"),
    (["--size", "1M"], "at least 64M"),
])
def test_bad_options_say_what_is_allowed(args: list[str], message: str) -> None:
    r = _run(args)
    assert r.returncode == 2
    assert message in r.stderr


def test_python_m_engine_bench_is_the_same_command() -> None:
    r = subprocess.run([sys.executable, "-m", "engine.bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: instantnfs bench" in r.stdout


@pytest.mark.slow
def test_quick_run_writes_a_figure_for_every_scenario_and_the_report(tmp_path: Path) -> None:
    require_tool("qemu-img")
    require_tool("qemu-system-x86_64", "qemu-io")  # migrate runs a VM; boot-trace boots the test guest once
    require_tool("sfdisk", "mkfs.ext4", "mcopy", "syslinux")  # the test guest's builder
    require(os.access("/bin/busybox", os.X_OK), "busybox-static is missing (bash scripts/system-deps.sh test)")
    require_tool("unshare")
    out = tmp_path / "out"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nafter\n")
    env = dict(os.environ, INSTANTNFS_BENCH_CACHE=str(tmp_path / "cache"))
    # every scenario but the two that boot the test guest many times (minutes of TCG boots;
    # run by hand: instantnfs bench --quick --only boot,sandboxes); boot-trace boots it once
    # (about a minute), which proves the guest's backup, the trace and the replay work
    chosen = [n for n in runner.SCENARIOS if n not in runner.BOOTS or n == "boot-trace"]
    r = _run(["--quick", "--only", ",".join(chosen), "--out", str(out), "--work", str(tmp_path / "work"),
              "--update-readme", str(readme)], timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["machine"]["cores"] >= 1
    assert len(results["machine"]["load_after"]) == 3
    seen: dict[str, int] = {}
    for row in results["rows"]:
        assert row["error"] is None, row
        ours = row["results"]["instantnfs"]
        assert ours["median"] > 0 and len(ours["samples"]) == results["settings"]["pairs"], row["id"]
        seen[row["id"].split("/")[0]] = seen.get(row["id"].split("/")[0], 0) + 1
    assert set(seen) == set(chosen), seen
    # every peer is accounted for: measured, or named with the command that installs it
    for name in runner.DEFAULT_PEERS:
        st = results["peers"][name]
        assert st["installed"] or st["install"]
    assert results["peers"]["local"]["installed"] is True
    assert any("local" in row["results"] for row in results["rows"])
    report = (out / "report.md").read_text()
    for row in results["rows"]:
        assert row["title"] in report
    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) == len({row["group"] for row in results["rows"]})  # one plot per group
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- bench:begin -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "\nold\n" not in text and "instantnfs bench --quick" in text  # replaced ("cold" rows contain "old")
    assert not (tmp_path / "work").exists()  # the scratch space is removed after the run
