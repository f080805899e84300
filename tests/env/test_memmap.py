"""MemMap: the two-level VA -> IOVA table, its modes, mappers and bad input."""
import pytest

from env import _cbench
from env.errors import InvalidArgument, TranslationError
from env.memmap import MemMap

MiB = 1 << 20
BASE = 0x7F00_0000_0000       # a plausible user-space address; the map never dereferences it


def test_identity_translation_and_contiguity():
    m = MemMap()
    m.register(BASE, 6 * MiB)
    assert m.translate(BASE) == (BASE, 1)
    assert m.translate(BASE + 123, 4096) == (BASE + 123, 4096)
    # the whole region is contiguous; asking beyond its end stops at the end
    assert m.translate(BASE + 1 * MiB, 100 * MiB) == (BASE + 1 * MiB, 5 * MiB)


def test_explicit_iovas_break_contiguity_where_pages_are_not_adjacent():
    class Mapper:
        def __init__(self):
            self.maps = []

        def map_dma(self, vaddr, size):
            iova = 0x1_0000_0000 + len(self.maps) * 0x1000_0000
            self.maps.append((vaddr, iova, size))
            return iova

        def unmap_dma(self, iova, size):
            self.maps = [x for x in self.maps if x[1] != iova]

    m = MemMap()
    mapper = Mapper()
    m.set_mapper(mapper)
    m.register(BASE, 2 * MiB)
    m.register(BASE + 2 * MiB, 2 * MiB)        # adjacent VA, far-away IOVA
    assert m.translate(BASE + 10, 1) == (0x1_0000_000A, 1)
    iova, n = m.translate(BASE + MiB, 4 * MiB)
    assert iova == 0x1_0000_0000 + MiB and n == MiB
    assert m.translate(BASE + 2 * MiB)[0] == 0x1_1000_0000
    m.unregister(BASE, 2 * MiB)
    assert len(mapper.maps) == 1
    with pytest.raises(TranslationError, match="not registered"):
        m.translate(BASE)


def test_mapper_maps_existing_regions_and_clear_restores_identity():
    calls = []

    class Mapper:
        def map_dma(self, vaddr, size):
            calls.append(("map", vaddr, size))
            return vaddr

        def unmap_dma(self, iova, size):
            calls.append(("unmap", iova, size))

    m = MemMap()
    m.register(BASE, 2 * MiB)
    m.set_mapper(Mapper())
    assert calls == [("map", BASE, 2 * MiB)]
    m.register(BASE + 4 * MiB, 4 * MiB)
    assert calls[-1] == ("map", BASE + 4 * MiB, 4 * MiB)
    m.clear_mapper()
    assert ("unmap", BASE, 2 * MiB) in calls and ("unmap", BASE + 4 * MiB, 4 * MiB) in calls
    assert m.translate(BASE)[0] == BASE


def test_failing_mapper_leaves_the_map_unchanged():
    class Broken:
        def map_dma(self, vaddr, size):
            raise OSError("no IOMMU today")

        def unmap_dma(self, iova, size):
            pass

    m = MemMap()
    m.register(BASE, 2 * MiB)
    with pytest.raises(OSError):
        m.set_mapper(Broken())
    assert m.mapper is None and m.translate(BASE)[0] == BASE


def test_pa_mode_marks_non_hugepage_memory_as_not_dma_able():
    m = MemMap(mode="pa")
    m.register(BASE, 2 * MiB, hugepage=False)
    with pytest.raises(TranslationError, match="hugepages"):
        m.translate(BASE)
    m.set_mode("va")
    assert m.translate(BASE)[0] == BASE


@pytest.mark.parametrize("vaddr,size", [(BASE + 4096, 2 * MiB), (BASE, 4096), (BASE, 0),
                                        (1 << 48, 2 * MiB), ((1 << 48) - 2 * MiB, 4 * MiB)])
def test_register_rejects_bad_ranges(vaddr, size):
    with pytest.raises(InvalidArgument):
        MemMap().register(vaddr, size)


def test_register_rejects_overlap_and_unregister_needs_exact_region():
    m = MemMap()
    m.register(BASE, 4 * MiB)
    with pytest.raises(InvalidArgument, match="overlaps"):
        m.register(BASE + 2 * MiB, 4 * MiB)
    with pytest.raises(InvalidArgument):
        m.unregister(BASE, 2 * MiB)
    m.unregister(BASE, 4 * MiB)
    with pytest.raises(InvalidArgument):
        m.unregister(BASE, 4 * MiB)


@pytest.mark.parametrize("addr", [0, 0x1000, BASE, (1 << 48) + 5, (1 << 64) - 1])
def test_translating_unregistered_memory_raises(addr):
    with pytest.raises(TranslationError):
        MemMap().translate(addr)


def test_bad_mode():
    with pytest.raises(InvalidArgument):
        MemMap(mode="iommu")


def test_translation_from_cython_without_the_gil():
    m = MemMap()
    m.register(BASE, 2 * MiB)
    assert _cbench.translate_loop(m, BASE + 64, 512, 1000) in {BASE + 64 + k * 64 for k in range(8)}
    assert _cbench.translate_loop(m, BASE + 4 * MiB, 1, 10) == -1


def test_many_sparse_regions_across_gigabytes():
    m = MemMap()
    addrs = [BASE + i * (1 << 30) + (i % 512) * 2 * MiB for i in range(40)]
    for a in addrs:
        m.register(a, 2 * MiB)
    for a in addrs:
        assert m.translate(a + 5) == (a + 5, 1)
    assert len(m.regions()) == 40
