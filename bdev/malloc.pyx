# cython: language_level=3, boundscheck=False, wraparound=False
"""The malloc bdev: a RAM disk in DMA memory (SPDK's bdev_malloc).

Reads and writes are copies; Write Zeroes and Unmap clear the range; Compare compares. The copy
happens inside the submission and the bdev layer defers the completion to the channel's poller.
The memory is DMA memory (`env.memory`), so buffers from it can also be handed to a device.
"""
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from bdev.core cimport (BDEV_IO_COMPARE, BDEV_IO_READ, BDEV_IO_UNMAP, BDEV_IO_WRITE,
                        BDEV_IO_WRITE_ZEROES, Bdev, BdevChannel, IO_MISCOMPARE, IO_SUCCESS,
                        bdev_io, bdev_io_complete)
from env.memory cimport DmaBuffer

from env import memory as _memory
from bdev.core import blocks_of
from env.errors import InvalidArgument

IO_TYPES = ("read", "write", "write_zeroes", "unmap", "flush", "reset", "compare")


cdef class MallocBdev(Bdev):
    cdef char* data
    cdef object _mem

    def _attach_memory(self, DmaBuffer mem):
        self._mem = mem
        self.data = mem.data()

    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil:
        cdef char* p = self.data + (io.offset_blocks << self.block_shift)
        cdef uint32_t i
        cdef uint64_t n
        cdef int status = IO_SUCCESS
        if io.type == BDEV_IO_READ:
            for i in range(io.iovcnt):
                memcpy(io.iovs[i].iov_base, p, io.iovs[i].iov_len)
                p += io.iovs[i].iov_len
        elif io.type == BDEV_IO_WRITE:
            for i in range(io.iovcnt):
                memcpy(p, io.iovs[i].iov_base, io.iovs[i].iov_len)
                p += io.iovs[i].iov_len
        elif io.type == BDEV_IO_WRITE_ZEROES or io.type == BDEV_IO_UNMAP:
            memset(p, 0, io.num_blocks << self.block_shift)
        elif io.type == BDEV_IO_COMPARE:
            for i in range(io.iovcnt):
                if memcmp(p, io.iovs[i].iov_base, io.iovs[i].iov_len) != 0:
                    status = IO_MISCOMPARE
                    break
                p += io.iovs[i].iov_len
        bdev_io_complete(io, status)
        return 0

    def destruct(self):
        if self._mem is not None:
            mem, self._mem = self._mem, None
            self.data = NULL
            mem.free()

    def config_json(self):
        return {"method": "bdev_malloc_create",
                "params": {"name": self.name, "num_blocks": self.num_blocks,
                           "block_size": self.block_size, "uuid": str(self.uuid)}}


def create(name="Malloc0", num_blocks=None, block_size=512, *, size=None, uuid=None,
           optimal_io_boundary=0, split_on_optimal_io_boundary=False):
    """Create and register a malloc bdev of `num_blocks` blocks (or `size` bytes), zeroed."""
    num_blocks = blocks_of(num_blocks, size, block_size)
    b = MallocBdev(name, block_size=block_size, num_blocks=num_blocks, module="malloc",
                   io_types=IO_TYPES, uuid=uuid, product_name="Malloc disk",
                   optimal_io_boundary=optimal_io_boundary,
                   split_on_optimal_io_boundary=split_on_optimal_io_boundary)
    b._attach_memory(_memory.allocate(num_blocks * block_size, zero=True))
    try:
        return b.register()
    except BaseException:
        b.destruct()
        raise


def delete(name):
    from bdev.core import get_bdev
    b = get_bdev(name)
    if not isinstance(b, MallocBdev):
        raise InvalidArgument(f"{name} is not a malloc bdev")
    b.unregister()
