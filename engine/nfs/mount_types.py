"""MOUNT v3 wire types (RFC 1813 appendix I): procedures, statuses, the mount results.

Declarations only, in the RFC's spelling; ``engine.nfs.mount`` serves them.
"""
from __future__ import annotations

from enum import IntEnum

from engine.nfs.xdr import Array, Enum, List, Opaque, String, Struct, Union, uint32, void

MOUNT_PROGRAM = 100005
MOUNT_V3 = 3

MNTPATHLEN = 1024
MNTNAMLEN = 255
FHSIZE3 = 64


class mountstat3(IntEnum):
    MNT3_OK = 0
    MNT3ERR_PERM = 1
    MNT3ERR_NOENT = 2
    MNT3ERR_IO = 5
    MNT3ERR_ACCES = 13
    MNT3ERR_NOTDIR = 20
    MNT3ERR_INVAL = 22
    MNT3ERR_NAMETOOLONG = 63
    MNT3ERR_NOTSUPP = 10004
    MNT3ERR_SERVERFAULT = 10006


class MOUNTPROC3(IntEnum):
    NULL = 0
    MNT = 1
    DUMP = 2
    UMNT = 3
    UMNTALL = 4
    EXPORT = 5


# dirpath<MNTPATHLEN>: a longer path still decodes, so MNT can answer MNT3ERR_NAMETOOLONG
dirpath = String(0xFFFFFFFF, "dirpath")
name = String(MNTNAMLEN, "name")
fhandle3 = Opaque(FHSIZE3, "fhandle3")
mountres3_ok = Struct("mountres3_ok", [("fhandle", fhandle3), ("auth_flavors", Array(uint32, 64))])
mountres3 = Union("mountres3", Enum(mountstat3), {mountstat3.MNT3_OK: mountres3_ok}, void)
mountbody = Struct("mountbody", [("ml_hostname", name), ("ml_directory", dirpath)])
mountlist = List(mountbody)
groupnode = Struct("groupnode", [("gr_name", name)])
exportnode = Struct("exportnode", [("ex_dir", dirpath), ("ex_groups", List(groupnode))])
exports = List(exportnode)
