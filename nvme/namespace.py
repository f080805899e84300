"""An NVMe namespace: its format, its features, and I/O on it through a queue pair.

Every I/O method checks its arguments before anything reaches the device (LBA range inside the
namespace, non-zero length, a DMA buffer large enough, a command the namespace supports) and then
submits through `QueuePair.submit_nvm`, which splits transfers above the controller's maximum.
`cb(completion)` runs from `qpair.process_completions()`. The `*_sync` helpers poll until the
command completes and raise `CommandError` for an error status.

The C-level path used by the bdev layer and the perf engine calls `QueuePair.submit_io` directly
with `nsid` and `lba_shift` from here; it never goes through these Python methods.
"""
import time

from env import memory
from env.errors import InvalidArgument
from nvme.errors import CommandError, CommandTimeout, ControllerDetached, UnsupportedCommand

OP_FLUSH, OP_WRITE, OP_READ, OP_COMPARE, OP_WRITE_ZEROES, OP_DSM = 0x00, 0x01, 0x02, 0x05, 0x08, 0x09
FUA = 1 << 30                 # CDW12: Force Unit Access
DEAC = 1 << 25                # Write Zeroes CDW12: deallocate the blocks too
DSM_DEALLOCATE = 1 << 2       # Dataset Management CDW11: AD
MAX_DSM_RANGES = 256
MAX_WRITE_ZEROES_BLOCKS = 65536

ONCS_COMPARE, ONCS_DSM, ONCS_WRITE_ZEROES = 1 << 0, 1 << 2, 1 << 3


class Namespace:
    """One active namespace of a controller (`ctrlr.namespace(nsid)`)."""

    def __init__(self, ctrlr, nsid, data):
        self.ctrlr = ctrlr
        self.nsid = nsid
        self._detached = False
        self._update(data)

    def _update(self, data):
        self.data = data
        self.block_size = data.block_size
        self.lba_shift = self.block_size.bit_length() - 1
        self.nblocks = data.nsze
        self.metadata_size = data.metadata_size
        if self.block_size & (self.block_size - 1) or self.block_size < 512:
            raise InvalidArgument(f"namespace {self.nsid}: block size {self.block_size} is not "
                                  "a power of two of at least 512")

    # ---- facts --------------------------------------------------------------------------------
    @property
    def size(self):
        return self.nblocks * self.block_size

    @property
    def oncs(self):
        return self.ctrlr.data.oncs

    @property
    def supports_write_zeroes(self):
        return bool(self.oncs & ONCS_WRITE_ZEROES)

    @property
    def supports_deallocate(self):
        return bool(self.oncs & ONCS_DSM)

    @property
    def supports_compare(self):
        return bool(self.oncs & ONCS_COMPARE)

    @property
    def max_transfer(self):
        return self.ctrlr.max_transfer

    def __repr__(self):
        return (f"<Namespace {self.ctrlr.name} nsid={self.nsid} {self.nblocks} x "
                f"{self.block_size} B>")

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, lba, nblocks):
        if self._detached or self.ctrlr.state in ("detached", "failed"):
            raise ControllerDetached(f"{self.ctrlr.name} is {self.ctrlr.state}; namespace "
                                     f"{self.nsid} is gone")
        if not isinstance(lba, int) or not isinstance(nblocks, int):
            raise InvalidArgument("lba and nblocks must be integers")
        if nblocks <= 0:
            raise InvalidArgument(f"nblocks must be positive, not {nblocks}")
        if lba < 0 or lba + nblocks > self.nblocks:
            raise InvalidArgument(f"LBA range {lba}+{nblocks} is outside namespace {self.nsid} "
                                  f"({self.nblocks} blocks)")

    def _need(self, supported, what):
        if not supported:
            raise UnsupportedCommand(f"namespace {self.nsid} of {self.ctrlr.name} does not "
                                     f"support {what} (ONCS=0x{self.oncs:x})")

    def _nblocks_of(self, buf, offset, nblocks):
        if nblocks is not None:
            return nblocks
        if not isinstance(buf, memory.DmaBuffer):
            raise InvalidArgument(f"buf must be an env.memory.DmaBuffer, not {type(buf).__name__}")
        avail = buf.size - offset
        if avail <= 0 or avail % self.block_size:
            raise InvalidArgument(f"a {buf.size}-byte buffer from offset {offset} is not a whole "
                                  f"number of {self.block_size}-byte blocks; pass nblocks")
        return avail // self.block_size

    # ---- asynchronous I/O ---------------------------------------------------------------------
    def read(self, qpair, buf, lba, nblocks=None, cb=None, *, offset=0, fua=False):
        nblocks = self._nblocks_of(buf, offset, nblocks)
        self._check(lba, nblocks)
        qpair.submit_nvm(OP_READ, self.nsid, lba, nblocks, self.lba_shift, buf, offset,
                         FUA if fua else 0, 0, cb)

    def write(self, qpair, buf, lba, nblocks=None, cb=None, *, offset=0, fua=False):
        nblocks = self._nblocks_of(buf, offset, nblocks)
        self._check(lba, nblocks)
        qpair.submit_nvm(OP_WRITE, self.nsid, lba, nblocks, self.lba_shift, buf, offset,
                         FUA if fua else 0, 0, cb)

    def compare(self, qpair, buf, lba, nblocks=None, cb=None, *, offset=0):
        self._need(self.supports_compare, "Compare")
        nblocks = self._nblocks_of(buf, offset, nblocks)
        self._check(lba, nblocks)
        qpair.submit_nvm(OP_COMPARE, self.nsid, lba, nblocks, self.lba_shift, buf, offset, 0, 0,
                         cb)

    def readv(self, qpair, iov, lba, cb=None):
        """Vectored read: `iov` is a list of (DmaBuffer, offset, length)."""
        self._vectored(OP_READ, qpair, iov, lba, cb)

    def writev(self, qpair, iov, lba, cb=None):
        self._vectored(OP_WRITE, qpair, iov, lba, cb)

    def _vectored(self, opc, qpair, iov, lba, cb):
        iov = list(iov)
        total = sum(length for _, _, length in iov)
        if total % self.block_size:
            raise InvalidArgument(f"the iovec carries {total} bytes: not a whole number of "
                                  f"{self.block_size}-byte blocks")
        self._check(lba, total // self.block_size)
        qpair.submit_nvm_iov(opc, self.nsid, lba, total // self.block_size, self.lba_shift, iov,
                             0, cb)

    def write_zeroes(self, qpair, lba, nblocks, cb=None, *, deallocate=False):
        self._need(self.supports_write_zeroes, "Write Zeroes")
        self._check(lba, nblocks)
        qpair.submit_nvm(OP_WRITE_ZEROES, self.nsid, lba, nblocks, self.lba_shift, None, 0,
                         DEAC if deallocate else 0, 0, cb)

    def deallocate(self, qpair, ranges, cb=None):
        """Dataset Management - Deallocate of `ranges`: [(lba, nblocks), ...] (at most 256)."""
        self._need(self.supports_deallocate, "Dataset Management (deallocate)")
        ranges = list(ranges)
        if not ranges or len(ranges) > MAX_DSM_RANGES:
            raise InvalidArgument(f"between 1 and {MAX_DSM_RANGES} ranges, not {len(ranges)}")
        buf = memory.allocate(16 * len(ranges), zero=True)
        mv = memoryview(buf)
        for i, (lba, n) in enumerate(ranges):
            self._check(lba, n)
            if n > 0xFFFFFFFF:
                raise InvalidArgument(f"range {i} is longer than 2^32-1 blocks")
            # Range: context attributes (4), length in blocks (4), starting LBA (8); figure 164
            mv[16 * i + 4:16 * i + 8] = n.to_bytes(4, "little")
            mv[16 * i + 8:16 * i + 16] = lba.to_bytes(8, "little")
        mv.release()

        def done(cpl, buf=buf, cb=cb):
            buf.free()
            if cb is not None:
                cb(cpl)

        try:
            qpair.submit_raw(OP_DSM, nsid=self.nsid, buf=buf, cdw10=len(ranges) - 1,
                             cdw11=DSM_DEALLOCATE, cb=done)
        except BaseException:
            buf.free()
            raise

    def flush(self, qpair, cb=None):
        if self._detached:
            raise ControllerDetached(f"namespace {self.nsid} of {self.ctrlr.name} is gone")
        qpair.submit_raw(OP_FLUSH, nsid=self.nsid, cb=cb)

    # ---- blocking helpers ---------------------------------------------------------------------
    def wait(self, qpair, submit, opcode, timeout_s=None, lba=None, nlb=None):
        """Run `submit(cb)` and poll `qpair` (and the admin queue, for timeouts and resets) until
        the command completes. Returns the Completion; raises CommandError on an error status."""
        done = []
        submit(done.append)
        limit = timeout_s if timeout_s is not None else max(60.0, 3 * self.ctrlr.options.io_timeout_s)
        deadline = time.monotonic() + limit
        next_admin = 0.0
        while not done:
            qpair.process_completions()
            if done:
                break
            now = time.monotonic()
            if now >= next_admin:
                self.ctrlr.poll_admin()
                next_admin = now + 0.01
            if now > deadline:
                raise CommandTimeout(f"namespace {self.nsid} of {self.ctrlr.name}: no completion "
                                     f"within {limit} s (it will still complete later)")
        cpl = done[0]
        if not cpl.ok:
            raise CommandError.from_completion(cpl, opcode=opcode, nsid=self.nsid, lba=lba,
                                               nlb=nlb, controller=self.ctrlr.name)
        return cpl

    def read_sync(self, qpair, buf, lba, nblocks=None, **kw):
        return self.wait(qpair, lambda cb: self.read(qpair, buf, lba, nblocks, cb, **kw),
                         OP_READ, lba=lba, nlb=nblocks)

    def write_sync(self, qpair, buf, lba, nblocks=None, **kw):
        return self.wait(qpair, lambda cb: self.write(qpair, buf, lba, nblocks, cb, **kw),
                         OP_WRITE, lba=lba, nlb=nblocks)

    def compare_sync(self, qpair, buf, lba, nblocks=None, **kw):
        return self.wait(qpair, lambda cb: self.compare(qpair, buf, lba, nblocks, cb, **kw),
                         OP_COMPARE, lba=lba, nlb=nblocks)

    def write_zeroes_sync(self, qpair, lba, nblocks, **kw):
        return self.wait(qpair, lambda cb: self.write_zeroes(qpair, lba, nblocks, cb, **kw),
                         OP_WRITE_ZEROES, lba=lba, nlb=nblocks)

    def deallocate_sync(self, qpair, ranges):
        return self.wait(qpair, lambda cb: self.deallocate(qpair, ranges, cb), OP_DSM)

    def flush_sync(self, qpair):
        return self.wait(qpair, lambda cb: self.flush(qpair, cb), OP_FLUSH)

    def readv_sync(self, qpair, iov, lba):
        return self.wait(qpair, lambda cb: self.readv(qpair, iov, lba, cb), OP_READ, lba=lba)

    def writev_sync(self, qpair, iov, lba):
        return self.wait(qpair, lambda cb: self.writev(qpair, iov, lba, cb), OP_WRITE, lba=lba)
