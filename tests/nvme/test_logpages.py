"""nvme.logpages: offsets against hand-built pages, round trips, nvme-cli dict keys."""
import struct

import pytest
from hypothesis import given, strategies as st

from env.errors import InvalidArgument
from nvme.logpages import (ErrorInformationEntry, ErrorInformationLog, FirmwareSlotLog, SmartLog,
                           parse_error_log)
from nvme.status import NvmeStatus


def test_error_entry_offsets():
    raw = bytearray(64)
    struct.pack_into("<QHHHHQI", raw, 0, 42, 1, 0x1234, (0x80 << 1) | 1, 0x28, 0x1000, 1)
    raw[28], raw[29] = 1, 0
    struct.pack_into("<QH", raw, 32, 0xAB, 7)
    raw[63] = 1
    e = ErrorInformationEntry.parse(bytes(raw))
    assert (e.error_count, e.sqid, e.cmdid, e.parm_error_location, e.lba, e.nsid) == (
        42, 1, 0x1234, 0x28, 0x1000, 1)
    assert e.status == NvmeStatus(0, 0x80) and e.phase_tag == 1
    assert (e.vs, e.cs, e.trtype_spec_info, e.log_page_version) == (1, 0xAB, 7, 1)
    assert e.pack() == bytes(raw)
    d = e.to_dict()
    assert d["status_field"] == 0x80 and d["phase_tag"] == 1 and d["cmdid"] == 0x1234
    assert "LBA Out of Range" in e.format_text()


def test_error_log():
    entries = [ErrorInformationEntry(error_count=n, sqid=1, cmdid=n) for n in (3, 2, 1)]
    raw = ErrorInformationLog(entries).pack(entries=8)
    assert len(raw) == 8 * 64
    log = ErrorInformationLog.parse(raw)
    assert log.valid_entries == entries and len(log.entries) == 8
    assert parse_error_log(raw) == entries
    assert ErrorInformationLog([]).format_text() == "no errors logged\n"
    with pytest.raises(InvalidArgument):
        ErrorInformationLog.parse(bytes(100))
    with pytest.raises(InvalidArgument):
        ErrorInformationLog(entries).pack(entries=2)


def test_smart_offsets():
    raw = bytearray(512)
    raw[0] = 0x02                                     # temperature warning
    struct.pack_into("<H", raw, 1, 310)               # composite temperature, kelvins
    raw[3], raw[4], raw[5] = 100, 10, 3
    for i, off in enumerate(range(32, 192, 16)):      # ten 128-bit counters
        struct.pack_into("<QQ", raw, off, 1000 + i, 1 if i == 0 else 0)
    struct.pack_into("<II", raw, 192, 5, 6)
    struct.pack_into("<8H", raw, 200, 300, 301, 0, 0, 0, 0, 0, 0)
    struct.pack_into("<IIII", raw, 216, 1, 2, 3, 4)
    s = SmartLog.parse(bytes(raw))
    assert s.critical_warning == SmartLog.WARN_TEMPERATURE and s.temperature == 310
    assert s.temperature_celsius == 37
    assert (s.avail_spare, s.spare_thresh, s.percent_used) == (100, 10, 3)
    assert s.data_units_read == 1000 + (1 << 64)
    assert (s.data_units_written, s.host_read_commands, s.host_write_commands,
            s.controller_busy_time, s.power_cycles, s.power_on_hours, s.unsafe_shutdowns,
            s.media_errors, s.num_err_log_entries) == tuple(range(1001, 1010))
    assert (s.warning_temp_time, s.critical_comp_time) == (5, 6)
    assert s.temperature_sensors[:2] == [300, 301]
    assert (s.thm_temp1_trans_count, s.thm_temp2_total_time) == (1, 4)
    assert s.pack() == bytes(raw)
    d = s.to_dict()
    assert d["temperature"] == 310 and d["avail_spare"] == 100
    assert d["temperature_sensor_1"] == 300 and "temperature_sensor_3" not in d
    assert d["endurance_grp_critical_warning_summary"] == 0


def test_data_units():
    assert SmartLog.bytes_to_data_units(0) == 0
    assert SmartLog.bytes_to_data_units(1) == 1            # rounded up
    assert SmartLog.bytes_to_data_units(512000) == 1
    assert SmartLog.bytes_to_data_units(512001) == 2
    assert SmartLog.data_units_to_bytes(3) == 1536000


def test_firmware_slot_log():
    raw = bytearray(512)
    raw[0] = 0x21                         # active slot 1, slot 2 at next reset
    raw[8:16] = b"1.0     "
    raw[16:24] = b"2.0-rc1 "
    f = FirmwareSlotLog.parse(bytes(raw))
    assert f.active_slot == 1 and f.next_slot == 2 and f.active_revision == "1.0"
    assert f.frs == ["1.0", "2.0-rc1", "", "", "", "", ""]
    assert f.pack() == bytes(raw)
    d = f.to_dict()
    assert d["Active Firmware Slot (afi)"] == 0x21
    assert d["Firmware Rev Slot 1"].endswith("(1.0     )") and "Firmware Rev Slot 3" not in d
    with pytest.raises(InvalidArgument):
        FirmwareSlotLog(frs=["123456789"] + [""] * 6).pack()


def test_short_pages_are_refused():
    for cls in (SmartLog, FirmwareSlotLog):
        with pytest.raises(InvalidArgument, match="512 bytes needed"):
            cls.parse(bytes(511))
    with pytest.raises(InvalidArgument, match="64 bytes needed"):
        ErrorInformationEntry.parse(bytes(10))


u128 = st.integers(0, (1 << 128) - 1)


@given(st.builds(SmartLog, critical_warning=st.integers(0, 255),
                 temperature=st.integers(0, 0xFFFF), data_units_read=u128,
                 data_units_written=u128, host_read_commands=u128, media_errors=u128,
                 power_on_hours=u128, warning_temp_time=st.integers(0, 0xFFFFFFFF),
                 temperature_sensors=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8)))
def test_smart_round_trip(log):
    assert SmartLog.parse(log.pack()) == log


@given(st.builds(ErrorInformationEntry, error_count=st.integers(0, (1 << 64) - 1),
                 sqid=st.integers(0, 0xFFFF), cmdid=st.integers(0, 0xFFFF),
                 status_field=st.integers(0, 0xFFFF), lba=st.integers(0, (1 << 64) - 1),
                 nsid=st.integers(0, 0xFFFFFFFF), cs=st.integers(0, (1 << 64) - 1)))
def test_error_entry_round_trip(entry):
    assert ErrorInformationEntry.parse(entry.pack()) == entry


@given(st.integers(0, 255), st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8),
    min_size=7, max_size=7))
def test_firmware_round_trip(afi, frs):
    log = FirmwareSlotLog(afi, frs)
    assert FirmwareSlotLog.parse(log.pack()) == log
