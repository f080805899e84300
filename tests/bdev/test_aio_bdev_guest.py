"""The aio bdev on a real block device: /dev/nvme0n1 of QEMU's emulated NVMe controller, on the
kernel's nvme driver, inside the test guest (root). What the bdev writes, the kernel reads back
with its own O_DIRECT I/O, and the other way round; Write Zeroes becomes BLKZEROOUT, Unmap
BLKDISCARD (NVMe Deallocate), flush an asynchronous FDSYNC (NVMe Flush).
"""
import random

import pytest

import bdev
from bdev import aio
from env.memory import allocate
from env.thread import current_thread
from tests.bdev.helpers import in_threads
from tests.nvme.kernel_side import (GUEST_REASON, IN_GUEST, block_device, kernel_read,
                                    kernel_write)

pytestmark = [pytest.mark.guest(nvme_ns=1, nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"
KiB, MiB = 1 << 10, 1 << 20
ENGINES = ["aio", "uring"]


@pytest.fixture(params=ENGINES)
def opened(request):
    if request.param == "uring" and not aio.uring_available():
        pytest.skip(reason="io_uring is not available in the guest kernel")
    dev = block_device(BDF, 1)
    b = aio.create(f"NVMeAio-{request.param}", dev, engine=request.param)
    d = bdev.open_bdev(b.name, write=True)
    ch = d.get_io_channel()
    yield dev, b, d, ch
    ch.put()
    d.close()
    aio.delete(b.name)


def test_block_device_facts(opened):
    dev, b, d, ch = opened
    with open(f"/sys/block/{dev.rsplit('/', 1)[1]}/queue/logical_block_size") as f:
        lbs = int(f.read())
    assert b.is_block_device and b.direct
    assert b.block_size == lbs == b.required_alignment
    assert b.size == 256 * MiB
    assert b.io_type_supported("write_zeroes")


def test_round_trip_with_the_kernel(opened):
    dev, b, d, ch = opened
    rng = random.Random(b.name)
    for n in (512, 4096, 7 * 512, 128 * KiB, MiB):
        off = rng.randrange(0, (b.size - n) // 4096) * 4096
        data = rng.randbytes(n)
        d.write_sync(ch, data, off)
        d.flush_sync(ch)
        assert kernel_read(dev, off, n) == data
        other = rng.randbytes(n)
        kernel_write(dev, off, other)
        buf = allocate(max(n, 4096))
        d.read_sync(ch, buf, off, n)
        assert bytes(memoryview(buf)[:n]) == other
        buf.free()


def test_queue_beyond_depth_and_vectors(opened):
    dev, b, d, ch = opened
    done = []
    bufs = []
    for i in range(300):                             # above the 128 slots of the AIO context
        buf = allocate(4096)
        memoryview(buf)[:] = bytes([i & 0xFF]) * 4096
        bufs.append(buf)
        d.write(ch, buf, 64 * MiB + i * 4096, cb=lambda ok, st: done.append(ok))
    ch.thread.run_until(lambda: len(done) == 300, timeout=60)
    assert all(done)
    assert kernel_read(dev, 64 * MiB, 300 * 4096) == b"".join(bytes([i & 0xFF]) * 4096
                                                             for i in range(300))
    segs = [bytearray(100), bytearray(412), bytearray(3584)]
    d.readv_sync(ch, segs, 64 * MiB)
    assert b"".join(segs) == kernel_read(dev, 64 * MiB, 4096)
    for buf in bufs:
        buf.free()


def test_write_zeroes_and_unmap(opened):
    dev, b, d, ch = opened
    kernel_write(dev, 32 * MiB, b"\x77" * (256 * KiB))
    d.write_zeroes_sync(ch, 32 * MiB, 128 * KiB)
    assert kernel_read(dev, 32 * MiB, 256 * KiB) == bytes(128 * KiB) + b"\x77" * (128 * KiB)
    if b.io_type_supported("unmap"):
        d.unmap_sync(ch, 32 * MiB + 128 * KiB, 128 * KiB)   # contents afterwards: device's choice
        assert b.stats()["num_unmap_ops"] == 1


def test_two_threads(opened):
    dev, b, d, ch = opened

    def worker(k):
        try:
            desc = bdev.open_bdev(b.name, write=True)
            c = desc.get_io_channel()
            data = random.Random(k).randbytes(MiB)
            desc.write_sync(c, data, (100 + k) * MiB)
            back = bytearray(MiB)
            desc.read_sync(c, back, (100 + k) * MiB)
            assert back == data
            c.put()
            desc.close()
        finally:
            current_thread().unbind()

    in_threads(worker, 2, 120)
    for k in (0, 1):
        assert kernel_read(dev, (100 + k) * MiB, MiB) == random.Random(k).randbytes(MiB)


def test_perf_randread(opened):
    from bdev import perf
    dev, b, d, ch = opened
    out = perf.run(d, ch, queue_depth=32, io_size=4096, workload="randread", seconds=1.0)
    assert out["errors"] == 0 and out["submit_errors"] == 0 and out["ios"] > 0
    print(f"\n{b.name} randread 4k qd32 on {dev} in the guest: {out['iops']:.0f} IOPS")
