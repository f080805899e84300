"""fsck for a blobstore that is not loaded: read everything, report what is wrong, and repair
only when asked.

    from blob.check import check
    report = check("Malloc0")              # a bdev name or Bdev
    print(report.text()); report.ok
    check("Malloc0", repair=True)          # drop what cannot be kept, rebuild the bitmaps

What it looks at (FORMAT.md): both super block slots; the bitmaps, when the store is clean (their
checksums, leaked clusters - marked used but held by no blob -, clusters held but not marked,
pages and ids likewise); every metadata page (bad checksums among the pages in use, or - after a
crash, where torn pages are normal - only counted); every blob's current chain (broken chains,
cycles, extents outside the data region, bad descriptors); snapshots a crash left pending;
parents (missing, not snapshots, cycles); clusters held by two blobs.

Repair: blobs whose chain is broken or whose relations cannot hold (a missing parent, a cluster
another blob also holds - the blob with the newer metadata loses it) are dropped (their head
pages wiped), then the store is loaded - which rebuilds the bitmaps - and unloaded cleanly.
"""
import attrs

import bdev as _bdev
from blob.bitmap import Bitmap
from env.crc32c import crc32c
from blob.errors import BlobstoreCorrupt
from blob.layout import PAGE, SUPER_SLOTS, decode_super
from blob.load import _Pages, choose_super, scan_chunk
from blob.mdpage import FLAG_PENDING, FLAG_SNAPSHOT, decode_chain

CHUNK_PAGES = 256


@attrs.define
class Report:
    problems: list = attrs.Factory(list)       # (kind, message)
    notes: list = attrs.Factory(list)
    blobs: dict = attrs.Factory(dict)          # id -> BlobMd of the blobs that hold
    clean: bool = False
    super_block: object = None
    repaired: bool = False
    dropped: list = attrs.Factory(list)        # ids repair dropped
    broken: dict = attrs.Factory(dict)         # id -> head header of the blobs that cannot hold

    @property
    def ok(self):
        return not self.problems

    def add(self, kind, message):
        self.problems.append((kind, message))

    def kinds(self):
        return sorted({k for k, _ in self.problems})

    def text(self):
        lines = []
        sb = self.super_block
        if sb is not None:
            g = sb.geometry
            lines.append(f"store {sb.uuid}: {'clean' if self.clean else 'dirty (not unloaded)'}, "
                         f"{g.total_clusters} clusters of {g.cluster_size} bytes, "
                         f"{g.md_pages} metadata pages, {len(self.blobs)} blobs")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"{k}: {m}" for k, m in self.problems]
        if self.repaired:
            lines.append("repaired: " + (f"dropped blobs {self.dropped}" if self.dropped else
                                         "bitmaps rebuilt"))
        lines.append("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


class _Reader:
    def __init__(self, desc):
        self.desc = desc
        self.ch = desc.get_io_channel()
        self.bs = desc.bdev.block_size

    def pages(self, first, count):
        buf = bytearray(count * PAGE)
        self.desc.read_sync(self.ch, buf, first * PAGE)
        return buf

    def write_page(self, page, data):
        self.desc.write_sync(self.ch, data, page * PAGE)

    def close(self):
        self.ch.put()


def check(bdev, repair=False):
    """Check (and with repair=True, repair) the store on `bdev`; returns a Report."""
    desc = _bdev.open_bdev(bdev, write=repair)
    r = _Reader(desc)
    report = Report()
    try:
        _check(r, desc.bdev, report)
        if repair and report.super_block is not None and not report.ok:
            _repair(r, desc.bdev, report)
    finally:
        r.close()
        desc.close()
    if report.repaired:
        from blob.store import Blobstore
        Blobstore.load(bdev).unload()
    return report


def _check(r, bdev, report):
    raw = r.pages(0, SUPER_SLOTS)
    slots = [bytes(raw[i * PAGE:(i + 1) * PAGE]) for i in range(SUPER_SLOTS)]
    for i, s in enumerate(slots):
        try:
            decode_super(s, i, bdev.block_size, bdev.num_blocks)
        except BlobstoreCorrupt as e:
            if any(s):
                report.notes.append(f"super block slot {i} is not valid ({e}); the other one "
                                    "is used")
    try:
        sb = choose_super(slots, bdev.block_size, bdev.num_blocks)
    except BlobstoreCorrupt as e:
        report.add("super block", str(e))
        return
    report.super_block = sb
    report.clean = sb.clean
    g = sb.geometry
    tag = sb.store_tag
    pages, headers = {}, []
    bad = 0
    for s in range(0, g.md_pages, CHUNK_PAGES):
        n = min(CHUNK_PAGES, g.md_pages - s)
        bad += scan_chunk(r.pages(g.md_start + s, n), s, tag, pages, headers)
    bitmaps = None
    if sb.clean:
        bitmaps = []
        for start, n, nbits, crc, what in (
                (g.cluster_bitmap_start, g.cluster_bitmap_pages, g.total_clusters,
                 sb.cluster_bitmap_crc, "used-cluster"),
                (g.md_bitmap_start, g.md_bitmap_pages, g.md_pages, sb.md_bitmap_crc,
                 "used-metadata-page"),
                (g.blobid_bitmap_start, g.blobid_bitmap_pages, g.md_pages + 1,
                 sb.blobid_bitmap_crc, "blob-id")):
            data = bytes(r.pages(start, n))
            if crc32c(data) != crc:
                report.add("bad checksum", f"the {what} bitmap does not match its checksum")
            bitmaps.append(Bitmap.from_bytes(data, nbits))
    # each blob's current chain: its valid head with the largest seq
    best = {}
    for h in headers:
        if h[3] == 0 and (h[1] not in best or h[2] > best[h[1]][2]):
            best[h[1]] = h
    lookup = _Pages(pages)
    blobs, broken = {}, {}
    for bid, h in sorted(best.items()):
        try:
            blobs[bid] = decode_chain(h[0], lookup.__getitem__, g, tag)
        except BlobstoreCorrupt as e:
            broken[bid] = h
            report.add("broken chain", str(e))
    if bad:
        if sb.clean:
            marked = set(bitmaps[1].set_bits()) if bitmaps else set()
            valid = {h[0] for h in headers}
            bad_used = sorted(marked - valid)
            if bad_used:
                report.add("bad checksum", f"{len(bad_used)} metadata page(s) in use are not "
                           f"valid (first: page {bad_used[0]})")
            else:
                report.notes.append(f"{bad} unused metadata page(s) hold stale data")
        else:
            report.notes.append(f"{bad} metadata page(s) are neither valid nor zero (torn or "
                                "stale writes: normal after a crash)")
    # pending snapshots
    for bid, md in list(blobs.items()):
        if md.flags & FLAG_PENDING:
            origin = blobs.get(md.origin_id)
            done = origin is not None and origin.parent_id == bid
            report.notes.append(f"snapshot {bid} was being taken of blob {md.origin_id} when "
                                f"the store stopped: {'completed' if done else 'not completed'}"
                                "; load finishes it")
            if not done:
                del blobs[bid]
    # parents
    for bid, md in sorted(blobs.items()):
        p = blobs.get(md.parent_id) if md.parent_id else None
        if md.parent_id and p is None:
            report.add("missing parent", f"blob {bid}'s parent {md.parent_id} does not exist")
            broken[bid] = best[bid]
        elif p is not None and not p.flags & FLAG_SNAPSHOT:
            report.add("bad parent", f"blob {bid}'s parent {md.parent_id} is not a snapshot")
            broken[bid] = best[bid]
    for bid in list(blobs):
        seen, cur = set(), bid
        while cur and cur in blobs:
            if cur in seen:
                report.add("parent cycle", f"blob {bid}: its parents form a cycle")
                broken[bid] = best[bid]
                break
            seen.add(cur)
            cur = blobs[cur].parent_id
    # clusters held twice
    owner = {}
    for bid, md in sorted(blobs.items(), key=lambda kv: kv[1].seq):
        for c in md.clusters:
            if c in owner:
                report.add("double reference", f"cluster {c} is held by blobs {owner[c]} and "
                           f"{bid}")
                broken.setdefault(bid, best[bid])
            else:
                owner[c] = bid
    for bid in broken:
        blobs.pop(bid, None)
    report.blobs = blobs
    report.broken = broken
    if sb.clean and bitmaps is not None:
        clusters, md_bits, id_bits = bitmaps
        used = set(clusters.set_bits()) - set(range(g.data_start_cluster))
        held = {c for md in blobs.values() for c in md.clusters}
        leaked, unmarked = sorted(used - held), sorted(held - used)
        if leaked:
            report.add("leaked clusters", f"{len(leaked)} cluster(s) marked used are held by no "
                       f"blob: {_some(leaked)}")
        if unmarked:
            report.add("unmarked clusters", f"{len(unmarked)} cluster(s) held by blobs are not "
                       f"marked used: {_some(unmarked)}")
        if any(not clusters.test(c) for c in range(g.data_start_cluster)):
            report.add("unmarked clusters", "clusters of the metadata are not marked used")
        chain_pages = {p for md in blobs.values() for p in md.pages}
        marked = set(md_bits.set_bits())
        if marked - chain_pages:
            report.add("leaked pages", f"{len(marked - chain_pages)} metadata page(s) marked used "
                       f"belong to no blob: {_some(sorted(marked - chain_pages))}")
        if chain_pages - marked:
            report.add("unmarked pages", f"{len(chain_pages - marked)} metadata page(s) of blobs "
                       "are not marked used")
        ids = set(id_bits.set_bits())
        if ids != set(blobs):
            extra, missing = sorted(ids - set(blobs)), sorted(set(blobs) - ids)
            report.add("blob-id bitmap", f"ids marked without a blob {_some(extra)}, blobs not "
                       f"marked {_some(missing)}")
        if any(h[2] >= sb.next_md_seq for h in headers if h[0] in chain_pages):
            report.add("sequence", "a metadata page has a seq not below the super block's "
                       "next_md_seq")


def _some(items, n=8):
    s = ", ".join(str(i) for i in items[:n])
    return s + (", ..." if len(items) > n else "")


def _repair(r, bdev, report):
    """Wipe the heads of the blobs that cannot be kept, mark the store dirty (load rebuilds)."""
    from blob.layout import encode_super
    sb = report.super_block
    g = sb.geometry
    for bid, h in sorted(report.broken.items()):
        r.write_page(g.md_start + h[0], bytes(PAGE))
        report.dropped.append(bid)
    sb.super_seq += 1
    sb.clean = False
    r.write_page(sb.slot, encode_super(sb))
    r.desc.flush_sync(r.ch)
    report.repaired = True
