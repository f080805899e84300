"""The metadata thread's I/O on the base bdev, as waitables (blob.tasks): pages, bitmaps, cluster
fills and flushes. At most `max_inflight` I/Os are out at once; the rest wait in order."""
import collections

from blob.errors import BlobIoError
from blob.layout import PAGE
from env import memory


class MdIo:
    def __init__(self, desc, ch, max_inflight=128):
        self.desc = desc
        self.ch = ch
        self.bdev = desc.bdev
        self.bs = desc.bdev.block_size
        self.can_flush = desc.bdev.io_type_supported("flush")
        self.max_inflight = max_inflight
        self.inflight = 0
        self._queue = collections.deque()
        self.failed = None               # the first error: the caller decides what it means

    # -- the queue --
    def _op(self, what, submit, result=None):
        """A waitable for one bdev I/O: `submit(ch, cb)` starts it."""
        def start(resume):
            self._queue.append((what, submit, result, resume))
            self._pump()
        return start

    def _pump(self):
        while self._queue and self.inflight < self.max_inflight:
            what, submit, result, resume = self._queue.popleft()
            self.inflight += 1
            done = self._done(what, result, resume)
            try:
                submit(self.ch, done)
            except Exception as e:
                done(False, e)

    def _done(self, what, result, resume):
        def cb(ok, status):
            self.inflight -= 1
            if ok:
                resume(result, None)
            else:
                err = BlobIoError(f"{what} on {self.bdev.name} failed: {status}",
                                  errno=getattr(status, "errno", None))
                if self.failed is None:
                    self.failed = err
                resume(None, err)
            if self._queue:
                self._pump()
        return cb

    # -- operations --
    def write_pages(self, page, data):
        """Write `data` (whole pages) at page `page` of the device."""
        nblocks = len(data) // self.bs
        lba = page * (PAGE // self.bs)
        return self._op(f"metadata write of page {page}",
                        lambda ch, cb: self.desc.write_blocks(ch, data, lba, nblocks, cb=cb))

    def read_pages(self, page, count):
        """Read `count` pages from page `page`; the waitable gives a DmaBuffer."""
        buf = memory.allocate(count * PAGE)
        lba = page * (PAGE // self.bs)
        return self._op(f"metadata read of pages {page}+{count}",
                        lambda ch, cb: self.desc.read_blocks(ch, buf, lba, count * PAGE // self.bs,
                                                             cb=cb), buf)

    def read_blocks(self, lba, buf, nblocks):
        return self._op(f"read of blocks {lba}+{nblocks}",
                        lambda ch, cb: self.desc.read_blocks(ch, buf, lba, nblocks, cb=cb))

    def write_blocks(self, lba, buf, nblocks):
        return self._op(f"write of blocks {lba}+{nblocks}",
                        lambda ch, cb: self.desc.write_blocks(ch, buf, lba, nblocks, cb=cb))

    def zero_blocks(self, lba, nblocks):
        return self._op(f"write zeroes of blocks {lba}+{nblocks}",
                        lambda ch, cb: self.desc.write_zeroes_blocks(ch, lba, nblocks, cb=cb))

    def flush(self):
        """Make what was written durable (a no-op where the bdev has no flush)."""
        if not self.can_flush:
            return lambda resume: resume()
        return self._op("flush", lambda ch, cb: self.desc.flush(ch, cb=cb))
