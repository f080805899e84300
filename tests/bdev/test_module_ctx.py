"""The per-I/O module context and the retry flag (bdev_io_ctx, bdev_io_is_retry).

A module declares how many bytes of context it uses (`ctx_size`); the layer zeroes them before
the module first sees an I/O, and never when it hands the same I/O back (a retry after -ENOMEM or
an "nomem" completion, or through a bounce buffer after -EFAULT), when the retry flag is set.
`bdev._testing.CtxProbeBdev` is a Cython module that records, per submission, what its context
looked like and then scribbles over it.
"""
import pytest

import bdev
from bdev import null
from bdev._testing import CtxProbeBdev
from bdev.core import IO_CTX_CAPACITY
from env import memory
from env.errors import InvalidArgument
from tests.bdev.helpers import Completions, poll_until


def probe(name, **kw):
    b = CtxProbeBdev(name, block_size=512, num_blocks=256, module="probe",
                     io_types=("read", "write", "unmap", "flush"), **kw).register()
    desc = bdev.open_bdev(name, write=True)
    return b, desc, desc.get_io_channel()


def close(b, desc, ch):
    ch.put()
    desc.close()
    b.unregister()


def test_capacity_is_a_cache_line_or_more():
    assert IO_CTX_CAPACITY >= 64 and IO_CTX_CAPACITY % 64 == 0


@pytest.mark.parametrize("how", ["enomem", "nomem_status"])
def test_context_is_zero_at_first_sight_and_kept_across_a_retry(how):
    b, desc, ch = probe(f"Probe_{how}", ctx_size=IO_CTX_CAPACITY)
    try:
        b.refuse(2, how)
        c = Completions()
        c.submit(desc.read_blocks, "a", ch, bytearray(512), 0, 1)
        poll_until(lambda: c.done)
        assert c.done["a"] == (True, None)
        first, *retries = b.records()
        assert first == {"retry": False, "zero": True, "aligned": True, "marker": 0}
        assert len(retries) == 2                 # refused twice: taken the third time
        for k, r in enumerate(retries):
            # the module finds what it left there, and is told it saw this I/O before
            assert r["retry"] and not r["zero"] and r["marker"] == k + 1, r
        # the next I/O reuses the same object (last in, first out): a clean context again
        c.submit(desc.read_blocks, "b", ch, bytearray(512), 0, 1)
        poll_until(lambda: "b" in c.done)
        assert b.records()[-1] == {"retry": False, "zero": True, "aligned": True, "marker": 0}
    finally:
        close(b, desc, ch)


def test_a_bounce_retry_is_a_retry():
    """-EFAULT from a DMA device's module: the layer resubmits through a bounce buffer; the
    module sees the same context and the retry flag."""
    b, desc, ch = probe("ProbeBounce", ctx_size=16, dma_required=True)
    try:
        seen = dirty(b, desc, ch)
        b.refuse(1, "efault")
        desc.write_sync(ch, bytearray(512), 0)   # ordinary memory: bounced after the refusal
        recs = b.records()[seen:]
        assert [r["retry"] for r in recs] == [False, True]
        assert recs[0]["zero"] and recs[1]["marker"] == 1
    finally:
        close(b, desc, ch)


def dirty(b, desc, ch, n=16):
    """Have `n` I/O objects of the channel go through the module (which scribbles over their
    context), so that the next I/Os reuse dirty objects."""
    c = Completions()
    for i in range(n):
        c.submit(desc.read_blocks, i, ch, bytearray(512), i, 1)
    poll_until(lambda: len(c.done) == n)
    return len(b.records())


def test_children_of_a_split_each_start_clean():
    b, desc, ch = probe("ProbeSplit", ctx_size=8, max_transfer_blocks=2)
    try:
        seen = dirty(b, desc, ch)
        desc.read_sync(ch, memory.allocate(8 * 512), 0, 8 * 512)
        desc.unmap_sync(ch, 0, 8 * 512)            # unmap: not limited by max transfer
        recs = b.records()[seen:]
        assert len(recs) == 4 + 1 and all(r["zero"] and not r["retry"] for r in recs), recs
    finally:
        close(b, desc, ch)


def test_a_module_without_context_still_sees_the_retry_flag():
    b, desc, ch = probe("ProbeNoCtx")          # ctx_size 0: nothing is zeroed
    try:
        assert b.ctx_size == 0
        b.refuse(1, "enomem")
        desc.read_sync(ch, bytearray(512), 0)
        assert [r["retry"] for r in b.records()] == [False, True]
    finally:
        close(b, desc, ch)


@pytest.mark.parametrize("bad", [IO_CTX_CAPACITY + 1, -1, 2**40, "8", 1.5])
def test_ctx_size_is_validated(bad):
    with pytest.raises(InvalidArgument, match="ctx_size"):
        null.NullBdev("NullCtx", block_size=512, num_blocks=8, module="null", io_types=("read",),
                      ctx_size=bad)
