"""ONC RPC v2 message types (RFC 5531): the call and reply header enums and credentials.

Declarations only, in the RFC's spelling; ``engine.nfs.rpc`` parses and writes the
headers (with a few struct reads on its hot path) using these values.
"""
from __future__ import annotations

from enum import IntEnum

from engine.nfs.xdr import Array, Opaque, String, Struct, uint32

RPC_VERSION = 2


class msg_type(IntEnum):
    CALL = 0
    REPLY = 1


class reply_stat(IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class accept_stat(IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class reject_stat(IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class auth_stat(IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5
    AUTH_INVALIDRESP = 6
    AUTH_FAILED = 7
    AUTH_KERB_GENERIC = 8
    AUTH_TIMEEXPIRE = 9
    AUTH_TKT_FILE = 10
    AUTH_DECODE = 11
    AUTH_NET_ADDR = 12
    RPCSEC_GSS_CREDPROBLEM = 13
    RPCSEC_GSS_CTXPROBLEM = 14


class auth_flavor(IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3
    RPCSEC_GSS = 6


opaque_auth = Struct("opaque_auth", [("flavor", uint32), ("body", Opaque(400))])

authsys_parms = Struct(
    "authsys_parms",
    [
        ("stamp", uint32),
        ("machinename", String(255)),
        ("uid", uint32),
        ("gid", uint32),
        ("gids", Array(uint32, 16)),
    ],
)
