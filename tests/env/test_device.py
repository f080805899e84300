"""env.device.attach_pci / detach / probe_pci on a fake sysfs (and a fake vfio kernel for the vfio
path): which driver is chosen, that the device is bound, handed over and given back, and that a
failure at any step leaves the device with the driver it had."""
import os

import pytest

import env.vfio as vfio
from env.device import AttachedDevice, _choose, attach_pci, probe_pci
from env.errors import EnvError, InvalidArgument, PciError, UioError, VfioError
from env.memmap import MemMap
from tests.env.test_pci import NVME_CLASS, FakeSysfs, make_nvme
from tests.env.test_uio import config_bytes, fake_hugepages
from tests.env.test_vfio import HIGH_VA, FakeVfioKernel

BDF = "0000:00:10.0"
MiB = 1 << 20


@pytest.fixture
def sysfs(tmp_path):
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_driver("nvme", classes={NVME_CLASS}, async_delay=0.02)     # nvme probes async
    fake.add_driver("vfio-pci")
    fake.loadable["uio_pci_generic"] = ("uio_pci_generic", {})
    yield fake
    fake.join()


@pytest.fixture
def hugepages(tmp_path):
    return fake_hugepages(tmp_path)


def attach(sysfs, hugepages, **kw):
    kw.setdefault("memmap", MemMap("va", "t"))
    return attach_pci(BDF, root=sysfs, hugepages=hugepages, **kw)


def test_probe_lists_nvme_functions_with_their_drivers(sysfs):
    make_nvme(sysfs)
    make_nvme(sysfs, "0000:00:11.0", group=6, driver=None)
    sysfs.add_device("0000:00:02.0", class_code=0x020000)
    assert [(str(d.address), d.driver) for d in probe_pci(root=sysfs)] == \
        [("0000:00:10.0", "nvme"), ("0000:00:11.0", None)]
    assert len(probe_pci(None, root=sysfs)) == 3


def test_uio_attach_and_detach_round_trip(sysfs, hugepages):
    make_nvme(sysfs, group=None)
    m = MemMap("va", "t")
    dev = attach(sysfs, hugepages, driver="uio", memmap=m)
    assert isinstance(dev, AttachedDevice) and dev.kind == "uio"
    assert sysfs.modprobes == ["uio_pci_generic"]
    assert dev.pci.driver == "uio_pci_generic" and str(dev.address) == BDF
    assert config_bytes(sysfs, 4, 2) == b"\x07\x01"            # bus master on
    assert dev.config_read(4, 2) == 0x0107 and m.mode == "pa"
    assert dev.map_bar(0).r32(0) == 0
    assert dev.detach() == "nvme"
    assert sysfs.driver_of(BDF) == "nvme" and sysfs.override_of(BDF) is None
    assert config_bytes(sysfs, 4, 2) == b"\x03\x01" and m.mode == "va"
    assert dev.detach() == "nvme"                                # idempotent
    with pytest.raises(EnvError, match="detached"):
        dev.map_bar(0)


def test_auto_without_iommu_or_noiommu_chooses_uio(sysfs, hugepages):
    make_nvme(sysfs, group=None)
    with attach(sysfs, hugepages) as dev:
        assert dev.kind == "uio"
    assert sysfs.driver_of(BDF) == "nvme"


def test_auto_with_noiommu_mode_chooses_vfio(sysfs):
    dev = make_nvme(sysfs, group=None)
    os.makedirs(sysfs.path("module/vfio/parameters"))
    with open(sysfs.path("module/vfio/parameters/enable_unsafe_noiommu_mode"), "w") as f:
        f.write("Y\n")
    assert _choose(dev, "auto") == "vfio"


def test_explicit_vfio_without_iommu_says_use_uio(sysfs, hugepages):
    make_nvme(sysfs, group=None)
    with pytest.raises(PciError, match="no IOMMU group.*intel_iommu=on.*driver='uio'"):
        attach(sysfs, hugepages, driver="vfio")
    assert sysfs.driver_of(BDF) == "nvme" and sysfs.writes == []


def test_vfio_failure_gives_the_device_back(sysfs, hugepages, tmp_path):
    make_nvme(sysfs, group=4)
    with pytest.raises(VfioError, match=r"0000:00:10.0: vfio container: open .*modprobe vfio-pci"):
        attach(sysfs, hugepages, vfio_dir=str(tmp_path / "no-vfio"))
    assert sysfs.driver_of(BDF) == "nvme" and sysfs.override_of(BDF) is None


def test_vfio_attach_and_detach_round_trip(sysfs, hugepages, tmp_path, monkeypatch):
    make_nvme(sysfs, group=5)
    kernel = FakeVfioKernel(tmp_path, sysfs)
    kernel.add_group(5)
    monkeypatch.setattr(vfio, "_ioctl", kernel.ioctl)
    m = MemMap("va", "t")
    m.register(HIGH_VA, 2 * MiB)
    dev = attach(sysfs, hugepages, vfio_dir=str(kernel.dir), memmap=m)
    assert dev.kind == "vfio" and dev.pci.driver == "vfio-pci"
    assert m.mapper is dev.backend.container and kernel.maps == {HIGH_VA: (HIGH_VA, 2 * MiB)}
    assert dev.config_read(4, 2) == 0x0107                      # bus master on
    assert dev.map_bar(0).size == 0x2000
    dev.reset()
    assert dev.detach() == "nvme"
    assert kernel.maps == {} and m.mapper is None and sysfs.override_of(BDF) is None


def test_device_already_set_up_for_vfio_stays_bound_after_detach(sysfs, hugepages, tmp_path,
                                                                 monkeypatch):
    make_nvme(sysfs, group=5, driver="vfio-pci")          # e.g. `userblk setup` ran before
    kernel = FakeVfioKernel(tmp_path, sysfs)
    kernel.add_group(5)
    monkeypatch.setattr(vfio, "_ioctl", kernel.ioctl)
    with attach(sysfs, hugepages, vfio_dir=str(kernel.dir)) as dev:
        assert dev.kind == "vfio"
    assert sysfs.driver_of(BDF) == "vfio-pci" and sysfs.writes == []


def test_device_on_another_userspace_driver_is_refused(sysfs, hugepages):
    sysfs.add_driver("uio_pci_generic")
    make_nvme(sysfs, group=5, driver="uio_pci_generic")
    with pytest.raises(PciError, match="bound to uio_pci_generic, another user-space driver"):
        attach(sysfs, hugepages, driver="vfio")
    assert sysfs.writes == []


def test_device_in_use_by_the_kernel_is_refused(sysfs, hugepages):
    make_nvme(sysfs, group=None)
    sysfs.add_namespace(BDF, holders=["dm-0"])
    with pytest.raises(PciError, match=r"in use through its nvme driver: /dev/nvme0n1 is held by "
                                       r"dm-0.*force=True"):
        attach(sysfs, hugepages, driver="uio")
    assert sysfs.writes == []
    with attach(sysfs, hugepages, driver="uio", force=True) as dev:
        assert dev.kind == "uio"


def test_uio_without_hugepages_touches_nothing(sysfs, tmp_path):
    make_nvme(sysfs, group=None)
    with pytest.raises(UioError, match="none are reserved"):
        attach(sysfs, fake_hugepages(tmp_path / "none", total=0), driver="uio")
    assert sysfs.writes == [] and sysfs.driver_of(BDF) == "nvme"


def test_transport_id_and_short_addresses_are_accepted(sysfs, hugepages):
    make_nvme(sysfs, group=None)
    with attach_pci("trtype:PCIe traddr:0000:00:10.0", root=sysfs, hugepages=hugepages,
                    memmap=MemMap("va", "t")) as dev:
        assert str(dev.address) == BDF
    with attach_pci("00:10.0", root=sysfs, hugepages=hugepages, memmap=MemMap("va", "t")) as dev:
        assert str(dev.address) == BDF


def test_bad_arguments(sysfs, hugepages):
    make_nvme(sysfs)
    with pytest.raises(InvalidArgument, match="driver must be one of"):
        attach(sysfs, hugepages, driver="igb_uio")
    with pytest.raises(InvalidArgument):
        attach_pci("nonsense", root=sysfs)
    with pytest.raises(PciError, match="no PCI device 0000:00:1f.0"):
        attach_pci("0000:00:1f.0", root=sysfs)


def test_a_function_of_another_class_is_refused_before_anything_is_unbound(sysfs, hugepages):
    sysfs.add_driver("e1000e", classes={0x020000})
    sysfs.add_device("0000:00:02.0", class_code=0x020000, driver="e1000e", iommu_group=3)
    with pytest.raises(PciError, match=r"0000:00:02.0 has PCI class 02 00 00 \(Ethernet\), not "
                                       r"01 08 02 \(NVMe\): refused before anything was "
                                       r"unbound") as ei:
        attach_pci("0000:00:02.0", root=sysfs, hugepages=hugepages, memmap=MemMap("va", "t"),
                   class_code=NVME_CLASS)
    assert str(ei.value.address) == "0000:00:02.0"
    assert sysfs.writes == [] and sysfs.modprobes == []
    assert sysfs.driver_of("0000:00:02.0") == "e1000e"
    make_nvme(sysfs, group=None)                        # an NVMe function passes the check
    with attach(sysfs, hugepages, driver="uio", class_code=NVME_CLASS) as dev:
        assert dev.kind == "uio"


def test_a_function_attached_twice_in_one_process_is_refused(sysfs, hugepages):
    make_nvme(sysfs, group=None)
    dev = attach(sysfs, hugepages, driver="uio")
    writes = len(sysfs.writes)
    with pytest.raises(PciError, match="0000:00:10.0 is already attached in this process through "
                                       "uio: one driver per device"):
        attach(sysfs, hugepages, driver="uio")
    assert len(sysfs.writes) == writes and dev.pci.driver == "uio_pci_generic"
    assert dev.map_bar(0).r32(0) == 0                   # the first is untouched
    dev.detach()
    with attach(sysfs, hugepages, driver="uio") as again:   # free once detached
        assert again.kind == "uio"
    with attach(sysfs, hugepages, driver="uio"):            # (and after a with block)
        pass


def test_a_failed_attach_does_not_keep_the_function(sysfs, hugepages, tmp_path):
    make_nvme(sysfs, group=None)
    with pytest.raises(UioError):
        attach(sysfs, fake_hugepages(tmp_path / "none", total=0), driver="uio")
    with attach(sysfs, hugepages, driver="uio") as dev:
        assert dev.kind == "uio"
