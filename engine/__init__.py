"""instantnfs: boot virtual machines straight out of their backups, over NFSv3.

The rooms, bottom to top (each imports only those below it; ``.importlinter`` holds
the rules): ``repo`` (storage), ``cache`` and ``disk`` (reading a restore point's disk),
``writecache`` (a session's writes), ``stack`` (composes those), ``datastore`` and
``export``, ``nfs`` (the protocols), ``jobs`` (long operations), ``control`` (API,
daemon, command line). ``errors``, ``config``, ``fsutil``, ``tuning`` and ``blockmap``
are foundations every room may use.
"""
