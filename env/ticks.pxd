# Cheap timestamps for per-I/O accounting: the TSC on x86-64, CLOCK_MONOTONIC elsewhere.
from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <time.h>
    #include <stdint.h>
    #if defined(__x86_64__)
    #include <x86intrin.h>
    static inline uint64_t ublk_ticks(void) { return __rdtsc(); }
    #define UBLK_TICKS_ARE_TSC 1
    #else
    static inline uint64_t ublk_ticks(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    #define UBLK_TICKS_ARE_TSC 0
    #endif
    static inline uint64_t ublk_now_ns(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    }
    """
    uint64_t get_ticks "ublk_ticks"() noexcept nogil
    uint64_t now_ns "ublk_now_ns"() noexcept nogil
    int TICKS_ARE_TSC "UBLK_TICKS_ARE_TSC"
