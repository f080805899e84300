"""The C-level data path entry (what an lvol bdev will call): blob_submit / blob_submitv with an
iovec and a C callback, its refusals, completions outside the submission, and a resize heard."""
import errno

from blob._testing import CSubmitter
from env import memory
from tests.blob.helpers import pattern

C = 2048


def test_submit_and_submitv_from_c(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=3, thin=True))
    s = CSubmitter()
    buf = memory.allocate(3 * C * 512)
    memoryview(buf)[:] = pattern(len(buf), 7)
    # a vectored write across clusters, into a thin blob: pieces wait for their clusters
    lengths = [512 * 3, 512 * (C - 3), 512 * 10, 512 * (C + 5)]
    assert s.submitv(ch, blob.data, "write", 100, buf, lengths) == 0
    assert s.completed == 0                         # never inside the submission
    ch.thread.run_until(lambda: s.completed == 1, timeout=10)
    assert s.succeeded == 1 and blob.allocated_clusters == 3
    assert store.read(blob, 100, sum(lengths) // 512) == bytes(buf)[:sum(lengths)]
    out = memory.allocate(4096)
    assert s.submit(ch, blob.data, "read", 100, 8, out) == 0
    ch.thread.run_until(lambda: s.completed == 2, timeout=10)
    assert bytes(out) == bytes(buf)[:4096]
    # refusals: nothing happens, the rc says why
    assert s.submit(ch, blob.data, "read", 3 * C, 1, out) == -errno.ERANGE
    assert s.submit(ch, blob.data, "read", 0, 0, out) == -errno.ERANGE
    assert s.submitv(ch, blob.data, "write", 0, buf, [612]) == -errno.EINVAL   # not whole units
    sid = bs.snapshot(blob)
    snap = bs.open(sid)
    assert s.submit(ch, snap.data, "write", 0, 1, out) == -errno.EROFS
    assert s.submit(ch, snap.data, "read", 0, 1, out) == 0
    ch.thread.run_until(lambda: s.completed == 3, timeout=10)
    # a failure reaches the callback as a negative errno: no cluster left
    assert s.completed == 3
    snap.close()
    blob.close()


def test_no_space_reaches_the_c_callback(store):
    bs, ch = store.bs, store.ch
    full = bs.open(bs.create(num_clusters=bs.free_clusters))
    thin = bs.open(bs.create(num_clusters=1, thin=True))
    s = CSubmitter()
    buf = memory.allocate(512)
    assert s.submit(ch, thin.data, "write", 0, 1, buf) == 0
    ch.thread.run_until(lambda: s.completed == 1, timeout=10)
    assert s.last_status == -errno.ENOSPC and s.succeeded == 0
    full.close()
    thin.close()


def test_resize_is_heard_and_the_c_path_follows(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=1))
    heard = []
    blob.add_listener(lambda ev, bid: heard.append((ev, bid, blob.num_units)))
    s = CSubmitter()
    buf = memory.allocate(512)
    assert s.submit(ch, blob.data, "write", C, 1, buf) == -errno.ERANGE
    blob.resize(2)
    assert heard == [("resize", blob.id, 2 * C)]
    assert s.submit(ch, blob.data, "write", C, 1, buf) == 0
    ch.thread.run_until(lambda: s.completed == 1, timeout=10)
    assert s.succeeded == 1
    blob.close()
