"""Minimal reproducers of the defects in known_bugs.py, each a few lines of Python run in a child
process (some crash it). Each asserts the intended behaviour: while the defect is present it is
an xfail(strict=True); once a fix makes it pass, strict xfail fails the suite until the switch
in known_bugs.py is set to present=False (which also lets the fuzz machine cover the case again).
"""
import textwrap

import pytest

from tests.fuzz.known_bugs import BUGS
from tests.fuzz.subproc import run_snippet

PRELUDE = """
import bdev
from bdev import malloc
from env.errors import InvalidArgument, ResourceExhausted, ThreadError, UserblkError
from bdev.errors import BdevError
malloc.create("R0", num_blocks=64)
d = bdev.open_bdev("R0", write=True)
ch = d.get_io_channel()

def refused(fn, *classes):
    try:
        fn()
    except classes:
        return
    except BaseException as e:
        raise SystemExit(f"raised {type(e).__module__}.{type(e).__name__}: {e}")
    raise SystemExit("accepted")
"""

REPRODUCERS = {
    "nvme_unmap_stale_context": """
        from bdev import nvme as bdev_nvme
        from nvme.emu import EmulatedController, EmuNamespace
        bdev_nvme.attach_emulated("X", EmulatedController([EmuNamespace(1024)], name="emu-x"))
        x = bdev.open_bdev("Xn1", write=True)
        xch = x.get_io_channel()
        x.write_sync(xch, b"\\xff" * 65536, 0)
        x.unmap_sync(xch, 0, 4096)
        x.unmap_sync(xch, 61440, 4096)
        buf = bytearray(65536)
        x.read_sync(xch, buf, 0)
        zeroed = sum(1 for i in range(128) if not any(buf[i * 512:(i + 1) * 512]))
        assert zeroed == 16, f"{zeroed} blocks read as zeroes, 16 were unmapped"
        x.unmap_sync(xch, 40960, 4096)     # fails today: Data Transfer Error
    """,
    "negative_int_overflow": """
        refused(lambda: d.read(ch, bytearray(512), -512), InvalidArgument)
        refused(lambda: d.read_blocks(ch, bytearray(512), 0, -1), InvalidArgument)
        refused(lambda: d.write_zeroes(ch, 0, 2**64), InvalidArgument)
    """,
    "wrong_type_typeerror": """
        refused(lambda: d.read(ch, bytearray(512), "0"), UserblkError)
        refused(lambda: d.write(ch, "text", 0, 512), UserblkError)
        refused(lambda: d.submit(ch, ["read"], bytearray(512), 0, 1), UserblkError)
    """,
    "float_truncated": """
        refused(lambda: d.read_blocks(ch, bytearray(512), 1.5, 1), UserblkError)
        refused(lambda: d.read(ch, bytearray(512), 1024.9), UserblkError)
    """,
    "vector_iterator_refs": """
        from env import memory
        from env.errors import BufferBusyError
        buf = memory.allocate(512)
        done = []
        d.readv(ch, (b for b in [buf]), 0, cb=lambda ok, status: done.append(ok))
        refused(buf.free, BufferBusyError)     # accepted today: nothing pins it
    """,
    "put_channel_message": """
        ch.put()
        refused(lambda: d.read(ch, bytearray(512), 0), ThreadError, BdevError)
    """,
    "flush_range_unchecked": """
        refused(lambda: d.flush(ch, None, 64 * 512, 512), InvalidArgument)   # past the end
        refused(lambda: d.flush(ch, None, 0, 0), InvalidArgument)            # zero bytes
    """,
    "destruct_before_io_done": """
        import env.thread
        ch.put(); d.close(); malloc.delete("R0")
        malloc.create("R1", num_blocks=64, optimal_io_boundary=1,
                      split_on_optimal_io_boundary=True)
        d = bdev.open_bdev("R1", write=True)
        ch = d.get_io_channel()
        done = []
        d.read(ch, bytearray(64 * 512), 0, cb=lambda ok, status: done.append(ok))
        malloc.delete("R1")
        d.close()
        ch.put()              # segfaults today: the children reach the destructed module
        env.thread.current_thread().run_until(lambda: done, timeout=5)
        assert len(done) == 1, done
    """,
    "pybdev_submit_garbage": """
        import env.thread
        from bdev.core import PyBdev
        class Garbage(PyBdev):
            def submit(self, io):
                return "not an errno"
        Garbage("G0", block_size=512, num_blocks=8, module="garbage", io_types=["read"]).register()
        g = bdev.open_bdev("G0")
        gch = g.get_io_channel()
        done = []
        g.read(gch, bytearray(512), 0, cb=lambda ok, status: done.append(ok))
        env.thread.current_thread().run_until(lambda: done, timeout=2)   # times out today
        assert done == [False] and gch.outstanding == 0, (done, gch.outstanding)
    """,
    "pybdev_views_outlive_io": """
        from bdev.core import PyBdev
        kept = []
        class Keeper(PyBdev):
            def submit(self, io):
                kept.extend(io.buffers())
                io.complete("success")
        Keeper("K0", block_size=512, num_blocks=8, module="keeper", io_types=["read"]).register()
        k = bdev.open_bdev("K0")
        kch = k.get_io_channel()
        k.read_sync(kch, bytearray(512), 0)
        refused(lambda: kept[0].__setitem__(0, 1), Exception)   # writes freed memory today
    """,
    "nvme_options_unvalidated": """
        from bdev import nvme as bdev_nvme
        from nvme.emu import EmulatedController, EmuNamespace
        for i, opts in enumerate([{"io_timeout_s": -1}, {"io_timeout_s": float("nan")},
                                  {"io_timeout_s": "5"}, {"io_queue_requests": 0}]):
            emu = EmulatedController([EmuNamespace(16)], name=f"emu-{i}")
            refused(lambda: bdev_nvme.attach_emulated(f"X{i}", emu, options=opts),
                    InvalidArgument)
    """,
    "config_raw_errors": """
        import os, tempfile
        from bdev.config import ConfigError, load_config
        path = os.path.join(tempfile.mkdtemp(), "c.json")
        with open(path, "wb") as f:
            f.write(b'{"subsystems": [\\xff]}')
        refused(lambda: load_config(path), ConfigError)
        refused(lambda: load_config('{"subsystems": ' + "[" * 100000 + "]" * 100000 + "}"),
                ConfigError)
        refused(lambda: load_config({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": ["a"]}]}]}), ConfigError)
    """,
    "malloc_create_bad_args": """
        refused(lambda: malloc.create("R2", size="64M"), InvalidArgument)
        refused(lambda: malloc.create("R3", num_blocks=8, block_size=0), InvalidArgument)
    """,
}


def _params():
    for name, code in REPRODUCERS.items():
        bug = BUGS[name]
        marks = [pytest.mark.xfail(strict=True, reason=bug.summary)] if bug.present else []
        yield pytest.param(name, code, marks=marks, id=name)


def test_every_known_bug_has_a_reproducer():
    assert set(REPRODUCERS) == set(BUGS)


@pytest.mark.parametrize("name, code", list(_params()))
def test_known_bug(name, code):
    r = run_snippet(PRELUDE + textwrap.dedent(code), timeout=60)
    assert r.returncode == 0, f"{name}: {BUGS[name].summary}\n{r.describe()}"
