"""The bdev layer's contract, against malloc, null and a recording Python module."""
import threading

import pytest

import bdev
from bdev import malloc, null
from bdev.errors import (BdevClaimed, BdevExists, BdevNotFound, BdevRemoved, DescriptorClosed,
                         IoError, ReadOnlyDescriptor, UnsupportedIoType)
from env import memory
from env.errors import InvalidArgument, ResourceExhausted, WrongThreadError
from env.thread import current_thread
from tests.bdev.helpers import (Completions, RecordingBdev, in_threads, make_stack, open_malloc,
                                poll_until, teardown)

KiB = 1024


@pytest.fixture
def mall():
    stack = open_malloc("MallocT", size=4 << 20)
    yield stack
    teardown(*stack)


# ---- registry, descriptors, claims ----------------------------------------------------------------
def test_registry_names_and_aliases():
    b = null.create("NullReg", num_blocks=16)
    try:
        assert bdev.get_bdev("NullReg") is b and b in bdev.bdevs()
        with pytest.raises(BdevExists):
            null.create("NullReg", num_blocks=16)
        with pytest.raises(BdevNotFound, match="NullReg"):
            bdev.get_bdev("nope")
    finally:
        b.unregister()
    with pytest.raises(BdevNotFound):
        bdev.get_bdev("NullReg")


def test_alias_resolves_and_collides():
    a = RecordingBdev("RecA", aliases=["disk-a"]).register()
    try:
        assert bdev.get_bdev("disk-a") is a
        with pytest.raises(BdevExists):
            RecordingBdev("RecB", aliases=["disk-a"]).register()
        with pytest.raises(BdevNotFound):
            bdev.get_bdev("RecB")      # nothing half-registered
    finally:
        a.unregister()


@pytest.mark.parametrize("kw,msg", [(dict(block_size=1000), "power of two"),
                                    (dict(block_size=256), "power of two"),
                                    (dict(num_blocks=0), "at least one block")])
def test_bad_geometry(kw, msg):
    args = dict(block_size=512, num_blocks=8)
    args.update(kw)
    with pytest.raises(InvalidArgument, match=msg):
        RecordingBdev("Bad", **args)


def test_read_only_descriptor_refuses_writes(mall):
    b, _, _ = mall
    ro = bdev.open_bdev("MallocT")
    ch = ro.get_io_channel()
    try:
        with pytest.raises(ReadOnlyDescriptor):
            ro.write(ch, bytes(512), 0)
        with pytest.raises(ReadOnlyDescriptor):
            ro.unmap(ch, 0, 512)
        ro.read_sync(ch, bytearray(512), 0)
    finally:
        ch.put()
        ro.close()


def test_claims():
    b = null.create("NullClaim", num_blocks=64)
    owner = object()
    try:
        w = bdev.open_bdev("NullClaim", write=True)
        with pytest.raises(BdevClaimed, match="writing"):
            b.claim(owner)
        w.close()
        mine = bdev.open_bdev("NullClaim", write=True)
        b.claim(owner, mine)                # the owner's own writer is fine
        with pytest.raises(BdevClaimed, match="claimed"):
            bdev.open_bdev("NullClaim", write=True)
        bdev.open_bdev("NullClaim").close()  # readers still welcome
        b.release_claim(owner)
        bdev.open_bdev("NullClaim", write=True).close()
        mine.close()
    finally:
        b.unregister()


# ---- data path -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_buf", [bytearray, lambda n: memory.allocate(n),
                                      lambda n: memoryview(bytearray(n))],
                         ids=["bytearray", "DmaBuffer", "memoryview"])
def test_round_trip_with_any_buffer(mall, make_buf):
    _, desc, ch = mall
    data = bytes(range(256)) * 32
    w = make_buf(len(data))
    memoryview(w)[:] = data
    desc.write_sync(ch, w, 8 * KiB)
    r = make_buf(len(data))
    desc.read_sync(ch, r, 8 * KiB)
    assert bytes(memoryview(r)) == data


def test_write_from_bytes_and_blocks_api(mall):
    _, desc, ch = mall
    desc.write_sync(ch, b"\x11" * 1024, 0)
    out = bytearray(1024)
    desc.read_blocks(ch, out, 0, 2, cb=None)
    poll_until(lambda: out[0] == 0x11)
    assert out == b"\x11" * 1024


def test_vectored_io(mall):
    _, desc, ch = mall
    parts = [b"a" * 512, b"b" * 1024, b"c" * 512]
    desc.writev_sync(ch, parts, 4096)
    bufs = [bytearray(1024), bytearray(1024)]
    desc.readv_sync(ch, bufs, 4096)
    assert b"".join(bufs) == b"".join(parts)


def test_write_zeroes_unmap_flush_reset_compare(mall):
    _, desc, ch = mall
    desc.write_sync(ch, b"\xee" * 8192, 0)
    desc.write_zeroes_sync(ch, 0, 2048)
    desc.unmap_sync(ch, 6144, 2048)
    desc.flush_sync(ch)
    desc.reset_sync(ch)
    out = bytearray(8192)
    desc.read_sync(ch, out, 0)
    assert out == bytes(2048) + b"\xee" * 4096 + bytes(2048)
    desc.compare_sync(ch, out, 0)
    with pytest.raises(IoError) as e:
        desc.compare_sync(ch, b"\x01" * 8192, 0)
    assert e.value.status.kind == "miscompare"


def test_async_callbacks_run_from_poll_exactly_once(mall):
    _, desc, ch = mall
    c = Completions()
    bufs = [bytearray(4096) for _ in range(200)]
    for i, buf in enumerate(bufs):
        c.submit(desc.read, i, ch, buf, i * 4096 % (4 << 20))
    assert not c.done                     # nothing completes inside a submission
    poll_until(lambda: len(c.done) == 200)
    assert all(ok for ok, status in c.done.values())
    assert all(status is None for ok, status in c.done.values())


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset,nbytes", [(100, 512), (0, 100), (4 << 20, 512),
                                           ((4 << 20) - 512, 1024), (0, 0)])
def test_ranges_outside_or_misaligned_are_refused(mall, offset, nbytes):
    _, desc, ch = mall
    with pytest.raises(InvalidArgument):
        desc.read(ch, bytearray(max(nbytes, 1)), offset, nbytes)


def test_short_and_readonly_buffers(mall):
    _, desc, ch = mall
    with pytest.raises(InvalidArgument, match="holds"):
        desc.read_blocks(ch, bytearray(100), 0, 1)
    with pytest.raises(InvalidArgument, match="writable"):
        desc.read(ch, b"x" * 512, 0)
    freed = memory.allocate(512)
    freed.free()
    with pytest.raises(Exception, match="freed"):
        desc.read(ch, freed, 0, 512)
    with pytest.raises(InvalidArgument):
        desc.submit(ch, "frobnicate", None, 0, 1)


def test_buffer_is_pinned_while_in_flight(mall):
    _, desc, ch = mall
    buf = memory.allocate(4096)
    done = []
    desc.read(ch, buf, 0, cb=lambda ok, st: done.append(ok))
    with pytest.raises(Exception, match="outstanding"):
        buf.free()
    poll_until(lambda: done)
    buf.free()


def test_closed_descriptor_and_foreign_channel(mall):
    b, desc, ch = mall
    other = malloc.create("MallocOther", size=1 << 20)
    od = bdev.open_bdev("MallocOther", write=True)
    och = od.get_io_channel()
    try:
        with pytest.raises(InvalidArgument):
            desc.read(ch=och, buf=bytearray(512), offset=0)
        with pytest.raises(InvalidArgument, match="BdevChannel"):
            desc.read(object(), bytearray(512), 0)
    finally:
        och.put()
        od.close()
        other.unregister()
    d2 = bdev.open_bdev("MallocT")
    d2.close()
    with pytest.raises(DescriptorClosed):
        d2.read(ch, bytearray(512), 0)
    with pytest.raises(DescriptorClosed):
        d2.get_io_channel()


def test_channel_from_another_thread_is_refused(mall):
    _, desc, ch = mall
    seen = []

    def other():
        try:
            desc.read(ch, bytearray(512), 0)
        except WrongThreadError as e:
            seen.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(seen) == 1


def test_unsupported_io_type():
    b, desc, ch = make_stack("RecNoUnmap", io_types=("read", "write"))
    try:
        with pytest.raises(UnsupportedIoType, match="unmap"):
            desc.unmap(ch, 0, 512)
        with pytest.raises(UnsupportedIoType):
            desc.compare(ch, bytes(512), 0)
    finally:
        teardown(b, desc, ch)


def test_io_pool_exhaustion_is_an_error_not_a_hang():
    b = RecordingBdev("RecSmall", defer=True)
    b.channel_ios = 8
    b.register()
    desc = bdev.open_bdev("RecSmall", write=True)
    ch = desc.get_io_channel()
    try:
        for i in range(8):
            desc.read_blocks(ch, bytearray(512), i, 1)
        with pytest.raises(ResourceExhausted, match="poll"):
            desc.read_blocks(ch, bytearray(512), 0, 1)
        b.release()
        poll_until(lambda: ch.free_io_count == 8)
    finally:
        teardown(b, desc, ch)


# ---- what the layer does for the module ----------------------------------------------------------------
def test_split_at_max_transfer_and_boundary():
    b, desc, ch = make_stack("RecSplit", max_transfer_blocks=8, optimal_io_boundary=16,
                             split_on_optimal_io_boundary=True)
    try:
        data = bytes(range(256)) * 2 * 40
        desc.write_blocks(ch, data, 5, 40)
        poll_until(lambda: len(b.requests) >= 1 and ch.outstanding == 0)
        writes = [r for r in b.requests if r[0] == "write"]
        assert all(n <= 8 for _, _, n in writes)
        assert all(off // 16 == (off + n - 1) // 16 for _, off, n in writes)
        assert sum(n for _, _, n in writes) == 40
        assert sorted(off for _, off, _ in writes)[0] == 5
        out = bytearray(len(data))
        desc.read_sync(ch, out, 5 * 512)
        assert bytes(out) == data and b.data[5 * 512:45 * 512] == data
    finally:
        teardown(b, desc, ch)


def test_vectored_split_crossing_segments():
    b, desc, ch = make_stack("RecSplitV", max_transfer_blocks=3)
    try:
        parts = [bytes([i]) * (512 * (i + 1)) for i in range(4)]      # 1+2+3+4 = 10 blocks
        desc.writev_sync(ch, parts, 0)
        assert b.data[:10 * 512] == b"".join(parts)
        assert all(n <= 3 for t, _, n in b.requests if t == "write")
        outs = [bytearray(len(p)) for p in parts]
        desc.readv_sync(ch, outs, 0)
        assert outs == [bytearray(p) for p in parts]
    finally:
        teardown(b, desc, ch)


def test_write_zeroes_is_emulated_with_writes():
    b, desc, ch = make_stack("RecNoWZ", num_blocks=8192, io_types=("read", "write"))
    try:
        b.data[:] = b"\xff" * len(b.data)
        desc.write_zeroes_sync(ch, 512, 3 << 20)       # more than the 1 MiB zero buffer
        assert b.data[:512] == b"\xff" * 512
        assert b.data[512:512 + (3 << 20)] == bytes(3 << 20)
        assert b.data[512 + (3 << 20):] == b"\xff" * (len(b.data) - 512 - (3 << 20))
        assert {t for t, _, _ in b.requests} == {"write"}
    finally:
        teardown(b, desc, ch)


def test_misaligned_and_non_dma_buffers_are_bounced():
    b, desc, ch = make_stack("RecAlign", required_alignment=4096, dma_required=True)
    seen = []
    orig = b.execute

    def spy(io):
        for mv in io.buffers():
            import ctypes
            seen.append(ctypes.addressof(ctypes.c_char.from_buffer(mv)))
        orig(io)

    b.execute = spy
    try:
        raw = bytearray(8192 + 3)
        data = bytes(range(256)) * 16
        raw[3:3 + 4096] = data
        desc.write_sync(ch, memoryview(raw)[3:3 + 4096], 0)
        out = bytearray(4096 + 1)
        desc.read_sync(ch, memoryview(out)[1:], 0)
        assert out[1:] == data and b.data[:4096] == data
        assert seen and all(a % 4096 == 0 for a in seen)
    finally:
        teardown(b, desc, ch)


def test_nomem_is_queued_and_retried():
    b, desc, ch = make_stack("RecNomem", nomem=5)
    c = Completions()
    try:
        for i in range(10):
            c.submit(desc.write_blocks, i, ch, bytes([i]) * 512, i, 1)
        poll_until(lambda: len(c.done) == 10)
        assert all(ok for ok, _ in c.done.values())
        assert b.data[:10 * 512] == b"".join(bytes([i]) * 512 for i in range(10))
        assert ch.stats()["nomem_retries"] >= 5
    finally:
        teardown(b, desc, ch)


def test_module_completing_later_and_failing():
    b, desc, ch = make_stack("RecLater", defer=True)
    c = Completions()
    try:
        for i in range(4):
            c.submit(desc.read_blocks, i, ch, bytearray(512), i, 1)
        for _ in range(10):
            current_thread().poll()
        assert not c.done
        assert ch.outstanding == 4
        b.pending[0].complete("failed")
        b.pending = b.pending[1:]
        b.release()
        poll_until(lambda: len(c.done) == 4)
        assert [c.done[i][0] for i in range(4)] == [False, True, True, True]
        status = c.done[0][1]
        assert status.kind == "failed" and status.io_type == "read" and status.bdev == "RecLater"
    finally:
        teardown(b, desc, ch)


def test_statistics_and_histogram():
    """Every iostat field, from amounts that differ per direction (a byte counted in the wrong
    field shows), with the histogram enabled before the channel exists (so it records)."""
    b = malloc.create("MallocStats", size=1 << 20)
    b.enable_histogram()
    desc = bdev.open_bdev("MallocStats", write=True)
    ch = desc.get_io_channel()
    try:
        for i in range(3):
            desc.write_sync(ch, bytes(4096), i * 4096)            # 3 writes, 12 KiB
        for i in range(5):
            desc.read_sync(ch, bytearray(1024), i * 1024)         # 5 reads, 5 KiB
        desc.unmap_sync(ch, 0, 2048)                               # 1 unmap, 2 KiB
        desc.unmap_sync(ch, 8192, 512)                             # 1 unmap, 512 B
        desc.flush_sync(ch)                                        # other ops: 3
        desc.write_zeroes_sync(ch, 0, 512)
        desc.compare_sync(ch, bytes(512), 0)
        with pytest.raises(IoError):
            desc.compare_sync(ch, b"\x01" * 512, 0)                # a miscompare: an error
        s = b.stats()
        assert (s["num_write_ops"], s["bytes_written"]) == (3, 12288)
        assert (s["num_read_ops"], s["bytes_read"]) == (5, 5120)
        assert (s["num_unmap_ops"], s["bytes_unmapped"]) == (2, 2560)
        assert s["num_other_ops"] == 3
        assert s["io_error"] == 1 and s["nomem_retries"] == 0
        assert s["tick_rate"] > 0 and s["name"] == "MallocStats"
        for kind, n in (("read", 5), ("write", 3), ("unmap", 2)):
            total = s[f"{kind}_latency_ticks"]
            lo, hi = s[f"min_{kind}_latency_ticks"], s[f"max_{kind}_latency_ticks"]
            assert 0 < lo <= hi <= total <= n * hi, (kind, lo, hi, total)
        assert ch.stats() == {k: v for k, v in s.items() if k not in ("name", "tick_rate")}
        h = b.histogram()
        assert h.count == 5 + 3 + 2 + 3            # every successful I/O, failures excepted
    finally:
        teardown(b, desc, ch)
    # the channel is gone: its figures stay with the bdev
    assert b.stats()["bytes_read"] == 5120 and b.histogram().count == 13


def test_stats_survive_the_channel():
    b = null.create("NullStats", num_blocks=128)
    try:
        d = bdev.open_bdev("NullStats")
        ch = d.get_io_channel()
        d.read_sync(ch, bytearray(512), 0)
        ch.put()
        d.close()
        assert b.stats()["num_read_ops"] == 1
    finally:
        b.unregister()


def test_hot_remove_notifies_and_refuses_new_io():
    b, desc, ch = make_stack("RecRemove", defer=True)
    events = []
    d2 = bdev.open_bdev("RecRemove", event_cb=lambda ev, bd: events.append((ev, bd.name)))
    c = Completions()
    c.submit(desc.read_blocks, "inflight", ch, bytearray(512), 0, 1)
    b.unregister()
    assert events == [("remove", "RecRemove")]
    with pytest.raises(BdevRemoved):
        desc.read_blocks(ch, bytearray(512), 0, 1)
    with pytest.raises(BdevNotFound):
        bdev.open_bdev("RecRemove")
    b.release()                                     # the in-flight I/O still completes, once
    poll_until(lambda: c.done)
    assert not b.destructed
    d2.close()
    ch.put()
    desc.close()
    assert b.destructed


def test_info_and_config(mall):
    b, _, _ = mall
    info = b.info()
    assert info["name"] == "MallocT" and info["num_blocks"] == (4 << 20) // 512
    assert info["supported_io_types"]["unmap"] is True
    assert b.config_json() == {"method": "bdev_malloc_create",
                               "params": {"name": "MallocT", "num_blocks": 8192,
                                          "block_size": 512, "uuid": str(b.uuid)}}


def test_two_threads_two_channels():
    b = malloc.create("MallocMT", size=8 << 20)

    def worker(k):
        d = bdev.open_bdev("MallocMT", write=True)
        ch = d.get_io_channel()
        for i in range(50):
            data = bytes([k * 50 + i & 0xFF]) * 4096
            d.write_sync(ch, data, (k * 100 + i) * 4096)
            out = bytearray(4096)
            d.read_sync(ch, out, (k * 100 + i) * 4096)
            assert out == data
        ch.put()
        d.close()

    try:
        in_threads(worker, 2, 60)
        assert b.stats()["num_write_ops"] == 100
    finally:
        b.unregister()


def test_module_refusal_reaches_the_callback_as_a_status():
    class Broken(RecordingBdev):
        def submit(self, io):
            if io.type == "write":
                return -5                     # -EIO: the backend failed
            if io.type == "flush":
                raise RuntimeError("backend exploded")
            return super().submit(io)

    b = Broken("RecBroken").register()
    desc = bdev.open_bdev("RecBroken", write=True)
    ch = desc.get_io_channel()
    c = Completions()
    try:
        c.submit(desc.write, "w", ch, bytes(512), 0)
        c.submit(desc.flush, "f", ch)
        c.submit(desc.read, "r", ch, bytearray(512), 0)
        poll_until(lambda: len(c.done) == 3)
        ok, status = c.done["w"]
        assert not ok and status.kind == "failed" and status.errno == 5
        assert "Input/output error" in str(status)
        assert not c.done["f"][0] and c.done["r"][0]
        with pytest.raises(IoError, match="write"):
            desc.write_sync(ch, bytes(512), 0)
    finally:
        teardown(b, desc, ch)


def test_misaligned_segment_lengths_are_bounced():
    b, desc, ch = make_stack("RecSegLen", required_alignment=512)
    lengths = []
    orig = b.execute

    def spy(io):
        lengths.extend(mv.nbytes for mv in io.buffers())
        orig(io)

    b.execute = spy
    try:
        buf = memory.allocate(8192)
        mv = memoryview(buf)
        mv[0:100] = b"a" * 100
        mv[4096:4508] = b"b" * 412
        desc.writev_sync(ch, [mv[0:100], mv[4096:4508]], 0)
        assert all(n % 512 == 0 for n in lengths)
        assert b.data[:512] == b"a" * 100 + b"b" * 412
        mv.release()
    finally:
        teardown(b, desc, ch)


def test_a_thread_destroyed_with_a_channel_still_held():
    """exit() unregisters the thread's pollers; destroy() then releases the channels it still
    holds: the channel's teardown must not unregister its poller a second time."""
    from env.thread import Thread
    b = null.create("NullDestroy", num_blocks=64)
    d = bdev.open_bdev("NullDestroy")
    th = Thread("short-lived")
    out = []

    def take():
        ch = d.get_io_channel()
        d.read_blocks(ch, bytearray(512), 0, 1, cb=lambda ok, st: out.append(ok))

    th.send(take)
    th.run_until(lambda: out)
    th.exit()
    th.destroy()
    assert out == [True] and b.stats()["num_read_ops"] == 1
    d.close()
    b.unregister()


def test_memory_a_dma_device_refuses_is_bounced():
    """A module of a DMA device refuses memory it cannot reach with -EFAULT; the layer then
    retries through a DMA bounce buffer (reads are copied back), each I/O completing once."""
    from env.errors import TranslationError
    from env.memmap import translate

    class DmaOnly(RecordingBdev):
        refused = 0

        def submit(self, io):
            for mv in io.buffers():
                import ctypes
                try:
                    translate(ctypes.addressof(ctypes.c_char.from_buffer(mv)), mv.nbytes)
                except TranslationError:
                    self.refused += 1
                    return -14                  # -EFAULT
            return super().submit(io)

    b = DmaOnly("RecDmaOnly", dma_required=True, max_transfer_blocks=4).register()
    desc = bdev.open_bdev("RecDmaOnly", write=True)
    ch = desc.get_io_channel()
    try:
        data = bytes(range(256)) * 16             # 4096 bytes of ordinary memory: 2 children
        desc.write_sync(ch, bytearray(data), 0)
        out = bytearray(4096)
        desc.read_sync(ch, out, 0)
        assert out == data and b.data[:4096] == data
        assert b.refused == 4                     # each child once, then bounced
        dma = memory.allocate(4096)
        desc.read_sync(ch, dma, 0)                # DMA memory goes straight through
        assert b.refused == 4
    finally:
        teardown(b, desc, ch)


def test_a_module_that_completes_and_then_fails_still_completes_once():
    class Confused(RecordingBdev):
        def submit(self, io):
            super().submit(io)             # completes it
            raise RuntimeError("and then changes its mind")

    b, desc, ch = make_stack("RecConfused")
    b.__class__ = Confused
    c = Completions()
    try:
        for i in range(5):
            c.submit(desc.read_blocks, i, ch, bytearray(512), i, 1)
        poll_until(lambda: len(c.done) == 5)
        for _ in range(5):
            current_thread().poll()
        assert len(c.done) == 5 and all(ok for ok, _ in c.done.values())
        assert ch.outstanding == 0 and ch.free_io_count == b.channel_ios   # nothing leaked
    finally:
        teardown(b, desc, ch)
