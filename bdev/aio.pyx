# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The file backend: a bdev on a regular file or a block device (SPDK's bdev_aio).

I/O is asynchronous and polled: every channel (one per thread) owns a Linux native AIO context
(`io_setup`) of `queue_depth` slots; reads and writes become IOCB_CMD_PREAD/PWRITE (one segment) or
PREADV/PWRITEV (several) through `io_submit`, and the channel's poller reaps completions without
blocking - straight from the context's completion ring mapped in user memory (fs/aio.c's struct
aio_ring, used when its magic number and incompatible-features word say it is that layout, as SPDK
and fio's `userspace_reap` do), otherwise with `io_getevents` and a zero timeout. No thread pool,
no libaio: raw system calls.

    from bdev import aio
    aio.create("AIO0", "/var/tmp/disk.img", create_size=64 << 20)
    aio.create("AIO1", "/dev/loop0", readonly=True)

- The file is opened with O_DIRECT where the file system takes it (block devices, ext4, xfs,
  recent tmpfs...). Then `required_alignment` is the device's direct-I/O alignment (the logical
  block size of a block device; statx(STATX_DIOALIGN), or a probe, for a file), so the bdev layer
  bounces buffers that are not aligned to it; vectors whose segment lengths O_DIRECT would refuse
  are bounced by this module. Where O_DIRECT is refused (EINVAL) the bdev uses buffered I/O and
  says so once in the log (`direct=True` makes that an error, `direct=False` never tries).
- Flush is an asynchronous IOCB_CMD_FDSYNC (fdatasync() where the kernel refuses it).
- Unmap: BLKDISCARD on a block device (when its queue supports discard), fallocate(PUNCH_HOLE |
  KEEP_SIZE) on a file. Write Zeroes: BLKZEROOUT, or fallocate(ZERO_RANGE | KEEP_SIZE). Each is
  advertised only where it works (probed at creation, beyond the end of the file); without it the
  bdev layer emulates Write Zeroes with writes. These calls are synchronous: they complete inside
  the submission (the layer delivers the completion from the poller).
- Reset completes once every I/O this channel had in flight when it arrived has completed.
- A failed or short transfer completes with IO_FAILED and its errno in the I/O (`status.errno`,
  and the IoError of the blocking helpers, with its strerror): the kernel's (EFBIG beyond
  RLIMIT_FSIZE, ENOSPC, EIO...), ENODATA for a read that found the file shorter than the bdev
  (truncated under it), EIO for a write the kernel did only in part without saying why. The
  channel counts failures too (`ch.aio_stats()`). Every accepted I/O completes exactly once.
- `engine="uring"` uses io_uring (raw io_uring_setup/io_uring_enter and mmap'ed rings) instead of
  AIO where the kernel allows it: one io_uring_enter per request, as AIO's io_submit (batching the
  submissions of a poll measured slower on our virtio test disk, 73K against 87-91K IOPS),
  completions read from the ring; with cooperative task running (5.19+) completion work runs in
  those io_uring_enter calls instead of interrupting the polling thread.
"""
import errno as _errno
import fcntl
import logging
import os
import stat as _stat

from libc.errno cimport (EAGAIN, EBUSY, EINTR, EINVAL, EIO, ENODATA, ENOMEM, ENXIO, EOPNOTSUPP,
                         EROFS)
from libc.stdint cimport int16_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from bdev.core cimport (BDEV_IO_FLUSH, BDEV_IO_READ, BDEV_IO_RESET, BDEV_IO_UNMAP, BDEV_IO_WRITE,
                        BDEV_IO_WRITE_ZEROES, Bdev, BdevChannel, IO_FAILED, IO_SUCCESS, bdev_io,
                        bdev_io_complete, bdev_io_ctx)

from bdev.errors import BdevError
from env.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger("userblk.bdev.aio")

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include <sys/syscall.h>
    #include <linux/aio_abi.h>
    #include <linux/falloc.h>
    #include <linux/fs.h>
    #include <linux/io_uring.h>

    /* The completion ring the kernel maps into the process at the address io_setup returns as
       the context id (fs/aio.c: struct aio_ring; magic and incompat_features say whether this
       layout is the one in use). The kernel produces at `tail`, the process may consume at
       `head` itself instead of calling io_getevents. */
    typedef struct {
        unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
        struct io_event events[];
    } ublk_aio_ring;
    #define UBLK_AIO_RING_MAGIC 0xa10a10a1u

    static inline int ublk_io_setup(unsigned nr, aio_context_t *ctx)
    { *ctx = 0; return syscall(SYS_io_setup, nr, ctx) < 0 ? -errno : 0; }
    static inline int ublk_io_destroy(aio_context_t ctx)
    { return syscall(SYS_io_destroy, ctx) < 0 ? -errno : 0; }
    static inline int ublk_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
    { long rc = syscall(SYS_io_submit, ctx, n, iocbs); return rc < 0 ? -errno : (int)rc; }
    /* timeout_ns < 0: wait without a limit */
    static inline int ublk_io_getevents(aio_context_t ctx, long min_nr, long nr,
                                        struct io_event *ev, long long timeout_ns)
    {
        struct timespec ts = { (time_t)(timeout_ns / 1000000000LL),
                               (long)(timeout_ns % 1000000000LL) };
        long rc = syscall(SYS_io_getevents, ctx, min_nr, nr, ev, timeout_ns < 0 ? NULL : &ts);
        return rc < 0 ? -errno : (int)rc;
    }
    static inline int ublk_aio_ring_usable(aio_context_t ctx)
    {
        ublk_aio_ring *r = (ublk_aio_ring *)(uintptr_t)ctx;
        return r != NULL && r->magic == UBLK_AIO_RING_MAGIC && r->incompat_features == 0;
    }
    /* Consume up to `max` events from the ring (only the context's owner may call this). */
    static inline int ublk_aio_ring_reap(aio_context_t ctx, struct io_event *ev, int max)
    {
        ublk_aio_ring *r = (ublk_aio_ring *)(uintptr_t)ctx;
        unsigned nr = r->nr, head = r->head;
        unsigned tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
        int n = 0;
        if (head >= nr || tail >= nr) return -EIO;
        while (head != tail && n < max) {
            ev[n++] = r->events[head];
            head = head + 1 == nr ? 0 : head + 1;
        }
        if (n) __atomic_store_n(&r->head, head, __ATOMIC_RELEASE);
        return n;
    }

    static inline int ublk_fallocate(int fd, int mode, uint64_t off, uint64_t len)
    { return fallocate(fd, mode, (off_t)off, (off_t)len) < 0 ? -errno : 0; }
    static inline int ublk_blk_range_ioctl(int fd, unsigned long req, uint64_t off, uint64_t len)
    { uint64_t r[2] = { off, len }; return ioctl(fd, req, r) < 0 ? -errno : 0; }
    static inline int ublk_fdatasync(int fd) { return fdatasync(fd) < 0 ? -errno : 0; }
    static inline long ublk_pread(int fd, void *buf, size_t n, uint64_t off)
    { long rc = pread(fd, buf, n, (off_t)off); return rc < 0 ? -errno : rc; }
    static inline void *ublk_aligned_alloc(size_t align, size_t n)
    { void *p = NULL; return posix_memalign(&p, align, n) ? NULL : p; }

    /* statx(STATX_DIOALIGN): direct-I/O alignment of memory and file offsets (0: unknown). */
    static inline int ublk_dio_align(int fd, uint32_t *mem, uint32_t *off)
    {
    #ifdef STATX_DIOALIGN
        struct statx stx;
        memset(&stx, 0, sizeof stx);
        if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return -errno;
        if (!(stx.stx_mask & STATX_DIOALIGN)) return -EOPNOTSUPP;
        *mem = stx.stx_dio_mem_align;
        *off = stx.stx_dio_offset_align;
        return 0;
    #else
        (void)fd; *mem = *off = 0; return -EOPNOTSUPP;
    #endif
    }

    /* ---- io_uring, raw ---- */
    typedef struct {
        int fd;
        unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *sq_flags;
        unsigned *cq_head, *cq_tail, *cq_mask;
        struct io_uring_sqe *sqes;
        struct io_uring_cqe *cqes;
        void *sq_ring, *cq_ring;
        size_t sq_ring_sz, cq_ring_sz, sqes_sz;
        unsigned sq_entries, cq_entries;
        unsigned to_submit;           /* SQEs written, not yet handed to the kernel */
        unsigned coop;                /* COOP_TASKRUN: completions wait for our next enter */
        unsigned sqe_tail;            /* our local tail (published at submit) */
    } ublk_uring;

    static inline void ublk_uring_unmap(ublk_uring *u)
    {
        if (u->sqes && u->sqes != MAP_FAILED) munmap(u->sqes, u->sqes_sz);
        if (u->cq_ring && u->cq_ring != MAP_FAILED && u->cq_ring != u->sq_ring)
            munmap(u->cq_ring, u->cq_ring_sz);
        if (u->sq_ring && u->sq_ring != MAP_FAILED) munmap(u->sq_ring, u->sq_ring_sz);
        if (u->fd >= 0) close(u->fd);
        memset(u, 0, sizeof *u);
        u->fd = -1;
    }

    static inline int ublk_uring_setup(ublk_uring *u, unsigned entries)
    {
        struct io_uring_params p;
        memset(u, 0, sizeof *u);
        memset(&p, 0, sizeof p);
        u->fd = -1;
        /* Completions of block I/O reach the ring as task work. Cooperative task running
           (5.19+) has the kernel flag it in sq_flags instead of interrupting this thread with an
           IPI per completion; the poller then runs it with the submission's io_uring_enter. */
        p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
        p.cq_entries = entries * 2;
        int fd = (int)syscall(SYS_io_uring_setup, entries, &p);
        if (fd < 0 && errno == EINVAL) {
            memset(&p, 0, sizeof p);
            p.flags = IORING_SETUP_CQSIZE;
            p.cq_entries = entries * 2;
            fd = (int)syscall(SYS_io_uring_setup, entries, &p);
        } else if (fd >= 0) {
            u->coop = 1;
        }
        if (fd < 0) return -errno;
        u->fd = fd;
        u->sq_entries = p.sq_entries;
        u->cq_entries = p.cq_entries;
        u->sq_ring_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
        u->cq_ring_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
        if (p.features & IORING_FEAT_SINGLE_MMAP) {
            if (u->cq_ring_sz > u->sq_ring_sz) u->sq_ring_sz = u->cq_ring_sz;
            u->cq_ring_sz = u->sq_ring_sz;
        }
        u->sq_ring = mmap(NULL, u->sq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                          fd, IORING_OFF_SQ_RING);
        if (u->sq_ring == MAP_FAILED) { int e = -errno; ublk_uring_unmap(u); return e; }
        if (p.features & IORING_FEAT_SINGLE_MMAP) {
            u->cq_ring = u->sq_ring;
        } else {
            u->cq_ring = mmap(NULL, u->cq_ring_sz, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
            if (u->cq_ring == MAP_FAILED) { int e = -errno; ublk_uring_unmap(u); return e; }
        }
        u->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
        u->sqes = mmap(NULL, u->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       fd, IORING_OFF_SQES);
        if (u->sqes == MAP_FAILED) { int e = -errno; ublk_uring_unmap(u); return e; }
        char *sq = (char *)u->sq_ring, *cq = (char *)u->cq_ring;
        u->sq_head = (unsigned *)(sq + p.sq_off.head);
        u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
        u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
        u->sq_array = (unsigned *)(sq + p.sq_off.array);
        u->sq_flags = (unsigned *)(sq + p.sq_off.flags);
        u->cq_head = (unsigned *)(cq + p.cq_off.head);
        u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
        u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
        u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
        u->sqe_tail = *u->sq_tail;
        return 0;
    }

    /* A free SQE (zeroed), or NULL when the submission ring is full. */
    static inline struct io_uring_sqe *ublk_uring_get_sqe(ublk_uring *u)
    {
        unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
        if (u->sqe_tail - head >= u->sq_entries) return NULL;
        unsigned idx = u->sqe_tail & *u->sq_mask;
        struct io_uring_sqe *sqe = &u->sqes[idx];
        memset(sqe, 0, sizeof *sqe);
        u->sq_array[idx] = idx;
        u->sqe_tail++;
        u->to_submit++;
        return sqe;
    }

    /* Does the kernel hold completions for us to run (COOP_TASKRUN)? */
    static inline int ublk_uring_taskrun(ublk_uring *u)
    { return u->coop && (__atomic_load_n(u->sq_flags, __ATOMIC_RELAXED) & IORING_SQ_TASKRUN); }

    /* Give the kernel what was queued (and run pending completion work): how many SQEs it
       took, or -errno. */
    static inline int ublk_uring_submit(ublk_uring *u)
    {
        unsigned flags = 0;
        if (ublk_uring_taskrun(u)) flags |= IORING_ENTER_GETEVENTS;
        if (!u->to_submit && !flags) return 0;
        __atomic_store_n(u->sq_tail, u->sqe_tail, __ATOMIC_RELEASE);
        long rc = syscall(SYS_io_uring_enter, u->fd, u->to_submit, 0, flags, NULL, 0);
        if (rc < 0) return -errno;
        u->to_submit -= (unsigned)rc;
        return (int)rc;
    }

    /* Wait for at least `min` completions (blocking; teardown only). */
    static inline int ublk_uring_wait(ublk_uring *u, unsigned min)
    {
        long rc = syscall(SYS_io_uring_enter, u->fd, 0, min, IORING_ENTER_GETEVENTS, NULL, 0);
        return rc < 0 ? -errno : 0;
    }

    static inline int ublk_uring_peek(ublk_uring *u, uint64_t *data, int *res)
    {
        unsigned head = *u->cq_head;
        if (head == __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE)) return 0;
        struct io_uring_cqe *c = &u->cqes[head & *u->cq_mask];
        *data = c->user_data;
        *res = c->res;
        __atomic_store_n(u->cq_head, head + 1, __ATOMIC_RELEASE);
        return 1;
    }

    static inline int ublk_uring_probe(void)
    {
        ublk_uring u;
        int rc = ublk_uring_setup(&u, 2);
        if (rc == 0) ublk_uring_unmap(&u);
        return rc;
    }

    static inline void ublk_sqe_rw(struct io_uring_sqe *s, int op, int fd, uint64_t addr,
                                   uint32_t len, uint64_t off, uint64_t data)
    {
        s->opcode = (uint8_t)op; s->fd = fd; s->addr = addr; s->len = len; s->off = off;
        s->user_data = data;
    }
    static inline void ublk_sqe_fsync(struct io_uring_sqe *s, int fd, uint64_t data)
    {
        s->opcode = IORING_OP_FSYNC; s->fd = fd; s->fsync_flags = IORING_FSYNC_DATASYNC;
        s->user_data = data;
    }
    """
    ctypedef unsigned long aio_context_t
    cdef struct iocb:
        uint64_t aio_data
        uint32_t aio_key
        int aio_rw_flags
        uint16_t aio_lio_opcode
        int16_t aio_reqprio
        uint32_t aio_fildes
        uint64_t aio_buf
        uint64_t aio_nbytes
        int64_t aio_offset
        uint64_t aio_reserved2
        uint32_t aio_flags
        uint32_t aio_resfd
    cdef struct io_event:
        uint64_t data
        uint64_t obj
        int64_t res
        int64_t res2
    enum:
        IOCB_CMD_PREAD
        IOCB_CMD_PWRITE
        IOCB_CMD_FDSYNC
        IOCB_CMD_PREADV
        IOCB_CMD_PWRITEV
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE
        BLKDISCARD
        BLKZEROOUT
        BLKSSZGET
        BLKGETSIZE64
        IORING_OP_READ
        IORING_OP_WRITE
        IORING_OP_READV
        IORING_OP_WRITEV
    int io_setup "ublk_io_setup"(unsigned nr, aio_context_t* ctx) nogil
    int io_destroy "ublk_io_destroy"(aio_context_t ctx) nogil
    int io_submit "ublk_io_submit"(aio_context_t ctx, long n, iocb** iocbs) nogil
    int io_getevents "ublk_io_getevents"(aio_context_t ctx, long min_nr, long nr, io_event* ev,
                                          long long timeout_ns) nogil
    bint aio_ring_usable "ublk_aio_ring_usable"(aio_context_t ctx) nogil
    int aio_ring_reap "ublk_aio_ring_reap"(aio_context_t ctx, io_event* ev, int max) nogil
    int c_fallocate "ublk_fallocate"(int fd, int mode, uint64_t off, uint64_t length) nogil
    int blk_range_ioctl "ublk_blk_range_ioctl"(int fd, unsigned long req, uint64_t off,
                                               uint64_t length) nogil
    int c_fdatasync "ublk_fdatasync"(int fd) nogil
    long c_pread "ublk_pread"(int fd, void* buf, size_t n, uint64_t off) nogil
    void* aligned_alloc "ublk_aligned_alloc"(size_t align, size_t n) nogil
    int dio_align "ublk_dio_align"(int fd, uint32_t* mem, uint32_t* off) nogil

    cdef struct io_uring_sqe:
        pass
    ctypedef struct uring_t "ublk_uring":
        int fd
        unsigned sq_entries
        unsigned cq_entries
        unsigned to_submit
        unsigned coop
    int uring_setup "ublk_uring_setup"(uring_t* u, unsigned entries) nogil
    void uring_unmap "ublk_uring_unmap"(uring_t* u) nogil
    io_uring_sqe* uring_get_sqe "ublk_uring_get_sqe"(uring_t* u) nogil
    int uring_submit "ublk_uring_submit"(uring_t* u) nogil
    bint uring_taskrun "ublk_uring_taskrun"(uring_t* u) nogil
    int uring_wait "ublk_uring_wait"(uring_t* u, unsigned min) nogil
    int uring_peek "ublk_uring_peek"(uring_t* u, uint64_t* data, int* res) nogil
    int uring_probe "ublk_uring_probe"() nogil
    void sqe_rw "ublk_sqe_rw"(io_uring_sqe* s, int op, int fd, uint64_t addr, uint32_t length,
                              uint64_t off, uint64_t data) nogil
    void sqe_fsync "ublk_sqe_fsync"(io_uring_sqe* s, int fd, uint64_t data) nogil


cdef enum:
    ENGINE_AIO = 0
    ENGINE_URING = 1
    MAX_EVENTS = 128          # completions reaped per poll
    IOV_MAX_SEGMENTS = 1024   # the kernel's UIO_MAXIOV
    SLOT_IO = 0               # what a slot carries
    SLOT_FLUSH = 1

# Reap AIO completions from the ring in user memory (else io_getevents). Read when a channel is
# created; tests turn it off to cover the system-call path.
USER_REAP = True

MAX_QUEUE_DEPTH = 4096
MAX_TRANSFER_BYTES = 1 << 30


class AioFileError(BdevError, OSError):
    """The file (or block device) behind an aio bdev cannot be used: `filename` and `errno` say
    which and why."""

    def __init__(self, message, filename=None, err=None, bdev=None):
        BdevError.__init__(self, message, bdev)
        self.filename = filename
        self.errno = err
        self.strerror = os.strerror(err) if err else None

    def __str__(self):
        return self.args[0]


# A reset's module context (bdev_io_ctx): it waits, chained with the other resets, until
# every slot that was in flight when it came has completed.
cdef struct reset_ctx:
    bdev_io* next             # the next waiting reset
    uint64_t seq              # slots submitted before this sequence number count
    uint64_t left             # how many of them are still in flight


# One in-flight request of a channel: the iocb the kernel got (AIO) and what to finish.
cdef struct aio_slot:
    iocb cb
    bdev_io* io
    uint64_t seq              # submission order (for resets)
    uint64_t expect           # bytes a full transfer returns
    char* bounce              # the module's own bounce buffer, if any
    uint8_t kind
    aio_slot* next


cdef int _submit_iocb(AioChannel ch, aio_slot* s) noexcept nogil:
    """io_submit of the slot's iocb: 0 when submitted; otherwise the slot is given back and
    the result is -ENOMEM (the context is busy: retry later) or the error."""
    cdef iocb* cbs[1]
    cdef int rc
    cbs[0] = &s.cb
    ch.syscalls_submit += 1
    rc = io_submit(ch.ctx, 1, cbs)
    if rc == 1:
        ch.inflight += 1
        ch.submitted += 1
        return 0
    ch._put_slot(s)
    if rc == 0 or rc == -EAGAIN or rc == -ENOMEM or rc == -EINTR:
        ch.eagain += 1
        return -ENOMEM
    return rc


cdef io_uring_sqe* _uring_sqe(AioChannel ch, aio_slot* s) noexcept nogil:
    """A free SQE of the channel's ring for slot `s`; NULL when the ring is full (the slot is
    given back: the layer retries later)."""
    cdef io_uring_sqe* sqe = uring_get_sqe(&ch.ring)
    if sqe == NULL:
        ch._put_slot(s)
        ch.eagain += 1
    return sqe


cdef void _uring_queued(AioChannel ch) noexcept nogil:
    """An SQE was filled in: count it and hand it to the kernel."""
    ch.inflight += 1
    ch.submitted += 1
    ch._uring_flush()


cdef class AioChannel(BdevChannel):
    """A thread's channel to an aio bdev: its AIO context (or io_uring) and request slots."""
    cdef aio_context_t ctx
    cdef uring_t ring
    cdef int engine
    cdef bint opened
    cdef bint user_reap
    cdef aio_slot* slots
    cdef aio_slot* free_slots
    cdef uint32_t depth
    cdef uint32_t inflight
    cdef uint64_t seq
    cdef bdev_io* resets          # waiting resets (chained through their reset_ctx)
    cdef io_event* events
    # statistics
    cdef uint64_t submitted
    cdef uint64_t completed
    cdef uint64_t failed
    cdef uint64_t short_transfers
    cdef uint64_t eagain
    cdef uint64_t bounced
    cdef uint64_t sync_ops
    cdef uint64_t syscalls_submit
    cdef uint64_t syscalls_reap
    cdef int last_errno

    cdef int _open(self, uint32_t depth, int engine, bint user_reap) except -1:
        """Set up the engine: 0, or a positive errno (MemoryError raises)."""
        cdef int rc
        cdef uint32_t i
        self.slots = <aio_slot*> calloc(depth, sizeof(aio_slot))
        self.events = <io_event*> calloc(MAX_EVENTS, sizeof(io_event))
        if self.slots == NULL or self.events == NULL:
            free(self.slots)
            free(self.events)
            self.slots = NULL
            self.events = NULL
            raise MemoryError("aio channel slots")
        for i in range(depth):
            self.slots[i].next = self.free_slots
            self.free_slots = &self.slots[i]
        self.depth = depth
        self.engine = engine
        self.ring.fd = -1
        if engine == ENGINE_AIO:
            rc = io_setup(depth, &self.ctx)
            if rc == 0:
                self.user_reap = user_reap and aio_ring_usable(self.ctx)
        else:
            rc = uring_setup(&self.ring, depth)
        if rc != 0:
            self.ctx = 0
            free(self.slots)
            free(self.events)
            self.slots = NULL
            self.events = NULL
            self.free_slots = NULL
            return -rc
        self.opened = True
        return 0

    cdef void _close(self) noexcept nogil:
        if not self.opened:
            return
        self.opened = False
        if self.engine == ENGINE_AIO:
            if self.ctx != 0:
                io_destroy(self.ctx)
                self.ctx = 0
        elif self.ring.fd >= 0:
            uring_unmap(&self.ring)
        free(self.slots)
        free(self.events)
        self.slots = NULL
        self.events = NULL
        self.free_slots = NULL

    cdef inline aio_slot* _get_slot(self) noexcept nogil:
        cdef aio_slot* s = self.free_slots
        if s != NULL:
            self.free_slots = s.next
        return s

    cdef inline void _put_slot(self, aio_slot* s) noexcept nogil:
        if s.bounce != NULL:
            free(s.bounce)
            s.bounce = NULL
        s.io = NULL
        s.next = self.free_slots
        self.free_slots = s

    # -- resets --
    cdef void _add_reset(self, bdev_io* io) noexcept nogil:
        """Complete `io` once every slot in flight now has completed."""
        cdef uint32_t i, n = 0
        for i in range(self.depth):
            if self.slots[i].io != NULL:
                n += 1
        cdef reset_ctx* ctx = <reset_ctx*> bdev_io_ctx(io)
        if n == 0:
            bdev_io_complete(io, IO_SUCCESS)
            return
        self.seq += 1
        ctx.next = self.resets
        ctx.seq = self.seq
        ctx.left = n
        self.resets = io

    cdef void _resets_note(self, uint64_t seq) noexcept nogil:
        """A slot submitted at `seq` completed: resets that waited for it count down."""
        cdef bdev_io* r = self.resets
        cdef bdev_io* prev = NULL
        cdef bdev_io* nxt
        cdef reset_ctx* ctx
        while r != NULL:
            ctx = <reset_ctx*> bdev_io_ctx(r)
            nxt = ctx.next
            if seq < ctx.seq:
                ctx.left -= 1
                if ctx.left == 0:
                    if prev == NULL:
                        self.resets = nxt
                    else:
                        (<reset_ctx*> bdev_io_ctx(prev)).next = nxt
                    bdev_io_complete(r, IO_SUCCESS)
                    r = nxt
                    continue
            prev = r
            r = nxt

    # -- completion of one slot --
    cdef void _slot_done(self, aio_slot* s, int64_t res) noexcept nogil:
        cdef bdev_io* io = s.io
        cdef uint64_t seq = s.seq
        cdef uint8_t status = IO_SUCCESS
        cdef uint32_t i
        cdef char* src
        self.inflight -= 1
        self.completed += 1
        if res < 0:
            status = IO_FAILED
            self.failed += 1
            self.last_errno = <int> -res
            io.error = <int> -res
        elif s.kind == SLOT_IO and <uint64_t> res != s.expect:
            # a short transfer has no errno of its own: a read met the end of the file (it was
            # truncated under the bdev), a write was cut short (the kernel says why only on the
            # next write)
            status = IO_FAILED
            self.failed += 1
            self.short_transfers += 1
            io.error = ENODATA if io.type == BDEV_IO_READ else EIO
            self.last_errno = io.error
        if status == IO_SUCCESS and s.bounce != NULL and io.type == BDEV_IO_READ:
            src = s.bounce
            for i in range(io.iovcnt):
                memcpy(io.iovs[i].iov_base, src, io.iovs[i].iov_len)
                src += io.iovs[i].iov_len
        self._put_slot(s)
        bdev_io_complete(io, status)
        if self.resets != NULL:
            self._resets_note(seq)

    cdef int reap(self) noexcept nogil:
        """Finish what the kernel completed; how many."""
        cdef int n, i, total = 0
        cdef uint64_t data
        cdef int res
        if self.engine == ENGINE_URING:
            if self.ring.to_submit or uring_taskrun(&self.ring):
                self._uring_flush()
            while uring_peek(&self.ring, &data, &res):
                self._slot_done(<aio_slot*> <uintptr_t> data, res)
                total += 1
            return total
        if self.inflight == 0:
            return 0
        while True:
            if self.user_reap:
                n = aio_ring_reap(self.ctx, self.events, MAX_EVENTS)
                if n == -EIO:               # not the layout we know: ask the kernel from now on
                    self.user_reap = False
                    continue
            else:
                self.syscalls_reap += 1
                n = io_getevents(self.ctx, 0, MAX_EVENTS, self.events, 0)
            if n <= 0:
                if n < 0 and n != -EINTR:
                    self.last_errno = -n
                return total
            # slots are released before any callback runs; callbacks may submit more
            for i in range(n):
                self._slot_done(<aio_slot*> <uintptr_t> self.events[i].data, self.events[i].res)
            total += n
            if n < MAX_EVENTS:
                return total

    cdef void _uring_flush(self) noexcept nogil:
        cdef int rc = uring_submit(&self.ring)
        self.syscalls_submit += 1
        if rc < 0 and rc != -EAGAIN and rc != -EINTR and rc != -EBUSY:
            self.last_errno = -rc

    def drain(self, double timeout=30.0):
        """Wait (blocking) until nothing is in flight; the completions run as usual."""
        import time
        deadline = time.monotonic() + timeout
        cdef int n, i
        while self.inflight and time.monotonic() < deadline:
            with nogil:
                if self.engine == ENGINE_AIO:
                    n = io_getevents(self.ctx, 1, MAX_EVENTS, self.events, 100000000)
                    if n > 0:
                        for i in range(n):
                            self._slot_done(<aio_slot*> <uintptr_t> self.events[i].data,
                                            self.events[i].res)
                else:
                    if self.ring.to_submit:
                        self._uring_flush()
                    if self.reap() == 0:
                        uring_wait(&self.ring, 1)
        return self.inflight == 0

    def __dealloc__(self):
        # a channel torn down the normal way is already closed; this catches the others (the
        # kernel waits for their I/O in io_destroy / ring teardown)
        self._close()

    def aio_stats(self):
        """This channel's engine counters (and the last errno a request failed with)."""
        return {"engine": "uring" if self.engine == ENGINE_URING else "aio",
                "uring_coop_taskrun": bool(self.ring.coop),
                "queue_depth": self.depth, "inflight": self.inflight,
                "submitted": self.submitted, "completed": self.completed,
                "failed": self.failed, "short_transfers": self.short_transfers,
                "eagain": self.eagain, "bounced": self.bounced, "sync_ops": self.sync_ops,
                "submit_syscalls": self.syscalls_submit, "reap_syscalls": self.syscalls_reap,
                "user_reap": bool(self.user_reap), "last_errno": self.last_errno}


cdef class AioBdev(Bdev):
    """A bdev on a file or block device; see the module's docstring."""
    channel_class = AioChannel

    cdef int fd
    cdef readonly bint direct
    cdef readonly bint readonly
    cdef readonly bint is_block_device
    cdef readonly uint32_t dio_alignment        # O_DIRECT: offsets, lengths and addresses
    cdef readonly uint32_t queue_depth
    cdef int engine
    cdef bint fdsync_async                       # IOCB_CMD_FDSYNC works (cleared when refused)
    cdef readonly object filename
    cdef readonly bint block_size_override
    cdef readonly bint fallocate_supported
    cdef readonly object engine_name

    def _attach(self, int fd, filename, bint direct, bint readonly, bint is_block_device,
                uint32_t dio_alignment, uint32_t queue_depth, engine, bint block_size_override,
                bint fallocate_supported):
        self.fd = fd
        self.filename = filename
        self.direct = direct
        self.readonly = readonly
        self.is_block_device = is_block_device
        self.dio_alignment = dio_alignment
        self.queue_depth = queue_depth
        self.engine = ENGINE_URING if engine == "uring" else ENGINE_AIO
        self.engine_name = engine
        self.fdsync_async = True
        self.block_size_override = block_size_override
        self.fallocate_supported = fallocate_supported

    # -- channels --
    def setup_channel(self, BdevChannel ch):
        cdef int rc = -(<AioChannel> ch)._open(self.queue_depth, self.engine, USER_REAP)
        if rc == -EAGAIN and self.engine == ENGINE_AIO:
            raise ResourceExhausted(
                f"{self.name}: io_setup({self.queue_depth}) failed: the system's AIO limit "
                f"(/proc/sys/fs/aio-max-nr) is reached; use a smaller queue_depth or raise it")
        if rc != 0:
            what = "io_setup" if self.engine == ENGINE_AIO else "io_uring_setup"
            raise BdevError(f"{self.name}: {what}({self.queue_depth}) failed: "
                            f"{os.strerror(-rc)}", self.name)

    def teardown_channel(self, BdevChannel ch):
        cdef AioChannel c = <AioChannel> ch
        if c.inflight and not c.drain(30.0):
            log.error("%s: %d I/O(s) still in flight on %s after 30 s; their context is "
                      "destroyed (the kernel waits for them)", self.name, c.inflight,
                      ch.thread.name)
        with nogil:
            c._close()

    # -- the data path --
    cdef int submit_request(self, BdevChannel bch, bdev_io* io) noexcept nogil:
        return self._submit(<AioChannel> <void*> bch, io)

    cdef int _submit(self, AioChannel ch, bdev_io* io) noexcept nogil:
        cdef int rc
        cdef uint64_t off, length
        if self.fd < 0:
            io.error = ENXIO                # the file was closed: the bdev is gone
            bdev_io_complete(io, IO_FAILED)
            return 0
        if io.type == BDEV_IO_READ:
            return self._submit_rw(ch, io, False)
        if io.type == BDEV_IO_RESET:
            ch._add_reset(io)
            return 0
        if io.type == BDEV_IO_FLUSH:
            return self._submit_flush(ch, io)
        if self.readonly:           # the layer refuses these already (not advertised)
            return -EROFS
        if io.type == BDEV_IO_WRITE:
            return self._submit_rw(ch, io, True)
        off = io.offset_blocks << self.block_shift
        length = io.num_blocks << self.block_shift
        if io.type == BDEV_IO_UNMAP:
            if self.is_block_device:
                rc = blk_range_ioctl(self.fd, BLKDISCARD, off, length)
            else:
                rc = c_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
        elif io.type == BDEV_IO_WRITE_ZEROES:
            if self.is_block_device:
                rc = blk_range_ioctl(self.fd, BLKZEROOUT, off, length)
            else:
                rc = c_fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, length)
        else:
            return -EOPNOTSUPP
        ch.sync_ops += 1
        if rc != 0:
            ch.failed += 1
            ch.last_errno = -rc
            io.error = -rc
        bdev_io_complete(io, IO_SUCCESS if rc == 0 else IO_FAILED)
        return 0

    cdef bint _needs_bounce(self, bdev_io* io) noexcept nogil:
        """O_DIRECT takes only segments whose address and length are aligned; the layer
        aligns addresses (required_alignment), lengths of vector segments are ours to check."""
        cdef uint32_t i
        cdef uint64_t mask = self.dio_alignment - 1
        if io.iovcnt > IOV_MAX_SEGMENTS:
            return True
        if not self.direct:
            return False
        for i in range(io.iovcnt):
            if (<uintptr_t> io.iovs[i].iov_base | io.iovs[i].iov_len) & mask:
                return True
        return False

    cdef int _submit_rw(self, AioChannel ch, bdev_io* io, bint write) noexcept nogil:
        cdef aio_slot* s = ch._get_slot()
        cdef iocb* cb
        cdef uint64_t nbytes = io.num_blocks << self.block_shift
        cdef uint64_t buf
        cdef uint32_t i, nseg
        cdef char* dst
        cdef int rc, op
        cdef io_uring_sqe* sqe
        if s == NULL:
            return -ENOMEM
        s.io = io
        s.kind = SLOT_IO
        s.expect = nbytes
        s.bounce = NULL
        if self._needs_bounce(io):
            s.bounce = <char*> aligned_alloc(max(<uint32_t> 4096, self.dio_alignment), nbytes)
            if s.bounce == NULL:
                ch._put_slot(s)
                return -ENOMEM
            ch.bounced += 1
            if write:
                dst = s.bounce
                for i in range(io.iovcnt):
                    memcpy(dst, io.iovs[i].iov_base, io.iovs[i].iov_len)
                    dst += io.iovs[i].iov_len
        if s.bounce != NULL or io.iovcnt == 1:
            buf = <uintptr_t> (s.bounce if s.bounce != NULL else <char*> io.iovs[0].iov_base)
            nseg = 0
        else:
            buf = <uintptr_t> io.iovs
            nseg = io.iovcnt
        ch.seq += 1
        s.seq = ch.seq
        if ch.engine == ENGINE_URING:
            sqe = _uring_sqe(ch, s)
            if sqe == NULL:
                return -ENOMEM
            if nseg:
                op = IORING_OP_WRITEV if write else IORING_OP_READV
                sqe_rw(sqe, op, self.fd, buf, nseg, io.offset_blocks << self.block_shift,
                       <uintptr_t> s)
            else:
                op = IORING_OP_WRITE if write else IORING_OP_READ
                sqe_rw(sqe, op, self.fd, buf, <uint32_t> nbytes,
                       io.offset_blocks << self.block_shift, <uintptr_t> s)
            _uring_queued(ch)
            return 0
        cb = &s.cb
        memset(cb, 0, sizeof(iocb))
        cb.aio_data = <uintptr_t> s
        cb.aio_fildes = self.fd
        cb.aio_offset = <int64_t> (io.offset_blocks << self.block_shift)
        cb.aio_buf = buf
        if nseg:
            cb.aio_lio_opcode = IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV
            cb.aio_nbytes = nseg
        else:
            cb.aio_lio_opcode = IOCB_CMD_PWRITE if write else IOCB_CMD_PREAD
            cb.aio_nbytes = nbytes
        rc = _submit_iocb(ch, s)
        if rc == 0 or rc == -ENOMEM:    # -ENOMEM: the layer queues it, retries from the poller
            return rc
        ch.failed += 1
        ch.last_errno = -rc
        io.error = -rc
        bdev_io_complete(io, IO_FAILED)
        return 0

    cdef int _submit_flush(self, AioChannel ch, bdev_io* io) noexcept nogil:
        cdef aio_slot* s
        cdef io_uring_sqe* sqe
        cdef int rc
        if self.fdsync_async:
            s = ch._get_slot()
            if s == NULL:
                return -ENOMEM
            s.io = io
            s.kind = SLOT_FLUSH
            s.expect = 0
            s.bounce = NULL
            ch.seq += 1
            s.seq = ch.seq
            if ch.engine == ENGINE_URING:
                sqe = _uring_sqe(ch, s)
                if sqe == NULL:
                    return -ENOMEM
                sqe_fsync(sqe, self.fd, <uintptr_t> s)
                _uring_queued(ch)
                return 0
            memset(&s.cb, 0, sizeof(iocb))
            s.cb.aio_data = <uintptr_t> s
            s.cb.aio_fildes = self.fd
            s.cb.aio_lio_opcode = IOCB_CMD_FDSYNC
            rc = _submit_iocb(ch, s)
            if rc == 0 or rc == -ENOMEM:
                return rc
            if rc != -EINVAL and rc != -EOPNOTSUPP:
                ch.failed += 1
                ch.last_errno = -rc
                io.error = -rc
                bdev_io_complete(io, IO_FAILED)
                return 0
            self.fdsync_async = False        # not for this file: fdatasync from now on
        rc = c_fdatasync(self.fd)
        ch.sync_ops += 1
        if rc != 0:
            ch.failed += 1
            ch.last_errno = -rc
            io.error = -rc
        bdev_io_complete(io, IO_SUCCESS if rc == 0 else IO_FAILED)
        return 0

    cdef int poll_channel(self, BdevChannel bch) noexcept nogil:
        return self._poll(<AioChannel> <void*> bch)

    cdef int _poll(self, AioChannel ch) noexcept nogil:
        cdef int n
        if ch.inflight == 0 and ch.ring.to_submit == 0:
            return 0
        return ch.reap()

    # -- life cycle and description --
    def destruct(self):
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def fileno(self):
        """The file descriptor the bdev does its I/O on (-1 once destroyed)."""
        return self.fd

    @property
    def fdsync_supported(self):
        """Does flush go through the engine (IOCB_CMD_FDSYNC / IORING_OP_FSYNC)? It turns
        False, for good, the first time the kernel refuses it; fdatasync() then."""
        return bool(self.fdsync_async)

    def _disable_async_flush(self):
        """Flush with fdatasync() from now on, as on a kernel that refuses IOCB_CMD_FDSYNC
        (for tests)."""
        self.fdsync_async = False

    def config_json(self):
        return {"method": "bdev_aio_create",
                "params": {"name": self.name, "filename": self.filename,
                           "block_size": self.block_size, "readonly": bool(self.readonly),
                           "uuid": str(self.uuid)}}

    def driver_specific(self):
        return {"filename": self.filename, "block_size_override": bool(self.block_size_override),
                "readonly": bool(self.readonly), "fallocate": bool(self.fallocate_supported),
                "o_direct": bool(self.direct), "dio_alignment": self.dio_alignment,
                "block_device": bool(self.is_block_device), "engine": self.engine_name,
                "queue_depth": self.queue_depth}


# ---- creation ------------------------------------------------------------------------------------
def _file_error(what, filename, exc, name):
    err = getattr(exc, "errno", None)
    hints = {_errno.ENOENT: "no such file (give create_size= to create a file)",
             _errno.EACCES: "permission denied", _errno.EPERM: "operation not permitted",
             _errno.EROFS: "read-only file system (use readonly=True)",
             _errno.EISDIR: "it is a directory, not a file or block device",
             _errno.EBUSY: "the device is busy (in use by another driver or mounted)",
             _errno.ENOTDIR: "a component of the path is not a directory"}
    text = hints.get(err, os.strerror(err) if err else str(exc))
    return AioFileError(f"aio bdev {name}: cannot {what} {filename}: {text}", filename, err, name)


def _probe_dio_alignment(int fd, size):
    """The smallest power of two from 512 up that O_DIRECT accepts for offset, length and
    address (statx(STATX_DIOALIGN) where the kernel says; else a read probe)."""
    cdef uint32_t mem = 0, off = 0
    cdef int rc
    cdef long r
    cdef void* p
    cdef uint32_t a
    with nogil:
        rc = dio_align(fd, &mem, &off)
    if rc == 0 and off:
        return max(off, mem, 1)
    a = 512
    while a <= 65536:
        p = aligned_alloc(a, a)
        if p == NULL:
            raise MemoryError()
        with nogil:
            r = c_pread(fd, p, a, 0)
        free(p)
        if r != -EINVAL:
            return a
        a <<= 1
    return 4096


def _uring_status():
    """0 when io_uring can be set up here, else the negative errno."""
    cdef int rc
    with nogil:
        rc = uring_probe()
    return rc


def uring_available():
    """Can engine="uring" be used on this kernel (not disabled, not filtered)?"""
    return _uring_status() == 0


def _block_device_facts(int fd):
    import struct
    size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    lbs = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    return size, lbs


def _discard_supported(st):
    path = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    for q in (f"{path}/queue/discard_max_bytes", f"{path}/../queue/discard_max_bytes"):
        try:
            with open(q) as f:
                return int(f.read().strip() or 0) > 0
        except OSError:
            continue
    return False


def _probe_fallocate(int fd, uint64_t size, uint32_t block):
    """Which fallocate modes the file system takes, tried beyond the end of the file with
    KEEP_SIZE (the file's data and size do not change): (punch_hole, zero_range)."""
    cdef int rc
    with nogil:
        rc = c_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, block)
    punch = rc == 0
    with nogil:
        rc = c_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, size, block)
    zero = rc == 0
    if zero and punch:           # give back what the probe may have allocated past the end
        with nogil:
            c_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, block)
    return punch, zero


def _open(path, bint readonly, direct, name):
    """(fd, direct): O_DIRECT unless refused with EINVAL (then buffered, logged), or asked."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    if direct is not False:
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as e:
            if e.errno != _errno.EINVAL:
                raise _file_error("open", path, e, name) from None
            if direct is True:
                raise AioFileError(f"aio bdev {name}: the file system of {path} refuses "
                                   "O_DIRECT (EINVAL); use direct=None or False for buffered I/O",
                                   path, _errno.EINVAL, name) from None
            log.warning("aio bdev %s: the file system of %s refuses O_DIRECT; using buffered "
                        "I/O (the page cache) for it", name, path)
    try:
        return os.open(path, flags), False
    except OSError as e:
        raise _file_error("open", path, e, name) from None


def create(name, filename, block_size=None, *, readonly=False, engine="aio", queue_depth=128,
           create_size=None, uuid=None, direct=None):
    """Create and register an aio bdev on `filename` (a regular file or a block device).

    block_size: bytes per block (default: the device's logical block size, or 512 for a file -
      at least what O_DIRECT needs); a power of two, dividing the size.
    readonly: open read-only; the bdev offers no write-type I/O.
    engine: "aio" (Linux native AIO) or "uring" (io_uring).
    queue_depth: requests in flight per channel (the AIO context's size); beyond, the bdev layer
      queues and retries.
    create_size: create the file if missing and extend it to that many bytes if smaller.
    direct: None (O_DIRECT where the file system takes it), True (required), False (buffered).
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"aio bdev name must be a non-empty string, not {name!r}")
    if filename is None:
        raise InvalidArgument(f"aio bdev {name}: give a filename")
    path = os.fspath(filename)
    if not path:
        raise InvalidArgument(f"aio bdev {name}: the filename is empty")
    if engine not in ("aio", "uring"):
        raise InvalidArgument(f"aio bdev {name}: engine must be 'aio' or 'uring', not {engine!r}")
    if engine == "uring":
        rc = _uring_status()
        if rc != 0:
            raise BdevError(f"aio bdev {name}: io_uring is not available here "
                            f"({os.strerror(-rc)}); use engine='aio'", name)
    if (not isinstance(queue_depth, int) or isinstance(queue_depth, bool)
            or not 1 <= queue_depth <= MAX_QUEUE_DEPTH):
        raise InvalidArgument(f"aio bdev {name}: queue_depth must be an int from 1 to "
                              f"{MAX_QUEUE_DEPTH}, not {queue_depth!r}")
    if block_size is not None:
        if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 512
                or block_size & (block_size - 1)):
            raise InvalidArgument(f"aio bdev {name} on {path}: block_size must be a power of two "
                                  f"of at least 512, not {block_size!r}")
    if direct not in (None, True, False):
        raise InvalidArgument(f"aio bdev {name}: direct is None, True or False, not {direct!r}")
    if create_size is not None:
        if (not isinstance(create_size, int) or isinstance(create_size, bool)
                or create_size <= 0):
            raise InvalidArgument(f"aio bdev {name}: create_size must be a positive number of "
                                  f"bytes, not {create_size!r}")
        if readonly:
            raise InvalidArgument(f"aio bdev {name}: create_size and readonly exclude each other")
        if create_size % (block_size or 512):
            raise InvalidArgument(f"aio bdev {name}: create_size {create_size} is not a multiple "
                                  f"of the block size {block_size or 512}")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise _file_error("stat", path, e, name) from None
        if st is not None and not _stat.S_ISREG(st.st_mode):
            if _stat.S_ISDIR(st.st_mode):
                raise _file_error("use", path, OSError(_errno.EISDIR, ""), name)
            raise InvalidArgument(f"aio bdev {name}: create_size applies to regular files; "
                                  f"{path} is not one")
        if st is None or st.st_size < create_size:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    os.ftruncate(fd, create_size)
                finally:
                    os.close(fd)
            except OSError as e:
                raise _file_error("create", path, e, name) from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise _file_error("open", path, e, name) from None
    if _stat.S_ISDIR(st.st_mode):
        raise _file_error("use", path, OSError(_errno.EISDIR, ""), name)
    is_blk = _stat.S_ISBLK(st.st_mode)
    if not is_blk and not _stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"aio bdev {name}: {path} is neither a regular file nor a block "
                              "device")
    fd, use_direct = _open(path, readonly, direct, name)
    try:
        punch = zero = False
        if is_blk:
            size, lbs = _block_device_facts(fd)
            align = lbs if use_direct else 1
            default_bs = max(lbs, 512)
            punch = _discard_supported(st) and not readonly
            zero = not readonly
        else:
            size = os.fstat(fd).st_size
            align = _probe_dio_alignment(fd, size) if use_direct else 1
            default_bs = max(512, align)
        bs = block_size if block_size is not None else default_bs
        if use_direct and bs % align:
            raise InvalidArgument(
                f"aio bdev {name}: block_size {bs} is not a multiple of the {align}-byte "
                f"alignment O_DIRECT needs on {path}; use block_size={align} or more"
                + ("" if is_blk else " (or direct=False)"))
        if is_blk and bs < default_bs:
            raise InvalidArgument(f"aio bdev {name}: block_size {bs} is smaller than the logical "
                                  f"block size {default_bs} of {path}")
        if size == 0:
            raise InvalidArgument(f"aio bdev {name}: {path} is empty (0 bytes); give create_size "
                                  "to extend it")
        if size % bs:
            raise InvalidArgument(f"aio bdev {name}: the size of {path} ({size} bytes) is not a "
                                  f"multiple of the block size {bs}")
        if not is_blk and not readonly:
            punch, zero = _probe_fallocate(fd, size, bs)
        io_types = ["read", "reset", "flush"]
        if not readonly:
            io_types.append("write")
            if punch:
                io_types.append("unmap")
            if zero:
                io_types.append("write_zeroes")
        # one request moves at most MAX_RW_COUNT (2 GiB - 4 KiB) bytes: the layer splits above
        b = AioBdev(name, block_size=bs, num_blocks=size // bs, module="aio", io_types=io_types,
                    ctx_size=sizeof(reset_ctx),
                    uuid=uuid, required_alignment=max(align, 1), product_name="AIO disk",
                    max_transfer_blocks=MAX_TRANSFER_BYTES // bs)
        b._attach(fd, path, use_direct, readonly, is_blk, max(align, 1), queue_depth, engine,
                  block_size is not None, punch or zero)
    except BaseException:
        os.close(fd)
        raise
    try:
        b.register()
    except BaseException:
        b.destruct()
        raise
    log.info("aio bdev %s on %s: %d x %d B, %s, %s, engine %s", name, path, size // bs, bs,
             "O_DIRECT" if use_direct else "buffered", "read-only" if readonly else "read-write",
             engine)
    return b


def delete(name):
    """Unregister the aio bdev `name` (its file is closed once the last descriptor is)."""
    from bdev.core import get_bdev
    b = get_bdev(name)
    if not isinstance(b, AioBdev):
        raise InvalidArgument(f"{name} is not an aio bdev (it is {b.module})")
    b.unregister()
