"""Several controllers and several namespaces per controller, with 4 KiB LBAs, on QEMU.

Two controllers with two namespaces each, every namespace formatted with 4096-byte blocks: the
driver must find them all, agree with the kernel about each, keep their data apart, and run a
queue pair on each controller at the same time.
"""
import random

import pytest

from env.memory import allocate
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST, id_ns

pytestmark = [pytest.mark.guest(nvme_ctrls=2, nvme_ns=2, nvme_size="64M",
                                ns_opts="logical_block_size=4096,physical_block_size=4096"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDFS = ["0000:00:10.0", "0000:00:11.0"]


@pytest.fixture(scope="module")
def kernel_namespaces():
    return {(bdf, n): id_ns(bdf, n) for bdf in BDFS for n in (1, 2)}


@pytest.fixture(scope="module")
def ctrlrs(kernel_namespaces):
    import nvme
    cs = [nvme.attach(b) for b in BDFS]
    yield cs
    for c in cs:
        c.detach()


def test_probe_lists_both_controllers():
    import nvme
    assert sorted(str(d.address) for d in nvme.probe()) == BDFS


def test_every_namespace_is_found_with_4k_blocks(ctrlrs, kernel_namespaces):
    for bdf, c in zip(BDFS, ctrlrs):
        assert sorted(c.namespaces) == [1, 2]
        for n in (1, 2):
            ns = c.namespace(n)
            assert ns.block_size == 4096 and ns.lba_shift == 12
            assert ns.nblocks == kernel_namespaces[(bdf, n)]["nsze"] == 64 * 1024 * 1024 // 4096
        assert c.data.sn.strip() == f"USERBLK{BDFS.index(bdf)}"


def test_data_stays_in_its_namespace(ctrlrs):
    qps = [c.create_io_qpair(64) for c in ctrlrs]
    written = {}
    w = allocate(64 * 1024)
    for ci, (c, qp) in enumerate(zip(ctrlrs, qps)):
        for n in (1, 2):
            data = random.Random(ci * 10 + n).randbytes(64 * 1024)
            memoryview(w)[:] = data
            c.namespace(n).write_sync(qp, w, 100, 16)
            written[(ci, n)] = data
    r = allocate(64 * 1024)
    for (ci, n), data in written.items():
        ctrlrs[ci].namespace(n).read_sync(qps[ci], r, 100, 16)
        assert bytes(memoryview(r)) == data
    for c, qp in zip(ctrlrs, qps):
        c.delete_io_qpair(qp)


def test_io_on_both_controllers_interleaved(ctrlrs):
    qps = [c.create_io_qpair(32) for c in ctrlrs]
    bufs = allocate(4096 * 64)
    done = []
    for i in range(64):
        c = ctrlrs[i % 2]
        c.namespace(1 + (i // 2) % 2).read(qps[i % 2], bufs, i, 1, done.append, offset=i * 4096)
    while len(done) < 64:
        for q in qps:
            q.process_completions()
    assert all(cp.ok for cp in done)
    for c, qp in zip(ctrlrs, qps):
        c.delete_io_qpair(qp)


def test_unaligned_to_the_block_is_refused(ctrlrs):
    from env.errors import InvalidArgument
    qp = ctrlrs[0].create_io_qpair(8)
    try:
        with pytest.raises(InvalidArgument):
            ctrlrs[0].namespace(1).read(qp, allocate(6144), 0)      # 1.5 blocks
    finally:
        ctrlrs[0].delete_io_qpair(qp)
