"""Administration through the driver's Controller against the emulated controller: log pages,
features, Identify (namespace descriptors), asynchronous events, creating and deleting I/O queue
pairs (also with I/O in flight) and detach."""
import threading
import uuid

import pytest

from env.errors import InvalidArgument
from nvme.controller import AsyncEvent, ControllerOptions
from nvme.emu import EmuNamespace
from nvme.errors import CommandError, ControllerDetached
from nvme.spec import (AdminOpcode, AsyncEventError, AsyncEventNotice, AsyncEventSmart,
                       AsyncEventType, FeatureId, LogPageId, NvmOpcode)
from nvme.status import CommandSpecific, Generic
from tests.nvme.test_driver import (Calls, allocate, contents, fill, make_rig,  # noqa: F401
                                    pattern, poll_until)

SQ_DELETION = Generic.ABORTED_SQ_DELETION


# ---- log pages ----------------------------------------------------------------------------------

def test_smart_log_counts_the_io(make_rig):
    r = make_rig()
    buf = allocate(64 << 10)
    for i in range(5):
        r.ns.write_sync(r.qp, buf, 0, 128)           # 64 KiB each
    for i in range(3):
        r.ns.read_sync(r.qp, buf, 0, 8)
    smart = r.ctrl.smart_log()
    assert smart.host_write_commands == 5 and smart.host_read_commands == 3
    assert smart.data_units_written == -(-5 * 128 // 1000)     # units of 1000 blocks of 512
    assert smart.data_units_read == 1
    assert smart.temperature == 300 and smart.critical_warning == 0
    assert smart.power_cycles == 1 and smart.media_errors == 0
    assert smart.avail_spare == 100


def test_error_log(make_rig):
    r = make_rig(elpe=7)
    assert r.ctrl.error_log() == []                   # only logged entries are returned
    r.emu.inject(NvmOpcode.READ, lba=17, status=Generic.INTERNAL_ERROR, count=2)
    buf = allocate(4096)
    calls = Calls()
    r.ns.read(r.qp, buf, 17, 1, calls.cb(1))
    r.ns.read(r.qp, buf, 16, 2, calls.cb(2))
    poll_until(lambda: len(calls) == 2, r.qp)
    entries = r.ctrl.error_log()
    assert len(entries) == 2
    assert [e.error_count for e in entries] == [2, 1]           # newest first
    assert {e.lba for e in entries} == {16, 17}
    assert all(e.sqid == r.qp.qid and e.nsid == 1 for e in entries)
    assert all(e.status.matches(Generic.INTERNAL_ERROR) for e in entries)
    assert {e.cmdid for e in entries} == {calls.status(1).cid, calls.status(2).cid}
    assert r.ctrl.smart_log().num_err_log_entries == 2
    assert len(r.ctrl.error_log(entries=1)) == 1


def test_firmware_log(make_rig):
    r = make_rig(firmware="FW9.8")
    fw = r.ctrl.firmware_log()
    assert fw.active_slot == 1 and fw.active_revision == "FW9.8"
    assert fw.frs[1:] == [""] * 6


def test_log_page_argument_checks_and_unknown_pages(make_rig):
    r = make_rig()
    for size in (0, -4, 6):
        with pytest.raises(InvalidArgument):
            r.ctrl.get_log_page(LogPageId.SMART_HEALTH, size)
    with pytest.raises(CommandError, match="Invalid Log Page") as ei:
        r.ctrl.get_log_page(0x70, 512)
    assert ei.value.admin and ei.value.status.matches(CommandSpecific.INVALID_LOG_PAGE)
    # a log page read at an offset
    whole = r.ctrl.get_log_page(LogPageId.FIRMWARE_SLOT, 512)
    assert r.ctrl.get_log_page(LogPageId.FIRMWARE_SLOT, 64, offset=8) == whole[8:72]


# ---- features -----------------------------------------------------------------------------------

def test_get_and_set_features(make_rig):
    r = make_rig(max_ioqpairs=6)
    c = r.ctrl
    cpl = c.get_features(FeatureId.NUMBER_OF_QUEUES)
    assert (cpl.cdw0 & 0xFFFF) + 1 == 6 and (cpl.cdw0 >> 16) + 1 == 6
    assert c.get_features(FeatureId.VOLATILE_WRITE_CACHE).cdw0 == 1
    c.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0)
    assert c.get_features(FeatureId.VOLATILE_WRITE_CACHE).cdw0 == 0
    c.set_features(FeatureId.ARBITRATION, 0x0302)
    assert c.get_features(FeatureId.ARBITRATION).cdw0 == 0x0302
    c.set_features(FeatureId.TEMPERATURE_THRESHOLD, 360)
    assert c.get_features(FeatureId.TEMPERATURE_THRESHOLD).cdw0 == 360
    assert c.get_features(FeatureId.ASYNC_EVENT_CONFIGURATION).cdw0 == 0xFF   # the driver's
    with pytest.raises(CommandError, match="Invalid Field in Command") as ei:
        c.get_features(0x7E)
    assert ei.value.admin and ei.value.opcode == AdminOpcode.GET_FEATURES
    assert "Get Features" in str(ei.value)
    with pytest.raises(CommandError):
        c.set_features(FeatureId.VOLATILE_WRITE_CACHE, 1, save=True)
    cpl = c.admin(AdminOpcode.GET_FEATURES, cdw10=0x7E, check=False)
    assert not cpl.ok and cpl.status.matches(Generic.INVALID_FIELD)


def test_host_identifier_feature_moves_data(make_rig):
    r = make_rig()
    buf = allocate(4096, 0)
    fill(buf, b"HOSTID01")
    r.ctrl.set_features(FeatureId.HOST_IDENTIFIER, 0, buf=buf)
    out = allocate(4096, 0xAA)
    r.ctrl.get_features(FeatureId.HOST_IDENTIFIER, buf=out)
    assert contents(out, 0, 8) == b"HOSTID01"


def test_unknown_admin_opcode(make_rig):
    r = make_rig()
    with pytest.raises(CommandError, match="Invalid Command Opcode"):
        r.ctrl.admin(0x7F)
    assert r.ctrl.state == "ready"


# ---- Identify ---------------------------------------------------------------------------------

def test_namespace_descriptors(make_rig):
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    r = make_rig([EmuNamespace(64, eui64=b"EUI64-ID", nguid=bytes(range(16)), uuid=u),
                  EmuNamespace(64, block_size=4096)])
    d1 = r.ctrl.namespace_descriptors(1)
    assert (d1.eui64, d1.nguid, d1.uuid) == (b"EUI64-ID", bytes(range(16)), u)
    e2 = r.emu.namespace(2)
    d2 = r.ctrl.namespace_descriptors(2)
    assert (d2.eui64, d2.nguid, d2.uuid) == (e2.eui64, e2.nguid, e2.uuid)
    assert d2.uuid != u
    with pytest.raises(CommandError, match="Invalid Namespace or Format"):
        r.ctrl.namespace_descriptors(3)


def test_identify_raw_pages(make_rig):
    r = make_rig(model="raw page model")
    page = r.ctrl.identify(0x01)
    assert len(page) == 4096 and page[24:38] == b"raw page model"
    assert r.ctrl.active_namespace_ids() == [1, 2]
    assert r.ctrl.identify_namespace(2).nsze == 1024


# ---- asynchronous events ----------------------------------------------------------------------

def test_asynchronous_event_reaches_the_callback_and_the_request_is_resubmitted(make_rig):
    r = make_rig()
    got = []
    r.ctrl.on_event(lambda ctrl, ev: got.append((ctrl, ev)))
    assert len(r.emu.aers) == 4
    r.emu.raise_event(AsyncEventType.NOTICE, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED,
                      LogPageId.CHANGED_NAMESPACE_LIST)
    assert len(r.emu.aers) == 3
    assert r.ctrl.events == []                    # nothing happens until the admin queue is polled
    assert r.ctrl.poll_admin() == 1
    ev = AsyncEvent(AsyncEventType.NOTICE, AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED,
                    LogPageId.CHANGED_NAMESPACE_LIST)
    assert r.ctrl.events == [ev]
    assert got == [(r.ctrl, ev)]
    r.ctrl.poll_admin()                           # the resubmitted request reaches the device
    assert len(r.emu.aers) == 4
    assert r.emu.commands(AdminOpcode.ASYNC_EVENT_REQUEST, admin=True) == 5


def test_events_of_one_type_wait_for_the_log_page(make_rig):
    r = make_rig()
    for info in (AsyncEventError.TRANSIENT_INTERNAL_ERROR, AsyncEventError.DIAGNOSTIC_FAILURE):
        r.emu.raise_event(AsyncEventType.ERROR, info, LogPageId.ERROR_INFORMATION)
    r.ctrl.poll_admin()
    assert [e.info for e in r.ctrl.events] == [AsyncEventError.TRANSIENT_INTERNAL_ERROR]
    r.ctrl.poll_admin()
    assert len(r.ctrl.events) == 1                # masked until the error log is read
    r.ctrl.error_log()                            # RAE clear: unmasks the next one
    r.ctrl.poll_admin()
    assert [e.info for e in r.ctrl.events] == [AsyncEventError.TRANSIENT_INTERNAL_ERROR,
                                              AsyncEventError.DIAGNOSTIC_FAILURE]
    assert r.emu.pending_events == []


def test_an_event_callback_may_read_the_log_page(make_rig):
    """The usual reaction to an event: read the log page it names, from the callback (an admin
    command issued while the admin queue is being polled). Reading it unmasks the next event of
    the same type."""
    r = make_rig()
    warnings = []
    r.ctrl.on_event(lambda c, e: warnings.append(c.smart_log().critical_warning))
    for info in range(3):
        r.emu.raise_event(AsyncEventType.SMART_HEALTH, info, LogPageId.SMART_HEALTH)
    for _ in range(5):
        r.ctrl.poll_admin()
    assert warnings == [0, 0, 0]
    assert [e.info for e in r.ctrl.events] == [0, 1, 2]
    assert len(r.emu.aers) == 4 and r.ctrl.reset_count == 0


def test_temperature_threshold_event_through_set_features(make_rig):
    r = make_rig()
    seen = []
    r.ctrl.on_event(lambda c, e: seen.append(e))
    r.ctrl.set_features(FeatureId.TEMPERATURE_THRESHOLD, 290)     # below the current 300 K
    r.ctrl.poll_admin()
    assert seen == [AsyncEvent(AsyncEventType.SMART_HEALTH,
                               AsyncEventSmart.TEMPERATURE_THRESHOLD, LogPageId.SMART_HEALTH)]
    assert r.ctrl.smart_log().critical_warning & 0x02


def test_an_event_callback_that_raises_does_not_stop_the_others(make_rig):
    r = make_rig()
    seen = []

    def bad(c, e):
        raise RuntimeError("event callback bug")

    r.ctrl.on_event(bad)
    r.ctrl.on_event(lambda c, e: seen.append(e))
    for event_type in (AsyncEventType.ERROR, AsyncEventType.SMART_HEALTH, AsyncEventType.NOTICE):
        r.emu.raise_event(event_type, 1, 0xC0)
        r.ctrl.poll_admin()
    assert [e.type for e in seen] == [AsyncEventType.ERROR, AsyncEventType.SMART_HEALTH,
                                      AsyncEventType.NOTICE]
    assert r.ctrl.events == seen
    r.ctrl.poll_admin()
    assert len(r.emu.aers) == 4


def test_no_asynchronous_event_requests_when_asked_for_none(make_rig):
    r = make_rig(opts=ControllerOptions(aer_count=0, io_timeout_s=0))
    assert r.emu.aers == []
    r.emu.raise_event(AsyncEventType.NOTICE, 0, LogPageId.CHANGED_NAMESPACE_LIST)
    assert r.ctrl.poll_admin() == 0 and r.ctrl.events == []
    assert len(r.emu.pending_events) == 1


def test_events_survive_a_reset(make_rig):
    r = make_rig()
    r.ctrl.reset()
    assert len(r.emu.aers) == 4
    r.emu.raise_event(AsyncEventType.SMART_HEALTH, AsyncEventSmart.SPARE_BELOW_THRESHOLD,
                      LogPageId.SMART_HEALTH)
    r.ctrl.poll_admin()
    assert r.ctrl.events[-1].info == AsyncEventSmart.SPARE_BELOW_THRESHOLD


# ---- I/O queue pairs ---------------------------------------------------------------------------

def test_delete_io_qpair_with_io_in_flight(make_rig):
    r = make_rig(qsize=None, max_ioqpairs=2)
    qp = r.ctrl.create_io_qpair(8)
    other = r.ctrl.create_io_qpair(8)
    rule = r.emu.hold(NvmOpcode.READ, qid=qp.qid)
    buf = allocate(16 * 512)
    calls = Calls()
    for i in range(12):                                   # 5 outstanding + 7 queued
        r.ns.read(qp, buf, i, 1, calls.cb(i), offset=i * 512)
    r.ns.write(qp, buf, 50, 2, calls.cb("w"))            # completes on the device, unreaped
    r.ctrl.delete_io_qpair(qp)
    tags = list(range(12)) + ["w"]
    calls.assert_each_once(tags)
    assert all(not calls.status(t).ok for t in tags)
    assert all(calls.status(i).status.matches(SQ_DELETION) for i in range(12))
    assert qp.state == "destroyed" and qp.qid not in r.ctrl.qpairs
    assert r.emu.queue(qp.qid) is None and r.emu.queue(qp.qid, cq=True) is None
    with pytest.raises(ControllerDetached):
        r.ns.read(qp, buf, 0, 1)
    buf.free()                                            # nothing left pinned
    rule.cancel()
    # the queue id is free again, and the other queue pair was not disturbed
    again = r.ctrl.create_io_qpair(8)
    assert again.qid == qp.qid
    for q in (again, other):
        w = allocate(4096)
        fill(w, pattern(q.qid, 4096))
        r.ns.write_sync(q, w, 8 * q.qid, 8)
        assert r.emu.namespace(1).read_blocks(8 * q.qid, 8) == contents(w)
    with pytest.raises(InvalidArgument):
        r.ctrl.delete_io_qpair(qp)                        # already gone


def test_create_io_qpair_argument_checks(make_rig):
    r = make_rig(qsize=None)
    with pytest.raises(InvalidArgument):
        r.ctrl.create_io_qpair(1)
    with pytest.raises(InvalidArgument):
        r.ctrl.create_io_qpair(16, requests=4)            # fewer requests than trackers
    qp = r.ctrl.create_io_qpair(16)                       # the refused ones gave their qid back
    assert qp.qid == 1


def test_detach_with_io_in_flight(make_rig):
    r = make_rig()
    rule = r.emu.hold(NvmOpcode.WRITE)
    buf = allocate(8 * 512)
    calls = Calls()
    for i in range(8):
        r.ns.write(r.qp, buf, i, 1, calls.cb(i), offset=i * 512)
    r.ctrl.detach()
    calls.assert_each_once(range(8))
    assert all(calls.status(i).status.matches(SQ_DELETION) for i in range(8))
    assert r.emu.commands(AdminOpcode.DELETE_IO_SQ, admin=True) == 1
    assert r.emu.commands(AdminOpcode.DELETE_IO_CQ, admin=True) == 1
    assert r.emu.counters["shutdowns"] == 1
    assert r.ctrl.state == "detached"
    buf.free()
    rule.cancel()


def test_detach_without_shutdown(make_rig):
    r = make_rig()
    r.ctrl.detach(shutdown=False)
    assert r.ctrl.state == "detached" and r.emu.counters["shutdowns"] == 0


def _owned_by_another_thread(r, management):
    """A worker thread owns a queue pair with commands held by the device; this thread runs
    `management(qp)`; then the worker polls. Returns (Calls, what the worker saw)."""
    rule = r.emu.hold(NvmOpcode.READ)
    calls = Calls()
    ready, go = threading.Event(), threading.Event()
    seen = {}

    def worker():
        qp = r.ctrl.create_io_qpair(16)
        seen["qp"] = qp
        buf = allocate(4096)
        for i in range(5):
            r.ns.read(qp, buf, i, 1, calls.cb(i))
        ready.set()
        go.wait(10)
        try:
            for _ in range(3):
                qp.process_completions()
        except Exception as e:                   # noqa: BLE001 - reported to the test
            seen["poll_error"] = e
        try:
            buf.free()
        except Exception as e:                   # noqa: BLE001
            seen["free_error"] = e

    t = threading.Thread(target=worker)
    t.start()
    assert ready.wait(10)
    rule.cancel()
    management(seen["qp"])
    go.set()
    t.join(30)
    assert not t.is_alive()
    return calls, seen


def test_detach_from_another_thread_completes_every_command(make_rig):
    r = make_rig(qsize=None)
    calls, seen = _owned_by_another_thread(r, lambda qp: r.ctrl.detach())
    calls.assert_each_once(range(5))
    assert "free_error" not in seen, seen


def test_delete_io_qpair_from_another_thread_loses_nothing(make_rig):
    r = make_rig(qsize=None)
    refused = []

    def delete(qp):
        try:
            r.ctrl.delete_io_qpair(qp)
        except Exception as e:                   # noqa: BLE001 - refusing is acceptable
            refused.append(e)

    calls, seen = _owned_by_another_thread(r, delete)
    calls.assert_each_once(range(5))
    assert "free_error" not in seen, seen
