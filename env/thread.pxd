# Lightweight threads, pollers, messages and per-thread I/O channels (see thread.pyx).
#
# C-level API for Cython layers (nvme, bdev, perf):
#   - `Thread.send_c(fn, ctx)` / `thread_send(t, fn, ctx)`: post a C message from any OS thread,
#     without the GIL; 0, -ENOMEM (ring full) or -ESHUTDOWN (thread exited).
#   - `Thread.register_c_poller(fn, ctx, period_us)`: a C poller (needs the GIL to register only);
#     `poller_pause/resume/unregister(handle)` work without the GIL, also from inside the poller.
#   - `current_thread_ptr()`: the thread_s* current on this OS thread (NULL if none); compare with
#     `Thread.handle()` or use `IoChannel.on_owner()`.
#   - `Thread.poll_c(max_msgs)`: one iteration without the GIL (for C run loops).
#   - `IoChannel` subclasses keep their per-thread C state as cdef fields.
from cpython.ref cimport PyObject
from libc.errno cimport ESHUTDOWN
from libc.stdint cimport uint32_t, uint64_t

ctypedef void (*msg_fn)(void* ctx) noexcept nogil
ctypedef int (*poller_fn)(void* ctx) noexcept nogil

cdef extern from *:
    """
    #include <errno.h>
    #include <limits.h>
    #include <pthread.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #include <time.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #include <linux/futex.h>

    #ifndef UBLK_TLS_DIRECT
    /* The current-thread pointer lives in env.thread's static (initial-exec) TLS: at the same
       offset from the thread pointer on every OS thread, and on x86-64 the thread pointer is
       %fs:0 (the TLS ABI's self-pointer). So other modules read it with two loads and no call,
       given the offset env.thread measured (ublk_tls_offset there). Elsewhere: the call. */
    #if defined(__x86_64__)
    #define UBLK_TLS_DIRECT 1
    static inline void *ublk_tls_load(ptrdiff_t off) {
        char *tp;
        __asm__("mov %%fs:0, %0" : "=r"(tp));
        return *(void **)(tp + off);
    }
    #else
    #define UBLK_TLS_DIRECT 0
    static inline void *ublk_tls_load(ptrdiff_t off) { (void)off; return NULL; }
    #endif
    #endif

    #ifndef UBLK_MSG_RING_DEFINED
    #define UBLK_MSG_RING_DEFINED
    /* A bounded multi-producer, single-consumer message ring (Vyukov's bounded queue: one sequence
       number per cell, so producers never wait for each other and the consumer takes no lock).
       A cell is free for the producer at position `pos` when cell.seq == pos, and holds a
       message for the consumer at `pos` when cell.seq == pos + 1. */
    typedef void (*ublk_msg_fn)(void *);
    typedef struct { size_t seq; ublk_msg_fn fn; void *ctx; } ublk_msg_cell;

    typedef struct ublk_msg_ring {
        ublk_msg_cell *cells;            /* read-only after creation */
        size_t mask;
        _Alignas(64) size_t enq;         /* producers (CAS) */
        _Alignas(64) size_t deq;         /* the consumer only */
        _Alignas(64) uint32_t wake_seq;  /* futex word: bumped to wake a sleeping consumer */
        uint32_t sleeping;               /* the consumer is (about to be) in futex_wait */
    } ublk_msg_ring;

    static inline ublk_msg_ring *ublk_ring_create(size_t size)  /* size: a power of two >= 2 */
    {
        ublk_msg_ring *r = (ublk_msg_ring *)aligned_alloc(64, sizeof(ublk_msg_ring));
        if (!r) return NULL;
        memset(r, 0, sizeof(*r));
        size_t bytes = (size * sizeof(ublk_msg_cell) + 63) & ~(size_t)63;
        r->cells = (ublk_msg_cell *)aligned_alloc(64, bytes);
        if (!r->cells) { free(r); return NULL; }
        for (size_t i = 0; i < size; i++) {
            r->cells[i].seq = i; r->cells[i].fn = NULL; r->cells[i].ctx = NULL;
        }
        r->mask = size - 1;
        return r;
    }

    static inline void ublk_ring_free(ublk_msg_ring *r) { if (r) { free(r->cells); free(r); } }

    static inline void ublk_ring_kick(ublk_msg_ring *r)
    {
        __atomic_fetch_add(&r->wake_seq, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &r->wake_seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }

    /* Any thread. 0, or -ENOMEM when the ring is full. */
    static inline int ublk_ring_push(ublk_msg_ring *r, ublk_msg_fn fn, void *ctx)
    {
        size_t pos = __atomic_load_n(&r->enq, __ATOMIC_RELAXED);
        ublk_msg_cell *c;
        for (;;) {
            c = &r->cells[pos & r->mask];
            size_t seq = __atomic_load_n(&c->seq, __ATOMIC_ACQUIRE);
            intptr_t dif = (intptr_t)seq - (intptr_t)pos;
            if (dif == 0) {
                /* seq_cst: pairs with the consumer's store to `sleeping` (see ublk_ring_wait) */
                if (__atomic_compare_exchange_n(&r->enq, &pos, pos + 1, 1,
                                                __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
                    break;
            } else if (dif < 0) {
                return -ENOMEM;          /* the cell still holds a message from one lap ago */
            } else {
                pos = __atomic_load_n(&r->enq, __ATOMIC_RELAXED);
            }
        }
        c->fn = fn;
        c->ctx = ctx;
        __atomic_store_n(&c->seq, pos + 1, __ATOMIC_RELEASE);
        if (__builtin_expect(__atomic_load_n(&r->sleeping, __ATOMIC_SEQ_CST), 0))
            ublk_ring_kick(r);
        return 0;
    }

    /* Consumer only. 1 and the message, or 0 when nothing is (yet) published. */
    static inline int ublk_ring_pop(ublk_msg_ring *r, ublk_msg_fn *fn, void **ctx)
    {
        size_t pos = r->deq;
        ublk_msg_cell *c = &r->cells[pos & r->mask];
        size_t seq = __atomic_load_n(&c->seq, __ATOMIC_ACQUIRE);
        if ((intptr_t)seq - (intptr_t)(pos + 1) < 0) return 0;
        *fn = c->fn;
        *ctx = c->ctx;
        __atomic_store_n(&c->seq, pos + r->mask + 1, __ATOMIC_RELEASE);
        r->deq = pos + 1;
        return 1;
    }

    /* Consumer only: has any producer claimed a cell the consumer has not taken yet? */
    static inline int ublk_ring_pending(ublk_msg_ring *r)
    {
        return __atomic_load_n(&r->enq, __ATOMIC_SEQ_CST) != r->deq;
    }

    /* Consumer only: sleep up to `timeout_us` unless a message is pending, arrives, or *stop is
       set. Dekker-style: we publish `sleeping` then look at `enq`; a producer moves `enq` then
       looks at `sleeping` (all seq_cst), so at least one of us sees the other. */
    static inline void ublk_ring_wait(ublk_msg_ring *r, uint64_t timeout_us, const int *stop)
    {
        uint32_t seq = __atomic_load_n(&r->wake_seq, __ATOMIC_SEQ_CST);
        __atomic_store_n(&r->sleeping, 1, __ATOMIC_SEQ_CST);
        if (!ublk_ring_pending(r) && !(stop && __atomic_load_n(stop, __ATOMIC_SEQ_CST))) {
            struct timespec ts = { (time_t)(timeout_us / 1000000u),
                                   (long)(timeout_us % 1000000u) * 1000 };
            syscall(SYS_futex, &r->wake_seq, FUTEX_WAIT_PRIVATE, seq, &ts, NULL, 0);
        }
        __atomic_store_n(&r->sleeping, 0, __ATOMIC_RELAXED);
    }

    static inline int ublk_load_int(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void ublk_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline unsigned long ublk_load_ulong(const unsigned long *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void ublk_store_ulong(unsigned long *p, unsigned long v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int ublk_cas_ulong(unsigned long *p, unsigned long expect, unsigned long v)
    { return __atomic_compare_exchange_n(p, &expect, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE); }
    static inline unsigned long ublk_os_thread_id(void) { return (unsigned long)pthread_self(); }
    static inline uint64_t ublk_now_us(void)
    {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
    }
    #endif
    """
    ctypedef struct msg_ring "ublk_msg_ring":
        size_t mask
    msg_ring* ring_create "ublk_ring_create"(size_t size) noexcept nogil
    void ring_free "ublk_ring_free"(msg_ring* r) noexcept nogil
    int ring_push "ublk_ring_push"(msg_ring* r, msg_fn fn, void* ctx) noexcept nogil
    int ring_pop "ublk_ring_pop"(msg_ring* r, msg_fn* fn, void** ctx) noexcept nogil
    bint ring_pending "ublk_ring_pending"(msg_ring* r) noexcept nogil
    void ring_wait "ublk_ring_wait"(msg_ring* r, uint64_t timeout_us, const int* stop) noexcept nogil
    void ring_kick "ublk_ring_kick"(msg_ring* r) noexcept nogil
    int atomic_load_int "ublk_load_int"(const int* p) noexcept nogil
    void atomic_store_int "ublk_store_int"(int* p, int v) noexcept nogil
    unsigned long atomic_load_ulong "ublk_load_ulong"(const unsigned long* p) noexcept nogil
    void atomic_store_ulong "ublk_store_ulong"(unsigned long* p, unsigned long v) noexcept nogil
    bint atomic_cas_ulong "ublk_cas_ulong"(unsigned long* p, unsigned long expect,
                                           unsigned long v) noexcept nogil
    unsigned long os_thread_id "ublk_os_thread_id"() noexcept nogil
    uint64_t now_us "ublk_now_us"() noexcept nogil


cdef enum:                      # thread_s.state
    THREAD_RUNNING = 0
    THREAD_EXITING = 1          # exit() called: no new pollers/messages; pending messages drain
    THREAD_EXITED = 2           # drained; poll() refuses
    THREAD_DESTROYED = 3

cdef enum:                      # poller_s.state: what the owner asked for
    POLLER_WAITING = 0
    POLLER_PAUSED = 1
    POLLER_UNREGISTERED = 2

cdef enum:                      # poller_s.where: the list the poller is on
    ON_NONE = 0                 # not linked (running timed poller, or reaped)
    ON_ACTIVE = 1
    ON_TIMED = 2
    ON_PAUSED = 3
    ON_PENDING = 4              # (re)activated while the active list is being walked
    ON_ZOMBIE = 5               # unregistered, its Poller reference not yet dropped


cdef struct thread_s
cdef struct poller_s

cdef struct poller_list:
    poller_s* head
    poller_s* tail
    size_t count

cdef struct poller_s:
    poller_fn fn
    void* ctx
    uint64_t period_us          # 0: active (every iteration)
    uint64_t next_run_us        # timed pollers: when due (CLOCK_MONOTONIC microseconds)
    thread_s* thread            # NULL once reaped
    poller_s* prev
    poller_s* next
    PyObject* obj               # the Poller: a strong reference while the thread holds it
    int state
    int where
    bint running
    uint64_t runs
    uint64_t busy

cdef struct thread_s:
    msg_ring* ring
    poller_list active
    poller_list timed           # sorted by next_run_us
    poller_list paused
    poller_list pending
    poller_s* zombies
    poller_s* running           # the poller being executed, if any
    int state                   # THREAD_*, read atomically by senders
    int stop                    # run loop stop request (any OS thread)
    bint polling
    bint in_active_phase
    bint dirty                  # a poller on the active list changed state during the walk
    bint pending_exc            # the Thread object holds an exception for poll() to raise
    unsigned long owner         # pthread_t of the bound OS thread, 0 when unbound
    uint32_t max_msgs
    PyObject* obj               # the Thread (borrowed)
    uint64_t iterations
    uint64_t busy_iterations
    uint64_t msgs
    uint64_t poller_runs
    uint64_t errors


# ---- C-level functions (usable from other Cython modules) ----------------------------------------
cdef thread_s* current_thread_ptr() noexcept nogil

cdef extern from *:
    int TLS_DIRECT "UBLK_TLS_DIRECT"
    void* tls_load "ublk_tls_load"(Py_ssize_t off) noexcept nogil
cdef int thread_poll(thread_s* t, uint32_t max_msgs) noexcept nogil
cdef int poller_pause(poller_s* p) noexcept nogil
cdef int poller_resume(poller_s* p) noexcept nogil
cdef int poller_unregister(poller_s* p) noexcept nogil

cdef inline int thread_send(thread_s* t, msg_fn fn, void* ctx) noexcept nogil:
    """Post `fn(ctx)` to run on `t`. Any OS thread, no GIL. 0, -ENOMEM or -ESHUTDOWN.
    The caller keeps a reference to the Thread object while it may send to it."""
    if atomic_load_int(&t.state) != THREAD_RUNNING:
        return -ESHUTDOWN
    return ring_push(t.ring, fn, ctx)


cdef class Thread:
    cdef thread_s t
    cdef readonly str name
    cdef object _owner_name       # name of the bound OS thread, for messages
    cdef dict _channels           # id(IoDevice) -> IoChannel held on this thread
    cdef str _errors              # "log" or "raise"
    cdef public object on_error   # callable(thread, what, exc) or None (log)
    cdef object _exc              # exception waiting to be raised by poll()
    cdef double _log_window
    cdef int _logged_in_window
    cdef object __weakref__

    cdef inline int send_c(self, msg_fn fn, void* ctx) noexcept nogil:
        return thread_send(&self.t, fn, ctx)
    cdef inline thread_s* handle(self) noexcept nogil:
        return &self.t
    cdef inline bint is_current(self) noexcept nogil:
        return current_thread_ptr() == &self.t
    cdef int poll_c(self, uint32_t max_msgs) noexcept nogil
    cdef Poller register_c_poller(self, poller_fn fn, void* ctx, uint64_t period_us=*,
                                  str name=*, object keep=*)
    cdef int _check_owner(self, str what) except -1
    cdef int _enter_poll(self) except -1
    cdef int _after_poll(self) except -1
    cdef int _register(self, Poller po) except -1
    cdef _on_exception(self, exc, what)


cdef class Poller:
    cdef poller_s p
    cdef readonly str name
    cdef object _fn               # Python callable, or None for a C poller
    cdef object _keep             # keeps a C poller's context alive
    cdef object __weakref__
    cdef int _run_py(self) noexcept
    cdef _check(self, str what)

    cdef inline poller_s* handle(self) noexcept nogil:
        return &self.p


cdef class IoDevice:
    cdef public object name
    cdef dict _channels           # Thread -> IoChannel
    cdef bint _unregistered
    cdef object _unregister_done
    cdef Thread _unregister_thread
    cdef object __weakref__


cdef class IoChannel:
    cdef readonly IoDevice device
    cdef readonly Thread thread
    cdef thread_s* _owner
    cdef Py_ssize_t _tls_off      # where the current-thread pointer is, from the thread pointer
    cdef int _refs
    cdef bint _released
    cdef public object ctx        # what IoDevice.create_channel_ctx returned
    cdef object __weakref__

    # True when the calling OS thread is currently running this channel's Thread.
    cdef inline bint on_owner(self) noexcept nogil:
        if TLS_DIRECT:
            return self._owner != NULL and <void*> self._owner == tls_load(self._tls_off)
        return self._owner != NULL and self._owner == current_thread_ptr()
