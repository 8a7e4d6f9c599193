"""The control tests use the NFS tests' daemons and generated repository (tests/nfs/conftest.py)."""
from tests.nfs.conftest import daemon_factory, images  # noqa: F401 - fixtures, used by name
