# An NVMe queue pair: SQ and CQ rings, trackers (one per command id), requests, the software
# queue, PRP/SGL construction and the polled completion path. See qpair.pyx.
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from nvme.spec cimport nvme_sqe, nvme_cqe
from nvme.transport cimport Transport

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()

from posix.uio cimport iovec

# A completion callback at C level: `arg` is what the submitter passed, `cpl` the completion entry
# (for a split request, the first failing child's entry, or the last one's on success).
ctypedef void (*nvme_cb)(void* arg, const nvme_cqe* cpl) noexcept nogil

cdef enum:
    QP_ENABLED = 0          # queues exist on the controller; I/O flows
    QP_DISCONNECTING = 1    # the controller went away or is resetting; owner must drain
    QP_DISCONNECTED = 2     # drained: every request completed; may be re-created
    QP_DESTROYED = 3

    REQ_CHILD = 1           # part of a split request; completes into its parent
    REQ_PY = 2              # completion goes to a Python callable (py_cb)

cdef struct nvme_request:
    nvme_sqe cmd                # built at submission; copied into the SQ when it starts
    char* buf                   # contiguous payload, or NULL
    uint64_t len                # payload bytes (0: none)
    const iovec* iov            # vectored payload (caller-owned until completion), or NULL
    uint32_t iovcnt
    uint32_t flags
    nvme_cb cb_fn
    void* cb_arg
    PyObject* py_cb             # owned reference, or NULL
    PyObject* py_ref            # owned reference to what keeps the payload alive, or NULL
    nvme_request* parent
    uint32_t children_left      # parent: children still outstanding
    uint32_t children_total
    nvme_cqe first_error        # parent: the first failing child's completion
    uint64_t submit_ns          # when it was submitted (only kept when timeouts are on)
    nvme_request* next          # free list / software queue

cdef struct nvme_tracker:
    nvme_request* req
    uint64_t* list_page         # this command's PRP list / SGL segment page (4 KiB DMA)
    uint64_t list_iova
    uint64_t start_ns
    nvme_tracker* next          # free list, or the outstanding list (submission order)
    nvme_tracker* prev
    uint16_t cid
    uint8_t active
    uint8_t timeout_reported
    uint32_t gen                # incremented each time the tracker starts a command


cdef class Completion:
    cdef nvme_cqe cqe
    @staticmethod
    cdef Completion from_cqe(const nvme_cqe* cqe)


cdef class QueuePair:
    # -- hot fields first (touched on every I/O) --
    cdef nvme_sqe* sq
    cdef nvme_cqe* cq
    cdef nvme_tracker* trackers
    cdef nvme_tracker scratch           # builds the data pointer of a request that must queue
    cdef nvme_tracker* free_trackers
    cdef nvme_tracker* out_head         # oldest outstanding
    cdef nvme_tracker* out_tail
    cdef nvme_request* free_requests
    cdef nvme_request* queued_head      # software queue: waiting for a tracker
    cdef nvme_request* queued_tail
    cdef char* sq_doorbell
    cdef char* cq_doorbell
    cdef uint32_t* shadow_sq            # shadow doorbells (Doorbell Buffer Config), or NULL
    cdef uint32_t* shadow_cq
    cdef uint32_t* eventidx_sq
    cdef uint32_t* eventidx_cq
    cdef uint16_t sq_tail
    cdef uint16_t sq_head               # as last reported by the controller (CQE.SQHD)
    cdef uint16_t last_sq_doorbell      # tail value last announced to the controller
    cdef uint16_t cq_head
    cdef uint16_t last_cq_doorbell      # head value last announced to the controller
    cdef uint16_t cq_batch              # announce the CQ head only every this many entries
    cdef uint16_t size                  # entries in each ring
    cdef uint8_t phase
    cdef uint8_t in_completions         # submissions ring the doorbell once, at the end
    cdef uint8_t draining               # drain_disconnected is running (no nested drains)
    cdef uint8_t traps
    cdef uint8_t sgl_mode               # 0: PRPs only, 1: SGL when PRPs cannot express it, 2: always SGL
    cdef int state
    cdef uint32_t page_shift
    cdef uint64_t max_transfer
    cdef uint64_t timeout_ns
    cdef pthread_t owner
    cdef bint check_owner
    # counters
    cdef uint64_t n_submitted
    cdef uint64_t n_completed
    cdef uint64_t n_queued_total
    cdef uint64_t n_sq_doorbells
    cdef uint64_t n_mmio_doorbells
    cdef uint64_t n_cq_doorbells
    cdef uint64_t n_bogus
    cdef uint64_t n_timeouts
    cdef uint64_t n_splits
    cdef uint32_t outstanding
    cdef uint32_t queued
    # -- cold --
    cdef readonly uint16_t qid
    cdef readonly uint32_t ntrackers
    cdef readonly uint32_t nrequests
    cdef readonly Transport transport
    cdef nvme_request* requests
    cdef object _mem                    # DmaBuffers that back the rings and list pages
    cdef bint destroy_pending           # destroyed from another thread: DESTROYED once drained
    cdef object timeout_handler         # Python callable(qpair, cid) for a command past its timeout
    cdef object disconnect_handler      # Python callable(qpair) when a disconnect is drained
    cdef readonly object controller     # weak reference set by the owner controller

    # C-level API (no Python objects per I/O)
    cdef nvme_request* alloc_request(self) noexcept nogil
    cdef void free_request(self, nvme_request* req) noexcept nogil
    cdef bint has_free_requests(self, uint32_t n) noexcept nogil
    cdef int submit_request(self, nvme_request* req) noexcept nogil
    cdef int submit_or_free(self, nvme_request* req) noexcept nogil
    cdef int submit_io(self, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks,
                       uint32_t lba_shift, char* buf, uint32_t cdw12_flags, uint32_t cdw13,
                       nvme_cb cb_fn, void* cb_arg) noexcept nogil
    cdef int submit_iov_chunks(self, uint8_t opc, uint32_t nsid, uint64_t lba,
                               uint32_t lba_shift, const iovec* iov, const uint32_t* counts,
                               uint32_t nchunks, uint32_t cdw12_flags, nvme_cb cb_fn,
                               void* cb_arg) noexcept nogil
    cdef int submit_iov(self, uint8_t opc, uint32_t nsid, uint64_t lba, uint32_t nblocks,
                        uint32_t lba_shift, const iovec* iov, uint32_t iovcnt,
                        uint32_t cdw12_flags, nvme_cb cb_fn, void* cb_arg) noexcept nogil
    cdef int process_completions_c(self, uint32_t max_completions) noexcept nogil
    cdef void ring_sq(self) noexcept nogil
    cdef int start(self, nvme_request* req, nvme_tracker* tr) noexcept nogil
    cdef int build_data_pointer(self, nvme_request* req, nvme_tracker* tr) noexcept nogil
    cdef int build_prps(self, nvme_request* req, nvme_tracker* tr) noexcept nogil
    cdef int build_prps_iov(self, nvme_request* req, nvme_tracker* tr) noexcept nogil
    cdef int build_sgl(self, nvme_request* req, nvme_tracker* tr) noexcept nogil
    cdef int validate_payload(self, nvme_request* req) noexcept nogil
    cdef void complete_tracker(self, nvme_tracker* tr, const nvme_cqe* cqe) noexcept nogil
    cdef void complete_request(self, nvme_request* req, const nvme_cqe* cqe) noexcept nogil
    cdef void fail_request(self, nvme_request* req, uint16_t sct, uint16_t sc, bint dnr) noexcept nogil
    cdef void submit_queued(self) noexcept nogil
    cdef void check_timeouts(self) noexcept nogil
    cdef int drain_disconnected(self) noexcept nogil
    cdef void fail_child_remainder(self, nvme_request* parent) noexcept nogil
    cdef void _fill_rw(self, nvme_request* req, uint8_t opc, uint32_t nsid, uint64_t lba,
                       uint32_t nblocks, uint32_t cdw12_flags, uint32_t cdw13) noexcept nogil
    cdef void _call_python(self, nvme_request* req, const nvme_cqe* cqe)
    cdef void _report_timeout(self, uint16_t cid)
    cdef void attach_python(self, nvme_request* req, cb, ref)
    cdef void detach_python(self, nvme_request* req)
    cdef void _reset_lists(self)
    cdef uint32_t size_entries(self) noexcept nogil
    cdef void ring_cq(self) noexcept nogil
    cdef inline bint on_owner(self) noexcept nogil:
        return not self.check_owner or pthread_self() == self.owner
