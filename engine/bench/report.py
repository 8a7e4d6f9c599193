"""results.json to a report people read: ``report.md``, PNG plots and the README's section.

The input is the dict the runner writes (``results.json``, schema 1): the command, when
it ran and for how long, the machine and its load, the settings, the peers (installed or
not, and how to install them) and the rows, each ``core.Row.to_json()``. Nothing here
measures or runs anything; the report is a pure function of that dict, so a stored
results.json rebuilds the same report (and the tests check the builder on one).

What it assumes of a row: ``results`` has ``instantnfs`` first when it has a figure; a
ratio above 1 always means instantnfs is better (``core.ratio``), whatever the unit and
direction; ``verdict`` is ``core.Row.verdict()`` (recomputed here when absent). The
conditions the report knows and prints in this order (other keys follow as ``key value``):
``client``, ``transfer`` (bytes), ``qd``, ``connections``, ``sessions``, ``cache``,
``blockmap``, ``loop``; the last two default to the run's settings.

Numbers are written for people: IOPS and other counts per second with thousands
separators, byte rates and everything else with 3 significant digits (MB/s turns into
GB/s past 1000), latencies in ns/µs/ms/s, bytes in KiB/MiB/GiB/TiB. One cell's median,
min and max share the scale the median chose.

Plots need matplotlib (the ``bench`` extra). It is imported inside the plotting
function, so importing this module, rendering Markdown and updating the README work
without it; ``write_report`` refuses with the command that installs it before writing
anything. Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no
display, no pyplot global state.
"""
from __future__ import annotations

import math
import os
import re
import textwrap
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from engine.bench.core import OURS, ratio

# The scenario table, in its order; groups a later issue adds come after these.
GROUPS = (
    "sequential reads",
    "random reads",
    "GETATTR latency",
    "writes",
    "many VMs",
    "publish to first byte",
    "backup ingest",
    "daemon memory",
)

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

CLIENT_BOUND_MARK = "⚠"
CLIENT_BOUND_NOTE = (
    "the load generator's own CPU was the bottleneck in at least one run: the server "
    "may do better than this figure says."
)
NEED_MATPLOTLIB = "plots need matplotlib: pip install 'instantnfs[bench]'"

# Stable colours: a system keeps its colour across groups, runs and reports.
COLOURS = {
    OURS: "#1f77b4",
    "ganesha": "#ff7f0e",
    "borg": "#2ca02c",
    "restic": "#d62728",
    "local": "#7f7f7f",
}
_PALETTE = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79")


# ---------------------------------------------------------------- numbers for people


def fmt_number(x: float) -> str:
    """3 significant digits, thousands separators, no exponent: 1.234 -> "1.23", 12345 -> "12,345"."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    exp = math.floor(math.log10(abs(x)))
    digits = 2 - exp
    rounded = round(x, digits)
    if rounded != 0 and math.floor(math.log10(abs(rounded))) > exp:  # 9.996 -> 10.0, not 10.00
        digits -= 1
    return f"{x:,.{max(digits, 0)}f}"


def fmt_count(x: float) -> str:
    """A count or a count per second: 45210.4 -> "45,210"; below 100, 3 significant digits."""
    if abs(x) >= 100:
        return f"{round(x):,}"
    return fmt_number(x)


_BYTE_RATES = {"B/s": 1.0, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12}
_BYTE_RATE_LADDER = (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3), ("B/s", 1.0))
_BIN_RATES = {"KiB/s": 2.0**10, "MiB/s": 2.0**20, "GiB/s": 2.0**30}
_BIN_RATE_LADDER = (("GiB/s", 2.0**30), ("MiB/s", 2.0**20), ("KiB/s", 2.0**10))
_TIMES = {"ns": 1e-9, "µs": 1e-6, "μs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_TIME_LADDER = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))
_BYTES = {"B": 1.0, "bytes": 1.0, "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30, "TiB": 2.0**40}
_BYTE_LADDER = (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))


def _is_count(unit: str) -> bool:
    return unit in ("IOPS", "ops") or (unit.endswith("/s") and unit not in _BYTE_RATES and unit not in _BIN_RATES)


def scale(unit: str, reference: float) -> tuple[float, str, Callable[[float], str]]:
    """How to show figures in ``unit`` near ``reference``: (factor, shown unit, formatter).

    ``formatter(value * factor)`` is the number, followed by the shown unit.
    """
    def ladder(steps: tuple[tuple[str, float], ...], mult: float) -> tuple[float, str, Callable[[float], str]]:
        base = abs(reference) * mult
        for name, size in steps:
            if base >= size:
                return mult / size, name, fmt_number
        name, size = steps[-1]
        return mult / size, name, fmt_number

    if unit in _BYTE_RATES:
        return ladder(_BYTE_RATE_LADDER, _BYTE_RATES[unit])
    if unit in _BIN_RATES:
        return ladder(_BIN_RATE_LADDER, _BIN_RATES[unit])
    if unit in _TIMES:
        return ladder(_TIME_LADDER, _TIMES[unit])
    if unit in _BYTES:
        return ladder(_BYTE_LADDER, _BYTES[unit])
    if _is_count(unit):
        return 1.0, unit, fmt_count
    return 1.0, unit, fmt_number


def _join(number: str, unit: str) -> str:
    return f"{number} {unit}" if unit else number


def fmt_value(value: float, unit: str) -> str:
    """One figure: fmt_value(1450, "MB/s") -> "1.45 GB/s"; fmt_value(0.00018, "s") -> "180 µs"."""
    factor, shown, fmt = scale(unit, value)
    return _join(fmt(value * factor), shown)


def fmt_range(median: float, low: float, high: float, unit: str) -> str:
    """A median with its spread, on the median's scale: "1.45 (1.41–1.49) GB/s"."""
    factor, shown, fmt = scale(unit, median)
    return _join(f"{fmt(median * factor)} ({fmt(low * factor)}–{fmt(high * factor)})", shown)


def fmt_bytes(n: float) -> str:
    """A size: 4096 -> "4.00 KiB", 3 * 2**30 -> "3.00 GiB"."""
    return fmt_value(float(n), "B")


def fmt_size(n: int) -> str:
    """A size that is usually a round power of two: 4096 -> "4 KiB", 1048576 -> "1 MiB"."""
    for name, size in _BYTE_LADDER:
        if n >= size and n % int(size) == 0:
            return f"{n // int(size):,} {name}"
    return fmt_bytes(n)


def fmt_duration(seconds: float) -> str:
    """A run's length: 42.3 -> "42 s", 170.2 -> "2 min 50 s", 3725 -> "1 h 02 min"."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def fmt_ratio(r: float | None) -> str:
    """A ratio (> 1: instantnfs better): 1.523 -> "1.52×"; None -> "—"."""
    return "—" if r is None else f"{fmt_number(r)}×"


def fmt_percent(p: float) -> str:
    """How far off, in percent: 15.69 -> "16 %", 7.14 -> "7.1 %"."""
    return f"{p:.0f} %" if abs(p) >= 10 else f"{p:.1f} %"


def slug(group: str) -> str:
    """A group's file name: "GETATTR latency" -> "getattr-latency"."""
    return re.sub(r"[^a-z0-9]+", "-", group.lower()).strip("-") or "group"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _first_line(text: str, limit: int = 80) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------- reading rows


def _rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(results.get("rows") or [])


def _groups(results: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The rows by group: the issue's groups first, in its order, then others as they come."""
    by: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(results):
        by.setdefault(row.get("group") or "other", []).append(row)
    order = [g for g in GROUPS if g in by] + [g for g in by if g not in GROUPS]
    return [(g, by[g]) for g in order]


def _systems(results: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> list[str]:
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


def _ratio(row: Mapping[str, Any], peer: str) -> float | None:
    stored = row.get("ratios") or {}
    if peer in stored:
        return stored[peer]
    ours, theirs = _median(row, OURS), _median(row, peer)
    if ours is None or theirs is None:
        return None
    return ratio(ours, theirs, row.get("better", "higher"))


def _verdict(row: Mapping[str, Any]) -> dict[str, Any] | None:
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
    v = _verdict(row)
    if not v or v.get("met") is not False:
        return None
    of = v.get("of_target")
    if of is None:
        return math.inf
    return (1 - of) * 100 if row.get("better") == "higher" else (of - 1) * 100


def _client_bound(row: Mapping[str, Any], system: str) -> bool:
    r = (row.get("results") or {}).get(system) or {}
    return any(bool(e.get("client_bound")) for e in r.get("extras") or [] if isinstance(e, Mapping))


def _peer_installed(results: Mapping[str, Any], peer: str) -> bool | None:
    info = (results.get("peers") or {}).get(peer)
    return None if info is None else bool(info.get("installed"))


def _compared_peer(row: Mapping[str, Any]) -> str | None:
    """The goal's peer, or else the measured peer with the best median."""
    goal = row.get("goal") or {}
    if goal.get("peer"):
        return str(goal["peer"])
    peers = [p for p in (row.get("results") or {}) if p != OURS]
    if not peers:
        return None
    best = max if row.get("better", "higher") == "higher" else min
    return best(peers, key=lambda p: float(row["results"][p]["median"]))


def _status(results: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The summary's last column: met / missed by N % / no goal / error / peer not installed."""
    if row.get("error"):
        return f"error: {_first_line(row['error'])}"
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
        return f"{peer}: {_first_line(why)}"
    v = _verdict(row)
    if not v or v.get("met") is None:
        return "not judged"
    if v["met"]:
        return "met"
    off = missed_by(row)
    return "missed" if off is None or not math.isfinite(off) else f"missed by {fmt_percent(off)}"


# ---------------------------------------------------------------- the summary


def _figure(row: Mapping[str, Any], system: str) -> str:
    r = row["results"][system]
    return fmt_range(float(r["median"]), float(r["min"]), float(r["max"]), row.get("unit", ""))


def summary_table(results: dict) -> str:
    """The table the report opens with: one line per row, its goal, ours, the peer, the ratio
    and whether the goal is met (or how far it is missed, or why it could not be judged)."""
    lines = ["| scenario | goal | instantnfs | peer | ratio | |", "|---|---|---|---|---|---|"]
    flagged = False
    for _, rows in _groups(results):
        for row in rows:
            unit = row.get("unit", "")
            res = row.get("results") or {}
            ours = "—"
            if OURS in res:
                ours = _figure(row, OURS)
                if _client_bound(row, OURS):
                    ours += f" {CLIENT_BOUND_MARK}"
                    flagged = True
            peer = _compared_peer(row)
            if peer is None:
                theirs, r = "—", "—"
            elif peer in res:
                theirs = f"{peer} {fmt_value(float(res[peer]['median']), unit)}"
                r = fmt_ratio(_ratio(row, peer))
            else:
                theirs, r = f"{peer} —", "—"
            goal = (row.get("goal") or {}).get("text") or "—"
            cells = [row.get("title") or row.get("id", "?"), goal, ours, theirs, r, _status(results, row)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if flagged:
        lines += ["", f"{CLIENT_BOUND_MARK} {CLIENT_BOUND_NOTE[0].upper()}{CLIENT_BOUND_NOTE[1:]}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the report


def _when(results: Mapping[str, Any]) -> str:
    started = results.get("started")
    if not started:
        return "at an unrecorded time"
    try:
        t = datetime.fromisoformat(str(started).replace("Z", "+00:00"))
    except ValueError:
        return f"on {started}"
    if t.utcoffset() == timedelta(0):
        return "on " + t.strftime("%Y-%m-%d %H:%M UTC")
    return "on " + t.isoformat(" ", "minutes")


def _load(load: Sequence[float] | None) -> str:
    return "?" if not load else " / ".join(f"{x:.2f}" for x in load)


def _versions(versions: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" if v else f"{k} not found" for k, v in versions.items())


def machine_line(results: Mapping[str, Any]) -> str:
    """The machine in one line: CPU, cores, memory, kernel, Python, load before and after."""
    m = results.get("machine") or {}
    parts = [m.get("cpu_model") or "unknown CPU"]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("memory_bytes"):
        parts.append(f"{fmt_bytes(m['memory_bytes'])} memory")
    if m.get("kernel"):
        parts.append(f"Linux {m['kernel']}")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    parts.append(f"load average (1/5/15 min) {_load(m.get('load_before'))} before, {_load(m.get('load_after'))} after")
    host = f" ({m['hostname']})" if m.get("hostname") else ""
    return ", ".join(parts) + host


def command_line(results: Mapping[str, Any]) -> str:
    """What produced the results, in one line: the command, when, how long."""
    cmd = results.get("command") or "instantnfs bench"
    took = f", {fmt_duration(float(results['seconds']))}" if results.get("seconds") is not None else ""
    return f"`{cmd}` {_when(results)}{took}"


def settings_line(results: Mapping[str, Any]) -> str:
    s = results.get("settings") or {}
    parts = []
    if s.get("disk_size"):
        parts.append(f"{fmt_size(int(s['disk_size']))} seeded disk (seed {s.get('seed', '?')})")
    if s.get("pairs"):
        parts.append(f"{s['pairs']} runs of each system, alternated (A B B A …)")
    if s.get("blockmap"):
        parts.append(f"{s['blockmap']} block map")
    if s.get("event_loop"):
        parts.append(f"{s['event_loop']} event loop")
    if s.get("cache_bytes"):
        parts.append(f"{fmt_size(int(s['cache_bytes']))} decompression cache")
    if s.get("namespace"):
        parts.append(
            "servers in a private network namespace" if s["namespace"] == "private" else f"servers on {s['namespace']}"
        )
    return "; ".join(parts)


def _opening(results: Mapping[str, Any]) -> str:
    m = results.get("machine") or {}
    text = f"{command_line(results)}, on {machine_line(results)}."
    if m.get("versions"):
        text += f" Versions: {_versions(m['versions'])}."
    settings = settings_line(results)
    if settings:
        text += f" Settings: {settings}."
    text += (
        " Every figure is the median of the runs, with the lowest and highest; a ratio above 1"
        " means instantnfs is better (faster, or smaller where lower is better)."
    )
    return text


def conditions_line(conditions: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> str:
    """A row's conditions in one compact line: "qemu-img bench · 1 MiB · QD 16 · …"."""
    c = dict(conditions)
    settings = settings or {}
    aliases = {
        "transfer_size": "transfer", "bs": "transfer", "queue_depth": "qd", "conns": "connections",
        "cache_state": "cache", "block_map": "blockmap", "event_loop": "loop",
    }
    for old, new in aliases.items():
        if old in c and new not in c:
            c[new] = c.pop(old)
    c.setdefault("blockmap", settings.get("blockmap"))
    c.setdefault("loop", settings.get("event_loop"))

    def plural(n: Any, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    shown = {
        "client": lambda v: f"client {v}",
        "transfer": lambda v: f"{fmt_size(v)} transfers" if isinstance(v, int) else f"{v} transfers",
        "qd": lambda v: f"QD {v}",
        "connections": lambda v: plural(v, "connection"),
        "sessions": lambda v: plural(v, "session"),
        "cache": lambda v: f"{v} cache" if len(str(v).split()) == 1 else f"cache {v}",
        "blockmap": lambda v: f"{v} block map",
        "loop": lambda v: f"{v} event loop",
    }
    parts = [shown[k](c[k]) for k in shown if c.get(k) is not None]
    parts += [f"{k} {v}" for k, v in c.items() if k not in shown and v is not None]
    return " · ".join(parts)


def _row_section(results: Mapping[str, Any], row: Mapping[str, Any], systems: Sequence[str]) -> list[str]:
    out = [f"### {row.get('title') or row.get('id')}", ""]
    cond = conditions_line(row.get("conditions") or {}, results.get("settings"))
    better = "higher is better" if row.get("better", "higher") == "higher" else "lower is better"
    out.append(f"*{cond} · {better}*" if cond else f"*{better}*")
    out.append("")
    goal = row.get("goal")
    if goal:
        out.append(f"Goal: {goal.get('text')} — {_status(results, row)}.")
        out.append("")
    res = row.get("results") or {}
    missing = row.get("missing") or {}
    if res:
        out += ["| system | median | min–max | n | ratio |", "|---|---|---|---|---|"]
        unit = row.get("unit", "")
        for s in systems:
            if s in res:
                r = res[s]
                factor, shown, fmt = scale(unit, float(r["median"]))
                median = _join(fmt(float(r["median"]) * factor), shown)
                if _client_bound(row, s):
                    median += f" {CLIENT_BOUND_MARK}[^client-bound]"
                spread = f"{fmt(float(r['min']) * factor)}–{fmt(float(r['max']) * factor)}"
                n = len(r.get("samples") or [])
                rr = "—" if s == OURS else fmt_ratio(_ratio(row, s))
                out.append(f"| {_cell(s)} | {median} | {spread} | {n} | {rr} |")
            elif s in missing:
                out.append(f"| {_cell(s)} | {_cell(missing[s])} | — | — | — |")
        out.append("")
    elif missing:
        out += [f"- {s}: {missing[s]}" for s in systems if s in missing]
        out.append("")
    for note in row.get("notes") or []:
        out.append(f"> {note}")
        out.append("")
    if row.get("error"):
        out += ["Error:", "", "```", str(row["error"]).rstrip(), "```", ""]
    return out


def _goals_missed(results: Mapping[str, Any]) -> list[str]:
    missed, unjudged = [], []
    for _, rows in _groups(results):
        for row in rows:
            goal = row.get("goal")
            if not goal:
                continue
            status = _status(results, row)
            title = row.get("title") or row.get("id")
            if status.startswith("missed"):
                v = _verdict(row) or {}
                unit = row.get("unit", "")
                target = v.get("target")
                against = f" against a target of {fmt_value(float(target), unit)}" if target is not None else ""
                missed.append(
                    f"- **{title}** ({goal.get('text')}): {fmt_value(float(v['ours']), unit)}{against}, {status}."
                )
            elif status != "met":
                unjudged.append(f"- **{title}** ({goal.get('text')}): not judged, {status}.")
    out = missed or ["Every goal that could be judged was met."]
    if unjudged:
        out += ["", "Goals that could not be judged:", "", *unjudged]
    return out


def _peers_section(results: Mapping[str, Any]) -> list[str]:
    peers = results.get("peers") or {}
    if not peers:
        return ["No peers were asked for."]
    out = ["| peer | status |", "|---|---|"]
    for name, info in peers.items():
        if info.get("installed"):
            status = f"installed, {info['version']}" if info.get("version") else "installed"
        else:
            cmd = info.get("install")
            status = f"not installed: `{cmd}`" if cmd else "not installed"
        out.append(f"| {_cell(name)} | {_cell(status)} |")
    return out


def _link(path: Path, rel_to: Path | None) -> str:
    if rel_to is None:
        return Path(path).as_posix()
    return Path(os.path.relpath(Path(path).absolute(), Path(rel_to).absolute())).as_posix()


def _plot_title(path: Path, results: Mapping[str, Any]) -> str:
    by_slug = {slug(g): g for g, _ in _groups(results)}
    return by_slug.get(Path(path).stem, Path(path).stem)


def render_markdown(results: dict, plots: Sequence[Path] = (), rel_to: Path | None = None) -> str:
    """The whole report as Markdown; plot links are relative to ``rel_to`` when given."""
    out = ["# instantnfs benchmark report", "", _opening(results), "", "## Summary", "", summary_table(results).rstrip(), ""]
    out += ["## Goals missed", "", *_goals_missed(results), ""]
    flagged = False
    for group, rows in _groups(results):
        systems = _systems(results, rows)
        out += [f"## {group[0].upper()}{group[1:]}", ""]
        for row in rows:
            out += _row_section(results, row, systems)
            flagged = flagged or any(_client_bound(row, s) for s in row.get("results") or {})
    out += ["## Peers", "", *_peers_section(results), ""]
    if plots:
        out += ["## Plots", ""]
        for p in plots:
            out += [f"![{_plot_title(p, results)}]({_link(p, rel_to)})", ""]
    if flagged:
        out += [f"[^client-bound]: {CLIENT_BOUND_NOTE[0].upper()}{CLIENT_BOUND_NOTE[1:]}", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- plots


def _colour(system: str) -> str:
    return COLOURS.get(system) or _PALETTE[zlib.crc32(system.encode()) % len(_PALETTE)]


def _plot_group(group: str, rows: Sequence[Mapping[str, Any]], systems: Sequence[str], path: Path) -> None:
    """One PNG: a subplot per unit; per row, one horizontal bar per system at the median,
    whiskers from min to max. Systems with no figure in the group get no bar, only a
    line under the plot saying why; within a row, a gap says why in grey."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:
        raise RuntimeError(NEED_MATPLOTLIB) from e

    drawn = [s for s in systems if any(s in (r.get("results") or {}) for r in rows)]
    absent: dict[str, str] = {}
    for row in rows:
        for s, why in (row.get("missing") or {}).items():
            if s not in drawn:
                absent.setdefault(s, _first_line(why, 60))
    units: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        units.setdefault(row.get("unit", ""), []).append(row)
    heights = [len(rs) * (0.3 * len(drawn) + 0.5) + 0.7 for rs in units.values()]
    fig = Figure(figsize=(9.0, sum(heights) + 0.9 + 0.25 * bool(absent)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(units), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    bar = 0.8 / max(len(drawn), 1)
    for ax, (unit, urows) in zip(axes, units.items()):
        peak = max((float(r["results"][s]["max"]) for r in urows for s in r.get("results") or {}), default=1.0)
        factor, shown, _ = scale(unit, peak)
        labels = []
        for i, row in enumerate(urows):
            y0 = len(urows) - 1 - i  # the first row on top
            direction = "higher is better" if row.get("better", "higher") == "higher" else "lower is better"
            labels.append(f"{textwrap.fill(str(row.get('title') or row.get('id')), 32)}\n({direction})")
            res = row.get("results") or {}
            for j, s in enumerate(drawn):
                y = y0 + 0.4 - bar * (j + 0.5)
                if s in res:
                    med = float(res[s]["median"]) * factor
                    lo = float(res[s]["min"]) * factor
                    hi = float(res[s]["max"]) * factor
                    ax.barh(
                        y, med, height=bar * 0.9, color=_colour(s),
                        xerr=[[max(med - lo, 0.0)], [max(hi - med, 0.0)]],
                        error_kw={"ecolor": "#333333", "capsize": 3, "elinewidth": 1},
                    )
                    if _client_bound(row, s):
                        ax.text(hi, y, f"  {CLIENT_BOUND_MARK} client-bound", va="center", fontsize=8, color="#b05000")
                    continue
                if row.get("error"):
                    why = "error (see the report)" if s == OURS else "not run (the row failed)"
                else:
                    why = (row.get("missing") or {}).get(s, "no figure")
                ax.text(0, y, f"  {s}: {_first_line(why, 50)}", va="center", fontsize=8, color="#888888")
        ax.set_yticks(range(len(urows) - 1, -1, -1))
        ax.set_yticklabels(labels, fontsize=9)
        ax.set_ylim(-0.55, len(urows) - 0.45)
        ax.set_xlabel(shown)
        if _is_count(unit):
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.0f}"))
        ax.set_xlim(left=0)
        ax.grid(axis="x", color="#dddddd", linewidth=0.8)
        ax.set_axisbelow(True)
    handles = [Patch(color=_colour(s), label=s) for s in drawn]
    fig.legend(handles=handles, loc="outside upper right", ncols=min(len(drawn), 5), fontsize=9, frameon=False)
    fig.suptitle(f"{group[0].upper()}{group[1:]}: median, whiskers min–max", x=0.01, ha="left", fontsize=11)
    if absent:
        fig.supxlabel("no figure: " + "; ".join(f"{s} ({why})" for s, why in absent.items()), fontsize=8, color="#888888")
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def write_plots(results: dict, plots_dir: Path) -> list[Path]:
    """One PNG per group that has at least one figure: plots_dir/<group-slug>.png."""
    made = []
    for group, rows in _groups(results):
        if not any(row.get("results") for row in rows):
            continue
        plots_dir.mkdir(parents=True, exist_ok=True)
        path = plots_dir / f"{slug(group)}.png"
        _plot_group(group, rows, _systems(results, rows), path)
        made.append(path)
    return made


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(NEED_MATPLOTLIB) from e


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write out_dir/report.md and out_dir/plots/<group-slug>.png; return the paths written.

    Refuses (RuntimeError, with the install command) before writing anything when
    matplotlib is missing.
    """
    _need_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out_dir / "plots")
    report = out_dir / "report.md"
    report.write_text(render_markdown(results, plots, rel_to=out_dir), encoding="utf-8")
    return [report, *plots]


# ---------------------------------------------------------------- the README


def readme_section(readme: Path, results: dict, report_dir: Path) -> str:
    """What goes between the README's markers: command, machine, the summary, the plots."""
    base = Path(readme).parent
    out = [f"Command: {command_line(results)}", "", f"Machine: {machine_line(results)}", "", summary_table(results).rstrip(), ""]
    report = Path(report_dir) / "report.md"
    if report.exists():
        out += [f"The full report: [{_link(report, base)}]({_link(report, base)}).", ""]
    plots_dir = Path(report_dir) / "plots"
    for group, _ in _groups(results):
        png = plots_dir / f"{slug(group)}.png"
        if png.exists():
            out += [f"![{group}]({_link(png, base)})", ""]
    return "\n".join(out)


def update_readme(readme: Path, results: dict, report_dir: Path) -> bool:
    """Replace the text between the bench markers in ``readme``; False when they are absent.

    Everything outside the markers, the markers included, is kept byte for byte.
    """
    readme = Path(readme)
    text = readme.read_bytes().decode("utf-8")
    start = text.find(BEGIN)
    if start < 0:
        return False
    start += len(BEGIN)
    end = text.find(END, start)
    if end < 0:
        return False
    new = text[:start] + "\n" + readme_section(readme, results, report_dir) + "\n" + text[end:]
    if new != text:
        readme.write_bytes(new.encode("utf-8"))
    return True
