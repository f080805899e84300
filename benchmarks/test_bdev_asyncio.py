"""The asyncio adapter: 4 KiB reads on a null bdev through `await adesc.read_blocks(...)`, 128
tasks each awaiting one read at a time (queue depth 128), one event loop on one core.

For scale, the same loop's floor is measured too: 128 tasks awaiting bare futures that a
call_soon callback resolves in batches (what any asyncio I/O adapter costs at least, without
I/O). Figures go to extra_info and results/bdev_null_asyncio.json; nothing is asserted about
speed.
"""
import asyncio
import time

import pytest

from benchmarks import results
from bdev import null
from bdev.async_io import open_bdev_async
from env import memory
from env.asyncio_driver import get_driver

TASKS = 128
IO_BLOCKS = 8                  # 4 KiB of 512-byte blocks


@pytest.fixture
def null_bdev():
    b = null.create("BenchNullAsync", size=1 << 30, block_size=512)
    yield b
    b.unregister()


async def _await_reads(name, seconds):
    async with open_bdev_async(name) as adesc:
        nblocks = adesc.num_blocks
        bufs = [memory.allocate(IO_BLOCKS * 512) for _ in range(TASKS)]
        state = {"ios": 0, "stop": False}

        async def worker(i):
            buf = bufs[i]
            off = i * IO_BLOCKS
            step = TASKS * IO_BLOCKS
            n = 0
            while not state["stop"]:
                await adesc.read_blocks(buf, off, IO_BLOCKS)
                n += 1
                off = (off + step) % (nblocks - IO_BLOCKS)
            state["ios"] += n

        async def timer():
            await asyncio.sleep(seconds)
            state["stop"] = True

        drv = get_driver()
        before = drv.stats()
        start = time.perf_counter()
        await asyncio.gather(timer(), *(worker(i) for i in range(TASKS)))
        elapsed = time.perf_counter() - start
        after = drv.stats()
    for b in bufs:
        b.free()
    ios = state["ios"]
    polls = after["polls"] - before["polls"]
    return {"iops": ios / elapsed, "ios": ios, "seconds": elapsed,
            "us_per_io": elapsed / ios * 1e6 if ios else None,
            "ios_per_poll": ios / polls if polls else None}


async def _future_floor(seconds):
    loop = asyncio.get_running_loop()
    pending = []
    state = {"ops": 0, "stop": False}

    def tick():
        batch = pending[:]
        pending.clear()
        for f in batch:
            f.set_result(None)
        if not state["stop"] or pending:
            loop.call_soon(tick)

    async def worker():
        n = 0
        while not state["stop"]:
            f = loop.create_future()
            pending.append(f)
            await f
            n += 1
        state["ops"] += n

    async def timer():
        await asyncio.sleep(seconds)
        state["stop"] = True

    loop.call_soon(tick)
    start = time.perf_counter()
    await asyncio.gather(timer(), *(worker() for _ in range(TASKS)))
    return state["ops"] / (time.perf_counter() - start)


def test_null_reads_through_await(benchmark, null_bdev):
    secs = results.seconds()
    r = benchmark.pedantic(lambda: asyncio.run(_await_reads("BenchNullAsync", secs)), rounds=1,
                           iterations=1)
    floor = asyncio.run(_future_floor(min(secs, 2.0)))
    figures = dict(r, tasks=TASKS, io_size=IO_BLOCKS * 512, asyncio_future_floor_ops=floor,
                   fraction_of_floor=r["iops"] / floor)
    benchmark.extra_info.update(figures)
    results.save("bdev_null_asyncio", figures)
    print(f"\nnull bdev through await, {TASKS} tasks: {r['iops']:,.0f} IOPS "
          f"({r['us_per_io']:.2f} us/IO, {r['ios_per_poll']:.1f} I/Os per poll); bare asyncio "
          f"futures {floor:,.0f}/s")
    assert r["ios"] > 0
