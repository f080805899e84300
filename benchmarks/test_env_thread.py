"""env.thread benchmarks: message round trips between OS threads, poll() of an idle thread, poller
iterations, one C message end to end, and whether two OS threads polling C pollers scale.

C-level figures run N operations inside one Cython call (no Python per operation); pytest-benchmark
times the whole call and `extra_info` gives the cost of one operation. Nothing here asserts a
timing: the machine is shared, so read the numbers, and compare ratios rather than absolutes.
"""
import threading
import time

import pytest

from benchmarks import results
from env import thread as T
from env import _thread_testing as X

N_RT = 20000            # round trips per timed call
N_POLL = 1_000_000      # iterations per timed C poll loop


@pytest.fixture(scope="module")
def reactor():
    with T.Reactor(1, name="bench") as r:
        yield r


@pytest.fixture
def here():
    """A Thread polled by the benchmark's own OS thread."""
    th = T.Thread("here")
    yield th
    th.exit()
    th.destroy()


def _per_op(benchmark, n, unit="ns_per_op"):
    ns = results.per_op_ns(benchmark, n, "median")
    benchmark.extra_info[unit] = None if ns is None else round(ns, 1)


# ---- round trips between two OS threads ----------------------------------------------------------
def test_round_trip_c_messages(benchmark, reactor, here):
    """a (this OS thread) -> b (reactor OS thread) -> a, C messages, both sides polling in C."""
    pp = X.PingPong(here, reactor.thread(0))
    pp.run(1000)
    benchmark.group = "message round trip, two OS threads"
    benchmark.pedantic(pp.run, args=(N_RT,), rounds=10, warmup_rounds=1)
    _per_op(benchmark, N_RT, "ns_per_round_trip")


def test_round_trip_python_messages(benchmark, reactor, here):
    """The same with Python messages: thread.send(fn) both ways; `a` is driven by run_until."""
    b = reactor.thread(0)
    count = [0]
    target = [0]

    def pong():
        count[0] += 1
        if count[0] < target[0]:
            b.send(ping)

    def ping():
        here.send(pong)

    def run(n):
        count[0] = 0
        target[0] = n
        b.send(ping)
        here.run_until(lambda: count[0] >= n, timeout=60)

    run(100)
    n = N_RT // 4
    benchmark.group = "message round trip, two OS threads"
    benchmark.pedantic(run, args=(n,), rounds=10, warmup_rounds=1)
    _per_op(benchmark, n, "ns_per_round_trip")


def test_round_trip_python_messages_one_os_thread(benchmark):
    """Two Threads on one OS thread (no cross-core traffic, no GIL hand-off): the bare cost of
    a Python message both ways."""
    a, b = T.Thread("a"), T.Thread("b")
    n = 10000

    def run():
        box = [0]

        def pong():
            box[0] += 1

        def ping():
            a.send(pong)

        for _ in range(n):
            b.send(ping)
            b.poll()
            a.poll()
        return box[0]

    benchmark.group = "message round trip, one OS thread"
    assert benchmark.pedantic(run, rounds=5, warmup_rounds=1) == n
    _per_op(benchmark, n, "ns_per_round_trip")
    for t in (a, b):
        t.exit()
        t.destroy()


# ---- one message end to end ----------------------------------------------------------------------
def test_c_message_send_and_run(benchmark, here):
    """send_c + execution of a no-op C message, batches of 32, one OS thread."""
    n = N_POLL
    benchmark.group = "message, one OS thread"
    benchmark.pedantic(X.send_and_run, args=(here, n), rounds=5, warmup_rounds=1)
    _per_op(benchmark, n, "ns_per_message")


def test_python_message_send_and_run(benchmark, here):
    """thread.send(fn) + poll() running it, from Python."""
    def noop():
        pass

    def cycle():
        here.send(noop)
        here.poll()

    benchmark.group = "message, one OS thread"
    benchmark(cycle)


# ---- poll() --------------------------------------------------------------------------------------
def test_poll_idle_python(benchmark, here):
    """thread.poll() of an idle Thread called from Python (method call + GIL release)."""
    here.poll()
    benchmark.group = "poll() of an idle thread"
    benchmark(here.poll)


def test_poll_idle_c(benchmark, here):
    """poll_c() of an idle Thread from a C loop."""
    benchmark.group = "poll() of an idle thread"
    benchmark.pedantic(X.poll_loop, args=(here, N_POLL), rounds=5, warmup_rounds=1)
    _per_op(benchmark, N_POLL, "ns_per_poll")


@pytest.mark.parametrize("n_pollers", [1, 10])
def test_active_c_poller_iteration(benchmark, here, n_pollers):
    """One iteration with `n_pollers` active C pollers (each counts and reports busy)."""
    counters = [X.CountingPoller(here) for _ in range(n_pollers)]
    benchmark.group = "iteration with active pollers (C loop)"
    benchmark.pedantic(X.poll_loop, args=(here, N_POLL), rounds=5, warmup_rounds=1)
    _per_op(benchmark, N_POLL, "ns_per_iteration")
    assert counters[0].count > 0


def test_active_python_poller_iteration(benchmark, here):
    """One iteration with one active Python poller (GIL re-acquired to call it)."""
    calls = [0]

    def poller():
        calls[0] += 1
        return 1

    here.register_poller(poller)
    n = N_POLL // 10
    benchmark.group = "iteration with active pollers (C loop)"
    benchmark.pedantic(X.poll_loop, args=(here, n), rounds=5, warmup_rounds=1)
    _per_op(benchmark, n, "ns_per_iteration")


# ---- parallelism ---------------------------------------------------------------------------------
def _spin(n_threads, seconds):
    """Each of `n_threads` OS threads polls its own Thread (one busy C poller) for `seconds`.
    Returns (total iterations, total CPU seconds of those OS threads, wall seconds)."""
    ths = [T.Thread(f"spin{i}") for i in range(n_threads)]
    _ = [X.CountingPoller(t) for t in ths]
    iters = [0] * n_threads
    cpu = [0.0] * n_threads
    start = threading.Barrier(n_threads + 1)

    def run(i):
        start.wait()
        c0 = time.thread_time()
        iters[i] = X.spin_for(ths[i], seconds)
        cpu[i] = time.thread_time() - c0
        ths[i].exit()
        ths[i].destroy()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for w in workers:
        w.start()
    start.wait()
    w0 = time.monotonic()
    for w in workers:
        w.join()
    return sum(iters), sum(cpu), time.monotonic() - w0


def test_two_os_threads_polling_c_pollers_scale(benchmark):
    """Busy C pollers on 1 and on 2 OS threads, the GIL released: ideally twice the iterations
    per wall second on two free cores. The machine has 2 cores and is shared, so extra_info also
    gives iterations per CPU second (unaffected by other load: equal on 1 and 2 threads when
    nothing serialises them) and CPU seconds per wall second (about 2 when both really ran at
    once; at most 1 if they took turns)."""
    seconds = 0.5
    results = {}

    def measure():
        results["one"] = _spin(1, seconds)
        results["two"] = _spin(2, seconds)

    benchmark.group = "parallel C pollers"
    benchmark.pedantic(measure, rounds=3)
    (i1, c1, w1), (i2, c2, w2) = results["one"], results["two"]
    benchmark.extra_info["iterations_per_wall_s_1_thread"] = round(i1 / w1)
    benchmark.extra_info["iterations_per_wall_s_2_threads"] = round(i2 / w2)
    benchmark.extra_info["wall_ratio_2_over_1"] = round((i2 / w2) / (i1 / w1), 2)
    benchmark.extra_info["iterations_per_cpu_s_1_thread"] = round(i1 / c1)
    benchmark.extra_info["iterations_per_cpu_s_2_threads"] = round(i2 / c2)
    benchmark.extra_info["cpu_s_per_wall_s_2_threads"] = round(c2 / w2, 2)
