"""The user-space driver against the kernel's NVMe driver, on the same emulated controller in the
same guest boot: 4 KiB random reads and writes at queue depth 1 and 32, one thread.

Ours: `nvme.perf` (the C-level workload loop on one queue pair, polled, no interrupts).
Kernel: fio with io_uring and with libaio on /dev/nvme0n1 (O_DIRECT).
The namespace is backed by QEMU's null-co driver, so the host's file system plays no part: what is
compared is the cost of each driver and of the emulated device. Figures only compare within one
run (TCG, shared cores). The last test writes `results/nvme_vs_kernel.json` with every figure and
the ratios ours/kernel.
"""
import json
import os
import subprocess

import pytest

from benchmarks import results
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST, block_device

pytestmark = [pytest.mark.guest(nvme_backend="null", nvme_size="1G", timeout=1800),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"
CASES = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]
ENGINES = ["io_uring", "libaio"]
FIGURES = {}


class Device:
    """Who holds the controller: our driver (attached) or the kernel."""

    def __init__(self):
        self.ctrlr = self.qpair = None

    def ours(self):
        if self.ctrlr is None:
            import nvme
            self.ctrlr = nvme.attach(BDF)
            self.qpair = self.ctrlr.create_io_qpair(1024)
        return self.ctrlr, self.qpair

    def kernel(self):
        if self.ctrlr is not None:
            self.ctrlr.detach()
            self.ctrlr = self.qpair = None
        return block_device(BDF, 1)


@pytest.fixture(scope="module")
def device():
    d = Device()
    yield d
    d.kernel()


def _figures(iops, mean_us, p99_us):
    return {"iops": iops, "mean_us": mean_us, "p99_us": p99_us}


@pytest.mark.parametrize("workload,qd", CASES, ids=[f"{w}-qd{q}" for w, q in CASES])
def test_userspace_driver(benchmark, device, workload, qd):
    from nvme import perf
    ctrlr, qp = device.ours()
    ns = ctrlr.namespace(1)
    out = benchmark.pedantic(perf.run, args=(ns, qp),
                             kwargs=dict(queue_depth=qd, io_size=4096, workload=workload,
                                         seconds=results.seconds()),
                             rounds=1, iterations=1)
    assert out["errors"] == 0 and out["ios"] > 0
    lat = out["latency_us"]
    FIGURES[("userblk", workload, qd)] = _figures(out["iops"], lat["mean"], lat["p99"])
    benchmark.extra_info.update(FIGURES[("userblk", workload, qd)])


def fio(dev, engine, workload, qd, secs):
    cmd = ["fio", "--name=j", f"--rw={workload}", "--bs=4k", f"--iodepth={qd}", "--numjobs=1",
           f"--runtime={secs}", "--time_based", f"--ioengine={engine}", f"--filename={dev}",
           "--direct=1", "--output-format=json", "--norandommap", "--randrepeat=0",
           "--clocksource=clock_gettime"]   # fio's TSC calibration is not trustworthy under TCG
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["read" if "read" in workload else "write"]
    clat = job["clat_ns"]
    return _figures(job["iops"], clat["mean"] / 1000,
                    clat.get("percentile", {}).get("99.000000", 0) / 1000)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("workload,qd", CASES, ids=[f"{w}-qd{q}" for w, q in CASES])
def test_kernel_driver_fio(benchmark, device, engine, workload, qd):
    dev = device.kernel()
    secs = max(1, round(results.seconds()))
    fig = benchmark.pedantic(fio, args=(dev, engine, workload, qd, secs), rounds=1, iterations=1)
    assert fig["iops"] > 0
    FIGURES[(engine, workload, qd)] = fig
    benchmark.extra_info.update(fig)


def test_report():
    """Ratios ours/kernel per case (IOPS: higher is better; latency: ours/kernel, lower is better),
    saved to results/nvme_vs_kernel.json and printed."""
    rows = []
    for workload, qd in CASES:
        ours = FIGURES.get(("userblk", workload, qd))
        for engine in ENGINES:
            kern = FIGURES.get((engine, workload, qd))
            if not ours or not kern:
                continue
            rows.append({"case": f"{workload} qd{qd}", "kernel": engine,
                         "ours_iops": ours["iops"], "kernel_iops": kern["iops"],
                         "iops_ratio": ours["iops"] / kern["iops"],
                         "ours_mean_us": ours["mean_us"], "kernel_mean_us": kern["mean_us"],
                         "ours_p99_us": ours["p99_us"], "kernel_p99_us": kern["p99_us"],
                         "mean_latency_ratio": ours["mean_us"] / kern["mean_us"]})
    assert len(rows) == len(CASES) * len(ENGINES), "a run above failed"
    results.save("nvme_vs_kernel", {"seconds": results.seconds(), "rows": rows})
    print("\n" + results.table(rows, [
        ("case", "case", "{}"), ("kernel", "kernel", "{}"),
        ("ours_iops", "ours IOPS", "{:.0f}"), ("kernel_iops", "kernel IOPS", "{:.0f}"),
        ("iops_ratio", "ratio", "{:.2f}x"), ("ours_mean_us", "ours mean", "{:.1f}us"),
        ("kernel_mean_us", "kernel mean", "{:.1f}us"), ("ours_p99_us", "ours p99", "{:.1f}us"),
        ("kernel_p99_us", "kernel p99", "{:.1f}us")]))
