"""The suite's own arithmetic: alternation order, medians, ratios, goals, rows."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bench.core import OURS, Goal, Measure, Row, Samples, alternate, ratio


def test_alternate_flips_the_order_every_round() -> None:
    calls: list[str] = []
    before: list[str] = []

    def system(name: str, value: float):
        def run() -> Measure:
            calls.append(name)
            return Measure(value + len(calls), {"n": len(calls)})
        return run

    out = alternate({"a": system("a", 0), "b": system("b", 100)}, 3, before=before.append)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert before == calls  # the hook runs before every run, in the same order
    assert out["a"].values == [1, 4, 5]
    assert out["b"].values == [102, 103, 106]
    assert [e["n"] for e in out["b"].extras] == [2, 3, 6]


def test_alternate_of_three_systems_reverses_the_whole_order() -> None:
    calls: list[str] = []
    alternate({n: (lambda n=n: calls.append(n) or 1.0) for n in "abc"}, 2)
    assert calls == ["a", "b", "c", "c", "b", "a"]


def test_alternate_needs_a_round() -> None:
    with pytest.raises(ValueError):
        alternate({"a": lambda: 1.0}, 0)


def test_a_failing_run_propagates() -> None:
    def boom() -> float:
        raise RuntimeError("server went away")

    with pytest.raises(RuntimeError, match="went away"):
        alternate({"a": lambda: 1.0, "b": boom}, 2)


@given(st.lists(st.floats(min_value=0.001, max_value=1e9, allow_nan=False), min_size=1, max_size=30))
def test_samples_median_and_range_against_sorting(values: list[float]) -> None:
    s = Samples()
    for v in values:
        s.add(v)
    ordered = sorted(values)
    n = len(ordered)
    expect = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    assert s.median == pytest.approx(expect)
    assert (s.low, s.high) == (ordered[0], ordered[-1])
    j = s.to_json()
    assert j["samples"] == values and j["min"] == ordered[0] and j["max"] == ordered[-1]


def test_ratio_is_always_ours_better_above_one() -> None:
    assert ratio(200.0, 100.0, "higher") == 2.0  # twice the throughput
    assert ratio(2.0, 4.0, "lower") == 2.0  # half the latency
    assert ratio(4.0, 2.0, "lower") == 0.5
    assert ratio(0.0, 2.0, "higher") is None


def _row(better: str, ours: list[float], peer: list[float] | None, goal: Goal | None) -> Row:
    r = Row("x/y", "x", "g", "IOPS", better, {"client": "test"}, goal)
    r.results[OURS] = Samples()
    for v in ours:
        r.results[OURS].add(v)
    if peer is not None:
        r.results["ganesha"] = Samples()
        for v in peer:
            r.results["ganesha"].add(v)
    return r


def test_verdict_against_a_peer() -> None:
    met = _row("higher", [150, 160, 170], [100, 100, 100], Goal("≥ 1.5× Ganesha", peer="ganesha", ratio=1.5))
    assert met.verdict() == {"met": True, "target": 150.0, "ours": 160.0, "of_target": pytest.approx(160 / 150)}
    missed = _row("higher", [100], [100], Goal("≥ 1.5× Ganesha", peer="ganesha", ratio=1.5))
    v = missed.verdict()
    assert v is not None and v["met"] is False and v["of_target"] == pytest.approx(100 / 150)
    absent = _row("higher", [100], None, Goal("≥ 1.5× Ganesha", peer="ganesha", ratio=1.5))
    assert absent.verdict() == {"met": None, "why": "ganesha not measured"}


def test_verdict_lower_is_better_and_absolute() -> None:
    assert _row("lower", [0.8], None, Goal("≤ 1 ms", absolute=1.0)).verdict()["met"] is True  # type: ignore[index]
    assert _row("lower", [1.2], None, Goal("≤ 1 ms", absolute=1.0)).verdict()["met"] is False  # type: ignore[index]
    assert _row("lower", [3.0], [2.0], Goal("≤ Ganesha", peer="ganesha", ratio=1.0)).verdict()["met"] is False  # type: ignore[index]
    assert _row("higher", [1.0], None, None).verdict() is None


def test_row_json_round_trips_and_carries_ratios() -> None:
    r = _row("higher", [300, 310], [100, 110], Goal("≥ 1.2× Ganesha", peer="ganesha", ratio=1.2))
    r.missing["borg"] = "not installed: apt-get install -y borgbackup"
    j = json.loads(json.dumps(r.to_json()))
    assert j["ratios"] == {"ganesha": pytest.approx(305 / 105)}
    assert j["results"][OURS]["median"] == 305
    assert j["missing"] == {"borg": "not installed: apt-get install -y borgbackup"}
    assert j["goal"] == {"text": "≥ 1.2× Ganesha", "peer": "ganesha", "ratio": 1.2, "absolute": None}
    assert j["verdict"]["met"] is True
