"""Numbers for people: how the bench report and its plots write figures, sizes and times.

The rules: 3 significant digits, thousands separators, never an exponent; whole digits
are never rounded away (12345 stays "12,345"). IOPS, ops and other counts per second are
whole numbers with thousands separators (3 significant digits below 100). Byte rates,
times and sizes climb or descend a ladder of units until the number reads plainly: MB/s
turns into GB/s past 1000 and into kB/s below 1, MiB/s into GiB/s, latencies go
ns/µs/ms/s, sizes B/KiB/MiB/GiB/TiB. One cell's median, min and max share the scale the
median chose (``scale``, ``fmt_range``), so a spread never mixes units. A unit not known
here is printed as given, after the number.

Pure functions of their arguments, on the standard library only: no I/O, no state, so
every other bench module may use them.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable


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


def is_count(unit: str) -> bool:
    """Whether figures in ``unit`` are counts (IOPS, ops, anything per second but bytes)."""
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
    if is_count(unit):
        return 1.0, unit, fmt_count
    return 1.0, unit, fmt_number


def join(number: str, unit: str) -> str:
    """A formatted number and its unit: "1.45" "GB/s" -> "1.45 GB/s"; no unit, no space."""
    return f"{number} {unit}" if unit else number


def fmt_value(value: float, unit: str) -> str:
    """One figure: fmt_value(1450, "MB/s") -> "1.45 GB/s"; fmt_value(0.00018, "s") -> "180 µs"."""
    factor, shown, fmt = scale(unit, value)
    return join(fmt(value * factor), shown)


def fmt_range(median: float, low: float, high: float, unit: str) -> str:
    """A median with its spread, on the median's scale: "1.45 (1.41–1.49) GB/s"."""
    factor, shown, fmt = scale(unit, median)
    return join(f"{fmt(median * factor)} ({fmt(low * factor)}–{fmt(high * factor)})", shown)


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


def first_line(text: str, limit: int = 80) -> str:
    """The first non-blank line of ``text``, cut to ``limit`` characters with an ellipsis."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"
