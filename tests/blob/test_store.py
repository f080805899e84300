"""The blobstore's API on a malloc bdev: the store, blobs, xattrs, resize and data I/O."""
import threading

import pytest

import bdev
from bdev import malloc, null
from blob import BlobBusy, Blobstore, BlobNotFound, BlobstoreClosed, BlobstoreCorrupt, NoSpace
from env.errors import InvalidArgument, WrongThreadError
from env.thread import current_thread
from tests.blob.helpers import Store, fresh_name, pattern

MiB = 1 << 20


def test_init_describes_the_store(store):
    bs = store.bs
    g = bs.geometry
    assert bs.cluster_size == MiB and bs.io_unit_size == 512 and bs.units_per_cluster == 2048
    assert bs.total_data_clusters == g.total_clusters - g.data_start_cluster == 63
    assert bs.free_clusters == 63 and len(bs) == 0 and list(bs) == []


def test_create_open_write_read_close_delete(store):
    bs, ch = store.bs, store.ch
    bid = bs.create(num_clusters=3, xattrs={"name": b"vol"})
    assert bid in bs and list(bs) == [bid]
    info = bs.info(bid)
    assert info["allocated_clusters"] == 3 and not info["thin"] and info["xattrs"] == \
        {"name": b"vol"}
    assert bs.free_clusters == 60
    blob = bs.open(bid)
    assert blob.num_units == 3 * 2048 and blob.size == 3 * MiB
    assert store.read(blob, 0, 8) == bytes(8 * 512)          # a thick blob reads zeroes
    data = pattern(8192, 1)
    blob.write(ch, data, 100)
    assert store.read(blob, 100, 16) == data
    with pytest.raises(BlobBusy, match="open"):
        bs.delete(bid)
    blob.close()
    with pytest.raises(BlobBusy, match="closed"):
        blob.read(ch, bytearray(512), 0)
    bs.delete(bid)
    assert bid not in bs and bs.free_clusters == 63
    with pytest.raises(BlobNotFound):
        bs.open(bid)


def test_io_across_clusters_and_vectors(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=4))
    data = pattern(3 * MiB, 2)
    blob.write(ch, data, 1000)                    # spans four clusters
    assert store.read(blob, 1000, 3 * 2048) == data
    parts = [bytearray(512 * k) for k in (1, 7, 3000, 1, 2)]
    blob.readv(ch, parts, 1500)
    assert b"".join(parts) == data[500 * 512:500 * 512 + sum(map(len, parts))]
    new = [pattern(512 * k, k) for k in (2047, 2, 1)]        # segments cross a cluster edge
    blob.writev(ch, new, 1)
    assert store.read(blob, 1, 2050) == b"".join(new)
    blob.write_zeroes(ch, 2040, 20)
    assert store.read(blob, 2040, 20) == bytes(20 * 512)
    blob.unmap(ch, 0, 2)
    assert store.read(blob, 0, 2) == bytes(1024)
    blob.close()


def test_thin_blob_allocates_on_first_write(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=10, thin=True))
    assert blob.allocated_clusters == 0 and bs.free_clusters == 63
    assert store.read(blob, 0, 4096) == bytes(4096 * 512)
    blob.write(ch, b"a" * 512, 2048 * 7 + 5)
    assert blob.allocated_clusters == 1 and bs.free_clusters == 62
    assert store.read(blob, 2048 * 7, 8) == bytes(5 * 512) + b"a" * 512 + bytes(1024)
    blob.write_zeroes(ch, 0, 2048)                 # zeroes where it reads zeroes: no cluster
    blob.unmap(ch, 2048, 2048)
    assert blob.allocated_clusters == 1
    # the allocation is durable at once (no sync_md): a crash keeps it
    blob.close()
    bs = store.reload(clean=False)
    blob = bs.open(blob.id)
    assert blob.allocated_clusters == 1
    assert store.read(blob, 2048 * 7 + 5, 1) == b"a" * 512
    blob.close()


def test_many_first_writes_in_flight_share_commits(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=32, thin=True))
    done = []
    for i in range(32):
        blob.write(ch, bytes([i]) * 512, i * 2048 + i, cb=lambda v, e: done.append(e))
        blob.write(ch, bytes([i + 100]) * 512, i * 2048 + 1000,
                   cb=lambda v, e: done.append(e))
    ch.thread.run_until(lambda: len(done) == 64, timeout=30)
    assert done == [None] * 64
    assert blob.allocated_clusters == 32
    for i in range(32):
        assert store.read(blob, i * 2048 + i, 1) == bytes([i]) * 512
        assert store.read(blob, i * 2048 + 1000, 1) == bytes([i + 100]) * 512
    blob.close()


def test_reused_clusters_are_zeroed_for_thin_blobs():
    s = Store(size=8 * MiB, clear="none")
    try:
        bs, ch = s.bs, s.ch
        a = bs.open(bs.create(num_clusters=bs.total_data_clusters))
        for i in range(a.num_clusters):
            a.write(ch, b"\xee" * MiB, i * 2048)
        a.close()
        bs.delete(a.id)
        t = bs.open(bs.create(num_clusters=2, thin=True))
        t.write(ch, b"x" * 512, 10)
        assert s.read(t, 0, 2048) == bytes(5120) + b"x" * 512 + bytes((2048 - 11) * 512)
        t.close()
    finally:
        s.close()


def test_resize_grow_and_shrink(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=2))
    blob.write(ch, b"q" * 512, 2048 + 3)
    events = []
    blob.add_listener(lambda ev, bid: events.append((ev, bid)))
    blob.resize(5)
    assert events == [("resize", blob.id)]
    assert blob.num_clusters == 5 and blob.allocated_clusters == 5
    assert store.read(blob, 2048 * 4, 4) == bytes(2048)
    blob.resize(1)
    with pytest.raises(InvalidArgument, match="outside the blob"):
        blob.read(ch, bytearray(512), 2048)
    # freed only once durable
    assert bs.free_clusters == 63 - 5
    blob.sync_md()
    assert bs.free_clusters == 62
    blob.resize(3)
    assert store.read(blob, 2048, 2048) == bytes(MiB)      # not the old data
    thin = bs.open(bs.create(num_clusters=1, thin=True))
    thin.resize(100)
    assert thin.allocated_clusters == 0
    blob.close()
    thin.close()


def test_xattrs(store):
    bs = store.bs
    blob = bs.open(bs.create(xattrs={"a": b"1"}))
    blob.set_xattr("b", bytearray(b"22"))
    blob.set_xattr("a", b"")
    assert blob.xattr_names() == ["a", "b"] and blob.get_xattr("b") == b"22"
    blob.remove_xattr("a")
    with pytest.raises(KeyError, match="no xattr 'a'"):
        blob.get_xattr("a")
    with pytest.raises(KeyError):
        blob.remove_xattr("zz")
    with pytest.raises(InvalidArgument, match="at most"):
        blob.set_xattr("big", b"x" * 5000)
    with pytest.raises(InvalidArgument, match="bytes-like"):
        blob.set_xattr("s", "text")
    with pytest.raises(InvalidArgument, match="non-empty str"):
        blob.set_xattr(3, b"")
    # many xattrs take several metadata pages
    for i in range(10):
        blob.set_xattr(f"k{i}", bytes([i]) * 1000)
    blob.close()
    bs = store.reload()
    blob = bs.open(blob.id)
    assert blob.get_xattr("k9") == bytes([9]) * 1000 and "a" not in blob.xattr_names()
    assert bs.info(blob.id)["md_pages"] >= 3
    blob.close()


def test_bad_arguments_are_refused(store):
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=1))
    with pytest.raises(InvalidArgument, match="outside the blob"):
        blob.write(ch, b"x" * 1024, 2047)
    with pytest.raises(InvalidArgument, match="whole 512-byte"):
        blob.write(ch, b"x" * 100, 0)
    with pytest.raises(InvalidArgument, match="writable"):
        blob.read(ch, b"x" * 512, 0)
    with pytest.raises(InvalidArgument, match="non-negative"):
        blob.read(ch, bytearray(512), -1)
    with pytest.raises(InvalidArgument, match="non-negative"):
        bs.create(num_clusters=-1)
    with pytest.raises(InvalidArgument, match="blob id"):
        bs.open("x")
    with pytest.raises(InvalidArgument, match="not a snapshot"):
        bs.clone(blob.id)
    with pytest.raises(InvalidArgument, match="cb must be callable"):
        bs.create(cb=3)
    with pytest.raises(BlobNotFound):
        bs.delete(999)
    with pytest.raises(InvalidArgument, match="clear"):
        Blobstore.init(store.name, clear="bogus")
    blob.close()


def test_no_space(store):
    bs, ch = store.bs, store.ch
    with pytest.raises(NoSpace, match="64 clusters asked for, 63 free"):
        bs.create(num_clusters=64)
    assert bs.free_clusters == 63                          # nothing leaked
    a = bs.open(bs.create(num_clusters=63))
    t = bs.open(bs.create(num_clusters=1, thin=True))
    with pytest.raises(NoSpace):
        t.write(ch, b"x" * 512, 0)
    a.close()
    t.close()


def test_no_free_blob_id():
    s = Store(size=16 * MiB, cluster_size=64 << 10, md_pages=8)
    try:
        ids = [s.bs.create() for _ in range(8)]
        assert ids == list(range(1, 9))
        with pytest.raises(NoSpace, match="blob id"):
            s.bs.create()
        s.bs.delete(3)
        assert s.bs.create() == 3
    finally:
        s.close()


def test_callbacks_instead_of_blocking(store):
    bs, ch = store.bs, store.ch
    out = []
    bs.create(num_clusters=1, cb=lambda v, e: out.append(("create", v, e)))
    assert out == []                     # nothing inside the call
    ch.thread.run_until(lambda: out, timeout=10)
    bid = out[0][1]
    blob = bs.open(bid)
    buf = bytearray(512)
    blob.write(ch, b"z" * 512, 0, cb=lambda v, e: out.append(("write", v, e)))
    blob.read(ch, buf, 0, cb=lambda v, e: out.append(("read", v, e)))
    blob.sync_md(cb=lambda v, e: out.append(("sync", v, e)))
    ch.thread.run_until(lambda: len(out) == 4, timeout=10)
    assert sorted(o[0] for o in out[1:]) == ["read", "sync", "write"]
    assert ("write", None, None) in out and ("sync", None, None) in out
    assert ("read", buf, None) in out and buf == b"z" * 512
    blob.close()
    bs.delete(bid, cb=lambda v, e: out.append(("delete", v, e)))
    ch.thread.run_until(lambda: len(out) == 5, timeout=10)
    assert out[-1] == ("delete", None, None)


def test_metadata_operations_belong_to_their_thread(store):
    bs = store.bs
    errors = []

    def other():
        try:
            bs.create()
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert isinstance(errors[0], WrongThreadError)


def test_data_io_from_another_thread(store):
    bs = store.bs
    blob = bs.open(bs.create(num_clusters=2, thin=True))
    errors = []
    stop = []

    def other():
        try:
            ch = bs.get_io_channel()
            blob.write(ch, b"t" * 512, 2048 + 1)            # needs a cluster: the md thread
            buf = bytearray(512)
            blob.read(ch, buf, 2048 + 1)
            assert buf == b"t" * 512
            with pytest.raises(WrongThreadError):
                blob.read(store.ch, bytearray(512), 0)
            ch.put()
        except BaseException as e:
            errors.append(e)
        finally:
            stop.append(1)
    t = threading.Thread(target=other)
    t.start()
    current_thread().run_until(lambda: stop, timeout=30)     # the md thread serves it
    t.join()
    assert not errors, errors
    assert store.read(blob, 2048 + 1, 1) == b"t" * 512
    blob.close()


def test_unload_needs_channels_put_and_closes_handles(store):
    bs = store.bs
    blob = bs.open(bs.create(num_clusters=1))
    blob.set_xattr("k", b"v")
    with pytest.raises(BlobBusy, match="channels"):
        bs.unload()
    store.put_channel()
    bs.unload()
    assert blob.closed
    with pytest.raises(BlobstoreClosed):
        bs.create()
    bs = Blobstore.load(store.name)
    assert bs.loaded_clean
    assert bs.open(blob.id).get_xattr("k") == b"v"              # synced by unload
    store.bs = bs
    store.ch = bs.get_io_channel()


def test_clean_and_dirty_loads(store):
    bs = store.bs
    ids = [bs.create(num_clusters=2, thin=bool(i % 2), xattrs={"i": bytes([i])})
           for i in range(6)]
    bs.delete(ids[2])
    bs = store.reload(clean=True)
    assert bs.loaded_clean and list(bs) == [i for i in ids if i != ids[2]]
    free = bs.free_clusters
    bs = store.reload(clean=False)
    assert not bs.loaded_clean and list(bs) == [i for i in ids if i != ids[2]]
    assert bs.free_clusters == free
    assert bs.info(ids[5])["xattrs"] == {"i": b"\x05"}


def test_load_of_a_bdev_without_a_store():
    name = fresh_name()
    b = malloc.create(name, size=16 * MiB)
    try:
        with pytest.raises(BlobstoreCorrupt, match="no blobstore on this bdev"):
            Blobstore.load(name)
        d = bdev.open_bdev(name, write=True)               # the failed load let go of it
        d.close()
    finally:
        b.unregister()


def test_the_bdev_is_claimed_while_loaded(store):
    with pytest.raises(bdev.BdevClaimed):
        bdev.open_bdev(store.name, write=True)
    d = bdev.open_bdev(store.name)                         # readers are fine
    d.close()


@pytest.mark.parametrize("block_size,cluster", [(4096, 1 << 20), (512, 4096), (4096, 4096)])
def test_other_block_and_cluster_sizes(block_size, cluster):
    s = Store(size=32 * MiB, block_size=block_size, cluster_size=cluster)
    try:
        bs, ch = s.bs, s.ch
        upc = cluster // block_size
        blob = bs.open(bs.create(num_clusters=4, thin=True))
        data = pattern(3 * cluster, 3)
        blob.write(ch, data, upc // 2)
        assert s.read(blob, upc // 2, 3 * upc) == data
        blob.close()
        bs = s.reload(clean=False)
        blob = bs.open(blob.id)
        assert s.read(blob, upc // 2, 3 * upc) == data
        blob.close()
    finally:
        s.close()


def test_store_on_a_null_bdev_runs_but_keeps_nothing():
    name = fresh_name("BlobNull")
    null.create(name, size=64 * MiB)
    try:
        bs = Blobstore.init(name)
        ch = bs.get_io_channel()
        blob = bs.open(bs.create(num_clusters=2, thin=True))
        blob.write(ch, b"x" * 512, 0)
        blob.close()
        ch.put()
        bs.unload()
    finally:
        bdev.get_bdev(name).unregister()


def test_sizes_out_of_reach_are_refused_clearly(store):
    bs = store.bs
    with pytest.raises(InvalidArgument, match="at most 4294967295 clusters"):
        bs.create(1 << 40, thin=True)
    with pytest.raises(NoSpace, match="clusters asked for"):
        bs.create(1 << 30)                           # thick: refused before taking anything
    assert bs.free_clusters == 63
    big = bs.open(bs.create(1 << 20, thin=True))     # overprovisioned: 1 TiB on 64 MiB
    assert big.num_units == (1 << 20) * 2048
    small = bs.open(bs.create(1))
    with pytest.raises(NoSpace, match="99 clusters asked for"):
        small.resize(100)
    assert small.num_clusters == 1 and bs.free_clusters == 62
    big.close()
    small.close()


def test_pieces_waiting_for_one_cluster_all_complete(store):
    """Writes to one unallocated cluster send one request to the metadata thread; the others
    wait behind it on their channel and go (or fail) with it."""
    bs, ch = store.bs, store.ch
    blob = bs.open(bs.create(num_clusters=2, thin=True))
    done = []
    for i in range(20):
        blob.write(ch, bytes([i + 1]) * 512, 7 + i, cb=lambda v, e: done.append(e))
    ch.thread.run_until(lambda: len(done) == 20, timeout=10)
    assert done == [None] * 20 and blob.allocated_clusters == 1
    assert store.read(blob, 7, 20) == b"".join(bytes([i + 1]) * 512 for i in range(20))
    full = bs.open(bs.create(num_clusters=bs.free_clusters))
    done.clear()
    for i in range(20):
        blob.write(ch, b"x" * 1024, 2048 + i * 2, cb=lambda v, e: done.append(e))
    ch.thread.run_until(lambda: len(done) == 20, timeout=10)
    assert all(isinstance(e, NoSpace) for e in done)
    full.close()
    blob.close()
