"""Modules written in Python (PyBdev): whatever the module does, every I/O the layer accepted
completes exactly once, and the memory of an I/O is out of the module's reach once it completed.

- `submit` may raise, return something that is not None/0/a negative errno, complete the I/O twice,
  complete it from another OS thread, or never complete it before its channel is put: the I/O
  still completes once (failed with a logged error, or aborted at `put()`), and the module's late
  or repeated `complete()` raises a typed error.
- The memoryviews `PyIo.buffers()` hands out stop working when the I/O completes; views derived
  from them keep the memory they point at alive (and the caller's buffer pinned), so a module
  that keeps one can never write into freed memory.
"""
import errno
import logging
import threading

import pytest

import bdev
from bdev._testing import CSubmitter
from bdev.core import PyBdev
from bdev.errors import BdevError, IoCompletedError
from env import memory
from env.errors import BufferBusyError, WrongThreadError
from env.thread import current_thread
from tests.bdev.helpers import Completions, RecordingBdev, poll_until


class Keeper(PyBdev):
    """Keeps every I/O (and whatever `on_submit` returns) for the test to finish."""

    def __init__(self, name, num_blocks=64, returns=None, **kw):
        super().__init__(name, block_size=512, num_blocks=num_blocks, module="keeper",
                         io_types=("read", "write", "flush"), **kw)
        self.ios = []
        self.returns = returns

    def submit(self, io):
        self.ios.append(io)
        r = self.returns
        return r(io) if callable(r) else r


def stack(b):
    b.register()
    desc = bdev.open_bdev(b.name, write=True)
    return desc, desc.get_io_channel()


def finish(b, desc, ch):
    if not ch.released:
        ch.put()
    desc.close()
    b.unregister()


# ---- what submit returns ----------------------------------------------------------------------
@pytest.mark.parametrize("ret", ["ok", 2.5, object(), True, 5, [0]], ids=repr)
def test_submit_returning_garbage_fails_the_io_once(ret, caplog):
    b = Keeper(f"PyGarbage{abs(hash(repr(ret))) % 1000}", returns=lambda io: ret)
    desc, ch = stack(b)
    c = Completions()
    try:
        with caplog.at_level(logging.ERROR, logger="userblk.bdev"):
            c.submit(desc.read_blocks, "r", ch, bytearray(512), 0, 1)
            poll_until(lambda: c.done)
        ok, status = c.done["r"]
        assert not ok and status.kind == "failed" and status.errno == errno.EIO
        assert "submit() returned" in caplog.text and b.name in caplog.text
        assert ch.outstanding == 0
        with pytest.raises(IoCompletedError):
            b.ios[0].complete()                # the refused I/O is not the module's any more
        for _ in range(3):
            current_thread().poll()
        assert len(c.done) == 1
    finally:
        finish(b, desc, ch)


def test_submit_raising_fails_the_io_once_and_later_completion_raises(caplog):
    def boom(io):
        raise RuntimeError("backend exploded")

    b = Keeper("PyRaises", returns=boom)
    desc, ch = stack(b)
    c = Completions()
    try:
        with caplog.at_level(logging.ERROR, logger="userblk.bdev"):
            c.submit(desc.read_blocks, "r", ch, bytearray(512), 0, 1)
            poll_until(lambda: c.done)
        assert not c.done["r"][0] and "backend exploded" in caplog.text
        with pytest.raises(IoCompletedError):
            b.ios[0].complete()
        assert ch.outstanding == 0
    finally:
        finish(b, desc, ch)


def test_a_nomem_refusal_takes_the_io_back():
    """-ENOMEM hands the I/O back to the layer (retried later with a new PyIo): the refused
    PyIo can no longer complete it."""
    first = []

    def once_nomem(io):
        if not first:
            first.append(io)
            return -errno.ENOMEM
        assert io.is_retry
        io.complete()
        return 0

    b = Keeper("PyNomem", returns=once_nomem)
    desc, ch = stack(b)
    c = Completions()
    try:
        c.submit(desc.read_blocks, "r", ch, bytearray(512), 0, 1)
        poll_until(lambda: c.done)
        assert c.done["r"] == (True, None)
        assert not first[0].is_retry
        with pytest.raises(IoCompletedError):
            first[0].complete()
        assert len(c.done) == 1
    finally:
        finish(b, desc, ch)


# ---- complete() ---------------------------------------------------------------------------------
def test_complete_twice_raises_and_completes_once():
    b = Keeper("PyTwice")
    desc, ch = stack(b)
    c = Completions()
    try:
        c.submit(desc.read_blocks, "r", ch, bytearray(512), 0, 1)
        io = b.ios[0]
        io.complete()
        with pytest.raises(IoCompletedError, match="already"):
            io.complete()
        assert issubclass(IoCompletedError, BdevError)
        poll_until(lambda: c.done)
        for _ in range(3):
            current_thread().poll()
        assert c.done == {"r": (True, None)} and ch.outstanding == 0
    finally:
        finish(b, desc, ch)


def test_complete_from_another_os_thread_raises_wrong_thread():
    b = Keeper("PyForeign")
    desc, ch = stack(b)
    c = Completions()
    try:
        c.submit(desc.read_blocks, "r", ch, bytearray(512), 0, 1)
        io = b.ios[0]
        errors = []

        def other():
            try:
                io.complete()
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], WrongThreadError), errors
        for _ in range(3):
            current_thread().poll()
        assert not c.done and ch.outstanding == 1      # untouched: still the module's
        io.complete()                                  # from the right thread it completes
        poll_until(lambda: c.done)
        assert c.done == {"r": (True, None)}
    finally:
        finish(b, desc, ch)


def test_ios_still_held_at_put_are_aborted_once():
    b = Keeper("PyHeld")
    desc, ch = stack(b)
    c = Completions()
    try:
        for i in range(3):
            c.submit(desc.read_blocks, i, ch, bytearray(512), i, 1)
        assert ch.outstanding == 3
        b.ios[1].complete()                           # one completes normally
        ch.put()
        assert len(c.done) == 3
        assert c.done[1] == (True, None)
        for i in (0, 2):
            ok, status = c.done[i]
            assert not ok and status.kind == "aborted"
        with pytest.raises(IoCompletedError, match="aborted"):
            b.ios[0].complete()
        assert len(c.done) == 3
    finally:
        finish(b, desc, ch)
    assert ch.outstanding == 0 and b.stats()["io_error"] == 2   # nothing left behind


# ---- the views ---------------------------------------------------------------------------------
def test_views_stop_working_when_the_io_completes():
    b = Keeper("PyViews")
    desc, ch = stack(b)
    try:
        out = bytearray(512)
        desc.read_blocks(ch, out, 0, 1)
        io = b.ios[0]
        (mv,) = io.buffers()
        mv[:4] = b"abcd"
        io.complete()
        with pytest.raises(ValueError, match="released"):
            mv[0] = 1
        with pytest.raises(IoCompletedError):
            io.buffers()
        poll_until(lambda: ch.outstanding == 0)
        assert out[:4] == b"abcd"
    finally:
        finish(b, desc, ch)


def test_a_kept_slice_pins_the_callers_dma_buffer():
    """A view derived from a handed-out one survives the I/O; it keeps the caller's buffer
    alive and pinned: freeing it is refused while the slice lives, so the slice can never
    write into freed memory."""
    b = Keeper("PySlice")
    desc, ch = stack(b)
    try:
        buf = memory.allocate(4096)
        done = []
        desc.read_blocks(ch, buf, 0, 1, cb=lambda ok, st: done.append(ok))
        io = b.ios[0]
        kept = io.buffers()[0][0:16]
        io.complete()
        poll_until(lambda: done)
        with pytest.raises(BufferBusyError):
            buf.free()
        kept[0] = 0x42                         # still valid memory: the caller's buffer
        assert memoryview(buf)[0] == 0x42
        kept.release()
        buf.free()
    finally:
        finish(b, desc, ch)


def test_a_kept_slice_keeps_a_bytearray_from_moving():
    b = Keeper("PyBytearray")
    desc, ch = stack(b)
    try:
        out = bytearray(512)
        desc.read_blocks(ch, out, 0, 1)
        io = b.ios[0]
        kept = io.buffers()[0][100:]
        io.complete()
        poll_until(lambda: ch.outstanding == 0)
        with pytest.raises(BufferError):
            out.extend(b"x" * 100000)           # would move the memory the slice points at
        kept.release()
        out.extend(b"x")
    finally:
        finish(b, desc, ch)


def test_a_kept_slice_of_a_c_path_io_never_reaches_the_callers_memory():
    """On the C path the caller's memory has no Python owner to pin: the module works on a
    staging copy (copied back for reads when it completes); a slice kept afterwards writes into
    that copy, never into the caller's buffer, which the caller may free at once."""
    b = Keeper("PyCPath")
    desc, ch = stack(b)
    try:
        s = CSubmitter()
        buf = memory.allocate(4096)
        assert s.submit(desc, ch, "read", 0, 8, buf) == 0
        io = b.ios[0]
        views = io.buffers()
        kept = views[0][0:8]
        views[0][:4] = b"data"
        io.complete()
        poll_until(lambda: s.completed == 1)
        assert s.succeeded == 1 and bytes(memoryview(buf)[:4]) == b"data"
        buf.free()                               # nothing of the module points into it
        again = memory.allocate(4096)            # (likely the same memory)
        kept[:4] = b"late"
        assert bytes(memoryview(again)[:4]) != b"late"
        again.free()
    finally:
        finish(b, desc, ch)


def test_write_payload_reaches_the_module_on_the_c_path():
    b = RecordingBdev("PyCWrite").register()
    desc = bdev.open_bdev("PyCWrite", write=True)
    ch = desc.get_io_channel()
    try:
        s = CSubmitter()
        buf = memory.allocate(4096)
        memoryview(buf)[:] = bytes(range(256)) * 16
        assert s.submit(desc, ch, "write", 0, 8, buf) == 0
        poll_until(lambda: s.completed == 1)
        assert s.succeeded == 1 and bytes(b.data[:4096]) == bytes(buf)
    finally:
        finish(b, desc, ch)
