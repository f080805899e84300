"""The blobstore: blobs of clusters on a bdev, with thin provisioning, snapshots and clones.

    from bdev import malloc
    from blob import Blobstore

    malloc.create("Malloc0", size=256 << 20)
    bs = Blobstore.init("Malloc0", cluster_size=1 << 20)
    bid = bs.create(num_clusters=4, xattrs={"name": b"db"})
    blob = bs.open(bid)
    ch = bs.get_io_channel()                       # this thread's channel
    blob.write(ch, b"x" * 4096, 0)                 # offsets and lengths in I/O units
    blob.resize(8); blob.set_xattr("owner", b"me"); blob.sync_md()
    snap = bs.snapshot(bid)                        # blob goes copy-on-write
    clone = bs.clone(snap)
    blob.close(); ch.put(); bs.unload()
    bs = Blobstore.load("Malloc0")

Operations and threads:

- The store belongs to the thread that made or loaded it (its *metadata thread*): metadata
  operations are called there. Data I/O runs on any thread through that thread's channel
  (`bs.get_io_channel()`), at C level (blob.io); the Python methods here wrap it.
- Every operation takes `cb=None`. Without it, the call blocks - it polls the calling thread
  until the operation is done - and returns the result or raises. With it, the call returns at
  once and `cb(result, error)` runs later from a poll of the thread (`error` None on success).
  Never block inside a poller or a callback: give `cb` there. With asyncio, `blob.async_io`
  turns every operation into an awaitable.
- Metadata operations never block the thread: they are generators run by blob.tasks, resumed by
  I/O completions. Operations on one blob that change its structure (resize, snapshot, inflate,
  decouple, delete) run one at a time; others run concurrently.

What is durable when (see FORMAT.md "Updates"): `create`, `delete`, `snapshot`, `clone`,
`inflate`, `decouple_parent` are durable when they complete; `resize` and xattrs when the next
`sync_md` (or `close`) completes; a write when it completes (a write that needed a new cluster
completes after the blob's metadata holding that cluster is durable). A blob's metadata is
committed in groups: every `sync_md` and cluster allocation that arrives while one commit is in
flight shares the next.
"""
import logging
import uuid as _uuid

from blob import tasks
from blob.bitmap import Bitmap
from env.crc32c import crc32c
from blob.errors import (BlobBusy, BlobError, BlobHasClones, BlobIoError, BlobNotFound,
                         BlobReadOnly, BlobstoreClosed, BlobstoreCorrupt, NoSpace)
from blob.io import BlobData, BlobstoreDev, submit_py
from blob.layout import (DEFAULT_CLUSTER, PAGE, SUPER_SLOTS, Geometry, SuperBlock, encode_super,
                         store_tag)
from blob.load import (bitmaps_of, bitmap_tail_clear, check_bitmap_crc, check_relations,
                       choose_super, from_clean, from_dirty, scan_chunk)
from blob.mdio import MdIo
from blob.mdpage import (FLAG_PENDING, FLAG_SNAPSHOT, FLAG_THIN, MAX_XATTR_NAME,
                         MAX_XATTR_VALUE, BlobMd, chain_areas, encode_chain)
from env.errors import InvalidArgument, WrongThreadError
from env.thread import current_thread, for_each_channel

log = logging.getLogger("userblk.blob")

DEFAULT_TIMEOUT = 300.0
READ_CHUNK_PAGES = 256                  # 1 MiB per metadata read at load
COPY_CHUNK = 1 << 20                    # a cluster copy goes through buffers of this size
COPY_BUFFERS = 4
ALLOC_PARALLEL = 16                     # clusters inflate/decouple fill at once
MAX_BLOB_CLUSTERS = (1 << 32) - 1       # a blob's clusters are counted in 32 bits, like the store's
_EIO, _ENOSPC, _ENOENT = 5, 28, 2


class _Alloc:
    """A cluster being given to blob cluster `ci`: the pieces (tokens) and tasks waiting."""
    __slots__ = ("ci", "tokens", "done")

    def __init__(self, ci):
        self.ci = ci
        self.tokens = []
        self.done = tasks.Event()


class _B:
    """The store's record of one blob."""
    __slots__ = ("id", "data", "flags", "parent", "clones", "xattrs", "pages", "seq",
                 "version", "durable_version", "opens", "lock", "dropped", "allocs", "ready",
                 "alloc_count", "committing", "commit_waiters", "commit_idle", "deleting",
                 "listeners", "handles")

    def __init__(self, bid, data):
        self.id = bid
        self.data = data
        data.owner = self
        self.flags = 0
        self.parent = None
        self.clones = set()
        self.xattrs = {}
        self.pages = []
        self.seq = 0
        self.version = 0                 # bumped by every change of the metadata in memory
        self.durable_version = 0         # the version the current chain holds
        self.opens = 0
        self.lock = tasks.Lock()
        self.dropped = []                # clusters the map no longer holds, the chain still does
        self.allocs = {}                 # ci -> _Alloc in progress
        self.ready = {}                  # ci -> cluster filled, waiting for its commit
        self.alloc_count = tasks.Counter()
        self.committing = False
        self.commit_waiters = []
        self.commit_idle = tasks.Counter()
        self.deleting = False
        self.listeners = []
        self.handles = set()

    @property
    def is_snapshot(self):
        return bool(self.flags & FLAG_SNAPSHOT)

    @property
    def dirty(self):
        return self.version != self.durable_version

    def changed(self):
        self.version += 1

    def md(self, extra_flags=0, origin=0):
        return BlobMd(self.id, self.data.num_clusters, self.flags | extra_flags,
                      self.parent.id if self.parent else 0, origin,
                      self.data.runs(self.ready), dict(self.xattrs),
                      parent_clusters=self.data.parent_limit)

    def set_parent(self, parent, limit):
        """Read through `parent` (a _B or None) below cluster `limit`."""
        self.parent = parent
        self.data.set_parent(parent.data if parent is not None else None, limit)


def _check_xattrs(xattrs):
    out = {}
    for name, value in (xattrs or {}).items():
        _check_xattr(name, value)
        out[name] = bytes(value)
    return out


def _check_xattr(name, value):
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"an xattr name is a non-empty str, not {name!r}")
    if len(name.encode()) > MAX_XATTR_NAME:
        raise InvalidArgument(f"xattr name {name[:40]!r}... is longer than {MAX_XATTR_NAME} "
                              "bytes")
    try:
        n = memoryview(value).nbytes
    except TypeError:
        raise InvalidArgument(f"xattr {name!r}: the value must be bytes-like, not "
                              f"{type(value).__name__}") from None
    if n > MAX_XATTR_VALUE:
        raise InvalidArgument(f"xattr {name!r}: a value holds at most {MAX_XATTR_VALUE} bytes, "
                              f"not {n}")


def _count(n, what):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgument(f"{what} must be a non-negative int, not {n!r}")
    return n


class Blobstore:
    """A loaded blobstore (see the module). Make one with `Blobstore.init` or `Blobstore.load`."""

    timeout = DEFAULT_TIMEOUT

    # ---- construction --------------------------------------------------------------------------
    def __init__(self, bdev, *, _token=None):
        if _token is not _CONSTRUCT:
            raise InvalidArgument("use Blobstore.init(bdev, ...) or Blobstore.load(bdev)")
        import bdev as _bdev
        self.thread = current_thread()
        self.desc = _bdev.open_bdev(bdev, write=True)
        self.bdev = self.desc.bdev
        self.loaded = False
        self.loaded_clean = None
        self.closed = False
        self.failed = None
        self._ch = None
        self._dev = None
        self._claimed = False
        try:
            self.bdev.claim(self, self.desc)
            self._claimed = True
            self._ch = self.desc.get_io_channel()
        except BaseException:
            self._close_base()
            raise
        self.io = MdIo(self.desc, self._ch)
        self.blobs = {}
        self.ops = tasks.Counter()
        self._copy_sem = tasks.Semaphore(COPY_BUFFERS)
        self._copy_bufs = []
        self._page_hint = 0
        self._cluster_hint = 0

    @classmethod
    def init(cls, bdev, cluster_size=DEFAULT_CLUSTER, *, md_pages=None, clear="auto", cb=None):
        """Make a new, empty store on `bdev` (a name or a Bdev): clusters of `cluster_size`
        bytes (a power of two, 4 KiB ... 1 GiB), `md_pages` metadata pages (default: one per
        cluster, at most one per 128 KiB, at least 64; a blob takes one page, more with many
        extents or xattrs).
        `clear`: "write_zeroes" zeroes the data region now (then clusters given on first write
        need no zeroing), "none" does not, "auto" (default) zeroes it where the bdev does
        write zeroes itself. Whatever was on the bdev is lost."""
        if clear not in ("auto", "write_zeroes", "none"):
            raise InvalidArgument(f"clear must be auto, write_zeroes or none, not {clear!r}")
        bs = cls(bdev, _token=_CONSTRUCT)
        try:
            g = Geometry.compute(bs.bdev.num_blocks, bs.bdev.block_size, cluster_size, md_pages)
        except BaseException:
            bs._close_base()
            raise
        return bs._run(bs._guarded(bs._init(g, clear)), cb, "init", store_op=False)

    @classmethod
    def load(cls, bdev, *, cb=None):
        """Load the store on `bdev`: after a clean unload its bitmaps are trusted (and checked);
        after a crash they are rebuilt from the metadata pages. Raises BlobstoreCorrupt when the
        bdev does not hold a valid store."""
        bs = cls(bdev, _token=_CONSTRUCT)
        return bs._run(bs._guarded(bs._load()), cb, "load", store_op=False)

    def _guarded(self, gen):
        """Run init/load `gen`; on failure let go of the bdev again."""
        try:
            return (yield from gen)
        except BaseException:
            yield self._hop()
            self._close_base()
            raise

    def _hop(self):
        """A waitable that resumes from a message of the metadata thread: out of any I/O
        completion (a channel may be put there)."""
        return lambda resume: self.thread.send(resume)

    def _close_base(self):
        self.closed = True
        if self._dev is not None:
            self._dev.alloc_handler = None
            self._dev.closed = True
            if not self._dev.is_unregistered:
                self._dev.unregister()
        if self._ch is not None:
            ch, self._ch = self._ch, None
            ch.put()
        if self._claimed:
            self.bdev.release_claim(self)
            self._claimed = False
        self.desc.close()

    def _setup(self, g, sb):
        self.geometry = g
        self.super = sb
        self.uuid = sb.uuid
        self.tag = store_tag(sb.uuid)
        self._dev = BlobstoreDev(self.desc, g.units_per_cluster, self.thread)
        self._dev.alloc_handler = self._on_alloc

    # ---- running operations ----------------------------------------------------------------------
    def _check_thread(self):
        if current_thread() is not self.thread:
            raise WrongThreadError(f"blobstore on {self.bdev.name} belongs to thread "
                                   f"{self.thread.name!r}: call its metadata operations there")

    def _usable(self):
        if self.closed:
            raise BlobstoreClosed(f"the blobstore on {self.bdev.name} is unloaded")
        if self.failed is not None:
            raise BlobIoError(f"the blobstore on {self.bdev.name} stopped after a metadata write "
                              f"failed ({self.failed}); unload and load it again") from None

    def _run(self, gen, cb, name, store_op=True):
        """Run operation `gen`: blocking without `cb`, else cb(result, error) later."""
        self._check_thread()
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"cb must be callable, not {cb!r}")
        if store_op:
            self._usable()
            self.ops.up()

        def finish(value, error):
            if store_op:
                self.ops.down()
            if cb is not None:
                cb(value, error)
            else:
                box.append((value, error))

        box = []
        tasks.run(gen, finish, name)
        if cb is not None:
            return None
        if not box:
            self.thread.run_until(lambda: box, timeout=self.timeout)
        value, error = box[0]
        if error is not None:
            raise error
        return value

    # ---- init and load -------------------------------------------------------------------------
    def _init(self, g, clear):
        sb = SuperBlock(g, _uuid.uuid4(), clean=False, super_seq=1, next_md_seq=1)
        self._setup(g, sb)
        self.used_clusters = Bitmap(g.total_clusters)
        self.used_clusters.set_range(0, g.data_start_cluster)
        self.used_pages = Bitmap(g.md_pages)
        self.used_ids = Bitmap(g.md_pages + 1)
        self.next_seq = 1
        self.known_zero = Bitmap(g.total_clusters)
        if clear == "auto":
            clear = "write_zeroes" if self.bdev.io_type_supported("write_zeroes") else "none"
        if clear == "write_zeroes":
            first = g.cluster_lba(g.data_start_cluster)
            yield self.io.zero_blocks(first, g.device_blocks - first)
            self.known_zero.set_range(g.data_start_cluster, g.data_clusters)
        # no older store's super block may survive: slot 1 first, then slot 0
        yield self.io.write_pages(1, bytes(PAGE))
        yield self.io.flush()
        yield from self._write_super(clean=False)
        self.loaded = True
        log.info("blobstore %s made on %s: %d clusters of %d bytes, %d metadata pages",
                 self.uuid, self.bdev.name, g.total_clusters, g.cluster_size, g.md_pages)
        return self

    def _write_super(self, clean):
        """Write the super block (to the slot the current one does not hold) and flush."""
        sb = self.super
        sb.super_seq += 1
        sb.clean = clean
        sb.next_md_seq = self.next_seq
        yield self.io.write_pages(sb.slot, encode_super(sb))
        yield self.io.flush()

    def _load(self):
        bdev = self.bdev
        if bdev.block_size > PAGE:
            raise BlobstoreCorrupt(f"{bdev.name} has {bdev.block_size}-byte blocks; a blobstore "
                                   f"needs blocks of at most {PAGE} bytes", "super block")
        slots = yield self.io.read_pages(0, SUPER_SLOTS)
        raw = bytes(slots)
        slots.free()
        sb = choose_super([raw[i * PAGE:(i + 1) * PAGE] for i in range(SUPER_SLOTS)],
                          bdev.block_size, bdev.num_blocks)
        g = sb.geometry
        self._setup(g, sb)
        self.loaded_clean = sb.clean          # how this load found the store
        pages, headers = {}, []
        if sb.clean:
            bitmaps = []
            for start, n, nbits, crc, what in (
                    (g.cluster_bitmap_start, g.cluster_bitmap_pages, g.total_clusters,
                     sb.cluster_bitmap_crc, "used-cluster"),
                    (g.md_bitmap_start, g.md_bitmap_pages, g.md_pages, sb.md_bitmap_crc,
                     "used-metadata-page"),
                    (g.blobid_bitmap_start, g.blobid_bitmap_pages, g.md_pages + 1,
                     sb.blobid_bitmap_crc, "blob-id")):
                buf = yield self.io.read_pages(start, n)
                data = bytes(buf)
                buf.free()
                check_bitmap_crc(data, crc, what)
                bitmap_tail_clear(data, nbits, what)
                bitmaps.append(Bitmap.from_bytes(data, nbits))
            clusters, md_bits, id_bits = bitmaps
            if id_bits.test(0):
                raise BlobstoreCorrupt("the blob-id bitmap marks id 0", "blob-id bitmap")
            yield from self._read_md(pages, headers, md_bits)
            loaded = from_clean(pages, headers, sb, md_bits, id_bits)
            next_seq = sb.next_md_seq
        else:
            stale = yield from self._read_md(pages, headers, None)
            loaded = from_dirty(pages, headers, sb, stale)
            next_seq = loaded.max_seq + 1
        owner = check_relations(loaded.blobs, g)
        rebuilt = bitmaps_of(loaded.blobs, g)
        if sb.clean:
            if rebuilt[0] != clusters:
                used = set(clusters.set_bits()) - set(range(g.data_start_cluster))
                held = set(owner)
                leaked, unmarked = sorted(used - held), sorted(held - used)
                raise BlobstoreCorrupt(f"the used-cluster bitmap disagrees with the blobs: "
                                       f"marked but held by no blob {leaked[:5]}, held but not "
                                       f"marked {unmarked[:5]}", "used-cluster bitmap")
        self.used_clusters, self.used_pages, self.used_ids = rebuilt
        self.known_zero = Bitmap(g.total_clusters)
        self.next_seq = next_seq
        # the super block says dirty before anything else is written
        yield from self._write_super(clean=False)
        self._build(loaded.blobs)
        # recovery: snapshots a crash left PENDING
        for md in loaded.dropped:
            yield from self._wipe_chain(md.pages)
        for bid in loaded.finalize:
            old = yield from self._write_chain(self.blobs[bid], self.blobs[bid].md())
            yield from self._wipe_chain(old)
        self.loaded = True
        log.info("blobstore %s loaded from %s (%s): %d blobs", self.uuid, bdev.name,
                 "clean" if self.loaded_clean else "dirty: bitmaps rebuilt", len(self.blobs))
        return self

    def _read_md(self, pages, headers, marked):
        """Read the metadata region (only the `marked` pages, if given) into pages/headers;
        returns how many pages were neither valid nor zero."""
        g = self.geometry
        runs = []
        if marked is None:
            runs = [(s, min(READ_CHUNK_PAGES, g.md_pages - s))
                    for s in range(0, g.md_pages, READ_CHUNK_PAGES)]
        else:
            i = marked.find_set(0)
            while i >= 0:
                j = marked.find_clear(i)
                end = g.md_pages if j < 0 else j
                for s in range(i, end, READ_CHUNK_PAGES):
                    runs.append((s, min(READ_CHUNK_PAGES, end - s)))
                if j < 0:
                    break
                i = marked.find_set(j)
        bad = 0
        window = 8
        for k in range(0, len(runs), window):
            batch = runs[k:k + window]
            bufs = yield tasks.gather(self.io.read_pages(g.md_start + s, n) for s, n in batch)
            for (s, n), buf in zip(batch, bufs):
                bad += scan_chunk(buf, s, self.tag, pages, headers)
                buf.free()
        return bad

    def _build(self, blobs):
        """The in-memory blobs from loaded metadata (parents before children)."""
        for bid, md in blobs.items():
            b = _B(bid, BlobData(self._dev, bid))
            b.flags = md.flags
            b.xattrs = dict(md.xattrs)
            b.pages = list(md.pages)
            b.seq = md.seq
            b.data.set_size(md.num_clusters)
            b.data.load_runs(md.runs)
            b.data.set_read_only(b.is_snapshot)
            self.blobs[bid] = b
        for bid, md in blobs.items():
            if md.parent_id:
                p = self.blobs[md.parent_id]
                self.blobs[bid].set_parent(p, md.parent_clusters)
                p.clones.add(bid)

    # ---- allocation of pages, clusters and ids -------------------------------------------------
    def _take_pages(self, n):
        g = self.geometry
        out = []
        i = self._page_hint
        for _ in range(n):
            p = self.used_pages.find_clear(i)
            if p < 0:
                p = self.used_pages.find_clear(0)
            if p < 0:
                for q in out:
                    self.used_pages.clear(q)
                raise NoSpace(f"no free metadata page on {self.bdev.name} ({g.md_pages} in all; "
                              "init the store with more md_pages)")
            self.used_pages.set(p)
            out.append(p)
            i = p + 1
        self._page_hint = i if i < g.md_pages else 0
        return out

    def _free_pages(self, pages):
        for p in pages:
            self.used_pages.clear(p)

    def _take_cluster(self):
        g = self.geometry
        c = self.known_zero.find_set(self._cluster_hint)
        if c < 0:
            c = self.known_zero.find_set(0)
        if c < 0:
            c = self.used_clusters.find_clear(self._cluster_hint)
            if c < 0:
                c = self.used_clusters.find_clear(g.data_start_cluster)
        if c < 0:
            raise NoSpace(f"no free cluster on {self.bdev.name} ({g.data_clusters} data "
                          "clusters in all)")
        self.used_clusters.set(c)
        zero = self.known_zero.clear(c)
        self._cluster_hint = c + 1 if c + 1 < g.total_clusters else g.data_start_cluster
        return c, zero

    def _release_clusters(self, clusters):
        for c in clusters:
            self.used_clusters.clear(c)

    def _take_id(self):
        bid = self.used_ids.find_clear(1)
        if bid < 0:
            raise NoSpace(f"no free blob id on {self.bdev.name} (at most "
                          f"{self.geometry.md_pages} blobs; init with more md_pages)")
        self.used_ids.set(bid)
        return bid

    # ---- writing metadata ----------------------------------------------------------------
    def _write_chain(self, b, md):
        """Write `md` as blob b's new chain (FORMAT.md "Updates"), then wipe the old one."""
        areas = chain_areas(md)
        n = len(areas)
        pages = self._take_pages(n)
        seq = self.next_seq
        self.next_seq += 1
        data = encode_chain(md, seq, pages, self.tag, areas)
        g = self.geometry
        try:
            if n > 1:
                yield tasks.gather(self.io.write_pages(g.md_start + p, d)
                                   for p, d in zip(pages[1:], data[1:]))
                yield self.io.flush()
        except BaseException:
            self._free_pages(pages)      # nothing points at these pages
            raise
        try:
            yield self.io.write_pages(g.md_start + pages[0], data[0])
            yield self.io.flush()
        except BaseException as e:
            # the head may or may not be on the device: keep its pages, stop writing metadata
            self._fail(e)
            raise
        old = b.pages
        b.pages, b.seq = pages, seq
        return old

    def _retire(self, b, pages):
        """Wipe blob b's superseded chain `pages` in the background (its commits go on
        meanwhile: the newer chain's larger seq wins until then); b.commit_idle counts it, so
        delete and unload wait for it."""
        if not pages:
            return
        b.commit_idle.up()
        tasks.run(self._wipe_chain(pages), lambda v, e: b.commit_idle.down(),
                  name=f"wipe of blob {b.id}'s old chain")

    def _wipe_chain(self, pages):
        """Overwrite a chain's head with zeroes; then its pages are free."""
        if pages:
            try:
                yield self.io.write_pages(self.geometry.md_start + pages[0], bytes(PAGE))
            except BaseException as e:
                self._fail(e)
                raise
            self._free_pages(pages)

    def _fail(self, error):
        if self.failed is None:
            self.failed = error
            log.error("blobstore on %s: a metadata write failed (%s); metadata operations are "
                      "refused until it is loaded again", self.bdev.name, error)

    def _persist(self, b):
        """A waitable: blob b's metadata as it is now (or later) is durable. Persists that arrive
        while one is being written share the next one (group commit)."""
        def start(resume):
            if self.failed is not None:
                resume(None, BlobIoError(f"the blobstore on {self.bdev.name} stopped after a "
                                         f"metadata write failed ({self.failed})"))
                return
            b.commit_waiters.append(resume)
            if not b.committing:
                b.committing = True
                b.commit_idle.up()
                tasks.run(self._commit_loop(b), name=f"commit of blob {b.id}")
        return start

    def _commit_loop(self, b):
        try:
            while b.commit_waiters:
                waiters, b.commit_waiters = b.commit_waiters, []
                ready = dict(b.ready)
                dropped, b.dropped = b.dropped, []
                version = b.version
                try:
                    md = b.md()
                    old = yield from self._write_chain(b, md)
                except BaseException as e:
                    b.dropped = dropped + b.dropped
                    for w in waiters:
                        w(None, e)
                    continue
                b.durable_version = version
                for ci, c in ready.items():
                    if b.ready.get(ci) == c:
                        del b.ready[ci]
                    if ci < b.data.num_clusters and b.data.get(ci) == 0:
                        b.data.set(ci, c)            # published: every thread sees it now
                    else:
                        b.dropped.append(c)           # the blob shrank: the chain holds it
                self._release_clusters(dropped)
                for w in waiters:
                    w()
                self._retire(b, old)
        finally:
            b.committing = False
            b.commit_idle.down()

    # ---- allocation on first write (called by blob.io on the metadata thread) -----------------
    def _on_alloc(self, data, ci, token):
        b = data.owner
        if b is None or b.deleting:
            self._dev.alloc_finished(token, -_ENOENT)
            return
        if self.failed is not None or self.closed:
            self._dev.alloc_finished(token, -_EIO)
            return
        if ci < data.num_clusters and data.get(ci):
            self._dev.alloc_finished(token, 0)
            return
        self._alloc(b, ci, token)

    def _alloc(self, b, ci, token=None):
        """The _Alloc giving blob cluster `ci` a cluster (started if need be); `token` (a
        piece of blob.io) is sent back when it is done."""
        a = b.allocs.get(ci)
        if a is not None:
            if token is not None:
                a.tokens.append(token)
        else:
            a = b.allocs[ci] = _Alloc(ci)
            if token is not None:
                a.tokens.append(token)          # before the task starts: it may end at once
            b.alloc_count.up()
            self.ops.up()
            tasks.run(self._allocate(b, a), name=f"allocation in blob {b.id}")
        return a

    def _allocate(self, b, a):
        status, error = 0, None
        cluster = None
        try:
            if a.ci >= b.data.num_clusters:
                raise InvalidArgument(f"cluster {a.ci} is outside blob {b.id}")
            cluster, zero = self._take_cluster()
            src = b.data.source(a.ci)
            if src:
                yield from self._copy_cluster(src, cluster)
            elif not zero:
                yield self._zero_cluster(cluster)
            b.ready[a.ci] = cluster
            cluster = None                    # the commit owns it now
            yield self._persist(b)
        except NoSpace as e:
            status, error = -_ENOSPC, e
        except BaseException as e:
            status, error = -_EIO, e
            if not isinstance(e, BlobError):
                log.exception("allocation in blob %d failed", b.id)
        finally:
            if cluster is not None:
                self._release_clusters([cluster])
            if error is not None and a.ci in b.ready and self.failed is None:
                self._release_clusters([b.ready.pop(a.ci)])
            del b.allocs[a.ci]
            for t in a.tokens:
                self._dev.alloc_finished(t, status)
            a.done.set(None, error)
            b.alloc_count.down()
            self.ops.down()

    def _zero_cluster(self, c):
        g = self.geometry
        return self.io.zero_blocks(g.cluster_lba(c), g.units_per_cluster)

    def _copy_cluster(self, src, dst):
        """Copy cluster `src` to `dst`, through DMA buffers of at most COPY_CHUNK bytes."""
        g = self.geometry
        yield self._copy_sem.acquire()
        try:
            chunk = min(COPY_CHUNK, g.cluster_size)
            buf = self._copy_bufs.pop() if self._copy_bufs else None
            if buf is None:
                from env import memory
                buf = memory.allocate(chunk)
            try:
                n = chunk // g.io_unit_size
                for off in range(0, g.units_per_cluster, n):
                    yield self.io.read_blocks(g.cluster_lba(src) + off, buf, n)
                    yield self.io.write_blocks(g.cluster_lba(dst) + off, buf, n)
            finally:
                self._copy_bufs.append(buf)
        finally:
            self._copy_sem.release()

    def _fill_new(self, b, cis):
        """Give blob clusters `cis` clusters (zeroed where not known zero), in memory: a thick
        blob's clusters at create or resize. The caller makes them durable."""
        taken = []
        try:
            zeroes = []
            for ci in cis:
                c, zero = self._take_cluster()
                taken.append((ci, c))
                if not zero:
                    zeroes.append(self._zero_cluster(c))
            yield tasks.gather(zeroes)
        except BaseException:
            self._release_clusters([c for _, c in taken])
            raise
        for ci, c in taken:
            b.data.set(ci, c)

    # ---- freezing a blob's I/O --------------------------------------------------------------
    def _freeze(self, b):
        """A waitable: new requests of blob b park on their channels, and those in flight have
        completed, on every thread."""
        def start(resume):
            b.data.freeze(True)

            def visit(ch, walk):
                if ch._quiesce(b.data, lambda: walk.continue_walk(0)):
                    walk.continue_walk(0)
            for_each_channel(self._dev, visit, lambda status: resume(), asynchronous=True)
        return start

    # ---- the blobs -------------------------------------------------------------------------
    def _blob(self, blob):
        bid = blob.id if isinstance(blob, Blob) else blob
        if isinstance(bid, bool) or not isinstance(bid, int):
            raise InvalidArgument(f"a blob is a blob id (int) or an open Blob, not {blob!r}")
        b = self.blobs.get(bid)
        if b is None or b.deleting:
            raise BlobNotFound(f"no blob {bid} in the blobstore on {self.bdev.name}", bid)
        return b

    def _new_blob(self, num_clusters, flags, parent, xattrs, limit=0):
        bid = self._take_id()
        b = _B(bid, BlobData(self._dev, bid))
        b.flags = flags
        b.xattrs = xattrs
        b.data.set_size(num_clusters)
        if parent is not None:
            b.set_parent(parent, limit)
        return b

    def _drop_new(self, b):
        """Undo _new_blob for a blob that never became durable."""
        self._release_clusters(b.data.clusters())
        self.used_ids.clear(b.id)
        b.data.set_gone()
        if b.parent is not None:
            b.parent.clones.discard(b.id)

    def _publish(self, b):
        self.blobs[b.id] = b
        b.durable_version = b.version
        if b.parent is not None:
            b.parent.clones.add(b.id)

    def _check_size(self, n, thin, have=0):
        """A blob may grow to `n` clusters (thin: any size the map can hold in memory; thick:
        what is free)."""
        _count(n, "num_clusters")
        if n > MAX_BLOB_CLUSTERS:
            raise InvalidArgument(f"a blob has at most {MAX_BLOB_CLUSTERS} clusters, not {n}")
        if not thin and n > have and n - have > self.free_clusters:
            raise NoSpace(f"{n - have} clusters asked for, {self.free_clusters} free on "
                          f"{self.bdev.name}")

    def create(self, num_clusters=0, thin=False, xattrs=None, cb=None):
        """A new blob of `num_clusters` clusters: thick (its clusters given now, reading zeroes)
        or `thin` (given on first write; it may be larger than the store). Returns its id once
        its metadata is durable."""
        self._usable()
        self._check_size(num_clusters, thin)
        xattrs = _check_xattrs(xattrs)
        return self._run(self._create(num_clusters, bool(thin), xattrs), cb, "create")

    def _create(self, num_clusters, thin, xattrs):
        b = self._new_blob(num_clusters, FLAG_THIN if thin else 0, None, xattrs)
        try:
            if not thin:
                yield from self._fill_new(b, range(num_clusters))
            yield from self._write_chain(b, b.md())
        except BaseException:
            if not b.pages:
                self._drop_new(b)
            raise
        self._publish(b)
        return b.id

    def open(self, blob, cb=None):
        """An open handle (`Blob`) of blob `blob` (an id)."""
        b = self._blob(blob)
        self._usable()
        h = Blob(self, b)
        if cb is not None:
            self.thread.send(cb, h, None)
            return None
        return h

    def delete(self, blob, cb=None):
        """Delete a closed blob. A snapshot with clones cannot be deleted (BlobHasClones): delete
        its clones, or decouple or inflate them, first."""
        b = self._blob(blob)
        if b.opens:
            raise BlobBusy(f"blob {b.id} is open ({b.opens} handle(s)): close it first", b.id)
        if b.clones:
            raise BlobHasClones(f"snapshot {b.id} has clones "
                                f"{', '.join(f'{c}' for c in sorted(b.clones))}: delete, "
                                "inflate or decouple them first", b.id, sorted(b.clones))
        return self._run(self._delete(b), cb, "delete")

    def _delete(self, b):
        b.deleting = True
        yield b.lock.acquire()
        try:
            yield self._freeze(b)
            yield b.alloc_count.idle()
            yield b.commit_idle.idle()
            # the only valid chain of b is now its current one: wipe it
            yield self.io.write_pages(self.geometry.md_start + b.pages[0], bytes(PAGE))
            yield self.io.flush()
        except BaseException:
            b.deleting = False
            b.data.freeze(False)
            raise
        finally:
            b.lock.release()
        self._free_pages(b.pages)
        self._release_clusters(b.data.clusters() + b.dropped + list(b.ready.values()))
        self.used_ids.clear(b.id)
        b.data.set_gone()
        b.data.set_size(0)
        b.data.freeze(False)
        if b.parent is not None:
            b.parent.clones.discard(b.id)
        del self.blobs[b.id]
        b.data.owner = None
        for fn in list(b.listeners):
            _notify(fn, "delete", b.id)

    def snapshot(self, blob, xattrs=None, cb=None):
        """Make `blob`'s current data a new read-only snapshot (returned: its id); `blob` keeps
        its id and becomes a thin clone of it, writing copy-on-write from now on."""
        b = self._blob(blob)
        if b.is_snapshot:
            raise BlobReadOnly(f"blob {b.id} is a snapshot already", b.id)
        xattrs = _check_xattrs(xattrs)
        return self._run(self._snapshot(b, xattrs), cb, "snapshot")

    def _snapshot(self, x, xattrs):
        yield x.lock.acquire()
        try:
            if x.deleting:
                raise BlobNotFound(f"blob {x.id} is being deleted", x.id)
            s = self._new_blob(0, FLAG_SNAPSHOT | (x.flags & FLAG_THIN), x.parent, xattrs,
                               x.data.parent_limit)
            s.data.set_read_only(True)
            yield self._freeze(x)
            try:
                # 1. S holds x's clusters, PENDING; x is unchanged on the device
                s.data.take_map(x.data)
                x_parent = x.parent
                try:
                    yield from self._write_chain(s, s.md(FLAG_PENDING, x.id))
                except BaseException:
                    x.data.take_map(s.data)
                    if not s.pages:
                        self._drop_new(s)
                    raise
                # 2. x: empty, thin, a clone of S (the commit point)
                x.set_parent(s, s.data.num_clusters)
                x.flags |= FLAG_THIN
                x.changed()
                if x_parent is not None:
                    x_parent.clones.discard(x.id)
                self._publish(s)
                s.clones.add(x.id)
                yield self._persist(x)
                # 3. S without PENDING (a crash before this finds x naming S: S is kept)
                old = yield from self._write_chain(s, s.md())
                yield from self._wipe_chain(old)
            finally:
                x.data.freeze(False)
        finally:
            x.lock.release()
        return s.id

    def clone(self, snapshot, xattrs=None, cb=None):
        """A new thin blob that reads `snapshot`'s data until written; returns its id."""
        s = self._blob(snapshot)
        if not s.is_snapshot:
            raise InvalidArgument(f"blob {s.id} is not a snapshot: take one with "
                                  "snapshot() and clone that")
        xattrs = _check_xattrs(xattrs)
        return self._run(self._clone(s, xattrs), cb, "clone")

    def _clone(self, s, xattrs):
        c = self._new_blob(s.data.num_clusters, FLAG_THIN, s, xattrs, s.data.num_clusters)
        s.clones.add(c.id)                 # from now on S cannot be deleted
        try:
            yield from self._write_chain(c, c.md())
        except BaseException:
            if not c.pages:
                self._drop_new(c)
            raise
        self._publish(c)
        return c.id

    def inflate(self, blob, cb=None):
        """Give `blob` a cluster of its own for every cluster (copying what its parents hold,
        zeroes elsewhere): it no longer depends on any snapshot, and is no longer thin."""
        b = self._blob(blob)
        if b.is_snapshot:
            raise BlobReadOnly(f"blob {b.id} is a snapshot", b.id)
        return self._run(self._cut_loose(b, inflate=True), cb, "inflate")

    def decouple_parent(self, blob, cb=None):
        """Copy into `blob` the clusters its parent holds itself, and make the parent's parent
        its parent: the snapshot it read through can then be deleted. Stays thin."""
        b = self._blob(blob)
        if b.is_snapshot:
            raise BlobReadOnly(f"blob {b.id} is a snapshot", b.id)
        return self._run(self._cut_loose(b, inflate=False), cb, "decouple_parent")

    def _cut_loose(self, b, inflate):
        yield b.lock.acquire()
        try:
            parent = b.parent
            if inflate:
                want = b.data.unallocated()
            elif parent is None:
                return None
            else:
                n = min(parent.data.num_clusters, b.data.parent_limit)
                want = [ci for ci in b.data.unallocated() if ci < n and parent.data.get(ci)]
            for k in range(0, len(want), ALLOC_PARALLEL):
                allocs = [self._alloc(b, ci) for ci in want[k:k + ALLOC_PARALLEL]
                          if not b.data.get(ci)]
                yield tasks.gather(a.done.wait() for a in allocs)
            yield self._freeze(b)
            try:
                if parent is not None:
                    parent.clones.discard(b.id)
                new_parent = None if inflate else parent.parent
                # what the blob did not take from its parent reads through the grandparent as
                # far as both did
                limit = 0 if new_parent is None else min(b.data.parent_limit,
                                                         parent.data.parent_limit)
                b.set_parent(new_parent, limit)
                if new_parent is not None:
                    new_parent.clones.add(b.id)
                if inflate:
                    b.flags &= ~FLAG_THIN
                b.changed()
                yield self._persist(b)
            finally:
                b.data.freeze(False)
        finally:
            b.lock.release()

    def _resize(self, b, n):
        yield b.lock.acquire()
        try:
            if b.deleting:
                raise BlobNotFound(f"blob {b.id} is being deleted", b.id)
            old = b.data.num_clusters
            if n == old:
                return None
            yield self._freeze(b)
            try:
                if n < old:
                    b.dropped.extend(b.data.set_size(n))
                else:
                    b.data.set_size(n)
                    if not b.flags & FLAG_THIN:
                        try:
                            yield from self._fill_new(b, range(old, n))
                        except BaseException:
                            b.data.set_size(old)
                            raise
                b.changed()
            finally:
                b.data.freeze(False)
        finally:
            b.lock.release()
        for fn in list(b.listeners):
            _notify(fn, "resize", b.id)

    def _sync(self, b):
        if b.dirty or b.ready or b.dropped:
            yield self._persist(b)

    # ---- the store ---------------------------------------------------------------------------
    def get_io_channel(self):
        """This thread's channel for blob I/O (put() it when done)."""
        self._usable()
        return self._dev.get_io_channel()

    def blob_ids(self):
        """The ids of every blob, ascending."""
        return sorted(bid for bid, b in self.blobs.items() if not b.deleting)

    def __iter__(self):
        return iter(self.blob_ids())

    def __len__(self):
        return len(self.blob_ids())

    def __contains__(self, bid):
        return bid in self.blobs and not self.blobs[bid].deleting

    def info(self, blob):
        """What `ls` shows of a blob: size, allocated clusters, thin, snapshot, parent, clones,
        xattrs."""
        b = self._blob(blob)
        return {"id": b.id, "num_clusters": b.data.num_clusters,
                "size": b.data.num_clusters * self.geometry.cluster_size,
                "allocated_clusters": b.data.allocated(), "thin": bool(b.flags & FLAG_THIN),
                "snapshot": b.is_snapshot, "parent": b.parent.id if b.parent else None,
                "clones": sorted(b.clones), "xattrs": dict(b.xattrs), "open": b.opens,
                "md_pages": len(b.pages), "dirty": b.dirty}

    @property
    def cluster_size(self):
        return self.geometry.cluster_size

    @property
    def io_unit_size(self):
        return self.geometry.io_unit_size

    @property
    def units_per_cluster(self):
        return self.geometry.units_per_cluster

    @property
    def total_data_clusters(self):
        return self.geometry.data_clusters

    @property
    def free_clusters(self):
        return self.geometry.total_clusters - self.used_clusters.count

    @property
    def used_md_pages(self):
        return self.used_pages.count

    def unload(self, cb=None):
        """Write every blob's metadata, then the bitmaps, then a clean super block; the store
        and its handles are closed afterwards. Every channel must have been put."""
        self._check_thread()
        if self.closed:
            return cb(None, None) if cb is not None else None
        if self._dev.channel_count:
            raise BlobBusy(f"the blobstore on {self.bdev.name} still has channels on threads "
                           f"{', '.join(t.name for t in self._dev.channel_threads)}: put them "
                           "first")
        return self._run(self._unload(), cb, "unload", store_op=False)

    def _unload(self):
        self._usable()
        self.closed = True                   # no new operations from here on
        yield self.ops.idle()
        for b in list(self.blobs.values()):
            for h in list(b.handles):
                h._closed = True
            b.handles.clear()
            b.opens = 0
            if b.dirty or b.ready or b.dropped:
                yield self._persist(b)
        for b in list(self.blobs.values()):
            yield b.commit_idle.idle()
        if self.failed is not None:
            raise BlobIoError(f"metadata writes failed ({self.failed}); the store stays dirty "
                              "and is recovered at the next load")
        g = self.geometry
        sb = self.super
        writes = []
        for bitmap, start, npages, attr in (
                (self.used_clusters, g.cluster_bitmap_start, g.cluster_bitmap_pages,
                 "cluster_bitmap_crc"),
                (self.used_pages, g.md_bitmap_start, g.md_bitmap_pages, "md_bitmap_crc"),
                (self.used_ids, g.blobid_bitmap_start, g.blobid_bitmap_pages,
                 "blobid_bitmap_crc")):
            data = bitmap.to_bytes(npages * PAGE)
            setattr(sb, attr, crc32c(data))
            writes.append(self.io.write_pages(start, data))
        yield tasks.gather(writes)
        yield self.io.flush()
        yield from self._write_super(clean=True)
        for b in self.blobs.values():
            b.data.set_gone()
            b.data.owner = None
        yield self._hop()
        self._close_base()
        log.info("blobstore %s unloaded cleanly from %s", self.uuid, self.bdev.name)

    def __repr__(self):
        state = "unloaded" if self.closed else f"{len(self.blobs)} blobs"
        return f"<Blobstore on {self.bdev.name} {state}>"


_CONSTRUCT = object()


def _notify(fn, event, bid):
    try:
        fn(event, bid)
    except Exception:
        log.exception("blob listener %r raised", fn)


class Blob:
    """An open blob (from `Blobstore.open`). Data offsets and lengths are in I/O units (the
    bdev's block size); `num` defaults to the buffer's length."""

    def __init__(self, store, b):
        self.store = store
        self._b = b
        self.id = b.id
        self._closed = False
        b.opens += 1
        b.handles.add(self)

    # -- facts --
    def _rec(self):
        if self._closed:
            raise BlobBusy(f"this handle of blob {self.id} is closed", self.id)
        return self._b

    @property
    def closed(self):
        return self._closed

    @property
    def data(self):
        """The BlobData the C-level data path takes (blob.io.blob_submit)."""
        return self._rec().data

    @property
    def num_clusters(self):
        return self._rec().data.num_clusters

    @property
    def num_units(self):
        """The blob's size in I/O units."""
        return self._rec().data.num_units

    @property
    def size(self):
        return self.num_units * self.store.io_unit_size

    @property
    def allocated_clusters(self):
        return self._rec().data.allocated()

    @property
    def thin(self):
        return bool(self._rec().flags & FLAG_THIN)

    @property
    def is_snapshot(self):
        return self._rec().is_snapshot

    @property
    def read_only(self):
        return self._rec().is_snapshot

    @property
    def parent_id(self):
        p = self._rec().parent
        return p.id if p is not None else None

    @property
    def clones(self):
        return sorted(self._rec().clones)

    # -- data --
    def _units(self, buffers, num):
        if num is not None:
            return _count(num, "num")
        unit = self.store.io_unit_size
        total = sum(memoryview(b).nbytes for b in buffers)
        if total % unit:
            raise InvalidArgument(f"the buffers hold {total} bytes, not whole {unit}-byte I/O "
                                  "units: give num")
        return total // unit

    def _io(self, ch, io_type, buffers, offset, num, cb):
        b = self._rec()
        _count(offset, "offset")
        if buffers is not None:
            num = self._units(buffers, num)
        if cb is not None:
            if not callable(cb):
                raise InvalidArgument(f"cb must be callable, not {cb!r}")
            submit_py(ch, b.data, io_type, buffers, offset, num, cb)
            return None
        box = []
        submit_py(ch, b.data, io_type, buffers, offset, num, lambda v, e: box.append((v, e)))
        ch.thread.run_until(lambda: box, timeout=self.store.timeout)
        value, error = box[0]
        if error is not None:
            raise error
        return value

    def read(self, ch, buf, offset, num=None, cb=None):
        """Read `num` units at unit `offset` into `buf`; gives `buf`."""
        return self._io(ch, "read", [buf], offset, num, cb)

    def write(self, ch, buf, offset, num=None, cb=None):
        return self._io(ch, "write", [buf], offset, num, cb)

    def readv(self, ch, buffers, offset, cb=None):
        """Vectored read; gives the list of buffers."""
        return self._io(ch, "read", list(buffers), offset, None, cb)

    def writev(self, ch, buffers, offset, cb=None):
        return self._io(ch, "write", list(buffers), offset, None, cb)

    def write_zeroes(self, ch, offset, num, cb=None):
        return self._io(ch, "write_zeroes", None, offset, num, cb)

    def unmap(self, ch, offset, num, cb=None):
        """The range reads zeroes afterwards (as write_zeroes)."""
        return self._io(ch, "unmap", None, offset, num, cb)

    # -- metadata --
    def resize(self, num_clusters, cb=None):
        """Grow or shrink to `num_clusters` (durable at the next sync_md). A thick blob gets its
        new clusters now; a shrunk blob's clusters are free once that is durable."""
        b = self._rec()
        if b.is_snapshot:
            raise BlobReadOnly(f"blob {b.id} is a snapshot: it cannot be resized", b.id)
        self.store._check_size(num_clusters, b.flags & FLAG_THIN, b.data.num_clusters)
        return self.store._run(self.store._resize(b, num_clusters), cb, "resize")

    def sync_md(self, cb=None):
        """Make the blob's metadata as it is now durable."""
        b = self._rec()
        return self.store._run(self.store._sync(b), cb, "sync_md")

    def set_xattr(self, name, value):
        """Set xattr `name` (str) to `value` (bytes-like; durable at the next sync_md)."""
        b = self._rec()
        if b.is_snapshot:
            raise BlobReadOnly(f"blob {b.id} is a snapshot: its xattrs are fixed", b.id)
        _check_xattr(name, value)
        b.xattrs[name] = bytes(value)
        b.changed()

    def get_xattr(self, name):
        """The value of xattr `name` (KeyError if the blob has none)."""
        try:
            return self._rec().xattrs[name]
        except KeyError:
            raise KeyError(f"blob {self.id} has no xattr {name!r}") from None

    def remove_xattr(self, name):
        b = self._rec()
        if b.is_snapshot:
            raise BlobReadOnly(f"blob {b.id} is a snapshot: its xattrs are fixed", b.id)
        if name not in b.xattrs:
            raise KeyError(f"blob {self.id} has no xattr {name!r}")
        del b.xattrs[name]
        b.changed()

    def xattr_names(self):
        return sorted(self._rec().xattrs)

    def add_listener(self, fn):
        """`fn(event, blob_id)` hears of "resize" (after it) and "delete"; on the metadata
        thread."""
        if not callable(fn):
            raise InvalidArgument(f"a listener must be callable, not {fn!r}")
        self._rec().listeners.append(fn)

    def remove_listener(self, fn):
        self._rec().listeners.remove(fn)

    def close(self, cb=None):
        """Close the handle; a blob with metadata not yet durable is synced first."""
        b = self._rec()
        self._closed = True
        b.handles.discard(self)

        def gen():
            try:
                yield from self.store._sync(b)
            finally:
                b.opens -= 1
        return self.store._run(gen(), cb, "close")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._closed:
            self.close()
        return False

    def __repr__(self):
        state = "closed" if self._closed else f"{self._b.data.num_clusters} clusters"
        return f"<Blob {self.id} {state}>"
