"""The bench report's plots: one PNG per group, a bar per system at the median, whiskers min–max.

Drawn from the results dict alone (read through ``results``), so a stored results.json
redraws the same plots. A system keeps its colour across groups, runs and reports
(``results.COLOURS``, else a palette colour chosen by a hash of its name).

Plots need matplotlib (the ``bench`` extra). It is imported inside the plotting
function, so importing this module (and the report, which imports it), rendering
Markdown and updating the README work without it; ``need_matplotlib`` raises with the
command that installs it, which ``report.write_report`` calls before writing anything.
Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no display, no
pyplot global state.
"""
from __future__ import annotations

import textwrap
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.bench.core import OURS
from engine.bench.results import CLIENT_BOUND_MARK, COLOURS, PALETTE, client_bound, groups, systems
from engine.bench.units import first_line, is_count, scale, slug

NEED_MATPLOTLIB = "plots need matplotlib: pip install 'instantnfs[bench]'"


def _colour(system: str) -> str:
    return COLOURS.get(system) or PALETTE[zlib.crc32(system.encode()) % len(PALETTE)]


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
                absent.setdefault(s, first_line(why, 60))
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
                    if client_bound(row, s):
                        ax.text(hi, y, f"  {CLIENT_BOUND_MARK} client-bound", va="center", fontsize=8, color="#b05000")
                    continue
                if row.get("error"):
                    why = "error (see the report)" if s == OURS else "not run (the row failed)"
                else:
                    why = (row.get("missing") or {}).get(s, "no figure")
                ax.text(0, y, f"  {s}: {first_line(why, 50)}", va="center", fontsize=8, color="#888888")
        ax.set_yticks(range(len(urows) - 1, -1, -1))
        ax.set_yticklabels(labels, fontsize=9)
        ax.set_ylim(-0.55, len(urows) - 0.45)
        ax.set_xlabel(shown)
        if is_count(unit):
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
    for group, rows in groups(results):
        if not any(row.get("results") for row in rows):
            continue
        plots_dir.mkdir(parents=True, exist_ok=True)
        path = plots_dir / f"{slug(group)}.png"
        _plot_group(group, rows, systems(results, rows), path)
        made.append(path)
    return made


def need_matplotlib() -> None:
    """Raise RuntimeError(NEED_MATPLOTLIB) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(NEED_MATPLOTLIB) from e
