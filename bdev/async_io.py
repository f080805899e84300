"""Bdev I/O with `await`, on an asyncio event loop (not to be confused with `bdev.aio`, the Linux
AIO file backend).

    import asyncio
    from bdev import malloc
    from bdev.async_io import open_bdev_async

    async def main():
        async with open_bdev_async("Malloc0", write=True) as adesc:
            await adesc.write(b"x" * 4096, 0)
            buf = await adesc.read(bytearray(4096), 0)            # reads return their buffer
            bufs = [bytearray(4096) for _ in range(256)]          # 256 reads in flight at once
            await asyncio.gather(*(adesc.read(b, i * 4096) for i, b in enumerate(bufs)))
            try:
                await adesc.compare(b"y" * 4096, 0)
            except IoError as e:
                print(e.status.kind)                              # "miscompare"

    malloc.create("Malloc0", size=16 << 20)
    asyncio.run(main())

An `AsyncDescriptor` wraps a `Descriptor`. Its I/O methods mirror the Descriptor's without the
channel and the callback: `read(buf, offset, nbytes=None)`, `write`, `compare`, `readv(buffers,
offset)`, `writev`, `write_zeroes(offset, nbytes)`, `unmap`, `flush(offset=0, nbytes=None)`,
`reset()`, the block variants `read_blocks(buf, offset_blocks, num_blocks)`, `write_blocks`,
`compare_blocks`, `write_zeroes_blocks(offset_blocks, num_blocks)`, `unmap_blocks`, and
`submit(io_type, buf, offset_blocks, num_blocks)` / `submitv(io_type, buffers, offset_blocks)`.

- Each call submits the I/O at once and returns an `asyncio.Future`; awaiting it gives the buffer
  (the list of buffers for readv) for reads, None otherwise. A refused submission raises at the
  call (InvalidArgument, ReadOnlyDescriptor, UnsupportedIoType, DescriptorClosed, ...); a failed
  I/O raises `IoError` from the await, with its `IoStatus` as `.status` (`status.kind` is
  "miscompare" for a compare that differs).
- Calls must come from a coroutine (or callback) of a running event loop. The loop's driver
  (`env.asyncio_driver`, made on first use) polls the loop's OS thread's env Thread; the I/O goes
  through that Thread's channel, taken on the loop's first I/O and put when the descriptor is
  closed. One AsyncDescriptor may serve several loops on several OS threads, each with its own
  driver and channel.
- Many calls may be in flight at once (`asyncio.gather` of thousands). A submission refused only
  because the channel's I/O objects are all in use waits (in order) and is submitted as
  completions free them; its future is pending meanwhile.
- Cancelling an awaiting task (or the future) does not cancel the I/O: it still completes,
  exactly once, and its result is dropped; the buffer stays referenced (and may still be written
  by a read) until then. `await adesc.drain()` waits for those too. An I/O still waiting for an
  I/O object when cancelled is never submitted.
- `await adesc.aclose()` (or leaving `async with`) waits for the I/O in flight through it on every
  loop, puts each loop's channel on its own loop, and closes the Descriptor if it owns it
  (`open_bdev_async`, or `AsyncDescriptor(desc, own=True)`).
"""
import asyncio
import collections
import functools
import logging
import threading

from bdev.core import Descriptor, open_bdev
from bdev.errors import BdevError, DescriptorClosed, IoError
from env.asyncio_driver import get_driver, settle_future, wait_drained, wake_drained
from env.errors import InvalidArgument, ResourceExhausted, ThreadError

log = logging.getLogger("userblk.bdev.async")

_get_running_loop = asyncio.get_running_loop
_partial = functools.partial


class _LoopChannel:
    """One event loop's use of an AsyncDescriptor: the loop's driver, its thread's channel, the
    I/O in flight through it and the submissions waiting for an I/O object."""

    __slots__ = ("adesc", "driver", "loop", "ch", "inflight", "released", "_waiting", "_drains",
                 "_create_future", "_bdev_name")

    def __init__(self, adesc, driver):
        ch = adesc.descriptor.get_io_channel()
        if ch.thread is not driver.thread:
            ch.put()
            raise ThreadError(f"the current env Thread of this OS thread is {ch.thread.name!r}, "
                              f"but the event loop's driver polls {driver.thread.name!r}: bind "
                              "the driver's Thread back (or make the driver with thread=)")
        self.adesc = adesc
        self.driver = driver
        self.loop = driver.loop
        self.ch = ch
        self.inflight = 0
        self.released = False
        self._waiting = collections.deque()
        self._drains = []
        self._create_future = driver.loop.create_future
        self._bdev_name = adesc.descriptor.bdev.name
        driver.attach(self)

    # -- submission and completion -----------------------------------------------------------
    def submit(self, fn, args, result):
        """`fn(ch, *args, cb=...)` with a future resolved by the completion."""
        fut = self._create_future()
        cb = _partial(self._complete, fut, result)
        try:
            fn(self.ch, *args, cb=cb)
        except ResourceExhausted:
            if not self.ch.outstanding:
                raise                      # nothing in flight would ever free an I/O object
            self._wait(fn, args, cb, fut)
        self.inflight += 1
        self.driver.begin()
        return fut

    def _complete(self, fut, result, ok, status):
        self.inflight -= 1
        if not self.inflight and self._drains:
            self._wake_drains()
        self.driver.end()
        if fut.done():
            return                         # cancelled: the result is dropped
        try:
            if ok:
                fut.set_result(result)
            else:
                fut.set_exception(IoError(f"I/O failed: {status}", status, self._bdev_name))
        except RuntimeError:               # the loop was closed meanwhile
            pass

    def _count_done(self):
        """An accepted call that ends without a completion (never submitted)."""
        self.inflight -= 1
        if not self.inflight and self._drains:
            self._wake_drains()
        self.driver.end()

    def _wait(self, fn, args, cb, fut):
        first = not self._waiting
        self._waiting.append((fn, args, cb, fut))
        if first:
            self.driver.defer(self._retry_waiting)

    def _retry_waiting(self):
        """Submit what waits for an I/O object, in order; False while the channel is still out
        of them (the driver calls again after its next poll)."""
        q = self._waiting
        while q:
            fn, args, cb, fut = q[0]
            if self.released:
                q.popleft()
                self._count_done()
                settle_future(fut, None, DescriptorClosed(
                    f"descriptor of {self._bdev_name} was closed before this I/O could be "
                    "submitted", self._bdev_name))
                continue
            if fut.cancelled():
                q.popleft()
                self._count_done()
                continue
            try:
                fn(self.ch, *args, cb=cb)
            except ResourceExhausted as e:
                if self.ch.outstanding:
                    return False
                q.popleft()
                self._count_done()
                settle_future(fut, None, e)
                continue
            except Exception as e:         # e.g. the descriptor was closed or the bdev removed
                q.popleft()
                self._count_done()
                settle_future(fut, None, e)
                continue
            q.popleft()
        return True

    # -- draining and release -----------------------------------------------------------------
    async def drain(self):
        await wait_drained(self._drains, self._create_future, lambda: self.inflight)

    def _wake_drains(self):
        wake_drained(self._drains)

    async def detach(self):
        """(On its loop.) Wait for the I/O in flight through it, then put the channel."""
        await self.drain()
        self.release()

    def release(self):
        """(On its loop's OS thread.) Put the channel now. Waiting submissions fail; I/O still in
        flight completes while the channel is torn down (its results are delivered if the loop
        still runs)."""
        if self.released:
            return
        self.released = True
        if self._waiting:
            self._retry_waiting()
        self.driver.detach(self)
        self.adesc._forget(self)
        ch, self.ch = self.ch, None
        ch.put()

    def __repr__(self):
        return (f"<loop channel of {self._bdev_name} on thread {self.driver.thread.name!r} "
                f"inflight={self.inflight}{' released' if self.released else ''}>")


class AsyncDescriptor:
    """An open bdev for coroutines (see the module). `AsyncDescriptor(desc, *, own=False)`:
    with own=True, closing it closes `desc` too."""

    def __init__(self, desc, *, own=False):
        if not isinstance(desc, Descriptor):
            raise InvalidArgument(f"AsyncDescriptor wraps a bdev Descriptor, not {desc!r}")
        self.descriptor = desc
        self._own = bool(own)
        self._lock = threading.RLock()
        self._loops = {}                   # event loop -> _LoopChannel
        self._last = (None, None)          # (loop, _LoopChannel) of the last call: one read
        self._closing = False
        self.closed = False
        # the Descriptor's bound methods, looked up once
        self._read, self._write, self._compare = desc.read, desc.write, desc.compare
        self._readv, self._writev = desc.readv, desc.writev
        self._write_zeroes, self._unmap = desc.write_zeroes, desc.unmap
        self._read_blocks, self._write_blocks = desc.read_blocks, desc.write_blocks
        self._compare_blocks = desc.compare_blocks
        self._write_zeroes_blocks, self._unmap_blocks = desc.write_zeroes_blocks, desc.unmap_blocks
        self._submit, self._submitv = desc.submit, desc.submitv
        self._reset = desc.reset

    # -- this loop's channel -------------------------------------------------------------------
    def _lc(self):
        loop = _get_running_loop()
        last = self._last
        if last[0] is loop and not last[1].released:
            return last[1]
        return self._attach(loop)

    def _attach(self, loop):
        self._check_open()
        driver = get_driver(loop)          # may clean up drivers of closed loops (and _forget)
        with self._lock:
            self._check_open()
            lc = self._loops.get(loop)
            if lc is None or lc.released or lc.driver is not driver:
                lc = self._loops[loop] = _LoopChannel(self, driver)
            self._last = (loop, lc)
        return lc

    def _check_open(self):
        if self._closing or self.closed:
            raise DescriptorClosed(f"async descriptor of {self.bdev.name} is closed",
                                   self.bdev.name)

    def _start_closing(self):
        """Refuse new I/O from now on (on every loop: the fast path misses, _attach refuses)."""
        with self._lock:
            self._closing = True
            self._last = (None, None)
            return list(self._loops.values())

    def _forget(self, lc):
        with self._lock:
            if self._loops.get(lc.loop) is lc:
                del self._loops[lc.loop]
            if self._last[1] is lc:
                self._last = (None, None)

    def channel(self):
        """The running loop's BdevChannel of this descriptor (taken now if need be)."""
        return self._lc().ch

    # -- I/O in bytes --------------------------------------------------------------------------
    def read(self, buf, offset, nbytes=None):
        """Read `nbytes` (default: len(buf)) at byte `offset` into `buf`; the future gives buf."""
        return self._lc().submit(self._read, (buf, offset, nbytes), buf)

    def write(self, buf, offset, nbytes=None):
        return self._lc().submit(self._write, (buf, offset, nbytes), None)

    def compare(self, buf, offset, nbytes=None):
        """Compare the device with `buf`; a difference raises IoError (status.kind
        "miscompare") from the await."""
        return self._lc().submit(self._compare, (buf, offset, nbytes), None)

    def readv(self, buffers, offset):
        """Vectored read; the future gives `buffers`."""
        return self._lc().submit(self._readv, (buffers, offset), buffers)

    def writev(self, buffers, offset):
        return self._lc().submit(self._writev, (buffers, offset), None)

    def write_zeroes(self, offset, nbytes):
        return self._lc().submit(self._write_zeroes, (offset, nbytes), None)

    def unmap(self, offset, nbytes):
        return self._lc().submit(self._unmap, (offset, nbytes), None)

    def flush(self, offset=0, nbytes=None):
        """Flush the range (default: the whole bdev)."""
        if nbytes is None:
            args = ("flush", None, 0, self.descriptor.bdev.num_blocks)
        else:
            bs = self.descriptor.bdev.block_size
            if offset % bs or nbytes % bs:
                raise InvalidArgument(f"offset {offset} and length {nbytes} must be multiples of "
                                      f"the block size {bs} of {self.bdev.name}")
            args = ("flush", None, offset // bs, nbytes // bs)
        return self._lc().submit(self._submit, args, None)

    def reset(self):
        """Reset the device; I/O in flight completes (possibly aborted) before it does."""
        return self._lc().submit(self._reset, (), None)

    # -- I/O in blocks -------------------------------------------------------------------------
    def read_blocks(self, buf, offset_blocks, num_blocks):
        return self._lc().submit(self._read_blocks, (buf, offset_blocks, num_blocks), buf)

    def write_blocks(self, buf, offset_blocks, num_blocks):
        return self._lc().submit(self._write_blocks, (buf, offset_blocks, num_blocks), None)

    def compare_blocks(self, buf, offset_blocks, num_blocks):
        return self._lc().submit(self._compare_blocks, (buf, offset_blocks, num_blocks), None)

    def write_zeroes_blocks(self, offset_blocks, num_blocks):
        return self._lc().submit(self._write_zeroes_blocks, (offset_blocks, num_blocks), None)

    def unmap_blocks(self, offset_blocks, num_blocks):
        return self._lc().submit(self._unmap_blocks, (offset_blocks, num_blocks), None)

    def submit(self, io_type, buf, offset_blocks, num_blocks):
        """Any I/O type by name (Descriptor.submit); reads give `buf`."""
        result = buf if io_type == "read" else None
        return self._lc().submit(self._submit, (io_type, buf, offset_blocks, num_blocks), result)

    def submitv(self, io_type, buffers, offset_blocks):
        """Vectored read/write/compare in blocks (Descriptor.submitv); reads give `buffers`."""
        result = buffers if io_type == "read" else None
        return self._lc().submit(self._submitv, (io_type, buffers, offset_blocks), result)

    # -- waiting and closing -------------------------------------------------------------------
    @property
    def inflight(self):
        """I/O accepted through this descriptor and not completed yet, on every loop."""
        with self._lock:
            return sum(lc.inflight for lc in self._loops.values())

    async def drain(self):
        """Wait for the I/O in flight through this descriptor on the running loop (cancelled
        awaits included)."""
        lc = self._loops.get(_get_running_loop())
        if lc is not None:
            await lc.drain()

    async def aclose(self):
        """Wait for the I/O in flight through this descriptor, put every loop's channel (on its
        own loop), then close the Descriptor if this object owns it. New I/O is refused from
        the start. A channel of a loop that no longer runs stays with its driver, which puts it
        when it is cleaned up."""
        if self.closed:
            return
        loop = _get_running_loop()
        lcs = self._start_closing()
        waits = []
        for lc in lcs:
            if lc.loop is loop:
                waits.append(lc.detach())
            elif lc.loop.is_running():
                waits.append(asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(lc.detach(), lc.loop)))
            else:
                log.warning("%r: its event loop is not running; its channel stays with that "
                            "loop's driver", lc)
        try:
            if waits:
                await asyncio.gather(*waits)
        finally:
            self._finish_close()

    def close(self):
        """Synchronous close, for a descriptor with nothing in flight whose channels (if any)
        belong to the calling OS thread; otherwise use `await aclose()`."""
        if self.closed:
            return
        with self._lock:
            lcs = list(self._loops.values())
        for lc in lcs:
            if lc.inflight or lc.driver._ident != threading.get_ident():
                raise BdevError(f"{lc!r} has I/O in flight or belongs to another OS thread: "
                                "await adesc.aclose() instead", self.bdev.name)
        lcs = self._start_closing()
        for lc in lcs:
            lc.release()
        self._finish_close()

    def _finish_close(self):
        self.closed = True
        if self._own:
            self.descriptor.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
        return False

    # -- facts ---------------------------------------------------------------------------------
    @property
    def bdev(self):
        return self.descriptor.bdev

    @property
    def block_size(self):
        return self.descriptor.bdev.block_size

    @property
    def num_blocks(self):
        return self.descriptor.bdev.num_blocks

    @property
    def size(self):
        return self.descriptor.bdev.size

    @property
    def writable(self):
        return self.descriptor.writable

    def __repr__(self):
        state = "closed" if self.closed else f"loops={len(self._loops)}"
        return f"<AsyncDescriptor {self.bdev.name} {state}>"


def open_bdev_async(name, write=False, event_cb=None):
    """Open bdev `name` (see bdev.open_bdev) as an AsyncDescriptor that owns its Descriptor:
    `async with open_bdev_async("Malloc0", write=True) as adesc: ...`."""
    return AsyncDescriptor(open_bdev(name, write=write, event_cb=event_cb), own=True)
