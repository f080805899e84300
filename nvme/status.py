"""NVMe completion status: the codes with their spec names, and `NvmeStatus`.

Every error message that reaches a user names a status the way the specification does
("Invalid Queue Identifier", not "0x1/0x01"), and code that decides whether to retry asks
`NvmeStatus.retryable` instead of comparing numbers in many places.

The status field of a completion queue entry (Base 2.0, "Completion Queue Entry", figure
"Completion Queue Entry: Status Field") holds, above the phase tag in bit 0: SC in bits 8:1, SCT
in 11:9, CRD in 13:12, More in 14 and DNR in 15. The codes are those of the Base specification's
figures "Generic Command Status Values" (SCT 0), "Command Specific Status Values" (SCT 1), "Media
and Data Integrity Error Values" (SCT 2) and "Path Related Status Values" (SCT 3); the values
from 80h up in SCT 0 and 1 come from the NVM Command Set specification 1.0 (its "Status Codes"
section: generic 80h-84h, command specific 80h-83h).

Naming: `status_name(sct, sc)` gives the spec's words ("Invalid Queue Identifier"),
`status_symbol(sct, sc)` an identifier-like form ("COMMAND_SPECIFIC/INVALID_QUEUE_IDENTIFIER").
Unknown codes are named "SCT 1 SC 0x7f (unknown)".
"""
import enum

import attrs

from env.errors import InvalidArgument


class Sct(enum.IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3
    VENDOR = 7


SCT_NAMES = {0: "Generic Command Status", 1: "Command Specific Status",
             2: "Media and Data Integrity Errors", 3: "Path Related Status",
             7: "Vendor Specific"}


class Generic(enum.IntEnum):
    """SCT 0 (Base figure "Generic Command Status Values"; 80h-84h from NVM 4.1.1.1)."""
    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    COMMAND_ID_CONFLICT = 0x03
    DATA_TRANSFER_ERROR = 0x04
    ABORTED_POWER_LOSS = 0x05
    INTERNAL_ERROR = 0x06
    ABORTED_BY_REQUEST = 0x07
    ABORTED_SQ_DELETION = 0x08
    ABORTED_FAILED_FUSED = 0x09
    ABORTED_MISSING_FUSED = 0x0A
    INVALID_NAMESPACE_OR_FORMAT = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    INVALID_SGL_SEGMENT_DESCRIPTOR = 0x0D
    INVALID_NUMBER_OF_SGL_DESCRIPTORS = 0x0E
    DATA_SGL_LENGTH_INVALID = 0x0F
    METADATA_SGL_LENGTH_INVALID = 0x10
    SGL_DESCRIPTOR_TYPE_INVALID = 0x11
    INVALID_USE_OF_CMB = 0x12
    PRP_OFFSET_INVALID = 0x13
    ATOMIC_WRITE_UNIT_EXCEEDED = 0x14
    OPERATION_DENIED = 0x15
    SGL_OFFSET_INVALID = 0x16
    HOST_IDENTIFIER_INCONSISTENT_FORMAT = 0x18
    KEEP_ALIVE_TIMER_EXPIRED = 0x19
    KEEP_ALIVE_TIMEOUT_INVALID = 0x1A
    ABORTED_PREEMPT_AND_ABORT = 0x1B
    SANITIZE_FAILED = 0x1C
    SANITIZE_IN_PROGRESS = 0x1D
    SGL_DATA_BLOCK_GRANULARITY_INVALID = 0x1E
    COMMAND_NOT_SUPPORTED_FOR_QUEUE_IN_CMB = 0x1F
    NAMESPACE_WRITE_PROTECTED = 0x20
    COMMAND_INTERRUPTED = 0x21
    TRANSIENT_TRANSPORT_ERROR = 0x22
    PROHIBITED_BY_LOCKDOWN = 0x23
    ADMIN_COMMAND_MEDIA_NOT_READY = 0x24
    LBA_OUT_OF_RANGE = 0x80
    CAPACITY_EXCEEDED = 0x81
    NAMESPACE_NOT_READY = 0x82
    RESERVATION_CONFLICT = 0x83
    FORMAT_IN_PROGRESS = 0x84


class CommandSpecific(enum.IntEnum):
    """SCT 1 (Base figure "Command Specific Status Values"; 80h-83h from NVM 4.1.1.2)."""
    COMPLETION_QUEUE_INVALID = 0x00
    INVALID_QUEUE_IDENTIFIER = 0x01
    INVALID_QUEUE_SIZE = 0x02
    ABORT_COMMAND_LIMIT_EXCEEDED = 0x03
    ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED = 0x05
    INVALID_FIRMWARE_SLOT = 0x06
    INVALID_FIRMWARE_IMAGE = 0x07
    INVALID_INTERRUPT_VECTOR = 0x08
    INVALID_LOG_PAGE = 0x09
    INVALID_FORMAT = 0x0A
    FIRMWARE_ACTIVATION_REQUIRES_CONVENTIONAL_RESET = 0x0B
    INVALID_QUEUE_DELETION = 0x0C
    FEATURE_IDENTIFIER_NOT_SAVEABLE = 0x0D
    FEATURE_NOT_CHANGEABLE = 0x0E
    FEATURE_NOT_NAMESPACE_SPECIFIC = 0x0F
    FIRMWARE_ACTIVATION_REQUIRES_NVM_SUBSYSTEM_RESET = 0x10
    FIRMWARE_ACTIVATION_REQUIRES_CONTROLLER_LEVEL_RESET = 0x11
    FIRMWARE_ACTIVATION_REQUIRES_MAXIMUM_TIME_VIOLATION = 0x12
    FIRMWARE_ACTIVATION_PROHIBITED = 0x13
    OVERLAPPING_RANGE = 0x14
    NAMESPACE_INSUFFICIENT_CAPACITY = 0x15
    NAMESPACE_IDENTIFIER_UNAVAILABLE = 0x16
    NAMESPACE_ALREADY_ATTACHED = 0x18
    NAMESPACE_IS_PRIVATE = 0x19
    NAMESPACE_NOT_ATTACHED = 0x1A
    THIN_PROVISIONING_NOT_SUPPORTED = 0x1B
    CONTROLLER_LIST_INVALID = 0x1C
    DEVICE_SELF_TEST_IN_PROGRESS = 0x1D
    BOOT_PARTITION_WRITE_PROHIBITED = 0x1E
    INVALID_CONTROLLER_IDENTIFIER = 0x1F
    INVALID_SECONDARY_CONTROLLER_STATE = 0x20
    INVALID_NUMBER_OF_CONTROLLER_RESOURCES = 0x21
    INVALID_RESOURCE_IDENTIFIER = 0x22
    SANITIZE_PROHIBITED_WHILE_PMR_ENABLED = 0x23
    ANA_GROUP_IDENTIFIER_INVALID = 0x24
    ANA_ATTACH_FAILED = 0x25
    INSUFFICIENT_CAPACITY = 0x26
    NAMESPACE_ATTACHMENT_LIMIT_EXCEEDED = 0x27
    PROHIBITION_OF_COMMAND_EXECUTION_NOT_SUPPORTED = 0x28
    IO_COMMAND_SET_NOT_SUPPORTED = 0x29
    IO_COMMAND_SET_NOT_ENABLED = 0x2A
    IO_COMMAND_SET_COMBINATION_REJECTED = 0x2B
    INVALID_IO_COMMAND_SET = 0x2C
    IDENTIFIER_UNAVAILABLE = 0x2D
    CONFLICTING_ATTRIBUTES = 0x80
    INVALID_PROTECTION_INFORMATION = 0x81
    ATTEMPTED_WRITE_TO_READ_ONLY_RANGE = 0x82
    COMMAND_SIZE_LIMIT_EXCEEDED = 0x83


class Media(enum.IntEnum):
    """SCT 2 (Base figure "Media and Data Integrity Error Values")."""
    WRITE_FAULT = 0x80
    UNRECOVERED_READ_ERROR = 0x81
    END_TO_END_GUARD_CHECK_ERROR = 0x82
    END_TO_END_APPLICATION_TAG_CHECK_ERROR = 0x83
    END_TO_END_REFERENCE_TAG_CHECK_ERROR = 0x84
    COMPARE_FAILURE = 0x85
    ACCESS_DENIED = 0x86
    DEALLOCATED_OR_UNWRITTEN_LOGICAL_BLOCK = 0x87
    END_TO_END_STORAGE_TAG_CHECK_ERROR = 0x88


class Path(enum.IntEnum):
    """SCT 3 (Base figure "Path Related Status Values")."""
    INTERNAL_PATH_ERROR = 0x00
    ASYMMETRIC_ACCESS_PERSISTENT_LOSS = 0x01
    ASYMMETRIC_ACCESS_INACCESSIBLE = 0x02
    ASYMMETRIC_ACCESS_TRANSITION = 0x03
    CONTROLLER_PATHING_ERROR = 0x60
    HOST_PATHING_ERROR = 0x70
    COMMAND_ABORTED_BY_HOST = 0x71


# The spec's words for each code.
_NAMES = {
    Sct.GENERIC: {
        0x00: "Successful Completion",
        0x01: "Invalid Command Opcode",
        0x02: "Invalid Field in Command",
        0x03: "Command ID Conflict",
        0x04: "Data Transfer Error",
        0x05: "Commands Aborted due to Power Loss Notification",
        0x06: "Internal Error",
        0x07: "Command Abort Requested",
        0x08: "Command Aborted due to SQ Deletion",
        0x09: "Command Aborted due to Failed Fused Command",
        0x0A: "Command Aborted due to Missing Fused Command",
        0x0B: "Invalid Namespace or Format",
        0x0C: "Command Sequence Error",
        0x0D: "Invalid SGL Segment Descriptor",
        0x0E: "Invalid Number of SGL Descriptors",
        0x0F: "Data SGL Length Invalid",
        0x10: "Metadata SGL Length Invalid",
        0x11: "SGL Descriptor Type Invalid",
        0x12: "Invalid Use of Controller Memory Buffer",
        0x13: "PRP Offset Invalid",
        0x14: "Atomic Write Unit Exceeded",
        0x15: "Operation Denied",
        0x16: "SGL Offset Invalid",
        0x18: "Host Identifier Inconsistent Format",
        0x19: "Keep Alive Timer Expired",
        0x1A: "Keep Alive Timeout Invalid",
        0x1B: "Command Aborted due to Preempt and Abort",
        0x1C: "Sanitize Failed",
        0x1D: "Sanitize In Progress",
        0x1E: "SGL Data Block Granularity Invalid",
        0x1F: "Command Not Supported for Queue in CMB",
        0x20: "Namespace is Write Protected",
        0x21: "Command Interrupted",
        0x22: "Transient Transport Error",
        0x23: "Command Prohibited by Command and Feature Lockdown",
        0x24: "Admin Command Media Not Ready",
        0x80: "LBA Out of Range",
        0x81: "Capacity Exceeded",
        0x82: "Namespace Not Ready",
        0x83: "Reservation Conflict",
        0x84: "Format In Progress",
    },
    Sct.COMMAND_SPECIFIC: {
        0x00: "Completion Queue Invalid",
        0x01: "Invalid Queue Identifier",
        0x02: "Invalid Queue Size",
        0x03: "Abort Command Limit Exceeded",
        0x05: "Asynchronous Event Request Limit Exceeded",
        0x06: "Invalid Firmware Slot",
        0x07: "Invalid Firmware Image",
        0x08: "Invalid Interrupt Vector",
        0x09: "Invalid Log Page",
        0x0A: "Invalid Format",
        0x0B: "Firmware Activation Requires Conventional Reset",
        0x0C: "Invalid Queue Deletion",
        0x0D: "Feature Identifier Not Saveable",
        0x0E: "Feature Not Changeable",
        0x0F: "Feature Not Namespace Specific",
        0x10: "Firmware Activation Requires NVM Subsystem Reset",
        0x11: "Firmware Activation Requires Controller Level Reset",
        0x12: "Firmware Activation Requires Maximum Time Violation",
        0x13: "Firmware Activation Prohibited",
        0x14: "Overlapping Range",
        0x15: "Namespace Insufficient Capacity",
        0x16: "Namespace Identifier Unavailable",
        0x18: "Namespace Already Attached",
        0x19: "Namespace Is Private",
        0x1A: "Namespace Not Attached",
        0x1B: "Thin Provisioning Not Supported",
        0x1C: "Controller List Invalid",
        0x1D: "Device Self-test In Progress",
        0x1E: "Boot Partition Write Prohibited",
        0x1F: "Invalid Controller Identifier",
        0x20: "Invalid Secondary Controller State",
        0x21: "Invalid Number of Controller Resources",
        0x22: "Invalid Resource Identifier",
        0x23: "Sanitize Prohibited While Persistent Memory Region is Enabled",
        0x24: "ANA Group Identifier Invalid",
        0x25: "ANA Attach Failed",
        0x26: "Insufficient Capacity",
        0x27: "Namespace Attachment Limit Exceeded",
        0x28: "Prohibition of Command Execution Not Supported",
        0x29: "I/O Command Set Not Supported",
        0x2A: "I/O Command Set Not Enabled",
        0x2B: "I/O Command Set Combination Rejected",
        0x2C: "Invalid I/O Command Set",
        0x2D: "Identifier Unavailable",
        0x80: "Conflicting Attributes",
        0x81: "Invalid Protection Information",
        0x82: "Attempted Write to Read Only Range",
        0x83: "Command Size Limit Exceeded",
    },
    Sct.MEDIA: {
        0x80: "Write Fault",
        0x81: "Unrecovered Read Error",
        0x82: "End-to-end Guard Check Error",
        0x83: "End-to-end Application Tag Check Error",
        0x84: "End-to-end Reference Tag Check Error",
        0x85: "Compare Failure",
        0x86: "Access Denied",
        0x87: "Deallocated or Unwritten Logical Block",
        0x88: "End-to-end Storage Tag Check Error",
    },
    Sct.PATH: {
        0x00: "Internal Path Error",
        0x01: "Asymmetric Access Persistent Loss",
        0x02: "Asymmetric Access Inaccessible",
        0x03: "Asymmetric Access Transition",
        0x60: "Controller Pathing Error",
        0x70: "Host Pathing Error",
        0x71: "Command Aborted By Host",
    },
}

_ENUMS = {Sct.GENERIC: Generic, Sct.COMMAND_SPECIFIC: CommandSpecific, Sct.MEDIA: Media,
          Sct.PATH: Path}
_SCT_SYMBOLS = {0: "GENERIC", 1: "COMMAND_SPECIFIC", 2: "MEDIA", 3: "PATH", 7: "VENDOR"}

# Codes that say the command itself is wrong, or that repeating it cannot give another answer:
# retrying them without a change is pointless even when the controller leaves DNR clear.
# Everything else (data transfer error, internal error, SQ deletion, namespace not ready, ANA
# transition, command interrupted, transient transport error, write fault / unrecovered read
# error...) is worth another try when DNR is clear: the controller sets DNR when it knows better.
PERMANENT = frozenset(
    [(Sct.GENERIC, c) for c in (
        0x01, 0x02, 0x03, 0x07, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10, 0x11, 0x12, 0x13,
        0x14, 0x15, 0x16, 0x18, 0x1A, 0x1B, 0x1C, 0x1E, 0x1F, 0x20, 0x23, 0x80, 0x81, 0x83)]
    + [(Sct.COMMAND_SPECIFIC, c) for c in _NAMES[Sct.COMMAND_SPECIFIC]]
    + [(Sct.MEDIA, c) for c in (0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88)]
    + [(Sct.PATH, c) for c in (0x01, 0x02, 0x71)]
)


def status_name(sct, sc):
    """The spec's name of a status, e.g. "Invalid Queue Identifier". Vendor specific and unknown
    codes: "SCT 7 SC 0xc0 (vendor specific)", "SCT 1 SC 0x7f (unknown)"."""
    name = _NAMES.get(sct, {}).get(sc)
    if name is not None:
        return name
    if sct == Sct.VENDOR or (sct in (Sct.GENERIC, Sct.COMMAND_SPECIFIC, Sct.MEDIA)
                             and sc >= 0xC0):
        return f"SCT {sct} SC 0x{sc:02x} (vendor specific)"
    return f"SCT {sct} SC 0x{sc:02x} (unknown)"


def status_symbol(sct, sc):
    """An identifier-like name: "GENERIC/ABORTED_SQ_DELETION", "MEDIA/COMPARE_FAILURE";
    unknown codes as "SCT1/SC_0x7f"."""
    enum_cls = _ENUMS.get(sct)
    if enum_cls is not None:
        try:
            return f"{_SCT_SYMBOLS[sct]}/{enum_cls(sc).name}"
        except ValueError:
            pass
    return f"SCT{sct}/SC_0x{sc:02x}"


def _check(value, bits, what):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise InvalidArgument(f"{what} must be an integer in 0..{(1 << bits) - 1}, not {value!r}")
    return value


@attrs.frozen
class NvmeStatus:
    """A completion status: Status Code Type, Status Code, Do Not Retry, More, Command Retry
    Delay. `NvmeStatus.decode(cqe_status)` reads it from the 16-bit status field of a completion
    (the phase tag in bit 0 is ignored); `encode(phase)` builds that field again."""
    sct: int = attrs.field(default=0)
    sc: int = attrs.field(default=0)
    dnr: bool = attrs.field(default=False, converter=bool)
    more: bool = attrs.field(default=False, converter=bool)
    crd: int = attrs.field(default=0)

    @sct.validator
    def _v_sct(self, attribute, value):
        _check(value, 3, "SCT")

    @sc.validator
    def _v_sc(self, attribute, value):
        _check(value, 8, "SC")

    @crd.validator
    def _v_crd(self, attribute, value):
        _check(value, 2, "CRD")

    @classmethod
    def decode(cls, status):
        """From the CQE status field (bits 15:0; bit 0, the phase tag, is ignored)."""
        _check(status, 16, "the CQE status field")
        return cls(sct=status >> 9 & 7, sc=status >> 1 & 0xFF, dnr=status >> 15 & 1,
                   more=status >> 14 & 1, crd=status >> 12 & 3)

    from_cqe_status = decode      # the name the queue pair uses

    @classmethod
    def of(cls, value):
        """Accept an NvmeStatus, an (sct, sc) pair, or a status-code enum member
        (`Generic.INVALID_FIELD`, `Media.COMPARE_FAILURE`...)."""
        if isinstance(value, NvmeStatus):
            return value
        for sct, enum_cls in _ENUMS.items():
            if isinstance(value, enum_cls):
                return cls(int(sct), int(value))
        if isinstance(value, tuple) and len(value) == 2:
            return cls(int(value[0]), int(value[1]))
        raise InvalidArgument(f"not a status: {value!r} (give NvmeStatus, (sct, sc) or an enum "
                              "member such as status.Generic.INVALID_FIELD)")

    def encode(self, phase=0):
        return ((phase & 1) | self.sc << 1 | self.sct << 9 | self.crd << 12
                | int(self.more) << 14 | int(self.dnr) << 15)

    @property
    def code(self):
        """SCT and SC as one number, (SCT << 8) | SC, as `status_code()` in spec.pxd."""
        return self.sct << 8 | self.sc

    @property
    def ok(self):
        return self.sct == 0 and self.sc == 0

    @property
    def name(self):
        return status_name(self.sct, self.sc)

    @property
    def symbol(self):
        return status_symbol(self.sct, self.sc)

    @property
    def permanent(self):
        return (self.sct, self.sc) in PERMANENT

    @property
    def retryable(self):
        """Worth submitting again: an error, DNR clear, and not a code that cannot change."""
        return not self.ok and not self.dnr and not self.permanent

    def matches(self, other):
        """Same SCT and SC as `other` (anything `NvmeStatus.of` accepts)."""
        other = NvmeStatus.of(other)
        return self.sct == other.sct and self.sc == other.sc

    def __str__(self):
        flags = "".join(f", {f}" for f, on in (("DNR", self.dnr), ("More", self.more)) if on)
        if self.crd:
            flags += f", CRD {self.crd}"
        return f"{self.name} (SCT {self.sct:x}h, SC {self.sc:02x}h{flags})"


SUCCESS = NvmeStatus()
