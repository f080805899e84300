# cython: language_level=3
"""Transports: how the driver reaches a controller's registers and doorbells.

`PcieTransport` is the real one: BAR0 of a PCI function mapped through vfio or uio
(`env.device.attach_pci`). An in-process emulated controller (`nvme.emu`) provides a Transport
whose registers are plain memory; it sets `traps`, so every register write made through
`write32/write64` and every doorbell write made by a queue pair is announced to it, the way a
real device sees an MMIO write. The queue pair's hot path writes doorbells directly through
`doorbell_addr`; only an emulated transport costs one extra call per doorbell.
"""
from libc.stdint cimport uint16_t, uint32_t, uint64_t

from env.mmio cimport Mmio


cdef class Transport:
    """Register access to one controller. Subclasses set `regs`, `traps` and `name`."""

    def __init__(self, Mmio regs, name="nvme", bint traps=False):
        self.regs = regs
        self.name = name
        self.traps = traps
        self.doorbell_stride = 4 << ((regs.r64(0) >> 32) & 0xF)   # CAP.DSTRD

    # Register access used by bring-up and administration (Python level, checked).
    def read32(self, off):
        return self.regs.r32(off)

    def read64(self, off):
        return self.regs.r64(off)

    def write32(self, off, value):
        self.regs.w32(off, value)
        if self.traps:
            self.register_written(off)

    def write64(self, off, value):
        self.regs.w64(off, value)
        if self.traps:
            self.register_written(off)

    def register_written(self, off):
        """Emulated transports override this to react to a register write."""

    cpdef doorbell_written(self, uint16_t qid, bint cq):
        """Emulated transports override this to react to a doorbell write."""

    def refresh_stride(self):
        self.doorbell_stride = 4 << ((self.regs.r64(0) >> 32) & 0xF)

    def close(self):
        """Release the registers (and, for PCIe, the device)."""
        self.regs.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class PcieTransport(Transport):
    """A PCIe controller through a device handle from `env.device.attach_pci` (vfio or uio).
    `handle.map_bar(0)` gives the registers; closing detaches the handle."""

    def __init__(self, handle):
        self.handle = handle
        Transport.__init__(self, handle.map_bar(0), name=str(handle.address), traps=False)

    def close(self, restore_driver=True):
        Transport.close(self)
        self.handle.detach(restore_driver=restore_driver)
