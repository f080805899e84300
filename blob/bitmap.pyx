# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A fixed-size bit array in 64-bit words: the blobstore's used-cluster, used-page and blob-id
maps, in memory and in their on-disk form (bit i in byte i // 8 at position i % 8)."""
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from env.errors import InvalidArgument


cdef inline int _ctz(uint64_t w) noexcept nogil:
    return __builtin_ctzll(w)


cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_popcountll(unsigned long long) nogil


cdef class Bitmap:
    """`Bitmap(nbits)`, all clear. Indexes outside [0, nbits) raise InvalidArgument."""
    cdef uint64_t* words
    cdef readonly uint64_t nbits
    cdef uint64_t nwords
    cdef uint64_t nset

    def __cinit__(self, uint64_t nbits):
        self.nbits = nbits
        self.nwords = (nbits + 63) // 64
        self.words = <uint64_t*> calloc(max(self.nwords, 1), 8)
        if self.words == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.words)

    @staticmethod
    def from_bytes(data, uint64_t nbits):
        """The bitmap of `nbits` bits stored in `data` (at least ceil(nbits / 8) bytes). Bits
        past nbits in the last byte are ignored by the bitmap; `tail_clear` reports them."""
        cdef Bitmap b = Bitmap(nbits)
        cdef const uint8_t[:] v = memoryview(data).cast("B")
        cdef uint64_t need = (nbits + 7) // 8
        if <uint64_t> v.shape[0] < need:
            raise InvalidArgument(f"{v.shape[0]} bytes cannot hold {nbits} bits")
        if need:
            memcpy(b.words, &v[0], need)
        b._mask_tail()
        b._recount()
        return b

    cdef void _mask_tail(self) noexcept:
        cdef uint64_t r = self.nbits % 64
        if r and self.nwords:
            self.words[self.nwords - 1] &= (1ULL << r) - 1

    cdef void _recount(self) noexcept:
        cdef uint64_t i, n = 0
        for i in range(self.nwords):
            n += __builtin_popcountll(self.words[i])
        self.nset = n

    def to_bytes(self, uint64_t nbytes=0):
        """The on-disk form, zero-padded to `nbytes` (default: ceil(nbits / 8))."""
        cdef uint64_t need = (self.nbits + 7) // 8
        if nbytes < need:
            nbytes = need
        out = bytearray(nbytes)
        cdef uint8_t[:] v = out
        if need:
            memcpy(&v[0], self.words, need)
        return bytes(out)

    cdef inline int _check(self, uint64_t i) except -1:
        if i >= self.nbits:
            raise InvalidArgument(f"bit {i} is outside the bitmap of {self.nbits} bits")
        return 0

    def test(self, uint64_t i):
        self._check(i)
        return (self.words[i >> 6] >> (i & 63)) & 1 == 1

    def __getitem__(self, uint64_t i):
        return self.test(i)

    def set(self, uint64_t i):
        """Set bit i; returns whether it was clear."""
        self._check(i)
        cdef uint64_t m = 1ULL << (i & 63)
        if self.words[i >> 6] & m:
            return False
        self.words[i >> 6] |= m
        self.nset += 1
        return True

    def clear(self, uint64_t i):
        """Clear bit i; returns whether it was set."""
        self._check(i)
        cdef uint64_t m = 1ULL << (i & 63)
        if not self.words[i >> 6] & m:
            return False
        self.words[i >> 6] &= ~m
        self.nset -= 1
        return True

    def set_range(self, uint64_t start, uint64_t count):
        cdef uint64_t i
        if count == 0:
            return
        self._check(start)
        self._check(start + count - 1)
        for i in range(start, start + count):
            if not (self.words[i >> 6] >> (i & 63)) & 1:
                self.words[i >> 6] |= 1ULL << (i & 63)
                self.nset += 1

    def clear_all(self):
        memset(self.words, 0, self.nwords * 8)
        self.nset = 0

    def find_clear(self, uint64_t start=0):
        """The first clear bit at or after `start`, or -1."""
        cdef int64_t r
        with nogil:
            r = self._find(start, 1)
        return r

    def find_set(self, uint64_t start=0):
        """The first set bit at or after `start`, or -1."""
        cdef int64_t r
        with nogil:
            r = self._find(start, 0)
        return r

    cdef int64_t _find(self, uint64_t start, bint clear) noexcept nogil:
        cdef uint64_t w, i
        if start >= self.nbits:
            return -1
        i = start >> 6
        w = self.words[i] ^ (<uint64_t> -1 if clear else 0)
        w &= (<uint64_t> -1) << (start & 63)
        while True:
            if w:
                start = (i << 6) + _ctz(w)
                return <int64_t> start if start < self.nbits else -1
            i += 1
            if i >= self.nwords:
                return -1
            w = self.words[i] ^ (<uint64_t> -1 if clear else 0)

    def set_bits(self):
        """Every set bit, ascending."""
        out = []
        cdef int64_t i = self._find(0, 0)
        while i >= 0:
            out.append(i)
            i = self._find(i + 1, 0)
        return out

    @property
    def count(self):
        """How many bits are set."""
        return self.nset

    def copy(self):
        cdef Bitmap b = Bitmap(self.nbits)
        memcpy(b.words, self.words, self.nwords * 8)
        b.nset = self.nset
        return b

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        cdef Bitmap o = <Bitmap> other
        if o.nbits != self.nbits:
            return False
        cdef uint64_t i
        for i in range(self.nwords):
            if o.words[i] != self.words[i]:
                return False
        return True

    def __len__(self):
        return self.nbits

    def __repr__(self):
        return f"<Bitmap {self.nset}/{self.nbits} set>"
