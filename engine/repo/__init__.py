"""Storage only: the repository's formats, packs, restore points, pins, backup ingest,
check, gc and restore. Nothing here knows disks, caches, sessions or protocols."""
