# cython: language_level=3
"""Lightweight threads, pollers, messages and per-thread I/O channels (SPDK's lib/thread).

A `Thread` is a cooperative context, not an OS thread. It has a message ring any OS thread may post
to, and pollers: functions run on every iteration ("active", period 0) or every N microseconds
("timed"). `thread.poll()` runs ONE iteration - messages, then active pollers, then the timed pollers
that are due - and says whether any of them did work. Nothing in poll() sleeps; a run loop may back
off when idle (`run_loop`, `Reactor`), and a blocking convenience is a loop of poll()
(`run_until`).

Ownership. A Thread is bound to at most one OS thread: `bind()`, or implicitly by its first poll().
Polling it, or changing its pollers, from another OS thread raises `WrongThreadError`. One OS thread
may hold several Threads (tests drive many from one OS thread, deterministically). While a Thread
polls it is the *current* thread of its OS thread, kept in a C `__thread` pointer so nogil code
compares identities with one load (`current_thread_ptr()`); outside poll() the current thread is the
one last bound with `bind()`, or an "app thread" `current_thread()` creates on first use so plain
Python code can get I/O channels without ceremony.

The GIL. The loop and C-level messages and pollers run without the GIL, so OS threads each polling
their own Thread with C pollers run in parallel. The GIL is taken only to run a Python message or
poller, and (rarely) to drop the reference of an unregistered poller.

Messages are {function, context} pairs in a bounded MPSC ring (no lock, no allocation): C messages
are posted with `Thread.send_c` / `thread_send`, Python ones with `thread.send(fn, *args)`, both in
one order. A full ring is an error for the sender (-ENOMEM / `MessageRingFull`), not a wait.

Pollers change state (pause, resume, unregister) at any time, also from inside themselves: changes to
pollers on the list being walked are recorded and applied when the walk ends, as SPDK does.

Errors in Python callbacks. An exception raised by a Python poller or message does not stop the
loop: it is counted (`stats()["errors"]`), handed to `thread.on_error(thread, what, exc)` if set,
and otherwise logged on ``userblk.env.thread`` (rate-limited). With ``Thread(errors="raise")`` the
first one is re-raised by poll() once the iteration is complete - handy in tests. KeyboardInterrupt
and SystemExit are always re-raised by poll().

I/O devices and channels (spdk_io_device_register / spdk_get_io_channel). An `IoDevice` hands out
per-thread state: `get_io_channel(dev)` returns the calling Thread's `IoChannel` for it, created on
first use (`dev.create_channel_ctx(channel)`, on that thread) and reference counted;
`channel.put()` releases one reference and destroys the channel on its thread at zero
(`dev.destroy_channel_ctx(channel)`). A channel is used only by its thread: `channel.check_thread()`
(Python) and `channel.on_owner()` (C, nogil) say whether the caller may. Unregistering a device with
live channels is deferred until the last one is put, as in SPDK.
"""
import errno as _errno
import logging
import os
import queue
import threading
import time
import weakref
import atexit

cimport cython
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF, Py_XDECREF
from libc.errno cimport EBUSY, EINVAL, ENOMEM, EPERM, ESHUTDOWN
from libc.stdint cimport uint32_t, uint64_t

from env.errors import (InvalidArgument, InvalidCallback, MessageRingFull, ThreadError,
                        ThreadExitedError, ThreadTimeoutError, WrongThreadError)

log = logging.getLogger("userblk.env.thread")

cdef extern from *:
    """
    /* The Thread current on this OS thread. One copy per process: it lives in this module, and
       other extension modules reach it through current_thread_ptr(). Initial-exec: a module
       loaded with dlopen() would otherwise call __tls_get_addr on every access (three per poll
       iteration, one per I/O submission); one pointer fits glibc's static TLS surplus. */
    static __thread void *ublk_tls_current __attribute__((tls_model("initial-exec")));
    static inline void *ublk_tls_get(void) { return ublk_tls_current; }
    static inline void ublk_tls_set(void *t) { ublk_tls_current = t; }
    static inline ptrdiff_t ublk_tls_offset(void) {
    #if UBLK_TLS_DIRECT
        char *tp;
        __asm__("mov %%fs:0, %0" : "=r"(tp));
        return (char *)&ublk_tls_current - tp;
    #else
        return 0;
    #endif
    }
    """
    Py_ssize_t tls_offset "ublk_tls_offset"() noexcept nogil
    void* tls_get "ublk_tls_get"() noexcept nogil
    void tls_set "ublk_tls_set"(void* t) noexcept nogil

DEFAULT_MSG_RING_SIZE = 16384
DEFAULT_MAX_MSGS = 32          # messages run per iteration (SPDK: 8)
DEFAULT_TIMEOUT = 30.0         # run_until / Reactor.call, seconds
DEFAULT_SPIN_US = 100          # idle run loops spin this long before they back off ...
DEFAULT_MAX_SLEEP_US = 1000    # ... in sleeps doubling up to this (a message wakes them at once)
cdef uint64_t CHECK_US = 20    # run_until: idle polling without the GIL between predicate checks

_STATE_NAMES = {THREAD_RUNNING: "running", THREAD_EXITING: "exiting", THREAD_EXITED: "exited",
                THREAD_DESTROYED: "destroyed"}
_POLLER_STATE_NAMES = {POLLER_WAITING: "active", POLLER_PAUSED: "paused",
                       POLLER_UNREGISTERED: "unregistered"}

_tls = threading.local()             # strong references behind the C TLS pointer
_all_threads = weakref.WeakSet()
_thread_ids = [0]


cdef thread_s* current_thread_ptr() noexcept nogil:
    return <thread_s*> tls_get()


# ---- poller lists (owner OS thread only) ---------------------------------------------------------
cdef inline void _append(poller_list* l, poller_s* p) noexcept nogil:
    p.next = NULL
    p.prev = l.tail
    if l.tail != NULL:
        l.tail.next = p
    else:
        l.head = p
    l.tail = p
    l.count += 1


cdef inline void _unlink(poller_list* l, poller_s* p) noexcept nogil:
    if p.prev != NULL:
        p.prev.next = p.next
    else:
        l.head = p.next
    if p.next != NULL:
        p.next.prev = p.prev
    else:
        l.tail = p.prev
    p.prev = p.next = NULL
    l.count -= 1


cdef void _insert_timed(poller_list* l, poller_s* p) noexcept nogil:
    # Sorted by next_run_us; equal deadlines keep registration order. New deadlines are usually
    # the latest, so search from the tail.
    cdef poller_s* q = l.tail
    while q != NULL and q.next_run_us > p.next_run_us:
        q = q.prev
    if q == NULL:
        p.prev = NULL
        p.next = l.head
        if l.head != NULL:
            l.head.prev = p
        else:
            l.tail = p
        l.head = p
    else:
        p.prev = q
        p.next = q.next
        if q.next != NULL:
            q.next.prev = p
        else:
            l.tail = p
        q.next = p
    l.count += 1


cdef poller_list* _list_of(thread_s* t, int where) noexcept nogil:
    if where == ON_ACTIVE:
        return &t.active
    if where == ON_TIMED:
        return &t.timed
    if where == ON_PAUSED:
        return &t.paused
    if where == ON_PENDING:
        return &t.pending
    return NULL


cdef void _place(thread_s* t, poller_s* p) noexcept nogil:
    """Link an unlinked poller where its state says."""
    if p.state == POLLER_UNREGISTERED:
        p.where = ON_ZOMBIE
        p.prev = NULL
        p.next = t.zombies
        t.zombies = p
    elif p.state == POLLER_PAUSED:
        _append(&t.paused, p)
        p.where = ON_PAUSED
    elif p.period_us == 0:
        if t.in_active_phase:          # never grow the list being walked
            _append(&t.pending, p)
            p.where = ON_PENDING
        else:
            _append(&t.active, p)
            p.where = ON_ACTIVE
    else:
        _insert_timed(&t.timed, p)
        p.where = ON_TIMED


cdef int _set_state(poller_s* p, int state) noexcept nogil:
    cdef thread_s* t = p.thread
    cdef poller_list* l
    if t == NULL or p.state == POLLER_UNREGISTERED:
        return -EINVAL
    if p.state == state:
        return 0
    if state == POLLER_WAITING and p.period_us:
        p.next_run_us = now_us() + p.period_us
    p.state = state
    if p.running and p.where == ON_NONE:
        return 0                       # a running timed poller: placed when it returns
    if p.where == ON_ACTIVE and t.in_active_phase:
        t.dirty = 1                    # applied when the walk ends
        return 0
    l = _list_of(t, p.where)
    if l != NULL:
        _unlink(l, p)
        p.where = ON_NONE
        _place(t, p)
    return 0


cdef int poller_pause(poller_s* p) noexcept nogil:
    """Stop running `p` until resumed. Owner thread only; also from inside `p`."""
    return _set_state(p, POLLER_PAUSED)


cdef int poller_resume(poller_s* p) noexcept nogil:
    return _set_state(p, POLLER_WAITING)


cdef int poller_unregister(poller_s* p) noexcept nogil:
    """Never run `p` again. Owner thread only; also from inside `p`. The Poller object is released
    at the end of the current (or next) iteration."""
    return _set_state(p, POLLER_UNREGISTERED)


cdef void _settle(thread_s* t) noexcept nogil:
    """After the walk of the active list: apply deferred state changes, link pending pollers."""
    cdef poller_s* p
    cdef poller_s* nxt
    if t.dirty:
        t.dirty = 0
        p = t.active.head
        while p != NULL:
            nxt = p.next
            if p.state != POLLER_WAITING:
                _unlink(&t.active, p)
                p.where = ON_NONE
                _place(t, p)
            p = nxt
    while t.pending.head != NULL:
        p = t.pending.head
        _unlink(&t.pending, p)
        p.where = ON_NONE
        _place(t, p)


cdef void _unregister_all(thread_s* t) noexcept nogil:
    cdef poller_list* lists[4]
    cdef poller_s* p
    cdef poller_s* nxt
    cdef int i
    lists[0] = &t.active
    lists[1] = &t.timed
    lists[2] = &t.paused
    lists[3] = &t.pending
    for i in range(4):
        p = lists[i].head
        while p != NULL:
            nxt = p.next
            _set_state(p, POLLER_UNREGISTERED)
            p = nxt
    if t.running != NULL:
        _set_state(t.running, POLLER_UNREGISTERED)


cdef void _reap(thread_s* t) noexcept:
    """Drop the references of unregistered pollers (GIL held)."""
    cdef poller_s* p
    cdef PyObject* obj
    while t.zombies != NULL:
        p = t.zombies
        t.zombies = p.next
        p.next = NULL
        p.where = ON_NONE
        p.thread = NULL
        obj = p.obj
        p.obj = NULL
        Py_XDECREF(obj)


cdef inline bint _no_pollers(thread_s* t) noexcept nogil:
    return (t.active.head == NULL and t.timed.head == NULL and t.paused.head == NULL
            and t.pending.head == NULL and t.running == NULL)


cdef inline int _run_poller(thread_s* t, poller_s* p) noexcept nogil:
    cdef int rc
    p.running = 1
    t.running = p
    rc = p.fn(p.ctx)
    t.running = NULL
    p.running = 0
    p.runs += 1
    if rc > 0:
        p.busy += 1
        return 1
    return 0


# ---- one iteration -------------------------------------------------------------------------------
cdef int thread_poll(thread_s* t, uint32_t max_msgs) noexcept nogil:
    """Run one iteration of `t` on the calling OS thread; >0 if anything did work, 0 if idle.
    The caller has checked ownership, state and re-entry (`Thread.poll_c` does)."""
    cdef void* prev = tls_get()
    cdef uint32_t n = 0
    cdef int work = 0
    cdef msg_fn fn
    cdef void* ctx
    cdef poller_s* p
    cdef poller_s* nxt
    cdef uint64_t now
    tls_set(t)
    t.polling = 1
    if max_msgs == 0:
        max_msgs = t.max_msgs

    # 1. messages
    while n < max_msgs and ring_pop(t.ring, &fn, &ctx):
        fn(ctx)
        n += 1
    if n:
        t.msgs += n
        work = 1

    # 2. active pollers, in registration order
    if t.active.head != NULL:
        t.in_active_phase = 1
        p = t.active.head
        while p != NULL:
            nxt = p.next               # p's changes to the list are deferred: nxt stays valid
            if p.state == POLLER_WAITING:
                work |= _run_poller(t, p)
                t.poller_runs += 1
            p = nxt
        t.in_active_phase = 0
    if t.dirty or t.pending.head != NULL:
        _settle(t)

    # 3. timed pollers that are due; each runs at most once per iteration. A busy thread
    #    reads the clock every 16th iteration only: a clock read costs as much as a whole
    #    iteration of I/O pollers, and a timer a few microseconds late is still on time.
    if t.timed.head != NULL and (not work or (t.iterations & 15) == 0):
        now = now_us()
        while t.timed.head != NULL and t.timed.head.next_run_us <= now:
            p = t.timed.head
            _unlink(&t.timed, p)
            p.where = ON_NONE
            work |= _run_poller(t, p)
            t.poller_runs += 1
            p.next_run_us = now + p.period_us
            _place(t, p)

    if t.zombies != NULL:
        with gil:
            _reap(t)
    if t.state == THREAD_EXITING and not ring_pending(t.ring) and _no_pollers(t):
        atomic_store_int(&t.state, THREAD_EXITED)
    t.iterations += 1
    if work:
        t.busy_iterations += 1
    t.polling = 0
    tls_set(prev)
    return work


cdef int _poll_until_work(thread_s* t, uint32_t max_msgs, uint64_t until) noexcept nogil:
    """Iterate until one iteration does work or the clock reaches `until` (at least once)."""
    cdef int rc
    while True:
        rc = thread_poll(t, max_msgs)
        if rc > 0 or t.pending_exc or t.state != THREAD_RUNNING or now_us() >= until:
            return rc


cdef int _run_loop(thread_s* t, uint64_t spin_us, uint64_t max_sleep_us) noexcept nogil:
    """Poll until t.stop is set (or a Python exception waits to be raised). When idle for spin_us,
    sleep in doubling steps up to max_sleep_us (0: never sleep), never past a timed poller's
    deadline; a message or stop request wakes the sleeper at once."""
    cdef uint64_t idle_since = 0, now, wait, sleep_us = 1
    while not atomic_load_int(&t.stop):
        if thread_poll(t, 0) > 0:
            idle_since = 0
            sleep_us = 1
        elif t.pending_exc or t.state != THREAD_RUNNING:
            return 0
        elif max_sleep_us:
            now = now_us()
            if idle_since == 0:
                idle_since = now
            elif now - idle_since >= spin_us:
                wait = sleep_us
                if t.timed.head != NULL:
                    if t.timed.head.next_run_us <= now:
                        continue
                    if t.timed.head.next_run_us - now < wait:
                        wait = t.timed.head.next_run_us - now
                ring_wait(t.ring, wait, &t.stop)
                if sleep_us < max_sleep_us:
                    sleep_us = sleep_us * 2 if sleep_us * 2 < max_sleep_us else max_sleep_us
        if t.pending_exc:
            return 0
    return 0


# ---- Python trampolines --------------------------------------------------------------------------
cdef void _py_msg(void* ctx) noexcept nogil:
    with gil:
        _run_py_msg(<PyObject*> ctx)


cdef void _run_py_msg(PyObject* ctx) noexcept:
    msg = <object> ctx                 # takes its own reference ...
    Py_DECREF(msg)                     # ... so drop the one the ring held
    fn, args = <tuple> msg
    try:
        fn(*args)
    except BaseException as e:
        _report(current_thread_ptr(), e, fn)


cdef int _py_poller(void* ctx) noexcept nogil:
    with gil:
        return (<Poller> ctx)._run_py()


cdef void _report(thread_s* t, exc, what) noexcept:
    try:
        if t != NULL and t.obj != NULL:
            (<Thread> t.obj)._on_exception(exc, what)
        else:
            log.error("exception in %r outside any thread", what, exc_info=exc)
    except BaseException:
        pass


cdef inline str _os_thread_name():
    return f"{threading.current_thread().name} ({threading.get_ident()})"


def _caller_desc():
    cdef thread_s* cur = current_thread_ptr()
    who = f"OS thread {_os_thread_name()}"
    if cur != NULL and cur.obj != NULL:
        who = f"thread {(<Thread> cur.obj).name!r} on {who}"
    return who


# ---- the end of an OS thread ---------------------------------------------------------------------
# An OS thread's Python state ends with its threading.local data, and with it the
# _OsThreadBindings below: that is our exit hook. It runs while CPython clears the thread's state
# (PyThreadState_Clear), with the GIL but with the thread half torn down: threading no longer knows
# the thread (threading.current_thread() would invent a dummy), and Python code, logging, I/O
# completion callbacks or a 30 s drain must not run there. So the hook only unbinds the Threads
# (atomics) and hands them, with a C-level SimpleQueue.put, to the reaper: one daemon OS thread,
# started (in a sound context) when an OS thread other than the main one first makes an app thread
# or a channel. The
# reaper adopts an app thread (binds it), tells the devices of its channels that they moved
# (IoDevice.channel_moved: an NVMe queue pair belongs to an OS thread), logs one warning naming the
# leaked channels, and exit()s and destroy()s it: I/O in flight completes (or fails) once, there,
# and every channel is put. Threads bound with bind() stay their creator's: the reaper only warns
# when they hold channels (destroy() releases them).
_orphans = queue.SimpleQueue()       # (Thread, OS thread name, is the app thread) from the hook
cdef unsigned long _orphans_queued = 0   # under the GIL
_reaped = threading.Condition()
_reaped_count = [0]
_reaper = [None]
_reaper_lock = threading.Lock()


cdef class _OsThreadBindings:
    """Lives in the threading.local of an OS thread; when the OS thread ends it unbinds the
    Threads still bound there, so their owner id is not inherited by a later OS thread, and
    hands those that hold channels (or, its app thread, unprocessed messages) to the reaper."""
    cdef unsigned long tid
    cdef list threads
    cdef Thread app               # the Thread current_thread() made for this OS thread
    cdef str os_name              # the OS thread's name, taken while it was alive

    def __cinit__(self):
        self.tid = os_thread_id()
        self.threads = []
        self.os_name = _os_thread_name()

    def __dealloc__(self):
        global _orphans_queued
        cdef Thread th
        for ref in self.threads:
            th = ref()
            if th is None:
                continue
            if not atomic_cas_ulong(&th.t.owner, self.tid, 0):
                continue              # not bound here (any more)
            if th.t.state == THREAD_DESTROYED:
                continue
            if not th._channels and not (th is self.app and ring_pending(th.t.ring)):
                continue              # nothing to release: unbound, it goes with its references
            try:
                _orphans.put((th, self.os_name, th is self.app))
                _orphans_queued += 1
            except BaseException:
                pass                  # the interpreter is finalizing: nothing to hand over to
        self.app = None
        if tls_get() != NULL and os_thread_id() == self.tid:
            tls_set(NULL)


cdef void _note_bound(Thread th) except *:
    cdef _OsThreadBindings b = getattr(_tls, "bindings", None)
    if b is None:
        b = _tls.bindings = _OsThreadBindings()
    if len(b.threads) >= 64:         # a long-lived OS thread that binds many Threads in turn
        b.threads = [r for r in b.threads if r() is not None]
    b.threads.append(weakref.ref(th))


cdef inline void _want_reaper() except *:
    """Start the reaper, from a sound context, before an OS thread other than the main one
    could need it (the main thread's end is the interpreter's)."""
    ot = _reaper[0]
    if ((ot is None or not ot.is_alive())          # (a fork leaves the child without it)
            and threading.current_thread() is not threading.main_thread()):
        _start_reaper()


def _start_reaper():
    with _reaper_lock:
        ot = _reaper[0]
        if ot is None or not ot.is_alive():
            ot = threading.Thread(target=_reap_loop, name="userblk-reaper", daemon=True)
            ot.start()
            _reaper[0] = ot


def _reap_loop():
    while True:
        item = _orphans.get()
        if item is None:
            return
        try:
            _release_orphan(*item)
        except BaseException:
            log.exception("releasing the thread of an ended OS thread failed")
        finally:
            item = None
            with _reaped:
                _reaped_count[0] += 1
                _reaped.notify_all()


def _release_orphan(Thread th, str os_name, bint app):
    """On the reaper: release what the ended OS thread `os_name` left in `th`."""
    held = [ch for ch in th._channels.values() if not (<IoChannel> ch)._released]
    names = ", ".join(f"{(<IoChannel> ch).device.name!r}" for ch in held)
    if not app:
        if held:
            log.warning("OS thread %s ended while thread %r, bound to it, held I/O channel(s) of "
                        "%s; it is unbound now: destroy() it (or bind() it elsewhere) to release "
                        "them", os_name, th.name, names)
        return
    try:
        th.bind()
    except ThreadError:
        return                        # destroyed meanwhile, or taken over by its user: theirs
    try:
        if held:
            log.warning("OS thread %s ended without put() on %d I/O channel(s) of its thread %r "
                        "(device(s) %s): releasing them; I/O still in flight completes here",
                        os_name, len(held), th.name, names)
        for ch in held:
            try:
                (<IoChannel> ch).device.channel_moved(ch)
            except Exception:
                log.exception("channel_moved of I/O device %r failed", (<IoChannel> ch).device.name)
        th.exit()
        th._destroy(False)
    finally:
        if th.os_thread == threading.get_ident() and th.t.state != THREAD_DESTROYED:
            th.unbind()


def wait_ended_threads(timeout=DEFAULT_TIMEOUT):
    """Wait until the app threads of OS threads that have ended are released (their channels put,
    their I/O completed; see `current_thread`). True when done within `timeout` seconds. Join
    an OS thread first: its end is handed over when it is joined."""
    want = _orphans_queued
    if want > _reaped_count[0]:
        _start_reaper()               # (a fork loses it)
    deadline = time.monotonic() + timeout
    with _reaped:
        while _reaped_count[0] < want:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _reaped.wait(left)
    return True


@atexit.register
def _stop_reaper():
    # nothing may be released (or polled without the GIL) while the interpreter finalizes
    ot = _reaper[0]
    if ot is not None and ot.is_alive():
        _orphans.put(None)
        ot.join(5)


cdef void _bound_from_c(thread_s* t) noexcept with gil:
    try:
        (<Thread> t.obj)._owner_name = _os_thread_name()
        _note_bound(<Thread> t.obj)
    except BaseException:
        pass


def _round_pow2(n):
    p = 2
    while p < n:
        p <<= 1
    return p


# ---- Thread --------------------------------------------------------------------------------------
@cython.no_gc_clear
cdef class Thread:
    """A lightweight thread: a message ring and pollers, advanced by `poll()`.

    `Thread(name=None, *, msg_ring_size=16384, max_msgs=32, errors="log")`. `errors="raise"`
    makes poll() re-raise the first exception of a Python poller or message (after finishing the
    iteration) instead of logging it.
    """

    def __cinit__(self, *args, **kwargs):
        self.t.obj = <PyObject*> self
        self.t.state = THREAD_DESTROYED    # until __init__ has a ring: refuses everything
        self._channels = {}
        self._errors = "log"

    def __init__(self, name=None, *, msg_ring_size=DEFAULT_MSG_RING_SIZE,
                 max_msgs=DEFAULT_MAX_MSGS, errors="log"):
        if self.t.ring != NULL:
            raise ThreadError("Thread.__init__ called twice")
        if errors not in ("log", "raise"):
            raise InvalidArgument(f"errors must be 'log' or 'raise', not {errors!r}")
        if not isinstance(msg_ring_size, int) or not 2 <= msg_ring_size <= (1 << 24):
            raise InvalidArgument(f"msg_ring_size must be an int in [2, 2**24], "
                                  f"not {msg_ring_size!r}")
        if not isinstance(max_msgs, int) or not 1 <= max_msgs <= (1 << 24):
            raise InvalidArgument(f"max_msgs must be an int in [1, 2**24], not {max_msgs!r}")
        if name is None:
            _thread_ids[0] += 1
            name = f"thread-{_thread_ids[0]}"
        self.name = str(name)
        self._errors = errors
        self.t.max_msgs = max_msgs
        self.t.ring = ring_create(_round_pow2(msg_ring_size))
        if self.t.ring == NULL:
            raise MemoryError(f"cannot allocate the message ring of thread {self.name!r}")
        atomic_store_int(&self.t.state, THREAD_RUNNING)
        _all_threads.add(self)

    def __dealloc__(self):
        cdef msg_fn fn
        cdef void* ctx
        cdef int dropped = 0
        if self.t.ring == NULL:
            return
        _unregister_all(&self.t)
        _settle(&self.t)
        _reap(&self.t)
        while ring_pop(self.t.ring, &fn, &ctx):
            if fn == _py_msg:
                Py_DECREF(<object> ctx)
            dropped += 1
        if dropped:
            try:
                log.warning("thread %r freed with %d unprocessed message(s)", self.name, dropped)
            except BaseException:
                pass
        if tls_get() == <void*> &self.t:
            tls_set(NULL)
        ring_free(self.t.ring)
        self.t.ring = NULL

    # -- identity and binding ------------------------------------------------------------------
    @staticmethod
    def current():
        """The Thread of the calling OS thread (see `current_thread`)."""
        return current_thread()

    def bind(self):
        """Bind this Thread to the calling OS thread and make it the current thread there.
        A Thread is bound to at most one OS thread; `unbind()` it there first to move it."""
        cdef unsigned long me = os_thread_id()
        cdef thread_s* cur = current_thread_ptr()
        self._check_not_destroyed()
        if cur != NULL and cur.polling:
            raise ThreadError(f"cannot bind thread {self.name!r} while thread "
                              f"{(<Thread> cur.obj).name!r} polls on this OS thread")
        if atomic_cas_ulong(&self.t.owner, 0, me):
            self._owner_name = _os_thread_name()
            _note_bound(self)
        elif atomic_load_ulong(&self.t.owner) != me:
            raise WrongThreadError(f"thread {self.name!r} is bound to OS thread "
                                   f"{self._owner_desc()}; unbind() it there before binding it to "
                                   f"OS thread {_os_thread_name()}")
        tls_set(&self.t)
        _tls.thread = self
        return self

    def unbind(self):
        """Detach this Thread from its OS thread (call it there). No-op when unbound."""
        cdef unsigned long owner = atomic_load_ulong(&self.t.owner)
        if owner == 0:
            return
        if owner != os_thread_id():
            raise WrongThreadError(f"thread {self.name!r} is bound to OS thread "
                                   f"{self._owner_desc()}; only that OS thread may unbind it, "
                                   f"not {_os_thread_name()}")
        if self.t.polling:
            raise ThreadError(f"cannot unbind thread {self.name!r} while it polls")
        atomic_store_ulong(&self.t.owner, 0)
        self._owner_name = None
        if tls_get() == <void*> &self.t:
            tls_set(NULL)
        if getattr(_tls, "thread", None) is self:
            _tls.thread = None

    @property
    def is_bound(self):
        return atomic_load_ulong(&self.t.owner) != 0

    @property
    def os_thread(self):
        """The ident (threading.get_ident()) of the OS thread this Thread is bound to, or None."""
        cdef unsigned long owner = atomic_load_ulong(&self.t.owner)
        return owner if owner else None

    @property
    def is_current(self):
        """Whether this is the current thread of the calling OS thread."""
        return current_thread_ptr() == &self.t

    cdef int _check_owner(self, str what) except -1:
        cdef unsigned long owner = atomic_load_ulong(&self.t.owner)
        if owner != 0 and owner != os_thread_id():
            raise WrongThreadError(
                f"cannot {what} thread {self.name!r} from OS thread {_os_thread_name()}: it is "
                f"bound to OS thread {self._owner_desc()} (send it a message instead)")
        return 0

    def _owner_desc(self):
        cdef unsigned long owner = atomic_load_ulong(&self.t.owner)
        if owner == 0:
            return "(none)"
        return self._owner_name or f"ident {owner}"

    def _check_not_destroyed(self):
        if self.t.state == THREAD_DESTROYED:
            raise ThreadExitedError(f"thread {self.name!r} is destroyed")

    # -- messages ------------------------------------------------------------------------------
    def send(self, fn, *args):
        """Run `fn(*args)` on this thread (with the GIL) during one of its next polls. Any OS
        thread may send; messages from one sender run in the order sent, interleaved in order with
        C messages. Raises ThreadExitedError after exit(), MessageRingFull when the ring is full."""
        cdef int rc
        if not callable(fn):
            raise InvalidCallback(f"message function {fn!r} is not callable")
        msg = (fn, args)
        Py_INCREF(msg)
        rc = thread_send(&self.t, _py_msg, <void*> msg)
        if rc != 0:
            Py_DECREF(msg)
            if rc == -ENOMEM:
                raise MessageRingFull(f"the message ring of thread {self.name!r} is full "
                                      f"({self.msg_ring_size} messages): is it being polled?")
            raise ThreadExitedError(f"thread {self.name!r} is {self.state}: it accepts no "
                                    "messages")

    @property
    def msg_ring_size(self):
        return self.t.ring.mask + 1 if self.t.ring != NULL else 0

    # -- pollers -------------------------------------------------------------------------------
    def register_poller(self, fn, period_us=0, *, name=None):
        """Run `fn()` on every iteration (period_us=0) or every `period_us` microseconds. `fn`
        returns something truthy when it did work, falsy (None) when idle. Returns the Poller
        (pause/resume/unregister). Call on the thread's OS thread (or while it is unbound)."""
        if not callable(fn):
            raise InvalidCallback(f"poller function {fn!r} is not callable")
        period = _check_period(period_us)
        cdef Poller po = Poller.__new__(Poller)
        po._fn = fn
        po.name = str(name) if name is not None else getattr(fn, "__qualname__", repr(fn))
        po.p.fn = _py_poller
        po.p.ctx = <void*> po
        po.p.period_us = period
        self._register(po)
        return po

    cdef Poller register_c_poller(self, poller_fn fn, void* ctx, uint64_t period_us=0,
                                  str name=None, object keep=None):
        """Register a C poller `fn(ctx)` (returns >0 when it did work). `keep` is kept alive as
        long as the poller is registered (e.g. the object that owns `ctx`)."""
        if fn == NULL:
            raise InvalidCallback("C poller function is NULL")
        cdef Poller po = Poller.__new__(Poller)
        po.name = name if name is not None else "c-poller"
        po._keep = keep
        po.p.fn = fn
        po.p.ctx = ctx
        po.p.period_us = period_us
        self._register(po)
        return po

    cdef int _register(self, Poller po) except -1:
        self._check_owner("register a poller on")
        if self.t.state != THREAD_RUNNING:
            raise ThreadExitedError(f"thread {self.name!r} is {self.state}: it accepts no "
                                    "pollers")
        po.p.thread = &self.t
        po.p.state = POLLER_WAITING
        po.p.where = ON_NONE
        if po.p.period_us:
            po.p.next_run_us = now_us() + po.p.period_us
        Py_INCREF(po)
        po.p.obj = <PyObject*> po
        _place(&self.t, &po.p)
        return 0

    @property
    def poller_count(self):
        """Registered pollers (active, timed and paused)."""
        return (self.t.active.count + self.t.timed.count + self.t.paused.count
                + self.t.pending.count + (1 if self.t.running != NULL
                                          and self.t.running.where == ON_NONE else 0))

    # -- polling -------------------------------------------------------------------------------
    cdef int _enter_poll(self) except -1:
        cdef unsigned long me = os_thread_id()
        cdef int state = self.t.state
        if state >= THREAD_EXITED:
            raise ThreadExitedError(f"thread {self.name!r} is {self.state}: it cannot be polled")
        if not atomic_cas_ulong(&self.t.owner, 0, me):
            if atomic_load_ulong(&self.t.owner) != me:
                raise WrongThreadError(
                    f"thread {self.name!r} is bound to OS thread {self._owner_desc()}; it cannot "
                    f"be polled from OS thread {_os_thread_name()}")
        else:
            self._owner_name = _os_thread_name()   # bound by its first poll
            _note_bound(self)
        if self.t.polling:
            raise ThreadError(f"thread {self.name!r} is already polling (poll() called from "
                              "one of its own pollers or messages)")
        return 0

    cdef int _after_poll(self) except -1:
        if self.t.pending_exc:
            exc = self._exc
            self._exc = None
            self.t.pending_exc = 0
            if exc is not None:
                raise exc
        return 0

    def poll(self, uint32_t max_msgs=0):
        """Run one iteration: up to `max_msgs` messages (0: the thread's default), the active
        pollers, then the timed pollers that are due. True if any of them did work."""
        cdef int rc
        self._enter_poll()
        with nogil:
            rc = thread_poll(&self.t, max_msgs)
        if self.t.pending_exc:
            self._after_poll()
        return rc > 0

    cdef int poll_c(self, uint32_t max_msgs) noexcept nogil:
        """poll() for C run loops: >0 work, 0 idle, -ESHUTDOWN (exited), -EPERM (bound to another
        OS thread), -EBUSY (re-entered). Like poll() it binds an unbound thread to the calling OS
        thread (taking the GIL once, to note it). Exceptions of Python callbacks wait for poll()."""
        cdef unsigned long me = os_thread_id()
        if atomic_load_int(&self.t.state) >= THREAD_EXITED:
            return -ESHUTDOWN
        if self.t.owner != me:
            if not atomic_cas_ulong(&self.t.owner, 0, me):
                return -EPERM
            _bound_from_c(&self.t)         # once per binding
        if self.t.polling:
            return -EBUSY
        return thread_poll(&self.t, max_msgs)

    def run_until(self, predicate, timeout=DEFAULT_TIMEOUT, *, uint32_t max_msgs=0,
                  spin_us=DEFAULT_SPIN_US, max_sleep_us=DEFAULT_MAX_SLEEP_US):
        """Poll until `predicate()` is truthy and return its value. Raises ThreadTimeoutError
        after `timeout` seconds (None: no limit).

        The predicate is checked after every iteration that did work; while idle, the thread is
        polled without the GIL for up to CHECK_US between checks (so other OS threads' Python
        callbacks get the GIL), and after `spin_us` of idleness it sleeps in steps up to
        `max_sleep_us`; a message to this thread wakes it at once."""
        cdef uint64_t now, until, deadline = 0, idle_since = 0, wait, sleep_us = 1
        cdef uint64_t spin = _check_period(spin_us), max_sleep = _check_period(max_sleep_us)
        cdef bint limited = timeout is not None
        cdef int rc
        if not callable(predicate):
            raise InvalidCallback(f"predicate {predicate!r} is not callable")
        if limited:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                    not timeout >= 0:
                raise InvalidArgument(f"timeout must be >= 0 seconds or None, not {timeout!r}")
            deadline = now_us() + <uint64_t> (timeout * 1e6)
        while True:
            value = predicate()
            if value:
                return value
            now = now_us()
            if limited and now >= deadline:
                raise ThreadTimeoutError(
                    f"run_until: {getattr(predicate, '__qualname__', predicate)!r} still false "
                    f"after {timeout} s polling thread {self.name!r}")
            self._enter_poll()
            if max_sleep == 0 or idle_since == 0 or now - idle_since < spin:
                until = now + CHECK_US
                if limited and until > deadline:
                    until = deadline
                with nogil:
                    rc = _poll_until_work(&self.t, max_msgs, until)
            else:
                wait = sleep_us
                if limited and deadline - now < wait:
                    wait = deadline - now
                if self.t.timed.head != NULL:
                    wait = 0 if self.t.timed.head.next_run_us <= now else min(
                        wait, self.t.timed.head.next_run_us - now)
                with nogil:
                    rc = thread_poll(&self.t, max_msgs)
                    if rc == 0 and wait and not self.t.pending_exc:
                        ring_wait(self.t.ring, wait, NULL)
                sleep_us = min(sleep_us * 2, max_sleep)
            if self.t.pending_exc:
                self._after_poll()
            if rc > 0:
                idle_since = 0
                sleep_us = 1
            elif idle_since == 0:
                idle_since = now

    def run_loop(self, spin_us=DEFAULT_SPIN_US, max_sleep_us=DEFAULT_MAX_SLEEP_US):
        """Poll on the calling OS thread, without the GIL between Python callbacks, until
        `stop_loop()` (from any OS thread) or exit(). Idle: spin `spin_us`, then sleep in steps
        up to `max_sleep_us` (0: busy-poll forever, SPDK style)."""
        cdef uint64_t spin = _check_period(spin_us), max_sleep = _check_period(max_sleep_us)
        self._enter_poll()
        with nogil:
            _run_loop(&self.t, spin, max_sleep)
        atomic_store_int(&self.t.stop, 0)  # consumed here: a stop sent before we ran still counts
        self._after_poll()

    def stop_loop(self):
        """Make `run_loop()` return after its current iteration (or at once, if it is not
        running yet). Any OS thread."""
        atomic_store_int(&self.t.stop, 1)
        if self.t.ring != NULL:
            ring_kick(self.t.ring)

    # -- lifecycle -----------------------------------------------------------------------------
    def exit(self):
        """Stop accepting messages and pollers, unregister every poller; messages already queued
        still run on the next polls, after which `is_exited` is true. Owner OS thread only."""
        self._check_owner("exit")
        if self.t.state != THREAD_RUNNING:
            return
        atomic_store_int(&self.t.state, THREAD_EXITING)
        _unregister_all(&self.t)
        if not self.t.polling:
            _reap(&self.t)
            if not ring_pending(self.t.ring) and _no_pollers(&self.t):
                atomic_store_int(&self.t.state, THREAD_EXITED)
        self.stop_loop()

    @property
    def is_exited(self):
        return atomic_load_int(&self.t.state) >= THREAD_EXITED

    @property
    def state(self):
        return _STATE_NAMES[atomic_load_int(&self.t.state)]

    def destroy(self):
        """Free an exited (or exiting) thread: run the messages still queued, release channels
        still held (with a warning: they leaked) and unbind it. Owner OS thread only."""
        self._destroy(True)

    def _destroy(self, bint warn):
        cdef int rc
        self._check_owner("destroy")
        if self.t.state == THREAD_DESTROYED:
            return
        if self.t.state == THREAD_RUNNING:
            raise ThreadError(f"thread {self.name!r} is running: call exit() before destroy()")
        if self.t.polling:
            raise ThreadError(f"cannot destroy thread {self.name!r} from inside its poll()")
        for _ in range(1000):
            if not ring_pending(self.t.ring):
                break
            with nogil:
                rc = thread_poll(&self.t, 0)
        if self._channels:
            prev = tls_get()
            tls_set(&self.t)
            try:
                for ch in list(self._channels.values()):
                    if (<IoChannel> ch)._released:
                        continue    # put meanwhile by an upper channel that held it
                    if warn:
                        log.warning("thread %r destroyed with %r still held (%d reference(s)): "
                                    "releasing it", self.name, ch, (<IoChannel> ch)._refs)
                    (<IoChannel> ch)._refs = 1
                    ch.put()
            finally:
                tls_set(prev)
        atomic_store_int(&self.t.state, THREAD_DESTROYED)
        if atomic_load_ulong(&self.t.owner) == os_thread_id():
            self.unbind()
        self._exc = None
        self.t.pending_exc = 0

    # -- errors and statistics -----------------------------------------------------------------
    cdef _on_exception(self, exc, what):
        self.t.errors += 1
        if not isinstance(exc, Exception) or self._errors == "raise":
            if self._exc is None:
                self._exc = exc
                self.t.pending_exc = 1
            elif not isinstance(exc, Exception) and isinstance(self._exc, Exception):
                self._exc = exc            # KeyboardInterrupt/SystemExit win
            return
        if self.on_error is not None:
            try:
                self.on_error(self, what, exc)
                return
            except Exception:
                log.exception("on_error handler of thread %r failed", self.name)
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._logged_in_window > 10:
                log.error("thread %r: %d more exception(s) in Python callbacks were not logged",
                          self.name, self._logged_in_window - 10)
            self._log_window = now
            self._logged_in_window = 0
        self._logged_in_window += 1
        if self._logged_in_window <= 10:
            log.error("exception in %s on thread %r (the loop continues)",
                      _describe(what), self.name, exc_info=exc)

    def stats(self):
        """Counters: iterations, busy_iterations, messages, poller_runs, errors, pollers,
        channels."""
        return {"iterations": self.t.iterations, "busy_iterations": self.t.busy_iterations,
                "messages": self.t.msgs, "poller_runs": self.t.poller_runs,
                "errors": self.t.errors, "pollers": self.poller_count,
                "channels": len(self._channels)}

    @property
    def channels(self):
        """The I/O channels this thread holds."""
        return list(self._channels.values())

    def __repr__(self):
        bound = f" on {self._owner_desc()}" if atomic_load_ulong(&self.t.owner) else ""
        return f"<Thread {self.name!r} {self.state}{bound}>"


def _describe(what):
    if isinstance(what, Poller):
        return f"poller {what.name!r}"
    return f"message {getattr(what, '__qualname__', what)!r}"


cdef uint64_t _check_period(value) except? 0xFFFFFFFFFFFFFFFF:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"a period/duration in microseconds must be a number, "
                              f"not {value!r}")
    if not value >= 0:
        raise InvalidArgument(f"a period/duration in microseconds must be >= 0, not {value!r}")
    if value > 1e15:
        raise InvalidArgument(f"period/duration of {value!r} microseconds is too large")
    return <uint64_t> value


def current_thread():
    """The Thread current on the calling OS thread: the one polling, else the one bound with
    bind(); if there is none, a new "app thread" is created and bound. Poll it (e.g. run_until)
    to run what is sent to it.

    The app thread is released when its OS thread ends: channels still held then are put (with
    a warning naming them: each thread should put() its channels before it ends), I/O in flight
    completes or fails exactly once, and the Thread is destroyed. That happens on a helper OS
    thread ("userblk-reaper") shortly after the end; `wait_ended_threads()` waits for it."""
    cdef thread_s* cur = current_thread_ptr()
    cdef Thread th
    if cur != NULL:
        return <Thread> cur.obj
    th = Thread(f"app:{threading.current_thread().name}")
    th.bind()
    (<_OsThreadBindings> _tls.bindings).app = th
    _want_reaper()
    return th


def threads():
    """The live Thread objects of this process."""
    return list(_all_threads)


def register_poller(fn, period_us=0, *, name=None):
    """`current_thread().register_poller(...)`."""
    return current_thread().register_poller(fn, period_us, name=name)


# ---- Poller --------------------------------------------------------------------------------------
cdef class Poller:
    """A registered poller. Made by Thread.register_poller (Python) or register_c_poller (C)."""

    def __init__(self, *args, **kwargs):
        raise TypeError("Pollers are made by Thread.register_poller()")

    cdef int _run_py(self) noexcept:
        try:
            return 1 if self._fn() else 0
        except BaseException as e:
            _report(self.p.thread, e, self)
            return 0

    cdef _check(self, str what):
        cdef thread_s* t = self.p.thread
        if t == NULL or self.p.state == POLLER_UNREGISTERED:
            raise ThreadError(f"poller {self.name!r} is unregistered: cannot {what} it")
        (<Thread> t.obj)._check_owner(f"{what} poller {self.name!r} of")

    def pause(self):
        """Stop running until resume(). Owner thread only; also from inside the poller."""
        self._check("pause")
        poller_pause(&self.p)

    def resume(self):
        self._check("resume")
        poller_resume(&self.p)

    def unregister(self):
        """Never run again. Owner thread only; also from inside the poller. A second call
        raises ThreadError."""
        cdef thread_s* t
        self._check("unregister")
        t = self.p.thread
        poller_unregister(&self.p)
        if not t.polling:
            _reap(t)

    @property
    def state(self):
        """"active", "paused" or "unregistered"."""
        return _POLLER_STATE_NAMES[self.p.state]

    @property
    def is_registered(self):
        return self.p.state != POLLER_UNREGISTERED

    @property
    def period_us(self):
        return self.p.period_us

    @property
    def runs(self):
        return self.p.runs

    @property
    def busy_runs(self):
        return self.p.busy

    @property
    def thread(self):
        return <Thread> self.p.thread.obj if self.p.thread != NULL else None

    def __repr__(self):
        kind = f"every {self.p.period_us} us" if self.p.period_us else "active"
        return f"<Poller {self.name!r} {kind} {self.state}>"


# ---- I/O devices and channels --------------------------------------------------------------------
cdef class IoDevice:
    """Something that hands out per-thread state (SPDK's io_device). Subclass it:

    - `channel_class`: the IoChannel (sub)class of its channels; Cython layers subclass IoChannel
      to keep per-thread C state (e.g. a queue pair) in cdef fields. Made with no arguments.
    - `create_channel_ctx(channel)`: called on the channel's thread when it is created; initialise
      the channel (cdef fields) and/or return a Python context, stored as `channel.ctx`. An
      exception fails get_io_channel() with it.
    - `destroy_channel_ctx(channel)`: called on the channel's thread when its last reference is
      put; `channel.ctx` is still set. Exceptions are logged.

    The device is registered when made; `unregister(done)` retires it: no new channels; `done()`
    runs (by message, on the thread that unregistered) once the last live channel is put.
    """
    channel_class = IoChannel

    def __cinit__(self, *args, **kwargs):
        self._channels = {}
        self.name = f"{type(self).__name__}@{id(self):x}"

    def __init__(self, name=None):
        self.name = name if name is not None else f"{type(self).__name__}@{id(self):x}"

    def create_channel_ctx(self, IoChannel channel):
        return None

    def destroy_channel_ctx(self, IoChannel channel):
        pass

    def channel_moved(self, IoChannel channel):
        """Called on the channel's thread when its Thread now runs on another OS thread (the
        one it was bound to ended, see `current_thread`), before the channel is released there.
        A device whose per-thread state belongs to an OS thread (an NVMe queue pair) hands it
        over here."""

    def get_io_channel(self):
        """The calling thread's channel for this device (see module get_io_channel)."""
        return get_io_channel(self)

    def unregister(self, done=None):
        """Retire the device. True if no channel was live (`done` is then already queued on the
        calling thread); otherwise `done()` runs when the last channel is put."""
        if self._unregistered:
            raise ThreadError(f"I/O device {self.name!r} is already unregistered")
        if done is not None and not callable(done):
            raise InvalidCallback(f"unregister done callback {done!r} is not callable")
        self._unregistered = True
        self._unregister_done = done
        if done is not None:
            self._unregister_thread = current_thread()
        if not self._channels:
            self._finish_unregister()
            return True
        return False

    def _finish_unregister(self):
        done, th = self._unregister_done, self._unregister_thread
        self._unregister_done = self._unregister_thread = None
        if done is None:
            return
        try:
            th.send(done)
        except ThreadError:
            log.warning("thread %r that unregistered I/O device %r is gone: running its done "
                        "callback here", th.name, self.name)
            done()

    @property
    def is_unregistered(self):
        return self._unregistered

    @property
    def channel_count(self):
        """Live channels (one per thread holding it)."""
        return len(self._channels)

    @property
    def channel_threads(self):
        return list(self._channels.keys())

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


cdef class IoChannel:
    """A thread's reference-counted handle to an IoDevice's per-thread state. Use it only on its
    thread: `check_thread()` raises WrongThreadError elsewhere; `on_owner()` is the nogil check."""

    def put(self):
        """Release one reference; at zero the device's destroy_channel_ctx runs (now, on this
        thread). Putting a released channel raises ThreadError."""
        self.check_thread()
        self._refs -= 1
        if self._refs == 0:
            _destroy_channel(self)

    def check_thread(self):
        """Raise unless the caller runs on this channel's thread (and the channel is live)."""
        if self._released:
            raise ThreadError(f"{self!r} was released (put() once more than get_io_channel())")
        if self.thread is None:
            raise ThreadError(f"{self!r} was not obtained from get_io_channel()")
        if not self.on_owner():
            e = WrongThreadError(
                f"I/O channel of device {self.device.name!r} belongs to thread "
                f"{self.thread.name!r} (OS thread {self.thread._owner_desc()}); it was used from "
                f"{_caller_desc()}")
            e.channel, e.owner, e.caller = self, self.thread, _caller_thread()
            raise e

    @property
    def refs(self):
        return self._refs

    @property
    def released(self):
        return self._released

    def __enter__(self):
        self.check_thread()
        return self

    def __exit__(self, *exc):
        self.put()
        return False

    def __repr__(self):
        dev = self.device.name if self.device is not None else None
        th = self.thread.name if self.thread is not None else None
        state = "released" if self._released else f"refs={self._refs}"
        return f"<{type(self).__name__} of {dev!r} on {th!r} {state}>"


def _caller_thread():
    cdef thread_s* cur = current_thread_ptr()
    return <Thread> cur.obj if cur != NULL else None


cdef _destroy_channel(IoChannel ch):
    cdef IoDevice dev = ch.device
    cdef Thread th = ch.thread
    ch._released = True
    th._channels.pop(id(dev), None)
    dev._channels.pop(th, None)
    try:
        dev.destroy_channel_ctx(ch)
    except Exception:
        log.exception("destroy_channel_ctx of I/O device %r failed on thread %r", dev.name,
                      th.name)
    if dev._unregistered and not dev._channels:
        dev._finish_unregister()


def get_io_channel(IoDevice device):
    """The calling thread's channel for `device`: created on first use (create_channel_ctx runs
    here, on this thread), otherwise one more reference to the same channel. put() it (or use it
    as a context manager) when done."""
    cdef Thread th = current_thread()
    cdef IoChannel ch
    if device._unregistered:
        raise ThreadError(f"I/O device {device.name!r} is unregistered: no new channels")
    ch = th._channels.get(id(device))
    if ch is not None:
        ch._refs += 1
        return ch
    if th.t.state != THREAD_RUNNING:
        raise ThreadExitedError(f"thread {th.name!r} is {th.state}: it cannot get I/O channels")
    cls = device.channel_class
    if not (isinstance(cls, type) and issubclass(cls, IoChannel)):
        raise InvalidArgument(f"{type(device).__name__}.channel_class must be a subclass of "
                              f"IoChannel, not {cls!r}")
    ch = cls()
    ch.device = device
    ch.thread = th
    ch._owner = &th.t
    ch._tls_off = tls_offset()
    ch._refs = 1
    # Registered before the callback so that a nested get_io_channel() returns this channel.
    th._channels[id(device)] = ch
    device._channels[th] = ch
    try:
        ch.ctx = device.create_channel_ctx(ch)
    except BaseException:
        th._channels.pop(id(device), None)
        device._channels.pop(th, None)
        ch._released = True
        ch._refs = 0
        raise
    _want_reaper()
    return ch


cdef class _ChannelWalk:
    """State of one for_each_channel: visits the threads one after the other by message."""
    cdef IoDevice device
    cdef object fn, done
    cdef Thread caller
    cdef list threads
    cdef Py_ssize_t i
    cdef bint asynchronous, waiting, finished
    cdef readonly int status

    def _step(self):
        cdef Thread th
        while self.i < len(self.threads):
            th = self.threads[self.i]
            self.i += 1
            try:
                th.send(self._visit, th)
                return
            except ThreadError:
                continue               # that thread exited: it holds no channel any more
        self._finish()

    def _visit(self, Thread th):
        ch = th._channels.get(id(self.device))
        if ch is None or (<IoChannel> ch)._released:
            self._step()
            return
        try:
            if self.asynchronous:
                self.waiting = True
                self.fn(ch, self)
                return
            rc = self.fn(ch)
        except Exception as e:
            log.error("for_each_channel function %r failed on thread %r; stopping the walk",
                      self.fn, th.name, exc_info=e)
            th.t.errors += 1
            self.waiting = False
            self.status = -_errno.EIO
            self._finish()
            return
        self._continue(rc)

    def continue_walk(self, status=0):
        """(asynchronous=True) Called by the channel function, on the channel's thread, when it
        has finished with its channel: 0 moves on, nonzero stops the walk with that status."""
        if not self.waiting or self.finished:
            raise ThreadError("continue_walk() called twice for one channel")
        self.waiting = False
        self._continue(status)

    def _continue(self, rc):
        if rc:
            self.status = int(rc)
            self._finish()
        else:
            self._step()

    def _finish(self):
        if self.finished:
            return
        self.finished = True
        if self.done is None:
            return
        try:
            self.caller.send(self.done, self.status)
        except ThreadError:
            log.warning("for_each_channel: caller thread %r is gone; running done here",
                        self.caller.name)
            self.done(self.status)


def for_each_channel(IoDevice device, fn, done=None, *, asynchronous=False):
    """Run `fn(channel)` on each thread that holds a channel of `device`, one thread after the
    other, then `done(status)` on the calling thread (by message). `fn` returning a nonzero int
    stops the walk with that status; an exception stops it with -EIO (and is logged).
    With asynchronous=True, `fn(channel, walk)` must call `walk.continue_walk(status)` on that
    thread when it is finished (possibly later, from a poller)."""
    if not callable(fn):
        raise InvalidCallback(f"channel function {fn!r} is not callable")
    if done is not None and not callable(done):
        raise InvalidCallback(f"done callback {done!r} is not callable")
    w = _ChannelWalk()
    w.device = device
    w.fn = fn
    w.done = done
    w.caller = current_thread()
    w.threads = list(device._channels.keys())
    w.asynchronous = asynchronous
    w.i = 0
    w._step()
    return w


# ---- Reactor -------------------------------------------------------------------------------------
_reactors = weakref.WeakSet()


class Reactor:
    """One Thread per OS thread, each polled by `Thread.run_loop` without the GIL.

        with Reactor(2) as r:
            r.call(0, fn, arg)      # run fn(arg) on reactor thread 0, wait for its result

    `Reactor(n, *, name="reactor", spin_us=100, max_sleep_us=1000)`: idle threads spin for
    `spin_us`, then sleep in steps up to `max_sleep_us` (0: busy-poll, one core each, always);
    messages wake them at once.
    """

    def __init__(self, n=None, *, name="reactor", spin_us=DEFAULT_SPIN_US,
                 max_sleep_us=DEFAULT_MAX_SLEEP_US, msg_ring_size=DEFAULT_MSG_RING_SIZE):
        if n is None:
            n = os.cpu_count() or 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgument(f"a reactor needs n >= 1 threads, not {n!r}")
        _check_period(spin_us)
        _check_period(max_sleep_us)
        self.name = name
        self.spin_us = spin_us
        self.max_sleep_us = max_sleep_us
        self.msg_ring_size = msg_ring_size
        self._n = n
        self._threads = [None] * n
        self._os_threads = []
        self._started = False
        self._stopped = False

    def __len__(self):
        return self._n

    def start(self):
        """Start the OS threads; returns once each has its Thread bound and polling."""
        if self._started:
            raise ThreadError(f"reactor {self.name!r} already started")
        self._started = True
        ready = [threading.Event() for _ in range(self._n)]
        errors = []
        for i in range(self._n):
            ot = threading.Thread(target=self._main, args=(i, ready[i], errors),
                                  name=f"{self.name}-{i}", daemon=True)
            self._os_threads.append(ot)
            ot.start()
        for ev in ready:
            ev.wait()
        _reactors.add(self)
        if errors:
            self.stop()
            raise errors[0]
        return self

    def _main(self, i, ready, errors):
        try:
            th = Thread(f"{self.name}-{i}", msg_ring_size=self.msg_ring_size)
            th.bind()
        except BaseException as e:
            errors.append(e)
            ready.set()
            return
        self._threads[i] = th
        ready.set()
        try:
            while True:
                try:
                    th.run_loop(self.spin_us, self.max_sleep_us)
                    break
                except Exception:      # only in errors="raise" mode, which we do not use
                    log.exception("reactor thread %r", th.name)
        finally:
            try:
                th.exit()
                th.destroy()
            except BaseException:
                log.exception("reactor thread %r did not exit cleanly", th.name)

    def thread(self, i):
        """The Thread of reactor OS thread `i`."""
        self._check_running()
        return self._threads[i]

    @property
    def threads(self):
        return list(self._threads)

    def _check_running(self):
        if not self._started:
            raise ThreadError(f"reactor {self.name!r} is not started")
        if self._stopped:
            raise ThreadExitedError(f"reactor {self.name!r} is stopped")

    def send(self, i, fn, *args):
        """Run fn(*args) on reactor thread `i`, asynchronously."""
        self.thread(i).send(fn, *args)

    def call(self, i, fn, *args, timeout=DEFAULT_TIMEOUT):
        """Run fn(*args) on reactor thread `i` and return its result (or raise its exception).
        Blocks the caller (without the GIL); from reactor thread `i` itself it calls fn directly.
        Do not call() between reactor threads in a cycle: they would wait for each other."""
        th = self.thread(i)
        if not callable(fn):
            raise InvalidCallback(f"{fn!r} is not callable")
        if th.is_current:
            return fn(*args)
        box = []
        ev = threading.Event()

        def run():
            try:
                box.append((True, fn(*args)))
            except BaseException as e:
                box.append((False, e))
            finally:
                ev.set()

        th.send(run)
        if not ev.wait(timeout):
            raise ThreadTimeoutError(f"{getattr(fn, '__qualname__', fn)!r} did not complete on "
                                     f"reactor thread {th.name!r} within {timeout} s")
        ok, value = box[0]
        if ok:
            return value
        raise value

    def stop(self, timeout=DEFAULT_TIMEOUT):
        """Stop every loop: each thread exits (queued messages still run), releases what it
        holds, and its OS thread ends. Idempotent."""
        if not self._started or self._stopped:
            self._stopped = True
            return
        self._stopped = True
        for th in self._threads:
            if th is not None:
                th.stop_loop()
        for ot in self._os_threads:
            ot.join(timeout)
            if ot.is_alive():
                raise ThreadTimeoutError(f"reactor OS thread {ot.name!r} did not stop within "
                                         f"{timeout} s (a callback is blocked?)")
        _reactors.discard(self)

    def __enter__(self):
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        state = "stopped" if self._stopped else "running" if self._started else "new"
        return f"<Reactor {self.name!r} x{self._n} {state}>"


@atexit.register
def _stop_reactors():
    # Daemon OS threads must not be polling (without the GIL) while the interpreter finalizes.
    for r in list(_reactors):
        try:
            r.stop(timeout=5)
        except BaseException:
            pass
