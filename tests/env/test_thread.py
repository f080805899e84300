"""env.thread: messages, pollers, binding, lifecycle, I/O channels, for_each_channel, reactor."""
import errno
import gc
import logging
import threading
import time
import weakref

import pytest
from hypothesis import given, settings, strategies as st

from env import thread as T
from env import _thread_testing as X
from env.errors import (InvalidArgument, InvalidCallback, MessageRingFull, ResourceExhausted,
                        ThreadError, ThreadExitedError, ThreadTimeoutError, WrongThreadError)


@pytest.fixture
def thread():
    """A fresh Thread that re-raises callback exceptions from poll(); torn down after the test."""
    th = T.Thread("t", errors="raise")
    yield th
    _dispose(th)


def _dispose(th):
    if th.os_thread not in (None, threading.get_ident()):
        return
    if th.state == "running":
        th.exit()
    if th.state != "destroyed":
        th.destroy()


def in_os_thread(fn, *args):
    """Run fn(*args) on a new OS thread; return its result or raise its exception."""
    box = []

    def run():
        try:
            box.append((True, fn(*args)))
        except BaseException as e:
            box.append((False, e))

    ot = threading.Thread(target=run)
    ot.start()
    ot.join(30)
    assert box, "helper OS thread did not finish"
    ok, value = box[0]
    if not ok:
        raise value
    return value


# ---- messages ------------------------------------------------------------------------------------
def test_python_messages_run_in_order(thread):
    out = []
    for i in range(100):
        thread.send(out.append, i)
    assert out == []
    while thread.poll():
        pass
    assert out == list(range(100))
    assert thread.stats()["messages"] == 100


def test_poll_says_whether_it_did_work(thread):
    assert thread.poll() is False
    thread.send(lambda: None)
    assert thread.poll() is True
    assert thread.poll() is False


def test_c_and_python_messages_share_one_order(thread):
    rec = X.Recorder()
    seq = []
    for i in range(10):
        if i % 2:
            assert rec.send(thread, i) == 0
            thread.send(seq.append, ("c", i))   # marks where the C message sat
        else:
            thread.send(seq.append, ("py", i))
    thread.poll()
    assert rec.values == [1, 3, 5, 7, 9]
    assert [v for _, v in seq] == list(range(10))


def test_max_msgs_bounds_one_iteration(thread):
    out = []
    for i in range(10):
        thread.send(out.append, i)
    thread.poll(max_msgs=3)
    assert out == [0, 1, 2]
    thread.poll(max_msgs=3)
    assert out == list(range(6))


def test_message_sent_by_a_message_runs_later(thread):
    out = []
    thread.send(lambda: (out.append("a"), thread.send(out.append, "b")))
    thread.poll(max_msgs=1)
    assert out == ["a"]
    thread.poll()
    assert out == ["a", "b"]


def test_sends_from_many_os_threads_keep_per_sender_order(thread):
    out = []
    n_senders, n_msgs = 8, 300
    start = threading.Barrier(n_senders)

    def sender(k):
        start.wait()
        for i in range(n_msgs):
            while True:
                try:
                    thread.send(out.append, (k, i))
                    break
                except MessageRingFull:
                    time.sleep(0.0001)

    workers = [threading.Thread(target=sender, args=(k,)) for k in range(n_senders)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while len(out) < n_senders * n_msgs and time.monotonic() < deadline:
        thread.poll()
    for w in workers:
        w.join()
    assert len(out) == n_senders * n_msgs
    for k in range(n_senders):
        assert [i for kk, i in out if kk == k] == list(range(n_msgs))


def test_many_c_producers_without_the_gil():
    """4 OS threads flood a small ring with C messages (the GIL released) while the main thread
    drains it: nothing lost, nothing reordered per producer, and the ring was full at times."""
    th = T.Thread("sink", msg_ring_size=64)
    X.sink_reset()
    n_prod, n = 4, 20000
    fulls = []
    workers = [threading.Thread(target=lambda k=k: fulls.append(X.flood(th, k, n)))
               for k in range(n_prod)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while X.sink_stats()["count"] < n_prod * n and time.monotonic() < deadline:
        X.poll_loop(th, 1000)
    for w in workers:
        w.join()
    s = X.sink_stats()
    assert s["count"] == n_prod * n
    assert s["order_errors"] == 0
    assert s["last"][:n_prod] == [n] * n_prod
    _dispose(th)


def test_ring_full():
    th = T.Thread("small", msg_ring_size=8)
    sent, rc = X.fill_ring(th)
    assert (sent, rc) == (8, -errno.ENOMEM)
    with pytest.raises(MessageRingFull) as ei:
        th.send(print)
    assert isinstance(ei.value, ResourceExhausted) and "full" in str(ei.value)
    th.poll(max_msgs=1)
    th.send(lambda: None)                  # room again
    assert th.msg_ring_size == 8
    _dispose(th)


def test_ring_size_rounds_up_to_a_power_of_two():
    th = T.Thread(msg_ring_size=100)
    assert th.msg_ring_size == 128
    _dispose(th)


@pytest.mark.parametrize("kwargs", [{"msg_ring_size": 1}, {"msg_ring_size": "x"},
                                    {"max_msgs": 0}, {"errors": "ignore"}])
def test_bad_thread_arguments(kwargs):
    with pytest.raises(InvalidArgument):
        T.Thread(**kwargs)


def test_send_rejects_non_callables(thread):
    with pytest.raises(InvalidCallback) as ei:
        thread.send(42)
    assert isinstance(ei.value, TypeError)


def test_exception_in_a_message_is_logged_and_counted(caplog):
    th = T.Thread("logs")
    out = []
    th.send(lambda: 1 / 0)
    th.send(out.append, "after")
    with caplog.at_level(logging.ERROR, logger="userblk.env.thread"):
        assert th.poll()
    assert out == ["after"]
    assert th.stats()["errors"] == 1
    assert any("ZeroDivisionError" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert "logs" in caplog.text
    _dispose(th)


def test_on_error_handler(thread):
    seen = []
    th = T.Thread("handled")
    th.on_error = lambda t, what, exc: seen.append((t, type(exc)))
    th.send(lambda: [][1])
    th.poll()
    assert seen == [(th, IndexError)]
    _dispose(th)


def test_errors_raise_mode_reraises_after_the_iteration(thread):
    out = []
    thread.send(lambda: 1 / 0)
    thread.send(out.append, "still ran")
    with pytest.raises(ZeroDivisionError):
        thread.poll()
    assert out == ["still ran"]
    assert thread.poll() is False          # the exception is raised once


def test_keyboard_interrupt_propagates_even_in_log_mode():
    th = T.Thread("kb")

    def interrupt():
        raise KeyboardInterrupt

    th.send(interrupt)
    with pytest.raises(KeyboardInterrupt):
        th.poll()
    _dispose(th)


# ---- pollers -------------------------------------------------------------------------------------
def test_active_poller_runs_every_iteration_and_reports_work(thread):
    calls = []
    p = thread.register_poller(lambda: calls.append(1) or 0, name="idle")
    assert thread.poll() is False          # it returned 0: idle
    q = thread.register_poller(lambda: 1)
    assert thread.poll() is True
    assert len(calls) == 2 and p.runs == 2 and q.runs == 1 and q.busy_runs == 1
    assert p.state == "active" and p.period_us == 0 and p.thread is thread
    assert thread.poller_count == 2


def test_active_pollers_run_in_registration_order(thread):
    out = []
    for i in range(5):
        thread.register_poller(lambda i=i: out.append(i))
    thread.poll()
    assert out == list(range(5))


def test_timed_poller_runs_only_when_due(thread):
    late = []
    thread.register_poller(lambda: late.append(1), period_us=10_000_000)
    for _ in range(100):
        thread.poll()
    assert late == []                      # first run one period after registration
    ticks = []
    t_reg = time.monotonic()
    thread.register_poller(lambda: ticks.append(time.monotonic()), period_us=20000)
    polls = [0]

    def counted():
        polls[0] += 1
        return len(ticks) >= 4

    thread.run_until(counted, timeout=30, spin_us=10**9)   # spin: poll often
    # each run is due one period after the iteration that ran the previous one, so the k-th run
    # comes at least k periods after registration (gaps may be shorter after a late run)
    assert all(t - t_reg >= (k + 1) * 0.02 - 0.0002 for k, t in enumerate(ticks))
    assert polls[0] > 4 * len(ticks)       # polled far more often than it ran


def test_c_poller_timed(thread):
    c = X.CountingPoller(thread, period_us=5000)
    thread.run_until(lambda: c.count >= 3, timeout=10)
    assert c.poller.period_us == 5000


def test_pause_and_resume(thread):
    calls = []
    p = thread.register_poller(lambda: calls.append(1))
    thread.poll()
    p.pause()
    assert p.state == "paused" and thread.poller_count == 1
    thread.poll()
    thread.poll()
    assert len(calls) == 1
    p.resume()
    thread.poll()
    assert len(calls) == 2
    p.resume()                             # resuming an active poller: no-op
    thread.poll()
    assert len(calls) == 3


def test_paused_timed_poller_restarts_its_period_on_resume(thread):
    """Resumed, a timed poller waits a whole period from the resume (its old deadline, long
    past, is forgotten), then runs. No timing is asserted that load could break: when it runs,
    its own clock reading must be a period after the resume, however late that is."""
    period = 0.2
    runs = []
    p = thread.register_poller(lambda: runs.append(time.monotonic()), int(period * 1e6))
    p.pause()
    paused_at = time.monotonic()
    while time.monotonic() - paused_at < 1.5 * period:    # the first deadline goes by, paused
        thread.poll()
    assert runs == []
    resumed_at = time.monotonic()
    p.resume()
    for _ in range(200):                  # polls right after the resume: not due yet
        thread.poll()
    assert all(t - resumed_at >= period - 0.002 for t in runs), \
        f"ran {runs[0] - resumed_at:.4f} s after resume, period {period} s"
    thread.run_until(lambda: runs, timeout=10)              # and it does run afterwards
    assert runs[0] - resumed_at >= period - 0.002
    p.unregister()


def test_unregister_from_inside_the_poller(thread):
    calls = []

    def once():
        calls.append(1)
        me.unregister()

    me = thread.register_poller(once)
    thread.poll()
    thread.poll()
    assert calls == [1] and me.state == "unregistered" and thread.poller_count == 0
    with pytest.raises(ThreadError):
        me.unregister()                    # twice


def test_c_poller_unregisters_and_pauses_itself_without_the_gil(thread):
    done = X.CountingPoller(thread, limit=3)
    paused = X.CountingPoller(thread, pause_at=2)
    X.poll_loop(thread, 10)
    assert done.count == 3 and not done.poller.is_registered
    assert paused.count == 2 and paused.poller.state == "paused"
    paused.poller.resume()
    X.poll_loop(thread, 2)
    assert paused.count == 4


def test_poller_changes_other_pollers_mid_walk(thread):
    out = []
    pollers = {}

    def first():
        out.append("first")
        pollers["second"].unregister()     # later in the walk: must not run
        pollers["third"].pause()
        pollers["new"] = thread.register_poller(lambda: out.append("new"))

    pollers["first"] = thread.register_poller(first)
    pollers["second"] = thread.register_poller(lambda: out.append("second"))
    pollers["third"] = thread.register_poller(lambda: out.append("third"))
    thread.poll()
    assert out == ["first"]                # the new poller starts on the next iteration
    pollers["first"].unregister()
    out.clear()
    thread.poll()
    assert out == ["new"]
    pollers["third"].resume()
    out.clear()
    thread.poll()
    assert out == ["new", "third"]         # a resumed poller goes to the end


def test_pause_then_resume_in_the_same_walk_keeps_it_running(thread):
    out = []
    holder = {}

    def toggler():
        holder["p"].pause()
        holder["p"].resume()

    thread.register_poller(toggler)
    holder["p"] = thread.register_poller(lambda: out.append(1))
    thread.poll()
    thread.poll()
    assert out == [1, 1]


def test_timed_poller_unregisters_itself(thread):
    runs = []

    def tick():
        runs.append(1)
        if len(runs) == 2:
            p.unregister()

    p = thread.register_poller(tick, period_us=1000)
    thread.run_until(lambda: not p.is_registered, timeout=10)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.01:
        thread.poll()
    assert runs == [1, 1]


@pytest.mark.parametrize("period", [-1, -0.5, "10", None, True])
def test_bad_periods(thread, period):
    with pytest.raises(InvalidArgument):
        thread.register_poller(lambda: 0, period)


def test_register_rejects_non_callables(thread):
    with pytest.raises(InvalidCallback):
        thread.register_poller("nope")


def test_poller_objects_are_released_after_unregister(thread):
    p = thread.register_poller(lambda: 0)
    ref = weakref.ref(p)
    p.unregister()
    del p
    gc.collect()
    assert ref() is None


def test_exception_in_poller_is_logged_counted_and_loop_continues(caplog):
    th = T.Thread("bad-poller")
    good = []
    th.register_poller(lambda: 1 / 0, name="boom")
    th.register_poller(lambda: good.append(1))
    with caplog.at_level(logging.ERROR, logger="userblk.env.thread"):
        for _ in range(3):
            th.poll()
    assert len(good) == 3
    assert th.stats()["errors"] == 3
    assert "boom" in caplog.text
    _dispose(th)


def test_poller_exception_rate_limited_logging(caplog):
    th = T.Thread("noisy")
    th.register_poller(lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="userblk.env.thread"):
        for _ in range(100):
            th.poll()
    assert th.stats()["errors"] == 100
    assert len(caplog.records) <= 11
    _dispose(th)


class _Op:
    """Hypothesis model: a poller's expected state and run count."""


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["register", "pause", "resume", "unregister",
                                           "poll"]),
                          st.integers(0, 5)), max_size=60))
def test_poller_state_machine_against_a_model(ops):
    th = T.Thread("model", errors="raise")
    runs = {}
    handles = []
    model = []          # per handle: "active" / "paused" / "unregistered"
    order = []          # active handles in run order

    for op, k in ops:
        if op == "register":
            i = len(handles)
            runs[i] = 0
            handles.append(th.register_poller(lambda i=i: runs.__setitem__(i, runs[i] + 1)))
            model.append("active")
            order.append(i)
            continue
        if op == "poll":
            before = dict(runs)
            th.poll()
            for i in order:
                before[i] += 1
            assert runs == before
            continue
        if not handles:
            continue
        i = k % len(handles)
        h = handles[i]
        if model[i] == "unregistered":
            with pytest.raises(ThreadError):
                getattr(h, op)()
            continue
        getattr(h, op)()
        if op == "pause" and model[i] == "active":
            model[i] = "paused"
            order.remove(i)
        elif op == "resume" and model[i] == "paused":
            model[i] = "active"
            order.append(i)
        elif op == "unregister":
            if model[i] == "active":
                order.remove(i)
            model[i] = "unregistered"
        assert h.state == model[i]
    assert th.poller_count == sum(1 for s in model if s != "unregistered")
    _dispose(th)


# ---- current thread and binding ------------------------------------------------------------------
def test_current_thread_is_created_lazily_and_stable():
    a = T.current_thread()
    assert a is T.current_thread() is T.Thread.current()
    assert a.is_current and a.os_thread == threading.get_ident()
    other = in_os_thread(T.current_thread)
    assert other is not a


def test_app_thread_of_a_finished_os_thread_is_released():
    ref = in_os_thread(lambda: weakref.ref(T.current_thread()))
    gc.collect()
    assert ref() is None


def test_polled_thread_is_current_during_its_poll(thread):
    seen = []
    app = T.current_thread()
    thread.send(lambda: seen.append((T.current_thread(), X.is_current(thread))))
    thread.poll()
    assert seen == [(thread, True)]
    assert T.current_thread() is app and not X.is_current(thread)


def test_bind_makes_current_and_unbind_releases(thread):
    prev = T.current_thread()
    thread.bind()
    try:
        assert T.current_thread() is thread and thread.is_bound
        assert X.is_current(thread)
    finally:
        thread.unbind()
    assert not thread.is_bound
    assert T.current_thread() is not thread
    # the previous app thread stays bound to this OS thread; a new current one is made
    prev.bind()
    assert T.current_thread() is prev


def test_polling_from_another_os_thread_raises(thread):
    thread.poll()                          # binds it to this OS thread
    with pytest.raises(WrongThreadError) as ei:
        in_os_thread(thread.poll)
    assert "t" in str(ei.value) and "bound to OS thread" in str(ei.value)
    assert in_os_thread(X.poll_loop, thread, 1) == -errno.EPERM
    with pytest.raises(WrongThreadError):
        in_os_thread(thread.bind)
    with pytest.raises(WrongThreadError):
        in_os_thread(thread.register_poller, lambda: 0)
    with pytest.raises(WrongThreadError):
        in_os_thread(thread.exit)
    with pytest.raises(WrongThreadError):
        in_os_thread(thread.unbind)


def test_a_thread_can_move_after_unbind(thread):
    thread.poll()
    thread.unbind()
    out = []
    thread.send(out.append, 1)
    in_os_thread(thread.poll)
    assert out == [1]
    # the helper OS thread ended: its implicit binding was released
    gc.collect()
    thread.poll()


def test_poller_methods_from_the_wrong_os_thread(thread):
    p = thread.register_poller(lambda: 0)
    thread.poll()
    for m in (p.pause, p.resume, p.unregister):
        with pytest.raises(WrongThreadError):
            in_os_thread(m)


def test_poll_is_not_reentrant(thread):
    thread.send(thread.poll)
    with pytest.raises(ThreadError, match="already polling"):
        thread.poll()


def test_threads_registry(thread):
    assert thread in T.threads()


# ---- lifecycle -----------------------------------------------------------------------------------
def test_exit_drains_messages_and_unregisters_pollers():
    th = T.Thread("leaving")
    out = []
    c = X.CountingPoller(th)
    p = th.register_poller(lambda: out.append("poller"))
    th.send(out.append, "m1")
    th.send(out.append, "m2")
    th.exit()
    assert th.state == "exiting" and not th.is_exited
    assert not c.poller.is_registered and not p.is_registered
    with pytest.raises(ThreadExitedError):
        th.send(print)
    assert X.Recorder().send(th, 1) == -errno.ESHUTDOWN
    with pytest.raises(ThreadExitedError):
        th.register_poller(lambda: 0)
    th.poll()
    assert out == ["m1", "m2"] and th.is_exited
    with pytest.raises(ThreadExitedError):
        th.poll()
    assert X.poll_loop(th, 1) == -errno.ESHUTDOWN
    th.destroy()
    assert th.state == "destroyed"
    th.destroy()                           # idempotent


def test_exit_with_nothing_pending_is_immediate():
    th = T.Thread()
    th.exit()
    assert th.is_exited
    th.destroy()


def test_exit_from_inside_a_poller():
    th = T.Thread("self-exit")
    c = X.CountingPoller(th)
    th.register_poller(th.exit)
    th.poll()
    assert th.is_exited and not c.poller.is_registered and th.poller_count == 0
    th.destroy()


def test_destroy_requires_exit(thread):
    with pytest.raises(ThreadError, match="exit"):
        thread.destroy()


def test_destroy_runs_stragglers():
    th = T.Thread()
    out = []
    th.send(out.append, 1)
    th.exit()
    th.destroy()
    assert out == [1]


def test_run_until(thread):
    n = [0]
    thread.register_poller(lambda: n.__setitem__(0, n[0] + 1))
    assert thread.run_until(lambda: n[0] >= 10 and "yes") == "yes"


def test_run_until_times_out(thread):
    t0 = time.monotonic()
    with pytest.raises(ThreadTimeoutError) as ei:
        thread.run_until(lambda: False, timeout=0.05)
    assert isinstance(ei.value, TimeoutError)
    assert time.monotonic() - t0 < 2
    assert "t" in str(ei.value)


def test_run_until_rejects_bad_arguments(thread):
    with pytest.raises(InvalidCallback):
        thread.run_until(True)
    with pytest.raises(InvalidArgument):
        thread.run_until(lambda: True, timeout=-1)


def test_run_until_sleeping_is_woken_by_a_message(thread):
    """After spinning, run_until sleeps; a message from another OS thread wakes it at once."""
    box = []
    thread.poll()

    def later():
        time.sleep(0.05)
        thread.send(box.append, 1)

    ot = threading.Thread(target=later)
    ot.start()
    thread.run_until(lambda: box, timeout=10, spin_us=0, max_sleep_us=2_000_000)
    ot.join()
    assert box == [1]


def test_run_loop_and_stop_loop():
    th = T.Thread("looper")
    out = []

    def loop():
        th.bind()
        th.run_loop(spin_us=0, max_sleep_us=500_000)
        out.append("returned")
        th.exit()
        th.destroy()

    ot = threading.Thread(target=loop)
    ot.start()
    time.sleep(0.05)
    th.send(out.append, "msg")             # wakes the sleeping loop
    deadline = time.monotonic() + 5
    while "msg" not in out and time.monotonic() < deadline:
        time.sleep(0.001)
    th.stop_loop()
    ot.join(5)
    assert out == ["msg", "returned"]


# ---- I/O devices and channels --------------------------------------------------------------------
class RecordingDevice(T.IoDevice):
    def __init__(self, name="dev"):
        super().__init__(name)
        self.events = []

    def create_channel_ctx(self, channel):
        self.events.append(("create", T.current_thread(), channel.thread))
        return {"ios": 0}

    def destroy_channel_ctx(self, channel):
        self.events.append(("destroy", T.current_thread(), channel.ctx["ios"]))


def test_channel_is_created_once_per_thread_and_refcounted():
    dev = RecordingDevice()
    me = T.current_thread()
    ch = T.get_io_channel(dev)
    assert ch.device is dev and ch.thread is me and ch.refs == 1
    assert dev.get_io_channel() is ch and ch.refs == 2
    assert dev.events == [("create", me, me)]
    assert dev.channel_count == 1 and dev.channel_threads == [me] and ch in me.channels
    ch.ctx["ios"] += 5
    ch.put()
    assert not ch.released and dev.events[-1][0] == "create"
    ch.put()
    assert ch.released and dev.events[-1] == ("destroy", me, 5)
    assert dev.channel_count == 0 and ch not in me.channels
    with pytest.raises(ThreadError, match="released"):
        ch.put()
    ch2 = T.get_io_channel(dev)            # a new one after release
    assert ch2 is not ch
    ch2.put()


def test_channel_context_manager():
    dev = RecordingDevice()
    with T.get_io_channel(dev) as ch:
        assert ch.refs == 1
    assert ch.released


def test_each_thread_gets_its_own_channel_created_on_it():
    dev = RecordingDevice()
    with T.Reactor(2, name="chan") as r:
        chans = [r.call(i, T.get_io_channel, dev) for i in range(2)]
        assert chans[0] is not chans[1]
        assert [c.thread for c in chans] == r.threads
        assert [(e[1], e[2]) for e in dev.events] == [(t, t) for t in r.threads]
        # using (or putting) a channel from another thread raises, and changes nothing
        with pytest.raises(WrongThreadError) as ei:
            chans[0].put()
        e = ei.value
        assert e.channel is chans[0] and e.owner is r.thread(0)
        assert "chan-0" in str(e) and "dev" in str(e) and "MainThread" in str(e)
        assert chans[0].refs == 1
        with pytest.raises(WrongThreadError):
            r.call(1, chans[0].check_thread)
        for i in range(2):
            r.call(i, chans[i].put)
        assert [e[1] for e in dev.events[2:]] == r.threads
        assert dev.channel_count == 0


def test_c_level_channel_subclass_from_another_module():
    dev = X.CDevice("cdev")
    ch = T.get_io_channel(dev)
    assert isinstance(ch, X.CChannel) and X.created_on_owner(ch)
    assert X.submit(ch, 3) == 3
    assert in_os_thread(X.submit, ch, 1) == -1       # refused off its thread, nothing counted
    assert X.submit(ch, 2) == 5
    ch.put()
    assert dev.log == [("create", ch.thread.name), ("destroy", ch.thread.name, 5, True)]


def test_channel_of_a_polled_thread_is_owned_only_inside_its_polls(thread):
    dev = RecordingDevice()
    got = []
    thread.send(lambda: got.append(T.get_io_channel(dev)))
    thread.poll()
    ch = got[0]
    assert ch.thread is thread
    with pytest.raises(WrongThreadError):
        ch.check_thread()                  # the main OS thread's current is the app thread
    thread.send(ch.put)
    thread.poll()
    assert ch.released


def test_create_failure_leaves_no_channel():
    class Failing(T.IoDevice):
        def create_channel_ctx(self, channel):
            raise RuntimeError("no queue pair")

    dev = Failing("f")
    with pytest.raises(RuntimeError, match="no queue pair"):
        T.get_io_channel(dev)
    assert dev.channel_count == 0 and not T.current_thread().channels


def test_stacked_devices_get_channels_inside_create():
    base = RecordingDevice("base")

    class Upper(T.IoDevice):
        def create_channel_ctx(self, channel):
            return T.get_io_channel(base)

        def destroy_channel_ctx(self, channel):
            channel.ctx.put()

    up = Upper("upper")
    ch = T.get_io_channel(up)
    assert ch.ctx.device is base and base.channel_count == 1
    ch.put()
    assert base.channel_count == 0


def test_bad_channel_class():
    class Wrong(T.IoDevice):
        channel_class = dict

    with pytest.raises(InvalidArgument):
        T.get_io_channel(Wrong())


def test_unregister_without_channels_completes_at_once():
    dev = RecordingDevice()
    done = []
    assert dev.unregister(lambda: done.append(1)) is True
    T.current_thread().run_until(lambda: done, timeout=5)
    with pytest.raises(ThreadError, match="unregistered"):
        T.get_io_channel(dev)
    with pytest.raises(ThreadError):
        dev.unregister()


def test_unregister_is_deferred_until_the_last_channel_is_put():
    dev = RecordingDevice()
    done = []
    ch = T.get_io_channel(dev)
    assert dev.unregister(lambda: done.append(1)) is False and dev.is_unregistered
    with pytest.raises(ThreadError):
        T.get_io_channel(dev)
    app = T.current_thread()
    while app.poll():
        pass
    assert done == []
    ch.put()
    app.run_until(lambda: done, timeout=5)


def test_destroying_a_thread_releases_leaked_channels(caplog):
    dev = RecordingDevice()
    th = T.Thread("leaky")
    th.send(lambda: T.get_io_channel(dev))
    th.poll()
    th.exit()
    with caplog.at_level(logging.WARNING, logger="userblk.env.thread"):
        th.destroy()
    assert dev.channel_count == 0 and dev.events[-1][0] == "destroy"
    assert dev.events[-1][1] is th         # destroyed on (as) its thread
    assert "leaky" in caplog.text


class MovingDevice(RecordingDevice):
    """Records channel_moved too (the hook of devices whose state belongs to an OS thread)."""

    def channel_moved(self, channel):
        self.events.append(("moved", T.current_thread().name, threading.get_ident()))


def test_an_os_thread_that_ends_without_put_has_its_channels_released(caplog):
    """The app thread of an OS thread that ends holding channels: the reaper releases them (on
    the Thread, adopted by another OS thread, after channel_moved), says so once naming the
    devices and the thread, and nothing stays alive."""
    dev, other = MovingDevice("leaky-dev"), RecordingDevice("second-dev")
    refs, names, idents = [], [], []

    def work():
        th = T.current_thread()
        T.get_io_channel(dev)
        T.get_io_channel(dev)                  # two references, neither put
        T.get_io_channel(other)
        th.send(lambda: names.append("late message"))   # never polled here
        by_dev = {c.device: c for c in th.channels}
        refs.extend([weakref.ref(th), weakref.ref(by_dev[dev]), weakref.ref(by_dev[other])])
        names.append(th.name)
        idents.append(threading.get_ident())

    with caplog.at_level(logging.WARNING, logger="userblk.env.thread"):
        ot = threading.Thread(target=work, name="leaving-worker")
        ot.start()
        ot.join(30)
        assert T.wait_ended_threads(30)
    assert dev.channel_count == 0 and other.channel_count == 0
    kinds = [e[0] for e in dev.events]
    assert kinds == ["create", "moved", "destroy"]
    assert dev.events[1][1] == names[0] and dev.events[1][2] != idents[0]   # its Thread, elsewhere
    assert dev.events[2][1].name == names[0]                         # destroyed on its Thread
    assert names[1:] == ["late message"]                             # its messages ran
    warnings = [r for r in caplog.records if "ended without put()" in r.getMessage()]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert ("leaving-worker" in text and names[0] in text and "'leaky-dev'" in text
            and "'second-dev'" in text)
    dev.events.clear()                         # (they hold the Thread)
    other.events.clear()
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_an_app_thread_without_channels_is_just_unbound():
    ref = in_os_thread(lambda: weakref.ref(T.current_thread()))
    assert T.wait_ended_threads(5)
    gc.collect()
    assert ref() is None


def test_a_bound_thread_is_left_to_its_owner_with_a_warning(caplog):
    """A Thread bound with bind() is its creator's: when its OS thread ends it is unbound (not
    destroyed) and a warning says it still holds channels; destroy() releases them."""
    dev = RecordingDevice("kept-dev")
    th = T.Thread("owned")

    def work():
        th.bind()
        T.get_io_channel(dev)

    with caplog.at_level(logging.WARNING, logger="userblk.env.thread"):
        in_os_thread(work)
        assert T.wait_ended_threads(30)
    assert "'owned'" in caplog.text and "'kept-dev'" in caplog.text and "destroy()" in caplog.text
    assert not th.is_bound and th.state == "running" and dev.channel_count == 1
    th.bind()
    th.exit()
    th.destroy()
    assert dev.channel_count == 0 and dev.events[-1][0] == "destroy"


def test_io_in_flight_completes_once_when_its_os_thread_ends():
    """A channel with work outstanding (its destroy waits for it): completed exactly once, by
    the release, never lost."""
    completions = []

    class PendingDevice(T.IoDevice):
        def destroy_channel_ctx(self, channel):
            for tag in channel.ctx:
                completions.append(tag)     # what a bdev channel does: finish what is in flight

        def create_channel_ctx(self, channel):
            return []

    dev = PendingDevice("pending-dev")

    def work():
        ch = T.get_io_channel(dev)
        ch.ctx.extend(["io-1", "io-2"])

    for _ in range(3):
        in_os_thread(work)
    assert T.wait_ended_threads(30)
    assert completions == ["io-1", "io-2"] * 3 and dev.channel_count == 0


def test_no_channels_on_an_exited_thread():
    dev = RecordingDevice()
    th = T.Thread()
    errs = []
    th.send(th.exit)
    th.send(lambda: errs.append(_catch(T.get_io_channel, dev)))
    th.poll()
    assert isinstance(errs[0], ThreadExitedError)
    th.destroy()


def _catch(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e


# ---- for_each_channel ----------------------------------------------------------------------------
def test_for_each_channel_visits_each_thread_then_calls_done_on_the_caller():
    dev = RecordingDevice()
    visits, done = [], []
    with T.Reactor(2, name="walk") as r:
        chans = [r.call(i, T.get_io_channel, dev) for i in range(2)]
        app = T.current_thread()

        def fn(ch):
            ch.check_thread()
            visits.append((ch, T.current_thread()))

        T.for_each_channel(dev, fn, lambda status: done.append((status, T.current_thread())))
        app.run_until(lambda: done, timeout=10)
        assert visits == [(chans[0], r.thread(0)), (chans[1], r.thread(1))]
        assert done == [(0, app)]
        for i in range(2):
            r.call(i, chans[i].put)


def test_for_each_channel_stops_on_status_and_on_exceptions():
    dev = RecordingDevice()
    with T.Reactor(2, name="walk") as r:
        chans = [r.call(i, T.get_io_channel, dev) for i in range(2)]
        app = T.current_thread()
        seen, done = [], []
        T.for_each_channel(dev, lambda ch: seen.append(ch) or -errno.EBUSY, done.append)
        app.run_until(lambda: done, timeout=10)
        assert done == [-errno.EBUSY] and seen == chans[:1]
        done.clear()
        T.for_each_channel(dev, lambda ch: 1 / 0, done.append)
        app.run_until(lambda: done, timeout=10)
        assert done == [-errno.EIO]
        for i in range(2):
            r.call(i, chans[i].put)


def test_for_each_channel_asynchronous():
    dev = RecordingDevice()
    with T.Reactor(2, name="walk") as r:
        chans = [r.call(i, T.get_io_channel, dev) for i in range(2)]
        order, done = [], []

        def fn(ch, walk):
            # finish later, from a timed poller on the channel's thread
            def later():
                order.append(T.current_thread().name)
                p.unregister()
                walk.continue_walk(0)

            p = T.register_poller(later, 2000)

        T.for_each_channel(dev, fn, done.append, asynchronous=True)
        T.current_thread().run_until(lambda: done, timeout=10)
        assert order == ["walk-0", "walk-1"] and done == [0]
        for i in range(2):
            r.call(i, chans[i].put)


def test_for_each_channel_with_no_channels():
    done = []
    T.for_each_channel(RecordingDevice(), lambda ch: None, done.append)
    T.current_thread().run_until(lambda: done, timeout=5)
    assert done == [0]


def test_for_each_channel_rejects_non_callables():
    with pytest.raises(InvalidCallback):
        T.for_each_channel(RecordingDevice(), None)
    with pytest.raises(InvalidCallback):
        T.for_each_channel(RecordingDevice(), print, done=3)


# ---- reactor -------------------------------------------------------------------------------------
def test_reactor_start_call_stop():
    r = T.Reactor(2, name="rx")
    with pytest.raises(ThreadError):
        r.thread(0)
    r.start()
    try:
        assert len(r) == 2
        idents = [r.call(i, threading.get_ident) for i in range(2)]
        assert len(set(idents + [threading.get_ident()])) == 3
        assert [r.call(i, lambda: T.current_thread().name) for i in range(2)] == ["rx-0", "rx-1"]
        assert r.call(0, lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(KeyError):
            r.call(1, {}.__getitem__, "missing")
        # from the reactor thread itself call() runs directly instead of deadlocking
        assert r.call(0, lambda: r.call(0, lambda: "inner")) == "inner"
        assert r.call(0, lambda: r.call(1, lambda: T.current_thread().name)) == "rx-1"
    finally:
        r.stop()
    threads = r.threads
    assert all(t.state == "destroyed" for t in threads)
    with pytest.raises(ThreadExitedError):
        r.call(0, print)
    r.stop()                               # idempotent


def test_reactor_runs_pollers_and_survives_callback_errors(caplog):
    with T.Reactor(1, name="rp") as r:
        n = [0]
        r.call(0, lambda: T.register_poller(lambda: n.__setitem__(0, n[0] + 1), 1000))
        with caplog.at_level(logging.ERROR, logger="userblk.env.thread"):
            r.send(0, lambda: 1 / 0)
            time.sleep(0.05)
        assert r.call(0, lambda: T.current_thread().stats()["errors"]) == 1
        c0 = n[0]
        time.sleep(0.05)
        assert n[0] > c0


def test_reactor_call_timeout():
    release = threading.Event()
    with T.Reactor(1, name="slow") as r:
        with pytest.raises(ThreadTimeoutError):
            r.call(0, release.wait, 30, timeout=0.05)
        release.set()
        assert r.call(0, lambda: "alive") == "alive"


def test_reactor_drains_queued_messages_on_stop():
    out = []
    r = T.Reactor(1, name="drain").start()
    r.send(0, time.sleep, 0.05)
    for i in range(100):
        r.send(0, out.append, i)
    r.stop()
    assert out == list(range(100))


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_reactor_bad_size(n):
    with pytest.raises(InvalidArgument):
        T.Reactor(n)


def test_idle_reactor_backs_off():
    """Two idle reactor threads must not burn two cores (they sleep after spinning briefly)."""
    with T.Reactor(2, name="idle"):
        time.sleep(0.05)
        c0, w0 = time.process_time(), time.monotonic()
        time.sleep(0.4)
        cpu, wall = time.process_time() - c0, time.monotonic() - w0
    assert cpu < 0.5 * wall, f"idle reactor used {cpu:.3f} s CPU in {wall:.3f} s"


def test_idle_reactor_wakes_promptly_for_a_message():
    with T.Reactor(1, name="wake") as r:
        time.sleep(0.05)                   # fully backed off
        t0 = time.monotonic()
        r.call(0, lambda: None)
        assert time.monotonic() - t0 < 1.0


def test_c_pollers_on_two_os_threads_run_concurrently():
    """Both progress while the other runs; the GIL is not held by C pollers. (Timing ratios are
    reported by the benchmark, not asserted here.)"""
    ths = [T.Thread(f"spin{i}") for i in range(2)]
    counters = [X.CountingPoller(t) for t in ths]
    results = [None, None]

    def run(i):
        results[i] = X.spin_for(ths[i], 0.2)
        ths[i].unbind()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(r > 0 for r in results)
    assert [c.count for c in counters] == results
    for t in ths:
        _dispose(t)


# ---- misuse never crashes --------------------------------------------------------------------------
def test_uninitialised_objects_refuse_instead_of_crashing():
    th = T.Thread.__new__(T.Thread)
    with pytest.raises(ThreadExitedError):
        th.send(print)
    with pytest.raises(ThreadExitedError):
        th.poll()
    with pytest.raises(ThreadExitedError):
        th.register_poller(print)
    th.stop_loop()
    ch = T.IoChannel()
    with pytest.raises(ThreadError, match="get_io_channel"):
        ch.put()
    with pytest.raises(TypeError):
        T.Poller()


def test_binding_from_c_is_released_when_the_os_thread_ends(thread):
    def from_c():
        X.poll_loop(thread, 1)                  # binds it from C
        return thread.os_thread == threading.get_ident(), repr(thread)

    bound_there, text = in_os_thread(from_c)
    assert bound_there and "Thread-" in text    # the OS thread is named, not just numbered
    gc.collect()
    assert not thread.is_bound
    thread.poll()


def test_async_walk_continue_twice_raises():
    dev = RecordingDevice()
    ch = T.get_io_channel(dev)
    errs, done = [], []

    def fn(c, walk):
        walk.continue_walk()
        errs.append(_catch(walk.continue_walk))

    T.for_each_channel(dev, fn, done.append, asynchronous=True)
    T.current_thread().run_until(lambda: done, timeout=5)
    assert done == [0] and isinstance(errs[0], ThreadError)
    ch.put()


def test_stop_before_run_loop_starts_is_not_lost():
    th = T.Thread("early-stop")
    th.stop_loop()
    th.run_loop()                              # returns at once instead of looping forever
    th.send(lambda: None)                      # still running: stop is not exit
    th.exit()
    th.destroy()


def test_reactor_stop_right_after_start():
    for _ in range(20):
        r = T.Reactor(2, name="quick").start()
        r.stop(timeout=5)
