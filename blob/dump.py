"""What a store holds, decoded, without loading it (`userblk blob dump`): both super block slots,
the bitmaps' counts (when clean), and metadata pages - each blob's current chain, or every valid
page - with their descriptors."""
import struct

import bdev as _bdev
from blob.bitmap import Bitmap
from blob.errors import BlobstoreCorrupt
from blob.layout import PAGE, SUPER_SLOTS, decode_super
from blob.load import choose_super, scan_chunk
from blob.mdpage import (BLOB_DESC, D_BLOB, D_EXTENTS, D_XATTR, DESC, FLAG_PENDING, FLAG_SNAPSHOT,
                         FLAG_THIN, HEADER, RUN, XATTR_HEAD, header_of)

CHUNK = 256


def _flags(f):
    names = [n for bit, n in ((FLAG_THIN, "thin"), (FLAG_SNAPSHOT, "snapshot"),
                              (FLAG_PENDING, "pending")) if f & bit]
    return names + ([f"unknown:{f & ~7:#x}"] if f & ~7 else [])


def _show(v):
    try:
        s = bytes(v).decode()
        if s.isprintable():
            return s
    except UnicodeDecodeError:
        pass
    return "0x" + bytes(v).hex()


def descriptors(page):
    """The descriptors of one metadata page, decoded as far as they go."""
    h = header_of(page)
    area = page[HEADER.size:HEADER.size + min(h.desc_len, PAGE - HEADER.size - 4)]
    out = []
    off = 0
    while off + DESC.size <= len(area):
        dtype, _, length = DESC.unpack_from(area, off)
        body = bytes(area[off + DESC.size:off + DESC.size + length])
        d = {"type": dtype, "length": length}
        if dtype == D_BLOB and length == BLOB_DESC.size:
            n, flags, parent, origin, pclusters = BLOB_DESC.unpack(body)
            d.update(kind="blob", num_clusters=n, flags=_flags(flags), parent_id=parent,
                     origin_id=origin, parent_clusters=pclusters)
        elif dtype == D_EXTENTS and length >= 8:
            first = struct.unpack_from("<Q", body)[0]
            runs = [RUN.unpack_from(body, k) for k in range(8, length - RUN.size + 1, RUN.size)]
            d.update(kind="extents", first_cluster=first, runs=[list(r) for r in runs])
        elif dtype == D_XATTR and length >= XATTR_HEAD.size:
            nlen, vlen = XATTR_HEAD.unpack_from(body)
            d.update(kind="xattr", name=_show(body[4:4 + nlen]),
                     value=_show(body[4 + nlen:4 + nlen + vlen]))
        else:
            d.update(kind="unknown")
        out.append(d)
        off += DESC.size + length
    return out


def dump(bdev, blob=None, all_pages=False):
    """A dict of what the store on `bdev` holds (see the module)."""
    desc = _bdev.open_bdev(bdev)
    ch = desc.get_io_channel()
    try:
        b = desc.bdev

        def read(first, count):
            buf = bytearray(count * PAGE)
            desc.read_sync(ch, buf, first * PAGE)
            return buf
        raw = read(0, SUPER_SLOTS)
        slots = [bytes(raw[i * PAGE:(i + 1) * PAGE]) for i in range(SUPER_SLOTS)]
        out = {"bdev": b.name, "super_blocks": []}
        for i, s in enumerate(slots):
            try:
                sb = decode_super(s, i, b.block_size, b.num_blocks)
                out["super_blocks"].append({
                    "slot": i, "valid": True, "super_seq": sb.super_seq, "clean": sb.clean,
                    "uuid": str(sb.uuid), "next_md_seq": sb.next_md_seq})
            except BlobstoreCorrupt as e:
                out["super_blocks"].append({"slot": i, "valid": False, "error": str(e)})
        try:
            sb = choose_super(slots, b.block_size, b.num_blocks)
        except BlobstoreCorrupt as e:
            out["error"] = str(e)
            return out
        g = sb.geometry
        out["geometry"] = {k: getattr(g, k) for k in (
            "io_unit_size", "cluster_size", "device_blocks", "total_clusters", "md_pages",
            "cluster_bitmap_start", "cluster_bitmap_pages", "md_bitmap_start",
            "md_bitmap_pages", "blobid_bitmap_start", "blobid_bitmap_pages", "md_start",
            "data_start_cluster")}
        out["clean"] = sb.clean
        if sb.clean:
            out["bitmaps"] = {}
            for what, start, n, nbits in (
                    ("used_clusters", g.cluster_bitmap_start, g.cluster_bitmap_pages,
                     g.total_clusters),
                    ("used_md_pages", g.md_bitmap_start, g.md_bitmap_pages, g.md_pages),
                    ("blob_ids", g.blobid_bitmap_start, g.blobid_bitmap_pages, g.md_pages + 1)):
                bm = Bitmap.from_bytes(bytes(read(start, n)), nbits)
                out["bitmaps"][what] = {"set": bm.count, "bits": nbits}
        pages, headers = {}, []
        bad = 0
        for s in range(0, g.md_pages, CHUNK):
            bad += scan_chunk(read(g.md_start + s, min(CHUNK, g.md_pages - s)), s,
                              sb.store_tag, pages, headers)
        out["invalid_pages"] = bad
        best = {}
        for h in headers:
            if h[3] == 0 and (h[1] not in best or h[2] > best[h[1]][2]):
                best[h[1]] = h
        current = set()
        for bid, h in best.items():
            idx, n = h[0], h[4]
            for _ in range(n):
                current.add(idx)
                nxt = header_of(pages[idx]).next if idx in pages else 0xFFFFFFFF
                if nxt not in pages:
                    break
                idx = nxt
        listed = []
        for h in sorted(headers, key=lambda h: (h[1], -h[2], h[3])):
            index, bid, seq, pos, n, nxt = h
            if blob is not None and bid != blob:
                continue
            if not all_pages and index not in current:
                continue
            listed.append({"page": index, "blob_id": bid, "seq": seq, "chain_pos": pos,
                           "chain_len": n, "next": None if nxt == 0xFFFFFFFF else nxt,
                           "current": index in current,
                           "descriptors": descriptors(pages[index])})
        out["pages"] = listed
        return out
    finally:
        ch.put()
        desc.close()


def format_text(d):
    lines = []
    for s in d["super_blocks"]:
        if s["valid"]:
            lines.append(f"super block slot {s['slot']}: seq {s['super_seq']}, "
                         f"{'clean' if s['clean'] else 'dirty'}, uuid {s['uuid']}, "
                         f"next_md_seq {s['next_md_seq']}")
        else:
            lines.append(f"super block slot {s['slot']}: not valid ({s['error']})")
    if "error" in d:
        lines.append(d["error"])
        return "\n".join(lines)
    g = d["geometry"]
    lines.append(f"geometry: {g['total_clusters']} clusters of {g['cluster_size']} bytes (data "
                 f"from cluster {g['data_start_cluster']}), I/O unit {g['io_unit_size']}, "
                 f"{g['md_pages']} metadata pages from page {g['md_start']}")
    for what, v in d.get("bitmaps", {}).items():
        lines.append(f"bitmap {what}: {v['set']} of {v['bits']} set")
    if d["invalid_pages"]:
        lines.append(f"{d['invalid_pages']} metadata page(s) neither valid nor zero")
    for p in d["pages"]:
        cur = "" if p["current"] else " (not current)"
        lines.append(f"page {p['page']}: blob {p['blob_id']} seq {p['seq']} "
                     f"{p['chain_pos'] + 1}/{p['chain_len']} next {p['next']}{cur}")
        for x in p["descriptors"]:
            if x["kind"] == "blob":
                lines.append(f"    BLOB clusters {x['num_clusters']} flags "
                             f"{','.join(x['flags']) or '-'} parent {x['parent_id'] or '-'}"
                             f" ({x['parent_clusters']} clusters)"
                             + (f" origin {x['origin_id']}" if x["origin_id"] else ""))
            elif x["kind"] == "extents":
                runs = " ".join(f"{s}+{c}" if s else f"-+{c}" for s, c in x["runs"])
                lines.append(f"    EXTENTS from {x['first_cluster']}: {runs}")
            elif x["kind"] == "xattr":
                v = x["value"]
                lines.append(f"    XATTR {x['name']} = {v if len(v) < 60 else v[:57] + '...'}")
            else:
                lines.append(f"    descriptor type {x['type']} ({x['length']} bytes)")
    return "\n".join(lines)
