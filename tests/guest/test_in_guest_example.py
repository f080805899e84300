"""A guest-marked module: proves that such tests really run inside the guest, as root, with the
NVMe controller, the hugepages and the configuration that the marker asked for.

It is also the example to copy: one module-level ``pytestmark``, and the module's tests share
one guest boot. Its failure propagates to the host run like any test's.
"""
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.guest(nvme_ns=2, nvme_size="64M", env={"USERBLK_EXAMPLE": "yes"})


def test_runs_as_root_in_the_guest():
    assert os.environ.get("USERBLK_IN_GUEST") == "1"
    assert os.geteuid() == 0
    assert Path("/proc/sys/kernel/hostname").read_text().strip() == "userblk-guest"


def test_nvme_controller_is_live_on_the_kernel_driver():
    ctrl = Path("/sys/bus/pci/devices/0000:00:10.0")
    assert (ctrl / "class").read_text().strip() == "0x010802"  # NVMe, NVM Express interface
    assert os.path.basename(os.readlink(ctrl / "driver")) == "nvme"
    (nvme,) = (ctrl / "nvme").iterdir()
    assert (nvme / "state").read_text().strip() == "live"
    assert (nvme / "serial").read_text().strip() == "USERBLK0"
    assert Path("/dev/nvme0n1").is_block_device()
    assert Path("/dev/nvme0n2").is_block_device()


def test_hugepages_are_reserved_and_mounted():
    assert int(Path("/proc/sys/vm/nr_hugepages").read_text()) == 256
    mounts = Path("/proc/mounts").read_text().splitlines()
    assert any(m.split()[1:3] == ["/dev/hugepages", "hugetlbfs"] for m in mounts)


def test_marker_configuration_reaches_the_guest(guest_config):
    assert guest_config.nvme_ns == 2
    assert guest_config.nvme_size == 64 << 20
    assert os.environ.get("USERBLK_EXAMPLE") == "yes"
    # 64 MiB namespaces of 512-byte blocks
    assert Path("/sys/block/nvme0n1/size").read_text().strip() == str(64 << 11)


def test_the_vfio_module_loads():
    """No udev in the guest: tests load what they need (vfio-pci needs the vIOMMU)."""
    import subprocess
    subprocess.run(["modprobe", "vfio-pci"], check=True)
    assert Path("/sys/bus/pci/drivers/vfio-pci").is_dir()
    assert any(Path("/sys/kernel/iommu_groups").iterdir()), "the vIOMMU makes IOMMU groups"
