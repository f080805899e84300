# cython: language_level=3
"""Latency histograms.

Log-linear buckets in the manner of SPDK's spdk_histogram_data: values below 128 have a bucket
each; above, every power of two is cut into 128 equal buckets, so a bucket is never wider than
1/128 of its value. `tally()` is a C-level inline (no GIL, no allocation): the perf engines call it
once per I/O with the latency in nanoseconds. Histograms of several threads merge exactly.
"""
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset

from env.errors import InvalidArgument


cdef inline uint64_t bucket_low(unsigned index) noexcept nogil:
    cdef unsigned r = index // HIST_PER_RANGE
    cdef uint64_t i = index % HIST_PER_RANGE
    if r == 0:
        return i
    return (i + HIST_PER_RANGE) << (r - 1)


cdef inline uint64_t bucket_high(unsigned index) noexcept nogil:
    """The largest value that lands in bucket `index`."""
    cdef unsigned r = index // HIST_PER_RANGE
    if r == 0:
        return bucket_low(index)
    return bucket_low(index) + (1ULL << (r - 1)) - 1


cdef class Histogram:
    """Counts of values (latencies in ns, usually) in log-linear buckets."""

    def __cinit__(self):
        self.buckets = <uint64_t*> calloc(HIST_BUCKETS, sizeof(uint64_t))
        if self.buckets == NULL:
            raise MemoryError()
        self.min = <uint64_t> -1

    def __dealloc__(self):
        free(self.buckets)

    def add(self, uint64_t value, uint64_t times=1):
        """Python-level tally (the hot path uses the C inline `tally`)."""
        cdef uint64_t k
        for k in range(times):
            self.tally(value)

    def reset(self):
        memset(self.buckets, 0, HIST_BUCKETS * sizeof(uint64_t))
        self.count = self.total = self.max = 0
        self.min = <uint64_t> -1

    def merge(self, Histogram other):
        """Add `other`'s counts into this one."""
        cdef unsigned i
        for i in range(HIST_BUCKETS):
            self.buckets[i] += other.buckets[i]
        self.count += other.count
        self.total += other.total
        if other.count:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)

    @property
    def mean(self):
        return self.total / self.count if self.count else 0.0

    def percentile(self, double p):
        """The value below which `p` percent of the tallies fall (upper edge of its bucket,
        clamped to the observed max); 0 when empty."""
        if not 0 <= p <= 100:
            raise InvalidArgument(f"percentile must be within 0..100, not {p}")
        if self.count == 0:
            return 0
        cdef uint64_t want = <uint64_t> (p / 100.0 * self.count + 0.5)
        if want < 1:
            want = 1
        cdef uint64_t seen = 0
        cdef unsigned i
        for i in range(HIST_BUCKETS):
            seen += self.buckets[i]
            if seen >= want:
                return min(bucket_high(i), self.max)
        return self.max

    def percentiles(self, ps=(50, 90, 99, 99.9)):
        return {p: self.percentile(p) for p in ps}

    def buckets_nonzero(self):
        """[(low, high, count)] of the buckets that have tallies, in order."""
        cdef unsigned i
        return [(bucket_low(i), bucket_high(i), self.buckets[i])
                for i in range(HIST_BUCKETS) if self.buckets[i]]

    def summary(self):
        """count, mean, min, max and p50/p90/p99/p99.9 as a dict (values in the tally unit)."""
        out = {"count": self.count, "mean": self.mean,
               "min": self.min if self.count else 0, "max": self.max}
        for p, v in self.percentiles().items():
            out[f"p{p:g}"] = v
        return out

    def __repr__(self):
        return f"<Histogram count={self.count} mean={self.mean:.1f} max={self.max}>"
