# cython: language_level=3
"""The raw driver's workload: `env.workload` connected straight to a queue pair and a namespace
(SPDK's spdk_nvme_perf, in miniature). No bdev layer in between: this is what the driver itself
costs per I/O, and the figure the bdev layer's NVMe backend is compared with."""
from libc.stdint cimport uint32_t, uint64_t

from env.workload cimport Workload, io_task, workload_complete
from nvme.qpair cimport QueuePair, nvme_cb
from nvme.spec cimport NVM_READ, NVM_WRITE, nvme_cqe

from env.errors import InvalidArgument


cdef class _Target:
    cdef QueuePair qpair
    cdef uint32_t nsid
    cdef uint32_t lba_shift


cdef void _done(void* arg, const nvme_cqe* cpl) noexcept nogil:
    workload_complete(<io_task*> arg, (cpl.status >> 1) & 0x7FF == 0)


cdef int _submit(void* target, io_task* t) noexcept nogil:
    # `target` is a borrowed _Target: cast inline (no reference counting without the GIL)
    cdef uint32_t shift = (<_Target> target).lba_shift
    return (<_Target> target).qpair.submit_io(
        NVM_READ if t.is_read else NVM_WRITE, (<_Target> target).nsid, t.offset >> shift,
        t.length >> shift, shift, t.buf, 0, 0, _done, t)


cdef int _poll(void* target) noexcept nogil:
    return (<_Target> target).qpair.process_completions_c(0)


def make_workload(ns, QueuePair qpair, *, queue_depth=32, io_size=4096, workload="randread",
                  seconds=1.0, read_pct=50, range_bytes=None, seed=1):
    """A Workload on namespace `ns` through `qpair` (owned by this thread), to `run()` once or
    many times; its parameters are env.workload.Workload's."""
    if io_size % ns.block_size:
        raise InvalidArgument(f"I/O size {io_size} is not a multiple of the block size "
                              f"{ns.block_size}")
    cdef _Target tg = _Target()
    tg.qpair = qpair
    tg.nsid = ns.nsid
    tg.lba_shift = ns.lba_shift
    cdef Workload wl = Workload(queue_depth=queue_depth, io_size=io_size, workload=workload,
                                seconds=seconds, read_pct=read_pct, block_size=ns.block_size,
                                range_bytes=range_bytes or ns.size, seed=seed)
    wl.set_target(_submit, _poll, <void*> tg, tg)
    return wl


def run(ns, QueuePair qpair, **params):
    """Run a workload on namespace `ns` through `qpair` (owned by this thread) now; returns the
    figures of `env.workload.Workload.results()`."""
    return make_workload(ns, qpair, **params).run()
