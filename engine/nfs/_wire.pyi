# The compiled codec has the signatures of its pure-Python twin (the specification).
from engine.nfs._wire_py import (
    access_args as access_args,
)
from engine.nfs._wire_py import (
    access_reply as access_reply,
)
from engine.nfs._wire_py import (
    call_head as call_head,
)
from engine.nfs._wire_py import (
    commit_reply as commit_reply,
)
from engine.nfs._wire_py import (
    fh_arg as fh_arg,
)
from engine.nfs._wire_py import (
    getattr_reply as getattr_reply,
)
from engine.nfs._wire_py import (
    lookup_args as lookup_args,
)
from engine.nfs._wire_py import (
    lookup_reply as lookup_reply,
)
from engine.nfs._wire_py import (
    ok_head as ok_head,
)
from engine.nfs._wire_py import (
    pad as pad,
)
from engine.nfs._wire_py import (
    read_args as read_args,
)
from engine.nfs._wire_py import (
    read_reply_head as read_reply_head,
)
from engine.nfs._wire_py import (
    write_args as write_args,
)
from engine.nfs._wire_py import (
    write_reply as write_reply,
)
