"""Argument specs the fuzz machine draws, and how each becomes a real argument.

Hypothesis draws small symbolic specs (("blk", 3), ("neg",), ("type", 1.5)...), which print
readably in a reproducing example; `Arg*` turn them into values for the device at hand and say
which fault, if any, the value is. Faults name what a correct API must refuse:

    int_range   a negative int or one of 2**64 or more for an unsigned parameter
    type        a value of the wrong type
    misaligned  a byte offset or length that is not a multiple of the block size
    empty       zero blocks
    range       blocks outside the bdev
    buffer      a buffer that cannot serve the I/O (None, too small, read-only for a read,
                not contiguous, an empty vector...)
    freed       a freed DmaBuffer
"""
import mmap

from hypothesis import strategies as st

from env import memory

HUGE = (2**63, 2**64 - 512, 2**64, 2**70)
BAD_TYPES = (1.5, "0", None, b"\0", [0])


def weighted(*choices):
    """One of `(weight, strategy)` choices, in proportion to the weights (shrinking goes to the
    first). st.one_of would pick its branches about evenly."""
    index = [i for i, (w, _) in enumerate(choices) for _ in range(w)]
    return st.sampled_from(index).flatmap(lambda i: choices[i][1])


# ---- offsets and lengths -------------------------------------------------------------------------
OFFSET = weighted(
    (24, st.tuples(st.just("blk"), st.integers(0, 255))),
    (3, st.tuples(st.just("edge"), st.integers(0, 6))),   # N - k blocks: near and at the end
    (1, st.tuples(st.just("past"), st.integers(1, 3))),
    (1, st.tuples(st.just("mis"), st.sampled_from([1, 3, 256, 511]))),
    (1, st.just(("neg",))),
    (1, st.tuples(st.just("huge"), st.sampled_from(HUGE))),
    (1, st.tuples(st.just("type"), st.sampled_from(BAD_TYPES))),
)

LENGTH = weighted(
    (24, st.tuples(st.just("n"), st.integers(1, 24))),
    (2, st.tuples(st.just("n"), st.integers(25, 140))),
    (1, st.just(("zero",))),
    (1, st.just(("neg",))),
    (1, st.tuples(st.just("mis"), st.sampled_from([1, 100, 511]))),
    (1, st.tuples(st.just("huge"), st.sampled_from(HUGE))),
    (1, st.tuples(st.just("type"), st.sampled_from(BAD_TYPES))),
)

BUFFER_KINDS = ("bytearray", "bytes", "mv", "mv_ro", "mv_nc", "mv_cast", "dma", "dma_mv",
                "dma_freed", "mmap", "small", "none", "str", "int")
BUFFER = st.tuples(
    weighted((12, st.sampled_from(("bytearray", "mv", "dma", "dma_mv", "mmap", "bytes",
                                   "mv_cast"))),
             (1, st.sampled_from(BUFFER_KINDS))),
    st.sampled_from([0, 0, 0, 512, 37]),        # bytes beyond what the I/O needs
    st.sampled_from([0, 0, 1, 4, 64, 100]),      # start of the slice (mv, dma_mv): alignment
)

VECTOR = st.tuples(
    st.sampled_from(["list"] * 8 + ["tuple", "tuple", "generator", "generator", "bytes",
                                    "empty", "int"]),
    st.lists(st.tuples(weighted((16, st.sampled_from(("bytearray", "mv", "dma", "dma_mv",
                                                      "mmap", "bytes"))),
                                (1, st.sampled_from(("mv_ro", "mv_nc", "dma_freed", "str")))),
                       st.sampled_from([512] * 4 + [1024, 2048, 4096, 256, 768, 100])),
             min_size=1, max_size=5),
)

MODES = ("cb",) * 8 + ("sync", "sync", "helper", "helper", "nocb", "badcb")


def bad_type(v):
    """`v` as drawn, unless a known defect makes it silently valid (a float is truncated)."""
    from tests.fuzz.known_bugs import present
    if isinstance(v, float) and present("float_truncated"):
        return "0"
    return v


def int_fault(v):
    """The fault of an unsigned integer argument `v`, or None."""
    if isinstance(v, bool) or not isinstance(v, int):
        return "type"
    if v < 0 or v >= 2**64:
        return "int_range"
    return None


def offset_bytes(spec, nblocks, bs):
    kind = spec[0]
    if kind == "blk":
        return (spec[1] % nblocks) * bs
    if kind == "edge":
        return max(nblocks - spec[1], 0) * bs
    if kind == "past":
        return (nblocks - 1 + spec[1]) * bs
    if kind == "mis":
        return spec[1]
    if kind == "neg":
        return -bs
    if kind == "type":
        return bad_type(spec[1])
    return spec[1]                       # huge


def offset_blocks(spec, nblocks):
    kind = spec[0]
    if kind == "blk":
        return spec[1] % nblocks
    if kind == "edge":
        return max(nblocks - spec[1], 0)
    if kind == "past":
        return nblocks - 1 + spec[1]
    if kind == "mis":
        return spec[1] % nblocks
    if kind == "neg":
        return -1
    if kind == "type":
        return bad_type(spec[1])
    return spec[1]


def length_bytes(spec, bs):
    kind = spec[0]
    if kind == "n":
        return spec[1] * bs
    if kind == "zero":
        return 0
    if kind == "neg":
        return -bs
    if kind == "mis":
        return bs + spec[1]
    if kind == "type":
        return bad_type(spec[1])
    return spec[1]


def length_blocks(spec):
    kind = spec[0]
    if kind == "n":
        return spec[1]
    if kind == "zero":
        return 0
    if kind == "neg":
        return -1
    if kind == "mis":
        return 1 + spec[1] // 100
    if kind == "type":
        return bad_type(spec[1])
    return spec[1]


# ---- buffers -------------------------------------------------------------------------------------
class Buffer:
    """A materialised buffer: `obj` is what the API gets; `view` a writable/readable view of the
    bytes the I/O moves (None for non-buffers); `keep` holds what must stay alive."""

    def __init__(self, kind, obj, view=None, keep=(), dma=None):
        self.kind = kind
        self.obj = obj
        self.view = view
        self.keep = keep
        self.dma = dma                    # the DmaBuffer behind it, if any

    @property
    def readonly(self):
        return self.view is not None and self.view.readonly

    @property
    def contiguous(self):
        return self.view is None or self.view.c_contiguous

    def api_len(self):
        """The length the byte API takes from the buffer when no length is given (None: the
        object has none)."""
        if self.kind == "dma" or self.kind == "dma_freed":
            return len(self.obj)
        if self.kind in ("none", "str", "int"):
            return None
        return memoryview(self.obj).nbytes

    def fault(self, need, for_read):
        """Why this buffer cannot serve an I/O of `need` bytes (None: it can)."""
        if self.kind in ("str", "int"):
            return "type"
        if self.kind == "dma_freed":
            return "freed"
        if self.view is None:
            return "buffer"
        if not self.contiguous:
            return "buffer"
        if for_read and self.readonly:
            return "buffer"
        if need is not None and self.api_len() < need:
            return "buffer"
        return None

    def release(self):
        """Free what the machine allocated (DMA memory), when nothing uses it any more."""
        if self.dma is not None and not self.dma.freed:
            if self.view is not None:
                self.view.release()
            for k in self.keep:
                if isinstance(k, memoryview):
                    k.release()
            self.obj = None
            try:
                self.dma.free()
            except Exception:            # a view is still alive somewhere: the GC frees it
                pass


CANARY = 0xA5


def make_buffer(kind, size, shift, fill):
    """A buffer of `kind` whose I/O part is `size` bytes, filled from `fill(n)`."""
    size = max(size, 0)
    data = fill(size)
    if kind == "bytearray":
        b = bytearray(data)
        return Buffer(kind, b, memoryview(b))
    if kind == "bytes":
        b = bytes(data)
        return Buffer(kind, b, memoryview(b))
    if kind == "mv":
        raw = bytearray([CANARY]) * (size + shift)
        raw[shift:] = data
        mv = memoryview(raw)[shift:shift + size]
        return Buffer(kind, mv, mv, keep=(raw,))
    if kind == "mv_ro":
        raw = bytes(data)
        mv = memoryview(raw)
        return Buffer(kind, mv, mv, keep=(raw,))
    if kind == "mv_nc":
        raw = bytearray(2 * size or 2)
        mv = memoryview(raw)[::2]
        return Buffer(kind, mv, mv, keep=(raw,))
    if kind == "mv_cast":
        raw = bytearray(data) + bytearray((-size) % 4)
        mv = memoryview(raw).cast("I") if len(raw) else memoryview(raw)
        return Buffer(kind, mv, memoryview(raw)[:size], keep=(raw,))
    if kind in ("dma", "dma_mv", "dma_freed"):
        start = shift if kind == "dma_mv" else 0
        dma = memory.allocate(max(size + start, 1))
        mv = memoryview(dma)
        mv[:] = bytes([CANARY]) * len(mv)
        if kind == "dma_freed":
            mv.release()
            dma.free()
            return Buffer(kind, dma)
        mv[start:start + size] = data
        if kind == "dma":
            return Buffer(kind, dma, mv[:size], keep=(mv,), dma=dma)
        part = mv[start:start + size]
        return Buffer(kind, part, part, keep=(mv,), dma=dma)
    if kind == "mmap":
        m = mmap.mmap(-1, max(size, 1))
        mv = memoryview(m)
        mv[:size] = data
        return Buffer(kind, m, mv[:size], keep=(mv, m))
    if kind == "none":
        return Buffer(kind, None)
    if kind == "str":
        return Buffer(kind, "x" * size)
    if kind == "int":
        return Buffer(kind, size)
    raise AssertionError(kind)
