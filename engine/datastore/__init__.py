"""The datastore: the namespace NFS clients see, over the published restore points.

::

    /                               the export root: one directory per published session
    /<session>/<vm>.vmx             generated at publish, then an ordinary file
    /<session>/<disk>.vmdk          generated descriptor (createType "vmfs"), ordinary file
    /<session>/<disk>-flat.vmdk     the disk, backed by the restore point (read-only here)
    /<session>/<disk>.img           the same disk for QEMU/KVM
    /<session>/...                  whatever the client creates: ordinary files and dirs

One room per job:

=============  ==========================================================================
namespace.py   ``Datastore``: resolves handles, routes each operation by node kind
sessions.py    publish, restore at start, unpublish; pins; the pools
state.py       state.json (secret, session ids, the sessions to bring back)
handles.py     file handles: MAC, encode, resolve; each session's handle table
clientfs.py    the names, and the real files clients make (never through a symlink)
diskfile.py    the virtual disk files: reads, writes, commits, attributes
vmware.py      the generated ``.vmx`` and ``.vmdk`` texts
nodes.py       ``Node``, ``Attr``, ``SetAttr``, the kinds and the limits
=============  ==========================================================================

Errors are ``OSError`` with the errno a local filesystem would give (EROFS, EEXIST,
ENOTDIR, ...) or the ``engine.errors`` datastore errors; ``engine.nfs`` maps both to
``nfsstat3`` in one function. The namespace changes on the event loop thread only, so it
needs no lock; nothing there blocks (see ``sessions`` for which pool runs what).
"""
from engine.datastore.namespace import Datastore
from engine.datastore.nodes import (
    MAX_FILE_SIZE,
    NOW,
    REAL,
    ROOT,
    VDISK,
    VIRTUAL_FILEID,
    Attr,
    GiB,
    Node,
    Session,
    SetAttr,
)
from engine.datastore.sessions import MODES

__all__ = [
    "MAX_FILE_SIZE", "MODES", "NOW", "REAL", "ROOT", "VDISK", "VIRTUAL_FILEID",
    "Attr", "Datastore", "GiB", "Node", "Session", "SetAttr",
]
