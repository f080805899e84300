"""Admin commands of the emulated controller (Base 5), as a mixin of EmulatedController.

Each handler takes (sq, cmd), returns the completion's CDW0 (or DEFERRED when the command
completes later), and raises CommandFailed for an error status. Validation follows the spec's
order and codes: the things a driver gets wrong (queue identifiers and sizes, feature values,
log page offsets, NSIDs) fail with the status a real controller gives, and DNR set.
"""

import struct

from nvme import spec
from nvme.emu.dptr import prp_segments, scatter, gather
from nvme.emu.errors import CommandFailed
from nvme.emu.faults import Pending
from nvme.emu.queues import CompletionQueue, SubmissionQueue
from nvme.identify import ActiveNamespaceList
from nvme.logpages import ErrorInformationLog, FirmwareSlotLog, SmartLog
from nvme.spec import AdminOpcode, Cns, FeatureId, FeatureSelect, LogPageId
from nvme.status import CommandSpecific, Generic, NvmeStatus

NSID_ALL = spec.NSID_BROADCAST
DEFERRED = object()          # a handler's answer when the command completes later (AER)

# Get Features SEL 011b (Base 5.15, figure "Get Features - Capabilities"): bit 0 saveable, bit 1
# namespace specific, bit 2 changeable.
CAP_CHANGEABLE = 1 << 2
CAP_NS_SPECIFIC = 1 << 1


class AdminCommands:
    """The admin command set. Uses the controller's state (queues, features, namespaces...)."""

    def _build_admin_handlers(self):
        h = {
            AdminOpcode.DELETE_IO_SQ: self._delete_io_sq,
            AdminOpcode.CREATE_IO_SQ: self._create_io_sq,
            AdminOpcode.GET_LOG_PAGE: self._get_log_page,
            AdminOpcode.DELETE_IO_CQ: self._delete_io_cq,
            AdminOpcode.CREATE_IO_CQ: self._create_io_cq,
            AdminOpcode.IDENTIFY: self._identify,
            AdminOpcode.ABORT: self._abort,
            AdminOpcode.SET_FEATURES: self._set_features,
            AdminOpcode.GET_FEATURES: self._get_features,
            AdminOpcode.ASYNC_EVENT_REQUEST: self._async_event_request,
            AdminOpcode.KEEP_ALIVE: self._keep_alive,
        }
        if self.identify_data.dbbuf_supported:
            h[AdminOpcode.DOORBELL_BUFFER_CONFIG] = self._doorbell_buffer_config
        return {int(k): v for k, v in h.items()}

    # ---- data transfer for admin commands: PRPs only on PCIe (Base 4.1.2) ----------------------
    def _admin_segments(self, cmd, length):
        if cmd.psdt:
            raise CommandFailed(Generic.INVALID_FIELD,
                                why="SGLs are not allowed for admin commands over PCIe")
        return prp_segments(self.mem, cmd.prp1, cmd.prp2, length, self.page_size)

    def _to_host(self, cmd, data):
        scatter(self.mem, self._admin_segments(cmd, len(data)), data)

    def _from_host(self, cmd, length):
        return gather(self.mem, self._admin_segments(cmd, length))

    # ---- Identify (Base 5.17) ------------------------------------------------------------------
    def _identify(self, sq, cmd):
        cns = cmd.cdw10 & 0xFF
        nsid = cmd.nsid
        if cns == Cns.NAMESPACE:
            if nsid == NSID_ALL:
                # capabilities common to all namespaces: only with Namespace Management
                raise CommandFailed(Generic.INVALID_NAMESPACE_OR_FORMAT)
            self._check_nsid_in_range(nsid)
            ns = self.namespaces.get(nsid)
            # an inactive NSID in range returns a zero-filled structure (Base 5.17.2.1)
            data = ns.identify().pack() if ns is not None else bytes(spec.IDENTIFY_DATA_SIZE)
        elif cns == Cns.CONTROLLER:
            data = self._identify_page
        elif cns == Cns.ACTIVE_NAMESPACE_LIST:
            if nsid >= 0xFFFFFFFE:
                raise CommandFailed(Generic.INVALID_NAMESPACE_OR_FORMAT)
            ids = sorted(n for n in self.namespaces if n > nsid)[:ActiveNamespaceList.MAX]
            data = ActiveNamespaceList(ids).pack()
        elif cns == Cns.NAMESPACE_ID_DESCRIPTORS:
            ns = self.namespaces.get(nsid)
            if ns is None:
                raise CommandFailed(Generic.INVALID_NAMESPACE_OR_FORMAT)
            data = ns.descriptors().pack()
        else:
            raise CommandFailed(Generic.INVALID_FIELD, why=f"CNS {cns:02x}h not supported")
        self._to_host(cmd, data)
        return 0

    def _check_nsid_in_range(self, nsid):
        if nsid == 0 or nsid > self.nn:
            raise CommandFailed(Generic.INVALID_NAMESPACE_OR_FORMAT,
                                why=f"NSID {nsid} is outside 1..{self.nn}")

    # ---- queues (Base 5.4-5.7: Create/Delete I/O Completion/Submission Queue) --------------------
    def _queue_size(self, cmd):
        size = (cmd.cdw10 >> 16) + 1           # QSIZE is 0's based
        mqes = spec.Cap.decode(self.cap).mqes
        if size < 2 or size > mqes:
            raise CommandFailed(CommandSpecific.INVALID_QUEUE_SIZE,
                                why=f"{size} entries (CAP.MQES allows 2..{mqes})")
        return size

    def _queue_base(self, cmd):
        if not cmd.cdw11 & 1:                   # PC: physically contiguous; CAP.CQR requires it
            raise CommandFailed(Generic.INVALID_FIELD,
                                why="non-contiguous queues are not supported (CAP.CQR=1)")
        if cmd.prp1 == 0:
            raise CommandFailed(Generic.INVALID_FIELD, why="queue base address 0")
        if cmd.prp1 & (self.page_size - 1):
            raise CommandFailed(Generic.PRP_OFFSET_INVALID,
                                why="queue base address not page aligned")
        return cmd.prp1

    def _create_io_cq(self, sq, cmd):
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid > self.ncqa or qid in self.cqs:
            raise CommandFailed(CommandSpecific.INVALID_QUEUE_IDENTIFIER,
                                why=f"CQ {qid} (granted 1..{self.ncqa})")
        size = self._queue_size(cmd)
        base = self._queue_base(cmd)
        iv = cmd.cdw11 >> 16
        if iv >= self.interrupt_vectors:
            raise CommandFailed(CommandSpecific.INVALID_INTERRUPT_VECTOR)
        self.cqs[qid] = CompletionQueue(qid, base, size, ien=bool(cmd.cdw11 & 2), iv=iv)
        self.io_queues_created = True
        return 0

    def _create_io_sq(self, sq, cmd):
        qid = cmd.cdw10 & 0xFFFF
        if qid == 0 or qid > self.nsqa or qid in self.sqs:
            raise CommandFailed(CommandSpecific.INVALID_QUEUE_IDENTIFIER,
                                why=f"SQ {qid} (granted 1..{self.nsqa})")
        size = self._queue_size(cmd)
        base = self._queue_base(cmd)
        cqid = cmd.cdw11 >> 16
        cq = self.cqs.get(cqid)
        if cqid == 0 or cq is None:
            raise CommandFailed(CommandSpecific.COMPLETION_QUEUE_INVALID, why=f"CQ {cqid}")
        self.sqs[qid] = SubmissionQueue(qid, base, size, cqid, prio=cmd.cdw11 >> 1 & 3)
        cq.sqids.add(qid)
        self.io_queues_created = True
        return 0

    def _delete_io_sq(self, sq, cmd):
        qid = cmd.cdw10 & 0xFFFF
        victim = self.sqs.get(qid)
        if qid == 0 or victim is None:
            raise CommandFailed(CommandSpecific.INVALID_QUEUE_IDENTIFIER, why=f"SQ {qid}")
        # Commands still in the controller complete with Command Aborted due to SQ Deletion
        # before the deletion completes (Base 5.7).
        for pending in [p for p in self.held + self.delayed if p.sq is victim]:
            if pending in self.held:
                self.held.remove(pending)
            else:
                self.delayed.remove(pending)
            self._complete(victim, pending.cmd, _status(Generic.ABORTED_SQ_DELETION))
        del self.sqs[qid]
        cq = self.cqs.get(victim.cqid)
        if cq is not None:
            cq.sqids.discard(qid)
        return 0

    def _delete_io_cq(self, sq, cmd):
        qid = cmd.cdw10 & 0xFFFF
        cq = self.cqs.get(qid)
        if qid == 0 or cq is None:
            raise CommandFailed(CommandSpecific.INVALID_QUEUE_IDENTIFIER, why=f"CQ {qid}")
        if cq.sqids:
            raise CommandFailed(CommandSpecific.INVALID_QUEUE_DELETION,
                                why=f"SQ(s) {sorted(cq.sqids)} still complete to CQ {qid}")
        del self.cqs[qid]
        return 0

    # ---- Abort (Base 5.1) ------------------------------------------------------------------------
    def _abort(self, sq, cmd):
        sqid, cid = cmd.cdw10 & 0xFFFF, cmd.cdw10 >> 16
        for pool in (self.held, self.delayed, self.aers):
            for pending in pool:
                if pending.sq.qid == sqid and pending.cmd.cid == cid:
                    pool.remove(pending)
                    self.counters["aborted"] += 1
                    self._complete(pending.sq, pending.cmd, _status(Generic.ABORTED_BY_REQUEST))
                    return 0               # CDW0 bit 0 cleared: the command was aborted
        return 1                           # bit 0 set: not aborted (completed or unknown)

    # ---- Asynchronous Event Request (Base 5.2) --------------------------------------------------
    def _async_event_request(self, sq, cmd):
        if len(self.aers) >= self.identify_data.aerl + 1:
            raise CommandFailed(CommandSpecific.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
        self.aers.append(Pending(sq, cmd))
        self._deliver_events()
        return DEFERRED

    def _keep_alive(self, sq, cmd):
        self.counters["keep_alive"] += 1
        return 0

    # ---- Doorbell Buffer Config (Base 5.11) -----------------------------------------------------
    def _doorbell_buffer_config(self, sq, cmd):
        shadow, eventidx = cmd.prp1, cmd.prp2
        mask = self.page_size - 1
        if not shadow or not eventidx or shadow & mask or eventidx & mask:
            raise CommandFailed(Generic.INVALID_FIELD,
                                why="shadow doorbell and EventIdx buffers must be page aligned")
        self.mem.check(shadow, self.page_size)
        self.mem.check(eventidx, self.page_size, write=True)
        self.dbbuf = (shadow, eventidx)
        # Bring both buffers in step with the queues that already exist (as QEMU does).
        for q in list(self.sqs.values()):
            self.mem.write_u32(shadow + self._db_offset(q.qid, False), q.tail)
            self.mem.write_u32(eventidx + self._db_offset(q.qid, False), q.tail)
        for q in list(self.cqs.values()):
            self.mem.write_u32(shadow + self._db_offset(q.qid, True), q.head)
            self.mem.write_u32(eventidx + self._db_offset(q.qid, True), q.head)
        self.counters["dbbuf_config"] += 1
        return 0

    # ---- Get Log Page (Base 5.16) ----------------------------------------------------------------
    def _log_page_data(self, lid, nsid):
        if lid == LogPageId.ERROR_INFORMATION:
            return ErrorInformationLog(list(self.error_log)).pack(
                entries=self.identify_data.elpe + 1)
        if lid == LogPageId.SMART_HEALTH:
            if nsid not in (0, NSID_ALL):
                # per-namespace SMART data is not supported (Identify LPA bit 0 clear)
                raise CommandFailed(Generic.INVALID_FIELD, why="SMART log per namespace")
            return self.smart_log().pack()
        if lid == LogPageId.FIRMWARE_SLOT:
            return FirmwareSlotLog(afi=1, frs=[self.firmware] + [""] * 6).pack()
        if lid == LogPageId.CHANGED_NAMESPACE_LIST:
            # up to 1024 NSIDs; more than that is reported as FFFFFFFFh alone (Base 5.16.1.5)
            changed = sorted(self.changed_namespaces)
            raw = [0xFFFFFFFF] if len(changed) > 1024 else changed
            return struct.pack(f"<{len(raw)}I", *raw).ljust(4096, b"\0")
        raise CommandFailed(CommandSpecific.INVALID_LOG_PAGE, why=f"log page {lid:02x}h")

    def smart_log(self):
        """The SMART / Health Information log as the controller reports it now."""
        return SmartLog(
            critical_warning=self.critical_warning, temperature=self.temperature,
            avail_spare=100, spare_thresh=10, percent_used=0,
            data_units_read=SmartLog.bytes_to_data_units(self.bytes_read),
            data_units_written=SmartLog.bytes_to_data_units(self.bytes_written),
            host_read_commands=self.host_read_commands,
            host_write_commands=self.host_write_commands, power_cycles=self.power_cycles,
            unsafe_shutdowns=self.unsafe_shutdowns, media_errors=self.media_errors,
            num_err_log_entries=self.error_count)

    def _get_log_page(self, sq, cmd):
        lid = cmd.cdw10 & 0xFF
        rae = cmd.cdw10 >> 15 & 1
        ndw = ((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1     # NUMDU:NUMDL, 0's based
        offset = cmd.cdw13 << 32 | cmd.cdw12                          # LPOU:LPOL, bytes
        if offset & 3:
            raise CommandFailed(Generic.INVALID_FIELD, why="log page offset not dword aligned")
        length = 4 * ndw
        self._check_mdts(length)
        data = self._log_page_data(lid, cmd.nsid)
        if offset >= len(data):
            raise CommandFailed(Generic.INVALID_FIELD,
                                why=f"offset {offset} beyond the {len(data)}-byte log")
        self._to_host(cmd, data[offset:offset + length].ljust(length, b"\0"))
        if not rae:
            if lid == LogPageId.CHANGED_NAMESPACE_LIST:
                self.changed_namespaces.clear()      # reading it clears it (RAE clear)
            self._log_page_read(lid)
        return 0

    def _check_mdts(self, length):
        limit = self.identify_data.max_transfer_bytes()
        if limit is not None and length > limit:
            raise CommandFailed(Generic.INVALID_FIELD,
                                why=f"{length}-byte transfer exceeds MDTS ({limit} bytes)")

    # ---- Get / Set Features (Base 5.15, 5.27) ----------------------------------------------------
    def _default_features(self):
        return {
            FeatureId.ARBITRATION: 0,
            FeatureId.POWER_MANAGEMENT: 0,
            # (TMPSEL, THSEL) -> threshold in kelvins; over-temperature of the composite by
            # default at WCTEMP (Base 5.27.1.4)
            FeatureId.TEMPERATURE_THRESHOLD: {(0, 0): self.identify_data.wctemp},
            FeatureId.ERROR_RECOVERY: {},
            FeatureId.VOLATILE_WRITE_CACHE: 1 if self.identify_data.volatile_write_cache else 0,
            FeatureId.INTERRUPT_COALESCING: 0,
            FeatureId.INTERRUPT_VECTOR_CONFIGURATION: {},
            FeatureId.WRITE_ATOMICITY_NORMAL: 0,
            FeatureId.ASYNC_EVENT_CONFIGURATION: 0,
            FeatureId.KEEP_ALIVE_TIMER: 0,
            FeatureId.SOFTWARE_PROGRESS_MARKER: 0,
            FeatureId.HOST_IDENTIFIER: bytes(8),
            "number_of_queues_set": False,
        }

    def _feature_fid(self, cmd):
        fid = cmd.cdw10 & 0xFF
        known = (FeatureId.ARBITRATION, FeatureId.POWER_MANAGEMENT,
                 FeatureId.TEMPERATURE_THRESHOLD, FeatureId.ERROR_RECOVERY,
                 FeatureId.VOLATILE_WRITE_CACHE, FeatureId.NUMBER_OF_QUEUES,
                 FeatureId.INTERRUPT_COALESCING, FeatureId.INTERRUPT_VECTOR_CONFIGURATION,
                 FeatureId.WRITE_ATOMICITY_NORMAL, FeatureId.ASYNC_EVENT_CONFIGURATION,
                 FeatureId.KEEP_ALIVE_TIMER, FeatureId.SOFTWARE_PROGRESS_MARKER,
                 FeatureId.HOST_IDENTIFIER)
        if fid not in known:
            raise CommandFailed(Generic.INVALID_FIELD, why=f"feature {fid:02x}h not supported")
        return FeatureId(fid)

    def _number_of_queues_cdw0(self):
        return (self.ncqa - 1) << 16 | (self.nsqa - 1)

    def _set_features(self, sq, cmd):
        fid = self._feature_fid(cmd)
        if cmd.cdw10 >> 31:                       # SV: save across power cycles
            if not self.identify_data.supports_save_features:
                raise CommandFailed(Generic.INVALID_FIELD, why="SV set; saving not supported")
            raise CommandFailed(CommandSpecific.FEATURE_IDENTIFIER_NOT_SAVEABLE)
        v = cmd.cdw11
        f = self.features
        if fid == FeatureId.NUMBER_OF_QUEUES:
            nsqr, ncqr = v & 0xFFFF, v >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                raise CommandFailed(Generic.INVALID_FIELD, why="65536 queues requested")
            if self.io_queues_created:
                raise CommandFailed(Generic.COMMAND_SEQUENCE_ERROR,
                                    why="Number of Queues after I/O queues were created")
            self.nsqa = min(nsqr + 1, self.max_ioqpairs)
            self.ncqa = min(ncqr + 1, self.max_ioqpairs)
            f["number_of_queues_set"] = True
            return self._number_of_queues_cdw0()
        if fid == FeatureId.POWER_MANAGEMENT:
            if v & 0x1F > self.identify_data.npss:
                raise CommandFailed(Generic.INVALID_FIELD, why=f"power state {v & 0x1F}")
            f[fid] = v & 0xFF
        elif fid == FeatureId.TEMPERATURE_THRESHOLD:
            tmpsel, thsel = v >> 16 & 0xF, v >> 20 & 3
            if thsel > 1 or tmpsel not in (0, 0xF):
                raise CommandFailed(Generic.INVALID_FIELD, why="THSEL/TMPSEL")
            f[fid][(0, thsel)] = v & 0xFFFF
            self.set_temperature(self.temperature)       # re-evaluate the warning
        elif fid == FeatureId.ERROR_RECOVERY:
            if v & 1 << 16:                              # DULBE needs NSFEAT bit 2
                raise CommandFailed(Generic.INVALID_FIELD, why="DULBE not supported")
            f[fid][cmd.nsid] = v & 0xFFFF
        elif fid == FeatureId.VOLATILE_WRITE_CACHE:
            if not self.identify_data.volatile_write_cache:
                raise CommandFailed(Generic.INVALID_FIELD, why="no volatile write cache")
            f[fid] = v & 1
        elif fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
            if v & 0xFFFF >= self.interrupt_vectors:
                raise CommandFailed(Generic.INVALID_FIELD, why=f"interrupt vector {v & 0xFFFF}")
            f[fid][v & 0xFFFF] = v & 0x1FFFF
        elif fid == FeatureId.HOST_IDENTIFIER:
            size = 16 if v & 1 else 8                    # EXHID: 128-bit host identifier
            f[fid] = self._from_host(cmd, size)
        elif fid == FeatureId.KEEP_ALIVE_TIMER:
            f[fid] = v
        else:
            f[fid] = v
        return 0

    def _get_features(self, sq, cmd):
        fid = self._feature_fid(cmd)
        sel = cmd.cdw10 >> 8 & 7
        if sel > FeatureSelect.SUPPORTED_CAPABILITIES:
            raise CommandFailed(Generic.INVALID_FIELD, why=f"SEL {sel}")
        if sel == FeatureSelect.SUPPORTED_CAPABILITIES:
            caps = CAP_CHANGEABLE
            if fid == FeatureId.ERROR_RECOVERY:
                caps |= CAP_NS_SPECIFIC
            return caps
        # nothing is saveable, so "saved" reads as the default (Base 5.15.1)
        f = self.features if sel == FeatureSelect.CURRENT else self._default_features()
        if fid == FeatureId.NUMBER_OF_QUEUES:
            if sel == FeatureSelect.CURRENT:
                return self._number_of_queues_cdw0()
            return (self.max_ioqpairs - 1) << 16 | (self.max_ioqpairs - 1)
        if fid == FeatureId.TEMPERATURE_THRESHOLD:
            thsel = cmd.cdw11 >> 20 & 3
            if thsel > 1:
                raise CommandFailed(Generic.INVALID_FIELD, why="THSEL")
            return f[fid].get((0, thsel), 0)
        if fid == FeatureId.ERROR_RECOVERY:
            return f[fid].get(cmd.nsid, 0)
        if fid == FeatureId.INTERRUPT_VECTOR_CONFIGURATION:
            iv = cmd.cdw11 & 0xFFFF
            return f[fid].get(iv, iv)
        if fid == FeatureId.HOST_IDENTIFIER:
            data = f[fid]
            self._to_host(cmd, data)
            return 0
        return f[fid]


def _status(code):
    return NvmeStatus.of(code)
