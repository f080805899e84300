# cython: language_level=3, boundscheck=False, wraparound=False
"""C-level loops over env primitives, for benchmarks and tests that must measure (or exercise)
the code as Cython callers see it: no Python call per iteration."""
from libc.stdint cimport uint64_t, uintptr_t

from env.memmap cimport MemMap, vtophys, IOVA_INVALID
from env.memory cimport Pool


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
