from libc.stdint cimport int64_t, uint64_t

cdef class BlockMap:
    cdef readonly object entries
    cdef object _wordarr
    cdef const uint64_t* _w
    cdef readonly int64_t block_size
    cdef readonly int64_t disk_size
    cdef readonly int shift
    cdef int64_t _nblocks
