# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A fast first look at many metadata pages at once (the loader reads the metadata region in
large chunks): which pages are valid (magic, store tag, own index, CRC32C), and their headers.
Everything else about a page is checked in Python (blob.mdpage), for the pages that matter."""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from env.crc32c cimport crc32c

cdef enum:
    PAGE = 4096


cdef inline uint32_t _u32(const uint8_t* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t _u64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


def valid_pages(data, uint64_t first_index, uint64_t tag):
    """For the pages in `data` (a multiple of 4096 bytes; page k is metadata page first_index +
    k): a list of (index, blob_id, seq, chain_pos, chain_len, next) of the valid ones, and the
    number of pages that are neither valid nor zeroes."""
    cdef const uint8_t[:] v = memoryview(data).cast("B")
    cdef uint64_t n = v.shape[0] // PAGE, k
    cdef const uint8_t* p
    cdef uint64_t bad = 0
    cdef uint32_t i
    cdef bint zero
    out = []
    for k in range(n):
        p = &v[k * PAGE]
        if memcmp(p, b"UBMD", 4) != 0:
            zero = True
            for i in range(PAGE // 8):
                if _u64(p + i * 8):
                    zero = False
                    break
            if not zero:
                bad += 1
            continue
        if (crc32c(p, PAGE - 4, 0) != _u32(p + PAGE - 4) or _u64(p + 8) != tag
                or _u32(p + 4) != first_index + k):
            bad += 1
            continue
        out.append((first_index + k, _u64(p + 16), _u64(p + 24), _u32(p + 32), _u32(p + 36),
                    _u32(p + 40)))
    return out, bad
