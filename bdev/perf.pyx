# cython: language_level=3
"""The bdev layer's workload adapter: `env.workload` driving a descriptor and a channel.

Submission goes through `bdev_submit` (the whole bdev layer: checks, bounce, split, module) and
completions arrive from the channel's thread poll, all without the GIL: this is the C path
`userblk perf` measures. One Workload runs on the OS thread that owns the channel.
"""
from libc.stdint cimport uint32_t, uint64_t

from bdev.core cimport (BDEV_IO_READ, BDEV_IO_WRITE, BdevChannel, Descriptor, bdev_io,
                        bdev_submit)
from env.thread cimport thread_poll, thread_s
from env.workload cimport Workload, io_task, workload_complete

from env.errors import InvalidArgument


cdef class _Target:
    cdef Descriptor desc
    cdef BdevChannel ch
    cdef thread_s* thread
    cdef uint32_t shift
    cdef uint32_t polls


cdef void _done(bdev_io* io, bint success, void* arg) noexcept nogil:
    workload_complete(<io_task*> arg, success)


cdef int _submit(void* target, io_task* t) noexcept nogil:
    cdef uint32_t shift = (<_Target> target).shift
    return bdev_submit((<_Target> target).desc, (<_Target> target).ch,
                       BDEV_IO_READ if t.is_read else BDEV_IO_WRITE, t.buf,
                       t.offset >> shift, t.length >> shift, _done, t)


cdef int _poll(void* target) noexcept nogil:
    # The job's own channel every time; the whole thread (messages, timed pollers such as an
    # NVMe controller's admin poller, other channels) every 16th time: a full iteration costs
    # as much again as reaping a batch of completions.
    cdef uint32_t n = (<_Target> target).polls + 1
    (<_Target> target).polls = n
    if n & 15 == 0:
        return thread_poll((<_Target> target).thread, 0)
    return (<_Target> target).ch.poll()


def make_workload(Descriptor desc, BdevChannel ch, **params):
    """A Workload on `desc` through channel `ch` (of the calling thread). `params` are
    env.workload.Workload's (queue_depth, io_size, workload, seconds, read_pct, ...);
    the range defaults to the whole bdev."""
    b = desc.bdev
    params.setdefault("range_bytes", b.size)
    params.setdefault("block_size", b.block_size)
    if params["io_size"] % b.block_size:
        raise InvalidArgument(f"I/O size {params['io_size']} is not a multiple of the block "
                              f"size {b.block_size} of {b.name}")
    if params["range_bytes"] + params.get("offset_bytes", 0) > b.size:
        raise InvalidArgument(f"the range is larger than {b.name}")
    if params.get("workload", "randread") not in ("read", "randread") and not desc.writable:
        raise InvalidArgument("a workload that writes needs a descriptor opened with write=True")
    ch.check_thread()
    cdef _Target tg = _Target()
    tg.desc = desc
    tg.ch = ch
    tg.thread = ch.thread.handle()
    tg.shift = b.block_shift
    cdef Workload wl = Workload(**params)
    wl.set_target(_submit, _poll, <void*> tg, tg)
    return wl


def run(Descriptor desc, BdevChannel ch, **params):
    """Run a workload now on this thread; returns its figures."""
    return make_workload(desc, ch, **params).run()
