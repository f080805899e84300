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
    uint8_t verify_phase     # verify: 0 writing the pattern, 1 reading it back
    uint64_t start_ns
    uint64_t target_data     # free for the target adapter
    char* wbuf               # verify: the pattern written
    char* rbuf               # verify: where it is read back

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
    cdef readonly bint verify
    cdef uint32_t job
    cdef uint64_t generation
    cdef uint64_t miscompares
    cdef uint64_t examples[8][3]     # (offset, first differing byte, generation) of miscompares
    cdef uint8_t example_bytes[8][32]  # 16 bytes expected, 16 read, from that byte
    cdef uint32_t nexamples
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
    cdef void verify_done(self, io_task* t) noexcept nogil
    cdef void fill_pattern(self, io_task* t) noexcept nogil
    cdef void set_target(self, submit_fn submit, poll_fn poll, void* target, object owner)
