# cython: language_level=3, boundscheck=False, wraparound=False
"""CRC32C (Castagnoli: polynomial 0x1EDC6F41, reflected, init and final XOR 0xFFFFFFFF).

Two implementations of the same function, chosen once at import:

- the SSE4.2 `crc32` instruction, 8 bytes per instruction, when the CPU has it (checked at run
  time with cpuid: the extensions are built without -march, and the QEMU test guest's CPU may
  lack SSE4.2);
- slicing-by-8 over eight 256-entry tables (computed at import), 8 bytes per step, anywhere.

    from blob.crc32c import crc32c
    crc32c(b"123456789") == 0xE3069283
    crc32c(b"6789", crc32c(b"12345"))       # continues a CRC

`implementation()` says which one runs; `crc32c_table` and `crc32c_hw` call one explicitly (for
tests; crc32c_hw raises where the CPU lacks the instruction).
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t

from env.errors import UserblkError

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static uint32_t ublk_crc32c_tab[8][256];

    static void ublk_crc32c_init_tables(void)
    {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));   /* reflected 0x1EDC6F41 */
            ublk_crc32c_tab[0][i] = c;
        }
        /* tab[k][i]: the CRC of byte i followed by k zero bytes */
        for (uint32_t i = 0; i < 256; i++)
            for (int k = 1; k < 8; k++)
                ublk_crc32c_tab[k][i] = (ublk_crc32c_tab[k - 1][i] >> 8)
                                        ^ ublk_crc32c_tab[0][ublk_crc32c_tab[k - 1][i] & 0xFF];
    }

    /* On the inverted register (no init/final XOR here). Little-endian loads. */
    static uint32_t ublk_crc32c_sw(uint32_t c, const unsigned char *p, size_t n)
    {
        while (n && ((uintptr_t)p & 7)) {
            c = (c >> 8) ^ ublk_crc32c_tab[0][(c ^ *p++) & 0xFF];
            n--;
        }
        while (n >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
            w = __builtin_bswap64(w);
    #endif
            w ^= c;
            c = ublk_crc32c_tab[7][w & 0xFF] ^ ublk_crc32c_tab[6][(w >> 8) & 0xFF]
              ^ ublk_crc32c_tab[5][(w >> 16) & 0xFF] ^ ublk_crc32c_tab[4][(w >> 24) & 0xFF]
              ^ ublk_crc32c_tab[3][(w >> 32) & 0xFF] ^ ublk_crc32c_tab[2][(w >> 40) & 0xFF]
              ^ ublk_crc32c_tab[1][(w >> 48) & 0xFF] ^ ublk_crc32c_tab[0][w >> 56];
            p += 8;
            n -= 8;
        }
        while (n--)
            c = (c >> 8) ^ ublk_crc32c_tab[0][(c ^ *p++) & 0xFF];
        return c;
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <cpuid.h>
    #define UBLK_CRC_HAVE_X86 1
    __attribute__((target("sse4.2")))
    static uint32_t ublk_crc32c_hw(uint32_t c, const unsigned char *p, size_t n)
    {
        uint64_t c64;
        while (n && ((uintptr_t)p & 7)) {
            c = __builtin_ia32_crc32qi(c, *p++);
            n--;
        }
        c64 = c;
        while (n >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            c64 = __builtin_ia32_crc32di(c64, w);
            p += 8;
            n -= 8;
        }
        c = (uint32_t)c64;
        while (n--)
            c = __builtin_ia32_crc32qi(c, *p++);
        return c;
    }
    static int ublk_cpu_has_sse42(void)
    {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d))
            return 0;
        return (c & bit_SSE4_2) != 0;
    }
    #else
    #define UBLK_CRC_HAVE_X86 0
    static uint32_t ublk_crc32c_hw(uint32_t c, const unsigned char *p, size_t n)
    { return ublk_crc32c_sw(c, p, n); }
    static int ublk_cpu_has_sse42(void) { return 0; }
    #endif

    static int ublk_crc32c_use_hw = 0;

    static uint32_t ublk_crc32c(uint32_t crc, const void *p, size_t n)
    {
        uint32_t c = ~crc;
        c = ublk_crc32c_use_hw ? ublk_crc32c_hw(c, (const unsigned char *)p, n)
                               : ublk_crc32c_sw(c, (const unsigned char *)p, n);
        return ~c;
    }
    static uint32_t ublk_crc32c_table_only(uint32_t crc, const void *p, size_t n)
    { return ~ublk_crc32c_sw(~crc, (const unsigned char *)p, n); }
    static uint32_t ublk_crc32c_hw_only(uint32_t crc, const void *p, size_t n)
    { return ~ublk_crc32c_hw(~crc, (const unsigned char *)p, n); }
    """
    void init_tables "ublk_crc32c_init_tables"() noexcept nogil
    int cpu_has_sse42 "ublk_cpu_has_sse42"() noexcept nogil
    int use_hw "ublk_crc32c_use_hw"
    uint32_t crc_any "ublk_crc32c"(uint32_t crc, const void* p, size_t n) noexcept nogil
    uint32_t crc_table "ublk_crc32c_table_only"(uint32_t crc, const void* p,
                                                size_t n) noexcept nogil
    uint32_t crc_hw "ublk_crc32c_hw_only"(uint32_t crc, const void* p, size_t n) noexcept nogil
    int HAVE_X86 "UBLK_CRC_HAVE_X86"



def _choose():
    global use_hw
    init_tables()
    hw = bool(HAVE_X86 and cpu_has_sse42())
    use_hw = 1 if hw else 0
    return hw


_HW = _choose()


cdef uint32_t crc32c_update(uint32_t crc, const void* p, size_t n) noexcept nogil:
    return crc_any(crc, p, n)


ctypedef uint32_t (*crc_fn)(uint32_t, const void*, size_t) noexcept nogil


cdef uint32_t _over(object data, uint32_t crc, crc_fn fn) except? 0xFFFFFFFF:
    cdef Py_buffer view
    cdef uint32_t out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            out = fn(crc, view.buf, <size_t> view.len)
    finally:
        PyBuffer_Release(&view)
    return out


def crc32c(data, uint32_t crc=0):
    """The CRC32C of `data` (any contiguous buffer), continuing from `crc`."""
    return _over(data, crc, crc_any)


def crc32c_table(data, uint32_t crc=0):
    """crc32c with the slicing-by-8 tables, whatever the CPU offers."""
    return _over(data, crc, crc_table)


def crc32c_hw(data, uint32_t crc=0):
    """crc32c with the SSE4.2 instruction; UserblkError where the CPU lacks it."""
    if not _HW:
        raise UserblkError("this CPU has no SSE4.2 crc32 instruction")
    return _over(data, crc, crc_hw)


def implementation():
    """"sse4.2" or "slicing-by-8": what crc32c() runs on this CPU."""
    return "sse4.2" if use_hw else "slicing-by-8"
