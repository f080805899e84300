# cython: language_level=3, boundscheck=False, wraparound=False
"""C-level pollers, messages and channels for the tests and benchmarks of env.thread.

They use env.thread the way the NVMe driver and the bdev layer do - cimported from another module,
without the GIL - so they also check that the C-level API works across modules.
"""
from libc.errno cimport ENOMEM
from libc.stdint cimport uint64_t, uintptr_t
from posix.unistd cimport usleep

from env.thread cimport (IoChannel, IoDevice, Poller, Thread, current_thread_ptr, msg_fn,
                         poller_fn, poller_pause, poller_s, poller_unregister, thread_s,
                         thread_send, now_us)


# ---- a counting C poller -------------------------------------------------------------------------
cdef struct counter_s:
    uint64_t count
    uint64_t limit              # unregister itself after this many runs (0: never)
    uint64_t pause_at           # pause itself after this many runs (0: never)
    int busy
    poller_s* handle


cdef int _count(void* ctx) noexcept nogil:
    cdef counter_s* c = <counter_s*> ctx
    c.count += 1
    if c.limit and c.count >= c.limit:
        poller_unregister(c.handle)
    elif c.pause_at and c.count == c.pause_at:
        poller_pause(c.handle)
    return c.busy


cdef class CountingPoller:
    """A C poller on `thread` that counts its runs; returns busy (1) or idle (0). With `limit` it
    unregisters itself from inside after that many runs; with `pause_at` it pauses itself."""
    cdef counter_s c
    cdef readonly Poller poller

    def __init__(self, Thread thread, uint64_t period_us=0, uint64_t limit=0, bint busy=True,
                 uint64_t pause_at=0):
        self.c.limit = limit
        self.c.pause_at = pause_at
        self.c.busy = 1 if busy else 0
        self.poller = thread.register_c_poller(_count, &self.c, period_us, "counting", self)
        self.c.handle = self.poller.handle()

    @property
    def count(self):
        return self.c.count


# ---- C messages that record their value ----------------------------------------------------------
cdef struct rec_s:
    long* values
    Py_ssize_t n
    Py_ssize_t cap


cdef struct recmsg_s:
    rec_s* rec
    long value


cdef void _record(void* ctx) noexcept nogil:
    cdef recmsg_s* m = <recmsg_s*> ctx
    if m.rec.n < m.rec.cap:
        m.rec.values[m.rec.n] = m.value
        m.rec.n += 1


cdef class Recorder:
    """Sends C messages that append a value to a C array on the receiving thread. `also` (a
    Python list) lets tests interleave Python messages appending to the same sequence."""
    cdef rec_s r
    cdef recmsg_s* msgs
    cdef Py_ssize_t sent
    cdef long[4096] storage
    cdef recmsg_s[4096] cells

    def __cinit__(self):
        self.r.values = self.storage
        self.r.cap = 4096
        self.msgs = self.cells

    def send(self, Thread thread, long value):
        """Post a C message recording `value`; returns send_c's result (0 or -errno)."""
        if self.sent >= 4096:
            raise OverflowError("recorder full")
        self.msgs[self.sent].rec = &self.r
        self.msgs[self.sent].value = value
        rc = thread.send_c(_record, &self.msgs[self.sent])
        if rc == 0:
            self.sent += 1
        return rc

    @property
    def values(self):
        return [self.r.values[i] for i in range(self.r.n)]


cdef void _noop(void* ctx) noexcept nogil:
    pass


def fill_ring(Thread thread):
    """Send no-op C messages until the ring refuses; returns (sent, first error)."""
    cdef long n = 0
    cdef int rc
    with nogil:
        while True:
            rc = thread.send_c(_noop, NULL)
            if rc != 0:
                break
            n += 1
    return n, rc


# ---- many producers ------------------------------------------------------------------------------
cdef struct sink_s:
    uint64_t last[64]           # last sequence number seen per producer
    uint64_t count
    uint64_t order_errors

cdef sink_s g_sink


cdef void _sink(void* ctx) noexcept nogil:
    cdef uintptr_t v = <uintptr_t> ctx
    cdef uintptr_t producer = v >> 40, seq = v & ((1ULL << 40) - 1)
    if seq != g_sink.last[producer] + 1:
        g_sink.order_errors += 1
    g_sink.last[producer] = seq
    g_sink.count += 1


def sink_reset():
    cdef int i
    for i in range(64):
        g_sink.last[i] = 0
    g_sink.count = 0
    g_sink.order_errors = 0


def sink_stats():
    return {"count": g_sink.count, "order_errors": g_sink.order_errors,
            "last": [g_sink.last[i] for i in range(64)]}


def flood(Thread thread, int producer, long n):
    """From the calling OS thread, without the GIL, send `n` C messages numbered 1..n for
    `producer` (< 64); retries when the ring is full. Returns how many sends found it full."""
    cdef long i = 1
    cdef long full = 0
    cdef int rc
    if not 0 <= producer < 64:
        raise ValueError("producer must be in [0, 64)")
    with nogil:
        while i <= n:
            rc = thread.send_c(_sink, <void*> ((<uintptr_t> producer << 40) | <uintptr_t> i))
            if rc == 0:
                i += 1
            elif rc == -ENOMEM:
                full += 1
                usleep(10)
            else:
                break
    return full


# ---- ping-pong between two threads ---------------------------------------------------------------
cdef struct pingpong_s:
    thread_s* a
    thread_s* b
    uint64_t count
    uint64_t target
    int done
    int error


cdef void _ping(void* ctx) noexcept nogil:            # runs on b
    cdef pingpong_s* pp = <pingpong_s*> ctx
    if thread_send(pp.a, _pong, ctx) != 0:
        pp.error = 1
        pp.done = 1


cdef void _pong(void* ctx) noexcept nogil:            # runs on a
    cdef pingpong_s* pp = <pingpong_s*> ctx
    pp.count += 1
    if pp.count >= pp.target:
        pp.done = 1
    elif thread_send(pp.b, _ping, ctx) != 0:
        pp.error = 1
        pp.done = 1


cdef class PingPong:
    """C message round trips: a -> b (`ping`) -> a (`pong`). `run(n)` is called on a's OS thread
    and polls `a` (without the GIL) until n round trips are done; `b` must be polled elsewhere
    (a reactor thread). Returns the elapsed nanoseconds."""
    cdef pingpong_s pp
    cdef Thread a, b

    def __init__(self, Thread a, Thread b):
        self.a, self.b = a, b
        self.pp.a = a.handle()
        self.pp.b = b.handle()

    def run(self, uint64_t n):
        cdef uint64_t t0, t1
        cdef int rc = 0
        self.pp.count = 0
        self.pp.target = n
        self.pp.done = 0
        self.pp.error = 0
        t0 = now_us()
        if self.b.send_c(_ping, &self.pp) != 0:
            raise RuntimeError("cannot send the first ping")
        with nogil:
            while not self.pp.done:
                rc = self.a.poll_c(0)
                if rc < 0:
                    break
        t1 = now_us()
        if rc < 0 or self.pp.error:
            raise RuntimeError(f"ping-pong failed (poll rc {rc}, error {self.pp.error})")
        return (t1 - t0) * 1000

    @property
    def count(self):
        return self.pp.count


# ---- C poll loops ----------------------------------------------------------------------------------
def poll_loop(Thread thread, long n):
    """Poll `thread` n times from C (no Python per iteration). Returns the busy iterations, or the
    first negative poll_c result."""
    cdef long i, busy = 0
    cdef int rc
    with nogil:
        for i in range(n):
            rc = thread.poll_c(0)
            if rc < 0:
                busy = rc
                break
            busy += rc
    return busy


def spin_for(Thread thread, double seconds):
    """Poll `thread` from C for `seconds` (the GIL released throughout). Returns iterations."""
    cdef uint64_t end = now_us() + <uint64_t> (seconds * 1e6)
    cdef long n = 0
    cdef int rc
    with nogil:
        while True:
            rc = thread.poll_c(0)
            if rc < 0:
                break
            n += 1
            if (n & 1023) == 0 and now_us() >= end:
                break
    if rc < 0:
        raise RuntimeError(f"poll_c returned {rc}")
    return n


def is_current(Thread thread):
    """Thread.is_current() evaluated without the GIL, from another module."""
    cdef bint r
    with nogil:
        r = thread.is_current()
    return r


def current_is_null():
    return current_thread_ptr() == NULL


# ---- a C-level I/O device and channel ------------------------------------------------------------
cdef class CChannel(IoChannel):
    """A channel keeping C state (as the NVMe bdev channel keeps its queue pair)."""
    cdef uint64_t ios
    cdef uint64_t created_on_owner


cdef class CDevice(IoDevice):
    channel_class = CChannel
    cdef public list log

    def __init__(self, name=None):
        super().__init__(name)
        self.log = []

    def create_channel_ctx(self, IoChannel channel):
        cdef CChannel ch = <CChannel> channel
        ch.ios = 0
        ch.created_on_owner = 1 if ch.on_owner() else 0
        self.log.append(("create", channel.thread.name))
        return None

    def destroy_channel_ctx(self, IoChannel channel):
        cdef CChannel ch = <CChannel> channel
        self.log.append(("destroy", channel.thread.name, ch.ios, ch.on_owner()))


def submit(CChannel ch, long n):
    """Count `n` I/Os on `ch` from C without the GIL, refusing when not on its thread (as a
    driver's submit path does). Returns the channel's total, or -1 when refused."""
    cdef long r
    with nogil:
        if not ch.on_owner():
            r = -1
        else:
            ch.ios += n
            r = <long> ch.ios
    return r


def created_on_owner(CChannel ch):
    return bool(ch.created_on_owner)


def send_and_run(Thread thread, long n, int batch=32):
    """Send `n` no-op C messages to `thread` in batches of `batch`, polling after each batch, all
    on the calling OS thread without the GIL (the cost of one C message end to end)."""
    cdef long i = 0, j
    cdef int rc = 0
    with nogil:
        while i < n:
            j = 0
            while j < batch and i < n:
                rc = thread.send_c(_noop, NULL)
                if rc != 0:
                    break
                i += 1
                j += 1
            if rc != 0:
                break
            rc = thread.poll_c(<unsigned int> batch)
            if rc < 0:
                break
            rc = 0
    if rc != 0:
        raise RuntimeError(f"send_c/poll_c returned {rc}")
    while thread.poll_c(0) > 0:
        pass
    return n
