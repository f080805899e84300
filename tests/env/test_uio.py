"""env.uio on a fake sysfs: config space and BAR0 are regular files there (the sysfs `config` and
`resource0` files are read, written and mmapped the same way), and hugepage counts come from a fake
/sys/kernel/mm/hugepages."""
import os

import pytest

import env.uio as uio
from env.errors import InvalidArgument, PermissionRequired, UioError, UioPermissionError
from env.memmap import MemMap
from env.uio import UioDevice, require_hugepages
from tests.env.test_pci import FakeSysfs, make_nvme

BDF = "0000:00:10.0"


def fake_hugepages(tmp_path, total=256):
    d = tmp_path / "hugepages" / "hugepages-2048kB"
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text(f"{total}\n")
    (d / "free_hugepages").write_text(f"{total}\n")
    return str(tmp_path / "hugepages")


@pytest.fixture
def sysfs(tmp_path):
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_driver("nvme", classes={0x010802})
    fake.add_driver("uio_pci_generic")
    make_nvme(fake, driver="uio_pci_generic", group=None)
    yield fake
    fake.join()


@pytest.fixture
def hugepages(tmp_path):
    return fake_hugepages(tmp_path)


def config_bytes(sysfs, offset, n):
    with open(sysfs.path(f"bus/pci/devices/{BDF}/config"), "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_bar0_is_mmapped_from_resource0(sysfs, hugepages):
    with UioDevice(BDF, sysfs, MemMap("va", "t"), hugepages) as dev:
        bar = dev.map_bar(0)
        assert bar.size == 0x4000 and dev.map_bar(0) is bar
        bar.w32(0x14, 0x00460001)                      # MAP_SHARED: the write reaches the file
        with open(sysfs.path(f"bus/pci/devices/{BDF}/resource0"), "rb") as f:
            f.seek(0x14)
            assert f.read(4) == bytes.fromhex("01004600")
    with pytest.raises(Exception, match="closed"):
        bar.r32(0)


def test_config_space_and_bus_master_and_close_turns_it_back_off(sysfs, hugepages):
    dev = UioDevice(BDF, sysfs, MemMap("va", "t"), hugepages)
    assert dev.config_read(0, 2) == 0x1B36 and dev.config_read(0, 4) == 0x00101B36
    assert dev.config_read(0x0B, 1) == 0x01                    # base class: mass storage
    assert dev.enable_bus_master() == 0x0107
    assert config_bytes(sysfs, 4, 2) == b"\x07\x01"
    dev.config_write(0x3C, 1, 0x0B)
    assert config_bytes(sysfs, 0x3C, 1) == b"\x0b"
    for bad in ((256, 1), (2, 4), (0, 8)):
        with pytest.raises(InvalidArgument):
            dev.config_read(*bad)
    with pytest.raises(InvalidArgument):
        dev.config_write(4, 1, 256)
    dev.close()
    assert config_bytes(sysfs, 4, 2) == b"\x03\x01"            # no DMA after we let go
    with pytest.raises(UioError, match="closed"):
        dev.config_read(0, 2)
    dev.close()


def test_memmap_is_physical_while_any_uio_device_is_open(sysfs, hugepages):
    m = MemMap("va", "t")
    a = UioDevice(BDF, sysfs, m, hugepages)
    b = UioDevice(BDF, sysfs, m, hugepages)
    assert m.mode == "pa"
    a.close()
    assert m.mode == "pa"
    b.close()
    assert m.mode == "va"


def test_an_iommu_mapper_in_the_process_is_refused(sysfs, hugepages):
    m = MemMap("va", "t")

    class Mapper:
        def map_dma(self, vaddr, size):
            return vaddr

        def unmap_dma(self, iova, size):
            pass
    m.set_mapper(Mapper())
    with pytest.raises(UioError, match="vfio container .* already maps DMA"):
        UioDevice(BDF, sysfs, m, hugepages)


def test_no_hugepages_is_a_clear_error(sysfs, tmp_path):
    none = fake_hugepages(tmp_path / "none", total=0)
    with pytest.raises(UioError, match=r"0000:00:10.0: uio_pci_generic has no IOMMU.*only "
                                       r"hugepages.*none are reserved") as info:
        UioDevice(BDF, sysfs, MemMap("va", "t"), none)
    assert info.value.step == "hugepages"
    with pytest.raises(UioError):
        require_hugepages("x", str(tmp_path / "missing"))


def test_device_on_another_driver_is_refused(sysfs, hugepages):
    sysfs.write("bus/pci/drivers/uio_pci_generic/unbind", BDF)
    with pytest.raises(UioError, match="bound to no driver, not uio_pci_generic"):
        UioDevice(BDF, sysfs, MemMap("va", "t"), hugepages)


def test_bars_that_cannot_be_mapped(sysfs, hugepages):
    res = sysfs.path(f"bus/pci/devices/{BDF}/resource")
    lines = open(res).read().splitlines()
    lines[2] = "0x000000000000c000 0x000000000000c01f 0x0000000000040101"     # an I/O-port BAR
    with open(res, "w") as f:
        f.write("\n".join(lines) + "\n")
    dev = UioDevice(BDF, sysfs, MemMap("va", "t"), hugepages)
    with pytest.raises(UioError, match="BAR1 is not implemented"):
        dev.map_bar(1)
    with pytest.raises(UioError, match="BAR2 is an I/O-port BAR"):
        dev.map_bar(2)
    with pytest.raises(InvalidArgument):
        dev.map_bar(6)
    dev.close()


def test_reset_goes_through_sysfs(sysfs, hugepages):
    dev = UioDevice(BDF, sysfs, MemMap("va", "t"), hugepages)
    with pytest.raises(UioError, match="no reset method"):
        dev.reset()
    open(sysfs.path(f"bus/pci/devices/{BDF}/reset"), "w").close()
    dev.reset()
    assert sysfs.writes[-1] == (f"bus/pci/devices/{BDF}/reset", "1")
    dev.close()


def test_not_root_is_permission_required(sysfs, hugepages, monkeypatch):
    real_open = os.open

    def denied(path, flags, *a):
        if str(path).endswith("/config"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a)
    monkeypatch.setattr(uio.os, "open", denied)
    m = MemMap("va", "t")
    with pytest.raises(UioPermissionError, match="open config .* run as root") as info:
        UioDevice(BDF, sysfs, m, hugepages)
    assert isinstance(info.value, PermissionRequired) and m.mode == "va"
