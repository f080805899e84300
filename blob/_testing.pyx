# cython: language_level=3
"""The C-level entry (`blob_submit` / `blob_submitv`) as a Cython caller - the perf engine, an
lvol bdev - meets it, for tests: return codes, completions and statuses, no Python per I/O."""
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from posix.uio cimport iovec

from blob.io cimport BlobChannel, BlobData, blob_submit, blob_submitv
from env.memory cimport DmaBuffer

from blob.io import IO_TYPES


cdef struct counts:
    uint64_t completed
    uint64_t succeeded
    int32_t last_status


cdef void _done(void* arg, int status) noexcept nogil:
    cdef counts* c = <counts*> arg
    c.completed += 1
    c.last_status = status
    if status == 0:
        c.succeeded += 1


cdef class CSubmitter:
    """`submit(ch, blob_data, io_type, offset, num, buf=None, at=0)` and `submitv(ch, blob_data,
    io_type, offset, buf, lengths)` call the C entries with a C callback and return their rc;
    `completed`, `succeeded` and `last_status` count the callbacks."""
    cdef counts c
    cdef iovec* iovs

    def __dealloc__(self):
        free(self.iovs)

    @property
    def completed(self):
        return self.c.completed

    @property
    def succeeded(self):
        return self.c.succeeded

    @property
    def last_status(self):
        return self.c.last_status

    def submit(self, BlobChannel ch, BlobData b, io_type, uint64_t offset, uint64_t num,
               DmaBuffer buf=None, size_t at=0):
        cdef char* p = buf.data() + at if buf is not None else NULL
        return blob_submit(ch, b, IO_TYPES[io_type], p, offset, num, _done, &self.c)

    def submitv(self, BlobChannel ch, BlobData b, io_type, uint64_t offset, DmaBuffer buf,
                lengths):
        """The buffer cut into segments of `lengths` bytes (kept until the next submitv)."""
        cdef size_t pos = 0
        cdef int i, n = len(lengths)
        free(self.iovs)
        self.iovs = <iovec*> malloc(n * sizeof(iovec))
        for i in range(n):
            self.iovs[i].iov_base = buf.data() + pos
            self.iovs[i].iov_len = lengths[i]
            pos += lengths[i]
        return blob_submitv(ch, b, IO_TYPES[io_type], self.iovs, n, offset,
                            pos // b.dev.desc.bdev.block_size, _done, &self.c)
