"""Property-based: bdev stacks behave like a byte array.

Hypothesis draws batches of I/Os (write, read, write zeroes, unmap, compare, vectored write/read)
over disjoint block ranges, submits each batch at once, polls until everything completed, and
checks every read and compare against a bytearray model, then the whole device. The stacks
exercise the layer's machinery: a malloc bdev, and a Python module with a small maximum transfer,
an optimal I/O boundary, a required alignment (bounce), refusals for lack of resources (NOMEM
retry) and completions delivered late. On the Python module it also checks what reached it: each
I/O split exactly as the rules say (the largest child the maximum transfer and the boundary
allow, unmaps not limited by the maximum transfer) and every buffer aligned.
"""
import random

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import bdev
from bdev import malloc
from tests.bdev.helpers import Completions, RecordingBdev, poll_until

BLOCKS = 256
BS = 512
MAX_TRANSFER = 5
BOUNDARY = 8
ALIGN = 64

ops = st.lists(
    st.tuples(st.sampled_from(["write", "read", "write_zeroes", "unmap", "compare",
                               "writev", "readv"]),
              st.integers(0, BLOCKS - 1), st.integers(1, 24), st.integers(0, 2**32)),
    min_size=1, max_size=12)


def disjoint(batch):
    taken = set()
    out = []
    for kind, off, n, seed in batch:
        n = min(n, BLOCKS - off)
        span = set(range(off, off + n))
        if span & taken:
            continue
        taken |= span
        out.append((kind, off, n, seed))
    return out


class Stack:
    def __init__(self, kind):
        self.kind = kind
        if kind == "malloc":
            self.b = malloc.create("ModelMalloc", num_blocks=BLOCKS, block_size=BS)
        else:
            self.b = RecordingBdev("ModelRec", num_blocks=BLOCKS, block_size=BS,
                                   max_transfer_blocks=MAX_TRANSFER,
                                   optimal_io_boundary=BOUNDARY,
                                   split_on_optimal_io_boundary=True, required_alignment=ALIGN,
                                   nomem=3, defer=(kind == "deferred")).register()
        self.desc = bdev.open_bdev(self.b.name, write=True)
        self.ch = self.desc.get_io_channel()
        self.model = bytearray(BLOCKS * BS)

    def close(self):
        self.ch.put()
        self.desc.close()
        self.b.unregister()

    def check_split(self, submitted, since):
        """What reached the module since request number `since` is exactly the children the
        split rules make of the I/Os `submitted` ((type, offset, blocks) each)."""
        if self.kind == "malloc":
            return
        want = sorted(child for io in submitted for child in children(*io))
        assert sorted(self.b.requests[since[0]:]) == want
        assert all(a % ALIGN == 0 for a in self.b.addresses[since[1]:])

    def mark(self):
        return (len(self.b.requests), len(self.b.addresses)) if self.kind != "malloc" else None

    def run_batch(self, batch):
        since = self.mark()
        submitted = [({"writev": "write", "readv": "read"}.get(kind, kind), off, n)
                     for kind, off, n, _ in batch]
        c = Completions()
        reads = {}
        expect_cmp = {}
        for i, (kind, off, n, seed) in enumerate(batch):
            rnd = random.Random(seed)
            data = rnd.randbytes(n * BS)
            lo, hi = off * BS, (off + n) * BS
            if kind == "write":
                # an odd offset into a bytearray: the layer must bounce for alignment 64
                raw = bytearray(len(data) + 1)
                raw[1:] = data
                c.submit(self.desc.write, i, self.ch, memoryview(raw)[1:], lo)
                self.model[lo:hi] = data
            elif kind == "writev":
                cut = rnd.randrange(1, n) * BS if n > 1 else len(data)
                parts = [data[:cut], data[cut:]] if cut < len(data) else [data]
                c.submit(self.desc.writev, i, self.ch, parts, lo)
                self.model[lo:hi] = data
            elif kind in ("read", "readv"):
                if kind == "read":
                    buf = bytearray(hi - lo)
                    c.submit(self.desc.read, i, self.ch, buf, lo)
                    reads[i] = ([buf], bytes(self.model[lo:hi]))
                else:
                    bufs = [bytearray(BS) for _ in range(n)]
                    c.submit(self.desc.readv, i, self.ch, bufs, lo)
                    reads[i] = (bufs, bytes(self.model[lo:hi]))
            elif kind in ("write_zeroes", "unmap"):
                c.submit(getattr(self.desc, kind), i, self.ch, lo, hi - lo)
                self.model[lo:hi] = bytes(hi - lo)
            elif kind == "compare":
                same = bool(seed & 1)
                probe = bytes(self.model[lo:hi]) if same else data
                c.submit(self.desc.compare, i, self.ch, probe, lo)
                expect_cmp[i] = same or probe == bytes(self.model[lo:hi])
        if self.kind == "deferred":
            for _ in range(3):
                self.b.release()
                for _ in range(5):
                    self.ch.thread.poll()
        poll_until(lambda: (self.b.release() if self.kind == "deferred" else None)
                   or len(c.done) == len(batch))
        for i, (ok, status) in c.done.items():
            kind = batch[i][0]
            if kind == "compare":
                assert ok == expect_cmp[i], status
                if not ok:
                    assert status.kind == "miscompare"
            else:
                assert ok, status
        for i, (bufs, want) in reads.items():
            assert b"".join(bytes(b) for b in bufs) == want
        assert self.ch.outstanding == 0
        self.check_split(submitted, since)


def children(io_type, off, n):
    """The children the layer makes of an I/O on the module: each as long as the maximum
    transfer (not for unmap) and the next boundary allow."""
    out = []
    end = off + n
    while off < end:
        k = end - off
        if io_type != "unmap":
            k = min(k, MAX_TRANSFER)
        k = min(k, BOUNDARY - off % BOUNDARY)
        out.append((io_type, off, k))
        off += k
    return out


@pytest.mark.parametrize("kind", ["malloc", "recording", "deferred"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=[Phase.explicit, Phase.generate])
@given(batches=st.lists(ops, min_size=1, max_size=5))
def test_stack_matches_a_byte_array(kind, batches):
    s = Stack(kind)
    try:
        for batch in batches:
            s.run_batch(disjoint(batch))
        whole = bytearray(BLOCKS * BS)
        done = []
        since = s.mark()
        s.desc.read(s.ch, whole, 0, cb=lambda ok, st: done.append(ok))
        poll_until(lambda: (s.b.release() if s.kind == "deferred" else None) or done)
        assert done == [True] and whole == s.model
        s.check_split([("read", 0, BLOCKS)], since)
    finally:
        s.close()
