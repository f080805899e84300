"""Random mixes of Read, Write, Write Zeroes, Deallocate, Compare and Flush through the driver,
checked against a byte-array model of the namespace, with commands held by the device and
controller resets thrown in.

Each example is a sequence of batches. A batch is a set of commands on disjoint LBA ranges
(reads may share ranges with other reads), submitted together on a small queue (so that some
wait in the software queue and large ones are split), then:
  - "run": polled to completion;
  - "hold": some writes are held by the device, then released;
  - "reset": the controller is reset right after submission;
  - "hold+reset": some writes are held by the device, then the controller is reset.
Every command must complete exactly once. A command that completed successfully is applied to the
model; reads must return the model's bytes; Compare must succeed exactly when the model says the
data is equal. A command aborted by the reset (ABORTED - SQ DELETION) may or may not have reached
the media: each of its blocks must then hold either the old or the new contents, which the model
adopts. At the end the whole namespace is read back through the driver and compared with the
model and with the emulator's own copy.
"""
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme.controller import ControllerOptions
from nvme.emu import EmuNamespace
from nvme.spec import NvmOpcode
from nvme.status import Generic, Media
from tests.nvme.test_driver import Calls, Rig, allocate, contents, fill, pattern

NBLOCKS = 96
MAX_OP_BLOCKS = 40              # above the 8 KiB maximum transfer (mdts=1): split


@st.composite
def batches(draw):
    bs = draw(st.sampled_from([512, 4096]))
    out = []
    for _ in range(draw(st.integers(1, 5))):
        ops, busy = [], set()           # blocks a writer in this batch touches
        read_blocks = set()
        for _ in range(draw(st.integers(1, 10))):
            kind = draw(st.sampled_from(["write", "write", "read", "read", "zeroes", "dealloc",
                                         "compare", "flush"]))
            if kind == "flush":
                ops.append(("flush",))
                continue
            n = draw(st.integers(1, MAX_OP_BLOCKS if bs == 512 else 6))
            lba = draw(st.integers(0, NBLOCKS - n))
            blocks = set(range(lba, lba + n))
            if blocks & busy or (kind not in ("read", "compare") and blocks & read_blocks):
                continue                  # keep the batch free of conflicting commands
            if kind in ("read", "compare"):
                read_blocks |= blocks
            else:
                busy |= blocks
            offset = draw(st.sampled_from([0, 4, 512, 4092]))
            if kind == "write":
                ops.append(("write", lba, n, offset, draw(st.integers(0, 2**32))))
            elif kind == "read":
                ops.append(("read", lba, n, offset))
            elif kind == "compare":
                ops.append(("compare", lba, n, offset, draw(st.booleans())))
            elif kind == "zeroes":
                ops.append(("zeroes", lba, n, draw(st.booleans())))
            else:
                ops.append(("dealloc", lba, n))
        mode = draw(st.sampled_from(["run", "run", "run", "hold", "reset", "hold+reset"]))
        out.append((ops, mode))
    return bs, out


class Model:
    def __init__(self, nblocks, bs):
        self.bs = bs
        self.data = bytearray(nblocks * bs)

    def get(self, lba, n):
        return bytes(self.data[lba * self.bs:(lba + n) * self.bs])

    def put(self, lba, payload):
        self.data[lba * self.bs:lba * self.bs + len(payload)] = payload


def run_example(bs, plan):
    r = Rig([EmuNamespace(NBLOCKS, block_size=bs)], qsize=8, requests=512, mdts=1,
            opts=ControllerOptions(io_timeout_s=0))
    try:
        ns, qp, emu = r.ns, r.qp, r.emu
        ens = emu.namespace(1)
        model = Model(NBLOCKS, bs)
        seen = {"aborted": 0, "ok": 0, "compare_failures": 0}
        for batch_no, (ops, mode) in enumerate(plan):
            calls = Calls()
            pending = {}            # tag -> (op, buffer, expected bytes)
            rule = (emu.hold(NvmOpcode.WRITE, count=2) if mode.startswith("hold") else None)
            for i, op in enumerate(ops):
                tag = (batch_no, i)
                kind = op[0]
                if kind == "write":
                    _, lba, n, off, seed = op
                    payload = pattern(seed, n * bs)
                    buf = allocate(off + n * bs)
                    fill(buf, payload, off)
                    ns.write(qp, buf, lba, n, calls.cb(tag), offset=off)
                    pending[tag] = (op, buf, payload)
                elif kind == "read":
                    _, lba, n, off = op
                    buf = allocate(off + n * bs, 0xEE)
                    ns.read(qp, buf, lba, n, calls.cb(tag), offset=off)
                    pending[tag] = (op, buf, model.get(lba, n))
                elif kind == "compare":
                    _, lba, n, off, same = op
                    expect = model.get(lba, n)
                    payload = expect if same else expect[:-1] + bytes([expect[-1] ^ 0x80])
                    buf = allocate(off + n * bs)
                    fill(buf, payload, off)
                    ns.compare(qp, buf, lba, n, calls.cb(tag), offset=off)
                    pending[tag] = (op, buf, same)
                elif kind == "zeroes":
                    _, lba, n, deac = op
                    ns.write_zeroes(qp, lba, n, calls.cb(tag), deallocate=deac)
                    pending[tag] = (op, None, bytes(n * bs))
                elif kind == "dealloc":
                    _, lba, n = op
                    ns.deallocate(qp, [(lba, n)], calls.cb(tag))
                    pending[tag] = (op, None, bytes(n * bs))
                else:
                    ns.flush(qp, calls.cb(tag))
                    pending[tag] = (op, None, None)
            if mode.endswith("reset"):
                r.ctrl.reset()
            if rule is not None:
                rule.cancel()
                emu.release()
            deadline = time.monotonic() + 20
            while len(calls) < len(pending):
                qp.process_completions()
                assert time.monotonic() < deadline, "completions missing"
            assert qp.process_completions() == 0
            calls.assert_each_once(pending)
            assert qp.outstanding == 0 and qp.queued == 0
            for tag, (op, buf, expect) in pending.items():
                cpl = calls.status(tag)
                kind = op[0]
                if cpl.status.matches(Generic.ABORTED_SQ_DELETION):
                    seen["aborted"] += 1
                    assert mode.endswith("reset"), (op, cpl)
                    if kind in ("write", "zeroes", "dealloc"):
                        lba, n = op[1], op[2]
                        for b in range(n):
                            actual = ens.read_blocks(lba + b)
                            old = model.get(lba + b, 1)
                            new = expect[b * bs:(b + 1) * bs]
                            assert actual in (old, new), (op, b)
                            model.put(lba + b, actual)
                elif kind == "compare":
                    if expect:
                        assert cpl.ok, (op, cpl)
                    else:
                        assert cpl.status.matches(Media.COMPARE_FAILURE), (op, cpl)
                        seen["compare_failures"] += 1
                else:
                    assert cpl.ok, (op, cpl)
                    seen["ok"] += 1
                    if kind == "read":
                        lba, n, off = op[1], op[2], op[3]
                        assert contents(buf, off, n * bs) == expect, op
                    elif kind in ("write", "zeroes", "dealloc"):
                        model.put(op[1], expect)
                if buf is not None:
                    buf.free()           # never still pinned once the completion ran
            assert ens.read_blocks(0, NBLOCKS) == bytes(model.data)
        everything = allocate(NBLOCKS * bs, 0xEE)
        ns.read_sync(qp, everything, 0, NBLOCKS)
        assert contents(everything) == bytes(model.data)
        s = qp.stats()
        assert s["submitted"] == s["completed"] and s["bogus_completions"] == 0
        seen.update(s)
        seen["resets"] = r.ctrl.reset_count
        seen["held"] = emu.counters["faults.hold"]
        return seen
    finally:
        r.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_random_operations_match_the_model(case):
    bs, plan = case
    run_example(bs, plan)


def test_seeded_long_run():
    """One long deterministic run (the same every time), with every mode."""
    import random
    rng = random.Random(1234)
    plan = []
    for b in range(40):
        ops, busy = [], set()
        for _ in range(12):
            n = rng.randint(1, MAX_OP_BLOCKS // 3)
            lba = rng.randint(0, NBLOCKS - n)
            blocks = set(range(lba, lba + n))
            if blocks & busy:
                continue
            busy |= blocks
            kind = rng.choice(["write", "write", "read", "zeroes", "dealloc"])
            off = rng.choice([0, 4, 512])
            ops.append({"write": ("write", lba, n, off, rng.getrandbits(32)),
                        "read": ("read", lba, n, off),
                        "zeroes": ("zeroes", lba, n, rng.random() < 0.5),
                        "dealloc": ("dealloc", lba, n)}[kind])
        plan.append((ops, ["run", "hold", "reset", "hold+reset"][b % 4]))
    seen = run_example(512, plan)
    # the run went through every path it is meant to exercise
    assert seen["resets"] == 20 and seen["aborted"] > 0 and seen["held"] > 0
    assert seen["splits"] > 0 and seen["queued_total"] > 0 and seen["ok"] > 100
