"""uio_pci_generic bring-up in a guest booted without an IOMMU.

With no IOMMU group (and no vfio no-IOMMU mode in the Debian kernel), `attach_pci(driver="auto")`
must choose uio_pci_generic. The device then DMAs to physical addresses: env.memmap switches to
"pa", hugepage buffers translate to their physical address (/proc/self/pagemap), anonymous memory
is refused, and the controller's Identify lands in the hugepage buffer. Detaching gives the device
back to `nvme`.
"""
import os

import pytest

from env import pagemap
from env.device import attach_pci, probe_pci
from env.errors import TranslationError
from env.memmap import vtophys_map
from env.memory import allocate
from env.pci import PCI_COMMAND_MASTER, PciDevice
from tests.env.test_vfio_guest import (BDF, IN_GUEST, NAMESPACE, QEMU_CAP, QEMU_VS, MiniNvme,
                                       cap_fields, identify_controller, kernel_identity,
                                       registers_through_sysfs, wait_for)

pytestmark = [
    pytest.mark.guest(iommu=False),
    pytest.mark.skipif(not IN_GUEST, reason="needs the QEMU test guest (USERBLK_IN_GUEST=1) booted "
                                            "without an IOMMU (iommu=False)"),
]


@pytest.fixture(scope="module")
def before():
    pci = PciDevice(BDF)
    if pci.iommu_group is not None:
        pytest.fail(f"{BDF} has IOMMU group {pci.iommu_group}: this module needs a guest booted "
                    "without an IOMMU (iommu=False, run-guest.sh --iommu off)", pytrace=False)
    facts = {"driver": pci.driver, "namespace": os.path.exists(NAMESPACE),
             "identity": kernel_identity()}
    facts["cap"], facts["vs"] = registers_through_sysfs()
    return facts


@pytest.fixture(scope="module")
def device(before):
    dev = attach_pci(BDF)
    yield dev
    dev.detach()


def test_the_nvme_function_is_found_without_an_iommu_group(before):
    found = {str(d.address): d for d in probe_pci()}
    assert found[BDF].driver == before["driver"] == "nvme" and before["namespace"]
    assert found[BDF].iommu_group is None


def test_auto_chooses_uio_pci_generic(device):
    assert device.kind == "uio"
    assert device.pci.driver == "uio_pci_generic" and device.pci.driver_override == "uio_pci_generic"
    assert not os.path.exists(NAMESPACE)
    assert vtophys_map().mode == "pa"


def test_bar0_through_resource0_reads_cap_and_vs(device, before):
    bar = device.map_bar(0)
    cap, vs = bar.r64(0), bar.r32(8)
    assert (cap, vs) == (before["cap"], before["vs"])
    assert vs == QEMU_VS and cap_fields(cap) == QEMU_CAP
    assert device.config_read(0x04, 2) & PCI_COMMAND_MASTER
    assert device.config_read(0x00, 4) == 0x00101B36


def test_hugepages_translate_to_physical_addresses_and_anonymous_memory_is_refused(device):
    with allocate(4096, backend="hugepage-2M") as huge, allocate(4096, backend="anonymous") as anon:
        phys = pagemap.virt_to_phys(huge.vaddr)
        assert huge.iova == phys != huge.vaddr
        assert vtophys_map().translate(huge.vaddr + 100) == (phys + 100, 1)
        with pytest.raises(TranslationError, match="not DMA-able in IOVA mode 'pa'"):
            anon.iova


def test_the_controller_dmas_to_physical_addresses(device, before):
    bar = device.map_bar(0)
    with allocate(8192, backend="hugepage-2M") as queues, allocate(4096, backend="hugepage-2M") as data:
        nvme = MiniNvme(bar, queues)
        nvme.enable()
        ctrl = identify_controller(nvme.identify(1, data))
        assert ctrl["model"] == before["identity"]["model"] == "QEMU NVMe Ctrl"
        assert ctrl["serial"] == before["identity"]["serial"]
        nvme.shutdown()


def test_detach_gives_the_device_back_to_nvme(device):
    assert device.detach() == "nvme"
    assert vtophys_map().mode == "va"
    assert wait_for(lambda: os.path.exists(NAMESPACE)), f"{NAMESPACE} did not come back"
