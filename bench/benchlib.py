"""What every benchmark here records about the machine it ran on."""
from __future__ import annotations

import os
import platform


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        # other work on the machine skews every figure: say how busy it was
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
