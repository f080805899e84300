# cython: language_level=3
"""The C-level submission entry (`bdev_submit`) as a Cython caller meets it, for tests: its
return codes and its completions, without the perf engine around it."""
from libc.stdint cimport uint8_t, uint64_t

from bdev.core cimport BdevChannel, Descriptor, bdev_io, bdev_submit
from env.memory cimport DmaBuffer

from bdev.core import IO_TYPES


cdef struct counts:
    uint64_t completed
    uint64_t succeeded


cdef class CSubmitter:
    """`submit(desc, ch, io_type, offset_blocks, num_blocks, buf=None, offset_in_buf=0)` calls
    bdev_submit with a C callback and returns its rc (0 or a negative errno); `completed` and
    `succeeded` count the callbacks."""
    cdef counts c

    @property
    def completed(self):
        return self.c.completed

    @property
    def succeeded(self):
        return self.c.succeeded

    def submit(self, Descriptor desc, BdevChannel ch, io_type, uint64_t offset_blocks,
               uint64_t num_blocks, DmaBuffer buf=None, size_t offset_in_buf=0):
        cdef uint8_t t = IO_TYPES[io_type]
        cdef char* p = NULL
        if buf is not None:
            p = buf.data() + offset_in_buf
        return bdev_submit(desc, ch, t, p, offset_blocks, num_blocks, _done, &self.c)


cdef void _done(bdev_io* io, bint success, void* arg) noexcept nogil:
    cdef counts* c = <counts*> arg
    c.completed += 1
    if success:
        c.succeeded += 1
