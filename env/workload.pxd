# A C-level I/O workload generator, independent of what it drives (see workload.pyx).
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from env.histogram cimport Histogram

cdef struct io_task:
    void* workload           # the Workload (borrowed)
    char* buf                # this task's data buffer
    uint64_t offset          # byte offset of the I/O on the device
    uint32_t length          # bytes
    uint32_t index
    uint8_t is_read
    uint64_t start_ns
    uint64_t target_data     # free for the target adapter

# A target adapter: start one I/O (0 or a negative errno) and reap completions (how many, or a
# negative errno). The adapter calls `workload_complete(task, ok)` for every I/O it started.
ctypedef int (*submit_fn)(void* target, io_task* task) noexcept nogil
ctypedef int (*poll_fn)(void* target) noexcept nogil

cdef void workload_complete(io_task* task, bint ok) noexcept nogil


cdef class Workload:
    cdef submit_fn submit
    cdef poll_fn poll
    cdef void* target
    cdef object target_ref           # keeps the target's owner alive
    cdef io_task* tasks
    cdef object buffers
    cdef readonly Histogram histogram
    cdef readonly uint32_t queue_depth
    cdef readonly uint32_t io_size
    cdef readonly uint32_t block_size
    cdef readonly uint64_t range_bytes
    cdef readonly uint64_t offset_bytes
    cdef readonly double seconds
    cdef readonly bint random
    cdef readonly uint32_t read_pct
    cdef uint64_t rng
    cdef uint64_t seq_next
    cdef uint64_t completed
    cdef uint64_t completed_reads
    cdef uint64_t errors
    cdef uint64_t submit_errors
    cdef uint64_t outstanding
    cdef uint64_t bytes_done
    cdef bint stopping
    cdef volatile bint cancel
    cdef uint64_t start_ns
    cdef uint64_t end_ns

    cdef void start_io(self, io_task* t) noexcept nogil
    cdef void io_done(self, io_task* task, bint ok) noexcept nogil
    cdef void set_target(self, submit_fn submit, poll_fn poll, void* target, object owner)
