"""A namespace of the emulated controller: its blocks, and the Identify data describing them.

Data lives in a bytearray (dense) or, for large namespaces, in a dict of written blocks (sparse:
only what was written costs memory; everything else reads as zeroes). Deallocated blocks (Dataset
Management, Write Zeroes with DEAC) read back as zeroes, which the Identify data announces with
DLFEAT = 001b (NVM 4.1.5.1). Blocks made uncorrectable (Write Uncorrectable, or
`mark_uncorrectable()`) fail reads with Unrecovered Read Error until written again.
"""
import uuid as _uuid

from env.errors import InvalidArgument
from nvme.emu.errors import CommandFailed
from nvme.identify import IdentifyNamespace, LbaFormat, NamespaceIdDescriptorList
from nvme.spec import CSI_NVM
from nvme.status import Media

SPARSE_THRESHOLD = 256 << 20      # namespaces larger than this are sparse unless told otherwise


class EmuNamespace:
    """A namespace of `nblocks` blocks of `block_size` bytes (512..65536, a power of two).

    Options: `nsid` (default: the next free one when the controller is built), `sparse` (None:
    automatic above 256 MiB), `eui64` (8 bytes), `nguid` (16 bytes), `uuid` (str or UUID; the
    defaults are derived from the controller's serial number and the NSID so that they are stable
    across runs), `noiob` (optimal I/O boundary in blocks), `nawun`/`nawupf` (atomic write units,
    0's based blocks), `dlfeat` (default 09h: deallocated blocks read as zeroes, Write Zeroes may
    deallocate)."""

    def __init__(self, nblocks, block_size=512, *, nsid=None, sparse=None, eui64=None,
                 nguid=None, uuid=None, noiob=0, nawun=0, nawupf=0, dlfeat=0x09):
        if not isinstance(nblocks, int) or nblocks <= 0:
            raise InvalidArgument(f"nblocks must be a positive integer, not {nblocks!r}")
        if (not isinstance(block_size, int) or block_size < 512 or block_size > 65536
                or block_size & (block_size - 1)):
            raise InvalidArgument(f"block_size must be a power of two from 512 to 65536, not "
                                  f"{block_size!r}")
        if nsid is not None and not 1 <= nsid < 0xFFFFFFFE:
            raise InvalidArgument(f"nsid must be in 1..FFFFFFFDh, not {nsid!r}")
        for what, value, size in (("eui64", eui64, 8), ("nguid", nguid, 16)):
            if value is not None and len(bytes(value)) != size:
                raise InvalidArgument(f"{what} must be {size} bytes")
        self.nblocks = nblocks
        self.block_size = block_size
        self.nsid = nsid
        self.sparse = nblocks * block_size > SPARSE_THRESHOLD if sparse is None else bool(sparse)
        self.eui64 = bytes(eui64) if eui64 is not None else None
        self.nguid = bytes(nguid) if nguid is not None else None
        self.uuid = _uuid.UUID(str(uuid)) if uuid is not None else None
        self.noiob = noiob
        self.nawun = nawun
        self.nawupf = nawupf
        self.dlfeat = dlfeat
        self._zero_block = bytes(block_size)
        self._data = {} if self.sparse else bytearray(nblocks * block_size)
        self._uncorrectable = set()

    def __repr__(self):
        return (f"<EmuNamespace nsid={self.nsid} {self.nblocks} x {self.block_size} B"
                f"{' sparse' if self.sparse else ''}>")

    @property
    def size_bytes(self):
        return self.nblocks * self.block_size

    # ---- identifiers --------------------------------------------------------------------------
    def _assign_ids(self, serial):
        """Stable default identifiers from the controller serial and the NSID."""
        seed = _uuid.uuid5(_uuid.NAMESPACE_OID, f"userblk-emu/{serial}/{self.nsid}")
        if self.nguid is None:
            self.nguid = seed.bytes
        if self.eui64 is None:
            self.eui64 = seed.bytes[:8]
        if self.uuid is None:
            self.uuid = seed

    def identify(self):
        """The Identify Namespace data (CNS 00h) of this namespace."""
        formats = [LbaFormat(0, 9), LbaFormat(0, 12)]
        shift = self.block_size.bit_length() - 1
        if shift not in (9, 12):
            formats.append(LbaFormat(0, shift))
        index = [f.ds for f in formats].index(shift)
        nsfeat = IdentifyNamespace.NSFEAT_OPTIMAL_IO_FIELDS if self.noiob else 0
        if self.nawun or self.nawupf:
            nsfeat |= IdentifyNamespace.NSFEAT_ATOMIC_FIELDS
        return IdentifyNamespace(
            nsze=self.nblocks, ncap=self.nblocks, nuse=self.nblocks, nsfeat=nsfeat,
            nlbaf=len(formats) - 1, flbas=index, dlfeat=self.dlfeat, nawun=self.nawun,
            nawupf=self.nawupf, noiob=self.noiob, nvmcap=self.size_bytes,
            nguid=self.nguid or bytes(16), eui64=self.eui64 or bytes(8), lbafs=formats)

    def descriptors(self):
        """The Namespace Identification Descriptor list (CNS 03h)."""
        return NamespaceIdDescriptorList.build(eui64=self.eui64, nguid=self.nguid,
                                               uuid=self.uuid, csi=CSI_NVM)

    # ---- data ---------------------------------------------------------------------------------
    def in_range(self, lba, nlb):
        return 0 <= lba and lba + nlb <= self.nblocks

    def _check_readable(self, lba, nlb):
        if self._uncorrectable and any(b in self._uncorrectable for b in range(lba, lba + nlb)):
            raise CommandFailed(Media.UNRECOVERED_READ_ERROR, dnr=True,
                                why="block marked uncorrectable")

    def read(self, lba, nlb):
        """`nlb` blocks from `lba` as bytes (CommandFailed for uncorrectable blocks)."""
        self._check_readable(lba, nlb)
        bs = self.block_size
        if not self.sparse:
            return bytes(self._data[lba * bs:(lba + nlb) * bs])
        get, zero = self._data.get, self._zero_block
        return b"".join(get(b, zero) for b in range(lba, lba + nlb))

    def write(self, lba, data):
        bs = self.block_size
        nlb = len(data) // bs
        if self._uncorrectable:
            self._uncorrectable.difference_update(range(lba, lba + nlb))
        if not self.sparse:
            self._data[lba * bs:lba * bs + len(data)] = data
            return
        view = memoryview(data)
        for i in range(nlb):
            block = bytes(view[i * bs:(i + 1) * bs])
            if block == self._zero_block:
                self._data.pop(lba + i, None)
            else:
                self._data[lba + i] = block

    def zero(self, lba, nlb):
        """Write zeroes to (or deallocate) blocks: either way they read back as zeroes."""
        if self._uncorrectable:
            self._uncorrectable.difference_update(range(lba, lba + nlb))
        if not self.sparse:
            bs = self.block_size
            self._data[lba * bs:(lba + nlb) * bs] = bytes(nlb * bs)
            return
        if nlb > len(self._data):
            for b in [b for b in self._data if lba <= b < lba + nlb]:
                del self._data[b]
        else:
            for b in range(lba, lba + nlb):
                self._data.pop(b, None)

    deallocate = zero

    def mark_uncorrectable(self, lba, nlb=1):
        """Make reads of these blocks fail with Unrecovered Read Error until they are written."""
        if not self.in_range(lba, nlb):
            raise InvalidArgument(f"blocks {lba}+{nlb} are outside the namespace")
        self._uncorrectable.update(range(lba, lba + nlb))

    # ---- test helpers -------------------------------------------------------------------------
    def read_blocks(self, lba, nlb=1):
        """What the namespace holds (bypassing uncorrectable marks)."""
        if not self.in_range(lba, nlb):
            raise InvalidArgument(f"blocks {lba}+{nlb} are outside the namespace")
        saved, self._uncorrectable = self._uncorrectable, set()
        try:
            return self.read(lba, nlb)
        finally:
            self._uncorrectable = saved

    def write_blocks(self, lba, data):
        data = bytes(data)
        if len(data) % self.block_size or not self.in_range(lba, len(data) // self.block_size):
            raise InvalidArgument(f"{len(data)} bytes at block {lba} are not whole blocks inside "
                                  "the namespace")
        self.write(lba, data)

    @property
    def allocated_blocks(self):
        """Blocks holding data (sparse namespaces only; dense ones count every block)."""
        return len(self._data) if self.sparse else self.nblocks
