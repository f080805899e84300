# Memory-mapped device registers (a PCI BAR, or plain memory standing in for one).
from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    /* Device registers are read and written exactly once per access: volatile, naturally
       aligned, never merged or cached by the compiler. */
    static inline uint32_t ublk_mmio_read32(const char *base, size_t off) {
        return *(const volatile uint32_t *)(base + off);
    }
    static inline void ublk_mmio_write32(char *base, size_t off, uint32_t v) {
        *(volatile uint32_t *)(base + off) = v;
    }
    static inline uint64_t ublk_mmio_read64(const char *base, size_t off) {
        return *(const volatile uint64_t *)(base + off);
    }
    /* NVMe 1.4+ lets the host write 64-bit registers as two 32-bit writes, low dword first;
       some hosts and emulators handle nothing else. */
    static inline void ublk_mmio_write64(char *base, size_t off, uint64_t v) {
        *(volatile uint32_t *)(base + off) = (uint32_t)v;
        *(volatile uint32_t *)(base + off + 4) = (uint32_t)(v >> 32);
    }
    /* Ordering between normal memory (queue entries) and device accesses. x86 keeps stores in
       order, but the compiler must not move them across; other architectures need a fence. */
    static inline void ublk_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE);
    #if defined(__x86_64__)
        __asm__ volatile("sfence" ::: "memory");
    #endif
    }
    static inline void ublk_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
    static inline void ublk_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    uint32_t mmio_read32 "ublk_mmio_read32"(const char* base, size_t off) noexcept nogil
    void mmio_write32 "ublk_mmio_write32"(char* base, size_t off, uint32_t v) noexcept nogil
    uint64_t mmio_read64 "ublk_mmio_read64"(const char* base, size_t off) noexcept nogil
    void mmio_write64 "ublk_mmio_write64"(char* base, size_t off, uint64_t v) noexcept nogil
    void wmb "ublk_wmb"() noexcept nogil
    void rmb "ublk_rmb"() noexcept nogil
    void mb "ublk_mb"() noexcept nogil


cdef class Mmio:
    cdef char* base
    cdef readonly size_t size
    cdef object _owner           # what keeps the mapping alive (None when we mmap()ed it)
    cdef bint _mapped            # munmap() on close
    cdef readonly str name

    cdef inline uint32_t read32(self, size_t off) noexcept nogil:
        return mmio_read32(self.base, off)
    cdef inline void write32(self, size_t off, uint32_t v) noexcept nogil:
        mmio_write32(self.base, off, v)
    cdef inline uint64_t read64(self, size_t off) noexcept nogil:
        return mmio_read64(self.base, off)
    cdef inline void write64(self, size_t off, uint64_t v) noexcept nogil:
        mmio_write64(self.base, off, v)
    cdef int _check(self, size_t off, size_t width) except -1
