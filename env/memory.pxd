# DMA memory: buffers devices may DMA to, and fixed-size pools for the hot path (see memory.pyx).
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef class DmaBuffer:
    cdef char* _ptr
    cdef size_t _size              # what the caller asked for
    cdef size_t _align
    cdef object _region            # the _Region the pages belong to
    cdef size_t _first_page        # first 4 KiB page within the region
    cdef size_t _npages
    cdef int _exports              # live buffer-protocol views
    cdef int _pins                 # outstanding I/O that targets this buffer
    cdef bint _freed
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    cdef int check_live(self) except -1
    cdef _release(self)
    cdef inline char* data(self) noexcept nogil:
        return self._ptr
    cdef inline size_t nbytes(self) noexcept nogil:
        return self._size
    # Pinning: a driver pins a buffer while I/O on it is outstanding, so free() refuses.
    cdef inline void pin(self) noexcept:
        self._pins += 1
    cdef inline void unpin(self) noexcept:
        self._pins -= 1


cdef class Pool:
    cdef char* _base
    cdef size_t _stride
    cdef readonly size_t count
    cdef readonly size_t element_size
    cdef uint32_t* _stack          # indices of free elements
    cdef size_t _nfree
    cdef uint8_t* _in_use
    cdef object _dma               # the DmaBuffer holding the elements when dma=True
    cdef int _exports
    cdef Py_ssize_t _shape[1]

    cdef void* get(self) noexcept nogil
    cdef int put(self, void* element) noexcept nogil
    cdef inline void* element(self, size_t index) noexcept nogil:
        return self._base + index * self._stride
    cdef inline size_t index_of(self, void* element) noexcept nogil:
        return (<char*> element - self._base) // self._stride
