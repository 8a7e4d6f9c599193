"""Reading the rows of a results dict: groups, systems, medians, ratios, verdicts, status.

The input is the dict the runner writes (``results.json``, schema 1); what is read here:
``rows``, each ``core.Row.to_json()``, and ``peers`` (name -> ``installed``, ``version``,
``install``), whose order is the order systems are shown in after instantnfs. Every
function is a pure function of that dict or of one row, for the report and the plots
alike.

What it assumes of a row: ``results`` has ``instantnfs`` first when it has a figure; a
ratio above 1 always means instantnfs is better (``core.ratio``), whatever the unit and
direction; ``verdict`` is ``core.Row.verdict()`` (recomputed here when absent).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from engine.bench import core
from engine.bench.core import OURS
from engine.bench.units import first_line, fmt_percent

# The scenario table, in its order; groups a later issue adds come after these.
GROUPS = (
    "sequential reads",
    "random reads",
    "GETATTR latency",
    "writes",
    "many VMs",
    "publish to first byte",
    "backup ingest",
    "file-level recovery",
    "daemon memory",
    # the recovery product (issue 13)
    "backup verification",
    "live migrate",
    "VM boot",
    "VM boot: disk I/O replay",
    "sandboxes",
)

CLIENT_BOUND_MARK = "⚠"
CLIENT_BOUND_NOTE = (
    "the load generator's own CPU was the bottleneck in at least one run: the server "
    "may do better than this figure says."
)

# Stable colours: a system keeps its colour across groups, runs and reports.
COLOURS = {
    OURS: "#1f77b4",
    "ganesha": "#ff7f0e",
    "borg": "#2ca02c",
    "restic": "#d62728",
    "local": "#7f7f7f",
}
# Systems COLOURS does not name draw theirs from here, by a hash of the name.
PALETTE = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79")


def _rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(results.get("rows") or [])


def groups(results: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The rows by group: the issue's groups first, in its order, then others as they come."""
    by: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(results):
        by.setdefault(row.get("group") or "other", []).append(row)
    order = [g for g in GROUPS if g in by] + [g for g in by if g not in GROUPS]
    return [(g, by[g]) for g in order]


def systems(results: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Systems in a stable order: instantnfs, then the peers as results["peers"] lists them."""
    seen: list[str] = []
    for row in rows:
        for name in list(row.get("results") or {}) + list(row.get("missing") or {}):
            if name not in seen:
                seen.append(name)
    known = [OURS] + [p for p in (results.get("peers") or {}) if p != OURS]
    return [s for s in known if s in seen] + [s for s in seen if s not in known]


def _median(row: Mapping[str, Any], system: str) -> float | None:
    r = (row.get("results") or {}).get(system)
    return None if r is None else float(r["median"])


def ratio(row: Mapping[str, Any], peer: str) -> float | None:
    """Ours against ``peer`` (> 1: instantnfs better): the stored ratio, else from the medians."""
    stored = row.get("ratios") or {}
    if peer in stored:
        return stored[peer]
    ours, theirs = _median(row, OURS), _median(row, peer)
    if ours is None or theirs is None:
        return None
    return core.ratio(ours, theirs, row.get("better", "higher"))


def verdict(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored verdict, or ``core.Row.verdict()``'s answer when the row has none."""
    if "verdict" in row:
        return row["verdict"]
    goal = row.get("goal")
    ours = _median(row, OURS)
    if not goal or ours is None:
        return None
    if goal.get("peer") is not None and goal.get("ratio") is not None:
        peer = _median(row, goal["peer"])
        if peer is None:
            return {"met": None, "why": f"{goal['peer']} not measured"}
        target = goal["ratio"] * peer
    elif goal.get("absolute") is not None:
        target = goal["absolute"]
    else:
        return None
    met = ours >= target if row.get("better") == "higher" else ours <= target
    return {"met": met, "target": target, "ours": ours, "of_target": (ours / target) if target else None}


def missed_by(row: Mapping[str, Any]) -> float | None:
    """How far (percent) ours is from the goal's target; None when the goal is met or not judged."""
    v = verdict(row)
    if not v or v.get("met") is not False:
        return None
    of = v.get("of_target")
    if of is None:
        return math.inf
    return (1 - of) * 100 if row.get("better") == "higher" else (of - 1) * 100


def client_bound(row: Mapping[str, Any], system: str) -> bool:
    """Whether any of ``system``'s runs in ``row`` says the load generator was the bottleneck."""
    r = (row.get("results") or {}).get(system) or {}
    return any(bool(e.get("client_bound")) for e in r.get("extras") or [] if isinstance(e, Mapping))


def _peer_installed(results: Mapping[str, Any], peer: str) -> bool | None:
    info = (results.get("peers") or {}).get(peer)
    return None if info is None else bool(info.get("installed"))


def compared_peer(row: Mapping[str, Any]) -> str | None:
    """The goal's peer, or else the measured peer with the best median."""
    goal = row.get("goal") or {}
    if goal.get("peer"):
        return str(goal["peer"])
    peers = [p for p in (row.get("results") or {}) if p != OURS]
    if not peers:
        return None
    best = max if row.get("better", "higher") == "higher" else min
    return best(peers, key=lambda p: float(row["results"][p]["median"]))


def status(results: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The summary's last column: met / missed by N % / no goal / error / peer not installed."""
    if row.get("error"):
        return f"error: {first_line(row['error'])}"
    if OURS not in (row.get("results") or {}):
        return "no figure"
    goal = row.get("goal")
    if not goal:
        return "no goal"
    peer = goal.get("peer")
    if peer and peer not in row["results"]:
        if _peer_installed(results, peer) is False:
            return "peer not installed"
        why = (row.get("missing") or {}).get(peer) or "not measured"
        return f"{peer}: {first_line(why)}"
    v = verdict(row)
    if not v or v.get("met") is None:
        return "not judged"
    if v["met"]:
        return "met"
    off = missed_by(row)
    return "missed" if off is None or not math.isfinite(off) else f"missed by {fmt_percent(off)}"
