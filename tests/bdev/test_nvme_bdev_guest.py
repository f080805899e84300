"""The NVMe bdev on QEMU's emulated controller, through vfio, inside the test guest.

`attach_controller("Nvme0", "trtype:PCIe traddr:0000:00:10.0")` takes the controller from the
kernel driver; then the whole bdev layer runs on the real (emulated) device: geometry against
nvme-cli's view, transfers across MDTS, bounced and vectored buffers, Write Zeroes, Deallocate,
Flush, Compare, a reset with I/O in flight, queue-pair exhaustion retried, two threads, the C
workload path. Last, data written through the bdev is read back by the kernel driver after
detach_controller, and the saved JSON config attaches the controller again.
"""
import os

import pytest

import bdev
from bdev import nvme as bdev_nvme
from bdev.errors import IoError
from env import memory
from nvme.status import Generic, Media
from tests.bdev.helpers import Completions, two_threads_write_read
from tests.bdev.test_nvme_bdev import (Open, _collect_garbage_at_safe_points,  # noqa: F401
                                       dma, pattern, poll_until)
from tests.nvme.kernel_side import (GUEST_REASON, IN_GUEST, block_device, id_ctrl, id_ns,
                                    kernel_read, kernel_write, wait_for)

pytestmark = [pytest.mark.guest(nvme_ns=1, nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"
KiB, MiB = 1024, 1 << 20
MDTS_BYTES = 4096 << 7                 # QEMU 7.2: MDTS=7
STATE = {}


@pytest.fixture(scope="module")
def kernel_view():
    """What the kernel driver sees, recorded before we take the device."""
    return {"ctrl": id_ctrl(BDF), "ns": id_ns(BDF, 1), "dev": block_device(BDF, 1)}


@pytest.fixture(scope="module")
def nc(kernel_view):
    names = bdev_nvme.attach_controller("Nvme0", f"trtype:PCIe traddr:{BDF}")
    assert names == ["Nvme0n1"]
    c = bdev_nvme.get_controller("Nvme0")
    yield c
    if c in bdev_nvme.controllers():
        bdev_nvme.detach_controller("Nvme0")


@pytest.fixture
def o(nc):
    h = Open("Nvme0n1")
    yield h
    h.close()


def test_bdev_matches_the_namespace(nc, kernel_view):
    b = bdev.get_bdev("Nvme0n1")
    ns = kernel_view["ns"]
    assert b.num_blocks == ns["nsze"] and b.block_size == 512
    assert b.num_blocks * b.block_size == 256 * MiB
    assert b.max_transfer_blocks == MDTS_BYTES // 512
    assert b.required_alignment == 4 and b.dma_required
    oncs = kernel_view["ctrl"]["oncs"]
    want = {"read", "write", "flush", "reset"}
    want |= {"write_zeroes"} if oncs & 0x8 else set()
    want |= {"unmap"} if oncs & 0x4 else set()
    want |= {"compare"} if oncs & 0x1 else set()
    assert set(b.io_types) == want and {"unmap", "write_zeroes", "compare"} <= want
    ds = b.info()["driver_specific"]["nvme"]
    assert ds["pci_address"] == BDF and ds["trid"] == {"trtype": "PCIe", "traddr": BDF}
    assert ds["model"] == "QEMU NVMe Ctrl" and ds["serial"] == kernel_view["ctrl"]["sn"].strip()
    assert ds["firmware"] == kernel_view["ctrl"]["fr"].strip() and ds["nsid"] == 1
    desc = nc.ctrlr.namespace_descriptors(1)
    if desc.uuid is not None:
        assert b.uuid == desc.uuid
    assert nc.ctrlr.transport.handle.kind == "vfio"


@pytest.mark.parametrize("nbytes", [512, 4096, 12 * KiB, MDTS_BYTES, MDTS_BYTES + 512,
                                    2 * MDTS_BYTES + 4096])
@pytest.mark.parametrize("offset", [0, 4, 1])
def test_round_trips_across_mdts(o, nbytes, offset):
    """DMA buffers at dword offsets go to the device as they are, others are bounced."""
    lba = 1000 + nbytes // 512
    data = pattern(nbytes, nbytes + offset)
    w = memory.allocate(nbytes + 8192)
    memoryview(w)[offset:offset + nbytes] = data
    o.desc.write_sync(o.ch, memoryview(w)[offset:offset + nbytes], lba * 512)
    r = memory.allocate(nbytes + 8192)
    o.desc.read_sync(o.ch, memoryview(r)[offset:offset + nbytes], lba * 512)
    assert bytes(memoryview(r)[offset:offset + nbytes]) == data


def test_non_dma_buffers(o):
    data = pattern(MDTS_BYTES + 3 * 512, 7)
    o.desc.write_sync(o.ch, bytes(data), 512 * 5000)
    r = bytearray(len(data))
    o.desc.read_sync(o.ch, r, 512 * 5000)
    assert r == data


def test_vectored(o):
    sizes = [1536, 2048, 512, MDTS_BYTES + 4096, 3584]
    data = pattern(sum(sizes), 8)
    bufs, pos = [], 0
    for i, n in enumerate(sizes):
        b = memory.allocate(n + 8) if i != 2 else bytearray(n)
        mv = memoryview(b)[4:4 + n] if i == 1 else memoryview(b)[:n]
        mv[:] = data[pos:pos + n]
        bufs.append(mv)
        pos += n
    o.desc.writev_sync(o.ch, bufs, 512 * 20000)
    r = bytearray(len(data))
    o.desc.read_sync(o.ch, r, 512 * 20000)
    assert r == data
    rbufs = [memory.allocate(n) for n in sizes]
    o.desc.readv_sync(o.ch, rbufs, 512 * 20000)
    assert b"".join(bytes(memoryview(b)) for b in rbufs) == data


def test_write_zeroes_unmap_flush(o, kernel_view):
    o.desc.write_sync(o.ch, dma(b"\xab" * 256 * KiB), 512 * 30000, 256 * KiB)
    o.desc.write_zeroes_sync(o.ch, 512 * 30000 + 8 * KiB, 32 * KiB)
    o.desc.unmap_sync(o.ch, 512 * 30000 + 128 * KiB, 64 * KiB)
    o.desc.flush_sync(o.ch)
    r = bytearray(256 * KiB)
    o.desc.read_sync(o.ch, r, 512 * 30000)
    assert r[:8 * KiB] == b"\xab" * 8 * KiB and r[8 * KiB:40 * KiB] == bytes(32 * KiB)
    assert r[40 * KiB:128 * KiB] == b"\xab" * 88 * KiB
    if kernel_view["ns"]["dlfeat"] & 0x7 == 1:      # deallocated blocks read as zeroes
        assert r[128 * KiB:192 * KiB] == bytes(64 * KiB)
    assert r[192 * KiB:] == b"\xab" * 64 * KiB


def test_two_unmaps_in_a_row_deallocate_only_their_ranges(o, kernel_view):
    """The second unmap reuses the first one's I/O object: it must start from its own range."""
    base = 512 * 40000
    o.desc.write_sync(o.ch, dma(b"\xcd" * 64 * KiB), base, 64 * KiB)
    o.desc.unmap_sync(o.ch, base, 4 * KiB)
    o.desc.unmap_sync(o.ch, base + 60 * KiB, 4 * KiB)
    r = bytearray(64 * KiB)
    o.desc.read_sync(o.ch, r, base)
    assert r[4 * KiB:60 * KiB] == b"\xcd" * 56 * KiB    # between the two ranges: untouched
    if kernel_view["ns"]["dlfeat"] & 0x7 == 1:
        assert r[:4 * KiB] == bytes(4 * KiB) and r[60 * KiB:] == bytes(4 * KiB)


def test_compare_and_miscompare(o):
    data = pattern(16 * KiB, 9)
    o.desc.write_sync(o.ch, data, 512 * 40000)
    o.desc.compare_sync(o.ch, data, 512 * 40000)
    bad = bytearray(data)
    bad[12345] ^= 0x40
    with pytest.raises(IoError) as ei:
        o.desc.compare_sync(o.ch, bad, 512 * 40000)
    assert ei.value.status.kind == "miscompare"
    assert ei.value.status.nvme.matches(Media.COMPARE_FAILURE)


def test_many_more_ios_than_the_queue_pair_has_requests(o):
    qp = o.ch.queue_pair
    n = qp.nrequests + 1000
    data = pattern(n * 512, 10)
    w = dma(data)
    calls = Completions()
    for i in range(n):
        o.desc.write(o.ch, memoryview(w)[i * 512:(i + 1) * 512], 512 * (60000 + i),
                     cb=calls.cb(i))
    poll_until(lambda: len(calls) == n, timeout=120)
    assert all(ok for ok, _ in calls.done.values())
    assert o.ch.stats()["nomem_retries"] > 0
    r = bytearray(n * 512)
    o.desc.read_sync(o.ch, r, 512 * 60000)
    assert r == data


def test_reset_with_io_in_flight(nc, o):
    calls = Completions()
    for i in range(300):
        o.desc.read(o.ch, memory.allocate(4096), 4096 * i, cb=calls.cb(i))
    o.desc.reset(o.ch, cb=calls.cb("reset"))
    poll_until(lambda: len(calls) == 301, timeout=120)
    assert calls.order[-1] == "reset" and calls.done["reset"] == (True, None)
    for i in range(300):
        ok, st = calls.done[i]
        assert ok or (st.kind == "aborted" and st.nvme.matches(Generic.ABORTED_SQ_DELETION))
    assert nc.ctrlr.reset_count >= 1 and nc.state == "ready"
    data = pattern(4096, 11)
    o.desc.write_sync(o.ch, data, 512 * 70000)
    r = bytearray(4096)
    o.desc.read_sync(o.ch, r, 512 * 70000)
    assert r == data


def test_two_threads_two_queue_pairs(nc):
    desc = bdev.open_bdev("Nvme0n1", write=True)
    try:
        qids = two_threads_write_read(desc, base=100000, stride=1000, count=20, timeout=60,
                                      size=lambda i: 64 * KiB)
    finally:
        desc.close()
    assert len(set(qids.values())) == 2


def test_c_path_workload(o):
    from bdev import perf
    out = perf.run(o.desc, o.ch, queue_depth=32, io_size=4096, workload="randrw", read_pct=70,
                   seconds=1.0)
    assert out["errors"] == 0 and out["ios"] > 0


def test_data_reaches_the_kernel_after_detach(nc, kernel_view):
    ours = pattern(1 * MiB, 21)
    h = Open("Nvme0n1")
    h.desc.write_sync(h.ch, dma(ours), 512 * 200000, 1 * MiB)
    STATE["config"] = bdev.get_bdev("Nvme0n1").config_json()
    bdev_nvme.detach_controller("Nvme0")
    assert h.events == [("remove", "Nvme0n1")]
    assert nc.state == "detaching" and nc.ctrlr.state == "ready"
    h.close()
    assert nc.state == "detached" and nc.ctrlr.state == "detached"
    dev = block_device(BDF, 1)                    # the kernel driver has it again
    assert kernel_read(dev, 200000 * 512, 1 * MiB) == ours
    theirs = pattern(256 * KiB, 22)
    kernel_write(dev, 300000 * 512, theirs)
    STATE["theirs"] = theirs


def test_config_json_attaches_it_again(kernel_view):
    cfg = STATE["config"]
    assert cfg == {"method": "bdev_nvme_attach_controller",
                   "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": BDF}}
    assert bdev_nvme.attach_controller(**cfg["params"]) == ["Nvme0n1"]
    h = Open("Nvme0n1")
    try:
        r = bytearray(256 * KiB)
        h.desc.read_sync(h.ch, r, 300000 * 512)
        assert r == STATE["theirs"]
    finally:
        h.close()
        bdev_nvme.detach_controller("Nvme0")
    assert wait_for(lambda: os.path.exists(block_device(BDF, 1)))
