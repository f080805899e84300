"""The bdev layer against its baselines, each measured in the same run (one core unless said):

- null bdev, 4 KiB random reads at queue depth 128, through the C-level perf engine, against
  `fio --ioengine=null` at the same depth (target >= 1.0x, aim 2x);
- the same null bdev through the Python API, a Python callback per I/O that submits the next one
  (target >= 0.2x of that fio figure);
- malloc bdev, 128 KiB sequential reads through the C path, against a plain memcpy of the same
  sizes (target >= 0.8x);
- two OS threads with a channel each on a null bdev, against one thread (target >= 1.8x);
- the resident size of a long `userblk perf` run: flat after the first second (no allocation per
  I/O), and the default run's peak.

Figures and ratios go to pytest-benchmark's extra_info and to results/bdev_*.json.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import bdev
from benchmarks import results
from bdev import malloc, null
from bdev import perf as bperf
from env import _cbench, memory
from env.thread import current_thread

QD = 128


def fio_null(qd, seconds):
    if shutil.which("fio") is None:
        pytest.skip(reason="fio is not installed (apt-get install fio)")
    out = subprocess.run(
        ["fio", "--name=null", "--ioengine=null", "--rw=randread", "--bs=4k",
         f"--iodepth={qd}", "--numjobs=1", "--size=1g", f"--runtime={max(1, round(seconds))}",
         "--time_based", "--norandommap", "--randrepeat=0", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)["jobs"][0]["read"]["iops"]


@pytest.fixture
def null_bdev():
    b = null.create("BenchNull", size=1 << 30, block_size=512)
    yield b
    b.unregister()


def run_c_path(name, *, threads=1, **params):
    """Total IOPS of `threads` OS threads, each with its own channel, running the C-level
    workload on bdev `name`."""
    out = [None] * threads

    def job(i):
        d = bdev.open_bdev(name, write=True)
        ch = d.get_io_channel()
        try:
            out[i] = bperf.run(d, ch, seed=i + 1, **params)
        finally:
            ch.put()
            d.close()

    ts = [threading.Thread(target=job, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(r is not None and r["errors"] == 0 for r in out), out
    return out


def test_null_c_path_vs_fio_null(benchmark, null_bdev):
    secs = results.seconds()
    fio = fio_null(QD, secs)
    r = benchmark.pedantic(lambda: run_c_path("BenchNull", queue_depth=QD, io_size=4096,
                                              workload="randread", seconds=secs)[0],
                           rounds=1, iterations=1)
    ratio = r["iops"] / fio
    benchmark.extra_info.update(ours_iops=r["iops"], fio_null_iops=fio, ratio=ratio)
    results.save("bdev_null_vs_fio", {"queue_depth": QD, "ours_iops": r["iops"],
                                      "fio_null_iops": fio, "ratio": ratio,
                                      "latency_us": r["latency_us"]})
    print(f"\nnull bdev C path {r['iops']:,.0f} IOPS vs fio null {fio:,.0f}: {ratio:.2f}x")


def python_path_iops(name, qd, seconds):
    """IOPS of the Python API: each completion's callback submits the next read."""
    d = bdev.open_bdev(name)
    ch = d.get_io_channel()
    t = current_thread()
    buf = memory.allocate(4096)
    state = {"done": 0, "stop": False}
    nblocks = d.bdev.num_blocks - 8

    def cb(ok, status):
        state["done"] += 1
        if not state["stop"]:
            d.read_blocks(ch, buf, (state["done"] * 8) % nblocks, 8, cb)

    try:
        for i in range(qd):
            d.read_blocks(ch, buf, i * 8, 8, cb)
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(64):
                t.poll()
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - start
        n = state["done"]
        state["stop"] = True
        while ch.outstanding:
            t.poll()
        return n / elapsed
    finally:
        ch.put()
        d.close()
        buf.free()


def test_null_python_path_vs_fio_null(benchmark, null_bdev):
    secs = results.seconds()
    fio = fio_null(QD, secs)
    iops = benchmark.pedantic(python_path_iops, args=("BenchNull", QD, secs), rounds=1,
                              iterations=1)
    ratio = iops / fio
    benchmark.extra_info.update(ours_iops=iops, fio_null_iops=fio, ratio=ratio)
    results.save("bdev_null_python_vs_fio", {"queue_depth": QD, "ours_iops": iops,
                                             "fio_null_iops": fio, "ratio": ratio})
    print(f"\nnull bdev Python path {iops:,.0f} IOPS vs fio null {fio:,.0f}: {ratio:.2f}x")


def test_malloc_sequential_reads_vs_memcpy(benchmark):
    size, block, qd = 64 << 20, 128 << 10, 4
    secs = results.seconds()
    b = malloc.create("BenchMalloc", size=size)
    try:
        src, dst = memory.allocate(size), memory.allocate(qd * block)
        memoryview(src)[:] = os.urandom(1 << 16) * (size >> 16)
        total = 0
        start = time.perf_counter()
        while time.perf_counter() - start < secs:
            total += _cbench.memcpy_loop(src, dst, block, 256 << 20)
        memcpy_bps = total / (time.perf_counter() - start)
        r = benchmark.pedantic(lambda: run_c_path("BenchMalloc", queue_depth=qd, io_size=block,
                                                  workload="read", seconds=secs)[0],
                               rounds=1, iterations=1)
        ours_bps = r["mib_per_s"] * (1 << 20)
        ratio = ours_bps / memcpy_bps
        benchmark.extra_info.update(ours_mib_s=r["mib_per_s"], memcpy_mib_s=memcpy_bps / (1 << 20),
                                    ratio=ratio)
        results.save("bdev_malloc_vs_memcpy", {"io_size": block, "queue_depth": qd,
                                               "ours_mib_s": r["mib_per_s"],
                                               "memcpy_mib_s": memcpy_bps / (1 << 20),
                                               "ratio": ratio})
        print(f"\nmalloc 128 KiB seq reads {r['mib_per_s']:,.0f} MiB/s vs memcpy "
              f"{memcpy_bps / (1 << 20):,.0f} MiB/s: {ratio:.2f}x")
    finally:
        b.unregister()


def test_two_threads_vs_one(benchmark, null_bdev):
    secs = results.seconds()
    one = run_c_path("BenchNull", threads=1, queue_depth=QD, io_size=4096,
                     workload="randread", seconds=secs)
    two = benchmark.pedantic(lambda: run_c_path("BenchNull", threads=2, queue_depth=QD,
                                                io_size=4096, workload="randread", seconds=secs),
                             rounds=1, iterations=1)
    one_iops = one[0]["iops"]
    two_iops = sum(r["iops"] for r in two)
    ratio = two_iops / one_iops
    benchmark.extra_info.update(one_thread_iops=one_iops, two_threads_iops=two_iops,
                                ratio=ratio, cpus=os.cpu_count())
    results.save("bdev_null_two_threads", {"one_thread_iops": one_iops,
                                           "two_threads_iops": two_iops, "ratio": ratio,
                                           "per_thread": [r["iops"] for r in two],
                                           "cpus": os.cpu_count()})
    print(f"\nnull bdev: 1 thread {one_iops:,.0f} IOPS, 2 threads {two_iops:,.0f}: {ratio:.2f}x")


def test_resident_size_stays_flat(benchmark, tmp_path):
    """A long `userblk perf` (60 s in a full run): RSS after the first second must not grow
    (no allocation per I/O); also the peak of the default (no-argument) run."""
    secs = max(5, round(results.seconds(60)))
    out = tmp_path / "long.json"
    cmd = [sys.executable, "-m", "userblk", "perf", "-t", str(secs), "--results", str(out),
           "--no-progress"]
    benchmark.pedantic(lambda: subprocess.run(cmd, check=True, capture_output=True), rounds=1,
                       iterations=1)
    long_run = json.loads(out.read_text())
    default = tmp_path / "default.json"
    subprocess.run([sys.executable, "-m", "userblk", "perf", "--results", str(default),
                    "--no-progress"], check=True, capture_output=True)
    default_run = json.loads(default.read_text())
    rss = long_run["rss"]
    # while the workload runs: from the first second to the end of the run (the last samples,
    # taken after the run, see its buffers freed)
    samples = [s["rss_bytes"] for s in rss["samples"] if 1.0 <= s["t"] < secs]
    growth = max(samples) - min(samples) if samples else 0
    figures = {"seconds": secs, "samples": len(rss["samples"]),
               "rss_after_first_second_min": min(samples) if samples else None,
               "rss_after_first_second_max": max(samples) if samples else None,
               "growth_after_first_second_bytes": growth,
               "long_run_peak_bytes": rss["peak_bytes"],
               "default_run_peak_bytes": default_run["rss"]["peak_bytes"],
               "long_run_iops": long_run["total"]["iops"],
               "rss_samples": [(round(x["t"], 1), x["rss_bytes"]) for x in rss["samples"]],
               "bytes_per_io_after_first_second": growth / max(1, long_run["total"]["ios"])}
    benchmark.extra_info.update(figures)
    results.save("perf_rss", figures)
    print(f"\nRSS over {secs} s: grew {growth} bytes after the first second; peak "
          f"{rss['peak_bytes'] / 2**20:.1f} MiB (default run {figures['default_run_peak_bytes'] / 2**20:.1f} MiB)")
    assert len(samples) >= secs - 2
