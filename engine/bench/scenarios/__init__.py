"""One module per group of rows; ``engine.bench.runner.SCENARIOS`` names them in run order.

A scenario module has ``NAME`` (as ``--only`` takes it), ``GROUP`` (the report's
section), ``PEERS`` (whom it compares with), ``rows(ctx)`` (how many rows it will yield,
for the progress display) and ``run(ctx)``, a generator of finished rows.
"""
