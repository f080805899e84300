# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A C-level workload generator: keeps `queue_depth` I/Os in flight against a target for a fixed
time and measures IOPS, bandwidth and latency.

The target is a pair of C functions (an adapter): `submit(target, task)` starts one I/O described
by an `io_task` and `poll(target)` reaps completions, calling `workload_complete(task, ok)` for
each. The loop - choose an offset, submit, poll, tally the latency, resubmit from the completion -
runs without the GIL and creates no Python object per I/O, so it measures the driver, not Python.
The NVMe driver (`nvme.perf`) and the bdev layer provide adapters; `userblk perf` runs one
Workload per OS thread and merges their histograms.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset

from env.histogram cimport Histogram
from env.memory cimport DmaBuffer
from env.ticks cimport now_ns

from env import memory as _memory
from env.errors import InvalidArgument, UserblkError


WORKLOADS = ("read", "write", "randread", "randwrite", "rw", "randrw", "verify")
cdef enum:
    MAX_EXAMPLES = 8          # miscompares described in the results



cdef inline uint64_t xorshift(uint64_t* state) noexcept nogil:
    # xorshift64*: fast, good enough to scatter offsets
    cdef uint64_t x = state[0]
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    state[0] = x
    return x * 0x2545F4914F6CDD1DULL


cdef void workload_complete(io_task* task, bint ok) noexcept nogil:
    # `task.workload` is a borrowed pointer to the Workload: cast inline, never assign (an
    # object variable would need the GIL for its reference count)
    (<Workload> task.workload).io_done(task, ok)


cdef class Workload:
    """`Workload(queue_depth, io_size, workload, seconds, range_bytes, block_size, ...)`; an
    adapter module connects a target with `set_target`, then `run()` returns the figures."""

    def __init__(self, *, uint32_t queue_depth=32, uint32_t io_size=4096, workload="randread",
                 double seconds=1.0, uint64_t range_bytes, uint32_t block_size=512,
                 uint32_t read_pct=50, uint64_t offset_bytes=0, uint64_t seed=0x9E3779B97F4A7C15,
                 buffer_align=4096, uint32_t job=0):
        if workload not in WORKLOADS:
            raise InvalidArgument(f"workload must be one of {', '.join(WORKLOADS)}, not {workload!r}")
        if queue_depth < 1 or queue_depth > 65536:
            raise InvalidArgument(f"queue depth must be 1..65536, not {queue_depth}")
        if block_size == 0 or io_size == 0 or io_size % block_size:
            raise InvalidArgument(f"I/O size {io_size} must be a positive multiple of the block "
                                  f"size {block_size}")
        if range_bytes < io_size:
            raise InvalidArgument(f"the range ({range_bytes} bytes) is smaller than one I/O")
        if seconds <= 0:
            raise InvalidArgument("seconds must be positive")
        if read_pct > 100:
            raise InvalidArgument("read percentage must be within 0..100")
        self.queue_depth = queue_depth
        self.io_size = io_size
        self.block_size = block_size
        self.range_bytes = range_bytes - range_bytes % io_size
        self.offset_bytes = offset_bytes
        self.seconds = seconds
        self.random = workload.startswith("rand")
        kind = workload[4:] if self.random else workload
        self.read_pct = 100 if kind == "read" else 0 if kind == "write" else read_pct
        # verify (bdevperf's): every slot writes a pattern at the next offset, reads it back into
        # a cleared buffer and compares; sequential, so no two I/Os in flight share an offset
        self.verify = workload == "verify"
        self.job = job
        self.generation = seed & 0xFFFF
        if self.verify and self.range_bytes // io_size < queue_depth:
            raise InvalidArgument(f"verify needs a range of at least queue depth x I/O size "
                                  f"({queue_depth} x {io_size} bytes); it has {self.range_bytes}")
        self.rng = seed or 1
        self.histogram = Histogram()
        self.tasks = <io_task*> calloc(queue_depth, sizeof(io_task))
        if self.tasks == NULL:
            raise MemoryError()
        cdef size_t per_task = io_size * (2 if self.verify else 1)
        buf = _memory.allocate(queue_depth * per_task, max(4096, buffer_align))
        self.buffers = buf
        cdef uint32_t i
        for i in range(queue_depth):
            self.tasks[i].workload = <void*> self
            self.tasks[i].buf = (<DmaBuffer> buf).data() + <size_t> i * per_task
            self.tasks[i].wbuf = self.tasks[i].buf
            self.tasks[i].rbuf = self.tasks[i].buf + (io_size if self.verify else 0)
            self.tasks[i].length = io_size
            self.tasks[i].index = i
        memset((<DmaBuffer> buf).data(), 0xA5, queue_depth * per_task)

    def __dealloc__(self):
        free(self.tasks)

    cdef void set_target(self, submit_fn submit, poll_fn poll, void* target, object owner):
        self.submit = submit
        self.poll = poll
        self.target = target
        self.target_ref = owner

    cdef void io_done(self, io_task* task, bint ok) noexcept nogil:
        cdef uint64_t now = now_ns()
        self.outstanding -= 1
        if ok:
            self.completed += 1
            self.bytes_done += task.length
            if task.is_read:
                self.completed_reads += 1
            self.histogram.tally(now - task.start_ns)
        else:
            self.errors += 1
        if self.verify and ok:
            if task.verify_phase == 0:
                if not self.stopping:
                    # written: read it back into a cleared buffer
                    memset(task.rbuf, 0, task.length)
                    task.verify_phase = 1
                    task.buf = task.rbuf
                    task.is_read = 1
                    task.start_ns = now_ns()
                    if self.submit(self.target, task) != 0:
                        self.submit_errors += 1
                        self.stopping = True
                    else:
                        self.outstanding += 1
                return
            self.verify_done(task)
        if not self.stopping:
            self.start_io(task)

    cdef void verify_done(self, io_task* t) noexcept nogil:
        cdef uint32_t i, n
        if memcmp(t.wbuf, t.rbuf, t.length) == 0:
            return
        self.miscompares += 1
        if self.nexamples < MAX_EXAMPLES:
            i = 0
            while i < t.length and t.wbuf[i] == t.rbuf[i]:
                i += 1
            self.examples[self.nexamples][0] = t.offset
            self.examples[self.nexamples][1] = i
            self.examples[self.nexamples][2] = self.generation
            n = min(16, t.length - i)
            memcpy(&self.example_bytes[self.nexamples][0], t.wbuf + i, n)
            memcpy(&self.example_bytes[self.nexamples][16], t.rbuf + i, n)
            self.nexamples += 1

    cdef void fill_pattern(self, io_task* t) noexcept nogil:
        """A pattern no other write leaves: a fill byte, and at the start of every block its
        number, the write's generation and the job."""
        cdef uint64_t* hdr
        cdef uint32_t pos
        cdef uint64_t g
        self.generation += 1
        g = self.generation
        memset(t.wbuf, <int> ((g * 31 + self.job * 7 + (t.offset // t.length)) & 0xFF) or 0x5A,
               t.length)
        pos = 0
        while pos + 24 <= t.length:
            hdr = <uint64_t*> (t.wbuf + pos)
            hdr[0] = (t.offset + pos) // self.block_size
            hdr[1] = g
            hdr[2] = self.job
            pos += self.block_size

    cdef void start_io(self, io_task* t) noexcept nogil:
        cdef uint64_t slots = self.range_bytes // self.io_size
        cdef int rc
        if self.random and not self.verify:
            t.offset = self.offset_bytes + (xorshift(&self.rng) % slots) * self.io_size
        else:
            t.offset = self.offset_bytes + self.seq_next * self.io_size
            self.seq_next += 1
            if self.seq_next == slots:
                self.seq_next = 0
        if self.verify:
            t.verify_phase = 0
            t.buf = t.wbuf
            t.is_read = 0
            self.fill_pattern(t)
        elif self.read_pct == 100:
            t.is_read = 1
        elif self.read_pct == 0:
            t.is_read = 0
        else:
            t.is_read = (xorshift(&self.rng) % 100) < self.read_pct
        t.start_ns = now_ns()
        rc = self.submit(self.target, t)
        if rc != 0:
            self.submit_errors += 1
            self.stopping = True        # a target that refuses I/O ends the run
        else:
            self.outstanding += 1

    def stop(self):
        """Ask a running `run()` (on another thread) to finish early."""
        self.cancel = True

    @property
    def completed(self):
        """I/Os completed successfully so far in the current (or last) run(). Readable from
        another thread while run() goes on, without a lock: a progress figure, approximate."""
        return self.completed

    def run(self, double drain_timeout=30.0):
        """Run for `seconds` (without the GIL), wait for the I/Os in flight, return the figures."""
        if self.submit == NULL:
            raise UserblkError("no target: connect one with an adapter first")
        cdef uint32_t i
        cdef int rc = 0
        cdef uint64_t drain_deadline
        self.histogram.reset()
        self.completed = self.completed_reads = self.errors = self.submit_errors = 0
        self.miscompares = self.nexamples = 0
        self.bytes_done = 0
        self.stopping = False
        with nogil:
            self.start_ns = now_ns()
            self.end_ns = self.start_ns + <uint64_t> (self.seconds * 1e9)
            for i in range(self.queue_depth):
                self.start_io(&self.tasks[i])
                if self.stopping:
                    break
            while not self.stopping:
                rc = self.poll(self.target)
                if rc < 0:
                    break
                if self.cancel or now_ns() >= self.end_ns:
                    self.stopping = True
            self.end_ns = now_ns()
            drain_deadline = self.end_ns + <uint64_t> (drain_timeout * 1e9)
            while self.outstanding and rc >= 0 and now_ns() < drain_deadline:
                rc = self.poll(self.target)
        self.cancel = False      # a stop() before run() began still ends that run at once
        if rc < 0:
            raise UserblkError(f"polling the target failed: errno {-rc}")
        if self.outstanding:
            raise UserblkError(f"{self.outstanding} I/Os did not complete within {drain_timeout} s")
        return self.results()

    def results(self):
        elapsed = max((self.end_ns - self.start_ns) / 1e9, 1e-9)
        summary = self.histogram.summary()
        return {
            "seconds": elapsed,
            "ios": self.completed,
            "reads": self.completed_reads,
            "writes": self.completed - self.completed_reads,
            "errors": self.errors,
            "submit_errors": self.submit_errors,
            "iops": self.completed / elapsed,
            "mib_per_s": self.bytes_done / elapsed / (1 << 20),
            "latency_us": {k: (v / 1000.0 if k != "count" else v) for k, v in summary.items()},
            "queue_depth": self.queue_depth,
            "io_size": self.io_size,
        } | ({"miscompares": self.miscompares,
              "miscompare_examples": [self._example(i) for i in range(self.nexamples)]}
             if self.verify else {})

    def _example(self, uint32_t i):
        n = min(16, self.io_size - self.examples[i][1])
        raw = bytes(self.example_bytes[i][:32])
        return {"offset": self.examples[i][0], "byte": self.examples[i][1],
                "expected": raw[:n].hex(), "read": raw[16:16 + n].hex()}
