"""File-level recovery: the guest filesystems of a restore point, read in-process.

``volumes`` finds partitions and LVM volumes on a point's disks, ``fs`` opens a
filesystem on one through pytsk3, ``extract`` writes files out safely, and ``point``
ties them to a restore point for the CLI (``engine.control.files_cli``). This room sits
beside the datastore and export, above ``engine.stack``: it reads disks as everything
else does and knows nothing of NFS.
"""
