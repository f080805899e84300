# cython: language_level=3
"""The blobstore's workload adapter: `env.workload` driving a blob through a BlobChannel, at C
level (blob_submit, no Python per I/O), as bdev.perf drives a descriptor. Also a sequential pass
(`seq_pass`): keep `queue_depth` writes in flight until a range has been written once - what
first writes to a thin blob cost against writes to allocated clusters."""
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free

from bdev.core cimport BdevChannel
from blob.io cimport BLOB_IO_READ, BLOB_IO_WRITE, BlobChannel, BlobData, blob_submit
from env.memory cimport DmaBuffer
from env.thread cimport thread_poll, thread_s
from env.ticks cimport now_ns
from env.workload cimport Workload, io_task, workload_complete

from env import memory as _memory
from env.errors import InvalidArgument, UserblkError


cdef class _Target:
    cdef BlobChannel ch
    cdef BlobData blob
    cdef BdevChannel base
    cdef thread_s* thread
    cdef uint32_t shift
    cdef uint32_t polls


cdef void _done(void* arg, int status) noexcept nogil:
    workload_complete(<io_task*> arg, status == 0)


cdef int _submit(void* target, io_task* t) noexcept nogil:
    cdef uint32_t shift = (<_Target> target).shift
    return blob_submit((<_Target> target).ch, (<_Target> target).blob,
                       BLOB_IO_READ if t.is_read else BLOB_IO_WRITE, t.buf, t.offset >> shift,
                       t.length >> shift, _done, t)


cdef int _poll(void* target) noexcept nogil:
    # the base bdev's channel every time (completions come from there); the whole thread -
    # messages (allocations), the blob channel's poller, timed pollers - every 16th time
    cdef uint32_t n = (<_Target> target).polls + 1
    (<_Target> target).polls = n
    if n & 15 == 0:
        return thread_poll((<_Target> target).thread, 0)
    return (<_Target> target).base.poll()


cdef _Target _target(blob, BlobChannel ch):
    ch.check_thread()
    cdef _Target tg = _Target()
    tg.ch = ch
    tg.blob = blob.data
    tg.base = ch.base
    tg.thread = ch.thread.handle()
    tg.shift = blob.store.io_unit_size.bit_length() - 1
    return tg


def make_workload(blob, BlobChannel ch, **params):
    """A Workload on open blob `blob` through this thread's channel `ch`; params are
    env.workload.Workload's (queue_depth, io_size, workload, seconds, ...); the range defaults
    to the whole blob."""
    size = blob.size
    unit = blob.store.io_unit_size
    params.setdefault("range_bytes", size)
    params.setdefault("block_size", unit)
    if params["io_size"] % unit:
        raise InvalidArgument(f"I/O size {params['io_size']} is not a multiple of the I/O unit "
                              f"{unit}")
    if params["range_bytes"] + params.get("offset_bytes", 0) > size:
        raise InvalidArgument(f"the range is larger than blob {blob.id} ({size} bytes)")
    cdef _Target tg = _target(blob, ch)
    cdef Workload wl = Workload(**params)
    wl.set_target(_submit, _poll, <void*> tg, tg)
    return wl


def run(blob, BlobChannel ch, **params):
    """Run a workload now on this thread; returns its figures."""
    return make_workload(blob, ch, **params).run()


# ---- one sequential pass ----------------------------------------------------------------------
cdef struct _slot:
    void* pass_
    char* buf
    uint64_t offset


cdef class _Pass:
    cdef _Target tg
    cdef uint64_t next_off, end, io_units, outstanding, errors, done
    cdef _slot* slots


cdef void _pass_done(void* arg, int status) noexcept nogil:
    cdef _slot* s = <_slot*> arg
    _pass_step(<_Pass> s.pass_, s, status)


cdef void _pass_step(_Pass p, _slot* s, int status) noexcept nogil:
    p.outstanding -= 1
    p.done += 1
    if status != 0:
        p.errors += 1
    _pass_next(p, s)


cdef void _pass_next(_Pass p, _slot* s) noexcept nogil:
    if p.next_off >= p.end or p.errors:
        return
    s.offset = p.next_off
    p.next_off += p.io_units
    if blob_submit(p.tg.ch, p.tg.blob, BLOB_IO_WRITE, s.buf, s.offset, p.io_units, _pass_done,
                   s) != 0:
        p.errors += 1
        return
    p.outstanding += 1


def seq_pass(blob, BlobChannel ch, uint32_t io_size, uint32_t queue_depth, double timeout=120.0):
    """Write the whole blob once, sequentially, `io_size` bytes per write with `queue_depth` in
    flight; returns the seconds it took."""
    unit = blob.store.io_unit_size
    if io_size % unit or blob.size % io_size:
        raise InvalidArgument("io_size must divide the blob and be whole I/O units")
    cdef _Pass p = _Pass()
    p.tg = _target(blob, ch)
    p.io_units = io_size // unit
    p.end = blob.num_units
    buf = _memory.allocate(io_size * queue_depth)
    memoryview(buf)[:] = b"\xa5" * (io_size * queue_depth)
    p.slots = <_slot*> calloc(queue_depth, sizeof(_slot))
    cdef uint32_t i
    cdef uint64_t t0, t1, deadline
    try:
        for i in range(queue_depth):
            p.slots[i].pass_ = <void*> p
            p.slots[i].buf = (<DmaBuffer> buf).data() + <uint64_t> i * io_size
        with nogil:
            t0 = now_ns()
            deadline = t0 + <uint64_t> (timeout * 1e9)
            for i in range(queue_depth):
                _pass_next(p, &p.slots[i])
            while p.outstanding and now_ns() < deadline:
                _poll(<void*> p.tg)
            t1 = now_ns()
        if p.outstanding:
            raise UserblkError(f"{p.outstanding} writes did not complete in {timeout} s")
        if p.errors:
            raise UserblkError(f"{p.errors} writes failed")
        return (t1 - t0) / 1e9
    finally:
        free(p.slots)
