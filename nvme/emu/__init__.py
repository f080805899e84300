"""An in-process emulated NVMe controller for fast tests and fault injection.

    from nvme.emu import EmulatedController, EmuNamespace
    emu = EmulatedController([EmuNamespace(8192, block_size=4096)], mdts=5, dbbuf=True)
    ctrl = Controller(emu.transport)        # the driver, over the emulator's registers

It never replaces the QEMU tests; it is how every driver code path (timeouts, aborts, resets,
full queues, removal, DMA faults) gets exercised in milliseconds without root. See
`nvme.emu.controller` for what it emulates and the fault-injection calls.
"""
from nvme.emu.controller import DEFAULT_ONCS, EmulatedController, EmulatedTransport
from nvme.emu.faults import FaultRule
from nvme.emu.hostmem import HostMemory
from nvme.emu.storage import EmuNamespace

__all__ = ["EmulatedController", "EmulatedTransport", "EmuNamespace", "FaultRule", "HostMemory",
           "DEFAULT_ONCS"]
