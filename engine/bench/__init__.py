"""``instantnfs bench``: the benchmark suite, shipped inside the package.

It generates seeded disks, backs them up, serves them with instantnfs beside the peers a
user runs today (NFS-Ganesha serving the raw image, borg and restic FUSE mounts, the
local file), runs every scenario on each system alternately (A B A B ...) and writes
``results.json``, a Markdown report and PNG plots. The user's view is
``instantnfs bench --help``; the pieces:

- ``core``: samples, alternation, goals, rows, targets (what a client reaches);
- ``machine``: what the machine is and how busy it was;
- ``diskgen``: the seeded disk images;
- ``loadgen``: the random-I/O load generator (processes, raw ONC RPC) and GETATTR probe;
- ``peers``: Ganesha, borg, restic and the local file: found, installed, started, stopped;
- ``ours``: the instantnfs daemon under test, as a process driven over its API;
- ``scenarios/``: one module per group of rows;
- ``report``: results.json to report.md and plots;
- ``runner`` and ``cli``: the run, its progress display, and ``instantnfs bench``.
"""
