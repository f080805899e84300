# cython: language_level=3, boundscheck=False, wraparound=False
"""CRC32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78): the digest of iSCSI
(RFC 3720) and of NVMe/TCP headers and data, and a checksum for on-disk metadata.

Two implementations of one function: the SSE4.2 `crc32` instruction (8 bytes per instruction)
when the CPU has it, found at run time (the extensions are built without -march, so they also load
on a CPU without it, e.g. an emulated one), and a slicing-by-8 table otherwise.

    from env.crc32c import crc32c
    crc32c(b"123456789") == 0xE3069283
    crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")

From Cython: `from env.crc32c cimport crc32c, crc32c_update` (nogil).
"""
from libc.stdint cimport uint8_t, uint32_t

from env.errors import InvalidArgument

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    typedef uint32_t (*ublk_crc32c_fn)(uint32_t, const uint8_t *, size_t);

    static uint32_t ublk_crc32c_table[8][256];

    static void ublk_crc32c_make_table(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            ublk_crc32c_table[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++)
            for (int t = 1; t < 8; t++)
                ublk_crc32c_table[t][i] = (ublk_crc32c_table[t - 1][i] >> 8)
                    ^ ublk_crc32c_table[0][ublk_crc32c_table[t - 1][i] & 0xFF];
    }

    /* Slicing-by-8: eight table lookups per 8 bytes (little-endian loads). */
    static uint32_t ublk_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n) {
        while (n && ((uintptr_t)p & 7)) {
            crc = ublk_crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
            n--;
        }
        while (n >= 8) {
            uint32_t lo, hi;
            memcpy(&lo, p, 4);
            memcpy(&hi, p + 4, 4);
            lo ^= crc;
            crc = ublk_crc32c_table[7][lo & 0xFF] ^ ublk_crc32c_table[6][(lo >> 8) & 0xFF]
                ^ ublk_crc32c_table[5][(lo >> 16) & 0xFF] ^ ublk_crc32c_table[4][lo >> 24]
                ^ ublk_crc32c_table[3][hi & 0xFF] ^ ublk_crc32c_table[2][(hi >> 8) & 0xFF]
                ^ ublk_crc32c_table[1][(hi >> 16) & 0xFF] ^ ublk_crc32c_table[0][hi >> 24];
            p += 8;
            n -= 8;
        }
        while (n--)
            crc = ublk_crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        return crc;
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #define UBLK_CRC32C_HW 1
    __attribute__((target("sse4.2")))
    static uint32_t ublk_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
        uint64_t c = crc;
        while (n && ((uintptr_t)p & 7)) {
            c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
            n--;
        }
        while (n >= 8) {
            uint64_t v;
            memcpy(&v, p, 8);
            c = __builtin_ia32_crc32di(c, v);
            p += 8;
            n -= 8;
        }
        while (n--)
            c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        return (uint32_t)c;
    }
    static int ublk_crc32c_cpu_has_hw(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("sse4.2");
    }
    #else
    #define UBLK_CRC32C_HW 0
    static uint32_t ublk_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
        return ublk_crc32c_sw(crc, p, n);
    }
    static int ublk_crc32c_cpu_has_hw(void) { return 0; }
    #endif

    static ublk_crc32c_fn ublk_crc32c_impl = ublk_crc32c_sw;
    static void ublk_crc32c_select(int hw) {
        ublk_crc32c_impl = hw ? ublk_crc32c_hw : ublk_crc32c_sw;
    }
    static inline uint32_t ublk_crc32c_run(uint32_t crc, const void *buf, size_t n) {
        return ublk_crc32c_impl(crc, (const uint8_t *)buf, n);
    }
    """
    void make_table "ublk_crc32c_make_table"() noexcept nogil
    int cpu_has_hw "ublk_crc32c_cpu_has_hw"() noexcept nogil
    void select "ublk_crc32c_select"(int hw) noexcept nogil
    uint32_t run "ublk_crc32c_run"(uint32_t crc, const void* buf, size_t n) noexcept nogil
    int HAVE_HW "UBLK_CRC32C_HW"


cdef uint32_t crc32c_update(uint32_t crc, const void* buf, size_t length) noexcept nogil:
    return run(crc, buf, length)


make_table()
cdef bint _cpu_hw = cpu_has_hw() != 0
cdef str _impl = "sse4.2" if _cpu_hw else "table"
select(_cpu_hw)


def cpu_has_sse42():
    """Does this CPU have the SSE4.2 crc32 instruction (checked at run time)?"""
    return _cpu_hw


def implementation():
    """"sse4.2" or "table": what crc32c() uses now."""
    return _impl


def set_implementation(name="auto"):
    """Choose the implementation: "auto" (SSE4.2 when the CPU has it), "table" or "sse4.2".
    Meant for tests and benchmarks; affects every caller in the process."""
    global _impl
    if name == "auto":
        name = "sse4.2" if _cpu_hw else "table"
    if name not in ("table", "sse4.2"):
        raise InvalidArgument(f"crc32c implementation must be auto, table or sse4.2, not "
                              f"{name!r}")
    if name == "sse4.2" and not _cpu_hw:
        raise InvalidArgument("this CPU has no SSE4.2 crc32 instruction")
    select(name == "sse4.2")
    _impl = name


def crc32c(data, crc=0):
    """The CRC32C of `data` (anything with the buffer protocol), continuing from `crc`."""
    cdef const uint8_t[::1] view
    cdef uint32_t c
    if not isinstance(crc, int) or not 0 <= crc <= 0xFFFFFFFF:
        raise InvalidArgument(f"crc must be an unsigned 32-bit integer, not {crc!r}")
    try:
        mv = memoryview(data)
    except TypeError:
        raise InvalidArgument(f"crc32c needs bytes-like data, not {type(data).__name__}") from None
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    view = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    c = <uint32_t> crc
    if view.shape[0]:
        with nogil:
            c = crc32c_update(c ^ 0xFFFFFFFFU, &view[0], view.shape[0]) ^ 0xFFFFFFFFU
    return c
