"""results.json to a report people read: ``report.md``, PNG plots and the README's section.

The input is the dict the runner writes (``results.json``, schema 1): the command, when
it ran and for how long, the machine and its load, the settings, the peers (installed or
not, and how to install them) and the rows, each ``core.Row.to_json()``. Nothing here
measures or runs anything; the report is a pure function of that dict, so a stored
results.json rebuilds the same report (and the tests check the builder on one).

The rows are read through ``results`` (what it assumes of a row is written there), the
numbers written by ``units``, the PNGs drawn by ``plots``. The conditions the report
knows and prints in this order (other keys follow as ``key value``): ``client``,
``transfer`` (bytes), ``qd``, ``connections``, ``sessions``, ``cache``, ``blockmap``,
``loop``; the last two default to the run's settings.

Only the plots need matplotlib: importing this module, rendering Markdown and updating
the README work without it; ``write_report`` refuses with the command that installs it
before writing anything.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from engine.bench.core import OURS
from engine.bench.plots import need_matplotlib, write_plots
from engine.bench.results import (
    CLIENT_BOUND_MARK,
    CLIENT_BOUND_NOTE,
    client_bound,
    compared_peer,
    groups,
    ratio,
    status,
    systems,
    verdict,
)
from engine.bench.units import (
    fmt_bytes,
    fmt_duration,
    fmt_range,
    fmt_ratio,
    fmt_size,
    fmt_value,
    join,
    scale,
    slug,
)

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---------------------------------------------------------------- the summary


def _figure(row: Mapping[str, Any], system: str) -> str:
    r = row["results"][system]
    return fmt_range(float(r["median"]), float(r["min"]), float(r["max"]), row.get("unit", ""))


def summary_table(results: dict) -> str:
    """The table the report opens with: one line per row, its goal, ours, the peer, the ratio
    and whether the goal is met (or how far it is missed, or why it could not be judged)."""
    lines = ["| scenario | goal | instantnfs | peer | ratio | |", "|---|---|---|---|---|---|"]
    flagged = False
    for _, rows in groups(results):
        for row in rows:
            unit = row.get("unit", "")
            res = row.get("results") or {}
            ours = "—"
            if OURS in res:
                ours = _figure(row, OURS)
                if client_bound(row, OURS):
                    ours += f" {CLIENT_BOUND_MARK}"
                    flagged = True
            peer = compared_peer(row)
            if peer is None:
                theirs, r = "—", "—"
            elif peer in res:
                theirs = f"{peer} {fmt_value(float(res[peer]['median']), unit)}"
                r = fmt_ratio(ratio(row, peer))
            else:
                theirs, r = f"{peer} —", "—"
            goal = (row.get("goal") or {}).get("text") or "—"
            cells = [row.get("title") or row.get("id", "?"), goal, ours, theirs, r, status(results, row)]
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
        out.append(f"Goal: {goal.get('text')} — {status(results, row)}.")
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
                median = join(fmt(float(r["median"]) * factor), shown)
                if client_bound(row, s):
                    median += f" {CLIENT_BOUND_MARK}[^client-bound]"
                spread = f"{fmt(float(r['min']) * factor)}–{fmt(float(r['max']) * factor)}"
                n = len(r.get("samples") or [])
                rr = "—" if s == OURS else fmt_ratio(ratio(row, s))
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
    for _, rows in groups(results):
        for row in rows:
            goal = row.get("goal")
            if not goal:
                continue
            state = status(results, row)
            title = row.get("title") or row.get("id")
            if state.startswith("missed"):
                v = verdict(row) or {}
                unit = row.get("unit", "")
                target = v.get("target")
                against = f" against a target of {fmt_value(float(target), unit)}" if target is not None else ""
                missed.append(
                    f"- **{title}** ({goal.get('text')}): {fmt_value(float(v['ours']), unit)}{against}, {state}."
                )
            elif state != "met":
                unjudged.append(f"- **{title}** ({goal.get('text')}): not judged, {state}.")
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
    by_slug = {slug(g): g for g, _ in groups(results)}
    return by_slug.get(Path(path).stem, Path(path).stem)


def render_markdown(results: dict, plots: Sequence[Path] = (), rel_to: Path | None = None) -> str:
    """The whole report as Markdown; plot links are relative to ``rel_to`` when given."""
    out = ["# instantnfs benchmark report", "", _opening(results), "", "## Summary", "", summary_table(results).rstrip(), ""]
    out += ["## Goals missed", "", *_goals_missed(results), ""]
    flagged = False
    for group, rows in groups(results):
        shown = systems(results, rows)
        out += [f"## {group[0].upper()}{group[1:]}", ""]
        for row in rows:
            out += _row_section(results, row, shown)
            flagged = flagged or any(client_bound(row, s) for s in row.get("results") or {})
    out += ["## Peers", "", *_peers_section(results), ""]
    if plots:
        out += ["## Plots", ""]
        for p in plots:
            out += [f"![{_plot_title(p, results)}]({_link(p, rel_to)})", ""]
    if flagged:
        out += [f"[^client-bound]: {CLIENT_BOUND_NOTE[0].upper()}{CLIENT_BOUND_NOTE[1:]}", ""]
    return "\n".join(out)


def write_report(results: dict, out_dir: Path) -> list[Path]:
    """Write out_dir/report.md and out_dir/plots/<group-slug>.png; return the paths written.

    Refuses (RuntimeError, with the install command) before writing anything when
    matplotlib is missing.
    """
    need_matplotlib()
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
    for group, _ in groups(results):
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
