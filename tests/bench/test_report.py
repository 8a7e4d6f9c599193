"""The report builder on a stored results.json (tests/bench/data/results-sample.json).

The sample was made through ``core.Row.to_json()``: 13 rows over the eight groups, peers
ganesha and restic installed, borg not, one row that failed, goals met and missed, rows
where higher and where lower is better, one client-bound run. No figure here is a
measurement; the assertions are on the text and files the builder makes from them.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench.report import render_markdown, summary_table, update_readme, write_report
from engine.bench.results import CLIENT_BOUND_MARK, GROUPS
from engine.bench.units import (
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_number,
    fmt_percent,
    fmt_range,
    fmt_ratio,
    fmt_size,
    fmt_value,
    slug,
)

SAMPLE = Path(__file__).parent / "data" / "results-sample.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def results() -> dict:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The sample's report, written once for the tests that read it (plots take seconds)."""
    out = tmp_path_factory.mktemp("report") / "bench-out"
    return out, write_report(json.loads(SAMPLE.read_text(encoding="utf-8")), out)


def _row(results: dict, row_id: str) -> dict:
    return next(r for r in results["rows"] if r["id"] == row_id)


def _summary_line(table: str, title: str) -> list[str]:
    """The cells of the summary line whose scenario is ``title``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == title:
            return cells
    raise AssertionError(f"no summary line for {title!r} in\n{table}")


# ---------------------------------------------------------------- files


def test_write_report_writes_markdown_and_one_png_per_group(results, written):
    out, paths = written
    md = out / "report.md"
    assert paths[0] == md and md.exists()
    groups_with_figures = {r["group"] for r in results["rows"] if r["results"]}
    pngs = paths[1:]
    assert sorted(p.name for p in pngs) == sorted(f"{slug(g)}.png" for g in groups_with_figures)
    for p in pngs:
        assert p.parent == out / "plots"
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC, p
        assert len(data) > 1024, p
    text = md.read_text(encoding="utf-8")
    for p in pngs:  # linked relative to the report
        assert f"](plots/{p.name})" in text


def test_a_group_without_figures_gets_no_plot(results, tmp_path):
    only_error = [r for r in results["rows"] if r["error"]]
    assert only_error, "the sample has a failed row"
    small = dict(results, rows=only_error + [_row(results, "rss-16-sessions")])
    written = write_report(small, tmp_path)
    assert [p.name for p in written[1:]] == ["daemon-memory.png"]
    assert "Sequential 1 MiB writes, QD 16" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_without_matplotlib_write_report_says_how_to_install_and_writes_nothing(results, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'instantnfs\[bench\]'"):
        write_report(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the Markdown alone needs no matplotlib
    assert "## Summary" in render_markdown(results)


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, engine.bench.report; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# ---------------------------------------------------------------- the summary


def test_summary_has_one_line_per_row_in_group_order(results):
    table = summary_table(results)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| scenario | goal | instantnfs | peer | ratio | |"
    body = lines[1:]
    assert len(body) == len(results["rows"])
    order = [r["group"] for r in results["rows"]]
    shown = [next(r["group"] for r in results["rows"] if r["title"] == ln.split(" | ")[0][2:]) for ln in body]
    assert shown == sorted(order, key=GROUPS.index)


def test_summary_met_goal(results):
    row = _row(results, "seq-1m-qd1-cold")
    assert row["verdict"]["met"] is True
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[1] == "≥ 0.8 × Ganesha"
    assert cells[2] == "418 (402–431) MB/s"
    assert cells[3] == "ganesha 455 MB/s"
    assert cells[4] == "0.919×"
    assert cells[5] == "met"


def test_summary_missed_goal_says_by_how_much(results):
    row = _row(results, "seq-1m-qd16-warm")
    ours = row["results"]["instantnfs"]["median"]
    ganesha = row["results"]["ganesha"]["median"]
    assert (ours, ganesha, row["goal"]["ratio"]) == (1450.0, 1720.0, 1.0)
    off = (1 - ours / (1.0 * ganesha)) * 100  # 15.70 %
    assert round(off) == 16
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[2] == "1.45 (1.41–1.49) GB/s"
    assert cells[5] == "missed by 16 %"


def test_summary_missed_goal_lower_is_better(results):
    row = _row(results, "getattr-p99-idle")
    assert row["better"] == "lower"
    ours, ganesha = row["results"]["instantnfs"]["median"], row["results"]["ganesha"]["median"]
    target = 1.2 * ganesha  # 168 µs
    assert f"{(ours / target - 1) * 100:.1f}" == "7.1"
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[2] == "180 (172–192) µs"
    assert cells[5] == "missed by 7.1 %"


def test_lower_is_better_ratio_is_the_right_way_round(results):
    row = _row(results, "getattr-p99-under-seq")
    ours, ganesha = row["results"]["instantnfs"]["median"], row["results"]["ganesha"]["median"]
    assert ours < ganesha  # ours is better: lower latency
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[4] == fmt_ratio(ganesha / ours) == "2.54×"
    assert cells[5] == "met"
    # recomputed (not read from the stored ratios), the ratio is the same way round
    stripped = copy.deepcopy(results)
    for r in stripped["rows"]:
        r.pop("ratios")
        r.pop("verdict")
    cells = _summary_line(summary_table(stripped), row["title"])
    assert cells[4] == "2.54×" and cells[5] == "met"
    idle = _summary_line(summary_table(stripped), _row(results, "getattr-p99-idle")["title"])
    assert idle[4] == "0.778×" and idle[5] == "missed by 7.1 %"


def test_summary_error_row(results):
    row = _row(results, "write-1m-seq")
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[2] == "—"
    assert cells[5].startswith("error: RuntimeError: qemu-img bench -w exited with status 1")
    assert "\n" not in cells[5]


def test_summary_goal_peer_not_installed(results):
    row = _row(results, "rand-64k-qd64-c8-cold")
    assert row["goal"]["peer"] == "borg" and results["peers"]["borg"]["installed"] is False
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[3] == "borg —"
    assert cells[5] == "peer not installed"


def test_summary_without_goal_compares_with_the_best_peer(results):
    row = _row(results, "repo-size-2g")  # bytes, lower is better, no goal
    cells = _summary_line(summary_table(results), row["title"])
    assert cells[1] == "—"
    assert cells[2] == "864 (864–864) MiB"
    assert cells[3] == "restic 904 MiB"
    assert cells[4] == "1.05×"
    assert cells[5] == "no goal"
    alone = _summary_line(summary_table(results), _row(results, "many-vms-16")["title"])
    assert alone[3:] == ["—", "—", "no goal"]


def test_client_bound_runs_are_marked_with_a_note(results):
    table = summary_table(results)
    cells = _summary_line(table, _row(results, "rand-4k-qd16-c1-warm")["title"])
    assert cells[2].endswith(CLIENT_BOUND_MARK)
    assert "bottleneck" in table.split("\n\n", 1)[1]
    md = render_markdown(results)
    assert "⚠[^client-bound]" in md
    assert "\n[^client-bound]: " in md
    clean = copy.deepcopy(results)
    for r in clean["rows"]:
        for s in r["results"].values():
            s.pop("extras", None)
    assert CLIENT_BOUND_MARK not in summary_table(clean)
    assert "[^client-bound]" not in render_markdown(clean)


# ---------------------------------------------------------------- the report body


def test_render_markdown_names_each_missing_peers_install_command(results):
    results["peers"]["restic"] = {"installed": False, "version": None, "install": "apt-get install -y restic fuse3"}
    md = render_markdown(results)
    for name, info in results["peers"].items():
        if not info["installed"]:
            assert f"not installed: `{info['install']}`" in md, name
    assert "| ganesha | installed, 4.3 |" in md


def test_render_markdown_states_run_machine_and_goals_missed(results):
    md = render_markdown(results)
    opening = md.split("## Summary")[0]
    for text in ("`instantnfs bench --quick`", "2026-11-30 11:00 UTC", "2 min 50 s",
                 "Intel(R) Xeon(R) CPU @ 2.20GHz", "2 cores", "Linux 6.1.0-27-amd64",
                 "0.52 / 0.61 / 0.48 before", "1.93 / 1.12 / 0.71 after", "qemu-img 7.2.13",
                 "cython block map", "uvloop event loop"):
        assert text in opening, text
    missed = md.split("## Goals missed")[1].split("\n## ")[0]
    assert "**Sequential 1 MiB reads, QD 16, warm**" in missed and "missed by 16 %" in missed
    assert "against a target of 168 µs, missed by 7.1 %" in missed
    assert "**Backup ingest, 2 GiB disk**" in missed and "missed by 20 %" in missed
    assert "Sequential 1 MiB reads, QD 1, cold**" not in missed  # met
    for group in {r["group"] for r in results["rows"]}:
        assert f"\n## {group[0].upper()}{group[1:]}\n" in md


def test_each_row_has_a_full_table_and_its_conditions(results):
    md = render_markdown(results)
    section = md.split("### Random 4 KiB reads, QD 16, 1 connection, warm")[1].split("\n### ")[0]
    assert ("*client loadgen (Cython) · 4 KiB transfers · QD 16 · 1 connection · warm cache"
            " · cython block map · uvloop event loop · higher is better*") in section
    assert "| ganesha | 39,120 IOPS | 38,750–40,210 | 3 | 1.16× |" in section
    assert "| borg | not installed | — | — | — |" in section
    failed = md.split("### Sequential 1 MiB writes, QD 16")[1].split("\n## ")[0]
    assert "Permission denied" in failed and "daemon.log" in failed


def test_plot_links_are_relative_to_rel_to(results, tmp_path):
    plots = [tmp_path / "out" / "plots" / "random-reads.png"]
    md = render_markdown(results, plots, rel_to=tmp_path)
    assert "![random reads](out/plots/random-reads.png)" in md


# ---------------------------------------------------------------- the README


README = """# instantnfs\r\n\nSome text, with a trailing space \n\n## Performance\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nAfter the section: ünïcode stays.\n"""


def test_update_readme_replaces_only_between_the_markers(results, written):
    out, _ = written
    readme = out.parent / "README.md"
    readme.write_bytes(README.encode("utf-8"))
    assert update_readme(readme, results, out) is True
    new = readme.read_bytes()
    before, _, rest = README.encode("utf-8").partition(b"<!-- bench:begin -->")
    _, _, after = rest.partition(b"<!-- bench:end -->")
    assert new.startswith(before + b"<!-- bench:begin -->")
    assert new.endswith(b"<!-- bench:end -->" + after)
    inside = new[len(before) + len(b"<!-- bench:begin -->"): -len(b"<!-- bench:end -->" + after)].decode()
    assert "old table" not in inside
    assert "Command: `instantnfs bench --quick` on 2026-11-30 11:00 UTC, 2 min 50 s" in inside
    assert "Machine: Intel(R) Xeon(R) CPU @ 2.20GHz, 2 cores" in inside
    assert summary_table(results).rstrip() in inside
    assert "![random reads](bench-out/plots/random-reads.png)" in inside
    assert "[bench-out/report.md](bench-out/report.md)" in inside
    # a second run with the same results changes nothing
    assert update_readme(readme, results, out) is True
    assert readme.read_bytes() == new


@pytest.mark.parametrize("text", [
    "# no markers at all\n",
    "only a begin <!-- bench:begin -->\n",
    "<!-- bench:end --> before <!-- bench:begin -->\n",
])
def test_update_readme_without_markers_returns_false_and_leaves_the_file(results, tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_bytes(text.encode())
    assert update_readme(readme, results, tmp_path) is False
    assert readme.read_bytes() == text.encode()


# ---------------------------------------------------------------- numbers for people


def test_number_formatting():
    assert fmt_number(1.23456) == "1.23"
    assert fmt_number(12.345) == "12.3"
    assert fmt_number(987.6) == "988"
    assert fmt_number(9.996) == "10.0"
    assert fmt_number(0.012345) == "0.0123"
    assert fmt_number(0) == "0"
    assert fmt_count(45210.4) == "45,210"
    assert fmt_count(1234567) == "1,234,567"
    assert fmt_count(45.25) == "45.2"
    assert fmt_value(45210.4, "IOPS") == "45,210 IOPS"
    assert fmt_value(987.6, "MB/s") == "988 MB/s"
    assert fmt_value(1450, "MB/s") == "1.45 GB/s"
    assert fmt_value(0.5, "MB/s") == "500 kB/s"
    assert fmt_value(300, "MiB/s") == "300 MiB/s"
    assert fmt_value(2048, "MiB/s") == "2.00 GiB/s"
    assert fmt_value(0.000180, "s") == "180 µs"
    assert fmt_value(2410.0, "µs") == "2.41 ms"
    assert fmt_value(212.0, "ms") == "212 ms"
    assert fmt_value(4120.0, "ms") == "4.12 s"
    assert fmt_value(850, "ns") == "850 ns"
    assert fmt_bytes(4096) == "4.00 KiB"
    assert fmt_bytes(315621376) == "301 MiB"
    assert fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert fmt_value(512, "MiB") == "512 MiB"
    assert fmt_value(2048, "MiB") == "2.00 GiB"
    assert fmt_size(4096) == "4 KiB" and fmt_size(1 << 20) == "1 MiB" and fmt_size(2 << 30) == "2 GiB"
    assert fmt_size(1000) == "1,000 B"
    assert fmt_range(1450, 1412, 1488.5, "MB/s") == "1.45 (1.41–1.49) GB/s"
    assert fmt_range(45210.4, 44870, 46020.9, "IOPS") == "45,210 (44,870–46,021) IOPS"
    assert fmt_ratio(1.523) == "1.52×" and fmt_ratio(None) == "—" and fmt_ratio(19.43) == "19.4×"
    assert fmt_percent(15.697) == "16 %" and fmt_percent(7.1428) == "7.1 %"
    assert fmt_duration(42.3) == "42 s" and fmt_duration(170.2) == "2 min 50 s"
    assert fmt_duration(3725) == "1 h 02 min"
    assert slug("GETATTR latency") == "getattr-latency"
    assert slug("publish to first byte") == "publish-to-first-byte"
