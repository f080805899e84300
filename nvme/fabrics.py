"""NVMe over Fabrics on TCP: transport IDs, options, and a controller reached over NVMe/TCP.

    import nvme
    c = nvme.connect("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.test")
    qp = c.create_io_qpair()        # its own TCP connection, owned by this thread
    ...
    c.poll_admin()                  # now and then: Keep Alive, events, reconnects
    c.detach()

`TcpController` is the `nvme.controller.Controller` of the NVMe Base Specification's Fabrics
chapter: the admin queue is connected (ICReq/ICResp, Fabrics Connect with CNTLID FFFFh and the
host's and subsystem's NQNs), the controller registers are reached with Property Get/Set (CAP, VS,
CC, CSTS) instead of MMIO, and then comes the same bring-up as on PCIe (enable, Identify, Number of
Queues, AERs, namespaces). I/O queues are created by a Fabrics Connect on a new connection each,
not by Create I/O SQ/CQ. Keep Alive goes out from `poll_admin` every KATO/2.

Losing a connection (any of them, or Keep Alive unanswered) ends the association; SPDK's three
knobs decide what follows:

- the admin queue reconnects at once, then every `reconnect_delay_sec`; the I/O queue pairs
  reconnect on their own threads once it is back, and send again the commands they had out;
- `ctrlr_loss_timeout_sec`: -1 retries forever; 0 tries once; N gives up N seconds after the
  loss: the controller fails and every command completes with ABORTED - SQ DELETION;
- `fast_io_fail_timeout_sec`: 0 lets I/O wait until then; N fails waiting I/O (Host Pathing
  Error) N seconds after the loss while reconnecting goes on.
"""
import logging
import time
import uuid
import weakref

import attrs

from env.errors import InvalidArgument
from nvme.controller import (CAP, CC, CC_EN, CC_IOCQES, CC_IOSQES, CSTS_RDY, MAX_TRANSFER_CAP,
                             PAGE, VS, Controller, ControllerOptions)
from nvme.errors import (CommandError, CommandTimeout, ControllerDetached, ControllerError,
                         TransportError)

log = logging.getLogger("userblk.nvme.fabrics")

NQN_DISCOVERY = "nqn.2014-08.org.nvmexpress.discovery"
DEFAULT_TRSVCID = "4420"
OP_FABRICS, OP_KEEP_ALIVE = 0x7F, 0x18
FCTYPE_PROPERTY_SET, FCTYPE_CONNECT, FCTYPE_PROPERTY_GET = 0x00, 0x01, 0x04

#: this process's host identifier (Connect data HOSTID) and the NQN made from it
HOSTID = uuid.uuid4()


def default_hostnqn():
    return f"nqn.2014-08.org.nvmexpress:uuid:{HOSTID}"


def _check_nqn(what, nqn):
    if not isinstance(nqn, str) or not nqn.isascii() or not 0 < len(nqn.encode()) <= 223:
        raise InvalidArgument(f"{what} must be an NQN of 1 to 223 ASCII characters, not {nqn!r}")
    if any(c.isspace() for c in nqn):
        raise InvalidArgument(f"{what} {nqn!r} contains white space")


@attrs.define
class TransportId:
    """An NVMe over Fabrics transport ID (SPDK's spdk_nvme_transport_id, TCP fields)."""
    traddr: str
    trsvcid: str = DEFAULT_TRSVCID
    adrfam: str = "IPv4"
    subnqn: str = NQN_DISCOVERY
    trtype: str = "TCP"

    KEYS = ("trtype", "adrfam", "traddr", "trsvcid", "subnqn", "hostnqn", "priority",
            "hostaddr", "hostsvcid")

    @classmethod
    def parse(cls, text):
        """From SPDK's string form: "trtype:TCP adrfam:IPv4 traddr:10.0.0.1 trsvcid:4420
        subnqn:nqn...". Keys are case-insensitive; trsvcid defaults to 4420, adrfam to IPv4,
        subnqn to the discovery NQN (as in SPDK)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgument(f"a transport ID is a non-empty string, not {text!r}")
        fields = {}
        for token in text.split():
            key, sep, value = token.partition(":")
            key = key.lower()
            if not sep or not value:
                raise InvalidArgument(f"transport ID {text!r}: {token!r} is not key:value")
            if key not in cls.KEYS:
                raise InvalidArgument(f"transport ID {text!r}: unknown key {key!r} (known: "
                                      f"{', '.join(cls.KEYS)})")
            if key in fields:
                raise InvalidArgument(f"transport ID {text!r}: {key} given twice")
            fields[key] = value
        return cls.from_fields(**fields)

    @classmethod
    def from_fields(cls, trtype="TCP", traddr=None, adrfam=None, trsvcid=None, subnqn=None,
                    hostnqn=None, priority=None, hostaddr=None, hostsvcid=None):
        if str(trtype).upper() != "TCP":
            raise InvalidArgument(f"trtype {trtype!r} is not TCP")
        if not traddr:
            raise InvalidArgument("an NVMe/TCP transport ID needs traddr (the target's address)")
        fam = {"ipv4": "IPv4", "ipv6": "IPv6"}.get(str(adrfam or "IPv4").lower())
        if fam is None:
            raise InvalidArgument(f"adrfam must be IPv4 or IPv6, not {adrfam!r}")
        if hostaddr or hostsvcid:
            raise InvalidArgument("hostaddr/hostsvcid (choosing the local address) are not "
                                  "supported")
        tid = cls(traddr=str(traddr), trsvcid=str(trsvcid or DEFAULT_TRSVCID), adrfam=fam,
                  subnqn=subnqn or NQN_DISCOVERY)
        _check_nqn("subnqn", tid.subnqn)
        from nvme.tcp import sockaddr_of
        sockaddr_of(tid.traddr, tid.trsvcid, tid.adrfam)      # checks address and port
        return tid

    @classmethod
    def coerce(cls, trid):
        if isinstance(trid, cls):
            return trid
        if isinstance(trid, dict):
            return cls.from_fields(**trid)
        return cls.parse(trid)

    def __str__(self):
        return (f"trtype:TCP adrfam:{self.adrfam} traddr:{self.traddr} trsvcid:{self.trsvcid} "
                f"subnqn:{self.subnqn}")

    def to_dict(self):
        return {"trtype": "TCP", "adrfam": self.adrfam, "traddr": self.traddr,
                "trsvcid": self.trsvcid, "subnqn": self.subnqn}


@attrs.define
class FabricsOptions(ControllerOptions):
    """ControllerOptions plus what NVMe/TCP adds (names as SPDK's bdev_nvme_attach_controller
    and spdk_nvme_ctrlr_opts)."""
    # entries per I/O queue: 128 like the kernel's nvme-tcp (the target keeps twice as many
    # command contexts per queue; requests beyond wait in the queue pair's software queue)
    io_queue_size: int = 128
    hostnqn: str | None = None             # default: nqn.2014-08.org.nvmexpress:uuid:<HOSTID>
    hostid: uuid.UUID | None = None        # default: HOSTID (this process)
    hdgst: bool = False                    # ask for header digests
    ddgst: bool = False                    # ask for data digests
    keep_alive_timeout_ms: int = 10000     # KATO; Keep Alive every KATO/2 (0: none)
    ctrlr_loss_timeout_sec: int = 0
    reconnect_delay_sec: int = 0
    fast_io_fail_timeout_sec: int = 0
    fabrics_connect_timeout_us: int = 0    # one connect attempt (socket + ICReq + Connect); 0: 10 s
    sq_flow_control: bool = False          # False: ask the target to disable it (fewer PDUs)

    def check(self):
        """SPDK's rules for the reconnect knobs (bdev_nvme_check_io_error_resiliency_params),
        and the types: InvalidArgument naming the parameter otherwise."""
        for key in ("keep_alive_timeout_ms", "ctrlr_loss_timeout_sec", "reconnect_delay_sec",
                    "fast_io_fail_timeout_sec", "fabrics_connect_timeout_us"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidArgument(f"{key} must be an integer, not {v!r}")
        q = self.io_queue_size
        if isinstance(q, bool) or not isinstance(q, int) or not 2 <= q <= 65536:
            raise InvalidArgument(f"io_queue_size must be an int from 2 to 65536, not {q!r}")
        for key in ("hdgst", "ddgst", "sq_flow_control"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidArgument(f"{key} must be true or false, not {getattr(self, key)!r}")
        loss, delay, fast = (self.ctrlr_loss_timeout_sec, self.reconnect_delay_sec,
                             self.fast_io_fail_timeout_sec)
        if self.keep_alive_timeout_ms < 0 or self.keep_alive_timeout_ms > 0xFFFFFFFF:
            raise InvalidArgument(f"keep_alive_timeout_ms must be 0 to 2^32-1, not "
                                  f"{self.keep_alive_timeout_ms}")
        if self.fabrics_connect_timeout_us < 0:
            raise InvalidArgument("fabrics_connect_timeout_us must not be negative")
        if delay < 0 or fast < 0:
            raise InvalidArgument("reconnect_delay_sec and fast_io_fail_timeout_sec must not be "
                                  "negative")
        if loss < -1:
            raise InvalidArgument(f"ctrlr_loss_timeout_sec can't be less than -1, not {loss}")
        if loss == 0:
            if delay or fast:
                raise InvalidArgument("reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 "
                                      "when ctrlr_loss_timeout_sec is 0")
        else:
            if delay == 0:
                raise InvalidArgument("reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec "
                                      "is not 0")
            if loss > 0 and delay > loss:
                raise InvalidArgument("reconnect_delay_sec can't be more than "
                                      "ctrlr_loss_timeout_sec")
            if fast and fast < delay:
                raise InvalidArgument("reconnect_delay_sec can't be more than "
                                      "fast_io_fail_timeout_sec")
            if fast and loss > 0 and fast > loss:
                raise InvalidArgument("fast_io_fail_timeout_sec can't be more than "
                                      "ctrlr_loss_timeout_sec")
        if self.hostnqn is not None:
            _check_nqn("hostnqn", self.hostnqn)
        if self.hostid is not None and not isinstance(self.hostid, uuid.UUID):
            try:
                self.hostid = uuid.UUID(str(self.hostid))
            except ValueError:
                raise InvalidArgument(f"hostid must be a UUID, not {self.hostid!r}") from None
        return self

    @classmethod
    def coerce(cls, options):
        if options is None:
            return cls()
        if isinstance(options, cls):
            return attrs.evolve(options)
        if isinstance(options, ControllerOptions):
            return cls(**attrs.asdict(options, recurse=False))
        if isinstance(options, dict):
            try:
                return cls(**options)
            except TypeError as e:
                raise InvalidArgument(f"bad controller options: {e}") from None
        raise InvalidArgument(f"options must be FabricsOptions, ControllerOptions or a dict, "
                              f"not {options!r}")

    @property
    def connect_timeout_s(self):
        return self.fabrics_connect_timeout_us / 1e6 if self.fabrics_connect_timeout_us else 10.0


class TcpController(Controller):
    """An NVMe controller reached over NVMe/TCP. `init()` connects and brings it up."""

    def __init__(self, trid, options=None, *, name=None):
        from nvme.tcp import TcpAssociation, TcpTransport, sockaddr_of
        tid = TransportId.coerce(trid)
        opts = FabricsOptions.coerce(options).check()
        self._family, self._sockaddr, self._peer = sockaddr_of(tid.traddr, tid.trsvcid,
                                                               tid.adrfam)
        transport = TcpTransport(name or f"{self._peer}")
        Controller.__init__(self, transport, opts, name=name or f"{self._peer} {tid.subnqn}")
        transport.controller_ref = weakref.ref(self)
        self.trid = tid
        self.discovery = tid.subnqn == NQN_DISCOVERY
        self.hostnqn = opts.hostnqn or default_hostnqn()
        self.hostid = opts.hostid or HOSTID
        self.assoc = TcpAssociation()
        self.cntlid = None
        self.in_capsule = 0               # IOCCSZ * 16 - 64: data an I/O command capsule holds
        self.loss_reason = None
        self.lost_at = None               # monotonic time of the loss being recovered from
        self._next_attempt = 0.0
        self._attempts = 0
        self._ka_outstanding = False
        self._ka_sent = 0.0
        self._last_keep_alive = 0.0

    # ---- connection of the admin queue -----------------------------------------------------------
    def _admin_qpair(self):
        from nvme.tcp import TcpQueuePair
        o = self.options
        aq = TcpQueuePair(self.transport, 0, max(2, min(o.admin_queue_size, 4096)),
                          check_owner=False, max_transfer=MAX_TRANSFER_CAP, cq_batch=0)
        aq.configure(self._family, self._sockaddr, self._peer, subnqn=self.trid.subnqn,
                     hostnqn=self.hostnqn, hostid=self.hostid.bytes, cntlid=0xFFFF,
                     kato_ms=0 if self.discovery else o.keep_alive_timeout_ms, hdgst=o.hdgst,
                     ddgst=o.ddgst, connect_timeout_s=o.connect_timeout_s, assoc=self.assoc,
                     sq_flow_control=o.sq_flow_control)
        return aq

    def init(self):
        """Connect the admin queue and bring the controller up. Returns self."""
        with self.admin_lock:
            if self.admin_qpair is None:
                self.admin_qpair = self._admin_qpair()
            self.admin_qpair.connect()
            self._bring_up()
            self.state = "ready"
        return self

    def _bring_up(self):
        """Over a live admin queue: registers through properties, enable, Identify, queues,
        events, namespaces; then the I/O queue pairs may (re)connect."""
        t = self.transport
        self.cntlid = self.admin_qpair.cntlid
        self.cap = t.read64(CAP)
        self.vs = t.read32(VS)
        if not self.discovery and not (self.cap >> 37) & 1:
            raise ControllerError(f"{self.name}: the controller does not support the NVM "
                                  f"command set (CAP.CSS=0x{(self.cap >> 37) & 0xFF:x})")
        cc = t.read32(CC)
        if cc & CC_EN:
            t.write32(CC, cc & ~CC_EN)
            self._wait_csts(CSTS_RDY, 0, "CSTS.RDY=0", self.timeout_s)
        t.write32(CC, CC_IOSQES | CC_IOCQES | CC_EN)    # NVM command set, 4 KiB pages
        self._wait_csts(CSTS_RDY, CSTS_RDY, "CSTS.RDY=1", self.timeout_s)
        self.data = self.identify_controller()
        mdts = self.data.mdts
        self.max_transfer = MAX_TRANSFER_CAP if mdts == 0 else min(PAGE << mdts, MAX_TRANSFER_CAP)
        self.sgl_supported = True
        self.in_capsule = max(0, self.data.ioccsz * 16 - 64)
        if not self.discovery:
            self._set_num_queues(self.options.num_io_queues)
            taken = set(self.qpairs)
            self._free_qids = [q for q in range(1, self.num_io_queues + 1) if q not in taken]
            self._start_aers()
            self._scan_namespaces()
            for qp in self.qpairs.values():
                qp.set_in_capsule_limit(self.in_capsule)
        self._ka_outstanding = False
        self._last_keep_alive = time.monotonic()
        self.assoc.make_ready(self.cntlid)

    # ---- properties (registers) ------------------------------------------------------------------
    def get_property(self, offset, size=4):
        """Property Get (Fabrics): a controller register's value."""
        cpl = self.admin(OP_FABRICS, nsid=FCTYPE_PROPERTY_GET, cdw10=0 if size == 4 else 1,
                         cdw11=offset)
        value = cpl.cdw0 | (cpl.cdw1 << 32)
        return value & 0xFFFFFFFF if size == 4 else value

    def set_property(self, offset, value, size=4):
        """Property Set (Fabrics)."""
        self.admin(OP_FABRICS, nsid=FCTYPE_PROPERTY_SET, cdw10=0 if size == 4 else 1,
                   cdw11=offset, cdw12=value & 0xFFFFFFFF, cdw13=(value >> 32) & 0xFFFFFFFF)

    # ---- admin commands --------------------------------------------------------------------------
    def admin(self, opc, *, nsid=0, buf=None, length=None, prp=None, cdw10=0, cdw11=0, cdw12=0,
              cdw13=0, cdw14=0, cdw15=0, timeout_s=None, check=True):
        """Run one admin command to completion (see Controller.admin). A lost connection
        completes it with ABORTED - SQ DELETION (CommandError)."""
        self._check_usable()
        if prp is not None:
            raise InvalidArgument("NVMe/TCP commands carry no PRPs")
        done = []
        limit = timeout_s or self.options.admin_timeout_s
        with self.admin_lock:
            aq = self.admin_qpair
            if aq is None or not aq.live:
                why = f": {self.loss_reason}" if self.loss_reason else ""
                raise TransportError(f"{self.name}: the admin queue is not connected "
                                     f"({self.state}{why})", kind="socket")
            aq.submit_raw(opc, nsid=nsid, buf=buf, length=length, cdw10=cdw10, cdw11=cdw11,
                          cdw12=cdw12, cdw13=cdw13, cdw14=cdw14, cdw15=cdw15, cb=done.append)
            deadline = time.monotonic() + limit
            while not done:
                aq.process_completions()
                if done:
                    break
                if time.monotonic() > deadline:
                    self._admin_timed_out(opc)
                    raise CommandTimeout(f"{self.name}: admin command 0x{opc:02x} did not "
                                         f"complete within {limit} s; the association ends and "
                                         "the controller reconnects")
        cpl = done[0]
        if check and not cpl.ok:
            raise CommandError.from_completion(cpl, opcode=opc, admin=True, nsid=nsid,
                                               controller=self.name)
        return cpl

    def _admin_timed_out(self, opc):
        log.error("%s: admin command 0x%02x timed out", self.name, opc)
        self._begin_recovery(f"admin command 0x{opc:02x} timed out")

    # ---- Keep Alive, events, recovery ------------------------------------------------------------
    def poll_admin(self):
        """Reap admin completions, send Keep Alive every KATO/2, notice a lost association and
        reconnect (see the module's description). Call it at least every KATO/2 (the bdev module
        does, every 10 ms)."""
        if self.state in ("detached", "failed"):
            return 0
        n = 0
        with self.admin_lock:
            if self.state == "ready":
                aq = self.admin_qpair
                n = aq.process_completions()
                if not aq.live:
                    self._begin_recovery(aq.error_message or "the admin queue's connection ended")
                elif self.assoc.lost:
                    self._begin_recovery("an I/O queue pair lost its connection")
                else:
                    self._keep_alive()
                    self._check_aborts()
                    if self._reset_pending:
                        self._reset_pending = False
                        self._begin_recovery("a command did not complete after Abort")
            if self.state == "reconnecting":
                self._recover_step()
        return n

    def _keep_alive(self):
        kato = self.options.keep_alive_timeout_ms
        if not kato or self.discovery:
            return
        now = time.monotonic()
        if self._ka_outstanding:
            if now - self._ka_sent > kato / 1000:
                self._begin_recovery(f"Keep Alive not answered within KATO ({kato} ms)")
            return
        if now - self._last_keep_alive >= kato / 2000:
            self.admin_qpair.submit_raw(OP_KEEP_ALIVE, cb=self._keep_alive_done)
            self._ka_outstanding = True
            self._ka_sent = now

    def _keep_alive_done(self, cpl):
        self._ka_outstanding = False
        self._last_keep_alive = time.monotonic()
        if not cpl.ok and self.state == "ready":
            log.warning("%s: Keep Alive failed: %s", self.name, cpl.status)

    def _begin_recovery(self, reason):
        """The association is gone: every queue pair drops its connection (I/O keeps its
        commands), the admin queue reconnects (now, then every reconnect_delay_sec)."""
        if self.state in ("reconnecting", "failed", "detached"):
            return
        log.warning("%s: %s; reconnecting (ctrlr_loss_timeout_sec=%s, reconnect_delay_sec=%s, "
                    "fast_io_fail_timeout_sec=%s)", self.name, reason,
                    self.options.ctrlr_loss_timeout_sec, self.options.reconnect_delay_sec,
                    self.options.fast_io_fail_timeout_sec)
        self.loss_reason = reason
        self.state = "reconnecting"
        self.lost_at = time.monotonic()
        self._next_attempt = self.lost_at
        self._attempts = 0
        self._ka_outstanding = False
        self._aborts.clear()
        self.assoc.teardown()
        self.admin_qpair.close(f"the association ended ({reason})")

    def _recover_step(self):
        o = self.options
        now = time.monotonic()
        elapsed = now - self.lost_at
        aq = self.admin_qpair
        if o.ctrlr_loss_timeout_sec > 0 and elapsed >= o.ctrlr_loss_timeout_sec:
            self.fail(f"not reconnected within ctrlr_loss_timeout_sec={o.ctrlr_loss_timeout_sec} "
                      f"(lost: {self.loss_reason}; last attempt: "
                      f"{aq.error_message or 'none'})")
            return
        if (o.fast_io_fail_timeout_sec and elapsed >= o.fast_io_fail_timeout_sec
                and not self.assoc.fail_io):
            log.warning("%s: fast_io_fail_timeout_sec=%d passed: I/O fails until the controller "
                        "is back", self.name, o.fast_io_fail_timeout_sec)
            self.assoc.fail_io = True
        state = aq.connection
        if state == "down":
            if self._attempts and o.ctrlr_loss_timeout_sec == 0:
                self.fail(f"reconnecting failed ({aq.error_message}); ctrlr_loss_timeout_sec=0 "
                          f"allows one attempt (lost: {self.loss_reason})")
                return
            if now < self._next_attempt:
                return
            self._attempts += 1
            self._next_attempt = now + max(o.reconnect_delay_sec, 0)
            aq.start_connect()
            state = aq.connection
        if state not in ("live", "down"):
            aq.process_completions()
            state = aq.connection
        if state == "live":
            try:
                self._bring_up()
            except Exception as e:
                log.warning("%s: reconnected, but bringing the controller up failed: %s",
                            self.name, e)
                if aq.live:
                    aq.close(f"bring-up failed: {e}")
                self.assoc.teardown()
                return
            self.state = "ready"
            self.reset_count += 1
            log.warning("%s: reconnected after %.1f s (attempt %d, CNTLID %d)", self.name,
                        time.monotonic() - self.lost_at, self._attempts, self.cntlid)
            self.lost_at = None
            self.loss_reason = None
        elif state == "down" and self._attempts:
            log.info("%s: reconnect attempt %d failed: %s", self.name, self._attempts,
                     aq.error_message)

    def reset(self):
        """End the association and reconnect now (the bdev layer's reset, a timeout's last
        resort). I/O commands in flight are sent again on the new connections."""
        with self.admin_lock:
            if self.state in ("detached", "failed"):
                raise ControllerDetached(f"{self.name} is {self.state}")
            if self.state == "ready":
                self._begin_recovery("reset requested")
            limit = max(self.options.connect_timeout_s * 2,
                        self.options.ctrlr_loss_timeout_sec + 1.0)
            deadline = time.monotonic() + limit
            while self.state == "reconnecting" and time.monotonic() < deadline:
                self._recover_step()
                if self.state == "reconnecting":
                    time.sleep(0.0005)
            if self.state != "ready":
                if self.state == "reconnecting":
                    self.fail(f"reset: not reconnected within {limit:.0f} s")
                raise ControllerError(f"{self.name}: reset failed: "
                                      f"{self.loss_reason or self.state}")
            return True

    def fail(self, reason):
        self.assoc.kill()
        Controller.fail(self, reason)

    # ---- I/O queue pairs -------------------------------------------------------------------------
    def create_io_qpair(self, size=None, *, requests=None, sgl=None):
        """A new I/O queue pair owned by the calling thread, on its own TCP connection."""
        from nvme.tcp import TcpQueuePair
        self._check_usable()
        if self.discovery:
            raise InvalidArgument(f"{self.name} is a discovery controller: it has no I/O queues")
        o = self.options
        size = min(size or o.io_queue_size, self.mqes, 65536)
        if size < 2:
            raise InvalidArgument(f"queue size must be at least 2, not {size}")
        with self.admin_lock:
            if not self._free_qids:
                raise ControllerError(f"{self.name}: all {self.num_io_queues} I/O queues are in "
                                      "use")
            # oldest free first: the target may still be tearing down a queue id just freed
            qid = self._free_qids.pop(0)
        try:
            qp = TcpQueuePair(self.transport, qid, size, nrequests=requests or o.io_queue_requests,
                              max_transfer=self.max_transfer, cq_batch=0)
            qp.configure(self._family, self._sockaddr, self._peer, subnqn=self.trid.subnqn,
                         hostnqn=self.hostnqn, hostid=self.hostid.bytes, cntlid=self.cntlid,
                         hdgst=o.hdgst, ddgst=o.ddgst, connect_timeout_s=o.connect_timeout_s,
                         in_capsule=self.in_capsule, assoc=self.assoc, requeue_on_loss=True,
                         auto_reconnect=True, sq_flow_control=o.sq_flow_control)
            qp.set_controller(weakref.ref(self))
            if o.io_timeout_s:
                qp.set_timeout(o.io_timeout_s * 1e6, self._io_timed_out)
            if self.state == "ready" and self.assoc.ready:
                self._connect_io(qp)
            else:
                qp.arm()                 # connects on its owner's poll once the controller is back
        except BaseException:
            with self.admin_lock:
                self._free_qids.append(qid)
            raise
        with self.admin_lock:
            self.qpairs[qid] = qp
        return qp

    def _connect_io(self, qp):
        for attempt in range(40):
            try:
                qp.connect()
                return
            except TransportError as e:
                # a queue id the target is still tearing down is refused for a moment
                if e.kind != "rejected" or attempt == 39:
                    raise TransportError(f"{self.name}: I/O queue {qp.qid}: {e}",
                                         kind=e.kind) from None
                time.sleep(0.05)

    def delete_io_qpair(self, qp):
        """Close the queue pair's connection; commands in flight complete with ABORTED - SQ
        DELETION. Call it from the queue pair's thread."""
        with self.admin_lock:
            if self.qpairs.get(qp.qid) is not qp:
                raise InvalidArgument(f"{qp!r} is not a queue pair of {self.name}")
            del self.qpairs[qp.qid]
            self._free_qids.append(qp.qid)
        qp.set_disconnect_handler(None)
        qp.destroy()

    # ---- detach ----------------------------------------------------------------------------------
    def detach(self, *, shutdown=True, restore_driver=True):
        """Close every I/O queue pair (commands in flight complete with ABORTED - SQ DELETION),
        shut the controller down (CC.SHN through Property Set) and close the admin queue."""
        if self.state == "detached":
            return
        with self.admin_lock:
            self.assoc.kill()
            for qp in list(self.qpairs.values()):
                qp.set_disconnect_handler(None)
                qp.destroy()
            self.qpairs.clear()
            aq = self.admin_qpair
            if shutdown and aq is not None and aq.live and self.state == "ready":
                try:
                    self._shutdown()
                except Exception as e:
                    log.warning("%s: shutdown: %s", self.name, e)
            if aq is not None:
                aq.destroy()
            self.state = "detached"
            for ns in self.namespaces.values():
                ns._detached = True

    def __repr__(self):
        model = self.data.mn.strip() if self.data is not None else "?"
        return (f"<TcpController {self.name} {self.trid.subnqn} cntlid={self.cntlid} {model!r} "
                f"{self.state} namespaces={sorted(self.namespaces)}>")


def connect(trid, options=None, *, name=None):
    """Connect to the NVMe/TCP controller at `trid` (a TransportId, its string form or a dict)
    and bring it up."""
    c = TcpController(trid, options, name=name)
    try:
        return c.init()
    except BaseException:
        try:
            c.detach(shutdown=False)
        except Exception:
            log.exception("%s: cleaning up after a failed connect", c.name)
        raise
