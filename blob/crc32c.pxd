# CRC32C (Castagnoli), as iSCSI and the blobstore's on-disk format use it (see crc32c.pyx).
from libc.stdint cimport uint32_t

# The CRC of `n` bytes at `p`, continuing from `crc` (0 to start): the standard CRC32C, so
# crc32c_update(crc32c_update(0, a, na), b, nb) is the CRC of a followed by b.
cdef uint32_t crc32c_update(uint32_t crc, const void* p, size_t n) noexcept nogil
