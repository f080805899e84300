"""The NVMe driver over uio_pci_generic, in a guest booted without an IOMMU.

Without an IOMMU the controller DMAs to physical addresses: the translation map switches to
IOVA = PA and DMA memory must come from hugepages. The whole driver - bring-up, shadow doorbells,
PRP lists, splits above MDTS, queue depth beyond the queue - runs the same way as with vfio.
"""
import random

import pytest

from env.memory import allocate
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST, block_device, kernel_read

pytestmark = [pytest.mark.guest(iommu=False, nvme_size="128M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"


@pytest.fixture(scope="module")
def ctrlr():
    import nvme
    c = nvme.attach(BDF, driver="uio")
    yield c
    if c.state != "detached":
        c.detach()


def test_attached_through_uio_with_physical_addresses(ctrlr):
    from env.memmap import vtophys_map
    assert ctrlr.transport.handle.kind == "uio"
    assert vtophys_map().mode == "pa"
    buf = allocate(4096)
    assert buf.hugepage and buf.iova != buf.vaddr      # a physical address, not the VA


@pytest.mark.parametrize("size", [4096, 12288, 256 * 1024, 1 << 20])
def test_round_trips(ctrlr, size):
    qp = ctrlr.create_io_qpair(32)
    try:
        ns = ctrlr.namespace(1)
        data = random.Random(size).randbytes(size)
        w, r = allocate(size), allocate(size)
        memoryview(w)[:] = data
        ns.write_sync(qp, w, 2048, size // 512)
        ns.read_sync(qp, r, 2048, size // 512)
        assert bytes(memoryview(r)) == data
    finally:
        ctrlr.delete_io_qpair(qp)


def test_queue_beyond_its_size(ctrlr):
    qp = ctrlr.create_io_qpair(8)
    try:
        ns = ctrlr.namespace(1)
        buf = allocate(4096 * 100)
        done = []
        for i in range(100):
            ns.read(qp, buf, i * 8, 8, done.append, offset=i * 4096)
        while len(done) < 100:
            qp.process_completions()
        assert all(c.ok for c in done) and qp.stats()["queued_total"] > 0
    finally:
        ctrlr.delete_io_qpair(qp)


def test_kernel_reads_what_uio_wrote(ctrlr):
    qp = ctrlr.create_io_qpair(8)
    data = random.Random(5).randbytes(64 * 1024)
    w = allocate(len(data))
    memoryview(w)[:] = data
    ctrlr.namespace(1).write_sync(qp, w, 9000, 128)
    ctrlr.detach()
    assert kernel_read(block_device(BDF, 1), 9000 * 512, len(data)) == data
