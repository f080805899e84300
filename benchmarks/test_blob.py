"""The blobstore against the bare bdev under it, each ratio measured in one run:

- an allocated blob vs the bare bdev, 4 KiB random reads and writes at queue depth 32, on malloc
  and null bases (target >= 0.9x);
- the same, 1 MiB sequential at queue depth 4 (target >= 0.95x);
- a thin blob's first writes (each cluster given on first write) vs writes to an allocated blob,
  64 KiB sequential at queue depth 8, one pass over 256 MiB (target >= 0.5x), in wall time and
  in CPU time of the polling thread;
- with no target: create + sync_md of 10,000 blobs (blobs/s), load of that store clean and
  after a crash (seconds), snapshot of a 1 GiB blob (metadata only: seconds).

The blob and the bare bdev are two bdevs of the same kind and size (the store claims its own),
driven by the same C workload loop (env.workload through bdev.perf / blob.perf). On a shared
host the speed drifts between runs, so the two kinds run interleaved in short slices (SLICE_S,
rounds() pairs) and the ratio is the IOPS of each over all its slices. Beside it goes the
CPU-normalized ratio (IOPS per CPU second of the polling thread): on a loaded machine the time
slices the kernel gives each run differ, the work per I/O does not. Figures go to
pytest-benchmark's extra_info and results/blob_*.json.
"""
import time

import pytest

import bdev
from bdev import malloc, null
from bdev import perf as bperf
from benchmarks import results
from blob import Blobstore
from blob import perf as blperf
from tests.blob.helpers import crash

SLICE_S = 0.2


def rounds():
    """Slice pairs: about results.seconds() of each kind (5 s by default, 1 s in smoke runs)."""
    return max(2, round(results.seconds() / SLICE_S))
BASES = {"malloc": malloc, "null": null}
SIZE = 512 << 20


def _interleaved(wa, wb):
    """Run two Workloads alternately; (ios, cpu seconds) of each, summed."""
    out = {"a": [0, 0.0], "b": [0, 0.0]}
    for r in range(rounds()):
        for key, w in (("a", wa), ("b", wb)) if r % 2 == 0 else (("b", wb), ("a", wa)):
            t0 = time.thread_time()
            out[key][0] += w.run()["ios"]
            out[key][1] += time.thread_time() - t0
    return out


def _ratio(kind, workload, qd, io_size):
    base = BASES[kind]
    bare = base.create("BenchBare", size=SIZE, block_size=512)
    under = base.create("BenchUnder", size=SIZE, block_size=512)
    try:
        bs = Blobstore.init("BenchUnder", cluster_size=1 << 20)
        ch = bs.get_io_channel()
        blob = bs.open(bs.create(num_clusters=256))
        d = bdev.open_bdev("BenchBare", write=True)
        dch = d.get_io_channel()
        try:
            params = dict(queue_depth=qd, io_size=io_size, workload=workload, seconds=SLICE_S)
            wa = bperf.make_workload(d, dch, range_bytes=256 << 20, **params)
            wb = blperf.make_workload(blob, ch, **params)
            wa.run()
            wb.run()                                  # warm both
            out = _interleaved(wa, wb)
        finally:
            dch.put()
            d.close()
            blob.close()
            ch.put()
            bs.unload()
        (na, ca), (nb, cb) = out["a"], out["b"]
        secs = rounds() * SLICE_S
        return {"bare_iops": na / secs, "blob_iops": nb / secs, "ratio": nb / na,
                "cpu_normalized_ratio": (nb / cb) / (na / ca), "base": kind,
                "workload": workload, "queue_depth": qd, "io_size": io_size}
    finally:
        bare.unregister()
        under.unregister()


def _report(benchmark, name, fig, target):
    fig["target"] = target
    benchmark.extra_info.update(fig)
    results.save(name, fig)
    print(f"\n{name}: blob {fig['blob_iops']:,.0f} vs bare {fig['bare_iops']:,.0f} IOPS: "
          f"{fig['ratio']:.3f}x (CPU-normalized {fig['cpu_normalized_ratio']:.3f}x; target "
          f">= {target})")


@pytest.mark.parametrize("workload", ["randread", "randwrite"])
@pytest.mark.parametrize("kind", ["malloc", "null"])
def test_allocated_blob_vs_bare_4k_random_qd32(benchmark, kind, workload):
    fig = benchmark.pedantic(_ratio, args=(kind, workload, 32, 4096), rounds=1, iterations=1)
    _report(benchmark, f"blob_{kind}_{workload}_4k_qd32", fig, 0.9)


@pytest.mark.parametrize("workload", ["read", "write"])
@pytest.mark.parametrize("kind", ["malloc", "null"])
def test_allocated_blob_vs_bare_1m_sequential_qd4(benchmark, kind, workload):
    fig = benchmark.pedantic(_ratio, args=(kind, workload, 4, 1 << 20), rounds=1, iterations=1)
    _report(benchmark, f"blob_{kind}_{workload}_1m_qd4", fig, 0.95)


def test_thin_first_writes_vs_allocated_64k_sequential(benchmark):
    """One pass of 64 KiB writes at queue depth 8 over a 256 MiB blob: allocated (thick) against
    thin on a fresh store (every 16th write waits for its cluster: allocation, metadata commit),
    and thin again after the clusters were used and freed (each new cluster is zeroed first)."""
    io, qd, n = 64 << 10, 8, 256
    b = malloc.create("BenchThin", size=SIZE + (32 << 20), block_size=512)
    times = {"thick": 0.0, "thin": 0.0, "thin_reused": 0.0}
    cpu = dict.fromkeys(times, 0.0)

    def timed(kind, blob, ch):
        c0 = time.thread_time()
        times[kind] += blperf.seq_pass(blob, ch, io, qd)
        cpu[kind] += time.thread_time() - c0

    def one_round():
        bs = Blobstore.init("BenchThin", cluster_size=1 << 20)
        ch = bs.get_io_channel()
        try:
            thick = bs.open(bs.create(num_clusters=n))
            thin = bs.open(bs.create(num_clusters=n, thin=True))
            timed("thick", thick, ch)
            timed("thin", thin, ch)
            thick.close()
            bs.delete(thick.id)
            again = bs.open(bs.create(num_clusters=n, thin=True))
            timed("thin_reused", again, ch)
            thin.close()
            again.close()
        finally:
            ch.put()
            bs.unload()

    try:
        one_round()                      # warm
        for k in times:
            times[k] = cpu[k] = 0.0
        n_rounds = 3 if results.seconds() >= 3 else 1
        benchmark.pedantic(lambda: [one_round() for _ in range(n_rounds)], rounds=1,
                           iterations=1)
    finally:
        b.unregister()
    fig = {"thick_s": times["thick"], "thin_s": times["thin"],
           "thin_reused_s": times["thin_reused"], "ratio": times["thick"] / times["thin"],
           "ratio_reused_clusters": times["thick"] / times["thin_reused"], "target": 0.5,
           "cpu_normalized_ratio": cpu["thick"] / cpu["thin"],
           "cpu_normalized_ratio_reused": cpu["thick"] / cpu["thin_reused"],
           "io_size": io, "queue_depth": qd, "bytes_per_pass": n << 20}
    benchmark.extra_info.update(fig)
    results.save("blob_thin_first_writes_64k", fig)
    print(f"\nthin first writes vs allocated, 64 KiB seq QD{qd}: {fig['ratio']:.3f}x, "
          f"CPU-normalized {fig['cpu_normalized_ratio']:.3f}x (clusters used before, zeroed "
          f"on allocation: {fig['ratio_reused_clusters']:.3f}x, CPU-normalized "
          f"{fig['cpu_normalized_ratio_reused']:.3f}x; target >= 0.5)")


N_BLOBS = 10000


@pytest.fixture(scope="module")
def many_blobs():
    """A store (on malloc) with 10,000 blobs made by create + set_xattr + sync_md, 64 in
    flight; the rate it took."""
    b = malloc.create("BenchMany", size=1 << 30, block_size=512)
    bs = Blobstore.init("BenchMany", cluster_size=64 << 10, md_pages=12000)
    state = {"started": 0, "done": 0, "error": None}

    def start_one():
        i = state["started"]
        state["started"] += 1

        def created(bid, err):
            if err is not None:
                state["error"] = err
                return
            h = bs.open(bid)
            h.set_xattr("owner", b"bench")

            def synced(_, err2):
                state["done"] += 1
                state["error"] = state["error"] or err2
                h.close(cb=lambda *a: None)
                if state["started"] < N_BLOBS:
                    start_one()
            h.sync_md(cb=synced)
        bs.create(num_clusters=1, thin=True, xattrs={"i": str(i).encode()}, cb=created)

    t0 = time.perf_counter()
    for _ in range(64):
        start_one()
    bs.thread.run_until(lambda: state["done"] >= N_BLOBS or state["error"], timeout=600)
    elapsed = time.perf_counter() - t0
    assert state["error"] is None, state["error"]
    bs.thread.run_until(lambda: not bs.ops.n and all(b_.opens == 0 for b_ in bs.blobs.values()),
                        timeout=60)
    yield bs, N_BLOBS / elapsed
    b.unregister()


def test_create_and_sync_md_rate_10k(benchmark, many_blobs):
    bs, rate = many_blobs
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert len(bs) == N_BLOBS
    benchmark.extra_info.update(blobs_per_s=rate)
    results.save("blob_create_sync_10k", {"blobs": N_BLOBS, "blobs_per_s": rate})
    print(f"\ncreate + set_xattr + sync_md of {N_BLOBS} blobs (64 in flight): {rate:,.0f} "
          "blobs/s")


def test_load_10k_blobs_clean_and_dirty(benchmark, many_blobs):
    bs, _ = many_blobs
    bs.unload()
    t0 = time.perf_counter()
    bs = Blobstore.load("BenchMany")
    clean = time.perf_counter() - t0
    assert bs.loaded_clean and len(bs) == N_BLOBS
    crash(bs)
    t0 = time.perf_counter()
    bs = benchmark.pedantic(Blobstore.load, args=("BenchMany",), rounds=1, iterations=1)
    dirty = time.perf_counter() - t0
    assert not bs.loaded_clean and len(bs) == N_BLOBS
    bs.unload()
    benchmark.extra_info.update(clean_s=clean, dirty_s=dirty)
    results.save("blob_load_10k", {"blobs": N_BLOBS, "clean_s": clean, "dirty_s": dirty,
                                   "md_pages": 12000})
    print(f"\nload of {N_BLOBS} blobs: clean {clean:.3f} s, after a crash {dirty:.3f} s")


def test_snapshot_of_a_1gib_blob(benchmark):
    b = null.create("BenchSnap", size=2 << 30, block_size=512)
    try:
        bs = Blobstore.init("BenchSnap", cluster_size=1 << 20)
        blob = bs.open(bs.create(num_clusters=1024))
        free = bs.free_clusters
        times = []

        def snap():
            t0 = time.perf_counter()
            sid = bs.snapshot(blob)
            times.append(time.perf_counter() - t0)
            return sid
        benchmark.pedantic(snap, rounds=5, iterations=1)
        assert bs.free_clusters == free                  # nothing was copied
        blob.close()
        bs.unload()
        best = min(times)
        benchmark.extra_info.update(snapshot_s=best)
        results.save("blob_snapshot_1g", {"snapshot_s": best, "all_s": times})
        print(f"\nsnapshot of a 1 GiB (1024-cluster) blob: {best * 1e3:.2f} ms")
    finally:
        b.unregister()
