"""env.crc32c: RFC 3720's test vectors (appendix B.4) for both implementations, chaining, every
alignment and length against the bitwise definition, and bad arguments."""
import random

import pytest

from env import crc32c as mod
from env.crc32c import crc32c
from env.errors import InvalidArgument

IMPLS = ["table"] + (["sse4.2"] if mod.cpu_has_sse42() else [])

# RFC 3720, B.4: the CRC as transmitted (little-endian bytes) -> as a number
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000")
VECTORS = [
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (ISCSI_READ_PDU, 0xD9963A56),
    (b"123456789", 0xE3069283),          # the usual check value
    (b"", 0),
]


def bitwise(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.fixture(params=IMPLS)
def impl(request):
    mod.set_implementation(request.param)
    yield request.param
    mod.set_implementation("auto")


@pytest.mark.parametrize("data,want", VECTORS, ids=["zeros", "ones", "inc", "dec", "iscsi", "check",
                                                    "empty"])
def test_rfc3720_vectors(impl, data, want):
    assert crc32c(data) == want


def test_every_alignment_and_length_matches_the_definition(impl):
    rng = random.Random(7)
    blob = rng.randbytes(300)
    for start in range(9):
        for length in list(range(0, 40)) + [63, 64, 65, 127, 200, 291 - start]:
            piece = blob[start:start + length]
            assert crc32c(memoryview(blob)[start:start + length]) == bitwise(piece)


def test_chaining(impl):
    rng = random.Random(3)
    data = rng.randbytes(5000)
    for cut in (0, 1, 7, 8, 4095, 4999, 5000):
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)


def test_both_implementations_agree():
    data = random.Random(1).randbytes(1 << 16)
    results = set()
    for name in IMPLS:
        mod.set_implementation(name)
        results.add(crc32c(data))
    mod.set_implementation("auto")
    assert len(results) == 1


def test_sse42_is_chosen_when_the_cpu_has_it():
    mod.set_implementation("auto")
    assert mod.implementation() == ("sse4.2" if mod.cpu_has_sse42() else "table")


def test_bad_arguments():
    with pytest.raises(InvalidArgument, match="bytes-like"):
        crc32c("text")
    with pytest.raises(InvalidArgument, match="32-bit"):
        crc32c(b"x", -1)
    with pytest.raises(InvalidArgument, match="auto, table or sse4.2"):
        mod.set_implementation("fast")


def test_buffers_of_any_shape():
    import array
    a = array.array("I", [1, 2, 3])
    assert crc32c(a) == crc32c(a.tobytes())
    assert crc32c(bytearray(b"123456789")) == 0xE3069283
