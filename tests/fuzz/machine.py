"""The bdev fuzz machine: a hypothesis RuleBasedStateMachine over the public bdev API.

One machine drives one kind of device (devices.py) through descriptors, channels and I/O, with
valid and invalid arguments (args.py), and keeps a model of what must happen:

Rules
- open (by name or Bdev object, read-only or writable, event callback good or bad; a missing or
  removed name), close (also twice), get_io_channel / put (also once too often), a channel held
  by another OS thread (worker), claim / release_claim;
- I/O in bytes (read/write/compare/write_zeroes/unmap), in blocks (*_blocks), vectored
  (readv/writev with lists, tuples, generators and non-containers), flush (whole or a range),
  reset, and the generic `Descriptor.submit` with any I/O type; I/O by the worker thread on its
  own channel (its own NVMe queue pair) beside this thread's; completions by callback, by
  waiting on that one I/O, through the blocking *_sync helpers, without a callback, or with a
  callback that is not callable;
- poll a few times, drain (poll until every I/O completed), delete the bdev (hot removal) and
  make a new one, remove it under load (I/O in flight, then delete, close and put in either
  order), free a DMA buffer an I/O is using;
- create malloc/null bdevs with one bad argument; NVMe only: attach with a bad controller
  option, and fault rules on the emulated controller (inject an error status, delay, hold).

Invariants (a violation fails the example; the runner prints the steps)
- a call the model says is valid is accepted; an invalid one raises, and what it raises is a
  userblk error (env.errors.UserblkError) of the class its fault calls for, never a raw
  OverflowError, TypeError, ZeroDivisionError... (known_bugs.py lists the tolerated exceptions);
- every accepted I/O completes exactly once, never inside its own submission, with a status
  that is None on success and an IoStatus otherwise; draining completes everything within a
  time limit, and then every live channel's `outstanding` is 0; putting a channel's last
  reference completes what was in flight on it;
- I/O that nothing could fail (no injected error, no reset or removal in flight) succeeds;
- data equals a byte-array model on devices that store data: reads return the model, compares
  succeed exactly when the data matches (and fail as "miscompare" otherwise), writes of the
  caller's buffer leave it untouched, bytes of a read buffer beyond the transfer stay untouched.
  I/Os that overlap a write in flight have no defined order: their ranges become unknown;
- hot removal: every open descriptor's event callback hears "remove" exactly once; afterwards
  I/O and channels are refused with BdevRemoved and opening the name finds nothing;
- a Python module never receives a submission after its destruct, and (once the fix is in)
  destruct waits for every channel to be put; a module breaking its contract (py-bad) still
  sees each I/O complete exactly once, a second complete() refused;
- teardown leaves nothing registered, every destruct ran, every controller detached.

Steps are written to a journal as they run (journal.py), so that a crash still shows them.
"""
import collections
import queue
import threading

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import bdev
from bdev.core import BdevChannel, IoStatus
from bdev.errors import (BdevClaimed, BdevError, BdevExists, BdevNotFound, BdevRemoved,
                         DescriptorClosed, IoError, ReadOnlyDescriptor, UnsupportedIoType)
from env.errors import (BufferBusyError, FreedBufferError, InvalidArgument, ResourceExhausted,
                        ThreadError, UserblkError, WrongThreadError)
from env.thread import current_thread
from tests.fuzz import args as A
from tests.fuzz.devices import Device
from tests.fuzz.journal import journal
from tests.fuzz.known_bugs import present

DATA_OPS = ("read", "write", "compare")
WRITE_TYPES = ("write", "write_zeroes", "unmap", "flush")
CHANGES_DATA = ("write", "write_zeroes", "unmap")
STATUS_KINDS = {"failed", "nvme_error", "miscompare", "aborted", "removed"}
DRAIN_TIMEOUT = 15.0
MAX_GENERATIONS = 3

FAULT_CLASSES = {
    "int_range": InvalidArgument, "type": InvalidArgument, "misaligned": InvalidArgument,
    "empty": InvalidArgument, "range": InvalidArgument, "buffer": InvalidArgument,
    "freed": FreedBufferError, "closed": DescriptorClosed, "removed": BdevRemoved,
    "readonly": ReadOnlyDescriptor, "unsupported": UnsupportedIoType,
    "not_channel": InvalidArgument, "other_bdev": InvalidArgument,
    "other_thread": WrongThreadError, "released": (ThreadError, BdevError),
    "badcb": InvalidArgument, "io_type": InvalidArgument, "flush_range": InvalidArgument,
    "missing": BdevNotFound, "claimed": BdevClaimed, "create": InvalidArgument,
    "exists": BdevExists,
}


def tolerated(faults):
    """Exceptions a known, not yet fixed defect raises for these faults (known_bugs.py)."""
    out = []
    if "int_range" in faults and present("negative_int_overflow"):
        out.append(OverflowError)
    if "type" in faults and present("wrong_type_typeerror"):
        out.append(TypeError)
    if "released" in faults and present("put_channel_message"):
        out.append(ResourceExhausted)
    if "create" in faults and present("malloc_create_bad_args"):
        out.extend((TypeError, ZeroDivisionError))
    return tuple(out)


STATS = collections.Counter()        # what the runs did, printed by the runner


class Violation(AssertionError):
    def __init__(self, text):
        super().__init__(text)
        journal.failure(text)


class Dev:
    """The model of one generation of the device."""

    def __init__(self, device):
        self.device = device
        self.name = device.name
        self.bdev = device.bdev
        self.bs = device.block_size
        self.nblocks = device.num_blocks
        size = self.bs * self.nblocks
        self.data = bytearray(size)             # every device starts zeroed
        self.known = bytearray(b"\1") * size    # 1 where `data` is what a read must return
        self.removed = False
        self.claim = None                       # (owner, DescRec or None)
        self.resets_inflight = 0
        self.main_channel = None                # this thread's channel object while refs > 0
        self.main_refs = 0

    def open_descs(self, descs):
        return [d for d in descs if d.dev is self and not d.closed]


class DescRec:
    def __init__(self, desc, dev, writable, events):
        self.desc = desc
        self.dev = dev
        self.writable = writable
        self.closed = False
        self.events = events                   # list the event callback appends to, or None


class ChanRec:
    def __init__(self, ch, dev):
        self.ch = ch
        self.dev = dev


class Sub:
    """One accepted (or about to be) I/O."""
    seq = 0

    def __init__(self, what, op, dev, ch, rng, may_fail):
        Sub.seq += 1
        self.id = Sub.seq
        self.what = what
        self.op = op
        self.dev = dev
        self.ch = ch
        self.rng = rng                  # (start, end) in bytes, or None
        self.may_fail = may_fail
        self.wconflict = False          # another write overlapped it in flight
        self.rconflict = False          # a write overlapped this read/compare in flight
        self.calls = 0
        self.counted = True             # False: no callback (nocb), tracked by `outstanding`
        self.data = None                # write: the bytes written
        self.expect = None              # read/compare: (model bytes, known mask) at submission
        self.buffers = []               # Buffer objects whose contents are checked / released
        self.canary = []                # (Buffer, start, bytes) to find unchanged afterwards
        self.compare_equal = None

    def overlaps(self, other):
        return (self.rng is not None and other.rng is not None and self.dev is other.dev
                and self.rng[0] < other.rng[1] and other.rng[0] < self.rng[1])


class Worker:
    """An OS thread that holds a channel of a bdev (a channel of another thread). It polls its
    env Thread between requests, as every thread holding a channel must (a reset walks the
    channels of every thread)."""

    def __init__(self):
        self.requests = queue.Queue()
        self.replies = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="fuzz-worker", daemon=True)
        self.thread.start()
        self.ch = None
        self.dev = None

    def _run(self):
        th = current_thread()
        while True:
            try:
                fn = self.requests.get(timeout=0.0005)
            except queue.Empty:
                th.poll()
                continue
            if fn is None:
                return
            try:
                self.replies.put((True, fn()))
            except BaseException as e:
                self.replies.put((False, e))

    def call(self, fn, timeout=20.0):
        self.requests.put(fn)
        ok, value = self.replies.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def stop(self):
        if self.ch is not None and not self.ch.released:
            self.call(self.ch.put)
        self.ch = None
        self.requests.put(None)
        self.thread.join(20.0)


class Owner:
    def __init__(self, i):
        self.i = i

    def __repr__(self):
        return f"owner{self.i}"


def _bytes(seed, n):
    import random
    return random.Random(seed).randbytes(n)


CHANNEL = A.weighted(
    (24, st.tuples(st.just("own"), st.integers(0, 7))),
    (1, st.just(("released",))),
    (1, st.just(("other_bdev",))),
    (1, st.just(("other_thread",))),
    (1, st.tuples(st.just("not"), st.sampled_from([None, 5, "ch"]))),
)
DESC = st.integers(0, 15)
# for I/O: mostly "good" (the newest open descriptor of the current bdev, opened if need be)
IODESC = A.weighted((8, st.just("good")), (1, DESC))
MODE = st.sampled_from(A.MODES)


class BdevMachine(RuleBasedStateMachine):
    kind = None                          # set by machine_for()

    def __init__(self):
        super().__init__()
        self.th = current_thread()
        self.violations = []
        self.devs = []
        self.cur = None
        self.gen = 0
        self.descs = []
        self.handles = []
        self.released = []               # channel objects put to zero
        self.subs = []                   # every accepted I/O
        self.nocb = []                   # (channel, Sub) of I/Os without a callback
        self.worker = None
        self.owners = [Owner(0), Owner(1)]
        self.in_submit = False
        self.seed = 0
        self.other = None
        journal.new_example(f"{self.kind} machine")

    # ---- helpers -------------------------------------------------------------------------------
    def step(self, text):
        journal.write(text)

    def violation(self, text):
        self.violations.append(text)
        journal.write(f"# VIOLATION: {text}")

    def _raise_violations(self):
        if self.violations:
            v, self.violations = self.violations, []
            raise Violation("; ".join(v))

    def _desc(self, i):
        return self.descs[i % len(self.descs)] if self.descs else None

    def _io_desc(self, spec):
        if spec != "good":
            return self._desc(spec)
        dev = self.cur
        if dev is not None:
            mine = dev.open_descs(self.descs)
            writable = [d for d in mine if d.writable]
            if writable or mine:
                return (writable or mine)[-1]
            self.step("# (implicitly) open a descriptor for this I/O")
            self.open("cur", dev.claim is None, "list")
            if dev.open_descs(self.descs):
                return dev.open_descs(self.descs)[-1]
        return self.descs[-1]

    def _channel(self, spec, dev):
        """(channel object, faults) for a channel spec against a descriptor of `dev`."""
        kind = spec[0]
        if kind == "released" and self.released:
            rec_ch, rec_dev = self.released[-1]
            faults = {"released"}
            if rec_dev is not dev:
                faults.add("other_bdev")
            return rec_ch, faults
        if kind == "other_bdev":
            return self.other[2], {"other_bdev"}
        if kind == "other_thread" and self.worker is not None and self.worker.ch is not None:
            faults = {"other_thread"}
            if self.worker.dev is not dev:
                faults.add("other_bdev")
            return self.worker.ch, faults
        if kind == "not":
            return spec[1], {"not_channel"}
        if dev.main_refs:
            return dev.main_channel, set()
        opened = [d for d in dev.open_descs(self.descs)]
        if opened and not dev.removed:
            self.step("# (implicitly) take this thread's channel for this I/O")
            self.get_channel(self.descs.index(opened[-1]))
            if dev.main_refs:
                return dev.main_channel, set()
        if not self.handles:
            return None, {"not_channel"}
        h = self.handles[(spec[1] if kind == "own" else 0) % len(self.handles)]
        faults = set()
        if h.ch.released:
            faults.add("released")
        if h.dev is not dev:
            faults.add("other_bdev")
        return h.ch, faults

    def _desc_faults(self, d, op):
        faults = set()
        if d.closed:
            faults.add("closed")
        if d.dev.removed:
            faults.add("removed")
        if op in WRITE_TYPES and not d.writable:
            faults.add("readonly")
        if not d.dev.device.supports(op):
            faults.add("unsupported")
        return faults

    def _may_fail(self, dev):
        if dev.removed or dev.resets_inflight or dev.device.can_fail:
            return True
        if dev.device.kind == "nvme":
            return any(r.action == "inject" and r.active for r in dev.device.emu.rules)
        return False

    def _call(self, what, faults, fn, ambiguous=False):
        """Run `fn` (a submission or another API call); check the outcome against `faults`.
        True when it was accepted."""
        self.step(f"{what}    # faults: {sorted(faults) or 'none'}")
        try:
            fn()
        except Violation:
            raise
        except Exception as e:
            STATS["refused"] += 1
            return self._refused(what, faults, e, ambiguous)
        STATS["accepted"] += 1
        if faults and not ambiguous:
            if faults <= {"flush_range"} and present("flush_range_unchecked"):
                return True
            raise Violation(f"{what}: accepted although {sorted(faults)}")
        return True

    def _refused(self, what, faults, e, ambiguous):
        self.step(f"#   -> {type(e).__name__}: {e}")
        if not faults and not ambiguous:
            raise Violation(f"{what}: a valid call was refused: {type(e).__name__}: {e}")
        allowed = tuple(c for f in faults
                        for c in (FAULT_CLASSES[f] if isinstance(FAULT_CLASSES[f], tuple)
                                  else (FAULT_CLASSES[f],)))
        extra = tolerated(faults)
        if extra and isinstance(e, extra):
            return False
        if not isinstance(e, UserblkError):
            raise Violation(f"{what}: raised {type(e).__module__}.{type(e).__name__} ({e}), "
                            f"not a userblk error (faults: {sorted(faults)})")
        if faults and not isinstance(e, allowed):
            raise Violation(f"{what}: raised {type(e).__name__} ({e}); the faults "
                            f"{sorted(faults)} call for {[c.__name__ for c in allowed]}")
        return False

    # ---- submissions ---------------------------------------------------------------------------
    def _unmap_anywhere(self, dev):
        """Known bug nvme_unmap_stale_context: an NVMe unmap may deallocate any block, or
        fail."""
        return dev.device.kind == "nvme" and present("nvme_unmap_stale_context")

    def _register(self, sub):
        """Mark conflicts with what is in flight on the same range."""
        if sub.op == "unmap" and self._unmap_anywhere(sub.dev):
            sub.may_fail = True
            sub.rng = (0, len(sub.dev.data))       # it may touch any block
            sub.wconflict = True
        for t in self.subs:
            if t.calls or not t.overlaps(sub):
                continue
            if sub.op in CHANGES_DATA and t.op in CHANGES_DATA:
                sub.wconflict = t.wconflict = True
            elif sub.op in CHANGES_DATA:
                t.rconflict = True
            elif t.op in CHANGES_DATA:
                sub.rconflict = True
        if sub.op == "reset" and sub.dev.device.kind == "nvme":
            for t in self.subs:            # a controller reset aborts what is in flight
                if not t.calls and t.dev is sub.dev:
                    t.may_fail = True
        self.subs.append(sub)

    def _callback(self, sub):
        def cb(ok, status):
            try:
                sub.calls += 1
                if self.in_submit:
                    self.violation(f"{sub.what}: completed inside its own submission")
                if sub.calls > 1:
                    self.violation(f"{sub.what}: completed {sub.calls} times")
                    return
                self._completed(sub, ok, status)
            except BaseException as e:       # a callback's exception is only logged
                self.violation(f"{sub.what}: checking its completion raised {e!r}")
        return cb

    def _submit(self, sub, mode, start, helper=None):
        """Submit through `start(cb)` (or the blocking `helper()`), by `mode`."""
        self._register(sub)
        STATS[f"io {sub.op} {mode}"] += 1
        if mode == "helper" and helper is not None:
            self.step(f"#   (blocking helper) {sub.what}")
            try:
                helper()
            except IoError as e:
                self._completed(sub, False, e.status)
            else:
                self._completed(sub, True, None)
            sub.calls = 1
            return
        if mode == "nocb":
            sub.counted = False
            start(None)
            self.nocb.append(sub)
            sub.buffers = []            # nothing to check; the API keeps the buffer alive
            return
        cb = self._callback(sub)
        self.in_submit = True           # a callback now runs inside its own submission
        try:
            start(cb)
        finally:
            self.in_submit = False
        if mode == "sync":
            self._wait(lambda: sub.calls > 0, f"{sub.what} (waited for alone)")

    def _completed(self, sub, ok, status):
        dev = sub.dev
        if ok:
            if status is not None:
                self.violation(f"{sub.what}: success with a status {status!r}")
        else:
            if not isinstance(status, IoStatus) or status.kind not in STATUS_KINDS:
                self.violation(f"{sub.what}: failure with status {status!r}")
            # a compare may miscompare unless the model knows the data equal and stable
            expected_miscompare = sub.op == "compare" and (sub.compare_equal is not True
                                                           or sub.rconflict)
            if not sub.may_fail and not (expected_miscompare and status.kind == "miscompare"):
                self.violation(f"{sub.what}: failed, nothing could make it fail: {status}")
        for buf, start, before in sub.canary:
            if buf.view is not None and buf.view.tobytes()[start:start + len(before)] != before:
                self.violation(f"{sub.what}: bytes of the {buf.kind} buffer outside the I/O "
                               f"(or of a write's source) were changed")
        stores = dev.device.stores_data and not dev.removed
        if sub.op == "compare" and stores and not sub.rconflict and not sub.may_fail \
                and sub.compare_equal is not None:
            if ok != sub.compare_equal:
                self.violation(f"{sub.what}: compare said {'equal' if ok else 'different'}, "
                               f"the model says {'equal' if sub.compare_equal else 'different'}")
        if sub.op == "read" and ok and stores and not sub.rconflict:
            got = b"".join(b.view.tobytes() for b in sub.buffers)
            want, known = sub.expect
            bad = [i for i in range(len(want)) if known[i] and got[i] != want[i]]
            STATS["reads checked"] += 1
            STATS["bytes checked"] += sum(known)
            if bad:
                self.violation(f"{sub.what}: read returned other data than the model at "
                               f"{len(bad)} byte(s), first at +{bad[0]} "
                               f"(block {(sub.rng[0] + bad[0]) // dev.bs})")
        if sub.op in CHANGES_DATA and sub.rng is not None:
            lo, hi = sub.rng
            if not ok or sub.wconflict:
                dev.known[lo:hi] = bytes(hi - lo)
            elif sub.op == "write":
                dev.data[lo:hi] = sub.data
                dev.known[lo:hi] = b"\1" * (hi - lo)
            else:
                dev.data[lo:hi] = bytes(hi - lo)
                zero = (dev.device.write_zeroes_reads_zero if sub.op == "write_zeroes"
                        else dev.device.unmap_reads_zero)
                dev.known[lo:hi] = (b"\1" if zero else b"\0") * (hi - lo)
        if sub.op == "reset" and dev.resets_inflight:
            dev.resets_inflight -= 1
        for b in sub.buffers:
            b.release()

    def _expect(self, sub, dev, lo, hi):
        sub.expect = (bytes(dev.data[lo:hi]), bytes(dev.known[lo:hi]))

    def _inflight(self):
        return [s for s in self.subs if s.counted and s.calls == 0]

    def _wait(self, pred, what):
        from env.errors import ThreadTimeoutError
        try:
            self.th.run_until(pred, timeout=DRAIN_TIMEOUT)
        except ThreadTimeoutError:
            lost = [s.what for s in self._inflight()]
            raise Violation(f"{what}: not complete after {DRAIN_TIMEOUT} s; I/O still "
                            f"waiting: {lost[:8]}") from None

    def _drain(self, what="drain", subs=None):
        pending = subs if subs is not None else None

        def done():
            if pending is not None:
                return all(s.calls for s in pending)
            return not self._inflight() and all(s.ch.released or s.ch.outstanding == 0
                                                for s in self.nocb)
        self._wait(done, what)
        self._raise_violations()

    # ---- set-up --------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        from bdev import malloc
        self.seed = seed
        self.step(f"setup(seed={seed})")
        self._new_device()
        Device.made += 1
        name = f"FzOther{Device.made}"
        b = malloc.create(name, num_blocks=16, block_size=512)
        d = bdev.open_bdev(name, write=True)
        self.other = (b, d, d.get_io_channel())
        # a useful start: a writable descriptor that hears events, and this thread's channel
        events = []
        dev = self.cur
        self.descs.append(DescRec(bdev.open_bdev(dev.name, write=True,
                                                 event_cb=lambda ev, b: events.append(
                                                     (ev, b.name))), dev, True, events))
        self.step(f"desc0 = open_bdev({dev.name!r}, write=True, event_cb=list)")
        self.get_channel(0)

    def _new_device(self):
        self.gen += 1
        device = Device.make(self.kind, self.gen, self.seed + self.gen)
        dev = Dev(device)
        self.devs.append(dev)
        self.cur = dev
        self.step(f"# made {device.kind} bdev {dev.name}: {dev.nblocks} x {dev.bs} B, "
                  f"io_types {dev.bdev.io_types}")

    # ---- descriptors, channels, claims -----------------------------------------------------------
    @rule(which=st.sampled_from(["cur", "cur", "cur", "obj", "old", "missing", "unhashable"]),
          write=st.booleans(), evcb=st.sampled_from(["none", "list", "list", "bad"]))
    def open(self, which, write, evcb):
        faults = set()
        dev = self.cur
        if which == "old":
            olds = [d for d in self.devs if d.removed]
            name = olds[-1].name if olds else "FzNoSuchBdev"
            faults.add("missing")
            dev = None
        elif which == "missing":
            name, dev = "FzNoSuchBdev", None
            faults.add("missing")
        elif which == "unhashable":
            name, dev = ["x"], None
            faults.add("type")
        elif dev is None:
            name = "FzNoSuchBdev"
            faults.add("missing")
        else:
            name = dev.name if which == "cur" else dev.bdev
        events = [] if evcb == "list" else None
        cb = {"none": None, "bad": 5}.get(evcb, lambda ev, b, e=events: e.append((ev, b.name)))
        if evcb == "bad":
            faults.add("badcb")
        if dev is not None and write and dev.claim is not None:
            faults.add("claimed")
        got = []
        self._call(f"open_bdev({name!r}, write={write}, event_cb={evcb})", faults,
                   lambda: got.append(bdev.open_bdev(name, write=write, event_cb=cb)))
        if got:
            self.descs.append(DescRec(got[0], dev, write, events))

    @precondition(lambda self: self.descs)
    @rule(i=DESC, skip=st.sampled_from([True, True, False]))
    def close(self, i, skip):
        if skip:                  # (not too often: most I/O wants an open descriptor)
            return self.poll(1)
        d = self._desc(i)
        dev = d.dev
        if not d.closed and present("destruct_before_io_done") and dev.removed \
                and len(dev.open_descs(self.descs)) == 1:
            # the last descriptor of a removed bdev: today destruct runs now, under I/O in flight
            self._drain("drain before the destruct (known bug destruct_before_io_done)",
                        [s for s in self._inflight() if s.dev is dev])
        self._call(f"desc{self.descs.index(d)}.close()", set(), d.desc.close)
        was_open = not d.closed
        d.closed = True
        if was_open and dev.claim is not None and dev.claim[1] is d:
            # the owner whose descriptor this was gives its claim up (claims end with it)
            dev.bdev.release_claim(dev.claim[0])
            dev.claim = None

    @precondition(lambda self: self.descs)
    @rule(i=DESC)
    def get_channel(self, i):
        d = self._desc(i)
        faults = self._desc_faults(d, "read") - {"unsupported"}
        got = []
        self._call(f"ch = desc{self.descs.index(d)}.get_io_channel()", faults,
                   lambda: got.append(d.desc.get_io_channel()))
        if not got:
            return
        ch, dev = got[0], d.dev
        if not isinstance(ch, BdevChannel):
            raise Violation(f"get_io_channel returned {ch!r}")
        if dev.main_refs and ch is not dev.main_channel:
            raise Violation("a second get_io_channel on this thread returned another channel")
        dev.main_channel = ch
        dev.main_refs += 1
        self.handles.append(ChanRec(ch, dev))
        self.step(f"#   -> handle {len(self.handles) - 1}, refs {dev.main_refs}")

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 15), skip=st.sampled_from([True, True, False]))
    def put_channel(self, i, skip):
        if skip:                  # (not too often: most I/O wants a live channel)
            return self.poll(1)
        h = self.handles[i % len(self.handles)]
        dev = h.dev
        if h.ch.released:
            self._call(f"handle{i % len(self.handles)}.put()  # released", {"released"},
                       h.ch.put)
            return
        last = dev.main_refs == 1
        on_it = [s for s in self._inflight() if s.ch is h.ch]
        if last and on_it and (dev.device.needs_clock or present("destruct_before_io_done")):
            # completions that only the test's clock delivers (or a destructed module) cannot
            # arrive inside put(): wait for them first
            self._drain("drain before the last put", on_it)
        self._call(f"handle{i % len(self.handles)}.put()", set(), h.ch.put)
        dev.main_refs -= 1
        if last:
            self.released.append((h.ch, dev))
            dev.main_channel = None
            lost = [s.what for s in on_it if s.calls == 0]
            if lost:
                raise Violation(f"put() of the last reference left I/O incomplete: {lost}")
        self._raise_violations()

    @rule(i=DESC)
    def worker_get_channel(self, i):
        if not self.descs:
            return
        if self.worker is None:
            self.worker = Worker()
        if self.worker.ch is not None:
            return
        d = self._desc(i)
        faults = self._desc_faults(d, "read") - {"unsupported"}
        got = []
        self._call(f"worker: desc{self.descs.index(d)}.get_io_channel()", faults,
                   lambda: got.append(self.worker.call(d.desc.get_io_channel)))
        if got:
            self.worker.ch, self.worker.dev = got[0], d.dev

    @precondition(lambda self: self.worker is not None and self.worker.ch is not None)
    @rule(from_main=st.booleans())
    def worker_put_channel(self, from_main):
        if from_main:
            self._call("worker_ch.put()  # from the main thread", {"other_thread"},
                       self.worker.ch.put)
            return
        self._call("worker: worker_ch.put()", set(), lambda: self.worker.call(self.worker.ch.put))
        self.worker.ch = self.worker.dev = None

    def _worker_io_possible(self):
        w, dev = self.worker, self.cur
        if w is None or w.ch is None or w.ch.released or dev is None or w.dev is not dev:
            return False
        if dev.device.kind in ("py-late", "py-bad"):
            return False            # their completions come from this thread's poller
        if dev.device.kind == "nvme":
            emu = dev.device.emu    # delays and holds need this thread's clock
            return not (emu.held or emu.delayed or any(r.active for r in emu.rules))
        return True

    @precondition(lambda self: self._worker_io_possible())
    @rule(off=st.integers(0, 127), n=st.sampled_from([1, 4, 16, 33]), fill=st.integers(0, 99))
    def worker_io(self, off, n, fill):
        """The worker writes through its own channel (its own NVMe queue pair), then reads
        back, while this thread's I/O may be in flight."""
        dev = self.cur
        writers = [d for d in dev.open_descs(self.descs) if d.writable]
        if not writers:
            return
        d, ch, bs = writers[-1], self.worker.ch, dev.bs
        n = min(n, dev.nblocks - off)
        lo, hi = off * bs, (off + n) * bs
        data = _bytes(fill, hi - lo)
        for op in ("write", "read"):
            sub = Sub(f"worker: desc{self.descs.index(d)}.{op}_sync(worker_ch, {lo}, {hi - lo})",
                      op, dev, ch, (lo, hi), self._may_fail(dev))
            buf = A.make_buffer("bytearray", hi - lo, 0,
                                (lambda k: data) if op == "write" else bytes)
            if op == "write":
                sub.data = data
            else:
                self._expect(sub, dev, lo, hi)
                sub.buffers = [buf]
            self._register(sub)
            self.step(sub.what)
            STATS[f"io {op} worker"] += 1
            try:
                self.worker.call(lambda o=op, b=buf: getattr(d.desc, o + "_sync")(ch, b.obj, lo))
            except IoError as e:
                self._completed(sub, False, e.status)
            else:
                self._completed(sub, True, None)
            sub.calls = 1
            self._raise_violations()

    @precondition(lambda self: self.cur is not None)
    @rule(owner=st.integers(0, 1), i=st.one_of(st.none(), DESC))
    def claim(self, owner, i):
        dev = self.cur
        o = self.owners[owner]
        d = self._desc(i) if i is not None else None
        faults = set()
        if dev.claim is not None and dev.claim[0] is not o:
            faults.add("claimed")
        if any(x.writable and x is not d for x in dev.open_descs(self.descs)):
            faults.add("claimed")
        ok = self._call(f"{dev.name}.claim({o}, {f'desc{self.descs.index(d)}' if d else None})",
                        faults, lambda: dev.bdev.claim(o, d.desc if d else None))
        if ok:
            dev.claim = (o, d if d is not None and d.dev is dev and not d.closed else None)
        if dev.bdev.claimed_by is not (dev.claim[0] if dev.claim else None):
            raise Violation(f"claimed_by is {dev.bdev.claimed_by!r}, the model says {dev.claim}")

    @precondition(lambda self: self.cur is not None)
    @rule(owner=st.integers(0, 1))
    def release_claim(self, owner):
        dev = self.cur
        o = self.owners[owner]
        self._call(f"{dev.name}.release_claim({o})", set(), lambda: dev.bdev.release_claim(o))
        if dev.claim is not None and dev.claim[0] is o:
            dev.claim = None

    # ---- I/O -----------------------------------------------------------------------------------
    def _buffer(self, spec, size, fill_seed):
        kind, slack, shift = spec
        if kind == "small":
            return A.make_buffer("bytearray", size // 2, 0, lambda n: _bytes(fill_seed, n))
        return A.make_buffer(kind, size + slack, shift, lambda n: _bytes(fill_seed, n))

    def _cb_arg(self, mode):
        return {"badcb": 5, "nocb": None}.get(mode)

    @precondition(lambda self: self.descs)
    @rule(op=st.sampled_from(["read", "read", "write", "write", "compare", "write_zeroes",
                              "unmap"]),
          i=IODESC, chan=CHANNEL, off=A.OFFSET,
          ln=st.one_of(A.LENGTH, st.just(("default",))), buf=A.BUFFER, mode=MODE,
          fill=st.integers(0, 2**16))
    def io_bytes(self, op, i, chan, off, ln, buf, mode, fill):
        d = self._io_desc(i)
        dev = d.dev
        bs = dev.bs
        if mode == "nocb" and op in CHANGES_DATA:
            mode = "cb"
        ch, faults = self._channel(chan, dev)
        faults |= self._desc_faults(d, op)
        offset = A.offset_bytes(off, dev.nblocks, bs)
        nbytes = None if ln[0] == "default" else A.length_bytes(ln, bs)
        if ln[0] == "default" and op not in DATA_OPS:
            nbytes = None                  # write_zeroes/unmap need a length: a type fault
        f = A.int_fault(offset)
        if f:
            faults.add(f)
        b = None
        if op in DATA_OPS:
            size = nbytes if isinstance(nbytes, int) and 0 <= nbytes <= 1 << 20 else 4 * bs
            if op == "compare" and dev.device.stores_data and fill % 3 == 0 \
                    and A.int_fault(offset) is None and isinstance(nbytes, int) \
                    and 0 <= offset and offset + size <= len(dev.data):
                b = A.make_buffer(buf[0] if buf[0] != "small" else "bytearray",
                                  size + buf[1], buf[2],
                                  lambda n: bytes(dev.data[offset:offset + n]).ljust(n, b"\0"))
            else:
                b = self._buffer(buf, size, fill)
            length = nbytes if nbytes is not None else b.api_len()
            if nbytes is None and b.kind == "none":
                faults.add("buffer")
            elif length is None:
                faults.add("type")
        else:
            length = nbytes
            if length is None:
                faults.add("type")
        if length is not None:
            f = A.int_fault(length)
            if f:
                faults.add(f)
        lo = hi = None
        if not faults & {"int_range", "type"} and length is not None:
            if offset % bs or length % bs:
                faults.add("misaligned")
            elif length == 0:
                faults.add("empty")
            elif offset // bs >= dev.nblocks or length // bs > dev.nblocks - offset // bs:
                faults.add("range")
            else:
                lo, hi = offset, offset + length
        if b is not None:
            need = length if isinstance(length, int) and length >= 0 else None
            f = b.fault(need, op == "read")
            if f:
                faults.add(f)
        if mode == "badcb":
            faults.add("badcb")
        cb_text = {"badcb": "5", "nocb": "None"}.get(mode, "cb")
        args = (f"ch[{chan}], {b.kind + '[' + str(b.api_len()) + ']' if b else ''}"
                f"{', ' if b else ''}{offset!r}, {nbytes!r}")
        what = f"desc{self.descs.index(d)}.{op}({args}, cb={cb_text})  # {mode}"
        sub = Sub(what, op, dev, ch, (lo, hi) if lo is not None else None, self._may_fail(dev))
        if faults:
            self._call(what, faults, lambda: self._api_bytes(d, op, ch, b, offset, nbytes,
                                                             self._cb_arg(mode), mode))
            if b is not None:
                b.release()
            return
        self._prepare(sub, dev, op, b, lo, hi)
        self.step(what)
        self._submit(sub, mode,
                     lambda cb: self._api_bytes(d, op, ch, b, offset, nbytes, cb, "cb"),
                     lambda: self._api_bytes(d, op, ch, b, offset, nbytes, None, "helper"))
        self._raise_violations()

    def _api_bytes(self, d, op, ch, b, offset, nbytes, cb, mode):
        desc = d.desc
        if mode == "helper":
            if op in DATA_OPS:
                return getattr(desc, op + "_sync")(ch, b.obj, offset, nbytes)
            return getattr(desc, op + "_sync")(ch, offset, nbytes)
        if op in DATA_OPS:
            return getattr(desc, op)(ch, b.obj, offset, nbytes, cb=cb)
        return getattr(desc, op)(ch, offset, nbytes, cb=cb)

    def _prepare(self, sub, dev, op, b, lo, hi):
        """Fill the submission's model facts before it is handed over."""
        if b is not None:
            sub.buffers = [b]
            if b.view is not None and op != "read":
                sub.canary.append((b, 0, b.view.tobytes()))
            elif b.view is not None and b.view.nbytes > hi - lo:
                sub.canary.append((b, hi - lo, b.view.tobytes()[hi - lo:]))
        if op == "write":
            sub.data = b.view.tobytes()[:hi - lo]
        elif op in ("read", "compare"):
            self._expect(sub, dev, lo, hi)
            if op == "compare":
                want, known = sub.expect
                probe = b.view.tobytes()[:hi - lo]
                sub.compare_equal = probe == want if all(known) else None
        elif op == "reset":
            dev.resets_inflight += 1

    @precondition(lambda self: self.descs)
    @rule(op=st.sampled_from(["read", "write", "compare", "write_zeroes", "unmap"]),
          i=IODESC, chan=CHANNEL, off=A.OFFSET, ln=A.LENGTH, buf=A.BUFFER,
          mode=st.sampled_from(["cb", "cb", "sync", "badcb", "nocb"]), fill=st.integers(0, 2**16))
    def io_blocks(self, op, i, chan, off, ln, buf, mode, fill):
        d = self._io_desc(i)
        dev = d.dev
        bs = dev.bs
        if mode == "nocb" and op in CHANGES_DATA:
            mode = "cb"
        ch, faults = self._channel(chan, dev)
        faults |= self._desc_faults(d, op)
        ob = A.offset_blocks(off, dev.nblocks)
        nb = A.length_blocks(ln)
        for v in (ob, nb):
            f = A.int_fault(v)
            if f:
                faults.add(f)
        lo = hi = None
        if not faults & {"int_range", "type"}:
            if nb == 0:
                faults.add("empty")
            elif ob >= dev.nblocks or nb > dev.nblocks - ob:
                faults.add("range")
            else:
                lo, hi = ob * bs, (ob + nb) * bs
        b = None
        if op in DATA_OPS:
            size = nb * bs if isinstance(nb, int) and 0 <= nb <= 2048 else 4 * bs
            b = self._buffer(buf, size, fill)
            f = b.fault(size if isinstance(nb, int) and nb >= 0 else None, op == "read")
            if f:
                faults.add(f)
        if mode == "badcb":
            faults.add("badcb")
        what = (f"desc{self.descs.index(d)}.{op}_blocks(ch[{chan}], "
                f"{(b.kind + ', ') if b else ''}{ob!r}, {nb!r})  # {mode}")
        sub = Sub(what, op, dev, ch, (lo, hi) if lo is not None else None, self._may_fail(dev))

        def api(cb):
            fn = getattr(d.desc, op + "_blocks")
            if op in DATA_OPS:
                return fn(ch, b.obj, ob, nb, cb=cb)
            return fn(ch, ob, nb, cb=cb)
        if faults:
            self._call(what, faults, lambda: api(self._cb_arg(mode)))
            if b is not None:
                b.release()
            return
        self._prepare(sub, dev, op, b, lo, hi)
        self.step(what)
        self._submit(sub, mode, api)
        self._raise_violations()

    @precondition(lambda self: self.descs)
    @rule(op=st.sampled_from(["readv", "writev"]), i=IODESC, chan=CHANNEL, off=A.OFFSET,
          vec=A.VECTOR, mode=st.sampled_from(["cb", "cb", "sync", "helper", "badcb"]),
          fill=st.integers(0, 2**16))
    def io_vector(self, op, i, chan, off, vec, mode, fill):
        d = self._io_desc(i)
        dev = d.dev
        bs = dev.bs
        base = op[:-1]
        ch, faults = self._channel(chan, dev)
        faults |= self._desc_faults(d, base)
        offset = A.offset_bytes(off, dev.nblocks, bs)
        f = A.int_fault(offset)
        if f:
            faults.add(f)
        container, members = vec
        bufs = [A.make_buffer(k, n, 3 if k in ("mv", "dma_mv") else 0,
                              lambda n, j=j: _bytes(fill + j, n))
                for j, (k, n) in enumerate(members)]
        if container == "empty":
            obj = []
            faults.add("buffer")
        elif container == "int":
            obj = 5
            faults.add("type")
        elif container == "bytes":
            obj = b"\0" * bs
            faults.add("type")
        else:
            for b in bufs:
                f = b.fault(None, base == "read")
                if f:
                    faults.add(f)
            total = sum(b.view.nbytes for b in bufs if b.view is not None)
            if total == 0 or total % bs:
                faults.add("buffer")
            objs = [b.obj for b in bufs]
            obj = (tuple(objs) if container == "tuple" else
                   (o for o in objs) if container == "generator" else objs)
        lo = hi = None
        if not faults & {"int_range", "type"} and offset % bs:
            faults.add("misaligned")
        if not faults:
            if offset // bs >= dev.nblocks or total // bs > dev.nblocks - offset // bs:
                faults.add("range")
            else:
                lo, hi = offset, offset + total
        if mode == "badcb":
            faults.add("badcb")
        parts = [(b.kind, n) for b, (_, n) in zip(bufs, members, strict=True)]
        what = (f"desc{self.descs.index(d)}.{op}(ch[{chan}], {container}{parts}, {offset!r})"
                f"  # {mode}")
        sub = Sub(what, base, dev, ch, (lo, hi) if lo is not None else None,
                  self._may_fail(dev))

        def api(cb):
            return getattr(d.desc, op)(ch, obj, offset, cb=cb)

        def helper():
            return getattr(d.desc, op + "_sync")(ch, obj, offset)
        if faults:
            self._call(what, faults, lambda: api(self._cb_arg(mode)))
            for b in bufs:
                b.release()
            return
        sub.buffers = bufs
        if base == "write":
            sub.data = b"".join(b.view.tobytes() for b in bufs)
            for b in bufs:
                sub.canary.append((b, 0, b.view.tobytes()))
        else:
            self._expect(sub, dev, lo, hi)
        self.step(what)
        self._submit(sub, mode, api, helper)
        self._raise_violations()

    @precondition(lambda self: self.descs)
    @rule(i=IODESC, chan=CHANNEL,
          rng=st.one_of(st.just(None), st.just(None), st.tuples(A.OFFSET, A.LENGTH)),
          mode=st.sampled_from(["cb", "cb", "sync", "helper", "nocb", "badcb"]))
    def flush(self, i, chan, rng, mode):
        d = self._io_desc(i)
        dev = d.dev
        ch, faults = self._channel(chan, dev)
        faults |= self._desc_faults(d, "flush")
        offset, nbytes = 0, None
        if rng is not None:
            if mode == "helper":
                mode = "cb"
            offset = A.offset_bytes(rng[0], dev.nblocks, dev.bs)
            nbytes = A.length_bytes(rng[1], dev.bs)
            if nbytes is None:
                # no length: the whole device (whatever the offset; that is not tried here)
                rng, offset = None, 0
        if rng is not None:
            for v in (offset, nbytes):
                f = A.int_fault(v)
                if f:
                    faults.add(f)
            if not faults & {"int_range", "type"}:
                if offset % dev.bs or nbytes % dev.bs:
                    faults.add("misaligned")
                elif (nbytes == 0 or offset // dev.bs >= dev.nblocks
                      or nbytes // dev.bs > dev.nblocks - offset // dev.bs):
                    faults.add("flush_range")
        if mode == "badcb":
            faults.add("badcb")
        what = (f"desc{self.descs.index(d)}.flush(ch[{chan}], offset={offset!r}, "
                f"nbytes={nbytes!r})  # {mode}")
        sub = Sub(what, "flush", dev, ch, None, self._may_fail(dev))

        def api(cb):
            if rng is None:
                return d.desc.flush(ch, cb)
            return d.desc.flush(ch, cb, offset, nbytes)
        if faults and not (faults == {"flush_range"} and present("flush_range_unchecked")):
            self._call(what, faults, lambda: api(self._cb_arg(mode)))
            return
        if faults:
            self.step(f"# accepted today: flush_range_unchecked; {what}")
        self.step(what)
        self._submit(sub, mode, api, lambda: d.desc.flush_sync(ch))
        self._raise_violations()

    @precondition(lambda self: self.descs)
    @rule(i=IODESC, chan=CHANNEL, mode=st.sampled_from(["cb", "cb", "sync", "helper", "nocb",
                                                      "badcb"]))
    def reset(self, i, chan, mode):
        d = self._io_desc(i)
        dev = d.dev
        ch, faults = self._channel(chan, dev)
        faults |= self._desc_faults(d, "reset")
        if mode == "badcb":
            faults.add("badcb")
        what = f"desc{self.descs.index(d)}.reset(ch[{chan}])  # {mode}"
        sub = Sub(what, "reset", dev, ch, None,
                  self._may_fail(dev) or dev.device.kind == "nvme")
        if faults:
            self._call(what, faults, lambda: d.desc.reset(ch, self._cb_arg(mode)))
            return
        self._prepare(sub, dev, "reset", None, None, None)
        self.step(what)
        self._submit(sub, mode, lambda cb: d.desc.reset(ch, cb), lambda: d.desc.reset_sync(ch))
        self._raise_violations()

    @precondition(lambda self: self.descs)
    @rule(io_type=A.weighted((6, st.sampled_from(["read", "write", "compare", "write_zeroes",
                                                  "unmap", "flush", "reset"])),
                             (2, st.integers(1, 7)),
                             (1, st.sampled_from([0, 8, 255, 256, -1, "bogus", None, 1.5,
                                                  ["read"]]))),
          i=IODESC, chan=CHANNEL, off=A.OFFSET, ln=A.LENGTH, buf=A.BUFFER,
          mode=st.sampled_from(["cb", "cb", "sync", "badcb"]), fill=st.integers(0, 2**16))
    def submit_generic(self, io_type, i, chan, off, ln, buf, mode, fill):
        """Descriptor.submit(ch, io_type, buf, offset_blocks, num_blocks, cb)."""
        from bdev.core import IO_TYPE_NAMES, IO_TYPES
        d = self._io_desc(i)
        dev = d.dev
        bs = dev.bs
        ch, faults = self._channel(chan, dev)
        op = None
        if isinstance(io_type, list):
            faults.add("type")
        elif isinstance(io_type, bool) or not isinstance(io_type, int):
            op = io_type if io_type in IO_TYPES else None
        elif io_type < 0 or io_type > 255:
            faults.add("int_range")
        else:
            op = IO_TYPE_NAMES.get(io_type)
        if op is None and not faults & {"int_range", "type"}:
            faults.add("io_type")
        if op is not None:
            faults |= self._desc_faults(d, op)
        else:
            faults |= self._desc_faults(d, "read") & {"closed", "removed"}
        ob = A.offset_blocks(off, dev.nblocks)
        nb = A.length_blocks(ln)
        for v in (ob, nb):
            f = A.int_fault(v)
            if f:
                faults.add(f)
        ambiguous = False
        lo = hi = None
        if not faults & {"int_range", "type"} and op is not None:
            bad_range = nb == 0 or ob >= dev.nblocks or nb > dev.nblocks - ob
            if op == "reset":
                ambiguous = (ob, nb) != (0, 0)    # a reset has no range: not specified
            elif op == "flush":
                if bad_range:
                    faults.add("flush_range")
            elif nb == 0:
                faults.add("empty")
            elif bad_range:
                faults.add("range")
            else:
                lo, hi = ob * bs, (ob + nb) * bs
        b = None
        if op in DATA_OPS:
            size = nb * bs if isinstance(nb, int) and 0 <= nb <= 2048 else 4 * bs
            b = self._buffer(buf, size, fill)
            f = b.fault(size if isinstance(nb, int) and nb >= 0 else None, op == "read")
            if f:
                faults.add(f)
        if mode == "badcb":
            faults.add("badcb")
        what = (f"desc{self.descs.index(d)}.submit(ch[{chan}], {io_type!r}, "
                f"{b.kind if b else None}, {ob!r}, {nb!r})  # {mode}")
        sub = Sub(what, op, dev, ch, (lo, hi) if lo is not None else None,
                  self._may_fail(dev) or (op == "reset" and dev.device.kind == "nvme"))

        def api(cb):
            return d.desc.submit(ch, io_type, b.obj if b else None, ob, nb, cb)
        if ambiguous and not faults:
            # accepting or refusing are both fine; accepted, it is an I/O like any other
            self._prepare(sub, dev, op, b, lo, hi)
            cb = self._callback(sub)
            self.in_submit = True
            try:
                accepted = self._call(what, faults, lambda: api(cb), ambiguous=True)
            finally:
                self.in_submit = False
            if accepted:
                self._register(sub)       # (a reset aborts what is in flight: after the call)
                STATS["io reset with a range"] += 1
            else:
                dev.resets_inflight -= 1
            self._raise_violations()
            return
        if faults and not (faults == {"flush_range"} and present("flush_range_unchecked")):
            self._call(what, faults, lambda: api(self._cb_arg(mode)))
            if b is not None:
                b.release()
            return
        self._prepare(sub, dev, op, b, lo, hi)
        self.step(what)
        self._submit(sub, mode, api)
        self._raise_violations()

    # the same I/O rules once more each: hypothesis picks rules uniformly, and I/O is the point
    @precondition(lambda self: self.descs)
    @rule(op=st.sampled_from(["read", "write", "write", "compare", "unmap", "write_zeroes"]),
          i=IODESC, chan=CHANNEL, off=A.OFFSET, ln=A.LENGTH, buf=A.BUFFER,
          mode=MODE, fill=st.integers(0, 2**16))
    def io_bytes_again(self, op, i, chan, off, ln, buf, mode, fill):
        self.io_bytes(op, i, chan, off, ln, buf, mode, fill)

    @precondition(lambda self: self.descs)
    @rule(op=st.sampled_from(["read", "write", "compare", "write_zeroes", "unmap"]),
          i=IODESC, chan=CHANNEL, off=A.OFFSET, ln=A.LENGTH, buf=A.BUFFER,
          mode=st.sampled_from(["cb", "cb", "sync"]), fill=st.integers(0, 2**16))
    def io_blocks_again(self, op, i, chan, off, ln, buf, mode, fill):
        self.io_blocks(op, i, chan, off, ln, buf, mode, fill)

    @rule()
    def free_busy_dma(self):
        """Freeing a DmaBuffer an I/O uses is refused (BufferBusyError); the I/O goes on."""
        for s in self._inflight():
            if "generator[" in s.what and present("vector_iterator_refs"):
                continue
            for b in s.buffers:
                if b.kind == "dma" and b.dma is not None and not b.dma.freed:
                    size = b.view.nbytes
                    b.view.release()
                    for k in b.keep:
                        k.release()
                    try:
                        self.step(f"free() the DmaBuffer of [{s.what}] while it is in flight")
                        b.dma.free()
                    except BufferBusyError:
                        pass
                    except Exception as e:
                        raise Violation(f"freeing a busy DmaBuffer raised {e!r}, not "
                                        "BufferBusyError") from None
                    else:
                        raise Violation(f"a DmaBuffer was freed while [{s.what}] used it")
                    mv = memoryview(b.dma)
                    b.keep = (mv,)
                    b.view = mv[:size]
                    b.canary = []
                    s.canary = [c for c in s.canary if c[0] is not b]
                    return

    # ---- progress ------------------------------------------------------------------------------
    @rule(n=st.integers(1, 4))
    def poll(self, n):
        self.step(f"thread.poll() x {n}")
        for _ in range(n):
            self.th.poll()
        self._raise_violations()

    @rule()
    def drain(self):
        self.step("drain()")
        self._drain()
        self._check_outstanding()

    def _check_outstanding(self):
        for dev in self.devs:
            ch = dev.main_channel
            if ch is not None and not ch.released and ch.outstanding:
                raise Violation(f"everything completed, yet {dev.name}'s channel has "
                                f"outstanding = {ch.outstanding}")

    # ---- removal -------------------------------------------------------------------------------
    @precondition(lambda self: self.cur is not None)
    @rule(skip=st.sampled_from([True, True, True, False]))
    def delete(self, skip):
        if skip:                  # (a removal ends most of what can happen: not too often)
            self.poll(1)
            return
        dev = self.cur
        if present("destruct_before_io_done") and not dev.open_descs(self.descs):
            self._drain("drain before the destruct (known bug destruct_before_io_done)",
                        [s for s in self._inflight() if s.dev is dev])
        open_before = dev.open_descs(self.descs)
        for s in self._inflight():
            if s.dev is dev:
                s.may_fail = True
        dev.removed = True
        self.cur = None
        self._call(f"delete {dev.name}", set(), dev.device.delete)
        for d in open_before:
            if d.events is not None and d.events.count(("remove", dev.name)) != 1:
                raise Violation(f"descriptor of {dev.name} heard {d.events}, not one remove")
        if any(b.name == dev.name for b in bdev.bdevs()):
            raise Violation(f"{dev.name} is still registered after its removal")

    @precondition(lambda self: self.cur is not None)
    @rule(ios=st.lists(st.tuples(st.sampled_from(["read", "write", "unmap", "compare"]),
                                 st.sampled_from([0, 3, 16, 40, 64, 100]),
                                 st.sampled_from([1, 8, 33, 64, 96, 128])),
                       min_size=1, max_size=4),
          order=st.sampled_from(["close_then_put", "put_then_close"]))
    def remove_with_io_in_flight(self, ios, order):
        """Hot removal under load (issue 18, item 2): I/O in flight (large ones split), then
        delete, close every descriptor and put the channel, in either order. Each I/O
        completes exactly once; the module never sees a submission after its destruct."""
        dev = self.cur
        STATS["removals under load"] += 1
        for op, off, n in ios:
            self.io_blocks(op, "good", ("own", 0), ("blk", off), ("n", min(n, dev.nblocks - off)),
                           ("bytearray", 0, 0), "cb", off * 7 + n)
        self.delete(skip=False)
        mine = [self.descs.index(d) for d in dev.open_descs(self.descs)]
        if order == "put_then_close":
            while dev.main_refs:
                self.put_channel(self.handles.index(next(h for h in self.handles
                                                         if h.ch is dev.main_channel)), False)
        for i in mine:
            self.close(i, False)
        while dev.main_refs:
            self.put_channel(self.handles.index(next(h for h in self.handles
                                                     if h.ch is dev.main_channel)), False)

    @precondition(lambda self: self.cur is None and self.gen < MAX_GENERATIONS)
    @rule()
    def recreate(self):
        self._new_device()

    # ---- creation with bad arguments -------------------------------------------------------------
    BAD_CREATE = (
        ("name", {"name": ""}), ("name", {"name": "a b"}), ("type", {"name": 5}),
        ("type", {"size": "64M"}), ("int_range", {"num_blocks": -1}),
        ("int_range", {"num_blocks": 2**64}), ("empty", {"num_blocks": 0}),
        ("block_size", {"block_size": 0}), ("block_size", {"block_size": 513}),
        ("int_range", {"block_size": -512}), ("block_size", {"size": 4096, "block_size": 0}),
        ("size", {"size": 1000}), ("exists", {}),
    )

    @rule(kind=st.sampled_from(["malloc", "null"]), case=st.integers(0, len(BAD_CREATE) - 1))
    def create_bad(self, kind, case):
        """malloc/null.create with one bad argument: a userblk InvalidArgument, nothing made."""
        from bdev import malloc, null
        module = {"malloc": malloc, "null": null}[kind]
        fault, bad = self.BAD_CREATE[case]
        Device.made += 1
        kw = {"name": f"FzBad{Device.made}", "num_blocks": 8, "block_size": 512}
        if "size" in bad:
            del kw["num_blocks"]
        if fault == "exists":
            kw["name"] = self.other[0].name
        kw.update(bad)
        faults = {"create"} | ({fault} if fault in ("int_range", "exists") else set())
        made = []
        try:
            self._call(f"{kind}.create(**{kw!r})", faults,
                       lambda: made.append(module.create(**kw)))
        finally:
            for b in made:                # (accepted: a violation, and nothing left behind)
                b.unregister()

    BAD_OPTIONS = ({"io_timeout_s": -1}, {"io_timeout_s": float("nan")}, {"io_timeout_s": "5"},
                   {"io_queue_requests": 0}, {"io_queue_size": 1}, {"bogus_option": 1})

    @precondition(lambda self: self.kind == "nvme")
    @rule(case=st.integers(0, len(BAD_OPTIONS) - 1))
    def attach_bad_options(self, case):
        """attach_emulated with a bad ControllerOptions field: refused at attach, no queue
        pair leaked (nothing attached stays behind)."""
        from bdev import nvme as bdev_nvme
        from nvme.emu import EmulatedController, EmuNamespace
        opts = self.BAD_OPTIONS[case]
        Device.made += 1
        name = f"FzBadCtrl{Device.made}"
        emu = EmulatedController([EmuNamespace(16, 512)], name=f"emu-{name}")
        what = f"bdev_nvme.attach_emulated({name!r}, emu, options={opts!r})"
        def detach():
            if any(c.name == name for c in bdev_nvme.controllers()):
                bdev_nvme.detach_controller(name)
                self._wait(lambda: not any(c.name == name for c in bdev_nvme.controllers()),
                           f"detaching {name}")
        if present("nvme_options_unvalidated") and case < 4:
            # accepted today (and failing later, at get_io_channel): only check it goes away
            self.step(f"# accepted today (nvme_options_unvalidated): {what}")
            try:
                bdev_nvme.attach_emulated(name, emu, options=opts)
            except UserblkError:
                return
            detach()
            return
        try:
            self._call(what, {"create"}, lambda: bdev_nvme.attach_emulated(name, emu,
                                                                          options=opts))
        finally:
            detach()                      # (accepted: a violation, and nothing left behind)

    # ---- NVMe fault rules ------------------------------------------------------------------------
    def _emu(self):
        return self.cur.device.emu if self.cur is not None and self.kind == "nvme" else None

    @precondition(lambda self: self._emu() is not None)
    @rule(opcode=st.sampled_from(["READ", "WRITE", "COMPARE", "WRITE_ZEROES",
                                  "DATASET_MANAGEMENT", "FLUSH", None]),
          status=st.sampled_from(["MEDIA/UNRECOVERED_READ_ERROR", "MEDIA/WRITE_FAULT",
                                  "GENERIC/INTERNAL_ERROR", "GENERIC/ABORTED_BY_REQUEST",
                                  "GENERIC/DATA_TRANSFER_ERROR", "GENERIC/LBA_OUT_OF_RANGE"]),
          count=st.integers(1, 3), dnr=st.booleans())
    def nvme_inject(self, opcode, status, count, dnr):
        from nvme.spec import NvmOpcode
        from nvme.status import Generic, Media
        group, name = status.split("/")
        st_ = getattr(Media if group == "MEDIA" else Generic, name)
        opc = getattr(NvmOpcode, opcode) if opcode else None
        self.step(f"emu.inject({opcode}, status={status}, count={count}, dnr={dnr})")
        for s in self._inflight():           # retried or not yet fetched ones may match
            if s.dev is self.cur:
                s.may_fail = True
        self._emu().inject(opc, status=st_, count=count, dnr=dnr)

    @precondition(lambda self: self._emu() is not None)
    @rule(opcode=st.sampled_from(["READ", "WRITE", "COMPARE", "WRITE_ZEROES",
                                  "DATASET_MANAGEMENT", "FLUSH", None]),
          ticks=st.integers(1, 5), count=st.integers(1, 4))
    def nvme_delay(self, opcode, ticks, count):
        from nvme.spec import NvmOpcode
        self.step(f"emu.delay({opcode}, ticks={ticks}, count={count})")
        self._emu().delay(getattr(NvmOpcode, opcode) if opcode else None, ticks=ticks,
                          count=count)

    @precondition(lambda self: self._emu() is not None)
    @rule(opcode=st.sampled_from(["READ", "WRITE", "DATASET_MANAGEMENT", None]),
          count=st.integers(1, 2))
    def nvme_hold(self, opcode, count):
        from nvme.spec import NvmOpcode
        self.step(f"emu.hold({opcode}, count={count})  # the clock releases it later")
        self._emu().hold(getattr(NvmOpcode, opcode) if opcode else None, count=count)

    @precondition(lambda self: self._emu() is not None)
    @rule()
    def nvme_clear_faults(self):
        self.step("emu.clear_faults()")
        self._emu().clear_faults()

    # ---- invariants and teardown ---------------------------------------------------------------
    @invariant()
    def no_violations(self):
        self._raise_violations()
        for dev in self.devs:
            m = getattr(dev.device, "module", None)
            if m is not None and m.submitted_after_destruct:
                raise Violation(f"{dev.name}: the module received {m.submitted_after_destruct} "
                                "submission(s) after its destruct")
            if m is not None and m.at_destruct is not None and m.at_destruct != (0, 0) \
                    and not present("destruct_before_io_done"):
                raise Violation(f"{dev.name}: destruct ran with {m.at_destruct[0]} channel(s) "
                                f"live and {m.at_destruct[1]} I/O(s) in the module")
            if m is not None and m.contract_errors:
                raise Violation(f"{dev.name}: {m.contract_errors[0]}")
            if m is not None and m.destructed > 1:
                raise Violation(f"{dev.name}: destruct ran {m.destructed} times")

    def teardown(self):
        """Put everything back, checking on the way; the clean-up is done (best effort) even when
        the example failed, so that the next example starts from nothing."""
        self.step("# teardown")
        errors = []

        def attempt(what, fn):
            try:
                fn()
            except BaseException as e:
                errors.append(e if isinstance(e, Violation) else Violation(f"{what}: {e!r}"))

        if self.other is not None:
            attempt("teardown: drain", lambda: (self._drain("teardown: drain"),
                                                self._check_outstanding()))
        if self.worker is not None:
            attempt("stopping the worker", self.worker.stop)
        for dev in self.devs:
            while dev.main_refs:
                dev.main_refs -= 1
                attempt(f"putting {dev.name}'s channel", dev.main_channel.put)
        for d in self.descs:
            attempt("closing a descriptor", d.desc.close)
            d.closed = True
        for dev in self.devs:
            if dev.claim is not None:
                attempt("release_claim", lambda d=dev: d.bdev.release_claim(d.claim[0]))
            if not dev.removed:
                dev.removed = True
                attempt(f"deleting {dev.name}", dev.device.delete)
        if self.other is not None:
            from bdev import malloc
            b, d, ch = self.other
            attempt("the other bdev", lambda: (ch.put(), d.close(), malloc.delete(b.name)))
        if not errors:
            attempt("teardown: after the last put",
                    lambda: self._drain("teardown: after the last put"))
        attempt("detaching controllers", lambda: self._wait(
            lambda: all(getattr(dev.device, "controller_gone", lambda: True)()
                        for dev in self.devs), "teardown: controllers detached"))
        if not errors:
            # destruct runs by message on the thread that unregistered, once the last channel
            # is gone: poll for it before saying it never ran
            mods = [(dev, getattr(dev.device, "module", None)) for dev in self.devs]
            attempt("teardown: destructs", lambda: self._wait(
                lambda: all(m is None or m.destructed for _, m in mods), "teardown: destructs"))
            for dev, m in mods:
                if m is not None and not m.destructed:
                    errors.append(Violation(f"{dev.name}: destruct never ran"))
            left = [x.name for x in bdev.bdevs() if x.name.startswith("Fz")]
            if left:
                errors.append(Violation(f"bdevs still registered after teardown: {left}"))
            attempt("final checks", self.no_violations)
        for dev in self.devs:
            attempt("device clean-up", dev.device.cleanup)
        for sub in self.subs:
            for buf in sub.buffers:
                attempt("releasing a buffer", buf.release)
        if errors:
            raise errors[0]


_machines = {}


def machine_for(kind):
    """The machine class for one kind of device."""
    if kind not in _machines:
        _machines[kind] = type(f"BdevMachine_{kind.replace('-', '_')}", (BdevMachine,),
                               {"kind": kind})
    return _machines[kind]
