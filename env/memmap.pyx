# cython: language_level=3
"""Translation from virtual addresses to IOVAs (the addresses a device DMAs to).

A two-level table like SPDK's spdk_mem_map: the top level has one slot per 1 GiB of the 48-bit
virtual address space, each pointing to a table of 512 entries of 2 MiB. An entry holds the IOVA of
its 2 MiB page with bit 0 set when valid, so `translate_c` is two loads and no lock, callable from
Cython without the GIL.

IOVA modes:
- "va": IOVA = virtual address. Right for software devices, and for vfio with an IOMMU, where
  registering a region calls the DMA mapper (VFIO_IOMMU_MAP_DMA). A mapper may choose another IOVA
  when the virtual address does not fit the IOMMU's aperture; the table records what it chose.
- "pa": IOVA = physical address from /proc/self/pagemap (no IOMMU: uio or vfio no-IOMMU mode).
  Only hugepages stay physically put, so registering other memory is recorded but not DMA-able,
  and translating it raises a clear error.

Registration works on 2 MiB-aligned regions, as in SPDK; `env.memory` hands out DMA buffers carved
from such regions, so users rarely call `register` themselves.
"""
import threading

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free

from env.errors import InvalidArgument, TranslationError
from env import pagemap

cdef uint64_t SIZE_2MB = 1ULL << SHIFT_2MB
cdef uint64_t MASK_2MB = (1ULL << SHIFT_2MB) - 1
cdef uint64_t ENTRY_VALID = 1
cdef size_t TOP_ENTRIES = 1ULL << (VA_BITS - SHIFT_1GB)


class Registration:
    """One registered region: where it is, how big, and the IOVA of each 2 MiB page (None where
    the page cannot be DMA'd to)."""
    __slots__ = ("vaddr", "size", "iovas", "hugepage")

    def __init__(self, vaddr, size, iovas, hugepage):
        self.vaddr, self.size, self.iovas, self.hugepage = vaddr, size, iovas, hugepage

    def __repr__(self):
        first = self.iovas[0] if self.iovas else None
        return (f"Registration(vaddr=0x{self.vaddr:x}, size=0x{self.size:x}, "
                f"iova={'0x%x' % first if first is not None else None}, hugepage={self.hugepage})")


cdef class MemMap:
    """A VA -> IOVA translation map. `register`/`unregister` regions, `translate` addresses."""

    def __cinit__(self, mode="va", name="memmap"):
        self._top = <uint64_t**> calloc(TOP_ENTRIES, sizeof(uint64_t*))
        if self._top == NULL:
            raise MemoryError("cannot allocate the top level of the translation table")
        self._regions = {}
        self._mapper = None
        self._lock = threading.RLock()

    def __init__(self, mode="va", name="memmap"):
        if mode not in ("va", "pa"):
            raise InvalidArgument(f"IOVA mode must be 'va' or 'pa', not {mode!r}")
        self.mode = mode
        self.name = name

    def __dealloc__(self):
        cdef size_t i
        if self._top != NULL:
            for i in range(TOP_ENTRIES):
                if self._top[i] != NULL:
                    free(self._top[i])
            free(self._top)
            self._top = NULL

    # ---- the hot path ----------------------------------------------------------------------
    cdef uint64_t translate_c(self, uint64_t vaddr, uint64_t* size) noexcept nogil:
        """IOVA of `vaddr`, or IOVA_INVALID. If `size` is not NULL, on entry it holds the number of
        bytes wanted and on return how many of them are IOVA-contiguous from `vaddr`."""
        cdef uint64_t* table
        cdef uint64_t entry, first, nxt, want, have, va
        if vaddr >> VA_BITS:
            return IOVA_INVALID
        table = self._top[vaddr >> SHIFT_1GB]
        if table == NULL:
            return IOVA_INVALID
        entry = table[(vaddr >> SHIFT_2MB) & 511]
        if not (entry & ENTRY_VALID):
            return IOVA_INVALID
        first = entry
        if size != NULL:
            want = size[0]
            have = SIZE_2MB - (vaddr & MASK_2MB)
            va = (vaddr & ~MASK_2MB) + SIZE_2MB
            while have < want:
                if va >> VA_BITS:
                    break
                table = self._top[va >> SHIFT_1GB]
                if table == NULL:
                    break
                nxt = table[(va >> SHIFT_2MB) & 511]
                if nxt != entry + SIZE_2MB:
                    break
                entry = nxt
                have += SIZE_2MB
                va += SIZE_2MB
            size[0] = want if have > want else have
        return (first & ~MASK_2MB) + (vaddr & MASK_2MB)

    # ---- table maintenance -------------------------------------------------------------------
    cdef void _set_entry(self, uint64_t vaddr, uint64_t entry) except *:
        cdef size_t top = vaddr >> SHIFT_1GB
        cdef uint64_t* table = self._top[top]
        if table == NULL:
            if entry == 0:
                return
            table = <uint64_t*> calloc(512, sizeof(uint64_t))
            if table == NULL:
                raise MemoryError("cannot allocate a translation table page")
            self._top[top] = table
        table[(vaddr >> SHIFT_2MB) & 511] = entry

    cdef void _set_entries(self, uint64_t vaddr, uint64_t size, uint64_t iova) except *:
        cdef uint64_t off = 0
        while off < size:
            self._set_entry(vaddr + off, (iova + off) | ENTRY_VALID)
            off += SIZE_2MB

    def _install(self, reg):
        cdef uint64_t off = 0
        for iova in reg.iovas:
            self._set_entry(reg.vaddr + off, 0 if iova is None else (iova | ENTRY_VALID))
            off += SIZE_2MB

    def _clear(self, reg):
        cdef uint64_t off = 0
        while off < reg.size:
            self._set_entry(reg.vaddr + off, 0)
            off += SIZE_2MB

    def _iovas_for(self, uint64_t vaddr, uint64_t size, hugepage):
        """IOVA of each 2 MiB page of a new region, per the mode and the mapper."""
        n = size // SIZE_2MB
        if self._mapper is not None:
            base = self._mapper.map_dma(vaddr, size)
            return [base + i * SIZE_2MB for i in range(n)]
        if self.mode == "pa":
            if not hugepage:
                return [None] * n
            return [pagemap.virt_to_phys(vaddr + i * SIZE_2MB) for i in range(n)]
        return [vaddr + i * SIZE_2MB for i in range(n)]

    # ---- Python API ----------------------------------------------------------------------------
    def register(self, uint64_t vaddr, uint64_t size, *, hugepage=False):
        """Register [vaddr, vaddr+size) for DMA. Both must be multiples of 2 MiB. `hugepage` says
        the memory is backed by hugepages (needed to DMA to it in "pa" mode). Returns the
        `Registration`, with the IOVA chosen for each 2 MiB page."""
        if size == 0 or size % SIZE_2MB or vaddr % SIZE_2MB:
            raise InvalidArgument(
                f"register(0x{vaddr:x}, 0x{size:x}): address and size must be non-zero multiples "
                "of 2 MiB")
        if (vaddr + size) >> VA_BITS or vaddr + size < vaddr:
            raise InvalidArgument(f"register(0x{vaddr:x}, 0x{size:x}): beyond 48-bit addresses")
        with self._lock:
            for r in self._regions.values():
                if vaddr < r.vaddr + r.size and r.vaddr < vaddr + size:
                    raise InvalidArgument(
                        f"register(0x{vaddr:x}, 0x{size:x}): overlaps the registered region "
                        f"0x{r.vaddr:x}+0x{r.size:x}")
            reg = Registration(vaddr, size, self._iovas_for(vaddr, size, hugepage), bool(hugepage))
            self._install(reg)
            self._regions[vaddr] = reg
            return reg

    def unregister(self, uint64_t vaddr, uint64_t size):
        """Remove a region registered with exactly this address and size (and unmap its DMA)."""
        with self._lock:
            reg = self._regions.get(vaddr)
            if reg is None or reg.size != size:
                raise InvalidArgument(
                    f"unregister(0x{vaddr:x}, 0x{size:x}): no region registered at that address "
                    "with that size")
            self._clear(reg)
            del self._regions[vaddr]
            if self._mapper is not None and reg.iovas[0] is not None:
                self._mapper.unmap_dma(reg.iovas[0], reg.size)

    def translate(self, uint64_t vaddr, uint64_t size=1):
        """(iova, contiguous) for `vaddr`: the IOVA and how many of the `size` bytes from there
        are contiguous in IOVA space. Raises TranslationError for memory with no IOVA."""
        cdef uint64_t n = size
        cdef uint64_t iova = self.translate_c(vaddr, &n)
        if iova == IOVA_INVALID:
            raise TranslationError(self._why_not(vaddr), vaddr=vaddr, size=size)
        return iova, n

    def _why_not(self, uint64_t vaddr):
        reg = self.region_of(vaddr)
        if reg is None:
            return (f"0x{vaddr:x} is not registered for DMA in {self.name}: allocate the buffer "
                    "with env.memory.allocate(), or register its 2 MiB-aligned region first")
        return (f"0x{vaddr:x} is registered but not DMA-able in IOVA mode '{self.mode}': without "
                "an IOMMU the device needs physical addresses, which only hugepages keep fixed "
                "(reserve hugepages, e.g. `userblk setup`)")

    def region_of(self, uint64_t vaddr):
        """The Registration containing `vaddr`, or None."""
        with self._lock:
            for r in self._regions.values():
                if r.vaddr <= vaddr < r.vaddr + r.size:
                    return r
        return None

    def regions(self):
        with self._lock:
            return sorted(self._regions.values(), key=lambda r: r.vaddr)

    def set_mode(self, mode):
        """Switch between "va" and "pa"; every registered region is translated anew."""
        if mode not in ("va", "pa"):
            raise InvalidArgument(f"IOVA mode must be 'va' or 'pa', not {mode!r}")
        with self._lock:
            if mode == self.mode:
                return
            if self._mapper is not None:
                raise InvalidArgument("cannot change the IOVA mode while a DMA mapper is attached")
            old, self.mode = self.mode, mode
            try:
                self._retranslate()
            except BaseException:
                self.mode = old
                raise

    def _retranslate(self):
        # all new translations first, so that a failure (pagemap without root...) changes nothing
        new = [(reg, self._iovas_for(reg.vaddr, reg.size, reg.hugepage))
               for reg in self._regions.values()]
        for reg, iovas in new:
            reg.iovas = iovas
            self._install(reg)

    @property
    def mapper(self):
        return self._mapper

    def set_mapper(self, mapper):
        """Attach the DMA mapper (an object with `map_dma(vaddr, size) -> iova` and
        `unmap_dma(iova, size)`, e.g. a vfio container). Every region already registered is
        mapped now, every later one on registration. Only "va" mode has a mapper."""
        with self._lock:
            if self._mapper is not None and mapper is not self._mapper:
                raise InvalidArgument(f"{self.name} already has a DMA mapper ({self._mapper!r})")
            if self.mode != "va":
                raise InvalidArgument("a DMA mapper (IOMMU) needs IOVA mode 'va'")
            self._mapper = mapper
            done = []
            try:
                for reg in self._regions.values():
                    reg.iovas = self._iovas_for(reg.vaddr, reg.size, reg.hugepage)
                    done.append(reg)
                    self._install(reg)
            except BaseException:
                for reg in done:
                    mapper.unmap_dma(reg.iovas[0], reg.size)
                self._mapper = None
                self._retranslate()
                raise

    def clear_mapper(self, unmap=True):
        """Detach the DMA mapper; with `unmap`, unmap every region from it first."""
        with self._lock:
            mapper, self._mapper = self._mapper, None
            if mapper is None:
                return
            for reg in self._regions.values():
                if unmap and reg.iovas and reg.iovas[0] is not None:
                    mapper.unmap_dma(reg.iovas[0], reg.size)
            self._retranslate()

    def __repr__(self):
        return f"<MemMap {self.name} mode={self.mode} regions={len(self._regions)}>"


g_vtophys = MemMap("va", "vtophys")


cdef uint64_t vtophys(uint64_t vaddr, uint64_t* size) noexcept nogil:
    """Translate through the process-wide map (see `translate_c`)."""
    return g_vtophys.translate_c(vaddr, size)


def vtophys_map():
    """The process-wide map DMA buffers are registered in."""
    return g_vtophys


def translate(uint64_t vaddr, uint64_t size=1):
    """Translate through the process-wide map: (iova, contiguous bytes)."""
    return g_vtophys.translate(vaddr, size)
