"""Running guests: the test guest, QEMU, supervised VMs, live mirror, verification."""
