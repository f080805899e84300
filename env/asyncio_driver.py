"""Drive an env Thread from an asyncio event loop (the asyncio adapter of DESIGN.md).

An `AsyncioDriver` ties one event loop to the env `Thread` of the OS thread the loop runs on (by
default `current_thread()` there, so channels taken with `desc.get_io_channel()` in the loop's
coroutines belong to it). Completion callbacks run from that Thread's `poll()`, which the driver
calls from the loop, so they resolve `asyncio.Future`s on the loop's own OS thread; nothing crosses
threads.

    import asyncio
    from env.asyncio_driver import get_driver, userblk_loop

    async def main():
        async with userblk_loop() as driver:        # or get_driver(): made on first use
            fut = driver.submit(lambda cb: desc.read(ch, buf, 0, cb=cb))
            ok, status = await fut                  # the callback's arguments
            print(driver.stats())

    asyncio.run(main())

(`bdev.async_io` wraps this for the bdev layer: `await adesc.read(buf, offset)`.)

How the loop is driven:

- While operations are in flight (`inflight` > 0: counted by `submit()`, `begin()`/`end()`), the
  driver busy-polls: a callback scheduled with `loop.call_soon` polls the Thread up to
  `polls_per_tick` times, stopping at the first poll that did work, then reschedules itself. Other
  tasks, timers and I/O callbacks of the loop run between two turns, so a sleeping task wakes on
  time and a completion wakes its task on the next turn.
- When nothing is in flight it stops rescheduling itself: the next submission wakes it. The Thread
  may still receive messages (from other OS threads) and have timed pollers, which nothing would
  notice, so while idle the driver polls it from a timer: first after `idle_interval[0]` seconds,
  doubling to `idle_interval[1]` (default 1 ms -> 50 ms: 20 polls a second once settled);
  a poll that did work resets the delay. `idle_interval=None` disables that (only submissions and
  `wake()` poll), a number gives a fixed period. `wake()` (or `wake_threadsafe()` from another OS
  thread, e.g. after `thread.send(...)`) polls at the next turn of the loop.

One driver per event loop: `get_driver()` returns the running loop's, creating it on first use;
`AsyncioDriver(loop)` makes one explicitly (options), `async with userblk_loop(**options)` makes
one for the duration of a block and closes it at the end (waiting for what is in flight and
releasing the channels held through it). A driver belongs to the OS thread that created it; the
loop must run there. Drivers of loops closed without closing them are cleaned up (their channels
put) at the next `get_driver()` on that OS thread.

Low-level API for other layers: `fut = driver.submit(start, convert=None)` calls `start(cb)`,
where `start` submits an operation with a callback API, and resolves `fut` when `cb(*args)` runs:
with `convert(*args)` (default: the arguments, one or a tuple), or with the exception `convert`
raises. Cancelling `fut` does not cancel the operation: its completion still arrives exactly once
and its result is dropped. `begin()` / `end()` count an operation the caller resolves itself;
`defer(retry)` calls `retry()` after each busy poll until it returns true (operations that could
not be submitted for lack of resources wait there); `settle_future(fut, value, exc)` resolves a
future unless it was cancelled (or its loop closed); `wait_drained` / `wake_drained` let a
counter of operations in flight be awaited until it reaches 0.

The driver's Thread must stay the current Thread of the loop's OS thread (do not `bind()` another
one there while the driver is in use): channels are taken for, and used by, the current Thread.
"""
import asyncio
import collections
import contextlib
import functools
import logging
import threading

from env.errors import InvalidArgument, ThreadError, WrongThreadError
from env.thread import Thread, current_thread

log = logging.getLogger("userblk.env.asyncio")

DEFAULT_POLLS_PER_TICK = 16
DEFAULT_IDLE_INTERVAL = (0.001, 0.05)     # seconds: first idle poll, longest idle period

_tls = threading.local()                  # .drivers: {loop: AsyncioDriver} of this OS thread


def _registry():
    d = getattr(_tls, "drivers", None)
    if d is None:
        d = _tls.drivers = {}
    return d


def _purge(drivers):
    """Forget (and clean up, on this OS thread) the drivers of loops that were closed."""
    for loop in [lp for lp, drv in drivers.items() if lp.is_closed() or drv.closed]:
        drv = drivers.pop(loop)
        if not drv.closed:
            drv._abandon()


def _resolve_loop(loop):
    running = asyncio._get_running_loop()
    if loop is None:
        if running is None:
            raise ThreadError("no running event loop: call this from a coroutine (or pass loop=)")
        return running
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise InvalidArgument(f"loop must be an asyncio event loop, not {loop!r}")
    if loop.is_closed():
        raise ThreadError(f"event loop {loop!r} is closed")
    if loop.is_running() and loop is not running:
        raise WrongThreadError(f"event loop {loop!r} runs on another OS thread: make its driver "
                               "there (get_driver() from one of its coroutines)")
    return loop


def _check_interval(idle_interval):
    if idle_interval is None:
        return None, None
    if isinstance(idle_interval, (int, float)) and not isinstance(idle_interval, bool):
        lo = hi = idle_interval
    else:
        try:
            lo, hi = idle_interval
        except (TypeError, ValueError):
            raise InvalidArgument(f"idle_interval must be None, seconds, or (first, longest) "
                                  f"seconds, not {idle_interval!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise InvalidArgument(f"idle intervals must be seconds in (0, 3600], not {v!r}")
    if lo > hi:
        raise InvalidArgument(f"idle_interval: the first period {lo} exceeds the longest {hi}")
    return float(lo), float(hi)


def _default_convert(*args):
    return args[0] if len(args) == 1 else args


class AsyncioDriver:
    """Polls an env Thread from an asyncio event loop on the same OS thread (see the module).

    `AsyncioDriver(loop=None, *, thread=None, polls_per_tick=16, idle_interval=(0.001, 0.05))`:
    `loop` defaults to the running loop; `thread` to `current_thread()` (an explicit Thread is
    bound to this OS thread and becomes its current thread)."""

    def __init__(self, loop=None, *, thread=None, polls_per_tick=DEFAULT_POLLS_PER_TICK,
                 idle_interval=DEFAULT_IDLE_INTERVAL):
        loop = _resolve_loop(loop)
        if isinstance(polls_per_tick, bool) or not isinstance(polls_per_tick, int) or \
                not 1 <= polls_per_tick <= 1 << 20:
            raise InvalidArgument(f"polls_per_tick must be an int in [1, 2**20], not "
                                  f"{polls_per_tick!r}")
        self._idle_min, self._idle_max = _check_interval(idle_interval)
        if thread is not None and not isinstance(thread, Thread):
            raise InvalidArgument(f"thread must be an env.thread.Thread, not {thread!r}")
        drivers = _registry()
        _purge(drivers)
        if loop in drivers:
            raise ThreadError(f"event loop {loop!r} already has a driver: use get_driver()")
        if thread is None:
            thread = current_thread()
        else:
            thread.bind()
        self.loop = loop
        self.thread = thread
        self.polls_per_tick = polls_per_tick
        self.closed = False
        self._ident = threading.get_ident()
        self._poll = thread.poll
        self._call_soon = loop.call_soon
        self._inflight = 0
        self._tick_handle = None           # the busy turn, when scheduled
        self._idle_handle = None           # the idle timer, when scheduled
        self._idle_delay = self._idle_min
        self._deferred = collections.deque()
        self._drains = []                  # futures waiting for inflight == 0
        self._attachments = set()          # things to release on close (see attach())
        self.polls = self.busy_polls = self.ticks = self.idle_polls = self.completions = 0
        drivers[loop] = self
        self._schedule_idle()

    # -- in-flight accounting --------------------------------------------------------------------
    @property
    def inflight(self):
        """Operations submitted through this driver and not yet completed (cancelled ones
        included: their completions are still to come)."""
        return self._inflight

    def begin(self):
        """Count one more operation in flight; the driver busy-polls until `end()`."""
        self._inflight += 1
        if self._tick_handle is None:
            self._start_ticking()

    def end(self):
        """Count one operation as completed (from its completion callback)."""
        self._inflight -= 1
        self.completions += 1
        if not self._inflight and self._drains:
            self._wake_drains()

    def submit(self, start, convert=None):
        """Call `start(cb)` - which submits an operation that calls `cb(*args)` once, from this
        Thread's polling - and return a Future resolved with `convert(*args)` (default: the
        argument, or the tuple of them) or with the exception convert raises. An exception of
        `start` propagates at once and nothing is counted."""
        self.check_usable()
        fut = self.loop.create_future()
        start(functools.partial(self._generic_done, fut, convert or _default_convert))
        self.begin()
        return fut

    def _generic_done(self, fut, convert, *args):
        self.end()
        if fut.done():
            return                         # cancelled: the result is dropped
        try:
            value = convert(*args)
        except Exception as e:
            settle_future(fut, None, e)
        else:
            settle_future(fut, value, None)

    def defer(self, retry):
        """Call `retry()` after each busy poll (in the order deferred) until it returns true; a
        false return leaves it, and those deferred after it, for the next poll. The caller counts
        the operations waiting there with begin() so the driver keeps polling."""
        self._deferred.append(retry)
        if self._tick_handle is None:
            self._start_ticking()

    async def drain(self):
        """Wait until nothing is in flight through this driver."""
        await wait_drained(self._drains, self.loop.create_future, lambda: self._inflight)

    def _wake_drains(self):
        wake_drained(self._drains)

    # -- polling ---------------------------------------------------------------------------------
    def _start_ticking(self):
        if self.closed:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self._tick_handle = self._call_soon(self._tick)

    def _tick(self):
        self._tick_handle = None
        self.ticks += 1
        poll = self._poll
        n = 0
        try:
            while n < self.polls_per_tick:
                n += 1
                if poll():
                    self.busy_polls += 1
                    break
        except BaseException as e:
            self.polls += n
            self._poll_failed(e)
        else:
            self.polls += n
        if self._deferred:
            self._run_deferred()
        if self.closed:
            return
        if self._inflight or self._deferred:
            self._tick_handle = self._call_soon(self._tick)
        else:
            self._idle_delay = self._idle_min
            self._schedule_idle()

    def _run_deferred(self):
        q = self._deferred
        while q:
            try:
                finished = q[0]()
            except Exception as e:
                self.loop.call_exception_handler({"message": "userblk: a deferred submission "
                                                  "raised (it is dropped)", "exception": e})
                finished = True
            if not finished:
                return
            q.popleft()

    def _schedule_idle(self):
        if self._idle_min is None or self.closed or self._idle_handle is not None:
            return
        self._idle_handle = self.loop.call_later(self._idle_delay, self._idle_poll)

    def _idle_poll(self):
        self._idle_handle = None
        if self.closed:
            return
        self.idle_polls += 1
        self.polls += 1
        try:
            worked = self._poll()
        except BaseException as e:
            self._poll_failed(e)
            worked = False
        if worked:
            self.busy_polls += 1
            if self._idle_min is not None:
                self._idle_delay = self._idle_min
        elif self._idle_min is not None:
            self._idle_delay = min(self._idle_delay * 2, self._idle_max)
        if self._tick_handle is None and (self._inflight or self._deferred):
            self._start_ticking()          # the poll ran something that submitted
        elif self._tick_handle is None:
            self._schedule_idle()

    def _poll_failed(self, exc):
        if not isinstance(exc, Exception):
            # KeyboardInterrupt & co: keep the driver alive for whoever catches it
            if self._inflight and self._tick_handle is None and not self.closed:
                self._tick_handle = self._call_soon(self._tick)
            elif self._tick_handle is None:
                self._schedule_idle()
            raise exc
        self.loop.call_exception_handler({
            "message": f"userblk: polling thread {self.thread.name!r} from the event loop "
                       "raised", "exception": exc})
        if self.thread.is_exited:
            log.error("thread %r has exited: driver of %r stops polling (%d operation(s) in "
                      "flight will not complete)", self.thread.name, self.loop, self._inflight)
            self._stop()

    def wake(self):
        """Poll the Thread at the next turn of the loop (and restart the idle backoff): for work
        the driver does not count, e.g. I/O submitted with the callback API. Loop thread only."""
        self.check_usable()
        if self._tick_handle is not None:
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self._idle_delay = self._idle_min
        self._idle_handle = self._call_soon(self._idle_poll)

    def wake_threadsafe(self):
        """`wake()` from any OS thread (e.g. after sending the Thread a message)."""
        self.loop.call_soon_threadsafe(self._wake_if_open)

    def _wake_if_open(self):
        if not self.closed:
            self.wake()

    # -- lifecycle -------------------------------------------------------------------------------
    def check_usable(self):
        """Raise unless this driver is open and called on its OS thread."""
        if self.closed:
            raise ThreadError(f"the asyncio driver of thread {self.thread.name!r} is closed")
        if threading.get_ident() != self._ident:
            raise WrongThreadError(f"the asyncio driver of thread {self.thread.name!r} belongs "
                                   f"to OS thread {self._ident}; it was used from "
                                   f"{threading.get_ident()}")

    def attach(self, obj):
        """Remember `obj` (something with `async detach()` and `release()`, e.g. a per-loop
        channel of an async descriptor) so that closing the driver detaches it."""
        self._attachments.add(obj)

    def detach(self, obj):
        self._attachments.discard(obj)

    async def aclose(self):
        """Detach what is attached (waiting for its in-flight I/O), wait for the rest of the
        operations in flight, stop polling and forget this loop's driver. Idempotent."""
        if self.closed:
            return
        self.check_usable()
        while self._attachments:
            await next(iter(self._attachments)).detach()
        await self.drain()
        self._stop()

    def close(self):
        """Synchronous close: refused while operations are in flight (use `await aclose()`)."""
        if self.closed:
            return
        self.check_usable()
        if self._inflight:
            raise ThreadError(f"{self._inflight} operation(s) in flight: await driver.aclose()")
        for a in list(self._attachments):
            a.release()
        self._stop()

    def _stop(self):
        self.closed = True
        for h in (self._tick_handle, self._idle_handle):
            if h is not None:
                h.cancel()
        self._tick_handle = self._idle_handle = None
        drivers = getattr(_tls, "drivers", None)
        if drivers is not None and drivers.get(self.loop) is self:
            del drivers[self.loop]

    def _abandon(self):
        """The loop was closed without closing the driver: release what is attached, on this OS
        thread (the channels' own), without the loop."""
        self.closed = True
        self._tick_handle = self._idle_handle = None
        for a in list(self._attachments):
            try:
                a.release()
            except Exception:
                log.exception("releasing %r of the driver of a closed loop failed", a)
        self._attachments.clear()

    def stats(self):
        """polls (thread.poll calls), busy_polls (those that did work), ticks (busy turns),
        idle_polls, completions, inflight."""
        return {"polls": self.polls, "busy_polls": self.busy_polls, "ticks": self.ticks,
                "idle_polls": self.idle_polls, "completions": self.completions,
                "inflight": self._inflight}

    def __repr__(self):
        state = "closed" if self.closed else f"inflight={self._inflight}"
        return f"<AsyncioDriver of thread {self.thread.name!r} {state}>"


def settle_future(fut, value, exc):
    """Resolve `fut` unless it is done (cancelled); a loop closed meanwhile is not an error."""
    if fut.done():
        return
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except RuntimeError:               # its loop is closed: nobody can await it any more
        pass


async def wait_drained(waiters, create_future, inflight):
    """Wait until `inflight()` is 0. The waiting futures go in the list `waiters`; whoever counts
    the operations down calls `wake_drained(waiters)` when the count reaches 0 (and the check
    runs again: an operation may have started meanwhile)."""
    while inflight():
        fut = create_future()
        waiters.append(fut)
        await fut


def wake_drained(waiters):
    """Resolve every future `wait_drained` left in `waiters`, and empty it."""
    drains = waiters[:]
    waiters.clear()
    for fut in drains:
        settle_future(fut, None, None)


def get_driver(loop=None):
    """The driver of `loop` (default: the running loop), created with default options on first
    use. Call it on the loop's OS thread."""
    loop = _resolve_loop(loop)
    drivers = _registry()
    drv = drivers.get(loop)
    if drv is None or drv.closed:
        drv = AsyncioDriver(loop)
    return drv


def find_driver(loop=None):
    """The open driver of `loop` (default: the running loop) on this OS thread, or None."""
    if loop is None:
        loop = asyncio._get_running_loop()
    drv = _registry().get(loop)
    return drv if drv is not None and not drv.closed else None


@contextlib.asynccontextmanager
async def userblk_loop(**options):
    """`async with userblk_loop(**options) as driver:` - a driver for the running loop for the
    duration of the block (options as AsyncioDriver's), closed at the end: in-flight I/O is
    waited for and channels held through it are put. If the loop already has a driver (made by
    get_driver()), that one is used and left open; options are then refused."""
    loop = asyncio.get_running_loop()
    drv = find_driver(loop)
    own = drv is None
    if own:
        drv = AsyncioDriver(loop, **options)
    elif options:
        raise ThreadError("this event loop already has a driver: options cannot change it")
    try:
        yield drv
    finally:
        if own:
            await drv.aclose()
