"""Corrupt stores: every broken structure gives a clear BlobstoreCorrupt on load - never a crash,
a hang or another exception - and `blob.check` reports it (and repairs what it can when asked).
Ends with a fuzzer that flips random bytes of the metadata."""
import random
import struct

import pytest

import bdev
from bdev import malloc
from blob import Blobstore, BlobstoreCorrupt
from blob.check import check
from env.crc32c import crc32c
from blob.layout import PAGE, decode_super, encode_super
from blob.mdpage import HEADER
from tests.blob.helpers import Store, crash, fresh_name, pattern

CLUSTER = 16 << 10


def _populated(clean=True):
    """The image of a store with a few blobs (several with multi-page chains), a snapshot and a
    clone; unloaded cleanly or dropped (dirty). Returns (image, store facts)."""
    s = Store(size=4 << 20, cluster_size=CLUSTER, md_pages=64)
    bs, ch = s.bs, s.ch
    ids = []
    for i in range(5):
        bid = bs.create(num_clusters=3, thin=bool(i % 2),
                        xattrs={f"k{j}": bytes([i]) * 3000 for j in range(i % 3 + 1)})
        h = bs.open(bid)
        h.write(ch, pattern(4096, i), i * 10)
        h.close()
        ids.append(bid)
    sid = bs.snapshot(ids[0])
    cid = bs.clone(sid)
    facts = {"ids": ids, "snapshot": sid, "clone": cid, "geometry": bs.geometry,
             "chains": {b: list(bs.blobs[b].pages) for b in bs.blobs}}
    s.put_channel()
    if clean:
        bs.unload()
    else:
        crash(bs)
    d = bdev.open_bdev(s.name)
    c = d.get_io_channel()
    image = bytearray(s.bdev.size)
    d.read_sync(c, image, 0)
    c.put()
    d.close()
    s.bdev.unregister()
    return image, facts


@pytest.fixture(scope="module")
def clean_image():
    return _populated(clean=True)


@pytest.fixture(scope="module")
def dirty_image():
    return _populated(clean=False)


def _load(image):
    name = fresh_name("Corrupt")
    b = malloc.create(name, size=len(image))
    try:
        d = bdev.open_bdev(name, write=True)
        c = d.get_io_channel()
        d.write_sync(c, bytes(image), 0)
        c.put()
        d.close()
        bs = Blobstore.load(name)
        bs.unload()
        return check(name)
    finally:
        b.unregister()


def _check(image, repair=False):
    name = fresh_name("Corrupt")
    b = malloc.create(name, size=len(image))
    try:
        d = bdev.open_bdev(name, write=True)
        c = d.get_io_channel()
        d.write_sync(c, bytes(image), 0)
        c.put()
        d.close()
        report = check(name, repair=repair)
        after = Blobstore.load(name) if repair else None
        if after is not None:
            out = (report, sorted(after))
            after.unload()
            return out
        return report
    finally:
        b.unregister()


def _recrc(image, at):
    struct.pack_into("<I", image, at + PAGE - 4, crc32c(bytes(image[at:at + PAGE - 4])))


def _md_at(facts, page):
    return (facts["geometry"].md_start + page) * PAGE


def _super_of(image):
    for slot in (1, 0):
        try:
            sb = decode_super(bytes(image[slot * PAGE:(slot + 1) * PAGE]), slot, 512,
                              len(image) // 512)
        except BlobstoreCorrupt:
            continue
        return sb
    raise AssertionError("no super block")


def _newest_slot(image):
    sbs = []
    for slot in (0, 1):
        try:
            sbs.append(decode_super(bytes(image[slot * PAGE:(slot + 1) * PAGE]), slot, 512,
                                    len(image) // 512))
        except BlobstoreCorrupt:
            pass
    return max(sbs, key=lambda s: s.super_seq)


def test_the_images_load(clean_image, dirty_image):
    assert _load(clean_image[0]).ok and _load(dirty_image[0]).ok


def test_both_super_blocks_broken(clean_image):
    image = bytearray(clean_image[0])
    rng = random.Random(1)
    image[0:2 * PAGE] = rng.randbytes(2 * PAGE)
    with pytest.raises(BlobstoreCorrupt, match="no valid super block"):
        _load(image)
    assert "super block" in _check(image).kinds()


def test_newest_super_block_broken_falls_back_and_is_caught(clean_image):
    image = bytearray(clean_image[0])
    sb = _newest_slot(image)
    image[sb.slot * PAGE + 100] ^= 0xFF            # torn: checksum fails; the older one is used
    # the older super block is the load before the clean unload: dirty -> rebuilt, consistent
    report = _load(image)
    assert report.ok


@pytest.mark.parametrize("clean", [True, False])
def test_a_metadata_page_with_a_bad_checksum(clean, clean_image, dirty_image):
    image, facts = clean_image if clean else dirty_image
    image = bytearray(image)
    chain = facts["chains"][facts["ids"][2]]        # three pages
    assert len(chain) >= 2
    image[_md_at(facts, chain[1]) + 200] ^= 0x01
    with pytest.raises(BlobstoreCorrupt, match="not valid|checksum"):
        _load(image)
    report = _check(image)
    assert not report.ok


def test_a_cycle_in_a_chain(dirty_image):
    image, facts = dirty_image
    image = bytearray(image)
    chain = facts["chains"][facts["ids"][2]]
    last = _md_at(facts, chain[-1])
    struct.pack_into("<I", image, last + 40, chain[0])        # the last page leads to the head
    _recrc(image, last)
    with pytest.raises(BlobstoreCorrupt, match="cycle|points on"):
        _load(image)
    assert "broken chain" in _check(image).kinds()


def test_a_chain_that_leads_outside_the_region(dirty_image):
    image, facts = dirty_image
    image = bytearray(image)
    chain = facts["chains"][facts["ids"][1]]
    head = _md_at(facts, chain[0])
    struct.pack_into("<I", image, head + 36, 2)               # chain_len 2, next out of range
    struct.pack_into("<I", image, head + 40, 1 << 30)
    _recrc(image, head)
    with pytest.raises(BlobstoreCorrupt, match="outside the metadata region"):
        _load(image)


def test_extents_past_the_end(clean_image):
    image, facts = clean_image
    image = bytearray(image)
    head = _md_at(facts, facts["chains"][facts["ids"][0]][0])   # (now the snapshot's clone)
    sid_head = _md_at(facts, facts["chains"][facts["snapshot"]][0])
    # the snapshot holds blob 1's clusters: find its first EXTENTS run and push it off the end
    at = sid_head + HEADER.size
    off = 0
    while True:
        dtype, _, length = struct.unpack_from("<BBH", image, at + off)
        if dtype == 2:
            struct.pack_into("<I", image, at + off + 4 + 8, facts["geometry"].total_clusters - 1)
            break
        off += 4 + length
    _recrc(image, sid_head)
    with pytest.raises(BlobstoreCorrupt, match="outside the data clusters"):
        _load(image)
    assert head != sid_head


def _set_bitmap_bit(image, start_page, bit, attr):
    """Flip a bitmap bit and give the newest (clean) super block the matching checksum."""
    sb = _newest_slot(image)
    region = {"cluster_bitmap_crc": (sb.geometry.cluster_bitmap_start,
                                     sb.geometry.cluster_bitmap_pages),
              "md_bitmap_crc": (sb.geometry.md_bitmap_start, sb.geometry.md_bitmap_pages),
              "blobid_bitmap_crc": (sb.geometry.blobid_bitmap_start,
                                    sb.geometry.blobid_bitmap_pages)}[attr]
    at = start_page * PAGE + bit // 8
    image[at] ^= 1 << (bit % 8)
    first, n = region
    setattr(sb, attr, crc32c(bytes(image[first * PAGE:(first + n) * PAGE])))
    image[sb.slot * PAGE:(sb.slot + 1) * PAGE] = encode_super(sb)


def test_a_blob_id_bitmap_that_disagrees(clean_image):
    image = bytearray(clean_image[0])
    g = clean_image[1]["geometry"]
    _set_bitmap_bit(image, g.blobid_bitmap_start, 40, "blobid_bitmap_crc")
    with pytest.raises(BlobstoreCorrupt, match="blob-id bitmap disagrees"):
        _load(image)
    report = _check(image)
    assert "blob-id bitmap" in report.kinds()
    report, ids = _check(image, repair=True)
    assert report.repaired and len(ids) == 7


def test_a_leaked_cluster_is_caught_and_repaired(clean_image):
    image = bytearray(clean_image[0])
    g = clean_image[1]["geometry"]
    _set_bitmap_bit(image, g.cluster_bitmap_start, g.total_clusters - 2, "cluster_bitmap_crc")
    with pytest.raises(BlobstoreCorrupt, match="used-cluster bitmap disagrees"):
        _load(image)
    report = _check(image)
    assert report.kinds() == ["leaked clusters"]
    report, ids = _check(image, repair=True)
    assert report.repaired and len(ids) == 7
    assert "leaked" not in report.text().split("repaired")[-1]


def test_a_bitmap_that_does_not_match_its_checksum(clean_image):
    image = bytearray(clean_image[0])
    g = clean_image[1]["geometry"]
    image[g.md_bitmap_start * PAGE + 3] ^= 0x10
    with pytest.raises(BlobstoreCorrupt, match="does not match the checksum"):
        _load(image)


def test_check_repairs_a_broken_chain_by_dropping_the_blob(dirty_image):
    image, facts = dirty_image
    image = bytearray(image)
    victim = facts["ids"][4]
    chain = facts["chains"][victim]
    image[_md_at(facts, chain[1]) + 300] ^= 0xFF
    report, ids = _check(image, repair=True)
    assert report.dropped == [victim] and victim not in ids and len(ids) == 6


def test_a_double_reference_is_caught(clean_image):
    image, facts = clean_image
    image = bytearray(image)
    # give blob 3 (thick) the first cluster the clone's snapshot holds
    g = facts["geometry"]
    tgt = _md_at(facts, facts["chains"][facts["ids"][2]][0])
    src = _md_at(facts, facts["chains"][facts["snapshot"]][0])

    def first_run(at):
        off = 0
        while True:
            dtype, _, length = struct.unpack_from("<BBH", image, at + HEADER.size + off)
            if dtype == 2:
                return at + HEADER.size + off + 4 + 8
            off += 4 + length
    start = struct.unpack_from("<I", image, first_run(src))[0]
    assert start >= g.data_start_cluster
    struct.pack_into("<I", image, first_run(tgt), start)
    _recrc(image, tgt)
    with pytest.raises(BlobstoreCorrupt, match="held by blobs"):
        _load(image)
    assert "double reference" in _check(image).kinds()


# ---- the fuzzer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clean", [True, False])
def test_fuzz_random_bytes_in_the_metadata(clean, clean_image, dirty_image):
    """Random damage to the super blocks, bitmaps and metadata pages: load either works (the
    damage hit bytes nothing reads, or a torn-looking page a dirty load may ignore) and leaves a
    consistent store, or raises BlobstoreCorrupt. Nothing else, and no hang."""
    base, facts = clean_image if clean else dirty_image
    g = facts["geometry"]
    rng = random.Random(12345 + clean)
    md_end = (g.md_start + g.md_pages) * PAGE
    used = sorted({p for chain in facts["chains"].values() for p in chain})
    outcomes = {"loaded": 0, "corrupt": 0}
    for i in range(150):
        image = bytearray(base)
        what = rng.choice(["super", "bitmap", "page", "page", "page", "anywhere"])
        if what == "super":
            spots = [rng.randrange(0, 2 * PAGE)]
        elif what == "bitmap":
            spots = [rng.randrange(2 * PAGE, g.md_start * PAGE)]
        elif what == "page":
            p = rng.choice(used)
            spots = [_md_at(facts, p) + rng.randrange(PAGE) for _ in range(rng.randint(1, 4))]
        else:
            spots = [rng.randrange(0, md_end) for _ in range(rng.randint(1, 8))]
        for at in spots:
            image[at] = rng.randrange(256)
        if rng.random() < 0.5:
            # re-checksummed: the damage must be caught by the rules, not the CRC
            for at in spots:
                page = at // PAGE * PAGE
                if page >= g.md_start * PAGE and image[page:page + 4] == b"UBMD":
                    _recrc(image, page)
        try:
            report = _load(image)
        except BlobstoreCorrupt:
            outcomes["corrupt"] += 1
            continue
        assert report.ok, f"iteration {i}: loaded, but check finds:\n{report.text()}"
        outcomes["loaded"] += 1
    assert outcomes["corrupt"] > 20
