"""From what the device holds to the blobs of a store (FORMAT.md: "Loading"), checking every rule.

The functions here work on bytes already read (blob.store reads them without blocking): they pick
the super block, find each blob's current chain (clean: the marked pages; dirty: the valid head
with the largest seq), resolve snapshots left PENDING by a crash, check parents and clusters, and
rebuild the bitmaps. Anything that breaks a rule raises BlobstoreCorrupt naming it.
"""
import attrs

from blob.bitmap import Bitmap
from env.crc32c import crc32c
from blob.errors import BlobstoreCorrupt
from blob.layout import PAGE, decode_super
from blob.mdpage import FLAG_PENDING, FLAG_SNAPSHOT, decode_chain
from blob.scan import valid_pages


@attrs.define
class Loaded:
    """The blobs of a store (id -> BlobMd) and what recovery must write."""
    blobs: dict
    max_seq: int = 0
    finalize: list = attrs.Factory(list)   # ids of PENDING snapshots that completed
    dropped: list = attrs.Factory(list)    # BlobMd of PENDING snapshots that did not
    stale_pages: int = 0                   # invalid, non-zero pages seen (dirty load)


def choose_super(slots, block_size, num_blocks):
    """The valid super block with the larger super_seq among `slots` (bytes of pages 0, 1)."""
    found, errors = [], []
    for i, data in enumerate(slots):
        try:
            found.append(decode_super(data, i, block_size, num_blocks))
        except BlobstoreCorrupt as e:
            errors.append(str(e))
    if not found:
        if all(not any(d) for d in slots):
            raise BlobstoreCorrupt("no blobstore on this bdev: both super block slots are empty",
                                   "super block")
        raise BlobstoreCorrupt("no valid super block: " + "; ".join(errors), "super block")
    return max(found, key=lambda s: s.super_seq)


def check_bitmap_crc(data, crc, what):
    if crc32c(data) != crc:
        raise BlobstoreCorrupt(f"the {what} bitmap does not match the checksum in the clean "
                               "super block", f"{what} bitmap")


def bitmap_tail_clear(data, nbits, what):
    """Bits past a bitmap's length are zero (FORMAT.md)."""
    b = Bitmap.from_bytes(data, len(data) * 8)
    i = b.find_set(nbits)
    if i >= 0:
        raise BlobstoreCorrupt(f"the {what} bitmap has bit {i} set, past its {nbits} bits",
                               f"{what} bitmap")


def _decode(head, pages, sb):
    return decode_chain(head, pages.__getitem__, sb.geometry, sb.store_tag)


def from_dirty(pages, headers, sb, bad=0):
    """Blobs from every valid page (`pages`: index -> bytes; `headers` from scan.valid_pages)."""
    max_seq = 0
    best = {}                                # blob id -> header tuple of its newest head
    for h in headers:
        index, bid, seq, pos, n, nxt = h
        max_seq = max(max_seq, seq)
        if pos != 0:
            continue
        cur = best.get(bid)
        if cur is None or seq > cur[2]:
            best[bid] = h
        elif seq == cur[2]:
            raise BlobstoreCorrupt(f"blob {bid} has two head pages ({cur[0]} and {index}) "
                                   f"with seq {seq}", f"blob {bid}", bid)
    lookup = _Pages(pages)
    blobs = {}
    for bid, h in best.items():
        blobs[bid] = _decode(h[0], lookup, sb)
    out = Loaded(blobs, max_seq, stale_pages=bad)
    _resolve_pending(out)
    return out


def from_clean(pages, headers, sb, md_bits, id_bits):
    """Blobs of a clean store: `pages` holds the pages `md_bits` marks; every one of them must be
    part of one chain, and the chains' ids are exactly `id_bits`."""
    marked = set(md_bits.set_bits())
    valid = {h[0] for h in headers}
    broken = sorted(marked - valid)
    if broken:
        raise BlobstoreCorrupt(f"{len(broken)} metadata page(s) marked used are not valid (first: "
                               f"page {broken[0]})", f"metadata page {broken[0]}")
    lookup = _Pages(pages, marked)
    blobs = {}
    used = set()
    max_seq = 0
    for h in headers:
        index, bid, seq, pos, n, nxt = h
        if index not in marked:
            continue
        max_seq = max(max_seq, seq)
        if pos != 0:
            continue
        if bid in blobs:
            raise BlobstoreCorrupt(f"blob {bid} has two chains (head pages "
                                   f"{blobs[bid].pages[0]} and {index})", f"blob {bid}", bid)
        md = _decode(index, lookup, sb)
        if used & set(md.pages):
            raise BlobstoreCorrupt(f"blob {bid}'s chain shares pages with another chain",
                                   f"blob {bid}", bid)
        used |= set(md.pages)
        blobs[bid] = md
    orphans = sorted(marked - used)
    if orphans:
        raise BlobstoreCorrupt(f"{len(orphans)} metadata page(s) marked used belong to no blob "
                               f"(first: page {orphans[0]})", f"metadata page {orphans[0]}")
    ids = set(id_bits.set_bits())
    if ids != set(blobs):
        extra, missing = sorted(ids - set(blobs)), sorted(set(blobs) - ids)
        raise BlobstoreCorrupt(f"the blob-id bitmap disagrees with the metadata: ids marked "
                               f"without a blob {extra[:5]}, blobs not marked {missing[:5]}",
                               "blob-id bitmap")
    if max_seq >= sb.next_md_seq:
        raise BlobstoreCorrupt(f"a metadata page has seq {max_seq}, not below the clean super "
                               f"block's next_md_seq {sb.next_md_seq}", "super block")
    out = Loaded(blobs, max_seq)
    _resolve_pending(out)
    return out


class _Pages:
    """Page lookup for decode_chain: a page not read (or not marked) reads as zeroes."""

    def __init__(self, pages, allowed=None):
        self.pages = pages
        self.allowed = allowed

    def __getitem__(self, i):
        if self.allowed is not None and i not in self.allowed:
            return bytes(PAGE)
        return self.pages.get(i, bytes(PAGE))


def _resolve_pending(out):
    """A PENDING snapshot completed iff its origin's current chain names it as parent."""
    for bid, md in list(out.blobs.items()):
        if not md.flags & FLAG_PENDING:
            continue
        origin = out.blobs.get(md.origin_id)
        if origin is not None and origin.parent_id == bid:
            md.flags &= ~FLAG_PENDING
            md.origin_id = 0
            out.finalize.append(bid)
        else:
            del out.blobs[bid]
            out.dropped.append(md)


def check_relations(blobs, geometry):
    """Parents exist, are snapshots, form no cycle; no cluster is held twice."""
    for bid, md in blobs.items():
        if md.parent_id:
            p = blobs.get(md.parent_id)
            if p is None:
                raise BlobstoreCorrupt(f"blob {bid}'s parent {md.parent_id} does not exist",
                                       f"blob {bid}", bid)
            if not p.flags & FLAG_SNAPSHOT:
                raise BlobstoreCorrupt(f"blob {bid}'s parent {md.parent_id} is not a "
                                       "snapshot", f"blob {bid}", bid)
            if md.parent_clusters > p.num_clusters:
                raise BlobstoreCorrupt(f"blob {bid} reads {md.parent_clusters} clusters through "
                                       f"its parent {md.parent_id}, which has {p.num_clusters}",
                                       f"blob {bid}", bid)
    for bid in blobs:
        seen = set()
        cur = bid
        while cur:
            if cur in seen:
                raise BlobstoreCorrupt(f"blob {bid}: its parents form a cycle",
                                       f"blob {bid}", bid)
            seen.add(cur)
            cur = blobs[cur].parent_id
    owner = {}
    for bid, md in blobs.items():
        for start, count in md.runs:
            if not start:
                continue
            for c in range(start, start + count):
                other = owner.setdefault(c, bid)
                if other != bid:
                    raise BlobstoreCorrupt(f"cluster {c} is held by blobs {other} and "
                                           f"{bid}", f"cluster {c}", bid)
    return owner


def bitmaps_of(blobs, geometry):
    """(used clusters, used metadata pages, blob ids) of these blobs."""
    g = geometry
    clusters = Bitmap(g.total_clusters)
    clusters.set_range(0, g.data_start_cluster)
    pages = Bitmap(g.md_pages)
    ids = Bitmap(g.md_pages + 1)
    for bid, md in blobs.items():
        ids.set(bid)
        for p in md.pages:
            pages.set(p)
        for start, count in md.runs:
            if start:
                clusters.set_range(start, count)
    return clusters, pages, ids


def scan_chunk(data, first_index, tag, pages, headers):
    """Add the valid pages of one chunk read from the metadata region; returns how many pages
    were neither valid nor zeroes."""
    found, bad = valid_pages(data, first_index, tag)
    mv = memoryview(data)
    for h in found:
        k = h[0] - first_index
        pages[h[0]] = bytes(mv[k * PAGE:(k + 1) * PAGE])
        headers.append(h)
    return bad
