"""Snapshots, clones, inflate and decouple_parent: data, relations, copy-on-write, persistence."""
import pytest

from bdev import null
from blob import BlobHasClones, BlobReadOnly
from env.errors import InvalidArgument
from tests.blob.helpers import Store, pattern

C = 2048                      # units per 1 MiB cluster of 512-byte units


def test_snapshot_keeps_the_data_and_the_blob_goes_copy_on_write(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=3, xattrs={"n": b"1"}))
    old = pattern(3 * C * 512, 1)
    blob.write(ch, old, 0)
    used = bs.free_clusters
    sid = bs.snapshot(blob, xattrs={"snap": b"yes"})
    assert bs.free_clusters == used                      # metadata only: no copy
    snap = bs.open(sid)
    assert snap.is_snapshot and snap.read_only and snap.clones == [blob.id]
    assert blob.parent_id == sid and blob.thin and blob.allocated_clusters == 0
    assert snap.get_xattr("snap") == b"yes" and blob.get_xattr("n") == b"1"
    assert store.read(blob, 0, 3 * C) == old
    blob.write(ch, b"N" * 512, C + 7)                    # one unit: the cluster is copied
    assert blob.allocated_clusters == 1 and bs.free_clusters == used - 1
    assert store.read(blob, C, C) == old[C * 512:(C + 7) * 512] + b"N" * 512 + \
        old[(C + 8) * 512:2 * C * 512]
    assert store.read(snap, 0, 3 * C) == old
    with pytest.raises(BlobReadOnly):
        snap.write(ch, b"x" * 512, 0)
    with pytest.raises(BlobReadOnly):
        snap.resize(5)
    with pytest.raises(BlobReadOnly):
        snap.set_xattr("a", b"b")
    with pytest.raises(BlobReadOnly):
        bs.snapshot(sid)
    snap.close()
    blob.close()


def test_writes_in_flight_land_before_the_snapshot(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=4, thin=True))
    done = []
    for i in range(64):
        blob.write(ch, bytes([i + 1]) * 512, i * 100, cb=lambda v, e: done.append(e))
    sid = bs.snapshot(blob.id)
    assert len(done) == 64 and not any(done)
    snap = bs.open(sid)
    for i in range(64):
        assert store.read(snap, i * 100, 1) == bytes([i + 1]) * 512
    # writes from callbacks during a snapshot go to the blob afterwards
    later = []
    bs.snapshot(blob.id, cb=lambda v, e: later.append(("snap", v, e)))
    blob.write(ch, b"L" * 512, 5, cb=lambda v, e: later.append(("write", v, e)))
    ch.thread.run_until(lambda: len(later) == 2, timeout=10)
    assert store.read(blob, 5, 1) == b"L" * 512
    assert store.read(snap, 5, 1) == bytes(512)
    snap.close()
    blob.close()


def test_clones_read_their_snapshot_until_written(store):
    bs, ch = store.bs, store.ch
    base = bs.open(bs.create(num_clusters=2))
    data = pattern(2 * C * 512, 2)
    base.write(ch, data, 0)
    sid = bs.snapshot(base)
    c1, c2 = bs.open(bs.clone(sid)), bs.open(bs.clone(sid, xattrs={"c": b"2"}))
    assert c1.parent_id == c2.parent_id == sid and c1.thin
    assert bs.info(sid)["clones"] == sorted([base.id, c1.id, c2.id])
    c1.write(ch, b"1" * 512, 0)
    c2.write_zeroes(ch, C, 10)                            # zeroes over parent data: a copy
    assert store.read(c1, 0, 1) == b"1" * 512 and store.read(c2, 0, 1) == data[:512]
    assert store.read(c2, C, 11) == bytes(5120) + data[(C + 10) * 512:(C + 11) * 512]
    assert store.read(c1, C, 11) == data[C * 512:(C + 11) * 512]
    with pytest.raises(BlobHasClones) as e:
        bs.delete(sid)
    assert e.value.clones == sorted([base.id, c1.id, c2.id])
    for b in (base, c1, c2):
        b.close()


def test_chains_of_snapshots(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=2, thin=True))
    blob.write(ch, b"a" * 512, 0)
    s1 = bs.snapshot(blob)
    blob.write(ch, b"b" * 512, 1)
    s2 = bs.snapshot(blob)
    blob.write(ch, b"c" * 512, C)
    assert blob.parent_id == s2 and bs.info(s2)["parent"] == s1
    assert store.read(blob, 0, 2) == b"a" * 512 + b"b" * 512
    assert store.read(blob, C, 1) == b"c" * 512
    clone = bs.open(bs.clone(s1))
    assert store.read(clone, 0, 2) == b"a" * 512 + bytes(512)
    # decouple: the clusters of s2 come into the blob; its parent is s1 now
    bs.decouple_parent(blob)
    assert blob.parent_id == s1 and bs.info(s2)["clones"] == []
    assert store.read(blob, 0, 2) == b"a" * 512 + b"b" * 512
    bs.delete(s2)
    # inflate: everything its own, no parent, thick
    bs.inflate(blob)
    assert blob.parent_id is None and not blob.thin and blob.allocated_clusters == 2
    assert store.read(blob, 0, 2) == b"a" * 512 + b"b" * 512
    with pytest.raises(BlobHasClones):
        bs.delete(s1)
    clone.close()
    bs.delete(clone.id)
    bs.delete(s1)
    blob.close()
    assert set(bs) == {blob.id}


def test_clone_of_a_grown_blob_reads_zeroes_past_its_snapshot(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=1))
    blob.write(ch, b"s" * 512, 0)
    sid = bs.snapshot(blob)
    blob.resize(3)
    assert store.read(blob, 0, 1) == b"s" * 512
    assert store.read(blob, 2 * C, 4) == bytes(2048)
    blob.write(ch, b"t" * 512, 2 * C)
    assert store.read(blob, 2 * C, 1) == b"t" * 512
    bs.inflate(blob)
    assert store.read(blob, 0, 1) == b"s" * 512 and blob.allocated_clusters == 3
    blob.close()
    bs.delete(sid)


def test_relations_survive_reloads(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=2, thin=True))
    blob.write(ch, b"1" * 512, 3)
    sid = bs.snapshot(blob)
    cid = bs.clone(sid)
    blob.write(ch, b"2" * 512, 3)
    blob.close()
    for clean in (True, False):
        bs = store.reload(clean=clean)
        assert bs.info(sid)["clones"] == sorted([blob.id, cid])
        assert bs.info(blob.id)["parent"] == sid and bs.info(sid)["snapshot"]
        b = bs.open(blob.id)
        c = bs.open(cid)
        assert store.read(b, 3, 1) == b"2" * 512 and store.read(c, 3, 1) == b"1" * 512
        with pytest.raises(BlobReadOnly):
            bs.open(sid).write(store.ch, b"x" * 512, 0)
        b.close()
        c.close()
        for h in list(bs.blobs[sid].handles):
            h.close()


def test_inflate_a_thin_blob_without_parent(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=3, thin=True))
    blob.write(ch, b"x" * 512, C)
    free = bs.free_clusters
    bs.inflate(blob)
    assert blob.allocated_clusters == 3 and not blob.thin and bs.free_clusters == free - 2
    assert store.read(blob, 0, 3 * C) == bytes(C * 512) + b"x" * 512 + bytes((2 * C - 1) * 512)
    bs.decouple_parent(blob)                  # no parent: nothing to do
    blob.close()


def test_snapshot_of_a_big_blob_copies_nothing():
    s = Store(size=1 << 30, cluster_size=1 << 20, kind=null)       # a null bdev keeps no data
    try:
        bs, ch = s.bs, s.ch
        blob = bs.open(bs.create(num_clusters=1000))
        free = bs.free_clusters
        sid = bs.snapshot(blob)
        assert bs.free_clusters == free and bs.info(sid)["allocated_clusters"] == 1000
        blob.close()
    finally:
        s.close()


def test_clone_needs_a_snapshot(store):
    with pytest.raises(InvalidArgument, match="not a snapshot"):
        store.bs.clone(store.bs.create())


def test_a_clone_that_shrinks_and_grows_reads_zeroes_where_it_grew(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=3))
    blob.write(ch, b"p" * 512 * 3 * C, 0)
    sid = bs.snapshot(blob)
    blob.resize(1)
    blob.resize(3)
    assert store.read(blob, 0, 1) == b"p" * 512
    assert store.read(blob, C, 2 * C) == bytes(2 * C * 512)
    blob.close()
    for clean in (True, False):
        bs = store.reload(clean=clean)
        blob = bs.open(blob.id)
        assert store.read(blob, C, 2) == bytes(1024) and store.read(blob, 0, 1) == b"p" * 512
        # decoupling keeps it so: the grandparent (none here) is read only as far as both were
        bs.decouple_parent(blob)
        assert store.read(blob, C, 2) == bytes(1024) and store.read(blob, 0, 1) == b"p" * 512
        blob.close()
    bs.delete(sid)


def test_snapshots_while_another_thread_writes(store):
    """Freezing reaches every channel: a thread writes (copy-on-write after each snapshot)
    while the metadata thread snapshots; every write completes, every snapshot holds, per
    unit, a value no newer than the next snapshot's."""
    import struct
    import threading
    bs = store.bs
    blob = bs.open(bs.create(num_clusters=2, thin=True))
    units = 64
    stop, errors, written = [], [], []

    def writer():
        try:
            ch = bs.get_io_channel()
            k = 1
            while not stop:
                u = (k * 37) % units
                blob.write(ch, struct.pack("<Q", k) * 64, u * 40)
                written.append(k)
                k += 1
            ch.put()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    snaps = []
    try:
        th = store.ch.thread
        for i in range(6):
            th.run_until(lambda: len(written) > (i + 1) * 30 or errors, timeout=30)
            snaps.append(bs.snapshot(blob))
    finally:
        stop.append(1)
        # (the writer's first writes need this thread, the metadata thread: keep polling)
        store.ch.thread.run_until(lambda: not t.is_alive(), timeout=30)
    assert not errors, errors
    assert not t.is_alive()
    seen = []
    for sid in snaps:
        h = bs.open(sid)
        vals = [struct.unpack_from("<Q", store.read(h, u * 40, 1))[0] for u in range(units)]
        h.close()
        seen.append(vals)
    for a, b in zip(seen, seen[1:]):
        assert all(x <= y for x, y in zip(a, b))
    assert any(seen[-1]) and blob.parent_id == snaps[-1]
    blob.close()
