"""CRC32C: RFC 3720 (iSCSI) appendix B.4 vectors, on both implementations, and continuation."""
import os

import pytest

from blob import crc32c as mod
from blob.crc32c import crc32c, crc32c_hw, crc32c_table

# RFC 3720, B.4 "CRC Examples" (the CRC as the integer the iSCSI digest field holds)
ISCSI_READ_PDU = bytes.fromhex(              # an iSCSI SCSI Read (10) command PDU
    "01c00000" "00000000" "00000000" "00000000" "14000000" "00000400"
    "00000014" "00000018" "28000000" "00000000" "02000000" "00000000")
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (ISCSI_READ_PDU, 0xD9963A56),
    (b"123456789", 0xE3069283),          # the common check value
    (b"", 0),
]

IMPLS = [crc32c, crc32c_table]
if mod.implementation() == "sse4.2":
    IMPLS.append(crc32c_hw)


@pytest.mark.parametrize("fn", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("data,want", VECTORS, ids=range(len(VECTORS)))
def test_rfc3720_vectors(fn, data, want):
    assert fn(data) == want


@pytest.mark.parametrize("fn", IMPLS, ids=lambda f: f.__name__)
def test_every_length_and_alignment_agrees_with_the_bitwise_definition(fn):
    def bitwise(data):
        c = 0xFFFFFFFF
        for byte in data:
            c ^= byte
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        return c ^ 0xFFFFFFFF
    blob = os.urandom(80)
    for start in range(9):
        for n in range(0, 40):
            chunk = blob[start:start + n]
            assert fn(memoryview(blob)[start:start + n]) == bitwise(chunk)


def test_continuation_and_buffer_types():
    data = os.urandom(10000)
    whole = crc32c(data)
    assert crc32c(data[3333:], crc32c(data[:3333])) == whole
    assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == whole
    assert crc32c_table(data) == whole


def test_hw_refused_where_the_cpu_lacks_it():
    if mod.implementation() == "sse4.2":
        pytest.skip(reason="this CPU has SSE4.2 (the refusal is for CPUs without it)")
    with pytest.raises(Exception, match="SSE4.2"):
        crc32c_hw(b"x")
