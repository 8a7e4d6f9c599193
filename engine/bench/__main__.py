"""``python -m engine.bench`` is ``instantnfs bench``."""
import sys

from engine.bench.cli import main

sys.exit(main(sys.argv[1:]))
