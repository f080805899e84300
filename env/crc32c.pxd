# CRC32C (Castagnoli, the iSCSI / NVMe/TCP digest). See crc32c.pyx.
from libc.stdint cimport uint32_t

# The raw register update (no inversion before or after): chain pieces with it, then invert once.
cdef uint32_t crc32c_update(uint32_t crc, const void* buf, size_t length) noexcept nogil

# The standard CRC32C of `buf`, continuing from a previous result `crc` (0 to start):
# crc32c(b, crc32c(a)) == crc32c(a + b).
cdef inline uint32_t crc32c(const void* buf, size_t length, uint32_t crc) noexcept nogil:
    return crc32c_update(crc ^ 0xFFFFFFFFU, buf, length) ^ 0xFFFFFFFFU
