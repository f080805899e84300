"""env.pci against a fake sysfs tree whose writes act like the kernel's PCI core.

`FakeSysfs` builds the real layout in a temporary directory (devices/pci0000:00/<bdf> with its
attributes, bus/pci/devices symlinks, bus/pci/drivers/<name>/{bind,unbind}, drivers_probe,
kernel/iommu_groups) and, after each write, does what the kernel would: unbind removes the driver
link, driver_override is stored, drivers_probe binds the override driver (or a driver whose id
table matches). Drivers can refuse to probe, or bind asynchronously like nvme does. Other test
modules (vfio, uio, device) import it from here.
"""
import errno
import os
import threading

import pytest

from env.errors import InvalidArgument, PciError, PciPermissionError, PermissionRequired
from env.pci import (NVME_CLASS, PciAddress, PciDevice, Sysfs, enumerate_devices,
                     iommu_group_members, load_driver, nvme_devices, parse_trid)

QEMU_NVME = dict(vendor=0x1B36, device=0x0010, class_code=NVME_CLASS,
                 subsystem_vendor=0x1AF4, subsystem_device=0x1100)
_CONFIG_SIZE = 256
_BAR0_SIZE = 0x4000


class FakeDriver:
    def __init__(self, name, classes=(), probe_fails=False, async_delay=0.0, module=None):
        self.name = name
        self.classes = set(classes)        # class codes this driver's id table matches
        self.probe_fails = probe_fails     # probe returns an error: the device stays unbound
        self.async_delay = async_delay     # >0: the bind shows up that much later (nvme is async)
        self.module = module or name


class FakeSysfs(Sysfs):
    """A sysfs tree in a directory, with the kernel's reaction to writes simulated."""

    def __init__(self, root):
        super().__init__(root)
        self.drivers = {}
        self.writes = []               # (relative path, text) of every write, in order
        self.deny_writes = False       # act like a non-root process
        self.loadable = {}             # module name -> FakeDriver that `modprobe` registers
        self.modprobes = []
        self._timers = []
        for d in ("devices/pci0000:00", "bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups",
                  "block"):
            os.makedirs(self.path(d), exist_ok=True)
        open(self.path("bus/pci/drivers_probe"), "w").close()

    # ---- building the tree -------------------------------------------------------------------
    def add_driver(self, name, **kw):
        drv = FakeDriver(name, **kw)
        self.drivers[name] = drv
        d = self.path(f"bus/pci/drivers/{name}")
        os.makedirs(d, exist_ok=True)
        for f in ("bind", "unbind", "new_id", "remove_id"):
            open(os.path.join(d, f), "w").close()
        return drv

    def add_device(self, bdf, vendor=0x8086, device=0x1234, class_code=0x020000, driver=None,
                   iommu_group=None, numa_node=-1, subsystem_vendor=0, subsystem_device=0,
                   command=0x0103):
        d = self.path(f"devices/pci0000:00/{bdf}")
        os.makedirs(d)
        attrs = {"vendor": f"0x{vendor:04x}", "device": f"0x{device:04x}",
                 "subsystem_vendor": f"0x{subsystem_vendor:04x}",
                 "subsystem_device": f"0x{subsystem_device:04x}",
                 "class": f"0x{class_code:06x}", "revision": "0x02", "numa_node": str(numa_node),
                 "driver_override": "(null)", "enable": "1",
                 "resource": "0x00000000febf0000 0x00000000febf3fff 0x0000000000140204\n"
                             + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 12}
        for name, value in attrs.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(value + "\n")
        # config space: ids and COMMAND at their PCI offsets; BAR0 as a file that can be mmapped
        config = bytearray(_CONFIG_SIZE)
        config[0:4] = vendor.to_bytes(2, "little") + device.to_bytes(2, "little")
        config[4:6] = command.to_bytes(2, "little")
        config[9:12] = class_code.to_bytes(3, "little")
        with open(os.path.join(d, "config"), "wb") as f:
            f.write(config)
        with open(os.path.join(d, "resource0"), "wb") as f:
            f.write(bytes(_BAR0_SIZE))
        os.symlink(f"../../../devices/pci0000:00/{bdf}", self.path(f"bus/pci/devices/{bdf}"))
        if iommu_group is not None:
            g = self.path(f"kernel/iommu_groups/{iommu_group}/devices")
            os.makedirs(g, exist_ok=True)
            os.symlink(f"../../../../devices/pci0000:00/{bdf}", os.path.join(g, bdf))
            os.symlink(f"../../../kernel/iommu_groups/{iommu_group}", os.path.join(d, "iommu_group"))
        if driver is not None:
            self._link(bdf, driver)
        return PciDevice(bdf, self)

    def add_namespace(self, bdf, ctrl="nvme0", ns="nvme0n1", holders=()):
        os.makedirs(self.path(f"devices/pci0000:00/{bdf}/nvme/{ctrl}/{ns}"))
        os.makedirs(self.path(f"block/{ns}/holders"))
        for h in holders:
            os.makedirs(self.path(f"block/{ns}/holders/{h}"))

    def _dev(self, bdf):
        return self.path(f"devices/pci0000:00/{bdf}")

    def driver_of(self, bdf):
        return self.link_name(f"bus/pci/devices/{bdf}/driver")

    def _link(self, bdf, driver):
        # the device's `driver` link last: whoever sees it (driver_of) finds the other one too,
        # also while an asynchronous probe (a timer thread) is half way
        os.symlink(f"../../../../devices/pci0000:00/{bdf}",
                   self.path(f"bus/pci/drivers/{driver}/{bdf}"))
        os.symlink(f"../../../bus/pci/drivers/{driver}", os.path.join(self._dev(bdf), "driver"))

    def _unlink(self, bdf, driver):
        os.unlink(os.path.join(self._dev(bdf), "driver"))
        os.unlink(self.path(f"bus/pci/drivers/{driver}/{bdf}"))

    # ---- the kernel --------------------------------------------------------------------------
    def override_of(self, bdf):
        with open(os.path.join(self._dev(bdf), "driver_override")) as f:
            text = f.read().strip()
        return None if text == "(null)" else text

    def _matches(self, drv, bdf):
        override = self.override_of(bdf)
        if override is not None:         # pci_match_device(): only the override may bind
            return override == drv.name
        with open(os.path.join(self._dev(bdf), "class")) as f:
            return int(f.read(), 16) in drv.classes

    def _probe(self, drv, bdf):
        if drv.probe_fails:
            return False

        def attach():
            if self.driver_of(bdf) is None:
                self._link(bdf, drv.name)
        if drv.async_delay:
            t = threading.Timer(drv.async_delay, attach)
            self._timers.append(t)
            t.start()
        else:
            attach()
        return True

    def write(self, rel, text):
        if self.deny_writes:
            raise PermissionError(errno.EACCES, "Permission denied", self.path(rel))
        super().write(rel, text)
        self.writes.append((rel, text))
        parts = rel.split("/")
        value = text.strip()
        if rel == "bus/pci/drivers_probe":
            if not os.path.isdir(self._dev(value)):
                raise OSError(errno.ENODEV, "No such device")
            if self.driver_of(value) is None:
                for drv in self.drivers.values():
                    if self._matches(drv, value) and self._probe(drv, value):
                        break
        elif parts[:3] == ["bus", "pci", "drivers"] and parts[-1] == "unbind":
            if self.driver_of(value) != parts[3]:
                raise OSError(errno.ENODEV, "No such device")
            self._unlink(value, parts[3])
        elif parts[:3] == ["bus", "pci", "drivers"] and parts[-1] == "bind":
            if self.driver_of(value) is not None:
                raise OSError(errno.EBUSY, "Device or resource busy")
            drv = self.drivers[parts[3]]
            if not self._matches(drv, value) or not self._probe(drv, value):
                raise OSError(errno.ENODEV, "No such device")
        elif parts[-1] == "driver_override":
            with open(self.path(rel), "w") as f:     # the kernel keeps "(null)" for empty
                f.write((value or "(null)") + "\n")

    def modprobe(self, module, timeout=30.0):
        self.modprobes.append(module)
        if module not in self.loadable:
            return False, f"modprobe: FATAL: Module {module} not found in directory /lib/modules"
        name, kw = self.loadable[module]
        self.add_driver(name, **kw)
        return True, ""

    def join(self):
        for t in self._timers:
            t.join()


@pytest.fixture
def sysfs(tmp_path):
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_driver("nvme", classes={NVME_CLASS})
    fake.add_driver("vfio-pci")
    yield fake
    fake.join()


def make_nvme(fake, bdf="0000:00:10.0", group=4, **kw):
    args = dict(QEMU_NVME, driver="nvme", iommu_group=group)
    args.update(kw)
    return fake.add_device(bdf, **args)


# ---- addresses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("0000:00:10.0", PciAddress(0, 0, 0x10, 0)),
    ("00:10.0", PciAddress(0, 0, 0x10, 0)),
    ("0001:3B:1f.7", PciAddress(1, 0x3B, 0x1F, 7)),
    (" ffff:ff:1f.7\n", PciAddress(0xFFFF, 0xFF, 0x1F, 7)),
])
def test_address_parses_long_and_short_forms(text, expected):
    assert PciAddress.parse(text) == expected


def test_address_formats_as_sysfs_names_it():
    assert str(PciAddress.parse("00:04.0")) == "0000:00:04.0"
    assert str(PciAddress(0x12, 0xAB, 3, 1)) == "0012:ab:03.1"
    addr = PciAddress.parse("0000:00:10.0")
    assert PciAddress.parse(addr) is addr


def test_addresses_sort_and_hash_by_value():
    a, b = PciAddress.parse("0000:00:11.0"), PciAddress.parse("0000:00:10.0")
    assert sorted([a, b]) == [b, a]
    assert len({b, PciAddress.parse("00:10.0")}) == 1


@pytest.mark.parametrize("bad", ["", "0000:00:20.0", "00:10.8", "10.0", "0:0:0:10.0", "zz:10.0",
                                 "00000:00:10.0", "0000:000:10.0", 16, None, b"00:10.0"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(InvalidArgument):
        PciAddress.parse(bad)


def test_out_of_range_fields_are_refused_when_built_directly():
    with pytest.raises(InvalidArgument, match="device"):
        PciAddress(0, 0, 0x20, 0)
    with pytest.raises(InvalidArgument, match="function"):
        PciAddress(0, 0, 0, True)


@pytest.mark.parametrize("trid", ["trtype:PCIe traddr:0000:00:04.0", "traddr:00:04.0 trtype:pcie",
                                  "  TRTYPE:PCIE   TRADDR:0000:00:04.0  "])
def test_transport_ids_name_a_pci_address(trid):
    assert parse_trid(trid) == PciAddress(0, 0, 4, 0)


@pytest.mark.parametrize("trid,why", [("trtype:RDMA traddr:10.0.0.1", "PCIe"),
                                      ("trtype:PCIe", "traddr"),
                                      ("traddr:0000:00:04.0", "PCIe"),
                                      ("trtype:PCIe traddr", "key:value"),
                                      ("trtype:PCIe traddr:0000:00:44.0", "not a PCI address")])
def test_bad_transport_ids_say_why(trid, why):
    with pytest.raises(InvalidArgument, match=why):
        parse_trid(trid)


# ---- reading sysfs ------------------------------------------------------------------------------
def test_device_attributes_come_from_sysfs(sysfs):
    dev = make_nvme(sysfs, numa_node=1)
    assert (dev.vendor_id, dev.device_id) == (0x1B36, 0x0010)
    assert (dev.subsystem_vendor_id, dev.subsystem_device_id) == (0x1AF4, 0x1100)
    assert dev.class_code == NVME_CLASS and dev.is_nvme
    assert dev.driver == "nvme" and dev.original_driver == "nvme"
    assert dev.driver_override is None
    assert dev.iommu_group == 4
    assert dev.numa_node == 1
    assert dev.resource(0) == (0xFEBF0000, 0x4000, 0x140204)
    assert dev.resource(1)[1] == 0
    assert dev.attr_path("config") == os.path.join(sysfs.root, "bus/pci/devices/0000:00:10.0/config")
    assert "0000:00:10.0 1b36:0010 class 010802 driver=nvme" in repr(dev)


def test_unknown_numa_node_and_no_group_and_no_driver_read_as_none(sysfs):
    dev = sysfs.add_device("0000:00:03.0")
    assert dev.numa_node is None and dev.iommu_group is None and dev.driver is None
    assert not dev.is_nvme and dev.iommu_group_members() == []
    with pytest.raises(InvalidArgument):
        dev.resource(6)


def test_missing_device_names_the_address(sysfs):
    with pytest.raises(PciError, match="no PCI device 0000:00:1f.0") as info:
        PciDevice("00:1f.0", sysfs)
    assert info.value.address == PciAddress(0, 0, 0x1F, 0)


def test_root_can_be_a_plain_directory(sysfs):
    make_nvme(sysfs)
    dev = PciDevice("0000:00:10.0", root=sysfs.root)
    assert dev.driver == "nvme" and type(dev.sysfs) is Sysfs


def test_enumeration_is_sorted_and_filters_by_class(sysfs):
    make_nvme(sysfs, "0000:00:11.0", group=5)
    sysfs.add_device("0000:00:02.0", class_code=0x010601, driver=None)
    make_nvme(sysfs, "0000:00:10.0")
    os.makedirs(sysfs.path("bus/pci/devices/not-a-device"))
    assert [str(d.address) for d in enumerate_devices(sysfs)] == \
        ["0000:00:02.0", "0000:00:10.0", "0000:00:11.0"]
    assert [str(d.address) for d in nvme_devices(sysfs)] == ["0000:00:10.0", "0000:00:11.0"]
    assert enumerate_devices(sysfs, class_code=0x010601)[0].driver is None
    assert enumerate_devices(sysfs, class_code=0x030000) == []


def test_iommu_group_members_list_every_function_of_the_group(sysfs):
    a = sysfs.add_device("0000:00:1f.0", driver=None, iommu_group=7)
    sysfs.add_driver("ahci")
    sysfs.add_device("0000:00:1f.2", class_code=0x010601, driver="ahci", iommu_group=7)
    assert [(str(d.address), d.driver) for d in a.iommu_group_members()] == \
        [("0000:00:1f.0", None), ("0000:00:1f.2", "ahci")]
    assert [str(d.address) for d in iommu_group_members(7, sysfs)] == ["0000:00:1f.0", "0000:00:1f.2"]
    assert iommu_group_members(99, sysfs) == []


# ---- binding ------------------------------------------------------------------------------------
def test_bind_unbinds_sets_override_and_probes(sysfs):
    dev = make_nvme(sysfs)
    dev.bind("vfio-pci")
    assert dev.driver == "vfio-pci" and dev.driver_override == "vfio-pci"
    assert sysfs.writes == [("bus/pci/drivers/nvme/unbind", "0000:00:10.0"),
                            ("bus/pci/devices/0000:00:10.0/driver_override", "vfio-pci"),
                            ("bus/pci/drivers_probe", "0000:00:10.0")]
    assert dev.original_driver == "nvme"
    assert os.path.islink(sysfs.path("bus/pci/drivers/vfio-pci/0000:00:10.0"))


def test_bind_of_an_unbound_device_just_probes(sysfs):
    dev = sysfs.add_device("0000:00:05.0")
    dev.bind("vfio-pci")
    assert dev.driver == "vfio-pci" and dev.original_driver is None
    assert [w[0] for w in sysfs.writes] == ["bus/pci/devices/0000:00:05.0/driver_override",
                                            "bus/pci/drivers_probe"]


def test_bind_to_the_current_driver_writes_nothing(sysfs):
    dev = make_nvme(sysfs)
    dev.bind("nvme")
    assert sysfs.writes == []


def test_bind_to_a_driver_that_is_not_loaded_says_modprobe_and_leaves_the_device(sysfs):
    dev = make_nvme(sysfs)
    with pytest.raises(PciError, match=r"0000:00:10.0.*uio_pci_generic.*modprobe uio_pci_generic"):
        dev.bind("uio_pci_generic")
    assert dev.driver == "nvme" and sysfs.writes == []


def test_device_held_by_another_userspace_driver_is_refused_unless_forced(sysfs):
    sysfs.add_driver("uio_pci_generic")
    dev = make_nvme(sysfs, driver="uio_pci_generic")
    assert dev.original_driver is None       # a user-space driver is not one to go back to
    with pytest.raises(PciError, match="bound to uio_pci_generic, another user-space driver"):
        dev.bind("vfio-pci")
    assert dev.driver == "uio_pci_generic"
    dev.bind("vfio-pci", force=True)
    assert dev.driver == "vfio-pci"


def test_bind_that_does_not_take_effect_is_an_error_naming_the_device(sysfs):
    sysfs.drivers["vfio-pci"].probe_fails = True      # like vfio-pci on a device without IOMMU
    dev = make_nvme(sysfs, group=None)
    with pytest.raises(PciError, match=r"binding 0000:00:10.0 to vfio-pci did not take effect "
                                       r"\(driver is now none\).*no IOMMU group") as info:
        dev.bind("vfio-pci", timeout=0.05)
    assert info.value.address == dev.address
    assert dev.driver == "nvme" and dev.driver_override is None      # given back


def test_bind_waits_for_an_asynchronous_probe(sysfs):
    sysfs.add_driver("slow", async_delay=0.1)
    dev = make_nvme(sysfs)
    dev.bind("slow", timeout=2)
    assert dev.driver == "slow"


def test_bind_gives_up_after_its_timeout(sysfs):
    sysfs.add_driver("slower", async_delay=0.5)
    dev = make_nvme(sysfs)
    with pytest.raises(PciError, match="did not take effect"):
        dev.bind("slower", timeout=0.05)


def test_not_root_is_permission_required_naming_the_device(sysfs):
    dev = make_nvme(sysfs)
    sysfs.deny_writes = True
    with pytest.raises(PciPermissionError, match=r"0000:00:10.0 needs root.*run as root") as info:
        dev.bind("vfio-pci")
    assert isinstance(info.value, PermissionRequired) and isinstance(info.value, PermissionError)
    assert dev.driver == "nvme"


def test_kernel_write_errors_become_pci_errors(sysfs):
    dev = make_nvme(sysfs)
    os.unlink(sysfs.path("bus/pci/drivers/nvme/unbind"))    # the write fails with ENOENT
    with pytest.raises(PciError, match=r"unbinding nvme from 0000:00:10.0 failed"):
        dev.bind("vfio-pci")


def test_invalid_driver_names_are_refused(sysfs):
    dev = make_nvme(sysfs)
    for bad in ("", "../nvme", "vfio pci", None):
        with pytest.raises(InvalidArgument):
            dev.bind(bad)


def test_unbind_returns_the_previous_driver(sysfs):
    dev = make_nvme(sysfs)
    assert dev.unbind() == "nvme" and dev.driver is None
    assert dev.unbind() is None


def test_restore_gives_the_device_back_to_its_kernel_driver(sysfs):
    sysfs.drivers["nvme"].async_delay = 0.05          # nvme probes asynchronously
    dev = make_nvme(sysfs)
    dev.bind("vfio-pci")
    assert dev.restore() == "nvme"
    assert dev.driver == "nvme" and dev.driver_override is None
    assert sysfs.override_of("0000:00:10.0") is None


def test_restore_without_a_known_original_lets_the_kernel_choose(sysfs):
    make_nvme(sysfs, driver="vfio-pci")
    dev = PciDevice("0000:00:10.0", sysfs)           # e.g. `userblk setup reset` after a crash
    assert dev.original_driver is None
    assert dev.restore() == "nvme"


def test_restore_reports_a_kernel_driver_that_does_not_come_back(sysfs):
    dev = make_nvme(sysfs)
    dev.bind("vfio-pci")
    sysfs.drivers["nvme"].probe_fails = True
    with pytest.raises(PciError, match="giving 0000:00:10.0 back to nvme did not take effect"):
        dev.restore(timeout=0.05)
    assert dev.driver is None and dev.driver_override is None


# ---- modules and users ----------------------------------------------------------------------------
def test_load_driver_runs_modprobe_only_when_needed(sysfs):
    assert load_driver("vfio-pci", sysfs) is False and sysfs.modprobes == []
    sysfs.loadable["uio_pci_generic"] = ("uio_pci_generic", {})
    assert load_driver("uio_pci_generic", sysfs) is True
    assert sysfs.modprobes == ["uio_pci_generic"] and sysfs.exists("bus/pci/drivers/uio_pci_generic")


def test_load_driver_failure_says_what_modprobe_said(sysfs):
    with pytest.raises(PciError, match=r"igb_uio is not loaded and `modprobe igb_uio` failed.*"
                                       r"not found"):
        load_driver("igb_uio", sysfs)


def test_load_driver_notices_a_module_that_registers_no_driver(sysfs, monkeypatch):
    monkeypatch.setattr(sysfs, "modprobe", lambda module, timeout=30: (True, ""))
    with pytest.raises(PciError, match="no PCI driver ghost appeared"):
        load_driver("ghost", sysfs, timeout=0.05)


def test_active_users_finds_mounted_swapped_and_held_namespaces(sysfs, tmp_path):
    dev = make_nvme(sysfs)
    assert dev.active_users() == []
    sysfs.add_namespace("0000:00:10.0", "nvme0", "nvme0n1")
    sysfs.add_namespace("0000:00:10.0", "nvme0", "nvme0n2", holders=["dm-0"])
    mounts, swaps = tmp_path / "mounts", tmp_path / "swaps"
    mounts.write_text("/dev/vda1 / ext4 rw 0 0\n/dev/nvme0n1p2 /data xfs rw 0 0\n")
    swaps.write_text("Filename Type Size Used Priority\n/dev/nvme0n10 partition 1 0 -2\n")
    assert dev.block_devices() == ["nvme0n1", "nvme0n2"]
    assert dev.active_users(mounts, swaps) == ["/dev/nvme0n1p2 mounted at /data",
                                               "/dev/nvme0n2 is held by dm-0"]
