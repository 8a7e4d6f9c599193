"""The runner's pieces that need no servers: scenarios as the runner finds them, settings,
and how a row's failure is kept (the run goes on, the report says why)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.bench import runner
from engine.bench.core import OURS, Measure
from engine.bench.results import GROUPS


def test_every_scenario_module_is_what_the_runner_expects() -> None:
    quick = SimpleNamespace(quick=True)
    full = SimpleNamespace(quick=False)
    for name in runner.SCENARIOS:
        s = runner.load_scenario(name)
        assert s.NAME == name
        assert s.GROUP in GROUPS  # the report knows the section, and orders it
        assert set(s.PEERS) <= set(runner.DEFAULT_PEERS)
        assert 0 < s.rows(quick) <= s.rows(full)  # type: ignore[arg-type]


def test_an_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="the scenarios are: seq-read, rand-read"):
        runner.load_scenario("bogus")


def test_quick_settings_are_smaller_and_explicit_values_win(tmp_path: Path) -> None:
    q = runner.Settings.for_mode(True, out=tmp_path, work=tmp_path, only=None, pairs=None)
    full = runner.Settings.for_mode(False, out=tmp_path, work=tmp_path)
    assert q.quick and q.disk_size < full.disk_size and q.pairs < full.pairs and q.seconds < full.seconds
    assert tuple(q.only) == tuple(runner.SCENARIOS)
    mine = runner.Settings.for_mode(True, out=tmp_path, work=tmp_path, pairs=5, disk_size=128 << 20)
    assert (mine.pairs, mine.disk_size) == (5, 128 << 20)


def _context(tmp_path: Path, missing: dict[str, str] | None = None) -> runner.Context:
    settings = runner.Settings.for_mode(True, out=tmp_path, work=tmp_path)
    logs: list[str] = []
    ctx = runner.Context(settings, tmp_path / "img", {"size": 1 << 20}, tmp_path / "repo", "p", "d0",
                         ours=None, missing=missing or {}, log=logs.append)  # type: ignore[arg-type]
    ctx.logs = logs  # type: ignore[attr-defined]
    return ctx


def test_a_failing_run_becomes_the_rows_error_and_the_run_goes_on(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    row = ctx.row("x/1", "x", "random reads", "IOPS", "higher", {"client": "test"})

    def broken() -> Measure:
        raise ConnectionResetError("the server closed the connection")

    out = ctx.measure(row, {OURS: lambda: Measure(5.0), "ganesha": broken})
    assert out is row
    assert row.error == "ConnectionResetError: the server closed the connection"
    assert any("x/1 failed" in line for line in ctx.logs)  # type: ignore[attr-defined]
    assert row.to_json()["error"] == row.error


def test_rows_carry_the_shared_conditions_and_the_missing_peers(tmp_path: Path) -> None:
    ctx = _context(tmp_path, {"borg": "not installed: python -m engine.bench.peers install borg"})
    row = ctx.row("x/2", "x", "random reads", "IOPS", "higher", {"queue_depth": 16}, peers=("ganesha", "borg"))
    assert row.conditions["queue_depth"] == 16
    assert row.conditions["event_loop"] == "uvloop"
    assert row.conditions["blockmap"] in ("cython", "pure")
    assert row.missing == {"borg": "not installed: python -m engine.bench.peers install borg"}


def test_warmup_runs_each_system_once_untimed(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    calls: list[str] = []
    row = ctx.row("x/3", "x", "sequential reads", "MB/s", "higher", {})
    ctx.measure(row, {OURS: lambda: calls.append("a") or 1.0, "local": lambda: calls.append("b") or 2.0},
                warmup=True)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert [len(s.values) for s in row.results.values()] == [2, 2]
