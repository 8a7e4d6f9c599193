"""Running guests: VMs out of backups, their supervision, and backup verification."""
