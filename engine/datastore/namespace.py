"""The datastore as NFS sees it: one object that resolves handles and routes each
operation to the room that does it.

``Datastore`` composes the rooms of ``engine.datastore`` over one ``engine.stack.Stack``:
``Sessions`` (publish, restore, unpublish, the pools), ``Handles`` (encode, resolve),
``ClientFiles`` (names and real files) and ``DiskFiles`` (the virtual disk files). Each
file operation goes by the node's kind: ``VDISK`` to the disk files, anything else to
the client files; nothing else is decided here. An operation only one room does is that
room's bound method itself (``ds.lookup is ds.files.lookup``), so a call crosses into
the room that does the work without a frame here. It is the only interface the protocol
layer (``engine.nfs``), the jobs and the control API use.
"""
from __future__ import annotations

import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from engine.datastore.clientfs import ClientFiles
from engine.datastore.diskfile import DiskFiles
from engine.datastore.handles import Handles
from engine.datastore.nodes import ROOT, VDISK, Attr, Node, SetAttr
from engine.datastore.sessions import DEFAULT_RESERVE, Sessions, session_report
from engine.stack import Stack


class Datastore:
    """The published sessions of one repository, and every file operation on them."""

    def __init__(self, stack: Stack, cache_dir: str | os.PathLike, write_dir: str | os.PathLike | None = None,
                 reserve: int = DEFAULT_RESERVE) -> None:
        self.stack = stack
        self.repo = stack.repo
        self.registry = Sessions(stack, cache_dir, write_dir, reserve)
        self.sessions = self.registry.by_name  # name -> Session, changed on the loop only
        self.handles = Handles(self.registry.by_sid)
        self.files = ClientFiles(self.registry)
        self.disks = DiskFiles(self.registry)
        self.write_verf = self.registry.write_verf  # new at each start, fixed while it runs
        # what only one room does is that room's method itself: no frame of its own here
        self.close = self.registry.close
        self.aclose = self.registry.aclose
        self.publish = self.registry.publish
        self.apublish = self.registry.apublish
        self.unpublish = self.registry.unpublish
        self.aunpublish = self.registry.aunpublish
        self.session_json = session_report
        self.handle = self.handles.encode
        self.resolve = self.handles.resolve
        self.lookup = self.files.lookup
        self.parent = self.files.parent
        self.create = self.files.create
        self.mkdir = self.files.mkdir
        self.symlink = self.files.symlink
        self.mknod = self.files.mknod
        self.readlink = self.files.readlink
        self.remove = self.files.remove
        self.rmdir = self.files.rmdir
        self.rename = self.files.rename
        self.link = self.files.link
        self.listdir = self.files.listdir
        self.check_cookie = self.files.check_cookie

    # -- lifetime and sessions (see engine.datastore.sessions) ------------------------------

    def load(self) -> None:
        self.registry.load()
        self.handles.secret = self.registry.state.secret

    @property
    def cache_dir(self) -> Path:
        return self.registry.cache_dir

    @property
    def fsid(self) -> int:
        return self.registry.fsid

    @property
    def daemon_id(self) -> str:
        return self.registry.daemon_id

    @staticmethod
    def root() -> Node:
        return Node(ROOT)

    # -- by node kind ------------------------------------------------------------------------

    def getattr(self, node: Node) -> Attr:
        if node.kind == VDISK:
            return self.disks.getattr(node)
        if node.kind == ROOT:
            return self.files.root_attr()
        return self.files.getattr(node)

    def setattr(self, node: Node, sa: SetAttr) -> None:
        if node.kind == VDISK:
            self.disks.setattr(node, sa)
        else:
            self.files.setattr(node, sa)

    def access(self, node: Node) -> tuple[bool, bool, bool]:
        """(readable, writable, lookup/executable) for any client allowed in."""
        if node.kind == ROOT:
            return True, False, True
        if node.kind == VDISK:
            return True, True, False
        return self.files.access(node)

    def fsstat(self, node: Node) -> os.statvfs_result:
        """The volume a node's writes go to: its session's write caches, else the cache dir."""
        if node.session is not None:
            return os.statvfs(node.session.cache_parent)
        return os.statvfs(self.cache_dir)

    # the data calls hand back the room's own coroutine: no coroutine of their own here

    def read(self, node: Node, offset: int, count: int) -> Coroutine[Any, Any, tuple[list[Any], int, bool]]:
        """(buffers, total length, eof), awaited."""
        if node.kind == VDISK:
            return self.disks.read(node, offset, count)
        return self.files.read(node, offset, count)

    def write(self, node: Node, offset: int, data: Any, stable: int) -> Coroutine[Any, Any, tuple[int, int]]:
        """Write; ``stable`` is the stable_how value asked (0 UNSTABLE, 1 DATA_SYNC,
        2 FILE_SYNC). Awaited: (bytes written, the stable_how the data reached)."""
        if node.kind == VDISK:
            return self.disks.write(node, offset, data, stable)
        return self.files.write(node, offset, data, stable)

    def commit(self, node: Node) -> Coroutine[Any, Any, None]:
        if node.kind == VDISK:
            return self.disks.commit(node)
        return self.files.commit(node)


