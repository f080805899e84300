"""`await` on bdevs: env.asyncio_driver (the loop-side poller) and bdev.async_io (AsyncDescriptor).

Plain pytest: each test runs its coroutine with asyncio.run.
"""
import asyncio
import gc
import threading
import weakref

import pytest

import bdev
from bdev import malloc, null
from bdev.async_io import AsyncDescriptor, open_bdev_async
from bdev.errors import DescriptorClosed, IoError, ReadOnlyDescriptor, UnsupportedIoType
from env import memory
from env.asyncio_driver import AsyncioDriver, find_driver, get_driver, userblk_loop
from env.errors import InvalidArgument, ThreadError, WrongThreadError
from env.thread import Thread, current_thread
from tests.bdev.helpers import RecordingBdev

BS = 512


def run(coro):
    """asyncio.run, failing the test if the loop reported anything to its exception handler
    (e.g. "Future exception was never retrieved", a callback that raised)."""
    reports = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reports.append(ctx))
        return await coro

    result = asyncio.run(main())
    gc.collect()                       # "never retrieved" is reported when a future dies
    assert not reports, reports
    return result


@pytest.fixture
def mall():
    b = malloc.create("MallocAsync", size=4 << 20)
    yield b
    if not b.removed:
        b.unregister()


@pytest.fixture
def nul():
    b = null.create("NullAsync", size=64 << 20)
    yield b
    if not b.removed:
        b.unregister()


class SmallChannelBdev(RecordingBdev):
    """A recording bdev whose channels have only a few I/O objects."""
    channel_ios = 4


class WeakBuf(bytearray):
    """A bytearray one can hold a weak reference to."""


def block_pattern(i, n=BS):
    return bytes([i & 0xFF]) * n


def bdev_channels(b):
    return [ch for ch in current_thread().channels if ch.device is b]


# ---- round trips ---------------------------------------------------------------------------------
def test_round_trip_every_io_type(mall):
    async def main():
        async with open_bdev_async("MallocAsync", write=True) as a:
            assert a.block_size == BS and a.num_blocks == mall.num_blocks and a.writable
            data = bytes(range(256)) * 16
            assert await a.write(data, 8192) is None
            buf = bytearray(4096)
            assert await a.read(buf, 8192) is buf and buf == data
            assert await a.compare(data, 8192) is None
            # vectored, across segments of different sizes
            parts = [bytearray(512), bytearray(1536), bytearray(2048)]
            assert await a.readv(parts, 8192) is parts
            assert b"".join(parts) == data
            await a.writev([b"a" * 512, b"b" * 1024], 0)
            assert await a.read(bytearray(1536), 0) == b"a" * 512 + b"b" * 1024
            # blocks variants
            await a.write_blocks(b"c" * 1024, 100, 2)
            assert await a.read_blocks(bytearray(1024), 100, 2) == b"c" * 1024
            await a.compare_blocks(b"c" * 1024, 100, 2)
            await a.write_zeroes_blocks(100, 1)
            assert await a.read_blocks(bytearray(1024), 100, 2) == bytes(512) + b"c" * 512
            await a.unmap_blocks(101, 1)
            assert await a.read_blocks(bytearray(512), 101, 1) == bytes(512)
            await a.write_zeroes(8192, 4096)
            assert await a.read(bytearray(4096), 8192) == bytes(4096)
            await a.write(data, 8192)
            await a.unmap(8192, 2048)
            assert await a.read(bytearray(4096), 8192) == bytes(2048) + data[2048:]
            await a.flush()
            await a.flush(0, 4096)
            await a.reset()
            # generic submission by type name, DMA buffers
            dbuf = memory.allocate(4096)
            memoryview(dbuf)[:] = data
            await a.submit("write", dbuf, 40, 8)
            out = memory.allocate(4096)
            assert await a.submit("read", out, 40, 8) is out and bytes(out) == data
            v = [bytearray(2048), bytearray(2048)]
            assert await a.submitv("read", v, 40) is v and b"".join(v) == data
            dbuf.free()
            out.free()
            ch = a.channel()
            assert ch.thread is current_thread() is get_driver().thread
            assert bdev_channels(mall) == [ch]
        # leaving the block put the channel and closed the descriptor
        assert a.closed and a.descriptor.closed and ch.released
        assert bdev_channels(mall) == []
        assert mall.open_descriptors == 0
    run(main())


def test_gather_of_many_reads_keeps_queue_depth(mall):
    n = 1000

    async def main():
        async with open_bdev_async("MallocAsync", write=True) as a:
            await asyncio.gather(*(a.write(block_pattern(i), i * BS) for i in range(n)))
            drv = get_driver()
            before = drv.stats()
            bufs = [bytearray(BS) for _ in range(n)]
            futs = [a.read(b, i * BS) for i, b in enumerate(bufs)]
            # all submitted at once: the whole batch is in flight on the channel together
            assert drv.inflight == n and a.inflight == n and a.channel().outstanding == n
            results = await asyncio.gather(*futs)
            after = drv.stats()
            assert results == bufs
            assert all(b == block_pattern(i) for i, b in enumerate(bufs))
            assert after["completions"] - before["completions"] == n
            # a malloc bdev finishes everything submitted before a poll in that poll: the
            # thousand completions took a handful of polls, not one each
            assert after["busy_polls"] - before["busy_polls"] < 10
            assert drv.inflight == 0
    run(main())


def test_more_concurrent_ios_than_channel_objects_wait_for_them():
    b = SmallChannelBdev("SmallAsync", num_blocks=256).register()
    try:
        async def main():
            async with open_bdev_async("SmallAsync", write=True) as a:
                writes = [a.write(block_pattern(i), i * BS) for i in range(200)]
                assert a.channel().free_io_count == 0
                assert a.inflight == 200      # 4 in the channel, the rest waiting for objects
                await asyncio.gather(*writes)
                bufs = await asyncio.gather(*(a.read(bytearray(BS), i * BS) for i in range(200)))
                assert all(x == block_pattern(i) for i, x in enumerate(bufs))
        run(main())
        # each I/O reached the module once, in the order submitted
        writes = [r for r in b.requests if r[0] == "write"]
        assert [r[1] for r in writes] == list(range(200))
    finally:
        b.unregister()


# ---- living with other tasks ---------------------------------------------------------------------
def test_sleeping_task_wakes_while_io_runs(nul):
    cap = 2_000_000            # a starved timer would let the readers run into this

    async def main():
        async with open_bdev_async("NullAsync") as a:
            drv = get_driver()
            state = {"ios": 0, "stop": False, "yields": 0}
            seen = {}

            async def reader(i):
                buf = bytearray(4096)
                while not state["stop"] and state["ios"] < cap:
                    await a.read(buf, i * 4096)
                    state["ios"] += 1

            async def yielder():
                while not state["stop"]:
                    await asyncio.sleep(0)
                    state["yields"] += 1

            async def sleeper():
                await asyncio.sleep(0.05)
                seen.update(ios=state["ios"], yields=state["yields"],
                            readers_running=sum(not t.done() for t in readers))
                state["stop"] = True

            readers = [asyncio.create_task(reader(i)) for i in range(32)]
            await asyncio.gather(sleeper(), yielder(), *readers)
            # the timer fired in the middle of the I/O: every reader still going, reads done
            # before, and well before the readers could run into the cap
            assert seen["readers_running"] == 32
            assert 0 < seen["ios"] < cap
            assert seen["yields"] > 0             # and a busy task was not starved either
            assert drv.inflight == 0
    run(main())


def test_idle_loop_does_not_spin(mall):
    async def main():
        async with open_bdev_async("MallocAsync", write=True) as a:
            await a.write(bytes(4096), 0)
            th = get_driver().thread
            before = th.stats()["iterations"]
            await asyncio.sleep(0.2)
            idle = th.stats()["iterations"] - before
            # busy-polling would be hundreds of thousands; the idle timer backs off to 50 ms
            assert idle < 50, idle
            return idle

    run(main())

    async def no_idle_polls():
        async with userblk_loop(idle_interval=None) as drv:
            async with open_bdev_async("MallocAsync") as a:
                await a.read(bytearray(4096), 0)
                before = drv.thread.stats()["iterations"]
                await asyncio.sleep(0.2)
                assert drv.thread.stats()["iterations"] == before
                await a.read(bytearray(4096), 0)      # and a submission wakes it again
                assert drv.thread.stats()["iterations"] > before
    run(no_idle_polls())


def test_messages_to_an_idle_thread_still_run():
    async def main(idle_interval):
        async with userblk_loop(idle_interval=idle_interval) as drv:
            ran = asyncio.Event()
            where = []
            loop = asyncio.get_running_loop()

            def msg():
                where.append(threading.get_ident())
                loop.call_soon(ran.set)

            def sender():
                drv.thread.send(msg)
                if idle_interval is None:
                    drv.wake_threadsafe()         # nothing else would poll
            t = threading.Thread(target=sender)
            t.start()
            t.join()
            await asyncio.wait_for(ran.wait(), 10)
            assert where == [threading.get_ident()]
    run(main((0.001, 0.05)))
    run(main(None))


# ---- cancellation --------------------------------------------------------------------------------
def test_cancelled_read_completes_once_and_keeps_its_buffer():
    b = RecordingBdev("DeferAsync", num_blocks=64, defer=True).register()
    try:
        b.data[:BS] = b"z" * BS

        async def main():
            async with open_bdev_async("DeferAsync", write=True) as a:
                drv = get_driver()
                buf = WeakBuf(BS)
                ref = weakref.ref(buf)

                async def reader(x):
                    return await a.read(x, 0)

                task = asyncio.create_task(reader(buf))
                del buf
                await asyncio.sleep(0.01)
                assert len(b.pending) == 1 and drv.inflight == 1
                task.cancel()
                await asyncio.wait([task])
                assert task.cancelled()
                del task                           # (its traceback would hold the buffer)
                gc.collect()
                target = ref()
                assert target is not None          # the I/O still holds the buffer
                assert drv.inflight == 1 and a.inflight == 1
                done = drv.completions
                b.release()                        # the device finishes the read now
                assert drv.completions == done + 1 and drv.inflight == 0
                assert target == b"z" * BS         # delivered into the buffer, result dropped
                del target
                gc.collect()
                assert ref() is None               # and the buffer is let go
                assert len(b.requests) == 1        # submitted once
                await asyncio.sleep(0.01)          # nothing further arrives
                assert drv.completions == done + 1
        run(main())
    finally:
        b.unregister()


def test_cancelling_a_gather_loses_and_duplicates_nothing(nul):
    async def main():
        async with open_bdev_async("NullAsync") as a:
            drv = get_driver()
            done = drv.completions
            bufs = [bytearray(4096) for _ in range(500)]
            g = asyncio.gather(*(a.read(x, i * 4096) for i, x in enumerate(bufs)))
            g.cancel()                             # before any completion was polled
            with pytest.raises(asyncio.CancelledError):
                await g
            await a.drain()                        # the I/O itself still completes
            assert drv.completions - done == 500 and a.inflight == 0
    run(main())


def test_cancelled_io_waiting_for_a_channel_object_is_never_submitted():
    b = SmallChannelBdev("SmallDefer", num_blocks=64, defer=True).register()
    try:
        async def main():
            async with open_bdev_async("SmallDefer", write=True) as a:
                first = [a.write(block_pattern(i), i * BS) for i in range(4)]
                waiting = a.write(block_pattern(9), 9 * BS)
                assert len(b.pending) == 4 and a.inflight == 5
                waiting.cancel()
                b.release()
                await asyncio.gather(*first)
                await a.drain()
                assert a.inflight == 0
            assert [r[1] for r in b.requests] == [0, 1, 2, 3]
            assert b.data[9 * BS:10 * BS] == bytes(BS)
        run(main())
    finally:
        b.unregister()


# ---- errors --------------------------------------------------------------------------------------
def test_miscompare_raises_io_error(mall):
    async def main():
        async with open_bdev_async("MallocAsync", write=True) as a:
            await a.write(b"x" * 4096, 0)
            with pytest.raises(IoError) as e:
                await a.compare(b"y" * 4096, 0)
            assert e.value.status.kind == "miscompare" and e.value.bdev == "MallocAsync"
            assert e.value.status.io_type == "compare" and e.value.status.num_blocks == 8
            await a.compare(b"x" * 4096, 0)       # the same compare with equal data passes
    run(main())


def test_failed_io_raises_io_error_with_its_status():
    class Failing(RecordingBdev):
        def execute(self, io):
            io.complete("failed" if io.type == "write" else "success")

    b = Failing("FailAsync", num_blocks=64).register()
    try:
        async def main():
            async with open_bdev_async("FailAsync", write=True) as a:
                results = await asyncio.gather(a.write(b"q" * BS, 0), a.read(bytearray(BS), 0),
                                               return_exceptions=True)
                assert isinstance(results[0], IoError) and results[0].status.kind == "failed"
                assert isinstance(results[1], bytearray)
        run(main())
    finally:
        b.unregister()


def test_submission_errors_raise_at_the_call(mall):
    async def main():
        ro = open_bdev_async("MallocAsync")
        drv = get_driver()
        with pytest.raises(ReadOnlyDescriptor):
            ro.write(b"x" * BS, 0)                 # raised by the call, before any await
        with pytest.raises(InvalidArgument, match="outside"):
            ro.read(bytearray(BS), mall.size)
        with pytest.raises(InvalidArgument, match="multiples"):
            ro.read(bytearray(BS), 100)
        with pytest.raises(InvalidArgument, match="writable"):
            ro.read(b"immutable" * 64, 0, BS)
        with pytest.raises(InvalidArgument, match="multiples"):
            ro.flush(0, 100)
        assert drv.inflight == 0 and ro.inflight == 0
        await ro.aclose()
        with pytest.raises(DescriptorClosed):
            ro.read(bytearray(BS), 0)
    run(main())
    b = RecordingBdev("NoUnmap", num_blocks=16, io_types=("read", "write")).register()
    try:
        async def unsupported():
            async with open_bdev_async("NoUnmap", write=True) as a:
                with pytest.raises(UnsupportedIoType):
                    a.unmap(0, BS)
        run(unsupported())
    finally:
        b.unregister()


def test_calls_outside_a_running_loop_are_refused(mall):
    a = open_bdev_async("MallocAsync")
    with pytest.raises(RuntimeError, match="no running event loop"):
        a.read(bytearray(BS), 0)
    with pytest.raises(ThreadError, match="no running event loop"):
        get_driver()
    a.close()                                      # never used on a loop: a plain close
    assert a.closed and a.descriptor.closed


# ---- drivers and loops ---------------------------------------------------------------------------
def test_one_driver_per_loop_and_its_lifecycle(mall):
    async def main():
        drv = get_driver()
        assert get_driver() is drv is find_driver()
        assert drv.loop is asyncio.get_running_loop() and drv.thread is current_thread()
        with pytest.raises(ThreadError, match="already has a driver"):
            AsyncioDriver()
        with pytest.raises(ThreadError, match="options"):
            async with userblk_loop(polls_per_tick=2):
                pass
        a = open_bdev_async("MallocAsync")
        await a.read(bytearray(BS), 0)
        ch = a.channel()
        await drv.aclose()                         # detaches: the channel is put
        assert drv.closed and ch.released and find_driver() is None
        await a.read(bytearray(BS), 0)             # a new driver and channel on first use
        assert get_driver() is not drv and not a.channel().released
        await a.aclose()
        assert bdev_channels(mall) == []
    run(main())


def test_driver_options_are_checked():
    async def main():
        for kw in (dict(polls_per_tick=0), dict(idle_interval=-1), dict(idle_interval=(2, 1)),
                   dict(idle_interval="x"), dict(thread=object())):
            with pytest.raises(InvalidArgument):
                AsyncioDriver(**kw)
        assert find_driver() is None
    run(main())


def test_a_loop_closed_without_closing_leaves_nothing_behind(mall):
    # no `async with`: the channel stays with the driver when asyncio.run closes the loop ...
    async def careless():
        a = open_bdev_async("MallocAsync")
        await a.read(bytearray(BS), 0)
        return a, a.channel()

    a, ch = asyncio.run(careless())
    assert not ch.released

    # ... and is put the next time a driver is made on this OS thread
    async def next_loop():
        get_driver()
    run(next_loop())
    assert ch.released and bdev_channels(mall) == []
    a.close()


def test_explicit_thread(mall):
    th = Thread("asyncio-explicit")

    def body():
        async def main():
            async with userblk_loop(thread=th) as drv:
                assert current_thread() is th and drv.thread is th
                async with open_bdev_async("MallocAsync", write=True) as a:
                    await a.write(b"e" * BS, 0)
                    assert a.channel().thread is th
                    assert await a.read(bytearray(BS), 0) == b"e" * BS
        run(main())

    t = threading.Thread(target=body)         # an OS thread of its own, so binding is clean
    t.start()
    t.join()
    assert th.stats()["iterations"] > 0


def test_driver_used_from_another_os_thread_is_refused():
    async def main():
        drv = get_driver()
        err = []
        t = threading.Thread(target=lambda: err.append(_raises(drv.wake)))
        t.start()
        t.join()
        assert isinstance(err[0], WrongThreadError)
    run(main())


def _raises(fn):
    try:
        fn()
    except Exception as e:
        return e
    return None


def test_generic_submit_adapts_any_callback_api(mall):
    async def main():
        drv = get_driver()
        desc = bdev.open_bdev("MallocAsync", write=True)
        ch = desc.get_io_channel()
        try:
            desc.write_sync(ch, b"g" * BS, 0)
            buf = bytearray(BS)
            ok, status = await drv.submit(lambda cb: desc.read(ch, buf, 0, cb=cb))
            assert ok and status is None and buf == b"g" * BS

            def check(ok, status):
                if not ok:
                    raise IoError(str(status), status)
                return "same"
            assert await drv.submit(lambda cb: desc.compare(ch, b"g" * BS, 0, cb=cb),
                                    check) == "same"
            with pytest.raises(IoError):
                await drv.submit(lambda cb: desc.compare(ch, b"h" * BS, 0, cb=cb), check)
            with pytest.raises(InvalidArgument):   # a refused submission counts nothing
                drv.submit(lambda cb: desc.read(ch, buf, 3, cb=cb))
            assert drv.inflight == 0
        finally:
            ch.put()
            desc.close()
    run(main())


def test_two_loops_on_two_os_threads(mall):
    """Each OS thread runs its own loop with its own driver, env Thread and channel; one shared
    AsyncDescriptor serves both, and closing it from a third loop puts each channel on its own
    loop."""
    shared = AsyncDescriptor(bdev.open_bdev("MallocAsync", write=True), own=True)
    info = {}
    ready = [threading.Event(), threading.Event()]
    stop = threading.Event()
    errors = []

    def body(k):
        async def main():
            drv = get_driver()
            own = open_bdev_async("MallocAsync", write=True)
            region = k * 1024 * 1024
            for a in (own, shared):
                await asyncio.gather(*(a.write(block_pattern(k * 50 + i), region + i * BS)
                                       for i in range(64)))
                bufs = await asyncio.gather(*(a.read(bytearray(BS), region + i * BS)
                                              for i in range(64)))
                assert all(x == block_pattern(k * 50 + i) for i, x in enumerate(bufs))
            info[k] = dict(driver=drv, thread=current_thread(), ident=threading.get_ident(),
                           own_ch=own.channel(), shared_ch=shared.channel())
            await own.aclose()
            ready[k].set()
            while not stop.is_set():             # keep the loop running for the close
                await asyncio.sleep(0.005)
        try:
            run(main())
        except BaseException as e:               # reported by the main thread
            errors.append(e)
            ready[k].set()

    threads = [threading.Thread(target=body, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        for ev in ready:
            assert ev.wait(30)
        assert not errors, errors
        a, b = info[0], info[1]
        assert a["driver"] is not b["driver"] and a["thread"] is not b["thread"]
        assert a["ident"] != b["ident"]
        for x in (a, b):
            assert x["driver"].thread is x["thread"]
            assert x["own_ch"] is x["shared_ch"]     # one channel per (thread, bdev)
            assert x["own_ch"].thread is x["thread"] and not x["own_ch"].released
        assert a["own_ch"] is not b["own_ch"]

        async def close_from_here():
            await shared.aclose()
        run(close_from_here())
        assert shared.closed and shared.descriptor.closed
        assert a["own_ch"].released and b["own_ch"].released
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert mall.open_descriptors == 0


def test_aclose_waits_for_io_in_flight_and_refuses_new_io():
    b = RecordingBdev("DeferClose", num_blocks=64, defer=True).register()
    try:
        async def main():
            a = open_bdev_async("DeferClose", write=True)
            w = a.write(b"w" * BS, 0)
            ch = a.channel()
            closing = asyncio.create_task(a.aclose())
            await asyncio.sleep(0.01)
            assert not closing.done() and not ch.released      # waiting for the write
            with pytest.raises(DescriptorClosed):
                a.read(bytearray(BS), 0)
            b.release()
            await closing
            assert await w is None
            assert ch.released and a.closed and a.descriptor.closed
            assert b.data[:BS] == b"w" * BS
        run(main())
    finally:
        b.unregister()
