"""Metadata operations as generators, run without blocking the thread.

A metadata operation (create, sync_md, snapshot...) is written as a generator that yields
*waitables* where it waits for something (an I/O, a lock, other operations); the `Task` running
it resumes it from that thing's completion, inside a poll of the thread. Nothing blocks: a task
that waits simply returns to the poll loop.

A waitable is a callable `w(resume)` that starts the wait and arranges for `resume(value=None,
error=None)` to be called exactly once, now or later; the generator receives `value`, or has
`error` raised at its `yield`.

    def op(self):
        yield lock.acquire()
        try:
            data = yield read_page(7)
            yield gather([write_page(1, a), write_page(2, b)])
        finally:
            lock.release()
        return data

    Task(op(), cb).start()          # cb(result, error) when it returns or raises
"""
import collections
import logging

log = logging.getLogger("userblk.blob")


class _Resume:
    __slots__ = ("task", "fired", "result", "waiting")

    def __init__(self, task):
        self.task = task
        self.fired = False
        self.result = None
        self.waiting = False

    def __call__(self, value=None, error=None):
        if self.fired:
            log.error("a waitable of task %s resumed it twice; ignored", self.task.name)
            return
        self.fired = True
        if self.waiting:
            self.task._step(value, error)
        else:
            self.result = (value, error)        # finished inside the waitable's start


class Task:
    """Runs generator `gen` to its end; `cb(result, error)` then (error None on success)."""
    __slots__ = ("gen", "cb", "name", "done")

    def __init__(self, gen, cb=None, name=None):
        self.gen = gen
        self.cb = cb
        self.name = name or getattr(gen, "__name__", "task")
        self.done = False

    def start(self):
        self._step(None, None)
        return self

    def _step(self, value, error):
        gen = self.gen
        while True:
            try:
                w = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as e:
                self._finish(e.value, None)
                return
            except BaseException as e:      # the operation's error, for its callback
                self._finish(None, e)
                return
            r = _Resume(self)
            try:
                w(r)
            except BaseException as e:      # the waitable could not start: raise it in gen
                if r.fired:
                    log.exception("waitable %r raised after resuming", w)
                value, error = None, e
                continue
            if not r.fired:
                r.waiting = True
                return
            value, error = r.result

    def _finish(self, result, error):
        self.done = True
        cb, self.cb = self.cb, None
        if cb is None:
            if error is not None:
                log.error("task %s failed", self.name, exc_info=error)
            return
        try:
            cb(result, error)
        except BaseException:
            log.exception("completion callback of %s raised", self.name)


def run(gen, cb=None, name=None):
    """Start a Task for `gen`."""
    return Task(gen, cb, name).start()


def as_waitable(gen):
    """A waitable that runs generator `gen` as a sub-task (a `yield from` that can be gathered)."""
    def start(resume):
        Task(gen, lambda v, e: resume(v, e)).start()
    return start


def value(v=None):
    """A waitable that is already done."""
    return lambda resume: resume(v, None)


def gather(waitables):
    """A waitable that starts every waitable at once and resumes with the list of their values
    when all are done, or with the first error (after all are done: nothing is left running)."""
    waitables = list(waitables)

    def start(resume):
        n = len(waitables)
        if n == 0:
            resume([], None)
            return
        out = [None] * n
        state = {"left": n, "error": None}

        def one(i):
            def done(v=None, e=None):
                out[i] = v
                if e is not None and state["error"] is None:
                    state["error"] = e
                state["left"] -= 1
                if state["left"] == 0:
                    resume(None if state["error"] else out, state["error"])
            return done

        for i, w in enumerate(waitables):
            try:
                w(one(i))
            except BaseException as e:
                one(i)(None, e)
    return start


class Event:
    """Set once (with a value or an error); waiters resume then, or at once if already set."""
    __slots__ = ("is_set", "value", "error", "_waiters")

    def __init__(self):
        self.is_set = False
        self.value = self.error = None
        self._waiters = []

    def set(self, value=None, error=None):
        if self.is_set:
            return
        self.is_set, self.value, self.error = True, value, error
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w(value, error)

    def wait(self):
        def start(resume):
            if self.is_set:
                resume(self.value, self.error)
            else:
                self._waiters.append(resume)
        return start


class Lock:
    """A FIFO lock for tasks: `yield lock.acquire()` ... `lock.release()`."""
    __slots__ = ("locked", "_waiters")

    def __init__(self):
        self.locked = False
        self._waiters = None                   # a deque once someone waits

    def acquire(self):
        def start(resume):
            if not self.locked:
                self.locked = True
                resume()
            else:
                if self._waiters is None:
                    self._waiters = collections.deque()
                self._waiters.append(resume)
        return start

    def release(self):
        if self._waiters:
            self._waiters.popleft()()          # handed over: stays locked
        else:
            self.locked = False

    @property
    def idle(self):
        return not self.locked and not self._waiters


class Semaphore:
    """At most `n` holders: `yield sem.acquire()` ... `sem.release()`."""
    __slots__ = ("free", "_waiters")

    def __init__(self, n):
        self.free = n
        self._waiters = collections.deque()

    def acquire(self):
        def start(resume):
            if self.free:
                self.free -= 1
                resume()
            else:
                self._waiters.append(resume)
        return start

    def release(self):
        if self._waiters:
            self._waiters.popleft()()
        else:
            self.free += 1


class Counter:
    """Counts operations in flight; `yield counter.idle()` waits until none is."""
    __slots__ = ("n", "_waiters")

    def __init__(self):
        self.n = 0
        self._waiters = []

    def up(self):
        self.n += 1

    def down(self):
        self.n -= 1
        if self.n == 0 and self._waiters:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w()

    def idle(self):
        def start(resume):
            if self.n == 0:
                resume()
            else:
                self._waiters.append(resume)
        return start
