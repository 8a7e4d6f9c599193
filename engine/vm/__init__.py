"""Running guests: the VMs the daemon boots out of its sessions, supervises and migrates.

Design: QEMU does the work (it opens the disks itself, ``nfs://`` URLs of our own NFS
server or local files, and mirrors them live); this room builds its command lines,
talks to it over QMP, and keeps the books so that a VM outlives the daemon that started
it (its own session, its state on disk) and comes back under the next one. Nothing here
runs on the daemon's event loop: every call blocks, with a timeout or a cancel event,
and the daemon calls from its worker threads. The room sits beside ``engine.nfs``
(``.importlinter``): it may use the storage rooms and the foundations, never the jobs,
the control room or the NFS server; the daemon wires it (``Supervisor.adopt`` after the
NFS services start, ``resume_paused`` periodically, ``close`` at stop).

Modules:

- ``qemu``: ``DiskSpec``/``VMSpec``, the QEMU command line per bus, firmware and network,
  and ``accel_verdict`` (KVM or TCG, by a short probe, remembered).
- ``qmp``: a small blocking QMP client (commands with timeouts, buffered events).
- ``supervisor``: ``Supervisor``/``VM``: start, list, stop, remove, adopt after a
  restart, resume after an I/O-error pause, wait for console lines.
- ``migrate``: ``mirror``, a disk's live copy to production storage and the pivot to it.
- ``guest``: the small bootable test guest (the demo's VM, the end-to-end tests'):
  built without root or mounts, booting from its own disk under SeaBIOS or OVMF on any
  bus, told what to do through QEMU's fw_cfg, speaking in console markers.
- ``verify``: backup verification without the boot (every chunk, the filesystems, the
  files behind a bad block), the checker's tests and the report; the boot is the caller's.
"""
