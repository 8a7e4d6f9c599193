"""Chunk decompression into a caller's buffer: liblz4's block API, the GIL released.

The compiled half of ``engine.codec`` (the pure-Python twin, ``engine._codec_py``, is
the specification: same results, same refusals). ``lz4_decompress_into`` decompresses
one LZ4 block (no size prefix, as ``lz4.block.compress(store_size=False)`` writes it)
into ``out`` and returns how many bytes it wrote (the bytes after them in ``out`` are
unspecified: liblz4's wild copies may write there), or -1 when the input is corrupt or
does not fit ``out``. It never writes past ``len(out)`` (``LZ4_decompress_safe`` with
the capacity of ``out``; after a refusal part of ``out`` may be written) and allocates nothing: the caller reuses ``out``.

The GIL is released only around the C call (borg ``compress.pyx``): the arguments are
typed memoryviews, whose buffers the caller keeps alive and exported for the call's
duration, so another thread can neither free nor resize them meanwhile (a bytearray
with an export refuses to resize).
"""
cimport cython
from libc.limits cimport INT_MAX


cdef extern from "lz4.h" nogil:
    int LZ4_decompress_safe(const char* src, char* dst, int compressedSize, int dstCapacity)
    int LZ4_versionNumber()


IMPLEMENTATION = "cython"
LZ4_VERSION = LZ4_versionNumber()


@cython.boundscheck(False)
@cython.wraparound(False)
def lz4_decompress_into(const unsigned char[::1] src not None, unsigned char[::1] out not None) -> int:
    """Decompress the LZ4 block ``src`` into ``out``: bytes written, or -1 if corrupt."""
    cdef Py_ssize_t slen = src.shape[0]
    cdef Py_ssize_t olen = out.shape[0]
    cdef int n
    cdef char dummy = 0
    cdef char* dst = &dummy
    if slen > INT_MAX or olen > INT_MAX:
        raise ValueError("an LZ4 block is at most 2 GiB")
    if slen == 0:
        return -1  # liblz4 and python-lz4 both refuse an empty block
    if olen:  # the bounds are checked here, once: src is not empty, out only when it is not
        dst = <char*>&out[0]
    with nogil:
        n = LZ4_decompress_safe(<const char*>&src[0], dst, <int>slen, <int>olen)
    return n if n >= 0 else -1
