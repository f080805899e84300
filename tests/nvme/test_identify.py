"""nvme.identify: offsets checked against hand-built pages, parse(pack(x)) == x, derived values,
nvme-cli-compatible dict and text output, bad input."""
import struct
import uuid

import attrs
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from env.errors import InvalidArgument
from nvme.errors import DataFormatError
from nvme.identify import (ActiveNamespaceList, IdentifyController, IdentifyNamespace, LbaFormat,
                           NamespaceIdDescriptor, NamespaceIdDescriptorList, PowerState,
                           parse_active_ns_list, parse_ns_descriptors)
from nvme.spec import Version


def put(buf, offset, fmt, *values):
    struct.pack_into("<" + fmt, buf, offset, *values)


def qemu_like_controller_page():
    """An Identify Controller page written byte by byte from the Base 2.0 figure, independent
    of the field table under test."""
    buf = bytearray(4096)
    put(buf, 0, "HH", 0x1B36, 0x1AF4)                   # VID, SSVID
    buf[4:24] = b"deadbeef".ljust(20)                    # SN
    buf[24:64] = b"QEMU NVMe Ctrl".ljust(40)              # MN
    buf[64:72] = b"8.2.0".ljust(8)                        # FR
    buf[72] = 6                                           # RAB
    buf[73:76] = bytes([0x00, 0x54, 0x52])                # IEEE OUI 525400h, LSB first
    buf[76] = 0                                           # CMIC
    buf[77] = 7                                           # MDTS
    put(buf, 78, "H", 0)                                  # CNTLID
    put(buf, 80, "I", 0x00010400)                         # VER 1.4.0
    put(buf, 92, "I", 0x100)                              # OAES
    put(buf, 96, "I", 0x8000)                             # CTRATT
    buf[111] = 1                                          # CNTRLTYPE: I/O controller
    put(buf, 256, "H", 0x12A)                             # OACS (incl. bit 8 DBBUF)
    buf[258], buf[259], buf[260], buf[261], buf[262], buf[263] = 3, 3, 3, 0x07, 0x3F, 0
    put(buf, 266, "HH", 343, 373)                         # WCTEMP, CCTEMP
    put(buf, 280, "QQ", 0x12345, 1)                       # TNVMCAP (128-bit)
    put(buf, 320, "H", 0)
    buf[512], buf[513] = 0x66, 0x44                       # SQES, CQES
    put(buf, 514, "H", 0)
    put(buf, 516, "I", 256)                               # NN
    put(buf, 520, "H", 0x15D)                             # ONCS
    buf[525] = 0x07                                       # VWC present, flush broadcast
    put(buf, 536, "I", 0x00000001)                        # SGLS
    buf[768:768 + 22] = b"nqn.2019-08.org.qemu:x"         # SUBNQN, NUL terminated
    put(buf, 2048, "HxBII", 2500, 0, 16, 4)              # PSD0: MP 25.00 W, ENLAT, EXLAT
    return bytes(buf)


def test_controller_offsets():
    c = IdentifyController.parse(qemu_like_controller_page())
    assert (c.vid, c.ssvid, c.sn, c.mn, c.fr) == (0x1B36, 0x1AF4, "deadbeef", "QEMU NVMe Ctrl",
                                                  "8.2.0")
    assert (c.rab, c.ieee, c.mdts, c.ver, c.oaes, c.ctratt, c.cntrltype) == (
        6, 0x525400, 7, 0x00010400, 0x100, 0x8000, 1)
    assert (c.oacs, c.acl, c.aerl, c.frmw, c.lpa, c.elpe, c.npss) == (0x12A, 3, 3, 3, 7, 63, 0)
    assert (c.wctemp, c.cctemp) == (343, 373)
    assert c.tnvmcap == 0x12345 | 1 << 64
    assert (c.sqes, c.cqes, c.nn, c.oncs, c.vwc, c.sgls) == (0x66, 0x44, 256, 0x15D, 7, 1)
    assert c.subnqn == "nqn.2019-08.org.qemu:x"
    assert c.psds == [PowerState(mp=2500, enlat=16, exlat=4)]
    # derived
    assert c.version == Version(1, 4, 0)
    assert c.max_transfer_bytes() == 512 * 1024 and c.max_transfer_bytes(8192) == 1 << 20
    assert c.supports_compare and c.supports_dsm and c.supports_write_zeroes
    assert not c.supports_write_uncorrectable and c.supports_timestamp
    assert c.volatile_write_cache and c.supports_flush and c.flush_broadcast
    assert c.sgl_supported and not c.sgl_dword_aligned and not c.sgl_bit_bucket
    assert c.dbbuf_supported
    assert c.sq_entry_size == (64, 64) and c.cq_entry_size == (16, 16)
    assert c.abort_limit == 4 and c.aer_limit == 4 and c.error_log_entries == 64
    assert c.psds[0].max_power_watts == 25.0


def test_controller_repack_is_byte_exact_for_spec_conformant_data():
    page = qemu_like_controller_page()
    assert IdentifyController.parse(page).pack() == page


def test_controller_to_dict_uses_nvme_cli_keys_and_conventions():
    d = IdentifyController.parse(qemu_like_controller_page()).to_dict()
    assert d["vid"] == 0x1B36 and d["ieee"] == 0x525400
    assert d["sn"] == "deadbeef".ljust(20) and d["mn"] == "QEMU NVMe Ctrl".ljust(40)
    assert d["fr"] == "8.2.0   "
    assert d["tnvmcap"] == 0x12345 | 1 << 64
    assert d["fguid"] == "00000000-0000-0000-0000-000000000000"
    assert d["subnqn"] == "nqn.2019-08.org.qemu:x"
    assert d["psds"][0]["max_power"] == 2500 and d["psds"][0]["entry_lat"] == 16
    for key in ("vid", "ssvid", "sn", "mn", "fr", "rab", "ieee", "cmic", "mdts", "cntlid", "ver",
                "rtd3r", "rtd3e", "oaes", "ctratt", "rrls", "cntrltype", "fguid", "crdt1",
                "crdt2", "crdt3", "nvmsr", "vwci", "mec", "oacs", "acl", "aerl", "frmw", "lpa",
                "elpe", "npss", "avscc", "apsta", "wctemp", "cctemp", "mtfa", "hmpre", "hmmin",
                "tnvmcap", "unvmcap", "rpmbs", "edstt", "dsto", "fwug", "kas", "hctma", "mntmt",
                "mxtmt", "sanicap", "hmminds", "hmmaxd", "nsetidmax", "endgidmax", "anatt",
                "anacap", "anagrpmax", "nanagrpid", "pels", "domainid", "megcap", "sqes", "cqes",
                "maxcmd", "nn", "oncs", "fuses", "fna", "vwc", "awun", "awupf", "icsvscc",
                "nwpc", "acwu", "ocfs", "sgls", "mnan", "maxdna", "maxcna", "subnqn", "ioccsz",
                "iorcsz", "icdoff", "fcatt", "msdbd", "ofcs", "psds"):
        assert key in d, key
    assert "subnqn" not in IdentifyController().to_dict()


def test_controller_text_looks_like_nvme_cli():
    text = IdentifyController.parse(qemu_like_controller_page()).format_text()
    lines = text.splitlines()
    assert lines[0] == "NVME Identify Controller:"
    assert "vid       : 0x1b36" in lines
    assert "ssvid     : 0x1af4" in lines
    assert "ieee      : 525400" in lines
    assert "mdts      : 7" in lines
    assert "cntlid    : 0" in lines            # C's %#x prints 0 without 0x
    assert "oacs      : 0x12a" in lines
    assert "sqes      : 0x66" in lines
    assert "nn        : 256" in lines
    assert any(line.startswith("ps    0 : mp:25.00W operational enlat:16 exlat:4")
               for line in lines)


def qemu_like_namespace_page():
    buf = bytearray(4096)
    put(buf, 0, "QQQ", 0x40000, 0x40000, 0x1000)          # NSZE, NCAP, NUSE
    buf[24], buf[25], buf[26], buf[27] = 0x14, 7, 4, 0     # NSFEAT, NLBAF, FLBAS, MC
    buf[33] = 0x09                                         # DLFEAT
    put(buf, 46, "H", 64)                                  # NOIOB
    put(buf, 48, "QQ", 1 << 30, 0)                         # NVMCAP
    put(buf, 64, "HHHHH", 7, 0, 7, 0, 7)                   # NPWG NPWA NPDG NPDA NOWS
    put(buf, 74, "HI", 128, 128)                           # MSSRL, MCL
    buf[80] = 127                                          # MSRC
    buf[82] = 0                                            # NULBAF
    put(buf, 92, "I", 1)                                   # ANAGRPID
    put(buf, 100, "HH", 0, 1)                              # NVMSETID, ENDGID
    buf[104:120] = bytes(range(16))                        # NGUID
    buf[120:128] = bytes(range(8, 16))                     # EUI64
    for i, (ms, ds) in enumerate([(0, 9), (8, 9), (16, 9), (64, 9), (0, 12), (8, 12),
                                  (16, 12), (64, 12)]):
        put(buf, 128 + 4 * i, "HBB", ms, ds, 0)
    return bytes(buf)


def test_namespace_offsets_and_derived_values():
    ns = IdentifyNamespace.parse(qemu_like_namespace_page())
    assert (ns.nsze, ns.ncap, ns.nuse, ns.nsfeat, ns.nlbaf, ns.flbas) == (
        0x40000, 0x40000, 0x1000, 0x14, 7, 4)
    assert ns.dlfeat == 9 and ns.noiob == 64 and ns.nvmcap == 1 << 30
    assert (ns.npwg, ns.npdg, ns.nows, ns.mssrl, ns.mcl, ns.msrc) == (7, 7, 7, 128, 128, 127)
    assert ns.anagrpid == 1 and ns.endgid == 1
    assert ns.nguid == bytes(range(16)) and ns.eui64 == bytes(range(8, 16))
    assert len(ns.lbafs) == 8 and ns.lbafs[4] == LbaFormat(0, 12, 0)
    assert ns.lba_format_index == 4 and ns.block_size == 4096 and ns.metadata_size == 0
    assert ns.size_bytes == 0x40000 * 4096 and not ns.extended_lba
    assert ns.deallocated_reads_zeroes and ns.write_zeroes_deallocates
    assert not ns.thin_provisioned and ns.optimal_io_boundary == 64
    assert ns.pack() == qemu_like_namespace_page()


def test_namespace_dict_and_text():
    ns = IdentifyNamespace.parse(qemu_like_namespace_page())
    d = ns.to_dict()
    assert d["nsze"] == 0x40000 and d["flbas"] == 4 and d["nvmcap"] == 1 << 30
    assert d["eui64"] == "08090a0b0c0d0e0f" and d["nguid"] == bytes(range(16)).hex()
    assert d["lbafs"][4] == {"ms": 0, "ds": 12, "rp": 0} and len(d["lbafs"]) == 8
    text = ns.format_text(nsid=1)
    assert text.startswith("NVME Identify Namespace 1:\n")
    assert "nsze    : 0x40000" in text and "nsfeat  : 0x14" in text
    assert "anagrpid: 1" in text and "eui64   : 08090a0b0c0d0e0f" in text
    assert "lbaf  4 : ms:0   lbads:12 rp:0 (in use)" in text


def test_flbas_high_bits_select_formats_above_15():
    lbafs = [LbaFormat(0, 9)] * 17 + [LbaFormat(0, 12)]
    ns = IdentifyNamespace(nlbaf=17, flbas=0x01 | 1 << 5, lbafs=lbafs)     # index 0x11
    assert ns.lba_format_index == 17 and ns.block_size == 4096
    bad = IdentifyNamespace(nlbaf=0, flbas=3)
    with pytest.raises(DataFormatError):
        bad.block_size


def test_active_namespace_list():
    raw = struct.pack("<4I", 1, 2, 7, 0) + struct.pack("<I", 9) + bytes(4076)
    assert parse_active_ns_list(raw) == [1, 2, 7]
    lst = ActiveNamespaceList([1, 5, 0xFFFFFFFD])
    assert ActiveNamespaceList.parse(lst.pack()) == lst and len(lst) == 3
    for bad in ([2, 1], [0], [0xFFFFFFFF], list(range(1, 1026))):
        with pytest.raises(InvalidArgument):
            ActiveNamespaceList(bad).pack()


def test_namespace_descriptors():
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    lst = NamespaceIdDescriptorList.build(eui64=bytes(range(1, 9)), nguid=bytes(range(16)),
                                          uuid=u, csi=0)
    raw = lst.pack()
    # EUI64 first: NIDT 1, NIDL 8, two reserved bytes, then the NID
    assert raw[:4] == b"\x01\x08\0\0" and raw[4:12] == bytes(range(1, 9))
    assert raw[12:16] == b"\x02\x10\0\0"
    back = parse_ns_descriptors(raw)
    assert back == lst
    assert back.eui64 == bytes(range(1, 9)) and back.nguid == bytes(range(16))
    assert back.uuid == u and back.csi == 0
    assert back.to_dict() == {"eui64": "0102030405060708", "nguid": bytes(range(16)).hex(),
                              "uuid": str(u), "csi": 0}
    # all-zero identifiers are not reported
    assert NamespaceIdDescriptorList.build(eui64=bytes(8), csi=0).descriptors == [
        NamespaceIdDescriptor(4, b"\0")]


def test_malformed_descriptors_raise():
    with pytest.raises(DataFormatError):
        NamespaceIdDescriptorList.parse(b"\x01\x07\0\0" + bytes(4092))   # EUI64 of 7 bytes
    with pytest.raises(DataFormatError):
        chain = (b"\x09\xff\0\0" + bytes(255)) * 16                    # the 16th runs past 4096
        NamespaceIdDescriptorList.parse(chain[:4096])
    unknown = NamespaceIdDescriptorList.parse(b"\x09\x02\0\0ab" + bytes(4090))
    assert unknown.descriptors == [NamespaceIdDescriptor(9, b"ab")]
    with pytest.raises(InvalidArgument):
        NamespaceIdDescriptor(1, b"short").pack()


@pytest.mark.parametrize("cls", [IdentifyController, IdentifyNamespace, ActiveNamespaceList,
                                 NamespaceIdDescriptorList])
def test_short_or_wrong_input_is_refused(cls):
    with pytest.raises(InvalidArgument, match="4096 bytes needed"):
        cls.parse(bytes(4095))
    with pytest.raises(InvalidArgument, match="bytes-like"):
        cls.parse("not bytes")
    # longer buffers (a DMA buffer of 8 KiB) are fine: the first 4096 bytes count
    cls.parse(bytearray(8192))


def test_pack_refuses_values_that_do_not_fit():
    with pytest.raises(InvalidArgument):
        IdentifyController(vid=0x10000).pack()
    with pytest.raises(InvalidArgument):
        IdentifyController(sn="x" * 21).pack()
    with pytest.raises(InvalidArgument):
        IdentifyController(mn="ünïcode").pack()
    with pytest.raises(InvalidArgument):
        IdentifyNamespace(eui64=b"123").pack()
    with pytest.raises(InvalidArgument):
        IdentifyNamespace(lbafs=[LbaFormat(rp=4)]).pack()


# ---- round trips with hypothesis --------------------------------------------------------------
def ints(bits):
    return st.integers(0, (1 << bits) - 1)


ascii_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


def padded(maxlen):
    # spec ASCII fields are space padded: trailing spaces cannot round trip, inner ones can
    return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=maxlen).map(
        str.rstrip)


power_states = st.builds(PowerState, mp=ints(16), flags=ints(8), enlat=ints(32), exlat=ints(32),
                         rrt=ints(8), rrl=ints(8), rwt=ints(8), rwl=ints(8), idlp=ints(16),
                         ips=ints(8), actp=ints(16), apws=ints(8))


@st.composite
def controllers(draw):
    npss = draw(st.integers(0, 31))
    fields = {}
    for f in attrs.fields(IdentifyController):
        meta = f.metadata.get("at")
        if meta is None:
            continue
        offset, kind, size, _ = meta
        if kind == "ascii":
            fields[f.name] = draw(padded(size))
        elif kind == "asciiz":
            fields[f.name] = draw(ascii_text)
        elif kind == "uuid":
            fields[f.name] = str(uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16))))
        else:
            fields[f.name] = draw(ints(8 * size))
    fields["npss"] = npss
    fields["psds"] = draw(st.lists(power_states, min_size=npss + 1, max_size=npss + 1))
    fields["vs"] = draw(st.binary(min_size=1024, max_size=1024))
    return IdentifyController(**fields)


@st.composite
def namespaces(draw):
    nlbaf = draw(st.integers(0, 40))
    nulbaf = draw(st.integers(0, 63 - nlbaf))
    fields = {}
    for f in attrs.fields(IdentifyNamespace):
        meta = f.metadata.get("at")
        if meta is None:
            continue
        offset, kind, size, _ = meta
        if kind == "bytes":
            fields[f.name] = draw(st.binary(min_size=size, max_size=size))
        else:
            fields[f.name] = draw(ints(8 * size))
    fields.update(nlbaf=nlbaf, nulbaf=nulbaf)
    fields["lbafs"] = draw(st.lists(st.builds(LbaFormat, ms=ints(16), ds=ints(8), rp=ints(2)),
                                    min_size=nlbaf + 1 + nulbaf, max_size=nlbaf + 1 + nulbaf))
    return IdentifyNamespace(**fields)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(controllers())
def test_controller_round_trip(ctrl):
    raw = ctrl.pack()
    assert len(raw) == 4096
    assert IdentifyController.parse(raw) == ctrl


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(namespaces())
def test_namespace_round_trip(ns):
    raw = ns.pack()
    assert len(raw) == 4096
    assert IdentifyNamespace.parse(raw) == ns


@given(st.lists(st.integers(1, 0xFFFFFFFD), max_size=1024, unique=True).map(sorted))
def test_active_list_round_trip(nsids):
    assert ActiveNamespaceList.parse(ActiveNamespaceList(nsids).pack()).nsids == nsids


@given(st.lists(st.one_of(
    st.builds(NamespaceIdDescriptor, st.just(1), st.binary(min_size=8, max_size=8)),
    st.builds(NamespaceIdDescriptor, st.sampled_from([2, 3]), st.binary(min_size=16,
                                                                        max_size=16)),
    st.builds(NamespaceIdDescriptor, st.just(4), st.binary(min_size=1, max_size=1)),
    st.builds(NamespaceIdDescriptor, st.integers(5, 255), st.binary(min_size=1, max_size=40)),
), max_size=20))
def test_descriptor_list_round_trip(descriptors):
    lst = NamespaceIdDescriptorList(descriptors)
    assert NamespaceIdDescriptorList.parse(lst.pack()) == lst
