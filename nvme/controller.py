"""The NVMe controller: bring-up, administration, I/O queue pairs, reset and detach.

Bring-up follows the Base Specification's initialization sequence (3.5.1): wait for a previous
enable to settle, disable (CC.EN=0) and wait for CSTS.RDY=0, program the admin queues (AQA, ASQ,
ACQ), configure and enable (CC), wait for CSTS.RDY=1 within CAP.TO, then Identify Controller,
Set Features - Number of Queues, Doorbell Buffer Config where offered, Asynchronous Event Requests,
and the active namespaces. Every wait is bounded and fails with a `ControllerError` that says
what the controller did instead.

Administration runs on the admin queue pair under a lock (any thread may administer). I/O queue
pairs belong to the thread that creates them. A command outstanding longer than the I/O timeout is
aborted (Abort command); if it is still outstanding one more timeout later, the controller is
reset: every queue pair is disconnected (its outstanding commands complete with ABORTED - SQ
DELETION, exactly once, on their owner threads) and re-created on the re-initialised controller.
"""
import logging
import math
import threading
import time
import weakref

import attrs

from env.errors import InvalidArgument
from env import memory
from nvme import identify as _identify
from nvme.errors import (AlreadyAttached, CommandError, CommandTimeout, ControllerDetached,
                         ControllerError, InvalidOption)
from nvme.namespace import Namespace
from nvme.qpair import Completion, QueuePair, trackers_for
from nvme.status import NvmeStatus
from nvme.transport import Transport

log = logging.getLogger("userblk.nvme.controller")

# Register offsets and bits (Base spec 3.1.3)
CAP, VS, CC, CSTS, AQA, ASQ, ACQ = 0x00, 0x08, 0x14, 0x1C, 0x24, 0x28, 0x30
CC_EN, CSTS_RDY, CSTS_CFS = 1, 1, 2
CC_SHN_NORMAL = 1 << 14
CSTS_SHST_MASK, CSTS_SHST_COMPLETE = 0xC, 0x8
CC_IOSQES, CC_IOCQES = 6 << 16, 4 << 20      # 2^6 = 64-byte SQEs, 2^4 = 16-byte CQEs

# Admin opcodes (Base spec 5)
OP_DELETE_SQ, OP_CREATE_SQ, OP_GET_LOG_PAGE, OP_DELETE_CQ, OP_CREATE_CQ = 0x00, 0x01, 0x02, 0x04, 0x05
OP_IDENTIFY, OP_ABORT, OP_SET_FEATURES, OP_GET_FEATURES, OP_AER = 0x06, 0x08, 0x09, 0x0A, 0x0C
OP_DBBUF_CONFIG = 0x7C

FEAT_NUM_QUEUES = 0x07
FEAT_ASYNC_EVENT_CONFIG = 0x0B
LOG_ERROR, LOG_SMART, LOG_FIRMWARE = 0x01, 0x02, 0x03

MAX_TRANSFER_CAP = 2 << 20          # one PRP list page's worth (the queue pair caps it too)
PAGE = 4096


MAX_TIMEOUT_S = 1e6                 # about 11.5 days: beyond, a "timeout" is a typo


# Validators of ControllerOptions. attrs runs them when the options are made and whenever a
# field is set, so a bad value fails where it was written, with the field's name, and never later
# in a queue pair's creation (where a failure once cost an I/O queue each time).
def _int_range(lo, hi):
    def check(_, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidOption(attribute.name, value, f"an int from {lo} to {hi}")
    return check


def _optional(check):
    def optional(inst, attribute, value):
        if value is not None:
            check(inst, attribute, value)
    return optional


def _seconds(*, zero_ok):
    def check(_, attribute, value):
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not (value >= 0 if zero_ok else value > 0)
                or value > MAX_TIMEOUT_S):
            raise InvalidOption(attribute.name, value,
                                f"a number of seconds {'>= 0' if zero_ok else '> 0'} and at most "
                                f"{MAX_TIMEOUT_S:g}" + (" (0 turns it off)" if zero_ok else ""))
    return check


def _is_bool(_, attribute, value):
    if not isinstance(value, bool):
        raise InvalidOption(attribute.name, value, "True or False")


def _one_of(*choices):
    def check(_, attribute, value):
        if not isinstance(value, str) or value not in choices:
            raise InvalidOption(attribute.name, value, "one of " + ", ".join(map(repr, choices)))
    return check


@attrs.define
class ControllerOptions:
    """How to bring a controller up (names follow SPDK's spdk_nvme_ctrlr_opts where they exist).
    Every field is checked when the options are made and when it is set: a bad value raises
    `nvme.errors.InvalidOption` naming the field."""
    admin_queue_size: int = attrs.field(default=32, validator=_int_range(2, 4096))
    # capped at CAP.MQES + 1
    io_queue_size: int = attrs.field(default=1024, validator=_int_range(2, 65536))
    # requests (commands, and the parents of split ones) per I/O queue pair; None: twice the
    # queue size, at least 512. At least the commands the queue keeps in flight (checked at attach)
    io_queue_requests: int | None = attrs.field(default=None,
                                                validator=_optional(_int_range(1, 1 << 20)))
    # asked for in Set Features - Number of Queues
    num_io_queues: int = attrs.field(default=64, validator=_int_range(1, 65535))
    # Doorbell Buffer Config when OACS says it is supported
    shadow_doorbells: bool = attrs.field(default=True, validator=_is_bool)
    # "never", "auto" (when PRPs cannot express a payload), "always"
    sgl: str = attrs.field(default="auto", validator=_one_of("never", "auto", "always"))
    admin_timeout_s: float = attrs.field(default=10.0, validator=_seconds(zero_ok=False))
    # 0 disables I/O timeouts
    io_timeout_s: float = attrs.field(default=30.0, validator=_seconds(zero_ok=True))
    # how long after Abort before reset (None: io_timeout_s)
    abort_timeout_s: float | None = attrs.field(default=None,
                                                validator=_optional(_seconds(zero_ok=False)))
    # Asynchronous Event Requests kept outstanding (<= AERL+1)
    aer_count: int = attrs.field(default=4, validator=_int_range(0, 256))
    # critical warnings reported through AERs (Set Features 0Bh, CDW11)
    async_event_config: int = attrs.field(default=0xFF, validator=_int_range(0, 0xFFFFFFFF))


@attrs.define
class AsyncEvent:
    """An Asynchronous Event (Base spec 5.2): type, info and the log page that explains it."""
    type: int
    info: int
    log_page: int

    @classmethod
    def from_cdw0(cls, cdw0):
        return cls(cdw0 & 0x7, (cdw0 >> 8) & 0xFF, (cdw0 >> 16) & 0xFF)


class Controller:
    """One NVMe controller. Create it with `nvme.attach(...)` (a PCIe function) or from an
    emulated controller's transport: `Controller(emu.transport)`; `init()` brings it up."""

    def __init__(self, transport, options=None, *, name=None):
        if not isinstance(transport, Transport):
            raise InvalidArgument(f"transport must be an nvme.transport.Transport, not {transport!r}")
        if options is None:
            options = ControllerOptions()
        elif not isinstance(options, ControllerOptions):
            raise InvalidArgument(f"options must be an nvme.controller.ControllerOptions, not "
                                  f"{options!r}")
        else:
            attrs.validate(options)      # (fields set past the validators, object.__setattr__)
        self.transport = transport
        self.options = options
        self.name = name or transport.name
        self.admin_lock = threading.RLock()
        self.admin_qpair = None
        self.data = None                 # IdentifyController
        self.namespaces = {}
        self.qpairs = {}                 # qid -> QueuePair
        self.events = []                 # AsyncEvents received
        self.event_callbacks = []
        self.cap = self.vs = 0
        self.max_transfer = 0
        self.num_io_queues = 0
        self.sgl_supported = False
        self.state = "new"
        self._dbbuf = None               # (shadow DmaBuffer, eventidx DmaBuffer)
        self._aers_outstanding = 0
        self._aborts = {}                # (qid, cid) -> (deadline (monotonic), command token)
        self._reset_pending = False
        self.reset_count = 0
        self._free_qids = []

    # ---- registers ----------------------------------------------------------------------------
    def _wait_csts(self, want_mask, want_value, what, timeout_s):
        deadline = time.monotonic() + timeout_s
        while True:
            csts = self.transport.read32(CSTS)
            if csts == 0xFFFFFFFF:
                raise ControllerError(f"{self.name}: registers read all-ones while waiting for "
                                      f"{what}: the device is gone (surprise removal?)")
            if csts & CSTS_CFS and what != "CSTS.RDY=0":
                raise ControllerError(f"{self.name}: controller fatal status (CSTS.CFS) while "
                                      f"waiting for {what}; CSTS=0x{csts:x}")
            if csts & want_mask == want_value:
                return csts
            if time.monotonic() > deadline:
                raise ControllerError(f"{self.name}: {what} did not happen within "
                                      f"{timeout_s:.1f} s (CAP.TO); CSTS=0x{csts:x}")
            time.sleep(0.0002)

    @property
    def timeout_s(self):
        """CAP.TO: the worst case time to become ready, in 500 ms units."""
        return max(((self.cap >> 24) & 0xFF) * 0.5, 0.5)

    @property
    def mqes(self):
        return (self.cap & 0xFFFF) + 1

    # ---- bring-up -----------------------------------------------------------------------------
    def init(self):
        """Bring the controller up (Base spec 3.5.1). Returns self. A controller another
        Controller of this process drives (and has not detached) is refused: AlreadyAttached."""
        first = self.state == "new"
        self._claim_transport()
        try:
            return self._init()
        except BaseException:
            if first:
                self.state = "new"
                self._release_transport()
            raise

    def _claim_transport(self):
        """Make this Controller the transport's one driver. A second driver would disable and
        re-initialise the controller under the first, whose commands then time out."""
        t = self.transport
        other = t.owner_ref() if t.owner_ref is not None else None
        if other is not None and other is not self and other.state != "detached":
            raise AlreadyAttached(
                f"{t.name} is already attached as {other.name} ({other.state}) in this process; "
                f"detach {other.name} first", self.name, owner=other.name)
        t.owner_ref = weakref.ref(self)

    def _release_transport(self):
        t = self.transport
        if t.owner_ref is not None and t.owner_ref() is self:
            t.owner_ref = None

    def _init(self):
        t = self.transport
        self.cap = t.read64(CAP)
        self.vs = t.read32(VS)
        if self.cap == 0xFFFFFFFFFFFFFFFF:
            raise ControllerError(f"{self.name}: registers read all-ones: no device behind them")
        t.refresh_stride()
        if not (self.cap >> 37) & 1:
            raise ControllerError(f"{self.name}: the controller does not support the NVM "
                                  f"command set (CAP.CSS=0x{(self.cap >> 37) & 0xFF:x})")
        if (self.cap >> 48) & 0xF > 0:
            raise ControllerError(f"{self.name}: CAP.MPSMIN is above 4 KiB; unsupported")
        opts = self.options
        io_size = min(opts.io_queue_size, self.mqes, 65536)
        if opts.io_queue_requests is not None and opts.io_queue_requests < trackers_for(io_size):
            raise InvalidOption("io_queue_requests", opts.io_queue_requests,
                                f"at least {trackers_for(io_size)}, the commands an I/O queue of "
                                f"{io_size} entries keeps in flight, or None")
        self._disable()
        asize = max(2, min(opts.admin_queue_size, self.mqes, 4096))
        if self.admin_qpair is None:
            self.admin_qpair = QueuePair(t, 0, asize, check_owner=False,
                                         max_transfer=MAX_TRANSFER_CAP, sgl="never")
        else:
            self.admin_qpair.reset_rings()
        aq = self.admin_qpair
        t.write32(AQA, ((aq.entries - 1) << 16) | (aq.entries - 1))
        t.write64(ASQ, aq.sq_iova)
        t.write64(ACQ, aq.cq_iova)
        t.write32(CC, CC_IOSQES | CC_IOCQES)          # CSS=NVM, MPS=4 KiB, AMS=round robin
        t.write32(CC, CC_IOSQES | CC_IOCQES | CC_EN)
        self._wait_csts(CSTS_RDY, CSTS_RDY, "CSTS.RDY=1", self.timeout_s)
        aq.enable()
        self.state = "initializing"

        self.data = self.identify_controller()
        mdts = self.data.mdts
        self.max_transfer = MAX_TRANSFER_CAP if mdts == 0 else min(PAGE << mdts, MAX_TRANSFER_CAP)
        self.sgl_supported = bool(self.data.sgls & 0x3)
        self._set_num_queues(opts.num_io_queues)
        # queue pairs that survive a reset keep their ids
        self._free_qids = [q for q in range(self.num_io_queues, 0, -1) if q not in self.qpairs]
        if opts.shadow_doorbells and self.data.oacs & (1 << 8):
            self._config_dbbuf()
        else:
            self._dbbuf = None
            aq.set_shadow_doorbells(0, 0)
        self._start_aers()
        self._scan_namespaces()
        self.state = "ready"
        return self

    def _disable(self):
        t = self.transport
        cc = t.read32(CC)
        csts = t.read32(CSTS)
        if csts == 0xFFFFFFFF:
            raise ControllerError(f"{self.name}: registers read all-ones: the device is gone")
        if cc & CC_EN:
            if not csts & CSTS_RDY and not csts & CSTS_CFS:
                # an enable is in progress: the spec says wait for it before disabling
                try:
                    self._wait_csts(CSTS_RDY, CSTS_RDY, "CSTS.RDY=1 (before disabling)",
                                    self.timeout_s)
                except ControllerError:
                    pass
            t.write32(CC, cc & ~CC_EN)
        self._wait_csts(CSTS_RDY, 0, "CSTS.RDY=0", self.timeout_s)

    def _set_num_queues(self, want):
        want = max(1, min(want, 65535))
        cpl = self.set_features(FEAT_NUM_QUEUES, ((want - 1) << 16) | (want - 1))
        nsqa, ncqa = (cpl.cdw0 & 0xFFFF) + 1, (cpl.cdw0 >> 16) + 1
        self.num_io_queues = min(want, nsqa, ncqa)

    def _config_dbbuf(self):
        if self._dbbuf is None:
            self._dbbuf = (memory.allocate(PAGE, zero=True), memory.allocate(PAGE, zero=True))
        shadow, eventidx = self._dbbuf
        shadow.zero()
        eventidx.zero()
        try:
            self.admin(OP_DBBUF_CONFIG, prp=(shadow.iova, eventidx.iova))
        except CommandError as e:
            log.info("%s: Doorbell Buffer Config refused (%s); using MMIO doorbells", self.name, e)
            self._dbbuf = None
            return
        # the admin queue keeps writing MMIO too (see QueuePair.ring_sq), but must keep the
        # shadow copy current for controllers that read it
        self.admin_qpair.set_shadow_doorbells(shadow.vaddr, eventidx.vaddr)

    @property
    def shadow_doorbells(self):
        return self._dbbuf is not None

    def _scan_namespaces(self):
        nsids = self.active_namespace_ids()
        found = {}
        for nsid in nsids:
            data = self.identify_namespace(nsid)
            if data.nsze == 0:
                continue
            old = self.namespaces.get(nsid)
            if old is not None:
                old._update(data)
                found[nsid] = old
            else:
                found[nsid] = Namespace(self, nsid, data)
        self.namespaces = found

    # ---- admin commands -----------------------------------------------------------------------
    def admin(self, opc, *, nsid=0, buf=None, length=None, prp=None, cdw10=0, cdw11=0, cdw12=0,
              cdw13=0, cdw14=0, cdw15=0, timeout_s=None, check=True):
        """Run one admin command to completion and return its `Completion`. Raises CommandError
        on an error status (unless check=False) and CommandTimeout when it does not complete."""
        self._check_usable()
        done = []
        with self.admin_lock:
            aq = self.admin_qpair
            if prp is not None:
                # raw PRP1/PRP2 (Doorbell Buffer Config carries two addresses that are not data)
                aq.submit_raw(opc, nsid=nsid, cdw10=cdw10, cdw11=cdw11, cdw12=cdw12, cdw13=cdw13,
                              cdw14=cdw14, cdw15=cdw15, cb=done.append, prp1=prp[0], prp2=prp[1])
            else:
                aq.submit_raw(opc, nsid=nsid, buf=buf, length=length, cdw10=cdw10, cdw11=cdw11,
                              cdw12=cdw12, cdw13=cdw13, cdw14=cdw14, cdw15=cdw15,
                              cb=done.append)
            deadline = time.monotonic() + (timeout_s or self.options.admin_timeout_s)
            while not done:
                aq.process_completions()
                if done:
                    break
                if time.monotonic() > deadline:
                    self._admin_timed_out(opc)
                    raise CommandTimeout(f"{self.name}: admin command 0x{opc:02x} did not "
                                         f"complete within {timeout_s or self.options.admin_timeout_s} s;"
                                         " the controller was reset")
                if self.transport.read32(CSTS) == 0xFFFFFFFF:
                    self._fail_all("device removed")
                    raise ControllerDetached(f"{self.name}: the device is gone")
        cpl = done[0]
        if check and not cpl.ok:
            raise CommandError.from_completion(cpl, opcode=opc, admin=True, nsid=nsid,
                                               controller=self.name)
        return cpl

    def _admin_timed_out(self, opc):
        log.error("%s: admin command 0x%02x timed out; resetting the controller", self.name, opc)
        self.reset()

    def identify(self, cns, nsid=0, cntid=0, csi=0):
        """Raw Identify data (4096 bytes) for CNS `cns`."""
        with memory.allocate(PAGE, zero=True) as buf:
            self.admin(OP_IDENTIFY, nsid=nsid, buf=buf, cdw10=cns | (cntid << 16), cdw11=csi << 24)
            return bytes(memoryview(buf))

    def identify_controller(self):
        return _identify.IdentifyController.parse(self.identify(0x01))

    def identify_namespace(self, nsid):
        return _identify.IdentifyNamespace.parse(self.identify(0x00, nsid=nsid))

    def active_namespace_ids(self):
        return _identify.parse_active_ns_list(self.identify(0x02, nsid=0))

    def namespace_descriptors(self, nsid):
        return _identify.parse_ns_descriptors(self.identify(0x03, nsid=nsid))

    def get_log_page(self, lid, size, *, nsid=0xFFFFFFFF, offset=0, rae=False):
        """`size` bytes of log page `lid` (Base spec 5.16)."""
        if size <= 0 or size % 4:
            raise InvalidArgument(f"log page size must be a positive multiple of 4, not {size}")
        numd = size // 4 - 1
        with memory.allocate(size, zero=True) as buf:
            self.admin(OP_GET_LOG_PAGE, nsid=nsid, buf=buf,
                       cdw10=lid | (int(rae) << 15) | ((numd & 0xFFFF) << 16),
                       cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)
            return bytes(memoryview(buf))

    def smart_log(self):
        from nvme.logpages import SmartLog
        return SmartLog.parse(self.get_log_page(LOG_SMART, 512))

    def error_log(self, entries=None):
        from nvme.logpages import parse_error_log
        n = min(entries or (self.data.elpe + 1), self.data.elpe + 1)
        return parse_error_log(self.get_log_page(LOG_ERROR, 64 * n))

    def firmware_log(self):
        from nvme.logpages import FirmwareSlotLog
        return FirmwareSlotLog.parse(self.get_log_page(LOG_FIRMWARE, 512))

    def get_features(self, fid, cdw11=0, *, sel=0, buf=None):
        return self.admin(OP_GET_FEATURES, buf=buf, cdw10=fid | (sel << 8), cdw11=cdw11)

    def set_features(self, fid, cdw11=0, cdw12=0, *, save=False, buf=None):
        return self.admin(OP_SET_FEATURES, buf=buf, cdw10=fid | (int(save) << 31),
                          cdw11=cdw11, cdw12=cdw12)

    # ---- asynchronous events ------------------------------------------------------------------
    def _start_aers(self):
        self._aers_outstanding = 0
        if self.options.aer_count <= 0:
            return
        try:
            self.set_features(FEAT_ASYNC_EVENT_CONFIG, self.options.async_event_config)
        except CommandError as e:
            log.info("%s: asynchronous event configuration refused: %s", self.name, e)
        for _ in range(min(self.options.aer_count, self.data.aerl + 1)):
            self._submit_aer()

    def _submit_aer(self):
        with self.admin_lock:
            self.admin_qpair.submit_raw(OP_AER, cb=self._aer_done)
            self._aers_outstanding += 1

    def _aer_done(self, cpl):
        self._aers_outstanding -= 1
        if not cpl.ok:
            # ABORTED - SQ DELETION on reset/detach, or the limit: do not resubmit
            return
        event = AsyncEvent.from_cdw0(cpl.cdw0)
        self.events.append(event)
        log.info("%s: asynchronous event %s", self.name, event)
        for cb in list(self.event_callbacks):
            try:
                cb(self, event)
            except Exception:
                log.exception("event callback %r raised", cb)
        if self.state == "ready":
            self._submit_aer()

    def on_event(self, callback):
        """Call `callback(controller, AsyncEvent)` for each asynchronous event."""
        self.event_callbacks.append(callback)

    def poll_admin(self):
        """Reap admin completions (asynchronous events, aborts) and act on expired aborts and
        pending resets. Call it now and then (the bdev layer runs it from a timed poller)."""
        if self.state in ("detached", "failed"):
            return 0
        csts = self.transport.read32(CSTS)
        if csts == 0xFFFFFFFF:
            self.fail("its registers read all-ones: the device is gone (surprise removal)")
            return 1
        if csts & CSTS_CFS and self.state == "ready":
            log.error("%s: controller fatal status (CSTS.CFS); resetting", self.name)
            self._reset_pending = True
        with self.admin_lock:
            n = self.admin_qpair.process_completions()
        self._check_aborts()
        if self._reset_pending:
            self._reset_pending = False
            self.reset()
        return n

    # ---- I/O queue pairs ----------------------------------------------------------------------
    def create_io_qpair(self, size=None, *, requests=None, sgl=None):
        """A new I/O queue pair owned by the calling thread."""
        self._check_usable()
        size = min(size or self.options.io_queue_size, self.mqes, 65536)
        if size < 2:
            raise InvalidArgument(f"queue size must be at least 2, not {size}")
        with self.admin_lock:
            if not self._free_qids:
                raise ControllerError(f"{self.name}: all {self.num_io_queues} I/O queues are in "
                                      "use")
            # From here every failure gives the queue id back, and deletes whatever the
            # controller already created for it: an error path must never cost a queue.
            qid = self._free_qids.pop()
            qp = None
            created = False
            try:
                qp = QueuePair(self.transport, qid, size,
                               nrequests=requests or self.options.io_queue_requests,
                               max_transfer=self.max_transfer,
                               sgl=(sgl or self.options.sgl) if self.sgl_supported else "never")
                self._create_queues(qp)
                created = True
                qp.set_controller(weakref.ref(self))
                qp.set_disconnect_handler(self._qpair_drained)
                if self.options.io_timeout_s:
                    qp.set_timeout(self.options.io_timeout_s * 1e6, self._io_timed_out)
                self.qpairs[qid] = qp
            except BaseException:
                if created:
                    self._delete_queues(qid)
                if qp is not None:
                    qp.set_disconnect_handler(None)
                    qp.destroy()
                self._free_qids.append(qid)
                raise
            return qp

    def _create_queues(self, qp):
        """Create the queue pair's CQ and SQ on the controller and enable it; on failure
        nothing stays created."""
        qid, n = qp.qid, qp.entries
        # shadow doorbell slots of this queue id zeroed before the controller looks at them
        if self._dbbuf is not None:
            qp.set_shadow_doorbells(self._dbbuf[0].vaddr, self._dbbuf[1].vaddr)
        else:
            qp.set_shadow_doorbells(0, 0)
        # Create I/O CQ: physically contiguous (PC=1), interrupts off (IEN=0): we poll
        self.admin(OP_CREATE_CQ, prp=(qp.cq_iova, 0), cdw10=((n - 1) << 16) | qid, cdw11=0x1)
        sq = False
        try:
            # Create I/O SQ bound to the CQ of the same id, PC=1, medium priority
            self.admin(OP_CREATE_SQ, prp=(qp.sq_iova, 0), cdw10=((n - 1) << 16) | qid,
                       cdw11=(qid << 16) | 0x1)
            sq = True
            qp.enable()
        except BaseException:
            self._delete_queues(qid, sq=sq)
            raise

    def _delete_queues(self, qid, *, sq=True):
        """Delete I/O queue `qid` (SQ, then CQ) on an error path: best effort, never raises."""
        if self.state in ("detached", "failed"):
            return
        for opc in ((OP_DELETE_SQ, OP_DELETE_CQ) if sq else (OP_DELETE_CQ,)):
            try:
                self.admin(opc, cdw10=qid, check=False)
            except Exception as e:
                log.warning("%s: deleting queue %d after a failed creation: %s", self.name,
                            qid, e)
                return

    def delete_io_qpair(self, qp):
        """Delete the queues from the controller; commands still in flight complete with
        ABORTED - SQ DELETION. Call it from the queue pair's thread."""
        with self.admin_lock:
            if self.qpairs.get(qp.qid) is not qp:
                raise InvalidArgument(f"{qp!r} is not a queue pair of {self.name}")
            if self.state == "ready":
                self.admin(OP_DELETE_SQ, cdw10=qp.qid, check=False)
                self.admin(OP_DELETE_CQ, cdw10=qp.qid, check=False)
            del self.qpairs[qp.qid]
            qp.set_disconnect_handler(None)
            qp.destroy()
            self._free_qids.append(qp.qid)

    def _qpair_drained(self, qp):
        """A queue pair's owner drained it after a disconnect: re-create it if we are up."""
        if self.state == "ready" and self.qpairs.get(qp.qid) is qp:
            with self.admin_lock:
                qp.reset_rings()
                self._create_queues(qp)

    # ---- timeouts, abort, reset ---------------------------------------------------------------
    def _io_timed_out(self, qp, cid):
        cmd = qp.command_of(cid)
        log.warning("%s: command %d on queue %d (opcode %s) timed out; aborting", self.name, cid,
                    qp.qid, None if cmd is None else f"0x{cmd[0]:02x}")
        deadline = time.monotonic() + (self.options.abort_timeout_s or self.options.io_timeout_s)
        # the CID is reused as soon as the command completes: remember which command it was
        self._aborts[(qp.qid, cid)] = (deadline, qp.command_token(cid))
        try:
            with self.admin_lock:
                self.admin_qpair.submit_raw(OP_ABORT, cdw10=qp.qid | (cid << 16),
                                            cb=lambda cpl, key=(qp.qid, cid): self._abort_done(key, cpl))
        except Exception as e:
            log.error("%s: cannot submit Abort (%s); resetting", self.name, e)
            self._reset_pending = True

    def _abort_done(self, key, cpl):
        if cpl.ok and not cpl.cdw0 & 1:
            log.info("%s: command %d on queue %d aborted", self.name, key[1], key[0])
        else:
            log.warning("%s: Abort of command %d on queue %d did not abort it (%s)", self.name,
                        key[1], key[0], cpl)

    def _check_aborts(self):
        now = time.monotonic()
        for (qid, cid), (deadline, token) in list(self._aborts.items()):
            qp = self.qpairs.get(qid)
            if qp is None or qp.command_token(cid) != token:
                del self._aborts[(qid, cid)]
            elif now > deadline:
                log.error("%s: command %d on queue %d still outstanding after Abort; resetting "
                          "the controller", self.name, cid, qid)
                self._aborts.clear()
                self._reset_pending = True
                return

    def reset(self):
        """Reset the controller: every queue pair is disconnected (its outstanding commands
        complete with ABORTED - SQ DELETION on its owner thread) and re-created after the
        controller is brought up again."""
        with self.admin_lock:
            if self.state in ("detached", "failed"):
                raise ControllerDetached(f"{self.name} is {self.state}")
            self.state = "resetting"
            self.reset_count += 1
            log.warning("%s: resetting the controller", self.name)
            for qp in self.qpairs.values():
                qp.set_disconnect_handler(None)
                qp.disconnect()          # drained now if we own it, else on its owner's next poll
            self.admin_qpair.disconnect()   # completes outstanding admin commands (AERs, aborts)
            self._aborts.clear()
            try:
                self.init()
            except BaseException:
                self._fail_all("reset failed")
                raise
            for qp in list(self.qpairs.values()):
                qp.set_disconnect_handler(self._qpair_drained)
                if qp.state == "disconnected":
                    qp.reset_rings()
                    self._create_queues(qp)
                # still "disconnecting": its owner drains it and _qpair_drained re-creates it
            return True

    def fail(self, reason):
        """Give up on the controller (removed, or beyond recovery): every queue pair is
        disconnected, so its commands complete with ABORTED - SQ DELETION on their owner
        threads, and further use raises ControllerDetached."""
        if self.state not in ("failed", "detached"):
            self._fail_all(reason)

    def _fail_all(self, why):
        self.state = "failed"
        for qp in self.qpairs.values():
            qp.set_disconnect_handler(None)
            qp.disconnect()
        if self.admin_qpair is not None:
            self.admin_qpair.disconnect()
        log.error("%s: controller failed: %s", self.name, why)

    def _check_usable(self):
        if self.state in ("detached", "failed"):
            raise ControllerDetached(f"{self.name} is {self.state}")

    # ---- detach -------------------------------------------------------------------------------
    def detach(self, *, shutdown=True, restore_driver=True):
        """Disconnect every queue pair (outstanding commands complete with ABORTED - SQ
        DELETION), shut the controller down cleanly (CC.SHN) and release the device, giving it
        back to its kernel driver unless `restore_driver=False`."""
        if self.state == "detached":
            return
        with self.admin_lock:
            for qp in list(self.qpairs.values()):
                if self.state == "ready":
                    try:
                        self.admin(OP_DELETE_SQ, cdw10=qp.qid, check=False, timeout_s=2)
                        self.admin(OP_DELETE_CQ, cdw10=qp.qid, check=False, timeout_s=2)
                    except Exception as e:
                        log.warning("%s: deleting queue %d: %s", self.name, qp.qid, e)
                qp.set_disconnect_handler(None)
                qp.destroy()
            self.qpairs.clear()
            if self.admin_qpair is not None:
                self.admin_qpair.disconnect()
            if shutdown and self.transport.read32(CSTS) != 0xFFFFFFFF:
                self._shutdown()
            self.state = "detached"
            self._release_transport()
            for ns in self.namespaces.values():
                ns._detached = True
            if hasattr(self.transport, "handle"):
                self.transport.close(restore_driver=restore_driver)
            else:
                self.transport.close()

    def _shutdown(self):
        t = self.transport
        cc = t.read32(CC)
        t.write32(CC, (cc & ~(3 << 14)) | CC_SHN_NORMAL)
        # RTD3E (microseconds) bounds the shutdown when reported; 10 s otherwise
        rtd3e = getattr(self.data, "rtd3e", 0) if self.data is not None else 0
        try:
            self._wait_csts(CSTS_SHST_MASK, CSTS_SHST_COMPLETE, "shutdown (CSTS.SHST=complete)",
                            max(rtd3e / 1e6, 10.0))
        except ControllerError as e:
            log.warning("%s: %s", self.name, e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    # ---- description --------------------------------------------------------------------------
    def namespace(self, nsid=1):
        try:
            return self.namespaces[nsid]
        except KeyError:
            raise InvalidArgument(f"{self.name} has no active namespace {nsid} "
                                  f"(active: {sorted(self.namespaces)})") from None

    @property
    def version(self):
        return f"{self.vs >> 16}.{(self.vs >> 8) & 0xFF}.{self.vs & 0xFF}"

    def __repr__(self):
        model = self.data.mn if self.data is not None else "?"
        return f"<Controller {self.name} {model!r} {self.state} namespaces={sorted(self.namespaces)}>"
