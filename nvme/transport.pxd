# How the driver reaches a controller: its registers, its doorbells and (for emulated controllers)
# the trap that tells the device a doorbell or register was written. See transport.pyx.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from env.mmio cimport Mmio


cdef class Transport:
    cdef readonly Mmio regs               # controller registers (BAR0, or an emulator's memory)
    cdef readonly uint32_t doorbell_stride  # bytes between doorbells: 4 << CAP.DSTRD
    cdef readonly bint traps              # True: register and doorbell writes must be announced
    cdef readonly str name                # what the controller is called in messages
    # weakref to the nvme.controller.Controller driving this transport (None: none): one
    # driver per controller in a process
    cdef public object owner_ref

    cdef inline char* doorbell_addr(self, uint16_t qid, bint cq) noexcept nogil:
        return self.regs.base + 0x1000 + (2 * qid + cq) * self.doorbell_stride
    # Called (with the GIL) after a doorbell write when `traps` is set.
    cpdef doorbell_written(self, uint16_t qid, bint cq)
