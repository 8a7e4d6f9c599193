"""Run the instantnfs command line as a user would: a subprocess of this venv's Python."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


def run(*args: str, check: bool | None = None, env: dict | None = None, **kw) -> Result:
    e = dict(os.environ)
    e.pop("INSTANTNFS_REPO", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "engine.control.cli", *map(str, args)], capture_output=True, text=True, env=e, **kw)
    r = Result(p.returncode, p.stdout, p.stderr)
    if check is True and r.rc != 0:
        raise AssertionError(f"instantnfs {' '.join(map(str, args))} failed ({r.rc}): {r.err}")
    return r


def ok(*args: str, **kw) -> Result:
    return run(*args, check=True, **kw)
