"""Metadata pages and their descriptors (FORMAT.md: "Metadata pages").

A blob's metadata (`BlobMd`) becomes a chain of 4096-byte pages with `encode_chain`, and comes
back with `decode_chain`, which checks every rule of the format and raises BlobstoreCorrupt
naming the blob, the page and the rule.
"""
import struct

import attrs

from env.crc32c import crc32c
from blob.errors import BlobstoreCorrupt
from blob.layout import PAGE

MAGIC = b"UBMD"
HEADER = struct.Struct("<4sIQQQIIIHH")
assert HEADER.size == 48
AREA = PAGE - HEADER.size - 4            # 4044 bytes of descriptors per page
NO_NEXT = 0xFFFFFFFF

DESC = struct.Struct("<BBH")             # type, reserved, payload length
D_BLOB, D_EXTENTS, D_XATTR = 1, 2, 3
BLOB_DESC = struct.Struct("<QQQQQ")      # num_clusters, flags, parent_id, origin_id,
                                         # parent_clusters
RUN = struct.Struct("<II")
XATTR_HEAD = struct.Struct("<HH")

FLAG_THIN = 1
FLAG_SNAPSHOT = 2
FLAG_PENDING = 4
KNOWN_FLAGS = FLAG_THIN | FLAG_SNAPSHOT | FLAG_PENDING

MAX_XATTR_NAME = 255
# one XATTR descriptor fits on one page with the longest name
MAX_XATTR_VALUE = AREA - DESC.size - XATTR_HEAD.size - MAX_XATTR_NAME
_RUNS_HEAD = DESC.size + 8               # an EXTENTS descriptor before its runs


@attrs.define
class BlobMd:
    """A blob's metadata as the format holds it. `runs`: (start, count) pairs covering the
    blob's clusters in order (start 0: unallocated). `pages`: the chain's page indices."""
    blob_id: int
    num_clusters: int = 0
    flags: int = 0
    parent_id: int = 0
    origin_id: int = 0
    runs: list = attrs.Factory(list)
    xattrs: dict = attrs.Factory(dict)
    seq: int = 0
    pages: list = attrs.Factory(list)
    parent_clusters: int = 0

    @property
    def clusters(self):
        """Every device cluster the blob holds."""
        out = []
        for start, count in self.runs:
            if start:
                out.extend(range(start, start + count))
        return out


def runs_of(clusters):
    """Run-length form of a per-cluster list (0: unallocated)."""
    runs = []
    for c in clusters:
        if runs:
            start, count = runs[-1]
            if (start == 0 and c == 0) or (start and c == start + count):
                runs[-1] = (start, count + 1)
                continue
        runs.append((c, 1))
    return runs


# ---- encoding -----------------------------------------------------------------------------------
def chain_areas(md):
    """The descriptor areas of the chain's pages (bytes each, <= AREA): one per page."""
    pages = [bytearray()]

    def room():
        return AREA - len(pages[-1])

    def put(desc):
        if len(desc) > room():
            pages.append(bytearray())
        pages[-1] += desc

    put(DESC.pack(D_BLOB, 0, BLOB_DESC.size)
        + BLOB_DESC.pack(md.num_clusters, md.flags, md.parent_id, md.origin_id,
                         md.parent_clusters))
    runs = list(md.runs)
    first = 0
    i = 0
    while i < len(runs):
        fit = (room() - _RUNS_HEAD) // RUN.size
        if fit <= 0:
            pages.append(bytearray())
            continue
        chunk = runs[i:i + fit]
        payload = struct.pack("<Q", first) + b"".join(RUN.pack(s, c) for s, c in chunk)
        pages[-1] += DESC.pack(D_EXTENTS, 0, len(payload)) + payload
        first += sum(c for _, c in chunk)
        i += len(chunk)
    for name in sorted(md.xattrs):
        nb = name.encode()
        value = bytes(md.xattrs[name])
        payload = XATTR_HEAD.pack(len(nb), len(value)) + nb + value
        put(DESC.pack(D_XATTR, 0, len(payload)) + payload)
    return pages


def page_count(md):
    """How many pages `md`'s chain takes."""
    return len(chain_areas(md))


def encode_chain(md, seq, page_indices, tag, areas=None):
    """The pages of `md`'s chain (bytes each) for pages `page_indices` (page_count(md) of them,
    head first), with sequence number `seq`, for the store of tag `tag` (`areas`: what
    chain_areas(md) gave, if the caller has it)."""
    if areas is None:
        areas = chain_areas(md)
    if len(areas) != len(page_indices):
        raise ValueError(f"the chain takes {len(areas)} pages, {len(page_indices)} given")
    n = len(areas)
    out = []
    for pos, (area, index) in enumerate(zip(areas, page_indices)):
        nxt = page_indices[pos + 1] if pos + 1 < n else NO_NEXT
        page = bytearray(PAGE)
        HEADER.pack_into(page, 0, MAGIC, index, tag, md.blob_id, seq, pos, n, nxt, len(area), 0)
        page[HEADER.size:HEADER.size + len(area)] = area
        struct.pack_into("<I", page, PAGE - 4, crc32c(memoryview(page)[:PAGE - 4]))
        out.append(bytes(page))
    return out


# ---- decoding -----------------------------------------------------------------------------------
@attrs.frozen
class PageHeader:
    index: int
    blob_id: int
    seq: int
    chain_pos: int
    chain_len: int
    next: int
    desc_len: int


def page_state(data, index, tag):
    """"valid", "zero" (a free or wiped page) or a reason the page is not valid."""
    if data[:4] != MAGIC:
        return "zero" if not any(data) else "no metadata page magic"
    if crc32c(memoryview(data)[:PAGE - 4]) != struct.unpack_from("<I", data, PAGE - 4)[0]:
        return "checksum mismatch"
    _, idx, t, *_ = HEADER.unpack_from(data)
    if t != tag:
        return "belongs to another store (store tag)"
    if idx != index:
        return f"says it is page {idx}"
    return "valid"


def header_of(data):
    """The header of a page already known valid (page_state)."""
    (_, index, _, blob_id, seq, pos, n, nxt, desc_len, _) = HEADER.unpack_from(data)
    return PageHeader(index, blob_id, seq, pos, n, nxt, desc_len)


def decode_chain(head, read_page, geometry, tag):
    """The BlobMd whose head page is `head` (a valid page's index). `read_page(i)` gives the
    bytes of metadata page i. Raises BlobstoreCorrupt for any broken rule."""
    g = geometry
    data = read_page(head)
    h = header_of(data)
    bid = h.blob_id
    where = f"blob {bid} (chain at metadata page {head})"

    def bad(msg, page=None):
        at = f", page {page}" if page is not None else ""
        return BlobstoreCorrupt(f"{where}{at}: {msg}", where, bid)

    if h.chain_pos != 0:
        raise bad(f"the head page has chain position {h.chain_pos}", head)
    if not 1 <= bid <= g.md_pages:
        raise bad(f"blob id outside 1 ... {g.md_pages}", head)
    if not 1 <= h.chain_len <= g.md_pages:
        raise bad(f"chain length {h.chain_len} outside 1 ... {g.md_pages}", head)
    md = BlobMd(bid, seq=h.seq)
    pages = [head]
    descs = []
    seen = {head}
    cur, hdr = data, h
    while True:
        if hdr.desc_len > AREA:
            raise bad(f"{hdr.desc_len} bytes of descriptors (at most {AREA})", pages[-1])
        descs.append((pages[-1], bytes(cur[HEADER.size:HEADER.size + hdr.desc_len])))
        tail = cur[HEADER.size + hdr.desc_len:PAGE - 4]
        if tail.count(0) != len(tail) or struct.unpack_from("<H", cur, 46)[0]:
            raise bad("bytes after the descriptors (or reserved ones) are not zero", pages[-1])
        if hdr.chain_pos + 1 == h.chain_len:
            if hdr.next != NO_NEXT:
                raise bad(f"the last page (of {h.chain_len}) points on to page {hdr.next}",
                          pages[-1])
            break
        nxt = hdr.next
        if nxt == NO_NEXT:
            raise bad(f"the chain ends after {len(pages)} of {h.chain_len} pages", pages[-1])
        if nxt >= g.md_pages:
            raise bad(f"next page {nxt} is outside the metadata region ({g.md_pages} pages)",
                      pages[-1])
        if nxt in seen:
            raise bad(f"next page {nxt} is already in the chain (a cycle)", pages[-1])
        cur = read_page(nxt)
        state = page_state(cur, nxt, tag)
        if state != "valid":
            raise bad(f"page {len(pages)} of the chain is not valid: {state}", nxt)
        hdr = header_of(cur)
        if (hdr.blob_id, hdr.seq, hdr.chain_len, hdr.chain_pos) != (bid, h.seq, h.chain_len,
                                                                    len(pages)):
            raise bad(f"page {nxt} belongs to another chain (blob {hdr.blob_id}, seq "
                      f"{hdr.seq}, position {hdr.chain_pos} of {hdr.chain_len})", nxt)
        seen.add(nxt)
        pages.append(nxt)
    md.pages = pages
    _decode_descriptors(md, descs, g, bad)
    return md


def _decode_descriptors(md, descs, g, bad):
    have_blob = False
    covered = 0
    runs = md.runs
    for page, area in descs:
        off = 0
        first_on_page = True
        while off < len(area):
            if off + DESC.size > len(area):
                raise bad("a descriptor header crosses the end of the descriptors", page)
            dtype, res, length = DESC.unpack_from(area, off)
            body = area[off + DESC.size:off + DESC.size + length]
            if res or len(body) != length:
                raise bad(f"descriptor at byte {off} overruns the page or has reserved bits",
                          page)
            if dtype == D_BLOB:
                if have_blob or page != md.pages[0] or not first_on_page:
                    raise bad("the BLOB descriptor is not the first of the head page, or "
                              "appears twice", page)
                if length != BLOB_DESC.size:
                    raise bad(f"BLOB descriptor of {length} bytes", page)
                (md.num_clusters, md.flags, md.parent_id, md.origin_id,
                 md.parent_clusters) = BLOB_DESC.unpack(body)
                have_blob = True
            elif not have_blob:
                raise bad("the chain does not start with a BLOB descriptor", page)
            elif dtype == D_EXTENTS:
                if length < 8 + RUN.size or (length - 8) % RUN.size:
                    raise bad(f"EXTENTS descriptor of {length} bytes", page)
                first = struct.unpack_from("<Q", body)[0]
                if first != covered:
                    raise bad(f"extents start at blob cluster {first}, expected {covered}", page)
                for k in range(8, length, RUN.size):
                    start, count = RUN.unpack_from(body, k)
                    if count == 0:
                        raise bad("an extent of 0 clusters", page)
                    if start and (start < g.data_start_cluster
                                  or start + count > g.total_clusters):
                        raise bad(f"extent {start} +{count} lies outside the data clusters "
                                  f"{g.data_start_cluster} ... {g.total_clusters - 1}", page)
                    runs.append((start, count))
                    covered += count
            elif dtype == D_XATTR:
                if length < XATTR_HEAD.size:
                    raise bad("XATTR descriptor too short", page)
                nlen, vlen = XATTR_HEAD.unpack_from(body)
                if not 1 <= nlen <= MAX_XATTR_NAME or XATTR_HEAD.size + nlen + vlen != length:
                    raise bad("XATTR lengths do not add up", page)
                try:
                    name = body[4:4 + nlen].decode()
                except UnicodeDecodeError:
                    raise bad("an xattr name is not UTF-8", page) from None
                if name in md.xattrs:
                    raise bad(f"xattr {name!r} appears twice", page)
                md.xattrs[name] = body[4 + nlen:]
            else:
                raise bad(f"unknown descriptor type {dtype}", page)
            off += DESC.size + length
            first_on_page = False
    if not have_blob:
        raise bad("the chain has no BLOB descriptor")
    if covered != md.num_clusters:
        raise bad(f"extents cover {covered} clusters, the blob has {md.num_clusters}")
    if md.flags & ~KNOWN_FLAGS:
        raise bad(f"unknown flags {md.flags & ~KNOWN_FLAGS:#x}")
    if md.flags & FLAG_PENDING and not md.flags & FLAG_SNAPSHOT:
        raise bad("PENDING without SNAPSHOT")
    if bool(md.flags & FLAG_PENDING) != bool(md.origin_id):
        raise bad("origin_id without PENDING (or PENDING without origin_id)")
    if md.parent_id == md.blob_id:
        raise bad("the blob is its own parent")
    if md.parent_clusters > md.num_clusters or (md.parent_clusters and not md.parent_id):
        raise bad(f"it reads {md.parent_clusters} clusters through its parent "
                  f"({md.parent_id}) and has {md.num_clusters}")
