"""The driver against the in-process emulated controller (no QEMU, no root): what the emulator
sustains, driver included. Useful to keep the emulator fast enough for the unit tests; the real
driver figures come from the QEMU guest (test_nvme_vs_kernel.py)."""
import pytest

from benchmarks import results


@pytest.fixture(scope="module")
def rig():
    from nvme.controller import Controller
    from nvme.emu import EmulatedController, EmuNamespace
    emu = EmulatedController([EmuNamespace(65536, block_size=512)], mdts=5)
    ctrlr = Controller(emu.transport).init()
    qp = ctrlr.create_io_qpair(256)
    yield ctrlr, qp
    ctrlr.detach()


@pytest.mark.parametrize("qd", [1, 32])
def test_emulated_controller_randread(benchmark, rig, qd):
    from nvme import perf
    ctrlr, qp = rig
    out = benchmark.pedantic(perf.run, args=(ctrlr.namespace(1), qp),
                             kwargs=dict(queue_depth=qd, io_size=4096, workload="randread",
                                         seconds=min(results.seconds(), 1.0)),
                             rounds=1, iterations=1)
    assert out["errors"] == 0 and out["ios"] > 0
    benchmark.extra_info.update(iops=out["iops"], mean_us=out["latency_us"]["mean"])
