# cython: language_level=3
"""For tests, at C level: the submission entry (`bdev_submit`) as a Cython caller meets it (its
return codes and its completions, without the perf engine around it), and a module that looks
at its per-I/O context (`CtxProbeBdev`)."""
from libc.errno cimport EFAULT, ENOMEM
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

from bdev.core cimport (IO_NOMEM, IO_SUCCESS, Bdev, BdevChannel, Descriptor, bdev_io,
                        bdev_io_complete, bdev_io_ctx, bdev_io_is_retry, bdev_submit)
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


# ---- a module that looks at its per-I/O context --------------------------------------------------
cdef enum:
    PROBE_MAX_RECORDS = 256
    REFUSE_ENOMEM = 1             # submit_request returns -ENOMEM
    REFUSE_NOMEM_STATUS = 2       # the I/O completes with IO_NOMEM
    REFUSE_EFAULT = 3             # submit_request returns -EFAULT (the layer bounces)


cdef struct probe_record:
    bint retry                    # bdev_io_is_retry
    bint zero                     # the first ctx_size bytes were all zero
    bint aligned                  # the context is 64-byte aligned
    uint64_t marker               # its first 8 bytes (0 with a context smaller than that)


cdef class CtxProbeBdev(Bdev):
    """A module that records, per submission, what its context looked like, then writes a
    marker (how many submissions it saw) over all of it and completes the I/O, or refuses it
    as `refuse(n, how)` asked: "enomem", "nomem_status" or "efault"."""
    cdef probe_record recs[PROBE_MAX_RECORDS]
    cdef uint32_t nrecs
    cdef uint32_t refusals
    cdef int how

    def refuse(self, uint32_t n, how):
        self.refusals = n
        self.how = {"enomem": REFUSE_ENOMEM, "nomem_status": REFUSE_NOMEM_STATUS,
                    "efault": REFUSE_EFAULT}[how]

    def records(self):
        return [{"retry": bool(self.recs[i].retry), "zero": bool(self.recs[i].zero),
                 "aligned": bool(self.recs[i].aligned), "marker": self.recs[i].marker}
                for i in range(self.nrecs)]

    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil:
        cdef unsigned char* ctx = <unsigned char*> bdev_io_ctx(io)
        cdef probe_record* r
        cdef uint32_t i
        cdef uint64_t marker = 0
        if self.nrecs < PROBE_MAX_RECORDS:
            r = &self.recs[self.nrecs]
            r.retry = bdev_io_is_retry(io)
            r.aligned = (<uintptr_t> ctx) % 64 == 0
            r.zero = True
            for i in range(self.ctx_size):
                if ctx[i]:
                    r.zero = False
            if self.ctx_size >= sizeof(uint64_t):
                memcpy(&marker, ctx, sizeof(uint64_t))
            r.marker = marker
        self.nrecs += 1
        if self.ctx_size:
            memset(ctx, 0xA5, self.ctx_size)
            if self.ctx_size >= sizeof(uint64_t):
                marker += 1
                memcpy(ctx, &marker, sizeof(uint64_t))
        if self.refusals:
            self.refusals -= 1
            if self.how == REFUSE_ENOMEM:
                return -ENOMEM
            if self.how == REFUSE_EFAULT:
                return -EFAULT
            bdev_io_complete(io, IO_NOMEM)
            return 0
        bdev_io_complete(io, IO_SUCCESS)
        return 0
