# The blobstore's data path at C level (see io.pyx): blobs' cluster maps, per-thread channels,
# and the submission functions an upper layer (the perf engine, an lvol bdev) calls without the
# GIL.
from libc.errno cimport ENOMEM, EIO, EXDEV
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from posix.uio cimport iovec

from bdev.core cimport BdevChannel, Descriptor, bdev_io, bdev_submit
from env.thread cimport IoChannel, IoDevice, Poller, atomic_load_int, thread_s

# Completion of a blob I/O: `status` is 0, or a negative errno: -EIO (the base bdev failed it),
# -ENOSPC (no free cluster for a first write), -ENOMEM, -ERANGE (the blob shrank under it).
ctypedef void (*blob_io_cb)(void* cb_arg, int status) noexcept nogil

cdef enum:                    # I/O types (the numbers of the bdev layer's)
    BLOB_IO_READ = 1
    BLOB_IO_WRITE = 2
    BLOB_IO_WRITE_ZEROES = 3
    BLOB_IO_UNMAP = 4

cdef enum:                    # blob_io.state
    BIO_FREE = 0
    BIO_ACTIVE = 1            # admitted: counted until it completes (freeze waits for these)
    BIO_PARKED = 2            # waiting for its blob to thaw, not yet admitted
    BIO_CHILD = 3             # one cluster's piece of an admitted request

cdef enum:                    # blob_io.flags
    BIOF_IN_SUBMIT = 1        # completing now would call back into the submitter: defer
    BIOF_OWN_IOVS = 2         # iovs was malloc()ed for this piece
    BIOF_WAIT_ALLOC = 4       # the metadata thread is giving the piece's cluster

cdef enum:                    # BlobData.flags
    BD_READ_ONLY = 1          # a snapshot: writes are refused
    BD_GONE = 2               # deleted (or the store unloaded): every I/O is refused

cdef struct blob_io:
    void* blob                # BlobData (borrowed)
    void* channel             # BlobChannel (borrowed)
    blob_io* parent           # a piece's request
    blob_io* next             # free list, deferred and parked lists, followers of a leader
    blob_io* followers        # a leader waiting for a cluster: pieces waiting for the same one
    blob_io* alloc_link       # the channel's list of leaders
    blob_io_cb cb
    void* cb_arg
    iovec* iovs
    uint32_t iovcnt
    uint32_t pending          # a split request: pieces not yet done
    iovec iov
    uint64_t offset           # I/O units in the blob
    uint64_t num
    int32_t status
    uint8_t type
    uint8_t state
    uint8_t flags
    uint32_t index


cdef class BlobData:
    """A blob as the data path sees it (the metadata layer owns it and changes it on its thread)."""
    cdef uint64_t* map              # bdev block where each cluster starts; 0: not allocated
    cdef uint64_t num_clusters
    cdef uint64_t num_units         # num_clusters in I/O units
    cdef void* parent               # BlobData read through where a cluster is not allocated
    cdef uint64_t parent_limit      # ... for clusters below this (the rest read zeroes)
    cdef object _parent_ref
    cdef readonly uint64_t id
    cdef uint32_t flags
    cdef int frozen                 # read and written atomically
    cdef BlobstoreDev dev
    cdef public object owner        # the metadata layer's record of this blob

    cdef uint64_t source_lba(self, uint64_t ci) noexcept nogil


cdef class BlobstoreDev(IoDevice):
    cdef Descriptor desc
    cdef uint32_t cshift            # log2(I/O units per cluster)
    cdef uint64_t umask             # I/O units per cluster - 1
    cdef uint32_t unit_shift        # log2(I/O unit size)
    cdef thread_s* md_thread
    cdef object _md_thread_ref
    cdef public object alloc_handler   # md thread: alloc_handler(BlobData, ci, token)
    cdef public object closed
    cdef list _unsent               # allocation replies a full message ring refused
    cdef object _retry_poller


cdef struct quiesce_rec:
    void* blob
    uint32_t left
    void* done                      # PyObject*: called (with the GIL) when left reaches 0


cdef class BlobChannel(IoChannel):
    cdef BlobstoreDev dev
    cdef BdevChannel base
    cdef Descriptor desc            # (the store's: copies of what the fast path reads)
    cdef uint32_t cshift
    cdef uint64_t umask
    cdef blob_io* ios
    cdef blob_io* free_ios
    cdef uint32_t nios
    cdef blob_io* done_head         # completed inside their submission: finished by the poller
    cdef blob_io* done_tail
    cdef blob_io* parked_head       # requests waiting for their blob to thaw
    cdef blob_io* parked_tail
    cdef blob_io* retry_head        # pieces the base refused for lack of I/O objects
    cdef blob_io* retry_tail
    cdef blob_io* resend_head       # allocation requests the metadata thread's ring refused
    cdef blob_io* leaders           # pieces whose allocation request is out (one per cluster)
    cdef quiesce_rec quiesce[8]
    cdef uint32_t nquiesce
    cdef Poller poller

    cdef int poll(self) noexcept nogil


# Submit an I/O of `type` on blob `b` through this thread's channel `ch`: `num` I/O units at unit
# `offset`, on a contiguous buffer (blob_submit; NULL for write zeroes and unmap) or an iovec
# (blob_submitv: the array must stay valid until completion and carry exactly num units).
# 0: `cb(cb_arg, status)` runs exactly once, later, from a poll of this thread (never inside this
# call); negative errno: refused, nothing happened: -EXDEV channel of another thread, -ERANGE
# outside the blob, -EROFS write to a snapshot, -ENOENT deleted blob, -EINVAL bad type/iovec,
# -ENOMEM no free I/O object on the channel.
#
# blob_submit's common case is written here, inline, so that it compiles into its caller: a read
# or write inside one allocated cluster of a blob that is not frozen goes to bdev_submit with the
# blob_io as the base I/O's context. Everything else goes to blob_submit_general (io.pyx).
cdef int blob_submit_general(BlobChannel ch, BlobData b, uint8_t type, char* buf,
                             uint64_t offset, uint64_t num, blob_io_cb cb,
                             void* cb_arg) noexcept nogil
cdef int blob_submitv(BlobChannel ch, BlobData b, uint8_t type, iovec* iovs, uint32_t iovcnt,
                      uint64_t offset, uint64_t num, blob_io_cb cb, void* cb_arg) noexcept nogil
# The base I/O's completion of the fast path (and of every piece).
cdef void blob_base_done(bdev_io* bio, bint ok, void* arg) noexcept nogil


cdef inline int blob_submit(BlobChannel ch, BlobData b, uint8_t type, char* buf, uint64_t offset,
                            uint64_t num, blob_io_cb cb, void* cb_arg) noexcept nogil:
    cdef blob_io* io
    cdef uint64_t ci = offset >> ch.cshift
    cdef uint64_t lba
    cdef int rc
    # (a snapshot's flags are BD_READ_ONLY: reads pass, writes and deleted blobs do not)
    if ((type == BLOB_IO_READ and b.flags <= BD_READ_ONLY or type == BLOB_IO_WRITE and b.flags == 0)
            and num != 0 and offset < b.num_units and num <= b.num_units - offset
            and (offset + num - 1) >> ch.cshift == ci
            and ch.free_ios != NULL and <void*> b.dev == <void*> ch.dev
            and not atomic_load_int(&b.frozen)):
        lba = b.map[ci]
        if lba:
            # The blob_io is taken from the pool only once the base took the I/O: bdev_submit
            # refuses a channel of another thread (-EXDEV) before anything happens, which
            # spares a check of our own, and never completes inside the call. Free blob_ios
            # have parent NULL, status and flags 0 (see _put).
            io = ch.free_ios
            rc = bdev_submit(ch.desc, ch.base, type, buf, lba + (offset & ch.umask), num,
                             blob_base_done, io)
            if rc == 0:
                ch.free_ios = io.next
                io.blob = <void*> b
                io.cb = cb
                io.cb_arg = cb_arg
                io.state = BIO_ACTIVE
                return 0
            return rc if rc == -ENOMEM or rc == -EXDEV else -EIO
    return blob_submit_general(ch, b, type, buf, offset, num, cb, cb_arg)
