"""An in-process emulated NVMe controller, for fast tests and fault injection.

It behaves like a PCIe controller as the Base Specification describes it, reached through a
`Transport` whose registers are the emulator's own memory (a 16 KiB "BAR"):

- Registers (Base 3.1.3): CAP, VS, CC, CSTS, AQA, ASQ, ACQ, NSSR. Setting CC.EN with the admin
  queues configured makes CSTS.RDY 1 (optionally only after some reads of CSTS); clearing it
  resets every queue and clears RDY; CC.SHN makes CSTS.SHST report "shutdown complete".
- Doorbells: a queue pair writes a doorbell into the BAR and calls `doorbell_written()` (the
  transport `traps`). The controller then fetches the new submission queue entries from host
  memory, executes them and posts completions with the right phase tag, SQ head, SQ id and CID,
  holding completions back while the completion queue is full. After Doorbell Buffer Config the
  I/O queues' shadow doorbells in host memory are authoritative and the EventIdx buffer is kept
  up to date, as QEMU does.
- Host memory is reached only by IOVA through the registered DMA regions (`hostmem`): a DMA to
  anything else is a Data Transfer Error, never a stray write.
- Admin commands: Identify (CNS 00h-03h), Get/Set Features, Get Log Page (error, SMART,
  firmware slot, changed namespace list), Create/Delete I/O SQ/CQ, Abort, Asynchronous Event
  Request, Doorbell Buffer Config, Keep Alive (`nvme.emu.admin`). NVM commands: Read, Write,
  Flush, Write Zeroes, Dataset Management, Compare, Write Uncorrectable, Verify, with PRPs or
  SGLs (`nvme.emu.nvm`).
- Faults: `inject`, `hold`/`release`, `delay`/`tick`, `fatal`, `never_ready`,
  `post_bogus_completion`, `remove`; events: `raise_event`, `change_namespaces`,
  `set_temperature`.

Everything runs synchronously inside the trap, under one lock (traps may come from several
threads): correct and readable rather than fast (tens of thousands of commands per second).
`counters` counts commands per opcode, doorbell writes (MMIO and shadow), completions, DMA
faults and more.

Drivers must read registers through `transport.read32/read64` for the ready and shutdown delays
to advance (the registers themselves are plain memory and always hold the current state).
"""
import collections
import functools
import logging
import mmap
import threading

from env.errors import InvalidArgument
from env.mmio import Mmio
from nvme import spec
from nvme.emu.admin import DEFERRED, AdminCommands
from nvme.emu.errors import CommandFailed, DmaFault
from nvme.emu.faults import DELAY, HOLD, INJECT, LBA_OPCODES, FaultRule, Pending
from nvme.emu.hostmem import HostMemory
from nvme.emu.nvm import NvmCommands
from nvme.emu.queues import CompletionQueue, SubmissionQueue
from nvme.emu.storage import EmuNamespace
from nvme.identify import IdentifyController, PowerState
from nvme.logpages import ErrorInformationEntry
from nvme.spec import (REG_ACQ, REG_AQA, REG_ASQ, REG_CAP, REG_CC, REG_CMBLOC, REG_CMBSZ,
                       REG_CSTS, REG_INTMC, REG_INTMS, REG_NSSR, REG_VS, AsyncEventError,
                       AsyncEventType, Cap, Cc, LogPageId, Version)
from nvme.status import Generic, NvmeStatus, Sct
from nvme.transport import Transport

log = logging.getLogger("userblk.nvme.emu")

DEFAULT_ONCS = (IdentifyController.ONCS_COMPARE | IdentifyController.ONCS_WRITE_UNCORRECTABLE
                | IdentifyController.ONCS_DSM | IdentifyController.ONCS_WRITE_ZEROES
                | IdentifyController.ONCS_VERIFY)
TEMPERATURE_WARNING_K = 343  # WCTEMP and the default over-temperature threshold (70 C)
TEMPERATURE_CRITICAL_K = 373


def _locked(method):
    """Entry points take the controller's lock: queue pairs on several threads may trap into
    the emulator at once, and its state changes are not atomic."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class EmulatedTransport(Transport):
    """The transport of an emulated controller: registers in the emulator's memory, and every
    register write, doorbell write and register read announced to it."""

    def __init__(self, controller, regs, name):
        Transport.__init__(self, regs, name=name, traps=True)
        self.controller = controller

    def read32(self, off):
        self.controller._register_read(off)
        return Transport.read32(self, off)

    def read64(self, off):
        self.controller._register_read(off)
        return Transport.read64(self, off)

    def register_written(self, off):
        self.controller._register_written(off)

    def doorbell_written(self, qid, cq):
        self.controller._doorbell_written(qid, cq)

    def close(self):
        """The emulator owns the register memory; closing the transport only detaches it."""


class EmulatedController(AdminCommands, NvmCommands):
    """An emulated NVMe controller. See the module docstring for what it does.

    Configuration (all keyword arguments but `namespaces`):
      namespaces       list of EmuNamespace (default: one of 32768 x 512 bytes)
      mdts             Identify MDTS: max transfer 2**mdts pages of 4 KiB (0 = unlimited)
      mqes             CAP.MQES, 0's based (1023: queues of up to 1024 entries)
      dstrd            CAP.DSTRD: doorbell stride 4 << dstrd bytes
      max_ioqpairs     I/O queue pairs the controller grants at most
      cap_to           CAP.TO in 500 ms units (the ready timeout a driver should allow)
      mpsmax           largest memory page size, bytes (MPSMIN is 4 KiB)
      sgl              SGLs for I/O commands (Identify SGLS); `sgl_dword_aligned`,
                       `sgl_bit_bucket`, `sgl_larger_than_data` refine it
      dbbuf            Doorbell Buffer Config supported (OACS bit 8)
      vwc              a volatile write cache (Identify VWC, feature 06h)
      oncs             Optional NVM Command Support bits (default: Compare, Write
                       Uncorrectable, DSM, Write Zeroes, Verify)
      nssr             NVM subsystem reset supported (CAP.NSSRS)
      serial, model, firmware, vid, ssvid, ieee, cntlid, version
      aerl, acl, elpe  AER limit, Abort limit, error log entries (all 0's based, as Identify)
      nn               Identify NN (default: the highest NSID)
      interrupt_vectors  vectors an I/O CQ may name (IV), default 1 + max_ioqpairs
      ready_delay_reads    CSTS.RDY follows CC.EN only after this many reads of CSTS
      shutdown_delay_reads CSTS.SHST reaches "complete" after this many reads of CSTS
      never_ready      CSTS.RDY never becomes 1
      strict           let internal errors propagate out of the traps (tests of the emulator)
      name             the transport's name in messages
      memmap           the VA->IOVA map standing for the IOMMU (default: env's process map)
    """

    def __init__(self, namespaces=None, *, mdts=5, mqes=1023, dstrd=0, max_ioqpairs=16,
                 cap_to=2, mpsmax=65536, sgl=True, sgl_dword_aligned=False, sgl_bit_bucket=True,
                 sgl_larger_than_data=False, dbbuf=True, vwc=True, oncs=DEFAULT_ONCS, nssr=False,
                 serial="EMU0000000000001", model="userblk emulated NVMe controller",
                 firmware="1.0", vid=0x1B36, ssvid=0x1AF4, ieee=0, cntlid=1,
                 version=(2, 0, 0), aerl=3, acl=3, elpe=63, nn=None, interrupt_vectors=None,
                 ready_delay_reads=0, shutdown_delay_reads=0, never_ready=False, strict=False,
                 name="emu0", memmap=None):
        if not 1 <= mqes <= 0xFFFF:
            raise InvalidArgument(f"mqes (0's based) must be in 1..65535, not {mqes}")
        if not 0 <= dstrd <= 15:
            raise InvalidArgument(f"dstrd must be in 0..15, not {dstrd}")
        if not 1 <= max_ioqpairs <= 0xFFFF:
            raise InvalidArgument(f"max_ioqpairs must be in 1..65535, not {max_ioqpairs}")
        if not 0 <= mdts <= 255 or not 0 <= cap_to <= 255:
            raise InvalidArgument("mdts and cap_to are 8-bit fields")
        self._lock = threading.RLock()
        self.name = name
        self.strict = strict
        self.never_ready = never_ready
        self.ready_delay_reads = ready_delay_reads
        self.shutdown_delay_reads = shutdown_delay_reads
        self.max_ioqpairs = max_ioqpairs
        self.interrupt_vectors = interrupt_vectors or max_ioqpairs + 1
        self.mem = HostMemory(memmap)
        self.sgl_options = dict(dword_aligned=sgl_dword_aligned, bit_bucket=sgl_bit_bucket,
                                larger_than_data=sgl_larger_than_data)

        # ---- namespaces
        namespaces = [EmuNamespace(32768, 512)] if namespaces is None else list(namespaces)
        self.namespaces = {}
        next_id = 1
        for ns in namespaces:
            if not isinstance(ns, EmuNamespace):
                raise InvalidArgument(f"namespaces must be EmuNamespace objects, not {ns!r}")
            if ns.nsid is None:
                while next_id in self.namespaces:
                    next_id += 1
                ns.nsid = next_id
            if ns.nsid in self.namespaces:
                raise InvalidArgument(f"two namespaces with NSID {ns.nsid}")
            self.namespaces[ns.nsid] = ns
            ns._assign_ids(serial)
        self.nn = nn if nn is not None else max(self.namespaces, default=0)
        if self.namespaces and self.nn < max(self.namespaces):
            raise InvalidArgument(f"nn={self.nn} is below the highest NSID")

        # ---- capabilities and identity
        self.cap = Cap(mqes=mqes + 1, cqr=True, ams=0, to=cap_to * 500, dstrd=dstrd,
                       nssrs=nssr, css=Cap.CSS_NVM | Cap.CSS_NO_IO, bps=False, cps=0,
                       mpsmin=4096, mpsmax=mpsmax, pmrs=False, cmbs=False, nsss=False,
                       crms=0).encode()
        self.version = Version(*version)
        sgls = 0
        if sgl:
            sgls = (IdentifyController.SGLS_DWORD_ALIGNED if sgl_dword_aligned
                    else IdentifyController.SGLS_SUPPORTED)
            if sgl_bit_bucket:
                sgls |= IdentifyController.SGLS_BIT_BUCKET
            if sgl_larger_than_data:
                sgls |= IdentifyController.SGLS_LENGTH_LARGER_THAN_DATA
        self.identify_data = IdentifyController(
            vid=vid, ssvid=ssvid, sn=serial, mn=model, fr=firmware, rab=6, ieee=ieee,
            mdts=mdts, cntlid=cntlid, ver=self.version.encode(), cntrltype=1,
            oacs=IdentifyController.OACS_DOORBELL_BUFFER_CONFIG if dbbuf else 0,
            acl=acl, aerl=aerl, frmw=0x03, lpa=IdentifyController.LPA_EXTENDED_DATA,
            elpe=elpe, npss=0, wctemp=TEMPERATURE_WARNING_K, cctemp=TEMPERATURE_CRITICAL_K,
            tnvmcap=sum(ns.size_bytes for ns in self.namespaces.values()), kas=1,
            oaes=1 << 8,               # Namespace Attribute Notices (Changed Namespace List)
            sqes=0x66, cqes=0x44, nn=self.nn, oncs=oncs, vwc=0x07 if vwc else 0, sgls=sgls,
            subnqn=f"nqn.2024-01.io.userblk:emu:{serial}",
            psds=[PowerState(mp=2500, enlat=16, exlat=4)])
        self._identify_page = self.identify_data.pack()
        self.firmware = firmware

        # ---- the BAR
        stride = 4 << dstrd
        need = spec.REG_DOORBELL_BASE + 2 * (max_ioqpairs + 1) * stride
        self.bar_size = max(16384, 1 << (need - 1).bit_length())
        self._bar = mmap.mmap(-1, self.bar_size)
        self.regs = Mmio.over(self._bar, name=f"{name}-bar0")
        self.doorbell_stride = stride

        # ---- state
        self.counters = collections.Counter()
        self.command_log = collections.deque(maxlen=1024)
        self.rules = []
        self.held = []
        self.delayed = []
        self.removed = False
        self.fatal_reason = None
        self.internal_error = None
        self.temperature = 300
        self.critical_warning = 0
        self.power_cycles = 1
        self.unsafe_shutdowns = 0
        self.error_count = 0
        self.error_log = collections.deque(maxlen=elpe + 1)
        self.media_errors = 0
        self.changed_namespaces = set()
        self.bytes_read = 0
        self.bytes_written = 0
        self.host_read_commands = 0
        self.host_write_commands = 0
        self._clean_shutdown = True
        self._was_enabled = False
        self._csts = 0
        self._cc = 0
        self._admin_handlers = self._build_admin_handlers()
        self._nvm_handlers = self._build_nvm_handlers()
        self._reset_state()
        self._publish()
        self.transport = EmulatedTransport(self, self.regs, name)

    def __repr__(self):
        state = ("removed" if self.removed else "fatal" if self._csts & spec.CSTS_CFS
                 else "ready" if self._csts & spec.CSTS_RDY else "disabled")
        return f"<EmulatedController {self.name} {state} {len(self.namespaces)} namespace(s)>"

    # ---- controller state ------------------------------------------------------------------
    def _reset_state(self):
        """Everything a Controller Level Reset (CC.EN 1 -> 0) takes back to its initial value."""
        self.enabled = False
        self.sqs = {}
        self.cqs = {}
        self.aers = []
        self.held = []
        self.delayed = []
        self.dbbuf = None                # (shadow doorbell IOVA, EventIdx IOVA)
        self.page_size = 4096
        self.nsqa = self.ncqa = self.max_ioqpairs   # granted I/O queues (Number of Queues)
        self.io_queues_created = False
        self._ready_pending = None       # (target RDY, CSTS reads left)
        self._shutdown_reads_left = None
        self._masked_events = set()
        self._events = collections.deque()
        self.features = self._default_features()

    def _publish(self):
        """Write the registers the host may only read."""
        r = self.regs
        if self.removed:
            self._bar[:] = b"\xff" * self.bar_size
            return
        r.w64(REG_CAP, self.cap)
        r.w32(REG_VS, self.version.encode())
        r.w32(REG_CSTS, self._csts)
        for off in (REG_INTMS, REG_INTMC, REG_NSSR, REG_CMBLOC, REG_CMBSZ):
            r.w32(off, 0)

    def _set_csts(self, bit, on):
        self._csts = self._csts | bit if on else self._csts & ~bit
        if not self.removed:
            self.regs.w32(REG_CSTS, self._csts)

    @property
    def ready(self):
        return bool(self._csts & spec.CSTS_RDY)

    @property
    def running(self):
        """Processing commands: enabled, not fatal, not removed."""
        return self.enabled and not self.removed and not self._csts & spec.CSTS_CFS

    @_locked
    def _register_read(self, off):
        if self.removed:
            self._publish()
            return
        if off == REG_CSTS:
            self.counters["csts_reads"] += 1
            if self._ready_pending is not None:
                target, left = self._ready_pending
                if left <= 1:
                    self._ready_pending = None
                    self._set_csts(spec.CSTS_RDY, target)
                else:
                    self._ready_pending = (target, left - 1)
            if self._shutdown_reads_left is not None:
                if self._shutdown_reads_left <= 1:
                    self._shutdown_complete()
                else:
                    self._shutdown_reads_left -= 1

    @_locked
    def _register_written(self, off):
        try:
            self.counters["register_writes"] += 1
            if self.removed:
                self._publish()
                return
            if off in (REG_CC, REG_CC - 4):
                self._cc_written(self.regs.r32(REG_CC))
            elif off == REG_NSSR:
                if (self.regs.r32(REG_NSSR) == spec.NSSR_RESET_VALUE
                        and Cap.decode(self.cap).nssrs):
                    self._subsystem_reset()
            elif off == REG_CSTS:
                if self.regs.r32(REG_CSTS) & spec.CSTS_NSSRO:    # RW1C (Base 3.1.3.6)
                    self._csts &= ~spec.CSTS_NSSRO
            self._publish()
        except Exception as e:          # never let an emulator bug escape into the driver
            self._internal_failure(e)

    def _cc_written(self, value):
        old, self._cc = self._cc, value
        if not old & spec.CC_EN and value & spec.CC_EN:
            self._enable(Cc.decode(value))
        elif old & spec.CC_EN and not value & spec.CC_EN:
            self._controller_reset()
        if value & spec.CC_SHN_MASK and not old & spec.CC_SHN_MASK:
            self._shutdown()

    def _enable(self, cc):
        self.counters["enables"] += 1
        if self.never_ready:
            return
        why = self._check_enable(cc)
        if why:
            log.warning("%s: CC.EN=1 refused: %s; CSTS.CFS set", self.name, why)
            self.fatal_reason = f"enable refused: {why}"
            self._set_csts(spec.CSTS_CFS, True)
            return
        if self._was_enabled and not self._clean_shutdown:
            self.unsafe_shutdowns += 1
        self._was_enabled = True
        self._clean_shutdown = False
        self.page_size = cc.page_size
        aqa = self.regs.r32(REG_AQA)
        asq, acq = self.regs.r64(REG_ASQ), self.regs.r64(REG_ACQ)
        self.cqs[0] = CompletionQueue(0, acq & ~0xFFF, (aqa >> 16 & 0xFFF) + 1, ien=True)
        self.sqs[0] = SubmissionQueue(0, asq & ~0xFFF, (aqa & 0xFFF) + 1, cqid=0)
        self.cqs[0].sqids.add(0)
        self.enabled = True
        self._csts &= ~(spec.CSTS_SHST_MASK | spec.CSTS_CFS)
        self._set_ready(True)

    def _check_enable(self, cc):
        """Why CC.EN=1 cannot be honoured with this configuration (or None)."""
        cap = Cap.decode(self.cap)
        if not cap.mpsmin <= cc.page_size <= cap.mpsmax:
            return f"CC.MPS page size {cc.page_size} outside CAP.MPSMIN..MPSMAX"
        if cc.css not in (Cc.CSS_NVM, Cc.CSS_ADMIN_ONLY):
            return f"CC.CSS {cc.css} selects a command set the controller does not support"
        if cc.css != Cc.CSS_ADMIN_ONLY and (cc.iosqes != spec.SQES or cc.iocqes != spec.CQES):
            return (f"CC.IOSQES/IOCQES are {cc.iosqes}/{cc.iocqes}, the controller needs "
                    f"{spec.SQES}/{spec.CQES} (Identify SQES/CQES)")
        if cc.ams != 0:
            return f"CC.AMS {cc.ams}: only round robin arbitration is supported"
        aqa = self.regs.r32(REG_AQA)
        if (aqa & 0xFFF) < 1 or (aqa >> 16 & 0xFFF) < 1:
            return "AQA.ASQS/ACQS give admin queues of fewer than 2 entries"
        asq, acq = self.regs.r64(REG_ASQ), self.regs.r64(REG_ACQ)
        if not asq or not acq or asq & 0xFFF or acq & 0xFFF:
            return f"ASQ 0x{asq:x} / ACQ 0x{acq:x} must be non-zero and 4 KiB aligned"
        return None

    def _set_ready(self, on):
        if self.ready_delay_reads:
            self._ready_pending = (on, self.ready_delay_reads)
        else:
            self._set_csts(spec.CSTS_RDY, on)

    def _controller_reset(self):
        """CC.EN 1 -> 0 (Base 3.7.2): delete every queue, forget every command."""
        self.counters["resets"] += 1
        self._reset_state()
        self._csts &= ~(spec.CSTS_SHST_MASK | spec.CSTS_CFS)
        self.fatal_reason = None
        self._set_ready(False)

    def _subsystem_reset(self):
        self.counters["subsystem_resets"] += 1
        self._controller_reset()
        self._cc = 0
        self.regs.w32(REG_CC, 0)
        self._csts |= spec.CSTS_NSSRO
        self.power_cycles += 1

    def _shutdown(self):
        self.counters["shutdowns"] += 1
        self._csts = (self._csts & ~spec.CSTS_SHST_MASK) | 1 << 2       # occurring
        if self.shutdown_delay_reads:
            self._shutdown_reads_left = self.shutdown_delay_reads
        else:
            self._shutdown_complete()

    def _shutdown_complete(self):
        self._shutdown_reads_left = None
        self._clean_shutdown = True
        self._set_csts(spec.CSTS_SHST_MASK, False)
        self._set_csts(spec.CSTS_SHST_COMPLETE, True)

    def _internal_failure(self, exc):
        self.internal_error = exc
        log.error("%s: emulator internal error; controller fatal status set", self.name,
                  exc_info=exc)
        self.fatal_reason = f"internal error: {exc!r}"
        self._set_csts(spec.CSTS_CFS, True)
        if self.strict:
            raise exc

    # ---- doorbells -------------------------------------------------------------------------------
    def _db_offset(self, qid, cq):
        return (2 * qid + (1 if cq else 0)) * self.doorbell_stride

    @_locked
    def _doorbell_written(self, qid, cq):
        try:
            self._doorbell(qid, bool(cq))
        except Exception as e:
            self._internal_failure(e)

    def _doorbell(self, qid, is_cq):
        c = self.counters
        c["doorbell.mmio.cq" if is_cq else "doorbell.mmio.sq"] += 1
        if self.removed:
            self._publish()
            return
        if not self.running:
            c["doorbell.ignored"] += 1
            return
        value = self.regs.r32(spec.REG_DOORBELL_BASE + self._db_offset(qid, is_cq))
        if is_cq:
            q = self.cqs.get(qid)
        else:
            q = self.sqs.get(qid)
        if q is None:
            self._doorbell_error(AsyncEventError.WRITE_TO_INVALID_DOORBELL, qid, is_cq, value)
            return
        if self.dbbuf is not None:
            if qid == 0:
                # The admin queue: drivers (Linux, SPDK) keep ringing MMIO without updating its
                # shadow; copy the value there so the shadow is right for everyone (QEMU does the
                # same). Hosts that do use the admin shadow (libvfn) write the same value.
                self.mem.write_u32(self.dbbuf[0] + self._db_offset(qid, is_cq), value)
            else:
                shadow = self.mem.read_u32(self.dbbuf[0] + self._db_offset(qid, is_cq))
                if shadow != value:
                    c["doorbell.shadow_mismatch"] += 1
                value = shadow     # for I/O queues the shadow doorbell is authoritative
        if value >= q.size:
            self._doorbell_error(AsyncEventError.INVALID_DOORBELL_WRITE_VALUE, qid, is_cq, value)
            return
        if is_cq:
            self._cq_head_moved(q, value)
        else:
            q.tail = value
            self._process_sq(q)

    def _doorbell_error(self, info, qid, is_cq, value):
        self.counters["doorbell.invalid"] += 1
        log.debug("%s: invalid doorbell write %s %d <- %d", self.name, "CQ" if is_cq else "SQ",
                  qid, value)
        self.raise_event(AsyncEventType.ERROR, info, LogPageId.ERROR_INFORMATION)

    def _cq_head_moved(self, cq, head):
        cq.head = head
        if cq.backlog:
            self._drain_backlog(cq)
        if not cq.backlog:
            for sqid in sorted(cq.sqids):
                sq = self.sqs.get(sqid)
                if sq is not None and not sq.empty:
                    self._process_sq(sq)

    def _poll_shadow_doorbells(self):
        """With shadow doorbells the host may advance a queue without an MMIO write when
        EventIdx says the controller will look anyway: look at every I/O queue's shadow value
        (a real controller polls them; here `tick()` and `poll()` do). With the EventIdx values
        this emulator writes, a correct host rings MMIO whenever the controller would
        otherwise miss an update, so the traps alone keep everything moving."""
        if self.dbbuf is None or not self.running:
            return
        shadow_base = self.dbbuf[0]
        for cq in list(self.cqs.values()):
            if not cq.backlog:
                continue
            head = self.mem.read_u32(shadow_base + self._db_offset(cq.qid, True))
            if head < cq.size and head != cq.head:
                self.counters["doorbell.shadow.cq"] += 1
                self._cq_head_moved(cq, head)
        for sq in list(self.sqs.values()):
            if sq.qid not in self.sqs:
                continue
            tail = self.mem.read_u32(shadow_base + self._db_offset(sq.qid, False))
            if tail != sq.tail and tail < sq.size:
                self.counters["doorbell.shadow.sq"] += 1
                sq.tail = tail
                self._process_sq(sq)

    def _write_eventidx(self, qid, is_cq, value):
        try:
            self.mem.write_u32(self.dbbuf[1] + self._db_offset(qid, is_cq), value)
        except DmaFault:
            self._fatal_dma("EventIdx buffer")

    def _refresh_cq_head(self, cq):
        """Before posting under shadow doorbells: learn the host's head from the shadow."""
        try:
            head = self.mem.read_u32(self.dbbuf[0] + self._db_offset(cq.qid, True))
        except DmaFault:
            self._fatal_dma("shadow doorbell buffer")
            return
        if head < cq.size and head != cq.head:
            self.counters["doorbell.shadow.cq"] += 1
            cq.head = head

    def _cq_eventidx(self, cq):
        """The CQ head EventIdx: while completions wait for room, ask for an MMIO write as soon
        as the host frees an entry (EventIdx = head); otherwise put it at the tail, which the
        host's head cannot pass, so head updates need no MMIO write: the controller reads the
        shadow head whenever it posts. (QEMU always asks; both are allowed by Base 5.11.)"""
        self._write_eventidx(cq.qid, True, cq.head if cq.backlog else cq.tail)

    # ---- the command loop --------------------------------------------------------------------
    def _process_sq(self, sq):
        cq = self.cqs.get(sq.cqid)
        while sq.head != sq.tail and self.running and self.sqs.get(sq.qid) is sq:
            if cq.backlog:
                self.counters["sq_stalled_cq_full"] += 1
                break          # no room for completions: fetch nothing more (QEMU does too)
            try:
                raw = self.mem.read(sq.base + sq.head * spec.SQE_SIZE, spec.SQE_SIZE)
            except DmaFault:
                self._fatal_dma(f"fetching from SQ {sq.qid}")
                return
            sq.head = sq.head + 1 if sq.head + 1 < sq.size else 0
            sq.fetched += 1
            self._dispatch(sq, spec.Command.unpack(raw))
        if self.dbbuf is not None and self.running:
            self._write_eventidx(sq.qid, False, sq.tail)

    def _fatal_dma(self, what):
        self.counters["dma_faults.controller"] += 1
        self.fatal("DMA fault " + what)

    def _dispatch(self, sq, cmd):
        admin = sq.qid == 0
        self.counters[("admin." if admin else "io.") + spec.opcode_name(cmd.opc, admin)] += 1
        for rule in self.rules:
            if rule.matches(sq.qid, cmd):
                rule.take()
                self.counters["faults." + rule.action] += 1
                if rule.action == INJECT:
                    self._complete(sq, cmd, rule.status)
                elif rule.action == HOLD:
                    self.held.append(Pending(sq, cmd, rule))
                else:
                    self.delayed.append(Pending(sq, cmd, rule, ticks_left=rule.ticks))
                return
        self._execute(sq, cmd)

    def _execute(self, sq, cmd):
        admin = sq.qid == 0
        try:
            if cmd.fuse:
                raise CommandFailed(Generic.INVALID_FIELD, why="fused operations unsupported")
            handler = (self._admin_handlers if admin else self._nvm_handlers).get(cmd.opc)
            if handler is None:
                raise CommandFailed(Generic.INVALID_OPCODE)
            cdw0 = handler(sq, cmd)
        except CommandFailed as failure:
            if isinstance(failure, DmaFault):
                self.counters["dma_faults"] += 1
            self._complete(sq, cmd, failure.status)
            return
        if cdw0 is not DEFERRED:
            self._complete(sq, cmd, None, cdw0 or 0)

    def _complete(self, sq, cmd, status, cdw0=0):
        """Post the completion of `cmd` fetched from `sq` (status None or NvmeStatus)."""
        admin = sq.qid == 0
        raw_status = 0
        if status is not None and not status.ok:
            raw_status = status.encode()
            self.counters["completions.error"] += 1
            self._log_error(sq, cmd, status)
        self.command_log.append((sq.qid, cmd.cid, cmd.opc, raw_status >> 1))
        cq = self.cqs.get(sq.cqid)
        if cq is None or self.removed:
            return
        self._post(cq, cdw0, sq.head, sq.qid, cmd.cid, raw_status)
        if not admin:
            self.counters["completions.io"] += 1

    def _log_error(self, sq, cmd, status):
        if status.sct == Sct.MEDIA:
            self.media_errors += 1
        self.error_count += 1
        lba = 0
        if sq.qid and cmd.opc in LBA_OPCODES:
            lba = cmd.cdw11 << 32 | cmd.cdw10
        self.error_log.appendleft(ErrorInformationEntry(
            error_count=self.error_count, sqid=sq.qid, cmdid=cmd.cid,
            status_field=status.encode(), parm_error_location=0xFFFF, lba=lba,
            nsid=cmd.nsid, log_page_version=1))

    def _post(self, cq, cdw0, sqhd, sqid, cid, status):
        if self.dbbuf is not None:
            self._refresh_cq_head(cq)
        entry = (cdw0, sqhd, sqid, cid, status)
        if cq.backlog or cq.full:
            self.counters["cq_full"] += 1
            cq.backlog.append(entry)
        else:
            self._write_cqe(cq, entry)
        if self.dbbuf is not None and self.running:
            self._cq_eventidx(cq)

    def _write_cqe(self, cq, entry):
        cdw0, sqhd, sqid, cid, status = entry
        raw = spec.CQE_STRUCT.pack(cdw0 & 0xFFFFFFFF, 0, sqhd, sqid, cid,
                                   (status & 0xFFFE) | cq.phase)
        try:
            self.mem.write(cq.base + cq.tail * spec.CQE_SIZE, raw)
        except DmaFault:
            self._fatal_dma(f"posting to CQ {cq.qid}")
            return
        cq.advance()
        cq.posted += 1
        self.counters["completions"] += 1

    def _drain_backlog(self, cq):
        while cq.backlog and not cq.full and self.running:
            self._write_cqe(cq, cq.backlog.popleft())
        if self.dbbuf is not None and self.running:
            self._cq_eventidx(cq)

    # ---- asynchronous events ---------------------------------------------------------------------
    @_locked
    def raise_event(self, event_type, info, log_page):
        """Report an asynchronous event (Base 5.2): it completes an outstanding Asynchronous
        Event Request now, or the next one to arrive. Events of a type already reported stay
        queued until the host reads that type's log page with RAE cleared."""
        self.counters["events.raised"] += 1
        self._events.append(spec.AsyncEvent(int(event_type), int(info), int(log_page)))
        self._deliver_events()

    def _deliver_events(self):
        while self.aers and self.running:
            event = next((e for e in self._events if e.event_type not in self._masked_events),
                         None)
            if event is None:
                return
            self._events.remove(event)
            self._masked_events.add(event.event_type)
            pending = self.aers.pop(0)
            self.counters["events.delivered"] += 1
            self._complete(pending.sq, pending.cmd, None, event.encode())

    def _log_page_read(self, lid):
        """Reading a log page with RAE clear unmasks the events it reports."""
        for event_type, pages in ((AsyncEventType.ERROR, (LogPageId.ERROR_INFORMATION,)),
                                  (AsyncEventType.SMART_HEALTH, (LogPageId.SMART_HEALTH,)),
                                  (AsyncEventType.NOTICE, (LogPageId.CHANGED_NAMESPACE_LIST,
                                                           LogPageId.FIRMWARE_SLOT))):
            if lid in pages:
                self._masked_events.discard(event_type)
        self._deliver_events()

    @_locked
    def change_namespaces(self, nsids):
        """Record that these namespaces' attributes changed: the Changed Namespace List log
        (04h) lists them and a Namespace Attribute Notice event is raised (Base 5.2.1)."""
        self.changed_namespaces.update(nsids)
        self.raise_event(AsyncEventType.NOTICE, spec.AsyncEventNotice.NAMESPACE_ATTRIBUTE_CHANGED,
                         LogPageId.CHANGED_NAMESPACE_LIST)

    @property
    def pending_events(self):
        return list(self._events)

    @_locked
    def set_temperature(self, kelvin):
        """Change the composite temperature; crossing the over-temperature threshold sets the
        SMART critical warning and, when enabled (feature 0Bh bit 1), raises an event."""
        self.temperature = kelvin
        over = self.features[spec.FeatureId.TEMPERATURE_THRESHOLD].get((0, 0),
                                                                        TEMPERATURE_WARNING_K)
        if kelvin > over:
            first = not self.critical_warning & 0x02
            self.critical_warning |= 0x02
            if first and self.features[spec.FeatureId.ASYNC_EVENT_CONFIGURATION] & 0x02:
                self.raise_event(AsyncEventType.SMART_HEALTH,
                                 spec.AsyncEventSmart.TEMPERATURE_THRESHOLD,
                                 LogPageId.SMART_HEALTH)
        else:
            self.critical_warning &= ~0x02

    # ---- fault injection -------------------------------------------------------------------------
    def _rule(self, action, opcode, admin, qid, nsid, lba, count, **extra):
        if admin and qid not in (None, 0):
            raise InvalidArgument("admin=True means qid 0")
        if not admin and qid == 0:
            raise InvalidArgument("qid 0 is the admin queue: pass admin=True")
        if count is not None and count < 1:
            raise InvalidArgument(f"count must be at least 1 (or None), not {count}")
        rule = FaultRule(action, opcode=opcode, admin=admin, qid=qid, nsid=nsid, lba=lba,
                         remaining=count, **extra)
        self.rules.append(rule)
        return rule

    @_locked
    def inject(self, opcode=None, *, admin=False, qid=None, nsid=None, lba=None, count=1,
               status=(Sct.MEDIA, 0x81), dnr=False, more=False, crd=0):
        """The next `count` matching commands complete with `status` ((sct, sc), an
        NvmeStatus or a status enum member) instead of executing. Returns the FaultRule."""
        st = NvmeStatus.of(status)
        st = NvmeStatus(st.sct, st.sc, dnr or st.dnr, more or st.more, crd or st.crd)
        if st.ok:
            raise InvalidArgument("inject an error status, not success")
        return self._rule(INJECT, opcode, admin, qid, nsid, lba, count, status=st)

    @_locked
    def hold(self, opcode=None, *, admin=False, qid=None, nsid=None, lba=None, count=None):
        """Matching commands are fetched but not completed until `release()` (or aborted, or
        the queue deleted, or the controller reset)."""
        return self._rule(HOLD, opcode, admin, qid, nsid, lba, count)

    @_locked
    def delay(self, opcode=None, *, ticks=1, admin=False, qid=None, nsid=None, lba=None,
              count=None):
        """Matching commands execute and complete at the `ticks`-th `tick()` from now."""
        if ticks < 1:
            raise InvalidArgument("ticks must be at least 1")
        return self._rule(DELAY, opcode, admin, qid, nsid, lba, count, ticks=ticks)

    @_locked
    def clear_faults(self):
        """Forget every rule (held and delayed commands stay held and delayed)."""
        self.rules.clear()

    @_locked
    def release(self, rule=None):
        """Execute and complete the held commands (all, or those `rule` took). Returns how many.
        Nothing is released while the controller is not running (fatal, disabled, removed)."""
        if not self.running:
            return 0
        take = [p for p in self.held if rule is None or p.rule is rule]
        self.held = [p for p in self.held if p not in take]
        for p in take:
            if self.sqs.get(p.sq.qid) is p.sq:
                self._execute(p.sq, p.cmd)
        return len(take)

    @_locked
    def tick(self, n=1):
        """Advance emulated time: delayed commands whose time has come complete; shadow
        doorbells are looked at. Returns the number of commands completed."""
        done = 0
        for _ in range(n):
            if not self.running:
                break
            due = []
            for p in self.delayed:
                p.ticks_left -= 1
                if p.ticks_left <= 0:
                    due.append(p)
            self.delayed = [p for p in self.delayed if p not in due]
            for p in due:
                if self.sqs.get(p.sq.qid) is p.sq:
                    self._execute(p.sq, p.cmd)
                    done += 1
            self._poll_shadow_doorbells()
        return done

    @_locked
    def poll(self):
        """Look at shadow doorbells now (what a real controller does continuously)."""
        self._poll_shadow_doorbells()

    @_locked
    def fatal(self, reason="injected"):
        """Set CSTS.CFS: the controller stops processing commands until it is reset."""
        self.fatal_reason = reason
        self.counters["fatal"] += 1
        self._set_csts(spec.CSTS_CFS, True)

    @_locked
    def remove(self):
        """Surprise removal: every register reads all ones from now on, nothing completes."""
        self.removed = True
        self.enabled = False
        self._publish()

    @_locked
    def post_bogus_completion(self, qid, cid, *, wrong_phase=False, status=0, cdw0=0,
                              sqid=None):
        """Post a completion nobody asked for on CQ `qid`: an unknown `cid`, or (wrong_phase)
        an entry written at the tail with the previous pass's phase tag and the tail not moved,
        which a correct driver must not consume."""
        cq = self.cqs.get(qid)
        if cq is None:
            raise InvalidArgument(f"there is no completion queue {qid}")
        sqid = qid if sqid is None else sqid
        sq = self.sqs.get(sqid)
        raw_status = NvmeStatus.of(status).encode() if status else 0
        entry = (cdw0, sq.head if sq else 0, sqid, cid, raw_status)
        self.counters["bogus_completions"] += 1
        if wrong_phase:
            cdw0_, sqhd, sqid_, cid_, st = entry
            raw = spec.CQE_STRUCT.pack(cdw0_, 0, sqhd, sqid_, cid_, st | (cq.phase ^ 1))
            self.mem.write(cq.base + cq.tail * spec.CQE_SIZE, raw)
            return
        if cq.backlog or cq.full:
            cq.backlog.append(entry)
        else:
            self._write_cqe(cq, entry)

    # ---- inspection ------------------------------------------------------------------------------
    def commands(self, opcode, admin=False):
        """How many commands with this opcode were fetched."""
        return self.counters[("admin." if admin else "io.") + spec.opcode_name(opcode, admin)]

    @property
    def held_commands(self):
        return [(p.qid, p.cid, p.cmd.opc) for p in self.held]

    @property
    def delayed_commands(self):
        return [(p.qid, p.cid, p.cmd.opc, p.ticks_left) for p in self.delayed]

    def queue(self, qid, cq=False):
        """The SubmissionQueue / CompletionQueue state object of `qid` (None if absent)."""
        return (self.cqs if cq else self.sqs).get(qid)

    def namespace(self, nsid):
        return self.namespaces[nsid]
