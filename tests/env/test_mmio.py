"""Mmio: register access over plain memory (how emulated devices present their BARs)."""
import mmap
import os

import pytest

from env.errors import EnvError, InvalidArgument
from env.mmio import Mmio


def test_registers_over_a_buffer_are_little_endian_and_exact():
    mem = bytearray(64)
    regs = Mmio.over(mem, name="fake-bar")
    regs.w32(0x14, 0x00460001)
    regs.w64(0x28, 0x1122334455667788)
    assert mem[0x14:0x18] == bytes.fromhex("01004600")
    assert regs.r64(0x28) == 0x1122334455667788 and regs.r32(0x2C) == 0x11223344


@pytest.mark.parametrize("off,width", [(2, 4), (60, 8), (64, 4), (4, 8)])
def test_out_of_range_or_misaligned_access_is_refused(off, width):
    regs = Mmio.over(bytearray(64))
    with pytest.raises(InvalidArgument):
        (regs.r32 if width == 4 else regs.r64)(off)


def test_closed_window_is_refused():
    regs = Mmio.over(bytearray(16))
    regs.close()
    with pytest.raises(EnvError, match="closed"):
        regs.r32(0)


def test_map_fd_maps_a_file(tmp_path):
    p = tmp_path / "bar"
    p.write_bytes(bytes(8192))
    fd = os.open(p, os.O_RDWR)
    try:
        regs = Mmio.map_fd(fd, 8192, 4096, name="file-bar")
        regs.w32(8, 0xDEADBEEF)
        regs.close()
    finally:
        os.close(fd)
    assert p.read_bytes()[4096 + 8:4096 + 12] == bytes.fromhex("efbeadde")


def test_map_fd_errors_are_exceptions(tmp_path):
    with pytest.raises(EnvError, match="mmap"):
        Mmio.map_fd(-1, 4096)
    with pytest.raises(InvalidArgument):
        Mmio.map_fd(0, 0)
