"""The on-disk format (blob/FORMAT.md): geometry, super block and metadata chains round-trip, and
every broken rule is reported as BlobstoreCorrupt."""
import struct
import uuid

import pytest

from blob.bitmap import Bitmap
from env.crc32c import crc32c
from blob.errors import BlobstoreCorrupt
from blob.layout import PAGE, Geometry, SuperBlock, decode_super, encode_super, store_tag
from blob.mdpage import (FLAG_PENDING, FLAG_SNAPSHOT, FLAG_THIN, MAX_XATTR_VALUE, NO_NEXT, BlobMd,
                         decode_chain, encode_chain, page_count, page_state, runs_of)
from env.errors import InvalidArgument

G = Geometry.compute(131072, 512, 1 << 20, 64)
U = uuid.UUID("12345678-1234-5678-1234-567812345678")
TAG = store_tag(U)


def test_geometry_regions_follow_each_other():
    assert (G.cluster_bitmap_start, G.md_bitmap_start, G.blobid_bitmap_start, G.md_start) == \
        (2, 3, 4, 5)
    assert G.total_clusters == 64 and G.data_start_cluster == 1
    g = Geometry.compute(1 << 24, 4096, 4096)          # 64 GiB of 4 KiB clusters
    assert g.md_pages == g.total_clusters // 32        # capped at 1/32 of the device
    assert Geometry.compute(131072, 512, 1 << 20).md_pages == 64
    assert g.cluster_bitmap_pages == -(-g.total_clusters // 32768)
    assert g.data_start_cluster * g.cluster_size >= (g.md_start + g.md_pages) * PAGE


@pytest.mark.parametrize("args,match", [
    ((131072, 512, 3000), "power of two"),
    ((131072, 8192, 1 << 20), "I/O unit"),
    ((2048, 512, 1 << 20), "no data cluster"),
    ((131072, 512, 1 << 20, 0), "md_pages"),
])
def test_impossible_geometries_are_refused(args, match):
    with pytest.raises(InvalidArgument, match=match):
        Geometry.compute(*args)


def _super(**kw):
    sb = SuperBlock(G, U, clean=True, super_seq=3, next_md_seq=9, cluster_bitmap_crc=1,
                    md_bitmap_crc=2, blobid_bitmap_crc=3)
    for k, v in kw.items():
        setattr(sb, k, v)
    return sb


def test_super_block_round_trip():
    data = encode_super(_super())
    assert len(data) == PAGE and data[:8] == b"UBLKBLOB"
    sb = decode_super(data, 1, 512, 131072)
    assert (sb.clean, sb.super_seq, sb.next_md_seq, sb.uuid, sb.geometry) == \
        (True, 3, 9, U, G)
    # little-endian, fixed offsets (FORMAT.md)
    assert struct.unpack_from("<I", data, 8)[0] == 1
    assert struct.unpack_from("<Q", data, 16)[0] == 3
    assert struct.unpack_from("<I", data, 48)[0] == 1 << 20
    assert struct.unpack_from("<I", data, 4092)[0] == crc32c(data[:4092])


def _recrc(page):
    page = bytearray(page)
    struct.pack_into("<I", page, PAGE - 4, crc32c(page[:PAGE - 4]))
    return bytes(page)


def _patch(data, off, fmt, value):
    page = bytearray(data)
    struct.pack_into(fmt, page, off, value)
    return _recrc(page)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: b"XXXXXXXX" + d[8:], "signature"),
    (lambda d: d[:100] + b"\x01" + d[101:], "checksum"),
    (lambda d: _patch(d, 8, "<I", 2), "version 2"),
    (lambda d: _patch(d, 12, "<I", 7), "clean flag"),
    (lambda d: _patch(d, 44, "<I", 4096), "I/O unit"),
    (lambda d: _patch(d, 48, "<I", 12345), "impossible geometry"),
    (lambda d: _patch(d, 120, "<Q", 77), "md_start"),
    (lambda d: _patch(d, 160, "<Q", 1 << 40), "spans"),
    (lambda d: _patch(d, 300, "<B", 1), "reserved"),
    (lambda d: bytes(PAGE), "empty"),
])
def test_broken_super_blocks_are_named(mutate, match):
    with pytest.raises(BlobstoreCorrupt, match=match):
        decode_super(mutate(encode_super(_super())), 1, 512, 131072)


def test_super_block_in_the_wrong_slot():
    with pytest.raises(BlobstoreCorrupt, match="belongs in slot"):
        decode_super(encode_super(_super(super_seq=4)), 1, 512, 131072)


def _md(n_runs=3, xattrs=None, **kw):
    runs = []
    c = G.data_start_cluster
    for i in range(n_runs):
        runs.append((c + 2 * i, 1) if i % 2 == 0 else (0, 2))
    num = sum(n for _, n in runs)
    return BlobMd(7, num, FLAG_THIN, 0, 0, runs, xattrs or {"name": b"x"}, **kw)


def _pages_of(md, indices, seq=5):
    return dict(zip(indices, encode_chain(md, seq, indices, TAG)))


def test_chain_round_trip_over_several_pages():
    g = Geometry.compute(1 << 22, 512, 4096, 4000)
    runs = [(g.data_start_cluster + 2 * i, 1) for i in range(1200)]     # no two contiguous
    md = BlobMd(9, 1200, FLAG_SNAPSHOT, 3, 0, runs,
                {f"k{i}": bytes([i]) * 1000 for i in range(12)})
    n = page_count(md)
    assert n >= 5
    idx = [50, 3, 400, 7, 8, 9, 1000, 11][:n]
    pages = dict(zip(idx, encode_chain(md, 77, idx, store_tag(U))))
    for i, p in pages.items():
        assert page_state(p, i, store_tag(U)) == "valid"
    out = decode_chain(idx[0], pages.__getitem__, g, store_tag(U))
    assert (out.blob_id, out.num_clusters, out.flags, out.parent_id, out.seq) == \
        (9, 1200, FLAG_SNAPSHOT, 3, 77)
    assert out.runs == runs and out.xattrs == md.xattrs and out.pages == idx


def test_runs_of():
    assert runs_of([0, 0, 5, 6, 7, 0, 9]) == [(0, 2), (5, 3), (0, 1), (9, 1)]


def _decode(pages, head):
    return decode_chain(head, lambda i: pages.get(i, bytes(PAGE)), G, TAG)


def test_cycle_in_a_chain_is_found():
    md = _md(xattrs={f"k{i}": b"v" * 3000 for i in range(3)})
    assert page_count(md) == 3
    pages = _pages_of(md, [10, 11, 12])
    # page 11 points back to 10 (and claims the chain is longer)
    pages[11] = _patch(pages[11], 40, "<I", 10)
    with pytest.raises(BlobstoreCorrupt, match="cycle|another chain"):
        _decode(pages, 10)


@pytest.mark.parametrize("what,match", [
    ("next_outside", "outside the metadata region"),
    ("missing", "not valid"),
    ("other_seq", "another chain"),
    ("short", "ends after"),
])
def test_broken_chains(what, match):
    md = _md(xattrs={f"k{i}": b"v" * 3000 for i in range(2)})
    pages = _pages_of(md, [20, 21])
    if what == "next_outside":
        pages[20] = _patch(pages[20], 40, "<I", 999)
    elif what == "missing":
        del pages[21]
    elif what == "other_seq":
        pages[21] = _patch(pages[21], 24, "<Q", 6)
    elif what == "short":
        pages[20] = _patch(pages[20], 40, "<I", NO_NEXT)
    with pytest.raises(BlobstoreCorrupt, match=match):
        _decode(pages, 20)


def test_extents_past_the_end_of_the_device():
    md = BlobMd(7, 2, 0, 0, 0, [(G.total_clusters - 1, 2)], {})
    pages = _pages_of(md, [3])
    with pytest.raises(BlobstoreCorrupt, match="outside the data clusters"):
        _decode(pages, 3)


def test_extents_over_the_metadata():
    md = BlobMd(7, 1, 0, 0, 0, [(0, 1)], {})       # fine: unallocated
    _decode(_pages_of(md, [3]), 3)
    g2 = Geometry.compute(131072, 512, 4096, 64)
    md = BlobMd(7, 1, 0, 0, 0, [(2, 1)], {})
    with pytest.raises(BlobstoreCorrupt, match="outside the data clusters"):
        decode_chain(3, dict(zip([3], encode_chain(md, 1, [3], TAG))).__getitem__, g2, TAG)


def test_extents_that_do_not_cover_the_blob():
    md = _md()
    md.num_clusters += 1
    with pytest.raises(BlobstoreCorrupt, match="extents cover"):
        _decode(_pages_of(md, [3]), 3)


def test_unknown_flags_and_pending_rules():
    md = _md()
    md.flags = 1 << 9
    with pytest.raises(BlobstoreCorrupt, match="unknown flags"):
        _decode(_pages_of(md, [3]), 3)
    md.flags = FLAG_PENDING
    with pytest.raises(BlobstoreCorrupt, match="PENDING"):
        _decode(_pages_of(md, [3]), 3)
    md.flags = FLAG_SNAPSHOT | FLAG_PENDING
    md.origin_id = 2
    _decode(_pages_of(md, [3]), 3)


def test_page_states():
    md = _md()
    page = encode_chain(md, 1, [4], TAG)[0]
    assert page_state(page, 4, TAG) == "valid"
    assert page_state(page, 5, TAG) == "says it is page 4"
    assert page_state(page, 4, TAG + 1).startswith("belongs to another store")
    assert page_state(bytes(PAGE), 4, TAG) == "zero"
    assert page_state(page[:10] + b"!" + page[11:], 4, TAG) == "checksum mismatch"


def test_xattr_limits():
    md = BlobMd(1, 0, 0, 0, 0, [], {"v": b"x" * MAX_XATTR_VALUE, "n" * 255: b""})
    out = _decode(_pages_of(md, [1, 2]), 1)
    assert out.xattrs == md.xattrs


def test_bitmap_round_trip_and_search():
    b = Bitmap(70000)
    for i in (0, 5, 64, 65535, 69999):
        assert b.set(i)
    assert not b.set(5)
    assert b.count == 5 and b.find_set(6) == 64 and b.find_clear(64) == 65
    data = b.to_bytes(3 * 4096)
    assert len(data) == 3 * 4096 and data[0] == 0b100001
    assert Bitmap.from_bytes(data, 70000) == b
    assert b.set_bits() == [0, 5, 64, 65535, 69999]
    with pytest.raises(InvalidArgument):
        b.test(70000)
