# cython: language_level=3
"""The null bdev: every I/O succeeds without touching data (SPDK's bdev_null).

Useful to measure the layers above a device. Reads leave the buffer as it was; writes go nowhere.
Completions are never delivered inside the submission: the bdev layer defers them to the
channel's poller, as SPDK's null bdev does with its own poller. `md_size` advertises per-block
metadata (as SPDK's null bdev can) without storing any.
"""
from bdev.core cimport Bdev, BdevChannel, IO_SUCCESS, bdev_io, bdev_io_complete

from bdev.core import blocks_of
from env.errors import InvalidArgument

IO_TYPES = ("read", "write", "write_zeroes", "unmap", "flush", "reset", "compare")


cdef class NullBdev(Bdev):

    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil:
        bdev_io_complete(io, IO_SUCCESS)
        return 0

    def config_json(self):
        return {"method": "bdev_null_create",
                "params": {"name": self.name, "num_blocks": self.num_blocks,
                           "block_size": self.block_size, "md_size": self.md_size,
                           "uuid": str(self.uuid)}}


def create(name="Null0", num_blocks=None, block_size=512, *, size=None, md_size=0, uuid=None):
    """Create and register a null bdev of `num_blocks` blocks (or `size` bytes)."""
    num_blocks = blocks_of(num_blocks, size, block_size)
    b = NullBdev(name, block_size=block_size, num_blocks=num_blocks, module="null",
                 io_types=IO_TYPES, uuid=uuid, md_size=md_size, product_name="Null disk")
    return b.register()


def delete(name):
    from bdev.core import get_bdev
    b = get_bdev(name)
    if not isinstance(b, NullBdev):
        raise InvalidArgument(f"{name} is not a null bdev")
    b.unregister()
