"""`userblk setup` on a real kernel, inside the QEMU test guest (root, an IOMMU, QEMU's NVMe
controller at 0000:00:10.0 on the kernel `nvme` driver, 256 x 2 MiB hugepages on /dev/hugepages).

The command runs as a user would run it (`python -m userblk setup ...`, a separate process). The
tests run in order, each starting where the previous one left the machine: a namespace used as
swap is refused; then setup binds the controller to vfio-pci and /dev/nvme0n1 goes away; setup
again leaves it bound and raises the hugepage pool; status shows it; the NVMe driver attaches to
the already-bound device and its detach leaves it on vfio-pci; reset gives it back to `nvme`,
/dev/nvme0n1 comes back, and the pool is set back to 512 MiB.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from env.pci import PciDevice

pytestmark = [
    pytest.mark.guest(),
    pytest.mark.skipif(os.environ.get("USERBLK_IN_GUEST") != "1",
                       reason="needs the QEMU test guest (USERBLK_IN_GUEST=1: root, an IOMMU, "
                              "QEMU's NVMe controller at 0000:00:10.0); run through the guest "
                              "harness"),
]

BDF = "0000:00:10.0"
NAMESPACE = "/dev/nvme0n1"
STATE = "/run/userblk/setup.json"
NR_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def userblk(*args, expect=0):
    res = subprocess.run([sys.executable, "-m", "userblk", *args], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == expect, (f"userblk {' '.join(args)}: exit {res.returncode}\n"
                                      f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res.stdout


def hugepages():
    with open(NR_HUGEPAGES) as f:
        return int(f.read())


@pytest.fixture(scope="module", autouse=True)
def give_back():
    """Whatever fails, the controller ends the module on `nvme` (later modules in the same boot
    expect it) and no swap is left on it."""
    yield
    subprocess.run(["swapoff", NAMESPACE], capture_output=True)
    pci = PciDevice(BDF)
    if pci.driver != "nvme":
        pci.original_driver = "nvme"
        pci.restore()


def test_a_namespace_used_as_swap_keeps_its_controller():
    assert PciDevice(BDF).driver == "nvme" and wait_for(lambda: os.path.exists(NAMESPACE))
    subprocess.run(["mkswap", NAMESPACE], check=True, capture_output=True)
    subprocess.run(["swapon", NAMESPACE], check=True, capture_output=True)
    try:
        out = userblk("setup", "--hugemem", "512")
    finally:
        subprocess.run(["swapoff", NAMESPACE], check=True, capture_output=True)
    assert f"{BDF} (1b36 0010): nvme, skipped: in use: {NAMESPACE} used as swap" in out
    assert PciDevice(BDF).driver == "nvme" and os.path.exists(NAMESPACE)


def test_setup_binds_the_controller_to_vfio_and_its_namespace_goes():
    assert hugepages() == 256
    out = userblk("setup", "--hugemem", "512")
    lines = out.splitlines()
    assert "hugepages: 256 x 2 MiB already reserved (512 MiB), 256 asked: left as they are" \
        in lines
    assert "hugetlbfs: mounted at /dev/hugepages" in lines
    assert any(line.startswith("driver: vfio-pci (IOMMU active,") for line in lines), out
    assert f"{BDF} (1b36 0010): nvme -> vfio-pci" in lines
    pci = PciDevice(BDF)
    assert pci.driver == "vfio-pci" and pci.driver_override == "vfio-pci"
    assert os.path.exists(f"/dev/vfio/{pci.iommu_group}")
    assert wait_for(lambda: not os.path.exists(NAMESPACE), 5.0), f"{NAMESPACE} is still there"
    with open(STATE) as f:
        assert json.load(f)["devices"][BDF] == {"original_driver": "nvme", "driver": "vfio-pci"}


def test_setup_again_leaves_it_bound_and_raises_the_pool():
    report = json.loads(userblk("setup", "--hugepages", "300", "--json"))
    (dev,) = report["devices"]
    assert (dev["action"], dev["reason"]) == ("skip", "already bound to vfio-pci")
    hp = report["hugepages"]
    assert (hp["before"], hp["requested"], hp["after"], hp["short"]) == (256, 300, 300, False)
    assert hugepages() == 300
    with open(STATE) as f:       # still the driver it was taken from, not vfio-pci
        assert json.load(f)["devices"][BDF]["original_driver"] == "nvme"


def test_status_shows_the_bound_controller_and_the_pool():
    out = userblk("setup", "status")
    row = next(line for line in out.splitlines() if line.startswith(f"NVMe  {BDF}")).split()
    assert row[2:4] == ["1b36", "0010"]
    assert row[5:8] == ["vfio-pci", "(was", "nvme)"]
    # its /dev/vfio group instead of a kernel controller, and no block devices
    assert row[-2:] == [f"vfio/{PciDevice(BDF).iommu_group}", "-"]
    assert any(line.split()[1:3] == ["2", "MiB"] and line.split()[-1] == "300"
               for line in out.splitlines() if line.startswith("node")), out
    info = json.loads(userblk("setup", "status", "--json"))
    assert info["nvme"][0]["driver"] == "vfio-pci" and info["hugetlbfs"] == "/dev/hugepages"
    assert sum(h["total"] for h in info["hugepages"] if h["page_kb"] == 2048) == 300


def test_the_driver_uses_the_bound_controller_and_leaves_it_bound():
    import nvme
    ctrlr = nvme.attach(BDF)
    try:
        assert ctrlr.state == "ready"
        assert ctrlr.transport.handle.kind == "vfio"
        assert ctrlr.data.serial == "USERBLK0"
        assert 1 in ctrlr.namespaces
    finally:
        ctrlr.detach()
    assert PciDevice(BDF).driver == "vfio-pci"
    assert not os.path.exists(NAMESPACE)


def test_reset_gives_it_back_to_nvme_and_the_namespace_returns():
    out = userblk("setup", "reset", "--hugemem", "512")
    lines = out.splitlines()
    assert f"{BDF} (1b36 0010): vfio-pci -> nvme" in lines
    assert "hugepages: 300 -> 256 x 2 MiB (512 MiB), 256 asked" in lines
    pci = PciDevice(BDF)
    assert pci.driver == "nvme" and pci.driver_override is None
    assert wait_for(lambda: os.path.exists(NAMESPACE), 15.0), f"{NAMESPACE} did not come back"
    assert hugepages() == 256
    assert not os.path.exists(STATE)
    assert any(m.split()[1:3] == ["/dev/hugepages", "hugetlbfs"]
               for m in open("/proc/mounts").read().splitlines())    # the mount stays
    # and the plan of another setup, which changes nothing
    out = userblk("setup", "--dry-run")
    assert f"{BDF} (1b36 0010): would move nvme -> vfio-pci" in out
    assert PciDevice(BDF).driver == "nvme"
