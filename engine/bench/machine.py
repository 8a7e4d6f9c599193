"""What the machine is and how busy it was: every result says where it was measured.

On a shared machine other work moves single figures by 2x or more, so a result carries
the load average before and after the run, the CPU, the cores, the memory, the kernel
and the versions of everything measured.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tool_version(cmd: list[str], pattern: str = r"(\d+\.\d+(?:\.\d+)?)") -> str | None:
    """The first version-looking number a tool prints for ``cmd`` (None if absent)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(1) if m else None


def describe() -> dict[str, Any]:
    """The machine and the versions of instantnfs and its clients (peers are added by the runner)."""
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": loadavg(),
        "versions": {
            "instantnfs": package_version("instantnfs"),
            "qemu-img": tool_version(["qemu-img", "--version"]),
            "libnfs-utils": tool_version(["dpkg-query", "-W", "-f=${Version}", "libnfs-utils"]),
            "lz4": package_version("lz4"),
            "numpy": package_version("numpy"),
            "uvloop": package_version("uvloop"),
            "Cython": package_version("Cython"),
        },
    }
