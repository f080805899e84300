# The block-device layer's C-level interface (see core.pyx): the I/O object, bdevs, descriptors
# and per-thread channels, and the functions modules and engines call without the GIL.
from cpython.ref cimport PyObject
from libc.errno cimport ENOMEM, ESHUTDOWN
from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset
from posix.uio cimport iovec

from env.histogram cimport Histogram
from env.ticks cimport get_ticks
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
    IO_REMOVED = 7            # the bdev was unregistered before the module got it (errno ENODEV)

cdef enum:                    # bdev_io.flags
    IOF_IN_SUBMIT = 1         # completing now would recurse into the submitter: defer
    IOF_CHILD = 2
    IOF_PARENT = 4
    IOF_PY = 8                # a Python callback and Python buffer references
    IOF_BOUNCE = 16           # data goes through io.bounce_ref (copied in/out)
    IOF_OWN_IOVS = 32         # io.iovs was malloc()ed for this I/O (freed at completion)
    IOF_EMULATED = 64         # write_zeroes done as writes of zeroes
    IOF_RETRY = 128           # the module saw this I/O before: the layer hands it back (NOMEM
                              # queue, bounce after -EFAULT); its context is as the module left it

# The module's per-I/O context: BDEV_IO_CTX_CAPACITY bytes at the end of every bdev_io, on a
# 64-byte boundary of its own (a cache line no layer field shares). A module declares how many
# of them it uses (Bdev ctx_size); the layer zeroes those before the module first sees an I/O,
# and leaves them alone when it hands the I/O back (IOF_RETRY). Read it with bdev_io_ctx().
cdef extern from *:
    """
    #ifndef UBLK_BDEV_IO_CTX_DEFINED
    #define UBLK_BDEV_IO_CTX_DEFINED
    #define UBLK_BDEV_IO_CTX_CAPACITY 64
    typedef struct { _Alignas(64) unsigned char bytes[UBLK_BDEV_IO_CTX_CAPACITY]; } ublk_bdev_io_ctx;
    _Static_assert(sizeof(ublk_bdev_io_ctx) == UBLK_BDEV_IO_CTX_CAPACITY,
                   "the module context is a whole number of cache lines");
    #endif
    """
    enum: BDEV_IO_CTX_CAPACITY "UBLK_BDEV_IO_CTX_CAPACITY"
    ctypedef struct bdev_io_ctx_area "ublk_bdev_io_ctx":
        unsigned char bytes[64]

cdef struct bdev_io
ctypedef void (*bdev_io_cb)(bdev_io* io, bint success, void* cb_arg) noexcept nogil

cdef struct bdev_io:
    void* bdev                # Bdev (borrowed), set once: an I/O object serves one channel
    void* channel             # BdevChannel (borrowed), set once
    # (the fields reset per I/O sit together, so that the compiler merges their stores)
    uint8_t type
    uint8_t status
    uint16_t flags
    uint16_t nvme_status      # the CQE status field without the phase bit (SCT/SC/CRD/M/DNR)
    int32_t error             # errno of a module refusal or failure (0: none)
    uint32_t nvme_cdw0
    uint64_t offset_blocks
    uint64_t num_blocks
    iovec* iovs               # what the module transfers: &iov, a caller's array or the bounce
    uint32_t iovcnt
    uint32_t user_iovcnt
    iovec iov
    iovec* user_iovs          # the caller's iovec when bouncing (copied back for reads)
    iovec user_iov            # the caller's single segment, when it had one
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
    uint64_t split_next       # parent: next block to issue
    bdev_io* next             # free list / deferred completions / NOMEM queue
    bdev_io_ctx_area module_ctx   # the module's (bdev_io_ctx), 64-byte aligned; last

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
    cdef readonly uint32_t ctx_size             # bytes of bdev_io_ctx the module uses
    cdef uint32_t supported_types               # bit per BDEV_IO_* type
    cdef uint64_t fast_max_blocks               # reads/writes up to this size never split
    cdef uint64_t align_mask                    # required_alignment - 1
    cdef readonly bint removed
    cdef bint _destructed
    cdef uint32_t _stranded                     # I/Os a module kept past its channel's release
    cdef uint32_t _closing_channels             # channels being released right now
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
    cdef bdev_io* done_head                     # completed inside submit: finished by the poller
    cdef bdev_io* done_tail
    cdef bdev_io* nomem_head                    # refused by the module for lack of resources
    cdef bdev_io* nomem_tail
    cdef uint32_t in_module                     # I/Os handed to the module, not yet completed
    cdef uint64_t poll_tick                     # the clock when the running poll began (0: none)
    cdef bdev_stats counters
    cdef Histogram histogram                    # None unless histograms are enabled
    cdef Poller poller
    cdef dict py_held                           # PyBdev: PyIo objects the module holds
    cdef bint thread_ended                      # released by its thread's destroy(), not put()
    cdef bint aborting                          # released past its drain deadline: no new I/O
    cdef bint torn_down                         # released: its I/O objects are (being) freed
    cdef uint32_t polling                       # poll() calls running (a callback may nest one)

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
    cdef _submit(self, ch, uint8_t t, buf, uint64_t offset_blocks, uint64_t num_blocks, cb)


# ---- C-level functions --------------------------------------------------------------------------
# bdev_submit: submit an I/O of `type` on a contiguous buffer (NULL for types without data).
# 0: it will complete through `cb` exactly once; negative errno: refused, nothing happened:
# -EBADF closed descriptor, -ENODEV removed bdev, -EXDEV channel of another thread, -EINVAL
# channel of another bdev, -EACCES read-only descriptor, -EOPNOTSUPP unsupported type, -ERANGE
# range outside the bdev, -ENOMEM no free I/O object on this channel, -ESHUTDOWN the channel
# was released (put, or its thread destroyed).
#
# Its common case is written here, inline, so that it compiles into the caller (an engine's
# submit function) with no call of its own: a read or write this descriptor may do, on this
# thread's channel of the bdev, inside it, needing neither a split nor a bounce. Everything else
# goes to bdev_submit_general (core.pyx), which makes the same checks one by one.
cdef inline int bdev_submit(Descriptor desc, BdevChannel ch, uint8_t type, char* buf,
                            uint64_t offset_blocks, uint64_t num_blocks, bdev_io_cb cb,
                            void* cb_arg) noexcept nogil:
    cdef bdev_io* io
    if ((type == BDEV_IO_READ or type == BDEV_IO_WRITE) and (desc.io_mask >> type) & 1
            and <void*> ch.bdev == <void*> desc.bdev
            and num_blocks <= desc.bdev.fast_max_blocks
            and bdev_in_range(desc.bdev, offset_blocks, num_blocks)
            and not ((<uintptr_t> buf | (num_blocks << desc.bdev.block_shift))
                     & desc.bdev.align_mask)
            and ch.on_owner()):
        io = bdev_get_io(ch)
        if io == NULL:
            return bdev_no_io(ch)
        bdev_io_prepare(io, type, offset_blocks, num_blocks, cb, cb_arg)
        bdev_io_set_buffer(io, buf, num_blocks << desc.bdev.block_shift)
        io.submit_tick = get_ticks()
        return bdev_start(ch, io)
    return bdev_submit_general(desc, ch, type, buf, offset_blocks, num_blocks, cb, cb_arg)


cdef int bdev_submit_general(Descriptor desc, BdevChannel ch, uint8_t type, char* buf,
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
# What bdev_start does when the module did not take the I/O (rc != 0): retry through a bounce
# buffer (-EFAULT), queue it for a retry (-ENOMEM) or fail it through its callback. Returns 0.
cdef int bdev_start_refused(BdevChannel ch, bdev_io* io, int rc) noexcept nogil


# ---- for modules: the per-I/O context and the retry flag ----------------------------------------
cdef inline void* bdev_io_ctx(bdev_io* io) noexcept nogil:
    """The module's context of `io`: 64-byte aligned, BDEV_IO_CTX_CAPACITY bytes, of which the
    first `ctx_size` (what the bdev declared) are zero when the module first sees the I/O."""
    return <void*> &io.module_ctx


cdef inline bint bdev_io_is_retry(bdev_io* io) noexcept nogil:
    """The layer hands the module an I/O it saw before (it refused it with -ENOMEM or -EFAULT,
    or completed it "nomem"): the context holds what the module left there."""
    return (io.flags & IOF_RETRY) != 0


# ---- the pieces of the fast path (also used by core.pyx) ----------------------------------------
cdef inline bint bdev_in_range(Bdev b, uint64_t off, uint64_t n) noexcept nogil:
    """Blocks [off, off + n) are a non-empty range inside `b` (no overflow)."""
    return n != 0 and off < b.num_blocks and n <= b.num_blocks - off


cdef inline bdev_io* bdev_get_io(BdevChannel ch) noexcept nogil:
    """An I/O object from the channel's pool (NULL when empty). Only what every I/O reads is
    reset here; the rest is kept NULL/zero by whoever used it (the Python references and the
    bounce buffer are cleared when they are released) or is set before it is read (parent and
    split fields with their flags, the caller's iovec with IOF_BOUNCE). `bdev` and `channel`
    were set when the channel was made. The module's context is zeroed by bdev_start."""
    cdef bdev_io* io = ch.free_ios
    if io == NULL:
        return NULL
    ch.free_ios = io.next
    io.status = IO_PENDING
    io.flags = 0
    io.nvme_status = 0
    io.error = 0
    io.nvme_cdw0 = 0
    io.iovcnt = 0
    return io


cdef inline int bdev_no_io(BdevChannel ch) noexcept nogil:
    """Why bdev_get_io found no I/O object: a released channel has none at all."""
    return -ESHUTDOWN if ch._released else -ENOMEM


cdef inline void bdev_put_io(BdevChannel ch, bdev_io* io) noexcept nogil:
    io.next = ch.free_ios
    ch.free_ios = io


cdef inline void bdev_io_prepare(bdev_io* io, uint8_t type, uint64_t off, uint64_t n,
                                 bdev_io_cb cb, void* cb_arg) noexcept nogil:
    """What the caller asked for: type, range and completion callback."""
    io.type = type
    io.offset_blocks = off
    io.num_blocks = n
    io.cb = cb
    io.cb_arg = cb_arg


cdef inline void bdev_io_set_buffer(bdev_io* io, char* buf, uint64_t nbytes) noexcept nogil:
    """The I/O's payload: one contiguous segment."""
    io.iov.iov_base = buf
    io.iov.iov_len = nbytes
    io.iovs = &io.iov
    io.iovcnt = 1


cdef inline int bdev_start(BdevChannel ch, bdev_io* io) noexcept nogil:
    """Hand `io` to the module for the first time (a resubmission goes straight to
    submit_request, with IOF_RETRY). It always completes afterwards (see bdev_start_refused)."""
    cdef int rc
    if ch.bdev.ctx_size:
        memset(&io.module_ctx, 0, ch.bdev.ctx_size)
    io.flags |= IOF_IN_SUBMIT
    ch.in_module += 1
    rc = ch.bdev.submit_request(ch, io)
    io.flags &= ~IOF_IN_SUBMIT
    if rc == 0:
        return 0
    return bdev_start_refused(ch, io, rc)
