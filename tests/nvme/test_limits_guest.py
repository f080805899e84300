"""Small limits on QEMU's controller: MDTS=1 (8 KiB per command), few I/O queues, and tiny queues.

QEMU 7.2 has no property for CAP.MQES (always 2048 entries), so small queue sizes are exercised
by creating small queues (2 and 4 entries: ring wrap and phase flips every few commands); the
emulated controller covers a small CAP.MQES itself.
"""
import random

import pytest

from env.memory import allocate
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST

pytestmark = [pytest.mark.guest(nvme_size="64M", nvme_opts="mdts=1,max_ioqpairs=2"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"


@pytest.fixture(scope="module")
def ctrlr():
    import nvme
    c = nvme.attach(BDF)
    yield c
    c.detach()


def test_limits_are_read(ctrlr):
    assert ctrlr.data.mdts == 1 and ctrlr.max_transfer == 8192
    assert ctrlr.num_io_queues == 2


@pytest.mark.parametrize("size", [512, 8192, 8192 + 512, 64 * 1024, 1 << 20])
def test_transfers_above_mdts_are_split(ctrlr, size):
    qp = ctrlr.create_io_qpair(8)
    try:
        ns = ctrlr.namespace(1)
        data = random.Random(size).randbytes(size)
        w, r = allocate(size), allocate(size)
        memoryview(w)[:] = data
        ns.write_sync(qp, w, 1000, size // 512)
        ns.read_sync(qp, r, 1000, size // 512)
        assert bytes(memoryview(r)) == data
        expected_cmds = -(-size // 8192)
        assert qp.stats()["submitted"] == 2 * expected_cmds
    finally:
        ctrlr.delete_io_qpair(qp)


def test_no_more_queues_than_granted(ctrlr):
    from nvme.errors import ControllerError
    a, b = ctrlr.create_io_qpair(4), ctrlr.create_io_qpair(4)
    with pytest.raises(ControllerError, match="in use"):
        ctrlr.create_io_qpair(4)
    ctrlr.delete_io_qpair(a)
    c = ctrlr.create_io_qpair(4)           # a freed queue id is reused
    ctrlr.delete_io_qpair(b)
    ctrlr.delete_io_qpair(c)


@pytest.mark.parametrize("entries", [2, 4])
def test_tiny_queues_wrap_many_times(ctrlr, entries):
    qp = ctrlr.create_io_qpair(entries)
    try:
        ns = ctrlr.namespace(1)
        buf = allocate(4096 * 100)
        data = random.Random(entries).randbytes(4096 * 100)
        memoryview(buf)[:] = data
        done = []
        for i in range(100):
            ns.write(qp, buf, 4000 + i * 8, 8, done.append, offset=i * 4096)
        while len(done) < 100:
            qp.process_completions()
        assert all(c.ok for c in done)
        r = allocate(4096 * 100)
        for i in range(100):
            ns.read_sync(qp, r, 4000 + i * 8, 8, offset=i * 4096)
        assert bytes(memoryview(r)) == data
    finally:
        ctrlr.delete_io_qpair(qp)
