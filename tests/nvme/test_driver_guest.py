"""The NVMe driver on QEMU's emulated controller, through vfio, inside the test guest.

QEMU's `-device nvme` (which nobody here wrote) is the reference: the driver brings it up, its
Identify data must equal what the kernel driver and nvme-cli report for the same device, and data
must cross between the two drivers intact. Then transfers of every size and alignment the spec
allows (PRP1 only, PRP1+PRP2, PRP lists, above MDTS), SGLs, queue depths beyond the queue, two
threads with two queue pairs, Write Zeroes, Deallocate, Compare, reset and detach with I/O in
flight, and the clean hand-back to the kernel.
"""
import os
import random
import subprocess
import sys
import threading

import pytest

from env.errors import InvalidArgument
from env.memory import allocate
from tests.nvme.kernel_side import (GUEST_REASON, IN_GUEST, block_device, id_ctrl, id_ns,
                                    kernel_read, kernel_write, wait_for)

pytestmark = [pytest.mark.guest(nvme_ns=1, nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"
MiB = 1 << 20


@pytest.fixture(scope="module")
def kernel_view():
    """What the kernel driver sees, recorded before the driver takes the device."""
    return {"ctrl": id_ctrl(BDF), "ns": id_ns(BDF, 1), "dev": block_device(BDF, 1)}


@pytest.fixture(scope="module")
def ctrlr(kernel_view):
    import nvme
    c = nvme.attach(BDF)
    yield c
    if c.state != "detached":
        c.detach()


@pytest.fixture(scope="module")
def qp(ctrlr):
    return ctrlr.create_io_qpair(256)


@pytest.fixture(scope="module")
def ns(ctrlr):
    return ctrlr.namespace(1)


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


def fill(buf, data, offset=0):
    mv = memoryview(buf)
    mv[offset:offset + len(data)] = data
    mv.release()


def content(buf, offset=0, n=None):
    mv = memoryview(buf)
    try:
        return bytes(mv[offset:offset + (len(buf) - offset if n is None else n)])
    finally:
        mv.release()


# ---- bring-up and Identify --------------------------------------------------------------------
IDENTIFY_CTRL_KEYS = ["vid", "ssvid", "sn", "mn", "fr", "rab", "ieee", "cmic", "mdts", "cntlid",
                      "ver", "oaes", "ctratt", "oacs", "acl", "aerl", "frmw", "lpa", "elpe",
                      "npss", "sqes", "cqes", "maxcmd", "nn", "oncs", "fuses", "fna", "vwc",
                      "awun", "awupf", "sgls", "subnqn"]
IDENTIFY_NS_KEYS = ["nsze", "ncap", "nuse", "nsfeat", "nlbaf", "flbas", "mc", "dpc", "dps",
                    "nmic", "dlfeat", "noiob", "nguid", "eui64"]


def _norm(v):
    return v.strip() if isinstance(v, str) else v


def test_identify_controller_matches_nvme_cli(ctrlr, kernel_view):
    ours = ctrlr.data.to_dict()
    theirs = kernel_view["ctrl"]
    compared = [k for k in IDENTIFY_CTRL_KEYS if k in theirs]
    assert len(compared) >= 25, f"nvme-cli gave too few keys: {sorted(theirs)}"
    diffs = {k: (ours.get(k), theirs[k]) for k in compared if _norm(ours.get(k)) != _norm(theirs[k])}
    assert not diffs
    assert ctrlr.data.mn.strip() == "QEMU NVMe Ctrl"


def test_identify_namespace_matches_nvme_cli(ns, kernel_view):
    ours = ns.data.to_dict()
    theirs = kernel_view["ns"]
    compared = [k for k in IDENTIFY_NS_KEYS if k in theirs]
    diffs = {k: (ours.get(k), theirs[k]) for k in compared if _norm(ours.get(k)) != _norm(theirs[k])}
    assert not diffs
    assert ns.nblocks * ns.block_size == 256 * MiB and ns.block_size == 512


def test_bring_up_facts(ctrlr):
    assert ctrlr.state == "ready" and ctrlr.version == "1.4.0"
    assert ctrlr.mqes == 2048                              # QEMU 7.2: MQES=0x7ff
    assert ctrlr.max_transfer == 4096 << 7                 # MDTS=7
    assert ctrlr.shadow_doorbells                         # QEMU offers Doorbell Buffer Config
    assert ctrlr.sgl_supported
    assert ctrlr.num_io_queues >= 2
    assert ctrlr.transport.handle.kind == "vfio"


def test_shadow_doorbells_are_used(ctrlr, ns, qp):
    assert qp.shadow_doorbells
    buf = allocate(4096)
    before = qp.stats()
    for lba in range(0, 64, 8):
        ns.read_sync(qp, buf, lba, 8)
    after = qp.stats()
    assert after["sq_doorbells"] - before["sq_doorbells"] == 8
    # the host copy of the SQ tail doorbell holds our tail (Doorbell Buffer Config's contract)
    shadow = ctrlr._dbbuf[0]
    stride = ctrlr.transport.doorbell_stride
    tail = int.from_bytes(content(shadow, 2 * qp.qid * stride, 4), "little")
    assert tail == after["submitted"] % qp.entries


def test_log_pages_and_features(ctrlr):
    smart = ctrlr.smart_log()
    assert smart.temperature > 0 and smart.avail_spare <= 100
    fw = ctrlr.firmware_log()
    assert fw is not None
    assert ctrlr.get_features(0x07).cdw0 != 0          # number of queues


# ---- data path --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [512, 4096, 8192, 12288, 64 * 1024, 512 * 1024 + 512,
                                  2 * MiB, 3 * MiB + 4096])
@pytest.mark.parametrize("offset", [0, 4, 512, 4092])
def test_round_trip_sizes_and_alignments(ns, qp, size, offset):
    """PRP1 only, PRP1+PRP2, PRP lists and transfers above MDTS (split), at dword offsets."""
    w = allocate(size + offset + 4096)
    r = allocate(size + offset + 4096)
    data = pattern(size, size * 7 + offset)
    fill(w, data, offset)
    lba = random.Random(size + offset).randrange(0, ns.nblocks - size // 512)
    ns.write_sync(qp, w, lba, size // 512, offset=offset)
    ns.read_sync(qp, r, lba, size // 512, offset=offset)
    assert content(r, offset, size) == data


def test_sgl_data_path(ctrlr, ns):
    qp = ctrlr.create_io_qpair(64, sgl="always")
    try:
        w, r = allocate(256 * 1024), allocate(256 * 1024)
        data = pattern(200 * 1024 + 512, 3)
        fill(w, data, 4)
        ns.write_sync(qp, w, 5000, len(data) // 512, offset=4)
        ns.read_sync(qp, r, 5000, len(data) // 512, offset=12)
        assert content(r, 12, len(data)) == data
    finally:
        ctrlr.delete_io_qpair(qp)


def test_vectored_io_that_prps_cannot_express_uses_sgls(ns, qp):
    bufs = [allocate(8192) for _ in range(3)]
    iov = [(bufs[0], 100 * 4, 1536), (bufs[1], 4, 2048), (bufs[2], 512, 512)]   # 4096 bytes
    data = pattern(4096, 11)
    pos = 0
    for b, off, n in iov:
        fill(b, data[pos:pos + n], off)
        pos += n
    ns.writev_sync(qp, iov, 7000)
    r = allocate(4096)
    ns.read_sync(qp, r, 7000, 8)
    assert content(r) == data


def test_queue_depth_up_to_and_beyond_the_queue(ctrlr, ns):
    small = ctrlr.create_io_qpair(16)
    try:
        bufs = allocate(4096 * 400)
        data = pattern(4096 * 400, 5)
        fill(bufs, data)
        done = []
        for i in range(400):                     # far more than the 16-entry queue holds
            ns.write(small, bufs, 20000 + i * 8, 8, done.append, offset=i * 4096)
        assert small.queued > 0
        while len(done) < 400:
            small.process_completions()
        assert all(c.ok for c in done) and small.stats()["queued_total"] > 0
        r = allocate(4096 * 400)
        ns.read_sync(small, r, 20000, 400 * 8)
        assert content(r) == data
    finally:
        ctrlr.delete_io_qpair(small)


def test_two_threads_two_queue_pairs_disjoint_ranges(ctrlr, ns):
    errors, results = [], {}

    def worker(k):
        try:
            q = ctrlr.create_io_qpair(64)
            w, r = allocate(64 * 1024), allocate(64 * 1024)
            base = 100000 + k * 50000
            for i in range(40):
                data = pattern(64 * 1024, k * 1000 + i)
                fill(w, data)
                ns.write_sync(q, w, base + i * 128, 128)
                ns.read_sync(q, r, base + i * 128, 128)
                assert content(r) == data
            results[k] = q.stats()["completed"]
            ctrlr.delete_io_qpair(q)
        except BaseException as e:          # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == {0: 80, 1: 80}


def test_qpair_of_another_thread_is_refused(ns, qp):
    from env.errors import WrongThreadError
    seen = []

    def other():
        try:
            ns.read(qp, allocate(4096), 0, 8)
        except WrongThreadError as e:
            seen.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(seen) == 1


def test_write_zeroes_and_deallocate_are_visible(ns, qp):
    w, r = allocate(64 * 1024), allocate(64 * 1024)
    fill(w, b"\xab" * (64 * 1024))
    ns.write_sync(qp, w, 30000, 128)
    ns.write_zeroes_sync(qp, 30000, 16)
    ns.read_sync(qp, r, 30000, 128)
    assert content(r, 0, 8192) == bytes(8192) and content(r, 8192, 512) == b"\xab" * 512
    ns.deallocate_sync(qp, [(30064, 64)])
    ns.read_sync(qp, r, 30000, 128)
    if ns.data.dlfeat & 0x7 == 1:      # deallocated blocks read as zeroes (DLFEAT 001b)
        assert content(r, 32768, 32768) == bytes(32768)
    assert content(r, 8192, 512) == b"\xab" * 512


def test_compare(ns, qp):
    from nvme.errors import CommandError
    w = allocate(4096)
    fill(w, pattern(4096, 9))
    ns.write_sync(qp, w, 40000, 8)
    ns.compare_sync(qp, w, 40000, 8)
    fill(w, b"x", 100)
    with pytest.raises(CommandError, match="(?i)compare"):
        ns.compare_sync(qp, w, 40000, 8)


def test_bad_input_is_refused_before_the_device(ns, qp):
    before = qp.stats()["submitted"]
    with pytest.raises(InvalidArgument):
        ns.read(qp, allocate(4096), ns.nblocks - 4, 8)
    with pytest.raises(InvalidArgument):
        ns.read(qp, allocate(4096), 0, 0)
    with pytest.raises(InvalidArgument):
        ns.read(qp, bytearray(4096), 0, 8)
    with pytest.raises(InvalidArgument):
        ns.read(qp, allocate(4096), 0, 8, offset=2)
    assert qp.stats()["submitted"] == before


def test_reset_with_io_in_flight_completes_everything_once(ctrlr, ns, qp):
    buf = allocate(4096 * 64)
    done = []
    for i in range(200):
        ns.read(qp, buf, i * 8, 8, done.append, offset=(i % 64) * 4096)
    ctrlr.reset()
    while len(done) < 200:
        qp.process_completions()
    assert len(done) == 200 and len({id(c) for c in done}) == 200
    aborted = [c for c in done if not c.ok]
    assert all(c.sct == 0 and c.sc == 0x08 for c in aborted)   # ABORTED - SQ DELETION
    ns.read_sync(qp, buf, 0, 8)                                 # I/O works again


# ---- data across the two drivers, and the hand-back ---------------------------------------------
def test_data_crosses_between_kernel_and_driver(ctrlr, ns, qp, kernel_view):
    import nvme
    ours = pattern(1 * MiB, 21)
    w = allocate(1 * MiB)
    fill(w, ours)
    ns.write_sync(qp, w, 40000, 2048)
    ctrlr.detach()
    assert ctrlr.state == "detached"
    dev = block_device(BDF, 1)                     # the kernel driver has it again
    assert kernel_read(dev, 40000 * 512, 1 * MiB) == ours
    theirs = pattern(256 * 1024, 22)
    kernel_write(dev, 80000 * 512, theirs)
    c2 = nvme.attach(BDF)
    try:
        q2 = c2.create_io_qpair(32)
        r = allocate(256 * 1024)
        c2.namespace(1).read_sync(q2, r, 80000, 512)
        assert content(r) == theirs
    finally:
        c2.detach()
    assert wait_for(lambda: os.path.exists(dev))


def test_userblk_identify_command(kernel_view):
    """`userblk identify` takes the device, prints Identify data like nvme-cli, and gives the
    device back to the kernel."""
    r = subprocess.run([sys.executable, "-m", "userblk", "identify", BDF], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "QEMU NVMe Ctrl" in r.stdout and "nsze" in r.stdout
    assert f"mdts      : {kernel_view['ctrl']['mdts']}" in r.stdout
    assert wait_for(lambda: os.path.exists(block_device(BDF, 1)))
