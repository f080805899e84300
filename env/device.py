"""Taking a PCI function from the kernel for a user-space driver, and giving it back.

`attach_pci(address)` is the one entry point the NVMe driver uses: it takes the device from its
kernel driver, binds it to vfio-pci (with an IOMMU, or in vfio no-IOMMU mode) or to uio_pci_generic
(when vfio is impossible, or asked for), enables bus mastering and returns an `AttachedDevice`
with the same interface on both paths. `detach()` undoes it all and hands the device back to its
kernel driver (e.g. `nvme`). `probe_pci()` lists the candidate devices with their drivers.
"""
import logging
import threading
import weakref

from env.errors import EnvError, InvalidArgument, PciError
from env.pci import (NVME_CLASS, USERSPACE_DRIVERS, PciAddress, PciDevice, enumerate_devices,
                     load_driver, parse_trid)
from env.uio import UIO_DRIVER, UioDevice, require_hugepages
from env.vfio import VfioDevice, open_container

log = logging.getLogger("userblk.env.device")

NVME = NVME_CLASS
VFIO_DRIVER = "vfio-pci"
_DRIVER_CHOICES = {"auto": "auto", "vfio": "vfio", "vfio-pci": "vfio", "uio": "uio",
                   UIO_DRIVER: "uio"}
_NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"

# The PCI functions this process has attached (sysfs path -> AttachedDevice, weakly), and those
# being attached now: one owner per function in a process. A second attach would open the same
# vfio device (or uio resources) again, and a second driver would reset the device under the first.
_attached = {}
_attaching = set()
_attached_lock = threading.Lock()


def _claim(pci):
    key = pci.attr_path("")
    with _attached_lock:
        ref = _attached.get(key)
        other = ref() if ref is not None else None
        if key in _attaching or (other is not None and not other.detached):
            how = f" through {other.kind}" if other is not None else " (attach under way)"
            raise PciError(f"{pci.address} is already attached in this process{how}: one "
                           "driver per device; detach it first", address=pci.address)
        _attached.pop(key, None)
        _attaching.add(key)
    return key


def _claimed(key, dev):
    with _attached_lock:
        _attaching.discard(key)
        if dev is not None:
            _attached[key] = weakref.ref(dev)


def _unclaim(key, dev):
    with _attached_lock:
        ref = _attached.get(key)
        if ref is not None and ref() in (dev, None):
            del _attached[key]


class AttachedDevice:
    """A PCI function owned by this process through vfio or uio.

    `address` (PciAddress), `pci` (the PciDevice), `kind` ("vfio", "vfio-noiommu" or "uio"),
    `backend` (the VfioDevice or UioDevice). Registers: `map_bar(index)`; configuration space:
    `config_read/config_write`; `enable_bus_master()`, `reset()`; `detach()` gives it back."""

    def __init__(self, pci, backend, kind, restore_to):
        self.pci, self.backend, self.kind = pci, backend, kind
        self.address = pci.address
        self._restore_to = restore_to      # give the device back to the kernel on detach?
        self.detached = False
        self._claim_key = None             # set by attach_pci: released on detach

    def _live(self):
        if self.detached:
            raise EnvError(f"{self.address} was detached")
        return self.backend

    def map_bar(self, index=0):
        return self._live().map_bar(index)

    def config_read(self, offset, size):
        return self._live().config_read(offset, size)

    def config_write(self, offset, size, value):
        self._live().config_write(offset, size, value)

    def enable_bus_master(self):
        return self._live().enable_bus_master()

    def reset(self):
        self._live().reset()

    def detach(self, restore_driver=True):
        """Unmap the BARs, close the device (releasing its DMA mappings when it was the last vfio
        device) and, with `restore_driver`, give it back to the kernel driver it was taken from.
        A device that was already bound to a user-space driver before attach stays bound.
        Idempotent. Returns the driver bound afterwards."""
        if not self.detached:
            self.detached = True
            try:
                self.backend.close()
                if restore_driver and self._restore_to:
                    self.pci.restore()
                    log.info("%s: detached, back to %s", self.address,
                             self.pci.driver or "no driver")
            finally:
                if self._claim_key is not None:
                    _unclaim(self._claim_key, self)
        return self.pci.driver

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    def __repr__(self):
        state = "detached" if self.detached else "attached"
        return f"<AttachedDevice {self.address} {self.kind} {state}>"


def probe_pci(class_code=NVME, root="/sys"):
    """The PCI functions of `class_code` (default NVMe; None for all) as PciDevices, sorted by
    address; each one's `driver` says who has it now."""
    return enumerate_devices(root, class_code)


def vfio_noiommu_enabled(root="/sys"):
    """Whether the vfio module runs in (unsafe) no-IOMMU mode."""
    try:
        with open(f"{root}/{_NOIOMMU_PARAM}") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def _choose(pci, driver):
    """"vfio" or "uio" for `driver` ("auto", "vfio", "uio" and the driver names)."""
    kind = _DRIVER_CHOICES.get(driver)
    if kind is None:
        raise InvalidArgument(f"driver must be one of {', '.join(_DRIVER_CHOICES)}, not {driver!r}")
    current = pci.driver
    if kind == "auto" and current in (VFIO_DRIVER, UIO_DRIVER):
        return "vfio" if current == VFIO_DRIVER else "uio"      # already set up (userblk setup)
    if kind == "auto" and pci.iommu_group is not None:
        return "vfio"
    if kind != "uio" and pci.iommu_group is None:
        try:
            load_driver(VFIO_DRIVER, pci.sysfs)      # the noiommu parameter exists once loaded
        except PciError as e:
            if kind == "vfio":
                raise
            log.info("%s: vfio unavailable (%s)", pci.address, e)
        if vfio_noiommu_enabled(pci.sysfs.root):
            return "vfio"
        if kind == "vfio":
            raise PciError(f"{pci.address} has no IOMMU group: the IOMMU is off (boot with "
                           "intel_iommu=on or amd_iommu=on) and vfio no-IOMMU mode is not enabled; "
                           "use driver='uio' (uio_pci_generic) instead", address=pci.address)
        log.info("%s: no IOMMU and no vfio no-IOMMU mode: using %s", pci.address, UIO_DRIVER)
        return "uio"
    return kind


_CLASS_NAMES = {0x010802: "NVMe", 0x010601: "SATA AHCI", 0x010000: "SCSI", 0x020000: "Ethernet",
                0x030000: "VGA display", 0x060000: "host bridge", 0x060100: "ISA bridge",
                0x060400: "PCI bridge"}


def _class_text(code):
    """`01 08 02 (NVMe)`: base class, subclass, programming interface, and a name if known."""
    name = _CLASS_NAMES.get(code)
    text = f"{code >> 16:02x} {(code >> 8) & 0xFF:02x} {code & 0xFF:02x}"
    return f"{text} ({name})" if name else text


def attach_pci(address, driver="auto", *, root="/sys", vfio_dir="/dev/vfio", memmap=None,
               hugepages="/sys/kernel/mm/hugepages", bus_master=True, force=False,
               class_code=None):
    """Take the PCI function at `address` (a PciAddress, `0000:00:10.0`, `00:10.0` or an SPDK
    transport ID string) for this process and return an AttachedDevice.

    `driver`: "auto" (vfio-pci when the device has an IOMMU group or vfio runs in no-IOMMU mode,
    else uio_pci_generic), "vfio" or "uio". Kernel modules are loaded as needed. A device whose
    kernel driver is in use (a mounted namespace, say) is refused unless `force`. With
    `class_code` (24 bits, e.g. NVME_CLASS) a function of another class is refused before
    anything is unbound or bound. A function this process has attached already (and not detached)
    is refused. On any failure the device goes back to the driver it had."""
    if isinstance(address, str) and "traddr" in address.lower():
        address = parse_trid(address)
    pci = PciDevice(PciAddress.parse(address), root)
    if class_code is not None and pci.class_code != class_code:
        raise PciError(f"{pci.address} has PCI class {_class_text(pci.class_code)}, not "
                       f"{_class_text(class_code)}: refused before anything was unbound or "
                       "bound", address=pci.address)
    key = _claim(pci)
    dev = None
    try:
        dev = _attach(pci, driver, vfio_dir=vfio_dir, memmap=memmap,
                      hugepages=hugepages, bus_master=bus_master, force=force)
        dev._claim_key = key
    finally:
        _claimed(key, dev)
    return dev


def _attach(pci, driver, *, vfio_dir, memmap, hugepages, bus_master, force):
    kind = _choose(pci, driver)
    current = pci.driver
    target = VFIO_DRIVER if kind == "vfio" else UIO_DRIVER
    if current in USERSPACE_DRIVERS and current != target and not force:
        raise PciError(f"{pci.address} is bound to {current}, another user-space driver: a process "
                       "may be using it. Give it back first (`userblk setup reset`) or pass "
                       "force=True", address=pci.address)
    if current is not None and current not in USERSPACE_DRIVERS and not force:
        users = pci.active_users()
        if users:
            raise PciError(f"{pci.address} is in use through its {current} driver: "
                           f"{'; '.join(users)}. Stop using it first, or pass force=True",
                           address=pci.address)
    # Taken from the kernel (or from no driver): detach gives it back, and the kernel probes its
    # own driver. Already bound to our driver (`userblk setup`): it stays bound.
    restore_to = current not in USERSPACE_DRIVERS
    if kind == "uio":
        require_hugepages(str(pci.address), hugepages)     # before touching the device
    load_driver(target, pci.sysfs)
    pci.bind(target, force=force)
    container = None
    try:
        if kind == "vfio":
            # the process-wide container, or a private one over a caller's MemMap (tests)
            if memmap is not None:
                container = open_container(f"{vfio_dir}/vfio", memmap, pci.address)
            backend = VfioDevice(pci, container, dev_dir=vfio_dir)
            kind = "vfio-noiommu" if backend.noiommu else "vfio"
        else:
            backend = UioDevice(pci, memmap=memmap, hugepages=hugepages)
        try:
            if bus_master:
                backend.enable_bus_master()
        except BaseException:
            backend.close()
            raise
    except BaseException:
        if container is not None:
            container.close()
        if restore_to:
            try:
                pci.restore()
            except EnvError as e:
                log.warning("%s: could not give the device back to %s: %s", pci.address,
                            current or "the kernel", e)
        raise
    log.info("%s: attached through %s (taken from %s)", pci.address, kind, current or "no driver")
    return AttachedDevice(pci, backend, kind, restore_to)

