# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The blobstore's data path: blob offsets to clusters, and I/O on the base bdev, at C level.

A `BlobData` is a blob as the data path needs it: its cluster map (the bdev block where each
cluster starts, 0 where none is allocated), its size, its parent (the snapshot it reads through)
and two flags. The metadata layer (blob.store, on the store's metadata thread) owns it and changes
it; I/O threads only read it.

A `BlobChannel` is a thread's channel of the store (`BlobstoreDev`, an IoDevice): a pool of
`blob_io` objects, this thread's channel of the base bdev, and a poller for what cannot finish at
once. `blob_submit` / `blob_submitv` take an I/O in I/O units:

- the common case - a read or write inside one allocated cluster - translates the offset and
  calls `bdev_submit` with the blob_io as the base I/O's context: no Python, no allocation;
- an I/O that spans clusters is split into one piece per cluster, each translated on its own;
- a read where the blob has no cluster reads its parent's (or the parent's parent's...) cluster,
  or fills zeroes; write zeroes and unmap where nothing is allocated do nothing (it reads zeroes);
- a write where the blob has no cluster of its own (thin provisioning, copy-on-write) is sent to
  the metadata thread by message: it fills a new cluster and commits the blob's metadata, then
  sends the piece back to its thread, which submits it to the new cluster. Nothing waits.

Freezing: snapshot, resize, inflate and delete change a blob's map under I/O. The metadata thread
sets `frozen` (new requests park on their channel until it is cleared), then asks every channel
how many admitted requests of the blob it has in flight and waits for those (`quiesce`).

Every accepted request completes exactly once, through its callback, from a poll of its thread.
"""
import logging

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport EINVAL, EIO, ENOENT, ENOMEM, ENOSPC, ERANGE, EROFS, EXDEV
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.uio cimport iovec

from bdev.core cimport (BDEV_IO_READ, BDEV_IO_WRITE, BDEV_IO_WRITE_ZEROES, BdevChannel,
                        Descriptor, bdev_io, bdev_submit, bdev_submitv)
from env.memory cimport DmaBuffer
from env.thread cimport (IoChannel, IoDevice, Poller, Thread, atomic_load_int, atomic_store_int,
                         thread_s, thread_send)

from blob.errors import BlobError, BlobIoError, BlobNotFound, BlobReadOnly, NoSpace
from env.errors import InvalidArgument, ResourceExhausted, WrongThreadError

log = logging.getLogger("userblk.blob")

cdef enum:
    DEFAULT_CHANNEL_IOS = 2048

IO_TYPE_NAMES = {BLOB_IO_READ: "read", BLOB_IO_WRITE: "write",
                 BLOB_IO_WRITE_ZEROES: "write_zeroes", BLOB_IO_UNMAP: "unmap"}
IO_TYPES = {v: k for k, v in IO_TYPE_NAMES.items()}


# ---- the blob -----------------------------------------------------------------------------------
cdef class BlobData:
    """See the module. Made by the metadata layer: `BlobData(dev, blob_id)`."""

    def __cinit__(self, BlobstoreDev dev, uint64_t blob_id):
        self.dev = dev
        self.id = blob_id

    def __dealloc__(self):
        free(self.map)

    cdef uint64_t source_lba(self, uint64_t ci) noexcept nogil:
        """Where cluster `ci` reads from when this blob has none: the nearest ancestor's block,
        or 0 (zeroes). Each blob reads through its parent only below its parent_limit (a clone
        that shrank and grew again reads zeroes where it grew, not its parent's old data)."""
        # (walked with borrowed pointers: no reference counting without the GIL)
        cdef void* b = <void*> self
        cdef void* p
        cdef uint64_t lba
        while True:
            p = (<BlobData> b).parent
            if p == NULL or ci >= (<BlobData> b).parent_limit:
                return 0
            if ci < (<BlobData> p).num_clusters:
                lba = (<BlobData> p).map[ci]
                if lba:
                    return lba
            b = p

    # -- for the metadata layer (its thread) --
    @property
    def num_clusters(self):
        return self.num_clusters

    @property
    def num_units(self):
        return self.num_units

    def set_size(self, uint64_t n):
        """Make the map `n` clusters long (new ones unallocated); returns the device clusters
        the blob no longer holds. Only while the blob is frozen and quiesced (or unseen)."""
        cdef uint64_t i, upc = self.dev.umask + 1
        dropped = []
        for i in range(n, self.num_clusters):
            if self.map[i]:
                dropped.append(self.map[i] // upc)
        cdef uint64_t* m
        if n > self.num_clusters or n == 0:
            m = <uint64_t*> realloc(self.map, max(n, 1) * 8)
            if m == NULL:
                raise InvalidArgument(f"blob {self.id}: no memory for the map of {n} clusters "
                                      f"({n * 8} bytes)")
            if n > self.num_clusters:
                memset(m + self.num_clusters, 0, (n - self.num_clusters) * 8)
            self.map = m
        self.num_clusters = n
        self.num_units = n << self.dev.cshift
        if n < self.parent_limit:
            self.parent_limit = n          # what it grows back to reads zeroes
        return dropped

    def get(self, uint64_t ci):
        """The device cluster of blob cluster `ci` (0: not allocated)."""
        if ci >= self.num_clusters:
            raise InvalidArgument(f"cluster {ci} is outside blob {self.id} "
                                  f"({self.num_clusters} clusters)")
        return self.map[ci] >> self.dev.cshift

    def set(self, uint64_t ci, uint64_t cluster):
        """Give blob cluster `ci` device cluster `cluster` (0: none). Published to every thread
        at once (one aligned 8-byte store)."""
        if ci >= self.num_clusters:
            raise InvalidArgument(f"cluster {ci} is outside blob {self.id}")
        self.map[ci] = cluster << self.dev.cshift

    def source(self, uint64_t ci):
        """The device cluster this blob's cluster `ci` reads from through its ancestors (0:
        zeroes), when it has none of its own."""
        return self.source_lba(ci) >> self.dev.cshift

    def runs(self, overlay=None):
        """(start, count) runs of the map, start 0 for unallocated; `overlay` {ci: cluster}
        entries are taken as given (allocations being committed). One pass in C; the overlay
        is merged in ci order."""
        cdef uint64_t i, c, start = 0, count = 0, k = 0, nov = 0, next_ov
        cdef uint32_t sh = self.dev.cshift
        ov = sorted((<dict> overlay).items()) if overlay else []
        nov = len(ov)
        next_ov = ov[0][0] if nov else <uint64_t> -1
        out = []
        for i in range(self.num_clusters):
            c = self.map[i] >> sh
            if i == next_ov:
                c = ov[k][1]
                k += 1
                next_ov = ov[k][0] if k < nov else <uint64_t> -1
            if count and ((start == 0 and c == 0) or (start and c == start + count)):
                count += 1
                continue
            if count:
                out.append((start, count))
            start, count = c, 1
        if count:
            out.append((start, count))
        return out

    def load_runs(self, runs):
        """Fill the map from (start, count) runs that add up to the blob's size."""
        cdef uint64_t pos = 0, k, s, n
        cdef uint32_t sh = self.dev.cshift
        for s, n in runs:
            if pos + n > self.num_clusters:
                raise InvalidArgument("runs longer than the blob")
            for k in range(n):
                self.map[pos + k] = ((s + k) << sh) if s else 0
            pos += n
        if pos != self.num_clusters:
            raise InvalidArgument("runs shorter than the blob")

    def clusters(self):
        """Every device cluster the blob holds, in blob order."""
        cdef uint64_t i
        return [self.map[i] >> self.dev.cshift for i in range(self.num_clusters) if self.map[i]]

    def allocated(self):
        """How many clusters the blob holds."""
        cdef uint64_t i, n = 0
        for i in range(self.num_clusters):
            if self.map[i]:
                n += 1
        return n

    def unallocated(self):
        """Blob clusters without a cluster of their own, ascending."""
        cdef uint64_t i
        return [i for i in range(self.num_clusters) if not self.map[i]]

    def take_map(self, BlobData other):
        """Move `other`'s map to this blob (which must have none); `other` gets an empty one of
        the same size. Both frozen and quiesced."""
        free(self.map)
        self.map = other.map
        self.num_clusters = other.num_clusters
        self.num_units = other.num_units
        other.map = <uint64_t*> calloc(max(other.num_clusters, 1), 8)
        if other.map == NULL:
            raise MemoryError()

    def set_parent(self, BlobData parent, uint64_t limit=0):
        """Read through `parent` (None: nothing) for clusters below `limit`."""
        self._parent_ref = parent
        self.parent = <void*> parent if parent is not None else NULL
        self.parent_limit = limit if parent is not None else 0

    @property
    def parent(self):
        return self._parent_ref

    @property
    def parent_limit(self):
        return self.parent_limit

    def set_read_only(self, bint ro):
        if ro:
            self.flags |= BD_READ_ONLY
        else:
            self.flags &= ~BD_READ_ONLY

    def set_gone(self):
        self.flags |= BD_GONE

    @property
    def gone(self):
        return bool(self.flags & BD_GONE)

    def freeze(self, bint on):
        atomic_store_int(&self.frozen, 1 if on else 0)

    @property
    def frozen(self):
        return atomic_load_int(&self.frozen) != 0

    def __repr__(self):
        return f"<BlobData {self.id} {self.num_clusters} clusters>"


# ---- the channel --------------------------------------------------------------------------------
cdef int _channel_poller(void* ctx) noexcept nogil:
    return (<BlobChannel> ctx).poll()


cdef class BlobChannel(IoChannel):
    """A thread's channel of a blobstore (get it with `bs.get_io_channel()`)."""

    def _setup(self, BlobstoreDev dev, uint32_t nios):
        cdef long k
        self.dev = dev
        self.desc = dev.desc
        self.cshift = dev.cshift
        self.umask = dev.umask
        self.base = dev.desc.get_io_channel()
        self.ios = <blob_io*> calloc(nios, sizeof(blob_io))
        if self.ios == NULL:
            self.base.put()
            raise MemoryError()
        self.nios = nios
        for k in range(<long> nios - 1, -1, -1):
            self.ios[k].index = <uint32_t> k
            self.ios[k].channel = <void*> self
            self.ios[k].next = self.free_ios
            self.free_ios = &self.ios[k]
        self.poller = self.thread.register_c_poller(_channel_poller, <void*> self, 0,
                                                    f"blob:{dev.name}", None)

    def _teardown(self):
        cdef int spins = 0
        while _nfree(self) != self.nios and spins < 1000000:
            with nogil:
                self.poll()
                self.base.poll()
            spins += 1
        if self.poller is not None:
            if self.poller.is_registered:
                self.poller.unregister()
            self.poller = None
        if _nfree(self) != self.nios:
            log.error("channel of %s on %s released with %d I/O(s) outstanding; not freeing its "
                      "I/O objects", self.dev.name, self.thread.name, self.nios - _nfree(self))
            self.ios = NULL
        else:
            free(self.ios)
            self.ios = NULL
        base, self.base = self.base, None
        if base is not None:
            base.put()

    cdef int poll(self) noexcept nogil:
        cdef int work = 0
        cdef blob_io* io
        cdef blob_io* batch
        if self.done_head != NULL:
            batch = self.done_head
            self.done_head = self.done_tail = NULL
            while batch != NULL:
                io = batch
                batch = io.next
                _finish(self, io)
                work += 1
        if self.retry_head != NULL:
            batch = self.retry_head
            self.retry_head = self.retry_tail = NULL
            while batch != NULL:
                io = batch
                batch = io.next
                _piece(self, io)
                work += 1
        if self.resend_head != NULL:
            batch = self.resend_head
            self.resend_head = NULL
            while batch != NULL:
                io = batch
                batch = io.next
                _resend(self, io)
                work += 1
        if self.parked_head != NULL:
            work += _admit_parked(self)
        return work

    @property
    def outstanding(self):
        """Requests and pieces of this channel not yet completed."""
        return self.nios - _nfree(self)

    def poll_now(self):
        self.check_thread()
        cdef int n
        with nogil:
            n = self.poll()
        return n

    def _quiesce(self, BlobData b, done):
        """(On this channel's thread.) Call done() once every admitted request of `b` on this
        channel has completed: now (returns True), or later from a completion (False)."""
        cdef uint32_t i, n = 0
        for i in range(self.nios):
            if self.ios[i].state == BIO_ACTIVE and self.ios[i].blob == <void*> b:
                n += 1
        if n == 0:
            return True
        if self.nquiesce == 8:
            raise ResourceExhausted("more than 8 blobs are being frozen at once on one channel")
        Py_INCREF(done)
        self.quiesce[self.nquiesce].blob = <void*> b
        self.quiesce[self.nquiesce].left = n
        self.quiesce[self.nquiesce].done = <void*> done
        self.nquiesce += 1
        return False

    @property
    def base_channel(self):
        return self.base


# ---- the store as an I/O device -----------------------------------------------------------------
cdef class BlobstoreDev(IoDevice):
    """The store's per-thread channels. `BlobstoreDev(desc, cluster_units, md_thread)`."""
    channel_class = BlobChannel

    def __init__(self, Descriptor desc, uint64_t cluster_units, Thread md_thread, name=None):
        IoDevice.__init__(self, name or f"blobstore:{desc.bdev.name}")
        if cluster_units == 0 or cluster_units & (cluster_units - 1):
            raise InvalidArgument("cluster_units must be a power of two")
        self.desc = desc
        self.cshift = (<uint64_t> cluster_units).bit_length() - 1
        self.umask = cluster_units - 1
        self.unit_shift = desc.bdev.block_shift
        self._md_thread_ref = md_thread
        self.md_thread = md_thread.handle()
        self.closed = False
        self._unsent = []

    def create_channel_ctx(self, IoChannel channel):
        (<BlobChannel> channel)._setup(self, DEFAULT_CHANNEL_IOS)
        return None

    def destroy_channel_ctx(self, IoChannel channel):
        (<BlobChannel> channel)._teardown()

    def alloc_finished(self, uintptr_t token, int status):
        """(Metadata thread.) The cluster a piece waited for is there (status 0) or could not be
        given (negative errno): send the piece back to its channel's thread (a full message ring
        keeps it here, and a poller retries: nothing is lost)."""
        cdef blob_io* p = <blob_io*> token
        if status:
            p.status = status
        if self._unsent or thread_send((<BlobChannel> p.channel).thread.handle(), _alloc_back,
                                       p) != 0:
            self._unsent.append(token)
            if self._retry_poller is None:
                self._retry_poller = self._md_thread_ref.register_poller(self._send_unsent)

    def _send_unsent(self):
        cdef blob_io* p
        while self._unsent:
            p = <blob_io*> <uintptr_t> self._unsent[0]
            if thread_send((<BlobChannel> p.channel).thread.handle(), _alloc_back, p) != 0:
                return True
            self._unsent.pop(0)
        self._retry_poller.unregister()
        self._retry_poller = None
        return True

    def channels(self):
        return list(self._channels.values())




cdef uint32_t _nfree(BlobChannel ch) noexcept nogil:
    """How many blob_ios are free (a walk: teardown and statistics only)."""
    cdef uint32_t n = 0
    cdef blob_io* io = ch.free_ios
    while io != NULL:
        n += 1
        io = io.next
    return n


cdef inline blob_io* _get(BlobChannel ch) noexcept nogil:
    cdef blob_io* io = ch.free_ios
    if io == NULL:
        return NULL
    ch.free_ios = io.next
    io.pending = 0
    return io


cdef inline void _put(BlobChannel ch, blob_io* io) noexcept nogil:
    """Back to the pool, reset as the fast path expects a free blob_io (parent NULL, status
    and flags 0)."""
    if io.flags & BIOF_OWN_IOVS:
        free(io.iovs)
    io.flags = 0
    io.status = 0
    io.parent = NULL
    io.state = BIO_FREE
    io.next = ch.free_ios
    ch.free_ios = io


cdef inline void _push(blob_io** head, blob_io** tail, blob_io* io) noexcept nogil:
    io.next = NULL
    if tail[0] == NULL:
        head[0] = io
    else:
        tail[0].next = io
    tail[0] = io


# ---- completion ---------------------------------------------------------------------------------
cdef void _finish(BlobChannel ch, blob_io* r) noexcept nogil:
    """The end of a request: freeze accounting, back to the pool, the callback."""
    cdef blob_io_cb cb = r.cb
    cdef void* arg = r.cb_arg
    cdef int status = r.status
    if ch.nquiesce:
        _quiesce_note(ch, r.blob)
    _put(ch, r)
    cb(arg, status)


cdef void _quiesce_note(BlobChannel ch, void* blob) noexcept nogil:
    cdef uint32_t i
    cdef void* done
    for i in range(ch.nquiesce):
        if ch.quiesce[i].blob == blob:
            ch.quiesce[i].left -= 1
            if ch.quiesce[i].left == 0:
                done = ch.quiesce[i].done
                ch.nquiesce -= 1
                ch.quiesce[i] = ch.quiesce[ch.nquiesce]
                with gil:
                    try:
                        (<object> done)()
                    except BaseException:
                        log.exception("a freeze's completion callback raised")
                    Py_DECREF(<object> done)
            return


cdef inline void _request_done(BlobChannel ch, blob_io* r) noexcept nogil:
    if r.flags & BIOF_IN_SUBMIT:
        _push(&ch.done_head, &ch.done_tail, r)
    else:
        _finish(ch, r)


cdef void _piece_done(BlobChannel ch, blob_io* p, int status) noexcept nogil:
    cdef blob_io* r = p.parent
    if r == NULL:
        if status and not p.status:
            p.status = status
        _request_done(ch, p)
        return
    if status and not r.status:
        r.status = status
    _put(ch, p)
    r.pending -= 1
    if r.pending == 0:
        _request_done(ch, r)


cdef void blob_base_done(bdev_io* bio, bint ok, void* arg) noexcept nogil:
    cdef blob_io* p = <blob_io*> arg
    if p.parent == NULL and ok and p.flags == 0:
        _fast_done(<BlobChannel> p.channel, p)
        return
    _piece_done(<BlobChannel> p.channel, p, 0 if ok else -EIO)


cdef inline void _fast_done(BlobChannel ch, blob_io* p) noexcept nogil:
    """The common case: a whole request finished well on the base (what _finish does, with
    nothing to free)."""
    cdef blob_io_cb cb = p.cb
    cdef void* arg = p.cb_arg
    if ch.nquiesce:
        _quiesce_note(ch, p.blob)
    p.state = BIO_FREE
    p.next = ch.free_ios
    ch.free_ios = p
    cb(arg, 0)


# ---- pieces -------------------------------------------------------------------------------------
cdef void _zero_iovs(blob_io* p) noexcept nogil:
    cdef uint32_t i
    for i in range(p.iovcnt):
        memset(p.iovs[i].iov_base, 0, p.iovs[i].iov_len)


cdef void _issue(BlobChannel ch, blob_io* p, uint64_t lba, uint8_t type) noexcept nogil:
    cdef int rc
    if type == BLOB_IO_READ or type == BLOB_IO_WRITE:
        if p.iovcnt == 1:
            rc = bdev_submit(ch.dev.desc, ch.base, type, <char*> p.iovs[0].iov_base, lba, p.num,
                             blob_base_done, p)
        else:
            rc = bdev_submitv(ch.dev.desc, ch.base, type, p.iovs, p.iovcnt, lba, p.num,
                              blob_base_done, p)
    else:
        rc = bdev_submit(ch.dev.desc, ch.base, BDEV_IO_WRITE_ZEROES, NULL, lba, p.num,
                         blob_base_done, p)
    if rc == 0:
        return
    if rc == -ENOMEM:
        _push(&ch.retry_head, &ch.retry_tail, p)       # the poller translates it again
        return
    _piece_done(ch, p, rc)


cdef void _piece(BlobChannel ch, blob_io* p) noexcept nogil:
    """Translate and start one piece (inside one cluster)."""
    _piece_of(ch, <BlobData> p.blob, p)


cdef void _piece_of(BlobChannel ch, BlobData b, blob_io* p) noexcept nogil:
    cdef uint64_t ci = p.offset >> ch.dev.cshift
    cdef uint64_t lba, src
    if ci >= b.num_clusters or b.flags & BD_GONE:
        _piece_done(ch, p, -ERANGE if not b.flags & BD_GONE else -ENOENT)
        return
    lba = b.map[ci]
    if lba:
        _issue(ch, p, lba + (p.offset & ch.dev.umask), p.type)
        return
    src = b.source_lba(ci)
    if p.type == BLOB_IO_READ:
        if src:
            _issue(ch, p, src + (p.offset & ch.dev.umask), BLOB_IO_READ)
        else:
            _zero_iovs(p)
            _piece_done(ch, p, 0)
        return
    if p.type != BLOB_IO_WRITE and src == 0:
        _piece_done(ch, p, 0)            # zeroes where it already reads zeroes
        return
    # a cluster of its own first: the metadata thread gives one, then sends the piece back.
    # One request per cluster and channel: pieces for a cluster already asked for wait here
    # behind the piece that asked (its leader), and go when it comes back.
    p.flags |= BIOF_WAIT_ALLOC
    cdef blob_io* lead = ch.leaders
    while lead != NULL:
        if lead.blob == p.blob and (lead.offset >> ch.cshift) == ci:
            p.next = lead.followers
            lead.followers = p
            return
        lead = lead.alloc_link
    p.followers = NULL
    p.alloc_link = ch.leaders
    ch.leaders = p
    _resend(ch, p)


cdef void _resend(BlobChannel ch, blob_io* p) noexcept nogil:
    """Send an allocation request (p) to the metadata thread, or keep it for the poller."""
    if thread_send(ch.dev.md_thread, _alloc_msg, p) != 0:
        p.next = ch.resend_head
        ch.resend_head = p


cdef void _alloc_msg(void* ctx) noexcept nogil:
    """(Metadata thread.) A piece needs a cluster: hand it to the metadata layer."""
    cdef blob_io* p = <blob_io*> ctx
    with gil:
        _alloc_msg_py(p)


cdef void _alloc_msg_py(blob_io* p) noexcept:
    cdef BlobData b = <BlobData> p.blob
    cdef BlobstoreDev dev = b.dev
    try:
        handler = dev.alloc_handler
        if handler is None:
            raise BlobError("the blobstore is not loaded")
        handler(b, p.offset >> dev.cshift, <uintptr_t> p)
    except BaseException:
        log.exception("cluster allocation for blob %d failed", b.id)
        dev.alloc_finished(<uintptr_t> p, -EIO)


cdef void _alloc_back(void* ctx) noexcept nogil:
    """(The piece's thread.) Its cluster is there, or it failed (status set): the leader and
    the pieces that waited behind it go on."""
    cdef blob_io* p = <blob_io*> ctx
    _alloc_back_on(<BlobChannel> p.channel, p)


cdef void _alloc_back_on(BlobChannel ch, blob_io* lead) noexcept nogil:
    cdef int status = lead.status
    cdef blob_io* f = lead.followers
    cdef blob_io* nxt
    cdef blob_io** link = &ch.leaders
    while link[0] != NULL and link[0] != lead:
        link = &link[0].alloc_link
    if link[0] == lead:
        link[0] = lead.alloc_link
    lead.followers = NULL
    lead.alloc_link = NULL
    while True:
        # the leader first, then its followers (each may be a whole request or a piece)
        lead.flags &= ~BIOF_WAIT_ALLOC
        if status:
            if lead.parent != NULL:
                lead.status = 0
            _piece_done(ch, lead, status)
        else:
            _piece(ch, lead)
        if f == NULL:
            return
        lead = f
        f = f.next


# ---- requests -----------------------------------------------------------------------------------
cdef int _admit_parked(BlobChannel ch) noexcept nogil:
    """Admit the parked requests whose blob thawed, in order."""
    cdef blob_io* io = ch.parked_head
    cdef blob_io* prev = NULL
    cdef blob_io* nxt
    cdef int n = 0
    while io != NULL:
        nxt = io.next
        if not atomic_load_int(&(<BlobData> io.blob).frozen):
            if not _enough(ch, io.offset, io.num):
                return n                 # its pieces need I/O objects: wait for completions
            if prev == NULL:
                ch.parked_head = nxt
            else:
                prev.next = nxt
            if ch.parked_tail == io:
                ch.parked_tail = prev
            _start(ch, io)
            n += 1
        else:
            prev = io
        io = nxt
    return n


cdef int _split(BlobChannel ch, blob_io* r) noexcept nogil:
    """Start one piece per cluster of request `r`."""
    cdef uint32_t cshift = ch.dev.cshift, unit_shift = ch.dev.unit_shift
    cdef uint64_t umask = ch.dev.umask
    cdef uint64_t first = r.offset >> cshift
    cdef uint64_t last = (r.offset + r.num - 1) >> cshift
    cdef uint64_t n = last - first + 1
    cdef uint64_t pos = r.offset, left = r.num, take, byte_off = 0, nbytes, skip, seg
    cdef uint32_t i, j, k, cnt
    cdef blob_io* c
    cdef bint data = r.type == BLOB_IO_READ or r.type == BLOB_IO_WRITE
    r.pending = <uint32_t> n
    while left:
        take = (umask + 1) - (pos & umask)
        if take > left:
            take = left
        c = _get(ch)              # (the caller checked there are enough)
        c.state = BIO_CHILD
        c.parent = r
        c.blob = r.blob
        c.type = r.type
        c.offset = pos
        c.num = take
        c.iovcnt = 0
        c.iovs = NULL
        nbytes = take << unit_shift
        if data:
            if r.iovcnt == 1:
                c.iov.iov_base = <char*> r.iovs[0].iov_base + byte_off
                c.iov.iov_len = nbytes
                c.iovs = &c.iov
                c.iovcnt = 1
            else:
                # the segments of r that bytes [byte_off, byte_off + nbytes) fall in
                i = 0
                skip = byte_off
                while skip >= r.iovs[i].iov_len:
                    skip -= r.iovs[i].iov_len
                    i += 1
                cnt = 0
                seg = 0
                j = i
                while seg < nbytes + skip:
                    seg += r.iovs[j].iov_len
                    j += 1
                    cnt += 1
                if cnt == 1:
                    c.iov.iov_base = <char*> r.iovs[i].iov_base + skip
                    c.iov.iov_len = nbytes
                    c.iovs = &c.iov
                    c.iovcnt = 1
                else:
                    c.iovs = <iovec*> malloc(cnt * sizeof(iovec))
                    if c.iovs == NULL:
                        c.iovs = &c.iov
                        _piece_done(ch, c, -ENOMEM)
                        pos += take
                        left -= take
                        byte_off += nbytes
                        continue
                    c.flags |= BIOF_OWN_IOVS
                    seg = nbytes
                    for k in range(cnt):
                        c.iovs[k].iov_base = <char*> r.iovs[i + k].iov_base + (skip if k == 0
                                                                                else 0)
                        c.iovs[k].iov_len = min(seg, r.iovs[i + k].iov_len - (skip if k == 0
                                                                               else 0))
                        seg -= c.iovs[k].iov_len
                    c.iovcnt = cnt
        _piece(ch, c)
        pos += take
        left -= take
        byte_off += nbytes
    return 0


cdef void _start(BlobChannel ch, blob_io* r) noexcept nogil:
    """Start an admitted request (it completes through its callback, never inside this call:
    what finishes here is deferred to the poller)."""
    cdef uint64_t first = r.offset >> ch.dev.cshift
    r.state = BIO_ACTIVE
    r.flags |= BIOF_IN_SUBMIT
    if (r.offset + r.num - 1) >> ch.dev.cshift == first:
        _piece(ch, r)
    else:
        _split(ch, r)
    r.flags &= ~BIOF_IN_SUBMIT


cdef inline int _check(BlobChannel ch, BlobData b, uint8_t type, uint64_t offset,
                       uint64_t num) noexcept nogil:
    if not ch.on_owner():
        return -EXDEV
    if b.flags:
        if b.flags & BD_GONE:
            return -ENOENT
        if type != BLOB_IO_READ:
            return -EROFS
    if num == 0 or offset >= b.num_units or num > b.num_units - offset:
        return -ERANGE
    if type < BLOB_IO_READ or type > BLOB_IO_UNMAP:
        return -EINVAL
    if <void*> b.dev != <void*> ch.dev:
        return -EINVAL
    return 0


cdef inline int _enough(BlobChannel ch, uint64_t offset, uint64_t num) noexcept nogil:
    """Enough free I/O objects for the request and its pieces? (a walk of at most the
    pieces' number of the free list: only what splits pays for it)"""
    cdef uint64_t need = ((offset + num - 1) >> ch.dev.cshift) - (offset >> ch.dev.cshift)
    need = need + 2 if need else 1
    cdef blob_io* io = ch.free_ios
    while io != NULL and need:
        need -= 1
        io = io.next
    return need == 0


cdef inline int _submit(BlobChannel ch, BlobData b, blob_io* io) noexcept nogil:
    """Admit `io` (filled in) now, or park it while its blob is frozen."""
    if atomic_load_int(&b.frozen):
        io.state = BIO_PARKED
        _push(&ch.parked_head, &ch.parked_tail, io)
        return 0
    _start(ch, io)
    return 0


cdef int blob_submit_general(BlobChannel ch, BlobData b, uint8_t type, char* buf,
                             uint64_t offset, uint64_t num, blob_io_cb cb,
                             void* cb_arg) noexcept nogil:
    cdef blob_io* io
    cdef uint64_t ci, lba
    cdef int rc = _check(ch, b, type, offset, num)
    if rc != 0:
        return rc
    if not _enough(ch, offset, num):
        return -ENOMEM
    io = _get(ch)
    io.blob = <void*> b
    io.type = type
    io.offset = offset
    io.num = num
    io.cb = cb
    io.cb_arg = cb_arg
    io.iov.iov_base = buf
    io.iov.iov_len = num << ch.dev.unit_shift
    io.iovs = &io.iov
    io.iovcnt = 1 if type == BLOB_IO_READ or type == BLOB_IO_WRITE else 0
    return _submit(ch, b, io)


cdef int blob_submitv(BlobChannel ch, BlobData b, uint8_t type, iovec* iovs, uint32_t iovcnt,
                      uint64_t offset, uint64_t num, blob_io_cb cb, void* cb_arg) noexcept nogil:
    cdef blob_io* io
    cdef uint64_t total = 0
    cdef uint32_t i
    cdef int rc = _check(ch, b, type, offset, num)
    if rc != 0:
        return rc
    if type != BLOB_IO_READ and type != BLOB_IO_WRITE:
        return blob_submit_general(ch, b, type, NULL, offset, num, cb, cb_arg)
    if iovcnt == 0:
        return -EINVAL
    for i in range(iovcnt):
        total += iovs[i].iov_len
    if total != num << ch.dev.unit_shift:
        return -EINVAL
    if not _enough(ch, offset, num):
        return -ENOMEM
    io = _get(ch)
    io.blob = <void*> b
    io.type = type
    io.offset = offset
    io.num = num
    io.cb = cb
    io.cb_arg = cb_arg
    io.iovs = iovs
    io.iovcnt = iovcnt
    return _submit(ch, b, io)


# ---- the Python path ----------------------------------------------------------------------------
cdef class _PyReq:
    """What a Python-level I/O keeps alive until its completion."""
    cdef object cb
    cdef object refs
    cdef object result
    cdef object blob_id
    cdef object what
    cdef iovec* iovs

    def __dealloc__(self):
        free(self.iovs)


cdef void _py_done(void* arg, int status) noexcept nogil:
    with gil:
        _py_complete(arg, status)


cdef void _py_complete(void* arg, int status) noexcept:
    cdef _PyReq req = <_PyReq> arg        # a reference of its own ...
    Py_DECREF(req)                         # ... so the one submit_py took can go
    for r in req.refs:
        if isinstance(r, DmaBuffer):
            (<DmaBuffer> r).unpin()
    err = None if status == 0 else io_error(-status, req.what, req.blob_id)
    try:
        req.cb(req.result if status == 0 else None, err)
    except BaseException:
        log.exception("completion callback %r raised", req.cb)


_ERRNO_TEXT = {EIO: "the base bdev failed the I/O", ENOSPC: "no free cluster is left",
               ENOMEM: "no free I/O object on the channel", ERANGE: "outside the blob",
               ENOENT: "the blob was deleted", EROFS: "the blob is read-only (a snapshot)",
               EXDEV: "the channel belongs to another thread", EINVAL: "invalid arguments"}


def io_error(int errno, what, blob_id):
    """The BlobError for a failed (or refused) I/O with `errno`."""
    text = _ERRNO_TEXT.get(errno, f"errno {errno}")
    msg = f"{what} on blob {blob_id}: {text}" if blob_id is not None else f"{what}: {text}"
    if errno == ENOSPC:
        return NoSpace(msg, blob_id)
    if errno == EROFS:
        return BlobReadOnly(msg, blob_id)
    if errno == ENOENT:
        return BlobNotFound(msg, blob_id)
    if errno == ERANGE or errno == EINVAL:
        return InvalidArgument(msg)
    if errno == EXDEV:
        return WrongThreadError(msg)
    if errno == ENOMEM:
        return ResourceExhausted(msg)
    return BlobIoError(msg, blob_id, errno)


def submit_py(BlobChannel ch, BlobData b, io_type, buffers, uint64_t offset, uint64_t num, cb):
    """Submit an I/O from Python: `buffers` a list of buffer objects (reads: writable) or None;
    `cb(result, error)` runs from a poll of this thread (result: the buffer - or the list - for
    reads). Raises at once for a refused submission."""
    cdef uint8_t t = IO_TYPES[io_type]
    cdef _PyReq req = _PyReq.__new__(_PyReq)
    cdef Py_buffer view
    cdef uint32_t i, n = 0
    cdef int rc
    what = f"{io_type} of {num} units at {offset}"
    req.cb = cb
    req.blob_id = b.id
    req.what = what
    refs = []
    if buffers is not None:
        n = len(buffers)
        if n == 0:
            raise InvalidArgument(f"{what}: no buffers")
        req.iovs = <iovec*> malloc(n * sizeof(iovec))
        if req.iovs == NULL:
            raise MemoryError()
        total = 0
        for i in range(n):
            buf = buffers[i]
            if isinstance(buf, DmaBuffer):
                (<DmaBuffer> buf).check_live()
                req.iovs[i].iov_base = (<DmaBuffer> buf).data()
                req.iovs[i].iov_len = (<DmaBuffer> buf).nbytes()
                refs.append(buf)
            else:
                mv = memoryview(buf)
                if t == BLOB_IO_READ and mv.readonly:
                    raise InvalidArgument(f"{what}: a read needs writable buffers")
                if not mv.c_contiguous:
                    raise InvalidArgument(f"{what}: buffers must be contiguous")
                PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
                req.iovs[i].iov_base = view.buf
                req.iovs[i].iov_len = view.len
                PyBuffer_Release(&view)
                refs.append(mv)
            total += req.iovs[i].iov_len
        need = num << ch.dev.unit_shift
        if n == 1 and req.iovs[0].iov_len > need:
            req.iovs[0].iov_len = need            # one buffer may be longer than the I/O
            total = need
        if total != need:
            raise InvalidArgument(f"{what}: the buffers hold {total} bytes, the I/O needs "
                                  f"{need}")
    req.refs = refs
    req.result = (buffers[0] if n == 1 else list(buffers)) if t == BLOB_IO_READ else None
    Py_INCREF(req)
    for r in refs:
        if isinstance(r, DmaBuffer):
            (<DmaBuffer> r).pin()
    if n:
        rc = blob_submitv(ch, b, t, req.iovs, n, offset, num, _py_done, <void*> req)
    else:
        rc = blob_submit_general(ch, b, t, NULL, offset, num, _py_done, <void*> req)
    if rc != 0:
        for r in refs:
            if isinstance(r, DmaBuffer):
                (<DmaBuffer> r).unpin()
        Py_DECREF(req)
        if rc == -EXDEV:
            ch.check_thread()
        raise io_error(-rc, what, b.id)
