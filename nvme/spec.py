"""NVMe numbers and wire formats for Python code: the mirror of `nvme/spec.pxd`, plus decoders.

The Cython hot path uses the C structs and enums of `spec.pxd`; everything that runs at Python
level (controller bring-up, `userblk identify`, the emulated controller of the tests, error
messages) uses this module, so the numbers live in one place per language. Keep the two in step:
every constant of the .pxd has the same name here.

Sources: NVM Express Base Specification 2.0 ("Base") and NVM Command Set Specification 1.0
("NVM"). Section numbers are cited where a value is not obvious.
"""
import enum
import struct
import uuid

import attrs

from env.errors import InvalidArgument

# ---- controller registers (Base 3.1.3, figure "Controller Properties") -------------------------
REG_CAP = 0x00        # Controller Capabilities (64-bit)
REG_VS = 0x08         # Version
REG_INTMS = 0x0C      # Interrupt Mask Set
REG_INTMC = 0x10      # Interrupt Mask Clear
REG_CC = 0x14         # Controller Configuration
REG_CSTS = 0x1C       # Controller Status
REG_NSSR = 0x20       # NVM Subsystem Reset
REG_AQA = 0x24        # Admin Queue Attributes
REG_ASQ = 0x28        # Admin SQ Base Address (64-bit)
REG_ACQ = 0x30        # Admin CQ Base Address (64-bit)
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
REG_DOORBELL_BASE = 0x1000   # SQ y tail doorbell at 0x1000 + (2y) * (4 << CAP.DSTRD) (Base 3.1.3.x)

REGISTER_NAMES = {
    REG_CAP: "CAP", REG_VS: "VS", REG_INTMS: "INTMS", REG_INTMC: "INTMC", REG_CC: "CC",
    REG_CSTS: "CSTS", REG_NSSR: "NSSR", REG_AQA: "AQA", REG_ASQ: "ASQ", REG_ACQ: "ACQ",
    REG_CMBLOC: "CMBLOC", REG_CMBSZ: "CMBSZ",
}

CC_EN = 1 << 0
CC_SHN_MASK = 3 << 14
CC_SHN_NORMAL = 1 << 14
CC_SHN_ABRUPT = 2 << 14
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_MASK = 3 << 2
CSTS_SHST_COMPLETE = 2 << 2
CSTS_NSSRO = 1 << 4
CSTS_PP = 1 << 5

NSSR_RESET_VALUE = 0x4E564D65    # "NVMe": the only value NSSR accepts (Base 3.1.3.7)
ALL_ONES32 = 0xFFFFFFFF          # what a read of a removed PCIe device returns

SQE_SIZE = 64
CQE_SIZE = 16
SQES = 6                         # log2(SQE_SIZE): the value CC.IOSQES and Identify SQES use
CQES = 4                         # log2(CQE_SIZE)
ADMIN_QUEUE_MAX_ENTRIES = 4096   # AQA.ASQS/ACQS are 12-bit, 0's based (Base 3.1.3.8)
NSID_BROADCAST = 0xFFFFFFFF      # "all namespaces" (Base 3.2.1.1)


def doorbell_offset(qid, cq, dstrd=0):
    """Register offset of SQ `qid`'s tail doorbell (cq=False) or CQ `qid`'s head doorbell."""
    return REG_DOORBELL_BASE + (2 * qid + (1 if cq else 0)) * (4 << dstrd)


def registers_gone(value):
    """True if a 32-bit register read returned all ones: the device is no longer there."""
    return value == ALL_ONES32


# ---- register decoders -------------------------------------------------------------------------
def _bits(value, lo, width):
    return (value >> lo) & ((1 << width) - 1)


@attrs.frozen
class Cap:
    """Controller Capabilities (Base 3.1.3.1). Fields are in natural units where the register is
    encoded: `mqes` is the largest queue size in entries (the register holds it 0's based),
    `to` is the worst-case ready time in milliseconds (the register counts 500 ms units),
    `mpsmin`/`mpsmax` are page sizes in bytes (the register holds 2 ** (12 + n)).
    `css` is the raw Command Sets Supported bit field (bit 0 NVM, bit 6 one or more I/O command
    sets, bit 7 no I/O command set)."""
    mqes: int
    cqr: bool
    ams: int
    to: int
    dstrd: int
    nssrs: bool
    css: int
    bps: bool
    cps: int
    mpsmin: int
    mpsmax: int
    pmrs: bool
    cmbs: bool
    nsss: bool
    crms: int
    raw: int = attrs.field(default=0, eq=False, repr=False)

    CSS_NVM = 1 << 0
    CSS_IOCS = 1 << 6
    CSS_NO_IO = 1 << 7

    @classmethod
    def decode(cls, value):
        return cls(
            mqes=_bits(value, 0, 16) + 1,
            cqr=bool(_bits(value, 16, 1)),
            ams=_bits(value, 17, 2),          # bit 17 weighted round robin, bit 18 vendor specific
            to=_bits(value, 24, 8) * 500,
            dstrd=_bits(value, 32, 4),
            nssrs=bool(_bits(value, 36, 1)),
            css=_bits(value, 37, 8),
            bps=bool(_bits(value, 45, 1)),
            cps=_bits(value, 46, 2),          # Controller Power Scope (2.0)
            mpsmin=1 << (12 + _bits(value, 48, 4)),
            mpsmax=1 << (12 + _bits(value, 52, 4)),
            pmrs=bool(_bits(value, 56, 1)),
            cmbs=bool(_bits(value, 57, 1)),
            nsss=bool(_bits(value, 58, 1)),   # NVM Subsystem Shutdown Supported (2.0)
            crms=_bits(value, 59, 2),         # Controller Ready Modes Supported (2.0)
            raw=value,
        )

    def encode(self):
        if not 2 <= self.mqes <= 0x10000:
            raise InvalidArgument(f"CAP.MQES: {self.mqes} entries is not in 2..65536")
        if self.to % 500 or not 0 <= self.to // 500 <= 255:
            raise InvalidArgument(f"CAP.TO: {self.to} ms is not a multiple of 500 up to 127500")
        return ((self.mqes - 1) | int(self.cqr) << 16 | (self.ams & 3) << 17
                | (self.to // 500) << 24 | (self.dstrd & 0xF) << 32 | int(self.nssrs) << 36
                | (self.css & 0xFF) << 37 | int(self.bps) << 45 | (self.cps & 3) << 46
                | _page_shift(self.mpsmin, "CAP.MPSMIN") << 48
                | _page_shift(self.mpsmax, "CAP.MPSMAX") << 52
                | int(self.pmrs) << 56 | int(self.cmbs) << 57 | int(self.nsss) << 58
                | (self.crms & 3) << 59)

    @property
    def doorbell_stride(self):
        """Bytes between two doorbells."""
        return 4 << self.dstrd

    @property
    def css_names(self):
        names = []
        if self.css & self.CSS_NVM:
            names.append("NVM")
        if self.css & self.CSS_IOCS:
            names.append("I/O command sets")
        if self.css & self.CSS_NO_IO:
            names.append("admin only")
        return names


def _page_shift(size, what):
    n = size.bit_length() - 13
    if size & (size - 1) or not 0 <= n <= 15:
        raise InvalidArgument(f"{what}: {size} is not a power of two between 4 KiB and 128 MiB")
    return n


@attrs.frozen(order=True)
class Version:
    """Version register and Identify Controller VER (Base 3.1.3.2)."""
    major: int
    minor: int
    tertiary: int = 0

    @classmethod
    def decode(cls, value):
        return cls(value >> 16 & 0xFFFF, value >> 8 & 0xFF, value & 0xFF)

    def encode(self):
        return (self.major & 0xFFFF) << 16 | (self.minor & 0xFF) << 8 | (self.tertiary & 0xFF)

    def __str__(self):
        return f"{self.major}.{self.minor}.{self.tertiary}"


@attrs.frozen
class Cc:
    """Controller Configuration (Base 3.1.3.5). Raw field values, as written by the host;
    `page_size` etc. give the meaning."""
    en: bool = False
    css: int = 0           # 000b NVM command set, 110b all supported I/O sets, 111b admin only
    mps: int = 0           # page size 2 ** (12 + mps)
    ams: int = 0           # 000b round robin, 001b weighted round robin, 111b vendor
    shn: int = 0           # 00b none, 01b normal, 10b abrupt
    iosqes: int = 0        # log2 of the I/O SQ entry size (6 for 64 bytes)
    iocqes: int = 0        # log2 of the I/O CQ entry size (4 for 16 bytes)
    crime: bool = False    # Controller Ready Independent of Media Enable (2.0)

    CSS_NVM = 0
    CSS_IOCS = 6
    CSS_ADMIN_ONLY = 7

    @classmethod
    def decode(cls, value):
        return cls(en=bool(value & 1), css=_bits(value, 4, 3), mps=_bits(value, 7, 4),
                   ams=_bits(value, 11, 3), shn=_bits(value, 14, 2), iosqes=_bits(value, 16, 4),
                   iocqes=_bits(value, 20, 4), crime=bool(_bits(value, 24, 1)))

    def encode(self):
        return (int(self.en) | (self.css & 7) << 4 | (self.mps & 0xF) << 7 | (self.ams & 7) << 11
                | (self.shn & 3) << 14 | (self.iosqes & 0xF) << 16 | (self.iocqes & 0xF) << 20
                | int(self.crime) << 24)

    @property
    def page_size(self):
        return 1 << (12 + self.mps)


@attrs.frozen
class Csts:
    """Controller Status (Base 3.1.3.6). `shst`: 0 normal, 1 shutdown occurring, 2 complete.
    A read of all ones (device gone) decodes with `removed` set."""
    rdy: bool = False
    cfs: bool = False
    shst: int = 0
    nssro: bool = False
    pp: bool = False
    st: bool = False       # Shutdown Type (2.0): 1 = NVM subsystem shutdown
    removed: bool = False

    SHST_NORMAL = 0
    SHST_OCCURRING = 1
    SHST_COMPLETE = 2

    @classmethod
    def decode(cls, value):
        if registers_gone(value):
            return cls(True, True, 3, True, True, True, removed=True)
        return cls(rdy=bool(value & 1), cfs=bool(value >> 1 & 1), shst=_bits(value, 2, 2),
                   nssro=bool(value >> 4 & 1), pp=bool(value >> 5 & 1), st=bool(value >> 6 & 1))

    def encode(self):
        return (int(self.rdy) | int(self.cfs) << 1 | (self.shst & 3) << 2 | int(self.nssro) << 4
                | int(self.pp) << 5 | int(self.st) << 6)


@attrs.frozen
class Aqa:
    """Admin Queue Attributes (Base 3.1.3.8), in entries (the register is 0's based)."""
    asqs: int
    acqs: int

    @classmethod
    def decode(cls, value):
        return cls(asqs=(value & 0xFFF) + 1, acqs=(value >> 16 & 0xFFF) + 1)

    def encode(self):
        for what, n in (("ASQS", self.asqs), ("ACQS", self.acqs)):
            if not 2 <= n <= ADMIN_QUEUE_MAX_ENTRIES:
                raise InvalidArgument(f"AQA.{what}: {n} entries is not in 2..4096")
        return (self.asqs - 1) | (self.acqs - 1) << 16


# ---- opcodes (Base 5, figure "Opcodes for Admin Commands"; NVM 3, "Opcodes for NVM Commands") --
class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NAMESPACE_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_IMAGE_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NAMESPACE_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    VIRTUALIZATION_MANAGEMENT = 0x1C
    NVME_MI_SEND = 0x1D
    NVME_MI_RECEIVE = 0x1E
    CAPACITY_MANAGEMENT = 0x20
    LOCKDOWN = 0x24
    DOORBELL_BUFFER_CONFIG = 0x7C
    FABRICS = 0x7F
    FORMAT_NVM = 0x80
    SECURITY_SEND = 0x81
    SECURITY_RECEIVE = 0x82
    SANITIZE = 0x84
    GET_LBA_STATUS = 0x86


class NvmOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C
    RESERVATION_REGISTER = 0x0D
    RESERVATION_REPORT = 0x0E
    RESERVATION_ACQUIRE = 0x11
    RESERVATION_RELEASE = 0x15
    COPY = 0x19


ADMIN_OPCODE_NAMES = {
    0x00: "Delete I/O Submission Queue", 0x01: "Create I/O Submission Queue",
    0x02: "Get Log Page", 0x04: "Delete I/O Completion Queue",
    0x05: "Create I/O Completion Queue", 0x06: "Identify", 0x08: "Abort",
    0x09: "Set Features", 0x0A: "Get Features", 0x0C: "Asynchronous Event Request",
    0x0D: "Namespace Management", 0x10: "Firmware Commit", 0x11: "Firmware Image Download",
    0x14: "Device Self-test", 0x15: "Namespace Attachment", 0x18: "Keep Alive",
    0x19: "Directive Send", 0x1A: "Directive Receive", 0x1C: "Virtualization Management",
    0x1D: "NVMe-MI Send", 0x1E: "NVMe-MI Receive", 0x20: "Capacity Management",
    0x24: "Lockdown", 0x7C: "Doorbell Buffer Config", 0x7F: "Fabrics Commands",
    0x80: "Format NVM", 0x81: "Security Send", 0x82: "Security Receive", 0x84: "Sanitize",
    0x86: "Get LBA Status",
}

NVM_OPCODE_NAMES = {
    0x00: "Flush", 0x01: "Write", 0x02: "Read", 0x04: "Write Uncorrectable", 0x05: "Compare",
    0x08: "Write Zeroes", 0x09: "Dataset Management", 0x0C: "Verify",
    0x0D: "Reservation Register", 0x0E: "Reservation Report", 0x11: "Reservation Acquire",
    0x15: "Reservation Release", 0x19: "Copy",
}

# pxd names
ADM_DELETE_SQ = AdminOpcode.DELETE_IO_SQ
ADM_CREATE_SQ = AdminOpcode.CREATE_IO_SQ
ADM_GET_LOG_PAGE = AdminOpcode.GET_LOG_PAGE
ADM_DELETE_CQ = AdminOpcode.DELETE_IO_CQ
ADM_CREATE_CQ = AdminOpcode.CREATE_IO_CQ
ADM_IDENTIFY = AdminOpcode.IDENTIFY
ADM_ABORT = AdminOpcode.ABORT
ADM_SET_FEATURES = AdminOpcode.SET_FEATURES
ADM_GET_FEATURES = AdminOpcode.GET_FEATURES
ADM_ASYNC_EVENT_REQUEST = AdminOpcode.ASYNC_EVENT_REQUEST
ADM_KEEP_ALIVE = AdminOpcode.KEEP_ALIVE
ADM_DOORBELL_BUFFER_CONFIG = AdminOpcode.DOORBELL_BUFFER_CONFIG
ADM_FORMAT_NVM = AdminOpcode.FORMAT_NVM
NVM_FLUSH = NvmOpcode.FLUSH
NVM_WRITE = NvmOpcode.WRITE
NVM_READ = NvmOpcode.READ
NVM_WRITE_UNCORRECTABLE = NvmOpcode.WRITE_UNCORRECTABLE
NVM_COMPARE = NvmOpcode.COMPARE
NVM_WRITE_ZEROES = NvmOpcode.WRITE_ZEROES
NVM_DATASET_MANAGEMENT = NvmOpcode.DATASET_MANAGEMENT


def opcode_name(opc, admin=False):
    """The spec's name of an opcode, e.g. "Identify" or "Read". Vendor specific opcodes
    (Admin C0h-FFh, NVM 80h-FFh) and unknown ones are named with their number."""
    table = ADMIN_OPCODE_NAMES if admin else NVM_OPCODE_NAMES
    name = table.get(opc)
    if name is not None:
        return name
    if opc >= (0xC0 if admin else 0x80):
        return f"Vendor Specific 0x{opc:02x}"
    return f"Unknown {'admin' if admin else 'I/O'} opcode 0x{opc:02x}"


def opcode_transfer(opc):
    """Data direction coded in bits 1:0 of every opcode (Base 5, figure "Opcodes for Admin
    Commands"): 0 none, 1 host to controller, 2 controller to host, 3 bidirectional."""
    return opc & 3


# ---- feature identifiers (Base 5.27.1, figure "Feature Identifiers") ---------------------------
class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY_NORMAL = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B
    AUTONOMOUS_POWER_STATE_TRANSITION = 0x0C
    HOST_MEMORY_BUFFER = 0x0D
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F
    HOST_CONTROLLED_THERMAL_MANAGEMENT = 0x10
    NON_OPERATIONAL_POWER_STATE_CONFIG = 0x11
    READ_RECOVERY_LEVEL_CONFIG = 0x12
    PREDICTABLE_LATENCY_MODE_CONFIG = 0x13
    PREDICTABLE_LATENCY_MODE_WINDOW = 0x14
    HOST_BEHAVIOR_SUPPORT = 0x16
    SANITIZE_CONFIG = 0x17
    ENDURANCE_GROUP_EVENT_CONFIGURATION = 0x18
    IO_COMMAND_SET_PROFILE = 0x19
    SPINUP_CONTROL = 0x1A
    ENHANCED_CONTROLLER_METADATA = 0x7D
    CONTROLLER_METADATA = 0x7E
    NAMESPACE_METADATA = 0x7F
    SOFTWARE_PROGRESS_MARKER = 0x80
    HOST_IDENTIFIER = 0x81
    RESERVATION_NOTIFICATION_MASK = 0x82
    RESERVATION_PERSISTENCE = 0x83
    NAMESPACE_WRITE_PROTECTION_CONFIG = 0x84


FEATURE_NAMES = {
    0x01: "Arbitration", 0x02: "Power Management", 0x03: "LBA Range Type",
    0x04: "Temperature Threshold", 0x05: "Error Recovery", 0x06: "Volatile Write Cache",
    0x07: "Number of Queues", 0x08: "Interrupt Coalescing",
    0x09: "Interrupt Vector Configuration", 0x0A: "Write Atomicity Normal",
    0x0B: "Asynchronous Event Configuration", 0x0C: "Autonomous Power State Transition",
    0x0D: "Host Memory Buffer", 0x0E: "Timestamp", 0x0F: "Keep Alive Timer",
    0x10: "Host Controlled Thermal Management", 0x11: "Non-Operational Power State Config",
    0x12: "Read Recovery Level Config", 0x13: "Predictable Latency Mode Config",
    0x14: "Predictable Latency Mode Window", 0x16: "Host Behavior Support",
    0x17: "Sanitize Config", 0x18: "Endurance Group Event Configuration",
    0x19: "I/O Command Set Profile", 0x1A: "Spinup Control",
    0x7D: "Enhanced Controller Metadata", 0x7E: "Controller Metadata",
    0x7F: "Namespace Metadata", 0x80: "Software Progress Marker", 0x81: "Host Identifier",
    0x82: "Reservation Notification Mask", 0x83: "Reservation Persistence",
    0x84: "Namespace Write Protection Config",
}


def feature_name(fid):
    return FEATURE_NAMES.get(fid, f"Feature 0x{fid:02x}")


class FeatureSelect(enum.IntEnum):
    """Get Features SEL (Base 5.15, CDW10 bits 10:8)."""
    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


# ---- log pages (Base 5.16.1, figure "Log Page Identifiers") ------------------------------------
class LogPageId(enum.IntEnum):
    SUPPORTED_LOG_PAGES = 0x00
    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACE_LIST = 0x04
    COMMANDS_SUPPORTED_AND_EFFECTS = 0x05
    DEVICE_SELF_TEST = 0x06
    TELEMETRY_HOST_INITIATED = 0x07
    TELEMETRY_CONTROLLER_INITIATED = 0x08
    ENDURANCE_GROUP_INFORMATION = 0x09
    PREDICTABLE_LATENCY_PER_NVM_SET = 0x0A
    PREDICTABLE_LATENCY_EVENT_AGGREGATE = 0x0B
    ASYMMETRIC_NAMESPACE_ACCESS = 0x0C
    PERSISTENT_EVENT_LOG = 0x0D
    LBA_STATUS_INFORMATION = 0x0E
    ENDURANCE_GROUP_EVENT_AGGREGATE = 0x0F
    MEDIA_UNIT_STATUS = 0x10
    SUPPORTED_CAPACITY_CONFIGURATION_LIST = 0x11
    FEATURE_IDENTIFIERS_SUPPORTED_AND_EFFECTS = 0x12
    NVME_MI_COMMANDS_SUPPORTED_AND_EFFECTS = 0x13
    COMMAND_AND_FEATURE_LOCKDOWN = 0x14
    BOOT_PARTITION = 0x15
    ROTATIONAL_MEDIA_INFORMATION = 0x16
    DISCOVERY = 0x70
    RESERVATION_NOTIFICATION = 0x80
    SANITIZE_STATUS = 0x81


LOG_PAGE_NAMES = {
    0x00: "Supported Log Pages", 0x01: "Error Information", 0x02: "SMART / Health Information",
    0x03: "Firmware Slot Information", 0x04: "Changed Namespace List",
    0x05: "Commands Supported and Effects", 0x06: "Device Self-test",
    0x07: "Telemetry Host-Initiated", 0x08: "Telemetry Controller-Initiated",
    0x09: "Endurance Group Information", 0x0A: "Predictable Latency Per NVM Set",
    0x0B: "Predictable Latency Event Aggregate", 0x0C: "Asymmetric Namespace Access",
    0x0D: "Persistent Event Log", 0x0E: "LBA Status Information",
    0x0F: "Endurance Group Event Aggregate", 0x10: "Media Unit Status",
    0x11: "Supported Capacity Configuration List",
    0x12: "Feature Identifiers Supported and Effects",
    0x13: "NVMe-MI Commands Supported and Effects", 0x14: "Command and Feature Lockdown",
    0x15: "Boot Partition", 0x16: "Rotational Media Information", 0x70: "Discovery",
    0x80: "Reservation Notification", 0x81: "Sanitize Status",
}


def log_page_name(lid):
    return LOG_PAGE_NAMES.get(lid, f"Log Page 0x{lid:02x}")


# ---- Identify (Base 5.17.1, figure "CNS Values") -----------------------------------------------
class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACE_LIST = 0x02
    NAMESPACE_ID_DESCRIPTORS = 0x03
    NVM_SET_LIST = 0x04
    CSI_NAMESPACE = 0x05
    CSI_CONTROLLER = 0x06
    CSI_ACTIVE_NAMESPACE_LIST = 0x07
    INDEPENDENT_NAMESPACE = 0x08
    ALLOCATED_NAMESPACE_LIST = 0x10
    ALLOCATED_NAMESPACE = 0x11
    NAMESPACE_CONTROLLER_LIST = 0x12
    CONTROLLER_LIST = 0x13
    PRIMARY_CONTROLLER_CAPABILITIES = 0x14
    SECONDARY_CONTROLLER_LIST = 0x15
    NAMESPACE_GRANULARITY_LIST = 0x16
    UUID_LIST = 0x17
    DOMAIN_LIST = 0x18
    ENDURANCE_GROUP_LIST = 0x19
    CSI_ALLOCATED_NAMESPACE_LIST = 0x1A
    CSI_ALLOCATED_NAMESPACE = 0x1B
    IO_COMMAND_SET = 0x1C


IDENTIFY_DATA_SIZE = 4096

# Namespace Identification Descriptor types (Base 5.17.2.3, figure "NIDT")
NIDT_EUI64 = 0x01
NIDT_NGUID = 0x02
NIDT_UUID = 0x03
NIDT_CSI = 0x04
NIDT_LENGTHS = {NIDT_EUI64: 8, NIDT_NGUID: 16, NIDT_UUID: 16, NIDT_CSI: 1}

CSI_NVM = 0x00     # Command Set Identifier of the NVM command set (Base 5.17.1, "CSI")


# ---- asynchronous events (Base 5.2.1, figures "Asynchronous Event Type" and "... Information") --
class AsyncEventType(enum.IntEnum):
    ERROR = 0
    SMART_HEALTH = 1
    NOTICE = 2
    IO_COMMAND_SET = 6
    VENDOR = 7


class AsyncEventError(enum.IntEnum):
    WRITE_TO_INVALID_DOORBELL = 0x00
    INVALID_DOORBELL_WRITE_VALUE = 0x01
    DIAGNOSTIC_FAILURE = 0x02
    PERSISTENT_INTERNAL_ERROR = 0x03
    TRANSIENT_INTERNAL_ERROR = 0x04
    FIRMWARE_IMAGE_LOAD_ERROR = 0x05


class AsyncEventSmart(enum.IntEnum):
    SUBSYSTEM_RELIABILITY = 0x00
    TEMPERATURE_THRESHOLD = 0x01
    SPARE_BELOW_THRESHOLD = 0x02


class AsyncEventNotice(enum.IntEnum):
    NAMESPACE_ATTRIBUTE_CHANGED = 0x00
    FIRMWARE_ACTIVATION_STARTING = 0x01
    TELEMETRY_LOG_CHANGED = 0x02
    ANA_CHANGE = 0x03


def async_event_cdw0(event_type, info, log_page):
    """CDW0 of an Asynchronous Event Request completion: type in bits 2:0, information in
    15:8, the log page to read in 23:16."""
    return (event_type & 7) | (info & 0xFF) << 8 | (log_page & 0xFF) << 16


@attrs.frozen
class AsyncEvent:
    event_type: int
    info: int
    log_page: int

    @classmethod
    def decode(cls, cdw0):
        return cls(cdw0 & 7, cdw0 >> 8 & 0xFF, cdw0 >> 16 & 0xFF)

    def encode(self):
        return async_event_cdw0(self.event_type, self.info, self.log_page)


# ---- SGL (Base 4.1.2) --------------------------------------------------------------------------
class SglType(enum.IntEnum):
    """SGL descriptor types (the high nibble of byte 15)."""
    DATA_BLOCK = 0x0
    BIT_BUCKET = 0x1
    SEGMENT = 0x2
    LAST_SEGMENT = 0x3
    KEYED_DATA_BLOCK = 0x4
    TRANSPORT_DATA_BLOCK = 0x5
    VENDOR_SPECIFIC = 0xF


SGL_SUBTYPE_ADDRESS = 0x0
SGL_SUBTYPE_OFFSET = 0x1
SGL_DESCRIPTOR_SIZE = 16

# pxd names: values of the SQE flags byte and of the descriptor's identifier byte
PSDT_PRP = 0x00
PSDT_SGL_MPTR_CONTIG = 0x40
PSDT_SGL_MPTR_SGL = 0x80
SGL_TYPE_DATA_BLOCK = 0x00
SGL_TYPE_BIT_BUCKET = 0x10
SGL_TYPE_SEGMENT = 0x20
SGL_TYPE_LAST_SEGMENT = 0x30

_SGL = struct.Struct("<QI3xB")


@attrs.frozen
class SglDescriptor:
    address: int
    length: int
    type: int = SglType.DATA_BLOCK
    subtype: int = SGL_SUBTYPE_ADDRESS

    @classmethod
    def unpack(cls, data, offset=0):
        if len(data) - offset < SGL_DESCRIPTOR_SIZE:
            raise InvalidArgument(f"an SGL descriptor is 16 bytes, got {len(data) - offset}")
        address, length, ident = _SGL.unpack_from(data, offset)
        return cls(address, length, ident >> 4, ident & 0xF)

    def pack(self):
        return _SGL.pack(self.address, self.length, (self.type & 0xF) << 4 | (self.subtype & 0xF))

    def as_dptr(self):
        """(prp1, prp2): the descriptor as it sits in a command's DPTR (SGL1)."""
        raw = self.pack()
        return struct.unpack("<QQ", raw)


# ---- submission and completion queue entries (Base 4.2, 4.6) -----------------------------------
_SQE = struct.Struct("<BBHIIIQQQ6I")
_CQE = struct.Struct("<IIHHHH")
assert _SQE.size == SQE_SIZE and _CQE.size == CQE_SIZE


@attrs.define(slots=True)
class Command:
    """A 64-byte Submission Queue Entry (Base 4.2, figure "Common Command Format").
    `flags` is byte 1: FUSE in bits 1:0, PSDT in bits 7:6."""
    opc: int = 0
    flags: int = 0
    cid: int = 0
    nsid: int = 0
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    @classmethod
    def unpack(cls, data, offset=0):
        if len(data) - offset < SQE_SIZE:
            raise InvalidArgument(f"a submission queue entry is 64 bytes, got {len(data) - offset}")
        return cls(*_SQE.unpack_from(data, offset))

    def pack(self):
        return _SQE.pack(self.opc, self.flags, self.cid, self.nsid, self.cdw2, self.cdw3,
                         self.mptr, self.prp1, self.prp2, self.cdw10, self.cdw11, self.cdw12,
                         self.cdw13, self.cdw14, self.cdw15)

    def pack_into(self, buf, offset):
        _SQE.pack_into(buf, offset, self.opc, self.flags, self.cid, self.nsid, self.cdw2,
                       self.cdw3, self.mptr, self.prp1, self.prp2, self.cdw10, self.cdw11,
                       self.cdw12, self.cdw13, self.cdw14, self.cdw15)

    @property
    def fuse(self):
        return self.flags & 3

    @property
    def psdt(self):
        return self.flags >> 6 & 3

    @property
    def slba(self):
        """Starting LBA of Read/Write/Compare/Write Zeroes... (NVM: CDW11:CDW10)."""
        return self.cdw11 << 32 | self.cdw10

    @property
    def nlb(self):
        """Number of logical blocks (NVM: CDW12 bits 15:0 plus one)."""
        return (self.cdw12 & 0xFFFF) + 1

    @property
    def sgl1(self):
        return SglDescriptor.unpack(struct.pack("<QQ", self.prp1, self.prp2))


@attrs.define(slots=True)
class Completion:
    """A 16-byte Completion Queue Entry (Base 4.6). `status` is the whole 16-bit field: phase
    tag in bit 0, SC 8:1, SCT 11:9, CRD 13:12, More 14, DNR 15."""
    cdw0: int = 0
    cdw1: int = 0
    sqhd: int = 0
    sqid: int = 0
    cid: int = 0
    status: int = 0

    @classmethod
    def unpack(cls, data, offset=0):
        if len(data) - offset < CQE_SIZE:
            raise InvalidArgument(f"a completion queue entry is 16 bytes, got {len(data) - offset}")
        return cls(*_CQE.unpack_from(data, offset))

    def pack(self):
        return _CQE.pack(self.cdw0, self.cdw1, self.sqhd, self.sqid, self.cid, self.status)

    @property
    def phase(self):
        return self.status & 1

    @property
    def nvme_status(self):
        from nvme.status import NvmeStatus
        return NvmeStatus.decode(self.status)


SQE_STRUCT = _SQE
CQE_STRUCT = _CQE


# ---- data structures declared field by field (Identify, log pages) ----------------------------
_INT_SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "u128": 16, "ieee": 3}


def field_at(offset, kind, text="dec", size=None):
    """An attrs field stored at `offset` in the data. `kind`: u8..u128, ieee (3-byte OUI),
    ascii (space padded), asciiz (NUL padded), bytes, uuid. `text`: how format_text prints it
    (dec, hex, str)."""
    size = size or _INT_SIZES.get(kind)
    if kind in _INT_SIZES:
        default = 0
    elif kind in ("ascii", "asciiz"):
        default = ""
    elif kind == "uuid":
        default = "00000000-0000-0000-0000-000000000000"
    else:
        default = bytes(size)
    return attrs.field(default=default, metadata={"at": (offset, kind, size, text)})


def _layout(cls):
    return [(f.name, *f.metadata["at"]) for f in attrs.fields(cls) if "at" in f.metadata]


def as_bytes(data, size, what):
    """The first `size` bytes of a bytes-like `data` (InvalidArgument if it is shorter)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise InvalidArgument(f"{what}: expected a bytes-like object, not "
                              f"{type(data).__name__}") from None
    if view.nbytes < size:
        raise InvalidArgument(f"{what}: {size} bytes needed, got {view.nbytes}")
    return bytes(view.cast("B")[:size])


def _decode_field(data, offset, kind, size):
    raw = data[offset:offset + size]
    if kind in _INT_SIZES:
        return int.from_bytes(raw, "little")
    if kind == "ascii":
        return raw.split(b"\0", 1)[0].decode("ascii", "replace").rstrip(" ")
    if kind == "asciiz":
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if kind == "uuid":
        return str(uuid.UUID(bytes=raw))
    return raw


def _encode_field(buf, name, value, offset, kind, size):
    if kind in _INT_SIZES:
        if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
            raise InvalidArgument(f"{name}: {value!r} does not fit in {size} byte(s)")
        buf[offset:offset + size] = value.to_bytes(size, "little")
    elif kind in ("ascii", "asciiz"):
        try:
            raw = value.encode("ascii" if kind == "ascii" else "utf-8")
        except (AttributeError, UnicodeEncodeError):
            raise InvalidArgument(f"{name}: {value!r} is not an ASCII string") from None
        if len(raw) > size or b"\0" in raw:
            raise InvalidArgument(f"{name}: {value!r} is longer than {size} bytes or holds NUL")
        # ASCII fields are space padded (Base 1.5), NQNs NUL terminated (Base 5.17.2.1)
        buf[offset:offset + size] = raw.ljust(size, b" " if kind == "ascii" else b"\0")
    elif kind == "uuid":
        buf[offset:offset + size] = uuid.UUID(str(value)).bytes
    else:
        raw = bytes(value)
        if len(raw) != size:
            raise InvalidArgument(f"{name}: {size} bytes expected, got {len(raw)}")
        buf[offset:offset + size] = raw


def c_hex(value):
    """printf("%#x"): 0 prints as "0", as nvme-cli shows it."""
    return f"{value:#x}" if value else "0"


def _text_value(value, kind, text):
    if kind == "ieee":
        return f"{value:06x}"
    if kind == "bytes":
        return value.hex()
    if text == "hex":
        return c_hex(value)
    return str(value)


class Structure:
    """parse/pack/to_dict/format_text from the field declarations of an attrs subclass."""
    _text_width = 10          # key column width of format_text

    @classmethod
    def _parse_fields(cls, data):
        return {name: _decode_field(data, offset, kind, size)
                for name, offset, kind, size, _ in _layout(cls)}

    def _pack_fields(self, buf):
        for name, offset, kind, size, _ in _layout(type(self)):
            _encode_field(buf, name, getattr(self, name), offset, kind, size)

    def _dict_fields(self):
        out = {}
        for name, offset, kind, size, _ in _layout(type(self)):
            value = getattr(self, name)
            if kind == "ascii":
                value = value.ljust(size)
            elif kind == "bytes":
                value = value.hex()
            out[name] = value
        return out

    def _text_lines(self, skip=()):
        lines = []
        for name, offset, kind, size, text in _layout(type(self)):
            if name in skip:
                continue
            value = getattr(self, name)
            lines.append(f"{name:<{self._text_width}}: {_text_value(value, kind, text)}")
        return lines
