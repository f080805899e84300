"""vfio: a PCI function driven from user space through /dev/vfio, with the IOMMU doing DMA mapping.

The kernel objects (include/uapi/linux/vfio.h) and ours:
- `VfioContainer` (/dev/vfio/vfio): the IOMMU context. API version and extension checks, the
  IOMMU type, its valid IOVA ranges (VFIO_IOMMU_GET_INFO) and DMA mapping (VFIO_IOMMU_MAP_DMA).
  Once it holds a group and has an IOMMU type it becomes the DMA mapper of `env.memmap.g_vtophys`,
  so every DMA region, existing and future, is mapped. In no-IOMMU mode it switches the map to
  physical addresses instead.
- `VfioGroup` (/dev/vfio/N, or /dev/vfio/noiommu-N): an IOMMU group; it must be viable (every
  device in it bound to vfio-pci or to no driver) before it joins the container.
- `VfioDevice`: the device fd. Region info, BAR mmap (an `env.mmio.Mmio`), config space, bus
  master enable, reset.

One container per process is the normal case: `get_container()` returns it, and closing the last
device opened through it releases the DMA mappings and the container.

IOVAs: like SPDK, IOVA = VA when the virtual range lies inside the IOMMU's valid ranges. With a
narrow aperture (QEMU's intel-iommu defaults to 39 bits, testbed pitfall 2) user addresses do not
fit, and `IovaAllocator` chooses IOVAs inside the valid ranges, away from the MSI window.

ioctls go through `fcntl.ioctl` with bytearrays laid out with `struct`; every failure is a
`VfioError` naming the device, the step and what to do.
"""
import bisect
import errno as _errno
import fcntl
import logging
import os
import struct
import threading

from env.errors import (InvalidArgument, ResourceExhausted, VfioError, VfioPermissionError)
from env.memmap import vtophys_map
from env.mmio import Mmio
from env.pci import ConfigSpace, PciDevice, iommu_group_members

log = logging.getLogger("userblk.env.vfio")

# ---- ioctl numbers: vfio.h defines every one as _IO(VFIO_TYPE, VFIO_BASE + n) ------------------
_IOC_NRSHIFT, _IOC_TYPESHIFT = 0, 8     # asm-generic/ioctl.h; _IO has no size and no direction


def _IO(type_, nr):
    return (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


VFIO_TYPE = ord(";")
VFIO_BASE = 100
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)    # on the container; shares its number with
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)     # the device ioctls for PCI hot reset,
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)   # which take a device fd

VFIO_API_VERSION = 0
# extensions / IOMMU types
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8
EXTENSIONS = {"TYPE1": VFIO_TYPE1_IOMMU, "TYPE1v2": VFIO_TYPE1v2_IOMMU,
              "NOIOMMU": VFIO_NOIOMMU_IOMMU}
_IOMMU_NAMES = {VFIO_TYPE1_IOMMU: "VFIO_TYPE1_IOMMU", VFIO_TYPE1v2_IOMMU: "VFIO_TYPE1v2_IOMMU",
                VFIO_NOIOMMU_IOMMU: "VFIO_NOIOMMU_IOMMU"}

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7

# x86 interrupt-address window: DMA writes here are MSIs, so the IOMMU reserves it and QEMU's
# intel-iommu leaves it out of the valid IOVA ranges (testbed pitfall 2).
MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)
SIZE_2MB = 2 << 20
_ALL_IOVAS = ((0, (1 << 64) - 1),)

# ---- struct layouts (include/uapi/linux/vfio.h) -------------------------------------------------
_GROUP_STATUS = struct.Struct("<II")            # argsz, flags
_IOMMU_INFO = struct.Struct("<IIQII")           # argsz, flags, iova_pgsizes, cap_offset, pad
_CAP_HEADER = struct.Struct("<HHI")             # id, version, next
_IOVA_RANGES = struct.Struct("<II")             # nr_iovas, reserved; then {start, end} pairs
_DMA_AVAIL = struct.Struct("<I")                # avail
_RANGE = struct.Struct("<QQ")                   # iova range {start, end} / sparse {offset, size}
_DMA_MAP = struct.Struct("<IIQQQ")              # argsz, flags, vaddr, iova, size
_DMA_UNMAP = struct.Struct("<IIQQ")             # argsz, flags, iova, size
_DEVICE_INFO = struct.Struct("<IIII")           # argsz, flags, num_regions, num_irqs
_REGION_INFO = struct.Struct("<IIIIQQ")         # argsz, flags, index, cap_offset, size, offset
_SPARSE = struct.Struct("<II")                  # nr_areas, reserved; then {offset, size} pairs
_MAX_INFO = 1 << 16                             # larger than any capability chain the kernel builds


# ---- errors -------------------------------------------------------------------------------------
_HINTS = {
    ("open", _errno.ENOENT): "the vfio modules are not loaded: modprobe vfio-pci",
    ("open group", _errno.ENOENT): "bind the device to vfio-pci first (env.device.attach_pci "
                                   "does); with no IOMMU, vfio needs no-IOMMU mode or use uio",
    ("open group", _errno.EBUSY): "the IOMMU group is already open, by another process or another "
                                  "container in this one: close it there first",
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.EBUSY): "the device is in use by another process",
    ("VFIO_GROUP_GET_DEVICE_FD", _errno.ENODEV): "the device is not in this group or not bound "
                                                 "to vfio-pci",
    ("VFIO_GROUP_SET_CONTAINER", _errno.EBUSY): "the group already belongs to another container",
    ("VFIO_SET_IOMMU", _errno.EPERM): "vfio no-IOMMU mode needs CAP_SYS_RAWIO: run as root",
    ("VFIO_IOMMU_MAP_DMA", _errno.EINVAL): "the IOVA is outside the IOMMU aperture or overlaps "
                                           "a mapping",
    ("VFIO_IOMMU_MAP_DMA", _errno.ENOMEM): "cannot pin that much memory: raise the locked-memory "
                                           "limit (ulimit -l) or run as root",
    ("VFIO_IOMMU_MAP_DMA", _errno.ENOSPC): "the IOMMU driver's mapping limit is reached "
                                           "(vfio_iommu_type1 dma_entry_limit)",
    ("VFIO_IOMMU_MAP_DMA", _errno.EEXIST): "that IOVA range is already mapped",
    ("VFIO_IOMMU_MAP_DMA", _errno.EFAULT): "the virtual range is not mapped in this process",
}


def _fail(device, step, exc):
    """A VfioError (VfioPermissionError for EACCES/EPERM) for OSError `exc` at `step`."""
    code = exc.errno
    key = step.split(" /")[0]                    # "open group /dev/vfio/4" -> "open group"
    denied = code in (_errno.EACCES, _errno.EPERM)
    hint = _HINTS.get((key, code)) or (
        "run as root, or give this user read-write access to the /dev/vfio files" if denied else "")
    reason = os.strerror(code) if code else str(exc)
    cls = VfioPermissionError if denied else VfioError
    return cls(f"{device}: {step} failed: {reason}" + (f": {hint}" if hint else ""),
               device=device, step=step, errno=code)


def _ioctl(fd, request, arg, device, step):
    """fcntl.ioctl with an int (passed by value) or a bytearray (updated in place); returns the
    ioctl's result. Errors become VfioError naming `device` and `step`."""
    try:
        if isinstance(arg, bytearray):
            return fcntl.ioctl(fd, request, arg, True)
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise _fail(device, step, e) from None


def _open(path, device, step):
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _fail(device, f"{step} {path}", e) from None


# ---- capability chains --------------------------------------------------------------------------
def iter_caps(buf, offset, base=0):
    """(id, version, offset) of each capability of a vfio info chain starting at `offset`.
    `base` is what offsets are relative to. A malformed chain raises VfioError, never loops."""
    seen = set()
    while offset:
        pos = base + offset
        if offset in seen or pos < base or pos + _CAP_HEADER.size > len(buf):
            raise VfioError(f"malformed vfio capability chain (offset 0x{offset:x} in a "
                            f"{len(buf)}-byte reply)", step="parse capabilities")
        seen.add(offset)
        cap_id, version, nxt = _CAP_HEADER.unpack_from(buf, pos)
        yield cap_id, version, pos
        offset = nxt


def _ranges(buf, pos, count):
    end = pos + count * _RANGE.size
    if end > len(buf) or count > 4096:
        raise VfioError(f"malformed vfio capability: {count} ranges overrun a {len(buf)}-byte "
                        "reply", step="parse capabilities")
    return tuple(_RANGE.unpack_from(buf, pos + i * _RANGE.size) for i in range(count))


class IommuInfo:
    """What VFIO_IOMMU_GET_INFO reports: supported IOMMU page sizes (a bit mask), the valid IOVA
    ranges (inclusive (start, end) pairs; all of them when the kernel has no range capability)
    and how many more DMA mappings may be made (None when not reported)."""
    __slots__ = ("pgsizes", "iova_ranges", "dma_avail")

    def __init__(self, pgsizes, iova_ranges, dma_avail=None):
        self.pgsizes, self.iova_ranges, self.dma_avail = pgsizes, tuple(iova_ranges), dma_avail

    @property
    def min_page_size(self):
        return self.pgsizes & -self.pgsizes if self.pgsizes else 4096

    @property
    def aperture_bits(self):
        """Bits needed for the highest valid IOVA (39 or 48 with QEMU's intel-iommu)."""
        return max(end for _, end in self.iova_ranges).bit_length()

    def __repr__(self):
        ranges = ", ".join(f"0x{a:x}-0x{b:x}" for a, b in self.iova_ranges)
        return (f"IommuInfo(pgsizes=0x{self.pgsizes:x}, iova_ranges=[{ranges}], "
                f"dma_avail={self.dma_avail})")


def parse_iommu_info(buf):
    """Parse a vfio_iommu_type1_info reply (with its capability chain)."""
    if len(buf) < _IOMMU_INFO.size:
        raise VfioError("VFIO_IOMMU_GET_INFO reply is too short", step="VFIO_IOMMU_GET_INFO")
    _argsz, flags, pgsizes, cap_off, _pad = _IOMMU_INFO.unpack_from(buf)
    ranges, avail = None, None
    if flags & VFIO_IOMMU_INFO_CAPS:
        for cap_id, _ver, pos in iter_caps(buf, cap_off):
            body = pos + _CAP_HEADER.size
            if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE and body + 8 <= len(buf):
                count, _ = _IOVA_RANGES.unpack_from(buf, body)
                ranges = _ranges(buf, body + _IOVA_RANGES.size, count)
            elif cap_id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL and body + 4 <= len(buf):
                avail = _DMA_AVAIL.unpack_from(buf, body)[0]
    if not flags & VFIO_IOMMU_INFO_PGSIZES:
        pgsizes = 0
    return IommuInfo(pgsizes, ranges if ranges else _ALL_IOVAS, avail)


class RegionInfo:
    """One device region (a BAR, the ROM, config space): where it sits in the device fd
    (`offset`), its `size`, flags, and the mmap capabilities: `sparse_areas` ((offset, size)
    pairs that may be mapped when the whole region may not) and `msix_mappable`."""
    __slots__ = ("index", "flags", "size", "offset", "sparse_areas", "msix_mappable")

    def __init__(self, index, flags, size, offset, sparse_areas=(), msix_mappable=False):
        self.index, self.flags, self.size, self.offset = index, flags, size, offset
        self.sparse_areas, self.msix_mappable = tuple(sparse_areas), msix_mappable

    readable = property(lambda self: bool(self.flags & VFIO_REGION_INFO_FLAG_READ))
    writable = property(lambda self: bool(self.flags & VFIO_REGION_INFO_FLAG_WRITE))
    mmap = property(lambda self: bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP))

    def mappable_length(self):
        """How many bytes from the start of the region one mmap may cover: all of it, or only
        the sparse area at offset 0 when the MSI-X table is carved out (testbed pitfall 4)."""
        if not self.mmap or self.size == 0:
            return 0
        if self.sparse_areas and not self.msix_mappable:
            return next((size for off, size in self.sparse_areas if off == 0), 0)
        return self.size

    def __repr__(self):
        caps = []
        if self.sparse_areas:
            areas = ", ".join(f"0x{o:x}+0x{s:x}" for o, s in self.sparse_areas)
            caps.append(f"sparse=[{areas}]")
        if self.msix_mappable:
            caps.append("msix_mappable")
        return (f"RegionInfo(index={self.index}, size=0x{self.size:x}, offset=0x{self.offset:x}, "
                f"flags=0x{self.flags:x}{', ' if caps else ''}{', '.join(caps)})")


def parse_region_info(buf):
    """Parse a vfio_region_info reply (with its capability chain)."""
    if len(buf) < _REGION_INFO.size:
        raise VfioError("VFIO_DEVICE_GET_REGION_INFO reply is too short",
                        step="VFIO_DEVICE_GET_REGION_INFO")
    _argsz, flags, index, cap_off, size, offset = _REGION_INFO.unpack_from(buf)
    sparse, msix = (), False
    if flags & VFIO_REGION_INFO_FLAG_CAPS:
        for cap_id, _ver, pos in iter_caps(buf, cap_off):
            body = pos + _CAP_HEADER.size
            if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP and body + 8 <= len(buf):
                count, _ = _SPARSE.unpack_from(buf, body)
                sparse = _ranges(buf, body + _SPARSE.size, count)
            elif cap_id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
                msix = True
    return RegionInfo(index, flags, size, offset, sparse, msix)


# ---- IOVA allocation ----------------------------------------------------------------------------
class IovaAllocator:
    """Chooses the IOVA of each DMA mapping inside the IOMMU's valid ranges.

    `place(vaddr, size)` returns `vaddr` itself when [vaddr, vaddr+size) is valid and free
    (IOVA = VA, like SPDK); otherwise the lowest free `align`-aligned IOVA at or above
    `prefer_above` (4 GiB: clear of the PCI hole and the MSI window), then below it. IOVA 0 is
    never handed out. `reserved` windows (the MSI window by default) are never used. Ranges are
    inclusive (start, end) pairs, as the kernel reports them."""

    def __init__(self, ranges=_ALL_IOVAS, reserved=(MSI_WINDOW,), align=SIZE_2MB,
                 prefer_above=1 << 32, page_size=4096):
        if align <= 0 or align & (align - 1) or page_size <= 0 or page_size & (page_size - 1):
            raise InvalidArgument("align and page_size must be powers of two")
        self.align, self.page_size, self.prefer_above = align, page_size, prefer_above
        valid = []
        for start, end in sorted(ranges):
            if start > end:
                raise InvalidArgument(f"IOVA range 0x{start:x}-0x{end:x} ends before it starts")
            if valid and start <= valid[-1][1]:          # merge overlapping or touching ranges
                valid[-1][1] = max(valid[-1][1], end + 1)
            else:
                valid.append([start, end + 1])
        for r_start, r_end in reserved:                  # cut the reserved windows out
            cut = []
            for start, end in valid:
                if r_end < start or r_start >= end:
                    cut.append([start, end])
                    continue
                if start < r_start:
                    cut.append([start, r_start])
                if r_end + 1 < end:
                    cut.append([r_end + 1, end])
            valid = cut
        self._valid = [tuple(v) for v in valid]          # half-open [start, end)
        self._starts, self._ends = [], []                # used ranges, sorted, half-open

    @property
    def valid_ranges(self):
        """The usable IOVA ranges (inclusive pairs), reserved windows removed."""
        return [(s, e - 1) for s, e in self._valid]

    @property
    def used(self):
        """Allocated (iova, size) pairs in address order."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends)]

    def _check(self, iova, size):
        if not isinstance(size, int) or size <= 0 or size % self.page_size:
            raise InvalidArgument(f"IOVA size must be a positive multiple of {self.page_size}, "
                                  f"not {size!r}")
        if not isinstance(iova, int) or iova < 0 or iova % self.page_size:
            raise InvalidArgument(f"IOVA 0x{iova:x} is not {self.page_size}-byte aligned"
                                  if isinstance(iova, int) else f"bad IOVA {iova!r}")

    def is_free(self, iova, size):
        """Whether [iova, iova+size) lies in one valid range and overlaps no allocation."""
        if iova <= 0 or not any(s <= iova and iova + size <= e for s, e in self._valid):
            return False
        i = bisect.bisect_right(self._starts, iova)
        if i and self._ends[i - 1] > iova:
            return False
        return i == len(self._starts) or self._starts[i] >= iova + size

    def _take(self, iova, size):
        i = bisect.bisect_right(self._starts, iova)
        self._starts.insert(i, iova)
        self._ends.insert(i, iova + size)
        return iova

    def reserve(self, iova, size):
        """Take exactly [iova, iova+size); InvalidArgument if it is not free."""
        self._check(iova, size)
        if not self.is_free(iova, size):
            raise InvalidArgument(f"IOVA range 0x{iova:x}+0x{size:x} is not free or not valid")
        return self._take(iova, size)

    def _gaps(self, floor):
        """Free half-open intervals at or above `floor`, in address order."""
        for start, end in self._valid:
            pos = max(start, floor)
            i = bisect.bisect_right(self._ends, pos)
            while pos < end:
                nxt = self._starts[i] if i < len(self._starts) else end
                if nxt > pos:
                    yield pos, min(nxt, end)
                if i >= len(self._starts):
                    break
                pos = max(pos, self._ends[i])
                i += 1

    def alloc(self, size):
        """The lowest free aligned IOVA for `size` bytes (above `prefer_above` first)."""
        self._check(0, size)
        for floor, ceiling in ((self.prefer_above, None), (self.align, self.prefer_above)):
            for start, end in self._gaps(max(floor, 1)):     # never IOVA 0
                if ceiling is not None and start >= ceiling:
                    break
                iova = -(-start // self.align) * self.align
                if iova + size <= end:
                    return self._take(iova, size)
        total = sum(e - s for s, e in self._valid) \
            - sum(e - s for s, e in zip(self._starts, self._ends))
        raise ResourceExhausted(f"no free IOVA range of 0x{size:x} bytes ({total >> 20} MiB free "
                                f"in total, {len(self._starts)} mappings) in "
                                + ", ".join(f"0x{a:x}-0x{b:x}" for a, b in self.valid_ranges))

    def place(self, vaddr, size):
        """The IOVA for mapping `size` bytes at virtual address `vaddr`: `vaddr` if possible."""
        self._check(vaddr, size)
        if self.is_free(vaddr, size):
            return self._take(vaddr, size)
        return self.alloc(size)

    def free(self, iova, size):
        """Give back an allocation made with exactly this IOVA and size."""
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._starts) or self._starts[i] != iova or self._ends[i] != iova + size:
            raise InvalidArgument(f"IOVA 0x{iova:x}+0x{size:x} was not allocated")
        del self._starts[i], self._ends[i]


# ---- container ----------------------------------------------------------------------------------
class VfioContainer:
    """/dev/vfio/vfio: the IOMMU context that groups join and DMA mappings live in."""

    def __init__(self, path="/dev/vfio/vfio", memmap=None):
        self.path = path
        self.memmap = memmap if memmap is not None else vtophys_map()
        self.name = "vfio container"
        self.groups = {}                 # group number -> VfioGroup
        self.devices = []                # open VfioDevices
        self.iommu_type = None
        self.iommu_info = None
        self.allocator = None
        self.noiommu = False
        self._mappings = {}              # iova -> (vaddr, size)
        # Lock order: _attach_lock (groups, devices, life cycle), then the memmap's own lock,
        # then _lock (the mappings; map_dma/unmap_dma run with the memmap's lock held, so
        # nothing holding _lock may call into the memmap).
        self._attach_lock = threading.RLock()
        self._lock = threading.RLock()
        self._mapper_set = False
        self._old_mode = None
        self._closing = False
        self.fd = _open(path, self.name, "open")
        try:
            version = _ioctl(self.fd, VFIO_GET_API_VERSION, 0, self.name, "VFIO_GET_API_VERSION")
            if version != VFIO_API_VERSION:
                raise VfioError(f"{path}: vfio API version {version}, expected {VFIO_API_VERSION}",
                                device=self.name, step="VFIO_GET_API_VERSION")
            self.extensions = {name: self.check_extension(value)
                               for name, value in EXTENSIONS.items()}
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def check_extension(self, extension):
        return _ioctl(self.fd, VFIO_CHECK_EXTENSION, extension, self.name,
                      "VFIO_CHECK_EXTENSION") > 0

    @property
    def closed(self):
        return self.fd < 0

    def _require_open(self):
        if self.fd < 0:
            raise VfioError(f"{self.name} is closed", device=self.name, step="use")

    # ---- groups ------------------------------------------------------------------------------
    def group(self, number, device, dev_dir="/dev/vfio", sysfs="/sys"):
        """The VfioGroup `number` in this container, opened and attached on first use.
        `device` names the device the caller wants, for error messages."""
        with self._attach_lock:
            self._require_open()
            group = self.groups.get(number)
            if group is None:
                try:
                    group = VfioGroup(self, number, device, dev_dir, sysfs)
                except BaseException:
                    self._release()
                    raise
                self.groups[number] = group
                try:
                    self._setup_iommu(group, device)
                except BaseException:
                    self._release(group=group)
                    raise
            return group

    def _setup_iommu(self, group, device):
        if self.iommu_type is not None:
            if group.noiommu != self.noiommu:
                raise VfioError(f"{device}: IOMMU group {group.number} is "
                                f"{'a no-IOMMU' if group.noiommu else 'an IOMMU'} group, but the "
                                f"container is {'no-IOMMU' if self.noiommu else 'IOMMU-backed'}",
                                device=device, step="VFIO_SET_IOMMU")
            return
        if group.noiommu:
            wanted = [VFIO_NOIOMMU_IOMMU] if self.extensions["NOIOMMU"] else []
        else:
            wanted = [EXTENSIONS[name] for name in ("TYPE1v2", "TYPE1") if self.extensions[name]]
        if not wanted:
            raise VfioError(f"{device}: the kernel offers no usable IOMMU type (extensions "
                            f"{self.extensions})", device=device, step="VFIO_CHECK_EXTENSION")
        _ioctl(self.fd, VFIO_SET_IOMMU, wanted[0], device, "VFIO_SET_IOMMU")
        self.iommu_type = wanted[0]
        self.noiommu = group.noiommu
        log.info("%s: %s", device, _IOMMU_NAMES[self.iommu_type])
        if self.noiommu:
            # No IOMMU: the device sees physical addresses (only hugepages keep theirs).
            self._old_mode = self.memmap.mode
            self.memmap.set_mode("pa")
            return
        self.iommu_info = self.get_iommu_info(device)
        self.allocator = IovaAllocator(self.iommu_info.iova_ranges,
                                       page_size=self.iommu_info.min_page_size)
        log.info("%s: %r", device, self.iommu_info)
        self.memmap.set_mapper(self)       # maps every DMA region now, and each new one later
        self._mapper_set = True

    def get_iommu_info(self, device=None):
        """VFIO_IOMMU_GET_INFO: page sizes, valid IOVA ranges, DMA mappings left (IommuInfo)."""
        device = device or self.name
        buf = bytearray(_IOMMU_INFO.pack(_IOMMU_INFO.size, 0, 0, 0, 0))
        _ioctl(self.fd, VFIO_IOMMU_GET_INFO, buf, device, "VFIO_IOMMU_GET_INFO")
        need = _IOMMU_INFO.unpack_from(buf)[0]
        if _IOMMU_INFO.size < need <= _MAX_INFO:      # the capabilities need a bigger buffer
            buf = bytearray(_IOMMU_INFO.pack(need, 0, 0, 0, 0)) + bytes(need - _IOMMU_INFO.size)
            _ioctl(self.fd, VFIO_IOMMU_GET_INFO, buf, device, "VFIO_IOMMU_GET_INFO")
        return parse_iommu_info(buf)

    # ---- DMA mapping (the env.memmap mapper interface) ---------------------------------------
    def map_dma(self, vaddr, size):
        """Map [vaddr, vaddr+size) for device DMA (read and write); returns its IOVA."""
        with self._lock:
            self._require_open()
            if self.allocator is None:
                raise VfioError(f"{self.name}: no IOMMU set up yet (attach a group first)",
                                device=self.name, step="VFIO_IOMMU_MAP_DMA")
            try:
                iova = self.allocator.place(vaddr, size)
            except ResourceExhausted as e:
                raise ResourceExhausted(f"{self._who()}: cannot map 0x{size:x} bytes at "
                                        f"0x{vaddr:x}: {e}") from None
            buf = bytearray(_DMA_MAP.pack(_DMA_MAP.size, VFIO_DMA_MAP_FLAG_READ
                                          | VFIO_DMA_MAP_FLAG_WRITE, vaddr, iova, size))
            try:
                _ioctl(self.fd, VFIO_IOMMU_MAP_DMA, buf, self._who(),
                       "VFIO_IOMMU_MAP_DMA")
            except VfioError as e:
                self.allocator.free(iova, size)
                raise type(e)(f"{e} (vaddr 0x{vaddr:x} size 0x{size:x} iova 0x{iova:x})",
                              device=e.device, step=e.step, errno=e.errno) from None
            self._mappings[iova] = (vaddr, size)
            log.debug("mapped vaddr 0x%x size 0x%x at iova 0x%x", vaddr, size, iova)
            return iova

    def unmap_dma(self, iova, size):
        """Undo `map_dma` for the mapping at `iova` of `size` bytes."""
        with self._lock:
            if self._mappings.get(iova, (None, None))[1] != size:
                raise InvalidArgument(f"{self.name}: no DMA mapping of 0x{size:x} bytes at IOVA "
                                      f"0x{iova:x}")
            buf = bytearray(_DMA_UNMAP.pack(_DMA_UNMAP.size, 0, iova, size))
            _ioctl(self.fd, VFIO_IOMMU_UNMAP_DMA, buf, self._who(), "VFIO_IOMMU_UNMAP_DMA")
            del self._mappings[iova]
            self.allocator.free(iova, size)

    @property
    def mappings(self):
        """{iova: (vaddr, size)} of every live DMA mapping."""
        with self._lock:
            return dict(self._mappings)

    def _who(self):
        names = ", ".join(str(d.address) for d in self.devices)
        return f"{self.name} ({names})" if names else self.name

    # ---- lifetime ----------------------------------------------------------------------------
    def _add_device(self, dev):
        with self._attach_lock:
            self.devices.append(dev)

    def _release(self, dev=None, group=None):
        """Forget `dev` (closed, or never opened) and close `group` once no device uses it. With
        no group left the container closes too, unmapping DMA while the group still holds the
        IOMMU, then the group leaves."""
        with self._attach_lock:
            if dev is not None and dev in self.devices:
                self.devices.remove(dev)
            if self._closing:
                return
            if group is not None and self.groups.get(group.number) is group \
                    and not any(d.group is group for d in self.devices):
                del self.groups[group.number]
                try:
                    if not self.groups:
                        self.close()
                finally:
                    group.close()
            elif not self.groups and not self.devices:
                self.close()

    def close(self):
        """Release every DMA mapping, detach from env.memmap, close the devices, groups and the
        container. Idempotent."""
        global _container
        with self._attach_lock:
            if self.fd < 0 or self._closing:
                return
            self._closing = True
            try:
                if self._mapper_set:
                    self._mapper_set = False
                    try:
                        self.memmap.clear_mapper(unmap=True)     # calls unmap_dma per region
                    except Exception as e:     # closing the container drops them anyway
                        log.warning("%s: unmapping DMA regions failed: %s", self.name, e)
                if self._old_mode is not None:
                    self.memmap.set_mode(self._old_mode)
                    self._old_mode = None
            finally:
                for d in list(self.devices):
                    d.close()
                self.devices.clear()
                for g in self.groups.values():
                    g.close()
                self.groups.clear()
                with self._lock:
                    os.close(self.fd)
                    self.fd = -1
                    self._mappings.clear()
                self._closing = False
                with _container_lock:
                    if _container is self:
                        _container = None

    def __repr__(self):
        state = "closed" if self.fd < 0 else _IOMMU_NAMES.get(self.iommu_type, "no IOMMU type")
        return f"<VfioContainer {self.path} {state} groups={sorted(self.groups)}>"


_container = None
_container_lock = threading.Lock()


def _named(device, opener, *args):
    """opener(*args), with a container error renamed after the device it was opened for."""
    try:
        return opener(*args)
    except VfioError as e:
        raise type(e)(f"{device}: {e}", device=device, step=e.step, errno=e.errno) from None


def open_container(path="/dev/vfio/vfio", memmap=None, device=None):
    """A new private container (over `memmap`, default env.memmap's process-wide map); errors
    name `device` when given."""
    if device is None:
        return VfioContainer(path, memmap)
    return _named(str(device), VfioContainer, path, memmap)


def get_container(path="/dev/vfio/vfio"):
    """The process-wide container, opened on first use (again after its last device closed)."""
    global _container
    with _container_lock:
        if _container is None or _container.closed:
            _container = VfioContainer(path)
        return _container


# ---- group --------------------------------------------------------------------------------------
class VfioGroup:
    """/dev/vfio/N: an IOMMU group, checked viable and attached to a container."""

    def __init__(self, container, number, device, dev_dir="/dev/vfio", sysfs="/sys"):
        self.container, self.number, self.sysfs = container, number, sysfs
        path = os.path.join(dev_dir, str(number))
        self.noiommu = False
        if not os.path.exists(path) and os.path.exists(os.path.join(dev_dir, f"noiommu-{number}")):
            path = os.path.join(dev_dir, f"noiommu-{number}")     # vfio no-IOMMU mode
            self.noiommu = True
        self.path = path
        self.fd = _open(path, device, "open group")
        try:
            status = bytearray(_GROUP_STATUS.pack(_GROUP_STATUS.size, 0))
            _ioctl(self.fd, VFIO_GROUP_GET_STATUS, status, device, "VFIO_GROUP_GET_STATUS")
            flags = _GROUP_STATUS.unpack_from(status)[1]
            if not flags & VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(f"{device}: {not_viable_message(number, sysfs)}", device=device,
                                step="VFIO_GROUP_GET_STATUS")
            if flags & VFIO_GROUP_FLAGS_CONTAINER_SET:
                raise VfioError(f"{device}: IOMMU group {number} already belongs to a container",
                                device=device, step="VFIO_GROUP_GET_STATUS")
            _ioctl(self.fd, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", container.fd)),
                   device, "VFIO_GROUP_SET_CONTAINER")
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def get_device_fd(self, address):
        return _ioctl(self.fd, VFIO_GROUP_GET_DEVICE_FD, bytearray(str(address).encode() + b"\0"),
                      str(address), "VFIO_GROUP_GET_DEVICE_FD")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)           # the kernel takes the group out of its container
            self.fd = -1

    def __repr__(self):
        return f"<VfioGroup {self.path}{' closed' if self.fd < 0 else ''}>"


def not_viable_message(group, sysfs="/sys"):
    """Why group `group` is not viable: its members and the drivers they are bound to."""
    members = iommu_group_members(group, sysfs)
    listed = ", ".join(f"{d.address} ({d.driver or 'no driver'})" for d in members) or "none found"
    return (f"IOMMU group {group} is not viable: bind every device in it to vfio-pci "
            f"(or unbind it from its driver). Members: {listed}")


# ---- device -------------------------------------------------------------------------------------
class VfioDevice(ConfigSpace):
    """A PCI function bound to vfio-pci, opened through its group in `container` (default: the
    process-wide one). If opening fails, a container left without any group is closed."""

    def __init__(self, address, container=None, root="/sys", dev_dir="/dev/vfio"):
        self.pci = address if isinstance(address, PciDevice) else PciDevice(address, root)
        self.address = self.pci.address
        name = str(self.address)
        driver = self.pci.driver
        if driver != "vfio-pci":
            raise VfioError(f"{name} is bound to {driver or 'no driver'}, not vfio-pci: bind it "
                            "first (env.device.attach_pci does)", device=name, step="check driver")
        number = self.pci.iommu_group
        if number is None:
            raise VfioError(f"{name} has no IOMMU group: enable the IOMMU (intel_iommu=on) or vfio "
                            "no-IOMMU mode, or use uio_pci_generic", device=name,
                            step="iommu group")
        self.fd = -1
        self._bars = {}
        self._config = None
        if container is None:
            container = _named(name, get_container, os.path.join(dev_dir, "vfio"))
        self.container = container
        with container._attach_lock:     # no other device may close the group meanwhile
            self.group = container.group(number, name, dev_dir, self.pci.sysfs)
            try:
                self.fd = self.group.get_device_fd(self.address)
                info = bytearray(_DEVICE_INFO.pack(_DEVICE_INFO.size, 0, 0, 0))
                _ioctl(self.fd, VFIO_DEVICE_GET_INFO, info, name, "VFIO_DEVICE_GET_INFO")
                _, self.flags, self.num_regions, self.num_irqs = _DEVICE_INFO.unpack(info)
                if not self.flags & VFIO_DEVICE_FLAGS_PCI:
                    raise VfioError(f"{name}: vfio reports a non-PCI device (flags "
                                    f"0x{self.flags:x})", device=name, step="VFIO_DEVICE_GET_INFO")
            except BaseException:
                if self.fd >= 0:
                    os.close(self.fd)
                    self.fd = -1
                container._release(group=self.group)    # the group (and container) if unused
                raise
            container._add_device(self)
        log.info("%s: vfio device fd %d, %d regions, %d irqs%s", name, self.fd, self.num_regions,
                 self.num_irqs, " (no-IOMMU)" if self.noiommu else "")

    @property
    def noiommu(self):
        return self.group.noiommu

    @property
    def closed(self):
        return self.fd < 0

    def _require_open(self, step):
        if self.fd < 0:
            raise VfioError(f"{self.address}: the vfio device is closed", device=str(self.address),
                            step=step)

    def region_info(self, index):
        """RegionInfo of region `index` (0-5 BARs, 6 ROM, 7 config space)."""
        self._require_open("VFIO_DEVICE_GET_REGION_INFO")
        if not isinstance(index, int) or not 0 <= index < self.num_regions:
            raise InvalidArgument(f"{self.address}: no region {index!r} "
                                  f"(0..{self.num_regions - 1})")
        name = str(self.address)
        buf = bytearray(_REGION_INFO.pack(_REGION_INFO.size, 0, index, 0, 0, 0))
        _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf, name, "VFIO_DEVICE_GET_REGION_INFO")
        need = _REGION_INFO.unpack_from(buf)[0]
        if _REGION_INFO.size < need <= _MAX_INFO:
            buf = bytearray(_REGION_INFO.pack(need, 0, index, 0, 0, 0)) \
                + bytes(need - _REGION_INFO.size)
            _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf, name, "VFIO_DEVICE_GET_REGION_INFO")
        return parse_region_info(buf)

    def map_bar(self, index=0):
        """The registers of BAR `index` as an Mmio (the same object on later calls)."""
        self._require_open("mmap BAR")
        if not isinstance(index, int) or not 0 <= index <= 5:
            raise InvalidArgument(f"{self.address}: BAR index must be 0..5, not {index!r}")
        bar = self._bars.get(index)
        if bar is not None:
            return bar
        info = self.region_info(index)
        name = str(self.address)
        if info.size == 0:
            raise VfioError(f"{name}: BAR{index} is not implemented", device=name,
                            step=f"mmap BAR{index}")
        length = info.mappable_length()
        if length == 0:
            raise VfioError(f"{name}: BAR{index} cannot be mmapped ({info!r}); it is an I/O BAR, "
                            "or the MSI-X table leaves no mappable area at its start",
                            device=name, step=f"mmap BAR{index}")
        try:
            bar = Mmio.map_fd(self.fd, length, info.offset, f"{name} BAR{index}")
        except Exception as e:
            raise VfioError(f"{name}: mmap of BAR{index} failed: {e}", device=name,
                            step=f"mmap BAR{index}") from None
        self._bars[index] = bar
        return bar

    # ---- config space (ConfigSpace provides config_read/config_write/enable_bus_master) -------
    def _config_region(self):
        self._require_open("config space")
        if self._config is None:
            self._config = self.region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        return self._config

    def _config_size(self):
        return self._config_region().size

    def _config_pread(self, offset, size):
        try:
            return os.pread(self.fd, size, self._config_region().offset + offset)
        except OSError as e:
            raise _fail(str(self.address), "config read", e) from None

    def _config_pwrite(self, offset, data):
        try:
            return os.pwrite(self.fd, data, self._config_region().offset + offset)
        except OSError as e:
            raise _fail(str(self.address), "config write", e) from None

    def _config_error(self, message, step):
        return VfioError(message, device=str(self.address), step=step)

    def reset(self):
        """VFIO_DEVICE_RESET (function-level or similar reset; the config state is restored)."""
        self._require_open("VFIO_DEVICE_RESET")
        if not self.flags & VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(f"{self.address}: the device offers no reset through vfio",
                            device=str(self.address), step="VFIO_DEVICE_RESET")
        _ioctl(self.fd, VFIO_DEVICE_RESET, 0, str(self.address), "VFIO_DEVICE_RESET")

    def close(self):
        """Unmap the BARs and close the device; the last device closes the container. Idempotent."""
        if self.fd < 0:
            return
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        os.close(self.fd)
        self.fd = -1
        self.container._release(self, self.group)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<VfioDevice {self.address}{' closed' if self.fd < 0 else ''}>"
