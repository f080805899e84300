# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The NVMe bdev module: namespaces of an NVMe controller as bdevs (SPDK's bdev_nvme).

    from bdev import nvme as bdev_nvme
    bdev_nvme.attach_controller("Nvme0", "trtype:PCIe traddr:0000:00:10.0")   # -> ["Nvme0n1"]
    desc = bdev.open_bdev("Nvme0n1", write=True)
    ...
    bdev_nvme.detach_controller("Nvme0")

`attach_controller` takes the controller through `nvme.attach` (vfio or uio) and registers one
bdev per active namespace, named `<name>n<nsid>`. `attach_emulated(name, emu)` does the same
with an in-process `nvme.emu.EmulatedController` (or an already initialised
`nvme.controller.Controller`), for tests without QEMU.

Threads and queues
------------------
- Every thread that gets a channel of one of the controller's bdevs gets one I/O queue pair of
  that controller, created on first use, on that thread (the driver's queue pairs belong to the
  OS thread that creates them), and shared by the channels of all the controller's namespaces on
  that thread (a per-thread channel of the controller's own I/O device, `NvmeController`, as
  SPDK's nvme_ctrlr_channel). It is deleted when the last of those channels is put.
- The data path is C: `submit_request` builds NVMe commands on the queue pair
  (`QueuePair.submit_io`/`submit_iov`, or a request of its pool for Flush and Dataset
  Management) with the bdev_io as the callback argument and the bdev layer's
  `bdev_io_nvme_cpl` as the callback. No Python object, no GIL per I/O. Each
  thread's channel keeps a small pool of 4 KiB DMA pages for Dataset Management range lists
  (one per unmap in flight; none free: -ENOMEM and the bdev layer retries).
- A queue pair out of requests returns -ENOMEM, which the bdev layer queues and resubmits. While
  a queue pair is being re-created (a reset) submissions also get -ENOMEM; once the controller
  has failed or is detached they get -ENXIO and fail.
- Admin work has one place: a timed poller (every 10 ms) on the thread that attached the
  controller. It reaps admin completions (asynchronous events, aborts) through
  `Controller.poll_admin()`, which takes the controller's admin lock, carries out resets the
  driver asked for (command timeouts), and notices failure: registers reading all-ones (surprise
  removal) or a controller fatal status (CSTS.CFS, answered with a reset). One poller, not one per
  channel thread: admin completions need the admin lock anyway, and one thread noticing removal is
  enough. That thread must keep polling while the controller is attached.
- A bdev reset (`desc.reset`) resets the whole controller: `Controller.reset()` runs, by
  message, on the submitting channel's thread, under the admin lock; every queue pair is
  disconnected and its outstanding commands complete with ABORTED - SQ DELETION (the bdev layer's
  "aborted" status), each on its own thread; a walk over the controller's channels makes sure
  every thread has drained, then the reset I/O completes. Resets submitted while one runs complete
  with it.
- Failure (surprise removal, a failed reset) and `detach_controller` unregister the bdevs (open
  descriptors hear "remove"); I/O in flight completes exactly once, with an error. The controller
  is detached (clean shutdown, device back to its kernel driver) once every descriptor is closed
  and every channel put.
"""
import logging
import threading
import uuid as _uuid
import weakref

from libc.errno cimport EINVAL, ENOMEM, ENXIO
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from bdev.core cimport (BDEV_IO_COMPARE, BDEV_IO_FLUSH, BDEV_IO_READ, BDEV_IO_RESET,
                        BDEV_IO_UNMAP, BDEV_IO_WRITE, BDEV_IO_WRITE_ZEROES, Bdev, BdevChannel,
                        IO_FAILED, IO_NOMEM, IO_SUCCESS, bdev_io, bdev_io_complete,
                        bdev_io_ctx, bdev_io_nvme_cpl)
from env.memory cimport Pool
from env.thread cimport IoChannel, IoDevice, thread_send
from libc.stdlib cimport calloc, free
from nvme.qpair cimport (QP_DESTROYED, QP_DISCONNECTED, QP_ENABLED, QueuePair, nvme_cb,
                         nvme_request)
from nvme.spec cimport (NVM_COMPARE, NVM_DATASET_MANAGEMENT, NVM_FLUSH, NVM_READ,
                        NVM_WRITE, NVM_WRITE_ZEROES, nvme_cqe)

from bdev.errors import BdevError, BdevExists, BdevNotFound
from env.errors import InvalidArgument
from env.thread import current_thread, for_each_channel

log = logging.getLogger("userblk.bdev.nvme")

cdef enum:
    CTRLR_READY = 0
    CTRLR_RESETTING = 1
    CTRLR_FAILED = 2

    DSM_MAX_RANGES = 256               # ranges one Dataset Management command carries (NVM 3.2.3)
    DSM_AD = 1 << 2                    # CDW11 Attribute - Deallocate
    MAX_NLB = 65536                    # the 16-bit 0's based NLB of read/write/write zeroes
    MAX_PRP_TRANSFER = 2 << 20         # what one PRP list page describes (the driver's cap too)

cdef uint64_t DSM_RANGE_MAX_BLOCKS = 0xFFFFFFFF    # a range's 32-bit length in blocks

ADMIN_POLL_PERIOD_US = 10000
DSM_PAGES_PER_CHANNEL = 8
ONCS_COMPARE, ONCS_DSM, ONCS_WRITE_ZEROES = 1 << 0, 1 << 2, 1 << 3
TRTYPE_EMULATED = "emulated"           # a userblk extension: an in-process nvme.emu controller


# ---- C structures -------------------------------------------------------------------------------
cdef packed struct dsm_range:          # Dataset Management range (NVM spec, figure "Range")
    uint32_t attributes
    uint32_t length                    # in logical blocks
    uint64_t slba

cdef struct nvme_io_ctx:               # the module's per-I/O context (bdev_io_ctx)
    uint64_t dsm_sent                  # unmap: blocks already sent in Dataset Management
                                       # commands (0 when the module first sees the I/O)

cdef struct dsm_slot:                  # one Dataset Management command in flight
    bdev_io* io
    void* page                         # its range list: a page of the channel's pool
    void* qch                          # the _QpairChannel (borrowed: alive while I/O is out)


# ---- the controller's per-thread channel: one queue pair ----------------------------------------
cdef class _QpairChannel(IoChannel):
    """This thread's I/O queue pair of one controller, shared by the thread's channels to the
    controller's namespaces, and its pool of Dataset Management range pages."""
    cdef QueuePair qpair
    cdef Pool dsm_pages
    cdef dsm_slot* slots

    def __dealloc__(self):
        free(self.slots)


def _drain_channel(ch):
    """for_each_channel step of a reset: reap (or, when disconnected, drain) this thread's queue
    pair, so that everything it had outstanding has completed."""
    qp = (<_QpairChannel> ch).qpair
    try:
        qp.process_completions()
    except Exception as e:              # destroyed meanwhile: nothing left on it
        log.debug("reset: queue pair %r: %s", qp, e)
    return 0


cdef class _PendingIo:
    """A bdev_io whose completion Python code decides (a reset), completed on its channel's
    thread."""
    cdef bdev_io* io
    cdef BdevChannel ch

    def complete(self, int status):
        cdef bdev_io* io = self.io
        if io == NULL:
            return
        if not self.ch.on_owner():
            self.ch.thread.send(self.complete, status)
            return
        self.io = NULL
        bdev_io_complete(io, <uint8_t> status)


# ---- the attached controller ------------------------------------------------------------------
cdef class NvmeController(IoDevice):
    """An NVMe controller attached as bdevs. Its I/O device hands each thread one queue pair."""

    channel_class = _QpairChannel

    cdef int c_state                    # CTRLR_*: read without the GIL by the data path
    cdef readonly object ctrlr          # nvme.controller.Controller
    cdef readonly dict trid             # {"trtype": "PCIe", "traddr": "0000:00:10.0"}
    cdef readonly list bdevs
    cdef readonly uint32_t io_queue_size
    cdef readonly uint32_t dsm_pages
    cdef object _emulator               # keeps an emulated controller alive while attached
    cdef object _admin_thread
    cdef object _admin_poller
    cdef list _pending_resets
    cdef bint _resetting
    cdef bint _detaching
    cdef bint _finished
    cdef bint _detached
    cdef int _destructed
    cdef object __weakref__

    def __init__(self, name, ctrlr, trid, *, emulator=None, dsm_pages=DSM_PAGES_PER_CHANNEL):
        IoDevice.__init__(self, name)
        self.ctrlr = ctrlr
        self.trid = dict(trid)
        self.bdevs = []
        self.io_queue_size = min(ctrlr.options.io_queue_size, ctrlr.mqes)
        self.dsm_pages = dsm_pages
        self._emulator = emulator
        self._pending_resets = []
        self.c_state = CTRLR_READY

    # -- per-thread queue pairs (env.thread IoDevice) --
    def create_channel_ctx(self, IoChannel channel):
        cdef _QpairChannel q = <_QpairChannel> channel
        if self.c_state == CTRLR_FAILED or self._finished:
            raise BdevError(f"NVMe controller {self.name} is {self.state}: no new queue pairs",
                            self.name)
        qp = self.ctrlr.create_io_qpair(self.io_queue_size)
        try:
            q.dsm_pages = Pool(self.dsm_pages, 4096, dma=True, align=4096)
            q.slots = <dsm_slot*> calloc(self.dsm_pages, sizeof(dsm_slot))
            if q.slots == NULL:
                raise MemoryError("cannot allocate Dataset Management slots")
        except BaseException:
            self._delete_qpair(qp)
            raise
        q.qpair = qp
        log.debug("%s: queue pair %d for thread %s", self.name, qp.qid, channel.thread.name)
        return None

    def destroy_channel_ctx(self, IoChannel channel):
        cdef _QpairChannel q = <_QpairChannel> channel
        if q.qpair is not None:
            self._delete_qpair(q.qpair)

    def channel_moved(self, IoChannel channel):
        # the thread's OS thread ended and another one releases the channel: the queue pair
        # (which checks its OS thread) goes with it, so that its commands drain there
        cdef _QpairChannel q = <_QpairChannel> channel
        if q.qpair is not None:
            q.qpair.bind_to_current_thread()

    def _delete_qpair(self, qp):
        c = self.ctrlr
        try:
            if c.state != "detached" and c.qpairs.get(qp.qid) is qp:
                c.delete_io_qpair(qp)         # skips the admin commands on a failed controller
                return
        except Exception as e:
            log.warning("%s: deleting queue pair %d: %s", self.name, qp.qid, e)
        qp.destroy()

    # -- bdevs --
    def _create_bdevs(self):
        c = self.ctrlr
        oncs = c.data.oncs
        io_types = ["read", "write", "flush", "reset"]
        if oncs & ONCS_WRITE_ZEROES:
            io_types.append("write_zeroes")
        if oncs & ONCS_DSM:
            io_types.append("unmap")
        if oncs & ONCS_COMPARE:
            io_types.append("compare")
        max_bytes = min(c.max_transfer, MAX_PRP_TRANSFER)
        tcp = self.trid["trtype"] == "TCP"         # any memory, any alignment: the kernel copies
        for nsid, ns in sorted(c.namespaces.items()):
            if ns.metadata_size:
                log.warning("%s: namespace %d is formatted with %d bytes of metadata per block; "
                            "not supported, no bdev made for it", self.name, nsid,
                            ns.metadata_size)
                continue
            noiob = ns.data.noiob
            b = NvmeBdev(f"{self.name}n{nsid}", block_size=ns.block_size, num_blocks=ns.nblocks,
                         module="nvme", io_types=io_types, uuid=self._namespace_uuid(ns),
                         ctx_size=sizeof(nvme_io_ctx),
                         max_transfer_blocks=min(max_bytes >> ns.lba_shift, MAX_NLB),
                         required_alignment=1 if tcp else 4, dma_required=not tcp,
                         product_name="NVMe disk",
                         optimal_io_boundary=noiob, split_on_optimal_io_boundary=bool(noiob))
            b._bind(self, ns)
            b.register()
            self.bdevs.append(b)

    def _namespace_uuid(self, ns):
        """The namespace's UUID (Namespace Identification Descriptor), else its NGUID, else one
        derived from its EUI64, else one derived from the serial number and NSID: stable across
        attaches either way."""
        try:
            u = self.ctrlr.namespace_descriptors(ns.nsid).uuid
            if u is not None and u.int:
                return u
        except Exception as e:          # CNS 03h is NVMe 1.3; older controllers refuse it
            log.debug("%s: namespace %d identification descriptors: %s", self.name, ns.nsid, e)
        nguid = bytes(ns.data.nguid)
        if any(nguid):
            return _uuid.UUID(bytes=nguid)
        eui64 = bytes(ns.data.eui64)
        if any(eui64):
            return _uuid.uuid5(_uuid.NAMESPACE_OID, f"nvme-eui64:{eui64.hex()}")
        return _uuid.uuid5(_uuid.NAMESPACE_OID,
                           f"nvme:{self.ctrlr.data.sn.strip()}:{ns.nsid}")

    def _bdev_destructed(self, b):
        self._destructed += 1
        if self._destructed >= len(self.bdevs):
            self._finish()

    def _unregister_bdevs(self):
        for b in list(self.bdevs):
            if not b.removed:
                b.unregister()         # descriptors hear "remove"; destruct once they close

    # -- the admin poller --
    def _start_admin_poller(self, period_us):
        self._admin_thread = current_thread()
        self._admin_poller = self._admin_thread.register_poller(
            self._admin_poll, period_us, name=f"bdev_nvme-admin:{self.name}")

    def _stop_admin_poller(self):
        p = self._admin_poller
        if p is None or not p.is_registered:
            return
        if self._admin_thread.is_current:
            p.unregister()
        # else: it unregisters itself when it next runs

    def _admin_poll(self):
        if self._finished:
            self._admin_poller.unregister()
            return 0
        if self.c_state == CTRLR_FAILED:
            return 0
        c = self.ctrlr
        if c.state in ("failed", "detached"):
            self._fail(f"the driver reports the controller {c.state}")
            return 1
        # the driver notices removal (registers all-ones) and a fatal status (reset) itself
        try:
            n = c.poll_admin()
        except Exception as e:
            if c.state in ("failed", "detached"):
                self._fail(str(e))
            else:
                log.warning("%s: admin poll: %s", self.name, e)
            return 1
        if c.state in ("failed", "detached"):
            self._fail(f"the driver reports the controller {c.state}")
            return 1
        return n

    def _fail(self, why):
        """The controller is gone or unusable: I/O in flight completes with an error (on each
        queue pair's thread), the bdevs are unregistered."""
        if self.c_state == CTRLR_FAILED:
            return
        self.c_state = CTRLR_FAILED
        log.error("NVMe controller %s failed: %s; removing its bdevs %s", self.name, why,
                  ", ".join(b.name for b in self.bdevs))
        c = self.ctrlr
        # every queue pair disconnected: commands complete with ABORTED - SQ DELETION on
        # their owner threads
        c.fail(why)
        self._finish_resets(IO_FAILED)
        self._unregister_bdevs()

    # -- reset --
    def _reset(self, _PendingIo p):
        if self.c_state == CTRLR_FAILED or self._finished:
            p.complete(IO_FAILED)
            return
        self._pending_resets.append(p)
        if self._resetting:
            return                       # completes with the reset under way
        self._resetting = True
        self.c_state = CTRLR_RESETTING
        log.info("%s: reset requested through the bdev layer", self.name)
        try:
            self.ctrlr.reset()
        except Exception as e:
            self._resetting = False
            self._fail(f"reset failed: {e}")
            return
        for_each_channel(self, _drain_channel, self._reset_drained)

    def _reset_drained(self, status):
        self._resetting = False
        if self.c_state == CTRLR_RESETTING:
            self.c_state = CTRLR_READY
        self._finish_resets(IO_SUCCESS if status == 0 and self.c_state == CTRLR_READY
                            else IO_FAILED)

    def _finish_resets(self, int status):
        pending, self._pending_resets = self._pending_resets, []
        for p in pending:
            p.complete(status)

    # -- detach --
    def detach(self):
        """Unregister the bdevs; the controller is detached once their descriptors are closed
        and their channels put (now, if none is open)."""
        if self._detaching:
            return
        self._detaching = True
        self._unregister_bdevs()
        if not self.bdevs:
            self._finish()

    def _finish(self):
        """Every bdev is gone: detach the controller once no thread holds a queue pair."""
        if self._finished:
            return
        self._finished = True
        with _lock:
            if _controllers.get(self.name) is self:
                del _controllers[self.name]
        self._stop_admin_poller()
        if self.channel_count == 0:
            IoDevice.unregister(self)
            self._detach_now()
        else:
            IoDevice.unregister(self, self._detach_now)

    def _detach_now(self):
        try:
            self.ctrlr.detach()
        except Exception:
            log.exception("%s: detaching the controller failed", self.name)
        self._detached = True
        log.info("NVMe controller %s detached", self.name)

    # -- facts --
    @property
    def state(self):
        if self._detached:
            return "detached"
        if self._finished or self._detaching:
            return "detaching"
        return {CTRLR_READY: "ready", CTRLR_RESETTING: "resetting",
                CTRLR_FAILED: "failed"}[self.c_state]

    def config_json(self):
        """bdev_nvme_attach_controller's entry that attaches this controller again."""
        params = {"name": self.name, "trtype": self.trid["trtype"],
                  "traddr": self.trid["traddr"]}
        opts, default = self.ctrlr.options, type(self.ctrlr.options)()
        if self.trid["trtype"] == "TCP":
            params.update(_tcp_params(self.ctrlr))
        for key in ("num_io_queues", "io_queue_size", "io_queue_requests"):
            if getattr(opts, key) != getattr(default, key):
                params[key] = getattr(opts, key)
        return {"method": "bdev_nvme_attach_controller", "params": params}

    def info(self):
        """bdev_nvme_get_controllers' description."""
        c = self.ctrlr
        return {"name": self.name, "state": self.state,
                "ctrlrs": [{"state": c.state, "trid": dict(self.trid),
                            "cntlid": c.data.cntlid if c.data is not None else None}],
                "bdevs": [b.name for b in self.bdevs]}

    def __repr__(self):
        return (f"<NvmeController {self.name} {self.trid['trtype']} {self.trid['traddr']} "
                f"{self.state} bdevs={[b.name for b in self.bdevs]}>")


# ---- the bdev and its channel -------------------------------------------------------------------
cdef class NvmeBdevChannel(BdevChannel):
    cdef _QpairChannel qch
    cdef QueuePair qpair                # qch.qpair (set once), one load less per I/O

    @property
    def queue_pair(self):
        """The queue pair this thread shares with its channels to the controller's other
        namespaces."""
        return self.qch.qpair if self.qch is not None else None


cdef class NvmeBdev(Bdev):
    """One namespace of an attached controller."""

    channel_class = NvmeBdevChannel

    cdef readonly uint32_t nsid
    cdef readonly NvmeController controller
    cdef readonly object namespace
    cdef bint vwc

    def _bind(self, NvmeController controller, ns):
        self.controller = controller
        self.namespace = ns
        self.nsid = ns.nsid
        self.vwc = bool(controller.ctrlr.data.vwc & 1)

    cdef int submit_request(self, BdevChannel ch, bdev_io* io) noexcept nogil:
        return _submit(self, <NvmeBdevChannel> ch, io)

    cdef int poll_channel(self, BdevChannel ch) noexcept nogil:
        cdef int n = (<NvmeBdevChannel> ch).qpair.process_completions_c(0)
        return n if n > 0 else 0

    def setup_channel(self, BdevChannel ch):
        (<NvmeBdevChannel> ch).qch = self.controller.get_io_channel()
        (<NvmeBdevChannel> ch).qpair = (<NvmeBdevChannel> ch).qch.qpair

    def teardown_channel(self, BdevChannel ch):
        # the bdev layer has drained the channel; keep the reference (a stray submission then
        # finds a destroyed queue pair, never None)
        (<NvmeBdevChannel> ch).qch.put()

    def destruct(self):
        self.controller._bdev_destructed(self)

    def drain_timeout(self):
        """put() waits for I/O in flight up to the controller's I/O timeout (the default one
        when timeouts are off); what is left then is aborted by deleting the queue pair."""
        t = self.controller.ctrlr.options.io_timeout_s
        return t if t and t > 0 else Bdev.drain_timeout(self)

    def config_json(self):
        """The controller's bdev_nvme_attach_controller entry, given by its first namespace's
        bdev only (one entry recreates every namespace)."""
        if self is not self.controller.bdevs[0]:
            return None
        return self.controller.config_json()

    def driver_specific(self):
        c = self.controller.ctrlr
        d = c.data
        return {"trid": dict(self.controller.trid),
                "pci_address": (self.controller.trid["traddr"]
                                if self.controller.trid["trtype"] == "PCIe" else None),
                "ctrlr": self.controller.name, "nsid": self.nsid, "cntlid": d.cntlid,
                "vendor_id": f"0x{d.vid:04x}", "model": d.mn.strip(), "serial": d.sn.strip(),
                "firmware": d.fr.strip(), "nvme_version": c.version,
                "max_transfer": c.max_transfer, "oncs": d.oncs, "vwc": d.vwc,
                "io_queue_size": self.controller.io_queue_size}


# ---- the data path ------------------------------------------------------------------------------
cdef nvme_cb _io_done = bdev_io_nvme_cpl      # the bdev layer completes straight from the CQE


cdef int _unavailable(NvmeBdev b, int qstate) noexcept nogil:
    """What a submission gets while its queue pair is not enabled: -ENOMEM (retry) while the
    queue pair is being re-created, -ENXIO once the controller is failed or detached."""
    if qstate == QP_DESTROYED or b.controller.c_state == CTRLR_FAILED:
        return -ENXIO
    if qstate == QP_DISCONNECTED:
        # rare (a reset or a failure under way): ask the driver whether it will come back
        with gil:
            if b.controller.ctrlr.state in ("failed", "detached"):
                return -ENXIO
    return -ENOMEM


cdef inline int _submit(NvmeBdev b, NvmeBdevChannel ch, bdev_io* io) noexcept nogil:
    # Reads and writes first, tested one by one: a switch over the type would be a jump table,
    # an indirect branch per I/O (dear under an emulator's binary translation). The queue pair
    # is enabled, so submit_io cannot refuse it as unavailable.
    if (ch.qpair.state == QP_ENABLED and io.num_blocks <= MAX_NLB
            and (io.type == BDEV_IO_READ or io.type == BDEV_IO_WRITE)):
        return _submit_rw(b, ch.qpair, io, NVM_READ if io.type == BDEV_IO_READ else NVM_WRITE)
    # (through a pointer: inlined, the rest would cost the common case registers and stack)
    return _other(b, ch.qch, io)


ctypedef int (*_submit_fn)(NvmeBdev b, _QpairChannel q, bdev_io* io) noexcept nogil
cdef _submit_fn _other = _submit_other


cdef inline int _submit_rw(NvmeBdev b, QueuePair qp, bdev_io* io, uint8_t opc) noexcept nogil:
    """A command with data (read, write, compare) on the I/O's segments."""
    if io.iovcnt == 1:
        return qp.submit_io(opc, b.nsid, io.offset_blocks, <uint32_t> io.num_blocks,
                            b.block_shift, <char*> io.iovs[0].iov_base, 0, 0, _io_done,
                            <void*> io)
    return qp.submit_iov(opc, b.nsid, io.offset_blocks, <uint32_t> io.num_blocks,
                         b.block_shift, io.iovs, io.iovcnt, 0, _io_done, <void*> io)


cdef int _submit_other(NvmeBdev b, _QpairChannel q, bdev_io* io) noexcept nogil:
    cdef int rc
    cdef uint8_t opc
    cdef int qstate = q.qpair.state
    if qstate != QP_ENABLED:
        # disconnected (reset, failure): the channel's poll drains it; never submit into it
        # here, where a completion callback may be running the drain
        return _unavailable(b, qstate)
    if (io.num_blocks > MAX_NLB and io.type != BDEV_IO_UNMAP and io.type != BDEV_IO_FLUSH
            and io.type != BDEV_IO_RESET):
        return -EINVAL                  # the bdev layer splits at max_transfer_blocks first
    if io.type == BDEV_IO_READ or io.type == BDEV_IO_WRITE or io.type == BDEV_IO_COMPARE:
        opc = (NVM_READ if io.type == BDEV_IO_READ else
               NVM_WRITE if io.type == BDEV_IO_WRITE else NVM_COMPARE)
        rc = _submit_rw(b, q.qpair, io, opc)
    elif io.type == BDEV_IO_WRITE_ZEROES:
        rc = q.qpair.submit_io(NVM_WRITE_ZEROES, b.nsid, io.offset_blocks,
                               <uint32_t> io.num_blocks, b.block_shift, NULL, 0, 0, _io_done,
                               <void*> io)
    elif io.type == BDEV_IO_UNMAP:
        rc = _submit_dsm(b, q, io)       # (a retry continues where the last command ended)
    elif io.type == BDEV_IO_FLUSH:
        if not b.vwc:
            bdev_io_complete(io, IO_SUCCESS)     # no volatile write cache: nothing to flush
            return 0
        rc = _submit_flush(b, q, io)
    elif io.type == BDEV_IO_RESET:
        # a controller reset takes the admin lock and drains this thread's queue pair: done
        # from a message, outside any submission or completion
        return thread_send((<BdevChannel> io.channel).thread.handle(), _reset_msg, <void*> io)
    else:
        return -EINVAL
    if rc == -ENXIO:
        return _unavailable(b, q.qpair.state)
    return rc


cdef int _submit_flush(NvmeBdev b, _QpairChannel q, bdev_io* io) noexcept nogil:
    cdef nvme_request* req = q.qpair.alloc_request()
    cdef int rc
    if req == NULL:
        return -ENOMEM
    req.cmd.opc = NVM_FLUSH
    req.cmd.nsid = b.nsid
    req.cb_fn = _io_done
    req.cb_arg = <void*> io
    rc = q.qpair.submit_request(req)
    if rc != 0:
        q.qpair.free_request(req)
    return rc


cdef int _submit_dsm(NvmeBdev b, _QpairChannel q, bdev_io* io) noexcept nogil:
    """One Dataset Management - Deallocate command for the next (up to 256) ranges of `io`,
    after the blocks its context says were sent. The rest goes when it completes."""
    cdef nvme_io_ctx* ctx = <nvme_io_ctx*> bdev_io_ctx(io)
    cdef uint64_t next_lba = io.offset_blocks + ctx.dsm_sent
    cdef uint64_t end = io.offset_blocks + io.num_blocks
    cdef uint64_t n
    cdef uint32_t nr = 0
    cdef dsm_range* ranges
    cdef dsm_slot* slot
    cdef nvme_request* req
    cdef int rc
    cdef void* page = q.dsm_pages.get()
    if page == NULL:
        return -ENOMEM
    ranges = <dsm_range*> page
    while next_lba < end and nr < DSM_MAX_RANGES:
        n = end - next_lba
        if n > DSM_RANGE_MAX_BLOCKS:
            n = DSM_RANGE_MAX_BLOCKS
        ranges[nr].attributes = 0
        ranges[nr].length = <uint32_t> n
        ranges[nr].slba = next_lba
        next_lba += n
        nr += 1
    req = q.qpair.alloc_request()
    if req == NULL:
        q.dsm_pages.put(page)
        return -ENOMEM
    slot = &q.slots[q.dsm_pages.index_of(page)]
    slot.io = io
    slot.page = page
    slot.qch = <void*> q
    req.cmd.opc = NVM_DATASET_MANAGEMENT
    req.cmd.nsid = b.nsid
    req.cmd.cdw10 = nr - 1                # 0's based number of ranges
    req.cmd.cdw11 = DSM_AD
    req.buf = <char*> page
    req.len = nr * sizeof(dsm_range)
    req.cb_fn = _dsm_done
    req.cb_arg = <void*> slot
    rc = q.qpair.submit_request(req)
    if rc != 0:
        q.qpair.free_request(req)
        q.dsm_pages.put(page)
        return rc
    ctx.dsm_sent = next_lba - io.offset_blocks
    return 0


cdef void _dsm_done(void* arg, const nvme_cqe* cpl) noexcept nogil:
    cdef dsm_slot* slot = <dsm_slot*> arg
    cdef bdev_io* io = slot.io
    cdef int rc
    (<_QpairChannel> slot.qch).dsm_pages.put(slot.page)
    if ((cpl.status >> 1) & 0x7FF == 0
            and (<nvme_io_ctx*> bdev_io_ctx(io)).dsm_sent < io.num_blocks):
        # more than 256 ranges: the next command (deallocating twice is harmless, so a NOMEM
        # retry of the rest is safe)
        rc = _submit_dsm(<NvmeBdev> io.bdev, <_QpairChannel> slot.qch, io)
        if rc == -ENXIO:
            rc = _unavailable(<NvmeBdev> io.bdev, (<_QpairChannel> slot.qch).qpair.state)
        if rc == 0:
            return
        bdev_io_complete(io, IO_NOMEM if rc == -ENOMEM else IO_FAILED)
        return
    bdev_io_nvme_cpl(io, cpl)


cdef void _reset_msg(void* ctx) noexcept nogil:
    with gil:
        _start_reset(<bdev_io*> ctx)


cdef void _start_reset(bdev_io* io) noexcept:
    cdef _PendingIo p = _PendingIo.__new__(_PendingIo)
    p.io = io
    p.ch = <BdevChannel> io.channel
    try:
        (<NvmeBdev> io.bdev).controller._reset(p)
    except BaseException:
        log.exception("reset of %s failed", (<NvmeBdev> io.bdev).name)
        p.complete(IO_FAILED)


# ---- the module's API ----------------------------------------------------------------------------
_controllers = {}                 # name -> NvmeController
_lock = threading.RLock()
_emulators = weakref.WeakValueDictionary()   # emulator name -> EmulatedController (trtype emulated)


def controllers():
    """The attached controllers (NvmeController), by name."""
    with _lock:
        return [_controllers[n] for n in sorted(_controllers)]


def get_controller(name):
    with _lock:
        try:
            return _controllers[name]
        except KeyError:
            known = ", ".join(sorted(_controllers)) or "none"
            raise BdevNotFound(f"no NVMe controller named {name!r} is attached (attached: "
                               f"{known})", name) from None


def _check_name(name):
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise InvalidArgument(f"a controller name is a non-empty string without spaces, not "
                              f"{name!r}")
    with _lock:
        if name in _controllers:
            raise BdevExists(f"an NVMe controller named {name!r} is already attached", name)


def _parse_trid(trid, trtype, traddr):
    """(trtype, traddr) from a transport ID string, a bare PCI address, or the two fields."""
    from env.pci import PciAddress
    if trid is not None:
        if trtype is not None or traddr is not None:
            raise InvalidArgument("give a transport ID string or trtype/traddr, not both")
        if not isinstance(trid, str):
            raise InvalidArgument(f"a transport ID is a string, not {trid!r}")
        if ":" in trid and "traddr" in trid:
            fields = {}
            for token in trid.split():
                key, sep, value = token.partition(":")
                if not sep or not value:
                    raise InvalidArgument(f"transport ID {trid!r}: {token!r} is not key:value")
                fields[key.lower()] = value
            trtype, traddr = fields.get("trtype"), fields.get("traddr")
        else:
            trtype, traddr = "PCIe", trid
    if not trtype or not traddr:
        raise InvalidArgument("a transport ID needs trtype and traddr (e.g. \"trtype:PCIe "
                              "traddr:0000:00:10.0\")")
    if trtype.lower() == "pcie":
        return "PCIe", str(PciAddress.parse(traddr))
    if trtype.lower() == TRTYPE_EMULATED:
        return TRTYPE_EMULATED, traddr
    raise InvalidArgument(f"transport type {trtype!r} is not supported (PCIe, or "
                          f"{TRTYPE_EMULATED} for an nvme.emu controller)")


def _options(options, io_queue_size, io_queue_requests, num_io_queues):
    import attrs
    from nvme.controller import ControllerOptions
    if options is None:
        opts = ControllerOptions()
    elif isinstance(options, ControllerOptions):
        opts = attrs.evolve(options)
    elif isinstance(options, dict):
        try:
            opts = ControllerOptions(**options)
        except TypeError as e:
            raise InvalidArgument(f"bad controller options: {e}") from None
    else:
        raise InvalidArgument(f"options must be a ControllerOptions or a dict, not {options!r}")
    for key, value in (("io_queue_size", io_queue_size), ("io_queue_requests", io_queue_requests),
                       ("num_io_queues", num_io_queues)):
        if value is not None:
            setattr(opts, key, value)
    if opts.io_queue_size < 2:
        raise InvalidArgument(f"io_queue_size must be at least 2, not {opts.io_queue_size}")
    return opts


def _register(name, ctrlr, trid, admin_poll_period_us, emulator=None):
    """Bdevs for the namespaces of an initialised controller; on failure the controller is
    detached and nothing stays registered."""
    nc = NvmeController(name, ctrlr, trid, emulator=emulator)
    try:
        with _lock:
            if name in _controllers:
                raise BdevExists(f"an NVMe controller named {name!r} is already attached", name)
            _controllers[name] = nc
        nc._create_bdevs()
        nc._start_admin_poller(admin_poll_period_us)
    except BaseException:
        nc._finished = True        # its bdevs' destruct must not detach a second time
        for b in nc.bdevs:
            b.unregister()
        with _lock:
            if _controllers.get(name) is nc:
                del _controllers[name]
        try:
            ctrlr.detach()
        except Exception:
            log.exception("%s: detaching after a failed attach", name)
        raise
    log.info("NVMe controller %s (%s %s, %s) attached: %s", name, trid["trtype"], trid["traddr"],
             ctrlr.data.mn.strip(), ", ".join(b.name for b in nc.bdevs) or "no namespaces")
    return [b.name for b in nc.bdevs]


def attach_controller(name, trid=None, *, options=None, driver="auto", trtype=None,
                      traddr=None, adrfam=None, trsvcid=None, subnqn=None, hostnqn=None,
                      hdgst=None, ddgst=None, ctrlr_loss_timeout_sec=None,
                      reconnect_delay_sec=None, fast_io_fail_timeout_sec=None,
                      fabrics_connect_timeout_us=None, io_queue_size=None,
                      io_queue_requests=None, num_io_queues=None,
                      admin_poll_period_us=ADMIN_POLL_PERIOD_US):
    """Attach the NVMe controller at `trid` ("trtype:PCIe traddr:0000:00:10.0", or a bare PCI
    address, or trtype=/traddr=; for NVMe/TCP "trtype:TCP adrfam:IPv4 traddr:10.0.0.2
    trsvcid:4420 subnqn:nqn..." or trtype="TCP" with traddr, adrfam, trsvcid, subnqn) as `name`
    and register a bdev `<name>n<nsid>` per active namespace; returns their names (SPDK's
    bdev_nvme_attach_controller). `options`: an nvme.controller.ControllerOptions (or
    nvme.fabrics.FabricsOptions) or a dict of its fields; the keyword arguments override them.
    NVMe/TCP takes SPDK's hostnqn, hdgst, ddgst, ctrlr_loss_timeout_sec, reconnect_delay_sec,
    fast_io_fail_timeout_sec and fabrics_connect_timeout_us (see nvme.fabrics). `driver`
    (PCIe): "auto", "vfio" or "uio". The calling thread runs the controller's admin poller
    (Keep Alive and reconnects over TCP): keep polling it. trtype "emulated" names an nvme.emu
    controller attached before with attach_emulated (the JSON config of such a controller)."""
    _check_name(name)
    fabrics = dict(hostnqn=hostnqn, hdgst=hdgst, ddgst=ddgst,
                   ctrlr_loss_timeout_sec=ctrlr_loss_timeout_sec,
                   reconnect_delay_sec=reconnect_delay_sec,
                   fast_io_fail_timeout_sec=fast_io_fail_timeout_sec,
                   fabrics_connect_timeout_us=fabrics_connect_timeout_us)
    if _is_tcp(trid, trtype):
        from nvme.fabrics import FabricsOptions, TransportId
        fields = dict(adrfam=adrfam, trsvcid=trsvcid, subnqn=subnqn)
        if trid is not None:
            if (trtype is not None or traddr is not None
                    or any(v is not None for v in fields.values())):
                raise InvalidArgument("give a transport ID string or its fields (trtype, traddr, "
                                      "adrfam, trsvcid, subnqn), not both")
            tid = TransportId.coerce(trid)
        else:
            tid = TransportId.from_fields(trtype=trtype, traddr=traddr, **fields)
        opts = _options(FabricsOptions.coerce(options), io_queue_size, io_queue_requests,
                        num_io_queues)
        for key, value in fabrics.items():
            if value is not None:
                setattr(opts, key, value)
        import nvme
        ctrlr = nvme.connect(tid, opts, name=name)
        return _register(name, ctrlr, tid.to_dict(), admin_poll_period_us)
    given = sorted(k for k, v in dict(fabrics, adrfam=adrfam, trsvcid=trsvcid,
                                      subnqn=subnqn).items() if v not in (None, False, 0, ""))
    if given:
        raise InvalidArgument(f"{', '.join(given)}: NVMe over Fabrics parameters, and this "
                              "controller is not NVMe/TCP")
    trtype, traddr = _parse_trid(trid, trtype, traddr)
    opts = _options(options, io_queue_size, io_queue_requests, num_io_queues)
    if trtype == TRTYPE_EMULATED:
        emu = _emulators.get(traddr)
        if emu is None:
            raise BdevNotFound(f"no emulated NVMe controller named {traddr!r} (make one with "
                               "nvme.emu.EmulatedController and attach_emulated it first)", name)
        return attach_emulated(name, emu, options=opts,
                               admin_poll_period_us=admin_poll_period_us)
    import nvme
    ctrlr = nvme.attach(traddr, opts, driver=driver, name=name)
    return _register(name, ctrlr, {"trtype": trtype, "traddr": traddr}, admin_poll_period_us)


def _is_tcp(trid, trtype):
    import nvme
    return str(trtype).upper() == "TCP" if trtype is not None else nvme.is_tcp(trid)


def _tcp_params(ctrlr):
    """bdev_nvme_attach_controller's NVMe/TCP parameters of a TcpController, as SPDK saves them."""
    o = ctrlr.options
    return {"adrfam": ctrlr.trid.adrfam, "trsvcid": ctrlr.trid.trsvcid,
            "subnqn": ctrlr.trid.subnqn, "hostnqn": ctrlr.hostnqn, "hdgst": o.hdgst,
            "ddgst": o.ddgst, "ctrlr_loss_timeout_sec": o.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": o.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": o.fast_io_fail_timeout_sec}


def attach_emulated(name, emu, *, options=None, io_queue_size=None, io_queue_requests=None,
                    num_io_queues=None, admin_poll_period_us=ADMIN_POLL_PERIOD_US):
    """attach_controller for an in-process `nvme.emu.EmulatedController` (brought up here), or
    for an initialised `nvme.controller.Controller` (the module owns it from now on and detaches
    it)."""
    from nvme.controller import Controller
    from nvme.emu import EmulatedController
    _check_name(name)
    if isinstance(emu, Controller):
        if options is not None or io_queue_size or io_queue_requests or num_io_queues:
            raise InvalidArgument("a Controller comes with its options")
        ctrlr = emu
        if ctrlr.state != "ready":
            raise InvalidArgument(f"controller {ctrlr.name} is {ctrlr.state}, not ready")
        with _lock:
            for other in _controllers.values():
                if (<NvmeController> other).ctrlr is ctrlr:
                    from nvme.errors import AlreadyAttached
                    raise AlreadyAttached(f"controller {ctrlr.name} is already attached as "
                                          f"{other.name}; detach_controller({other.name!r}) "
                                          "first", name, owner=other.name)
        handle = getattr(ctrlr.transport, "handle", None)
        trid = ({"trtype": "PCIe", "traddr": str(handle.address)} if handle is not None
                else {"trtype": TRTYPE_EMULATED, "traddr": ctrlr.transport.name})
        if getattr(ctrlr, "trid", None) is not None:       # an nvme.fabrics.TcpController
            trid = ctrlr.trid.to_dict()
        return _register(name, ctrlr, trid, admin_poll_period_us)
    if not isinstance(emu, EmulatedController):
        raise InvalidArgument(f"expected an nvme.emu.EmulatedController or an "
                              f"nvme.controller.Controller, not {emu!r}")
    opts = _options(options, io_queue_size, io_queue_requests, num_io_queues)
    ctrlr = Controller(emu.transport, opts, name=name).init()
    _emulators[emu.name] = emu
    return _register(name, ctrlr, {"trtype": TRTYPE_EMULATED, "traddr": emu.name},
                     admin_poll_period_us, emulator=emu)


def detach_controller(name):
    """Unregister the controller's bdevs (open descriptors hear "remove") and detach it once
    they are closed and their channels put (SPDK's bdev_nvme_detach_controller)."""
    get_controller(name).detach()


def config_json():
    """bdev_nvme_attach_controller entries of every attached controller."""
    return [c.config_json() for c in controllers()]
