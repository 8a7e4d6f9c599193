"""The NFSv3 server: XDR, ONC RPC transport, portmapper, MOUNT v3 and NFSv3."""
