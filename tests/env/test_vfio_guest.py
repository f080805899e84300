"""vfio bring-up of a real (emulated) NVMe controller, inside the QEMU test guest.

The guest (IOMMU on, 48-bit aperture) has QEMU's NVMe controller at 0000:00:10.0 on the kernel
`nvme` driver. These tests take it with `attach_pci`, check it is bound to vfio-pci, that BAR0
reads back what sysfs showed before and what QEMU reports, that DMA buffers of both backends are
VFIO_IOMMU_MAP_DMA'd at IOVAs inside the ranges VFIO_IOMMU_GET_INFO reports and translate through
env.memmap, that the controller really DMAs into them (admin Identify), and that detaching gives
the device back to `nvme` so /dev/nvme0n1 reappears.

`MiniNvme` and the sysfs helpers here are shared with the uio and 39-bit-aperture guest tests.
"""
import os
import struct
import time

import pytest

from env.device import attach_pci, probe_pci
from env.errors import VfioError
from env.memmap import vtophys_map
from env.memory import allocate
from env.mmio import Mmio
from env.pci import PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PciDevice

IN_GUEST = os.environ.get("USERBLK_IN_GUEST") == "1"
pytestmark = [
    pytest.mark.guest(iommu=True),
    pytest.mark.skipif(not IN_GUEST, reason="needs the QEMU test guest (USERBLK_IN_GUEST=1: root, "
                                            "an emulated NVMe controller at 0000:00:10.0, an IOMMU)"),
]

BDF = "0000:00:10.0"
NAMESPACE = "/dev/nvme0n1"
MiB = 1 << 20

# QEMU 7.2's emulated controller (hw/nvme/ctrl.c: nvme_init_ctrl): what CAP and VS must say
QEMU_VS = 0x00010400                     # NVMe 1.4.0
QEMU_CAP = {"MQES": 0x7FF, "CQR": 1, "TO": 0x0F, "DSTRD": 0, "CSS_NVM": 1, "MPSMIN": 0}


def cap_fields(cap):
    """CAP fields, NVMe Base Specification 2.0 section 3.1.4.1."""
    return {"MQES": cap & 0xFFFF, "CQR": cap >> 16 & 1, "TO": cap >> 24 & 0xFF,
            "DSTRD": cap >> 32 & 0xF, "CSS_NVM": cap >> 37 & 1, "MPSMIN": cap >> 48 & 0xF}


def registers_through_sysfs(bdf=BDF):
    """(CAP, VS) read through sysfs resource0. The kernel must not hold BAR0 meanwhile: with
    CONFIG_IO_STRICT_DEVMEM (Debian) mapping a BAR a driver has claimed fails with EINVAL, so the
    device is taken from its driver for the read and given back afterwards."""
    pci = PciDevice(bdf)
    pci.unbind()
    try:
        return _read_cap_vs(bdf)
    finally:
        pci.restore()
        assert wait_for(lambda: os.path.exists(NAMESPACE)), f"{NAMESPACE} did not come back"


def _read_cap_vs(bdf):
    fd = os.open(f"/sys/bus/pci/devices/{bdf}/resource0", os.O_RDWR | os.O_SYNC)
    try:
        bar = Mmio.map_fd(fd, 0x1000, 0, "sysfs resource0")
    finally:
        os.close(fd)
    try:
        return bar.r64(0x0), bar.r32(0x8)
    finally:
        bar.close()


def kernel_identity(bdf=BDF):
    """Model and serial number as the kernel nvme driver read them from Identify Controller."""
    pci = PciDevice(bdf)
    ctrl = next(iter(pci.sysfs.listdir(f"bus/pci/devices/{bdf}/nvme")), None)
    assert ctrl is not None, f"{bdf} has no kernel NVMe controller"
    base = f"bus/pci/devices/{bdf}/nvme/{ctrl}"
    return {"model": pci.sysfs.read(f"{base}/model"), "serial": pci.sysfs.read(f"{base}/serial")}


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class MiniNvme:
    """Just enough of an NVMe host to prove that the controller DMAs where we say: admin queues
    in one DMA buffer, Identify, shutdown. Register offsets: NVMe Base Specification 2.0,
    section 3.1.4 (CAP 0x00, CC 0x14, CSTS 0x1C, AQA 0x24, ASQ 0x28, ACQ 0x30, doorbells from
    0x1000). The real driver is nvme/; this is a test's probe."""
    DEPTH = 8

    def __init__(self, bar, queues):
        self.bar, self.queues = bar, queues
        cap = bar.r64(0)
        self.timeout = max((cap >> 24 & 0xFF) * 0.5, 2.0)          # CAP.TO, in 500 ms units
        self.stride = 4 << (cap >> 32 & 0xF)
        self.sq_iova, n = queues.translate(0, 4096)
        self.cq_iova, m = queues.translate(4096, 4096)
        assert n == m == 4096
        self.tail = self.head = self.cid = 0
        self.phase = 1

    def _wait(self, cond, what):
        deadline = time.monotonic() + self.timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what} (CSTS=0x{self.bar.r32(0x1C):x})")
            time.sleep(0.0005)

    def _w64(self, off, value):                # two dwords, low first: allowed by the spec
        self.bar.w32(off, value & 0xFFFFFFFF)
        self.bar.w32(off + 4, value >> 32)

    def enable(self):
        if self.bar.r32(0x14) & 1:
            self.bar.w32(0x14, 0)
        self._wait(lambda: not self.bar.r32(0x1C) & 1, "CSTS.RDY=0")
        self.queues.zero()
        self.tail = self.head = 0
        self.phase = 1
        self.bar.w32(0x24, (self.DEPTH - 1) << 16 | (self.DEPTH - 1))
        self._w64(0x28, self.sq_iova)
        self._w64(0x30, self.cq_iova)
        self.bar.w32(0x14, 1 | 6 << 16 | 4 << 20)    # EN, NVM command set, 4 KiB pages, SQE 64 B, CQE 16 B
        self._wait(lambda: self.bar.r32(0x1C) & 3, "CSTS.RDY=1")
        assert not self.bar.r32(0x1C) & 2, "controller fatal status"

    def identify(self, cns, buf, nsid=0):
        """Identify (opcode 0x06) with PRP1 = the IOVA of `buf`; returns the 4 KiB it wrote."""
        prp1, n = buf.translate(0, 4096)
        assert n == 4096
        with memoryview(buf) as v:
            v[:4096] = b"\xa5" * 4096                 # proof the controller overwrote it
        self.cid = (self.cid + 1) & 0xFFFF
        sqe = struct.pack("<IIQQQQIIIIII", 0x06 | self.cid << 16, nsid, 0, 0, prp1, 0, cns,
                          0, 0, 0, 0, 0)
        with memoryview(self.queues) as q:
            q[64 * self.tail:64 * (self.tail + 1)] = sqe
            self.tail = (self.tail + 1) % self.DEPTH
            self.bar.w32(0x1000, self.tail)                              # SQ 0 tail doorbell
            off = 4096 + 16 * self.head
            self._wait(lambda: struct.unpack_from("<I", q, off + 12)[0] >> 16 & 1 == self.phase,
                       "the Identify completion")
            dw3 = struct.unpack_from("<I", q, off + 12)[0]
        self.head = (self.head + 1) % self.DEPTH
        if self.head == 0:
            self.phase ^= 1
        self.bar.w32(0x1000 + self.stride, self.head)                   # CQ 0 head doorbell
        assert dw3 & 0xFFFF == self.cid and dw3 >> 17 == 0, f"Identify failed: dw3=0x{dw3:08x}"
        with memoryview(buf) as v:
            return bytes(v[:4096])

    def shutdown(self):
        self.bar.w32(0x14, (self.bar.r32(0x14) & ~(3 << 14)) | 1 << 14)    # CC.SHN = normal
        self._wait(lambda: self.bar.r32(0x1C) >> 2 & 3 == 2, "CSTS.SHST=complete")
        self.bar.w32(0x14, 0)
        self._wait(lambda: not self.bar.r32(0x1C) & 1, "CSTS.RDY=0")


def identify_controller(data):
    vid, ssvid = struct.unpack_from("<HH", data, 0)
    return {"vid": vid, "ssvid": ssvid, "serial": data[4:24].decode().strip(),
            "model": data[24:64].decode().strip(), "nn": struct.unpack_from("<I", data, 516)[0]}


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def before():
    """What the kernel shows before we take the device (CAP and VS through sysfs)."""
    pci = PciDevice(BDF)
    facts = {"driver": pci.driver, "group": pci.iommu_group,
             "namespace": os.path.exists(NAMESPACE), "identity": kernel_identity()}
    facts["cap"], facts["vs"] = registers_through_sysfs()
    facts["driver_after_read"] = pci.driver
    return facts


@pytest.fixture(scope="module")
def early_buffer(before):
    """A DMA buffer allocated before the attach: the container must map it when it attaches."""
    buf = allocate(8192, backend="anonymous")
    yield buf
    buf.free()


@pytest.fixture(scope="module")
def device(before, early_buffer):
    dev = attach_pci(BDF, driver="vfio")
    yield dev
    dev.detach()


# ---- tests (in order: the last one gives the device back) ---------------------------------------
def test_the_nvme_function_is_found_on_the_kernel_driver(before):
    found = {str(d.address): d for d in probe_pci()}
    assert BDF in found and found[BDF].is_nvme
    assert before["driver"] == before["driver_after_read"] == "nvme" and before["namespace"]
    assert before["group"] is not None          # the IOMMU is on: vfio with type1


def test_attach_unbinds_nvme_and_binds_vfio_pci(device):
    assert device.kind == "vfio"
    assert device.pci.driver == "vfio-pci" and device.pci.driver_override == "vfio-pci"
    assert not os.path.exists(NAMESPACE)         # the kernel driver let go
    container = device.backend.container
    assert container.iommu_type == 3            # VFIO_TYPE1v2_IOMMU
    assert os.path.exists(f"/dev/vfio/{device.pci.iommu_group}")


def test_bar0_reads_cap_and_vs_as_sysfs_and_qemu_say(device, before):
    bar = device.map_bar(0)
    assert device.map_bar(0) is bar
    cap, vs = bar.r64(0x0), bar.r32(0x8)
    assert (cap, vs) == (before["cap"], before["vs"])
    assert vs == QEMU_VS and cap_fields(cap) == QEMU_CAP


def test_bus_mastering_is_on_and_config_space_reads_the_ids(device):
    cmd = device.config_read(0x04, 2)
    assert cmd & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) == PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    assert device.config_read(0x00, 2) == device.pci.vendor_id == 0x1B36
    assert device.config_read(0x02, 2) == device.pci.device_id == 0x0010
    assert device.config_read(0x08, 4) >> 8 == device.pci.class_code == 0x010802   # above revision


@pytest.mark.parametrize("backend", ["hugepage-2M", "anonymous"])
def test_dma_buffers_are_iommu_mapped_at_their_virtual_address(device, early_buffer, backend):
    container = device.backend.container
    info = container.iommu_info
    assert info.aperture_bits == 48 and info.min_page_size == 4096
    assert all(not (a <= 0xFEE00000 <= b) for a, b in info.iova_ranges)    # MSI window reserved
    with allocate(3 * 4096, backend=backend) as buf:
        assert buf.backend == backend
        for b in (buf, early_buffer):
            iova, n = vtophys_map().translate(b.vaddr, b.size)
            assert iova == b.iova == b.vaddr and n == b.size        # IOVA = VA: it fits
            assert any(a <= iova and iova + b.size - 1 <= e for a, e in info.iova_ranges)
            region = vtophys_map().region_of(b.vaddr)
            assert container.mappings[region.iovas[0]] == (region.vaddr, region.size)
    assert vtophys_map().mapper is container


def test_the_controller_dmas_into_both_kinds_of_buffer(device, early_buffer, before):
    bar = device.map_bar(0)
    with allocate(8192, backend="hugepage-2M") as queues, \
            allocate(4096, backend="hugepage-2M") as huge, allocate(4096, backend="anonymous") as anon:
        nvme = MiniNvme(bar, queues)
        nvme.enable()
        ctrl = identify_controller(nvme.identify(1, huge))
        assert ctrl["model"] == before["identity"]["model"] == "QEMU NVMe Ctrl"
        assert ctrl["serial"] == before["identity"]["serial"]       # what the kernel read
        assert ctrl["vid"] == 0x1B36 and ctrl["nn"] >= 1
        assert identify_controller(nvme.identify(1, anon)) == ctrl
        assert identify_controller(nvme.identify(1, early_buffer)) == ctrl
        ns = nvme.identify(0, anon, nsid=1)
        assert struct.unpack_from("<Q", ns, 0)[0] > 0            # NSZE
        nvme.shutdown()


def test_reset_resets_the_controller_and_keeps_bus_mastering(device):
    bar = device.map_bar(0)
    with allocate(8192, backend="hugepage-2M") as queues:
        MiniNvme(bar, queues).enable()
        assert bar.r32(0x14) & 1
        device.reset()
        assert bar.r32(0x14) & 1 == 0                          # CC.EN cleared by the reset
    assert device.config_read(0x04, 2) & PCI_COMMAND_MASTER


def test_a_second_container_cannot_take_the_group(device):
    from env.vfio import VfioContainer, VfioDevice
    other = VfioContainer()
    with pytest.raises(VfioError, match=r"0000:00:10.0: open group /dev/vfio/\d+ failed: Device or "
                                        r"resource busy: the IOMMU group is already open") as info:
        VfioDevice(BDF, other)
    assert other.closed and info.value.device == BDF


def test_detach_gives_the_device_back_to_nvme(device, early_buffer):
    container = device.backend.container
    assert device.detach() == "nvme"
    assert container.closed and vtophys_map().mapper is None
    assert early_buffer.iova == early_buffer.vaddr                # still translatable (VA mode)
    assert wait_for(lambda: os.path.exists(NAMESPACE)), f"{NAMESPACE} did not come back"
    assert PciDevice(BDF).driver_override is None


def test_a_second_attach_in_the_same_process_works(before):
    with attach_pci(BDF) as dev:                # auto: the IOMMU is there, so vfio
        assert dev.kind == "vfio"
        assert dev.map_bar(0).r64(0) == before["cap"]
    assert wait_for(lambda: os.path.exists(NAMESPACE))
