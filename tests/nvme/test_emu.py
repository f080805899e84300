"""The emulated NVMe controller, driven at register and memory level by tests/nvme/emu_driver.py.

Bring-up and registers, every admin command, NVM I/O with PRPs and SGLs, queue wrap-around and
phase flips, full completion queues, shadow doorbells, DMA faults, and every fault injection.
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st_

from env.errors import InvalidArgument
from nvme import spec
from nvme.emu import EmulatedController, EmuNamespace
from nvme.identify import (ActiveNamespaceList, IdentifyController, IdentifyNamespace,
                           NamespaceIdDescriptorList)
from nvme.logpages import ErrorInformationLog, FirmwareSlotLog, SmartLog
from nvme.spec import Command, FeatureId, LogPageId, SglDescriptor, SglType
from nvme.status import CommandSpecific, Generic, Media, NvmeStatus
from tests.nvme.emu_driver import MiniDriver, data_block

READ, WRITE, COMPARE = spec.NVM_READ, spec.NVM_WRITE, spec.NVM_COMPARE


def make(namespaces=None, enable=True, **options):
    options.setdefault("strict", True)
    emu = EmulatedController(namespaces, **options)
    drv = MiniDriver(emu)
    if enable:
        assert drv.enable()
    return emu, drv


@pytest.fixture
def setup():
    """An enabled controller with one namespace (32768 x 512 B) and I/O queue pair 1."""
    emu, drv = make()
    qp = drv.create_io_qpair(1, 16)
    return emu, drv, qp


def st(cpl):
    return cpl.nvme_status


def is_(cpl, code):
    return st(cpl).matches(code)


def fill(buf, pattern, length=None):
    length = len(buf) if length is None else length
    data = (pattern * (length // len(pattern) + 1))[:length]
    memoryview(buf)[:length] = data
    return data


# ---- registers and bring-up ----------------------------------------------------------------------
def test_registers_after_reset():
    emu, drv = make(enable=False, mqes=2047, cap_to=15, dstrd=1, mpsmax=65536, nssr=True)
    cap = spec.Cap.decode(emu.transport.read64(spec.REG_CAP))
    assert cap.mqes == 2048 and cap.cqr and cap.to == 7500 and cap.dstrd == 1
    assert cap.nssrs and cap.css == 0x81 and cap.mpsmin == 4096 and cap.mpsmax == 65536
    assert emu.transport.doorbell_stride == 8
    assert str(spec.Version.decode(emu.transport.read32(spec.REG_VS))) == "2.0.0"
    assert emu.transport.read32(spec.REG_CSTS) == 0
    # read-only registers cannot be changed by the host
    emu.transport.write64(spec.REG_CAP, 0)
    emu.transport.write32(spec.REG_VS, 0)
    emu.transport.write32(spec.REG_CSTS, 0xFF)
    assert emu.transport.read64(spec.REG_CAP) == emu.cap
    assert emu.transport.read32(spec.REG_VS) == 0x00020000
    assert emu.transport.read32(spec.REG_CSTS) == 0


def test_enable_disable():
    emu, drv = make(enable=False)
    assert drv.enable()
    assert emu.ready and emu.queue(0) is not None and emu.queue(0, cq=True).size == 16
    qp = drv.create_io_qpair(1, 8)
    assert emu.queue(1) is not None
    assert drv.disable()
    assert not emu.ready and emu.queue(0) is None and emu.queue(1) is None
    # and up again, with the admin queue starting over
    assert drv.enable()
    cpl, _ = drv.identify(spec.Cns.CONTROLLER)
    assert st(cpl).ok and cpl.sqhd == 1 and cpl.sqid == 0
    del qp


def test_ready_only_after_some_csts_reads():
    emu, drv = make(enable=False, ready_delay_reads=5)
    assert drv.enable() is True                  # wait_ready polls CSTS until RDY
    assert emu.counters["csts_reads"] >= 5
    drv.t.write32(spec.REG_CC, 0)
    seen = [drv.csts().rdy for _ in range(6)]
    assert seen[0] is True and seen[-1] is False   # RDY follows CC.EN=0 only after reads too


def test_never_ready():
    emu, drv = make(enable=False, never_ready=True)
    assert drv.enable() is False
    assert not drv.csts().rdy and not drv.csts().cfs


@pytest.mark.parametrize("cc,why", [
    (spec.Cc(en=True, iosqes=6, iocqes=4, mps=5), "MPS"),
    (spec.Cc(en=True, iosqes=7, iocqes=4), "IOSQES"),
    (spec.Cc(en=True, css=1, iosqes=6, iocqes=4), "CSS"),
])
def test_enable_with_bad_configuration_sets_cfs(cc, why):
    emu, drv = make(enable=False)
    assert drv.enable(cc=cc) is False
    assert drv.csts().cfs and why in emu.fatal_reason
    # a reset clears it and a good configuration works
    assert drv.disable() and not drv.csts().cfs
    assert drv.enable()


def test_enable_with_misaligned_admin_queue_sets_cfs():
    emu, drv = make(enable=False)
    buf = drv.dma(8192)
    drv.t.write32(spec.REG_AQA, spec.Aqa(16, 16).encode())
    drv.t.write64(spec.REG_ASQ, buf.iova + 64)
    drv.t.write64(spec.REG_ACQ, buf.iova + 4096)
    drv.t.write32(spec.REG_CC, spec.Cc(en=True, iosqes=6, iocqes=4).encode())
    assert drv.csts().cfs and "ASQ" in emu.fatal_reason


def test_admin_only_command_set_needs_no_io_entry_sizes():
    emu, drv = make(enable=False)
    assert drv.enable(cc=spec.Cc(en=True, css=spec.Cc.CSS_ADMIN_ONLY))


def test_shutdown():
    emu, drv = make(shutdown_delay_reads=3)
    drv.t.write32(spec.REG_CC, spec.Cc(en=True, iosqes=6, iocqes=4, shn=1).encode())
    states = [drv.csts().shst for _ in range(4)]
    assert states[0] == spec.Csts.SHST_OCCURRING and states[-1] == spec.Csts.SHST_COMPLETE
    assert drv.disable() and drv.csts().shst == 0
    assert drv.enable() and emu.unsafe_shutdowns == 0
    # disabling without a shutdown is an unsafe shutdown, counted at the next enable
    assert drv.disable() and drv.enable()
    assert emu.unsafe_shutdowns == 1


def test_subsystem_reset():
    emu, drv = make(nssr=True)
    drv.create_io_qpair(1)
    drv.t.write32(spec.REG_NSSR, 0x1234)              # any other value is ignored
    assert emu.ready
    drv.t.write32(spec.REG_NSSR, spec.NSSR_RESET_VALUE)
    csts = drv.csts()
    assert not csts.rdy and csts.nssro and emu.queue(1) is None
    assert drv.t.read32(spec.REG_CC) == 0 and drv.t.read32(spec.REG_NSSR) == 0
    drv.t.write32(spec.REG_CSTS, spec.CSTS_NSSRO)      # RW1C
    assert not drv.csts().nssro


def test_bar_is_large_enough_for_every_doorbell():
    emu, drv = make(enable=False, max_ioqpairs=2000, dstrd=2)
    assert emu.bar_size >= 0x1000 + 2 * 2001 * 16 and emu.bar_size & (emu.bar_size - 1) == 0


def test_constructor_refuses_nonsense():
    with pytest.raises(InvalidArgument):
        EmulatedController(mqes=0)
    with pytest.raises(InvalidArgument):
        EmulatedController([EmuNamespace(8, nsid=1), EmuNamespace(8, nsid=1)])
    with pytest.raises(InvalidArgument):
        EmulatedController(["not a namespace"])
    with pytest.raises(InvalidArgument):
        EmuNamespace(8, block_size=1000)
    with pytest.raises(InvalidArgument):
        EmuNamespace(0)


# ---- Identify ------------------------------------------------------------------------------------
def test_identify_controller_reflects_options():
    emu, drv = make(mdts=6, sgl=True, dbbuf=True, vwc=False, serial="S123", model="M",
                    firmware="FW9", aerl=7)
    cpl, data = drv.identify(spec.Cns.CONTROLLER)
    c = IdentifyController.parse(data)
    assert st(cpl).ok and c.sn == "S123" and c.mn == "M" and c.fr == "FW9"
    assert c.mdts == 6 and c.max_transfer_bytes() == 256 * 1024
    assert c.dbbuf_supported and c.sgl_supported and c.sgl_bit_bucket
    assert not c.volatile_write_cache and c.aerl == 7 and c.nn == 1
    assert c.sqes == 0x66 and c.cqes == 0x44 and c.version == spec.Version(2, 0, 0)
    assert c.supports_compare and c.supports_dsm and c.supports_write_zeroes
    assert c == emu.identify_data


def test_identify_namespaces():
    namespaces = [EmuNamespace(1000, 512), EmuNamespace(64, 4096, nsid=3)]
    emu, drv = make(namespaces, nn=4)
    cpl, data = drv.identify(spec.Cns.NAMESPACE, 1)
    ns = IdentifyNamespace.parse(data)
    assert st(cpl).ok and ns.nsze == 1000 and ns.block_size == 512 and ns.ncap == 1000
    assert ns.deallocated_reads_zeroes and ns.write_zeroes_deallocates
    cpl, data = drv.identify(spec.Cns.NAMESPACE, 3)
    ns3 = IdentifyNamespace.parse(data)
    assert ns3.block_size == 4096 and ns3.nsze == 64 and ns3.size_bytes == 64 * 4096
    # NSID 2 and 4 are inactive but valid: zero-filled data
    cpl, data = drv.identify(spec.Cns.NAMESPACE, 2)
    assert st(cpl).ok and data == bytes(4096)
    for bad in (0, 5, 0xFFFFFFFF):
        cpl, _ = drv.identify(spec.Cns.NAMESPACE, bad)
        assert is_(cpl, Generic.INVALID_NAMESPACE_OR_FORMAT), bad


def test_active_namespace_list():
    emu, drv = make([EmuNamespace(8, nsid=n) for n in (1, 2, 5, 9)])
    _, data = drv.identify(spec.Cns.ACTIVE_NAMESPACE_LIST, 0)
    assert ActiveNamespaceList.parse(data).nsids == [1, 2, 5, 9]
    _, data = drv.identify(spec.Cns.ACTIVE_NAMESPACE_LIST, 2)
    assert ActiveNamespaceList.parse(data).nsids == [5, 9]
    cpl, _ = drv.identify(spec.Cns.ACTIVE_NAMESPACE_LIST, 0xFFFFFFFE)
    assert is_(cpl, Generic.INVALID_NAMESPACE_OR_FORMAT)


def test_namespace_descriptors_are_stable_and_unique():
    emu, drv = make([EmuNamespace(8), EmuNamespace(8)])
    _, d1 = drv.identify(spec.Cns.NAMESPACE_ID_DESCRIPTORS, 1)
    _, d2 = drv.identify(spec.Cns.NAMESPACE_ID_DESCRIPTORS, 2)
    l1, l2 = NamespaceIdDescriptorList.parse(d1), NamespaceIdDescriptorList.parse(d2)
    assert l1.csi == 0 and len(l1.eui64) == 8 and len(l1.nguid) == 16 and l1.uuid is not None
    assert l1.eui64 != l2.eui64 and l1.nguid != l2.nguid
    _, n1 = drv.identify(spec.Cns.NAMESPACE, 1)
    assert IdentifyNamespace.parse(n1).eui64 == l1.eui64
    emu2, drv2 = make([EmuNamespace(8), EmuNamespace(8)])
    assert NamespaceIdDescriptorList.parse(drv2.identify(3, 1)[1]) == l1
    cpl, _ = drv.identify(spec.Cns.NAMESPACE_ID_DESCRIPTORS, 7)
    assert is_(cpl, Generic.INVALID_NAMESPACE_OR_FORMAT)


def test_identify_unknown_cns():
    emu, drv = make()
    cpl, _ = drv.identify(0x1F)
    assert is_(cpl, Generic.INVALID_FIELD) and st(cpl).dnr


# ---- features ------------------------------------------------------------------------------------
def test_number_of_queues():
    emu, drv = make(max_ioqpairs=8)
    cpl = drv.set_features(FeatureId.NUMBER_OF_QUEUES, 3 << 16 | 1)     # 4 CQs, 2 SQs
    assert st(cpl).ok and cpl.cdw0 == (3 << 16 | 1)
    cpl = drv.set_features(FeatureId.NUMBER_OF_QUEUES, 100 << 16 | 100)   # capped at 8
    assert cpl.cdw0 == (7 << 16 | 7)
    assert drv.get_features(FeatureId.NUMBER_OF_QUEUES).cdw0 == (7 << 16 | 7)
    cpl = drv.set_features(FeatureId.NUMBER_OF_QUEUES, 0xFFFF)
    assert is_(cpl, Generic.INVALID_FIELD)
    drv.set_features(FeatureId.NUMBER_OF_QUEUES, 0)                        # one of each
    assert is_(drv.create_cq(2, 4, drv.dma(4096).iova), CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    drv.create_io_qpair(1)
    cpl = drv.set_features(FeatureId.NUMBER_OF_QUEUES, 0)
    assert is_(cpl, Generic.COMMAND_SEQUENCE_ERROR)


def test_simple_features():
    emu, drv = make()
    for fid, value in ((FeatureId.ARBITRATION, 0x03020103),
                       (FeatureId.INTERRUPT_COALESCING, 0x0A04),
                       (FeatureId.ASYNC_EVENT_CONFIGURATION, 0x1FF),
                       (FeatureId.KEEP_ALIVE_TIMER, 120000),
                       (FeatureId.WRITE_ATOMICITY_NORMAL, 1),
                       (FeatureId.SOFTWARE_PROGRESS_MARKER, 5)):
        assert st(drv.set_features(fid, value)).ok, fid
        assert drv.get_features(fid).cdw0 == value, fid
        assert drv.get_features(fid, sel=1).cdw0 == 0, fid          # default
        assert drv.get_features(fid, sel=2).cdw0 == 0, fid          # saved = default
        assert drv.get_features(fid, sel=3).cdw0 & 0b101 == 0b100   # changeable, not saveable


def test_volatile_write_cache_feature():
    emu, drv = make(vwc=True)
    assert drv.get_features(FeatureId.VOLATILE_WRITE_CACHE).cdw0 == 1
    drv.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0)
    assert drv.get_features(FeatureId.VOLATILE_WRITE_CACHE).cdw0 == 0
    emu, drv = make(vwc=False)
    assert is_(drv.set_features(FeatureId.VOLATILE_WRITE_CACHE, 1), Generic.INVALID_FIELD)


def test_feature_validation():
    emu, drv = make()
    assert is_(drv.set_features(FeatureId.POWER_MANAGEMENT, 1), Generic.INVALID_FIELD)
    assert st(drv.set_features(FeatureId.POWER_MANAGEMENT, 0)).ok
    assert is_(drv.set_features(0x55), Generic.INVALID_FIELD)
    assert is_(drv.get_features(FeatureId.LBA_RANGE_TYPE), Generic.INVALID_FIELD)
    assert is_(drv.set_features(FeatureId.ARBITRATION, 0, cdw10_extra=1 << 31),
               Generic.INVALID_FIELD)                        # SV without ONCS save support
    assert is_(drv.get_features(FeatureId.ARBITRATION, sel=5), Generic.INVALID_FIELD)
    assert is_(drv.set_features(FeatureId.INTERRUPT_VECTOR_CONFIGURATION, 999),
               Generic.INVALID_FIELD)
    assert is_(drv.set_features(FeatureId.ERROR_RECOVERY, 1 << 16), Generic.INVALID_FIELD)
    assert drv.get_features(FeatureId.ERROR_RECOVERY, sel=3).cdw0 & 0b010   # ns specific


def test_temperature_threshold_and_smart_event():
    emu, drv = make()
    assert drv.get_features(FeatureId.TEMPERATURE_THRESHOLD).cdw0 == 343
    drv.set_features(FeatureId.TEMPERATURE_THRESHOLD, 320)
    assert drv.get_features(FeatureId.TEMPERATURE_THRESHOLD).cdw0 == 320
    drv.set_features(FeatureId.TEMPERATURE_THRESHOLD, 1 << 20 | 250)       # under-threshold
    assert drv.get_features(FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 20).cdw0 == 250
    assert is_(drv.set_features(FeatureId.TEMPERATURE_THRESHOLD, 2 << 20), Generic.INVALID_FIELD)
    drv.set_features(FeatureId.ASYNC_EVENT_CONFIGURATION, 0x02)
    aer = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    emu.set_temperature(330)
    cpl = drv.admin_q.wait(aer)
    assert spec.AsyncEvent.decode(cpl.cdw0) == spec.AsyncEvent(1, 1, 2)
    _, raw = drv.get_log_page(LogPageId.SMART_HEALTH, 512)
    smart = SmartLog.parse(raw)
    assert smart.temperature == 330 and smart.critical_warning & SmartLog.WARN_TEMPERATURE


def test_host_identifier_moves_data():
    emu, drv = make()
    buf = drv.dma(4096)
    memoryview(buf)[:16] = bytes(range(16))
    assert st(drv.set_features(FeatureId.HOST_IDENTIFIER, 1, prp1=buf.iova)).ok   # EXHID
    out = drv.dma(4096)
    assert st(drv.get_features(FeatureId.HOST_IDENTIFIER, prp1=out.iova)).ok
    assert bytes(memoryview(out)[:16]) == bytes(range(16))


# ---- log pages -----------------------------------------------------------------------------------
def test_error_log_records_failed_commands(setup):
    emu, drv, qp = setup
    assert is_(qp.run(drv.io_cmd(READ, 1, 40000, 1, drv.dma(512))), Generic.LBA_OUT_OF_RANGE)
    cpl, raw = drv.get_log_page(LogPageId.ERROR_INFORMATION, 64 * 64)
    assert st(cpl).ok
    entries = ErrorInformationLog.parse(raw).valid_entries
    assert len(entries) == 1
    e = entries[0]
    assert (e.error_count, e.sqid, e.lba, e.nsid) == (1, 1, 40000, 1)
    assert e.cmdid == qp.reaped[-1].cid
    assert e.status.matches(Generic.LBA_OUT_OF_RANGE) and e.status.dnr


def test_smart_counts_io(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    for lba in range(0, 16, 8):
        assert st(qp.run(drv.io_cmd(WRITE, 1, lba, 8, buf))).ok
    assert st(qp.run(drv.io_cmd(READ, 1, 0, 8, buf))).ok
    _, raw = drv.get_log_page(LogPageId.SMART_HEALTH, 512)
    s = SmartLog.parse(raw)
    assert s.host_write_commands == 2 and s.host_read_commands == 1
    assert s.data_units_written == 1 and s.data_units_read == 1     # rounded up
    assert s.power_cycles == 1 and s.avail_spare == 100 and s.temperature == 300
    cpl, _ = drv.get_log_page(LogPageId.SMART_HEALTH, 512, nsid=1)
    assert is_(cpl, Generic.INVALID_FIELD)


def test_firmware_slot_log_and_offsets():
    emu, drv = make(firmware="2.1")
    cpl, raw = drv.get_log_page(LogPageId.FIRMWARE_SLOT, 512)
    fw = FirmwareSlotLog.parse(raw)
    assert fw.active_slot == 1 and fw.active_revision == "2.1"
    # NUMD and the offset: 8 bytes from byte 8 are slot 1's revision
    cpl, part = drv.get_log_page(LogPageId.FIRMWARE_SLOT, 8, offset=8)
    assert st(cpl).ok and part == b"2.1     "
    # reading past the end of the log returns zeroes for the missing part
    cpl, tail = drv.get_log_page(LogPageId.FIRMWARE_SLOT, 16, offset=504)
    assert st(cpl).ok and tail == bytes(16)
    assert is_(drv.get_log_page(LogPageId.FIRMWARE_SLOT, 8, offset=6)[0], Generic.INVALID_FIELD)
    assert is_(drv.get_log_page(LogPageId.FIRMWARE_SLOT, 8, offset=512)[0],
               Generic.INVALID_FIELD)
    assert is_(drv.get_log_page(0x42, 512)[0], CommandSpecific.INVALID_LOG_PAGE)


def test_changed_namespace_list():
    emu, drv = make([EmuNamespace(8, nsid=n) for n in (1, 2, 3)])
    assert IdentifyController.parse(drv.identify(1)[1]).oaes & 1 << 8
    aer = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    emu.change_namespaces([3, 1])
    event = spec.AsyncEvent.decode(drv.admin_q.wait(aer).cdw0)
    assert event == spec.AsyncEvent(2, 0, LogPageId.CHANGED_NAMESPACE_LIST)
    cpl, raw = drv.get_log_page(event.log_page, 4096)
    assert st(cpl).ok and ActiveNamespaceList.parse(raw).nsids == [1, 3]
    _, raw = drv.get_log_page(event.log_page, 4096)            # read with RAE clear: emptied
    assert ActiveNamespaceList.parse(raw).nsids == []
    emu.change_namespaces(range(1, 1100))
    _, raw = drv.get_log_page(event.log_page, 4096)
    assert struct.unpack_from("<2I", raw) == (0xFFFFFFFF, 0)


def test_log_page_larger_than_mdts_is_refused():
    emu, drv = make(mdts=1)                      # 8 KiB
    assert is_(drv.get_log_page(LogPageId.ERROR_INFORMATION, 16384)[0], Generic.INVALID_FIELD)


# ---- queue creation and deletion -----------------------------------------------------------------
def test_create_queue_validation():
    emu, drv = make(mqes=63, max_ioqpairs=4)
    base = drv.dma(65536).iova
    cases = [
        (drv.create_cq(0, 16, base), CommandSpecific.INVALID_QUEUE_IDENTIFIER),
        (drv.create_cq(5, 16, base), CommandSpecific.INVALID_QUEUE_IDENTIFIER),
        (drv.create_cq(1, 1, base), CommandSpecific.INVALID_QUEUE_SIZE),
        (drv.create_cq(1, 65, base), CommandSpecific.INVALID_QUEUE_SIZE),
        (drv.create_cq(1, 16, base, pc=False), Generic.INVALID_FIELD),
        (drv.create_cq(1, 16, base + 512), Generic.PRP_OFFSET_INVALID),
        (drv.create_cq(1, 16, 0), Generic.INVALID_FIELD),
        (drv.create_cq(1, 16, base, iv=64), CommandSpecific.INVALID_INTERRUPT_VECTOR),
        (drv.create_sq(1, 16, base, cqid=1), CommandSpecific.COMPLETION_QUEUE_INVALID),
        (drv.create_sq(1, 16, base, cqid=0), CommandSpecific.COMPLETION_QUEUE_INVALID),
    ]
    for cpl, code in cases:
        assert is_(cpl, code) and st(cpl).dnr, (st(cpl), code)
    assert st(drv.create_cq(1, 64, base)).ok
    assert is_(drv.create_cq(1, 16, base + 4096), CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    assert is_(drv.create_sq(0, 16, base, cqid=1), CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    assert is_(drv.create_sq(1, 65, base + 8192, cqid=1), CommandSpecific.INVALID_QUEUE_SIZE)
    assert st(drv.create_sq(1, 64, base + 8192, cqid=1)).ok
    assert is_(drv.create_sq(1, 64, base + 16384, cqid=1),
               CommandSpecific.INVALID_QUEUE_IDENTIFIER)


def test_delete_queue_validation():
    emu, drv = make()
    qp = drv.create_io_qpair(1)
    cq_first = drv.admin(Command(opc=spec.ADM_DELETE_CQ, cdw10=1))
    assert is_(cq_first, CommandSpecific.INVALID_QUEUE_DELETION)
    assert is_(drv.admin(Command(opc=spec.ADM_DELETE_SQ, cdw10=0)),
               CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    assert is_(drv.admin(Command(opc=spec.ADM_DELETE_SQ, cdw10=7)),
               CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    sq, cq = drv.delete_io_qpair(qp)
    assert st(sq).ok and st(cq).ok and emu.queue(1) is None and emu.queue(1, cq=True) is None
    assert is_(drv.admin(Command(opc=spec.ADM_DELETE_CQ, cdw10=1)),
               CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    # the identifiers can be used again
    drv.create_io_qpair(1)


def test_several_sqs_on_one_cq():
    emu, drv = make()
    cq = drv.dma(4096)
    assert st(drv.create_cq(1, 32, cq.iova)).ok
    sq1, sq2 = drv.dma(4096), drv.dma(4096)
    assert st(drv.create_sq(1, 8, sq1.iova, 1)).ok and st(drv.create_sq(2, 8, sq2.iova, 1)).ok
    assert emu.queue(1, cq=True).sqids == {1, 2}
    assert is_(drv.admin(Command(opc=spec.ADM_DELETE_CQ, cdw10=1)),
               CommandSpecific.INVALID_QUEUE_DELETION)


# ---- I/O with PRPs -------------------------------------------------------------------------------
def test_write_read_compare_one_block(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    data = fill(buf, b"userblk!", 512)
    cpl = qp.run(drv.io_cmd(WRITE, 1, 7, 1, buf))
    assert st(cpl).ok and cpl.sqid == 1 and cpl.sqhd == 1
    assert emu.namespace(1).read_blocks(7) == data
    out = drv.dma(4096)
    assert st(qp.run(drv.io_cmd(READ, 1, 7, 1, out))).ok
    assert bytes(memoryview(out)[:512]) == data
    assert st(qp.run(drv.io_cmd(COMPARE, 1, 7, 1, buf))).ok
    memoryview(buf)[0] ^= 0xFF
    cpl = qp.run(drv.io_cmd(COMPARE, 1, 7, 1, buf))
    assert is_(cpl, Media.COMPARE_FAILURE)


@pytest.mark.parametrize("offset,length", [
    (0, 4096),            # PRP1 only
    (512, 3584),          # PRP1 with an offset, to the end of its page
    (0, 8192),            # PRP1 + PRP2 as a data pointer
    (1024, 8192),         # offset: the data ends inside the third page -> PRP list
    (0, 32768),           # PRP list
    (2048, 65536 - 2048),
])
def test_prp_transfers(offset, length):
    emu, drv = make(mdts=5)
    qp = drv.create_io_qpair(1)
    src = drv.dma(offset + length + 4096)
    data = fill(src, bytes(range(251)), offset + length)[offset:]
    nlb = length // 512
    assert st(qp.run(drv.io_cmd(WRITE, 1, 100, nlb, src, offset=offset))).ok
    assert emu.namespace(1).read_blocks(100, nlb) == data
    dst = drv.dma(offset + length + 4096)
    assert st(qp.run(drv.io_cmd(READ, 1, 100, nlb, dst, offset=offset))).ok
    assert bytes(memoryview(dst)[offset:offset + length]) == data
    assert bytes(memoryview(dst)[:offset]) == bytes(offset)          # nothing before
    assert bytes(memoryview(dst)[offset + length:offset + length + 64]) == bytes(64)


def test_prp_list_chained_across_list_pages():
    # 4 MiB at an offset: 1025 data pages, more than one list page holds (512 entries)
    emu, drv = make([EmuNamespace(16384, 512)], mdts=0)
    qp = drv.create_io_qpair(1)
    length = 4 << 20
    src = drv.dma(length + 8192)
    data = fill(src, b"chained PRP lists.", length + 512)[512:]
    prp1, prp2 = drv.prps(src, 512, length)
    cmd = Command(opc=WRITE, nsid=1, cdw12=length // 512 - 1, prp1=prp1, prp2=prp2)
    assert st(qp.run(cmd)).ok
    assert emu.namespace(1).read_blocks(0, length // 512) == data


def test_prp_offset_rules(setup):
    emu, drv, qp = setup
    buf = drv.dma(16384)
    cmd = drv.io_cmd(READ, 1, 0, 1, buf)
    cmd.prp1 += 2                                     # not dword aligned
    assert is_(qp.run(cmd), Generic.PRP_OFFSET_INVALID)
    cmd = drv.io_cmd(READ, 1, 0, 16, buf)             # 8 KiB: PRP2 is a data pointer
    cmd.prp2 += 512
    assert is_(qp.run(cmd), Generic.PRP_OFFSET_INVALID)
    cmd = drv.io_cmd(READ, 1, 0, 24, buf)             # 12 KiB: PRP2 is a list
    lst = drv.dma(4096)
    struct.pack_into("<2Q", memoryview(lst), 0, buf.iova + 4096 + 8, buf.iova + 8192)
    cmd.prp2 = lst.iova
    assert is_(qp.run(cmd), Generic.PRP_OFFSET_INVALID)


def test_mdts_lba_range_namespace_and_opcode_checks():
    emu, drv = make([EmuNamespace(100, 512)], mdts=1, oncs=0)   # 8 KiB, no optional commands
    qp = drv.create_io_qpair(1)
    buf = drv.dma(16384)
    assert is_(qp.run(drv.io_cmd(READ, 1, 0, 17, buf)), Generic.INVALID_FIELD)   # > MDTS
    assert st(qp.run(drv.io_cmd(READ, 1, 0, 16, buf))).ok
    assert is_(qp.run(drv.io_cmd(READ, 1, 99, 2, buf)), Generic.LBA_OUT_OF_RANGE)
    assert is_(qp.run(drv.io_cmd(READ, 1, 1 << 40, 1, buf)), Generic.LBA_OUT_OF_RANGE)
    assert is_(qp.run(drv.io_cmd(READ, 2, 0, 1, buf)), Generic.INVALID_NAMESPACE_OR_FORMAT)
    assert is_(qp.run(drv.io_cmd(READ, 0, 0, 1, buf)), Generic.INVALID_NAMESPACE_OR_FORMAT)
    for opc in (COMPARE, spec.NVM_WRITE_ZEROES, spec.NVM_DATASET_MANAGEMENT, 0x7E):
        assert is_(qp.run(drv.io_cmd(opc, 1, 0, 1, buf)), Generic.INVALID_OPCODE), opc
    fused = drv.io_cmd(READ, 1, 0, 1, buf)
    fused.flags |= 1
    assert is_(qp.run(fused), Generic.INVALID_FIELD)


def test_admin_commands_cannot_use_sgls_and_unknown_opcodes_fail():
    emu, drv = make()
    buf = drv.dma(4096)
    cmd = Command(opc=spec.ADM_IDENTIFY, flags=spec.PSDT_SGL_MPTR_CONTIG, cdw10=1)
    cmd.prp1, cmd.prp2 = data_block(buf, 0, 4096).as_dptr()
    assert is_(drv.admin(cmd), Generic.INVALID_FIELD)
    assert is_(drv.admin(Command(opc=0x3E)), Generic.INVALID_OPCODE)
    assert st(drv.admin(Command(opc=spec.ADM_KEEP_ALIVE))).ok


def test_write_zeroes_dsm_flush_uncorrectable(setup):
    emu, drv, qp = setup
    ns = emu.namespace(1)
    ns.write_blocks(0, b"\xAA" * 512 * 64)
    wz = drv.io_cmd(spec.NVM_WRITE_ZEROES, 1, 4, 4, cdw12=1 << 25)          # with DEAC
    assert st(qp.run(wz)).ok and ns.read_blocks(4, 4) == bytes(2048)
    assert ns.read_blocks(3) == b"\xAA" * 512 and ns.read_blocks(8) == b"\xAA" * 512
    assert emu.counters["write_zeroes.deallocate"] == 1
    ranges = drv.dma(4096)
    struct.pack_into("<IIQIIQ", memoryview(ranges), 0, 0, 2, 20, 0, 3, 30)
    dsm = Command(opc=spec.NVM_DATASET_MANAGEMENT, nsid=1, cdw10=1, cdw11=1 << 2,
                  prp1=ranges.iova)
    assert st(qp.run(dsm)).ok
    assert ns.read_blocks(20, 2) == bytes(1024) and ns.read_blocks(30, 3) == bytes(1536)
    assert ns.read_blocks(22) == b"\xAA" * 512
    struct.pack_into("<IIQ", memoryview(ranges), 0, 0, 2, 32767)
    dsm = Command(opc=spec.NVM_DATASET_MANAGEMENT, nsid=1, cdw10=0, cdw11=1 << 2,
                  prp1=ranges.iova)
    assert is_(qp.run(dsm), Generic.LBA_OUT_OF_RANGE)
    assert st(qp.run(Command(opc=spec.NVM_FLUSH, nsid=1))).ok
    assert st(qp.run(Command(opc=spec.NVM_FLUSH, nsid=0xFFFFFFFF))).ok
    assert is_(qp.run(Command(opc=spec.NVM_FLUSH, nsid=9)), Generic.INVALID_NAMESPACE_OR_FORMAT)
    # Write Uncorrectable: reads fail until the blocks are written again
    assert st(qp.run(drv.io_cmd(spec.NVM_WRITE_UNCORRECTABLE, 1, 50, 2))).ok
    buf = drv.dma(4096)
    assert is_(qp.run(drv.io_cmd(READ, 1, 49, 2, buf)), Media.UNRECOVERED_READ_ERROR)
    assert is_(qp.run(drv.io_cmd(spec.NvmOpcode.VERIFY, 1, 51, 1)), Media.UNRECOVERED_READ_ERROR)
    assert st(qp.run(drv.io_cmd(WRITE, 1, 50, 2, buf))).ok
    assert st(qp.run(drv.io_cmd(READ, 1, 49, 2, buf))).ok
    _, raw = drv.get_log_page(LogPageId.SMART_HEALTH, 512)
    assert SmartLog.parse(raw).media_errors == 2


def test_flush_broadcast_needs_vwc():
    emu, drv = make(vwc=False)
    qp = drv.create_io_qpair(1)
    assert st(qp.run(Command(opc=spec.NVM_FLUSH, nsid=1))).ok
    assert is_(qp.run(Command(opc=spec.NVM_FLUSH, nsid=0xFFFFFFFF)),
               Generic.INVALID_NAMESPACE_OR_FORMAT)


def test_4k_and_sparse_namespaces():
    big = EmuNamespace(1 << 28, 4096)                      # 1 TiB, sparse
    emu, drv = make([EmuNamespace(256, 4096), big])
    assert big.sparse and not emu.namespace(1).sparse
    qp = drv.create_io_qpair(1)
    buf = drv.dma(8192)
    data = fill(buf, b"far away", 8192)
    last = (1 << 28) - 2
    assert st(qp.run(drv.io_cmd(WRITE, 2, last, 2, buf, block_size=4096))).ok
    assert big.allocated_blocks == 2 and big.read_blocks(last, 2) == data
    out = drv.dma(8192)
    assert st(qp.run(drv.io_cmd(READ, 2, last - 1, 2, out, block_size=4096))).ok
    assert bytes(memoryview(out)) == bytes(4096) + data[:4096]
    assert is_(qp.run(drv.io_cmd(READ, 2, last + 1, 2, out, block_size=4096)),
               Generic.LBA_OUT_OF_RANGE)
    wz = drv.io_cmd(spec.NVM_WRITE_ZEROES, 2, last, 2)
    assert st(qp.run(wz)).ok and big.allocated_blocks == 0


# ---- SGLs ----------------------------------------------------------------------------------------
def test_sgl_data_block(setup):
    emu, drv, qp = setup
    buf = drv.dma(8192)
    data = fill(buf, b"sgl data block", 4096)
    assert st(qp.run(drv.io_cmd(WRITE, 1, 0, 8, sgl=data_block(buf, 0, 4096)))).ok
    assert emu.namespace(1).read_blocks(0, 8) == data
    out = drv.dma(8192)
    assert st(qp.run(drv.io_cmd(READ, 1, 0, 8, sgl=data_block(out, 100, 4096)))).ok
    assert bytes(memoryview(out)[100:4196]) == data


def test_sgl_segment_chain_and_bit_bucket(setup):
    emu, drv, qp = setup
    pieces = [drv.dma(4096) for _ in range(5)]
    datas = [fill(p, bytes([i + 1]) * 7, 1024) for i, p in enumerate(pieces)]
    # SGL1 -> Segment [DB, DB, Last Segment] -> [DB, DB, DB]
    last_iova, last_len = drv.sgl_segment([data_block(p, 0, 1024) for p in pieces[2:]])
    seg_iova, seg_len = drv.sgl_segment([
        data_block(pieces[0], 0, 1024), data_block(pieces[1], 0, 1024),
        SglDescriptor(last_iova, last_len, SglType.LAST_SEGMENT)])
    sgl1 = SglDescriptor(seg_iova, seg_len, SglType.SEGMENT)
    assert st(qp.run(drv.io_cmd(WRITE, 1, 10, 10, sgl=sgl1))).ok
    assert emu.namespace(1).read_blocks(10, 10) == b"".join(datas)
    # read 3 KiB back: skip the first 1 KiB into a bit bucket, the rest into one buffer
    out = drv.dma(4096)
    seg = drv.sgl_segment([SglDescriptor(0, 1024, SglType.BIT_BUCKET),
                           data_block(out, 0, 2048)])
    cpl = qp.run(drv.io_cmd(READ, 1, 10, 6, sgl=SglDescriptor(*seg, SglType.LAST_SEGMENT)))
    assert st(cpl).ok and bytes(memoryview(out)[:2048]) == datas[1] + datas[2]


def test_sgl_errors(setup):
    emu, drv, qp = setup
    buf = drv.dma(8192)
    short = drv.io_cmd(READ, 1, 0, 8, sgl=data_block(buf, 0, 2048))
    assert is_(qp.run(short), Generic.DATA_SGL_LENGTH_INVALID)
    long = drv.io_cmd(READ, 1, 0, 1, sgl=data_block(buf, 0, 2048))
    assert is_(qp.run(long), Generic.DATA_SGL_LENGTH_INVALID)
    keyed = drv.io_cmd(READ, 1, 0, 1, sgl=SglDescriptor(buf.iova, 512,
                                                        SglType.KEYED_DATA_BLOCK))
    assert is_(qp.run(keyed), Generic.SGL_DESCRIPTOR_TYPE_INVALID)
    offset_sub = drv.io_cmd(READ, 1, 0, 1, sgl=SglDescriptor(buf.iova, 512, 0, 1))
    assert is_(qp.run(offset_sub), Generic.SGL_OFFSET_INVALID)
    # a segment descriptor that is not the last of its segment
    inner = drv.sgl_segment([data_block(buf, 0, 512)])
    seg = drv.sgl_segment([SglDescriptor(*inner, SglType.LAST_SEGMENT),
                           data_block(buf, 512, 512)])
    cmd = drv.io_cmd(READ, 1, 0, 2, sgl=SglDescriptor(*seg, SglType.SEGMENT))
    assert is_(qp.run(cmd), Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS)
    # a segment descriptor inside the last segment
    seg = drv.sgl_segment([data_block(buf, 0, 512), SglDescriptor(*inner, SglType.SEGMENT)])
    cmd = drv.io_cmd(READ, 1, 0, 1, sgl=SglDescriptor(*seg, SglType.LAST_SEGMENT))
    assert is_(qp.run(cmd), Generic.INVALID_SGL_SEGMENT_DESCRIPTOR)
    # segment length not a multiple of 16
    cmd = drv.io_cmd(READ, 1, 0, 1, sgl=SglDescriptor(inner[0], 20, SglType.LAST_SEGMENT))
    assert is_(qp.run(cmd), Generic.INVALID_SGL_SEGMENT_DESCRIPTOR)
    # a bit bucket in a write
    seg = drv.sgl_segment([SglDescriptor(0, 512, SglType.BIT_BUCKET)])
    cmd = drv.io_cmd(WRITE, 1, 0, 1, sgl=SglDescriptor(*seg, SglType.LAST_SEGMENT))
    assert is_(qp.run(cmd), Generic.SGL_DESCRIPTOR_TYPE_INVALID)
    # a segment chain that loops forever is cut off
    loop = drv.dma(4096)
    struct.pack_into("<QI3xB", memoryview(loop), 0, loop.iova, 16, SglType.SEGMENT << 4)
    cmd = drv.io_cmd(READ, 1, 0, 1, sgl=SglDescriptor(loop.iova, 16, SglType.SEGMENT))
    assert is_(qp.run(cmd), Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS)


def test_sgl_options():
    emu, drv = make(sgl=False)
    qp = drv.create_io_qpair(1)
    buf = drv.dma(4096)
    assert is_(qp.run(drv.io_cmd(READ, 1, 0, 1, sgl=data_block(buf, 0, 512))),
               Generic.INVALID_FIELD)
    emu, drv = make(sgl_dword_aligned=True, sgl_larger_than_data=True)
    qp = drv.create_io_qpair(1)
    buf = drv.dma(8192)
    assert is_(qp.run(drv.io_cmd(READ, 1, 0, 1, sgl=data_block(buf, 2, 512))),
               Generic.SGL_DATA_BLOCK_GRANULARITY_INVALID)
    assert st(qp.run(drv.io_cmd(READ, 1, 0, 1, sgl=data_block(buf, 4, 4096)))).ok


# ---- DMA faults: the IOMMU -----------------------------------------------------------------------
def test_dma_to_unregistered_memory_is_a_data_transfer_error(setup):
    emu, drv, qp = setup
    ns = emu.namespace(1)
    ns.write_blocks(0, b"\x55" * 512)
    wild = emu.regs.address                     # the emulator's BAR: never registered for DMA
    cmd = drv.io_cmd(READ, 1, 0, 1)
    cmd.prp1 = wild
    cpl = qp.run(cmd)
    assert is_(cpl, Generic.DATA_TRANSFER_ERROR) and not st(cpl).dnr
    assert emu.regs.r64(0) == emu.cap             # nothing was written there
    cmd = drv.io_cmd(WRITE, 1, 0, 1)
    cmd.prp1 = 0x1000
    assert is_(qp.run(cmd), Generic.DATA_TRANSFER_ERROR)
    assert ns.read_blocks(0) == b"\x55" * 512     # and nothing was written to the namespace
    # a PRP list in unmapped memory
    buf = drv.dma(16384)
    cmd = drv.io_cmd(READ, 1, 0, 24, buf)
    cmd.prp2 = 0x7000
    assert is_(qp.run(cmd), Generic.DATA_TRANSFER_ERROR)
    assert emu.counters["dma_faults"] == 3 and emu.running


def test_freed_and_unregistered_memory_faults():
    from env.memmap import MemMap
    mm = MemMap("va", "test-iommu")
    emu, drv = make(memmap=mm, enable=False)
    import mmap as _mmap
    import ctypes
    area = _mmap.mmap(-1, 8 << 20)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    start = (base + (2 << 20) - 1) & ~((2 << 20) - 1)
    mm.register(start, 2 << 20)
    assert emu.mem.read(start, 4) == bytes(4)
    mm.unregister(start, 2 << 20)
    from nvme.emu.errors import DmaFault
    with pytest.raises(DmaFault):
        emu.mem.read(start, 4)


def test_unreachable_submission_queue_makes_the_controller_fatal():
    emu, drv = make(strict=False)
    cq = drv.dma(4096)
    assert st(drv.create_cq(1, 16, cq.iova)).ok
    assert st(drv.create_sq(1, 16, 0x10000, 1)).ok        # never registered
    drv.t.regs.w32(spec.REG_DOORBELL_BASE + drv.db_offset(1, False), 1)
    drv.t.doorbell_written(1, False)
    assert drv.csts().cfs and "SQ 1" in emu.fatal_reason


# ---- queue mechanics -----------------------------------------------------------------------------
def test_wrap_around_and_phase_flips():
    emu, drv = make()
    qp = drv.create_io_qpair(1, depth=4, cq_depth=3)
    buf = drv.dma(4096)
    phases, sqhds = [], []
    for i in range(20):
        fill(buf, bytes([i]), 512)
        cpl = qp.run(drv.io_cmd(WRITE, 1, i, 1, buf))
        assert st(cpl).ok
        phases.append(cpl.phase)
        sqhds.append(cpl.sqhd)
    # CQ of 3 entries: the phase tag flips every 3 completions
    assert phases == [1, 1, 1, 0, 0, 0] * 3 + [1, 1]
    # SQ of 4 entries: the head reported goes 1, 2, 3, 0, 1...
    assert sqhds == [(i + 1) % 4 for i in range(20)]
    for i in range(20):
        assert emu.namespace(1).read_blocks(i) == bytes([i]) * 512


def test_batched_submission_fills_the_ring(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    cids = [qp.place(drv.io_cmd(READ, 1, i, 1, buf)) for i in range(15)]   # depth 16: 15 max
    qp.ring_sq()
    got = qp.reap()
    assert [c.cid for c in got] == cids and all(st(c).ok for c in got)
    assert emu.counters["doorbell.mmio.sq"] == 1 + 2      # after Create I/O CQ and SQ


def test_full_completion_queue_holds_completions_back():
    emu, drv = make()
    qp = drv.create_io_qpair(1, depth=16, cq_depth=4)      # the CQ holds 3 at a time
    buf = drv.dma(4096)
    cids = [qp.place(drv.io_cmd(READ, 1, i, 1, buf)) for i in range(10)]
    qp.ring_sq()
    cq = emu.queue(1, cq=True)
    sq = emu.queue(1)
    assert cq.posted == 3 and len(cq.backlog) == 1         # one more executed, waiting
    assert sq.head == 4 and emu.counters["sq_stalled_cq_full"] >= 1   # fetching stopped
    seen = []
    for _ in range(10):
        seen += [c.cid for c in qp.reap()]                 # each reap rings the CQ head
        if len(seen) == 10:
            break
    assert seen == cids                                     # all, in order, none overwritten
    assert emu.counters["cq_full"] >= 1


def test_invalid_doorbell_writes_are_ignored_and_reported():
    emu, drv = make()
    drv.create_io_qpair(1, depth=8)
    aer = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    drv.t.regs.w32(spec.REG_DOORBELL_BASE + drv.db_offset(1, False), 8)      # >= size
    drv.t.doorbell_written(1, False)
    cpl = drv.admin_q.wait(aer)
    assert spec.AsyncEvent.decode(cpl.cdw0) == spec.AsyncEvent(
        0, spec.AsyncEventError.INVALID_DOORBELL_WRITE_VALUE, LogPageId.ERROR_INFORMATION)
    assert emu.queue(1).tail == 0
    drv.get_log_page(LogPageId.ERROR_INFORMATION, 4096)         # unmask error events
    aer = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    drv.t.regs.w32(spec.REG_DOORBELL_BASE + drv.db_offset(5, False), 1)      # no SQ 5
    drv.t.doorbell_written(5, False)
    cpl = drv.admin_q.wait(aer)
    assert spec.AsyncEvent.decode(cpl.cdw0).info == spec.AsyncEventError.WRITE_TO_INVALID_DOORBELL
    assert emu.counters["doorbell.invalid"] == 2


# ---- shadow doorbells ----------------------------------------------------------------------------
def test_doorbell_buffer_config_validation():
    emu, drv = make()
    buf = drv.dma(8192)
    cpl = drv.admin(Command(opc=spec.ADM_DOORBELL_BUFFER_CONFIG, prp1=buf.iova + 8,
                            prp2=buf.iova + 4096))
    assert is_(cpl, Generic.INVALID_FIELD)
    cpl = drv.admin(Command(opc=spec.ADM_DOORBELL_BUFFER_CONFIG, prp1=0x20000000,
                            prp2=buf.iova))
    assert is_(cpl, Generic.DATA_TRANSFER_ERROR)
    emu, drv = make(dbbuf=False)
    assert is_(drv.enable_shadow_doorbells(), Generic.INVALID_OPCODE)
    assert not IdentifyController.parse(drv.identify(1)[1]).dbbuf_supported


def test_shadow_doorbells_save_mmio_writes():
    emu, drv = make()
    assert st(drv.enable_shadow_doorbells()).ok
    qp = drv.create_io_qpair(1, depth=8)
    buf = drv.dma(4096)
    mmio_before = drv.mmio_rings
    for i in range(40):
        fill(buf, bytes([i + 1]), 512)
        assert st(qp.run(drv.io_cmd(WRITE, 1, i, 1, buf))).ok
    for i in range(40):
        assert emu.namespace(1).read_blocks(i) == bytes([i + 1]) * 512
    # every SQ tail update needs an MMIO write (the emulator catches up at once, so EventIdx
    # asks for the next one); CQ head updates go through the shadow only, except on a wrap
    # of the ring (where the 16-bit EventIdx test always says "ring")
    assert 40 <= drv.mmio_rings - mmio_before <= 40 + 40 // 8 + 1
    assert emu.counters["doorbell.shadow.cq"] > 30
    assert emu.counters["doorbell.shadow_mismatch"] == 0
    eventidx_sq = struct.unpack_from("<I", memoryview(drv.eventidx), drv.db_offset(1, False))[0]
    assert eventidx_sq == qp.sq_tail


def test_admin_queue_with_or_without_its_shadow_doorbells():
    emu, drv = make()
    drv.enable_shadow_doorbells()
    qp = drv.create_io_qpair(1)                   # admin doorbells by MMIO only (Linux, SPDK)
    assert struct.unpack_from("<I", memoryview(drv.shadow), 0)[0] == drv.admin_q.sq_tail
    drv.shadow_admin = True                        # now through the shadow too (libvfn)
    for _ in range(40):                            # wraps the 16-entry admin queue
        assert st(drv.identify(spec.Cns.CONTROLLER)[0]).ok
    assert emu.counters["doorbell.shadow_mismatch"] == 0
    del qp


def test_shadow_only_update_is_seen_on_the_next_tick():
    emu, drv = make()
    drv.enable_shadow_doorbells()
    qp = drv.create_io_qpair(1, depth=8)
    buf = drv.dma(4096)
    cid = qp.place(drv.io_cmd(READ, 1, 0, 1, buf))
    # the host updates only the shadow doorbell (no MMIO write)
    struct.pack_into("<I", memoryview(drv.shadow), drv.db_offset(1, False), qp.sq_tail)
    assert qp.reap() == []
    emu.tick()
    assert st(qp.wait(cid)).ok and emu.counters["doorbell.shadow.sq"] == 1


def test_cq_full_with_shadow_doorbells_asks_for_the_head():
    emu, drv = make()
    drv.enable_shadow_doorbells()
    qp = drv.create_io_qpair(1, depth=16, cq_depth=4)
    buf = drv.dma(4096)
    cids = [qp.place(drv.io_cmd(READ, 1, i, 1, buf)) for i in range(10)]
    qp.ring_sq()
    seen = []
    for _ in range(10):
        seen += [c.cid for c in qp.reap()]
        if len(seen) == 10:
            break
    assert seen == cids


# ---- fault injection -----------------------------------------------------------------------------
def test_inject(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    rule = emu.inject(READ, status=(2, 0x81), count=2, dnr=True)
    for _ in range(2):
        cpl = qp.run(drv.io_cmd(READ, 1, 0, 1, buf))
        assert is_(cpl, Media.UNRECOVERED_READ_ERROR) and st(cpl).dnr
    assert st(qp.run(drv.io_cmd(READ, 1, 0, 1, buf))).ok
    assert rule.hits == 2 and not rule.active
    assert st(qp.run(drv.io_cmd(WRITE, 1, 0, 1, buf))).ok        # other opcodes untouched


def test_inject_filters(setup):
    emu, drv, qp = setup
    buf = drv.dma(8192)
    emu.inject(WRITE, lba=100, status=Media.WRITE_FAULT, count=None)
    assert st(qp.run(drv.io_cmd(WRITE, 1, 90, 10, buf))).ok          # 90..99
    assert is_(qp.run(drv.io_cmd(WRITE, 1, 95, 10, buf)), Media.WRITE_FAULT)
    assert is_(qp.run(drv.io_cmd(WRITE, 1, 100, 1, buf)), Media.WRITE_FAULT)
    emu.clear_faults()
    emu.inject(nsid=1, qid=2, status=Generic.INTERNAL_ERROR)
    assert st(qp.run(drv.io_cmd(WRITE, 1, 100, 1, buf))).ok          # queue 1 unaffected
    emu.clear_faults()
    emu.inject(spec.ADM_IDENTIFY, admin=True, status=NvmeStatus(0, 6, crd=1))
    cpl, _ = drv.identify(1)
    assert is_(cpl, Generic.INTERNAL_ERROR) and st(cpl).crd == 1
    assert st(drv.identify(1)[0]).ok
    with pytest.raises(InvalidArgument):
        emu.inject(READ, qid=0)
    with pytest.raises(InvalidArgument):
        emu.inject(READ, status=(0, 0))


def test_hold_release_and_abort(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    emu.namespace(1).write_blocks(3, b"\x33" * 512)
    rule = emu.hold(READ, count=2)
    c1 = qp.submit(drv.io_cmd(READ, 1, 3, 1, buf))
    c2 = qp.submit(drv.io_cmd(READ, 1, 3, 1, buf))
    c3 = qp.submit(drv.io_cmd(READ, 1, 3, 1, buf))
    assert [c.cid for c in qp.reap()] == [c3]
    assert emu.held_commands == [(1, c1, READ), (1, c2, READ)]
    # abort the first: it completes with Command Abort Requested; Abort's CDW0 bit 0 is 0
    abort = drv.admin(Command(opc=spec.ADM_ABORT, cdw10=c1 << 16 | 1))
    assert st(abort).ok and abort.cdw0 & 1 == 0
    cpl = qp.wait(c1)
    assert is_(cpl, Generic.ABORTED_BY_REQUEST)
    # aborting something that is not outstanding: bit 0 set
    assert drv.admin(Command(opc=spec.ADM_ABORT, cdw10=c3 << 16 | 1)).cdw0 & 1 == 1
    assert emu.release(rule) == 1
    cpl = qp.wait(c2)
    assert st(cpl).ok and bytes(memoryview(buf)[:512]) == b"\x33" * 512
    assert emu.held == []


def test_deleting_a_queue_aborts_what_it_holds():
    emu, drv = make()
    qp = drv.create_io_qpair(1)
    buf = drv.dma(4096)
    emu.hold(READ)
    cids = [qp.submit(drv.io_cmd(READ, 1, i, 1, buf)) for i in range(3)]
    sq_del = drv.admin(Command(opc=spec.ADM_DELETE_SQ, cdw10=1))
    assert st(sq_del).ok
    got = qp.reap(ring=False)
    assert [c.cid for c in got] == cids
    assert all(is_(c, Generic.ABORTED_SQ_DELETION) for c in got)
    assert emu.held == []


def test_reset_forgets_held_commands():
    emu, drv = make()
    qp = drv.create_io_qpair(1)
    emu.hold(READ)
    qp.submit(drv.io_cmd(READ, 1, 0, 1, drv.dma(4096)))
    assert len(emu.held) == 1
    assert drv.disable() and emu.held == [] and emu.queue(1) is None
    assert drv.enable() and st(drv.identify(1)[0]).ok


def test_delay_and_tick(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    emu.delay(WRITE, ticks=3, count=1)
    cid = qp.submit(drv.io_cmd(WRITE, 1, 0, 1, buf))
    assert qp.reap() == [] and emu.delayed_commands == [(1, cid, WRITE, 3)]
    assert emu.tick() == 0 and emu.tick() == 0
    assert emu.tick() == 1
    assert st(qp.wait(cid)).ok
    with pytest.raises(InvalidArgument):
        emu.delay(ticks=0)


def test_abort_of_delayed_command(setup):
    emu, drv, qp = setup
    emu.delay(READ, ticks=5)
    cid = qp.submit(drv.io_cmd(READ, 1, 0, 1, drv.dma(4096)))
    assert drv.admin(Command(opc=spec.ADM_ABORT, cdw10=cid << 16 | 1)).cdw0 & 1 == 0
    assert is_(qp.wait(cid), Generic.ABORTED_BY_REQUEST)
    assert emu.tick(5) == 0


def test_asynchronous_events():
    emu, drv = make(aerl=1)                       # two outstanding at most
    a1 = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    a2 = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    a3 = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    assert is_(drv.admin_q.wait(a3), CommandSpecific.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
    assert drv.admin_q.reap() == []
    emu.raise_event(spec.AsyncEventType.NOTICE, spec.AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED,
                    LogPageId.CHANGED_NAMESPACE_LIST)
    cpl = drv.admin_q.wait(a1)
    assert spec.AsyncEvent.decode(cpl.cdw0) == spec.AsyncEvent(2, 0, 4)
    # a second notice waits until the host reads the log page (here: FIRMWARE_SLOT, also a
    # notice page) with RAE clear; a SMART event goes through at once
    emu.raise_event(spec.AsyncEventType.NOTICE, 1, LogPageId.FIRMWARE_SLOT)
    assert drv.admin_q.reap() == []
    emu.raise_event(spec.AsyncEventType.SMART_HEALTH, 2, LogPageId.SMART_HEALTH)
    assert spec.AsyncEvent.decode(drv.admin_q.wait(a2).cdw0).event_type == 1
    a4 = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    drv.get_log_page(LogPageId.FIRMWARE_SLOT, 512, rae=True)
    assert drv.admin_q.reap() == []
    drv.get_log_page(LogPageId.FIRMWARE_SLOT, 512)
    assert spec.AsyncEvent.decode(drv.admin_q.wait(a4).cdw0) == spec.AsyncEvent(2, 1, 3)
    # an abort of an outstanding AER completes it
    a5 = drv.admin_q.submit(Command(opc=spec.ADM_ASYNC_EVENT_REQUEST))
    assert drv.admin(Command(opc=spec.ADM_ABORT, cdw10=a5 << 16 | 0)).cdw0 & 1 == 0
    assert is_(drv.admin_q.wait(a5), Generic.ABORTED_BY_REQUEST)


def test_fatal_stops_processing_until_reset(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    emu.hold(WRITE)
    held = qp.submit(drv.io_cmd(WRITE, 1, 0, 1, buf))
    emu.fatal("test")
    assert drv.csts().cfs and emu.fatal_reason == "test"
    cid = qp.submit(drv.io_cmd(READ, 1, 0, 1, buf))
    assert qp.reap() == [] and emu.counters["doorbell.ignored"] == 1
    assert emu.release() == 0 and emu.tick() == 0 and len(emu.held) == 1
    emu.clear_faults()
    assert drv.disable() and not drv.csts().cfs
    assert drv.enable()
    qp = drv.create_io_qpair(1)
    assert st(qp.run(drv.io_cmd(READ, 1, 0, 1, buf))).ok
    assert emu.held == []                          # the reset forgot the held write
    del cid, held


def test_surprise_removal(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    emu.remove()
    assert drv.t.read32(spec.REG_CSTS) == 0xFFFFFFFF
    assert drv.t.read64(spec.REG_CAP) == 0xFFFFFFFFFFFFFFFF
    assert spec.Csts.decode(drv.t.read32(spec.REG_CSTS)).removed
    qp.submit(drv.io_cmd(READ, 1, 0, 1, buf))
    assert qp.reap() == []
    drv.t.write32(spec.REG_CC, 0)                      # a write does not bring anything back
    assert drv.t.read32(spec.REG_CC) == 0xFFFFFFFF
    assert drv.t.regs.r32(spec.REG_DOORBELL_BASE + drv.db_offset(1, False)) == 0xFFFFFFFF


def test_bogus_completions(setup):
    emu, drv, qp = setup
    emu.post_bogus_completion(1, cid=0xBEEF)
    got = qp.reap()
    assert [c.cid for c in got] == [0xBEEF] and st(got[0]).ok
    # a wrong-phase entry sits at the tail and must not be taken for a completion
    emu.post_bogus_completion(1, cid=0xDEAD, wrong_phase=True, status=Generic.INTERNAL_ERROR)
    assert qp.peek().cid == 0xDEAD and qp.reap() == []
    buf = drv.dma(4096)
    cpl = qp.run(drv.io_cmd(READ, 1, 0, 1, buf))       # overwrites it with the real one
    assert st(cpl).ok and cpl.cid != 0xDEAD
    with pytest.raises(InvalidArgument):
        emu.post_bogus_completion(9, cid=1)


def test_internal_errors_become_cfs_unless_strict(monkeypatch):
    emu, drv = make(strict=False)
    qp = drv.create_io_qpair(1)
    monkeypatch.setitem(emu._nvm_handlers, READ, lambda sq, cmd: 1 / 0)
    qp.submit(drv.io_cmd(READ, 1, 0, 1, drv.dma(4096)))
    assert drv.csts().cfs and isinstance(emu.internal_error, ZeroDivisionError)
    emu, drv = make(strict=True)
    qp = drv.create_io_qpair(1)
    monkeypatch.setitem(emu._nvm_handlers, READ, lambda sq, cmd: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        qp.submit(drv.io_cmd(READ, 1, 0, 1, drv.dma(4096)))


def test_counters_and_log(setup):
    emu, drv, qp = setup
    buf = drv.dma(4096)
    for _ in range(3):
        qp.run(drv.io_cmd(READ, 1, 0, 1, buf))
    assert emu.commands(READ) == 3 and emu.commands(spec.ADM_IDENTIFY, admin=True) == 0
    assert emu.commands(spec.ADM_CREATE_SQ, admin=True) == 1
    assert emu.counters["completions.io"] == 3
    assert emu.command_log[-1][:1] == (1,) and emu.command_log[-1][2] == READ


def test_queue_pairs_on_several_threads():
    import threading
    emu, drv = make([EmuNamespace(8192, 512)])
    qps = [drv.create_io_qpair(q, 8) for q in (1, 2, 3, 4)]
    bufs = [drv.dma(4096) for _ in qps]
    errors = []

    def worker(i):
        try:
            qp, buf = qps[i], bufs[i]
            for n in range(150):
                lba = i * 1000 + n
                memoryview(buf)[:512] = bytes([i + 1, n & 0xFF]) * 256
                assert st(qp.run(drv.io_cmd(WRITE, 1, lba, 1, buf))).ok
                assert st(qp.run(drv.io_cmd(READ, 1, lba, 1, buf))).ok
                assert bytes(memoryview(buf)[:2]) == bytes([i + 1, n & 0xFF])
        except BaseException as e:          # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and emu.running
    assert emu.counters["completions.io"] == 4 * 300


# ---- property: any valid data pointer moves exactly the right bytes ------------------------------
_PROPERTY = {}


def _property_setup():
    if not _PROPERTY:
        emu, drv = make([EmuNamespace(4096, 512)], mdts=5)
        _PROPERTY.update(emu=emu, drv=drv, qp=drv.create_io_qpair(1, 64),
                         src=drv.dma(160 * 1024), dst=drv.dma(160 * 1024))
    return _PROPERTY


@st_.composite
def transfers(draw):
    nlb = draw(st_.integers(1, 256))                  # up to 128 KiB = MDTS
    length = nlb * 512
    offset = draw(st_.integers(0, 4095)) & ~3         # PRP1: dword aligned anywhere in a page
    lba = draw(st_.integers(0, 4096 - nlb))
    cuts = sorted(set(draw(st_.lists(st_.integers(1, length - 1), max_size=6)))) if length > 1 \
        else []
    return lba, nlb, offset, cuts, draw(st_.booleans()), draw(st_.binary(min_size=1,
                                                                          max_size=64))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transfers())
def test_any_data_pointer_moves_the_right_bytes(transfer):
    lba, nlb, offset, cuts, write_with_sgl, pattern = transfer
    p = _property_setup()
    emu, drv, qp, src, dst = p["emu"], p["drv"], p["qp"], p["src"], p["dst"]
    length = nlb * 512
    data = (pattern * (length // len(pattern) + 1))[:length]
    memoryview(src)[offset:offset + length] = data

    def sgl_for(buf):
        bounds = [0] + cuts + [length]
        descs = [data_block(buf, offset + a, b - a) for a, b in zip(bounds, bounds[1:])]
        if len(descs) == 1:
            return descs[0]
        return SglDescriptor(*drv.sgl_segment(descs), SglType.LAST_SEGMENT)

    if write_with_sgl:
        cmd = drv.io_cmd(WRITE, 1, lba, nlb, sgl=sgl_for(src))
    else:
        cmd = drv.io_cmd(WRITE, 1, lba, nlb, src, offset=offset)
    assert st(qp.run(cmd)).ok
    assert emu.namespace(1).read_blocks(lba, nlb) == data
    memoryview(dst)[:] = bytes(len(dst))
    if write_with_sgl:                                # read back with the other kind
        cmd = drv.io_cmd(READ, 1, lba, nlb, dst, offset=offset)
    else:
        cmd = drv.io_cmd(READ, 1, lba, nlb, sgl=sgl_for(dst))
    assert st(qp.run(cmd)).ok
    view = bytes(memoryview(dst))
    assert view[offset:offset + length] == data
    assert view[:offset] == bytes(offset) and view[offset + length:] == bytes(len(dst) - offset
                                                                              - length)
    drv.buffers[6:] = []                              # drop PRP list / segment pages
