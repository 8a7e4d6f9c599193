"""``python -m engine.bench.peers status [NAME...]`` / ``install NAME...`` (install: as root)."""
from __future__ import annotations

import argparse
import json
import sys

from engine.bench.peers import PEERS, PeerError, find_peers, install


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench.peers", description=__doc__)
    ap.add_argument("action", choices=("status", "install"))
    ap.add_argument("names", nargs="*", help=f"peers (default: all): {', '.join(PEERS)}")
    a = ap.parse_args(argv)
    names = a.names or list(PEERS)
    try:
        if a.action == "install":
            install(names, log=lambda line: print(line, file=sys.stderr, flush=True))
        else:
            print(json.dumps({n: p.status() for n, p in find_peers(names).items()}, indent=2))
    except (PeerError, ValueError) as e:
        print(f"instantnfs bench: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
