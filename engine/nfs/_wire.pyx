# cython: boundscheck=False, wraparound=False, cdivision=True
"""The fast lane's wire codec, compiled: the same functions and results as
``engine/nfs/_wire_py.py`` (the specification; read it first), with the call decoded
straight out of the record's buffer and each reply built in one allocation.

Every read is bounds-checked against the record's length before it is made; a call the
generic decoder would reject returns None. Buffers come in through the buffer protocol
(bytes, bytearray, memoryview: the transport hands a view of its receive buffer).
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef enum:
    MAX_AUTH = 400  # RFC 5531: an opaque_auth body is at most 400 bytes
    FHSIZE = 64  # NFS3_FHSIZE

cdef tuple _PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


cdef inline uint32_t rd32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline uint64_t rd64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>rd32(p) << 32) | rd32(p + 4)


cdef inline uint8_t* wr32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF
    return p + 4


cdef inline uint8_t* wr_bytes(uint8_t* p, bytes b, Py_ssize_t n) noexcept:
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline Py_ssize_t _opaque(const uint8_t* buf, Py_ssize_t n, Py_ssize_t pos, uint64_t maxlen, Py_ssize_t* ln) noexcept nogil:
    """The start of the opaque at ``pos`` (its length in ``ln``), or -1."""
    cdef uint64_t l
    if pos + 4 > n:
        return -1
    l = rd32(buf + pos)
    if l > maxlen or <uint64_t>(pos + 4) + l + ((-l) & 3) > <uint64_t>n:
        return -1
    ln[0] = <Py_ssize_t>l
    return pos + 4


def call_head(rec):
    cdef Py_buffer view
    cdef const uint8_t* b
    cdef Py_ssize_t n, p, q
    cdef uint32_t clen, vlen
    PyObject_GetBuffer(rec, &view, PyBUF_SIMPLE)
    try:
        b = <const uint8_t*>view.buf
        n = view.len
        if n < 40 or rd32(b + 4) != 0 or rd32(b + 8) != 2:
            return None
        clen = rd32(b + 28)
        if clen > MAX_AUTH:
            return None
        p = 32 + clen + ((-clen) & 3)
        if p + 8 > n:
            return None
        vlen = rd32(b + p + 4)
        if vlen > MAX_AUTH:
            return None
        q = p + 8 + vlen + ((-vlen) & 3)
        if q > n:
            return None
        return rd32(b), rd32(b + 12), rd32(b + 16), rd32(b + 20), rd32(b + 24), 32, 32 + <Py_ssize_t>clen, q
    finally:
        PyBuffer_Release(&view)


cdef inline object _fh(const uint8_t* b, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t* end):
    """The nfs_fh3 at ``pos`` (``end``: the position after it), or None."""
    cdef Py_ssize_t ln = 0
    cdef Py_ssize_t a = _opaque(b, n, pos, FHSIZE, &ln)
    if a < 0:
        return None
    end[0] = a + ln + ((-ln) & 3)
    return PyBytes_FromStringAndSize(<const char*>(b + a), ln)


def fh_arg(rec, Py_ssize_t pos):
    cdef Py_buffer view
    cdef object fh
    cdef Py_ssize_t p = 0
    PyObject_GetBuffer(rec, &view, PyBUF_SIMPLE)
    try:
        fh = _fh(<const uint8_t*>view.buf, view.len, pos, &p)
        if fh is None:
            return None
        return fh, p
    finally:
        PyBuffer_Release(&view)


def read_args(rec, Py_ssize_t pos):
    cdef Py_buffer view
    cdef const uint8_t* b
    cdef object fh
    cdef Py_ssize_t p = 0
    PyObject_GetBuffer(rec, &view, PyBUF_SIMPLE)
    try:
        b = <const uint8_t*>view.buf
        fh = _fh(b, view.len, pos, &p)
        if fh is None or p + 12 > view.len:
            return None
        return fh, rd64(b + p), rd32(b + p + 8)
    finally:
        PyBuffer_Release(&view)


def access_args(rec, Py_ssize_t pos):
    cdef Py_buffer view
    cdef const uint8_t* b
    cdef object fh
    cdef Py_ssize_t p = 0
    PyObject_GetBuffer(rec, &view, PyBUF_SIMPLE)
    try:
        b = <const uint8_t*>view.buf
        fh = _fh(b, view.len, pos, &p)
        if fh is None or p + 4 > view.len:
            return None
        return fh, rd32(b + p)
    finally:
        PyBuffer_Release(&view)


def lookup_args(rec, Py_ssize_t pos):
    cdef Py_buffer view
    cdef const uint8_t* b
    cdef object fh
    cdef Py_ssize_t p = 0, a, ln = 0
    PyObject_GetBuffer(rec, &view, PyBUF_SIMPLE)
    try:
        b = <const uint8_t*>view.buf
        fh = _fh(b, view.len, pos, &p)
        if fh is None:
            return None
        a = _opaque(b, view.len, p, 0xFFFFFFFF, &ln)
        if a < 0:
            return None
        return fh, PyBytes_FromStringAndSize(<const char*>(b + a), ln)
    finally:
        PyBuffer_Release(&view)


def write_args(rec, Py_ssize_t pos):
    cdef Py_buffer view
    cdef const uint8_t* b
    cdef object fh
    cdef Py_ssize_t p = 0, a, ln = 0
    cdef int32_t stable
    PyObject_GetBuffer(rec, &view, PyBUF_SIMPLE)
    try:
        b = <const uint8_t*>view.buf
        fh = _fh(b, view.len, pos, &p)
        if fh is None or p + 16 > view.len:
            return None
        stable = <int32_t>rd32(b + p + 12)
        if stable < 0 or stable > 2:
            return None
        a = _opaque(b, view.len, p + 16, 0xFFFFFFFF, &ln)
        if a < 0:
            return None
        return fh, rd64(b + p), rd32(b + p + 8), stable, a, ln
    finally:
        PyBuffer_Release(&view)


# -- replies ------------------------------------------------------------------------------

cdef inline uint8_t* _head(uint8_t* p, uint32_t xid) noexcept:
    p = wr32(p, xid)
    p = wr32(p, 1)  # REPLY
    memset(p, 0, 20)  # MSG_ACCEPTED, AUTH_NONE verifier (flavor, length 0), SUCCESS, NFS3_OK
    return p + 20


cdef inline Py_ssize_t _optlen(object v, Py_ssize_t size) except -1:
    if v is None:
        return 4
    if len(<bytes>v) != size:
        raise ValueError(f"a packed attribute of {len(<bytes>v)} bytes, not {size}")
    return 4 + size


cdef inline uint8_t* _opt(uint8_t* p, object v, Py_ssize_t size) noexcept:
    if v is None:
        return wr32(p, 0)
    p = wr32(p, 1)
    return wr_bytes(p, <bytes>v, size)


cdef inline bytes _new(Py_ssize_t n, uint8_t** p):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    p[0] = <uint8_t*>PyBytes_AS_STRING(out)
    return out


def ok_head(uint32_t xid):
    cdef uint8_t* p
    cdef bytes out = _new(28, &p)
    _head(p, xid)
    return out


def getattr_reply(uint32_t xid, bytes fattr not None):
    cdef uint8_t* p
    if len(fattr) != 84:
        raise ValueError("a packed fattr3 is 84 bytes")
    cdef bytes out = _new(28 + 84, &p)
    wr_bytes(_head(p, xid), fattr, 84)
    return out


def read_reply_head(uint32_t xid, fattr, uint32_t count, bint eof):
    cdef uint8_t* p
    cdef bytes out = _new(28 + _optlen(fattr, 84) + 12, &p)
    p = _opt(_head(p, xid), fattr, 84)
    p = wr32(p, count)
    p = wr32(p, 1 if eof else 0)
    wr32(p, count)
    return out


def pad(Py_ssize_t n):
    return _PADS[n & 3]


def access_reply(uint32_t xid, fattr, uint32_t access):
    cdef uint8_t* p
    cdef bytes out = _new(28 + _optlen(fattr, 84) + 4, &p)
    p = _opt(_head(p, xid), fattr, 84)
    wr32(p, access)
    return out


def lookup_reply(uint32_t xid, bytes fh not None, fattr, dir_fattr):
    cdef uint8_t* p
    cdef Py_ssize_t ln = len(fh)
    cdef Py_ssize_t padded = ln + ((-ln) & 3)
    cdef bytes out = _new(28 + 4 + padded + _optlen(fattr, 84) + _optlen(dir_fattr, 84), &p)
    p = wr32(_head(p, xid), <uint32_t>ln)
    p = wr_bytes(p, fh, ln)
    memset(p, 0, padded - ln)
    p += padded - ln
    p = _opt(p, fattr, 84)
    _opt(p, dir_fattr, 84)
    return out


def write_reply(uint32_t xid, before, fattr, uint32_t count, int32_t committed, bytes verf not None):
    cdef uint8_t* p
    if len(verf) != 8:
        raise ValueError("a write verifier is 8 bytes")
    cdef bytes out = _new(28 + _optlen(before, 24) + _optlen(fattr, 84) + 16, &p)
    p = _opt(_head(p, xid), before, 24)
    p = _opt(p, fattr, 84)
    p = wr32(p, count)
    p = wr32(p, <uint32_t>committed)
    wr_bytes(p, verf, 8)
    return out


def commit_reply(uint32_t xid, before, fattr, bytes verf not None):
    cdef uint8_t* p
    if len(verf) != 8:
        raise ValueError("a write verifier is 8 bytes")
    cdef bytes out = _new(28 + _optlen(before, 24) + _optlen(fattr, 84) + 8, &p)
    p = _opt(_head(p, xid), before, 24)
    p = _opt(p, fattr, 84)
    wr_bytes(p, verf, 8)
    return out
