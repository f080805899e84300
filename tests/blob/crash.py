"""Power cuts under the blobstore: a journaling bdev, a random workload with a model of what must
survive, and the check of a store loaded from the device as it was at a cut.

The bdev (`JournalBdev`, a Python module) holds writes until its poller completes them, in random
order, applying each to its image at completion and appending it to a journal. A workload of
random operations (create, resize, write, write zeroes, xattrs, sync_md, snapshot, clone,
inflate, decouple, close, delete) runs to its end on it, recording for every operation how long
the journal was when it started and when it was acknowledged.

A power cut at journal position k is then the device holding writes 0 ... k-1, write k torn (a
random subset of its blocks), and nothing after: every write after the cut is lost, whatever the
store was told. For each cut the image is loaded into a malloc bdev and `Blobstore.load` runs;
then every blob and byte that was durable before the cut must be there, nothing that never was
may appear, and after a clean unload `blob.check` must find nothing wrong (no leaked or doubly
held cluster).

What "durable" means is the store's contract (blob.store): an operation acknowledged before the
cut is in; for the one in flight at the cut, either outcome; data written into a blob whose
metadata had no unsynced change is durable when the write is acknowledged; resizes and xattrs
when a sync_md (close, snapshot...) after them is.
"""
import random
import struct

import bdev as _bdev
from bdev import malloc
from bdev.core import PyBdev
from blob import Blobstore
from blob.check import check
from env.thread import current_thread


class JournalBdev(PyBdev):
    """See the module. `journal` holds (byte offset, data) or (byte offset, length) for zeroes."""

    def __init__(self, name, size, block_size, seed):
        super().__init__(name, block_size=block_size, num_blocks=size // block_size,
                         module="journal", io_types=("read", "write", "write_zeroes", "flush"))
        self.image = bytearray(size)
        self.journal = []
        self.pending = []
        self.rng = random.Random(seed)
        self.poller = current_thread().register_poller(self._poll, name=f"journal:{name}")

    def submit(self, io):
        self.pending.append(io)
        return 0

    def _poll(self):
        if not self.pending:
            return False
        batch, self.pending = self.pending, []
        self.rng.shuffle(batch)
        batch.sort(key=lambda io: io.type == "flush")      # after the writes before them
        bs = self.block_size
        for io in batch:
            off, n = io.offset_blocks * bs, io.num_blocks * bs
            if io.type == "read":
                pos = off
                for mv in io.buffers():
                    mv[:] = self.image[pos:pos + mv.nbytes]
                    pos += mv.nbytes
            elif io.type == "write":
                data = b"".join(bytes(mv) for mv in io.buffers())
                self.image[off:off + n] = data
                self.journal.append((off, data))
            elif io.type == "write_zeroes":
                self.image[off:off + n] = bytes(n)
                self.journal.append((off, n))
            io.complete("success")
        return True

    def stop(self):
        self.poller.unregister()


def images_at(journal, size, block_size, cuts, rng):
    """The device image at each cut (ascending journal positions): writes before it whole, the
    write at it torn at block granularity, nothing after."""
    img = bytearray(size)
    done = 0
    for k in sorted(cuts):
        for off, d in journal[done:k]:
            if isinstance(d, int):
                img[off:off + d] = bytes(d)
            else:
                img[off:off + len(d)] = d
        done = k
        out = bytearray(img)
        if k < len(journal):
            off, d = journal[k]
            n = d if isinstance(d, int) else len(d)
            for b in range(0, n, block_size):
                if rng.random() < 0.5:
                    out[off + b:off + b + block_size] = (bytes(block_size) if isinstance(d, int)
                                                         else d[b:b + block_size])
        yield k, out


# ---- the data written: a pattern per unit that says which write wrote it -----------------------
def unit_data(write_id, unit, size):
    head = struct.pack("<QQ", write_id, unit)
    return head + bytes([(write_id * 131 + unit) & 0xFF or 1]) * (size - len(head))


def decode_unit(data, unit):
    """The write id whose pattern `data` holds (0 for zeroes); raises on anything else."""
    if not any(data):
        return 0
    wid, u = struct.unpack_from("<QQ", data)
    if u != unit or data != unit_data(wid, unit, len(data)):
        raise AssertionError(f"unit {unit} holds data no write put there "
                             f"(starts {bytes(data[:24]).hex()})")
    return wid


# ---- the model --------------------------------------------------------------------------------
class M:
    """What a blob holds in memory (cur) and what a crash may leave of it (allowed, sizes,
    xstates, parents)."""

    def __init__(self, bid, size, upc, xattrs, thin=False, snapshot=False, parent=None,
                 content=None):
        self.id, self.size, self.upc = bid, size, upc
        self.cur = list(content) if content is not None else [0] * (size * upc)
        self.xattrs = dict(xattrs)
        self.thin, self.snapshot, self.parent = thin, snapshot, parent
        self.md_dirty = False
        self.sync()

    def sync(self):
        self.allowed = {u: {v} for u, v in enumerate(self.cur)}
        self.sizes = {self.size}
        self.xstates = [dict(self.xattrs)]
        self.parents = {self.parent}
        self.md_dirty = False

    def copy_as(self, bid, **kw):
        return M(bid, self.size, self.upc, kw.pop("xattrs", {}), content=self.cur, **kw)

    def write(self, off, n, wid, durable):
        for u in range(off, off + n):
            self.cur[u] = wid
            if durable and not self.md_dirty:
                self.allowed[u] = {wid}
            else:
                self.allowed.setdefault(u, set()).add(wid)

    def resize(self, n):
        units = n * self.upc
        if units < len(self.cur):
            del self.cur[units:]
        else:
            for u in range(len(self.cur), units):
                self.cur.append(0)
                self.allowed.setdefault(u, set()).add(0)
        self.size = n
        self.sizes.add(n)
        self.md_dirty = True

    def set_xattrs(self, xattrs):
        self.xattrs = dict(xattrs)
        self.xstates.append(dict(xattrs))
        self.md_dirty = True


class Workload:
    """A random sequence of operations on a store over a JournalBdev, run to its end, with the
    journal positions each started and was acknowledged at."""

    def __init__(self, seed, *, size=4 << 20, block_size=512, cluster_size=16 << 10, nops=40,
                 name="Crash"):
        self.seed = seed
        self.rng = random.Random(seed)
        self.size, self.block_size, self.cluster_size = size, block_size, cluster_size
        self.upc = cluster_size // block_size
        self.nops = nops
        self.name = name
        self.ops = []            # (kind, args, result, before, after)
        self.handles = {}
        self.next_wid = 1

    # -- running --
    def run(self):
        self.dev = JournalBdev(self.name, self.size, self.block_size, self.seed).register()
        try:
            self.bs = self._call("init", lambda cb: Blobstore.init(
                self.name, cluster_size=self.cluster_size, md_pages=64, clear="none", cb=cb))
            self.ch = self.bs.get_io_channel()
            live = {}                              # id -> M, what runs now (for choosing)
            for _ in range(self.nops):
                self._step(live)
            for h in self.handles.values():
                if not h.closed:
                    h.close()
            self.ch.put()
            self.bs.unload()
        finally:
            self.journal = self.dev.journal
            self.dev.stop()
            self.dev.unregister()
        return self

    def _call(self, kind, start, *args):
        """Run one operation with a callback, noting journal positions."""
        before = len(self.dev.journal)
        box = []
        start(lambda v, e: box.append((v, e, len(self.dev.journal))))
        current_thread().run_until(lambda: box, timeout=60)
        v, e, after = box[0]
        if e is not None:
            raise e
        if kind != "init":
            self.ops.append((kind, args, v, before, after))
        else:
            self.init_after = after
        return v

    def _step(self, live):
        rng = self.rng
        writable = [b for b in live.values() if not b.snapshot]
        snaps = [b for b in live.values() if b.snapshot]
        choices = ["create"] * 3 if len(live) < 10 else []
        if writable:
            choices += ["write"] * 6 + ["zeroes", "resize", "xattr", "sync", "sync", "snapshot",
                                        "close_delete", "inflate", "decouple"]
        if snaps:
            choices += ["clone"] * 2
        if snaps and len(live) >= 8:
            choices += ["close_delete"] * 2
        kind = rng.choice(choices or ["create"])
        if kind == "create":
            n = rng.randint(0, 6)
            thin = rng.random() < 0.5
            x = {"name": rng.randbytes(rng.randint(0, 20))} if rng.random() < 0.5 else {}
            bid = self._call("create", lambda cb: self.bs.create(n, thin, x, cb=cb), n, thin, x)
            self.handles[bid] = self.bs.open(bid)
            live[bid] = M(bid, n, self.upc, x, thin=thin)
        elif kind in ("write", "zeroes"):
            b = rng.choice(writable)
            total = b.size * self.upc
            if total == 0:
                return
            off = rng.randrange(total)
            n = rng.randint(1, min(total - off, 2 * self.upc))
            h = self.handles[b.id]
            if kind == "write":
                wid = self.next_wid
                self.next_wid += 1
                data = b"".join(unit_data(wid, u, self.block_size) for u in range(off, off + n))
                self._call("write", lambda cb: h.write(self.ch, data, off, cb=cb), b.id, off, n,
                           wid)
            else:
                wid = 0
                self._call("write", lambda cb: h.write_zeroes(self.ch, off, n, cb=cb), b.id, off,
                           n, 0)
            b.write(off, n, wid, True)
        elif kind == "resize":
            b = rng.choice(writable)
            n = rng.randint(0, 8)
            self._call("resize", lambda cb: self.handles[b.id].resize(n, cb=cb), b.id, n)
            b.resize(n)
        elif kind == "xattr":
            b = rng.choice(writable)
            h = self.handles[b.id]
            if b.xattrs and rng.random() < 0.3:
                name = rng.choice(sorted(b.xattrs))
                h.remove_xattr(name)
            else:
                name = rng.choice(["a", "b", "c", "name", "k" * 40])
                # now and then values large enough to need a chain of several pages
                big = rng.random() < 0.25
                h.set_xattr(name, rng.randbytes(rng.randint(1000, 3700) if big else
                                                rng.randint(0, 300)))
            x = {n: h.get_xattr(n) for n in h.xattr_names()}
            self.ops.append(("xattr", (b.id, x), None, len(self.dev.journal),
                             len(self.dev.journal)))
            b.set_xattrs(x)
        elif kind == "sync":
            b = rng.choice(writable)
            self._call("sync", lambda cb: self.handles[b.id].sync_md(cb=cb), b.id)
            b.sync()
        elif kind == "snapshot":
            b = rng.choice(writable)
            sid = self._call("snapshot", lambda cb: self.bs.snapshot(b.id, cb=cb), b.id)
            self.handles[sid] = self.bs.open(sid)
            live[sid] = b.copy_as(sid, snapshot=True, parent=b.parent, thin=b.thin)
            b.parent = sid
            b.thin = True
            b.sync()
        elif kind == "clone":
            s = rng.choice(snaps)
            cid = self._call("clone", lambda cb: self.bs.clone(s.id, cb=cb), s.id)
            self.handles[cid] = self.bs.open(cid)
            live[cid] = s.copy_as(cid, parent=s.id, thin=True)
        elif kind in ("inflate", "decouple"):
            b = rng.choice(writable)
            fn = self.bs.inflate if kind == "inflate" else self.bs.decouple_parent
            self._call(kind, lambda cb: fn(b.id, cb=cb), b.id)
            if kind == "inflate":
                b.parent, b.thin = None, False
                b.sync()
            elif b.parent is not None:            # (without a parent, decouple does nothing)
                b.parent = live[b.parent].parent
                b.sync()
        elif kind == "close_delete":
            cands = [m for m in live.values()
                     if not any(o.parent == m.id for o in live.values())]
            if not cands:
                return
            b = rng.choice(cands)
            self._call("close", lambda cb: self.handles[b.id].close(cb=cb), b.id)
            b.sync()
            self._call("delete", lambda cb: self.bs.delete(b.id, cb=cb), b.id)
            del live[b.id]

    # -- what a cut at journal position k must leave --------------------------------------------
    def expected(self, k):
        """(sure, maybe): id -> M of the blobs that must exist, and of those that may (their
        creation or deletion was in flight at the cut; M None: deleted, anything allowed is
        "absent")."""
        live, maybe = {}, {}
        for kind, args, result, before, after in self.ops:
            if before > k:
                break
            acked = after <= k
            self._apply(live, maybe, kind, args, result, acked)
            if not acked:
                break
        return live, maybe

    def _apply(self, live, maybe, kind, args, result, acked):
        upc = self.upc
        if kind == "create":
            n, thin, x = args
            m = M(result, n, upc, x, thin=thin)
            (live if acked else maybe)[result] = m
        elif kind == "write":
            bid, off, n, wid = args
            live[bid].write(off, n, wid, acked)
        elif kind == "resize":
            bid, n = args
            b = live[bid]
            if acked:
                b.resize(n)
            else:
                b.sizes.add(n)
                for u in range(b.size * upc, n * upc):
                    b.allowed.setdefault(u, set()).add(0)
        elif kind == "xattr":
            bid, x = args
            live[bid].set_xattrs(x)
        elif kind in ("sync", "close"):
            if acked:
                live[args[0]].sync()
        elif kind == "snapshot":
            b = live[args[0]]
            s = b.copy_as(result, snapshot=True, parent=b.parent, thin=b.thin)
            if acked:
                live[result] = s
                b.parent, b.thin = result, True
                b.sync()
            else:
                maybe[result] = s
                b.parents.add(result)
        elif kind == "clone":
            s = live[args[0]]
            c = s.copy_as(result, parent=s.id, thin=True)
            (live if acked else maybe)[result] = c
        elif kind in ("inflate", "decouple"):
            b = live[args[0]]
            if kind == "decouple" and b.parent is None:
                return                                # nothing to do: nothing written
            new = None if kind == "inflate" else live[b.parent].parent
            if acked:
                b.parent = new
                b.sync()
            else:
                b.parents.add(new)
        elif kind == "delete":
            bid = args[0]
            if acked:
                del live[bid]
            else:
                maybe[bid] = live.pop(bid)


def verify_cut(w, k, image, name):
    """Load the store from `image` (a cut at journal position k of workload w) and check it."""
    b = malloc.create(name, size=len(image), block_size=w.block_size)
    try:
        d = _bdev.open_bdev(name, write=True)
        ch = d.get_io_channel()
        d.write_sync(ch, image, 0)
        ch.put()
        d.close()
        try:
            bs = Blobstore.load(name)
        except Exception:
            if k <= w.init_after:
                return "no store yet"
            raise
        try:
            _verify_store(w, k, bs)
        finally:
            if not bs.closed:
                bs.unload()
        report = check(name)
        assert report.ok, f"check after recovery at cut {k}:\n{report.text()}"
        return "ok"
    finally:
        b.unregister()


def _verify_store(w, k, bs):
    sure, maybe = w.expected(k)
    found = set(bs)
    missing = set(sure) - found
    assert not missing, f"cut {k}: blobs {sorted(missing)} were durable and are gone"
    extra = found - set(sure) - set(maybe)
    assert not extra, f"cut {k}: blobs {sorted(extra)} appeared (never durable or deleted)"
    ch = bs.get_io_channel()
    try:
        for bid in sorted(found):
            m = sure.get(bid) or maybe.get(bid)
            info = bs.info(bid)
            where = f"seed {w.seed}, cut {k} (of {len(w.journal)}), blob {bid}"
            assert info["num_clusters"] in m.sizes, \
                f"{where}: {info['num_clusters']} clusters, expected one of {sorted(m.sizes)}"
            assert info["xattrs"] in m.xstates, f"{where}: xattrs {info['xattrs']}"
            assert info["snapshot"] == m.snapshot, f"{where}: snapshot flag"
            assert info["parent"] in m.parents, \
                f"{where}: parent {info['parent']}, expected one of {m.parents}"
            n = info["num_clusters"] * w.upc
            if n == 0:
                continue
            h = bs.open(bid)
            buf = bytearray(n * w.block_size)
            h.read(ch, buf, 0)
            h.close()
            for u in range(n):
                got = decode_unit(buf[u * w.block_size:(u + 1) * w.block_size], u)
                allowed = m.allowed.get(u, set())
                assert got in allowed, (f"{where}, unit {u}: holds write {got}, expected one of "
                                        f"{sorted(allowed)}")
    finally:
        ch.put()
