"""env.vfio without a device: ioctl numbers, reply parsing, the IOVA allocator, error messages,
and the container/group/device life cycle over a fake vfio "kernel" that answers the ioctls."""
import errno
import os
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st

import env.vfio as vfio
from env.errors import (InvalidArgument, PermissionRequired, ResourceExhausted, VfioError,
                        VfioPermissionError)
from env.memmap import MemMap
from env.vfio import (MSI_WINDOW, IovaAllocator, RegionInfo, VfioContainer, VfioDevice,
                      iter_caps, not_viable_message, parse_iommu_info, parse_region_info)
from tests.env.test_pci import FakeSysfs, make_nvme

MiB = 1 << 20
GiB = 1 << 30
AW39 = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]        # QEMU intel-iommu aw-bits=39
AW48 = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]
HIGH_VA = 0x7F4F_9140_0000                                    # where mmap puts things


# ---- ioctl numbers ------------------------------------------------------------------------------
def test_ioctl_numbers_match_linux_vfio_h():
    # _IO(';', 100 + n): type 0x3b in bits 8..15, no size, no direction
    assert vfio.VFIO_GET_API_VERSION == 0x3B64
    assert vfio.VFIO_CHECK_EXTENSION == 0x3B65
    assert vfio.VFIO_SET_IOMMU == 0x3B66
    assert vfio.VFIO_GROUP_GET_STATUS == 0x3B67
    assert vfio.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert vfio.VFIO_GROUP_UNSET_CONTAINER == 0x3B69
    assert vfio.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert vfio.VFIO_DEVICE_GET_INFO == 0x3B6B
    assert vfio.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert vfio.VFIO_DEVICE_GET_IRQ_INFO == 0x3B6D
    assert vfio.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert vfio.VFIO_DEVICE_RESET == 0x3B6F
    assert vfio.VFIO_IOMMU_GET_INFO == 0x3B70
    assert vfio.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert vfio.VFIO_IOMMU_UNMAP_DMA == 0x3B72


def test_struct_sizes_match_the_kernel_abi():
    assert vfio._DMA_MAP.size == 32 and vfio._DMA_UNMAP.size == 24
    assert vfio._IOMMU_INFO.size == 24 and vfio._REGION_INFO.size == 32
    assert vfio._DEVICE_INFO.size == 16 and vfio._GROUP_STATUS.size == 8


# ---- reply parsing ------------------------------------------------------------------------------
def iommu_info_reply(ranges, avail=None, pgsizes=0x40201000):
    caps = bytearray()
    base = vfio._IOMMU_INFO.size
    body = struct.pack("<II", len(ranges), 0) + b"".join(struct.pack("<QQ", *r) for r in ranges)
    nxt = base + 8 + len(body) if avail is not None else 0
    caps += struct.pack("<HHI", vfio.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, nxt) + body
    if avail is not None:
        caps += struct.pack("<HHII", vfio.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 0, avail)
    flags = vfio.VFIO_IOMMU_INFO_PGSIZES | vfio.VFIO_IOMMU_INFO_CAPS
    return bytearray(struct.pack("<IIQII", base + len(caps), flags, pgsizes, base, 0)) + caps


def test_iommu_info_reports_ranges_page_sizes_and_dma_limit():
    info = parse_iommu_info(iommu_info_reply(AW39, avail=65535))
    assert info.iova_ranges == tuple(AW39)
    assert info.min_page_size == 4096 and info.pgsizes == 0x40201000
    assert info.dma_avail == 65535 and info.aperture_bits == 39
    assert "0xfef00000-0x7fffffffff" in repr(info)


def test_iommu_info_without_range_capability_means_every_iova():
    buf = bytearray(struct.pack("<IIQII", 24, vfio.VFIO_IOMMU_INFO_PGSIZES, 0x1000, 0, 0))
    info = parse_iommu_info(buf)
    assert info.iova_ranges == ((0, (1 << 64) - 1),) and info.dma_avail is None


@pytest.mark.parametrize("damage", ["loop", "overrun", "short", "outside"])
def test_malformed_capability_chains_raise_instead_of_looping(damage):
    buf = iommu_info_reply(AW48)
    if damage == "loop":
        struct.pack_into("<I", buf, 24 + 4, 24)              # the cap's next points to itself
    elif damage == "overrun":
        struct.pack_into("<I", buf, 24 + 8, 1000)            # 1000 ranges in a short reply
    elif damage == "short":
        buf = buf[:20]
    else:
        struct.pack_into("<I", buf, 16, 4000)                # first cap beyond the reply
    with pytest.raises(VfioError):
        parse_iommu_info(buf)


def test_iter_caps_walks_a_chain():
    buf = bytearray(64)
    struct.pack_into("<HHI", buf, 8, 7, 1, 24)
    struct.pack_into("<HHI", buf, 24, 9, 2, 0)
    assert list(iter_caps(buf, 8)) == [(7, 1, 8), (9, 2, 24)]


def region_reply(size, flags, sparse=None, msix=False, offset=0):
    caps = bytearray()
    base = vfio._REGION_INFO.size
    if sparse is not None:
        nxt = base + 16 + 16 * len(sparse) if msix else 0
        caps += struct.pack("<HHIII", vfio.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, nxt, len(sparse), 0)
        caps += b"".join(struct.pack("<QQ", *a) for a in sparse)
    if msix:
        caps += struct.pack("<HHI", vfio.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0)
    if caps:
        flags |= vfio.VFIO_REGION_INFO_FLAG_CAPS
    return bytearray(struct.pack("<IIIIQQ", base + len(caps), flags, 0, base if caps else 0,
                                 size, offset)) + caps


RW_MMAP = 0x7


def test_region_with_mappable_msix_maps_whole():
    info = parse_region_info(region_reply(0x4000, RW_MMAP, sparse=[(0, 0x2000), (0x3000, 0x1000)],
                                          msix=True))
    assert info.msix_mappable and info.sparse_areas == ((0, 0x2000), (0x3000, 0x1000))
    assert info.readable and info.writable and info.mmap
    assert info.mappable_length() == 0x4000


def test_region_with_msix_table_carved_out_maps_only_the_area_at_zero():
    info = parse_region_info(region_reply(0x4000, RW_MMAP, sparse=[(0x3000, 0x1000), (0, 0x2000)]))
    assert not info.msix_mappable and info.mappable_length() == 0x2000
    assert "sparse=[0x3000+0x1000, 0x0+0x2000]" in repr(info)


def test_regions_that_cannot_be_mapped():
    assert parse_region_info(region_reply(0x4000, RW_MMAP, sparse=[(0x1000, 0x1000)])).mappable_length() == 0
    assert parse_region_info(region_reply(0x100, 0x3)).mappable_length() == 0      # config space
    assert parse_region_info(region_reply(0, RW_MMAP)).mappable_length() == 0      # no BAR


# ---- IOVA allocator -----------------------------------------------------------------------------
def test_iova_is_the_virtual_address_when_it_fits():
    a = IovaAllocator(AW48)
    assert a.place(HIGH_VA, 2 * MiB) == HIGH_VA
    assert a.place(HIGH_VA + 2 * MiB, 4 * MiB) == HIGH_VA + 2 * MiB


def test_addresses_beyond_a_39_bit_aperture_get_iovas_from_4_gib_up():
    a = IovaAllocator(AW39)
    assert a.place(HIGH_VA, 2 * MiB) == 4 * GiB
    assert a.place(HIGH_VA + 8 * MiB, 6 * MiB) == 4 * GiB + 2 * MiB
    assert a.place(0x7FFF_0000_0000, 2 * MiB) == 4 * GiB + 8 * MiB
    assert a.used == [(4 * GiB, 2 * MiB), (4 * GiB + 2 * MiB, 6 * MiB), (4 * GiB + 8 * MiB, 2 * MiB)]


def test_the_msi_window_is_never_used():
    a = IovaAllocator([(0, 0xFFFFFFFF)], align=16 * MiB)     # only 32 bits: below 4 GiB it is
    assert all(not (s <= MSI_WINDOW[1] and MSI_WINDOW[0] <= e) for s, e in a.valid_ranges)
    placed = a.place(0xFEE00000, MiB)
    assert placed == 16 * MiB                                 # identity would hit the window
    got = [placed]
    try:
        while True:
            got.append(a.alloc(16 * MiB))
    except ResourceExhausted:
        pass
    assert len(got) == 256 - 1 - 1                # all of 4 GiB but block 0 and the window's
    assert 0xFE000000 not in got and 0 not in got
    assert all(iova + 16 * MiB <= MSI_WINDOW[0] or iova > MSI_WINDOW[1] for iova in got)


def test_identity_is_refused_when_it_overlaps_an_allocation():
    a = IovaAllocator(AW48)
    first = a.alloc(4 * MiB)
    assert first == 4 * GiB
    assert a.place(4 * GiB + 2 * MiB, 2 * MiB) == 4 * GiB + 4 * MiB   # not on top of `first`


def test_allocations_are_aligned_even_in_unaligned_ranges():
    a = IovaAllocator([(0x1_0000_1000, 0x1_00FF_FFFF)], align=2 * MiB)
    assert a.alloc(4096) == 0x1_0020_0000
    b = IovaAllocator([(0x3000, 0x7FFFFF)], align=2 * MiB, prefer_above=0)
    assert b.alloc(2 * MiB) == 2 * MiB


def test_iova_zero_is_never_handed_out():
    a = IovaAllocator([(0, 16 * MiB - 1)], align=4096, prefer_above=0)
    assert a.alloc(4096) == 4096
    assert a.place(0, 4096) != 0


def test_low_iovas_are_used_when_nothing_is_left_above_4_gib():
    a = IovaAllocator([(0, 0xFFFFFFFF), (4 * GiB, 4 * GiB + 4 * MiB - 1)])
    assert a.alloc(4 * MiB) == 4 * GiB
    assert a.alloc(2 * MiB) == 2 * MiB


def test_exhaustion_says_so_and_freeing_makes_room():
    a = IovaAllocator([(4 * GiB, 4 * GiB + 8 * MiB - 1)])
    x = a.alloc(4 * MiB)
    a.alloc(4 * MiB)
    with pytest.raises(ResourceExhausted, match=r"no free IOVA range of 0x200000 bytes"):
        a.alloc(2 * MiB)
    a.free(x, 4 * MiB)
    assert a.alloc(2 * MiB) == x and a.alloc(2 * MiB) == x + 2 * MiB


def test_first_fit_reuses_holes():
    a = IovaAllocator(AW39)
    blocks = [a.alloc(2 * MiB) for _ in range(4)]
    a.free(blocks[1], 2 * MiB)
    assert a.alloc(2 * MiB) == blocks[1]
    assert a.alloc(4 * MiB) == blocks[3] + 2 * MiB            # too big for any hole


def test_reserve_takes_exact_ranges():
    a = IovaAllocator(AW39)
    assert a.reserve(8 * GiB, 2 * MiB) == 8 * GiB
    with pytest.raises(InvalidArgument, match="not free"):
        a.reserve(8 * GiB, 4096)
    with pytest.raises(InvalidArgument, match="not free or not valid"):
        a.reserve(0xFEE00000, 4096)
    with pytest.raises(InvalidArgument):
        a.reserve(1 << 40, 4096)


@pytest.mark.parametrize("size", [0, -4096, 100, 4097, 2.0, None])
def test_bad_sizes_are_refused(size):
    with pytest.raises(InvalidArgument):
        IovaAllocator(AW48).place(HIGH_VA, size)


def test_bad_addresses_and_frees_are_refused():
    a = IovaAllocator(AW48)
    with pytest.raises(InvalidArgument, match="aligned"):
        a.place(HIGH_VA + 1, 4096)
    x = a.alloc(2 * MiB)
    with pytest.raises(InvalidArgument, match="was not allocated"):
        a.free(x, 4 * MiB)
    a.free(x, 2 * MiB)
    with pytest.raises(InvalidArgument, match="was not allocated"):
        a.free(x, 2 * MiB)


def test_bad_allocator_parameters_are_refused():
    with pytest.raises(InvalidArgument, match="ends before"):
        IovaAllocator([(10, 5)])
    with pytest.raises(InvalidArgument, match="powers of two"):
        IovaAllocator(AW48, align=3 * MiB)


def test_overlapping_ranges_merge():
    a = IovaAllocator([(8 * GiB, 9 * GiB - 1), (4 * GiB, 8 * GiB + 5), (9 * GiB, 10 * GiB - 1)])
    assert a.valid_ranges == [(4 * GiB, 10 * GiB - 1)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["place", "alloc", "free"]),
                          st.integers(1, 8), st.integers(0, (1 << 47) >> 21)), max_size=60),
       st.sampled_from([AW39, AW48, [(0, 0xFFFFFFFF)], [(0x1000, 0x7FFFFFFF), (1 << 34, (1 << 35) - 1)]]))
def test_allocations_never_overlap_and_stay_valid(ops, ranges):
    a = IovaAllocator(ranges)
    live = []
    rng = random.Random(len(ops))
    for op, pages, va in ops:
        size = pages * 2 * MiB
        try:
            if op == "free" and live:
                iova, n = live.pop(rng.randrange(len(live)))
                a.free(iova, n)
                continue
            iova = a.place(va << 21, size) if op == "place" else a.alloc(size)
        except ResourceExhausted:
            continue
        assert iova != 0 and (op == "place" and iova == va << 21 or iova % (2 * MiB) == 0)
        assert any(s <= iova and iova + size - 1 <= e for s, e in ranges)
        assert iova + size <= MSI_WINDOW[0] or iova > MSI_WINDOW[1]
        live.append((iova, size))
    spans = sorted(live)
    assert all(x + n <= y for (x, n), (y, _) in zip(spans, spans[1:]))
    assert sorted(a.used) == spans


# ---- errors without a vfio kernel ---------------------------------------------------------------
def test_missing_dev_vfio_says_modprobe(tmp_path):
    with pytest.raises(VfioError, match=r"open .*vfio failed: No such file or directory: the vfio "
                                        r"modules are not loaded: modprobe vfio-pci") as info:
        VfioContainer(str(tmp_path / "vfio"))
    assert info.value.errno == errno.ENOENT and info.value.step.startswith("open")


def test_a_file_that_is_not_vfio_fails_cleanly():
    with pytest.raises(VfioError, match=r"VFIO_GET_API_VERSION failed: Inappropriate ioctl") as info:
        VfioContainer("/dev/null")
    assert info.value.errno == errno.ENOTTY


def test_permission_denied_is_permission_required(tmp_path, monkeypatch):
    def denied(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(vfio.os, "open", denied)
    with pytest.raises(VfioPermissionError, match="run as root") as info:
        VfioContainer("/dev/vfio/vfio")
    assert isinstance(info.value, PermissionRequired) and isinstance(info.value, VfioError)


@pytest.fixture
def sysfs(tmp_path):
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_driver("nvme", classes={0x010802})
    fake.add_driver("vfio-pci")
    yield fake
    fake.join()


def test_device_not_bound_to_vfio_pci_is_refused_before_any_ioctl(sysfs):
    make_nvme(sysfs)
    with pytest.raises(VfioError, match=r"0000:00:10.0 is bound to nvme, not vfio-pci: bind it "
                                        r"first") as info:
        VfioDevice("0000:00:10.0", root=sysfs)
    assert info.value.device == "0000:00:10.0" and info.value.step == "check driver"


def test_device_without_iommu_group_is_refused(sysfs):
    make_nvme(sysfs, group=None, driver="vfio-pci")
    with pytest.raises(VfioError, match="has no IOMMU group"):
        VfioDevice("0000:00:10.0", root=sysfs)


def test_missing_vfio_node_names_the_device(sysfs, tmp_path):
    make_nvme(sysfs, driver="vfio-pci")
    with pytest.raises(VfioError, match=r"^0000:00:10.0: vfio container: open .* modprobe vfio-pci"):
        VfioDevice("0000:00:10.0", root=sysfs, dev_dir=str(tmp_path / "dev-vfio"))


def test_not_viable_message_lists_members_and_drivers(sysfs):
    sysfs.add_driver("lpc_ich")
    sysfs.add_device("0000:00:1f.0", driver="lpc_ich", iommu_group=7)
    sysfs.add_device("0000:00:1f.3", driver="vfio-pci", iommu_group=7)
    sysfs.add_device("0000:00:1f.5", iommu_group=7)
    assert not_viable_message(7, sysfs) == (
        "IOMMU group 7 is not viable: bind every device in it to vfio-pci (or unbind it from its "
        "driver). Members: 0000:00:1f.0 (lpc_ich), 0000:00:1f.3 (vfio-pci), 0000:00:1f.5 "
        "(no driver)")


# ---- life cycle over a fake vfio kernel ---------------------------------------------------------
class FakeVfioKernel:
    """Answers vfio ioctls for files in a fake /dev/vfio (regular files, so _open works for
    real). The device fd is a regular file holding BAR0 at 0 and config space at 0x10000."""

    CONFIG_OFF = 0x10000

    def __init__(self, tmp_path, sysfs, ranges=AW48, viable=True, noiommu=False, ext=(1, 3)):
        self.dir = tmp_path / "dev-vfio"
        self.dir.mkdir()
        self.sysfs, self.ranges, self.viable = sysfs, ranges, viable
        self.ext = set(ext) | ({vfio.VFIO_NOIOMMU_IOMMU} if noiommu else set())
        self.noiommu = noiommu
        self.maps, self.calls, self.fail = {}, [], {}
        (self.dir / "vfio").touch()
        self.devfile = tmp_path / "device"
        with open(self.devfile, "wb") as f:
            f.write(bytes(self.CONFIG_OFF + 256))
            f.seek(self.CONFIG_OFF)
            f.write(struct.pack("<HHH", 0x1B36, 0x0010, 0x0103))
        self.open_groups = set()

    def add_group(self, n):
        (self.dir / (f"noiommu-{n}" if self.noiommu else str(n))).touch()

    def _kind(self, fd):
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def ioctl(self, fd, request, arg, device, step):
        kind = self._kind(fd)
        self.calls.append((kind, step))
        if step in self.fail:
            raise vfio._fail(device, step, OSError(self.fail[step], os.strerror(self.fail[step])))
        if request == vfio.VFIO_GET_API_VERSION:
            return 0
        if request == vfio.VFIO_CHECK_EXTENSION:
            return int(arg in self.ext)
        if request == vfio.VFIO_GROUP_GET_STATUS:
            struct.pack_into("<I", arg, 4, vfio.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0)
            return 0
        if request == vfio.VFIO_GROUP_SET_CONTAINER:
            assert self._kind(struct.unpack("<i", arg)[0]) == "vfio"
            self.open_groups.add(kind)
            return 0
        if request == vfio.VFIO_SET_IOMMU:
            assert arg in self.ext and self.open_groups
            self.iommu = arg
            return 0
        if request == vfio.VFIO_IOMMU_GET_INFO:
            reply = iommu_info_reply(self.ranges, avail=65535)
            if struct.unpack_from("<I", arg)[0] < len(reply):
                struct.pack_into("<I", arg, 0, len(reply))       # "give me a bigger buffer"
            else:
                arg[:len(reply)] = reply
            return 0
        if request == vfio.VFIO_IOMMU_MAP_DMA:
            _, _, vaddr, iova, size = struct.unpack("<IIQQQ", arg)
            assert any(s <= iova and iova + size - 1 <= e for s, e in self.ranges)
            assert all(iova + size <= i or i + n <= iova for i, (_, n) in self.maps.items())
            self.maps[iova] = (vaddr, size)
            return 0
        if request == vfio.VFIO_IOMMU_UNMAP_DMA:
            _, _, iova, size = struct.unpack("<IIQQ", arg)
            assert self.maps.pop(iova)[1] == size
            return 0
        if request == vfio.VFIO_GROUP_GET_DEVICE_FD:
            assert bytes(arg).rstrip(b"\0").decode() == "0000:00:10.0"
            return os.open(self.devfile, os.O_RDWR)
        if request == vfio.VFIO_DEVICE_GET_INFO:
            arg[:] = struct.pack("<IIII", 16, vfio.VFIO_DEVICE_FLAGS_PCI | vfio.VFIO_DEVICE_FLAGS_RESET,
                                 9, 5)
            return 0
        if request == vfio.VFIO_DEVICE_GET_REGION_INFO:
            index = struct.unpack_from("<I", arg, 8)[0]
            reply = region_reply(0x4000, RW_MMAP, sparse=[(0, 0x2000), (0x3000, 0x1000)]) \
                if index == 0 else region_reply(256, 0x3, offset=self.CONFIG_OFF) \
                if index == 7 else region_reply(0, 0)
            if struct.unpack_from("<I", arg)[0] < len(reply):
                struct.pack_into("<I", arg, 0, len(reply))
            else:
                arg[:len(reply)] = reply
            return 0
        if request == vfio.VFIO_DEVICE_RESET:
            return 0
        raise AssertionError(f"unexpected ioctl 0x{request:x}")


@pytest.fixture
def kernel(tmp_path, sysfs, monkeypatch):
    make_nvme(sysfs, group=5, driver="vfio-pci")
    k = FakeVfioKernel(tmp_path, sysfs)
    k.add_group(5)
    monkeypatch.setattr(vfio, "_ioctl", k.ioctl)
    return k


def open_device(kernel, memmap):
    container = VfioContainer(str(kernel.dir / "vfio"), memmap)
    return VfioDevice("0000:00:10.0", container, root=kernel.sysfs, dev_dir=str(kernel.dir))


def test_attach_maps_existing_and_new_regions_and_the_last_close_unmaps(kernel):
    m = MemMap("va", "test")
    m.register(HIGH_VA, 4 * MiB)                       # a DMA region from before the attach
    dev = open_device(kernel, m)
    c = dev.container
    assert c.iommu_type == vfio.VFIO_TYPE1v2_IOMMU and m.mapper is c
    assert kernel.maps == {HIGH_VA: (HIGH_VA, 4 * MiB)}
    m.register(HIGH_VA + 8 * MiB, 2 * MiB)
    assert m.translate(HIGH_VA + 8 * MiB + 5) == (HIGH_VA + 8 * MiB + 5, 1)
    assert c.mappings == {HIGH_VA: (HIGH_VA, 4 * MiB), HIGH_VA + 8 * MiB: (HIGH_VA + 8 * MiB, 2 * MiB)}
    m.unregister(HIGH_VA + 8 * MiB, 2 * MiB)
    assert list(kernel.maps) == [HIGH_VA]
    dev.close()
    assert kernel.maps == {} and m.mapper is None and c.closed and c.groups == {}
    assert m.translate(HIGH_VA) == (HIGH_VA, 1)        # back to IOVA = VA without a mapper
    dev.close()                                        # idempotent


def test_narrow_aperture_translates_through_allocated_iovas(kernel):
    kernel.ranges = AW39
    m = MemMap("va", "test")
    m.register(HIGH_VA, 2 * MiB)
    dev = open_device(kernel, m)
    assert dev.container.iommu_info.aperture_bits == 39
    assert m.translate(HIGH_VA + 0x123) == (4 * GiB + 0x123, 1)
    assert kernel.maps == {4 * GiB: (HIGH_VA, 2 * MiB)}
    dev.close()


def test_bar_config_space_bus_master_and_reset(kernel):
    dev = open_device(kernel, MemMap("va", "test"))
    bar = dev.map_bar(0)
    assert bar.size == 0x2000                     # MSI-X table not mappable: area at 0 only
    assert dev.map_bar(0) is bar
    assert dev.config_read(0, 2) == 0x1B36 and dev.config_read(2, 2) == 0x0010
    assert dev.enable_bus_master() == 0x0107 and dev.config_read(4, 2) == 0x0107
    dev.reset()
    with pytest.raises(InvalidArgument):
        dev.config_read(255, 2)
    with pytest.raises(InvalidArgument):
        dev.config_read(0, 3)
    with pytest.raises(InvalidArgument):
        dev.config_write(4, 2, 0x10000)
    with pytest.raises(InvalidArgument):
        dev.map_bar(6)
    with pytest.raises(VfioError, match="BAR1 is not implemented"):
        dev.map_bar(1)
    dev.close()
    with pytest.raises(VfioError, match="closed"):
        dev.config_read(0, 2)
    with pytest.raises(Exception, match="closed"):
        bar.r32(0)


def test_not_viable_group_is_refused_and_nothing_stays_open(kernel):
    kernel.viable = False
    m = MemMap("va", "test")
    with pytest.raises(VfioError, match=r"^0000:00:10.0: IOMMU group 5 is not viable: bind every "
                                        r"device in it to "
                                        r"vfio-pci.*0000:00:10.0 \(vfio-pci\)") as info:
        open_device(kernel, m)
    assert info.value.step == "VFIO_GROUP_GET_STATUS" and m.mapper is None


def test_busy_group_and_busy_device_say_so(kernel):
    kernel.fail["VFIO_GROUP_GET_DEVICE_FD"] = errno.EBUSY
    c = VfioContainer(str(kernel.dir / "vfio"), MemMap("va", "test"))
    with pytest.raises(VfioError, match=r"0000:00:10.0: VFIO_GROUP_GET_DEVICE_FD failed: Device "
                                        r"or resource busy: the device is in use by another process"):
        VfioDevice("0000:00:10.0", c, root=kernel.sysfs, dev_dir=str(kernel.dir))
    assert c.closed and c.groups == {}           # the group was let go again


def test_a_failed_dma_map_leaves_nothing_mapped(kernel):
    kernel.fail["VFIO_IOMMU_MAP_DMA"] = errno.ENOMEM
    m = MemMap("va", "test")
    m.register(HIGH_VA, 2 * MiB)
    with pytest.raises(VfioError, match=r"VFIO_IOMMU_MAP_DMA failed: Cannot allocate memory: cannot "
                                        r"pin that much memory.*vaddr 0x7f4f91400000"):
        open_device(kernel, m)
    assert m.mapper is None and kernel.maps == {}


def test_noiommu_group_switches_the_map_to_physical_addresses(tmp_path, sysfs, monkeypatch):
    make_nvme(sysfs, group=5, driver="vfio-pci")
    kernel = FakeVfioKernel(tmp_path, sysfs, noiommu=True)
    kernel.add_group(5)
    monkeypatch.setattr(vfio, "_ioctl", kernel.ioctl)
    m = MemMap("va", "test")
    dev = open_device(kernel, m)
    assert dev.noiommu and kernel.iommu == vfio.VFIO_NOIOMMU_IOMMU
    assert m.mode == "pa" and m.mapper is None
    assert not any(step == "VFIO_IOMMU_GET_INFO" for _, step in kernel.calls)
    dev.close()
    assert m.mode == "va"


def test_a_kernel_without_type1_is_refused(kernel):
    kernel.ext = set()
    with pytest.raises(VfioError, match="no usable IOMMU type"):
        open_device(kernel, MemMap("va", "test"))


def test_container_map_dma_argument_errors(kernel):
    dev = open_device(kernel, MemMap("va", "test"))
    c = dev.container
    with pytest.raises(InvalidArgument):
        c.map_dma(HIGH_VA + 1, 2 * MiB)
    with pytest.raises(InvalidArgument, match="no DMA mapping"):
        c.unmap_dma(HIGH_VA, 2 * MiB)
    dev.close()
    with pytest.raises(VfioError, match="closed"):
        c.map_dma(HIGH_VA, 2 * MiB)


def test_get_container_is_one_per_process_until_closed(kernel, monkeypatch):
    monkeypatch.setattr(vfio, "_container", None)
    path = str(kernel.dir / "vfio")
    c = vfio.get_container(path)
    assert vfio.get_container(path) is c
    c.close()
    assert vfio._container is None
    c2 = vfio.get_container(path)
    assert c2 is not c
    c2.close()


def test_region_info_is_validated(kernel):
    dev = open_device(kernel, MemMap("va", "test"))
    with pytest.raises(InvalidArgument):
        dev.region_info(9)
    assert isinstance(dev.region_info(7), RegionInfo) and dev.region_info(7).offset == 0x10000
    dev.close()
