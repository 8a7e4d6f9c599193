"""The control room: what an operator or orchestrator touches. ``cli`` (argparse and
``main``), ``repo_cli`` (repository commands), ``client`` (commands that call a running
daemon), ``daemon`` (the composition root of ``serve``), ``demo``, ``api`` (HTTP only)
and ``auth`` (its bearer token)."""
