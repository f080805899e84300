"""bdev: the generic block-device layer.

    import bdev
    from bdev import malloc
    malloc.create("Malloc0", size=64 << 20)
    desc = bdev.open_bdev("Malloc0", write=True)
    ch = desc.get_io_channel()                     # this thread's channel
    desc.write_sync(ch, b"x" * 4096, 0)
    buf = bytearray(4096); desc.read_sync(ch, buf, 0)
    desc.read(ch, buf, 0, cb=lambda ok, status: ...)   # then poll the thread:
    env.thread.current_thread().poll()
    ch.put(); desc.close()

Backends: `bdev.malloc`, `bdev.null`, `bdev.nvme` (NVMe through the user-space driver) and
`bdev.aio` (a file or block device). `bdev.config` builds stacks from SPDK-style JSON.
"""
from bdev.core import (Bdev, BdevChannel, Descriptor, IoStatus, PyBdev, PyIo, bdevs, get_bdev,
                       open_bdev)
from bdev.errors import (BdevClaimed, BdevError, BdevExists, BdevNotFound, BdevRemoved,
                         ChannelReleased, DescriptorClosed, IoCompletedError, IoError,
                         ReadOnlyDescriptor, UnsupportedIoType)

__all__ = ["Bdev", "BdevChannel", "Descriptor", "IoStatus", "PyBdev", "PyIo", "bdevs",
           "get_bdev", "open_bdev", "BdevClaimed", "BdevError", "BdevExists", "BdevNotFound",
           "BdevRemoved", "ChannelReleased", "DescriptorClosed", "IoCompletedError", "IoError",
           "ReadOnlyDescriptor", "UnsupportedIoType"]
