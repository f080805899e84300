"""uio_pci_generic: driving a PCI function through sysfs when vfio is impossible (no IOMMU).

uio_pci_generic only hands the device to user space; everything else goes through the device's
sysfs files: the BARs are mmapped from `resourceN`, configuration space is read and written through
`config` (bus mastering is ours to enable). Nothing translates DMA addresses, so the device sees
physical addresses: `env.memmap` switches to IOVA mode "pa" (physical addresses from
/proc/self/pagemap, which needs root) and only hugepages, which never move, can be DMA'd to. This
path therefore requires reserved hugepages and refuses to start without them.

Nothing isolates the device from the rest of memory either: a wrong PRP lets it write anywhere.
Prefer vfio with an IOMMU where there is one.
"""
import logging
import os
import threading

from env.errors import InvalidArgument, PermissionRequired, UioError, UioPermissionError
from env.memmap import vtophys_map
from env.memory import hugepage_status
from env.mmio import Mmio
from env.pci import (IORESOURCE_IO, IORESOURCE_MEM, PCI_COMMAND, PCI_COMMAND_MASTER, ConfigSpace,
                     PciDevice)

log = logging.getLogger("userblk.env.uio")

UIO_DRIVER = "uio_pci_generic"

# Every open UioDevice needs its memmap in "pa" mode; the last one to close restores the old mode.
_pa_users = {}              # id(memmap) -> [memmap, users, mode before]
_pa_lock = threading.Lock()


def _acquire_pa(memmap, name):
    with _pa_lock:
        entry = _pa_users.get(id(memmap))
        if entry is not None:
            entry[1] += 1
            return
        if memmap.mapper is not None:
            raise UioError(f"{name}: a vfio container (IOMMU) already maps DMA in this process; "
                           "uio devices need physical addresses: use one kind of driver per "
                           "process", device=name, step="IOVA mode")
        old = memmap.mode
        try:
            memmap.set_mode("pa")
        except PermissionRequired as e:
            memmap.set_mode(old)
            raise UioPermissionError(f"{name}: uio needs physical addresses of DMA memory, and "
                                     f"{e}", device=name, step="IOVA mode") from None
        _pa_users[id(memmap)] = [memmap, 1, old]


def _release_pa(memmap):
    with _pa_lock:
        entry = _pa_users.get(id(memmap))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _pa_users[id(memmap)]
            memmap.set_mode(entry[2])


def require_hugepages(name, root="/sys/kernel/mm/hugepages"):
    """Raise unless some hugepages are reserved: without an IOMMU only they can be DMA'd to."""
    status = hugepage_status(root)
    if not any(total for total, _free in status.values()):
        raise UioError(f"{name}: uio_pci_generic has no IOMMU, so the device DMAs to physical "
                       "addresses and only hugepages keep theirs; none are reserved. Reserve "
                       "some (echo 256 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages, "
                       "or `userblk setup`), or use vfio with an IOMMU",
                       device=name, step="hugepages")
    return status


class UioDevice(ConfigSpace):
    """A PCI function bound to uio_pci_generic: BARs and config space through sysfs."""

    def __init__(self, address, root="/sys", memmap=None, hugepages="/sys/kernel/mm/hugepages"):
        self.pci = address if isinstance(address, PciDevice) else PciDevice(address, root)
        self.address = self.pci.address
        name = self.name = str(self.address)
        driver = self.pci.driver
        if driver != UIO_DRIVER:
            raise UioError(f"{name} is bound to {driver or 'no driver'}, not {UIO_DRIVER}: bind "
                           "it first (env.device.attach_pci(..., driver='uio') does)",
                           device=name, step="check driver")
        require_hugepages(name, hugepages)
        self.memmap = memmap if memmap is not None else vtophys_map()
        self._bars = {}
        self._config_fd = -1
        path = self.pci.attr_path("config")
        self._config_fd = self._open(path, "open config")
        try:
            self._config_len = os.fstat(self._config_fd).st_size or 256
            self._command_at_open = self.config_read(PCI_COMMAND, 2)
            _acquire_pa(self.memmap, name)
        except BaseException:
            os.close(self._config_fd)
            self._config_fd = -1
            raise
        log.info("%s: opened through %s (IOVA = physical address)", name, UIO_DRIVER)

    def _open(self, path, step):
        try:
            return os.open(path, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except PermissionError as e:
            raise UioPermissionError(f"{self.name}: {step} {path} failed: {e.strerror}; run as "
                                     "root", device=self.name, step=step) from None
        except OSError as e:
            raise UioError(f"{self.name}: {step} {path} failed: {e.strerror}", device=self.name,
                           step=step) from None

    @property
    def closed(self):
        return self._config_fd < 0

    def _require_open(self, step):
        if self._config_fd < 0:
            raise UioError(f"{self.name}: the uio device is closed", device=self.name, step=step)

    def map_bar(self, index=0):
        """The registers of memory BAR `index`, mmapped from sysfs resourceN (same object on
        later calls)."""
        self._require_open("mmap BAR")
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise InvalidArgument(f"{self.name}: BAR index must be 0..5, not {index!r}")
        bar = self._bars.get(index)
        if bar is not None:
            return bar
        step = f"mmap BAR{index}"
        _start, size, flags = self.pci.resource(index)
        if size == 0:
            raise UioError(f"{self.name}: BAR{index} is not implemented", device=self.name,
                           step=step)
        if flags & IORESOURCE_IO or not flags & IORESOURCE_MEM:
            raise UioError(f"{self.name}: BAR{index} is an I/O-port BAR (flags 0x{flags:x}) and "
                           "cannot be mmapped", device=self.name, step=step)
        fd = self._open(self.pci.attr_path(f"resource{index}"), step)
        try:
            bar = Mmio.map_fd(fd, size, 0, f"{self.name} BAR{index}")
        except Exception as e:
            raise UioError(f"{self.name}: mmap of BAR{index} failed: {e}", device=self.name,
                           step=step) from None
        finally:
            os.close(fd)        # the mapping keeps the file
        self._bars[index] = bar
        return bar

    # ---- config space (ConfigSpace provides config_read/config_write/enable_bus_master) -------
    def _config_size(self):
        self._require_open("config space")
        return self._config_len

    def _config_pread(self, offset, size):
        try:
            return os.pread(self._config_fd, size, offset)
        except OSError as e:
            raise UioError(f"{self.name}: config read at 0x{offset:x} failed: {e.strerror}",
                           device=self.name, step="config read") from None

    def _config_pwrite(self, offset, data):
        try:
            return os.pwrite(self._config_fd, data, offset)
        except OSError as e:
            raise UioError(f"{self.name}: config write at 0x{offset:x} failed: {e.strerror}",
                           device=self.name, step="config write") from None

    def _config_error(self, message, step):
        return UioError(message, device=self.name, step=step)

    def reset(self):
        """Function reset through sysfs `reset` (the kernel saves and restores config space)."""
        self._require_open("reset")
        if not self.pci.sysfs.exists(f"bus/pci/devices/{self.address}/reset"):
            raise UioError(f"{self.name}: the device offers no reset method (no sysfs reset file)",
                           device=self.name, step="reset")
        try:
            self.pci.sysfs.write(f"bus/pci/devices/{self.address}/reset", "1")
        except PermissionError as e:
            raise UioPermissionError(f"{self.name}: reset needs root ({e.strerror})",
                                     device=self.name, step="reset") from None
        except OSError as e:
            raise UioError(f"{self.name}: reset failed: {e.strerror}", device=self.name,
                           step="reset") from None

    def close(self):
        """Unmap the BARs, turn bus mastering back off if it was off at open (a device left
        behind must not keep DMAing to memory we give back), and release the IOVA mode.
        Idempotent."""
        if self._config_fd < 0:
            return
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        try:
            if not self._command_at_open & PCI_COMMAND_MASTER:
                cmd = self.config_read(PCI_COMMAND, 2)
                if cmd & PCI_COMMAND_MASTER:
                    self.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MASTER)
        except UioError as e:
            log.warning("%s: could not turn bus mastering off: %s", self.name, e)
        finally:
            os.close(self._config_fd)
            self._config_fd = -1
            _release_pa(self.memmap)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<UioDevice {self.name}{' closed' if self.closed else ''}>"
