"""The NVMe driver (nvme.controller, nvme.qpair, nvme.namespace, nvme.perf) against the emulated
controller (nvme.emu): bring-up, and the helpers the other driver test modules share.

The other driver test modules:
  test_namespace_io.py       data path: sizes, offsets, PRP/SGL shapes, splits, vectored I/O,
                             Write Zeroes, Deallocate, Compare, Flush
  test_qpair.py              queueing beyond the trackers, doorbells, bad input, pinning, threads,
                             bogus completions, injected errors
  test_timeouts.py           timeouts, Abort, reset, surprise removal
  test_controller.py         admin commands, log pages, features, events, queue pair management,
                             detach
  test_driver_concurrency.py one queue pair per OS thread
  test_driver_model.py       random operations checked against a byte-array model

Rules every test here follows: data is compared byte for byte (through the driver and, where it
matters, in the emulated namespace itself); every completion callback is counted and must run
exactly once; nothing asserts on time (timeouts are made short so that the tests are fast, but no
test checks how long anything took).
"""
import collections
import random
import time

import pytest

from env import memory
from nvme.controller import Controller, ControllerOptions
from nvme.emu import EmulatedController, EmuNamespace
from env.errors import InvalidArgument
from nvme.errors import ControllerError
from nvme.spec import AdminOpcode

PAGE = 4096

# ------------------------------------------------------------------------------------------------
# helpers shared by the driver test modules
# ------------------------------------------------------------------------------------------------


class Rig:
    """An emulated controller, the driver's Controller over it, namespace 1 and (unless qsize is
    None) one I/O queue pair of the calling thread."""

    def __init__(self, namespaces=None, *, qsize=64, requests=None, opts=None, **emu_kw):
        if namespaces is None:
            namespaces = [EmuNamespace(8192, block_size=512), EmuNamespace(1024, block_size=4096)]
        self.emu = EmulatedController(namespaces, **emu_kw)
        self.ctrl = Controller(self.emu.transport, opts or ControllerOptions(io_timeout_s=0))
        self.ctrl.init()
        self.ns = self.ctrl.namespaces.get(1)
        self.qp = self.ctrl.create_io_qpair(qsize, requests=requests) if qsize else None
        self.check_emulator = True

    def io_commands(self):
        """NVM commands the emulator fetched so far (all opcodes)."""
        return sum(v for k, v in self.emu.counters.items()
                   if isinstance(k, str) and k.startswith("io."))

    def close(self):
        if self.ctrl.state not in ("detached",):
            try:
                self.ctrl.detach()
            except Exception:
                pass
        if self.check_emulator:
            # the emulator never saw anything a controller would refuse as malformed
            assert self.emu.internal_error is None, self.emu.internal_error
            assert self.emu.counters["doorbell.invalid"] == 0
            assert self.emu.counters["dma_faults"] == 0
            assert self.emu.counters["dma_faults.controller"] == 0


@pytest.fixture
def make_rig():
    """`make_rig(namespaces=None, qsize=64, requests=None, opts=None, **emulator_options)`;
    every controller made is detached (and its emulator checked) at teardown."""
    rigs = []

    def factory(*args, **kw):
        rig = Rig(*args, **kw)
        rigs.append(rig)
        return rig

    yield factory
    for rig in rigs:
        rig.close()


class Calls:
    """Completion callbacks that record every call, by tag: `cb(tag)` makes one."""

    def __init__(self):
        self.by_tag = collections.defaultdict(list)
        self.order = []

    def cb(self, tag):
        def done(cpl):
            self.by_tag[tag].append(cpl)
            self.order.append(tag)
        return done

    def __len__(self):
        return len(self.order)

    def status(self, tag):
        (cpl,) = self.by_tag[tag]
        return cpl

    def assert_each_once(self, tags):
        tags = list(tags)
        missing = [t for t in tags if not self.by_tag.get(t)]
        twice = {t: len(v) for t, v in self.by_tag.items() if len(v) > 1}
        extra = set(self.by_tag) - set(tags)
        assert not missing and not twice and not extra, (
            f"completions: missing {missing[:10]}, more than once {twice}, unexpected {extra}")


def poll_until(cond, *qpairs, ctrl=None, timeout=10.0, what="completions", tick=None):
    """Poll the queue pairs (and the admin queue) until `cond()`; fail after `timeout` seconds
    (a guard against hangs, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        for qp in qpairs:
            qp.process_completions()
        if ctrl is not None:
            ctrl.poll_admin()
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
    return True


def pattern(seed, n):
    """`n` pseudo-random bytes determined by `seed` (anything with a stable repr)."""
    return random.Random(repr(seed)).randbytes(n)


def fill(buf, data, offset=0):
    with memoryview(buf) as mv:
        mv[offset:offset + len(data)] = data


def contents(buf, offset=0, n=None):
    with memoryview(buf) as mv:
        end = len(mv) if n is None else offset + n
        return bytes(mv[offset:end])


def allocate(n, byte=None):
    buf = memory.allocate(n)
    if byte is not None:
        fill(buf, bytes([byte]) * n)
    return buf


# ------------------------------------------------------------------------------------------------
# bring-up
# ------------------------------------------------------------------------------------------------

def test_identify_reflects_the_emulator_configuration(make_rig):
    r = make_rig(serial="SN-TEST-42", model="userblk test model", firmware="7.1",
                 vid=0x1234, ssvid=0x5678, cntlid=0x21, version=(1, 4, 0), aerl=2, acl=5,
                 elpe=15)
    d = r.ctrl.data
    assert (d.sn, d.mn, d.fr) == ("SN-TEST-42", "userblk test model", "7.1")
    assert (d.vid, d.ssvid, d.cntlid) == (0x1234, 0x5678, 0x21)
    assert (d.aerl, d.acl, d.elpe) == (2, 5, 15)
    assert d.nn == 2
    assert r.ctrl.version == "1.4.0"
    assert r.ctrl.state == "ready"
    assert r.ctrl.data.sqes == 0x66 and r.ctrl.data.cqes == 0x44
    # AERs outstanding: min(aer_count, AERL + 1)
    assert len(r.emu.aers) == 3
    assert r.emu.commands(AdminOpcode.ASYNC_EVENT_REQUEST, admin=True) == 3


def test_namespaces_and_block_sizes(make_rig):
    r = make_rig([EmuNamespace(8192, block_size=512), EmuNamespace(300, block_size=4096),
                  EmuNamespace(64, block_size=512, nsid=5)])
    assert sorted(r.ctrl.namespaces) == [1, 2, 5]
    ns1, ns2, ns5 = r.ctrl.namespace(1), r.ctrl.namespace(2), r.ctrl.namespace(5)
    assert (ns1.block_size, ns1.lba_shift, ns1.nblocks, ns1.size) == (512, 9, 8192, 8192 * 512)
    assert (ns2.block_size, ns2.lba_shift, ns2.nblocks, ns2.size) == (4096, 12, 300, 300 * 4096)
    assert (ns5.block_size, ns5.nblocks) == (512, 64)
    assert ns1.supports_write_zeroes and ns1.supports_deallocate and ns1.supports_compare
    with pytest.raises(Exception, match="no active namespace 3"):
        r.ctrl.namespace(3)


@pytest.mark.parametrize("mdts, expected", [
    (1, 8 << 10), (3, 32 << 10), (5, 128 << 10), (9, 2 << 20), (12, 2 << 20), (0, 2 << 20)])
def test_max_transfer_from_mdts(make_rig, mdts, expected):
    r = make_rig(mdts=mdts)
    assert r.ctrl.data.mdts == mdts
    assert r.ctrl.max_transfer == expected
    assert r.qp.max_transfer == expected
    assert r.ns.max_transfer == expected


@pytest.mark.parametrize("granted, asked, expected", [(4, 64, 4), (16, 3, 3), (1, 64, 1)])
def test_number_of_io_queues(make_rig, granted, asked, expected):
    r = make_rig(max_ioqpairs=granted, qsize=None,
                 opts=ControllerOptions(num_io_queues=asked, io_timeout_s=0))
    assert r.ctrl.num_io_queues == expected
    qps = [r.ctrl.create_io_qpair(8) for _ in range(expected)]
    assert sorted(qp.qid for qp in qps) == list(range(1, expected + 1))
    with pytest.raises(ControllerError, match="I/O queues are in use"):
        r.ctrl.create_io_qpair(8)
    # each of them works
    buf = allocate(512, 0x5A)
    for qp in qps:
        r.ns.write_sync(qp, buf, qp.qid, 1)
    assert r.emu.namespace(1).read_blocks(1, expected) == b"\x5a" * 512 * expected


def test_io_queue_size_is_capped_at_mqes(make_rig):
    r = make_rig(mqes=31, qsize=None)
    assert r.ctrl.mqes == 32
    qp = r.ctrl.create_io_qpair(1024)
    assert qp.entries == 32
    assert r.emu.queue(qp.qid).size == 32 and r.emu.queue(qp.qid, cq=True).size == 32


@pytest.mark.parametrize("dbbuf", [True, False])
def test_shadow_doorbells_follow_the_controller(make_rig, dbbuf):
    r = make_rig(dbbuf=dbbuf)
    assert r.ctrl.shadow_doorbells is dbbuf
    assert r.qp.shadow_doorbells is dbbuf
    assert r.emu.counters["dbbuf_config"] == (1 if dbbuf else 0)
    buf = allocate(64 * 512)
    fill(buf, pattern(1, 64 * 512))
    before = r.emu.counters["doorbell.mmio.cq"]
    for i in range(64):
        r.ns.write_sync(r.qp, buf, i, 1, offset=i * 512)
    s = r.qp.stats()
    assert s["completed"] == s["submitted"] == 64
    assert r.emu.namespace(1).read_blocks(0, 64) == contents(buf)
    assert r.emu.counters["doorbell.shadow_mismatch"] == 0
    if dbbuf:
        # CQ head updates go through the shadow doorbell: no CQ MMIO write for the I/O queue
        assert s["cq_doorbells"] > 0
        assert r.emu.counters["doorbell.mmio.cq"] - before < s["cq_doorbells"]
        assert s["mmio_doorbells"] < s["sq_doorbells"] + s["cq_doorbells"]
    else:
        assert s["mmio_doorbells"] == s["sq_doorbells"] + s["cq_doorbells"]


def test_shadow_doorbells_can_be_turned_off_by_the_host(make_rig):
    r = make_rig(dbbuf=True, opts=ControllerOptions(shadow_doorbells=False, io_timeout_s=0))
    assert not r.ctrl.shadow_doorbells and not r.qp.shadow_doorbells
    assert r.emu.counters["dbbuf_config"] == 0
    buf = allocate(4096, 0x11)
    r.ns.write_sync(r.qp, buf, 0, 8)
    r.ns.read_sync(r.qp, buf, 0, 8)


@pytest.mark.parametrize("dstrd", [1, 3])
@pytest.mark.parametrize("dbbuf", [True, False])
def test_doorbell_stride(make_rig, dstrd, dbbuf):
    r = make_rig(dstrd=dstrd, dbbuf=dbbuf, max_ioqpairs=4)
    assert r.ctrl.transport.doorbell_stride == 4 << dstrd
    qp2 = r.ctrl.create_io_qpair(16)
    w = allocate(8192)
    fill(w, pattern(dstrd, 8192))
    rd = allocate(8192, 0)
    for qp, lba in ((r.qp, 0), (qp2, 100)):
        for _ in range(3):          # enough to wrap qp2's 16-entry rings twice
            for i in range(8):
                r.ns.write_sync(qp, w, lba + i * 2, 2, offset=i * 1024)
        r.ns.read_sync(qp, rd, lba, 16)
        assert contents(rd) == contents(w)
    assert r.emu.counters["doorbell.invalid"] == 0


def test_never_ready_fails_within_cap_to():
    emu = EmulatedController([EmuNamespace(64)], never_ready=True, cap_to=1)
    ctrl = Controller(emu.transport)
    with pytest.raises(ControllerError, match=r"CSTS.RDY=1 did not happen.*CAP.TO"):
        ctrl.init()
    assert ctrl.state != "ready"
    assert emu.counters["enables"] == 1


def test_ready_delay_reads_are_waited_for(make_rig):
    r = make_rig(ready_delay_reads=40)
    assert r.ctrl.state == "ready"
    assert r.emu.counters["csts_reads"] >= 40
    buf = allocate(512, 0x33)
    r.ns.write_sync(r.qp, buf, 7, 1)
    assert r.emu.namespace(1).read_blocks(7) == b"\x33" * 512


def test_shutdown_delay_is_waited_for_on_detach(make_rig):
    r = make_rig(shutdown_delay_reads=25)
    r.ctrl.detach()
    assert r.ctrl.state == "detached"
    assert r.emu.counters["shutdowns"] == 1
    assert r.emu.regs.r32(0x1C) & 0xC == 0x8        # CSTS.SHST: shutdown complete


def test_fatal_status_during_bring_up_is_an_error():
    emu = EmulatedController([EmuNamespace(64)], ready_delay_reads=10)
    transport = emu.transport
    read32 = transport.read32

    def read32_then_fatal(off):
        # once CC.EN was written, the controller reports CSTS.CFS instead of becoming ready
        if emu.counters["enables"] and not emu.fatal_reason:
            emu.fatal("test: fatal during bring-up")
        return read32(off)

    transport.read32 = read32_then_fatal
    ctrl = Controller(transport)
    with pytest.raises(ControllerError, match="CSTS.CFS"):
        ctrl.init()
    assert ctrl.state != "ready"


def test_registers_all_ones_is_an_error():
    emu = EmulatedController([EmuNamespace(64)])
    emu.remove()
    ctrl = Controller(emu.transport)
    with pytest.raises(ControllerError, match="all-ones"):
        ctrl.init()
    assert emu.counters["enables"] == 0


def test_controller_without_sgl_support(make_rig):
    r = make_rig(sgl=False, opts=ControllerOptions(sgl="always", io_timeout_s=0))
    assert not r.ctrl.sgl_supported
    assert r.qp.sgl == "never"        # "always" is not honoured by a controller without SGLs
    buf = allocate(8192, 0x44)
    r.ns.write_sync(r.qp, buf, 0, 16)
    assert r.emu.namespace(1).read_blocks(0, 16) == contents(buf)


def test_controller_without_namespaces(make_rig):
    r = make_rig([], qsize=None)
    assert r.ctrl.namespaces == {} and r.ctrl.active_namespace_ids() == []
    with pytest.raises(InvalidArgument, match="no active namespace 1"):
        r.ctrl.namespace(1)
    qp = r.ctrl.create_io_qpair(8)          # queues still work
    assert qp.state == "enabled"


def test_bring_up_over_a_controller_left_enabled():
    """A second driver instance over a controller the first left running (no detach): the
    bring-up disables it first (CC.EN=0, wait CSTS.RDY=0) and starts over."""
    emu = EmulatedController([EmuNamespace(256)], ready_delay_reads=5)
    first = Controller(emu.transport, ControllerOptions(io_timeout_s=0)).init()
    qp = first.create_io_qpair(8)
    buf = allocate(4096)
    fill(buf, pattern("first", 4096))
    first.namespace(1).write_sync(qp, buf, 0, 8)
    # the first driver is gone without a detach, as a crashed process leaves a controller (in
    # one process a second Controller is refused while the first holds the transport)
    emu.transport.owner_ref = None
    second = Controller(emu.transport, ControllerOptions(io_timeout_s=0)).init()
    assert emu.counters["resets"] >= 1 and emu.counters["enables"] == 2
    qp2 = second.create_io_qpair(8)
    assert qp2.qid == 1                     # the controller forgot the first driver's queues
    out = allocate(4096, 0)
    second.namespace(1).read_sync(qp2, out, 0, 8)
    assert contents(out) == contents(buf)
    second.detach()


def test_controller_context_manager_detaches():
    emu = EmulatedController([EmuNamespace(64)])
    with Controller(emu.transport, ControllerOptions(io_timeout_s=0)).init() as ctrl:
        qp = ctrl.create_io_qpair(8)
        buf = allocate(512, 1)
        ctrl.namespace(1).write_sync(qp, buf, 0, 1)
    assert ctrl.state == "detached"
    assert qp.state == "destroyed"
    assert emu.counters["shutdowns"] == 1
    assert emu.namespace(1).read_blocks(0) == b"\x01" * 512


# ------------------------------------------------------------------------------------------------
# nvme.perf
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workload, io_size, qd", [
    ("randread", 4096, 8), ("randwrite", 4096, 16), ("randrw", 8192, 32), ("write", 512, 4),
    ("read", 64 << 10, 40)])
def test_perf_run(make_rig, workload, io_size, qd):
    from nvme import perf
    r = make_rig(qsize=32, mdts=3)
    res = perf.run(r.ns, r.qp, queue_depth=qd, io_size=io_size, workload=workload, seconds=0.15)
    assert res["errors"] == 0 and res["submit_errors"] == 0
    assert res["ios"] > 0
    assert res["reads"] + res["writes"] == res["ios"]
    if workload.endswith("read"):
        assert res["writes"] == 0
    elif workload.endswith("write"):
        assert res["reads"] == 0
    assert res["iops"] > 0 and res["mib_per_s"] > 0
    assert res["latency_us"]["count"] == res["ios"]
    assert res["queue_depth"] == qd and res["io_size"] == io_size
    s = r.qp.stats()
    assert s["outstanding"] == 0 and s["queued"] == 0
    assert s["submitted"] == s["completed"]
    assert r.emu.counters["completions.error"] == 0
    # every I/O reached the emulator (64 KiB at MDTS 3 = 32 KiB: two commands each)
    per_io = max(1, io_size // r.ctrl.max_transfer)
    assert r.emu.commands(0x02) + r.emu.commands(0x01) == res["ios"] * per_io


def test_perf_workload_runs_again_and_again(make_rig):
    """make_workload: one Workload, run back to back (interleaved benchmarks do this); each run
    reports its own figures and leaves nothing outstanding."""
    from nvme import perf
    r = make_rig(qsize=32)
    wl = perf.make_workload(r.ns, r.qp, queue_depth=8, io_size=4096, seconds=0.05)
    before = r.io_commands()
    runs = [wl.run() for _ in range(3)]
    for res in runs:
        assert res["errors"] == 0 and res["submit_errors"] == 0 and res["ios"] > 0
        assert res["latency_us"]["count"] == res["ios"]
    assert r.io_commands() - before == sum(res["ios"] for res in runs)
    s = r.qp.stats()
    assert s["outstanding"] == 0 and s["submitted"] == s["completed"]


def test_perf_refuses_io_size_not_a_multiple_of_the_block_size(make_rig):
    from nvme import perf
    r = make_rig()
    with pytest.raises(Exception, match="multiple of the block size"):
        perf.run(r.ns, r.qp, io_size=1000, seconds=0.1)
    assert r.io_commands() == 0
