"""The aio bdev against fio on the same file: 4 KiB random reads at queue depth 32 on a 256 MiB
file, one thread each.

Ours: `bdev.perf.run` (the C-level workload loop through the whole bdev layer: checks, channel,
module) on `bdev.aio` with Linux native AIO, and with io_uring where the kernel has it.
Theirs: fio with `--ioengine=libaio` (and `io_uring`) on the same file, same size, same depth,
O_DIRECT when the file system takes it (then both bypass the page cache; otherwise both read
through it). The file is filled with random data first so that no read lands in a hole. The
last test writes `results/bdev_aio_vs_fio.json` with every figure and the ratios ours/fio.
Figures compare only within one run (shared machines, virtual disks).
"""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from benchmarks import results

SIZE = 256 << 20
QD = 32
IO_SIZE = 4096
FIGURES = {}
ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("aio", "libaio"), ("uring", "io_uring")]


def _takes_o_direct(directory):
    fd, p = tempfile.mkstemp(dir=directory, prefix=".odirect-probe-")
    os.close(fd)
    try:
        os.close(os.open(p, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(p)


@pytest.fixture(scope="module")
def target():
    """(path, direct): a 256 MiB file of random data, on a file system taking O_DIRECT if one
    is at hand (/var/tmp, the checkout, the temporary directory)."""
    candidates = [Path("/var/tmp"), ROOT, Path(tempfile.gettempdir())]
    usable = [d for d in candidates if d.is_dir() and os.access(d, os.W_OK)]
    if not usable:
        pytest.skip(reason="no writable directory for a 256 MiB file")
    direct_dirs = [d for d in usable if _takes_o_direct(d)]
    directory = (direct_dirs or usable)[0]
    if shutil.disk_usage(directory).free < 2 * SIZE:
        pytest.skip(reason=f"{directory} has less than {2 * SIZE >> 20} MiB free")
    fd, path = tempfile.mkstemp(dir=directory, prefix="userblk-aio-bench-", suffix=".img")
    try:
        chunk = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for i in range(SIZE >> 20):
                f.write(chunk[i:] + chunk[:i])
            f.flush()
            os.fsync(f.fileno())
        yield path, bool(direct_dirs)
    finally:
        os.unlink(path)


def _figures(iops, mean_us, p99_us):
    return {"iops": iops, "mean_us": mean_us, "p99_us": p99_us}


def _run_ours(path, direct, engine):
    import bdev
    from bdev import aio, perf
    b = aio.create("AIObench", path, 4096, readonly=True, engine=engine, queue_depth=128,
                   direct=None if direct else False)
    try:
        assert b.direct == direct
        with bdev.open_bdev("AIObench") as desc:
            ch = desc.get_io_channel()
            try:
                out = perf.run(desc, ch, queue_depth=QD, io_size=IO_SIZE, workload="randread",
                               seconds=results.seconds())
                out["engine_stats"] = ch.aio_stats()
            finally:
                ch.put()
    finally:
        aio.delete("AIObench")
    return out


@pytest.mark.parametrize("engine", [p[0] for p in PAIRS])
def test_userblk_aio_randread_qd32(benchmark, target, engine):
    from bdev import aio
    if engine == "uring" and not aio.uring_available():
        pytest.skip(reason="io_uring is not available on this kernel")
    path, direct = target
    out = benchmark.pedantic(_run_ours, args=(path, direct, engine), rounds=1, iterations=1)
    assert out["errors"] == 0 and out["submit_errors"] == 0 and out["ios"] > 0
    lat = out["latency_us"]
    FIGURES[("userblk", engine)] = _figures(out["iops"], lat["mean"], lat["p99"])
    benchmark.extra_info.update(FIGURES[("userblk", engine)], o_direct=direct, engine=engine,
                                file=path)


def fio(path, direct, engine, secs):
    cmd = ["fio", "--name=aio-vs-fio", "--rw=randread", f"--bs={IO_SIZE}", f"--iodepth={QD}",
           "--numjobs=1", f"--runtime={secs}", "--time_based", f"--ioengine={engine}",
           f"--filename={path}", f"--size={SIZE}", f"--direct={int(direct)}",
           "--output-format=json", "--norandommap", "--randrepeat=0", "--readonly",
           "--clocksource=clock_gettime"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]
    clat = job["clat_ns"]
    return _figures(job["iops"], clat["mean"] / 1000,
                    clat.get("percentile", {}).get("99.000000", 0) / 1000)


@pytest.mark.parametrize("engine", [p[1] for p in PAIRS])
def test_fio_randread_qd32(benchmark, target, engine):
    if shutil.which("fio") is None:
        pytest.skip(reason="fio is not installed (apt-get install fio)")
    path, direct = target
    secs = max(1, round(results.seconds()))
    try:
        fig = benchmark.pedantic(fio, args=(path, direct, engine, secs), rounds=1, iterations=1)
    except RuntimeError as e:
        if engine == "io_uring":
            pytest.skip(reason=f"fio cannot use io_uring here: {e}")
        raise
    assert fig["iops"] > 0
    FIGURES[("fio", engine)] = fig
    benchmark.extra_info.update(fig, o_direct=direct, engine=engine, file=path)


def test_report(target):
    """Ratios ours/fio (IOPS: higher is better; latency: lower is better), saved to
    results/bdev_aio_vs_fio.json and printed."""
    path, direct = target
    rows = []
    for ours, theirs in PAIRS:
        a, b = FIGURES.get(("userblk", ours)), FIGURES.get(("fio", theirs))
        if not a or not b:
            continue
        rows.append({"case": f"randread 4k qd{QD}", "ours": f"bdev.aio {ours}",
                     "fio": f"fio {theirs}", "ours_iops": a["iops"], "fio_iops": b["iops"],
                     "iops_ratio": a["iops"] / b["iops"], "ours_mean_us": a["mean_us"],
                     "fio_mean_us": b["mean_us"], "ours_p99_us": a["p99_us"],
                     "fio_p99_us": b["p99_us"], "mean_latency_ratio": a["mean_us"] / b["mean_us"]})
    if not any(r["ours"] == "bdev.aio aio" for r in rows):
        pytest.skip(reason="the aio/libaio pair did not run (see the skips above)")
    results.save("bdev_aio_vs_fio", {"seconds": results.seconds(), "file_size": SIZE,
                                     "o_direct": direct, "queue_depth": QD, "io_size": IO_SIZE,
                                     "file_system_dir": str(Path(path).parent), "rows": rows})
    print("\n" + results.table(rows, [
        ("ours", "ours", "{}"), ("fio", "fio", "{}"),
        ("ours_iops", "ours IOPS", "{:.0f}"), ("fio_iops", "fio IOPS", "{:.0f}"),
        ("iops_ratio", "ratio", "{:.2f}x"), ("ours_mean_us", "ours mean", "{:.1f}us"),
        ("fio_mean_us", "fio mean", "{:.1f}us"), ("ours_p99_us", "ours p99", "{:.1f}us"),
        ("fio_p99_us", "fio p99", "{:.1f}us")]))
