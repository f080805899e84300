"""NVM command set I/O commands of the emulated controller (NVM Command Set 1.0, section 3),
as a mixin of EmulatedController.

Checks, in the order a controller makes them: opcode supported (ONCS) -> Invalid Command
Opcode; namespace active -> Invalid Namespace or Format; data pointer (PRP or SGL, see `dptr`);
LBA range inside the namespace -> LBA Out of Range; transfer within MDTS -> Invalid Field in
Command. Data moves between host memory and the namespace only when every check passed.
"""
import struct

from nvme import spec
from nvme.emu.dptr import gather, prp_segments, scatter, sgl_segments
from nvme.emu.errors import CommandFailed
from nvme.identify import IdentifyController as _Id
from nvme.spec import NvmOpcode
from nvme.status import Generic, Media

_DSM_RANGE = struct.Struct("<IIQ")      # context attributes, length in LBAs, starting LBA


class NvmCommands:
    def _build_nvm_handlers(self):
        oncs = self.identify_data.oncs
        h = {NvmOpcode.FLUSH: self._flush, NvmOpcode.WRITE: self._write,
             NvmOpcode.READ: self._read}
        optional = ((_Id.ONCS_COMPARE, NvmOpcode.COMPARE, self._compare),
                    (_Id.ONCS_WRITE_UNCORRECTABLE, NvmOpcode.WRITE_UNCORRECTABLE,
                     self._write_uncorrectable),
                    (_Id.ONCS_DSM, NvmOpcode.DATASET_MANAGEMENT, self._dataset_management),
                    (_Id.ONCS_WRITE_ZEROES, NvmOpcode.WRITE_ZEROES, self._write_zeroes),
                    (_Id.ONCS_VERIFY, NvmOpcode.VERIFY, self._verify))
        for bit, opc, fn in optional:
            if oncs & bit:
                h[opc] = fn
        return {int(k): v for k, v in h.items()}

    # ---- helpers ---------------------------------------------------------------------------------
    def _ns(self, cmd):
        ns = self.namespaces.get(cmd.nsid)
        if ns is None:
            raise CommandFailed(Generic.INVALID_NAMESPACE_OR_FORMAT,
                                why=f"NSID {cmd.nsid} is not an active namespace")
        return ns

    def _lba_range(self, ns, cmd):
        slba = cmd.cdw11 << 32 | cmd.cdw10
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        if not ns.in_range(slba, nlb):
            raise CommandFailed(Generic.LBA_OUT_OF_RANGE,
                                why=f"LBA {slba}+{nlb} beyond {ns.nblocks} blocks")
        return slba, nlb

    def _io_segments(self, cmd, length, write):
        self._check_mdts(length)
        if cmd.psdt:
            if not self.identify_data.sgl_supported:
                raise CommandFailed(Generic.INVALID_FIELD, why="PSDT selects SGLs; SGLS is 0")
            if cmd.psdt == 2 and not self.identify_data.sgls & _Id.SGLS_MPTR_SGL:
                raise CommandFailed(Generic.INVALID_FIELD, why="PSDT 10b not supported")
            if cmd.psdt == 3:
                raise CommandFailed(Generic.INVALID_FIELD, why="PSDT 11b is reserved")
            return sgl_segments(self.mem, cmd.sgl1, length, write=write, **self.sgl_options)
        return prp_segments(self.mem, cmd.prp1, cmd.prp2, length, self.page_size)

    # ---- commands --------------------------------------------------------------------------------
    def _read(self, sq, cmd):
        ns = self._ns(cmd)
        slba, nlb = self._lba_range(ns, cmd)
        length = nlb * ns.block_size
        segments = self._io_segments(cmd, length, write=False)
        scatter(self.mem, segments, ns.read(slba, nlb))
        self.bytes_read += length
        self.host_read_commands += 1
        return 0

    def _write(self, sq, cmd):
        ns = self._ns(cmd)
        slba, nlb = self._lba_range(ns, cmd)
        length = nlb * ns.block_size
        data = gather(self.mem, self._io_segments(cmd, length, write=True))
        ns.write(slba, data)
        self.bytes_written += length
        self.host_write_commands += 1
        return 0

    def _compare(self, sq, cmd):
        ns = self._ns(cmd)
        slba, nlb = self._lba_range(ns, cmd)
        length = nlb * ns.block_size
        data = gather(self.mem, self._io_segments(cmd, length, write=True))
        if data != ns.read(slba, nlb):
            raise CommandFailed(Media.COMPARE_FAILURE, why="data differs")
        self.host_read_commands += 1
        return 0

    def _verify(self, sq, cmd):
        ns = self._ns(cmd)
        slba, nlb = self._lba_range(ns, cmd)
        ns.read(slba, nlb)                  # raises for uncorrectable blocks
        return 0

    def _flush(self, sq, cmd):
        if cmd.nsid == spec.NSID_BROADCAST:
            if not self.identify_data.flush_broadcast:
                raise CommandFailed(Generic.INVALID_NAMESPACE_OR_FORMAT,
                                    why="Flush of all namespaces not supported")
        else:
            self._ns(cmd)
        self.counters["flushes"] += 1
        return 0

    def _write_zeroes(self, sq, cmd):
        ns = self._ns(cmd)
        slba, nlb = self._lba_range(ns, cmd)   # no data transfer: MDTS does not apply
        deallocate = bool(cmd.cdw12 >> 25 & 1)   # DEAC (NVM 3.2.8)
        ns.zero(slba, nlb)
        self.counters["write_zeroes.deallocate" if deallocate else "write_zeroes"] += 1
        return 0

    def _write_uncorrectable(self, sq, cmd):
        ns = self._ns(cmd)
        slba, nlb = self._lba_range(ns, cmd)
        ns.mark_uncorrectable(slba, nlb)
        return 0

    def _dataset_management(self, sq, cmd):
        ns = self._ns(cmd)
        nr = (cmd.cdw10 & 0xFF) + 1             # number of ranges, 0's based (NVM 3.2.3)
        deallocate = bool(cmd.cdw11 & 1 << 2)   # AD
        raw = gather(self.mem, self._io_segments(cmd, 16 * nr, write=True))
        ranges = [_DSM_RANGE.unpack_from(raw, 16 * i) for i in range(nr)]
        for _, nlb, slba in ranges:
            if nlb and not ns.in_range(slba, nlb):
                raise CommandFailed(Generic.LBA_OUT_OF_RANGE,
                                    why=f"DSM range {slba}+{nlb} beyond {ns.nblocks} blocks")
        if deallocate:
            for _, nlb, slba in ranges:
                if nlb:
                    ns.deallocate(slba, nlb)
            self.counters["deallocated_ranges"] += len(ranges)
        return 0
