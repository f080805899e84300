"""The emulated controller's view of host memory: an IOMMU in front of the process.

A real device reaches host memory only through the IOVAs the driver gave it, and (with an IOMMU)
only where the host mapped them. The emulator does the same: an IOVA is translated back to a
virtual address through the regions registered in `env.memmap.vtophys_map()` (IOVA of each
2 MiB page -> its virtual address), and anything else is a DMA fault. So a driver bug that hands
the device a wild address becomes a Data Transfer Error in a test, not a segfault, and memory that
was never registered for DMA is never touched.

Translations are cached per 2 MiB page and checked against the live map on every access (a buffer
freed and unregistered since must fault, not be written).
"""
import ctypes

from env.errors import TranslationError
from env.memmap import vtophys_map
from nvme.emu.errors import DmaFault

PAGE_2M = 1 << 21
_MASK_2M = PAGE_2M - 1
_u32 = ctypes.c_uint32


class HostMemory:
    """Reads and writes host memory by IOVA. Raises `DmaFault` for unmapped IOVAs."""

    def __init__(self, memmap=None):
        self._map = memmap if memmap is not None else vtophys_map()
        self._pages = {}          # IOVA >> 21 -> virtual address of that 2 MiB page
        self.faults = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def _refresh(self):
        pages = {}
        for reg in self._map.regions():
            for i, iova in enumerate(reg.iovas):
                if iova is not None:
                    pages[iova >> 21] = reg.vaddr + i * PAGE_2M
        self._pages = pages

    def _vaddr(self, iova, n, write):
        """Virtual address of [iova, iova + n), which must lie inside one 2 MiB page."""
        for attempt in (0, 1):
            base = self._pages.get(iova >> 21)
            if base is not None:
                vaddr = base + (iova & _MASK_2M)
                try:
                    got, _ = self._map.translate(vaddr, n)
                except TranslationError:
                    got = None
                if got == iova:
                    return vaddr
            if attempt == 0:
                self._refresh()
        self.faults += 1
        raise DmaFault(iova, n, write)

    def _chunks(self, iova, length, write):
        if iova < 0 or length < 0 or iova + length > 1 << 64:
            self.faults += 1
            raise DmaFault(iova, length, write)
        out = []
        while length:
            n = min(length, PAGE_2M - (iova & _MASK_2M))
            out.append((self._vaddr(iova, n, write), n))
            iova += n
            length -= n
        return out

    def check(self, iova, length, write=False):
        """Raise DmaFault unless the whole range is mapped."""
        self._chunks(iova, length, write)

    def read(self, iova, length):
        """`length` bytes at `iova`, as bytes."""
        chunks = self._chunks(iova, length, False)
        self.bytes_read += length
        if len(chunks) == 1:
            return ctypes.string_at(chunks[0][0], length)
        return b"".join(ctypes.string_at(va, n) for va, n in chunks)

    def write(self, iova, data):
        """Copy a bytes-like `data` to `iova`."""
        if not isinstance(data, bytes):
            data = bytes(data)
        chunks = self._chunks(iova, len(data), True)
        self.bytes_written += len(data)
        if len(chunks) == 1:
            ctypes.memmove(chunks[0][0], data, len(data))
            return
        pos = 0
        for va, n in chunks:
            ctypes.memmove(va, data[pos:pos + n], n)
            pos += n

    def read_u32(self, iova):
        return _u32.from_address(self._vaddr(iova, 4, False)).value

    def write_u32(self, iova, value):
        _u32.from_address(self._vaddr(iova, 4, True)).value = value & 0xFFFFFFFF
