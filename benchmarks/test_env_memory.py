"""env memory benchmarks: DmaBuffer allocate+free, VA->IOVA translation, Pool get+put.

C-level figures run a loop of N operations inside one Cython call (no Python per operation);
pytest-benchmark times the whole loop and `extra_info["ns_per_op"]` gives the cost of one.
"""
import pytest

from benchmarks import results
from env import _cbench, memory
from env.memmap import MemMap, vtophys_map

MiB = 1 << 20
SIZES = [4096, 64 * 1024, 2 * MiB, 16 * MiB]


def _need(backend):
    if backend == "hugepage-2M" and memory.hugepage_status().get(2 * MiB, (0, 0))[1] < 16:
        pytest.skip(reason="needs 16 free 2 MiB hugepages (benchmarks/test_env_memory_guest.py runs "
                    "this in the QEMU guest, which has them)")


@pytest.mark.parametrize("backend", ["anonymous", "hugepage-2M"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s // 1024}KiB")
def test_allocate_free(benchmark, size, backend):
    _need(backend)
    keep = memory.allocate(4096, backend=backend)    # keeps a region mapped, as in a real program

    def cycle():
        memory.allocate(size, backend=backend).free()

    benchmark.group = f"DmaBuffer allocate+free ({backend})"
    benchmark(cycle)
    keep.free()


def test_translate_python(benchmark):
    buf = memory.allocate(64 * 1024)
    m = vtophys_map()
    benchmark.group = "translate"
    benchmark(m.translate, buf.vaddr + 100, 4096)
    buf.free()


@pytest.mark.parametrize("kind", ["memmap", "vtophys"])
def test_translate_cython(benchmark, kind):
    n = 1_000_000
    buf = memory.allocate(64 * 1024)
    m = vtophys_map()
    if kind == "memmap":
        run = lambda: _cbench.translate_loop(m, buf.vaddr, 4096, n)   # noqa: E731
    else:
        run = lambda: _cbench.vtophys_loop(buf.vaddr, n)               # noqa: E731
    benchmark.group = "translate"
    assert benchmark(run) != -1
    benchmark.extra_info["ns_per_op"] = results.per_op_ns(benchmark, n)
    buf.free()


def test_translate_cython_multi_page_contiguity(benchmark):
    """translate over 16 MiB: walks 8 table entries to prove contiguity."""
    m = MemMap()
    base = 0x7E00_0000_0000
    m.register(base, 64 * MiB)
    n = 200_000
    benchmark.group = "translate"
    benchmark(_cbench.translate_loop, m, base, 16 * MiB, n)
    benchmark.extra_info["ns_per_op"] = results.per_op_ns(benchmark, n)


def test_pool_python(benchmark):
    p = memory.Pool(1024, 256)

    def cycle():
        p.release(p.acquire())

    benchmark.group = "pool get+put"
    benchmark(cycle)


@pytest.mark.parametrize("batch", [1, 32])
def test_pool_cython(benchmark, batch):
    p = memory.Pool(1024, 256)
    n = 1_000_000 // batch
    benchmark.group = "pool get+put"
    assert benchmark(_cbench.pool_cycle, p, n, batch) == 0
    benchmark.extra_info["ns_per_op"] = results.per_op_ns(benchmark, n * batch)
