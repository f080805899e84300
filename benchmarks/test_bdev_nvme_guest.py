"""The NVMe bdev against the raw driver under it, on QEMU's emulated controller in one guest boot:
4 KiB random reads at queue depth 32 on one thread.

The controller is attached once, by the NVMe bdev module (`attach_controller`), and measured two
ways on two queue pairs of the same size:
- raw: `nvme.perf` (the C workload loop straight on a queue pair of the controller, created with
  `ctrlr.create_io_qpair`): the driver alone;
- bdev: `bdev.perf` on a descriptor and channel of `Nvme0n1`: the same loop through the whole
  bdev layer (checks, DMA check, statistics, the thread's pollers) and the module's C path.
The namespace is backed by QEMU's null-co driver, so no file system plays a part.

Under TCG on a shared host the figures of one run vary by 2x from one second to the next. So the
two kinds run in adjacent pairs, the order alternating from pair to pair, after a warm-up of
each (TCG translates code on first use); the ratio bdev/raw is taken per pair and the median
over the pairs is the figure (target: at least 0.9). `results/bdev_nvme_vs_raw.json` keeps
every run.
"""
import statistics

import pytest

from benchmarks import results
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST

pytestmark = [pytest.mark.guest(nvme_backend="null", nvme_size="1G", timeout=1800),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

BDF = "0000:00:10.0"
QUEUE_SIZE = 1024
WORKLOAD = dict(queue_depth=32, io_size=4096, workload="randread")
PAIRS = 8
CASES = [(p, kind) for p in range(PAIRS)
         for kind in (("raw", "bdev") if p % 2 == 0 else ("bdev", "raw"))]
FIGURES = {}


class Rig:
    def __init__(self):
        import bdev
        from bdev import nvme as bdev_nvme
        bdev_nvme.attach_controller("Nvme0", f"trtype:PCIe traddr:{BDF}",
                                    io_queue_size=QUEUE_SIZE)
        self.ctrlr = bdev_nvme.get_controller("Nvme0").ctrlr
        self.desc = bdev.open_bdev("Nvme0n1")
        self.ch = self.desc.get_io_channel()
        self.qpair = self.ctrlr.create_io_qpair(QUEUE_SIZE)
        assert self.ch.queue_pair.entries == self.qpair.entries == QUEUE_SIZE
        assert self.ch.queue_pair is not self.qpair

    def run(self, kind, seconds):
        if kind == "raw":
            from nvme import perf
            return perf.run(self.ctrlr.namespace(1), self.qpair, seconds=seconds, **WORKLOAD)
        from bdev import perf
        return perf.run(self.desc, self.ch, seconds=seconds, **WORKLOAD)

    def close(self):
        from bdev import nvme as bdev_nvme
        self.ctrlr.delete_io_qpair(self.qpair)
        self.ch.put()
        self.desc.close()
        bdev_nvme.detach_controller("Nvme0")


@pytest.fixture(scope="module")
def rig():
    r = Rig()
    yield r
    r.close()


def test_warm_up(rig):
    for kind in ("raw", "bdev"):
        out = rig.run(kind, 1.0)
        assert out["errors"] == 0 and out["ios"] > 0


@pytest.mark.parametrize("pair,kind", CASES, ids=[f"pair{p}-{k}" for p, k in CASES])
def test_randread_qd32(benchmark, rig, pair, kind):
    out = benchmark.pedantic(rig.run, args=(kind, results.seconds()), rounds=1, iterations=1)
    assert out["errors"] == 0 and out["ios"] > 0
    lat = out["latency_us"]
    FIGURES[(pair, kind)] = {"iops": out["iops"], "mean_us": lat["mean"], "p99_us": lat["p99"],
                             "ios": out["ios"]}
    benchmark.extra_info.update(FIGURES[(pair, kind)])


def test_report():
    """Per-pair ratios bdev/raw and their median, saved to results/bdev_nvme_vs_raw.json."""
    assert len(FIGURES) == 2 * PAIRS, "a run above failed"
    rows = []
    for p in range(PAIRS):
        raw, bdev = FIGURES[(p, "raw")], FIGURES[(p, "bdev")]
        rows.append({"pair": p, "order": "raw,bdev" if p % 2 == 0 else "bdev,raw",
                     "raw_iops": raw["iops"], "bdev_iops": bdev["iops"],
                     "iops_ratio": bdev["iops"] / raw["iops"],
                     "raw_mean_us": raw["mean_us"], "bdev_mean_us": bdev["mean_us"],
                     "raw_p99_us": raw["p99_us"], "bdev_p99_us": bdev["p99_us"]})
    summary = {
        "median_iops_ratio": statistics.median(r["iops_ratio"] for r in rows),
        "raw_iops_mean": statistics.mean(r["raw_iops"] for r in rows),
        "bdev_iops_mean": statistics.mean(r["bdev_iops"] for r in rows),
        "raw_mean_us": statistics.mean(r["raw_mean_us"] for r in rows),
        "bdev_mean_us": statistics.mean(r["bdev_mean_us"] for r in rows),
        "target_ratio": 0.9,
    }
    summary["ratio_of_means"] = summary["bdev_iops_mean"] / summary["raw_iops_mean"]
    results.save("bdev_nvme_vs_raw", {"seconds": results.seconds(), "workload": WORKLOAD,
                                      "queue_size": QUEUE_SIZE, "pairs": rows,
                                      "summary": summary})
    print("\n" + results.table(rows, [
        ("pair", "pair", "{}"), ("order", "order", "{}"), ("raw_iops", "raw IOPS", "{:.0f}"),
        ("bdev_iops", "bdev IOPS", "{:.0f}"), ("iops_ratio", "bdev/raw", "{:.3f}"),
        ("raw_mean_us", "raw mean", "{:.1f}us"), ("bdev_mean_us", "bdev mean", "{:.1f}us"),
        ("raw_p99_us", "raw p99", "{:.1f}us"), ("bdev_p99_us", "bdev p99", "{:.1f}us")]))
    print(f"median bdev/raw IOPS ratio {summary['median_iops_ratio']:.3f} (target >= 0.9); "
          f"ratio of the mean IOPS {summary['ratio_of_means']:.3f}")
