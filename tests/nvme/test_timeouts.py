"""Timeouts, Abort, controller reset and surprise removal, against the emulated controller.

The I/O timeout is made short (0.1-0.3 s) and the tests poll the I/O queue pair and the admin
queue (`qp.process_completions()` + `ctrl.poll_admin()`) until the driver has done what it must.
No test asserts how long anything took; the time limits in `pump` only guard against hangs.
"""
import threading
import time

import pytest

from nvme.controller import ControllerOptions
from nvme.errors import CommandError, CommandTimeout, ControllerDetached, ControllerError
from nvme.spec import AdminOpcode, NvmOpcode
from nvme.status import CommandSpecific, Generic
from tests.nvme.test_driver import (Calls, allocate, contents, fill, make_rig,  # noqa: F401
                                    pattern, poll_until)

SQ_DELETION = Generic.ABORTED_SQ_DELETION
BY_REQUEST = Generic.ABORTED_BY_REQUEST


def opts(io_timeout_s=0.2, **kw):
    return ControllerOptions(io_timeout_s=io_timeout_s, **kw)


def pump(r, cond, *qpairs, timeout=10.0, errors=None):
    """Poll the rig's queue pair(s) and its admin queue until `cond()`. Exceptions from
    `poll_admin` (a reset that fails) go to `errors` when given."""
    qpairs = qpairs or (r.qp,)
    deadline = time.monotonic() + timeout
    while not cond():
        for qp in qpairs:
            qp.process_completions()
        try:
            r.ctrl.poll_admin()
        except Exception as e:
            if errors is None:
                raise
            errors.append(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(0.0005)


def pump_for(r, seconds, *qpairs):
    end = time.monotonic() + seconds
    pump(r, lambda: time.monotonic() >= end, *qpairs)


def check_io_works(r, qp=None, lba=100, seed="after"):
    qp = qp or r.qp
    data = pattern(seed, 8 * 512)
    w = allocate(8 * 512)
    fill(w, data)
    r.ns.write_sync(qp, w, lba, 8)
    rd = allocate(8 * 512, 0)
    r.ns.read_sync(qp, rd, lba, 8)
    assert contents(rd) == data
    assert r.emu.namespace(1).read_blocks(lba, 8) == data


# ---- Abort -------------------------------------------------------------------------------------

def test_a_held_command_is_aborted(make_rig):
    r = make_rig(opts=opts(0.2))
    r.emu.hold(NvmOpcode.READ, count=1)
    buf = allocate(8 * 512)
    calls = Calls()
    r.ns.read(r.qp, buf, 0, 1, calls.cb("held"))
    for i in range(1, 6):                                 # others complete normally
        r.ns.read(r.qp, buf, i, 1, calls.cb(i), offset=i * 512)
    pump(r, lambda: len(calls) == 6)
    calls.assert_each_once(["held", 1, 2, 3, 4, 5])
    held = calls.status("held")
    assert held.status.matches(BY_REQUEST) and held.status.name == "Command Abort Requested"
    assert all(calls.status(i).ok for i in range(1, 6))
    assert r.emu.commands(AdminOpcode.ABORT, admin=True) == 1
    assert r.emu.counters["aborted"] == 1
    assert r.qp.stats()["timeouts"] == 1
    # the abort worked: no reset follows, however long we keep polling
    pump_for(r, 0.5)
    assert r.ctrl.reset_count == 0 and r.emu.counters["resets"] == 0
    assert len(calls) == 6
    check_io_works(r)


def test_a_blocking_call_sees_the_abort_as_a_command_error(make_rig):
    r = make_rig(opts=opts(0.1))
    r.emu.hold(NvmOpcode.WRITE, count=1)
    buf = allocate(4096)
    with pytest.raises(CommandError, match="Command Abort Requested") as ei:
        r.ns.write_sync(r.qp, buf, 3, 8)
    assert ei.value.status.matches(BY_REQUEST)
    assert ei.value.lba == 3 and ei.value.nlb == 8
    assert r.ctrl.reset_count == 0
    check_io_works(r)


def test_a_successful_abort_does_not_reset_when_the_cid_is_reused(make_rig):
    r = make_rig(opts=opts(1.0, abort_timeout_s=0.1))
    r.emu.hold(NvmOpcode.READ, count=1)
    buf = allocate(4096)
    calls = Calls()

    def first_done(cpl):
        calls.cb("first")(cpl)
        # a workload resubmits from the completion: the new command gets the same CID
        r.emu.delay(NvmOpcode.READ, ticks=1, count=1)
        r.ns.read(r.qp, buf, 1, 1, calls.cb("second"))

    r.ns.read(r.qp, buf, 0, 1, first_done)
    pump(r, lambda: len(calls) == 1)
    assert calls.status("first").status.matches(BY_REQUEST)
    # well past the first Abort's deadline, before the second command's own timeout
    pump_for(r, 0.25)
    assert r.ctrl.reset_count == 0
    r.emu.tick()
    pump(r, lambda: len(calls) == 2)
    assert calls.status("second").ok


def test_two_commands_in_a_row_on_one_cid_both_time_out(make_rig):
    """A tracker's timeout is reported once per command, not once per tracker: the command that
    reuses a timed-out command's CID times out too (and is aborted)."""
    r = make_rig(opts=opts(0.1))
    buf = allocate(4096)
    cids = []
    for n in (1, 2):
        r.emu.hold(NvmOpcode.READ, count=1)
        calls = Calls()
        r.ns.read(r.qp, buf, n, 1, calls.cb(n))
        pump(r, lambda: len(calls) == 1, timeout=10)
        cpl = calls.status(n)
        assert cpl.status.matches(BY_REQUEST), cpl
        cids.append(cpl.cid)
        assert r.qp.stats()["timeouts"] == n
    assert cids[0] == cids[1]                  # the same tracker both times
    assert r.emu.commands(AdminOpcode.ABORT, admin=True) == 2
    assert r.ctrl.reset_count == 0
    check_io_works(r)


# ---- Abort that does not help: reset ------------------------------------------------------------

@pytest.mark.parametrize("abort_fails_by", ["hold", "error status"])
def test_a_command_that_cannot_be_aborted_leads_to_a_reset(make_rig, abort_fails_by):
    r = make_rig(qsize=8, mdts=1, opts=opts(0.2, abort_timeout_s=0.1))
    qp = r.qp
    io_rule = r.emu.hold(NvmOpcode.READ)
    if abort_fails_by == "hold":
        abort_rule = r.emu.hold(AdminOpcode.ABORT, admin=True)
    else:
        abort_rule = r.emu.inject(AdminOpcode.ABORT, admin=True, count=None,
                                  status=CommandSpecific.ABORT_COMMAND_LIMIT_EXCEEDED)
    buf = allocate(64 << 10)
    calls = Calls()
    for i in range(qp.ntrackers + 4):                       # some wait in the software queue
        r.ns.read(qp, buf, i, 1, calls.cb(i), offset=i * 512)
    r.ns.read(qp, buf, 0, 64, calls.cb("split"))            # 4 children, all queued
    assert qp.queued > 0
    tags = list(range(qp.ntrackers + 4)) + ["split"]
    pump(r, lambda: len(calls) == len(tags))
    calls.assert_each_once(tags)
    assert all(calls.status(t).status.matches(SQ_DELETION) for t in tags)
    assert r.ctrl.reset_count == 1 and r.emu.counters["resets"] >= 1
    assert r.ctrl.state == "ready" and qp.state == "enabled"
    assert qp.outstanding == 0 and qp.queued == 0
    assert len(r.emu.aers) == 4                               # AERs re-armed
    io_rule.cancel()
    abort_rule.cancel()
    check_io_works(r)
    pump_for(r, 0.3)
    assert len(calls) == len(tags)                            # nothing completes twice
    assert r.ctrl.reset_count == 1


def test_fatal_controller_is_recovered_by_the_timeout_path(make_rig):
    r = make_rig(opts=opts(0.1, abort_timeout_s=0.1))
    buf = allocate(4096)
    r.emu.fatal("test")
    calls = Calls()
    for i in range(3):
        r.ns.write(r.qp, buf, i, 1, calls.cb(i))
    pump(r, lambda: len(calls) == 3)
    calls.assert_each_once(range(3))
    assert all(calls.status(i).status.matches(SQ_DELETION) for i in range(3))
    assert r.ctrl.reset_count == 1 and not r.emu.fatal_reason
    check_io_works(r)


def test_admin_command_timeout_resets_the_controller(make_rig):
    r = make_rig(opts=opts(0, admin_timeout_s=0.2))
    r.emu.hold(AdminOpcode.GET_FEATURES, admin=True, count=1)
    with pytest.raises(CommandTimeout, match="did not complete"):
        r.ctrl.get_features(0x07)
    assert r.ctrl.reset_count == 1 and r.ctrl.state == "ready"
    assert r.ctrl.get_features(0x07).ok
    check_io_works(r)


def test_no_abort_when_timeouts_are_off(make_rig):
    r = make_rig(opts=opts(0))
    rule = r.emu.hold(NvmOpcode.READ, count=1)
    buf = allocate(4096)
    calls = Calls()
    r.ns.read(r.qp, buf, 0, 1, calls.cb("r"))
    pump_for(r, 0.2)
    assert len(calls) == 0 and r.emu.commands(AdminOpcode.ABORT, admin=True) == 0
    assert r.qp.stats()["timeouts"] == 0
    rule.cancel()
    r.emu.release()
    pump(r, lambda: len(calls) == 1)
    assert calls.status("r").ok


# ---- explicit reset --------------------------------------------------------------------------

def test_reset_with_io_outstanding_and_queued(make_rig):
    r = make_rig(qsize=4, mdts=1)
    qp = r.qp
    rule = r.emu.hold(NvmOpcode.WRITE)
    buf = allocate(64 << 10)
    fill(buf, pattern("before", 64 << 10))
    calls = Calls()
    for i in range(10):
        r.ns.write(qp, buf, i, 1, calls.cb(i), offset=i * 512)
    r.ns.write(qp, buf, 200, 128, calls.cb("split"))
    assert qp.outstanding == qp.ntrackers and qp.queued > 0
    r.ctrl.reset()
    # we own the queue pair: it was drained inside reset() and re-created
    tags = list(range(10)) + ["split"]
    calls.assert_each_once(tags)
    assert all(calls.status(t).status.matches(SQ_DELETION) for t in tags)
    assert qp.state == "enabled" and qp.outstanding == 0 and qp.queued == 0
    assert r.ctrl.reset_count == 1 and r.emu.counters["resets"] >= 1
    assert r.emu.held_commands == []
    rule.cancel()
    assert qp.process_completions() == 0 and len(calls) == 11
    check_io_works(r)


def test_reset_from_inside_a_completion_callback(make_rig):
    r = make_rig(qsize=16)
    r.emu.inject(NvmOpcode.READ, lba=3)
    rule = r.emu.hold(NvmOpcode.READ, lba=9)
    buf = allocate(16 * 512)
    calls = Calls()

    def cb(i):
        done = calls.cb(i)

        def f(cpl):
            done(cpl)
            if not cpl.ok and r.ctrl.reset_count == 0:
                r.ctrl.reset()                  # an error handler that resets
        return f

    for i in range(12):
        r.ns.read(r.qp, buf, i, 1, cb(i), offset=i * 512)
    rule.cancel()
    poll_until(lambda: len(calls) == 12, r.qp)
    calls.assert_each_once(range(12))
    assert [calls.status(i).ok for i in range(3)] == [True] * 3
    assert calls.status(3).status.name == "Unrecovered Read Error"
    assert all(calls.status(i).status.matches(SQ_DELETION) for i in range(4, 12))
    assert r.ctrl.reset_count == 1 and r.qp.state == "enabled"
    for i in range(40):                          # the re-created rings wrap a few times
        check_io_works(r, lba=i, seed=i)
    assert r.qp.process_completions() == 0 and len(calls) == 12


def test_repeated_resets_keep_namespaces_queues_and_shadow_doorbells(make_rig):
    r = make_rig(dbbuf=True)
    ns = r.ns
    for i in range(3):
        r.ctrl.reset()
        assert r.ctrl.state == "ready"
        assert r.ctrl.namespace(1) is ns
        assert r.qp.shadow_doorbells
        check_io_works(r, lba=10 * i, seed=i)
    assert r.ctrl.reset_count == 3
    assert r.emu.counters["dbbuf_config"] == 4


def test_a_new_queue_pair_after_a_reset(make_rig):
    r = make_rig()
    r.ctrl.reset()
    qp2 = r.ctrl.create_io_qpair(16)
    assert qp2.qid != r.qp.qid
    check_io_works(r, qp2)
    check_io_works(r)


def test_a_new_queue_pair_while_another_thread_has_not_drained_yet(make_rig):
    """The queue id of a queue pair still waiting for its owner to drain it after a reset is not
    handed out again."""
    r = make_rig(qsize=None)
    made, go = threading.Event(), threading.Event()
    seen = {}

    def worker():
        qp = r.ctrl.create_io_qpair(8)
        seen["qp"] = qp
        made.set()
        go.wait(10)
        try:
            check_io_works(r, qp, lba=300, seed="worker")
            seen["ok"] = True
        except BaseException as e:               # noqa: BLE001 - handed back to the test
            seen["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    assert made.wait(10)
    r.ctrl.reset()
    assert seen["qp"].state == "disconnecting"
    mine = r.ctrl.create_io_qpair(8)
    assert mine.qid != seen["qp"].qid
    go.set()
    t.join(30)
    assert seen.get("ok"), seen
    check_io_works(r, mine)
    assert r.ctrl.qpairs == {seen["qp"].qid: seen["qp"], mine.qid: mine}


@pytest.mark.parametrize("first", ["poll", "submit"])
def test_reset_of_a_queue_pair_owned_by_another_thread(make_rig, first):
    r = make_rig(qsize=None)
    rule = r.emu.hold(NvmOpcode.READ)
    calls = Calls()
    submitted, reset_done = threading.Event(), threading.Event()
    seen = {}

    def worker():
        qp = r.ctrl.create_io_qpair(8)
        seen["qp"] = qp
        buf = allocate(16 * 512)
        for i in range(12):                             # 5 outstanding, 7 queued
            r.ns.read(qp, buf, i, 1, calls.cb(i), offset=i * 512)
        submitted.set()
        reset_done.wait(10)
        seen["before_poll"] = (len(calls), qp.state)
        if first == "poll":
            seen["drained"] = qp.process_completions()
        else:
            # the next submission finishes the old commands first, then goes to the new queue
            r.ns.read(qp, buf, 0, 1, calls.cb("new"))
            seen["drained"] = len(calls)
            poll_until(lambda: len(calls) == 13, qp)
        seen["after_poll"] = qp.state
        check_io_works(r, qp)
        buf.free()

    t = threading.Thread(target=worker)
    t.start()
    assert submitted.wait(10)
    rule.cancel()
    r.ctrl.reset()
    reset_done.set()
    t.join(30)
    assert not t.is_alive()
    assert "before_poll" in seen and "after_poll" in seen, seen
    # nothing completed on the resetting thread: the owner drained on its next poll
    assert seen["before_poll"] == (0, "disconnecting")
    assert seen["drained"] == 12
    assert seen["after_poll"] == "enabled"
    calls.assert_each_once(list(range(12)) + (["new"] if first == "submit" else []))
    assert all(calls.status(i).status.matches(SQ_DELETION) for i in range(12))
    if first == "submit":
        assert calls.status("new").ok
    qp = seen["qp"]
    assert qp.outstanding == 0 and r.ctrl.qpairs[qp.qid] is qp


# ---- surprise removal --------------------------------------------------------------------------

def test_surprise_removal_with_io_outstanding(make_rig):
    r = make_rig(qsize=4, opts=opts(0.1, abort_timeout_s=0.1))
    rule = r.emu.hold(NvmOpcode.READ)
    buf = allocate(16 * 512)
    calls = Calls()
    for i in range(10):
        r.ns.read(r.qp, buf, i, 1, calls.cb(i), offset=i * 512)
    r.emu.remove()
    errors = []
    pump(r, lambda: len(calls) == 10, errors=errors)
    calls.assert_each_once(range(10))
    assert all(not calls.status(i).ok for i in range(10))
    assert r.ctrl.state in ("failed", "detached")
    # poll_admin notices the all-ones registers itself (no exception needed); an admin command
    # that meets the removal first raises a ControllerError saying so
    assert all(isinstance(e, ControllerError) and "all-ones" in str(e) for e in errors)
    with pytest.raises(ControllerDetached):
        r.ns.read(r.qp, buf, 0, 1)
    with pytest.raises(ControllerDetached):
        r.ctrl.get_features(0x07)
    with pytest.raises(ControllerDetached):
        r.ctrl.reset()
    assert r.ctrl.poll_admin() == 0
    r.ctrl.detach()
    assert r.ctrl.state == "detached"
    with pytest.raises(ControllerDetached):
        r.qp.process_completions()
    assert len(calls) == 10
    rule.cancel()
    buf.free()


def test_removal_noticed_by_an_admin_command(make_rig):
    r = make_rig(opts=opts(0))
    r.emu.hold(NvmOpcode.WRITE)
    buf = allocate(4096)
    calls = Calls()
    for i in range(4):
        r.ns.write(r.qp, buf, i, 1, calls.cb(i))
    r.emu.remove()
    with pytest.raises(ControllerDetached, match="gone"):
        r.ctrl.smart_log()
    assert r.ctrl.state == "failed"
    # we own the queue pair: its commands were completed when the failure was noticed
    r.qp.process_completions()
    calls.assert_each_once(range(4))
    assert all(calls.status(i).status.matches(SQ_DELETION) for i in range(4))
    buf.free()
    r.ctrl.detach()
    assert r.ctrl.state == "detached"


def test_callbacks_that_resubmit_during_a_reset_do_not_nest_drains():
    """Held reads whose callbacks submit again while the reset drains their queue pair: each
    resubmission is refused (the queue is gone) instead of draining again, one level deeper per
    callback (which overflowed the stack with hundreds of commands)."""
    from nvme.controller import Controller, ControllerOptions
    from nvme.emu import EmulatedController, EmuNamespace
    emu = EmulatedController([EmuNamespace(4096)])
    ctrl = Controller(emu.transport, ControllerOptions(io_timeout_s=0)).init()
    qp = ctrl.create_io_qpair(1024, requests=2048)
    ns = ctrl.namespace(1)
    emu.hold(NvmOpcode.READ)
    buf = allocate(512)
    refused = []
    seen = []

    def cb(cpl):
        seen.append(cpl.ok)
        try:
            ns.read(qp, buf, 0, 1, cb)
        except ControllerDetached:
            refused.append(1)

    for _ in range(800):
        ns.read(qp, buf, 0, 1, cb)
    ctrl.reset()
    assert len(seen) == 800 and not any(seen)
    assert len(refused) == 800
    emu.clear_faults()
    ns.read_sync(qp, buf, 0, 1)
    ctrl.detach()
