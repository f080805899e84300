"""vfio with a 39-bit IOVA aperture (QEMU intel-iommu's default, testbed pitfall 2), in the guest.

User-space addresses (0x7f..., 47 bits) do not fit, so VFIO_IOMMU_MAP_DMA with IOVA = VA would
fail with EINVAL. The container must read the valid ranges from VFIO_IOMMU_GET_INFO and let its
allocator choose IOVAs inside them, away from the MSI window, and the controller must then DMA to
those IOVAs.
"""
import glob
import os

import pytest

from env.device import attach_pci
from env.memmap import vtophys_map
from env.memory import allocate
from env.vfio import MSI_WINDOW
from tests.env.test_vfio_guest import (BDF, IN_GUEST, NAMESPACE, MiniNvme, identify_controller,
                                       wait_for)

pytestmark = [
    pytest.mark.guest(iommu=True, iommu_aw=39),
    pytest.mark.skipif(not IN_GUEST, reason="needs the QEMU test guest (USERBLK_IN_GUEST=1) "
                                            "with a 39-bit vIOMMU aperture (iommu_aw=39)"),
]
APERTURE_END = (1 << 39) - 1


def iommu_address_width():
    """MGAW + 1 of the Intel IOMMU (VT-d capability register bits 21:16), or None."""
    for path in glob.glob("/sys/class/iommu/*/intel-iommu/cap"):
        with open(path) as f:
            return (int(f.read(), 16) >> 16 & 0x3F) + 1
    return None


@pytest.fixture(scope="module")
def device():
    width = iommu_address_width()
    if width != 39:
        pytest.fail(f"this guest's IOMMU address width is {width} bits, not 39: boot it with "
                    "iommu_aw=39 (run-guest.sh --iommu-aw 39)", pytrace=False)
    early = allocate(4096, backend="anonymous")         # mapped when the container attaches
    dev = attach_pci(BDF, driver="vfio")
    yield dev, early
    dev.detach()
    early.free()


def test_vfio_reports_the_39_bit_aperture(device):
    dev, _ = device
    info = dev.backend.container.iommu_info
    assert info.aperture_bits == 39
    assert info.iova_ranges == ((0, 0xFEDFFFFF), (0xFEF00000, APERTURE_END))


@pytest.mark.parametrize("backend", ["hugepage-2M", "anonymous"])
def test_iovas_come_from_the_allocator_inside_the_aperture(device, backend):
    dev, early = device
    container = dev.backend.container
    with allocate(4096, backend=backend) as buf:
        for b in (buf, early):
            iova, n = vtophys_map().translate(b.vaddr, b.size)
            assert iova == b.iova != b.vaddr and n == b.size      # the VA does not fit
            assert iova + b.size - 1 <= APERTURE_END
            assert iova + b.size <= MSI_WINDOW[0] or iova > MSI_WINDOW[1]
            region = vtophys_map().region_of(b.vaddr)
            assert region.iovas[0] % (2 << 20) == 0
            assert container.mappings[region.iovas[0]] == (region.vaddr, region.size)


def test_the_controller_dmas_to_allocated_iovas(device):
    dev, early = device
    bar = dev.map_bar(0)
    with allocate(8192, backend="hugepage-2M") as queues, allocate(4096, backend="anonymous") as anon:
        assert queues.iova <= APERTURE_END and anon.iova <= APERTURE_END
        nvme = MiniNvme(bar, queues)
        nvme.enable()
        ctrl = identify_controller(nvme.identify(1, anon))
        assert ctrl["model"] == "QEMU NVMe Ctrl" and ctrl["vid"] == 0x1B36
        assert identify_controller(nvme.identify(1, early)) == ctrl
        nvme.shutdown()


def test_detach_gives_the_device_back(device):
    dev, early = device
    assert dev.detach() == "nvme"
    assert vtophys_map().mapper is None and early.iova == early.vaddr
    assert wait_for(lambda: os.path.exists(NAMESPACE))
