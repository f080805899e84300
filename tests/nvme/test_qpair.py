"""Queue pairs against the emulated controller: queue depth up to and far beyond the trackers
(the software queue), request exhaustion, ring wrap-around and CQ doorbell batching, completions
the controller should not have posted, injected error statuses, argument checks before anything
reaches the device, buffer pinning, and the one-owner-thread rule."""
import pathlib
import subprocess
import sys
import textwrap
import threading

import pytest

from env.errors import (BufferBusyError, FreedBufferError, InvalidArgument, ResourceExhausted,
                        WrongThreadError)
from nvme.controller import ControllerOptions
from nvme.emu import EmuNamespace
from nvme.errors import CommandError, ControllerDetached
from nvme.spec import NvmOpcode
from nvme.status import Generic, Media, Sct
from tests.nvme.test_driver import (Calls, allocate, contents, fill, make_rig,  # noqa: F401
                                    pattern, poll_until)


def write_blocks_one_by_one(r, qp, buf, lba0, n, calls, tag="w"):
    for i in range(n):
        r.ns.write(qp, buf, lba0 + i, 1, calls.cb((tag, i)), offset=i * 512)


# ---- queue depth -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 3, 4, 16, 64, 256])
def test_queue_depth_up_to_the_trackers(make_rig, size):
    r = make_rig(qsize=size)
    qp = r.qp
    assert qp.entries == size
    n = qp.ntrackers
    assert 1 <= n <= size - 1
    rule = r.emu.hold(NvmOpcode.WRITE)
    buf = allocate(n * 512)
    fill(buf, pattern(size, n * 512))
    calls = Calls()
    write_blocks_one_by_one(r, qp, buf, 0, n, calls)
    assert qp.outstanding == n and qp.queued == 0
    assert len(r.emu.held_commands) == n
    assert sorted(qp.outstanding_cids()) == list(range(n))
    rule.cancel()
    assert r.emu.release() == n
    poll_until(lambda: len(calls) == n, qp)
    calls.assert_each_once(("w", i) for i in range(n))
    assert all(calls.status(("w", i)).ok for i in range(n))
    assert r.emu.namespace(1).read_blocks(0, n) == contents(buf)
    # the completion queue never overflowed: every completion was posted at once
    assert r.emu.counters["cq_full"] == 0
    s = qp.stats()
    assert s["queued_total"] == 0 and s["submitted"] == s["completed"] == n


@pytest.mark.parametrize("size", [2, 16, 64])
def test_one_more_than_the_trackers_waits_in_the_software_queue(make_rig, size):
    r = make_rig(qsize=size)
    qp = r.qp
    n = qp.ntrackers + 5
    rule = r.emu.hold(NvmOpcode.WRITE)
    buf = allocate(n * 512)
    fill(buf, pattern(n, n * 512))
    calls = Calls()
    write_blocks_one_by_one(r, qp, buf, 0, n, calls)
    assert qp.outstanding == qp.ntrackers and qp.queued == 5
    assert len(r.emu.held_commands) == qp.ntrackers      # the device saw only what fits
    rule.cancel()
    r.emu.release()
    poll_until(lambda: len(calls) == n, qp)
    calls.assert_each_once(("w", i) for i in range(n))
    assert r.emu.namespace(1).read_blocks(0, n) == contents(buf)
    s = qp.stats()
    assert s["queued_total"] == 5 and s["queued"] == 0 and s["outstanding"] == 0


def test_thousands_of_ios_on_a_16_entry_queue(make_rig):
    n = 3000
    r = make_rig([EmuNamespace(n, block_size=512)], qsize=16, requests=4096)
    qp = r.qp
    data = pattern("thousands", n * 512)
    w = allocate(n * 512)
    fill(w, data)
    calls = Calls()
    write_blocks_one_by_one(r, qp, w, 0, n, calls)
    assert qp.queued == n - qp.ntrackers
    poll_until(lambda: len(calls) == n, qp)
    calls.assert_each_once(("w", i) for i in range(n))
    assert all(calls.status(("w", i)).ok for i in range(n))
    assert r.emu.namespace(1).read_blocks(0, n) == data
    # and read everything back, one block per command, in reverse order
    rd = allocate(n * 512, 0xEE)
    calls = Calls()
    for i in reversed(range(n)):
        r.ns.read(qp, rd, i, 1, calls.cb(i), offset=i * 512)
    poll_until(lambda: len(calls) == n, qp)
    calls.assert_each_once(range(n))
    assert contents(rd) == data
    s = qp.stats()
    assert s["queued_total"] > 0
    assert s["submitted"] == s["completed"] == 2 * n
    assert s["outstanding"] == 0 and s["queued"] == 0
    assert s["bogus_completions"] == 0
    assert r.emu.commands(NvmOpcode.WRITE) == n and r.emu.commands(NvmOpcode.READ) == n
    # doorbells are batched: far fewer SQ doorbells than commands
    assert s["sq_doorbells"] < s["submitted"]


def test_completion_callbacks_resubmit(make_rig):
    """A queue-depth-64 chain on a 16-entry queue: each completion submits the next I/O."""
    total, qd = 2000, 64
    r = make_rig([EmuNamespace(total, block_size=512)], qsize=16)
    qp = r.qp
    data = pattern("chain", total * 512)
    buf = allocate(total * 512)
    fill(buf, data)
    calls = Calls()
    next_lba = [qd]

    def submit(lba):
        done = calls.cb(lba)

        def cb(cpl):
            done(cpl)
            if next_lba[0] < total:
                nxt, next_lba[0] = next_lba[0], next_lba[0] + 1
                submit(nxt)
        r.ns.write(qp, buf, lba, 1, cb, offset=lba * 512)

    for lba in range(qd):
        submit(lba)
    poll_until(lambda: len(calls) == total, qp)
    calls.assert_each_once(range(total))
    assert r.emu.namespace(1).read_blocks(0, total) == data
    assert qp.stats()["queued_total"] > 0


def test_process_completions_max(make_rig):
    r = make_rig(qsize=16)
    rule = r.emu.hold(NvmOpcode.READ)
    buf = allocate(4096)
    calls = Calls()
    for i in range(6):
        r.ns.read(r.qp, buf, i, 1, calls.cb(i))
    rule.cancel()
    r.emu.release()
    assert r.qp.process_completions(1) == 1 and len(calls) == 1
    assert r.qp.process_completions(2) == 2 and len(calls) == 3
    assert r.qp.process_completions() == 3 and len(calls) == 6
    assert r.qp.process_completions() == 0
    calls.assert_each_once(range(6))


@pytest.mark.parametrize("dbbuf", [True, False])
def test_full_completion_queue_many_times_over(make_rig, dbbuf):
    """Fill every tracker, let them all complete at once, many times: the CQ head doorbell
    batching never lets the controller find the CQ full, and the phase tag flips correctly."""
    r = make_rig(qsize=64, dbbuf=dbbuf)
    qp = r.qp
    n = qp.ntrackers
    buf = allocate(n * 512)
    for rnd in range(12):
        rule = r.emu.hold(NvmOpcode.WRITE)
        data = pattern(rnd, n * 512)
        fill(buf, data)
        calls = Calls()
        write_blocks_one_by_one(r, qp, buf, 0, n, calls)
        rule.cancel()
        r.emu.release()
        poll_until(lambda: len(calls) == n, qp)
        calls.assert_each_once(("w", i) for i in range(n))
        assert r.emu.namespace(1).read_blocks(0, n) == data
    assert r.emu.counters["cq_full"] == 0
    assert r.emu.queue(qp.qid, cq=True).posted == 12 * n


def test_requests_exhausted(make_rig):
    r = make_rig(qsize=16, requests=20)
    qp = r.qp
    rule = r.emu.hold(NvmOpcode.READ)
    buf = allocate(4096)
    calls = Calls()
    for i in range(20):
        r.ns.read(qp, buf, i, 1, calls.cb(i))
    before = (r.io_commands(), qp.stats()["submitted"])
    with pytest.raises(ResourceExhausted, match="20 requests"):
        r.ns.read(qp, buf, 0, 1, calls.cb("x"))
    with pytest.raises(ResourceExhausted):
        r.ns.flush(qp, calls.cb("y"))
    with pytest.raises(ResourceExhausted):
        r.ns.deallocate(qp, [(0, 1)], calls.cb("z"))
    assert (r.io_commands(), qp.stats()["submitted"]) == before
    rule.cancel()
    r.emu.release()
    poll_until(lambda: len(calls) == 20, qp)
    calls.assert_each_once(range(20))
    r.ns.read_sync(qp, buf, 0, 1)                       # room again
    buf.free()


def test_a_split_that_needs_more_requests_than_are_free_is_refused_whole(make_rig):
    r = make_rig(qsize=16, requests=16, mdts=1)          # 8 KiB per command
    buf = allocate(64 << 10)
    fill(buf, pattern(1, 64 << 10))
    rule = r.emu.hold(NvmOpcode.READ)
    calls = Calls()
    for i in range(10):
        r.ns.read(r.qp, buf, i, 1, calls.cb(i))
    # 64 KiB = 8 children + the parent = 9 requests; 6 are free
    with pytest.raises(ResourceExhausted):
        r.ns.write(r.qp, buf, 0, 128, calls.cb("big"))
    assert r.emu.commands(NvmOpcode.WRITE) == 0
    rule.cancel()
    r.emu.release()
    poll_until(lambda: len(calls) == 10, r.qp)
    r.ns.write_sync(r.qp, buf, 0, 128)
    assert r.emu.commands(NvmOpcode.WRITE) == 8
    assert r.emu.namespace(1).read_blocks(0, 128) == contents(buf)


def test_queue_pair_construction_checks(make_rig):
    from nvme.qpair import QueuePair
    r = make_rig(qsize=None)
    t = r.emu.transport
    qp = QueuePair(t, 7, 64)
    assert qp.ntrackers == 64 - 1 - 8 and qp.nrequests == 512       # cq_batch: 64 // 8
    assert QueuePair(t, 7, 64, cq_batch=0).ntrackers == 63
    assert QueuePair(t, 7, 4096).ntrackers == 4096 - 1 - 32          # cq_batch at most 32
    assert QueuePair(t, 7, 16, ntrackers=4, nrequests=4).ntrackers == 4
    assert QueuePair(t, 7, 16, max_transfer=8 << 20).max_transfer == 2 << 20
    assert qp.state == "disconnected"                                 # not on a controller yet
    for kw, match in ((dict(size=1), "between 2 and 65536"), (dict(size=65537), "between 2"),
                      (dict(size=16, cq_batch=9), "more than half"),
                      (dict(size=16, ntrackers=14), "trackers must be"),
                      (dict(size=16, ntrackers=0), "trackers must be"),
                      (dict(size=16, nrequests=8), "at least as many requests"),
                      (dict(size=16, max_transfer=2048), "max_transfer")):
        size = kw.pop("size")
        with pytest.raises(InvalidArgument, match=match):
            QueuePair(t, 7, size, **kw)


def test_sgl_with_more_pieces_than_one_segment_holds_is_refused(make_rig):
    r = make_rig(mdts=0)
    big = allocate(300 * 1024)
    iov = [(big, i * 1024, 512) for i in range(300)]         # 300 descriptors > 256 per page
    with pytest.raises(InvalidArgument):
        r.ns.writev(r.qp, iov, 0)
    assert r.io_commands() == 0 and r.qp.stats()["submitted"] == 0
    big.free()


# ---- completions the driver must not take -------------------------------------------------------

def test_bogus_and_wrong_phase_completions_are_ignored(make_rig):
    r = make_rig(qsize=16)
    qp = r.qp
    rule = r.emu.hold(NvmOpcode.READ)
    buf = allocate(8 * 512)
    calls = Calls()
    for i in range(4):
        r.ns.read(qp, buf, i, 1, calls.cb(i), offset=i * 512)
    cids = qp.outstanding_cids()
    unused = next(c for c in range(qp.ntrackers) if c not in cids)
    r.emu.post_bogus_completion(qp.qid, 0x7FFF)                  # a CID that never existed
    r.emu.post_bogus_completion(qp.qid, unused)                  # a CID not in use
    r.emu.post_bogus_completion(qp.qid, 0xFFFF, status=(Sct.GENERIC, Generic.INTERNAL_ERROR))
    assert qp.process_completions() == 3
    assert len(calls) == 0 and qp.outstanding == 4
    assert qp.stats()["bogus_completions"] == 3
    # an entry with the previous pass's phase at the tail is not a completion
    r.emu.post_bogus_completion(qp.qid, cids[0], wrong_phase=True)
    assert qp.process_completions() == 0
    assert len(calls) == 0 and qp.stats()["bogus_completions"] == 3
    rule.cancel()
    r.emu.release()
    poll_until(lambda: len(calls) == 4, qp)
    calls.assert_each_once(range(4))
    assert all(calls.status(i).ok for i in range(4))
    # and the queue keeps working across a few wraps
    for i in range(40):
        r.ns.write_sync(qp, buf, i, 1)
    s = qp.stats()
    assert s["bogus_completions"] == 3 and s["completed"] == s["submitted"] == 44


# ---- error statuses ---------------------------------------------------------------------------

def test_injected_status_reaches_the_callback(make_rig):
    r = make_rig()
    r.emu.inject(NvmOpcode.READ, status=(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR), dnr=True)
    r.emu.inject(NvmOpcode.WRITE, status=Generic.NAMESPACE_NOT_READY)
    buf = allocate(4096)
    calls = Calls()
    r.ns.read(r.qp, buf, 5, 1, calls.cb("r"))
    r.ns.write(r.qp, buf, 6, 1, calls.cb("w"))
    r.ns.read(r.qp, buf, 7, 1, calls.cb("ok"))
    poll_until(lambda: len(calls) == 3, r.qp)
    calls.assert_each_once(["r", "w", "ok"])
    rd = calls.status("r")
    assert (rd.sct, rd.sc, rd.dnr, rd.ok) == (Sct.MEDIA, Media.UNRECOVERED_READ_ERROR, True, False)
    assert rd.status.name == "Unrecovered Read Error"
    assert rd.status.symbol == "MEDIA/UNRECOVERED_READ_ERROR"
    assert not rd.status.retryable
    wr = calls.status("w")
    assert (wr.sct, wr.sc, wr.dnr) == (Sct.GENERIC, Generic.NAMESPACE_NOT_READY, False)
    assert wr.status.retryable
    assert calls.status("ok").ok
    assert r.qp.stats()["completed"] == 3


def test_injected_status_raises_command_error_with_spec_names(make_rig):
    r = make_rig()
    r.emu.inject(NvmOpcode.WRITE, status=(Sct.MEDIA, Media.WRITE_FAULT))
    buf = allocate(4096)
    with pytest.raises(CommandError) as ei:
        r.ns.write_sync(r.qp, buf, 0x20, 8)
    e = ei.value
    assert (e.sct, e.sc) == (Sct.MEDIA, Media.WRITE_FAULT)
    assert e.opcode == NvmOpcode.WRITE and e.opcode_name == "Write"
    assert (e.nsid, e.lba, e.nlb, e.qid) == (1, 0x20, 8, r.qp.qid)
    text = str(e)
    for word in ("Write", "Write Fault", "SCT 2h", "SC 80h", "LBA 0x20+8", "emu0"):
        assert word in text, (word, text)
    # the controller logged it; the driver reads the error log
    entries = r.ctrl.error_log()
    assert entries and entries[0].status.matches(Media.WRITE_FAULT)
    assert entries[0].sqid == r.qp.qid


def test_an_error_in_one_child_of_a_split_fails_the_parent_once(make_rig):
    r = make_rig(mdts=1)                                # 16 blocks of 512 per command
    r.emu.inject(NvmOpcode.READ, lba=40, status=(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR))
    buf = allocate(64 * 512)
    calls = Calls()
    r.ns.read(r.qp, buf, 0, 64, calls.cb("split"))
    poll_until(lambda: r.qp.outstanding == 0 and r.qp.queued == 0 and len(calls), r.qp)
    r.qp.process_completions()
    calls.assert_each_once(["split"])
    assert calls.status("split").status.matches(Media.UNRECOVERED_READ_ERROR)
    assert r.emu.commands(NvmOpcode.READ) == 4
    with pytest.raises(CommandError, match="Unrecovered Read Error"):
        r.emu.inject(NvmOpcode.READ, lba=63, status=(Sct.MEDIA, Media.UNRECOVERED_READ_ERROR))
        r.ns.read_sync(r.qp, buf, 0, 64)


def test_uncorrectable_blocks(make_rig):
    r = make_rig()
    r.emu.namespace(1).mark_uncorrectable(9)
    buf = allocate(4096)
    with pytest.raises(CommandError, match="Unrecovered Read Error") as ei:
        r.ns.read_sync(r.qp, buf, 8, 2)
    assert ei.value.dnr
    r.ns.write_sync(r.qp, buf, 9, 1)                 # writing makes it readable again
    r.ns.read_sync(r.qp, buf, 8, 2)


def test_callback_exceptions_do_not_break_the_queue(make_rig):
    r = make_rig()
    buf = allocate(4096)
    seen = []

    def bad(cpl):
        seen.append(cpl)
        raise RuntimeError("callback bug")

    for i in range(5):
        r.ns.read(r.qp, buf, i, 1, bad)
    poll_until(lambda: len(seen) == 5, r.qp)
    assert r.qp.process_completions() == 0
    assert len(seen) == 5
    r.ns.read_sync(r.qp, buf, 0, 8)


# ---- argument checks: nothing reaches the device -----------------------------------------------

def test_bad_arguments_are_refused_before_the_device(make_rig):
    r = make_rig()
    ns, qp = r.ns, r.qp
    buf = allocate(4096)
    freed = allocate(4096)
    freed.free()
    cases = [
        (lambda: ns.read(qp, buf, ns.nblocks, 1), InvalidArgument, "outside namespace"),
        (lambda: ns.read(qp, buf, ns.nblocks - 1, 2), InvalidArgument, "outside namespace"),
        (lambda: ns.write(qp, buf, -1, 1), InvalidArgument, "outside namespace"),
        (lambda: ns.write(qp, buf, 0, 0), InvalidArgument, "positive"),
        (lambda: ns.write(qp, buf, 0, -3), InvalidArgument, "positive"),
        (lambda: ns.read(qp, buf, 1.5, 1), InvalidArgument, "integers"),
        (lambda: ns.read(qp, buf, 0, 9), InvalidArgument, "do not fit"),
        (lambda: ns.read(qp, buf, 0, 8, offset=512), InvalidArgument, "do not fit"),
        (lambda: ns.write(qp, bytearray(4096), 0, 1), InvalidArgument, "DmaBuffer"),
        (lambda: ns.write(qp, bytearray(4096), 0), InvalidArgument, "DmaBuffer"),
        (lambda: ns.write(qp, memoryview(bytearray(512)), 0, 1), InvalidArgument, "DmaBuffer"),
        (lambda: ns.read(qp, freed, 0, 1), FreedBufferError, "freed"),
        (lambda: ns.read(qp, buf, 0, 1, offset=1), InvalidArgument, "aligned"),
        (lambda: ns.write(qp, buf, 0, 1, offset=2), InvalidArgument, "aligned"),
        (lambda: ns.write(qp, buf, 0, 1, offset=4095 - 512), InvalidArgument, "aligned"),
        (lambda: ns.compare(qp, buf, 0, 1, offset=3), InvalidArgument, "aligned"),
        (lambda: ns.write_zeroes(qp, ns.nblocks - 1, 2), InvalidArgument, "outside namespace"),
        (lambda: ns.write_zeroes(qp, 0, 0), InvalidArgument, "positive"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert r.io_commands() == 0
    s = qp.stats()
    assert s["submitted"] == 0 and s["queued_total"] == 0 and s["outstanding"] == 0
    buf.free()                          # no refused submission left it pinned


def test_a_callback_that_is_not_callable_is_refused_before_the_device(make_rig):
    r = make_rig()
    buf = allocate(4096)
    for call in (lambda: r.ns.read(r.qp, buf, 0, 1, "not callable"),
                 lambda: r.ns.readv(r.qp, [(buf, 0, 512)], 0, 42),
                 lambda: r.ns.flush(r.qp, "not callable")):
        with pytest.raises(InvalidArgument, match="callable"):
            call()
    assert r.io_commands() == 0


@pytest.mark.parametrize("mdts", [1, 5])
def test_misaligned_buffer_on_a_split_or_queued_request(make_rig, mdts):
    r = make_rig(qsize=4, mdts=mdts)
    buf = allocate(64 << 10)
    rule = r.emu.hold(NvmOpcode.READ)
    calls = Calls()
    for i in range(r.qp.ntrackers):                  # every tracker busy: the next one queues
        r.ns.read(r.qp, buf, i, 1, calls.cb(i))
    with pytest.raises(InvalidArgument, match="aligned"):
        r.ns.write(r.qp, buf, 0, 1, offset=2)        # would wait in the software queue
    with pytest.raises(InvalidArgument, match="aligned"):
        r.ns.write(r.qp, buf, 0, 64, offset=6)       # split at 8 KiB, or queued
    assert r.emu.commands(NvmOpcode.WRITE) == 0 and r.qp.queued == 0
    rule.cancel()
    r.emu.release()
    poll_until(lambda: len(calls) == r.qp.ntrackers, r.qp)
    buf.free()


# ---- buffer pinning --------------------------------------------------------------------------

def test_buffer_is_pinned_while_io_is_outstanding(make_rig):
    r = make_rig(mdts=1)
    a, b, c = allocate(4096), allocate(64 << 10), allocate(4096)
    rule = r.emu.hold()
    calls = Calls()
    r.ns.read(r.qp, a, 0, 1, calls.cb("a"))
    r.ns.write(r.qp, b, 0, 128, calls.cb("b"))          # split into 8 children
    r.ns.writev(r.qp, [(a, 512, 512), (c, 0, 4096)], 0, calls.cb("v"))
    for buf in (a, b, c):
        with pytest.raises(BufferBusyError, match="outstanding"):
            buf.free()
    rule.cancel()
    r.emu.release()
    poll_until(lambda: len(calls) == 3, r.qp)
    calls.assert_each_once("abv")
    assert all(calls.status(t).ok for t in "abv")
    for buf in (a, b, c):
        buf.free()
        assert buf.freed


# ---- threads --------------------------------------------------------------------------------

def run_in_thread(fn):
    out = {}

    def body():
        try:
            out["result"] = fn()
        except BaseException as e:           # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out


def test_queue_pair_used_from_another_thread(make_rig):
    r = make_rig()
    ns, qp = r.ns, r.qp
    buf = allocate(8192)
    fill(buf, pattern(1, 8192))
    calls = Calls()
    ns.write(qp, buf, 0, 4, calls.cb("mine"))           # one outstanding, owned by this thread
    before = qp.stats()
    attempts = {
        "read": lambda: ns.read(qp, buf, 0, 1, calls.cb("x")),
        "write": lambda: ns.write(qp, buf, 0, 16, calls.cb("x")),
        "write_zeroes": lambda: ns.write_zeroes(qp, 0, 1, calls.cb("x")),
        "readv": lambda: ns.readv(qp, [(buf, 0, 512)], 0, calls.cb("x")),
        "flush": lambda: ns.flush(qp, calls.cb("x")),
        "deallocate": lambda: ns.deallocate(qp, [(0, 1)], calls.cb("x")),
        "poll": lambda: qp.process_completions(),
    }
    for name, fn in attempts.items():
        out = run_in_thread(fn)
        assert isinstance(out.get("error"), WrongThreadError), (name, out)
        assert "another OS thread" in str(out["error"])
    assert qp.stats() == before
    assert r.emu.commands(NvmOpcode.WRITE) == 1 and r.io_commands() == 1
    poll_until(lambda: len(calls) == 1, qp)
    calls.assert_each_once(["mine"])
    ns.read_sync(qp, buf, 0, 16)
    buf.free()


def test_wrong_thread_is_reported_even_when_no_request_is_free(make_rig):
    r = make_rig(qsize=16, requests=16)
    rule = r.emu.hold(NvmOpcode.READ)
    buf = allocate(4096)
    calls = Calls()
    for i in range(16):
        r.ns.read(r.qp, buf, i, 1, calls.cb(i))
    try:
        for fn in (lambda: r.ns.flush(r.qp), lambda: r.ns.readv(r.qp, [(buf, 0, 512)], 0),
                   lambda: r.ns.deallocate(r.qp, [(0, 1)])):
            out = run_in_thread(fn)
            assert isinstance(out.get("error"), WrongThreadError), out
    finally:
        rule.cancel()
        r.emu.release()
        poll_until(lambda: len(calls) == 16, r.qp)


def test_queue_pair_handed_to_another_thread(make_rig):
    r = make_rig()
    qp = r.qp
    data = pattern("handoff", 4096)

    def worker():
        qp.bind_to_current_thread()
        buf = allocate(4096)
        fill(buf, data)
        r.ns.write_sync(qp, buf, 0, 8)
        return contents(buf)

    out = run_in_thread(worker)
    assert out.get("result") == data, out
    with pytest.raises(WrongThreadError):
        qp.process_completions()
    qp.bind_to_current_thread()
    assert r.emu.namespace(1).read_blocks(0, 8) == data


# ---- after detach ----------------------------------------------------------------------------

def test_io_after_detach_raises_controller_detached(make_rig):
    r = make_rig()
    buf = allocate(4096)
    r.ns.write_sync(r.qp, buf, 0, 1)
    r.ctrl.detach()
    assert r.ctrl.state == "detached" and r.qp.state == "destroyed"
    n = r.io_commands()
    for call in (lambda: r.ns.read(r.qp, buf, 0, 1), lambda: r.ns.write_sync(r.qp, buf, 0, 1),
                 lambda: r.ns.flush(r.qp), lambda: r.ns.write_zeroes(r.qp, 0, 1),
                 lambda: r.qp.submit_nvm(NvmOpcode.READ, 1, 0, 1, 9, buf),
                 lambda: r.qp.process_completions(), lambda: r.ctrl.create_io_qpair(8),
                 lambda: r.ctrl.get_features(0x07), lambda: r.ctrl.reset()):
        with pytest.raises(ControllerDetached):
            call()
    assert r.io_commands() == n
    buf.free()
    r.ctrl.detach()                                   # a second detach is harmless


def test_default_options(make_rig):
    r = make_rig(opts=ControllerOptions())
    assert r.qp.entries == 64
    assert r.ctrl.options.io_timeout_s == 30.0
    buf = allocate(4096)
    r.ns.read_sync(r.qp, buf, 0, 8)


# ---- requests that wait in the software queue are checked like the others ----------------------

def test_block_larger_than_the_maximum_transfer_does_not_crash():
    # in a child process: the bug kills the interpreter
    script = textwrap.dedent("""
        from env import memory
        from env.errors import InvalidArgument
        from nvme.controller import Controller, ControllerOptions
        from nvme.emu import EmulatedController, EmuNamespace
        emu = EmulatedController([EmuNamespace(64, block_size=16384)], mdts=1)   # 8 KiB
        try:
            ctrl = Controller(emu.transport, ControllerOptions(io_timeout_s=0)).init()
            ns = ctrl.namespace(1)
            qp = ctrl.create_io_qpair(16)
            buf = memory.allocate(16384)
            ns.write_sync(qp, buf, 0, 1)
            print("written")
        except InvalidArgument as e:
            print("refused:", e)
    """)
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "written" in proc.stdout or "refused" in proc.stdout


def _fill_the_trackers(r):
    rule = r.emu.hold(NvmOpcode.READ)
    buf = allocate(4096)
    calls = Calls()
    for i in range(r.qp.ntrackers):
        r.ns.read(r.qp, buf, i, 1, calls.cb(("held", i)))
    rule.cancel()
    return calls


def test_a_queued_vectored_request_is_accepted_like_an_immediate_one(make_rig):
    r = make_rig(qsize=4)
    layout = [(4096, 0, 510), (4096, 0, 2), (4096, 8, 1021), (4096, 0, 3)]
    iov, data = [], b""
    for i, (size, off, n) in enumerate(layout):
        b = allocate(size)
        piece = pattern(("q", i), n)
        fill(b, piece, off)
        iov.append((b, off, n))
        data += piece
    r.ns.writev_sync(r.qp, iov, 0)                        # immediately: accepted (SGL)
    assert r.emu.namespace(1).read_blocks(0, 3) == data
    calls = _fill_the_trackers(r)
    r.ns.writev(r.qp, iov, 8, calls.cb("queued"))         # the same iovec, queued
    assert r.qp.queued == 1
    r.emu.release()
    poll_until(lambda: len(calls) == r.qp.ntrackers + 1, r.qp)
    assert calls.status("queued").ok
    assert r.emu.namespace(1).read_blocks(8, 3) == data


def test_a_queued_vectored_request_prps_cannot_express_is_refused_at_submission(make_rig):
    r = make_rig(qsize=4, sgl=False)
    a, b = allocate(4096), allocate(4096)
    iov = [(a, 0, 512), (b, 0, 512)]                      # the first piece ends mid-page
    with pytest.raises(InvalidArgument):
        r.ns.writev(r.qp, iov, 0)                         # immediately: refused
    calls = _fill_the_trackers(r)
    try:
        with pytest.raises(InvalidArgument):
            r.ns.writev(r.qp, iov, 0, calls.cb("queued"))  # queued: must be refused too
    finally:
        r.emu.release()
        poll_until(lambda: r.qp.outstanding == 0 and r.qp.queued == 0, r.qp)
    assert r.emu.commands(NvmOpcode.WRITE) == 0
