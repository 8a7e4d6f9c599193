"""Chunk decompression into a caller's buffer: liblz4's block API, the GIL released.

The compiled half of ``engine.codec`` (the pure-Python twin, ``engine._codec_py``, is
the specification: same results, same refusals). ``lz4_decompress_into`` decompresses
one LZ4 block (no size prefix, as ``lz4.block.compress(store_size=False)`` writes it)
into ``out`` and returns how many bytes it wrote (the bytes after them in ``out`` are
unspecified: liblz4's wild copies may write there), or -1 when the input is corrupt or
does not fit ``out``. It never writes past ``len(out)`` (``LZ4_decompress_safe`` with
the capacity of ``out``; after a refusal part of ``out`` may be written) and allocates nothing: the caller reuses ``out``.

``new_block`` makes the buffers a cache fills: uninitialised (every byte is written
before anyone reads it) and populated in one system call.

The GIL is released only around the C call (borg ``compress.pyx``): the arguments are
typed memoryviews, whose buffers the caller keeps alive and exported for the call's
duration, so another thread can neither free nor resize them meanwhile (a bytearray
with an export refuses to resize).
"""
cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from libc.limits cimport INT_MAX
from libc.stdint cimport uintptr_t


cdef extern from "sys/mman.h" nogil:
    int madvise(void* addr, size_t length, int advice)


cdef int MADV_POPULATE_WRITE = 23  # Linux 5.14; older kernels refuse it (EINVAL): harmless
cdef uintptr_t PAGE = 4096


cdef extern from "lz4.h" nogil:
    int LZ4_decompress_safe(const char* src, char* dst, int compressedSize, int dstCapacity)
    int LZ4_versionNumber()


IMPLEMENTATION = "cython"


def new_block(Py_ssize_t size) -> bytearray:
    """A bytearray of ``size`` bytes for a block to be written in full (not zeroed): its
    pages are faulted in by one ``madvise(MADV_POPULATE_WRITE)`` instead of one page
    fault each, which on this project's VMs costs more than the LZ4 decompression."""
    cdef bytearray buf = PyByteArray_FromStringAndSize(NULL, size)
    cdef uintptr_t start, lo, hi
    if size >= 2 * <Py_ssize_t>PAGE:
        start = <uintptr_t>PyByteArray_AS_STRING(buf)
        lo = (start + PAGE - 1) & ~(PAGE - 1)
        hi = (start + <uintptr_t>size) & ~(PAGE - 1)
        with nogil:
            madvise(<void*>lo, hi - lo, MADV_POPULATE_WRITE)  # only a hint: errors ignored
    return buf
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
