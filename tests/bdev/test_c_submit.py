"""bdev_submit, the C entry engines and Cython callers use: its fast path (a plain read or
write) and the general one (everything else) give the same answers, and every accepted I/O
completes exactly once."""
import errno
import threading

import pytest

import bdev
from bdev import null
from bdev._testing import CSubmitter
from env import memory
from tests.bdev.helpers import make_stack, open_malloc, poll_until, teardown


@pytest.fixture
def mall():
    stack = open_malloc("MallocC", size=1 << 20)
    yield stack
    teardown(*stack)


def test_fast_path_round_trip(mall):
    b, desc, ch = mall
    s = CSubmitter()
    src = memory.allocate(4096)
    memoryview(src)[:] = bytes(range(256)) * 16
    dst = memory.allocate(4096, zero=True)
    assert s.submit(desc, ch, "write", 8, 8, src) == 0
    assert s.submit(desc, ch, "read", 8, 8, dst) == 0
    poll_until(lambda: s.completed == 2)
    assert s.succeeded == 2 and bytes(dst) == bytes(src)
    for _ in range(3):
        ch.poll_now()
    assert s.completed == 2                       # exactly once


@pytest.mark.parametrize("offset, nblocks", [(0, 0), (2048, 1), (2047, 2), (2**64 - 1, 1)])
def test_range_refused(mall, offset, nblocks):
    b, desc, ch = mall
    assert b.num_blocks == 2048
    s = CSubmitter()
    buf = memory.allocate(4096)
    assert s.submit(desc, ch, "read", offset, nblocks, buf) == -errno.ERANGE
    assert s.submit(desc, ch, "write", offset, nblocks, buf) == -errno.ERANGE
    assert s.completed == 0


def test_refusals_name_the_reason(mall):
    b, desc, ch = mall
    s = CSubmitter()
    buf = memory.allocate(4096)
    ro = bdev.open_bdev("MallocC")
    assert s.submit(ro, ch, "write", 0, 1, buf) == -errno.EACCES
    assert s.submit(ro, ch, "write_zeroes", 0, 1) == -errno.EACCES
    assert s.submit(ro, ch, "read", 0, 1, buf) == 0           # reads are fine
    ro.close()
    assert s.submit(ro, ch, "read", 0, 1, buf) == -errno.EBADF
    other = null.create("NullC", size=1 << 20)
    od = bdev.open_bdev("NullC")
    assert s.submit(od, ch, "read", 0, 1, buf) == -errno.EINVAL   # a channel of another bdev
    od.close()
    other.unregister()
    rc = []
    t = threading.Thread(target=lambda: rc.append(s.submit(desc, ch, "read", 0, 1, buf)))
    t.start()
    t.join()
    assert rc == [-errno.EXDEV]
    poll_until(lambda: s.completed == 1)
    b.unregister()
    assert s.submit(desc, ch, "read", 0, 1, buf) == -errno.ENODEV
    assert s.completed == 1


def test_unsupported_type_and_emulated_write_zeroes():
    b, desc, ch = make_stack("RecC", io_types=("read", "write"))
    try:
        s = CSubmitter()
        assert s.submit(desc, ch, "unmap", 0, 8) == -errno.EOPNOTSUPP
        assert s.submit(desc, ch, "flush", 0, 8) == -errno.EOPNOTSUPP
        b.data[:4096] = b"\xff" * 4096
        assert s.submit(desc, ch, "write_zeroes", 0, 8) == 0     # as writes of zeroes
        poll_until(lambda: s.completed == 1)
        assert s.succeeded == 1 and bytes(b.data[:4096]) == bytes(4096)
    finally:
        teardown(b, desc, ch)


def test_misaligned_buffer_bounces():
    b, desc, ch = make_stack("RecAl", required_alignment=512)
    try:
        s = CSubmitter()
        buf = memory.allocate(8192)
        memoryview(buf)[4:4 + 4096] = b"\x5a" * 4096
        assert s.submit(desc, ch, "write", 16, 8, buf, offset_in_buf=4) == 0
        poll_until(lambda: s.completed == 1)
        assert s.succeeded == 1 and bytes(b.data[16 * 512:24 * 512]) == b"\x5a" * 4096
        # the module only ever saw the aligned bounce buffer
        assert all(a % 512 == 0 for a in b.addresses)
    finally:
        teardown(b, desc, ch)


def test_split_at_boundary_and_max_transfer_completes_once():
    b, desc, ch = make_stack("RecSplit", optimal_io_boundary=8, split_on_optimal_io_boundary=True,
                             max_transfer_blocks=4)
    try:
        s = CSubmitter()
        buf = memory.allocate(16 * 512)
        memoryview(buf)[:] = bytes(range(256)) * 32
        assert s.submit(desc, ch, "write", 6, 16, buf) == 0
        poll_until(lambda: s.completed == 1)
        assert s.succeeded == 1 and bytes(b.data[6 * 512:22 * 512]) == bytes(buf)
        # children: up to the boundary at 8, then at most 4 blocks, never across 16
        assert [(o, n) for _, o, n in b.requests] == [(6, 2), (8, 4), (12, 4), (16, 4), (20, 2)]
    finally:
        teardown(b, desc, ch)
