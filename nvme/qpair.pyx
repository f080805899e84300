# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""NVMe queue pairs: the polled I/O path.

A `QueuePair` owns a submission and a completion ring in DMA memory and the bookkeeping around
them, in the shape of SPDK's PCIe queue pair:

- *Trackers*, one per command id (CID = tracker index), one fewer than the ring size, so a free
  tracker always means a free SQ slot. Each owns a 4 KiB DMA page for its PRP list or SGL segment.
- *Requests* describe a command and its payload. A request that finds no free tracker waits in a
  software queue and starts when a completion frees one. Transfers above the controller's maximum
  (MDTS) are split into child requests that complete into their parent.
- Submission copies the 64-byte command into the SQ and rings the tail doorbell, once per batch:
  submissions made from inside completion callbacks are announced together at the end of the
  completion pass. With Doorbell Buffer Config the shadow doorbell is written and the MMIO write
  skipped unless the controller's EventIdx asks for it (on an emulated controller each MMIO write
  traps into the emulator).
- `process_completions` follows the phase bit through the CQ, completes each command exactly once,
  rings the CQ head doorbell once, then starts queued requests.

Nothing here allocates a Python object per I/O on the C path (`submit_io`, `nvme_cb`); the Python
path (`submit_raw`, callables) is for administration, tests and convenience. A queue pair belongs
to the OS thread that created it: use from another thread is refused (-EPERM / WrongThreadError),
never raced. Admin queue pairs are shared under the controller's lock instead.
"""
import logging

from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, PyObject
from libc.errno cimport E2BIG, EFAULT, EINVAL, ENOMEM, ENXIO, EPERM
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from env.memmap cimport IOVA_INVALID, vtophys
from env.memory cimport DmaBuffer
from env.ticks cimport now_ns
from env.mmio cimport mb, mmio_write32, rmb, wmb
from nvme.spec cimport (NVM_COMPARE, NVM_READ, NVM_WRITE, NVM_WRITE_ZEROES, PSDT_SGL_MPTR_CONTIG,
                        SC_ABORTED_SQ_DELETION, SC_DATA_TRANSFER_ERROR, SCT_GENERIC,
                        SGL_TYPE_DATA_BLOCK, SGL_TYPE_LAST_SEGMENT, nvme_cqe, nvme_sgl_desc,
                        nvme_sqe)
from nvme.transport cimport Transport

from env import memory as _memory
from env.errors import (InvalidArgument, ResourceExhausted, TranslationError, WrongThreadError)

log = logging.getLogger("userblk.nvme.qpair")


cdef extern from *:
    """
    /* The phase/status word of a completion entry is written by the device: read it exactly once
       per check, then order the reads of the rest of the entry after it. */
    static inline uint16_t ublk_load16(const volatile uint16_t *p) { return *p; }
    static inline uint32_t ublk_load32(const volatile uint32_t *p) { return *p; }
    /* Shadow doorbell rule (Base spec 5.8, virtio-style): notify the controller through MMIO only
       when its EventIdx lies in [old, new). All arithmetic is modulo 2^16. */
    static inline int ublk_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old) {
        return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
    }
    """
    uint16_t load16 "ublk_load16"(const uint16_t* p) noexcept nogil
    uint32_t load32 "ublk_load32"(const uint32_t* p) noexcept nogil
    int need_event "ublk_need_event"(uint16_t event_idx, uint16_t new_idx, uint16_t old) noexcept nogil

cdef enum:
    PAGE_SHIFT = 12
    PAGE_SIZE = 4096
    PRP_ENTRIES_PER_PAGE = 512
    SGL_DESCS_PER_PAGE = 256
    MAX_NLB = 65536               # the 0's-based 16-bit NLB field of read/write commands
    CQE_STATUS_DNR = 0x8000


cdef inline bint _translatable(uint64_t va, uint64_t left) noexcept nogil:
    """Does every byte of [va, va+left) have an IOVA?"""
    cdef uint64_t n
    while left:
        n = left
        if vtophys(va, &n) == IOVA_INVALID:
            return False
        va += n
        left -= n
    return True


def _state_name(int s):
    return {QP_ENABLED: "enabled", QP_DISCONNECTING: "disconnecting",
            QP_DISCONNECTED: "disconnected", QP_DESTROYED: "destroyed"}.get(s, str(s))


cdef class Completion:
    """A completion entry as Python sees it (only on the Python callback path)."""

    @staticmethod
    cdef Completion from_cqe(const nvme_cqe* cqe):
        cdef Completion c = Completion.__new__(Completion)
        c.cqe = cqe[0]
        return c

    @staticmethod
    def make(uint16_t status=0, uint32_t cdw0=0, uint16_t cid=0, uint16_t sqid=0):
        """A completion built by software (tests, emulated paths)."""
        cdef nvme_cqe e
        memset(&e, 0, sizeof(e))
        e.status = status
        e.cdw0 = cdw0
        e.cid = cid
        e.sqid = sqid
        return Completion.from_cqe(&e)

    @property
    def cdw0(self):
        return self.cqe.cdw0

    @property
    def cdw1(self):
        return self.cqe.cdw1

    @property
    def cid(self):
        return self.cqe.cid

    @property
    def sqid(self):
        return self.cqe.sqid

    @property
    def sqhd(self):
        return self.cqe.sqhd

    @property
    def raw_status(self):
        """The 16-bit status word including the phase bit."""
        return self.cqe.status

    @property
    def sct(self):
        return (self.cqe.status >> 9) & 0x7

    @property
    def sc(self):
        return (self.cqe.status >> 1) & 0xFF

    @property
    def dnr(self):
        return bool(self.cqe.status & CQE_STATUS_DNR)

    @property
    def ok(self):
        return (self.cqe.status >> 1) & 0x7FF == 0

    @property
    def status(self):
        """The decoded status (nvme.status.NvmeStatus) with its spec name."""
        from nvme.status import NvmeStatus
        return NvmeStatus.from_cqe_status(self.cqe.status)

    def __repr__(self):
        return (f"<Completion cid={self.cqe.cid} sqid={self.cqe.sqid} "
                f"{'ok' if self.ok else self.status.name} cdw0=0x{self.cqe.cdw0:x}>")


cdef class _IovArray:
    """An iovec array for one vectored Python submission, freed when its completion is done."""
    cdef iovec* iov
    cdef uint32_t count
    cdef uint32_t* counts       # a split submission: elements of each child, in order
    cdef uint32_t nchunks

    def __dealloc__(self):
        free(self.iov)
        free(self.counts)


cdef void _py_io_done(void* arg, const nvme_cqe* cpl) noexcept nogil:
    """C completion of a Python-submitted NVM command: `arg` is an owned (callback, buffers...)
    tuple."""
    with gil:
        _finish_py_io(<tuple> arg, cpl)
        Py_DECREF(<object> arg)


cdef _finish_py_io(tuple ctx, const nvme_cqe* cpl):
    cb = ctx[0]
    for ref in ctx[1:]:
        if isinstance(ref, DmaBuffer):
            (<DmaBuffer> ref).unpin()
    if cb is not None:
        try:
            cb(Completion.from_cqe(cpl))
        except BaseException:
            log.exception("completion callback %r raised", cb)


cdef inline void _split_parent(nvme_request* parent, uint8_t opc, uint32_t nsid,
                               uint32_t nchildren, nvme_cb cb_fn, void* cb_arg) noexcept nogil:
    """Make `parent` the request that completes once its `nchildren` children have (a split)."""
    parent.cb_fn = cb_fn
    parent.cb_arg = cb_arg
    parent.children_left = nchildren
    parent.children_total = nchildren
    parent.cmd.opc = opc
    parent.cmd.nsid = nsid


cdef inline bint _start_child(QueuePair qp, nvme_request* parent, nvme_request* child,
                              uint32_t not_made) noexcept nogil:
    """Submit `child` of a split `parent`. If that fails (it cannot after the checks the split
    made first), the child and the `not_made` children still to come complete the parent as
    failed; False then."""
    child.parent = parent
    child.flags = REQ_CHILD
    if qp.submit_request(child) == 0:
        return True
    qp.free_request(child)
    parent.children_left -= not_made
    qp.fail_child_remainder(parent)
    return False


MAX_TIMEOUT_US = 1e12              # what a command timeout may be at most (11.5 days)


cdef inline uint32_t _default_cq_batch(uint32_t size) noexcept:
    return min(32, size // 8)


def trackers_for(uint32_t size):
    """How many commands a queue pair of `size` entries keeps in flight by default (its
    trackers): what its request pool must hold at least."""
    return size - 1 - _default_cq_batch(size)


cdef class QueuePair:
    """One submission/completion queue pair. Created by `nvme.Controller` (which also creates
    the queues on the controller); tests may build one over an emulated transport directly."""

    def __cinit__(self, Transport transport, uint16_t qid, uint32_t size, *, ntrackers=None,
                  nrequests=None, uint64_t max_transfer=512 * 1024, sgl="auto",
                  bint check_owner=True, cq_batch=None):
        cdef uint32_t i
        cdef nvme_tracker* tr
        if size < 2 or size > 65536:
            raise InvalidArgument(f"queue size must be between 2 and 65536 entries, not {size}")
        self.transport = transport
        self.qid = qid
        self.size = <uint16_t> (size & 0xFFFF) if size < 65536 else 0
        # The CQ head doorbell may lag by `cq_batch` entries (fewer MMIO writes, each of which
        # traps into an emulated controller); the controller then sees that many fewer free CQ
        # slots, so that many fewer commands may be outstanding for the CQ never to fill.
        self.cq_batch = _default_cq_batch(size) if cq_batch is None else cq_batch
        if self.cq_batch > size // 2:
            raise InvalidArgument(f"cq_batch {cq_batch} is more than half the queue")
        most = size - 1 - self.cq_batch
        self.ntrackers = most if ntrackers is None else ntrackers
        if self.ntrackers < 1 or self.ntrackers > most or self.ntrackers > 65535:
            raise InvalidArgument(f"trackers must be between 1 and {min(most, 65535)}")
        self.nrequests = max(2 * size, 512) if nrequests is None else nrequests
        if self.nrequests < self.ntrackers:
            raise InvalidArgument("need at least as many requests as trackers")
        if max_transfer < PAGE_SIZE:
            raise InvalidArgument(f"max_transfer must be at least {PAGE_SIZE}")
        # one PRP list page covers 512 pages after the first: cap what a single command carries
        self.max_transfer = min(max_transfer, <uint64_t> PRP_ENTRIES_PER_PAGE * PAGE_SIZE)
        self.sgl_mode = {"never": 0, "auto": 1, "always": 2, False: 0, True: 1}[sgl]
        self.page_shift = PAGE_SHIFT
        self.check_owner = check_owner
        self.owner = pthread_self()
        self.traps = transport.traps
        self.phase = 1
        self.state = QP_DISCONNECTED

        if transport.regs is None:
            # A transport without registers (NVMe/TCP, nvme/tcp.pyx) carries the commands
            # itself: trackers and requests only, no rings, doorbells or PRP list pages.
            self.trackers = <nvme_tracker*> calloc(self.ntrackers, sizeof(nvme_tracker))
            self.requests = <nvme_request*> calloc(self.nrequests, sizeof(nvme_request))
            if self.trackers == NULL or self.requests == NULL:
                raise MemoryError("cannot allocate queue pair bookkeeping")
            for i in range(self.ntrackers):
                self.trackers[i].cid = <uint16_t> i
            self.scratch.cid = 0xFFFF
            self._reset_lists()
            return

        sq = _memory.allocate(size * sizeof(nvme_sqe), 4096, zero=True)
        cq = _memory.allocate(size * sizeof(nvme_cqe), 4096, zero=True)
        lists = _memory.allocate((self.ntrackers + 1) * PAGE_SIZE, 4096, zero=True)
        for buf in (sq, cq):
            if buf.translate(0)[1] != buf.size:
                raise TranslationError("queue ring is not IOVA-contiguous (hugepages too small?)")
        self._mem = (sq, cq, lists)
        self.sq = <nvme_sqe*> (<DmaBuffer> sq).data()
        self.cq = <nvme_cqe*> (<DmaBuffer> cq).data()

        self.trackers = <nvme_tracker*> calloc(self.ntrackers, sizeof(nvme_tracker))
        self.requests = <nvme_request*> calloc(self.nrequests, sizeof(nvme_request))
        if self.trackers == NULL or self.requests == NULL:
            raise MemoryError("cannot allocate queue pair bookkeeping")
        cdef char* list_base = (<DmaBuffer> lists).data()
        for i in range(self.ntrackers):
            tr = &self.trackers[i]
            tr.cid = <uint16_t> i
            tr.list_page = <uint64_t*> (list_base + i * PAGE_SIZE)
            tr.list_iova = vtophys(<uint64_t> <uintptr_t> tr.list_page, NULL)
            if tr.list_iova == IOVA_INVALID:
                raise TranslationError("PRP list page has no IOVA")
        # the page after the trackers' pages: where a request that has to wait in the software
        # queue gets its data pointer built once, so that it is refused now if it cannot be
        # described, exactly as it would be with a tracker free
        self.scratch.cid = 0xFFFF
        self.scratch.list_page = <uint64_t*> (list_base + self.ntrackers * PAGE_SIZE)
        self.scratch.list_iova = vtophys(<uint64_t> <uintptr_t> self.scratch.list_page, NULL)
        if self.scratch.list_iova == IOVA_INVALID:
            raise TranslationError("PRP list page has no IOVA")
        self._reset_lists()
        self.sq_doorbell = transport.doorbell_addr(qid, 0)
        self.cq_doorbell = transport.doorbell_addr(qid, 1)

    def __dealloc__(self):
        cdef uint32_t i
        # Python references held by requests that never completed (destroyed without draining)
        if self.requests != NULL:
            for i in range(self.nrequests):
                Py_XDECREF(self.requests[i].py_cb)
                Py_XDECREF(self.requests[i].py_ref)
        free(self.trackers)
        free(self.requests)

    cdef void _reset_lists(self):
        cdef long i
        self.free_trackers = NULL
        for i in range(<long> self.ntrackers - 1, -1, -1):
            self.trackers[i].next = self.free_trackers
            self.trackers[i].active = 0
            self.free_trackers = &self.trackers[i]
        self.free_requests = NULL
        for i in range(<long> self.nrequests - 1, -1, -1):
            self.requests[i].next = self.free_requests
            self.free_requests = &self.requests[i]
        self.out_head = self.out_tail = NULL
        self.queued_head = self.queued_tail = NULL
        self.outstanding = 0
        self.queued = 0

    # ---- ring state ---------------------------------------------------------------------------
    @property
    def sq_iova(self):
        return self._mem[0].iova

    @property
    def cq_iova(self):
        return self._mem[1].iova

    def reset_rings(self):
        """Empty rings, ready to be (re)created on the controller. Only with nothing in flight."""
        if self.outstanding:
            raise InvalidArgument(f"queue pair {self.qid} still has {self.outstanding} commands "
                                  "outstanding")
        memset(self.cq, 0, self.size_entries() * sizeof(nvme_cqe))
        self.sq_tail = self.sq_head = self.cq_head = self.last_sq_doorbell = 0
        self.last_cq_doorbell = 0
        self.phase = 1
        if self.shadow_sq != NULL:
            self.shadow_sq[0] = 0
            self.shadow_cq[0] = 0

    cdef uint32_t size_entries(self) noexcept nogil:
        return 65536 if self.size == 0 else self.size

    def set_shadow_doorbells(self, uintptr_t shadow_base, uintptr_t eventidx_base):
        """Use the Doorbell Buffer Config pages (addresses of the host copies) for this queue;
        0, 0 turns shadow doorbells off."""
        cdef uint32_t stride = self.transport.doorbell_stride
        if shadow_base == 0:
            self.shadow_sq = self.shadow_cq = self.eventidx_sq = self.eventidx_cq = NULL
            return
        self.shadow_sq = <uint32_t*> (shadow_base + (2 * self.qid) * stride)
        self.shadow_cq = <uint32_t*> (shadow_base + (2 * self.qid + 1) * stride)
        self.eventidx_sq = <uint32_t*> (eventidx_base + (2 * self.qid) * stride)
        self.eventidx_cq = <uint32_t*> (eventidx_base + (2 * self.qid + 1) * stride)
        # A queue id is reused after a delete: whatever an earlier queue left in these slots
        # (a tail of 37, an EventIdx of 37) would make the first doorbells of this one look
        # already announced, and the controller would never fetch them. Start from zero.
        if self.state != QP_ENABLED:
            self.shadow_sq[0] = self.shadow_cq[0] = 0
            self.eventidx_sq[0] = self.eventidx_cq[0] = 0

    def enable(self):
        """Mark the queues as existing on the controller: I/O may flow."""
        self.state = QP_ENABLED
        with nogil:
            self.submit_queued()
            if self.sq_tail != self.last_sq_doorbell:
                self.ring_sq()

    def bind_to_current_thread(self):
        """Make the calling OS thread the owner (e.g. after creating it on a setup thread)."""
        self.owner = pthread_self()

    # ---- doorbells ----------------------------------------------------------------------------
    cdef void ring_sq(self) noexcept nogil:
        cdef uint16_t old = self.last_sq_doorbell
        cdef uint16_t new = self.sq_tail
        self.last_sq_doorbell = new
        self.n_sq_doorbells += 1
        if self.shadow_sq != NULL:
            self.shadow_sq[0] = new
            mb()      # the shadow value must be visible before EventIdx is read
            if self.qid != 0 and not need_event(<uint16_t> load32(self.eventidx_sq), new, old):
                return
        else:
            wmb()     # SQ entries before the doorbell
        self.n_mmio_doorbells += 1
        mmio_write32(self.sq_doorbell, 0, new)
        if self.traps:
            with gil:
                self.transport.doorbell_written(self.qid, 0)

    cdef void ring_cq(self) noexcept nogil:
        cdef uint16_t new = self.cq_head
        cdef uint16_t old = self.last_cq_doorbell
        if self.cq_batch and <uint16_t> ((new - old + self.size_entries()) % self.size_entries()) < self.cq_batch:
            return
        self.last_cq_doorbell = new
        self.n_cq_doorbells += 1
        if self.shadow_cq != NULL:
            self.shadow_cq[0] = new
            mb()
            if self.qid != 0 and not need_event(<uint16_t> load32(self.eventidx_cq), new, old):
                return
        self.n_mmio_doorbells += 1
        mmio_write32(self.cq_doorbell, 0, new)
        if self.traps:
            with gil:
                self.transport.doorbell_written(self.qid, 1)

    # ---- requests -----------------------------------------------------------------------------
    cdef nvme_request* alloc_request(self) noexcept nogil:
        cdef nvme_request* req = self.free_requests
        if req == NULL:
            return NULL
        self.free_requests = req.next
        memset(req, 0, sizeof(nvme_request))
        return req

    cdef bint has_free_requests(self, uint32_t n) noexcept nogil:
        """Are at least `n` requests free? (A split takes a parent and its children at once.)"""
        cdef nvme_request* probe = self.free_requests
        cdef uint32_t count = 0
        while probe != NULL and count < n:
            probe = probe.next
            count += 1
        return count >= n

    cdef void free_request(self, nvme_request* req) noexcept nogil:
        req.next = self.free_requests
        self.free_requests = req

    cdef int validate_payload(self, nvme_request* req) noexcept nogil:
        """0 when every byte of the payload has an IOVA and the alignment suits the controller."""
        cdef uint64_t va, left
        cdef uint32_t i
        if req.iov != NULL:
            for i in range(req.iovcnt):
                va = <uint64_t> <uintptr_t> req.iov[i].iov_base
                left = req.iov[i].iov_len
                if va & 3 or left == 0 or left & 3:
                    return -EINVAL
                if not _translatable(va, left):
                    return -EFAULT
            return 0
        if <uintptr_t> req.buf & 3:
            return -EINVAL    # PRP entries and SGL data blocks need dword alignment
        return 0 if _translatable(<uint64_t> <uintptr_t> req.buf, req.len) else -EFAULT

    cdef int submit_or_free(self, nvme_request* req) noexcept nogil:
        """submit_request, giving the request back to the pool when it is refused."""
        cdef int rc = self.submit_request(req)
        if rc != 0:
            self.free_request(req)
        return rc

    cdef int submit_request(self, nvme_request* req) noexcept nogil:
        """Submit a built request. 0: accepted (it will complete exactly once); negative errno:
        refused, and the request is still the caller's to free."""
        cdef nvme_tracker* tr
        cdef int rc
        if not self.on_owner():
            return -EPERM
        if self.state != QP_ENABLED:
            if self.state != QP_DISCONNECTING:
                return -ENXIO
            # the controller was reset: finish the old queue's commands first (the disconnect
            # handler re-creates the queue when the controller is back)
            self.drain_disconnected()
            if self.state != QP_ENABLED:
                return -ENXIO
        if self.timeout_ns:
            req.submit_ns = now_ns()
        tr = self.free_trackers
        if tr != NULL and self.queued_head == NULL:
            self.free_trackers = tr.next
            rc = self.start(req, tr)
            if rc != 0:
                tr.next = self.free_trackers
                self.free_trackers = tr
                return rc
            if not self.in_completions:
                self.ring_sq()
            return 0
        if req.len or req.iov != NULL:
            # the checks start() will make, now: refused at submission either way
            rc = self.build_data_pointer(req, &self.scratch)
            if rc != 0:
                return rc
        # no tracker free: wait in the software queue, in order
        req.next = NULL
        if self.queued_tail == NULL:
            self.queued_head = req
        else:
            self.queued_tail.next = req
        self.queued_tail = req
        self.queued += 1
        self.n_queued_total += 1
        return 0

    cdef int start(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        """Give `req` tracker `tr` and put it in the SQ (the doorbell is the caller's)."""
        cdef int rc
        cdef nvme_sqe* slot
        tr.req = req
        req.cmd.cid = tr.cid
        if req.len or req.iov != NULL:
            rc = self.build_data_pointer(req, tr)
            if rc != 0:
                tr.req = NULL
                return rc
        # no payload: PRP1/PRP2 stay as built (zero, or raw addresses such as a queue's base)
        tr.active = 1
        tr.gen += 1
        tr.timeout_reported = 0
        if self.timeout_ns:
            tr.start_ns = req.submit_ns
        # outstanding list, in submission order (timeouts look at the oldest)
        tr.next = NULL
        tr.prev = self.out_tail
        if self.out_tail == NULL:
            self.out_head = tr
        else:
            self.out_tail.next = tr
        self.out_tail = tr
        self.outstanding += 1
        slot = &self.sq[self.sq_tail]
        memcpy(slot, &req.cmd, sizeof(nvme_sqe))
        self.sq_tail += 1
        if self.sq_tail == self.size_entries():
            self.sq_tail = 0
        self.n_submitted += 1
        return 0

    # ---- data pointers ------------------------------------------------------------------------
    cdef int build_data_pointer(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        cdef int rc
        if self.sgl_mode == 2:
            return self.build_sgl(req, tr)
        if req.iov == NULL:
            return self.build_prps(req, tr)
        rc = self.build_prps_iov(req, tr)
        if rc == -EINVAL and self.sgl_mode == 1:
            return self.build_sgl(req, tr)
        return rc

    cdef int build_prps(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        """PRP1/PRP2 or PRP1 + a PRP list for a virtually contiguous buffer (Base spec 4.1.1)."""
        cdef uint64_t va = <uint64_t> <uintptr_t> req.buf
        cdef uint64_t left = req.len
        cdef uint64_t n, iova, first
        cdef uint32_t entries = 0
        if va & 3:
            return -EINVAL
        n = left
        iova = vtophys(va, &n)
        if iova == IOVA_INVALID:
            return -EFAULT
        req.cmd.flags &= 0x3F          # PSDT = PRPs
        req.cmd.prp1 = iova
        first = PAGE_SIZE - (va & (PAGE_SIZE - 1))
        if left <= first:
            req.cmd.prp2 = 0
            return 0
        # the rest starts on a page boundary
        va += first
        left -= first
        if left <= PAGE_SIZE:
            iova = vtophys(va, NULL)
            if iova == IOVA_INVALID:
                return -EFAULT
            req.cmd.prp2 = iova
            return 0
        n = 0
        while left:
            if n == 0:
                n = left
                iova = vtophys(va, &n)
                if iova == IOVA_INVALID:
                    return -EFAULT
            if entries == PRP_ENTRIES_PER_PAGE:
                return -E2BIG    # max_transfer keeps us from needing chained lists
            tr.list_page[entries] = iova
            entries += 1
            if left <= PAGE_SIZE:
                break
            va += PAGE_SIZE
            iova += PAGE_SIZE
            left -= PAGE_SIZE
            n = n - PAGE_SIZE if n > PAGE_SIZE else 0
        req.cmd.prp2 = tr.list_iova
        return 0

    cdef int build_prps_iov(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        """PRPs for an iovec: only when every element but the first starts on a page and every
        element but the last ends on one (what a PRP list can express); -EINVAL otherwise."""
        cdef uint32_t i, entries = 0
        cdef uint64_t va, end, iova, n, page
        cdef bint have_prp1 = False
        req.cmd.flags &= 0x3F
        for i in range(req.iovcnt):
            va = <uint64_t> <uintptr_t> req.iov[i].iov_base
            end = va + req.iov[i].iov_len
            if va & 3 or req.iov[i].iov_len == 0:
                return -EINVAL
            if i > 0 and va & (PAGE_SIZE - 1):
                return -EINVAL
            if i + 1 < req.iovcnt and end & (PAGE_SIZE - 1):
                return -EINVAL
            while va < end:
                n = end - va
                iova = vtophys(va, &n)
                if iova == IOVA_INVALID:
                    return -EFAULT
                if not have_prp1:
                    req.cmd.prp1 = iova
                    have_prp1 = True
                else:
                    if entries == PRP_ENTRIES_PER_PAGE:
                        return -E2BIG
                    tr.list_page[entries] = iova
                    entries += 1
                page = (va & ~(<uint64_t> PAGE_SIZE - 1)) + PAGE_SIZE
                va = page
        if entries == 0:
            req.cmd.prp2 = 0
        elif entries == 1:
            req.cmd.prp2 = tr.list_page[0]
        else:
            req.cmd.prp2 = tr.list_iova
        return 0

    cdef int build_sgl(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        """An SGL (Base spec 4.3.2): one Data Block descriptor in the command when the payload
        is IOVA-contiguous, else a Last Segment descriptor pointing at data blocks in the
        tracker's page."""
        cdef nvme_sgl_desc* descs = <nvme_sgl_desc*> tr.list_page
        cdef uint32_t i, count = 0, niov
        cdef uint64_t va, left, n, iova
        cdef iovec single
        cdef const iovec* iov = req.iov
        niov = req.iovcnt
        if iov == NULL:
            single.iov_base = req.buf
            single.iov_len = req.len
            iov = &single
            niov = 1
        for i in range(niov):
            va = <uint64_t> <uintptr_t> iov[i].iov_base
            left = iov[i].iov_len
            if va & 3:
                return -EINVAL
            while left:
                n = left
                iova = vtophys(va, &n)
                if iova == IOVA_INVALID:
                    return -EFAULT
                if count and descs[count - 1].address + descs[count - 1].length == iova:
                    descs[count - 1].length += <uint32_t> n     # merge adjacent ranges
                else:
                    if count == SGL_DESCS_PER_PAGE:
                        return -E2BIG
                    descs[count].address = iova
                    descs[count].length = <uint32_t> n
                    memset(descs[count].reserved, 0, 3)
                    descs[count].id = SGL_TYPE_DATA_BLOCK
                    count += 1
                va += n
                left -= n
        req.cmd.flags = (req.cmd.flags & 0x3F) | PSDT_SGL_MPTR_CONTIG
        if count == 1:
            req.cmd.prp1 = descs[0].address
            req.cmd.prp2 = <uint64_t> descs[0].length | (<uint64_t> SGL_TYPE_DATA_BLOCK << 56)
        else:
            req.cmd.prp1 = tr.list_iova
            req.cmd.prp2 = (<uint64_t> (count * sizeof(nvme_sgl_desc))
                            | (<uint64_t> SGL_TYPE_LAST_SEGMENT << 56))
        return 0

    # ---- NVM I/O at C level ---------------------------------------------------------------------
    cdef int submit_io(self, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks,
                       uint32_t lba_shift, char* buf, uint32_t cdw12_flags, uint32_t cdw13,
                       nvme_cb cb_fn, void* cb_arg) noexcept nogil:
        """Read/Write/Compare (buf != NULL) or Write Zeroes/Write Uncorrectable (buf == NULL) of
        `nblocks` blocks at `lba`, split into several commands when larger than the controller
        takes in one. 0 or a negative errno (then nothing was submitted)."""
        cdef nvme_request* parent
        cdef nvme_request* child
        cdef uint64_t chunk, done = 0, total_len
        cdef uint32_t count, i, nchildren
        cdef nvme_request* probe
        cdef int rc
        if nblocks == 0:
            return -EINVAL
        if not self.on_owner():
            return -EPERM
        if self.state == QP_DISCONNECTING:
            self.drain_disconnected()
        if self.state != QP_ENABLED:
            return -ENXIO
        total_len = (<uint64_t> nblocks) << lba_shift if buf != NULL else 0
        chunk = MAX_NLB
        if buf != NULL and (self.max_transfer >> lba_shift) < chunk:
            chunk = self.max_transfer >> lba_shift
            if chunk == 0:
                return -E2BIG       # one block is larger than the controller transfers at once
        if nblocks <= chunk:
            child = self.alloc_request()
            if child == NULL:
                return -ENOMEM
            self._fill_rw(child, opc, nsid, lba, nblocks, cdw12_flags, cdw13)
            child.buf = buf
            child.len = total_len
            child.cb_fn = cb_fn
            child.cb_arg = cb_arg
            return self.submit_or_free(child)
        # split: check everything first, so that either all children go or none does
        nchildren = <uint32_t> ((nblocks + chunk - 1) // chunk)
        if not self.has_free_requests(nchildren + 1):
            return -ENOMEM
        parent = self.alloc_request()
        parent.buf = buf
        parent.len = total_len
        if total_len:
            rc = self.validate_payload(parent)
            if rc != 0:
                self.free_request(parent)
                return rc
        _split_parent(parent, opc, nsid, nchildren, cb_fn, cb_arg)
        self.n_splits += 1
        for i in range(nchildren):
            count = <uint32_t> (chunk if nblocks - done > chunk else nblocks - done)
            child = self.alloc_request()
            self._fill_rw(child, opc, nsid, lba + done, count, cdw12_flags, cdw13)
            if buf != NULL:
                child.buf = buf + (done << lba_shift)
                child.len = (<uint64_t> count) << lba_shift
            if not _start_child(self, parent, child, nchildren - i - 1):
                return 0
            done += count
        return 0

    cdef void fail_child_remainder(self, nvme_request* parent) noexcept nogil:
        cdef nvme_cqe cqe
        memset(&cqe, 0, sizeof(cqe))
        cqe.status = (SCT_GENERIC << 9) | (SC_DATA_TRANSFER_ERROR << 1)
        if parent.first_error.status == 0:
            parent.first_error = cqe
        parent.children_left -= 1
        if parent.children_left == 0:
            self.complete_request(parent, &parent.first_error)

    cdef void _fill_rw(self, nvme_request* req, uint8_t opc, uint32_t nsid, uint64_t lba,
                              uint32_t nblocks, uint32_t cdw12_flags, uint32_t cdw13) noexcept nogil:
        req.cmd.opc = opc
        req.cmd.nsid = nsid
        req.cmd.cdw10 = <uint32_t> lba    # low dword (truncation intended)
        req.cmd.cdw11 = <uint32_t> (lba >> 32)
        req.cmd.cdw12 = (nblocks - 1) | cdw12_flags
        req.cmd.cdw13 = cdw13

    cdef int submit_iov_chunks(self, uint8_t opc, uint32_t nsid, uint64_t lba,
                               uint32_t lba_shift, const iovec* iov, const uint32_t* counts,
                               uint32_t nchunks, uint32_t cdw12_flags, nvme_cb cb_fn,
                               void* cb_arg) noexcept nogil:
        """A vectored transfer above the maximum, already cut into `nchunks` consecutive iovecs
        (`counts[i]` elements each, every one at most `max_transfer` bytes of whole blocks): one
        child request each, completing into one parent. All go, or none (negative errno)."""
        cdef nvme_request* parent
        cdef nvme_request* child
        cdef nvme_request* probe
        cdef nvme_request tmp
        cdef uint32_t i, j, count, start = 0
        cdef uint64_t length, done = 0
        cdef int rc
        if not self.on_owner():
            return -EPERM
        if self.state == QP_DISCONNECTING:
            self.drain_disconnected()
        if self.state != QP_ENABLED:
            return -ENXIO
        if not self.has_free_requests(nchunks + 1):
            return -ENOMEM
        # every child must be describable before any is submitted
        for i in range(nchunks):
            memset(&tmp, 0, sizeof(tmp))
            tmp.iov = &iov[start]
            tmp.iovcnt = counts[i]
            for j in range(counts[i]):
                tmp.len += iov[start + j].iov_len
            if (tmp.len >> lba_shift) > MAX_NLB or tmp.len & ((1 << lba_shift) - 1):
                return -EINVAL
            rc = self.build_data_pointer(&tmp, &self.scratch)
            if rc != 0:
                return rc
            start += counts[i]
        parent = self.alloc_request()
        _split_parent(parent, opc, nsid, nchunks, cb_fn, cb_arg)
        self.n_splits += 1
        start = 0
        for i in range(nchunks):
            length = 0
            for j in range(counts[i]):
                length += iov[start + j].iov_len
            child = self.alloc_request()
            self._fill_rw(child, opc, nsid, lba + done, <uint32_t> (length >> lba_shift),
                          cdw12_flags, 0)
            child.iov = &iov[start]
            child.iovcnt = counts[i]
            child.len = length
            if not _start_child(self, parent, child, nchunks - i - 1):
                return 0
            start += counts[i]
            done += length >> lba_shift
        return 0

    cdef int submit_iov(self, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks,
                        uint32_t lba_shift, const iovec* iov, uint32_t iovcnt,
                        uint32_t cdw12_flags, nvme_cb cb_fn, void* cb_arg) noexcept nogil:
        """Vectored read/write/compare of at most `max_transfer` bytes (callers split larger
        ones). The iovec array must stay valid until the completion."""
        cdef nvme_request* req
        cdef uint64_t total = 0
        cdef uint32_t i
        cdef int rc
        if nblocks == 0 or nblocks > MAX_NLB or iovcnt == 0:
            return -EINVAL
        if not self.on_owner():
            return -EPERM
        for i in range(iovcnt):
            total += iov[i].iov_len
        if total != (<uint64_t> nblocks) << lba_shift:
            return -EINVAL
        if total > self.max_transfer:
            return -E2BIG
        req = self.alloc_request()
        if req == NULL:
            return -ENOMEM
        self._fill_rw(req, opc, nsid, lba, nblocks, cdw12_flags, 0)
        req.iov = iov
        req.iovcnt = iovcnt
        req.len = total
        req.cb_fn = cb_fn
        req.cb_arg = cb_arg
        return self.submit_or_free(req)

    # ---- completions ----------------------------------------------------------------------------
    cdef int process_completions_c(self, uint32_t max_completions) noexcept nogil:
        """Reap up to `max_completions` completions (0: all there are). Returns how many, or a
        negative errno (-EPERM: wrong thread; -ENXIO: the queue pair is not enabled)."""
        cdef nvme_cqe* cqe
        cdef uint16_t status
        cdef uint16_t cid
        cdef uint32_t n = 0
        cdef uint32_t size = self.size_entries()
        cdef nvme_tracker* tr
        if not self.on_owner():
            return -EPERM
        if self.state != QP_ENABLED:
            if self.state == QP_DISCONNECTING:
                return self.drain_disconnected()
            return -ENXIO
        self.in_completions = 1
        while True:
            cqe = &self.cq[self.cq_head]
            status = load16(&cqe.status)
            if (status & 1) != self.phase:
                break
            rmb()     # the rest of the entry is read after its phase tag
            cid = cqe.cid
            self.cq_head += 1
            if self.cq_head == size:
                self.cq_head = 0
                self.phase ^= 1
            self.sq_head = cqe.sqhd
            if cid < self.ntrackers and self.trackers[cid].active:
                self.complete_tracker(&self.trackers[cid], cqe)
            else:
                # not ours: a confused controller or a duplicate; never complete twice
                self.n_bogus += 1
            n += 1
            if max_completions and n >= max_completions:
                break
        if n:
            self.ring_cq()
        if self.queued_head != NULL and self.free_trackers != NULL:
            self.submit_queued()
        self.in_completions = 0
        if self.sq_tail != self.last_sq_doorbell and self.state == QP_ENABLED:
            self.ring_sq()
        if self.timeout_ns and self.out_head != NULL:
            self.check_timeouts()
        return n

    cdef void complete_tracker(self, nvme_tracker* tr, const nvme_cqe* cqe) noexcept nogil:
        cdef nvme_request* req = tr.req
        # off the outstanding list and back to the free list before the callback runs, so the
        # callback can submit into the slot it just freed
        if tr.prev != NULL:
            tr.prev.next = tr.next
        else:
            self.out_head = tr.next
        if tr.next != NULL:
            tr.next.prev = tr.prev
        else:
            self.out_tail = tr.prev
        tr.active = 0
        tr.req = NULL
        tr.next = self.free_trackers
        self.free_trackers = tr
        self.outstanding -= 1
        self.n_completed += 1
        self.complete_request(req, cqe)

    cdef void complete_request(self, nvme_request* req, const nvme_cqe* cqe) noexcept nogil:
        cdef nvme_request* parent
        if req.flags & REQ_CHILD:
            parent = req.parent
            if (cqe.status >> 1) & 0x7FF and not (parent.first_error.status >> 1) & 0x7FF:
                parent.first_error = cqe[0]
            self.free_request(req)
            parent.children_left -= 1
            if parent.children_left:
                return
            if not (parent.first_error.status >> 1) & 0x7FF:
                parent.first_error = cqe[0]
            req = parent
            cqe = &parent.first_error
        if req.flags & REQ_PY:
            with gil:
                self._call_python(req, cqe)
        elif req.cb_fn != NULL:
            req.cb_fn(req.cb_arg, cqe)
        self.free_request(req)

    cdef void _call_python(self, nvme_request* req, const nvme_cqe* cqe):
        cb = <object> req.py_cb if req.py_cb != NULL else None
        ref = <object> req.py_ref if req.py_ref != NULL else None
        Py_XDECREF(req.py_cb)
        Py_XDECREF(req.py_ref)
        req.py_cb = NULL
        req.py_ref = NULL
        if isinstance(ref, DmaBuffer):
            (<DmaBuffer> ref).unpin()
        if cb is not None:
            try:
                cb(Completion.from_cqe(cqe))
            except BaseException:
                log.exception("completion callback %r raised (qid %d)", cb, self.qid)

    cdef void fail_request(self, nvme_request* req, uint16_t sct, uint16_t sc, bint dnr) noexcept nogil:
        """Complete `req` (not on a tracker) with a status made up by the driver."""
        cdef nvme_cqe cqe
        memset(&cqe, 0, sizeof(cqe))
        cqe.sqid = self.qid
        cqe.status = <uint16_t> ((sct << 9) | (sc << 1) | (CQE_STATUS_DNR if dnr else 0))
        self.complete_request(req, &cqe)

    cdef void submit_queued(self) noexcept nogil:
        cdef nvme_request* req
        cdef nvme_tracker* tr
        cdef int rc
        while self.queued_head != NULL and self.free_trackers != NULL and self.state == QP_ENABLED:
            req = self.queued_head
            self.queued_head = req.next
            if self.queued_head == NULL:
                self.queued_tail = NULL
            self.queued -= 1
            tr = self.free_trackers
            self.free_trackers = tr.next
            rc = self.start(req, tr)
            if rc != 0:
                tr.next = self.free_trackers
                self.free_trackers = tr
                # the buffer changed under us since it was validated
                self.fail_request(req, SCT_GENERIC, SC_DATA_TRANSFER_ERROR, True)

    cdef void check_timeouts(self) noexcept nogil:
        cdef uint64_t now = now_ns()
        cdef nvme_tracker* tr = self.out_head
        while tr != NULL and now - tr.start_ns > self.timeout_ns:
            if not tr.timeout_reported:
                tr.timeout_reported = 1
                self.n_timeouts += 1
                with gil:
                    self._report_timeout(tr.cid)
            tr = tr.next

    cdef void _report_timeout(self, uint16_t cid):
        handler = self.timeout_handler
        if handler is None:
            log.warning("qpair %d: command %d timed out (no handler)", self.qid, cid)
            return
        try:
            handler(self, cid)
        except BaseException:
            log.exception("timeout handler %r raised", handler)

    # ---- disconnect / reset ---------------------------------------------------------------------
    cdef int drain_disconnected(self) noexcept nogil:
        """On the owner thread: complete everything outstanding or queued with ABORTED - SQ
        DELETION (each exactly once) and leave the queue pair DISCONNECTED. Returns how many."""
        cdef nvme_tracker* tr
        cdef nvme_request* req
        cdef nvme_cqe cqe
        cdef int n = 0
        if self.draining:
            return 0     # a callback of this very drain submitted: it gets -ENXIO, no recursion
        self.draining = 1
        memset(&cqe, 0, sizeof(cqe))
        cqe.sqid = self.qid
        cqe.status = (SCT_GENERIC << 9) | (SC_ABORTED_SQ_DELETION << 1)
        self.in_completions = 1
        while self.out_head != NULL:
            tr = self.out_head
            cqe.cid = tr.cid
            self.complete_tracker(tr, &cqe)
            n += 1
        while self.queued_head != NULL:
            req = self.queued_head
            self.queued_head = req.next
            if self.queued_head == NULL:
                self.queued_tail = NULL
            self.queued -= 1
            self.fail_request(req, SCT_GENERIC, SC_ABORTED_SQ_DELETION, False)
            n += 1
        self.in_completions = 0
        self.draining = 0
        self.state = QP_DESTROYED if self.destroy_pending else QP_DISCONNECTED
        if self.disconnect_handler is not None and not self.destroy_pending:
            with gil:
                try:
                    self.disconnect_handler(self)
                except BaseException:
                    log.exception("disconnect handler raised (qid %d)", self.qid)
        return n

    def disconnect(self):
        """Any thread: the queues are gone from the controller (reset, removal, detach). The
        owner completes what is in flight with ABORTED - SQ DELETION on its next poll (or now,
        if the caller is the owner) and calls the disconnect handler."""
        if self.state in (QP_DESTROYED, QP_DISCONNECTED):
            return
        self.state = QP_DISCONNECTING
        if self.on_owner():
            with nogil:
                self.drain_disconnected()

    def destroy(self):
        """Forget the queue pair (after disconnect). Further use raises. From a thread that
        does not own it, the owner completes what is in flight on its next poll or submission
        (ABORTED - SQ DELETION), and only then is the queue pair destroyed."""
        if self.state == QP_ENABLED or self.state == QP_DISCONNECTING:
            self.state = QP_DISCONNECTING
            if not self.on_owner():
                self.destroy_pending = True
                return
            with nogil:
                self.drain_disconnected()
        self.state = QP_DESTROYED

    # ---- Python API ---------------------------------------------------------------------------
    def _raise_for(self, int rc, what="submit"):
        from nvme.errors import ControllerDetached
        if rc == -EPERM:
            raise WrongThreadError(f"queue pair {self.qid} of {self.transport.name} belongs to "
                                   "another OS thread; use a queue pair of this thread")
        if rc == -ENXIO:
            raise ControllerDetached(f"queue pair {self.qid} of {self.transport.name} is "
                                     f"{_state_name(self.state)}")
        if rc == -ENOMEM:
            raise ResourceExhausted(f"queue pair {self.qid}: all {self.nrequests} requests are in "
                                    "use; poll for completions first")
        if rc == -EFAULT:
            raise TranslationError("the buffer is not registered for DMA (allocate it with "
                                   "env.memory.allocate)")
        if rc == -EINVAL:
            raise InvalidArgument("the buffer is not dword-aligned or its pieces cannot be "
                                  "described to this controller")
        if rc == -E2BIG:
            raise InvalidArgument(f"the transfer exceeds {self.max_transfer} bytes")
        raise InvalidArgument(f"{what} failed: errno {-rc}")

    def submit_raw(self, uint8_t opc, *, uint32_t nsid=0, uint32_t cdw2=0, uint32_t cdw3=0,
                   uint32_t cdw10=0, uint32_t cdw11=0, uint32_t cdw12=0, uint32_t cdw13=0,
                   uint32_t cdw14=0, uint32_t cdw15=0, buf=None, size_t offset=0, length=None,
                   iov=None, cb=None, uint64_t mptr=0, uint8_t fuse=0, uint64_t prp1=0,
                   uint64_t prp2=0):
        """Submit any command (passthrough). `buf` is a DmaBuffer (the payload is `length` bytes
        from `offset`, default: to its end), `cb(completion)` runs from `process_completions`.
        Without `buf`, `prp1`/`prp2` go into the command as given (addresses that are not a data
        transfer, e.g. the base of a queue being created)."""
        cdef nvme_request* req
        cdef DmaBuffer dbuf
        cdef int rc
        if not self.on_owner():
            self._raise_for(-EPERM)      # before touching the request pool
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"cb must be callable, not {cb!r}")
        if iov is not None:
            raise InvalidArgument("submit_raw takes a contiguous buffer; use a Namespace for "
                                  "vectored I/O")
        if buf is not None:
            if not isinstance(buf, DmaBuffer):
                raise InvalidArgument(f"buf must be an env.memory.DmaBuffer, not "
                                      f"{type(buf).__name__}")
            dbuf = <DmaBuffer> buf
            dbuf.check_live()
            n = dbuf.nbytes() - offset if length is None else length
            if offset > dbuf.nbytes() or n <= 0 or offset + n > dbuf.nbytes():
                raise InvalidArgument(f"range {offset}+{n} is outside the {dbuf.nbytes()}-byte "
                                      "buffer")
        req = self.alloc_request()
        if req == NULL:
            self._raise_for(-ENOMEM)
        req.cmd.opc = opc
        req.cmd.flags = fuse & 3
        req.cmd.nsid = nsid
        req.cmd.cdw2 = cdw2
        req.cmd.cdw3 = cdw3
        req.cmd.mptr = mptr
        req.cmd.cdw10 = cdw10
        req.cmd.cdw11 = cdw11
        req.cmd.cdw12 = cdw12
        req.cmd.cdw13 = cdw13
        req.cmd.cdw14 = cdw14
        req.cmd.cdw15 = cdw15
        req.cmd.prp1 = prp1
        req.cmd.prp2 = prp2
        if buf is not None:
            req.buf = dbuf.data() + offset
            req.len = n
        self.attach_python(req, cb, buf)
        rc = self.submit_request(req)
        if rc != 0:
            self.detach_python(req)
            self.free_request(req)
            self._raise_for(rc)

    cdef void attach_python(self, nvme_request* req, cb, ref):
        """Route the completion of `req` to the Python callable `cb` and keep `ref` (the
        payload's owner) alive, and pinned if it is a DmaBuffer, until then."""
        req.flags |= REQ_PY
        if cb is not None:
            Py_INCREF(cb)
            req.py_cb = <PyObject*> cb
        if ref is not None:
            Py_INCREF(ref)
            req.py_ref = <PyObject*> ref
            if isinstance(ref, DmaBuffer):
                (<DmaBuffer> ref).pin()

    cdef void detach_python(self, nvme_request* req):
        ref = <object> req.py_ref if req.py_ref != NULL else None
        if isinstance(ref, DmaBuffer):
            (<DmaBuffer> ref).unpin()
        Py_XDECREF(req.py_cb)
        Py_XDECREF(req.py_ref)
        req.py_cb = req.py_ref = NULL
        req.flags &= ~REQ_PY

    def submit_nvm(self, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks,
                   uint32_t lba_shift, buf=None, size_t offset=0, uint32_t cdw12_flags=0,
                   uint32_t cdw13=0, cb=None):
        """Python path of `submit_io`: Read/Write/Compare with `buf` (a DmaBuffer; the data is at
        `offset`), or Write Zeroes & co. without. Split above the maximum transfer. The caller
        (nvme.Namespace) has checked the LBA range."""
        cdef DmaBuffer dbuf = None
        cdef char* ptr = NULL
        cdef int rc
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"cb must be callable, not {cb!r}")
        if buf is not None:
            if not isinstance(buf, DmaBuffer):
                raise InvalidArgument(f"buf must be an env.memory.DmaBuffer, not "
                                      f"{type(buf).__name__}")
            dbuf = <DmaBuffer> buf
            dbuf.check_live()
            need = (<uint64_t> nblocks) << lba_shift
            if offset + need > dbuf.nbytes():
                raise InvalidArgument(f"{nblocks} blocks of {1 << lba_shift} bytes at offset "
                                      f"{offset} do not fit in a {dbuf.nbytes()}-byte buffer")
            ptr = dbuf.data() + offset
            dbuf.pin()
        ctx = (cb, buf)
        Py_INCREF(ctx)
        rc = self.submit_io(opc, nsid, lba, nblocks, lba_shift, ptr, cdw12_flags, cdw13,
                            _py_io_done, <void*> ctx)
        if rc != 0:
            Py_DECREF(ctx)
            if dbuf is not None:
                dbuf.unpin()
            self._raise_for(rc)

    def submit_nvm_iov(self, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks,
                       uint32_t lba_shift, iov, uint32_t cdw12_flags=0, cb=None):
        """Vectored Read/Write/Compare: `iov` is a sequence of (DmaBuffer, offset, length).
        Split above the maximum transfer."""
        if cb is not None and not callable(cb):
            raise InvalidArgument(f"cb must be callable, not {cb!r}")
        cdef _IovArray arr = _IovArray()
        cdef DmaBuffer dbuf
        cdef uint32_t i
        cdef int rc
        items = list(iov)
        if not items:
            raise InvalidArgument("empty iovec")
        arr.iov = <iovec*> calloc(len(items), sizeof(iovec))
        if arr.iov == NULL:
            raise MemoryError()
        arr.count = len(items)
        for i, item in enumerate(items):
            try:
                b, off, length = item
            except (TypeError, ValueError):
                raise InvalidArgument("each iovec element is (DmaBuffer, offset, length)") from None
            if not isinstance(b, DmaBuffer):
                raise InvalidArgument(f"iovec element {i}: not a DmaBuffer")
            dbuf = <DmaBuffer> b
            dbuf.check_live()
            if off < 0 or length <= 0 or off + length > dbuf.nbytes():
                raise InvalidArgument(f"iovec element {i}: range {off}+{length} is outside the "
                                      f"{dbuf.nbytes()}-byte buffer")
            arr.iov[i].iov_base = dbuf.data() + <size_t> off
            arr.iov[i].iov_len = <size_t> length
        total = sum(length for _, _, length in items)
        if total > self.max_transfer:
            arr = self._split_iov(arr, total, lba_shift)
        bufs = tuple(b for b, _, _ in items)
        for b in bufs:
            (<DmaBuffer> b).pin()
        ctx = (cb, arr) + bufs
        Py_INCREF(ctx)
        if arr.counts != NULL:
            if total != (<uint64_t> nblocks) << lba_shift:
                rc = -EINVAL
            else:
                rc = self.submit_iov_chunks(opc, nsid, lba, lba_shift, arr.iov, arr.counts,
                                            arr.nchunks, cdw12_flags, _py_io_done, <void*> ctx)
        else:
            rc = self.submit_iov(opc, nsid, lba, nblocks, lba_shift, arr.iov, arr.count,
                                 cdw12_flags, _py_io_done, <void*> ctx)
        if rc != 0:
            Py_DECREF(ctx)
            for b in bufs:
                (<DmaBuffer> b).unpin()
            self._raise_for(rc)

    def _split_iov(self, _IovArray whole, uint64_t total, uint32_t lba_shift):
        """The iovec cut into consecutive pieces of the largest whole number of blocks a command
        carries. Cutting at multiples of the maximum transfer (a multiple of the page size) keeps
        what PRPs can express expressible."""
        cdef _IovArray arr = _IovArray()
        cdef uint64_t chunk = (self.max_transfer >> lba_shift) << lba_shift
        cdef uint64_t cur = 0, take, n
        cdef uint32_t i, k = 0, c = 0, count = 0
        cdef char* p
        if chunk == 0:
            self._raise_for(-E2BIG)
        arr.nchunks = <uint32_t> ((total + chunk - 1) // chunk)
        arr.iov = <iovec*> calloc(whole.count + arr.nchunks, sizeof(iovec))
        arr.counts = <uint32_t*> calloc(arr.nchunks, sizeof(uint32_t))
        if arr.iov == NULL or arr.counts == NULL:
            raise MemoryError()
        for i in range(whole.count):
            p = <char*> whole.iov[i].iov_base
            n = whole.iov[i].iov_len
            while n:
                take = min(n, chunk - cur)
                arr.iov[k].iov_base = p
                arr.iov[k].iov_len = <size_t> take
                k += 1
                count += 1
                p += take
                n -= take
                cur += take
                if cur == chunk:
                    arr.counts[c] = count
                    c += 1
                    count = 0
                    cur = 0
        if count:
            arr.counts[c] = count
        arr.count = k
        return arr

    @property
    def busy(self):
        """True while completions are being processed (callbacks are running)."""
        return bool(self.in_completions)

    def process_completions(self, uint32_t max_completions=0):
        """Reap completions (all that are there, or at most `max_completions`) and run their
        callbacks; returns how many commands completed."""
        cdef int rc
        with nogil:
            rc = self.process_completions_c(max_completions)
        if rc == -EPERM:
            self._raise_for(rc)
        if rc == -ENXIO:
            if self.state == QP_DESTROYED:
                self._raise_for(rc)
            return 0
        return rc

    def set_timeout(self, timeout_us, handler=None):
        """Report commands outstanding for longer than `timeout_us` (0: off) to
        `handler(qpair, cid)`, once each, from `process_completions`."""
        if (isinstance(timeout_us, bool) or not isinstance(timeout_us, (int, float))
                or not timeout_us >= 0 or timeout_us > MAX_TIMEOUT_US):
            raise InvalidArgument(f"queue pair {self.qid}: the timeout is a number of "
                                  f"microseconds from 0 (off) to {MAX_TIMEOUT_US:g}, not "
                                  f"{timeout_us!r}")
        if handler is not None and not callable(handler):
            raise InvalidArgument("handler must be callable")
        self.timeout_ns = <uint64_t> (timeout_us * 1000)
        self.timeout_handler = handler

    def set_disconnect_handler(self, handler):
        self.disconnect_handler = handler

    def set_controller(self, ctrlr):
        self.controller = ctrlr

    def outstanding_cids(self):
        """CIDs of the commands on the controller, oldest first."""
        out = []
        cdef nvme_tracker* tr = self.out_head
        while tr != NULL:
            out.append(tr.cid)
            tr = tr.next
        return out

    def command_token(self, uint16_t cid):
        """A value that identifies the command now outstanding under `cid` (None if none):
        it changes when the CID is reused by another command."""
        if cid >= self.ntrackers or not self.trackers[cid].active:
            return None
        return self.trackers[cid].gen

    def command_of(self, uint16_t cid):
        """(opcode, nsid) of the outstanding command `cid`, or None."""
        if cid >= self.ntrackers or not self.trackers[cid].active:
            return None
        return self.trackers[cid].req.cmd.opc, self.trackers[cid].req.cmd.nsid

    @property
    def state(self):
        return _state_name(self.state)

    @property
    def entries(self):
        return self.size_entries()

    @property
    def outstanding(self):
        return self.outstanding

    @property
    def queued(self):
        return self.queued

    @property
    def max_transfer(self):
        return self.max_transfer

    @property
    def sgl(self):
        return ("never", "auto", "always")[self.sgl_mode]

    @property
    def shadow_doorbells(self):
        return self.shadow_sq != NULL

    def stats(self):
        """Counters since creation."""
        return {"submitted": self.n_submitted, "completed": self.n_completed,
                "queued_total": self.n_queued_total, "outstanding": self.outstanding,
                "queued": self.queued, "sq_doorbells": self.n_sq_doorbells,
                "cq_doorbells": self.n_cq_doorbells, "mmio_doorbells": self.n_mmio_doorbells,
                "bogus_completions": self.n_bogus, "timeouts": self.n_timeouts,
                "splits": self.n_splits}

    def __repr__(self):
        return (f"<QueuePair {self.transport.name} qid={self.qid} entries={self.size_entries()} "
                f"{_state_name(self.state)} outstanding={self.outstanding} queued={self.queued}>")
