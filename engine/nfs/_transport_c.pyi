# The compiled transports are engine/nfs/transport.py itself, built by Cython.
from engine.nfs.transport import ConnectionLimits as ConnectionLimits
from engine.nfs.transport import RpcDatagramProtocol as RpcDatagramProtocol
from engine.nfs.transport import RpcStreamProtocol as RpcStreamProtocol
