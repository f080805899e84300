"""DmaBuffer and Pool: allocation, the buffer protocol, lifetimes and bad input."""
import gc
import os
import subprocess
import sys

import pytest

from env import memory
from env.errors import (BufferBusyError, DmaMemoryError, FreedBufferError, InvalidArgument,
                        ResourceExhausted, UserblkError)
from env.memmap import translate, vtophys_map

MiB = 1 << 20


def free_hugepages():
    return memory.hugepage_status().get(2 * MiB, (0, 0))[1]


needs_hugepages = pytest.mark.skipif(free_hugepages() < 8,
                                     reason="needs at least 8 free 2 MiB hugepages (none reserved here)")


@pytest.mark.parametrize("size", [1, 512, 4096, 5000, 64 * 1024, 2 * MiB, 3 * MiB + 17])
def test_allocate_sizes_are_aligned_and_translate(size):
    with memory.allocate(size) as buf:
        assert buf.size == len(buf) == size
        assert buf.vaddr % 4096 == 0
        iova, contiguous = translate(buf.vaddr, size)
        assert iova == buf.iova
        assert contiguous == size        # IOVA = VA in this process: one contiguous range
        mv = memoryview(buf)
        assert mv.nbytes == size and not mv.readonly and mv.format == "B"
        mv[size - 1] = 0x5A
        mv[0] = 0xA5
        assert (mv[0], mv[-1]) == (0xA5, 0xA5 if size == 1 else 0x5A)
        mv.release()


def test_alignment_request_is_honoured():
    bufs = [memory.allocate(4096, align=a) for a in (4096, 8192, 64 * 1024, 2 * MiB)]
    try:
        for b, a in zip(bufs, (4096, 8192, 64 * 1024, 2 * MiB)):
            assert b.vaddr % a == 0 and b.alignment == a
    finally:
        for b in bufs:
            b.free()


def test_buffers_do_not_overlap_and_memory_is_reused():
    bufs = [memory.allocate(4096 * (1 + i % 5)) for i in range(64)]
    spans = sorted((b.vaddr, b.vaddr + b.size) for b in bufs)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    first = bufs[0].vaddr
    for b in bufs:
        b.free()
    again = memory.allocate(4096)
    assert again.vaddr == first      # first fit gives the lowest free page back
    again.free()


def test_zero_on_request():
    b = memory.allocate(8192)
    memoryview(b)[:] = b"\xff" * 8192
    b.free()
    z = memory.allocate(8192, zero=True)
    assert bytes(memoryview(z)) == bytes(8192)
    z.free()


def test_backend_is_visible():
    with memory.allocate(4096, backend="anonymous") as b:
        assert b.backend == "anonymous" and not b.hugepage
    with memory.allocate(4096) as b:
        assert b.backend in ("hugepage-2M", "anonymous")


def test_fallback_is_logged_once(caplog):
    if free_hugepages():
        pytest.skip(reason="hugepages are reserved here, so auto does not fall back")
    memory._warned.discard("fallback")
    with caplog.at_level("WARNING", logger="userblk.env.memory"):
        a = memory.allocate(3 * MiB)
        b = memory.allocate(3 * MiB)
    a.free()
    b.free()
    msgs = [r.getMessage() for r in caplog.records if "no free 2 MiB hugepages" in r.getMessage()]
    assert len(msgs) == 1


def test_free_twice_and_use_after_free():
    b = memory.allocate(4096)
    b.free()
    assert b.freed
    with pytest.raises(FreedBufferError):
        b.free()
    with pytest.raises(FreedBufferError):
        memoryview(b)
    with pytest.raises(FreedBufferError):
        b.vaddr
    with pytest.raises(FreedBufferError):
        b.iova
    assert "freed" in repr(b)


def test_free_with_live_view_is_refused():
    b = memory.allocate(4096)
    mv = memoryview(b)
    with pytest.raises(BufferBusyError, match="memoryview"):
        b.free()
    mv.release()
    b.free()


def test_context_manager_frees():
    with memory.allocate(4096) as b:
        pass
    assert b.freed


def test_garbage_collected_buffer_returns_its_pages():
    gc.collect()        # other tests' garbage first, so that only ours is released below
    b = memory.allocate(64 * 1024, backend="anonymous")
    region = next(r for r in memory._heaps["anonymous"].regions
                  if r.base <= b.vaddr < r.base + r.size)
    held = region.free_pages
    del b               # the last reference: deallocated now
    # the region's own count, not the process-wide one: other tests' buffers may share the heap
    assert region.free_pages == held + 16 or region.free_pages * 4096 == region.size


@pytest.mark.parametrize("size", [0, -1, -4096, 1 << 50])
def test_bad_sizes(size):
    with pytest.raises(InvalidArgument):
        memory.allocate(size)


@pytest.mark.parametrize("bad", [1.5, "4096", None, True])
def test_bad_size_types(bad):
    with pytest.raises(InvalidArgument):
        memory.allocate(bad)


@pytest.mark.parametrize("align", [0, 1, 512, 4095, 12288, 4 * MiB])
def test_bad_alignments(align):
    with pytest.raises(InvalidArgument):
        memory.allocate(4096, align=align)


def test_bad_backend_and_shared_without_hugetlbfs():
    with pytest.raises(InvalidArgument, match="unknown backend"):
        memory.allocate(4096, backend="gpu")
    with pytest.raises(InvalidArgument, match="hugetlbfs"):
        memory.allocate(4096, shared=True)


def test_errors_share_one_hierarchy():
    for cls in (InvalidArgument, FreedBufferError, BufferBusyError, DmaMemoryError,
                ResourceExhausted):
        assert issubclass(cls, UserblkError)
    assert issubclass(InvalidArgument, ValueError)


def test_hugepages_requested_but_absent_is_a_clear_error():
    if free_hugepages():
        pytest.skip(reason="hugepages are reserved here")
    with pytest.raises(DmaMemoryError, match="hugepages"):
        memory.allocate(4096, backend="hugepage-2M")


@needs_hugepages
def test_hugepage_buffer():
    with memory.allocate(3 * MiB, backend="hugepage-2M") as b:
        assert b.backend == "hugepage-2M" and b.hugepage
        memoryview(b)[:4] = b"huge"
        assert translate(b.vaddr, b.size)[1] == b.size


@needs_hugepages
def test_hugetlbfs_buffer_is_shared_between_processes(tmp_path):
    if memory.hugetlbfs_mount() is None:
        pytest.skip(reason="no hugetlbfs mounted")
    with memory.allocate(2 * MiB, backend="hugetlbfs", shared=True) as b:
        assert b.path and os.path.exists(b.path)
        memoryview(b)[:5] = b"hello"
        code = ("import sys; from env import memory; b = memory.open_shared(sys.argv[1]); "
                "m = memoryview(b); assert bytes(m[:5]) == b'hello'; m[5:11] = b' world'; "
                "m.release(); b.free()")
        subprocess.run([sys.executable, "-c", code, b.path], check=True)
        assert bytes(memoryview(b)[:11]) == b"hello world"
        path = b.path
    assert not os.path.exists(path)


def test_open_shared_refuses_a_file_outside_hugetlbfs(tmp_path):
    """A plain file is page cache, not hugepages: mapping it as a shared DMA buffer would
    register it as hugepage memory, and in no-IOMMU mode hand devices physical addresses that
    move. It is refused, naming the file, and nothing is mapped or registered."""
    path = tmp_path / "not-hugetlbfs"
    path.write_bytes(b"\0" * (2 * MiB))
    before = memory.heap_stats()["hugetlbfs"]
    with pytest.raises(InvalidArgument, match=rf"{path} is not on hugetlbfs \(its file system "
                                              r"type is 0x[0-9a-f]+\)"):
        memory.open_shared(str(path))
    assert memory.heap_stats()["hugetlbfs"] == before
    with pytest.raises(InvalidArgument, match="cannot open shared DMA buffer .*No such file"):
        memory.open_shared(str(tmp_path / "missing"))


# ---- Pool ------------------------------------------------------------------------------------
def test_pool_hands_out_every_element_once():
    p = memory.Pool(16, 100)
    got = [p.acquire() for _ in range(16)]
    assert sorted(got) == list(range(16))
    assert p.available == 0
    with pytest.raises(ResourceExhausted):
        p.acquire()
    addrs = {p.address(i) for i in got}
    assert len(addrs) == 16 and all(a % 64 == 0 for a in addrs)
    for i in got:
        p.release(i)
    assert p.available == 16


def test_pool_double_release_and_foreign_index():
    p = memory.Pool(4, 32)
    i = p.acquire()
    p.release(i)
    with pytest.raises(FreedBufferError):
        p.release(i)
    with pytest.raises(InvalidArgument):
        p.release(4)
    with pytest.raises(InvalidArgument):
        p.view(99)


def test_pool_views_are_separate_elements():
    p = memory.Pool(3, 10, align=16)
    assert p.stride == 16
    a, b = p.acquire(), p.acquire()
    p.view(a)[:] = b"a" * 10
    p.view(b)[:] = b"b" * 10
    assert bytes(p.view(a)) == b"a" * 10 and bytes(p.view(b)) == b"b" * 10


def test_dma_pool_elements_have_iovas():
    p = memory.Pool(8, 4096, dma=True, align=4096)
    i = p.acquire()
    assert p.iova(i) == translate(p.address(i))[0]
    with pytest.raises(InvalidArgument, match="not DMA"):
        memory.Pool(2, 8).iova(0)


@pytest.mark.parametrize("args", [(0, 8), (8, 0), (1 << 33, 8)])
def test_pool_bad_arguments(args):
    with pytest.raises((InvalidArgument, OverflowError)):
        memory.Pool(*args)


def test_pool_bad_alignment():
    with pytest.raises(InvalidArgument):
        memory.Pool(4, 8, align=3)


def test_pool_c_level_cycle():
    from env import _cbench
    p = memory.Pool(64, 256)
    assert _cbench.pool_cycle(p, 1000, batch=64) == 0
    assert p.available == 64
    assert _cbench.pool_cycle(memory.Pool(8, 8), 10, batch=9) == 10   # one get per round fails


def test_hugepage_status_reads_sysfs(tmp_path):
    d = tmp_path / "hugepages-2048kB"
    d.mkdir()
    (d / "nr_hugepages").write_text("16\n")
    (d / "free_hugepages").write_text("9\n")
    assert memory.hugepage_status(str(tmp_path)) == {2 * MiB: (16, 9)}
    assert memory.hugepage_status(str(tmp_path / "missing")) == {}


def test_hugetlbfs_mount_parsing(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\nhugetlbfs {tmp_path} hugetlbfs rw,relatime,pagesize=2M 0 0\n"
                      "none /x hugetlbfs rw,pagesize=1024M 0 0\n")
    assert memory.hugetlbfs_mount(2 * MiB, str(mounts)) == str(tmp_path)
    assert memory.hugetlbfs_mount(1 << 30, str(mounts)) is None    # /x is not writable/absent


def test_regions_are_registered_in_the_process_map():
    with memory.allocate(4096) as b:
        reg = vtophys_map().region_of(b.vaddr)
        assert reg is not None and reg.vaddr % (2 * MiB) == 0


def test_a_buffer_collected_during_an_allocation_does_not_deadlock():
    """The garbage collector can free a DmaBuffer while this thread is inside the heap's
    critical section (allocate -> list growth -> collection -> DmaBuffer.__dealloc__ -> free)."""
    heap = memory._heaps["anonymous"]
    held = [memory.allocate(4096, backend="anonymous") for _ in range(20)]

    class Cycle:
        pass

    def plant(phase, info):
        # at the start of a collection that runs inside the heap, make garbage that holds a
        # buffer, so that this very collection frees it
        if phase == "start" and heap.busy and held:
            c = Cycle()
            c.buf = held.pop()
            c.me = c

    old = gc.get_threshold()
    gc.callbacks.append(plant)
    gc.set_threshold(1)
    try:
        bufs = [memory.allocate(4096, backend="anonymous") for _ in range(2000)]
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(plant)
    gc.collect()
    assert len(held) < 20            # some buffers really were freed from inside the heap
    assert not heap.busy and not heap.deferred
    for b in bufs:
        b.free()
