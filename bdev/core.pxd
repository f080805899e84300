# The block-device layer's C-level interface (see core.pyx): the I/O object, bdevs, descriptors
# and per-thread channels, and the functions modules and engines call without the GIL.
from cpython.ref cimport PyObject
from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from env.histogram cimport Histogram
from env.thread cimport IoChannel, IoDevice, Poller
from nvme.spec cimport nvme_cqe

cdef enum:
    BDEV_IO_READ = 1
    BDEV_IO_WRITE = 2
    BDEV_IO_WRITE_ZEROES = 3
    BDEV_IO_UNMAP = 4
    BDEV_IO_FLUSH = 5
    BDEV_IO_RESET = 6
    BDEV_IO_COMPARE = 7
    BDEV_IO_NTYPES = 8

cdef enum:
    IO_PENDING = 0
    IO_SUCCESS = 1
    IO_FAILED = 2
    IO_NOMEM = 3              # the module is out of resources: queued and retried by the layer
    IO_NVME_ERROR = 4         # failed with an NVMe status (kept in nvme_status / nvme_cdw0)
    IO_MISCOMPARE = 5
    IO_ABORTED = 6

cdef enum:                    # bdev_io.flags
    IOF_IN_SUBMIT = 1         # completing now would recurse into the submitter: defer
    IOF_CHILD = 2
    IOF_PARENT = 4
    IOF_PY = 8                # a Python callback and Python buffer references
    IOF_BOUNCE = 16           # data goes through io.bounce_ref (copied in/out)
    IOF_OWN_IOVS = 32         # io.iovs was malloc()ed for this I/O (freed at completion)
    IOF_EMULATED = 64         # write_zeroes done as writes of zeroes

cdef struct bdev_io
ctypedef void (*bdev_io_cb)(bdev_io* io, bint success, void* cb_arg) noexcept nogil

cdef struct bdev_io:
    void* bdev                # Bdev (borrowed: the descriptor keeps it alive)
    void* channel             # BdevChannel (borrowed)
    uint8_t type
    uint8_t status
    uint16_t flags
    uint16_t nvme_status      # the CQE status field without the phase bit (SCT/SC/CRD/M/DNR)
    uint32_t nvme_cdw0
    uint64_t offset_blocks
    uint64_t num_blocks
    iovec* iovs               # what the module transfers: &iov, a caller's array or the bounce
    uint32_t iovcnt
    iovec iov
    iovec* user_iovs          # the caller's iovec when bouncing (copied back for reads)
    iovec user_iov            # the caller's single segment, when it had one
    uint32_t user_iovcnt
    bdev_io_cb cb
    void* cb_arg
    PyObject* py_cb
    PyObject* py_ref          # keeps the caller's buffer object alive
    PyObject* bounce_ref      # the DmaBuffer used as bounce buffer, if any
    uint64_t submit_tick
    bdev_io* parent
    uint32_t children_left
    uint32_t index            # position in the channel's array (for side tables)
    uint8_t child_status
    uint16_t child_nvme_status
    int32_t error             # errno of a module refusal or failure (0: none)
    uint64_t split_next       # parent: next block to issue
    bdev_io* next             # free list / deferred completions / NOMEM queue
    uint64_t driver_ctx[8]    # for the module (64 bytes)

cdef struct bdev_stats:
    uint64_t bytes_read
    uint64_t num_read_ops
    uint64_t bytes_written
    uint64_t num_write_ops
    uint64_t bytes_unmapped
    uint64_t num_unmap_ops
    uint64_t read_latency_ticks
    uint64_t max_read_latency_ticks
    uint64_t min_read_latency_ticks
    uint64_t write_latency_ticks
    uint64_t max_write_latency_ticks
    uint64_t min_write_latency_ticks
    uint64_t unmap_latency_ticks
    uint64_t max_unmap_latency_ticks
    uint64_t min_unmap_latency_ticks
    uint64_t num_other_ops          # write zeroes, flush, reset, compare
    uint64_t io_errors
    uint64_t nomem_retries


cdef class Bdev(IoDevice):
    cdef readonly str name
    cdef readonly uint32_t block_size
    cdef readonly uint32_t block_shift
    cdef readonly uint64_t num_blocks
    cdef readonly uint32_t write_unit_size      # blocks
    cdef readonly uint32_t optimal_io_boundary  # blocks (0: none)
    cdef readonly bint split_on_optimal_io_boundary
    cdef readonly uint64_t max_transfer_blocks  # per I/O the module takes (0: unlimited)
    cdef readonly uint32_t required_alignment   # bytes a buffer address must be aligned to
    cdef readonly bint dma_required             # buffers must be DMA-registered (a real device)
    cdef readonly uint32_t md_size
    cdef readonly str product_name
    cdef readonly object uuid
    cdef readonly list aliases
    cdef readonly object module                 # the module's name ("malloc", "nvme"...)
    cdef uint32_t supported_types               # bit per BDEV_IO_* type
    cdef uint64_t fast_max_blocks               # reads/writes up to this size never split
    cdef uint64_t align_mask                    # required_alignment - 1
    cdef readonly bint removed
    cdef list _descs
    cdef object _claim
    cdef bint _histograms
    cdef bdev_stats _retired                    # statistics of channels already destroyed
    cdef Histogram _retired_hist

    # The module interface (C level; subclasses override). submit_request starts the I/O and
    # returns 0 (it will be completed with bdev_io_complete, now or later), -ENOMEM (retry
    # later), or another negative errno (the I/O fails).
    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil
    # Reap completions of this channel (called by the channel's poller); returns work done.
    cdef int poll_channel(self, BdevChannel ch) noexcept nogil
    cdef inline bint supports(self, uint8_t t) noexcept nogil:
        return (self.supported_types >> t) & 1


cdef class BdevChannel(IoChannel):
    cdef Bdev bdev
    cdef bdev_io* ios
    cdef bdev_io* free_ios
    cdef uint32_t nios
    cdef uint32_t nfree
    cdef bdev_io* done_head                     # completed inside submit: finished by the poller
    cdef bdev_io* done_tail
    cdef bdev_io* nomem_head                    # refused by the module for lack of resources
    cdef bdev_io* nomem_tail
    cdef uint32_t in_module                     # I/Os handed to the module, not yet completed
    cdef bdev_stats counters
    cdef Histogram histogram                    # None unless histograms are enabled
    cdef Poller poller

    cdef bdev_io* get_io(self) noexcept nogil
    cdef void put_io(self, bdev_io* io) noexcept nogil
    cdef int poll(self) noexcept nogil


cdef class Descriptor:
    cdef readonly Bdev bdev
    cdef readonly bint writable
    cdef readonly bint closed
    cdef uint32_t io_mask                       # bit per BDEV_IO_* type it may submit now
    cdef object event_cb
    cdef object __weakref__
    cdef bdev_io* _take_io(self, BdevChannel c, uint8_t t, uint64_t offset_blocks,
                           uint64_t num_blocks) except NULL


# ---- C-level functions --------------------------------------------------------------------------
cdef int bdev_submit(Descriptor desc, BdevChannel ch, uint8_t type, char* buf,
                     uint64_t offset_blocks, uint64_t num_blocks, bdev_io_cb cb,
                     void* cb_arg) noexcept nogil
cdef int bdev_submitv(Descriptor desc, BdevChannel ch, uint8_t type, iovec* iovs,
                      uint32_t iovcnt, uint64_t offset_blocks, uint64_t num_blocks,
                      bdev_io_cb cb, void* cb_arg) noexcept nogil
cdef void bdev_io_complete(bdev_io* io, uint8_t status) noexcept nogil
# Complete with an NVMe completion (status kept). Its signature is an NVMe queue pair's
# completion callback (nvme.qpair.nvme_cb, cb_arg = the bdev_io): a module hands it straight
# to the driver, no hop in between.
cdef void bdev_io_nvme_cpl(void* io, const nvme_cqe* cpl) noexcept nogil
