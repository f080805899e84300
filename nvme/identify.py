"""Identify data structures (Base 5.17.2) as attrs classes.

Each field is declared once, with its byte offset and encoding, and that one declaration drives
`parse(data)` (4096 bytes from a controller), `pack()` (the same 4096 bytes, which is how the
emulated controller builds the pages it returns), `to_dict()` (nvme-cli's JSON key names and
value conventions, so a guest test can compare with `nvme id-ctrl -o json` field by field) and
`format_text()` (`nvme id-ctrl`-like `key : value` lines for `userblk identify`).

Field names are nvme-cli's, which are the spec's acronyms in lower case. The layouts are those of
NVMe Base 2.0 (5.17.2: "Identify Controller Data Structure", "Namespace Identification
Descriptor") and NVM Command Set 1.0 ("Identify Namespace Data Structure", CNS 00h). Reserved
areas are not kept; `parse(pack(x)) == x` holds for every instance.

Conventions that follow nvme-cli 2.4 (the version in the testbed guest):
- `sn`, `mn`, `fr` are ASCII, space padded in the data (Base 1.5 "ASCII string"): the
  attributes hold them with the padding stripped; `to_dict()` pads them back to the field width
  as nvme-cli prints them. `subnqn` is NUL terminated and kept as is.
- `ieee` is the OUI as an integer (byte 75 is the most significant), `fguid` a UUID string,
  `nguid`/`eui64` bytes (lower-case hex in `to_dict()`), 128-bit fields plain integers.
- `to_dict()` of IdentifyNamespace always includes npwg..nows (nvme-cli prints them only when
  NSFEAT bit 4 is set): compare on the keys both sides have.
"""
import struct
import uuid as _uuid

import attrs

from env.errors import InvalidArgument
from nvme.errors import DataFormatError
from nvme.spec import (IDENTIFY_DATA_SIZE, NIDT_CSI, NIDT_EUI64, NIDT_LENGTHS, NIDT_NGUID,
                       NIDT_UUID, Structure, Version, as_bytes, c_hex)
from nvme.spec import field_at as _f

SIZE = IDENTIFY_DATA_SIZE


# ---- Identify Controller (CNS 01h) -------------------------------------------------------------
_PSD = struct.Struct("<HxBIIBBBBHBxHB9x")
assert _PSD.size == 32


@attrs.define
class PowerState:
    """Power State Descriptor (Base 5.17.2.1, figure "Power State Descriptor Data Structure").
    Raw fields; `flags` bit 0 is MXPS (max power scale 0.0001 W instead of 0.01 W), bit 1 NOPS
    (non-operational state); `ips`/`apws` keep their scale in bits 7:6."""
    mp: int = 0
    flags: int = 0
    enlat: int = 0
    exlat: int = 0
    rrt: int = 0
    rrl: int = 0
    rwt: int = 0
    rwl: int = 0
    idlp: int = 0
    ips: int = 0
    actp: int = 0
    apws: int = 0

    @classmethod
    def parse(cls, data, offset=0):
        return cls(*_PSD.unpack_from(data, offset))

    def pack(self):
        try:
            return _PSD.pack(self.mp, self.flags, self.enlat, self.exlat, self.rrt, self.rrl,
                             self.rwt, self.rwl, self.idlp, self.ips, self.actp, self.apws)
        except struct.error as e:
            raise InvalidArgument(f"power state descriptor: {e}") from None

    @property
    def max_power_watts(self):
        return self.mp * (0.0001 if self.flags & 1 else 0.01)

    @property
    def non_operational(self):
        return bool(self.flags & 2)

    def to_dict(self):
        return {
            "max_power": self.mp, "flags": self.flags,
            "max_power_scale": self.flags & 1, "non-operational_state": self.flags >> 1 & 1,
            "entry_lat": self.enlat, "exit_lat": self.exlat,
            "read_tput": self.rrt, "read_lat": self.rrl,
            "write_tput": self.rwt, "write_lat": self.rwl,
            "idle_power": self.idlp, "idle_scale": self.ips >> 6 & 3,
            "active_power": self.actp, "active_power_work": self.apws & 7,
            "active_scale": self.apws >> 6 & 3,
        }

    def format_text(self, index):
        watts = (f"{self.mp // 10000}.{self.mp % 10000:04d}W" if self.flags & 1
                 else f"{self.mp // 100}.{self.mp % 100:02d}W")
        state = "non-operational" if self.non_operational else "operational"
        return (f"ps {index:4d} : mp:{watts} {state} enlat:{self.enlat} exlat:{self.exlat} "
                f"rrt:{self.rrt} rrl:{self.rrl} rwt:{self.rwt} rwl:{self.rwl}")


_PSD_OFFSET = 2048
_MAX_POWER_STATES = 32


@attrs.define
class IdentifyController(Structure):
    """Identify Controller data structure (Base 5.17.2.1, CNS 01h)."""
    vid: int = _f(0, "u16", "hex")
    ssvid: int = _f(2, "u16", "hex")
    sn: str = _f(4, "ascii", "str", 20)
    mn: str = _f(24, "ascii", "str", 40)
    fr: str = _f(64, "ascii", "str", 8)
    rab: int = _f(72, "u8")
    ieee: int = _f(73, "ieee")
    cmic: int = _f(76, "u8", "hex")
    mdts: int = _f(77, "u8")
    cntlid: int = _f(78, "u16", "hex")
    ver: int = _f(80, "u32", "hex")
    rtd3r: int = _f(84, "u32", "hex")
    rtd3e: int = _f(88, "u32", "hex")
    oaes: int = _f(92, "u32", "hex")
    ctratt: int = _f(96, "u32", "hex")
    rrls: int = _f(100, "u16", "hex")
    cntrltype: int = _f(111, "u8")
    fguid: str = _f(112, "uuid", "str", 16)
    crdt1: int = _f(128, "u16")
    crdt2: int = _f(130, "u16")
    crdt3: int = _f(132, "u16")
    nvmsr: int = _f(253, "u8")
    vwci: int = _f(254, "u8")
    mec: int = _f(255, "u8")
    oacs: int = _f(256, "u16", "hex")
    acl: int = _f(258, "u8")
    aerl: int = _f(259, "u8")
    frmw: int = _f(260, "u8", "hex")
    lpa: int = _f(261, "u8", "hex")
    elpe: int = _f(262, "u8")
    npss: int = _f(263, "u8")
    avscc: int = _f(264, "u8", "hex")
    apsta: int = _f(265, "u8", "hex")
    wctemp: int = _f(266, "u16")
    cctemp: int = _f(268, "u16")
    mtfa: int = _f(270, "u16")
    hmpre: int = _f(272, "u32")
    hmmin: int = _f(276, "u32")
    tnvmcap: int = _f(280, "u128")
    unvmcap: int = _f(296, "u128")
    rpmbs: int = _f(312, "u32", "hex")
    edstt: int = _f(316, "u16")
    dsto: int = _f(318, "u8")
    fwug: int = _f(319, "u8")
    kas: int = _f(320, "u16")
    hctma: int = _f(322, "u16", "hex")
    mntmt: int = _f(324, "u16")
    mxtmt: int = _f(326, "u16")
    sanicap: int = _f(328, "u32", "hex")
    hmminds: int = _f(332, "u32")
    hmmaxd: int = _f(336, "u16")
    nsetidmax: int = _f(338, "u16")
    endgidmax: int = _f(340, "u16")
    anatt: int = _f(342, "u8")
    anacap: int = _f(343, "u8")
    anagrpmax: int = _f(344, "u32")
    nanagrpid: int = _f(348, "u32")
    pels: int = _f(352, "u32")
    domainid: int = _f(356, "u16")
    megcap: int = _f(368, "u128")
    sqes: int = _f(512, "u8", "hex")
    cqes: int = _f(513, "u8", "hex")
    maxcmd: int = _f(514, "u16")
    nn: int = _f(516, "u32")
    oncs: int = _f(520, "u16", "hex")
    fuses: int = _f(522, "u16", "hex")
    fna: int = _f(524, "u8", "hex")
    vwc: int = _f(525, "u8", "hex")
    awun: int = _f(526, "u16")
    awupf: int = _f(528, "u16")
    icsvscc: int = _f(530, "u8")
    nwpc: int = _f(531, "u8")
    acwu: int = _f(532, "u16")
    ocfs: int = _f(534, "u16", "hex")
    sgls: int = _f(536, "u32", "hex")
    mnan: int = _f(540, "u32")
    maxdna: int = _f(544, "u128")
    maxcna: int = _f(560, "u32")
    subnqn: str = _f(768, "asciiz", "str", 256)
    ioccsz: int = _f(1792, "u32")
    iorcsz: int = _f(1796, "u32")
    icdoff: int = _f(1800, "u16")
    fcatt: int = _f(1802, "u8", "hex")
    msdbd: int = _f(1803, "u8")
    ofcs: int = _f(1804, "u16")
    psds: list = attrs.field(factory=lambda: [PowerState()])
    vs: bytes = attrs.field(default=bytes(1024), repr=False)

    # OACS bits (Identify Controller, "Optional Admin Command Support")
    OACS_SECURITY = 1 << 0
    OACS_FORMAT = 1 << 1
    OACS_FIRMWARE = 1 << 2
    OACS_NS_MANAGEMENT = 1 << 3
    OACS_SELF_TEST = 1 << 4
    OACS_DIRECTIVES = 1 << 5
    OACS_NVME_MI = 1 << 6
    OACS_VIRTUALIZATION = 1 << 7
    OACS_DOORBELL_BUFFER_CONFIG = 1 << 8
    OACS_GET_LBA_STATUS = 1 << 9
    # ONCS bits (Identify Controller, "Optional NVM Command Support")
    ONCS_COMPARE = 1 << 0
    ONCS_WRITE_UNCORRECTABLE = 1 << 1
    ONCS_DSM = 1 << 2
    ONCS_WRITE_ZEROES = 1 << 3
    ONCS_SAVE_FEATURES = 1 << 4
    ONCS_RESERVATIONS = 1 << 5
    ONCS_TIMESTAMP = 1 << 6
    ONCS_VERIFY = 1 << 7
    ONCS_COPY = 1 << 8
    # SGLS bits
    SGLS_SUPPORTED = 0x1          # bits 1:0 = 01b: SGLs supported, no alignment requirement
    SGLS_DWORD_ALIGNED = 0x2      # bits 1:0 = 10b: supported, data blocks dword aligned
    SGLS_KEYED = 1 << 2
    SGLS_BIT_BUCKET = 1 << 16
    SGLS_MPTR_BYTE_ALIGNED = 1 << 17
    SGLS_LENGTH_LARGER_THAN_DATA = 1 << 18
    SGLS_MPTR_SGL = 1 << 19
    SGLS_ADDRESS_OFFSET = 1 << 20
    # LPA bits
    LPA_SMART_PER_NAMESPACE = 1 << 0
    LPA_COMMANDS_EFFECTS = 1 << 1
    LPA_EXTENDED_DATA = 1 << 2

    @classmethod
    def parse(cls, data):
        data = as_bytes(data, SIZE, "Identify Controller data")
        fields = cls._parse_fields(data)
        n = min(fields["npss"] + 1, _MAX_POWER_STATES)
        fields["psds"] = [PowerState.parse(data, _PSD_OFFSET + 32 * i) for i in range(n)]
        fields["vs"] = data[3072:4096]
        return cls(**fields)

    def pack(self):
        buf = bytearray(SIZE)
        self._pack_fields(buf)
        if len(self.psds) > _MAX_POWER_STATES:
            raise InvalidArgument(f"psds: at most {_MAX_POWER_STATES} power states")
        for i, psd in enumerate(self.psds):
            buf[_PSD_OFFSET + 32 * i:_PSD_OFFSET + 32 * (i + 1)] = psd.pack()
        vs = bytes(self.vs)
        if len(vs) > 1024:
            raise InvalidArgument("vs: the vendor specific area is 1024 bytes")
        buf[3072:3072 + len(vs)] = vs
        return bytes(buf)

    def to_dict(self):
        out = self._dict_fields()
        if not self.subnqn:
            del out["subnqn"]          # nvme-cli leaves an empty subnqn out
        out["psds"] = [p.to_dict() for p in self.psds[:self.npss + 1]]
        return out

    def format_text(self):
        lines = ["NVME Identify Controller:"] + self._text_lines()
        lines += [p.format_text(i) for i, p in enumerate(self.psds[:self.npss + 1])]
        return "\n".join(lines) + "\n"

    # ---- derived values --------------------------------------------------------------------
    @property
    def serial(self):
        return self.sn.strip()

    @property
    def model(self):
        return self.mn.strip()

    @property
    def firmware(self):
        return self.fr.strip()

    @property
    def version(self):
        """VER as a Version, or None for controllers older than NVMe 1.2 (which report 0)."""
        return Version.decode(self.ver) if self.ver else None

    def max_transfer_bytes(self, mpsmin=4096):
        """The largest data transfer of one command: 2 ** MDTS units of CAP.MPSMIN (Base figure
        275, "MDTS"). None when MDTS is 0 (no limit)."""
        if not self.mdts:
            return None
        return (1 << self.mdts) * mpsmin

    @property
    def supports_compare(self):
        return bool(self.oncs & self.ONCS_COMPARE)

    @property
    def supports_write_uncorrectable(self):
        return bool(self.oncs & self.ONCS_WRITE_UNCORRECTABLE)

    @property
    def supports_dsm(self):
        return bool(self.oncs & self.ONCS_DSM)

    @property
    def supports_write_zeroes(self):
        return bool(self.oncs & self.ONCS_WRITE_ZEROES)

    @property
    def supports_save_features(self):
        return bool(self.oncs & self.ONCS_SAVE_FEATURES)

    @property
    def supports_timestamp(self):
        return bool(self.oncs & self.ONCS_TIMESTAMP)

    @property
    def supports_verify(self):
        return bool(self.oncs & self.ONCS_VERIFY)

    @property
    def supports_copy(self):
        return bool(self.oncs & self.ONCS_COPY)

    @property
    def volatile_write_cache(self):
        """VWC bit 0: a volatile write cache is present, so Flush matters."""
        return bool(self.vwc & 1)

    supports_flush = volatile_write_cache

    @property
    def flush_broadcast(self):
        """VWC bits 2:1 = 11b: Flush with NSID FFFFFFFFh is supported."""
        return self.vwc >> 1 & 3 == 3

    @property
    def sgl_supported(self):
        return self.sgls & 3 in (1, 2)

    @property
    def sgl_dword_aligned(self):
        """SGL data blocks must be dword aligned (SGLS bits 1:0 = 10b)."""
        return self.sgls & 3 == 2

    @property
    def sgl_bit_bucket(self):
        return bool(self.sgls & self.SGLS_BIT_BUCKET)

    @property
    def dbbuf_supported(self):
        """OACS bit 8: the Doorbell Buffer Config command (shadow doorbells) is supported."""
        return bool(self.oacs & self.OACS_DOORBELL_BUFFER_CONFIG)

    @property
    def sq_entry_size(self):
        """(required, maximum) SQ entry sizes in bytes (SQES bits 3:0 and 7:4)."""
        return 1 << (self.sqes & 0xF), 1 << (self.sqes >> 4)

    @property
    def cq_entry_size(self):
        return 1 << (self.cqes & 0xF), 1 << (self.cqes >> 4)

    @property
    def abort_limit(self):
        """Concurrent Abort commands allowed (ACL is 0's based)."""
        return self.acl + 1

    @property
    def aer_limit(self):
        """Concurrent Asynchronous Event Requests allowed (AERL is 0's based)."""
        return self.aerl + 1

    @property
    def error_log_entries(self):
        return self.elpe + 1

    @property
    def keep_alive_granularity_ms(self):
        return self.kas * 100


# ---- Identify Namespace (CNS 00h) --------------------------------------------------------------
@attrs.define
class LbaFormat:
    """LBA Format Data Structure (NVM 1.0): metadata size in bytes, LBA data size as a power of
    two (LBADS, nvme-cli's "ds"), relative performance (0 best .. 3 degraded)."""
    ms: int = 0
    ds: int = 9
    rp: int = 0

    @classmethod
    def parse(cls, data, offset=0):
        ms, ds, rp = struct.unpack_from("<HBB", data, offset)
        return cls(ms, ds, rp & 3)

    def pack(self):
        if not (0 <= self.ms <= 0xFFFF and 0 <= self.ds <= 0xFF and 0 <= self.rp <= 3):
            raise InvalidArgument(f"LBA format {self!r} does not fit its fields")
        return struct.pack("<HBB", self.ms, self.ds, self.rp)

    @property
    def lbads(self):
        return self.ds

    @property
    def data_size(self):
        """Bytes per logical block (0 for an unused format, LBADS < 9)."""
        return 1 << self.ds if self.ds >= 9 else 0

    def to_dict(self):
        return {"ms": self.ms, "ds": self.ds, "rp": self.rp}


_LBAF_OFFSET = 128
_MAX_LBAF = 64


@attrs.define
class IdentifyNamespace(Structure):
    """Identify Namespace data structure for the NVM command set (NVM 4.1.5.1, CNS 00h).
    `lbafs` holds NLBAF + 1 + NULBAF formats."""
    _text_width = 8

    nsze: int = _f(0, "u64", "hex")
    ncap: int = _f(8, "u64", "hex")
    nuse: int = _f(16, "u64", "hex")
    nsfeat: int = _f(24, "u8", "hex")
    nlbaf: int = _f(25, "u8")
    flbas: int = _f(26, "u8", "hex")
    mc: int = _f(27, "u8", "hex")
    dpc: int = _f(28, "u8", "hex")
    dps: int = _f(29, "u8", "hex")
    nmic: int = _f(30, "u8", "hex")
    rescap: int = _f(31, "u8", "hex")
    fpi: int = _f(32, "u8", "hex")
    dlfeat: int = _f(33, "u8")
    nawun: int = _f(34, "u16")
    nawupf: int = _f(36, "u16")
    nacwu: int = _f(38, "u16")
    nabsn: int = _f(40, "u16")
    nabo: int = _f(42, "u16")
    nabspf: int = _f(44, "u16")
    noiob: int = _f(46, "u16")
    nvmcap: int = _f(48, "u128")
    npwg: int = _f(64, "u16")
    npwa: int = _f(66, "u16")
    npdg: int = _f(68, "u16")
    npda: int = _f(70, "u16")
    nows: int = _f(72, "u16")
    mssrl: int = _f(74, "u16")
    mcl: int = _f(76, "u32")
    msrc: int = _f(80, "u8")
    nulbaf: int = _f(82, "u8")
    anagrpid: int = _f(92, "u32")
    nsattr: int = _f(99, "u8")
    nvmsetid: int = _f(100, "u16")
    endgid: int = _f(102, "u16")
    nguid: bytes = _f(104, "bytes", "hex", 16)
    eui64: bytes = _f(120, "bytes", "hex", 8)
    lbafs: list = attrs.field(factory=lambda: [LbaFormat()])
    vs: bytes = attrs.field(default=bytes(3712), repr=False)

    NSFEAT_THIN_PROVISIONING = 1 << 0
    NSFEAT_ATOMIC_FIELDS = 1 << 1
    NSFEAT_DULBE = 1 << 2          # Deallocated or Unwritten Logical Block Error supported
    NSFEAT_IDS_NOT_REUSED = 1 << 3
    NSFEAT_OPTIMAL_IO_FIELDS = 1 << 4
    FLBAS_EXTENDED_METADATA = 1 << 4
    DLFEAT_READ_ZEROES = 0x1       # bits 2:0 = 001b: deallocated blocks read as all zeroes
    DLFEAT_READ_ONES = 0x2         # 010b: all ones
    DLFEAT_WRITE_ZEROES_DEALLOCATE = 1 << 3

    @classmethod
    def parse(cls, data):
        data = as_bytes(data, SIZE, "Identify Namespace data")
        fields = cls._parse_fields(data)
        n = min(fields["nlbaf"] + 1 + fields["nulbaf"], _MAX_LBAF)
        fields["lbafs"] = [LbaFormat.parse(data, _LBAF_OFFSET + 4 * i) for i in range(n)]
        fields["vs"] = data[384:4096]
        return cls(**fields)

    def pack(self):
        buf = bytearray(SIZE)
        self._pack_fields(buf)
        if len(self.lbafs) > _MAX_LBAF:
            raise InvalidArgument(f"lbafs: at most {_MAX_LBAF} LBA formats")
        for i, lbaf in enumerate(self.lbafs):
            buf[_LBAF_OFFSET + 4 * i:_LBAF_OFFSET + 4 * (i + 1)] = lbaf.pack()
        vs = bytes(self.vs)
        if len(vs) > 3712:
            raise InvalidArgument("vs: the vendor specific area is 3712 bytes")
        buf[384:384 + len(vs)] = vs
        return bytes(buf)

    def to_dict(self):
        out = self._dict_fields()
        out["lbafs"] = [f.to_dict() for f in self.lbafs[:self.nlbaf + 1]]
        return out

    def format_text(self, nsid=None):
        head = "NVME Identify Namespace" + (f" {nsid}" if nsid is not None else "") + ":"
        lines = [head] + self._text_lines()
        in_use = self.lba_format_index
        for i, f in enumerate(self.lbafs):
            mark = " (in use)" if i == in_use else ""
            lines.append(f"lbaf {i:2d} : ms:{f.ms:<3d} lbads:{f.ds:<2d} rp:{c_hex(f.rp)}{mark}")
        return "\n".join(lines) + "\n"

    # ---- derived values --------------------------------------------------------------------
    @property
    def lba_format_index(self):
        """FLBAS bits 3:0, plus bits 6:5 as the high bits when there are more than 16 formats
        (NVM 1.0, Identify Namespace, "FLBAS")."""
        index = self.flbas & 0xF
        if self.nlbaf >= 16:
            index |= (self.flbas >> 5 & 3) << 4
        return index

    @property
    def lba_format(self):
        index = self.lba_format_index
        if index >= len(self.lbafs):
            raise DataFormatError(f"FLBAS selects LBA format {index}, but the namespace lists "
                                  f"{len(self.lbafs)}")
        return self.lbafs[index]

    @property
    def block_size(self):
        return 1 << self.lba_format.ds

    @property
    def metadata_size(self):
        return self.lba_format.ms

    @property
    def extended_lba(self):
        """Metadata is transferred at the end of each block (FLBAS bit 4), not separately."""
        return bool(self.flbas & self.FLBAS_EXTENDED_METADATA)

    @property
    def size_bytes(self):
        return self.nsze * self.block_size

    @property
    def capacity_bytes(self):
        return self.ncap * self.block_size

    @property
    def thin_provisioned(self):
        return bool(self.nsfeat & self.NSFEAT_THIN_PROVISIONING)

    @property
    def deallocated_reads_zeroes(self):
        return self.dlfeat & 7 == self.DLFEAT_READ_ZEROES

    @property
    def write_zeroes_deallocates(self):
        return bool(self.dlfeat & self.DLFEAT_WRITE_ZEROES_DEALLOCATE)

    @property
    def optimal_io_boundary(self):
        """NOIOB in logical blocks (0: none reported)."""
        return self.noiob


# ---- Active Namespace ID list (CNS 02h) --------------------------------------------------------
@attrs.define
class ActiveNamespaceList:
    """Active Namespace ID list (Base 5.17.2.2): up to 1024 NSIDs in increasing order, ended by
    the first zero entry."""
    nsids: list = attrs.field(factory=list)

    MAX = SIZE // 4

    @classmethod
    def parse(cls, data):
        data = as_bytes(data, SIZE, "Active Namespace ID list")
        out = []
        for (nsid,) in struct.iter_unpack("<I", data):
            if nsid == 0:
                break
            out.append(nsid)
        return cls(out)

    def pack(self):
        if len(self.nsids) > self.MAX:
            raise InvalidArgument(f"an NSID list holds at most {self.MAX} entries")
        prev = 0
        for nsid in self.nsids:
            if not isinstance(nsid, int) or not prev < nsid < 0xFFFFFFFE:
                raise InvalidArgument(f"NSIDs must be increasing and in 1..FFFFFFFDh: {nsid!r}")
            prev = nsid
        return struct.pack(f"<{len(self.nsids)}I", *self.nsids).ljust(SIZE, b"\0")

    def to_dict(self):
        return {"nsid_list": [{"nsid": n} for n in self.nsids]}

    def format_text(self):
        return "".join(f"[{i:4d}]:{c_hex(n)}\n" for i, n in enumerate(self.nsids))

    def __iter__(self):
        return iter(self.nsids)

    def __len__(self):
        return len(self.nsids)


# ---- Namespace Identification Descriptor list (CNS 03h) ----------------------------------------
@attrs.define
class NamespaceIdDescriptor:
    """One descriptor: type (NIDT: 1 EUI64, 2 NGUID, 3 UUID, 4 CSI) and its value."""
    nidt: int
    nid: bytes

    def pack(self):
        nid = bytes(self.nid)
        want = NIDT_LENGTHS.get(self.nidt)
        if want is not None and len(nid) != want:
            raise InvalidArgument(f"NIDT {self.nidt} needs a {want}-byte NID, got {len(nid)}")
        if not 1 <= self.nidt <= 0xFF or not 0 < len(nid) <= 0xFF:
            raise InvalidArgument(f"descriptor {self!r} does not fit its header")
        return struct.pack("<BBH", self.nidt, len(nid), 0) + nid


@attrs.define
class NamespaceIdDescriptorList:
    """Namespace Identification Descriptor list (Base 5.17.2.3, CNS 03h)."""
    descriptors: list = attrs.field(factory=list)

    @classmethod
    def parse(cls, data):
        data = as_bytes(data, SIZE, "Namespace Identification Descriptor list")
        out, pos = [], 0
        while pos + 4 <= SIZE:
            nidt, nidl = data[pos], data[pos + 1]
            if nidt == 0:
                break
            want = NIDT_LENGTHS.get(nidt)
            if (want is not None and nidl != want) or nidl == 0:
                raise DataFormatError(f"namespace identification descriptor at byte {pos}: type "
                                      f"{nidt} with length {nidl} (expected {want})")
            if pos + 4 + nidl > SIZE:
                raise DataFormatError(f"namespace identification descriptor at byte {pos} runs "
                                      "past the end of the 4096-byte list")
            out.append(NamespaceIdDescriptor(nidt, data[pos + 4:pos + 4 + nidl]))
            pos += 4 + nidl
        return cls(out)

    @classmethod
    def build(cls, *, eui64=None, nguid=None, uuid=None, csi=None):
        """The list for these identifiers (those that are None or all zero are left out)."""
        out = []
        for nidt, value in ((NIDT_EUI64, eui64), (NIDT_NGUID, nguid)):
            if value is not None and any(bytes(value)):
                out.append(NamespaceIdDescriptor(nidt, bytes(value)))
        if uuid is not None:
            out.append(NamespaceIdDescriptor(NIDT_UUID, _uuid.UUID(str(uuid)).bytes))
        if csi is not None:
            out.append(NamespaceIdDescriptor(NIDT_CSI, bytes([csi])))
        return cls(out)

    def pack(self):
        raw = b"".join(d.pack() for d in self.descriptors)
        if len(raw) > SIZE:
            raise InvalidArgument("the descriptors do not fit in 4096 bytes")
        return raw.ljust(SIZE, b"\0")

    def _find(self, nidt):
        for d in self.descriptors:
            if d.nidt == nidt:
                return d.nid
        return None

    @property
    def eui64(self):
        return self._find(NIDT_EUI64)

    @property
    def nguid(self):
        return self._find(NIDT_NGUID)

    @property
    def uuid(self):
        raw = self._find(NIDT_UUID)
        return _uuid.UUID(bytes=raw) if raw is not None else None

    @property
    def csi(self):
        raw = self._find(NIDT_CSI)
        return raw[0] if raw is not None else None

    def to_dict(self):
        out = {}
        if self.eui64 is not None:
            out["eui64"] = self.eui64.hex()
        if self.nguid is not None:
            out["nguid"] = self.nguid.hex()
        if self.uuid is not None:
            out["uuid"] = str(self.uuid)
        if self.csi is not None:
            out["csi"] = self.csi
        return out

    def format_text(self):
        return "".join(f"{k:<8}: {v}\n" for k, v in self.to_dict().items())


# ---- function forms ------------------------------------------------------------------------------
def parse_active_ns_list(data):
    """The NSIDs of an Active Namespace ID list (CNS 02h), as a list of ints."""
    return ActiveNamespaceList.parse(data).nsids


def parse_ns_descriptors(data):
    """A Namespace Identification Descriptor list (CNS 03h)."""
    return NamespaceIdDescriptorList.parse(data)
