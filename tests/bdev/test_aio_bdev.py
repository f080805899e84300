"""The file backend (bdev.aio): a bdev on a regular file or a block device, Linux native AIO (and
io_uring) polled from the channel's poller.

Every data test checks what the bdev returns against the file's contents read with plain Python
(and the other way round), through `bdev.open_bdev` descriptors. File systems: tmp_path (whatever
it is), a directory that takes O_DIRECT (tmp_path, /var/tmp or the checkout), tmpfs (/dev/shm)
and, as root, a ramfs mount - a file system that refuses O_DIRECT, for the buffered fallback.
Block devices: a loop device (root and losetup), with 512- and 4096-byte sectors.
"""
import errno
import itertools
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import bdev
from bdev import aio
from bdev.errors import IoError, ReadOnlyDescriptor, UnsupportedIoType
from env.errors import InvalidArgument
from env.memory import allocate
from env.thread import current_thread
from tests.bdev.helpers import Completions, in_threads

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
KiB, MiB = 1 << 10, 1 << 20
_names = itertools.count()


# ---- helpers ------------------------------------------------------------------------------------
def takes_o_direct(directory):
    """Does the file system of `directory` accept O_DIRECT (for a new file in it)?"""
    fd, p = tempfile.mkstemp(dir=directory, prefix=".odirect-probe-")
    os.close(fd)
    try:
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.unlink(p)


def fs_type(path):
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mnt, typ = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, typ
    return kind


def file_bytes(path, offset=0, length=None):
    """The file's contents read with plain Python (buffered; coherent with O_DIRECT writes)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def write_file(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Opened:
    """A bdev with a writable (unless readonly) descriptor and this thread's channel."""

    def __init__(self, b, write=True):
        self.bdev = b
        self.desc = bdev.open_bdev(b.name, write=write)
        self.ch = self.desc.get_io_channel()

    def close(self):
        if self.ch is not None:
            self.ch.put()
            self.ch = None
        if self.desc is not None:
            self.desc.close()
            self.desc = None
        if not self.bdev.removed:
            aio.delete(self.bdev.name)


@pytest.fixture
def make(request):
    """make(path, **create_kwargs) -> Opened; everything is closed and deleted afterwards."""
    made = []

    def _make(path, *, write=None, **kw):
        name = kw.pop("name", f"AIO{next(_names)}")
        b = aio.create(name, path, **kw)
        o = Opened(b, write=not kw.get("readonly", False) if write is None else write)
        made.append(o)
        return o
    yield _make
    for o in reversed(made):
        o.close()


def new_file(directory, size, *, fill=True, name=None):
    p = Path(directory) / (name or f"disk{next(_names)}.img")
    with open(p, "wb") as f:
        if fill:
            f.write(random.Random(size).randbytes(size))
        else:
            f.truncate(size)
    return p


@pytest.fixture(scope="session")
def dio_dir(tmp_path_factory):
    """A directory whose file system takes O_DIRECT."""
    tried = []
    for d in (tmp_path_factory.mktemp("dio"), Path("/var/tmp"), ROOT):
        try:
            if os.access(d, os.W_OK) and takes_o_direct(d):
                sub = Path(tempfile.mkdtemp(dir=d, prefix="aio-dio-"))
                yield sub
                shutil.rmtree(sub, ignore_errors=True)
                return
            tried.append(f"{d} ({fs_type(d)})")
        except OSError as e:
            tried.append(f"{d}: {e}")
    pytest.skip(reason="no writable directory on a file system that takes O_DIRECT; tried "
                + ", ".join(tried))


@pytest.fixture(scope="session")
def tmpfs_dir():
    d = Path("/dev/shm")
    if not (d.is_dir() and os.access(d, os.W_OK) and fs_type(d) == "tmpfs"):
        pytest.skip(reason="no writable tmpfs at /dev/shm")
    sub = Path(tempfile.mkdtemp(dir=d, prefix="aio-tmpfs-"))
    yield sub
    shutil.rmtree(sub, ignore_errors=True)


@pytest.fixture(scope="session")
def no_direct_dir(tmp_path_factory):
    """A directory on a file system that refuses O_DIRECT: tmp_path if it does, else a ramfs
    mounted for the test session (root)."""
    base = tmp_path_factory.mktemp("nodirect")
    if not takes_o_direct(base):
        yield base
        return
    if not IS_ROOT:
        pytest.skip(reason=f"{base} ({fs_type(base)}) takes O_DIRECT and mounting a ramfs (which does "
                    "not) needs root")
    r = subprocess.run(["mount", "-t", "ramfs", "-o", "size=64m", "userblk-aio-test", str(base)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(reason=f"cannot mount a ramfs on {base}: {r.stderr.strip()}")
    try:
        if takes_o_direct(base):
            pytest.skip(reason="this kernel's ramfs takes O_DIRECT: no file system refuses it here")
        yield base
    finally:
        subprocess.run(["umount", str(base)], capture_output=True)


ENGINES = ["aio", "uring"]


@pytest.fixture(params=ENGINES)
def engine(request):
    if request.param == "uring" and not aio.uring_available():
        pytest.skip(reason="io_uring is not available on this kernel (disabled or filtered)")
    return request.param


@pytest.fixture(params=["o_direct", "buffered"])
def data_dir(request, dio_dir, tmp_path):
    """Where the data-path tests put their file, and whether O_DIRECT is to be used there."""
    if request.param == "o_direct":
        return dio_dir, None
    return tmp_path, False


# ---- data path ----------------------------------------------------------------------------------
def test_round_trip_sizes_and_offsets(make, data_dir, engine):
    """Writes of 1 block to 1 MiB at scattered offsets, from DMA buffers and from bytes; the file
    read with Python sees them; reads through the bdev return what the file holds."""
    directory, direct = data_dir
    size = 8 * MiB
    path = new_file(directory, size)
    o = make(path, engine=engine, direct=direct)
    d, ch = o.desc, o.ch
    assert o.bdev.num_blocks * o.bdev.block_size == size
    assert o.bdev.direct == (direct is None)
    rng = random.Random(7)
    sizes = [512, 1024, 4096, 3 * 512, 8 * KiB, 64 * KiB, 128 * KiB + 512, MiB]
    for n in sizes:
        for _ in range(3):
            off = rng.randrange(0, (size - n) // 512) * 512
            data = rng.randbytes(n)
            if n % 1024:
                d.write_sync(ch, data, off)                  # bytes: bounced if direct
            else:
                buf = allocate(n)
                memoryview(buf)[:] = data
                d.write_sync(ch, buf, off)
                buf.free()
            assert file_bytes(path, off, n) == data
    # and the other way: the file written by Python, read through the bdev
    for n in sizes:
        off = rng.randrange(0, (size - n) // 512) * 512
        data = rng.randbytes(n)
        write_file(path, off, data)
        buf = allocate(max(n, 4096))
        d.read_sync(ch, buf, off, n)
        assert bytes(memoryview(buf)[:n]) == data
        buf.free()
        ba = bytearray(n)
        d.read_sync(ch, ba, off)
        assert ba == data
    assert d.bdev.stats()["io_error"] == 0


def test_whole_device_read_matches_file(make, dio_dir, engine):
    path = new_file(dio_dir, 2 * MiB)
    o = make(path, engine=engine, block_size=4096)
    buf = allocate(2 * MiB)
    o.desc.read_sync(o.ch, buf, 0)
    assert bytes(buf) == file_bytes(path)
    buf.free()


def test_misaligned_and_bytearray_buffers_are_bounced(make, dio_dir, engine):
    """O_DIRECT needs aligned memory: required_alignment tells the layer, which bounces
    bytearrays and views at odd addresses; the data still lands where it belongs."""
    path = new_file(dio_dir, MiB)
    o = make(path, engine=engine)
    b = o.bdev
    assert b.direct and b.required_alignment == b.dio_alignment >= 512
    assert b.info()["required_alignment"] == b.required_alignment.bit_length() - 1
    backing = bytearray(64 * KiB + 1)
    for shift in (1, 3, 17):
        view = memoryview(backing)[shift:shift + 16 * KiB]
        data = random.randbytes(16 * KiB)
        view[:] = data
        o.desc.write_sync(o.ch, view, 32 * KiB)
        assert file_bytes(path, 32 * KiB, 16 * KiB) == data
        view[:] = bytes(16 * KiB)
        o.desc.read_sync(o.ch, view, 32 * KiB)
        assert bytes(view) == data


def test_vectored_io(make, data_dir, engine):
    """readv/writev: aligned segments go to the kernel as PREADV/PWRITEV; segments whose
    lengths O_DIRECT refuses, and more than IOV_MAX segments, are bounced by the module."""
    directory, direct = data_dir
    path = new_file(directory, 4 * MiB)
    o = make(path, engine=engine, direct=direct)
    d, ch = o.desc, o.ch
    big = allocate(8 * MiB)
    cases = {
        "aligned": [4096, 8192, 512, 4096 * 3],
        "odd-lengths": [100, 412, 1000, 24, 512 * 3],
        "iov-max": [512] * 1100,
    }
    off = 0
    for label, lengths in cases.items():
        total = sum(lengths)
        assert total % 512 == 0
        data = random.randbytes(total)
        segs, pos, addr = [], 0, 0
        for n in lengths:           # slices of one DMA buffer, each starting 4 KiB-aligned
            seg = memoryview(big)[addr:addr + n]
            seg[:] = data[pos:pos + n]
            segs.append(seg)
            pos += n
            addr += (n + 4095) // 4096 * 4096
        before = ch.aio_stats()["bounced"]
        d.writev_sync(ch, segs, off)
        assert file_bytes(path, off, total) == data, label
        for s in segs:
            s[:] = bytes(len(s))
        d.readv_sync(ch, segs, off)
        assert b"".join(bytes(s) for s in segs) == data, label
        bounced = ch.aio_stats()["bounced"] - before
        if label == "aligned":
            assert bounced == 0
        elif label == "iov-max":
            assert bounced == 2, label         # the write and the read
        elif direct is not None:
            # odd segment lengths never reach the module: the bdev layer bounces them against
            # required_alignment before submission
            assert bounced == 0, label
        off += (total + 4095) // 4096 * 4096


def test_async_beyond_queue_depth_retries(make, dio_dir, engine):
    """128 I/Os at once on a channel whose AIO context holds 4: the module says -ENOMEM, the
    layer queues and retries, every I/O completes exactly once with the right data."""
    path = new_file(dio_dir, 4 * MiB, fill=False)
    o = make(path, engine=engine, queue_depth=4, block_size=4096)
    d, ch = o.desc, o.ch
    c = Completions()
    bufs = []
    for i in range(128):
        buf = allocate(4096)
        memoryview(buf)[:] = bytes([i]) * 4096
        bufs.append(buf)
        d.write(ch, buf, i * 8192, cb=c.cb(("w", i)))
    assert ch.aio_stats()["inflight"] <= 4
    c.wait(ch, 128)
    assert all(ok for ok, _ in c.done.values())
    for i in range(128):
        assert file_bytes(path, i * 8192, 4096) == bytes([i]) * 4096
    rbufs = [allocate(4096) for _ in range(128)]
    for i, buf in enumerate(rbufs):
        d.read(ch, buf, i * 8192, cb=c.cb(("r", i)))
    c.wait(ch, 256)
    assert all(bytes(buf) == bytes([i]) * 4096 for i, buf in enumerate(rbufs))
    assert ch.stats()["nomem_retries"] > 0
    st = ch.aio_stats()
    assert st["submitted"] == st["completed"] == 256 and st["inflight"] == 0
    for buf in bufs + rbufs:
        buf.free()


def test_flush(make, dio_dir, engine):
    path = new_file(dio_dir, MiB)
    o = make(path, engine=engine)
    o.desc.write_sync(o.ch, b"\xab" * 4096, 0)
    o.desc.flush_sync(o.ch)
    assert o.bdev.fdsync_supported, "IOCB_CMD_FDSYNC / IORING_OP_FSYNC refused"
    assert o.ch.aio_stats()["sync_ops"] == 0          # it went through the engine
    # the synchronous fallback (what a kernel without asynchronous fsync gets)
    o.bdev._disable_async_flush()
    o.desc.flush_sync(o.ch)
    assert o.ch.aio_stats()["sync_ops"] == 1
    assert file_bytes(path, 0, 4096) == b"\xab" * 4096


def check_zeroing(o, path, op):
    d, ch = o.desc, o.ch
    data = random.randbytes(256 * KiB)
    d.write_sync(ch, data, 0)
    getattr(d, op + "_sync")(ch, 64 * KiB, 64 * KiB)
    expect = data[:64 * KiB] + bytes(64 * KiB) + data[128 * KiB:]
    assert file_bytes(path, 0, 256 * KiB) == expect
    buf = bytearray(256 * KiB)
    d.read_sync(ch, buf, 0)
    assert buf == expect
    assert os.path.getsize(path) == o.bdev.size          # KEEP_SIZE


@pytest.mark.parametrize("op", ["unmap", "write_zeroes"])
def test_unmap_and_write_zeroes_read_back_zeros(make, data_dir, op):
    directory, direct = data_dir
    path = new_file(directory, MiB)
    o = make(path, direct=direct)
    if not o.bdev.io_type_supported(op) and op == "unmap":
        pytest.skip(reason=f"the file system of {path} ({fs_type(path)}) cannot punch holes")
    check_zeroing(o, path, op)


def test_unmap_punches_a_hole(make, dio_dir):
    path = new_file(dio_dir, 4 * MiB)
    o = make(path)
    if not o.bdev.io_type_supported("unmap"):
        pytest.skip(reason=f"{fs_type(path)} cannot punch holes")
    before = os.stat(path).st_blocks
    o.desc.unmap_sync(o.ch, MiB, 2 * MiB)
    assert os.stat(path).st_blocks <= before - (2 * MiB) // 512 + 64      # allocation is gone
    assert o.bdev.stats()["num_unmap_ops"] == 1


def test_tmpfs_write_zeroes_emulated_by_the_layer(make, tmpfs_dir):
    """tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the bdev does not advertise Write
    Zeroes and the layer emulates it with writes; both still read back as zeros."""
    path = new_file(tmpfs_dir, MiB)
    o = make(path)
    assert o.bdev.io_type_supported("unmap")
    assert not o.bdev.io_type_supported("write_zeroes")
    check_zeroing(o, path, "write_zeroes")
    check_zeroing(o, path, "unmap")


def test_reset_waits_for_inflight_io(make, dio_dir, engine):
    path = new_file(dio_dir, 4 * MiB)
    o = make(path, engine=engine)
    d, ch = o.desc, o.ch
    d.reset_sync(ch)                                   # nothing in flight: completes at once
    c = Completions()
    bufs = [allocate(64 * KiB) for _ in range(16)]
    for i, buf in enumerate(bufs):
        d.read(ch, buf, i * 64 * KiB, cb=c.cb(i))
    d.reset(ch, cb=c.cb("reset"))
    late = allocate(4096)
    d.read(ch, late, 0, cb=c.cb("after"))
    c.wait(ch, 18)
    assert all(ok for ok, _ in c.done.values())
    pos = c.order.index("reset")
    assert set(range(16)) <= set(c.order[:pos]), c.order     # "after" may overtake it
    for i, buf in enumerate(bufs):
        assert bytes(buf) == file_bytes(path, i * 64 * KiB, 64 * KiB)
        buf.free()
    late.free()


def test_reads_past_a_truncated_end_fail_with_a_status(make, dio_dir, engine):
    """The file shrinks under the bdev: reads beyond its new end come back short or empty and
    fail with a status (IoError from the blocking helper), never a crash; the rest works."""
    path = new_file(dio_dir, MiB)
    o = make(path, engine=engine, block_size=4096)
    d, ch = o.desc, o.ch
    os.truncate(path, 256 * KiB)
    buf = allocate(8192)
    with pytest.raises(IoError) as ei:
        d.read_sync(ch, buf, 512 * KiB)                # wholly beyond: 0 bytes
    assert ei.value.status.kind == "failed" and ei.value.status.io_type == "read"
    assert ei.value.errno == ei.value.status.errno == errno.ENODATA
    assert os.strerror(errno.ENODATA) in str(ei.value)
    with pytest.raises(IoError) as ei:
        d.read_sync(ch, buf, 256 * KiB - 4096)        # straddles the end: short
    assert ei.value.status.errno == errno.ENODATA
    c = Completions()
    d.read(ch, buf, 768 * KiB, cb=c.cb("async"))
    c.wait(ch, 1)
    ok, status = c.done["async"]
    assert not ok and status.kind == "failed" and status.errno == errno.ENODATA
    d.read_sync(ch, buf, 0)                            # the part that is left still reads
    assert bytes(buf) == file_bytes(path, 0, 8192)
    st = ch.aio_stats()
    assert st["short_transfers"] == 3 and st["failed"] == 3
    assert o.bdev.stats()["io_error"] == 3
    buf.free()


def test_io_after_the_file_is_closed_fails_cleanly(make, dio_dir):
    path = new_file(dio_dir, MiB)
    o = make(path)
    o.bdev.destruct()              # what unregister does once descriptors are gone
    with pytest.raises(IoError):
        o.desc.read_sync(o.ch, bytearray(4096), 0)


def test_engine_errors_complete_with_failed(make, dio_dir, engine):
    """An error from the kernel (here EBADF: the bdev's descriptor number now names a file
    opened read-only) completes the write as failed and records the errno; reads go on."""
    path = new_file(dio_dir, MiB)
    o = make(path, engine=engine)
    ro = os.open(path, os.O_RDONLY | os.O_DIRECT)
    os.dup2(ro, o.bdev.fileno())
    os.close(ro)
    buf = allocate(4096)
    with pytest.raises(IoError) as ei:
        o.desc.write_sync(o.ch, buf, 0)
    assert ei.value.status.kind == "failed" and ei.value.status.errno == errno.EBADF
    assert ei.value.errno == errno.EBADF and ei.value.strerror == os.strerror(errno.EBADF)
    st = o.ch.aio_stats()
    assert st["failed"] == 1 and st["last_errno"] == errno.EBADF
    o.desc.read_sync(o.ch, buf, 0)
    assert bytes(buf) == file_bytes(path, 0, 4096)
    buf.free()


def test_a_write_beyond_the_file_size_limit_fails_with_efbig(make, dio_dir, engine):
    """RLIMIT_FSIZE below the write: the kernel fails it with EFBIG, and that errno reaches the
    completion's status and the blocking helper's IoError (with "File too large"), not only the
    channel's statistics."""
    import resource
    path = new_file(dio_dir, MiB)
    o = make(path, engine=engine, block_size=4096)
    buf = allocate(4096)
    memoryview(buf)[:] = b"\xee" * 4096
    c = Completions()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * KiB, hard))
    try:
        with pytest.raises(IoError) as ei:
            o.desc.write_sync(o.ch, buf, 768 * KiB)
        o.desc.write(o.ch, buf, 640 * KiB, cb=c.cb("async"))
        c.wait(o.ch, 1)
        o.desc.write_sync(o.ch, buf, 0)                   # below the limit: fine
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    e = ei.value
    assert e.status.kind == "failed" and e.status.errno == errno.EFBIG
    assert e.errno == errno.EFBIG and e.strerror == os.strerror(errno.EFBIG)
    assert os.strerror(errno.EFBIG) in str(e)
    ok, status = c.done["async"]
    assert not ok and status.errno == errno.EFBIG
    assert o.ch.aio_stats()["last_errno"] == errno.EFBIG
    assert file_bytes(path, 768 * KiB, 4096) != b"\xee" * 4096
    assert file_bytes(path, 0, 4096) == b"\xee" * 4096
    buf.free()


def _engine_contexts():
    """AIO contexts and io_uring instances of this process (its share of fs.aio-nr, and of
    io_uring memory): their ring mappings in /proc/self/maps."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "[aio]" in line or "io_uring" in line)


def test_os_threads_that_end_without_put_release_their_channels(dio_dir, engine, caplog):
    """20 OS threads each take a channel (an AIO context of 128 slots, or an io_uring), leave a
    read in flight and end without put(): each channel is released (the read completes once),
    a warning names the bdev and the thread, no context is left, and neither the channels nor
    their Threads stay alive."""
    import gc
    import threading
    import weakref
    from env.thread import wait_ended_threads
    path = new_file(dio_dir, MiB)
    aio.create("AIOleak", path, engine=engine, queue_depth=128)
    desc = bdev.open_bdev("AIOleak", write=True)
    c = Completions()
    refs, errors = [], []
    try:
        before = _engine_contexts()
        aio_nr = Path("/proc/sys/fs/aio-nr")
        start_nr = int(aio_nr.read_text()) if aio_nr.exists() else None

        def worker(i):
            try:
                ch = desc.get_io_channel()
                buf = allocate(4096)
                desc.read_sync(ch, buf, i * 4096)
                desc.read(ch, allocate(64 * KiB), i * 4096, cb=c.cb(i))   # left in flight
                refs.append((weakref.ref(ch), weakref.ref(ch.thread)))
            except BaseException as e:
                errors.append(e)

        with caplog.at_level(logging.WARNING, logger="userblk.env.thread"):
            for i in range(20):
                t = threading.Thread(target=worker, args=(i,), name=f"leaver-{i}")
                t.start()
                t.join(30)
            assert wait_ended_threads(60)
        assert errors == []
        assert _engine_contexts() == before
        assert sorted(c.done) == list(range(20))              # each in-flight read, once
        assert all(ok for ok, _ in c.done.values())
        warnings = [r.getMessage() for r in caplog.records
                    if "ended without put()" in r.getMessage()]
        assert len(warnings) == 20
        assert all("'AIOleak'" in w for w in warnings)
        assert sorted(int(w.split("leaver-")[1].split()[0]) for w in warnings) == list(range(20))
        gc.collect()
        assert [(a(), b()) for a, b in refs] == [(None, None)] * 20
        if start_nr is not None and engine == "aio":
            # machine-wide (other processes move it too): at least ours went back
            assert int(aio_nr.read_text()) < start_nr + 20 * 128
    finally:
        desc.close()
        aio.delete("AIOleak")


def test_channel_put_with_io_in_flight_completes_everything(dio_dir, engine):
    """Releasing the last reference of a channel with I/O in flight: every I/O still completes
    exactly once (while the channel is destroyed), then the engine's context is gone."""
    path = new_file(dio_dir, 4 * MiB)
    b = aio.create("AIOput", path, engine=engine)
    try:
        d = bdev.open_bdev("AIOput", write=True)
        ch = d.get_io_channel()
        c = Completions()
        bufs = [allocate(64 * KiB) for _ in range(48)]
        for i, buf in enumerate(bufs):
            if i % 2:
                memoryview(buf)[:] = bytes([i]) * (64 * KiB)
                d.write(ch, buf, i * 64 * KiB, cb=c.cb(i))
            else:
                d.read(ch, buf, i * 64 * KiB, cb=c.cb(i))
        expect = {i: file_bytes(path, i * 64 * KiB, 64 * KiB) for i in range(0, 48, 2)}
        ch.put()
        assert len(c.done) == 48 and all(ok for ok, _ in c.done.values())
        assert ch.aio_stats()["inflight"] == 0
        for i, buf in enumerate(bufs):
            assert bytes(buf) == (expect[i] if i % 2 == 0 else bytes([i]) * (64 * KiB))
        d.close()
    finally:
        aio.delete("AIOput")


def test_delete_with_an_open_descriptor(dio_dir):
    path = new_file(dio_dir, MiB)
    events = []
    b = aio.create("AIOdel", path)
    d = bdev.open_bdev("AIOdel", event_cb=lambda ev, bd: events.append(ev))
    aio.delete("AIOdel")
    assert events == ["remove"] and b.fileno() >= 0       # open until the descriptor closes
    with pytest.raises(bdev.BdevRemoved):
        d.get_io_channel()
    d.close()
    assert b.fileno() == -1
    with pytest.raises(bdev.BdevNotFound):
        aio.delete("AIOdel")
    with pytest.raises(InvalidArgument, match="not an aio bdev"):
        from bdev import malloc
        malloc.create("MallocNotAio", size=MiB)
        try:
            aio.delete("MallocNotAio")
        finally:
            malloc.delete("MallocNotAio")


# ---- read-only ----------------------------------------------------------------------------------
def test_readonly_refuses_writes(make, dio_dir):
    path = new_file(dio_dir, MiB)
    before = file_bytes(path)
    os.chmod(path, 0o444)
    o = make(path, readonly=True)
    b = o.bdev
    assert b.readonly and set(b.io_types) == {"read", "flush", "reset"}
    # the layer: a read-only descriptor refuses every write type
    with pytest.raises(ReadOnlyDescriptor):
        o.desc.write_sync(o.ch, bytes(4096), 0)
    # the module: even a writable descriptor cannot write to a read-only aio bdev
    w = bdev.open_bdev(b.name, write=True)
    wch = w.get_io_channel()
    for call in (lambda: w.write_sync(wch, bytes(4096), 0),
                 lambda: w.write_zeroes_sync(wch, 0, 4096),
                 lambda: w.unmap_sync(wch, 0, 4096)):
        with pytest.raises(UnsupportedIoType):
            call()
    w.flush_sync(wch)
    wch.put()
    w.close()
    buf = bytearray(MiB)
    o.desc.read_sync(o.ch, buf, 0)
    assert buf == before == file_bytes(path)
    assert b.config_json()["params"]["readonly"] is True


# ---- threads ------------------------------------------------------------------------------------
def test_two_threads_with_their_own_channels(make, dio_dir, engine):
    path = new_file(dio_dir, 8 * MiB, fill=False)
    o = make(path, engine=engine, block_size=4096)
    name = o.bdev.name
    channels = []

    def worker(k):
        try:
            desc = bdev.open_bdev(name, write=True)
            ch = desc.get_io_channel()
            channels.append(id(ch))
            rng = random.Random(k)
            base = k * 4 * MiB
            c = Completions()
            bufs = []
            for i in range(64):
                buf = allocate(64 * KiB)
                memoryview(buf)[:] = rng.randbytes(64 * KiB)
                bufs.append(buf)
                desc.write(ch, buf, base + i * 64 * KiB, cb=c.cb(i))
            c.wait(ch, 64)
            assert all(ok for ok, _ in c.done.values())
            for i, buf in enumerate(bufs):
                back = allocate(64 * KiB)
                desc.read_sync(ch, back, base + i * 64 * KiB)
                assert bytes(back) == bytes(buf)
                back.free()
            ch.put()
            desc.close()
            for buf in bufs:
                buf.free()
        finally:
            current_thread().unbind()

    in_threads(worker, 2, 60)
    assert len(set(channels)) == 2
    for k in (0, 1):
        rng = random.Random(k)
        expect = b"".join(rng.randbytes(64 * KiB) for _ in range(64))
        assert file_bytes(path, k * 4 * MiB, 4 * MiB) == expect
    assert o.bdev.stats()["num_write_ops"] == 128


# ---- configuration ------------------------------------------------------------------------------
def test_config_json_round_trip(dio_dir):
    path = new_file(dio_dir, 2 * MiB)
    b = aio.create("AIOcfg", path, 4096)
    cfg = b.config_json()
    assert cfg["method"] == "bdev_aio_create"
    assert cfg["params"] == {"name": "AIOcfg", "filename": str(path), "block_size": 4096,
                             "readonly": False, "uuid": str(b.uuid)}
    ds = b.info()["driver_specific"]["aio"]
    assert ds["filename"] == str(path) and ds["o_direct"] and ds["engine"] == "aio"
    info = b.info()
    with bdev.open_bdev("AIOcfg", write=True) as d:
        ch = d.get_io_channel()
        d.write_sync(ch, b"\x5a" * 4096, 8192)
        ch.put()
    aio.delete("AIOcfg")
    b2 = aio.create(**cfg["params"])
    try:
        assert b2.info() == info
        assert b2.config_json() == cfg
        with bdev.open_bdev("AIOcfg") as d:
            ch = d.get_io_channel()
            buf = bytearray(4096)
            d.read_sync(ch, buf, 8192)
            assert buf == b"\x5a" * 4096
            ch.put()
    finally:
        aio.delete("AIOcfg")


def test_block_size_defaults(make, dio_dir, tmp_path):
    o = make(new_file(dio_dir, MiB))
    assert o.bdev.block_size == max(512, o.bdev.dio_alignment)
    assert not o.bdev.block_size_override
    o = make(new_file(tmp_path, MiB), direct=False)
    assert o.bdev.block_size == 512 and o.bdev.required_alignment == 1
    o = make(new_file(tmp_path, MiB), block_size=8192, direct=False)
    assert o.bdev.num_blocks == 128 and o.bdev.block_size_override


def test_create_size(make, tmp_path):
    p = tmp_path / "new.img"
    o = make(p, create_size=3 * MiB)
    assert os.path.getsize(p) == 3 * MiB and o.bdev.size == 3 * MiB
    o.desc.write_sync(o.ch, b"\x11" * 4096, 0)
    o.close()
    o = make(p, create_size=4 * MiB)                 # extends, keeps the data
    assert o.bdev.size == 4 * MiB and file_bytes(p, 0, 4096) == b"\x11" * 4096
    o.close()
    o = make(p, create_size=MiB)                     # never shrinks
    assert o.bdev.size == 4 * MiB


def test_syscall_reaping(make, dio_dir, monkeypatch):
    """Channels made with USER_REAP off reap with io_getevents(timeout 0)."""
    monkeypatch.setattr(aio, "USER_REAP", False)
    path = new_file(dio_dir, MiB)
    o = make(path)
    c = Completions()
    bufs = [allocate(4096) for _ in range(32)]
    for i, buf in enumerate(bufs):
        o.desc.read(o.ch, buf, i * 4096, cb=c.cb(i))
    c.wait(o.ch, 32)
    st = o.ch.aio_stats()
    assert not st["user_reap"] and st["reap_syscalls"] > 0
    assert all(bytes(b) == file_bytes(path, i * 4096, 4096) for i, b in enumerate(bufs))
    for b in bufs:
        b.free()


def test_user_space_reaping_is_used(make, dio_dir):
    o = make(new_file(dio_dir, MiB))
    o.desc.read_sync(o.ch, allocate(4096), 0)
    st = o.ch.aio_stats()
    assert st["user_reap"] and st["reap_syscalls"] == 0


# ---- the buffered fallback ----------------------------------------------------------------------
def test_buffered_fallback_when_o_direct_is_refused(make, no_direct_dir, caplog):
    """On a file system that refuses O_DIRECT the bdev uses buffered I/O, says so once, needs
    no alignment, and still moves data both ways."""
    path = new_file(no_direct_dir, MiB)
    with caplog.at_level(logging.WARNING, logger="userblk.bdev.aio"):
        o = make(path)
    warnings = [r for r in caplog.records if "O_DIRECT" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    b = o.bdev
    assert not b.direct and b.required_alignment == 1
    assert b.info()["driver_specific"]["aio"]["o_direct"] is False
    data = random.randbytes(12 * KiB)
    o.desc.write_sync(o.ch, data, 4096)
    assert file_bytes(path, 4096, len(data)) == data
    back = bytearray(len(data))
    o.desc.read_sync(o.ch, back, 4096)
    assert back == data
    o.desc.write_zeroes_sync(o.ch, 4096, 4096)        # emulated where fallocate is missing
    assert file_bytes(path, 4096, 4096) == bytes(4096)
    o.desc.flush_sync(o.ch)
    with pytest.raises(aio.AioFileError, match=str(path)):
        aio.create("AIOforce", path, direct=True)


def test_buffered_fallback_simulated(make, dio_dir, monkeypatch, caplog):
    """The same fallback where no such file system is at hand: open(O_DIRECT) answers EINVAL."""
    real_open = os.open
    path = new_file(dio_dir, MiB)

    def fake_open(p, flags, *a):
        if flags & os.O_DIRECT and str(p) == str(path):
            raise OSError(errno.EINVAL, "Invalid argument", str(p))
        return real_open(p, flags, *a)
    monkeypatch.setattr(os, "open", fake_open)
    with caplog.at_level(logging.WARNING, logger="userblk.bdev.aio"):
        o = make(path)
    assert not o.bdev.direct
    assert sum("O_DIRECT" in r.getMessage() for r in caplog.records) == 1
    o.desc.write_sync(o.ch, b"\x42" * 512, 512)
    assert file_bytes(path, 512, 512) == b"\x42" * 512


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input_names_the_file(tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(aio.AioFileError, match=str(missing)) as ei:
        aio.create("AIObad", missing)
    assert ei.value.errno == errno.ENOENT and ei.value.filename == str(missing)
    with pytest.raises(aio.AioFileError, match=str(tmp_path)) as ei:
        aio.create("AIObad", tmp_path)
    assert ei.value.errno == errno.EISDIR
    odd = new_file(tmp_path, 1000)
    with pytest.raises(InvalidArgument, match=f"{odd}.*not a multiple of the block size 512"):
        aio.create("AIObad", odd)
    ok = new_file(tmp_path, 64 * KiB)
    with pytest.raises(InvalidArgument, match="power of two"):
        aio.create("AIObad", ok, 1000)
    with pytest.raises(InvalidArgument, match="power of two"):
        aio.create("AIObad", ok, 256)
    odd64 = new_file(tmp_path, 96 * KiB)
    with pytest.raises(InvalidArgument, match=f"{odd64}.*not a multiple of the block size 65536"):
        aio.create("AIObad", odd64, 65536)
    empty = new_file(tmp_path, 0)
    with pytest.raises(InvalidArgument, match=f"{empty} is empty"):
        aio.create("AIObad", empty)
    with pytest.raises(InvalidArgument, match="readonly"):
        aio.create("AIObad", tmp_path / "x.img", create_size=MiB, readonly=True)
    with pytest.raises(InvalidArgument, match="queue_depth"):
        aio.create("AIObad", ok, queue_depth=0)
    with pytest.raises(InvalidArgument, match="engine"):
        aio.create("AIObad", ok, engine="threads")
    with pytest.raises(InvalidArgument, match="create_size"):
        aio.create("AIObad", tmp_path / "y.img", create_size=-1)
    with pytest.raises(InvalidArgument, match="create_size 1000 is not a multiple"):
        aio.create("AIObad", tmp_path / "y.img", create_size=1000)
    assert not (tmp_path / "y.img").exists()
    with pytest.raises(aio.AioFileError, match="no-such-dir"):
        aio.create("AIObad", tmp_path / "no-such-dir" / "z.img", create_size=MiB)
    with pytest.raises(InvalidArgument, match="neither a regular file nor a block device"):
        aio.create("AIObad", "/dev/null")
    assert "AIObad" not in [b.name for b in bdev.bdevs()]


def test_block_size_below_the_o_direct_alignment(dio_dir, tmp_path):
    path = new_file(dio_dir, MiB)
    b = aio.create("AIOprobe", path)
    align = b.dio_alignment
    aio.delete("AIOprobe")
    if align <= 512:
        pytest.skip(reason=f"O_DIRECT on {fs_type(dio_dir)} here needs only {align} bytes: any block "
                    "size fits")
    with pytest.raises(InvalidArgument, match=f"alignment O_DIRECT needs on {path}"):
        aio.create("AIOsmall", path, 512)


def test_duplicate_name_closes_the_file(make, dio_dir):
    path = new_file(dio_dir, MiB)
    o = make(path)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(bdev.BdevExists):
        aio.create(o.bdev.name, path)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_no_permission(tmp_path):
    if not IS_ROOT:
        p = new_file(tmp_path, MiB)
        os.chmod(p, 0)
        with pytest.raises(aio.AioFileError, match=f"{p}: permission denied"):
            aio.create("AIOperm", p)
        return
    # root reads anything: try in a child process that is still root but has lost the
    # capabilities that bypass file permissions (the interpreter and the checkout stay
    # reachable, which they may not be for an unprivileged user: e.g. a pyenv under /root)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(reason="needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE as root")
    d = Path(tempfile.mkdtemp(prefix="aio-perm-"))
    try:
        p = new_file(d, MiB)
        os.chown(p, 65534, 65534)
        os.chmod(p, 0o600)
        code = ("import sys; from bdev import aio\n"
                "try:\n    aio.create('AIOperm', sys.argv[1])\n"
                "except aio.AioFileError as e:\n    print(e.errno, e); sys.exit(0)\n"
                "sys.exit(3)\n")
        r = subprocess.run([setpriv, "--bounding-set", "-dac_override,-dac_read_search",
                            sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith(f"{errno.EACCES} ") and f"{p}: permission denied" in r.stdout
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- a model-based random mix -------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mix_against_a_model(make, data_dir, engine, seed):
    """Batches of async reads, writes, unmaps, write zeroes and flushes on disjoint ranges;
    after each batch the bdev, the model and the file agree."""
    directory, direct = data_dir
    bs, nblocks = 4096, 512
    path = new_file(directory, bs * nblocks)
    o = make(path, engine=engine, direct=direct, block_size=bs, queue_depth=8)
    d, ch = o.desc, o.ch
    model = bytearray(file_bytes(path))
    rng = random.Random(seed)
    ops = ["read", "write", "write", "write_zeroes", "flush"]
    if o.bdev.io_type_supported("unmap"):
        ops.append("unmap")
    keep = []
    for _ in range(6):
        c, reads, n = Completions(), [], 0
        free = list(range(0, nblocks, 16))
        rng.shuffle(free)
        for start in free[:20]:
            op = rng.choice(ops)
            cnt = rng.randint(1, 16)
            off, length = start * bs, cnt * bs
            if op == "read":
                buf = bytearray(length) if rng.random() < 0.5 else allocate(length)
                d.read(ch, buf, off, length, cb=c.cb(n))
                reads.append((buf, off, length))
            elif op == "write":
                data = rng.randbytes(length)
                if rng.random() < 0.5:
                    buf = allocate(length)
                    memoryview(buf)[:] = data
                else:
                    buf = data
                keep.append(buf)
                d.write(ch, buf, off, cb=c.cb(n))
                model[off:off + length] = data
            elif op == "flush":
                d.flush(ch, cb=c.cb(n))
            else:
                getattr(d, op)(ch, off, length, cb=c.cb(n))
                model[off:off + length] = bytes(length)
            n += 1
        c.wait(ch, n)
        assert all(ok for ok, _ in c.done.values()), c.done
        # each range is touched by one I/O of the batch: a read sees the model as it stands
        for buf, off, length in reads:
            assert bytes(memoryview(buf)[:length]) == bytes(model[off:off + length])
        assert file_bytes(path) == model
    whole = allocate(bs * nblocks)
    d.read_sync(ch, whole, 0)
    assert bytes(whole) == model
    whole.free()


# ---- block devices ------------------------------------------------------------------------------
@pytest.fixture
def loop_device(tmp_path):
    """loop_device(size, sector_size) -> (/dev/loopN, backing file); detached afterwards."""
    made = []

    def _attach(size, sector_size=512):
        if not IS_ROOT:
            pytest.skip(reason="setting up a loop device needs root")
        if shutil.which("losetup") is None:
            pytest.skip(reason="losetup is not installed")
        backing = new_file(tmp_path, size)
        r = subprocess.run(["losetup", "-f", "--show", "--sector-size", str(sector_size),
                            str(backing)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(reason=f"losetup cannot attach a loop device: {r.stderr.strip()}")
        dev = r.stdout.strip()
        made.append(dev)
        return dev, backing
    yield _attach
    for dev in made:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def queue_limit(dev, name):
    with open(f"/sys/block/{os.path.basename(dev)}/queue/{name}") as f:
        return int(f.read())


@pytest.mark.parametrize("sector", [512, 4096])
def test_loop_block_device(make, loop_device, engine, sector):
    """A block device: size from BLKGETSIZE64, block size and O_DIRECT alignment from
    BLKSSZGET, data through O_DIRECT, unmap by BLKDISCARD, write zeroes by BLKZEROOUT; the
    backing file (read with Python) sees all of it."""
    dev, backing = loop_device(8 * MiB, sector)
    o = make(dev, engine=engine)
    b = o.bdev
    assert b.is_block_device and b.direct
    assert b.block_size == sector == b.required_alignment == b.dio_alignment
    assert b.size == 8 * MiB
    assert b.info()["driver_specific"]["aio"]["block_device"] is True
    assert b.io_type_supported("write_zeroes")
    assert b.io_type_supported("unmap") == (queue_limit(dev, "discard_max_bytes") > 0)
    d, ch = o.desc, o.ch
    rng = random.Random(sector)
    for n in (sector, 3 * sector, 64 * KiB, MiB):
        off = rng.randrange(0, (8 * MiB - n) // sector) * sector
        data = rng.randbytes(n)
        d.write_sync(ch, data, off)                    # bytes: bounced to `sector` alignment
        d.flush_sync(ch)
        assert file_bytes(backing, off, n) == data
        back = bytearray(n)
        d.read_sync(ch, back, off)
        assert back == data
    d.write_sync(ch, b"\xee" * (256 * KiB), MiB)
    d.write_zeroes_sync(ch, MiB, 64 * KiB)
    d.flush_sync(ch)
    assert file_bytes(backing, MiB, 128 * KiB) == bytes(64 * KiB) + b"\xee" * (64 * KiB)
    if b.io_type_supported("unmap"):
        d.unmap_sync(ch, MiB + 128 * KiB, 64 * KiB)
        back = bytearray(64 * KiB)
        d.read_sync(ch, back, MiB + 128 * KiB)
        assert back == bytes(64 * KiB)                 # loop punches a hole in its file
    assert ch.aio_stats()["failed"] == 0


def test_loop_block_device_limits(loop_device, make):
    dev, backing = loop_device(4 * MiB, 4096)
    with pytest.raises(InvalidArgument, match=f"alignment O_DIRECT needs on {dev}"):
        aio.create("AIOloop", dev, 512)
    with pytest.raises(InvalidArgument, match="create_size applies to regular files"):
        aio.create("AIOloop", dev, create_size=MiB)
    o = make(dev, block_size=8192)                     # a multiple of the sector: fine
    assert o.bdev.num_blocks == 512
    o.close()
    o = make(dev, readonly=True)
    assert set(o.bdev.io_types) == {"read", "flush", "reset"}
    buf = allocate(4096)
    o.desc.read_sync(o.ch, buf, 4096)
    assert bytes(buf) == file_bytes(backing, 4096, 4096)
    buf.free()
