"""A bdev's end: a module never sees a submission after its destruct.

Destruct runs once the bdev is unregistered, every descriptor is closed, every channel released
and every I/O completed. What the layer still holds when the bdev is unregistered (split children
not issued yet, I/O waiting in the NOMEM queue) fails with the "removed" status (errno ENODEV)
instead of reaching the module; what the module already holds completes normally.
"""
import errno
import subprocess
import sys
import textwrap

import bdev
from env.thread import current_thread
from tests.bdev.helpers import Completions, RecordingBdev, poll_until


class Watchful(RecordingBdev):
    """Records submissions that arrive after destruct (they must not)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.after_destruct = []

    def submit(self, io):
        if self.destructed:
            self.after_destruct.append((io.type, io.offset_blocks, io.num_blocks))
        return super().submit(io)


def run_isolated(code):
    """Run `code` in a Python process of its own (a crash must not take pytest down); its
    standard output, split in words."""
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_split_read_then_delete_close_put_does_not_crash():
    """The report's steps, in a process of their own (they used to segfault): a split read in
    flight on a malloc bdev, `malloc.delete`, the last descriptor closed, then `put()`."""
    out = run_isolated("""
        import faulthandler; faulthandler.enable()
        import bdev
        from bdev import malloc
        from env.thread import current_thread
        malloc.create("M", num_blocks=256, optimal_io_boundary=1,
                      split_on_optimal_io_boundary=True)
        d = bdev.open_bdev("M", write=True)
        ch = d.get_io_channel()
        out = []
        d.read_blocks(ch, bytearray(64 * 512), 0, 64, cb=lambda ok, st: out.append((ok, st)))
        malloc.delete("M")
        d.close()
        ch.put()
        for _ in range(10):
            current_thread().poll()
        ok, st = out[0]
        print(len(out), ok, st.kind, st.errno)
    """)
    assert out == ["1", "False", "removed", str(errno.ENODEV)]


def test_put_delete_and_close_from_a_completion_callback():
    """A completion callback releases the channel (its last reference), closes the descriptor
    and deletes the bdev while the channel's poll still has completions to deliver: they are
    delivered, once each; the split read's children not issued yet fail "removed"; nothing
    touches freed memory (this used to segfault)."""
    out = run_isolated("""
        import bdev
        from bdev import malloc
        from env.thread import current_thread
        b = malloc.create("M", num_blocks=256, optimal_io_boundary=1,
                          split_on_optimal_io_boundary=True)
        d = bdev.open_bdev("M", write=True)
        hold = [d.get_io_channel()]
        out = []
        def cb(ok, st):
            out.append((ok, st))
            if len(out) == 1:
                hold.pop().put()
                d.close()
                malloc.delete("M")
        ch = hold[0]
        for i in range(64):
            d.read_blocks(ch, bytearray(512), i, 1, cb=cb)
        d.read_blocks(ch, bytearray(64 * 512), 0, 64, cb=cb)
        del ch
        for _ in range(10):
            current_thread().poll()
        junk = [bytearray(1 << 20) for _ in range(50)]       # reuse freed memory, if any
        for _ in range(10):
            current_thread().poll()
        print(len(out), sum(ok for ok, _ in out), *sorted({st.kind for ok, st in out if not ok}))
    """)
    assert out == ["65", "64", "removed"]


def test_children_not_yet_issued_fail_removed_and_never_reach_the_module():
    b = Watchful("RecSplitDel", num_blocks=256, optimal_io_boundary=1,
                 split_on_optimal_io_boundary=True).register()
    desc = bdev.open_bdev("RecSplitDel", write=True)
    ch = desc.get_io_channel()
    c = Completions()
    c.submit(desc.read_blocks, "split", ch, bytearray(64 * 512), 0, 64)
    issued = len(b.requests)
    assert 0 < issued < 64                       # some children wait for others to finish
    b.unregister()
    desc.close()
    assert not b.destructed                      # a channel is still held
    ch.put()
    poll_until(lambda: b.destructed)
    ok, status = c.done["split"]
    assert not ok and status.kind == "removed" and status.errno == errno.ENODEV
    assert "removed" in str(status)
    assert len(b.requests) == issued             # nothing issued after the unregister
    assert b.after_destruct == []


def test_nomem_queue_fails_removed_after_unregister():
    b = Watchful("RecNomemDel", nomem=1000).register()   # refuses everything for now
    desc = bdev.open_bdev("RecNomemDel", write=True)
    ch = desc.get_io_channel()
    c = Completions()
    for i in range(3):
        c.submit(desc.read_blocks, i, ch, bytearray(512), i, 1)
    current_thread().poll()
    assert not c.done and ch.outstanding == 3    # waiting in the NOMEM queue
    b.unregister()
    b.nomem = 0                                  # the module would take them now: too late
    poll_until(lambda: len(c.done) == 3)
    for ok, status in c.done.values():
        assert not ok and status.kind == "removed" and status.errno == errno.ENODEV
    assert b.requests == []
    ch.put()
    desc.close()
    poll_until(lambda: b.destructed)


def test_what_the_module_holds_completes_normally_and_destruct_waits_for_it():
    b = Watchful("RecHeld", defer=True).register()
    desc = bdev.open_bdev("RecHeld", write=True)
    ch = desc.get_io_channel()
    c = Completions()
    c.submit(desc.write_blocks, "held", ch, b"\x07" * 512, 3, 1)
    b.unregister()
    desc.close()
    b.release()                                  # the module completes what it held
    poll_until(lambda: c.done)
    assert c.done["held"] == (True, None) and b.data[3 * 512:4 * 512] == b"\x07" * 512
    assert not b.destructed
    ch.put()
    poll_until(lambda: b.destructed)
    assert b.after_destruct == []


def test_destruct_at_once_when_nothing_is_open():
    b = RecordingBdev("RecBare").register()
    b.unregister()
    assert b.destructed


def test_destruct_when_the_last_descriptor_closes_after_the_channels():
    b = RecordingBdev("RecOrder").register()
    desc = bdev.open_bdev("RecOrder")
    ch = desc.get_io_channel()
    b.unregister()
    ch.put()
    assert not b.destructed                      # the descriptor is still open
    desc.close()
    assert b.destructed
