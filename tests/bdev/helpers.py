"""Helpers shared by the bdev tests: a recording Python module, polling until done."""
import ctypes
import random
import threading
import time

import bdev
from bdev.core import PyBdev
from env.thread import current_thread


def poll_until(pred, timeout=10.0):
    """Poll the calling thread until `pred()` is true."""
    t = current_thread()
    deadline = time.monotonic() + timeout
    while not pred():
        t.poll()
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for completions")


class Completions:
    """Collects (ok, status) per I/O tag, in the order they come (from any thread), and checks
    each completes exactly once and never inside its submission."""

    def __init__(self):
        self.done = {}
        self.order = []
        self.lock = threading.Lock()
        self.inside_submit = False

    def cb(self, tag):
        def done(ok, status):
            assert not self.inside_submit, "a callback ran inside its submission"
            with self.lock:
                assert tag not in self.done, f"I/O {tag!r} completed twice"
                self.done[tag] = (ok, status)
                self.order.append(tag)
        return done

    def __len__(self):
        return len(self.done)

    def wait(self, ch, n, timeout=30.0):
        """Run `ch`'s thread until `n` I/Os have completed (and no more)."""
        ch.thread.run_until(lambda: len(self.done) >= n, timeout=timeout)
        assert len(self.done) == n

    def submit(self, fn, tag, *args):
        self.inside_submit = True
        try:
            fn(*args, cb=self.cb(tag))
        finally:
            self.inside_submit = False


class RecordingBdev(PyBdev):
    """A RAM disk written in Python that records every request the layer hands it, and can
    refuse some for lack of resources or complete them later."""

    def __init__(self, name, num_blocks=1024, block_size=512, *, nomem=0, defer=False,
                 io_types=("read", "write", "write_zeroes", "unmap", "flush", "reset",
                           "compare"), **kw):
        super().__init__(name, block_size=block_size, num_blocks=num_blocks, module="recording",
                         io_types=io_types, **kw)
        self.data = bytearray(num_blocks * block_size)
        self.requests = []
        self.addresses = []
        self.nomem = nomem            # refuse this many submissions with ENOMEM first
        self.defer = defer
        self.pending = []
        self.destructed = False

    def submit(self, io):
        if self.nomem:
            self.nomem -= 1
            return -12                # -ENOMEM: the layer queues and retries
        self.requests.append((io.type, io.offset_blocks, io.num_blocks))
        if io.type in ("read", "write", "compare"):
            self.addresses.extend(ctypes.addressof(ctypes.c_char.from_buffer(mv))
                                  for mv in io.buffers())
        if self.defer:
            self.pending.append(io)
            return 0
        self.execute(io)
        return 0

    def execute(self, io):
        bs = self.block_size
        off = io.offset_blocks * bs
        status = "success"
        if io.type in ("read", "write", "compare"):
            pos = off
            for mv in io.buffers():
                n = mv.nbytes
                if io.type == "read":
                    mv[:] = self.data[pos:pos + n]
                elif io.type == "write":
                    self.data[pos:pos + n] = mv
                elif bytes(mv) != bytes(self.data[pos:pos + n]):
                    status = "miscompare"
                pos += n
        elif io.type in ("write_zeroes", "unmap"):
            self.data[off:off + io.num_blocks * bs] = bytes(io.num_blocks * bs)
        io.complete(status)

    def release(self):
        pending, self.pending = self.pending, []
        for io in pending:
            self.execute(io)

    def destruct(self):
        self.destructed = True


def make_stack(name, **kw):
    b = RecordingBdev(name, **kw).register()
    desc = bdev.open_bdev(name, write=True)
    ch = desc.get_io_channel()
    return b, desc, ch


def pattern(n, seed):
    """`n` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def open_malloc(name, size):
    """A new malloc bdev, a writable descriptor and this thread's channel (`teardown` undoes)."""
    from bdev import malloc
    b = malloc.create(name, size=size)
    desc = bdev.open_bdev(name, write=True)
    return b, desc, desc.get_io_channel()


def teardown(b, desc, ch):
    ch.put()
    desc.close()
    if not b.removed:
        b.unregister()


def in_threads(worker, n=2, timeout=60):
    """Run `worker(k)` for k in 0..n-1, each on an OS thread of its own, and wait for them;
    whatever a worker raised fails the caller."""
    errors = []

    def run(k):
        try:
            worker(k)
        except BaseException as e:       # reported by the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), f"a worker is still running after {timeout} s"


def two_threads_write_read(desc, *, base, stride, count, size, timeout):
    """Two OS threads, each with its own channel of `desc` (so its own queue pair on an NVMe
    bdev), write and read back `count` disjoint ranges concurrently: thread k writes
    `size(i)` bytes at block base + k * 100 * stride + i * stride. Returns the queue pair ids
    the channels used (one per thread)."""
    barrier = threading.Barrier(2)
    qids = {}

    def worker(k):
        try:
            ch = desc.get_io_channel()
            qids[k] = ch.queue_pair.qid
            barrier.wait(timeout)                # both hold their channel at once
            for i in range(count):
                data = pattern(size(i), k * 1000 + i)
                at = (base + k * 100 * stride + i * stride) * desc.bdev.block_size
                desc.write_sync(ch, data, at)
                r = bytearray(len(data))
                desc.read_sync(ch, r, at)
                assert r == data
            barrier.wait(timeout)
            ch.put()
        except BaseException:
            barrier.abort()              # the other worker must not wait for this one
            raise

    in_threads(worker, 2, timeout * 5)
    return qids
