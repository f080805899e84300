# VA -> IOVA translation at 2 MiB granularity (the C-level interface; see memmap.pyx).
from libc.stdint cimport uint64_t

cdef enum:
    SHIFT_2MB = 21
    SHIFT_1GB = 30
    VA_BITS = 48

# translate_c() returns this when an address has no valid translation.
cdef extern from *:
    """
    #define UBLK_IOVA_INVALID ((uint64_t)-1)
    """
    const uint64_t IOVA_INVALID "UBLK_IOVA_INVALID"


cdef class MemMap:
    cdef uint64_t** _top            # one pointer per 1 GiB of VA, each to 512 entries (2 MiB each)
    cdef readonly str mode          # "va" or "pa"
    cdef readonly str name
    cdef dict _regions              # vaddr -> Registration
    cdef object _mapper             # the DMA mapper (a vfio container) or None
    cdef object _lock

    cdef uint64_t translate_c(self, uint64_t vaddr, uint64_t* size) noexcept nogil
    cdef void _set_entries(self, uint64_t vaddr, uint64_t size, uint64_t iova) except *
    cdef void _set_entry(self, uint64_t vaddr, uint64_t entry) except *


# The process-wide map that DMA buffers register in and device drivers translate through.
cdef MemMap g_vtophys
cdef uint64_t vtophys(uint64_t vaddr, uint64_t* size) noexcept nogil
