"""The blobstore against a byte model (hypothesis state machine): every blob's content is a
bytearray; snapshots copy it, clones start from their snapshot's, resize cuts or zero-extends,
writes/write zeroes/unmap change it; reloads (clean or after a crash, with every operation
acknowledged) change nothing. After every step each blob reads back exactly its model, and its
relations (parent, snapshot, clones) are the model's."""
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blob import BlobHasClones
from tests.blob.helpers import Store

UNIT = 512
CLUSTER = 16 << 10
UPC = CLUSTER // UNIT


class _Blob:
    def __init__(self, data, snapshot=False, parent=None, xattrs=None):
        self.data = bytearray(data)
        self.snapshot = snapshot
        self.parent = parent
        self.xattrs = dict(xattrs or {})


class BlobstoreModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = Store(size=4 << 20, cluster_size=CLUSTER)
        self.model = {}
        self.handles = {}
        self.pattern = 0

    def teardown(self):
        for h in self.handles.values():
            if not h.closed:
                h.close()
        self.s.close()

    # -- helpers --
    def _writable(self):
        return sorted(b for b, m in self.model.items() if not m.snapshot)

    def _snapshots(self):
        return sorted(b for b, m in self.model.items() if m.snapshot)

    def _clones_of(self, bid):
        return sorted(b for b, m in self.model.items() if m.parent == bid)

    def _fill(self, n):
        self.pattern += 1
        return bytes([(self.pattern * 37 + i) % 251 + 1 for i in range(n)])

    # -- rules --
    @precondition(lambda self: len(self.model) < 10)
    @rule(clusters=st.integers(0, 6), thin=st.booleans(), name=st.binary(max_size=8))
    def create(self, clusters, thin, name):
        x = {"name": name} if name else {}
        bid = self.s.bs.create(clusters, thin=thin, xattrs=x)
        self.model[bid] = _Blob(bytes(clusters * CLUSTER), xattrs=x)
        self.handles[bid] = self.s.bs.open(bid)

    @precondition(lambda self: self._writable())
    @rule(data=st.data(), units=st.integers(1, 2 * UPC + 3))
    def write(self, data, units):
        bid = data.draw(st.sampled_from(self._writable()))
        m = self.model[bid]
        total = len(m.data) // UNIT
        if total == 0:
            return
        units = min(units, total)
        off = data.draw(st.integers(0, total - units))
        how = data.draw(st.sampled_from(["write", "writev", "zeroes", "unmap"]))
        h = self.handles[bid]
        ch = self.s.ch
        if how in ("write", "writev"):
            buf = self._fill(units * UNIT)
            if how == "write":
                h.write(ch, buf, off)
            else:
                cut = data.draw(st.integers(1, units)) * UNIT if units > 1 else UNIT
                h.writev(ch, [buf[:cut], buf[cut:]] if cut < len(buf) else [buf], off)
        else:
            buf = bytes(units * UNIT)
            (h.write_zeroes if how == "zeroes" else h.unmap)(ch, off, units)
        m.data[off * UNIT:(off + units) * UNIT] = buf

    @precondition(lambda self: self._writable())
    @rule(data=st.data(), clusters=st.integers(0, 7))
    def resize(self, data, clusters):
        bid = data.draw(st.sampled_from(self._writable()))
        self.handles[bid].resize(clusters)
        m = self.model[bid]
        n = clusters * CLUSTER
        m.data = m.data[:n] + bytes(max(0, n - len(m.data)))

    @precondition(lambda self: self._writable())
    @rule(data=st.data(), value=st.binary(max_size=40))
    def xattr(self, data, value):
        bid = data.draw(st.sampled_from(self._writable()))
        h, m = self.handles[bid], self.model[bid]
        if m.xattrs and data.draw(st.booleans()):
            name = data.draw(st.sampled_from(sorted(m.xattrs)))
            h.remove_xattr(name)
            del m.xattrs[name]
        else:
            name = data.draw(st.sampled_from(["a", "b", "name"]))
            h.set_xattr(name, value)
            m.xattrs[name] = value
        if data.draw(st.booleans()):
            h.sync_md()

    @precondition(lambda self: self._writable() and len(self.model) < 10)
    @rule(data=st.data())
    def snapshot(self, data):
        bid = data.draw(st.sampled_from(self._writable()))
        sid = self.s.bs.snapshot(bid)
        m = self.model[bid]
        self.model[sid] = _Blob(m.data, snapshot=True, parent=m.parent)
        m.parent = sid
        self.handles[sid] = self.s.bs.open(sid)

    @precondition(lambda self: self._snapshots() and len(self.model) < 10)
    @rule(data=st.data())
    def clone(self, data):
        sid = data.draw(st.sampled_from(self._snapshots()))
        cid = self.s.bs.clone(sid)
        self.model[cid] = _Blob(self.model[sid].data, parent=sid)
        self.handles[cid] = self.s.bs.open(cid)

    @precondition(lambda self: self._writable())
    @rule(data=st.data(), inflate=st.booleans())
    def cut_loose(self, data, inflate):
        bid = data.draw(st.sampled_from(self._writable()))
        m = self.model[bid]
        if inflate:
            self.s.bs.inflate(bid)
            m.parent = None
        else:
            self.s.bs.decouple_parent(bid)
            if m.parent is not None:
                m.parent = self.model[m.parent].parent

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        bid = data.draw(st.sampled_from(sorted(self.model)))
        self.handles.pop(bid).close()
        if self._clones_of(bid):
            try:
                self.s.bs.delete(bid)
            except BlobHasClones as e:
                assert e.clones == self._clones_of(bid)
            else:
                raise AssertionError("a snapshot with clones was deleted")
            self.handles[bid] = self.s.bs.open(bid)
            return
        self.s.bs.delete(bid)
        del self.model[bid]

    @rule(clean=st.booleans())
    def reload(self, clean):
        for h in self.handles.values():
            h.close()
        bs = self.s.reload(clean=clean)
        self.handles = {bid: bs.open(bid) for bid in self.model}

    # -- what must always hold --
    @invariant()
    def matches_the_model(self):
        bs = self.s.bs
        assert sorted(bs) == sorted(self.model)
        for bid, m in self.model.items():
            info = bs.info(bid)
            assert info["size"] == len(m.data)
            assert info["snapshot"] == m.snapshot and info["parent"] == m.parent
            assert info["clones"] == self._clones_of(bid)
            assert info["xattrs"] == m.xattrs
            if m.data:
                assert self.s.read(self.handles[bid], 0, len(m.data) // UNIT) == m.data, bid
        # no cluster leaked or held twice
        held = [c for b in bs.blobs.values() for c in b.data.clusters()]
        assert len(held) == len(set(held))
        g = bs.geometry
        pending = sum(len(b.dropped) for b in bs.blobs.values())
        assert bs.used_clusters.count == g.data_start_cluster + len(held) + pending


TestBlobstoreModel = BlobstoreModel.TestCase
TestBlobstoreModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
