"""PCI functions as the kernel shows them in sysfs, and moving them between drivers.

`PciAddress` is a domain:bus:device.function address. `PciDevice` reads one function's ids, class,
driver, IOMMU group and NUMA node from sysfs and moves it between drivers the way SPDK's setup
script does: unbind from the current driver, write the wanted driver to `driver_override`, ask the
kernel to probe (`drivers_probe`), then check that the bind took effect. `restore()` clears the
override and lets the kernel give the device back to its own driver (e.g. `nvme`).

Every sysfs access goes through a `Sysfs` object rooted at a directory (default `/sys`). It is the
one seam to the kernel: the unit tests replace it with a fake tree whose writes act like the kernel.
"""
import dataclasses
import logging
import os
import re
import subprocess
import time

from env.errors import InvalidArgument, PciError, PciPermissionError

log = logging.getLogger("userblk.env.pci")

NVME_CLASS = 0x010802          # mass storage / non-volatile memory / NVMe (PCI code and ID spec)
# Drivers that hand a device to user space: a device bound to one may be in use by a process.
USERSPACE_DRIVERS = frozenset({"vfio-pci", "uio_pci_generic", "igb_uio"})
# The module that registers each PCI driver, where the names differ.
_DRIVER_MODULES = {"vfio-pci": "vfio-pci", "uio_pci_generic": "uio_pci_generic"}
_POLL_INTERVAL = 0.005

# Configuration space (include/uapi/linux/pci_regs.h)
PCI_VENDOR_ID = 0x00
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2       # respond to memory-space accesses (the BARs)
PCI_COMMAND_MASTER = 0x4       # bus master: the device may issue DMA
IORESOURCE_IO = 0x100          # include/linux/ioport.h: flags in sysfs `resource`
IORESOURCE_MEM = 0x200


# ---- addresses --------------------------------------------------------------------------------
_BDF = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


@dataclasses.dataclass(frozen=True, order=True)
class PciAddress:
    """A PCI function address; `str()` gives the sysfs form `0000:00:10.0`."""
    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self):
        for name, top in (("domain", 0xFFFF), ("bus", 0xFF), ("device", 0x1F), ("function", 7)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise InvalidArgument(f"PCI {name} must be an int in 0..0x{top:x}, not {value!r}")

    @classmethod
    def parse(cls, text):
        """`0000:00:10.0` or `00:10.0` (domain 0); a PciAddress is returned as it is."""
        if isinstance(text, cls):
            return text
        if not isinstance(text, str):
            raise InvalidArgument(f"a PCI address is a string like 0000:00:10.0, not {text!r}")
        m = _BDF.match(text.strip())
        if m is None:
            raise InvalidArgument(f"{text!r} is not a PCI address (expected DDDD:BB:DD.F, e.g. "
                                  "0000:00:10.0, or BB:DD.F)")
        domain, bus, dev, fn = m.groups()
        try:
            return cls(int(domain or "0", 16), int(bus, 16), int(dev, 16), int(fn, 16))
        except InvalidArgument as e:
            raise InvalidArgument(f"{text!r} is not a PCI address: {e}") from None

    def __str__(self):
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function:x}"


def parse_trid(text):
    """The PciAddress of an SPDK transport ID such as `trtype:PCIe traddr:0000:00:04.0`
    (whitespace-separated key:value pairs, keys and trtype case-insensitive)."""
    if not isinstance(text, str):
        raise InvalidArgument(f"a transport ID is a string, not {text!r}")
    fields = {}
    for token in text.split():
        key, sep, value = token.partition(":")
        if not sep or not key or not value:
            raise InvalidArgument(f"transport ID {text!r}: {token!r} is not key:value")
        fields[key.lower()] = value
    trtype = fields.get("trtype")
    if trtype is None or trtype.lower() != "pcie":
        raise InvalidArgument(f"transport ID {text!r}: only trtype:PCIe names a local PCI "
                              "device")
    if "traddr" not in fields:
        raise InvalidArgument(f"transport ID {text!r} has no traddr")
    return PciAddress.parse(fields["traddr"])


# ---- sysfs access -----------------------------------------------------------------------------
class Sysfs:
    """Reads and writes under a sysfs root. Paths are relative to the root."""

    def __init__(self, root="/sys"):
        self.root = os.fspath(root)

    def path(self, rel):
        return os.path.join(self.root, rel)

    def exists(self, rel):
        return os.path.exists(self.path(rel))

    def read(self, rel):
        with open(self.path(rel)) as f:
            return f.read().strip()

    def write(self, rel, text):
        # One write() call: sysfs attributes act on each write, and report errors from it.
        fd = os.open(self.path(rel), os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def link_name(self, rel):
        """The last component of the symlink `rel` points to, or None when there is no link."""
        try:
            return os.path.basename(os.readlink(self.path(rel)))
        except OSError:             # no such link (no driver, no IOMMU group)
            return None

    def listdir(self, rel):
        try:
            return sorted(os.listdir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def modprobe(self, module, timeout=30.0):
        """Load a kernel module. Returns (ok, message)."""
        try:
            res = subprocess.run(["modprobe", module], capture_output=True, text=True,
                                 timeout=timeout)
        except FileNotFoundError:
            return False, "modprobe is not installed (package kmod)"
        except subprocess.TimeoutExpired:
            return False, f"modprobe {module} did not finish in {timeout:.0f} s"
        return res.returncode == 0, (res.stderr or res.stdout).strip()


def _sysfs(root):
    return root if isinstance(root, Sysfs) else Sysfs(root)


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)


def load_driver(driver, root="/sys", timeout=5.0):
    """Make sure the PCI driver `driver` is registered, loading its module if needed: minimal
    systems (and the test guest) have no udev to do it (testbed pitfall 5). Returns True when a
    module was loaded."""
    sysfs = _sysfs(root)
    if sysfs.exists(f"bus/pci/drivers/{driver}"):
        return False
    module = _DRIVER_MODULES.get(driver, driver)
    ok, message = sysfs.modprobe(module)
    if not ok:
        hint = " (run as root)" if os.geteuid() != 0 else ""
        raise PciError(f"PCI driver {driver} is not loaded and `modprobe {module}` failed"
                       f"{hint}: {message or 'no message'}")
    if not _wait(lambda: sysfs.exists(f"bus/pci/drivers/{driver}"), timeout):
        raise PciError(f"`modprobe {module}` succeeded but no PCI driver {driver} appeared in "
                       f"{sysfs.path('bus/pci/drivers')}")
    log.info("loaded kernel module %s", module)
    return True


# ---- devices ----------------------------------------------------------------------------------
class PciDevice:
    """One PCI function in sysfs. Attributes are read from sysfs on each access."""

    def __init__(self, address, root="/sys"):
        self.address = PciAddress.parse(address)
        self.sysfs = _sysfs(root)
        self._dir = f"bus/pci/devices/{self.address}"
        if not self.sysfs.exists(self._dir):
            raise PciError(f"no PCI device {self.address} in {self.sysfs.path('bus/pci/devices')} "
                           "(list them with `lspci -D` or env.device.probe_pci())",
                           address=self.address)
        driver = self.driver
        # The kernel driver to give the device back to; None when it had none, or when a
        # user-space driver already had it (then the kernel picks one on restore()).
        self.original_driver = None if driver in USERSPACE_DRIVERS else driver

    # ---- identity ----------------------------------------------------------------------------
    def _attr(self, name):
        try:
            return self.sysfs.read(f"{self._dir}/{name}")
        except FileNotFoundError:
            raise PciError(f"{self.address}: sysfs has no attribute {name} (was the device "
                           "removed?)", address=self.address) from None

    def _hex(self, name):
        text = self._attr(name)
        try:
            return int(text, 16)
        except ValueError:
            raise PciError(f"{self.address}: {name} reads {text!r}, not a hex number",
                           address=self.address) from None

    @property
    def vendor_id(self):
        return self._hex("vendor")

    @property
    def device_id(self):
        return self._hex("device")

    @property
    def subsystem_vendor_id(self):
        return self._hex("subsystem_vendor")

    @property
    def subsystem_device_id(self):
        return self._hex("subsystem_device")

    @property
    def class_code(self):
        """The 24-bit class code: base class, subclass, programming interface."""
        return self._hex("class")

    @property
    def is_nvme(self):
        return self.class_code == NVME_CLASS

    @property
    def numa_node(self):
        """The NUMA node of the device, or None when unknown (sysfs says -1)."""
        try:
            node = int(self.sysfs.read(f"{self._dir}/numa_node"))
        except (FileNotFoundError, ValueError):
            return None
        return node if node >= 0 else None

    @property
    def driver(self):
        """The name of the bound driver, or None."""
        return self.sysfs.link_name(f"{self._dir}/driver")

    @property
    def driver_override(self):
        try:
            text = self.sysfs.read(f"{self._dir}/driver_override")
        except FileNotFoundError:
            return None
        return None if text in ("", "(null)") else text

    @property
    def iommu_group(self):
        """The IOMMU group number, or None when the device has none (no IOMMU)."""
        name = self.sysfs.link_name(f"{self._dir}/iommu_group")
        return int(name) if name is not None and name.isdigit() else None

    def iommu_group_members(self):
        """Every PciDevice in this device's IOMMU group (itself included); [] without a group."""
        group = self.iommu_group
        return [] if group is None else iommu_group_members(group, self.sysfs)

    def resource(self, index):
        """(start, size, flags) of BAR `index` from sysfs `resource` (size 0: not implemented)."""
        lines = self._attr("resource").splitlines()
        if not 0 <= index < min(len(lines), 6):
            raise InvalidArgument(f"{self.address}: no BAR {index} (0..5)")
        start, end, flags = (int(x, 16) for x in lines[index].split())
        return start, (end - start + 1) if end else 0, flags

    def attr_path(self, name):
        """The absolute path of a sysfs attribute of the device (resource0, config, ...)."""
        return self.sysfs.path(f"{self._dir}/{name}")

    def block_devices(self):
        """The kernel NVMe namespaces of this function (nvme0n1 ...), while `nvme` has it."""
        out = []
        for ctrl in self.sysfs.listdir(f"{self._dir}/nvme"):
            out += [n for n in self.sysfs.listdir(f"{self._dir}/nvme/{ctrl}")
                    if re.fullmatch(r"nvme\d+(c\d+)?n\d+", n)]
        return out

    def active_users(self, mounts="/proc/mounts", swaps="/proc/swaps"):
        """What would break if the kernel driver let go: mounted or swapped-on namespaces and
        namespaces held by another block device (LVM, md). A list of sentences, [] when idle."""
        names = self.block_devices()
        if not names:
            return []
        users = []
        pattern = re.compile(r"/dev/(%s)(p\d+)?$" % "|".join(map(re.escape, names)))
        for path, what in ((mounts, "mounted at"), (swaps, "used as swap")):
            try:
                with open(path) as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields and pattern.match(fields[0]):
                    where = f" {fields[1]}" if what == "mounted at" and len(fields) > 1 else ""
                    users.append(f"{fields[0]} {what}{where}")
        for name in names:
            holders = self.sysfs.listdir(f"block/{name}/holders")
            if holders:
                users.append(f"/dev/{name} is held by {', '.join(holders)}")
        return users

    # ---- driver binding ----------------------------------------------------------------------
    def _write(self, rel, text, what):
        try:
            self.sysfs.write(rel, text)
        except PermissionError as e:
            raise PciPermissionError(
                f"{what} {self.address} needs root: writing {self.sysfs.path(rel)} was refused "
                f"({e.strerror}); run as root", address=self.address) from None
        except OSError as e:
            raise PciError(f"{what} {self.address} failed: writing {text.strip()!r} to "
                           f"{self.sysfs.path(rel)}: {e.strerror or e}",
                           address=self.address) from None

    def unbind(self, timeout=5.0):
        """Detach the device from its driver. Returns the driver it had (None if none)."""
        current = self.driver
        if current is None:
            return None
        self._write(f"bus/pci/drivers/{current}/unbind", str(self.address),
                    f"unbinding {current} from")
        if not _wait(lambda: self.driver is None, timeout):
            raise PciError(f"unbinding {self.address} from {current} did not take effect within "
                           f"{timeout:g} s (driver is now {self.driver})", address=self.address)
        log.info("%s: unbound from %s", self.address, current)
        return current

    def bind(self, driver, timeout=5.0, force=False):
        """Bind the device to `driver` (e.g. vfio-pci) through driver_override + drivers_probe.
        A device bound to another user-space driver is refused unless `force`: a process may be
        using it."""
        if not isinstance(driver, str) or not re.fullmatch(r"[\w.-]+", driver):
            raise InvalidArgument(f"{driver!r} is not a driver name")
        current = self.driver
        if current == driver:
            return
        if not self.sysfs.exists(f"bus/pci/drivers/{driver}"):
            module = _DRIVER_MODULES.get(driver, driver)
            raise PciError(f"cannot bind {self.address} to {driver}: no such driver is loaded "
                           f"(modprobe {module})", address=self.address)
        if current in USERSPACE_DRIVERS and not force:
            raise PciError(f"{self.address} is bound to {current}, another user-space driver: a "
                           "process may be using it. Give it back first (`userblk setup reset`) "
                           "or pass force=True", address=self.address)
        self.unbind(timeout)
        try:
            self._write(f"{self._dir}/driver_override", driver, "setting driver_override of")
            self._write("bus/pci/drivers_probe", str(self.address), f"binding {driver} to")
            if not _wait(lambda: self.driver == driver, timeout):
                now = self.driver
                hint = ""
                if driver == "vfio-pci" and self.iommu_group is None:
                    hint = (": the device has no IOMMU group (enable the IOMMU, e.g. "
                            "intel_iommu=on, or vfio no-IOMMU mode), or use uio_pci_generic")
                raise PciError(f"binding {self.address} to {driver} did not take effect (driver "
                               f"is now {now or 'none'}); the driver's probe failed, see "
                               f"dmesg{hint}", address=self.address)
        except BaseException:
            if current is not None:      # do not leave the device without its driver
                try:
                    self.restore(timeout)
                except PciError as e:
                    log.warning("%s: could not give the device back to %s: %s", self.address,
                                current, e)
            raise
        log.info("%s: bound to %s (was %s)", self.address, driver, current or "unbound")

    def restore(self, timeout=5.0):
        """Give the device back to the kernel: clear driver_override, unbind the user-space
        driver and let the kernel probe, which picks the device's own driver (e.g. nvme).
        Waits for `original_driver` when known. Returns the driver bound afterwards (a driver
        that probes asynchronously may show up a moment later when none was known)."""
        self._write(f"{self._dir}/driver_override", "\n", "clearing driver_override of")
        current = self.driver
        if current is not None and current != self.original_driver:
            self.unbind(timeout)
        if self.driver is None:
            try:
                self._write("bus/pci/drivers_probe", str(self.address), "probing a driver for")
            except PciPermissionError:
                raise
            except PciError:
                pass    # no driver matched; an error below only if one was expected
        want = self.original_driver
        if want is not None and not _wait(lambda: self.driver == want, timeout):
            raise PciError(f"giving {self.address} back to {want} did not take effect "
                           f"(driver is now {self.driver or 'none'}); see dmesg",
                           address=self.address)
        log.info("%s: restored to %s", self.address, self.driver or "no driver")
        return self.driver

    def __repr__(self):
        try:
            ids = f"{self.vendor_id:04x}:{self.device_id:04x} class {self.class_code:06x}"
        except PciError:
            ids = "gone"
        return f"<PciDevice {self.address} {ids} driver={self.driver}>"


class ConfigSpace:
    """Typed, checked access to a function's PCI configuration space, shared by the vfio and
    uio paths. A subclass provides `_config_size()`, `_config_pread(offset, size) -> bytes`,
    `_config_pwrite(offset, data) -> int` and `_config_error(message, step)`."""

    def _config_check(self, offset, size):
        if size not in (1, 2, 4):
            raise InvalidArgument(f"config space access size must be 1, 2 or 4, not {size!r}")
        limit = self._config_size()
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 \
                or offset % size or offset + size > limit:
            raise InvalidArgument(f"{self.address}: config space offset {offset!r} is outside "
                                  f"0..0x{limit:x} or not {size}-byte aligned")

    def config_read(self, offset, size):
        """The `size`-byte (1, 2, 4) little-endian value at `offset` of configuration space."""
        self._config_check(offset, size)
        data = self._config_pread(offset, size)
        if len(data) != size:
            raise self._config_error(f"{self.address}: short config space read at 0x{offset:x}",
                                     "config read")
        return int.from_bytes(data, "little")

    def config_write(self, offset, size, value):
        self._config_check(offset, size)
        if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
            raise InvalidArgument(f"config space value {value!r} does not fit in {size} bytes")
        if self._config_pwrite(offset, value.to_bytes(size, "little")) != size:
            raise self._config_error(f"{self.address}: short config space write at "
                                     f"0x{offset:x}", "config write")

    def enable_bus_master(self):
        """Set Memory Space and Bus Master in the COMMAND register. Neither vfio-pci nor
        uio_pci_generic turns bus mastering on, and without it the device's DMA silently never
        happens (testbed pitfall 3). Returns the new COMMAND value."""
        cmd = self.config_read(PCI_COMMAND, 2)
        want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if want != cmd:
            self.config_write(PCI_COMMAND, 2, want)
            cmd = self.config_read(PCI_COMMAND, 2)
            if cmd & want != want:
                raise self._config_error(f"{self.address}: bus master enable did not stick "
                                         f"(COMMAND 0x{cmd:04x})", "enable bus master")
        return cmd


def iommu_group_members(group, root="/sys"):
    """Every PciDevice in IOMMU group `group`, sorted by address."""
    sysfs = _sysfs(root)
    out = []
    for name in sysfs.listdir(f"kernel/iommu_groups/{group}/devices"):
        try:
            out.append(PciDevice(name, sysfs))
        except (InvalidArgument, PciError):
            continue      # not a PCI function, or gone meanwhile
    return out


def enumerate_devices(root="/sys", class_code=None):
    """Every PCI function (of the 24-bit `class_code`, if given), sorted by address."""
    sysfs = _sysfs(root)
    out = []
    for name in sysfs.listdir("bus/pci/devices"):
        try:
            dev = PciDevice(name, sysfs)
            if class_code is None or dev.class_code == class_code:
                out.append(dev)
        except (InvalidArgument, PciError):
            continue
    return sorted(out, key=lambda d: d.address)


def nvme_devices(root="/sys"):
    """Every NVMe function (class 0x010802)."""
    return enumerate_devices(root, NVME_CLASS)


__all__ = ["NVME_CLASS", "USERSPACE_DRIVERS", "ConfigSpace", "PciAddress", "PciDevice", "Sysfs",
           "enumerate_devices", "iommu_group_members", "load_driver", "nvme_devices",
           "parse_trid"]
