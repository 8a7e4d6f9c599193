"""What every benchmark scenario shares: samples, alternation, goals, rows and targets.

A *row* is one figure measured for several systems (instantnfs and its peers) under
stated conditions. Systems are measured alternately (A B A B ...), never all runs of one
and then all runs of the other, so that a burst of other work on a shared machine lands
on both: ratios of medians hold where single figures move 2x.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

OURS = "instantnfs"


@dataclass
class Measure:
    """One run's figure, with what else the run saw (client CPU, bytes moved, ...)."""

    value: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Samples:
    """The figures of every run of one system in one row."""

    values: list[float] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)

    def add(self, m: Measure | float) -> None:
        if isinstance(m, Measure):
            self.values.append(float(m.value))
            self.extras.append(m.extra)
        else:
            self.values.append(float(m))
            self.extras.append({})

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.values, "median": self.median, "min": self.low, "max": self.high}
        if any(self.extras):
            out["extras"] = self.extras
        return out


@dataclass
class Goal:
    """What a row should reach: ``ratio`` times ``peer``'s median, or an ``absolute`` figure.

    For a "higher is better" row the goal is met when ours >= ratio x peer (or >= absolute);
    for "lower is better" when ours <= ratio x peer (or <= absolute).
    """

    text: str
    peer: str | None = None
    ratio: float | None = None
    absolute: float | None = None


def alternate(
    systems: Mapping[str, Callable[[], Measure | float]],
    pairs: int,
    *,
    before: Callable[[str], None] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Samples]:
    """Run every system ``pairs`` times, in turn: round 1 runs A then B, round 2 B then A, ...

    The order flips every round so neither system always runs right after the other (a
    warm CPU cache, a just-finished compaction). ``before(name)`` runs before each run
    (dropping caches) and is not timed; ``progress(name, round)`` after each.
    A run that raises stops the row: the caller reports the error.
    """
    if pairs < 1:
        raise ValueError("pairs must be at least 1")
    names = list(systems)
    out = {n: Samples() for n in names}
    for r in range(pairs):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            if before is not None:
                before(n)
            out[n].add(systems[n]())
            if progress is not None:
                progress(n, r)
    return out


def ratio(ours: float, peer: float, better: str) -> float | None:
    """How many times better ours is than the peer (> 1 is better, whatever the unit)."""
    if ours <= 0 or peer <= 0:
        return None
    return ours / peer if better == "higher" else peer / ours


@dataclass
class Row:
    """One figure, for instantnfs and each peer, under stated conditions."""

    id: str
    title: str
    group: str
    unit: str
    better: str  # "higher" | "lower"
    conditions: dict[str, Any]
    goal: Goal | None = None
    results: dict[str, Samples] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # peer -> why it has no figure
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def verdict(self) -> dict[str, Any] | None:
        """Whether the goal is met, and by how much it is missed."""
        g = self.goal
        if g is None or OURS not in self.results:
            return None
        ours = self.results[OURS].median
        if g.peer is not None and g.ratio is not None:
            if g.peer not in self.results:
                return {"met": None, "why": f"{g.peer} not measured"}
            target = g.ratio * self.results[g.peer].median
        elif g.absolute is not None:
            target = g.absolute
        else:
            return None
        met = ours >= target if self.better == "higher" else ours <= target
        return {"met": met, "target": target, "ours": ours, "of_target": (ours / target) if target else None}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "group": self.group,
            "unit": self.unit,
            "better": self.better,
            "conditions": self.conditions,
            "goal": asdict(self.goal) if self.goal else None,
            "results": {k: v.to_json() for k, v in self.results.items()},
            "missing": self.missing,
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "verdict": self.verdict(),
        }
        ratios = {}
        if OURS in self.results:
            for peer, s in self.results.items():
                if peer != OURS:
                    ratios[peer] = ratio(self.results[OURS].median, s.median, self.better)
        out["ratios"] = ratios
        return out


class Timer:
    """``with Timer() as t: ...; t.seconds`` (monotonic, perf_counter resolution)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@dataclass(frozen=True)
class NfsTarget:
    """A file served over NFSv3: what a client needs to reach it.

    ``url`` is the ``nfs://`` URL QEMU takes (its driver asks the portmapper on port 111
    of ``host``). Clients that take ports directly use ``mount_port``/``nfs_port``.
    """

    host: str
    mount_port: int
    nfs_port: int
    export: str  # the MOUNT path, e.g. "/instantnfs"
    path: str  # the file's path under the export, e.g. "bench/disk0.img"
    size: int

    @property
    def url(self) -> str:
        return f"nfs://{self.host}{self.export.rstrip('/')}/{self.path}"


@dataclass(frozen=True)
class FileTarget:
    """A file read through the local file system (the local disk, or a FUSE mount)."""

    path: str
    size: int

    @property
    def url(self) -> str:
        return self.path


Target = NfsTarget | FileTarget

# what a row measures: system name -> one run, returning its figure
Systems = dict[str, Callable[[], Measure | float]]
