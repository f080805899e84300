"""The store's geometry and its super block (FORMAT.md: "Layout" and "Super block").

`Geometry.compute(...)` derives every region from the three numbers that define a store (device
size, cluster size, metadata pages); `encode_super` / `decode_super` turn a super block into its
4096 bytes and back, checking every rule of the format.
"""
import struct
import uuid as _uuid

import attrs

from env.crc32c import crc32c
from blob.errors import BlobstoreCorrupt
from env.errors import InvalidArgument

PAGE = 4096
VERSION = 1
SIGNATURE = b"UBLKBLOB"
BITS_PER_PAGE = PAGE * 8
SUPER_SLOTS = 2                      # pages 0 and 1
MIN_CLUSTER = 4096
MAX_CLUSTER = 1 << 30
DEFAULT_CLUSTER = 1 << 20
MIN_MD_PAGES = 64
MAX_MD_PAGES = (1 << 32) - 2

# offsets of the super block's fields (FORMAT.md)
_SUPER = struct.Struct("<8sIIQ16sIIIIQQQQQQQQQQQIIIIQ")
assert _SUPER.size == 168


def _pages_for_bits(n):
    return max(1, -(-n // BITS_PER_PAGE))


@attrs.frozen
class Geometry:
    """Where everything is, in pages (regions) and clusters (data)."""
    io_unit_size: int
    cluster_size: int
    device_blocks: int
    total_clusters: int
    md_pages: int
    cluster_bitmap_start: int
    cluster_bitmap_pages: int
    md_bitmap_start: int
    md_bitmap_pages: int
    blobid_bitmap_start: int
    blobid_bitmap_pages: int
    md_start: int
    data_start_cluster: int

    @property
    def units_per_cluster(self):
        return self.cluster_size // self.io_unit_size

    @property
    def blocks_per_page(self):
        return PAGE // self.io_unit_size

    @property
    def data_clusters(self):
        return self.total_clusters - self.data_start_cluster

    def page_lba(self, page):
        """The bdev block where page `page` (from the device start) begins."""
        return page * self.blocks_per_page

    def md_lba(self, md_page):
        return (self.md_start + md_page) * self.blocks_per_page

    def cluster_lba(self, cluster):
        return cluster * self.units_per_cluster

    @staticmethod
    def compute(device_blocks, io_unit_size, cluster_size, md_pages=None):
        """The layout of a store on `device_blocks` blocks of `io_unit_size` bytes. Raises
        InvalidArgument for a combination that cannot make a store (the caller's mistake at init;
        a loader turns it into BlobstoreCorrupt)."""
        if io_unit_size < 512 or io_unit_size > PAGE or io_unit_size & (io_unit_size - 1):
            raise InvalidArgument(f"the I/O unit (the bdev's block size) must be a power of two "
                                  f"from 512 to {PAGE} bytes, not {io_unit_size}")
        if (cluster_size < MIN_CLUSTER or cluster_size > MAX_CLUSTER
                or cluster_size & (cluster_size - 1)):
            raise InvalidArgument(f"cluster_size must be a power of two from {MIN_CLUSTER} to "
                                  f"{MAX_CLUSTER} bytes, not {cluster_size}")
        total = device_blocks * io_unit_size // cluster_size
        if total >= 1 << 32:
            raise InvalidArgument(f"{total} clusters of {cluster_size} bytes are too many (the "
                                  f"format counts clusters in 32 bits): use larger clusters")
        if md_pages is None:
            # one page per cluster (a blob needs one), but never more than 1/32 of the device
            md_pages = max(MIN_MD_PAGES, min(total, device_blocks * io_unit_size // (32 * PAGE)))
        if not 1 <= md_pages <= MAX_MD_PAGES:
            raise InvalidArgument(f"md_pages must be 1 ... {MAX_MD_PAGES}, not {md_pages}")
        cb = _pages_for_bits(total)
        mb = _pages_for_bits(md_pages)
        ib = _pages_for_bits(md_pages + 1)
        cb_start = SUPER_SLOTS
        mb_start = cb_start + cb
        ib_start = mb_start + mb
        md_start = ib_start + ib
        md_end_bytes = (md_start + md_pages) * PAGE
        data_start = -(-md_end_bytes // cluster_size)
        if data_start >= total:
            raise InvalidArgument(
                f"a {device_blocks * io_unit_size}-byte bdev leaves no data cluster after "
                f"{md_pages} metadata pages and the bitmaps with {cluster_size}-byte clusters "
                f"(it has {total} clusters; the metadata ends in cluster {data_start}): use a "
                "larger bdev, smaller clusters or fewer md_pages")
        return Geometry(io_unit_size, cluster_size, device_blocks, total, md_pages,
                        cb_start, cb, mb_start, mb, ib_start, ib, md_start, data_start)


@attrs.define
class SuperBlock:
    geometry: Geometry
    uuid: _uuid.UUID
    clean: bool = False
    super_seq: int = 0
    next_md_seq: int = 1
    cluster_bitmap_crc: int = 0
    md_bitmap_crc: int = 0
    blobid_bitmap_crc: int = 0

    @property
    def store_tag(self):
        return store_tag(self.uuid)

    @property
    def slot(self):
        return self.super_seq % SUPER_SLOTS


def store_tag(u):
    """The 64-bit tag every metadata page carries (the UUID's first 8 bytes)."""
    return int.from_bytes(u.bytes[:8], "little")


def encode_super(sb):
    g = sb.geometry
    head = _SUPER.pack(SIGNATURE, VERSION, 1 if sb.clean else 0, sb.super_seq, sb.uuid.bytes,
                       PAGE, g.io_unit_size, g.cluster_size, 0, g.total_clusters,
                       g.data_start_cluster, g.cluster_bitmap_start, g.cluster_bitmap_pages,
                       g.md_bitmap_start, g.md_bitmap_pages, g.blobid_bitmap_start,
                       g.blobid_bitmap_pages, g.md_start, g.md_pages, sb.next_md_seq,
                       sb.cluster_bitmap_crc, sb.md_bitmap_crc, sb.blobid_bitmap_crc, 0,
                       g.device_blocks)
    page = bytearray(PAGE)
    page[:len(head)] = head
    struct.pack_into("<I", page, PAGE - 4, crc32c(memoryview(page)[:PAGE - 4]))
    return bytes(page)


def decode_super(data, slot, block_size, num_blocks):
    """The super block in `data` (4096 bytes of slot `slot`) of a bdev of `num_blocks` blocks of
    `block_size` bytes. Raises BlobstoreCorrupt naming what is wrong."""
    where = f"super block (slot {slot})"
    data = bytes(data)
    if data[:8] != SIGNATURE:
        if not any(data):
            raise BlobstoreCorrupt(f"{where} is empty (zeroes)", where)
        raise BlobstoreCorrupt(f"{where} has no blobstore signature ({data[:8]!r})", where)
    crc = struct.unpack_from("<I", data, PAGE - 4)[0]
    if crc32c(data[:PAGE - 4]) != crc:
        raise BlobstoreCorrupt(f"{where}: checksum mismatch", where)
    (sig, version, clean, super_seq, ubytes, md_page_size, io_unit, cluster, res0, total,
     data_start, cb_start, cb_pages, mb_start, mb_pages, ib_start, ib_pages, md_start, md_pages,
     next_seq, cb_crc, mb_crc, ib_crc, res1, device_blocks) = _SUPER.unpack_from(data)
    if version != VERSION:
        raise BlobstoreCorrupt(f"{where}: format version {version}; this userblk reads "
                               f"version {VERSION}", where)
    if clean not in (0, 1):
        raise BlobstoreCorrupt(f"{where}: clean flag {clean} is neither 0 nor 1", where)
    if res0 or res1 or any(data[_SUPER.size:PAGE - 4]):
        raise BlobstoreCorrupt(f"{where}: reserved bytes are not zero", where)
    if md_page_size != PAGE:
        raise BlobstoreCorrupt(f"{where}: metadata page size {md_page_size}, not {PAGE}", where)
    if io_unit != block_size:
        raise BlobstoreCorrupt(f"{where}: I/O unit {io_unit} bytes, but the bdev's blocks are "
                               f"{block_size} bytes", where)
    if device_blocks > num_blocks:
        raise BlobstoreCorrupt(f"{where}: the store spans {device_blocks} blocks, the bdev has "
                               f"only {num_blocks}", where)
    try:
        g = Geometry.compute(device_blocks, io_unit, cluster, md_pages)
    except InvalidArgument as e:
        raise BlobstoreCorrupt(f"{where}: impossible geometry: {e}", where) from None
    got = (total, data_start, cb_start, cb_pages, mb_start, mb_pages, ib_start, ib_pages,
           md_start)
    want = (g.total_clusters, g.data_start_cluster, g.cluster_bitmap_start,
            g.cluster_bitmap_pages, g.md_bitmap_start, g.md_bitmap_pages,
            g.blobid_bitmap_start, g.blobid_bitmap_pages, g.md_start)
    if got != want:
        names = ("total_clusters", "data_start_cluster", "cluster_bitmap_start",
                 "cluster_bitmap_pages", "md_bitmap_start", "md_bitmap_pages",
                 "blobid_bitmap_start", "blobid_bitmap_pages", "md_start")
        bad = [f"{n} {a} (expected {b})" for n, a, b in zip(names, got, want) if a != b]
        raise BlobstoreCorrupt(f"{where}: regions disagree with the geometry: "
                               f"{', '.join(bad)}", where)
    if super_seq % SUPER_SLOTS != slot:
        raise BlobstoreCorrupt(f"{where}: super_seq {super_seq} belongs in slot "
                               f"{super_seq % SUPER_SLOTS}", where)
    if next_seq == 0:
        raise BlobstoreCorrupt(f"{where}: next_md_seq is 0", where)
    return SuperBlock(g, _uuid.UUID(bytes=ubytes), bool(clean), super_seq, next_seq, cb_crc,
                      mb_crc, ib_crc)
