"""The NVMe bdev against the raw driver under it, on QEMU's emulated controller in one guest boot:
4 KiB random reads at queue depth 32 on one thread. Two benchmark modules use this, one per kind
of namespace behind the controller (`tests(backend, name)` makes their tests):
- test_bdev_nvme_guest.py: a sparse raw file, the guest's standard NVMe device (the issue's
  target, within 10 %);
- test_bdev_nvme_null_guest.py: QEMU's null-co driver, a device that costs nothing on the host
  side, so that the bdev layer's own cost shows at its largest.

The controller is attached once, by the NVMe bdev module (`attach_controller`), and measured two
ways on two queue pairs of the same size:
- raw: `nvme.perf` (the C workload loop straight on a queue pair of the controller, created with
  `ctrlr.create_io_qpair`): the driver alone;
- bdev: `bdev.perf` on a descriptor and channel of `Nvme0n1`: the same loop through the whole
  bdev layer (checks, statistics, the thread's pollers) and the module's C path.

Under TCG on a shared host the speed of the emulator drifts by up to 2x from one second to the
next, which swamps a 10 % difference between runs taken seconds apart. So the two run
interleaved in short slices (SLICE_S each, the order alternating from pair to pair, after a
warm-up of each: TCG translates code on first use), each kind as one Workload run again and
again, until each has run ROUND_SLICES * ROUNDS slices. Both see the same spread of host
conditions; the figure is the ratio of the IOPS each achieved over all its slices, and the median
of the per-round ratios is given beside it. `results/<name>.json` keeps every round.
"""
import statistics

import pytest

from benchmarks import results
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST

BDF = "0000:00:10.0"
QUEUE_SIZE = 1024
WORKLOAD = dict(queue_depth=32, io_size=4096, workload="randread")
KINDS = ("raw", "bdev")
SLICE_S = 0.2
ROUNDS = 8


def round_slices():
    """Slice pairs per round: a round lasts about 2 x results.seconds()."""
    return max(2, int(results.seconds() / SLICE_S))


class Rig:
    def __init__(self):
        import bdev
        from bdev import nvme as bdev_nvme
        from bdev import perf as bdev_perf
        from nvme import perf as nvme_perf
        bdev_nvme.attach_controller("Nvme0", f"trtype:PCIe traddr:{BDF}",
                                    io_queue_size=QUEUE_SIZE)
        self.ctrlr = bdev_nvme.get_controller("Nvme0").ctrlr
        self.desc = bdev.open_bdev("Nvme0n1")
        self.ch = self.desc.get_io_channel()
        self.qpair = self.ctrlr.create_io_qpair(QUEUE_SIZE)
        assert self.ch.queue_pair.entries == self.qpair.entries == QUEUE_SIZE
        assert self.ch.queue_pair is not self.qpair
        self.workloads = {
            "raw": nvme_perf.make_workload(self.ctrlr.namespace(1), self.qpair,
                                           seconds=SLICE_S, **WORKLOAD),
            "bdev": bdev_perf.make_workload(self.desc, self.ch, seconds=SLICE_S, **WORKLOAD)}

    def interleave(self, pairs, first=0):
        """`pairs` slices of each kind, alternating which goes first; totals per kind."""
        tot = {k: {"ios": 0, "seconds": 0.0, "lat_us_sum": 0.0, "errors": 0} for k in KINDS}
        for i in range(pairs):
            for k in (KINDS if (first + i) % 2 == 0 else KINDS[::-1]):
                out = self.workloads[k].run()
                t = tot[k]
                t["ios"] += out["ios"]
                t["seconds"] += out["seconds"]
                t["lat_us_sum"] += out["latency_us"]["mean"] * out["ios"]
                t["errors"] += out["errors"] + out["submit_errors"]
        for t in tot.values():
            t["iops"] = t["ios"] / t["seconds"]
            t["mean_us"] = t["lat_us_sum"] / max(1, t["ios"])
        return tot

    def close(self):
        from bdev import nvme as bdev_nvme
        self.workloads.clear()
        self.ctrlr.delete_io_qpair(self.qpair)
        self.ch.put()
        self.desc.close()
        bdev_nvme.detach_controller("Nvme0")


def tests(backend, name):
    """The module globals of one benchmark module: its guest marker (a namespace on `backend`,
    "file" or "null"), the rig fixture and the tests, whose figures go to results/<name>.json."""
    figures = {}

    @pytest.fixture(scope="module")
    def rig():
        r = Rig()
        yield r
        r.close()

    def test_warm_up(rig):
        tot = rig.interleave(4)
        for k in KINDS:
            assert tot[k]["errors"] == 0 and tot[k]["ios"] > 0

    @pytest.mark.parametrize("rnd", range(ROUNDS), ids=[f"round{r}" for r in range(ROUNDS)])
    def test_randread_qd32_interleaved(benchmark, rig, rnd):
        n = round_slices()
        tot = benchmark.pedantic(rig.interleave, args=(n, rnd), rounds=1, iterations=1)
        for k in KINDS:
            assert tot[k]["errors"] == 0 and tot[k]["ios"] > 0
        figures[rnd] = tot
        benchmark.extra_info.update({f"{k}_iops": tot[k]["iops"] for k in KINDS}
                                    | {"iops_ratio": tot["bdev"]["iops"] / tot["raw"]["iops"],
                                       "slices_per_kind": n, "slice_s": SLICE_S,
                                       "backend": backend})

    def test_report():
        """Per-round ratios bdev/raw, the ratio over all slices and the median per round."""
        assert len(figures) == ROUNDS, "a round above failed"
        report(figures, backend, name)

    return {"pytestmark": [pytest.mark.guest(nvme_backend=backend, nvme_size="1G", timeout=1800),
                           pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)],
            "rig": rig, "test_warm_up": test_warm_up,
            "test_randread_qd32_interleaved": test_randread_qd32_interleaved,
            "test_report": test_report}


def report(figures, backend, name):
    rows = [{"round": r, "raw_iops": f["raw"]["iops"], "bdev_iops": f["bdev"]["iops"],
             "iops_ratio": f["bdev"]["iops"] / f["raw"]["iops"],
             "raw_mean_us": f["raw"]["mean_us"], "bdev_mean_us": f["bdev"]["mean_us"]}
            for r, f in sorted(figures.items())]
    total = {k: (sum(f[k]["ios"] for f in figures.values())
                 / sum(f[k]["seconds"] for f in figures.values())) for k in KINDS}
    summary = {
        "iops_ratio": total["bdev"] / total["raw"],
        "median_round_ratio": statistics.median(r["iops_ratio"] for r in rows),
        "raw_iops": total["raw"], "bdev_iops": total["bdev"],
        "raw_mean_us": statistics.mean(r["raw_mean_us"] for r in rows),
        "bdev_mean_us": statistics.mean(r["bdev_mean_us"] for r in rows),
        "slices_per_kind": ROUNDS * round_slices(), "slice_s": SLICE_S,
        "target_ratio": 0.9, "backend": backend,
    }
    results.save(name, {"workload": WORKLOAD, "queue_size": QUEUE_SIZE, "backend": backend,
                        "rounds": rows, "summary": summary})
    print("\n" + results.table(rows, [
        ("round", "round", "{}"), ("raw_iops", "raw IOPS", "{:.0f}"),
        ("bdev_iops", "bdev IOPS", "{:.0f}"), ("iops_ratio", "bdev/raw", "{:.3f}"),
        ("raw_mean_us", "raw mean", "{:.1f}us"), ("bdev_mean_us", "bdev mean", "{:.1f}us")]))
    print(f"{backend} namespace: bdev/raw IOPS ratio over {summary['slices_per_kind']} "
          f"interleaved slices of {SLICE_S} s each: {summary['iops_ratio']:.3f} (target >= 0.9); "
          f"median of the per-round ratios {summary['median_round_ratio']:.3f}")
