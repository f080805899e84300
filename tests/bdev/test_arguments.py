"""Bad input to the bdev Python API gets a typed userblk error that names the argument (never a
bare OverflowError, TypeError or ZeroDivisionError from a C conversion), and I/O on a channel
that is gone says what happened to it."""
import errno

import pytest

import bdev
from bdev import malloc, null
from bdev._testing import CSubmitter
from bdev.core import Bdev, blocks_of
from bdev.errors import BdevError, ChannelReleased
from env import memory
from env.errors import InvalidArgument, ThreadError
from env.thread import Thread
from tests.bdev.helpers import open_malloc, teardown



@pytest.fixture
def mall():
    stack = open_malloc("MallocArgs", size=1 << 20)
    yield stack
    teardown(*stack)


# ---- negative or non-integer offsets, lengths and sizes -------------------------------------------
CALLS = {
    "read.offset": lambda d, ch: d.read(ch, bytearray(512), -512),
    "read.nbytes": lambda d, ch: d.read(ch, bytearray(512), 0, -512),
    "write.offset": lambda d, ch: d.write(ch, bytes(512), -1),
    "compare.offset": lambda d, ch: d.compare(ch, bytes(512), -512),
    "readv.offset": lambda d, ch: d.readv(ch, [bytearray(512)], -512),
    "writev.offset": lambda d, ch: d.writev(ch, [bytes(512)], -512),
    "write_zeroes.offset": lambda d, ch: d.write_zeroes(ch, -512, 512),
    "write_zeroes.nbytes": lambda d, ch: d.write_zeroes(ch, 0, -512),
    "unmap.offset": lambda d, ch: d.unmap(ch, -512, 512),
    "unmap.nbytes": lambda d, ch: d.unmap(ch, 0, -512),
    "flush.offset": lambda d, ch: d.flush(ch, offset=-512, nbytes=512),
    "flush.nbytes": lambda d, ch: d.flush(ch, offset=0, nbytes=-512),
    "read_blocks.offset_blocks": lambda d, ch: d.read_blocks(ch, bytearray(512), -1, 1),
    "read_blocks.num_blocks": lambda d, ch: d.read_blocks(ch, bytearray(512), 0, -1),
    "write_blocks.offset_blocks": lambda d, ch: d.write_blocks(ch, bytes(512), -1, 1),
    "unmap_blocks.num_blocks": lambda d, ch: d.unmap_blocks(ch, 0, -3),
    "write_zeroes_blocks.offset_blocks": lambda d, ch: d.write_zeroes_blocks(ch, -3, 1),
    "submit.offset_blocks": lambda d, ch: d.submit(ch, "read", bytearray(512), -1, 1),
    "submit.num_blocks": lambda d, ch: d.submit(ch, "read", bytearray(512), 0, 2**64),
    "submitv.offset_blocks": lambda d, ch: d.submitv(ch, "read", [bytearray(512)], -1),
    "read.offset_str": lambda d, ch: d.read(ch, bytearray(512), "0"),
    "read_blocks.float": lambda d, ch: d.read_blocks(ch, bytearray(512), 1.5, 1),
    "submit.io_type_int": lambda d, ch: d.submit(ch, 300, None, 0, 1),
    "submit.io_type_neg": lambda d, ch: d.submit(ch, -1, None, 0, 1),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_bad_numbers_in_io_calls_are_invalid_arguments(mall, call):
    b, desc, ch = mall
    arg = call.split(".")[1].replace("_str", "").replace("_int", "").replace("_neg", "")
    arg = {"float": "offset_blocks"}.get(arg, arg)
    with pytest.raises(InvalidArgument, match=arg.replace("io_type", "I/O type")):
        CALLS[call](desc, ch)
    assert ch.outstanding == 0 and ch.free_io_count == b.channel_ios


@pytest.mark.parametrize("kw,arg", [
    (dict(size="64M"), "size"), (dict(size=-4096), "size"), (dict(size=4096.0), "size"),
    (dict(num_blocks=-1), "num_blocks"), (dict(num_blocks="8"), "num_blocks"),
    (dict(num_blocks=0), "block"), (dict(size=0), "block"),
    (dict(size=4096, block_size=0), "block_size"), (dict(num_blocks=8, block_size=0), "block"),
    (dict(size=4096, block_size=-512), "block_size"),
    (dict(size=4096, block_size="512"), "block_size"),
    (dict(size=4096, block_size=2**40), "block_size"),
    (dict(num_blocks=8, optimal_io_boundary=-1), "optimal_io_boundary"),
])
def test_malloc_create_refuses_bad_sizes(kw, arg):
    with pytest.raises(InvalidArgument, match=arg):
        malloc.create("MallocBad", **kw)
    with pytest.raises(bdev.BdevNotFound):
        bdev.get_bdev("MallocBad")


@pytest.mark.parametrize("kw,arg", [
    (dict(size="1G"), "size"), (dict(num_blocks=-8), "num_blocks"),
    (dict(num_blocks=8, block_size=0), "block"), (dict(size=4096, block_size=0), "block_size"),
    (dict(num_blocks=8, md_size=-8), "md_size"), (dict(num_blocks=2**64), "num_blocks"),
])
def test_null_create_refuses_bad_sizes(kw, arg):
    with pytest.raises(InvalidArgument, match=arg):
        null.create("NullBad", **kw)


@pytest.mark.parametrize("field", ["block_size", "num_blocks", "write_unit_size",
                                   "optimal_io_boundary", "max_transfer_blocks",
                                   "required_alignment", "md_size"])
@pytest.mark.parametrize("value", [-1, "7", 2**70, None, 2.0])
def test_bdev_geometry_is_validated_by_name(field, value):
    kw = dict(block_size=512, num_blocks=8, module="test", io_types=("read",))
    kw[field] = value
    with pytest.raises(InvalidArgument, match=field):
        Bdev("BadGeometry", **kw)


def test_blocks_of():
    assert blocks_of(None, 4096, 512) == 8 and blocks_of(3, None, 512) == 3
    for args, arg in (((None, "4096", 512), "size"), ((None, 4096, 0), "block_size"),
                      ((None, 4096, "512"), "block_size"), ((-1, None, 512), "num_blocks"),
                      ((None, 1000, 512), "multiple")):
        with pytest.raises(InvalidArgument, match=arg):
            blocks_of(*args)


def test_non_string_bdev_names_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match="name"):
        bdev.open_bdev(["Malloc0"])
    with pytest.raises(InvalidArgument, match="name"):
        bdev.get_bdev(42)


# ---- flush is a ranged I/O ---------------------------------------------------------------------
@pytest.mark.parametrize("offset,nbytes", [(0, 0), (1 << 20, 512), (512, 1 << 20),
                                           (1 << 20, 0)])
def test_flush_beyond_the_end_or_of_nothing_is_refused(mall, offset, nbytes):
    b, desc, ch = mall
    with pytest.raises(InvalidArgument, match="flush"):
        desc.flush(ch, offset=offset, nbytes=nbytes)
    assert ch.outstanding == 0


def test_flush_range_on_the_c_path(mall):
    b, desc, ch = mall
    s = CSubmitter()
    assert s.submit(desc, ch, "flush", 0, 0) == -errno.ERANGE
    assert s.submit(desc, ch, "flush", b.num_blocks - 1, 2) == -errno.ERANGE
    assert s.submit(desc, ch, "flush", 0, b.num_blocks) == 0
    desc.flush_sync(ch)                        # the whole device, as before


# ---- channels that are gone --------------------------------------------------------------------
def test_io_on_a_channel_already_put_says_so():
    b, desc, ch = open_malloc("MallocPut", 1 << 20)
    try:
        ch.put()
        for call in (lambda: desc.read(ch, bytearray(512), 0),
                     lambda: desc.writev(ch, [bytes(512)], 0),
                     lambda: desc.unmap(ch, 0, 512)):
            with pytest.raises(ChannelReleased, match=r"released \(put\(\)\)") as e:
                call()
            assert "no free I/O object" not in str(e.value)
            assert isinstance(e.value, BdevError) and isinstance(e.value, ThreadError)
        # the C path: its own errno, not "no free I/O object" (-ENOMEM)
        assert CSubmitter().submit(desc, ch, "read", 0, 1, memory.allocate(4096)) \
            == -errno.ESHUTDOWN
    finally:
        desc.close()
        b.unregister()


def test_io_after_the_channels_thread_was_destroyed_blames_the_destroy():
    b = malloc.create("MallocDestroyed", size=1 << 20)
    desc = bdev.open_bdev("MallocDestroyed")
    th = Thread("doomed")
    got = {}

    def take():
        got["ch"] = desc.get_io_channel()

    th.send(take)
    th.run_until(lambda: got)
    th.exit()
    th.destroy()
    ch = got["ch"]
    try:
        with pytest.raises(ChannelReleased, match="doomed.*destroyed") as e:
            desc.read(ch, bytearray(512), 0)
        assert "put()" not in str(e.value)
    finally:
        desc.close()
        b.unregister()
