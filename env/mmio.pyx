# cython: language_level=3
"""Access to memory-mapped device registers.

`Mmio.map_fd(fd, size, offset)` maps a region of a file descriptor (a vfio device region, or a
sysfs `resourceN` file for uio); `Mmio.over(buffer)` puts the same interface over plain memory,
which is how the in-process emulated devices of the tests present their registers. C code uses the
inline `read32/write32/read64/write64` methods (no GIL, no checks); Python uses `r32/w32/r64/w64`,
which check the offset and alignment first.
"""
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from cpython.buffer cimport PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release

from env.errors import InvalidArgument, EnvError

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    void* MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED

cdef extern from "<string.h>" nogil:
    char* strerror(int errnum)
from libc.errno cimport errno


cdef class Mmio:
    """A window of device registers."""

    @staticmethod
    def map_fd(int fd, size_t size, long offset=0, name="mmio"):
        """mmap `size` bytes of `fd` at `offset` (shared, read-write)."""
        if size == 0:
            raise InvalidArgument("cannot map an empty register window")
        cdef void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset)
        if p == MAP_FAILED:
            raise EnvError(f"{name}: mmap of {size} bytes at offset 0x{offset:x} failed: "
                           f"{strerror(errno).decode()}")
        cdef Mmio m = Mmio.__new__(Mmio)
        m.base = <char*> p
        m.size = size
        m._mapped = True
        m.name = name
        return m

    @staticmethod
    def over(obj, name="mmio"):
        """Registers over a writable buffer (bytearray, DmaBuffer, mmap...) kept alive by us."""
        cdef Py_buffer view
        PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE)
        cdef Mmio m = Mmio.__new__(Mmio)
        m.base = <char*> view.buf
        m.size = view.len
        PyBuffer_Release(&view)
        m._owner = obj
        m.name = name
        return m

    def close(self):
        if self._mapped and self.base != NULL:
            munmap(self.base, self.size)
        self.base = NULL
        self.size = 0
        self._owner = None
        self._mapped = False

    def __dealloc__(self):
        if self._mapped and self.base != NULL:
            munmap(self.base, self.size)

    @property
    def address(self):
        return <uintptr_t> self.base

    cdef int _check(self, size_t off, size_t width) except -1:
        if self.base == NULL:
            raise EnvError(f"{self.name}: register window is closed")
        if off % width or off + width > self.size:
            raise InvalidArgument(f"{self.name}: {width * 8}-bit access at 0x{off:x} is outside "
                                  f"the 0x{self.size:x}-byte window or misaligned")
        return 0

    def r32(self, size_t off):
        self._check(off, 4)
        return self.read32(off)

    def w32(self, size_t off, uint32_t value):
        self._check(off, 4)
        self.write32(off, value)

    def r64(self, size_t off):
        self._check(off, 8)
        return self.read64(off)

    def w64(self, size_t off, uint64_t value):
        self._check(off, 8)
        self.write64(off, value)

    def __repr__(self):
        return f"<Mmio {self.name} 0x{self.size:x} bytes at 0x{<uintptr_t> self.base:x}>"
