# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The generic block-device layer.

A `Bdev` is a block device with a module behind it (malloc, null, nvme, aio, ...). Applications
`open_bdev(name)` to get a `Descriptor`, take this thread's `BdevChannel` from it, and submit I/O
with a completion callback; the channel's poller (on the env Thread that owns the channel) finishes
completions, so `thread.poll()` - or a blocking `*_sync` helper - drives everything.

What the layer does between the caller and the module, in the spirit of SPDK's lib/bdev:
- validates every I/O at submission (descriptor open and writable, channel of this thread and this
  bdev, range inside the device, I/O type supported) and refuses bad ones with an error before the
  module sees them;
- bounces buffers the module cannot use through DMA memory, copying in before a write and out
  after a read: misaligned for it (checked here), or not DMA memory for a real device (the
  module of a `dma_required` bdev refuses those with -EFAULT, and the layer retries bounced);
- splits I/O at the module's maximum transfer and, when asked, at the optimal I/O boundary;
- emulates Write Zeroes with writes of a zero buffer where the module lacks it;
- queues I/O the module refuses for lack of resources (-ENOMEM) and resubmits it from the poller;
- never completes an I/O inside its own submission (the completion is deferred to the poller), so
  callbacks that resubmit never recurse;
- counts per-channel statistics (SPDK's iostat fields, in TSC ticks) and optional latency
  histograms. A latency runs from the clock read at submission to the start of the channel's
  poll that finds the I/O complete (one clock read per poll, not per completion).

Every I/O accepted by a submission function completes exactly once, through its callback.
The C-level path (`bdev_submit`, `bdev_io_cb`) creates no Python object per I/O; the Python path
(`Descriptor.read` & co.) calls `cb(success, status)` with `status` None on success.

A bdev's end, in order: `unregister()` (descriptors hear "remove" and refuse new I/O; what the
layer still holds for it - split children not issued yet, the NOMEM queue - fails "removed", errno
ENODEV, instead of reaching the module), then every descriptor closed and every channel released
(`put()` waits for the I/O in flight up to the module's `drain_timeout()`, then aborts what is
left), and only then the module's `destruct()`: a module never sees a submission after it.
"""
import logging
import math
import operator
import threading
import uuid as _uuid

from cpython.buffer cimport (PyBUF_FORMAT, PyBUF_ND, PyBUF_SIMPLE, PyBUF_STRIDES, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_GetBuffer)
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, PyObject
from libc.errno cimport (EACCES, EBADF, EFAULT, EINVAL, EIO, ENODEV, ENOMEM, ENXIO, EOPNOTSUPP,
                         EPERM, ERANGE, ESHUTDOWN, EXDEV)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.stdlib cimport posix_memalign
from posix.uio cimport iovec
from posix.unistd cimport usleep

from env.histogram cimport Histogram
from env.memory cimport DmaBuffer
from env.thread cimport THREAD_RUNNING, IoChannel, IoDevice, Poller, Thread, now_us
from env.ticks cimport get_ticks

from bdev.errors import (BdevClaimed, BdevError, BdevExists, BdevNotFound, BdevRemoved,
                         ChannelReleased, DescriptorClosed, IoCompletedError, IoError,
                         ReadOnlyDescriptor, UnsupportedIoType)
from env import memory as _memory
from env.errors import InvalidArgument, ResourceExhausted, WrongThreadError
from env.thread import current_thread

log = logging.getLogger("userblk.bdev")

IO_TYPE_NAMES = {BDEV_IO_READ: "read", BDEV_IO_WRITE: "write",
                 BDEV_IO_WRITE_ZEROES: "write_zeroes", BDEV_IO_UNMAP: "unmap",
                 BDEV_IO_FLUSH: "flush", BDEV_IO_RESET: "reset", BDEV_IO_COMPARE: "compare"}
IO_TYPES = {v: k for k, v in IO_TYPE_NAMES.items()}
STATUS_NAMES = {IO_SUCCESS: "success", IO_FAILED: "failed", IO_NOMEM: "nomem",
                IO_NVME_ERROR: "nvme_error", IO_MISCOMPARE: "miscompare", IO_ABORTED: "aborted",
                IO_REMOVED: "removed"}
IO_CTX_CAPACITY = BDEV_IO_CTX_CAPACITY      # bytes of per-I/O context a module may declare
DEFAULT_DRAIN_TIMEOUT_S = 30.0              # what put() waits for I/O in flight, by default

cdef enum:
    DEFAULT_CHANNEL_IOS = 4096
    MAX_SPLIT_INFLIGHT = 32
    NOMEM_RETRY_BUDGET = 64
    ZERO_BUFFER_SIZE = 1 << 20
    DRAIN_PAUSE_MAX_US = 1000

cdef enum:                    # sets of I/O types, as bit masks (constants: no load per I/O)
    _WRITE_TYPES = ((1 << BDEV_IO_WRITE) | (1 << BDEV_IO_WRITE_ZEROES) | (1 << BDEV_IO_UNMAP)
                    | (1 << BDEV_IO_FLUSH))
    _DATA_TYPES = (1 << BDEV_IO_READ) | (1 << BDEV_IO_WRITE) | (1 << BDEV_IO_COMPARE)
    _RANGE_TYPES = ((1 << BDEV_IO_READ) | (1 << BDEV_IO_WRITE) | (1 << BDEV_IO_COMPARE)
                    | (1 << BDEV_IO_WRITE_ZEROES) | (1 << BDEV_IO_UNMAP))   # also split
    _CHECKED_TYPES = _RANGE_TYPES | (1 << BDEV_IO_FLUSH)   # a range inside the bdev (a flush
                                                           # is never split: one covers it all)

# the zero buffer behind emulated Write Zeroes (DMA memory, so every module can use it)
cdef object _zero_buf = None
cdef char* _zero_ptr = NULL


cdef char* _zero_buffer() noexcept with gil:
    global _zero_buf, _zero_ptr
    if _zero_ptr == NULL:
        _zero_buf = _memory.allocate(ZERO_BUFFER_SIZE, zero=True)
        _zero_ptr = (<DmaBuffer> _zero_buf).data()
    return _zero_ptr


# ---- arguments ---------------------------------------------------------------------------------
def uint_arg(name, value, bits=64):
    """`value` as an unsigned integer of `bits` bits, or InvalidArgument naming `name`."""
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an integer, not {type(value).__name__} "
                              f"{value!r}") from None
    if v < 0 or v >> bits:
        raise InvalidArgument(f"{name} must be between 0 and {(1 << bits) - 1}, not {v}")
    return v


cdef uint64_t _u64(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    """The Python I/O path's conversion: a plain int converts at C level (fast); anything else
    goes through uint_arg, which explains what is wrong."""
    if type(value) is int and value >= 0:
        try:
            return value
        except OverflowError:
            pass
    return uint_arg(name, value)


def blocks_of(num_blocks, size, block_size):
    """`num_blocks`, or `size` bytes in blocks (what a module's create() was given)."""
    block_size = uint_arg("block_size", block_size, 32)
    if block_size == 0:
        raise InvalidArgument("block_size: the block size must be a power of two of at least 512, "
                              "not 0")
    if num_blocks is not None:
        return uint_arg("num_blocks", num_blocks)
    if size is None:
        raise InvalidArgument("give num_blocks or size")
    size = uint_arg("size", size)
    if size % block_size:
        raise InvalidArgument(f"size {size} is not a multiple of the block size {block_size}")
    return size // block_size


# ---- registry ---------------------------------------------------------------------------------
_registry = {}            # name or alias -> Bdev
_registry_lock = threading.RLock()


def get_bdev(name):
    """The registered bdev called `name` (or with that alias)."""
    if not isinstance(name, str):
        raise InvalidArgument(f"a bdev name is a string, not {type(name).__name__} {name!r}")
    with _registry_lock:
        try:
            return _registry[name]
        except KeyError:
            known = ", ".join(sorted({b.name for b in _registry.values()})) or "none"
            raise BdevNotFound(f"no bdev named {name!r} (registered: {known})", name) from None


def bdevs():
    """Every registered bdev, by name."""
    with _registry_lock:
        return sorted({id(b): b for b in _registry.values()}.values(), key=lambda b: b.name)


def open_bdev(name, write=False, event_cb=None):
    """A Descriptor of bdev `name`. `write=True` allows writes (refused on a bdev claimed by a
    module); `event_cb(event, bdev)` hears of "remove" (hot removal) and "resize"."""
    if event_cb is not None and not callable(event_cb):
        raise InvalidArgument(f"event_cb must be callable, not {event_cb!r}")
    b = get_bdev(name) if not isinstance(name, Bdev) else name
    return (<Bdev> b)._open(bool(write), event_cb)


# ---- the I/O status seen by Python callbacks ----------------------------------------------------
class IoStatus:
    """Why an I/O failed: `kind` (failed, nvme_error, miscompare, aborted), and for NVMe devices
    the NVMe status (`nvme`, an nvme.status.NvmeStatus) and completion dword 0."""
    __slots__ = ("kind", "nvme", "cdw0", "io_type", "offset_blocks", "num_blocks", "bdev",
                 "errno")

    def __init__(self, kind, nvme=None, cdw0=0, io_type=None, offset_blocks=0, num_blocks=0,
                 bdev=None, errno=0):
        self.kind, self.nvme, self.cdw0, self.errno = kind, nvme, cdw0, errno
        self.io_type, self.offset_blocks, self.num_blocks, self.bdev = (io_type, offset_blocks,
                                                                       num_blocks, bdev)

    @property
    def ok(self):
        return self.kind == "success"

    def __repr__(self):
        nv = f", nvme={self.nvme}" if self.nvme is not None else ""
        return (f"IoStatus({self.kind}{nv}, {self.io_type} of {self.bdev} at block "
                f"{self.offset_blocks}+{self.num_blocks})")

    def __str__(self):
        nv = f" ({self.nvme})" if self.nvme is not None else ""
        if self.errno:
            import os
            nv += f" ({os.strerror(self.errno)})"
        return (f"{self.io_type} of {self.num_blocks} blocks at {self.offset_blocks} on "
                f"{self.bdev}: {self.kind}{nv}")


cdef object _status_of(bdev_io* io):
    nvme = None
    if io.status == IO_NVME_ERROR or io.nvme_status:
        from nvme.status import NvmeStatus
        nvme = NvmeStatus.decode((io.nvme_status << 1) & 0xFFFE)
    return IoStatus(STATUS_NAMES.get(io.status, "failed"), nvme, io.nvme_cdw0,
                    IO_TYPE_NAMES.get(io.type), io.offset_blocks, io.num_blocks,
                    (<Bdev> io.bdev).name, io.error)


# ---- statistics ---------------------------------------------------------------------------------
cdef inline void _stats_init(bdev_stats* s) noexcept nogil:
    memset(s, 0, sizeof(bdev_stats))
    s.min_read_latency_ticks = <uint64_t> -1
    s.min_write_latency_ticks = <uint64_t> -1
    s.min_unmap_latency_ticks = <uint64_t> -1


cdef inline void _stats_add(bdev_stats* into, const bdev_stats* s) noexcept nogil:
    into.bytes_read += s.bytes_read
    into.num_read_ops += s.num_read_ops
    into.bytes_written += s.bytes_written
    into.num_write_ops += s.num_write_ops
    into.bytes_unmapped += s.bytes_unmapped
    into.num_unmap_ops += s.num_unmap_ops
    into.read_latency_ticks += s.read_latency_ticks
    into.write_latency_ticks += s.write_latency_ticks
    into.unmap_latency_ticks += s.unmap_latency_ticks
    into.max_read_latency_ticks = max(into.max_read_latency_ticks, s.max_read_latency_ticks)
    into.max_write_latency_ticks = max(into.max_write_latency_ticks, s.max_write_latency_ticks)
    into.max_unmap_latency_ticks = max(into.max_unmap_latency_ticks, s.max_unmap_latency_ticks)
    into.min_read_latency_ticks = min(into.min_read_latency_ticks, s.min_read_latency_ticks)
    into.min_write_latency_ticks = min(into.min_write_latency_ticks, s.min_write_latency_ticks)
    into.min_unmap_latency_ticks = min(into.min_unmap_latency_ticks, s.min_unmap_latency_ticks)
    into.num_other_ops += s.num_other_ops
    into.io_errors += s.io_errors
    into.nomem_retries += s.nomem_retries


cdef inline void _tally(uint64_t* total, uint64_t* most, uint64_t* least,
                        uint64_t ticks) noexcept nogil:
    total[0] += ticks
    if ticks > most[0]:
        most[0] = ticks
    if ticks < least[0]:
        least[0] = ticks


cdef inline void _account(BdevChannel ch, bdev_io* io, bint ok) noexcept nogil:
    cdef bdev_stats* s = &ch.counters
    cdef uint64_t now = ch.poll_tick
    cdef uint64_t ticks
    if now == 0 or now < io.submit_tick:
        # completed outside a poll of the channel (or submitted after the poll began)
        now = get_ticks()
    ticks = now - io.submit_tick
    cdef uint64_t nbytes = io.num_blocks << (<Bdev> io.bdev).block_shift
    if not ok:
        s.io_errors += 1
    elif io.type == BDEV_IO_READ:
        s.num_read_ops += 1
        s.bytes_read += nbytes
        _tally(&s.read_latency_ticks, &s.max_read_latency_ticks, &s.min_read_latency_ticks,
               ticks)
    elif io.type == BDEV_IO_WRITE:
        s.num_write_ops += 1
        s.bytes_written += nbytes
        _tally(&s.write_latency_ticks, &s.max_write_latency_ticks, &s.min_write_latency_ticks,
               ticks)
    elif io.type == BDEV_IO_UNMAP:
        s.num_unmap_ops += 1
        s.bytes_unmapped += nbytes
        _tally(&s.unmap_latency_ticks, &s.max_unmap_latency_ticks, &s.min_unmap_latency_ticks,
               ticks)
    else:
        s.num_other_ops += 1
    if ch.histogram is not None and ok:
        ch.histogram.tally(ticks)


cdef dict _stats_dict(const bdev_stats* s):
    def lo(v):
        return 0 if v == <uint64_t> -1 else v
    return {"bytes_read": s.bytes_read, "num_read_ops": s.num_read_ops,
            "bytes_written": s.bytes_written, "num_write_ops": s.num_write_ops,
            "bytes_unmapped": s.bytes_unmapped, "num_unmap_ops": s.num_unmap_ops,
            "read_latency_ticks": s.read_latency_ticks,
            "max_read_latency_ticks": s.max_read_latency_ticks,
            "min_read_latency_ticks": lo(s.min_read_latency_ticks),
            "write_latency_ticks": s.write_latency_ticks,
            "max_write_latency_ticks": s.max_write_latency_ticks,
            "min_write_latency_ticks": lo(s.min_write_latency_ticks),
            "unmap_latency_ticks": s.unmap_latency_ticks,
            "max_unmap_latency_ticks": s.max_unmap_latency_ticks,
            "min_unmap_latency_ticks": lo(s.min_unmap_latency_ticks),
            "num_other_ops": s.num_other_ops, "io_error": s.io_errors,
            "nomem_retries": s.nomem_retries}


# ---- completion ---------------------------------------------------------------------------------
cdef void bdev_io_complete(bdev_io* io, uint8_t status) noexcept nogil:
    """Modules call this exactly once per I/O they accepted (any time, from the channel's
    thread). An I/O completed inside its own submission finishes from the poller instead."""
    _complete_on(<BdevChannel> io.channel, io, status)


cdef inline void _complete_on(BdevChannel ch, bdev_io* io, uint8_t status) noexcept nogil:
    ch.in_module -= 1
    io.status = status
    if status == IO_NOMEM:
        _nomem_push(ch, io)
        return
    if io.flags & IOF_IN_SUBMIT:
        _defer(ch, io)
        return
    _finish(ch, io)


cdef void bdev_io_nvme_cpl(void* arg, const nvme_cqe* cpl) noexcept nogil:
    """Complete the bdev_io `arg` with an NVMe completion: its status (kept in nvme_status) and
    cdw0 (nvme_cdw0)."""
    cdef bdev_io* io = <bdev_io*> arg
    cdef uint16_t status = (cpl.status >> 1) & 0x7FFF
    cdef uint16_t code = status & 0x7FF
    cdef uint32_t cdw0 = cpl.cdw0
    if status | cdw0:           # (both are 0 since bdev_get_io: no store for a plain success)
        io.nvme_status = status
        io.nvme_cdw0 = cdw0
    if code == 0 and io.flags == 0:
        # the common case, finished here: a success, with no split, bounce, Python callback or
        # completion inside its own submission to handle
        _succeed(<BdevChannel> io.channel, io)
    elif code == 0:
        _complete_on(<BdevChannel> io.channel, io, IO_SUCCESS)
    elif code == 0x285:       # SCT 2 (media), SC 85h: Compare Failure
        _complete_on(<BdevChannel> io.channel, io, IO_MISCOMPARE)
    elif (code >> 8) == 0 and (code & 0xFF) in (0x07, 0x08):     # aborted by request / SQ deletion
        _complete_on(<BdevChannel> io.channel, io, IO_ABORTED)
    else:
        _complete_on(<BdevChannel> io.channel, io, IO_NVME_ERROR)


cdef inline void _defer(BdevChannel ch, bdev_io* io) noexcept nogil:
    """Finish `io` from the channel's next poll (never inside its own submission)."""
    io.next = NULL
    if ch.done_tail == NULL:
        ch.done_head = io
    else:
        ch.done_tail.next = io
    ch.done_tail = io


cdef inline void _nomem_push(BdevChannel ch, bdev_io* io) noexcept nogil:
    io.next = NULL
    if ch.nomem_tail == NULL:
        ch.nomem_head = io
    else:
        ch.nomem_tail.next = io
    ch.nomem_tail = io


cdef void _end_unsent(BdevChannel ch, bdev_io* io, uint8_t status) noexcept nogil:
    """Finish `io`, which waits in the layer (the module does not hold it), with `status`."""
    io.status = status
    io.error = ENODEV if status == IO_REMOVED else 0
    _finish(ch, io)


cdef void _finish(BdevChannel ch, bdev_io* io) noexcept nogil:
    cdef bint ok = io.status == IO_SUCCESS
    if io.flags & IOF_CHILD:
        _child_done(ch, io)
        return
    if io.flags & IOF_BOUNCE:
        _bounce_finish(io, ok)
    if io.flags & IOF_OWN_IOVS:
        # the array we allocated is the caller's view, which a bounce moved to user_iovs
        free(io.user_iovs if io.flags & IOF_BOUNCE else io.iovs)
    _end_io(ch, io, ok)


cdef inline void _succeed(BdevChannel ch, bdev_io* io) noexcept nogil:
    ch.in_module -= 1
    io.status = IO_SUCCESS
    _end_io(ch, io, True)


cdef inline void _end_io(BdevChannel ch, bdev_io* io, bint ok) noexcept nogil:
    """The end of every I/O (children excepted): statistics, callback, back to the pool."""
    _account(ch, io, ok)
    if io.flags & IOF_PY:
        _py_finish(io, ok)
    elif io.cb != NULL:
        io.cb(io, ok, io.cb_arg)
    bdev_put_io(ch, io)


cdef void _bounce_finish(bdev_io* io, bint ok) noexcept nogil:
    cdef uint32_t i
    cdef char* src
    if ok and io.type == BDEV_IO_READ:
        src = <char*> io.iov.iov_base
        for i in range(io.user_iovcnt):
            memcpy(io.user_iovs[i].iov_base, src, io.user_iovs[i].iov_len)
            src += io.user_iovs[i].iov_len
    with gil:
        Py_XDECREF(io.bounce_ref)
    io.bounce_ref = NULL


cdef void _py_finish(bdev_io* io, bint ok) noexcept nogil:
    with gil:
        cb = <object> io.py_cb if io.py_cb != NULL else None
        ref = <object> io.py_ref if io.py_ref != NULL else None
        status = None if ok else _status_of(io)
        Py_XDECREF(io.py_cb)
        Py_XDECREF(io.py_ref)
        io.py_cb = io.py_ref = NULL
        if isinstance(ref, DmaBuffer):
            (<DmaBuffer> ref).unpin()
        elif isinstance(ref, list):
            for r in ref:
                if isinstance(r, DmaBuffer):
                    (<DmaBuffer> r).unpin()
        if cb is not None:
            try:
                cb(ok, status)
            except BaseException:
                log.exception("completion callback %r raised", cb)


# ---- splitting ----------------------------------------------------------------------------------
cdef inline uint64_t _split_len(Bdev b, bdev_io* io, uint64_t off, uint64_t left) noexcept nogil:
    """How many blocks the next child takes, starting at block `off` with `left` to go."""
    cdef uint64_t n = left
    cdef uint64_t to_boundary
    if b.max_transfer_blocks and n > b.max_transfer_blocks and io.type != BDEV_IO_UNMAP:
        n = b.max_transfer_blocks
    if b.split_on_optimal_io_boundary and b.optimal_io_boundary:
        to_boundary = b.optimal_io_boundary - off % b.optimal_io_boundary
        if n > to_boundary:
            n = to_boundary
    if io.flags & IOF_EMULATED and n > (ZERO_BUFFER_SIZE >> b.block_shift):
        n = ZERO_BUFFER_SIZE >> b.block_shift
    return n


cdef inline bint _needs_split(Bdev b, bdev_io* io) noexcept nogil:
    if io.flags & IOF_EMULATED:
        return True
    if not ((_RANGE_TYPES >> io.type) & 1):
        return False
    return _split_len(b, io, io.offset_blocks, io.num_blocks) < io.num_blocks


cdef int _child_iovs(bdev_io* parent, bdev_io* child, uint64_t byte_off, uint64_t nbytes) noexcept nogil:
    """Point `child` at bytes [byte_off, byte_off+nbytes) of the parent's payload."""
    cdef uint32_t i, first = 0, count = 0
    cdef uint64_t pos = 0, start, take, skip
    if parent.flags & IOF_EMULATED:
        child.iov.iov_base = _zero_ptr
        child.iov.iov_len = nbytes
        child.iovs = &child.iov
        child.iovcnt = 1
        return 0
    # find the parent segments the range covers
    for i in range(parent.iovcnt):
        if pos + parent.iovs[i].iov_len > byte_off:
            break
        pos += parent.iovs[i].iov_len
    first = i
    skip = byte_off - pos
    if skip + nbytes <= parent.iovs[first].iov_len:
        child.iov.iov_base = <char*> parent.iovs[first].iov_base + skip
        child.iov.iov_len = nbytes
        child.iovs = &child.iov
        child.iovcnt = 1
        return 0
    # several segments: the child gets its own array
    start = byte_off
    i = first
    take = 0
    while take < nbytes and i < parent.iovcnt:
        take += parent.iovs[i].iov_len - (skip if i == first else 0)
        count += 1
        i += 1
    child.iovs = <iovec*> malloc(count * sizeof(iovec))
    if child.iovs == NULL:
        return -ENOMEM
    child.flags |= IOF_OWN_IOVS
    take = nbytes
    for i in range(count):
        child.iovs[i].iov_base = <char*> parent.iovs[first + i].iov_base + (skip if i == 0 else 0)
        child.iovs[i].iov_len = min(take, parent.iovs[first + i].iov_len - (skip if i == 0 else 0))
        take -= child.iovs[i].iov_len
    child.iovcnt = count
    return 0


cdef void _split_issue(BdevChannel ch, bdev_io* parent) noexcept nogil:
    """Issue children of `parent` until MAX_SPLIT_INFLIGHT are out or none is left."""
    cdef bdev_io* child
    cdef uint64_t end = parent.offset_blocks + parent.num_blocks
    cdef uint64_t n
    cdef int rc
    while parent.split_next < end and parent.children_left < MAX_SPLIT_INFLIGHT:
        if ch.bdev.removed or ch.aborting or ch.torn_down:
            # unregistered meanwhile, or the channel was released (or is, after its drain
            # deadline): the rest never reaches the module
            if not parent.child_status:
                parent.child_status = IO_REMOVED if ch.bdev.removed else IO_ABORTED
                parent.error = ENODEV if ch.bdev.removed else 0
            parent.split_next = end
            break
        child = bdev_get_io(ch)
        if child == NULL:
            if parent.children_left == 0:
                # nothing outstanding would ever call us again: fail what is left
                parent.child_status = IO_NOMEM
                parent.split_next = end
                break
            return
        n = _split_len(ch.bdev, parent, parent.split_next, end - parent.split_next)
        child.type = BDEV_IO_WRITE if parent.flags & IOF_EMULATED else parent.type
        child.offset_blocks = parent.split_next
        child.num_blocks = n
        child.parent = parent
        child.flags = IOF_CHILD
        child.submit_tick = parent.submit_tick
        if (_DATA_TYPES >> child.type) & 1:
            rc = _child_iovs(parent, child,
                             (parent.split_next - parent.offset_blocks) << ch.bdev.block_shift,
                             n << ch.bdev.block_shift)
            if rc != 0:
                bdev_put_io(ch, child)
                parent.child_status = IO_FAILED
                parent.split_next = end
                break
        parent.split_next += n
        parent.children_left += 1
        bdev_start(ch, child)
    if parent.children_left == 0:
        parent.status = parent.child_status if parent.child_status else IO_SUCCESS
        if parent.status == IO_NOMEM:
            parent.status = IO_FAILED
        _finish_parent(ch, parent)


cdef void _child_done(BdevChannel ch, bdev_io* child) noexcept nogil:
    cdef bdev_io* parent = child.parent
    if child.flags & IOF_BOUNCE:
        _bounce_finish(child, child.status == IO_SUCCESS)
    if child.status != IO_SUCCESS and not parent.child_status:
        parent.child_status = child.status
        parent.child_nvme_status = child.nvme_status
        parent.nvme_cdw0 = child.nvme_cdw0
        parent.error = child.error
    if child.flags & IOF_OWN_IOVS:
        free(child.user_iovs if child.flags & IOF_BOUNCE else child.iovs)
    bdev_put_io(ch, child)
    parent.children_left -= 1
    if parent.split_next < parent.offset_blocks + parent.num_blocks and not parent.child_status:
        _split_issue(ch, parent)
        return
    if parent.children_left == 0:
        parent.status = parent.child_status if parent.child_status else IO_SUCCESS
        parent.nvme_status = parent.child_nvme_status
        _finish_parent(ch, parent)


cdef inline void _finish_parent(BdevChannel ch, bdev_io* parent) noexcept nogil:
    parent.flags &= ~IOF_PARENT
    _finish(ch, parent)


# ---- submission ---------------------------------------------------------------------------------
cdef int bdev_start_refused(BdevChannel ch, bdev_io* io, int rc) noexcept nogil:
    """The module did not take `io` (bdev_start). It still completes: a module that refuses it
    for lack of resources gets it again later; a module that refuses it for another reason (a
    backend failure: every argument was checked before) fails it through its callback."""
    if io.status != IO_PENDING:
        # a module that completed the I/O and then reported an error anyway: the completion
        # stands, so the I/O still completes exactly once
        return 0
    if (rc == -EFAULT and ch.bdev.dma_required and (_DATA_TYPES >> io.type) & 1
            and not io.flags & IOF_BOUNCE and _bounce_setup(ch.bdev, io) == 0):
        # memory the device cannot reach (not DMA-registered): once more, through DMA memory
        io.flags |= IOF_IN_SUBMIT | IOF_RETRY
        rc = ch.bdev.submit_request(ch, io)
        io.flags &= ~IOF_IN_SUBMIT
        if rc == 0 or io.status != IO_PENDING:
            return 0
    ch.in_module -= 1
    if rc == -ENOMEM:
        _nomem_push(ch, io)
        return 0
    io.error = -rc
    io.status = IO_FAILED
    _defer(ch, io)
    return 0


cdef inline bint _aligned(Bdev b, bdev_io* io) noexcept nogil:
    """Does every segment start and end where the module needs (required_alignment)? Whether
    the memory is DMA-able is the module's to say: it refuses with -EFAULT and the layer
    bounces then (see bdev_start_refused), which spares a translation per I/O in the common case."""
    cdef uint32_t i
    cdef uint64_t mask = b.required_alignment - 1
    if mask == 0:
        return True
    for i in range(io.iovcnt):
        # O_DIRECT and DMA engines want both the address and the length of every segment
        # aligned (a split can also start a child at any segment boundary)
        if (<uint64_t> <uintptr_t> io.iovs[i].iov_base | io.iovs[i].iov_len) & mask:
            return False
    return True


cdef int _bounce_setup(Bdev b, bdev_io* io) noexcept with gil:
    """Route the payload through a DMA buffer (copied in now for writes/compares)."""
    cdef uint64_t nbytes = io.num_blocks << b.block_shift
    cdef uint32_t i
    cdef char* dst
    try:
        buf = _memory.allocate(max(nbytes, 4096), max(4096, b.required_alignment))
    except BaseException:
        return -ENOMEM
    Py_INCREF(buf)
    io.bounce_ref = <PyObject*> buf
    if io.iovs == &io.iov:
        io.user_iov = io.iov          # io.iov is about to describe the bounce buffer
        io.user_iovs = &io.user_iov
    else:
        io.user_iovs = io.iovs
    io.user_iovcnt = io.iovcnt
    dst = (<DmaBuffer> buf).data()
    if io.type != BDEV_IO_READ:
        for i in range(io.iovcnt):
            memcpy(dst, io.iovs[i].iov_base, io.iovs[i].iov_len)
            dst += io.iovs[i].iov_len
    io.iov.iov_base = (<DmaBuffer> buf).data()
    io.iov.iov_len = nbytes
    io.iovs = &io.iov
    io.iovcnt = 1
    io.flags |= IOF_BOUNCE
    return 0


cdef inline int _check(Descriptor desc, BdevChannel ch, uint8_t type, uint64_t off,
                       uint64_t n) noexcept nogil:
    # One test of the descriptor's mask covers a closed descriptor, a removed bdev, a read-only
    # descriptor, an unsupported type and a type out of range; _refusal says which it was.
    if type >= BDEV_IO_NTYPES or not (desc.io_mask >> type) & 1:
        return _refusal(desc, type)
    if <void*> ch.bdev != <void*> desc.bdev:
        return -EINVAL
    if ch._released:
        return -ESHUTDOWN
    if not ch.on_owner():
        return -EXDEV
    if (_CHECKED_TYPES >> type) & 1 and not bdev_in_range(desc.bdev, off, n):
        return -ERANGE
    return 0


cdef int _refusal(Descriptor desc, uint8_t type) noexcept nogil:
    """Why `desc` refuses an I/O of `type` (its mask has no bit for it)."""
    if desc.closed:
        return -EBADF
    if desc.bdev.removed:
        return -ENODEV
    if type == 0 or type >= BDEV_IO_NTYPES:
        return -EINVAL
    if (_WRITE_TYPES >> type) & 1 and not desc.writable:
        return -EACCES
    return -EOPNOTSUPP


cdef uint32_t _io_mask(Bdev b, bint writable) noexcept:
    """The I/O types a descriptor may submit: what the bdev supports (Write Zeroes also when
    only Write is, emulated), less the writing ones on a read-only descriptor."""
    cdef uint32_t m = b.supported_types
    if b.supports(BDEV_IO_WRITE):
        m |= 1 << BDEV_IO_WRITE_ZEROES
    if not writable:
        m &= ~(<uint32_t> _WRITE_TYPES)
    return m


cdef inline int _submit_io(BdevChannel ch, bdev_io* io) noexcept nogil:
    """The common tail of every submission: bounce, emulate, split or start. 0 or a negative
    errno (then nothing was started and `io` is still the caller's)."""
    cdef int rc
    io.submit_tick = get_ticks()
    if (_DATA_TYPES >> io.type) & 1 and not _aligned(ch.bdev, io):
        rc = _bounce_setup(ch.bdev, io)
        if rc != 0:
            return rc
    if io.type == BDEV_IO_WRITE_ZEROES and not ch.bdev.supports(BDEV_IO_WRITE_ZEROES):
        if _zero_buffer() == NULL:
            return -ENOMEM
        io.flags |= IOF_EMULATED
    if _needs_split(ch.bdev, io):
        io.flags |= IOF_PARENT
        io.split_next = io.offset_blocks
        io.children_left = 0
        io.child_status = 0
        io.child_nvme_status = 0
        # children complete through the poller at the earliest, so the parent's callback can
        # never run inside this call
        _split_issue(ch, io)
        return 0
    return bdev_start(ch, io)


cdef int bdev_submit_general(Descriptor desc, BdevChannel ch, uint8_t type, char* buf,
                             uint64_t offset_blocks, uint64_t num_blocks, bdev_io_cb cb,
                             void* cb_arg) noexcept nogil:
    """bdev_submit (core.pxd) for everything but its common case: the checks one by one, then
    bounce, emulation, split or start."""
    cdef int rc = _check(desc, ch, type, offset_blocks, num_blocks)
    cdef bdev_io* io
    if rc != 0:
        return rc
    io = bdev_get_io(ch)
    if io == NULL:
        return bdev_no_io(ch)
    bdev_io_prepare(io, type, offset_blocks, num_blocks, cb, cb_arg)
    if (_DATA_TYPES >> type) & 1:
        bdev_io_set_buffer(io, buf, num_blocks << desc.bdev.block_shift)
    rc = _submit_io(ch, io)
    if rc != 0:
        bdev_put_io(ch, io)
    return rc


cdef int bdev_submitv(Descriptor desc, BdevChannel ch, uint8_t type, iovec* iovs,
                      uint32_t iovcnt, uint64_t offset_blocks, uint64_t num_blocks,
                      bdev_io_cb cb, void* cb_arg) noexcept nogil:
    """Vectored variant of `bdev_submit`; the iovec array must stay valid until completion and
    carry exactly num_blocks blocks."""
    cdef uint64_t total = 0
    cdef uint32_t i
    cdef bdev_io* io
    cdef int rc = _check(desc, ch, type, offset_blocks, num_blocks)
    if rc != 0:
        return rc
    if iovcnt == 0 or not (_DATA_TYPES >> type) & 1:
        return -EINVAL
    for i in range(iovcnt):
        total += iovs[i].iov_len
    if total != num_blocks << desc.bdev.block_shift:
        return -EINVAL
    io = bdev_get_io(ch)
    if io == NULL:
        return bdev_no_io(ch)
    bdev_io_prepare(io, type, offset_blocks, num_blocks, cb, cb_arg)
    io.iovs = iovs
    io.iovcnt = iovcnt
    rc = _submit_io(ch, io)
    if rc != 0:
        bdev_put_io(ch, io)
    return rc


# ---- the channel --------------------------------------------------------------------------------
cdef int _channel_poller(void* ctx) noexcept nogil:
    return (<BdevChannel> ctx).poll()


cdef inline bint _busy(BdevChannel ch) noexcept nogil:
    """Does anything of this channel still have to complete?"""
    return ch.in_module != 0 or ch.done_head != NULL or ch.nomem_head != NULL


cdef bint _drain(BdevChannel ch, uint64_t deadline_us) noexcept nogil:
    """Poll the channel until nothing is outstanding (True) or the deadline passed (False);
    between polls that found nothing, pause a little (up to 1 ms) to leave the CPU to whoever
    completes the I/O."""
    cdef uint32_t pause = 1
    while _busy(ch):
        if ch.poll() > 0:
            pause = 1
            continue
        if not _busy(ch):
            break
        if now_us() >= deadline_us:
            return False
        usleep(pause)
        pause = min(pause * 2, <uint32_t> DRAIN_PAUSE_MAX_US)
    return True


cdef void _finish_deferred(BdevChannel ch) noexcept nogil:
    """Finish the completions waiting for the channel's poll (none calls the module)."""
    cdef bdev_io* io
    while ch.done_head != NULL:
        io = ch.done_head
        ch.done_head = io.next
        if ch.done_head == NULL:
            ch.done_tail = NULL
        _finish(ch, io)


cdef void _fail_nomem_queue(BdevChannel ch, uint8_t status) noexcept nogil:
    """Finish, with `status`, what waits for the module to have resources again."""
    cdef bdev_io* io
    while ch.nomem_head != NULL:
        io = ch.nomem_head
        ch.nomem_head = io.next
        if ch.nomem_head == NULL:
            ch.nomem_tail = NULL
        _end_unsent(ch, io, status)


cdef inline int _poll_end(BdevChannel ch, int work) noexcept nogil:
    ch.poll_tick = 0
    ch.polling -= 1
    if ch.torn_down and ch.polling == 0:
        _free_ios_after_poll(ch)
    return work


cdef void _free_ios_after_poll(BdevChannel ch) noexcept nogil:
    """The channel was released from inside its own poll (a completion callback put it): the
    I/O objects that poll still walked are freed now that it is over."""
    if ch.ios == NULL:
        return
    ch.free_ios = NULL
    if _busy(ch):
        with gil:
            ch._strand()
        return
    free(ch.ios)
    ch.ios = NULL


cdef class BdevChannel(IoChannel):
    """This thread's channel to one bdev: its pool of I/O objects, its deferred completions, its
    NOMEM queue and its statistics. Modules subclass it to keep per-thread state (a queue pair)."""

    cdef bdev_io* get_io(self) noexcept nogil:
        return bdev_get_io(self)

    cdef void put_io(self, bdev_io* io) noexcept nogil:
        bdev_put_io(self, io)

    cdef int poll(self) noexcept nogil:
        cdef int work = 0
        cdef bdev_io* io
        cdef int rc
        cdef int budget = NOMEM_RETRY_BUDGET
        cdef bdev_io* batch = self.done_head
        # One clock read for every I/O this poll finds complete (each was complete when the
        # poll began), instead of one per I/O: see _account.
        self.poll_tick = get_ticks()
        self.polling += 1
        if batch != NULL:
            # only what was done before this poll: callbacks that resubmit add to a fresh
            # list, so one poll never loops for ever on a device that completes at once
            self.done_head = self.done_tail = NULL
        while batch != NULL:
            io = batch
            batch = io.next
            _finish(self, io)
            work += 1
        if self.torn_down:
            # a callback of this batch released the channel: finish the batch, nothing more
            return _poll_end(self, work)
        work += self.bdev.poll_channel(self)
        while self.nomem_head != NULL and budget > 0:
            io = self.nomem_head
            self.nomem_head = io.next
            if self.nomem_head == NULL:
                self.nomem_tail = NULL
            budget -= 1
            if self.bdev.removed:
                # unregistered: what waits here never reaches the module again
                _end_unsent(self, io, IO_REMOVED)
                work += 1
                continue
            self.counters.nomem_retries += 1
            io.flags |= IOF_IN_SUBMIT | IOF_RETRY
            self.in_module += 1
            rc = self.bdev.submit_request(self, io)
            io.flags &= ~IOF_IN_SUBMIT
            if rc == -ENOMEM:
                self.in_module -= 1
                io.next = self.nomem_head       # back at the head, in order
                self.nomem_head = io
                if self.nomem_tail == NULL:
                    self.nomem_tail = io
                break
            if rc != 0:
                self.in_module -= 1
                io.status = IO_FAILED
                io.error = -rc
                _finish(self, io)
            work += 1
        return _poll_end(self, work)

    def _setup(self, Bdev bdev, uint32_t nios):
        cdef void* mem = NULL
        self.bdev = bdev
        # 64-byte aligned: each object's module context sits on a cache line of its own
        if nios == 0 or posix_memalign(&mem, 64, nios * sizeof(bdev_io)) != 0:
            raise MemoryError("cannot allocate the channel's I/O objects")
        memset(mem, 0, nios * sizeof(bdev_io))
        self.ios = <bdev_io*> mem
        self.nios = nios
        cdef long k
        for k in range(<long> nios - 1, -1, -1):
            self.ios[k].index = <uint32_t> k
            self.ios[k].bdev = <void*> bdev
            self.ios[k].channel = <void*> self
            self.ios[k].next = self.free_ios
            self.free_ios = &self.ios[k]
        _stats_init(&self.counters)
        if bdev._histograms:
            self.histogram = Histogram()
        # (the poller keeps the channel alive while it is registered: a callback inside the
        # poll may put the last reference)
        self.poller = self.thread.register_c_poller(_channel_poller, <void*> self, 0,
                                                    f"bdev:{bdev.name}", self)

    def _teardown(self):
        if self.poller is not None:
            if self.poller.is_registered:      # a thread's exit unregisters its pollers itself
                self.poller.unregister()
            self.poller = None
        self.torn_down = True
        if self.polling:
            # released from a callback inside this channel's poll, which still walks I/O
            # objects of it: they are freed when that poll ends (_free_ios_after_poll)
            self.free_ios = NULL
            return
        if _busy(self):
            self._strand()
            return
        free(self.ios)
        self.ios = NULL
        self.free_ios = NULL

    def _strand(self):
        """The module still owns I/O objects it may complete some day: keep them and this
        channel (a leak beats a crash), and never destruct the module under them."""
        log.error("channel of %s on %s released with %d I/O(s) the module never completed; "
                  "its I/O objects are kept and the bdev will not be destructed",
                  self.bdev.name, self.thread.name, self.in_module)
        self.bdev._stranded += self.in_module
        Py_INCREF(self)
        self.ios = NULL

    def poll_now(self):
        """Run this channel's completions now (the thread's poller does this on its own)."""
        self.check_thread()
        cdef int n
        with nogil:
            n = self.poll()
        return n

    @property
    def outstanding(self):
        """I/Os handed to the module and not yet completed, plus those waiting to retry."""
        cdef uint32_t n = self.in_module
        cdef bdev_io* io = self.done_head
        while io != NULL:
            n += 1
            io = io.next
        io = self.nomem_head
        while io != NULL:
            n += 1
            io = io.next
        return n

    @property
    def free_io_count(self):
        cdef uint32_t n = 0
        cdef bdev_io* io = self.free_ios
        while io != NULL:
            n += 1
            io = io.next
        return n

    def stats(self):
        return _stats_dict(&self.counters)

    def __dealloc__(self):
        if self.ios != NULL and self.in_module == 0:
            free(self.ios)


# ---- the bdev -----------------------------------------------------------------------------------
cdef class Bdev(IoDevice):
    """A block device. Modules subclass it (and BdevChannel), override `submit_request` (C) or
    use `PyBdev` (Python), and `register()` it.

    `ctx_size`: how many bytes of each I/O's module context (`bdev_io_ctx`, at most
    IO_CTX_CAPACITY) the module uses; the layer zeroes them before the module first sees an I/O.
    """

    channel_class = BdevChannel
    channel_ios = DEFAULT_CHANNEL_IOS

    def __init__(self, name, *, block_size, num_blocks, module, io_types, uuid=None, aliases=(),
                 write_unit_size=1, optimal_io_boundary=0, bint split_on_optimal_io_boundary=False,
                 max_transfer_blocks=0, required_alignment=1, bint dma_required=False,
                 md_size=0, product_name=None, ctx_size=0):
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise InvalidArgument(f"a bdev name is a non-empty string without spaces, not {name!r}")
        block_size = uint_arg("block_size", block_size, 32)
        num_blocks = uint_arg("num_blocks", num_blocks)
        write_unit_size = uint_arg("write_unit_size", write_unit_size, 32)
        optimal_io_boundary = uint_arg("optimal_io_boundary", optimal_io_boundary, 32)
        max_transfer_blocks = uint_arg("max_transfer_blocks", max_transfer_blocks)
        required_alignment = uint_arg("required_alignment", required_alignment, 32)
        md_size = uint_arg("md_size", md_size, 32)
        ctx_size = uint_arg("ctx_size", ctx_size, 32)
        if block_size < 512 or block_size & (block_size - 1):
            raise InvalidArgument(f"block_size: the block size must be a power of two of at "
                                  f"least 512, not {block_size}")
        if num_blocks == 0:
            raise InvalidArgument("a bdev needs at least one block (num_blocks 0)")
        if required_alignment == 0 or required_alignment & (required_alignment - 1):
            raise InvalidArgument(f"required_alignment must be a power of two, not "
                                  f"{required_alignment}")
        if write_unit_size == 0:
            raise InvalidArgument("write_unit_size must be at least 1 block")
        if ctx_size > BDEV_IO_CTX_CAPACITY:
            raise InvalidArgument(f"ctx_size {ctx_size}: a module's per-I/O context holds at "
                                  f"most {BDEV_IO_CTX_CAPACITY} bytes (IO_CTX_CAPACITY)")
        IoDevice.__init__(self, name)
        self.ctx_size = ctx_size
        self.name = name
        self.block_size = block_size
        self.block_shift = block_size.bit_length() - 1
        self.num_blocks = num_blocks
        self.write_unit_size = write_unit_size
        self.optimal_io_boundary = optimal_io_boundary
        self.split_on_optimal_io_boundary = split_on_optimal_io_boundary
        self.max_transfer_blocks = max_transfer_blocks
        self.required_alignment = required_alignment
        self.align_mask = required_alignment - 1
        # with an optimal boundary to split at, whether an I/O splits depends on where it
        # starts: such bdevs take the general path
        self.fast_max_blocks = (0 if split_on_optimal_io_boundary and optimal_io_boundary else
                                max_transfer_blocks or <uint64_t> -1)
        self.dma_required = dma_required
        self.md_size = md_size
        self.module = module
        self.product_name = product_name or f"{module} disk"
        self.uuid = _uuid.UUID(str(uuid)) if uuid is not None else _uuid.uuid4()
        self.aliases = list(aliases)
        self.supported_types = 0
        for t in io_types:
            if t not in IO_TYPES:
                raise InvalidArgument(f"unknown I/O type {t!r}; known: {', '.join(IO_TYPES)}")
            self.supported_types |= 1 << IO_TYPES[t]
        self._descs = []
        self._claim = None
        _stats_init(&self._retired)
        self._retired_hist = None

    # -- the module interface --
    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil:
        return -EOPNOTSUPP

    cdef int poll_channel(self, BdevChannel ch) noexcept nogil:
        return 0

    def setup_channel(self, BdevChannel ch):
        """Module hook: prepare the per-thread state of a new channel (on its thread)."""

    def teardown_channel(self, BdevChannel ch):
        """Module hook: release the per-thread state (on its thread)."""

    def destruct(self):
        """Module hook: free the device's resources. It runs once: after `unregister()`, when
        every descriptor is closed, every channel released and every I/O completed; the
        module never sees a submission after it."""

    def drain_timeout(self):
        """Module hook: how many seconds `put()` of a channel waits for the I/O in flight on it
        before what is left is aborted (`abort_channel`, then `teardown_channel`)."""
        return DEFAULT_DRAIN_TIMEOUT_S

    def abort_channel(self, BdevChannel ch):
        """Module hook: the channel is being released and its drain deadline passed: complete
        (aborted) what the module still holds of it, or leave it to `teardown_channel`."""

    def driver_specific(self):
        """Module facts for bdev_get_bdevs' "driver_specific" (JSON-friendly)."""
        return {}

    def config_json(self):
        """The JSON-config entry ({"method", "params"}) that recreates this bdev, or None."""
        return None

    # -- channels (env.thread IoDevice) --
    def create_channel_ctx(self, IoChannel channel):
        cdef BdevChannel ch = <BdevChannel> channel
        ch._setup(self, self.channel_ios)
        try:
            self.setup_channel(ch)
        except BaseException:
            ch._teardown()
            raise
        return None

    def destroy_channel_ctx(self, IoChannel channel):
        cdef BdevChannel ch = <BdevChannel> channel
        self._closing_channels += 1        # no destruct meanwhile (see _maybe_destruct)
        try:
            self._release_channel(ch)
        finally:
            self._closing_channels -= 1

    def _release_channel(self, BdevChannel ch):
        cdef uint64_t deadline
        cdef bint drained
        ch.thread_ended = ch.thread.t.state != THREAD_RUNNING
        # Finish what is in flight first: a channel is only put when its user is done, but the
        # module may still hold I/O of it. Wait up to the module's drain timeout, polling.
        timeout = self._drain_timeout()
        deadline = now_us() + <uint64_t> (timeout * 1e6)
        with nogil:
            drained = _drain(ch, deadline)
        try:
            if not drained:
                ch.aborting = True
                log.warning("%s: channel on %s released with %d I/O(s) still outstanding after "
                            "%.3g s: aborting them", self.name, ch.thread.name, ch.outstanding,
                            timeout)
                _fail_nomem_queue(ch, IO_REMOVED if self.removed else IO_ABORTED)
                try:
                    self.abort_channel(ch)
                except Exception:
                    log.exception("%s: abort_channel failed", self.name)
                _finish_deferred(ch)
            self.teardown_channel(ch)
        finally:
            _finish_deferred(ch)           # what the teardown completed (aborted)
            _fail_nomem_queue(ch, IO_ABORTED)
            _stats_add(&self._retired, &ch.counters)
            if ch.histogram is not None:
                if self._retired_hist is None:
                    self._retired_hist = Histogram()
                self._retired_hist.merge(ch.histogram)
            ch._teardown()

    def _drain_timeout(self):
        try:
            t = float(self.drain_timeout())
        except Exception:
            log.exception("%s: drain_timeout() failed; waiting %g s", self.name,
                          DEFAULT_DRAIN_TIMEOUT_S)
            return DEFAULT_DRAIN_TIMEOUT_S
        if not math.isfinite(t) or t < 0:
            log.error("%s: drain_timeout() gave %r; waiting %g s", self.name, t,
                      DEFAULT_DRAIN_TIMEOUT_S)
            return DEFAULT_DRAIN_TIMEOUT_S
        return t

    # -- registration, descriptors, claims --
    def register(self):
        """Make the bdev known by its name and aliases."""
        with _registry_lock:
            for n in [self.name] + self.aliases:
                if n in _registry:
                    raise BdevExists(f"a bdev named {n!r} is already registered", n)
            for n in [self.name] + self.aliases:
                _registry[n] = self
        log.info("registered bdev %s (%s, %d x %d B)", self.name, self.module, self.num_blocks,
                 self.block_size)
        return self

    def unregister(self):
        """Remove the bdev: open descriptors hear "remove" and refuse new I/O, no new channel
        is made, and what the layer still holds for it fails "removed". The module's `destruct`
        runs once the last descriptor is closed and the last channel released (if a channel
        goes last: by message on this thread, so keep polling it)."""
        with _registry_lock:
            if self.removed:
                return
            self.removed = True
            for d in self._descs:
                (<Descriptor> d).io_mask = 0   # no new I/O from now on
            for n in [self.name] + self.aliases:
                if _registry.get(n) is self:
                    del _registry[n]
        for d in list(self._descs):
            (<Descriptor> d)._notify("remove")
        if self._channels:
            IoDevice.unregister(self, self._channels_released)
        else:
            IoDevice.unregister(self)
        self._maybe_destruct()

    def _channels_released(self):
        self._maybe_destruct()

    def _maybe_destruct(self):
        """Destruct once unregistered, with no descriptor, no channel and no I/O left."""
        if (self._destructed or not self.removed or self._descs or self._channels
                or self._closing_channels):
            return
        if self._stranded:
            log.error("bdev %s is not destructed: its module never completed %d I/O(s)",
                      self.name, self._stranded)
            return
        self._destructed = True
        self._destruct()

    def _destruct(self):
        try:
            self.destruct()
        except Exception:
            log.exception("destruct of %s failed", self.name)
        log.info("bdev %s destroyed", self.name)

    def _open(self, bint write, event_cb):
        if self.removed:
            raise BdevRemoved(f"bdev {self.name} was removed", self.name)
        if write and self._claim is not None:
            raise BdevClaimed(f"bdev {self.name} is claimed by {self._claim!r}: it cannot be "
                              "opened for writing", self.name)
        cdef Descriptor d = Descriptor.__new__(Descriptor)
        d.bdev = self
        d.writable = write
        d.io_mask = _io_mask(self, write)
        d.event_cb = event_cb
        self._descs.append(d)
        return d

    def _closed(self, Descriptor d):
        if d in self._descs:
            self._descs.remove(d)
        self._maybe_destruct()

    def claim(self, owner, Descriptor desc=None):
        """Claim the bdev for `owner` (a module or virtual bdev): nobody else may open it for
        writing. Fails when another descriptor already writes."""
        if self._claim is not None and self._claim is not owner:
            raise BdevClaimed(f"bdev {self.name} is already claimed by {self._claim!r}", self.name)
        writers = [d for d in self._descs if (<Descriptor> d).writable and d is not desc]
        if writers:
            raise BdevClaimed(f"bdev {self.name} is open for writing by someone else", self.name)
        self._claim = owner

    def release_claim(self, owner):
        if self._claim is owner:
            self._claim = None

    @property
    def claimed_by(self):
        return self._claim

    @property
    def open_descriptors(self):
        return len(self._descs)

    # -- facts --
    @property
    def io_types(self):
        return sorted(n for t, n in IO_TYPE_NAMES.items() if self.supports(t))

    def io_type_supported(self, name):
        return name in IO_TYPES and self.supports(IO_TYPES[name])

    @property
    def size(self):
        return self.num_blocks * self.block_size

    def stats(self):
        """SPDK iostat fields (latencies in ticks; `tick_rate` converts), summed over every
        channel, those already gone included."""
        from env.ticks import ticks_hz
        cdef bdev_stats total
        _stats_init(&total)
        _stats_add(&total, &self._retired)
        for ch in list(self._channels.values()):
            if (<BdevChannel> ch).ios != NULL:
                _stats_add(&total, &(<BdevChannel> ch).counters)
        out = _stats_dict(&total)
        out["name"] = self.name
        out["tick_rate"] = ticks_hz()
        return out

    def enable_histogram(self, bint enable=True):
        """Latency histograms for channels created from now on (SPDK: bdev_enable_histogram)."""
        self._histograms = enable

    def histogram(self):
        """Latencies (ticks) of every channel merged, or None when histograms are off."""
        h = Histogram()
        if self._retired_hist is not None:
            h.merge(self._retired_hist)
        for ch in list(self._channels.values()):
            if (<BdevChannel> ch).histogram is not None:
                h.merge((<BdevChannel> ch).histogram)
        return h

    def info(self):
        """bdev_get_bdevs' description of this bdev."""
        return {
            "name": self.name, "aliases": list(self.aliases), "product_name": self.product_name,
            "block_size": self.block_size, "num_blocks": self.num_blocks,
            "uuid": str(self.uuid), "md_size": self.md_size,
            "write_unit_size": self.write_unit_size,
            "optimal_io_boundary": self.optimal_io_boundary,
            "required_alignment": self.required_alignment.bit_length() - 1,
            "claimed": self._claim is not None,
            "supported_io_types": {n: self.supports(t) for t, n in IO_TYPE_NAMES.items()},
            "driver_specific": {self.module: self.driver_specific()},
        }

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name} {self.num_blocks} x {self.block_size} B"
                f"{' removed' if self.removed else ''}>")


# ---- descriptors and the Python I/O API ---------------------------------------------------------
_ERRNO_TEXT = {EBADF: "the descriptor is closed", ENODEV: "the bdev was removed",
               EXDEV: "the channel belongs to another thread",
               EINVAL: "invalid arguments (a channel of another bdev, or an iovec that does not "
                       "match the length)",
               EACCES: "the descriptor is read-only (open it with write=True)",
               EOPNOTSUPP: "the bdev does not support this I/O type",
               ERANGE: "the range is outside the bdev", ENOMEM: "no free I/O object",
               ESHUTDOWN: "the channel was released"}


def _io_type(io_type):
    """The BDEV_IO_* code of `io_type` (a name, or a code)."""
    if isinstance(io_type, str):
        t = IO_TYPES.get(io_type)
    elif isinstance(io_type, int) and io_type in IO_TYPE_NAMES:
        t = io_type
    else:
        t = None
    if t is None:
        raise InvalidArgument(f"unknown I/O type {io_type!r}; known: {', '.join(IO_TYPES)}")
    return t


def _need_channel(ch):
    if not isinstance(ch, BdevChannel):
        raise InvalidArgument(f"ch must be a BdevChannel (desc.get_io_channel()), not "
                              f"{type(ch).__name__}")


cdef class Descriptor:
    """An open bdev. I/O goes through a channel of the calling thread:
    `ch = desc.get_io_channel()`; `desc.read(ch, buf, offset, nbytes, cb)`; poll the thread."""

    def __dealloc__(self):
        pass

    def close(self):
        """Close the descriptor (channels taken from it must be put first)."""
        if self.closed:
            return
        self.closed = True
        self.io_mask = 0
        self.bdev._closed(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _notify(self, event):
        if self.event_cb is not None:
            try:
                self.event_cb(event, self.bdev)
            except Exception:
                log.exception("event callback of a descriptor of %s raised", self.bdev.name)

    def get_io_channel(self):
        """This thread's channel to the bdev (created on first use, reference counted: `put()`
        it, or use it as a context manager)."""
        if self.closed:
            raise DescriptorClosed(f"descriptor of {self.bdev.name} is closed", self.bdev.name)
        if self.bdev.removed:
            raise BdevRemoved(f"bdev {self.bdev.name} was removed", self.bdev.name)
        return self.bdev.get_io_channel()

    def _raise(self, int rc, uint8_t type, BdevChannel ch=None):
        name = self.bdev.name
        what = IO_TYPE_NAMES.get(type, str(type))
        rc = -rc
        if rc == EBADF:
            raise DescriptorClosed(f"{what} on {name}: the descriptor is closed", name)
        if rc == ENODEV:
            raise BdevRemoved(f"{what} on {name}: the bdev was removed", name)
        if rc == EXDEV:
            ch.check_thread()
            raise WrongThreadError(f"{what} on {name}: the channel belongs to another thread")
        if rc == EACCES:
            raise ReadOnlyDescriptor(f"{what} on {name}: the descriptor is read-only (open it "
                                     "with write=True)", name)
        if rc == EOPNOTSUPP:
            raise UnsupportedIoType(f"{name} ({self.bdev.module}) does not support {what}; it "
                                    f"supports {', '.join(self.bdev.io_types)}", name)
        if rc == ERANGE:
            raise InvalidArgument(f"{what} on {name}: the block range is empty or outside the "
                                  f"bdev ({self.bdev.num_blocks} blocks)")
        if rc == ENXIO:
            raise BdevRemoved(f"{what} on {name}: the device behind the bdev failed or was "
                              "removed", name)
        if rc == ESHUTDOWN:
            if ch is not None and ch.thread_ended:
                raise ChannelReleased(
                    f"{what} on {name}: the channel was released when its thread "
                    f"{ch.thread.name!r} was destroyed (Thread.destroy()); take a channel on a "
                    "live thread", name)
            raise ChannelReleased(f"{what} on {name}: the channel was released (put()); take a "
                                  "new one with desc.get_io_channel()", name)
        if rc == ENOMEM:
            raise ResourceExhausted(f"{what} on {name}: no free I/O object on this channel "
                                    f"({ch.nios if ch is not None else '?'} in use); poll first")
        raise InvalidArgument(f"{what} on {name}: {_ERRNO_TEXT.get(rc, f'errno {rc}')}")


    cdef bdev_io* _take_io(self, BdevChannel c, uint8_t t, uint64_t offset_blocks,
                           uint64_t num_blocks) except NULL:
        """The checks of a submission, then an I/O object for it (the Python path)."""
        cdef int rc = _check(self, c, t, offset_blocks, num_blocks)
        cdef bdev_io* io
        if rc != 0:
            self._raise(rc, t, c)
        io = bdev_get_io(c)
        if io == NULL:
            self._raise(bdev_no_io(c), t, c)
        bdev_io_prepare(io, t, offset_blocks, num_blocks, NULL, NULL)
        return io

    def submit(self, ch, io_type, buf, offset_blocks, num_blocks, cb=None):
        """Submit one I/O in blocks: `io_type` is a name (read, write, write_zeroes, unmap,
        flush, reset, compare); `buf` any buffer object (read: writable) or None; `cb(success,
        status)` runs from the channel's thread's poll."""
        return self._submit(ch, _io_type(io_type), buf, _u64(offset_blocks, "offset_blocks"),
                            _u64(num_blocks, "num_blocks"), cb)

    cdef _submit(self, ch, uint8_t t, buf, uint64_t offset_blocks, uint64_t num_blocks, cb):
        cdef BdevChannel c
        cdef bdev_io* io
        cdef Py_buffer view
        cdef int rc
        cdef DmaBuffer dbuf
        cdef uint64_t need
        _need_channel(ch)
        c = <BdevChannel> ch
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"cb must be callable, not {cb!r}")
        io = self._take_io(c, t, offset_blocks, num_blocks)
        ref = None
        if (_DATA_TYPES >> t) & 1:
            need = num_blocks << self.bdev.block_shift
            if buf is None:
                bdev_put_io(c, io)
                raise InvalidArgument(f"{IO_TYPE_NAMES[t]} needs a buffer")
            if isinstance(buf, DmaBuffer):
                dbuf = <DmaBuffer> buf
                if dbuf.freed:
                    bdev_put_io(c, io)
                    dbuf.check_live()
                if dbuf.nbytes() < need:
                    bdev_put_io(c, io)
                    raise InvalidArgument(f"the buffer holds {dbuf.nbytes()} bytes; "
                                          f"{num_blocks} blocks need {need}")
                io.iov.iov_base = dbuf.data()
                dbuf.pin()
                ref = buf
            else:
                try:
                    mv = memoryview(buf)
                    if t == BDEV_IO_READ and mv.readonly:
                        raise InvalidArgument("a read needs a writable buffer")
                    if not mv.c_contiguous:
                        raise InvalidArgument("the buffer must be contiguous")
                    if mv.nbytes < need:
                        raise InvalidArgument(f"the buffer holds {mv.nbytes} bytes; "
                                              f"{num_blocks} blocks need {need}")
                    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
                except BaseException:
                    bdev_put_io(c, io)
                    raise
                io.iov.iov_base = view.buf
                PyBuffer_Release(&view)      # `mv` keeps the export alive until completion
                ref = mv
            io.iov.iov_len = need
            io.iovs = &io.iov
            io.iovcnt = 1
        io.flags = IOF_PY
        if cb is not None:
            Py_INCREF(cb)
            io.py_cb = <PyObject*> cb
        if ref is not None:
            Py_INCREF(ref)
            io.py_ref = <PyObject*> ref
        rc = _submit_io(c, io)
        if rc != 0:
            if isinstance(ref, DmaBuffer):
                (<DmaBuffer> ref).unpin()
            Py_XDECREF(io.py_cb)
            Py_XDECREF(io.py_ref)
            io.py_cb = io.py_ref = NULL
            bdev_put_io(c, io)
            self._raise(rc, t, c)

    def submitv(self, ch, io_type, buffers, offset_blocks, cb=None):
        """Vectored read/write/compare: `buffers` is a list of buffer objects (DmaBuffers or
        any contiguous buffers); their lengths add up to whole blocks."""
        cdef uint8_t t
        cdef BdevChannel c
        cdef bdev_io* io
        cdef Py_buffer view
        cdef uint32_t i, n
        cdef int rc
        _need_channel(ch)
        c = <BdevChannel> ch
        t = _io_type(io_type)
        offset_blocks = _u64(offset_blocks, "offset_blocks")
        if not (_DATA_TYPES >> t) & 1:
            raise InvalidArgument(f"vectored I/O is read, write or compare, not {io_type!r}")
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"cb must be callable, not {cb!r}")
        views = [memoryview(b) for b in buffers]
        n = len(views)
        if n == 0:
            raise InvalidArgument("no buffers")
        total = sum(v.nbytes for v in views)
        if total == 0 or total % self.bdev.block_size:
            raise InvalidArgument(f"the buffers carry {total} bytes: not a whole number of "
                                  f"{self.bdev.block_size}-byte blocks")
        for v in views:
            if t == BDEV_IO_READ and v.readonly:
                raise InvalidArgument("a read needs writable buffers")
            if not v.c_contiguous:
                raise InvalidArgument("every buffer must be contiguous")
        num_blocks = total // self.bdev.block_size
        io = self._take_io(c, t, offset_blocks, num_blocks)
        io.iovs = <iovec*> malloc(n * sizeof(iovec))
        if io.iovs == NULL:
            bdev_put_io(c, io)
            raise MemoryError()
        io.iovcnt = n
        io.flags = IOF_PY | IOF_OWN_IOVS
        for i in range(n):
            PyObject_GetBuffer(views[i], &view, PyBUF_SIMPLE)
            io.iovs[i].iov_base = view.buf
            io.iovs[i].iov_len = view.len
            PyBuffer_Release(&view)
        refs = [b if isinstance(b, DmaBuffer) else v for b, v in zip(buffers, views)]
        for r in refs:
            if isinstance(r, DmaBuffer):
                (<DmaBuffer> r).pin()
        if cb is not None:
            Py_INCREF(cb)
            io.py_cb = <PyObject*> cb
        Py_INCREF(refs)
        io.py_ref = <PyObject*> refs
        rc = _submit_io(c, io)
        if rc != 0:
            for r in refs:
                if isinstance(r, DmaBuffer):
                    (<DmaBuffer> r).unpin()
            Py_XDECREF(io.py_cb)
            Py_XDECREF(io.py_ref)
            free(io.iovs)
            bdev_put_io(c, io)
            self._raise(rc, t, c)

    # -- convenience, in blocks and in bytes --
    def _blocks(self, offset, nbytes):
        cdef uint32_t bs = self.bdev.block_size
        offset = _u64(offset, "offset")
        nbytes = _u64(nbytes, "nbytes")
        if offset % bs or nbytes % bs:
            raise InvalidArgument(f"offset {offset} and length {nbytes} must be multiples of "
                                  f"the block size {bs} of {self.bdev.name}")
        return offset // bs, nbytes // bs

    def _len(self, buf, nbytes):
        if nbytes is not None:
            return nbytes
        if buf is None:
            raise InvalidArgument("give nbytes (or a buffer)")
        return len(buf) if isinstance(buf, DmaBuffer) else memoryview(buf).nbytes

    def read_blocks(self, ch, buf, offset_blocks, num_blocks, cb=None):
        self._submit(ch, BDEV_IO_READ, buf, _u64(offset_blocks, "offset_blocks"),
                     _u64(num_blocks, "num_blocks"), cb)

    def write_blocks(self, ch, buf, offset_blocks, num_blocks, cb=None):
        self._submit(ch, BDEV_IO_WRITE, buf, _u64(offset_blocks, "offset_blocks"),
                     _u64(num_blocks, "num_blocks"), cb)

    def compare_blocks(self, ch, buf, offset_blocks, num_blocks, cb=None):
        self._submit(ch, BDEV_IO_COMPARE, buf, _u64(offset_blocks, "offset_blocks"),
                     _u64(num_blocks, "num_blocks"), cb)

    def write_zeroes_blocks(self, ch, offset_blocks, num_blocks, cb=None):
        self._submit(ch, BDEV_IO_WRITE_ZEROES, None, _u64(offset_blocks, "offset_blocks"),
                     _u64(num_blocks, "num_blocks"), cb)

    def unmap_blocks(self, ch, offset_blocks, num_blocks, cb=None):
        self._submit(ch, BDEV_IO_UNMAP, None, _u64(offset_blocks, "offset_blocks"),
                     _u64(num_blocks, "num_blocks"), cb)

    def read(self, ch, buf, offset, nbytes=None, cb=None):
        """Read `nbytes` (default: the buffer's length) at byte `offset` into `buf`."""
        b, n = self._blocks(offset, self._len(buf, nbytes))
        self._submit(ch, BDEV_IO_READ, buf, b, n, cb)

    def write(self, ch, buf, offset, nbytes=None, cb=None):
        b, n = self._blocks(offset, self._len(buf, nbytes))
        self._submit(ch, BDEV_IO_WRITE, buf, b, n, cb)

    def compare(self, ch, buf, offset, nbytes=None, cb=None):
        b, n = self._blocks(offset, self._len(buf, nbytes))
        self._submit(ch, BDEV_IO_COMPARE, buf, b, n, cb)

    def readv(self, ch, buffers, offset, cb=None):
        offset = _u64(offset, "offset")
        if offset % self.bdev.block_size:
            raise InvalidArgument(f"offset {offset} is not a multiple of the block size")
        self.submitv(ch, BDEV_IO_READ, buffers, offset // self.bdev.block_size, cb)

    def writev(self, ch, buffers, offset, cb=None):
        offset = _u64(offset, "offset")
        if offset % self.bdev.block_size:
            raise InvalidArgument(f"offset {offset} is not a multiple of the block size")
        self.submitv(ch, BDEV_IO_WRITE, buffers, offset // self.bdev.block_size, cb)

    def write_zeroes(self, ch, offset, nbytes, cb=None):
        b, n = self._blocks(offset, nbytes)
        self._submit(ch, BDEV_IO_WRITE_ZEROES, None, b, n, cb)

    def unmap(self, ch, offset, nbytes, cb=None):
        b, n = self._blocks(offset, nbytes)
        self._submit(ch, BDEV_IO_UNMAP, None, b, n, cb)

    def flush(self, ch, cb=None, offset=0, nbytes=None):
        """Flush the whole bdev, or `nbytes` at byte `offset` (inside the bdev, not empty)."""
        if nbytes is None:
            _u64(offset, "offset")
            self._submit(ch, BDEV_IO_FLUSH, None, 0, self.bdev.num_blocks, cb)
        else:
            b, n = self._blocks(offset, nbytes)
            self._submit(ch, BDEV_IO_FLUSH, None, b, n, cb)

    def reset(self, ch, cb=None):
        """Reset the device (NVMe: a controller reset). I/O in flight completes, possibly with
        an aborted status; the reset completes after it."""
        self._submit(ch, BDEV_IO_RESET, None, 0, 0, cb)

    # -- blocking helpers --
    def wait(self, ch, submit, timeout=60.0):
        """Run `submit(cb)` and poll this thread until the I/O completes; raise IoError on
        failure."""
        done = []
        submit(lambda ok, status: done.append((ok, status)))
        (<BdevChannel> ch).thread.run_until(lambda: done, timeout=timeout)
        ok, status = done[0]
        if not ok:
            raise IoError(f"I/O failed: {status}", status, self.bdev.name)
        return True

    def read_sync(self, ch, buf, offset, nbytes=None):
        return self.wait(ch, lambda cb: self.read(ch, buf, offset, nbytes, cb))

    def write_sync(self, ch, buf, offset, nbytes=None):
        return self.wait(ch, lambda cb: self.write(ch, buf, offset, nbytes, cb))

    def compare_sync(self, ch, buf, offset, nbytes=None):
        return self.wait(ch, lambda cb: self.compare(ch, buf, offset, nbytes, cb))

    def readv_sync(self, ch, buffers, offset):
        return self.wait(ch, lambda cb: self.readv(ch, buffers, offset, cb))

    def writev_sync(self, ch, buffers, offset):
        return self.wait(ch, lambda cb: self.writev(ch, buffers, offset, cb))

    def write_zeroes_sync(self, ch, offset, nbytes):
        return self.wait(ch, lambda cb: self.write_zeroes(ch, offset, nbytes, cb))

    def unmap_sync(self, ch, offset, nbytes):
        return self.wait(ch, lambda cb: self.unmap(ch, offset, nbytes, cb))

    def flush_sync(self, ch):
        return self.wait(ch, lambda cb: self.flush(ch, cb))

    def reset_sync(self, ch):
        return self.wait(ch, lambda cb: self.reset(ch, cb))

    def __repr__(self):
        return (f"<Descriptor {self.bdev.name} {'rw' if self.writable else 'ro'}"
                f"{' closed' if self.closed else ''}>")


# ---- modules written in Python ------------------------------------------------------------------
cdef char* _FORMAT_BYTES = b"B"
_STATUS_CODES = {v: k for k, v in STATUS_NAMES.items()}


cdef class _Segment:
    """One payload segment, exported (buffer protocol) to a Python module: the memory at `ptr`,
    `length` bytes, and `keep`, what owns that memory. Every view of it - the one PyIo hands
    out and any derived from it - keeps the segment, hence `keep`, alive."""
    cdef char* ptr
    cdef Py_ssize_t length
    cdef object keep
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer* view, int flags):
        self.shape[0] = self.length
        self.strides[0] = 1
        view.buf = self.ptr
        view.obj = self
        view.len = self.length
        view.readonly = 0
        view.itemsize = 1
        view.format = _FORMAT_BYTES if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = self.shape if flags & PyBUF_ND else NULL
        view.strides = self.strides if flags & PyBUF_STRIDES == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass


cdef object _segment_view(char* ptr, Py_ssize_t length, object keep):
    cdef _Segment seg = _Segment.__new__(_Segment)
    seg.ptr = ptr
    seg.length = length
    seg.keep = keep
    return memoryview(seg)


cdef object _payload_owner(bdev_io* io):
    """The Python object whose memory `io`'s segments point into, or None when no Python
    object owns it (the C path: a C caller's memory, which nothing here can pin)."""
    cdef bdev_io* root = io.parent if io.flags & IOF_CHILD else io
    if io.flags & IOF_BOUNCE:
        return <object> io.bounce_ref
    if root.flags & IOF_EMULATED:
        return _zero_buf
    if root.flags & IOF_BOUNCE:
        return <object> root.bounce_ref
    if root.flags & IOF_PY and root.py_ref != NULL:
        return <object> root.py_ref
    return None


cdef object _pinned(object owner):
    """What holds `owner`'s memory alive and in place while a view of it lives: an export of
    it (a DmaBuffer then refuses free(), a bytearray refuses to resize). A memoryview (what the
    layer keeps of other buffers) already holds one on its object."""
    if isinstance(owner, DmaBuffer):
        return memoryview(owner)
    if isinstance(owner, list):
        return tuple([_pinned(o) for o in owner])
    return owner


cdef class PyIo:
    """A pending I/O as a Python module sees it. Call `complete(status)` exactly once, from the
    channel's thread (another OS thread gets WrongThreadError; a second call, or a call after
    the I/O was aborted or handed back to the layer, gets IoCompletedError).

    `buffers()` gives writable memoryviews of the payload; they are released (stop working)
    when the I/O completes. A view derived from one (a slice, numpy.frombuffer) outlives the
    I/O but can never reach freed memory: it keeps alive what it shows - the caller's buffer,
    exported (a DmaBuffer refuses free(), a bytearray refuses to resize) until the last such
    view is released; or, for I/O from the C path (no Python object owns the caller's memory),
    a staging copy the layer made for the module (copied back for a read when it completes)."""
    cdef bdev_io* io
    cdef readonly BdevChannel channel
    cdef readonly bint is_retry           # the layer handed this I/O to the module before
    cdef uint8_t _type
    cdef uint32_t _index
    cdef uint64_t _offset
    cdef uint64_t _num
    cdef list _views
    cdef DmaBuffer _staging
    cdef str _ended

    @property
    def type(self):
        return IO_TYPE_NAMES[self._type]

    @property
    def offset_blocks(self):
        return self._offset

    @property
    def num_blocks(self):
        return self._num

    @property
    def bdev(self):
        return self.channel.bdev

    @property
    def pending(self):
        """Is the I/O still the module's to complete?"""
        return self.io != NULL

    def buffers(self):
        """Writable memoryviews of the payload segments (see the class for how long they
        work and what a view derived from one keeps alive)."""
        cdef bdev_io* io = self.io
        cdef uint32_t i
        cdef char* base
        cdef uint64_t off = 0
        if io == NULL:
            self._raise_ended("buffers()")
        if io.iovcnt == 0 or not (_DATA_TYPES >> io.type) & 1:
            return []
        owner = _payload_owner(io)
        if owner is None:
            if self._staging is None:
                self._staging = _stage(io)
            base = self._staging.data()
            views = []
            for i in range(io.iovcnt):
                views.append(_segment_view(base + off, io.iovs[i].iov_len, self._staging))
                off += io.iovs[i].iov_len
        else:
            keep = _pinned(owner)
            views = [_segment_view(<char*> io.iovs[i].iov_base, io.iovs[i].iov_len, keep)
                     for i in range(io.iovcnt)]
        if self._views is None:
            self._views = []
        self._views.extend(views)
        return views

    def complete(self, status="success"):
        """`status`: "success", "failed", "nomem" (the layer retries it later), "miscompare"
        or "aborted"."""
        cdef bdev_io* io = self.io
        cdef int code
        if io == NULL:
            self._raise_ended("complete()")
        if not self.channel.on_owner():
            raise WrongThreadError(
                f"complete() of a {self.type} I/O of {self.channel.bdev.name} from OS thread "
                f"{threading.current_thread().name!r}: the I/O belongs to thread "
                f"{self.channel.thread.name!r} (complete it there, e.g. by thread.send())")
        code = _STATUS_CODES.get(status, IO_PENDING) if isinstance(status, str) else IO_PENDING
        if code == IO_PENDING:
            raise InvalidArgument(f"unknown status {status!r}; known: "
                                  f"{', '.join(_STATUS_CODES)}")
        if self._staging is not None and code == IO_SUCCESS and io.type == BDEV_IO_READ:
            _unstage(io, self._staging)
        self._end("completed")
        bdev_io_complete(io, <uint8_t> code)

    cdef _end(self, str why):
        """The I/O is no longer the module's: forget it, and release the views handed out."""
        cdef dict held = self.channel.py_held
        self.io = NULL
        self._ended = why
        if held is not None and held.get(self._index) is self:
            del held[self._index]
        if self._views is not None:
            for v in self._views:
                try:
                    v.release()
                except BufferError:     # something holds an export of it: it stays valid,
                    pass                # and keeps the memory it shows alive (see the class)
            self._views = None

    cdef _abort(self):
        cdef bdev_io* io = self.io
        if io == NULL:
            return
        self._end("aborted when its channel was released")
        bdev_io_complete(io, IO_ABORTED)

    def _raise_ended(self, what):
        raise IoCompletedError(f"{what}: this {self.type} I/O of {self.channel.bdev.name} at "
                               f"block {self._offset}+{self._num} was already {self._ended}",
                               self.channel.bdev.name)

    def __repr__(self):
        state = "pending" if self.io != NULL else self._ended
        return (f"<PyIo {self.type} {self._offset}+{self._num} of {self.channel.bdev.name} "
                f"{state}{' retry' if self.is_retry else ''}>")


cdef DmaBuffer _stage(bdev_io* io):
    """A copy of `io`'s payload for a Python module (the C path), aligned as the bdev asks."""
    cdef Bdev b = <Bdev> io.bdev
    cdef uint64_t nbytes = 0
    cdef uint32_t i
    cdef char* dst
    for i in range(io.iovcnt):
        nbytes += io.iovs[i].iov_len
    cdef DmaBuffer buf = _memory.allocate(max(nbytes, 1), max(4096, b.required_alignment))
    if io.type != BDEV_IO_READ:
        dst = buf.data()
        for i in range(io.iovcnt):
            memcpy(dst, io.iovs[i].iov_base, io.iovs[i].iov_len)
            dst += io.iovs[i].iov_len
    return buf


cdef void _unstage(bdev_io* io, DmaBuffer buf):
    cdef uint32_t i
    cdef char* src = buf.data()
    for i in range(io.iovcnt):
        memcpy(io.iovs[i].iov_base, src, io.iovs[i].iov_len)
        src += io.iovs[i].iov_len


cdef int _submit_result(str name, object r):
    """What PyBdev.submit's return value means: 0 (accepted), a negative errno (refused), or,
    for anything else, -EIO with the module's mistake logged."""
    if r is None:
        return 0
    if not isinstance(r, bool):
        try:
            v = operator.index(r)
        except Exception:
            v = None
        if v is not None and -4096 < v <= 0:
            return v
    log.error("%s: submit() returned %r; it must return None or 0 (accepted: the module "
              "completes the I/O) or a negative errno (refused): the I/O fails", name, r)
    return -EIO


cdef class PyBdev(Bdev):
    """Base of bdevs whose module is written in Python: override `submit(io)` (a PyIo).

    The contract: `submit` returns None or 0 - the I/O is accepted, complete it exactly once
    with `io.complete(...)`, now or later, from the channel's thread - or a negative errno - it
    is refused: -ENOMEM has the layer retry it later (with a new PyIo, `is_retry` set), others
    fail it; the PyIo is then no longer the module's. An exception from `submit`, or any other
    return value, fails the I/O with the module's mistake logged. What the module still holds
    when its channel is `put()` is aborted, once (the layer does not wait for a Python module:
    `drain_timeout` is 0). Slower than a Cython module - a Python call per I/O - but the same
    guarantee: every accepted I/O completes exactly once."""

    def drain_timeout(self):
        return 0.0

    def abort_channel(self, BdevChannel ch):
        held = ch.py_held
        if not held:
            return
        log.error("%s: the module still held %d I/O(s) when its channel on %s was released: "
                  "aborted", self.name, len(held), ch.thread.name)
        for p in list(held.values()):
            (<PyIo> p)._abort()
        ch.py_held = None

    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil:
        with gil:
            return self._py_submit(ch, io)

    cdef int _py_submit(self, BdevChannel ch, bdev_io* io) noexcept:
        cdef PyIo p = PyIo.__new__(PyIo)
        cdef int rc
        p.io = io
        p.channel = ch
        p.is_retry = bdev_io_is_retry(io)
        p._type = io.type
        p._index = io.index
        p._offset = io.offset_blocks
        p._num = io.num_blocks
        try:
            r = self.submit(p)
        except MemoryError:
            rc = -ENOMEM
        except BaseException:
            log.exception("%s: submit() raised; the I/O fails", self.name)
            rc = -EIO
        else:
            rc = _submit_result(self.name, r)
        if p.io != NULL:
            if rc == 0:
                if ch.py_held is None:
                    ch.py_held = {}
                ch.py_held[io.index] = p
            else:
                p._end("handed back to the layer (submit() refused it)")
        return rc

    def submit(self, io):
        raise NotImplementedError("PyBdev subclasses implement submit(io)")
