"""The driver's data path against the emulated controller: Read/Write at many sizes and buffer
offsets in both LBA formats, the data pointer the driver builds (PRP1 only, PRP1 + PRP2, a PRP
list, SGLs), splits at the maximum transfer, vectored I/O, Write Zeroes, Deallocate, Compare and
Flush. Data is checked byte for byte in the emulated namespace and through reads, and the bytes
around each payload in the host buffer are checked to be untouched."""
import pytest

import nvme.emu.nvm as emu_nvm
from env.errors import InvalidArgument
from nvme.controller import ControllerOptions
from nvme.emu import EmuNamespace
from nvme.errors import CommandError, UnsupportedCommand
from nvme.spec import NvmOpcode, SglType
from nvme.status import Generic, Media
from tests.nvme.test_driver import (PAGE, Calls, allocate, contents, fill, make_rig,  # noqa: F401
                                    pattern, poll_until)

GUARD = 0xEE


@pytest.fixture
def dptr(monkeypatch):
    """Every data pointer the emulator walks for an NVM command: ("prp", prp1, prp2, length,
    segments) or ("sgl", SglDescriptor, None, length, segments)."""
    seen = []
    prp_segments, sgl_segments = emu_nvm.prp_segments, emu_nvm.sgl_segments

    def prp(mem, prp1, prp2, length, page_size):
        segs = prp_segments(mem, prp1, prp2, length, page_size)
        seen.append(("prp", prp1, prp2, length, segs))
        return segs

    def sgl(mem, sgl1, length, **kw):
        segs = sgl_segments(mem, sgl1, length, **kw)
        seen.append(("sgl", sgl1, None, length, segs))
        return segs

    monkeypatch.setattr(emu_nvm, "prp_segments", prp)
    monkeypatch.setattr(emu_nvm, "sgl_segments", sgl)
    return seen


def merged(segs):
    out = []
    for iova, n in segs:
        if out and out[-1][0] + out[-1][1] == iova:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((iova, n))
    return out


def roundtrip(r, ns, lba, nbytes, offset, seed, qp=None):
    """Write `nbytes` at `lba` from `offset` in a buffer, check the namespace, read it back into
    another buffer at the same offset, check it and the guard bytes around it."""
    qp = qp or r.qp
    bs = ns.block_size
    nblocks = nbytes // bs
    data = pattern(seed, nbytes)
    size = offset + nbytes + 2 * PAGE
    w = allocate(size, GUARD)
    fill(w, data, offset)
    ns.write_sync(qp, w, lba, nblocks, offset=offset)
    assert r.emu.namespace(ns.nsid).read_blocks(lba, nblocks) == data
    rd = allocate(size, GUARD)
    ns.read_sync(qp, rd, lba, nblocks, offset=offset)
    got = contents(rd)
    assert got[offset:offset + nbytes] == data
    assert got[:offset] == bytes([GUARD]) * offset, "the read wrote before the payload"
    assert got[offset + nbytes:] == bytes([GUARD]) * (size - offset - nbytes), \
        "the read wrote past the payload"
    assert contents(w, offset, nbytes) == data          # a write leaves the source alone
    w.free()
    rd.free()


def commands_for(nblocks, bs, max_transfer):
    chunk = max_transfer // bs
    return -(-nblocks // chunk)


# ---- sizes x offsets x LBA formats ------------------------------------------------------------

SIZES = [512, 4096, 8192, 12288, 65536, 1 << 20, 5 << 20]
OFFSETS = [0, 4, 512, 3584, 4092, 4096 + 8]


@pytest.mark.parametrize("bs, offset, nbytes", [
    (bs, offset, nbytes) for bs in (512, 4096) for offset in OFFSETS for nbytes in SIZES
    if nbytes % bs == 0])
def test_write_read_roundtrip(make_rig, bs, offset, nbytes):
    r = make_rig([EmuNamespace((12 << 20) // bs, block_size=bs)], mdts=0)
    lba = 3
    before = (r.emu.commands(NvmOpcode.WRITE), r.emu.commands(NvmOpcode.READ))
    roundtrip(r, r.ns, lba, nbytes, offset, seed=(bs, offset, nbytes))
    n = commands_for(nbytes // bs, bs, r.ctrl.max_transfer)
    assert r.emu.commands(NvmOpcode.WRITE) - before[0] == n
    assert r.emu.commands(NvmOpcode.READ) - before[1] == n
    s = r.qp.stats()
    assert s["outstanding"] == 0 and s["submitted"] == s["completed"] == 2 * n
    assert s["splits"] == (2 if n > 1 else 0)


@pytest.mark.parametrize("mdts", [1, 2, 3])
@pytest.mark.parametrize("bs", [512, 4096])
@pytest.mark.parametrize("offset", [0, 516])
def test_split_at_small_mdts(make_rig, mdts, bs, offset):
    r = make_rig([EmuNamespace(4096, block_size=bs)], mdts=mdts)
    mt = PAGE << mdts
    assert r.ctrl.max_transfer == mt
    for nbytes in (mt - bs, mt, mt + bs, 3 * mt, 7 * mt + bs if bs == 512 else 7 * mt):
        w0, r0 = r.emu.commands(NvmOpcode.WRITE), r.emu.commands(NvmOpcode.READ)
        roundtrip(r, r.ns, 11, nbytes, offset, seed=(mdts, nbytes))
        expect = commands_for(nbytes // bs, bs, mt)
        assert r.emu.commands(NvmOpcode.WRITE) - w0 == expect, nbytes
        assert r.emu.commands(NvmOpcode.READ) - r0 == expect, nbytes


def test_split_children_are_sent_in_order_with_the_right_lbas(make_rig):
    r = make_rig(mdts=1)             # 8 KiB: 16 blocks of 512 per command
    buf = allocate(40 * 512)
    fill(buf, pattern(9, 40 * 512))
    r.ns.write_sync(r.qp, buf, 100, 40)
    writes = [e for e in r.emu.command_log if e[0] == r.qp.qid and e[2] == NvmOpcode.WRITE]
    assert len(writes) == 3
    assert r.emu.namespace(1).read_blocks(100, 40) == contents(buf)
    assert r.emu.namespace(1).read_blocks(99) == bytes(512)
    assert r.emu.namespace(1).read_blocks(140) == bytes(512)


def test_two_namespaces_with_different_block_sizes_on_one_queue(make_rig):
    r = make_rig([EmuNamespace(1024, block_size=512), EmuNamespace(256, block_size=4096)])
    ns1, ns2 = r.ctrl.namespace(1), r.ctrl.namespace(2)
    a, b = allocate(8192), allocate(8192)
    fill(a, pattern(1, 8192))
    fill(b, pattern(2, 8192))
    calls = Calls()
    ns1.write(r.qp, a, 10, 16, calls.cb("ns1"))
    ns2.write(r.qp, b, 10, 2, calls.cb("ns2"))
    poll_until(lambda: len(calls) == 2, r.qp)
    calls.assert_each_once(["ns1", "ns2"])
    assert all(calls.status(t).ok for t in ("ns1", "ns2"))
    assert r.emu.namespace(1).read_blocks(10, 16) == contents(a)
    assert r.emu.namespace(2).read_blocks(10, 2) == contents(b)
    assert r.emu.namespace(2).read_blocks(12) == bytes(4096)


def test_whole_namespace_and_last_block(make_rig):
    r = make_rig([EmuNamespace(512, block_size=512), EmuNamespace(64, block_size=4096)], mdts=0)
    for nsid in (1, 2):
        ns = r.ctrl.namespace(nsid)
        roundtrip(r, ns, 0, ns.size, 0, seed=nsid)
        roundtrip(r, ns, ns.nblocks - 1, ns.block_size, 8, seed=nsid + 10)


def test_buffer_length_implies_the_block_count(make_rig):
    r = make_rig()
    buf = allocate(3 * 512)
    fill(buf, pattern(5, 1536))
    r.ns.write_sync(r.qp, buf, 20)                       # nblocks from the buffer: 3
    assert r.emu.namespace(1).read_blocks(20, 3) == contents(buf)
    buf2 = allocate(2048, 0)
    r.ns.read_sync(r.qp, buf2, 20, offset=512)           # 1536 bytes from offset 512: 3 blocks
    assert contents(buf2, 512) == contents(buf)
    with pytest.raises(InvalidArgument, match="whole number"):
        r.ns.read(r.qp, allocate(1000), 0)


# ---- data pointer shapes -------------------------------------------------------------------

@pytest.mark.parametrize("offset, nbytes, shape", [
    (0, 512, "prp1"), (0, 4096, "prp1"), (3584, 512, "prp1"), (4092 - 508, 512, "prp1"),
    (0, 8192, "prp2"), (512, 4096, "prp2"), (3584, 1024, "prp2"), (4092, 4096, "prp2"),
    (0, 12288, "list"), (512, 8192, "list"), (4, 65536, "list"), (0, 128 << 10, "list")])
def test_prp_shapes(make_rig, dptr, offset, nbytes, shape):
    r = make_rig(mdts=5)
    buf = allocate(offset + nbytes + PAGE, GUARD)
    data = pattern(nbytes, nbytes)
    fill(buf, data, offset)
    dptr.clear()
    r.ns.write_sync(r.qp, buf, 0, nbytes // 512, offset=offset)
    ((kind, prp1, prp2, length, segs),) = dptr
    assert kind == "prp" and length == nbytes
    iova = buf.translate(offset)[0]
    assert prp1 == iova
    assert merged(segs) == [(iova, nbytes)]
    if shape == "prp1":
        assert prp2 == 0
    elif shape == "prp2":
        assert prp2 == (iova & ~(PAGE - 1)) + PAGE       # the second data page itself
    else:
        assert prp2 % 8 == 0 and not buf.translate(0)[0] <= prp2 < buf.translate(0)[0] + len(buf)
    assert r.emu.namespace(1).read_blocks(0, nbytes // 512) == data


def test_sgl_always(make_rig, dptr):
    r = make_rig(mdts=2, opts=ControllerOptions(sgl="always", io_timeout_s=0))
    assert r.qp.sgl == "always"
    for offset, nbytes in ((0, 512), (4, 4096), (3584, 8192), (100 * 4, 40 << 10)):
        dptr.clear()
        roundtrip(r, r.ns, 7, nbytes, offset, seed=offset)
        assert dptr and all(kind == "sgl" for kind, *_ in dptr)
        # a contiguous buffer is one Data Block descriptor in the command
        assert all(d[1].type == SglType.DATA_BLOCK for d in dptr)
        assert sum(d[3] for d in dptr) == 2 * nbytes
    assert r.qp.stats()["splits"] > 0


def test_sgl_never_uses_prps(make_rig, dptr):
    r = make_rig(opts=ControllerOptions(sgl="never", io_timeout_s=0))
    assert r.qp.sgl == "never"
    roundtrip(r, r.ns, 0, 65536, 4, seed=3)
    assert dptr and all(kind == "prp" for kind, *_ in dptr)


# ---- vectored I/O --------------------------------------------------------------------------

def scatter_iov(layout, seed):
    """Buffers and an iovec from `layout` [(buffer_size, offset, length), ...] filled with a
    pattern; returns (iov, the bytes the iovec carries)."""
    iov, data = [], b""
    for i, (size, off, n) in enumerate(layout):
        b = allocate(size, GUARD)
        piece = pattern((seed, i), n)
        fill(b, piece, off)
        iov.append((b, off, n))
        data += piece
    return iov, data


PRP_FRIENDLY = [(8192, 512, 7680), (4096, 0, 4096), (8192, 0, 8192), (4096, 0, 1024)]
SGL_ONLY = [(4096, 0, 512), (4096, 1024, 1024), (8192, 100, 2560), (8192, 4, 4096)]
BYTE_GRANULAR = [(4096, 0, 510), (4096, 0, 2), (4096, 8, 1021), (4096, 0, 3)]


@pytest.mark.parametrize("layout, kind", [(PRP_FRIENDLY, "prp"), (SGL_ONLY, "sgl"),
                                          (BYTE_GRANULAR, "sgl")])
def test_writev_readv(make_rig, dptr, layout, kind):
    r = make_rig(mdts=0)
    iov, data = scatter_iov(layout, seed=kind)
    nblocks = len(data) // 512
    dptr.clear()
    r.ns.writev_sync(r.qp, iov, 40)
    assert r.emu.namespace(1).read_blocks(40, nblocks) == data
    # read back into a different scatter list of the same shape
    riov, _ = scatter_iov(layout, seed="other")
    r.ns.readv_sync(r.qp, riov, 40)
    pos = 0
    for (b, off, n), (size, _, _) in zip(riov, layout):
        got = contents(b)
        assert got[off:off + n] == data[pos:pos + n]
        assert got[:off] == bytes([GUARD]) * off
        assert got[off + n:] == bytes([GUARD]) * (size - off - n)
        pos += n
    assert [d[0] for d in dptr] == [kind, kind]
    if kind == "sgl":
        # several separate pieces: a Last Segment descriptor pointing at the data blocks
        assert dptr[0][1].type == SglType.LAST_SEGMENT
        assert [n for _, n in dptr[0][4]] == [n for _, _, n in iov]


def test_vectored_io_with_many_elements(make_rig, dptr):
    r = make_rig(mdts=0)
    big = allocate(200 * 1024, GUARD)
    iov = [(big, i * 1024, 512) for i in range(200)]        # 200 separate pieces
    data = pattern("many", 200 * 512)
    for i in range(200):
        fill(big, data[i * 512:(i + 1) * 512], i * 1024)
    r.ns.writev_sync(r.qp, iov, 0)
    assert r.emu.namespace(1).read_blocks(0, 200) == data
    assert dptr[-1][0] == "sgl" and len(dptr[-1][4]) == 200


def test_vectored_io_that_prps_cannot_express_without_sgl_support(make_rig):
    r = make_rig(sgl=False)
    iov, _ = scatter_iov(SGL_ONLY, seed=1)
    before = r.io_commands()
    with pytest.raises(InvalidArgument, match="cannot be described"):
        r.ns.writev(r.qp, iov, 0)
    with pytest.raises(InvalidArgument):
        r.ns.readv(r.qp, iov, 0)
    assert r.io_commands() == before
    assert r.qp.stats()["submitted"] == 0
    for b, _, _ in iov:
        b.free()                      # nothing stays pinned by a refused submission
    # what PRPs can express still works
    iov, data = scatter_iov(PRP_FRIENDLY, seed=2)
    r.ns.writev_sync(r.qp, iov, 0)
    assert r.emu.namespace(1).read_blocks(0, len(data) // 512) == data


def test_vectored_io_with_sgl_never_on_an_sgl_controller(make_rig):
    r = make_rig(opts=ControllerOptions(sgl="never", io_timeout_s=0))
    iov, _ = scatter_iov(SGL_ONLY, seed=1)
    with pytest.raises(InvalidArgument):
        r.ns.writev(r.qp, iov, 0)
    assert r.io_commands() == 0


def test_vectored_io_argument_checks(make_rig):
    r = make_rig()
    b = allocate(4096)
    for bad, match in (([], "blocks|empty"), ([(b, 0, 500)], "whole number"),
                       ([(b, 0, 512), (bytearray(512), 0, 512)], "DmaBuffer"),
                       ([(b, 4000, 512)], "outside"), ([(b, 2, 512)], "aligned")):
        with pytest.raises(InvalidArgument, match=match):
            r.ns.writev(r.qp, bad, 0)
    with pytest.raises(InvalidArgument, match="outside namespace"):
        r.ns.readv(r.qp, [(b, 0, 4096)], r.ns.nblocks - 7)
    assert r.io_commands() == 0
    b.free()


def test_vectored_io_larger_than_the_maximum_transfer_is_split(make_rig):
    r = make_rig(mdts=1)                 # 8 KiB
    iov, data = scatter_iov([(8192, 0, 8192), (8192, 0, 8192), (4096, 0, 4096)], seed=4)
    r.ns.writev_sync(r.qp, iov, 0)
    assert r.emu.namespace(1).read_blocks(0, 40) == data
    assert r.emu.commands(NvmOpcode.WRITE) == 3


# ---- Write Zeroes, Deallocate, Compare, Flush -------------------------------------------------

@pytest.mark.parametrize("nsid", [1, 2])
@pytest.mark.parametrize("deallocate", [False, True])
def test_write_zeroes(make_rig, nsid, deallocate):
    r = make_rig()
    ns = r.ctrl.namespace(nsid)
    bs = ns.block_size
    data = pattern(nsid, 32 * bs)
    buf = allocate(32 * bs)
    fill(buf, data)
    ns.write_sync(r.qp, buf, 0, 32)
    ns.write_zeroes_sync(r.qp, 8, 10, deallocate=deallocate)
    rd = allocate(32 * bs, GUARD)
    ns.read_sync(r.qp, rd, 0, 32)
    expect = data[:8 * bs] + bytes(10 * bs) + data[18 * bs:]
    assert contents(rd) == expect
    assert r.emu.namespace(nsid).read_blocks(0, 32) == expect
    key = "write_zeroes.deallocate" if deallocate else "write_zeroes"
    assert r.emu.counters[key] == 1


def test_write_zeroes_above_the_nlb_limit_is_split(make_rig):
    r = make_rig([EmuNamespace(200_000, block_size=512, sparse=True)])
    ens = r.emu.namespace(1)
    ens.write_blocks(0, b"\x01" * 512)
    ens.write_blocks(150_000, b"\x02" * 512)
    ens.write_blocks(150_001, b"\x03" * 512)
    r.ns.write_zeroes_sync(r.qp, 0, 150_001)
    assert r.emu.commands(NvmOpcode.WRITE_ZEROES) == 3          # 65536 + 65536 + 18929
    assert ens.read_blocks(0) == bytes(512)
    assert ens.read_blocks(150_000) == bytes(512)
    assert ens.read_blocks(150_001) == b"\x03" * 512


def test_deallocate_ranges_read_back_as_zeroes(make_rig):
    r = make_rig()
    data = pattern("dsm", 64 * 512)
    buf = allocate(64 * 512)
    fill(buf, data)
    r.ns.write_sync(r.qp, buf, 0, 64)
    r.ns.deallocate_sync(r.qp, [(2, 3), (10, 1), (60, 4)])
    assert r.emu.counters["deallocated_ranges"] == 3
    rd = allocate(64 * 512, GUARD)
    r.ns.read_sync(r.qp, rd, 0, 64)
    expect = bytearray(data)
    for lba, n in ((2, 3), (10, 1), (60, 4)):
        expect[lba * 512:(lba + n) * 512] = bytes(n * 512)
    assert contents(rd) == bytes(expect)


def test_deallocate_argument_checks(make_rig):
    r = make_rig()
    with pytest.raises(InvalidArgument):
        r.ns.deallocate(r.qp, [])
    with pytest.raises(InvalidArgument):
        r.ns.deallocate(r.qp, [(0, 1)] * 257)
    with pytest.raises(InvalidArgument, match="outside namespace"):
        r.ns.deallocate(r.qp, [(0, 1), (r.ns.nblocks, 1)])
    assert r.io_commands() == 0


def test_compare(make_rig):
    r = make_rig()
    data = pattern("cmp", 8 * 512)
    buf = allocate(8 * 512)
    fill(buf, data)
    r.ns.write_sync(r.qp, buf, 30, 8)
    assert r.ns.compare_sync(r.qp, buf, 30, 8).ok
    other = allocate(8 * 512)
    fill(other, data[:-1] + bytes([data[-1] ^ 1]))             # one bit differs
    with pytest.raises(CommandError) as ei:
        r.ns.compare_sync(r.qp, other, 30, 8)
    e = ei.value
    assert (e.sct, e.sc) == (2, Media.COMPARE_FAILURE)
    assert e.status.symbol == "MEDIA/COMPARE_FAILURE"
    assert "Compare Failure" in str(e) and "Compare" in e.opcode_name
    assert e.lba == 30 and e.nlb == 8 and e.nsid == 1
    calls = Calls()
    r.ns.compare(r.qp, other, 30, 8, calls.cb("c"))
    poll_until(lambda: len(calls), r.qp)
    cpl = calls.status("c")
    assert not cpl.ok and cpl.status.matches(Media.COMPARE_FAILURE)
    assert cpl.status.name == "Compare Failure"


def test_flush(make_rig):
    r = make_rig()
    assert r.ns.flush_sync(r.qp).ok
    assert r.emu.counters["flushes"] == 1
    calls = Calls()
    r.ns.flush(r.qp, calls.cb("f"))
    poll_until(lambda: len(calls), r.qp)
    assert calls.status("f").ok
    assert r.emu.counters["flushes"] == 2


def test_optional_commands_the_controller_lacks_are_refused_before_submission(make_rig):
    r = make_rig(oncs=0)
    buf = allocate(512)
    for call in (lambda: r.ns.write_zeroes(r.qp, 0, 1), lambda: r.ns.deallocate(r.qp, [(0, 1)]),
                 lambda: r.ns.compare(r.qp, buf, 0, 1)):
        with pytest.raises(UnsupportedCommand):
            call()
    assert r.io_commands() == 0
    r.ns.write_sync(r.qp, buf, 0, 1)            # plain I/O still works


def test_fua_write(make_rig):
    r = make_rig()
    buf = allocate(4096)
    fill(buf, pattern("fua", 4096))
    r.ns.write_sync(r.qp, buf, 0, 8, fua=True)
    assert r.emu.namespace(1).read_blocks(0, 8) == contents(buf)


def test_lba_out_of_range_reported_by_the_controller(make_rig):
    # the driver checks the range against Identify; a raw submission is checked by the device
    r = make_rig()
    calls = Calls()
    buf = allocate(512)
    r.qp.submit_nvm(NvmOpcode.READ, 1, r.ns.nblocks, 1, 9, buf, 0, 0, 0, calls.cb("oob"))
    poll_until(lambda: len(calls), r.qp)
    cpl = calls.status("oob")
    assert cpl.status.matches(Generic.LBA_OUT_OF_RANGE)
    assert cpl.status.name == "LBA Out of Range"
