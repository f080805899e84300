"""One queue pair per OS thread: threads write disjoint ranges at the same time through their own
queue pairs (while another thread administers the controller), then everything is verified.

The emulated controller runs inside the doorbell traps under the GIL, so this is about
correctness (no lost, duplicated or misdirected completion, no data in the wrong place), not
about parallel speed. The emulator's counters are not exact under concurrent traps, so only data
and completions are checked here."""
import random
import threading

from nvme.controller import ControllerOptions
from nvme.emu import EmuNamespace
from tests.nvme.test_driver import (Calls, allocate, contents, fill, make_rig,  # noqa: F401
                                    pattern, poll_until)

BLOCK = 512


def worker_io(r, base, nblocks, seed, barrier, out, qd=24, qsize=16):
    """Write [base, base + nblocks) in random-sized pieces at queue depth `qd` through a queue
    pair of this thread, then read it back the same way; results go to `out`."""
    try:
        qp = r.ctrl.create_io_qpair(qsize, requests=1024)
        rng = random.Random(repr(seed))
        pieces, lba = [], base
        while lba < base + nblocks:
            n = min(rng.randint(1, 24), base + nblocks - lba)
            pieces.append((lba, n))
            lba += n
        data = pattern(seed, nblocks * BLOCK)
        wbuf = allocate(nblocks * BLOCK)
        fill(wbuf, data)
        rbuf = allocate(nblocks * BLOCK, 0xEE)
        calls = Calls()
        barrier.wait(10)
        for phase, buf, submit in (("w", wbuf, r.ns.write), ("r", rbuf, r.ns.read)):
            todo = list(pieces)
            inflight = [0]

            def start():
                lba, n = todo.pop()
                done = calls.cb((phase, lba))

                def cb(cpl):
                    done(cpl)
                    inflight[0] -= 1
                    if todo:
                        start()
                inflight[0] += 1
                submit(qp, buf, lba, n, cb, offset=(lba - base) * BLOCK)

            for _ in range(min(qd, len(todo))):
                start()
            poll_until(lambda: inflight[0] == 0 and not todo, qp, timeout=60)
        calls.assert_each_once([(p, lba) for p in "wr" for lba, _ in pieces])
        out["errors"] = [t for t in calls.order if not calls.status(t).ok]
        out["read_back"] = contents(rbuf) == data
        out["data"] = data
        out["stats"] = qp.stats()
        out["qid"] = qp.qid
        wbuf.free()
        rbuf.free()
    except BaseException as e:                      # noqa: BLE001 - handed back to the test
        out["exception"] = e


def test_two_threads_two_queue_pairs_disjoint_ranges(make_rig):
    nblocks = 6000
    r = make_rig([EmuNamespace(2 * nblocks + 100, block_size=BLOCK)], qsize=None,
                 max_ioqpairs=4, opts=ControllerOptions(io_timeout_s=0))
    barrier = threading.Barrier(3)
    outs = [{}, {}]
    threads = [threading.Thread(target=worker_io,
                                args=(r, 50 + i * nblocks, nblocks, f"t{i}", barrier, outs[i]))
               for i in range(2)]
    for t in threads:
        t.start()
    barrier.wait(10)
    # meanwhile this thread administers the same controller
    admin_rounds = 0
    while any(t.is_alive() for t in threads) and admin_rounds < 20000:
        assert r.ctrl.get_features(0x07).ok
        r.ctrl.poll_admin()
        admin_rounds += 1
    assert admin_rounds > 1
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    for i, out in enumerate(outs):
        assert "exception" not in out, out.get("exception")
        assert out["errors"] == []
        assert out["read_back"], f"thread {i} read back something else"
        s = out["stats"]
        assert s["submitted"] == s["completed"] and s["outstanding"] == 0 and s["queued"] == 0
        assert s["bogus_completions"] == 0
    assert outs[0]["qid"] != outs[1]["qid"]
    ens = r.emu.namespace(1)
    assert ens.read_blocks(50, nblocks) == outs[0]["data"]
    assert ens.read_blocks(50 + nblocks, nblocks) == outs[1]["data"]
    assert ens.read_blocks(0, 50) == bytes(50 * BLOCK)
    assert ens.read_blocks(50 + 2 * nblocks, 50) == bytes(50 * BLOCK)


def test_four_threads_with_shadow_doorbells_off_and_small_queues(make_rig):
    nblocks = 2000
    r = make_rig([EmuNamespace(4 * nblocks, block_size=BLOCK)], qsize=None, max_ioqpairs=4,
                 dbbuf=False, mdts=1)
    barrier = threading.Barrier(4)
    outs = [{} for _ in range(4)]
    threads = [threading.Thread(target=worker_io,
                                args=(r, i * nblocks, nblocks, ("q", i), barrier, outs[i]),
                                kwargs=dict(qd=8, qsize=4))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    ens = r.emu.namespace(1)
    for i, out in enumerate(outs):
        assert "exception" not in out, out.get("exception")
        assert out["errors"] == [] and out["read_back"]
        assert ens.read_blocks(i * nblocks, nblocks) == out["data"]
