"""NVMe/TCP: userblk's initiator against the Linux kernel's, on the same nvmet-tcp target, in one
guest boot; and the TCP bdev against the local PCIe bdev on the same namespace.

The target is the kernel's nvmet-tcp on loopback. Its namespace for the initiator comparison is a
null_blk device (memory, completes inline): what is compared is the cost of each initiator and of
the network stack, not of an emulated disk. The guest is left as it boots (no CPU pinning, no
packet steering): the target's work runs where the kernel puts it for both initiators.

- ours: `bdev.perf` on the NVMe bdev of `bdev_nvme_attach_controller(trtype TCP)`: the C
  workload loop through the bdev layer to the TCP queue pair, polled.
- kernel: fio with io_uring on the /dev/nvmeXnY that `nvme connect -t tcp` made, O_DIRECT.

Cases (the issue's): 4 KiB random read at QD 32 (IOPS, higher is better), 4 KiB random read at
QD 1 (mean latency, lower is better), 128 KiB sequential read at QD 8 (throughput). TCG on a shared
host drifts a lot, so each case alternates ours and the kernel's for ROUNDS rounds and compares
the medians of the per-round ratios. Last, the TCP bdev and the local PCIe bdev on the guest's
NVMe namespace (QEMU's controller, null-co), measured one after the other (the kernel's target
needs the device that the PCIe bdev takes). `results/nvme_tcp_vs_kernel.json` keeps every
figure and ratio.
"""
import json
import os
import statistics
import subprocess
import time

import pytest

from benchmarks import results
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST, block_device

pytestmark = [pytest.mark.guest(nvme_backend="null", nvme_size="1G", timeout=2400),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"
NULL_NQN = "nqn.2024-01.io.userblk:bench-null"
NVME_NQN = "nqn.2024-01.io.userblk:bench-nvme"
CASES = [("randread", 32, 4096), ("randread", 1, 4096), ("read", 8, 128 * 1024)]
IDS = ["randread-4k-qd32", "randread-4k-qd1", "read-128k-qd8"]
ROUNDS = 6
FIGURES = {}


def _figures(iops, mean_us, mib_s):
    return {"iops": iops, "mean_us": mean_us, "mib_s": mib_s}


@pytest.fixture(scope="module")
def setup():
    """The target: nvmet-tcp on loopback, its namespace a null_blk device."""
    from tests.nvme.nvmet import NvmetTarget
    subprocess.run(["modprobe", "null_blk", "nr_devices=1", "gb=1", "bs=512", "irqmode=0"],
                   check=True)
    target = NvmetTarget(device="/dev/nullb0", nqn=NULL_NQN).setup()
    yield target
    target.teardown()


@pytest.fixture(scope="module")
def ours(setup):
    """A descriptor and channel of the TCP bdev, and a Workload per case."""
    from bdev import nvme as bdev_nvme
    from bdev import perf
    from tests.bdev.test_nvme_bdev import Open
    bdev_nvme.attach_controller("Tcp0", setup.trid)
    o = Open("Tcp0n1")
    workloads = {}

    def workload(case):
        if case not in workloads:
            w, qd, bs = case
            workloads[case] = perf.make_workload(o.desc, o.ch, queue_depth=qd, io_size=bs,
                                                 workload=w, seconds=results.seconds(3))
            workloads[case].run()             # warm-up: TCG translates the path on first use
        return workloads[case].run()

    yield workload
    o.close()
    bdev_nvme.detach_controller("Tcp0")


@pytest.fixture(scope="module")
def kernel(setup):
    from tests.nvme.nvmet import KernelInitiator
    k = KernelInitiator(setup).connect()
    yield k
    k.disconnect()


def fio(dev, workload, qd, bs, secs):
    cmd = ["fio", "--name=j", f"--rw={workload}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1",
           f"--runtime={secs}", "--time_based", "--ioengine=io_uring", f"--filename={dev}",
           "--direct=1", "--output-format=json",
           "--norandommap", "--randrepeat=0", "--clocksource=clock_gettime"]
    job = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                    text=True).stdout)["jobs"][0]["read"]
    # lat = submission + completion: what the workload engine measures for ours
    return _figures(job["iops"], job["lat_ns"]["mean"] / 1000, job["bw_bytes"] / (1 << 20))


def _ours(out):
    return _figures(out["iops"], out["latency_us"]["mean"], out["mib_per_s"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_initiators_alternating(benchmark, ours, kernel, case):
    w, qd, bs = case
    dev = kernel.block_device()
    secs = max(1, round(results.seconds(3)))
    fio(dev, w, qd, bs, 1)                     # warm-up
    rounds = []

    def measure():
        for _ in range(ROUNDS):
            a = _ours(ours(case))
            assert a["iops"] > 0
            b = fio(dev, w, qd, bs, secs)
            rounds.append({"ours": a, "kernel": b})

    benchmark.pedantic(measure, rounds=1, iterations=1)
    med = {who: {k: statistics.median(r[who][k] for r in rounds) for k in ("iops", "mean_us",
                                                                           "mib_s")}
           for who in ("ours", "kernel")}
    ratio = {k: statistics.median(r["ours"][k] / r["kernel"][k] for r in rounds)
             for k in ("iops", "mean_us", "mib_s")}
    FIGURES[case] = {"rounds": rounds, "median": med, "ratio": ratio}
    benchmark.extra_info.update({"ours": med["ours"], "kernel": med["kernel"], "ratio": ratio})


def test_tcp_bdev_vs_pcie_bdev_on_the_same_namespace(benchmark, setup):
    """The guest's NVMe namespace through our PCIe driver (vfio), then, given back to the kernel,
    exported by nvmet-tcp and read through our TCP bdev: 4 KiB random read at QD 32."""
    from bdev import nvme as bdev_nvme
    from bdev import perf
    from tests.bdev.test_nvme_bdev import Open
    from tests.nvme.nvmet import NvmetTarget
    secs = results.seconds(3)
    out = {}

    def run(name, trid):
        bdev_nvme.attach_controller(name, trid)
        o = Open(f"{name}n1")
        try:
            wl = perf.make_workload(o.desc, o.ch, queue_depth=32, io_size=4096,
                                    workload="randread", seconds=secs)
            wl.run()
            out[name] = [_ours(wl.run()) for _ in range(ROUNDS)]
        finally:
            o.close()
            bdev_nvme.detach_controller(name)

    def measure():
        run("Pcie0", f"trtype:PCIe traddr:{BDF}")
        from env.thread import current_thread
        deadline = time.monotonic() + 30
        while not os.path.exists("/dev/nvme0n1") and time.monotonic() < deadline:
            current_thread().poll()
        dev = block_device(BDF, 1)
        t2 = NvmetTarget(device=dev, nqn=NVME_NQN, portid=setup.portid).setup()
        try:
            run("Tcp1", t2.trid)
        finally:
            t2.teardown()

    benchmark.pedantic(measure, rounds=1, iterations=1)
    FIGURES["pcie_vs_tcp"] = {k: {"rounds": v, "median_iops": statistics.median(
        r["iops"] for r in v)} for k, v in out.items()}
    benchmark.extra_info.update({k: v["median_iops"] for k, v in FIGURES["pcie_vs_tcp"].items()})


def test_report():
    """Ratios ours/kernel, the median of the per-round ratios (IOPS and MiB/s: higher is
    better; latency: lower is better), and TCP/PCIe, saved to results/nvme_tcp_vs_kernel.json
    and printed."""
    rows = []
    for case, ident in zip(CASES, IDS):
        f = FIGURES.get(case)
        assert f, f"{ident} did not run"
        o, k, r = f["median"]["ours"], f["median"]["kernel"], f["ratio"]
        rows.append({"case": ident, "ours_iops": o["iops"], "kernel_iops": k["iops"],
                     "iops_ratio": r["iops"], "ours_mean_us": o["mean_us"],
                     "kernel_mean_us": k["mean_us"], "latency_ratio": r["mean_us"],
                     "ours_mib_s": o["mib_s"], "kernel_mib_s": k["mib_s"],
                     "mib_ratio": r["mib_s"]})
    pv = FIGURES.get("pcie_vs_tcp", {})
    summary = {
        "randread_4k_qd32_iops_ratio": rows[0]["iops_ratio"],
        "randread_4k_qd1_mean_latency_ratio": rows[1]["latency_ratio"],
        "read_128k_qd8_throughput_ratio": rows[2]["mib_ratio"],
    }
    if "Pcie0" in pv and "Tcp1" in pv:
        summary["tcp_bdev_vs_pcie_bdev_iops_ratio"] = (pv["Tcp1"]["median_iops"]
                                                       / pv["Pcie0"]["median_iops"])
    results.save("nvme_tcp_vs_kernel", {"seconds": results.seconds(3), "rounds": ROUNDS,
                                        "rows": rows, "summary": summary,
                                        "pcie_vs_tcp": pv,
                                        "raw": {i: FIGURES[c] for c, i in zip(CASES, IDS)}})
    print("\n" + results.table(rows, [
        ("case", "case", "{}"), ("ours_iops", "ours IOPS", "{:.0f}"),
        ("kernel_iops", "kernel IOPS", "{:.0f}"), ("iops_ratio", "IOPS ratio", "{:.2f}x"),
        ("ours_mean_us", "ours mean", "{:.0f}us"), ("kernel_mean_us", "kernel mean", "{:.0f}us"),
        ("latency_ratio", "lat ratio", "{:.2f}x"), ("ours_mib_s", "ours MiB/s", "{:.1f}"),
        ("kernel_mib_s", "kernel MiB/s", "{:.1f}"), ("mib_ratio", "MiB/s ratio", "{:.2f}x")]))
    print(json.dumps(summary, indent=2))
