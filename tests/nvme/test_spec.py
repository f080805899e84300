"""nvme.spec, nvme.status, nvme.errors: register decoders against hand-computed values, entry
formats, status names, error messages."""
import attrs
import pytest
from hypothesis import given, strategies as st

from env.errors import InvalidArgument, UserblkError
from nvme import errors, spec, status
from nvme.spec import Aqa, Cap, Cc, Command, Completion, Csts, SglDescriptor, Version
from nvme.status import CommandSpecific, Generic, Media, NvmeStatus, Path, status_name


# ---- registers -----------------------------------------------------------------------------------
def test_cap_of_qemu():
    # QEMU's CAP: MQES 7FFh, CQR, TO 0Fh, CSS bits 37, 43, 44 set, MPSMAX 4.
    cap = Cap.decode(0x004018200F0107FF)
    assert cap.mqes == 2048
    assert cap.cqr is True
    assert cap.ams == 0
    assert cap.to == 7500
    assert cap.dstrd == 0 and cap.doorbell_stride == 4
    assert cap.nssrs is False
    # CSS: bit 0 NVM command set, bit 6 one or more I/O command sets, bit 7 admin only
    assert cap.css == 0xC1
    assert cap.css_names == ["NVM", "I/O command sets", "admin only"]
    assert cap.bps is False and cap.cmbs is False and cap.pmrs is False
    assert cap.mpsmin == 4096 and cap.mpsmax == 65536
    assert cap.encode() == 0x004018200F0107FF


def test_cap_every_field():
    value = (0x00FF | 1 << 16 | 1 << 17 | 3 << 24 | 2 << 32 | 1 << 36 | 0x01 << 37 | 1 << 45
             | 1 << 46 | 1 << 48 | 3 << 52 | 1 << 56 | 1 << 57 | 1 << 58 | 2 << 59)
    cap = Cap.decode(value)
    assert (cap.mqes, cap.cqr, cap.ams, cap.to, cap.dstrd, cap.nssrs) == (256, True, 1, 1500, 2,
                                                                           True)
    assert cap.doorbell_stride == 16
    assert (cap.css, cap.bps, cap.cps, cap.mpsmin, cap.mpsmax) == (1, True, 1, 8192, 32768)
    assert (cap.pmrs, cap.cmbs, cap.nsss, cap.crms) == (True, True, True, 2)
    assert cap.encode() == value


@given(st.integers(0, (1 << 64) - 1))
def test_cap_round_trip_of_defined_bits(value):
    defined = value & ~(0x1F << 19) & ~(0x7 << 61)    # reserved: bits 23:19 and 63:61
    defined |= 1                                     # MQES 0 is invalid (Base 3.1.3.1)
    assert Cap.decode(defined).encode() == defined


def test_cap_encode_rejects_nonsense():
    cap = Cap.decode(0x004018200F0107FF)
    for change in ({"mpsmin": 5000}, {"mqes": 1}, {"to": 750}):
        with pytest.raises(InvalidArgument):
            attrs.evolve(cap, **change).encode()


def test_version():
    v = Version.decode(0x00020000)
    assert (v.major, v.minor, v.tertiary) == (2, 0, 0) and str(v) == "2.0.0"
    assert str(Version.decode(0x00010403)) == "1.4.3"
    assert Version.decode(0x00010400) < Version(2, 0)
    assert Version(1, 4, 3).encode() == 0x00010403


def test_cc():
    cc = Cc(en=True, css=0, mps=0, shn=1, iosqes=6, iocqes=4)
    assert cc.encode() == 0x00464001
    assert Cc.decode(0x00460001) == Cc(en=True, iosqes=6, iocqes=4)
    assert Cc.decode(0x00460001 | 2 << 7).page_size == 16384
    assert Cc.decode(7 << 4).css == Cc.CSS_ADMIN_ONLY


def test_csts():
    assert Csts.decode(0x1) == Csts(rdy=True)
    assert Csts.decode(0x9) == Csts(rdy=True, shst=Csts.SHST_COMPLETE)
    assert Csts.decode(0x2).cfs and Csts.decode(0x10).nssro
    gone = Csts.decode(0xFFFFFFFF)
    assert gone.removed and spec.registers_gone(0xFFFFFFFF)
    assert Csts(rdy=True, cfs=True, shst=2).encode() == 0xB


def test_aqa():
    assert Aqa.decode(0x001F001F) == Aqa(32, 32)
    assert Aqa(64, 128).encode() == 0x007F003F
    with pytest.raises(InvalidArgument):
        Aqa(1, 32).encode()
    with pytest.raises(InvalidArgument):
        Aqa(4097, 32).encode()


def test_doorbell_offsets():
    assert spec.doorbell_offset(0, False) == 0x1000
    assert spec.doorbell_offset(0, True) == 0x1004
    assert spec.doorbell_offset(3, True, dstrd=0) == 0x1000 + 7 * 4
    assert spec.doorbell_offset(1, False, dstrd=2) == 0x1000 + 2 * 16


# ---- names ---------------------------------------------------------------------------------------
def test_opcode_names():
    assert spec.opcode_name(0x06, admin=True) == "Identify"
    assert spec.opcode_name(0x7C, admin=True) == "Doorbell Buffer Config"
    assert spec.opcode_name(0x02) == "Read"
    assert spec.opcode_name(0x09) == "Dataset Management"
    assert spec.opcode_name(0xC1, admin=True) == "Vendor Specific 0xc1"
    assert spec.opcode_name(0x81) == "Vendor Specific 0x81"
    assert spec.opcode_name(0x03) == "Unknown I/O opcode 0x03"
    assert spec.opcode_name(0x03, admin=True) == "Unknown admin opcode 0x03"
    # the mirror of spec.pxd keeps its names and values
    assert spec.ADM_IDENTIFY == 0x06 and spec.NVM_WRITE_ZEROES == 0x08
    assert spec.REG_CSTS == 0x1C and spec.CSTS_SHST_COMPLETE == 8
    # data direction is in the opcode's low bits
    assert spec.opcode_transfer(spec.NVM_WRITE) == 1 and spec.opcode_transfer(spec.NVM_READ) == 2


def test_feature_log_cns_names():
    assert spec.feature_name(spec.FeatureId.NUMBER_OF_QUEUES) == "Number of Queues"
    assert spec.feature_name(0xEE) == "Feature 0xee"
    assert spec.log_page_name(2) == "SMART / Health Information"
    assert spec.Cns.ACTIVE_NAMESPACE_LIST == 2 and spec.Cns.NAMESPACE_ID_DESCRIPTORS == 3


# ---- queue entries -----------------------------------------------------------------------------
def test_command_layout():
    cmd = Command(opc=0x02, flags=0x40, cid=0x1234, nsid=1, mptr=0xAA, prp1=0x1000, prp2=0x2000,
                  cdw10=5, cdw11=1, cdw12=7, cdw15=0xFFFFFFFF)
    raw = cmd.pack()
    assert len(raw) == 64
    assert raw[0] == 0x02 and raw[1] == 0x40 and raw[2:4] == b"\x34\x12"
    assert raw[4:8] == b"\x01\0\0\0" and raw[16:24] == (0xAA).to_bytes(8, "little")
    assert raw[24:32] == (0x1000).to_bytes(8, "little")
    assert raw[40:44] == b"\x05\0\0\0" and raw[60:64] == b"\xff" * 4
    assert Command.unpack(raw) == cmd
    assert cmd.psdt == 1 and cmd.fuse == 0
    assert cmd.slba == (1 << 32) | 5 and cmd.nlb == 8
    with pytest.raises(InvalidArgument):
        Command.unpack(raw[:63])


def test_completion_layout():
    cpl = Completion(cdw0=0x10001, sqhd=5, sqid=1, cid=9, status=NvmeStatus(1, 2, dnr=True)
                     .encode(phase=1))
    raw = cpl.pack()
    assert len(raw) == 16 and raw[8:10] == b"\x05\0" and raw[12:14] == b"\x09\0"
    back = Completion.unpack(raw)
    assert back == cpl and back.phase == 1
    assert back.nvme_status == NvmeStatus(1, 2, dnr=True)


def test_sgl_descriptor():
    d = SglDescriptor(0x123456789000, 4096, spec.SglType.SEGMENT)
    raw = d.pack()
    assert len(raw) == 16 and raw[15] == spec.SGL_TYPE_SEGMENT
    assert SglDescriptor.unpack(raw) == d
    prp1, prp2 = d.as_dptr()
    assert Command(prp1=prp1, prp2=prp2).sgl1 == d


def test_async_event_cdw0():
    cdw0 = spec.async_event_cdw0(spec.AsyncEventType.SMART_HEALTH,
                                 spec.AsyncEventSmart.TEMPERATURE_THRESHOLD, 0x02)
    assert cdw0 == 0x00020101
    assert spec.AsyncEvent.decode(cdw0) == spec.AsyncEvent(1, 1, 2)


# ---- status --------------------------------------------------------------------------------------
def test_status_names():
    assert status_name(0, 0x08) == "Command Aborted due to SQ Deletion"
    assert status_name(1, 0x01) == "Invalid Queue Identifier"
    assert status_name(1, 0x02) == "Invalid Queue Size"
    assert status_name(1, 0x03) == "Abort Command Limit Exceeded"
    assert status_name(1, 0x05) == "Asynchronous Event Request Limit Exceeded"
    assert status_name(1, 0x09) == "Invalid Log Page"
    assert status_name(1, 0x0A) == "Invalid Format"
    assert status_name(1, 0x80) == "Conflicting Attributes"
    assert status_name(2, 0x80) == "Write Fault"
    assert status_name(2, 0x81) == "Unrecovered Read Error"
    assert status_name(2, 0x85) == "Compare Failure"
    assert status_name(2, 0x86) == "Access Denied"
    assert status_name(2, 0x87) == "Deallocated or Unwritten Logical Block"
    assert status_name(3, 0x03) == "Asymmetric Access Transition"
    assert status_name(1, 0x7F) == "SCT 1 SC 0x7f (unknown)"
    assert status_name(5, 0x00) == "SCT 5 SC 0x00 (unknown)"
    assert status_name(7, 0x12) == "SCT 7 SC 0x12 (vendor specific)"
    assert status.status_symbol(0, 0x08) == "GENERIC/ABORTED_SQ_DELETION"
    assert status.status_symbol(2, 0x85) == "MEDIA/COMPARE_FAILURE"
    assert status.status_symbol(1, 0x7F) == "SCT1/SC_0x7f"


def test_every_enum_member_has_a_spec_name():
    for sct, enum_cls in ((0, Generic), (1, CommandSpecific), (2, Media), (3, Path)):
        for member in enum_cls:
            assert "unknown" not in status_name(sct, member), member


def test_nvme_status_decode():
    # phase 1, SC 80h, SCT 0, DNR: 1 | 0x80 << 1 | 1 << 15
    st_ = NvmeStatus.decode(0x8101)
    assert (st_.sct, st_.sc, st_.dnr, st_.more, st_.crd) == (0, 0x80, True, False, 0)
    assert st_.name == "LBA Out of Range" and not st_.ok and not st_.retryable
    assert str(st_) == "LBA Out of Range (SCT 0h, SC 80h, DNR)"
    assert NvmeStatus.decode(0x0001).ok and NvmeStatus.decode(0).ok
    full = NvmeStatus.decode(0x7FFE)
    assert (full.sct, full.sc, full.crd, full.more, full.dnr) == (7, 0xFF, 3, True, False)
    assert NvmeStatus.from_cqe_status(0x8101) == st_


@given(st.integers(0, 0xFFFF))
def test_nvme_status_round_trip(raw):
    assert NvmeStatus.decode(raw).encode(phase=raw & 1) == raw


def test_retryable():
    assert NvmeStatus(0, Generic.ABORTED_SQ_DELETION).retryable
    assert NvmeStatus(0, Generic.DATA_TRANSFER_ERROR).retryable
    assert NvmeStatus(0, Generic.NAMESPACE_NOT_READY).retryable
    assert NvmeStatus(3, Path.ASYMMETRIC_ACCESS_TRANSITION).retryable
    assert NvmeStatus(2, Media.UNRECOVERED_READ_ERROR).retryable
    assert not NvmeStatus(2, Media.UNRECOVERED_READ_ERROR, dnr=True).retryable
    assert not NvmeStatus(0, Generic.INVALID_FIELD).retryable
    assert not NvmeStatus(0, Generic.LBA_OUT_OF_RANGE).retryable
    assert not NvmeStatus(2, Media.COMPARE_FAILURE).retryable
    assert not NvmeStatus(1, CommandSpecific.INVALID_QUEUE_IDENTIFIER).retryable
    assert not NvmeStatus().retryable


def test_nvme_status_of_and_validation():
    assert NvmeStatus.of((1, 2)) == NvmeStatus(1, 2)
    assert NvmeStatus.of(Media.COMPARE_FAILURE) == NvmeStatus(2, 0x85)
    assert NvmeStatus.of(CommandSpecific.INVALID_QUEUE_SIZE) == NvmeStatus(1, 2)
    assert NvmeStatus(0, 7).matches(Generic.ABORTED_BY_REQUEST)
    with pytest.raises(InvalidArgument):
        NvmeStatus(8, 0)
    with pytest.raises(InvalidArgument):
        NvmeStatus(0, 256)
    with pytest.raises(InvalidArgument):
        NvmeStatus.of("nope")


# ---- errors --------------------------------------------------------------------------------------
def test_command_error_message_names_everything():
    e = errors.CommandError((0, 0x80), 0x02, qid=1, cid=17, nsid=1, lba=0x1000, nlb=8,
                            controller="nvme0")
    text = str(e)
    for part in ("nvme0", "Read", "02h", "qid 1", "cid 17", "nsid 1", "LBA 0x1000+8",
                 "LBA Out of Range", "SCT 0h", "SC 80h"):
        assert part in text, part
    assert isinstance(e, errors.NvmeError) and isinstance(e, UserblkError)
    assert e.sct == 0 and e.sc == 0x80 and not e.dnr and not e.retryable
    admin = errors.CommandError(NvmeStatus(1, 1, dnr=True), 0x05, qid=0, cid=3)
    assert admin.admin and "Create I/O Completion Queue" in str(admin)
    assert "Invalid Queue Identifier" in str(admin) and "DNR" in str(admin)


def test_command_error_from_completion():
    cpl = Completion(cdw0=1, sqid=2, cid=4, status=NvmeStatus(2, 0x85).encode(1))
    e = errors.CommandError.from_completion(cpl, opcode=0x05, nsid=1, lba=0, nlb=1)
    assert e.qid == 2 and e.cid == 4 and e.cdw0 == 1 and "Compare Failure" in str(e)


def test_other_errors():
    t = errors.CommandTimeout(opcode=0x06, admin=True, timeout=2, qid=0, cid=1)
    assert "Identify" in str(t) and "2 s" in str(t)
    assert str(errors.CommandTimeout("plain")) == "plain"
    nr = errors.ControllerNotReady(True, 7.5, controller="emu0", registers={"CSTS": 0})
    assert isinstance(nr, errors.ControllerError) and "CSTS=0x0" in str(nr) and "7.5" in str(nr)
    assert isinstance(errors.ControllerRemoved(), errors.ControllerDetached)
    assert "full" in str(errors.QueueFull(3, 128))
    assert isinstance(errors.UnsupportedCommand("x"), InvalidArgument)
    r = errors.InvalidRegisterValue("CAP", 0, "MQES is 0")
    assert "CAP = 0x0" in str(r)
