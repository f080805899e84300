"""The C-level workload engine on bdevs (bdev.perf + env.workload): figures, verify, limits."""
import pytest

import bdev
from bdev import malloc, null
from bdev import perf as bperf
from env.errors import InvalidArgument
from tests.bdev.helpers import RecordingBdev


@pytest.fixture
def mall():
    b = malloc.create("PerfMalloc", size=8 << 20)
    d = bdev.open_bdev("PerfMalloc", write=True)
    ch = d.get_io_channel()
    yield d, ch
    ch.put()
    d.close()
    b.unregister()


@pytest.mark.parametrize("workload", ["read", "write", "randread", "randwrite", "rw", "randrw"])
def test_each_workload_counts_what_it_does(mall, workload):
    d, ch = mall
    r = bperf.run(d, ch, queue_depth=8, io_size=4096, workload=workload, seconds=0.1,
                  read_pct=70)
    assert r["errors"] == 0 and r["ios"] == r["reads"] + r["writes"] > 0
    assert r["latency_us"]["count"] == r["ios"]
    if workload.endswith("read"):
        assert r["writes"] == 0
    elif workload.endswith("write"):
        assert r["reads"] == 0
    else:
        assert 0.5 < r["reads"] / r["ios"] < 0.9
    stats = d.bdev.stats()
    assert stats["num_read_ops"] + stats["num_write_ops"] >= r["ios"]


def test_verify_on_malloc_finds_nothing(mall):
    d, ch = mall
    r = bperf.run(d, ch, queue_depth=16, io_size=8192, workload="verify", seconds=0.2)
    assert r["miscompares"] == 0 and r["errors"] == 0
    assert r["reads"] > 0 and abs(r["reads"] - r["writes"]) <= 16


def test_verify_reports_corruption():
    class Corrupting(RecordingBdev):
        def execute(self, io):
            if io.type == "read" and io.offset_blocks % 16 == 0:
                off = io.offset_blocks * 512
                mv = io.buffers()[0]
                mv[:] = self.data[off:off + mv.nbytes]
                mv[100] ^= 0xFF                    # flip a byte of some reads
                io.complete("success")
                return
            super().execute(io)

    b = Corrupting("PerfCorrupt", num_blocks=2048).register()
    d = bdev.open_bdev("PerfCorrupt", write=True)
    ch = d.get_io_channel()
    try:
        r = bperf.run(d, ch, queue_depth=4, io_size=4096, workload="verify", seconds=0.2)
        assert r["miscompares"] > 0
        ex = r["miscompare_examples"][0]
        assert ex["offset"] % (16 * 512) == 0 and ex["byte"] == 100
        assert ex["expected"] != ex["read"] and len(bytes.fromhex(ex["expected"])) == 16
    finally:
        ch.put()
        d.close()
        b.unregister()


def test_bad_parameters(mall):
    d, ch = mall
    with pytest.raises(InvalidArgument, match="multiple of the block size"):
        bperf.make_workload(d, ch, queue_depth=4, io_size=1000, seconds=0.1)
    with pytest.raises(InvalidArgument, match="verify needs"):
        bperf.make_workload(d, ch, queue_depth=64, io_size=1 << 20, workload="verify",
                            seconds=0.1, range_bytes=8 << 20)
    with pytest.raises(InvalidArgument, match="workload must be"):
        bperf.make_workload(d, ch, queue_depth=4, io_size=4096, workload="chaos", seconds=0.1)
    ro = bdev.open_bdev("PerfMalloc")
    rch = ro.get_io_channel()
    try:
        with pytest.raises(InvalidArgument, match="write=True"):
            bperf.make_workload(ro, rch, queue_depth=4, io_size=4096, workload="write",
                                seconds=0.1)
    finally:
        rch.put()
        ro.close()


def test_stop_before_run_ends_it_at_once(mall):
    d, ch = mall
    wl = bperf.make_workload(d, ch, queue_depth=4, io_size=4096, workload="randread",
                             seconds=30)
    wl.stop()
    r = wl.run()
    assert r["seconds"] < 5
