# A log-linear latency histogram with a nogil tally (see histogram.pyx).
from libc.stdint cimport uint64_t

cdef enum:
    HIST_BITS = 7                     # 128 buckets per power of two: under 1 % resolution
    HIST_PER_RANGE = 1 << HIST_BITS
    HIST_RANGES = 64 - HIST_BITS + 1
    HIST_BUCKETS = HIST_RANGES * HIST_PER_RANGE

cdef extern from *:
    """
    static inline unsigned ublk_hist_index(uint64_t v) {
        if (v < 128) return (unsigned)v;
        unsigned msb = 63u - (unsigned)__builtin_clzll(v);
        unsigned range = msb - 7u + 1u;
        return range * 128u + (unsigned)((v >> (range - 1u)) - 128u);
    }
    """
    unsigned hist_index "ublk_hist_index"(uint64_t v) noexcept nogil


cdef class Histogram:
    cdef uint64_t* buckets
    cdef readonly uint64_t count
    cdef readonly uint64_t total
    cdef readonly uint64_t min
    cdef readonly uint64_t max

    cdef inline void tally(self, uint64_t v) noexcept nogil:
        self.buckets[hist_index(v)] += 1
        self.count += 1
        self.total += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
