"""Log pages (Base 5.16.1): Error Information, SMART / Health Information, Firmware Slot
Information. `parse(data)` reads what Get Log Page returned; `pack()` builds it (the emulated
controller serves its log pages from these classes). `to_dict()` uses nvme-cli 2.4's JSON keys
(`nvme error-log / smart-log -o json`), `format_text()` gives readable `key : value` lines.
"""
import struct

import attrs

from env.errors import InvalidArgument
from nvme.spec import Structure, as_bytes, field_at
from nvme.status import NvmeStatus

ERROR_ENTRY_SIZE = 64
SMART_LOG_SIZE = 512
FIRMWARE_SLOT_LOG_SIZE = 512


# ---- Error Information (Log Identifier 01h, Base 5.16.1.2) -------------------------------------
@attrs.define
class ErrorInformationEntry(Structure):
    """One 64-byte Error Information Log Entry (Base figure "Error Information Log Entry Data
    Structure"). `status_field` is raw: the phase tag in bit 0, the status above it."""
    _text_width = 20

    error_count: int = field_at(0, "u64")
    sqid: int = field_at(8, "u16")
    cmdid: int = field_at(10, "u16", "hex")
    status_field: int = field_at(12, "u16", "hex")
    parm_error_location: int = field_at(14, "u16", "hex")
    lba: int = field_at(16, "u64")
    nsid: int = field_at(24, "u32")
    vs: int = field_at(28, "u8")
    trtype: int = field_at(29, "u8")
    cs: int = field_at(32, "u64", "hex")
    trtype_spec_info: int = field_at(40, "u16", "hex")
    log_page_version: int = field_at(63, "u8")

    @classmethod
    def parse(cls, data):
        return cls(**cls._parse_fields(as_bytes(data, ERROR_ENTRY_SIZE,
                                                "error information log entry")))

    def pack(self):
        buf = bytearray(ERROR_ENTRY_SIZE)
        self._pack_fields(buf)
        return bytes(buf)

    @property
    def status(self):
        return NvmeStatus.decode(self.status_field)

    @property
    def phase_tag(self):
        return self.status_field & 1

    @property
    def empty(self):
        """Entries past the ones the controller has logged read as zero (error count 0)."""
        return self.error_count == 0

    def to_dict(self):
        out = self._dict_fields()
        out["status_field"] = self.status_field >> 1
        out["phase_tag"] = self.status_field & 1
        return out

    def format_text(self):
        lines = self._text_lines()
        lines.append(f"{'status':<{self._text_width}}: {self.status}")
        return "\n".join(lines) + "\n"


@attrs.define
class ErrorInformationLog:
    """The entries of an Error Information log page (a multiple of 64 bytes; newest first)."""
    entries: list = attrs.field(factory=list)

    @classmethod
    def parse(cls, data):
        view = memoryview(data).cast("B")
        if view.nbytes == 0 or view.nbytes % ERROR_ENTRY_SIZE:
            raise InvalidArgument(f"an Error Information log is a multiple of 64 bytes, got "
                                  f"{view.nbytes}")
        return cls([ErrorInformationEntry.parse(view[i:i + ERROR_ENTRY_SIZE])
                    for i in range(0, view.nbytes, ERROR_ENTRY_SIZE)])

    def pack(self, entries=None):
        """The log with `entries` slots (default: as many as there are entries); unused slots are
        zero."""
        n = len(self.entries) if entries is None else entries
        if n < len(self.entries):
            raise InvalidArgument(f"{len(self.entries)} entries do not fit in {n} slots")
        return b"".join(e.pack() for e in self.entries).ljust(n * ERROR_ENTRY_SIZE, b"\0")

    @property
    def valid_entries(self):
        return [e for e in self.entries if not e.empty]

    def to_dict(self):
        return {"errors": [e.to_dict() for e in self.entries]}

    def format_text(self):
        out = []
        for i, e in enumerate(self.valid_entries):
            out.append(f" Entry[{i:2d}]\n" + e.format_text())
        return "".join(out) or "no errors logged\n"


def parse_error_log(data):
    """The logged entries (error count not zero) of an Error Information log page."""
    return ErrorInformationLog.parse(data).valid_entries


# ---- SMART / Health Information (Log Identifier 02h, Base 5.16.1.3) ----------------------------
@attrs.define
class SmartLog(Structure):
    """SMART / Health Information (Base figure "SMART / Health Information Log Page").
    Temperatures are in kelvins. Data units are thousands of 512-byte units, rounded up
    (`data_units_to_bytes`). 128-bit counters are plain integers."""
    _text_width = 38

    critical_warning: int = field_at(0, "u8", "hex")
    temperature: int = field_at(1, "u16")
    avail_spare: int = field_at(3, "u8")
    spare_thresh: int = field_at(4, "u8")
    percent_used: int = field_at(5, "u8")
    endurance_grp_critical_warning_summary: int = field_at(6, "u8", "hex")
    data_units_read: int = field_at(32, "u128")
    data_units_written: int = field_at(48, "u128")
    host_read_commands: int = field_at(64, "u128")
    host_write_commands: int = field_at(80, "u128")
    controller_busy_time: int = field_at(96, "u128")
    power_cycles: int = field_at(112, "u128")
    power_on_hours: int = field_at(128, "u128")
    unsafe_shutdowns: int = field_at(144, "u128")
    media_errors: int = field_at(160, "u128")
    num_err_log_entries: int = field_at(176, "u128")
    warning_temp_time: int = field_at(192, "u32")
    critical_comp_time: int = field_at(196, "u32")
    temperature_sensors: list = attrs.field(factory=lambda: [0] * 8)
    thm_temp1_trans_count: int = field_at(216, "u32")
    thm_temp2_trans_count: int = field_at(220, "u32")
    thm_temp1_total_time: int = field_at(224, "u32")
    thm_temp2_total_time: int = field_at(228, "u32")

    # Critical Warning bits
    WARN_SPARE = 1 << 0
    WARN_TEMPERATURE = 1 << 1
    WARN_RELIABILITY = 1 << 2
    WARN_READ_ONLY = 1 << 3
    WARN_VOLATILE_BACKUP = 1 << 4
    WARN_PMR_READ_ONLY = 1 << 5

    @classmethod
    def parse(cls, data):
        data = as_bytes(data, SMART_LOG_SIZE, "SMART / Health Information log")
        fields = cls._parse_fields(data)
        fields["temperature_sensors"] = list(struct.unpack_from("<8H", data, 200))
        return cls(**fields)

    def pack(self):
        buf = bytearray(SMART_LOG_SIZE)
        self._pack_fields(buf)
        sensors = list(self.temperature_sensors)
        if len(sensors) != 8 or not all(isinstance(t, int) and 0 <= t <= 0xFFFF for t in sensors):
            raise InvalidArgument("temperature_sensors: eight 16-bit values (kelvins, 0 = none)")
        struct.pack_into("<8H", buf, 200, *sensors)
        return bytes(buf)

    @staticmethod
    def data_units_to_bytes(units):
        """Upper bound of the bytes a data unit count stands for (1 unit = 1000 * 512 bytes)."""
        return units * 512000

    @staticmethod
    def bytes_to_data_units(nbytes):
        """Data units as the controller reports them: 512-byte units / 1000, rounded up."""
        units_512 = -(-nbytes // 512)
        return -(-units_512 // 1000)

    @property
    def temperature_celsius(self):
        return self.temperature - 273 if self.temperature else None

    def to_dict(self):
        out = self._dict_fields()
        for i, t in enumerate(self.temperature_sensors):
            if t:
                out[f"temperature_sensor_{i + 1}"] = t
        return out

    def format_text(self):
        lines = self._text_lines()
        for i, t in enumerate(self.temperature_sensors):
            if t:
                lines.append(f"{f'temperature_sensor_{i + 1}':<{self._text_width}}: {t} K")
        return "\n".join(lines) + "\n"


# ---- Firmware Slot Information (Log Identifier 03h, Base 5.16.1.4) -----------------------------
@attrs.define
class FirmwareSlotLog:
    """Firmware Slot Information: the active slot (AFI bits 2:0), the slot activated at the next
    reset (bits 6:4, 0 = none), and the revision in each of the seven slots ("" = empty)."""
    afi: int = 0
    frs: list = attrs.field(factory=lambda: [""] * 7)

    @classmethod
    def parse(cls, data):
        data = as_bytes(data, FIRMWARE_SLOT_LOG_SIZE, "Firmware Slot Information log")
        slots = []
        for i in range(7):
            raw = data[8 + 8 * i:16 + 8 * i]
            slots.append(raw.split(b"\0", 1)[0].decode("ascii", "replace").rstrip(" "))
        return cls(data[0], slots)

    def pack(self):
        if len(self.frs) != 7:
            raise InvalidArgument("frs: exactly seven firmware slots")
        if not 0 <= self.afi <= 0xFF:
            raise InvalidArgument(f"afi {self.afi!r} does not fit in a byte")
        buf = bytearray(FIRMWARE_SLOT_LOG_SIZE)
        buf[0] = self.afi
        for i, rev in enumerate(self.frs):
            raw = rev.encode("ascii")
            if len(raw) > 8:
                raise InvalidArgument(f"firmware revision {rev!r} is longer than 8 characters")
            if raw:
                buf[8 + 8 * i:16 + 8 * i] = raw.ljust(8, b" ")
        return bytes(buf)

    @property
    def active_slot(self):
        return self.afi & 7

    @property
    def next_slot(self):
        return self.afi >> 4 & 7

    @property
    def active_revision(self):
        slot = self.active_slot
        return self.frs[slot - 1] if 1 <= slot <= 7 else None

    def to_dict(self):
        out = {"Active Firmware Slot (afi)": self.afi}
        for i, rev in enumerate(self.frs):
            if rev:
                raw = rev.encode("ascii").ljust(8, b" ")
                out[f"Firmware Rev Slot {i + 1}"] = (
                    f"{int.from_bytes(raw, 'little')} ({rev.ljust(8)})")
        return out

    def format_text(self):
        lines = [f"afi  : {self.afi:#x}"]
        lines += [f"frs{i + 1} : {rev}" for i, rev in enumerate(self.frs) if rev]
        return "\n".join(lines) + "\n"
