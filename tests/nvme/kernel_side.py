"""The kernel's view of an NVMe controller inside the test guest: what `nvme-cli` reports, and
block I/O through /dev/nvmeXnY with O_DIRECT. The guest tests compare the user-space driver with
it, and hand data across (written by one, read by the other)."""
import json
import mmap
import os
import subprocess
import time

from env.pci import PciDevice

IN_GUEST = os.environ.get("USERBLK_IN_GUEST") == "1"
GUEST_REASON = ("needs the QEMU test guest (USERBLK_IN_GUEST=1: root and QEMU's emulated NVMe "
                "controller); run through the guest harness")


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def kernel_ctrl_name(bdf):
    """'nvme0' for the kernel controller on PCI function `bdf` (waits until it is live)."""
    pci = PciDevice(bdf)
    base = f"bus/pci/devices/{bdf}/nvme"
    assert wait_for(lambda: pci.sysfs.listdir(base)), f"{bdf}: no kernel nvme controller"
    name = sorted(pci.sysfs.listdir(base))[0]
    assert wait_for(lambda: pci.sysfs.read(f"{base}/{name}/state") == "live"), f"{name} not live"
    return name


def block_device(bdf, nsid):
    name = kernel_ctrl_name(bdf)
    dev = f"/dev/{name}n{nsid}"
    assert wait_for(lambda: os.path.exists(dev)), f"{dev} did not appear"
    return dev


def nvme_cli_json(*args):
    out = subprocess.run(["nvme", *args, "-o", "json"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def id_ctrl(bdf):
    return nvme_cli_json("id-ctrl", f"/dev/{kernel_ctrl_name(bdf)}")


def id_ns(bdf, nsid):
    return nvme_cli_json("id-ns", block_device(bdf, nsid))


def _aligned(size):
    buf = mmap.mmap(-1, max(size, 4096))
    return buf


def kernel_read(dev, offset, size):
    """`size` bytes at `offset` of block device `dev`, bypassing the page cache."""
    buf = _aligned(size)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [memoryview(buf)[:size]], offset)
    finally:
        os.close(fd)
    assert n == size
    return bytes(buf[:size])


def kernel_write(dev, offset, data):
    buf = _aligned(len(data))
    buf[:len(data)] = data
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        n = os.pwritev(fd, [memoryview(buf)[:len(data)]], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert n == len(data)
