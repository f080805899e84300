"""env: the machine userblk runs on.

DMA memory (`env.memory`), VA->IOVA translation (`env.memmap`), PCI devices in sysfs (`env.pci`),
vfio and uio (`env.vfio`, `env.uio`), MMIO access (`env.mmio`) and the threading model of
lightweight threads, pollers, messages and per-thread I/O channels (`env.thread`).
Nothing here imports nvme, bdev, blob or userblk.
"""
from env.errors import *  # noqa: F401,F403  (the hierarchy is part of the package's API)
