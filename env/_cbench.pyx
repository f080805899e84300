# cython: language_level=3, boundscheck=False, wraparound=False
"""C-level loops over env primitives, for benchmarks and tests that must measure (or exercise)
the code as Cython callers see it: no Python call per iteration."""
from libc.stdint cimport uint32_t, uint64_t, uintptr_t

from env.memmap cimport MemMap, vtophys, IOVA_INVALID
from env.memory cimport DmaBuffer, Pool
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy


def translate_loop(MemMap mm, uint64_t vaddr, uint64_t size, long n):
    """Translate `vaddr` `n` times through `mm` without the GIL; returns the last IOVA
    (or -1 when it did not translate) so the work cannot be optimised away."""
    cdef uint64_t iova = 0, s
    cdef long i
    with nogil:
        for i in range(n):
            s = size
            iova = mm.translate_c(vaddr + (i & 7) * 64, &s)
    return -1 if iova == IOVA_INVALID else <long long> iova


def vtophys_loop(uint64_t vaddr, long n):
    """`n` translations through the process-wide map."""
    cdef uint64_t iova = 0
    cdef long i
    with nogil:
        for i in range(n):
            iova = vtophys(vaddr, NULL)
    return -1 if iova == IOVA_INVALID else <long long> iova


def pool_cycle(Pool pool, long n, int batch=1):
    """`n` rounds of getting `batch` elements and putting them back; returns the number of
    failed gets (0 unless the pool is too small)."""
    cdef void* held[64]
    cdef long i, failed = 0
    cdef int j
    if batch < 1 or batch > 64:
        raise ValueError("batch must be between 1 and 64")
    with nogil:
        for i in range(n):
            for j in range(batch):
                held[j] = pool.get()
                if held[j] == NULL:
                    failed += 1
            for j in range(batch):
                if held[j] != NULL:
                    pool.put(held[j])
    return failed


def memcpy_loop(DmaBuffer src, DmaBuffer dst, size_t block, size_t total):
    """Copy `total` bytes from `src` (sequentially, wrapping) in `block`-sized pieces into
    `dst` (cycling through its `block`-sized slots): the plain-memcpy baseline of the malloc
    bdev's sequential reads. Returns the bytes copied."""
    cdef size_t done = 0, s = 0, d = 0
    cdef size_t slen = src.nbytes() - src.nbytes() % block, dlen = dst.nbytes() - dst.nbytes() % block
    if block == 0 or slen == 0 or dlen == 0:
        raise ValueError("buffers smaller than one block")
    with nogil:
        while done < total:
            memcpy(dst.data() + d, src.data() + s, block)
            done += block
            s += block
            if s == slen:
                s = 0
            d += block
            if d == dlen:
                d = 0
    return done


# ---- a do-nothing I/O target for env.workload: what the engine costs by itself -----------------
from env.workload cimport Workload, io_task, workload_complete


cdef class _NullTarget:
    cdef io_task** pending
    cdef uint32_t n


cdef int _null_submit(void* target, io_task* t) noexcept nogil:
    (<_NullTarget> target).pending[(<_NullTarget> target).n] = t
    (<_NullTarget> target).n = (<_NullTarget> target).n + 1
    return 0


cdef int _null_poll(void* target) noexcept nogil:
    cdef uint32_t i, n = (<_NullTarget> target).n
    cdef io_task* batch[256]
    for i in range(n):
        batch[i] = (<_NullTarget> target).pending[i]
    (<_NullTarget> target).n = 0
    for i in range(n):
        workload_complete(batch[i], True)
    return n


def run_null_target(**params):
    """env.workload against a target that completes every I/O at the next poll (at most 256 in
    flight): the engine's own cost per I/O, the floor of any adapter."""
    cdef _NullTarget tg = _NullTarget()
    cdef Workload wl
    if params.get("queue_depth", 32) > 256:
        raise ValueError("at most 256 in flight")
    tg.pending = <io_task**> calloc(256, sizeof(io_task*))
    params.setdefault("range_bytes", 1 << 30)
    wl = Workload(**params)
    wl.set_target(_null_submit, _null_poll, <void*> tg, tg)
    try:
        return wl.run()
    finally:
        free(tg.pending)
