"""The errors instantnfs expects, in one small hierarchy.

An expected error is something a user or an operator can cause and fix (a bad path, a
locked repository, a corrupt chunk); its message says what happened and what to do,
and the command line prints it as one line and exits non-zero. A bug is never one of
these: it propagates as itself and is logged with its traceback.

Each class's docstring is its default message.
"""
from __future__ import annotations


class InstantNFSError(Exception):
    """instantnfs failed."""

    exit_code = 2

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(InstantNFSError):
    """Invalid arguments."""


class RepositoryError(InstantNFSError):
    """The repository cannot be used."""


class RepositoryNotFound(RepositoryError):
    """No instantnfs repository at this path."""


class RepositoryVersionError(RepositoryError):
    """The repository was written by a newer or unknown format version."""


class RepositoryLocked(RepositoryError):
    """The repository is locked by another writer."""


class PointPinned(RepositoryError):
    """The restore point is published (pinned) and cannot be deleted."""


class NotFound(InstantNFSError):
    """No such object."""


class SourceError(InstantNFSError):
    """The backup source cannot be read."""


class ChangedExtentsError(UsageError):
    """The changed-extents list is invalid."""


class IntegrityError(InstantNFSError):
    """Stored data failed its integrity check."""

    exit_code = 3


class NoSpace(InstantNFSError):
    """No space left on the device."""


class WriteCacheError(InstantNFSError):
    """The write cache cannot be used (damaged, of another disk, or in use by another process)."""


class FileTooLarge(InstantNFSError):
    """The write goes past the end of the disk, whose size is fixed."""


class DatastoreError(InstantNFSError):
    """The datastore refused the operation."""


class StaleHandle(DatastoreError):
    """The file handle refers to a file or session that no longer exists."""


class BadHandle(DatastoreError):
    """The file handle is not one this server issued."""


class BadCookie(DatastoreError):
    """The directory changed since the listing began: restart it."""


class TooSmall(DatastoreError):
    """The reply size the client allows cannot hold one directory entry."""


class BadType(DatastoreError):
    """This type of special file cannot be created here."""


class SessionError(UsageError):
    """The session cannot be published or changed."""


class PortInUse(InstantNFSError):
    """A fixed network port is already in use."""


class Cancelled(InstantNFSError):
    """The job was cancelled; it left nothing behind."""


class OutputRefused(UsageError):
    """The export output is not allowed: it must be a new file in one of the export directories."""


class GuestBuildError(InstantNFSError):
    """The test guest could not be built (a tool, the kernel or its modules missing)."""


class VMError(InstantNFSError):
    """The virtual machine cannot be started or controlled."""


class QMPError(VMError):
    """QEMU refused a monitor (QMP) command."""

    def __init__(self, message: str | None = None, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class VMTimeout(VMError):
    """The virtual machine did not reach the expected state in time."""
