"""Portmapper v2 and rpcbind v3/v4 wire types (RFC 1833): procedures and mapping rows.

Declarations only, in the RFC's spelling; ``engine.nfs.portmap`` serves them.
"""
from __future__ import annotations

from enum import IntEnum

from engine.nfs.xdr import List, String, Struct, uint32

PMAP_PROG = 100000
IPPROTO_TCP = 6
IPPROTO_UDP = 17


class PMAPPROC(IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETPORT = 3
    DUMP = 4
    CALLIT = 5


class RPCBPROC(IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETADDR = 3
    DUMP = 4
    CALLIT = 5
    GETTIME = 6
    UADDR2TADDR = 7
    TADDR2UADDR = 8


mapping = Struct("mapping", [("prog", uint32), ("vers", uint32), ("prot", uint32), ("port", uint32)])
pmaplist = List(mapping)
rpcb = Struct(
    "rpcb",
    [("r_prog", uint32), ("r_vers", uint32), ("r_netid", String(255)), ("r_addr", String(255)), ("r_owner", String(255))],
)
rp__list = List(rpcb)
