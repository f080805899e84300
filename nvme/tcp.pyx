# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""NVMe/TCP: NVMe commands over a TCP connection (NVM Express TCP Transport Specification 1.0),
the polled way.

A `TcpQueuePair` is a `nvme.qpair.QueuePair` whose commands travel as PDUs on one non-blocking
socket instead of through a submission ring: the same requests, trackers (one per CID), software
queue, splitting at the maximum transfer, timeouts and exactly-once completion, and the same
C-level interface (`submit_io`, `submit_iov`, `submit_request`, `process_completions_c`), so the
bdev layer and the perf engine drive it like a PCIe queue pair. What differs is overridden here:

- `start` builds a CapsuleCmd PDU (a copy of the command, an SGL descriptor for the data: in the
  capsule when the controller takes it, else a Transport SGL Data Block the controller asks for
  with R2T) and puts it on the send queue; `ring_sq` flushes the send queue with one `sendmsg`
  over every queued PDU, header and data, straight from the caller's buffers.
- `process_completions_c` flushes what is queued and reads PDUs: CapsuleResp completes a command;
  C2HData is read with `readv` straight into the caller's buffers (the next PDU's header comes in
  the same call, into a small header buffer); R2T queues H2CData PDUs (at most MAXH2CDATA each).
- Digests (CRC32C, env.crc32c) over headers and data when negotiated in ICReq/ICResp.

Everything the target sends is checked before it is used (type, lengths, offsets, command ids,
digests): a target that sends garbage gets an H2CTermReq and the connection is closed with a
message that says what was wrong (`error`); nothing is written outside the command's buffer.

Connection: `configure` then `connect` (or `start_connect` and poll). The socket connect, the
ICReq/ICResp exchange and the Fabrics Connect command are a state machine run from the owner's
poll, without blocking. A queue pair of a controller (`nvme.fabrics.TcpController`) shares a
`TcpAssociation` with it: when the association ends (a lost connection anywhere, a reset), I/O
queue pairs close their sockets, keep their commands (they go back to the software queue, in
order) and connect again on their own thread once the admin queue is back; if the controller
says fast_io_fail has passed, what waits fails with Host Pathing Error; if the controller fails,
it disconnects them and everything completes with ABORTED - SQ DELETION.
"""
import logging
import socket

from cpython.ref cimport PyObject
from libc.errno cimport E2BIG, EAGAIN, EINPROGRESS, EINTR, EINVAL, ENOMEM, ENXIO, EPERM, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset, strerror, strncpy
from posix.uio cimport iovec, readv
from posix.unistd cimport close

from env.crc32c cimport crc32c_update
from env.mmio cimport rmb, wmb
from env.ticks cimport now_ns
from nvme.qpair cimport (QP_DESTROYED, QP_DISCONNECTED, QP_DISCONNECTING, QP_ENABLED, QueuePair,
                         nvme_cb, nvme_request, nvme_tracker)
from nvme.spec cimport (PSDT_SGL_MPTR_CONTIG, SC_ABORTED_SQ_DELETION, SCT_GENERIC, SCT_PATH,
                        nvme_cqe, nvme_sqe)
from nvme.transport cimport Transport

from env.errors import InvalidArgument

log = logging.getLogger("userblk.nvme.tcp")


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        pass
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    int c_socket "socket"(int domain, int type, int protocol)
    int c_connect "connect"(int fd, const sockaddr* addr, socklen_t len)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void* val, socklen_t len)
    int getsockopt(int fd, int level, int name, void* val, socklen_t* len)
    enum:
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        MSG_DONTWAIT
        SOL_SOCKET
        SO_ERROR

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLOUT

cdef enum:
    RX_HDR = 0
    RX_DATA = 1

    TX_CONTROL = 0
    TX_CAPSULE = 1
    TX_H2C = 2

    TX_IOV_MAX = 256
    RX_IOV_MAX = 64

    OPC_FABRICS = 0x7F
    FCTYPE_CONNECT = 0x01
    SGL_ID_IN_CAPSULE = 0x01     # Data Block descriptor, subtype Offset (Base spec 4.3.2)
    SGL_ID_TRANSPORT = 0x5A      # Transport SGL Data Block, subtype Transport Specific
    FABRICS_ICD_MAX = 8192       # in-capsule data for Fabrics commands and the admin queue
    SC_TRANSIENT_TRANSPORT_ERROR = 0x22
    SC_HOST_PATHING_ERROR = 0x70
    MIN_MAXH2CDATA = 4096

CONN_NAMES = {CONN_DOWN: "down", CONN_CONNECTING: "connecting", CONN_ICREQ: "icreq",
              CONN_FABRICS: "fabrics-connect", CONN_LIVE: "live"}
ERROR_NAMES = {TCPERR_NONE: None, TCPERR_SOCKET: "socket", TCPERR_PROTOCOL: "protocol",
               TCPERR_DIGEST: "digest", TCPERR_TERM: "terminated", TCPERR_TIMEOUT: "timeout",
               TCPERR_REJECTED: "rejected", TCPERR_LOCAL: "closed"}
FES_NAMES = {FES_INVALID_HEADER: "Invalid PDU Header Field", FES_PDU_SEQUENCE: "PDU Sequence Error",
             FES_HDGST: "Header Digest Error", FES_OUT_OF_RANGE: "Data Transfer Out of Range",
             FES_LIMIT_EXCEEDED: "Data Transfer Limit Exceeded",
             FES_UNSUPPORTED_PARAM: "Unsupported Parameter"}


# ---- little helpers (C) --------------------------------------------------------------------------
cdef inline uint32_t _round_up(uint32_t n, uint32_t align) noexcept nogil:
    if align <= 1:
        return n
    return (n + align - 1) // align * align


cdef inline uint32_t _le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t> p[0] | (<uint32_t> p[1] << 8) | (<uint32_t> p[2] << 16)
            | (<uint32_t> p[3] << 24))


cdef inline void _put_le32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint32_t _digest(const void* p, size_t n) noexcept nogil:
    return crc32c_update(0xFFFFFFFFU, p, n) ^ 0xFFFFFFFFU


cdef inline uint8_t _direction(const nvme_sqe* cmd) noexcept nogil:
    """Data direction of a command (Base spec: opcode bits 1:0, FCTYPE bits 1:0 for Fabrics):
    1 host to controller, 2 controller to host, 3 both, 0 none."""
    if cmd.opc == OPC_FABRICS:
        return <uint8_t> (cmd.nsid & 3)
    return cmd.opc & 3


cdef uint32_t _payload_iov(nvme_request* req, uint64_t off, uint64_t length, iovec* out,
                           uint32_t room, uint64_t* covered) noexcept nogil:
    """iovecs for `length` bytes of `req`'s payload from `off`, at most `room` of them; how many
    bytes they cover goes to `covered`."""
    cdef uint32_t i, n = 0
    cdef uint64_t take, have = 0, seg
    if room == 0 or length == 0:
        covered[0] = 0
        return 0
    if req.iov == NULL:
        out[0].iov_base = req.buf + off
        out[0].iov_len = <size_t> length
        covered[0] = length
        return 1
    for i in range(req.iovcnt):
        seg = req.iov[i].iov_len
        if off >= seg:
            off -= seg
            continue
        take = seg - off
        if take > length - have:
            take = length - have
        out[n].iov_base = <char*> req.iov[i].iov_base + off
        out[n].iov_len = <size_t> take
        n += 1
        have += take
        off = 0
        if have == length or n == room:
            break
    covered[0] = have
    return n


cdef uint32_t _payload_crc(nvme_request* req, uint64_t off, uint64_t length,
                           uint32_t crc) noexcept nogil:
    """The CRC32C register after `length` bytes of `req`'s payload from `off`."""
    cdef uint32_t i
    cdef uint64_t take, seg
    if req.iov == NULL:
        return crc32c_update(crc, req.buf + off, length)
    for i in range(req.iovcnt):
        if length == 0:
            break
        seg = req.iov[i].iov_len
        if off >= seg:
            off -= seg
            continue
        take = seg - off
        if take > length:
            take = length
        crc = crc32c_update(crc, <char*> req.iov[i].iov_base + off, take)
        length -= take
        off = 0
    return crc


cdef const char* _fes_name(uint16_t fes) noexcept nogil:
    if fes == FES_INVALID_HEADER:
        return b"Invalid PDU Header Field"
    if fes == FES_PDU_SEQUENCE:
        return b"PDU Sequence Error"
    if fes == FES_HDGST:
        return b"Header Digest Error"
    if fes == FES_OUT_OF_RANGE:
        return b"Data Transfer Out of Range"
    if fes == FES_LIMIT_EXCEEDED:
        return b"Data Transfer Limit Exceeded"
    if fes == FES_UNSUPPORTED_PARAM:
        return b"Unsupported Parameter"
    return b"unknown"


cdef void _log_conn_error(const char* msg) noexcept nogil:
    with gil:
        log.warning("%s", msg.decode(errors="replace"))


cdef void log_digest_error(uint16_t qid, uint16_t cid) noexcept nogil:
    with gil:
        log.error("NVMe/TCP queue %d: data digest mismatch in C2HData for command %d; it "
                  "completes with Transient Transport Error", qid, cid)


cdef void _connect_cb(void* arg, const nvme_cqe* cpl) noexcept nogil:
    (<TcpQueuePair> arg).connect_done(cpl)


# ---- the transport object ----------------------------------------------------------------------
cdef class TcpTransport(Transport):
    """The Transport of an NVMe/TCP controller: no registers; `read32`/`write32` & co. are the
    controller's Property Get/Set (Fabrics), so the generic bring-up code reads CSTS the same
    way."""

    def __init__(self, name):
        self.name = name
        self.regs = None
        self.traps = False
        self.doorbell_stride = 0
        self.controller_ref = None

    def _controller(self):
        from nvme.errors import ControllerDetached
        c = self.controller_ref() if self.controller_ref is not None else None
        if c is None:
            raise ControllerDetached(f"{self.name}: no controller behind this transport")
        return c

    def read32(self, off):
        return self._controller().get_property(off, 4)

    def read64(self, off):
        return self._controller().get_property(off, 8)

    def write32(self, off, value):
        self._controller().set_property(off, value, 4)

    def write64(self, off, value):
        self._controller().set_property(off, value, 8)

    def refresh_stride(self):
        pass

    cpdef doorbell_written(self, uint16_t qid, bint cq):
        pass

    def close(self, **kwargs):
        pass


cdef class TcpAssociation:
    """What a controller shares with its queue pairs about the current association (see
    tcp_assoc in tcp.pxd). Written by the controller's admin side only."""

    def __cinit__(self):
        self.a = <tcp_assoc*> calloc(1, sizeof(tcp_assoc))
        if self.a == NULL:
            raise MemoryError()
        self.a.epoch = 1

    def __dealloc__(self):
        free(self.a)

    @property
    def epoch(self):
        return self.a.epoch

    @property
    def ready(self):
        return self.a.ready_epoch == self.a.epoch and not self.a.dead

    @property
    def lost(self):
        """Did a queue pair lose its connection in the current association?"""
        return self.a.lost_epoch == self.a.epoch

    @property
    def cntlid(self):
        return self.a.cntlid

    @property
    def fail_io(self):
        return bool(self.a.fail_io)

    @fail_io.setter
    def fail_io(self, value):
        self.a.fail_io = 1 if value else 0

    @property
    def dead(self):
        return bool(self.a.dead)

    def teardown(self):
        """End the current association: every queue pair drops its connection on its next
        poll and waits for `make_ready`."""
        self.a.epoch += 1

    def make_ready(self, uint16_t cntlid):
        """The admin queue is connected (controller `cntlid`): I/O queue pairs may connect."""
        self.a.cntlid = cntlid
        self.a.fail_io = 0
        wmb()                   # the CNTLID is there before a queue pair sees the epoch ready
        self.a.ready_epoch = self.a.epoch

    def kill(self):
        self.a.dead = 1
        self.a.epoch += 1

    def __repr__(self):
        return (f"<TcpAssociation epoch={self.a.epoch} ready={self.ready} cntlid={self.a.cntlid} "
                f"fail_io={self.fail_io} dead={self.dead}>")


def sockaddr_of(traddr, trsvcid, adrfam="IPv4"):
    """(family, packed sockaddr, "addr:port") for a numeric address (no name lookups: the
    transport ID carries addresses, as SPDK's does)."""
    fam = str(adrfam).lower()
    try:
        port = int(trsvcid)
    except (TypeError, ValueError):
        raise InvalidArgument(f"trsvcid must be a port number, not {trsvcid!r}") from None
    if not 0 < port < 65536:
        raise InvalidArgument(f"trsvcid {port} is not a TCP port (1-65535)")
    if fam == "ipv4":
        try:
            raw = socket.inet_pton(socket.AF_INET, str(traddr))
        except OSError:
            raise InvalidArgument(f"traddr {traddr!r} is not an IPv4 address") from None
        sa = (socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + raw + bytes(8))
        return socket.AF_INET, sa, f"{traddr}:{port}"
    if fam == "ipv6":
        addr, _, scope = str(traddr).partition("%")
        try:
            raw = socket.inet_pton(socket.AF_INET6, addr)
        except OSError:
            raise InvalidArgument(f"traddr {traddr!r} is not an IPv6 address") from None
        if scope and not scope.isdigit():
            scope_id = socket.if_nametoindex(scope)
        else:
            scope_id = int(scope or 0)
        sa = (socket.AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(4) + raw
              + scope_id.to_bytes(4, "little"))
        return socket.AF_INET6, sa, f"[{traddr}]:{port}"
    raise InvalidArgument(f"adrfam must be IPv4 or IPv6, not {adrfam!r}")


def _connect_data(bytes hostid, uint16_t cntlid, subnqn, hostnqn):
    """The 1024 bytes of Connect command data (Base spec, Fabrics "Connect Command Data")."""
    sub, host = subnqn.encode(), hostnqn.encode()
    if len(hostid) != 16:
        raise InvalidArgument("hostid must be 16 bytes")
    for what, v in (("subnqn", sub), ("hostnqn", host)):
        if not v or len(v) > 223:
            raise InvalidArgument(f"{what} must be 1 to 223 bytes, not {len(v)}")
    data = bytearray(1024)
    data[0:16] = hostid
    data[16:18] = cntlid.to_bytes(2, "little")
    data[256:256 + len(sub)] = sub
    data[512:512 + len(host)] = host
    return bytes(data)


# ---- the queue pair ------------------------------------------------------------------------------
cdef class TcpQueuePair(QueuePair):
    """One NVMe/TCP queue pair (admin: qid 0) on one TCP connection. Build it with
    `TcpQueuePair(TcpTransport, qid, entries, ...)` (the QueuePair arguments; cq_batch=0),
    then `configure(...)` and `connect()`."""

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.cmds = <tcp_cmd*> calloc(self.ntrackers, sizeof(tcp_cmd))
        self.tx_iov = <iovec*> calloc(TX_IOV_MAX, sizeof(iovec))
        self.rx_iov = <iovec*> calloc(RX_IOV_MAX, sizeof(iovec))
        if self.cmds == NULL or self.tx_iov == NULL or self.rx_iov == NULL:
            raise MemoryError("cannot allocate NVMe/TCP queue pair state")
        # the Fabrics Connect of every (re)connect: never in the pool, so that requests waiting
        # for the connection can never starve it
        self.connect_req = self.alloc_request()
        if self.connect_req == NULL:
            raise InvalidArgument("an NVMe/TCP queue pair needs at least two requests")
        self.nrequests -= 1
        self.maxh2cdata = MIN_MAXH2CDATA
        self.rx_need = 24
        self.icd_max = 0
        self.conn_state = CONN_DOWN
        strncpy(self.peer_name, b"(not configured)", sizeof(self.peer_name) - 1)

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        free(self.cmds)
        free(self.tx_iov)
        free(self.rx_iov)

    # ---- configuration (Python) ------------------------------------------------------------------
    def configure(self, family, bytes sockaddr, peer_name, *, subnqn, hostnqn, bytes hostid,
                  uint16_t cntlid=0xFFFF, uint32_t kato_ms=0, bint hdgst=False,
                  bint ddgst=False, double connect_timeout_s=10.0, uint32_t in_capsule=0,
                  TcpAssociation assoc=None, bint requeue_on_loss=False,
                  bint auto_reconnect=False, bint sq_flow_control=False):
        """Where to connect and how: `sockaddr` from `sockaddr_of`; the Connect data (hostid,
        subnqn, hostnqn, cntlid: 0xFFFF for the admin queue, the controller's for I/O queues);
        KATO (admin queue); the digests to ask for; how much in-capsule data the controller
        takes (IOCCSZ; the admin queue always takes 8 KiB); the association it belongs to."""
        if len(sockaddr) > sizeof(self.peer):
            raise InvalidArgument("socket address too long")
        if connect_timeout_s <= 0:
            raise InvalidArgument(f"connect timeout must be positive, not {connect_timeout_s}")
        data = _connect_data(hostid, cntlid, subnqn, hostnqn)
        memcpy(self.connect_data, <const char*> data, 1024)
        memset(self.peer, 0, sizeof(self.peer))
        memcpy(self.peer, <const char*> sockaddr, len(sockaddr))
        self.peer_len = len(sockaddr)
        self.family = family
        name = str(peer_name).encode()[:sizeof(self.peer_name) - 1]
        memset(self.peer_name, 0, sizeof(self.peer_name))
        memcpy(self.peer_name, <const char*> name, len(name))
        self.kato = kato_ms
        self.want_hdgst = hdgst
        self.want_ddgst = ddgst
        self.connect_timeout_ns = <uint64_t> (connect_timeout_s * 1e9)
        self.icd_conf = FABRICS_ICD_MAX if self.qid == 0 else in_capsule
        self.icd_max = self.icd_conf
        self.sqsize = <uint16_t> (self.size_entries() - 1)
        # CATTR bit 2: SQ flow control disabled. The controller then also omits the
        # CapsuleResp of a successful read (C2HData carries SUCCESS): half the PDUs.
        self.cattr = 0 if sq_flow_control else 0x04
        self.requeue_on_loss = requeue_on_loss
        self.auto_reconnect = auto_reconnect
        self.assoc_ref = assoc
        self.assoc = assoc.a if assoc is not None else NULL
        self.conn_epoch = assoc.a.epoch if assoc is not None else 0
        self.failed_epoch = 0

    def set_in_capsule_limit(self, uint32_t nbytes):
        """In-capsule data the controller accepts on this queue (IOCCSZ * 16 - 64)."""
        self.icd_conf = FABRICS_ICD_MAX if self.qid == 0 else nbytes
        self.icd_max = self.icd_conf

    def start_connect(self):
        """Begin connecting (non-blocking); the owner's polls carry it on."""
        if self.state == QP_DESTROYED:
            self._raise_for(-ENXIO)
        if self.peer_len == 0:
            raise InvalidArgument("configure() the queue pair before connecting it")
        if self.state == QP_DISCONNECTED:
            self.state = QP_ENABLED
        with nogil:
            self.conn_start()

    def arm(self):
        """Accept submissions without connecting now: they wait in the software queue until
        the association is ready and the owner's poll connects (auto_reconnect)."""
        if self.state == QP_DISCONNECTED:
            self.state = QP_ENABLED

    def connect(self, timeout=None):
        """Connect and wait until the queue is live (socket, ICReq/ICResp, Fabrics Connect):
        raises TransportError with the reason when it cannot."""
        import time
        from nvme.errors import TransportError
        self.start_connect()
        limit = (self.connect_timeout_ns / 1e9) if timeout is None else timeout
        deadline = time.monotonic() + limit + 1.0
        while self.conn_state != CONN_LIVE:
            if self.conn_state == CONN_DOWN:
                raise TransportError(self.error_message or f"{self.describe()}: not connected",
                                     kind=self.error)
            self.process_completions()
            if time.monotonic() > deadline:
                self.close("connect timed out")
                raise TransportError(f"{self.describe()}: not connected within {limit:.1f} s",
                                     kind="timeout")
            if self.conn_state != CONN_LIVE:
                time.sleep(0.0005)
        return self

    def close(self, reason="closed by the host"):
        """Close the connection (owner thread). Commands on it go back to the software queue
        (I/O queues whose association is still wanted) or complete with ABORTED - SQ DELETION."""
        if not self.on_owner():
            self._raise_for(-EPERM)
        msg = f"{self.describe()}: {reason}".encode()[:sizeof(self.err_msg) - 1]
        if self.conn_state == CONN_DOWN and self.fd < 0:
            return
        memset(self.err_msg, 0, sizeof(self.err_msg))
        memcpy(self.err_msg, <const char*> msg, len(msg))
        self.err_kind = TCPERR_LOCAL
        with nogil:
            self.in_completions = 1
            self.conn_release()
            self.in_completions = 0

    def describe(self):
        return (f"NVMe/TCP queue {self.qid} of {self.transport.name} "
                f"({self.peer_name.decode(errors='replace')})")

    # ---- facts -----------------------------------------------------------------------------------
    @property
    def connection(self):
        return CONN_NAMES.get(self.conn_state, str(self.conn_state))

    @property
    def live(self):
        return self.conn_state == CONN_LIVE

    @property
    def error(self):
        """Why the last connection ended: None, "socket", "protocol", "digest", "terminated",
        "timeout", "rejected" or "closed"."""
        return ERROR_NAMES.get(self.err_kind)

    @property
    def error_message(self):
        return self.err_msg.decode(errors="replace") if self.err_kind else None

    @property
    def negotiated(self):
        return {"hdgst": bool(self.hdgst), "ddgst": bool(self.ddgst),
                "maxh2cdata": self.maxh2cdata, "cpda_align": self.cpda_align,
                "in_capsule": self.icd_max}

    def stats(self):
        s = QueuePair.stats(self)
        s.update({"pdus_rx": self.n_pdus_rx, "pdus_tx": self.n_pdus_tx,
                  "recv_calls": self.n_rx_calls, "send_calls": self.n_tx_calls,
                  "bytes_rx": self.n_bytes_rx, "bytes_tx": self.n_bytes_tx,
                  "connections_lost": self.n_conn_lost, "requeued": self.n_requeued,
                  "r2t": self.n_r2t, "in_capsule": self.n_in_capsule})
        return s

    def __repr__(self):
        return (f"<TcpQueuePair {self.transport.name} qid={self.qid} {self.connection} "
                f"entries={self.size_entries()} outstanding={self.outstanding} "
                f"queued={self.queued}>")

    # ---- life cycle overrides --------------------------------------------------------------------
    def disconnect(self):
        if self.on_owner():
            with nogil:
                self.conn_close()
        QueuePair.disconnect(self)

    def destroy(self):
        if self.on_owner():
            with nogil:
                self.conn_close()
        QueuePair.destroy(self)

    cdef void free_request(self, nvme_request* req) noexcept nogil:
        if req == self.connect_req:
            return                      # reserved, never pooled
        req.next = self.free_requests
        self.free_requests = req

    # ---- connection ------------------------------------------------------------------------------
    cdef int conn_start(self) noexcept nogil:
        cdef int one = 1
        cdef int fd, rc, e
        self.conn_close()
        self.err_kind = TCPERR_NONE
        self.err_msg[0] = 0
        if self.assoc != NULL:
            self.conn_epoch = self.assoc.epoch
            if self.qid != 0:
                # an I/O queue joins the controller of the current association
                self.connect_data[16] = self.assoc.cntlid & 0xFF
                self.connect_data[17] = self.assoc.cntlid >> 8
        self.hdgst = self.ddgst = 0
        self.hd = 0
        self.cpda_align = 0
        self.maxh2cdata = MIN_MAXH2CDATA
        self.icd_max = self.icd_conf
        self.rx_state = RX_HDR
        self.rx_have = 0
        self.rx_need = 24
        self.conn_deadline_ns = now_ns() + self.connect_timeout_ns
        fd = c_socket(self.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            e = errno
            snprintf(self.err_msg, sizeof(self.err_msg), b"NVMe/TCP queue %u (%s): socket: %s",
                     self.qid, self.peer_name, strerror(e))
            self.conn_fail(TCPERR_SOCKET)
            return -1
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        self.fd = fd
        self.conn_state = CONN_CONNECTING
        rc = c_connect(fd, <const sockaddr*> self.peer, self.peer_len)
        if rc == 0:
            self.send_icreq()
            return 0
        e = errno
        if e == EINPROGRESS or e == EINTR:
            return 0
        snprintf(self.err_msg, sizeof(self.err_msg), b"NVMe/TCP queue %u: connect to %s: %s",
                 self.qid, self.peer_name, strerror(e))
        self.conn_fail(TCPERR_SOCKET)
        return -1

    cdef int conn_step(self) noexcept nogil:
        """Carry a connection being set up one step on; fail it past its deadline."""
        cdef pollfd pfd
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if now_ns() > self.conn_deadline_ns:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): %s did not complete within %.1f s", self.qid,
                     self.peer_name,
                     b"TCP connect" if self.conn_state == CONN_CONNECTING else
                     b"ICReq/ICResp" if self.conn_state == CONN_ICREQ else b"Fabrics Connect",
                     self.connect_timeout_ns / 1e9)
            self.conn_fail(TCPERR_TIMEOUT)
            return -1
        if self.conn_state == CONN_CONNECTING:
            pfd.fd = self.fd
            pfd.events = POLLOUT
            pfd.revents = 0
            if poll(&pfd, 1, 0) <= 0:
                return 0
            getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err != 0:
                snprintf(self.err_msg, sizeof(self.err_msg),
                         b"NVMe/TCP queue %u: connect to %s: %s", self.qid, self.peer_name,
                         strerror(err))
                self.conn_fail(TCPERR_SOCKET)
                return -1
            self.send_icreq()
        return 0

    cdef void send_icreq(self) noexcept nogil:
        cdef tcp_icreq* r = <tcp_icreq*> self.ctl.hdr
        memset(r, 0, sizeof(tcp_icreq))
        r.ch.type = PDU_ICREQ
        r.ch.hlen = sizeof(tcp_icreq)
        r.ch.plen = sizeof(tcp_icreq)
        r.pfv = 0
        r.hpda = 0                   # C2H data at a dword offset: no padding (and nvmet asks it)
        r.dgst = (1 if self.want_hdgst else 0) | (2 if self.want_ddgst else 0)
        r.maxr2t = 0                 # 0's based: one R2T outstanding per command
        self.ctl.hdr_len = sizeof(tcp_icreq)
        self.ctl.data_len = 0
        self.ctl.has_ddgst = 0
        self.ctl.req = NULL
        self.ctl.kind = TX_CONTROL
        self.ctl.cid = 0xFFFF
        self.ctl.total = sizeof(tcp_icreq)
        self.conn_state = CONN_ICREQ
        self.tx_push(&self.ctl)
        self.tx_flush()

    cdef int send_connect(self) noexcept nogil:
        """The Fabrics Connect command (Base spec, Fabrics): queue id, SQ size, attributes,
        KATO, and the Connect data (host id and NQNs, controller id), in the capsule."""
        cdef nvme_request* req = self.connect_req
        cdef nvme_tracker* tr = self.free_trackers
        cdef int rc
        if tr == NULL:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u: no command id free for Fabrics Connect", self.qid)
            self.conn_fail(TCPERR_LOCAL)
            return -1
        memset(req, 0, sizeof(nvme_request))
        req.cmd.opc = OPC_FABRICS
        req.cmd.nsid = FCTYPE_CONNECT
        req.cmd.cdw10 = <uint32_t> self.qid << 16        # RECFMT 0
        req.cmd.cdw11 = self.sqsize | (<uint32_t> self.cattr << 16)
        req.cmd.cdw12 = self.kato
        req.buf = <char*> self.connect_data
        req.len = 1024
        req.cb_fn = _connect_cb
        req.cb_arg = <void*> self
        self.free_trackers = tr.next
        rc = self.start(req, tr)
        if rc != 0:
            tr.next = self.free_trackers
            self.free_trackers = tr
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u: cannot build Fabrics Connect (%d)", self.qid, rc)
            self.conn_fail(TCPERR_LOCAL)
            return -1
        self.conn_state = CONN_FABRICS
        return 0

    cdef void connect_done(self, const nvme_cqe* cpl) noexcept nogil:
        self.n_completed -= 1            # (not a command of the queue pair's users)
        if self.conn_state != CONN_FABRICS:
            return                   # the connection went away meanwhile
        if (cpl.status >> 1) & 0x7FF:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): Fabrics Connect rejected: SCT %u SC 0x%02x "
                     b"(cdw0 0x%08x)", self.qid, self.peer_name, (cpl.status >> 9) & 7,
                     (cpl.status >> 1) & 0xFF, cpl.cdw0)
            self.conn_fail(TCPERR_REJECTED)
            return
        if self.qid == 0:
            self.cntlid = cpl.cdw0 & 0xFFFF
        self.conn_state = CONN_LIVE

    cdef void conn_fail(self, int kind) noexcept nogil:
        """The connection is unusable (err_msg says why): report it to the association and
        release it."""
        self.err_kind = kind
        self.n_conn_lost += 1
        # an I/O queue tells the controller; the controller watches its admin queue itself (a
        # failed reconnect attempt of the admin queue must not mark the next association lost)
        if self.qid != 0:
            _log_conn_error(self.err_msg)
            if self.assoc != NULL and self.conn_epoch == self.assoc.epoch:
                self.assoc.lost_epoch = self.conn_epoch
                self.failed_epoch = self.conn_epoch
        self.conn_release()

    cdef void conn_close(self) noexcept nogil:
        """Close the socket and forget what was being sent or received. Commands stay on
        their trackers (conn_release or a drain decides what becomes of them)."""
        cdef tcp_tx* t = self.tx_head
        cdef tcp_tx* nxt
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        while t != NULL:
            nxt = t.next
            t.queued = 0
            t.next = NULL
            t = nxt
        self.tx_head = self.tx_tail = NULL
        self.rx_state = RX_HDR
        self.rx_have = 0
        self.rx_need = 24
        self.has_ready = 0
        self.conn_state = CONN_DOWN
        if self.trackers != NULL and self.cmds != NULL:
            # the Connect command dies with its connection
            self._untrack_connect()

    cdef void _untrack_connect(self) noexcept nogil:
        cdef nvme_tracker* tr = self.out_head
        while tr != NULL:
            if tr.req == self.connect_req:
                self.untrack(tr)
                return
            tr = tr.next

    cdef void untrack(self, nvme_tracker* tr) noexcept nogil:
        """Take `tr` off the outstanding list and free it, without completing its request."""
        if tr.prev != NULL:
            tr.prev.next = tr.next
        else:
            self.out_head = tr.next
        if tr.next != NULL:
            tr.next.prev = tr.prev
        else:
            self.out_tail = tr.prev
        tr.active = 0
        tr.req = NULL
        tr.next = self.free_trackers
        self.free_trackers = tr
        self.outstanding -= 1
        self.cmds[tr.cid].tx_busy = 0
        self.cmds[tr.cid].resp_deferred = 0

    cdef void conn_release(self) noexcept nogil:
        """Close the connection; its commands go back to the front of the software queue (in
        submission order) when this queue keeps them across reconnects and I/O is not failing
        fast, else they complete: Host Pathing Error when failing fast, ABORTED - SQ DELETION
        otherwise."""
        cdef nvme_tracker* tr
        cdef nvme_request* req
        cdef nvme_request* fail_head = NULL
        cdef nvme_request* fail_tail = NULL
        cdef bint keep
        cdef uint16_t sct = SCT_GENERIC, sc = SC_ABORTED_SQ_DELETION
        self.conn_close()
        keep = self.requeue_on_loss and self.state == QP_ENABLED
        if self.assoc != NULL:
            if self.assoc.dead:
                keep = False
            elif self.assoc.fail_io:
                keep = False
                sct = SCT_PATH
                sc = SC_HOST_PATHING_ERROR
        # newest first, each pushed to the front: the queue keeps submission order
        while self.out_tail != NULL:
            tr = self.out_tail
            req = tr.req
            self.untrack(tr)
            if keep:
                req.next = self.queued_head
                self.queued_head = req
                if self.queued_tail == NULL:
                    self.queued_tail = req
                self.queued += 1
                self.n_requeued += 1
            else:
                req.next = fail_head
                fail_head = req
                if fail_tail == NULL:
                    fail_tail = req
        while fail_head != NULL:
            req = fail_head
            fail_head = req.next
            self.fail_request(req, sct, sc, False)

    cdef void fail_queued(self, uint16_t sct, uint16_t sc) noexcept nogil:
        cdef nvme_request* req
        while self.queued_head != NULL:
            req = self.queued_head
            self.queued_head = req.next
            if self.queued_head == NULL:
                self.queued_tail = NULL
            self.queued -= 1
            self.fail_request(req, sct, sc, False)

    cdef void check_assoc(self) noexcept nogil:
        """Follow the association: leave an ended one, fail waiting I/O once fast_io_fail has
        passed, connect again when the controller is back."""
        cdef tcp_assoc* a = self.assoc
        if self.conn_epoch != a.epoch:
            if self.conn_state != CONN_DOWN:
                snprintf(self.err_msg, sizeof(self.err_msg),
                         b"NVMe/TCP queue %u (%s): the controller association ended",
                         self.qid, self.peer_name)
                self.err_kind = TCPERR_LOCAL
                self.conn_release()
            self.conn_epoch = a.epoch
        if a.fail_io and self.conn_state != CONN_LIVE and self.queued_head != NULL:
            self.fail_queued(SCT_PATH, SC_HOST_PATHING_ERROR)
        if (self.auto_reconnect and self.conn_state == CONN_DOWN and not a.dead
                and a.ready_epoch == a.epoch and self.failed_epoch != a.epoch):
            rmb()               # (make_ready's CNTLID)
            self.conn_start()

    # ---- the QueuePair overrides ---------------------------------------------------------------
    cdef int validate_payload(self, nvme_request* req) noexcept nogil:
        return 0                     # any memory will do: the kernel copies it

    cdef int build_data_pointer(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        """SGL1 of a command on NVMe/TCP: a Data Block at offset 0 of the capsule for
        host-to-controller data that fits in it, else a Transport SGL Data Block (the data
        moves in H2CData after R2T, or in C2HData)."""
        cdef uint8_t d
        cdef uint64_t n = req.len
        req.cmd.flags = (req.cmd.flags & 0x3F) | PSDT_SGL_MPTR_CONTIG
        req.cmd.prp1 = 0
        if n == 0:
            req.cmd.prp2 = <uint64_t> SGL_ID_TRANSPORT << 56
            return 0
        if n > self.max_transfer and req != self.connect_req:
            return -E2BIG
        d = _direction(&req.cmd)
        if d != 1 and d != 2:
            return -EINVAL           # a payload with a command that moves none, or both ways
        if d == 1 and (n <= self.icd_max or (req.cmd.opc == OPC_FABRICS and n <= FABRICS_ICD_MAX)):
            req.cmd.prp2 = n | (<uint64_t> SGL_ID_IN_CAPSULE << 56)
        else:
            req.cmd.prp2 = n | (<uint64_t> SGL_ID_TRANSPORT << 56)
        return 0

    cdef int submit_request(self, nvme_request* req) noexcept nogil:
        cdef nvme_tracker* tr
        cdef int rc
        if not self.on_owner():
            return -EPERM
        if self.state != QP_ENABLED:
            if self.state != QP_DISCONNECTING:
                return -ENXIO
            self.conn_close()
            self.drain_disconnected()
            if self.state != QP_ENABLED:
                return -ENXIO
        if self.timeout_ns:
            req.submit_ns = now_ns()
        tr = self.free_trackers
        if tr != NULL and self.queued_head == NULL and self.conn_state == CONN_LIVE:
            self.free_trackers = tr.next
            rc = self.start(req, tr)
            if rc != 0:
                tr.next = self.free_trackers
                self.free_trackers = tr
                return rc
            if not self.in_completions:
                self.ring_sq()
            return 0
        # no CID free, or the connection is not up: wait in order (refused now if it cannot
        # be described, as it would be with a CID free)
        rc = self.build_data_pointer(req, &self.scratch)
        if rc != 0:
            return rc
        req.next = NULL
        if self.queued_tail == NULL:
            self.queued_head = req
        else:
            self.queued_tail.next = req
        self.queued_tail = req
        self.queued += 1
        self.n_queued_total += 1
        return 0

    cdef void submit_queued(self) noexcept nogil:
        cdef nvme_request* req
        cdef nvme_tracker* tr
        cdef int rc
        while (self.queued_head != NULL and self.free_trackers != NULL
               and self.state == QP_ENABLED and self.conn_state == CONN_LIVE):
            req = self.queued_head
            self.queued_head = req.next
            if self.queued_head == NULL:
                self.queued_tail = NULL
            self.queued -= 1
            tr = self.free_trackers
            self.free_trackers = tr.next
            rc = self.start(req, tr)
            if rc != 0:
                tr.next = self.free_trackers
                self.free_trackers = tr
                self.fail_request(req, SCT_GENERIC, SC_ABORTED_SQ_DELETION, True)

    cdef int start(self, nvme_request* req, nvme_tracker* tr) noexcept nogil:
        """Give `req` CID `tr` and queue its CapsuleCmd PDU (the flush is the caller's)."""
        cdef tcp_cmd* c = &self.cmds[tr.cid]
        cdef tcp_tx* t = &c.capsule
        cdef tcp_capsule_cmd* pdu = <tcp_capsule_cmd*> t.hdr
        cdef uint32_t hl = sizeof(tcp_capsule_cmd)
        cdef uint32_t pdo
        cdef uint8_t flags = 0
        cdef int rc
        tr.req = req
        req.cmd.cid = tr.cid
        rc = self.build_data_pointer(req, tr)
        if rc != 0:
            tr.req = NULL
            return rc
        c.c2h_next = 0
        c.h2c_next = 0
        c.r2t_end = 0
        c.r2t_active = 0
        c.resp_deferred = 0
        c.digest_error = 0
        pdu.ch.type = PDU_CAPSULE_CMD
        pdu.ch.hlen = sizeof(tcp_capsule_cmd)
        pdu.ch.pdo = 0
        memcpy(&pdu.sqe, &req.cmd, sizeof(nvme_sqe))
        if self.hdgst:
            flags |= PDU_FLAG_HDGST
            hl += DIGEST_LEN
        t.req = req
        t.data_len = 0
        t.data_off = 0
        t.has_ddgst = 0
        if req.len and (req.cmd.prp2 >> 56) == SGL_ID_IN_CAPSULE:
            pdo = _round_up(hl, self.cpda_align)
            if pdo > PDU_HDR_MAX:
                tr.req = NULL
                return -EINVAL
            memset(t.hdr + hl, 0, pdo - hl)
            pdu.ch.pdo = <uint8_t> pdo
            hl = pdo
            t.data_len = <uint32_t> req.len
            if self.ddgst:
                flags |= PDU_FLAG_DDGST
                _put_le32(t.ddgst, _payload_crc(req, 0, req.len, 0xFFFFFFFFU) ^ 0xFFFFFFFFU)
                t.has_ddgst = 1
            c.h2c_next = req.len
            self.n_in_capsule += 1
        pdu.ch.flags = flags
        pdu.ch.plen = hl + t.data_len + (DIGEST_LEN if t.has_ddgst else 0)
        if self.hdgst:
            _put_le32(t.hdr + sizeof(tcp_capsule_cmd), _digest(t.hdr, sizeof(tcp_capsule_cmd)))
        t.hdr_len = hl
        t.kind = TX_CAPSULE
        t.cid = tr.cid
        t.total = pdu.ch.plen
        c.tx_busy = 1
        tr.active = 1
        tr.gen += 1
        tr.timeout_reported = 0
        if self.timeout_ns:
            tr.start_ns = now_ns()
        tr.next = NULL
        tr.prev = self.out_tail
        if self.out_tail == NULL:
            self.out_head = tr
        else:
            self.out_tail.next = tr
        self.out_tail = tr
        self.outstanding += 1
        if req != self.connect_req:
            self.n_submitted += 1
        self.tx_push(t)
        return 0

    cdef void ring_sq(self) noexcept nogil:
        if self.tx_head != NULL and self.fd >= 0 and self.conn_state >= CONN_ICREQ:
            self.tx_flush()

    cdef int process_completions_c(self, uint32_t max_completions) noexcept nogil:
        cdef int n = 0
        cdef uint64_t seen = self.n_bytes_rx
        if not self.on_owner():
            return -EPERM
        if self.state != QP_ENABLED:
            if self.state == QP_DISCONNECTING:
                self.conn_close()
                return self.drain_disconnected()
            return -ENXIO
        self.in_completions = 1
        if self.assoc != NULL and self.qid != 0:
            self.check_assoc()               # (the controller runs its admin queue itself)
        if self.conn_state != CONN_LIVE and self.conn_state != CONN_DOWN:
            self.conn_step()
        if self.fd >= 0 and self.conn_state >= CONN_ICREQ:
            if self.tx_head != NULL:
                self.tx_flush()
            if self.fd >= 0:
                n = self.rx_poll(max_completions)
        if self.has_ready:
            self.complete_ready()
        if (self.conn_state == CONN_LIVE and self.queued_head != NULL
                and self.free_trackers != NULL):
            self.submit_queued()
        self.in_completions = 0
        if self.tx_head != NULL and self.fd >= 0:
            self.tx_flush()
        if self.timeout_ns and self.out_head != NULL:
            self.check_timeouts()
        if self.n_bytes_rx == seen and self.out_head != NULL:
            # Waiting with nothing arrived: let whatever else this CPU has to run go first. A
            # target on this machine (loopback) does its work on the CPU that sent to it.
            sched_yield()
        return n if n > 0 else 0

    # ---- sending ---------------------------------------------------------------------------------
    cdef void tx_push(self, tcp_tx* t) noexcept nogil:
        t.sent = 0
        t.next = NULL
        t.queued = 1
        if self.tx_tail == NULL:
            self.tx_head = t
        else:
            self.tx_tail.next = t
        self.tx_tail = t

    cdef int tx_flush(self) noexcept nogil:
        """Hand queued PDUs to the kernel, as many as one sendmsg takes; stop when the socket
        is full (the next poll goes on)."""
        cdef msghdr msg
        cdef tcp_tx* t
        cdef uint32_t niov
        cdef uint64_t s, offered, covered, left
        cdef ssize_t n
        cdef int e
        while self.tx_head != NULL and self.fd >= 0:
            niov = 0
            offered = 0
            t = self.tx_head
            while t != NULL and niov < TX_IOV_MAX - 2:
                s = t.sent
                if s < t.hdr_len:
                    self.tx_iov[niov].iov_base = t.hdr + s
                    self.tx_iov[niov].iov_len = t.hdr_len - s
                    niov += 1
                    offered += t.hdr_len - s
                    s = 0
                else:
                    s -= t.hdr_len
                if t.data_len:
                    if s < t.data_len:
                        niov += _payload_iov(t.req, t.data_off + s, t.data_len - s,
                                             &self.tx_iov[niov], TX_IOV_MAX - 1 - niov, &covered)
                        offered += covered
                        if covered < t.data_len - s:
                            break            # out of iovecs: the rest next time
                        s = 0
                    else:
                        s -= t.data_len
                if t.has_ddgst and s < DIGEST_LEN:
                    self.tx_iov[niov].iov_base = t.ddgst + s
                    self.tx_iov[niov].iov_len = DIGEST_LEN - s
                    niov += 1
                    offered += DIGEST_LEN - s
                t = t.next
            if niov == 0:
                return 0
            memset(&msg, 0, sizeof(msg))
            msg.msg_iov = self.tx_iov
            msg.msg_iovlen = niov
            n = sendmsg(self.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
            self.n_tx_calls += 1
            if n < 0:
                e = errno
                if e == EAGAIN:
                    return 0
                if e == EINTR:
                    continue
                snprintf(self.err_msg, sizeof(self.err_msg),
                         b"NVMe/TCP queue %u: send to %s: %s", self.qid, self.peer_name,
                         strerror(e))
                self.conn_fail(TCPERR_SOCKET)
                return -1
            self.n_bytes_tx += n
            covered = <uint64_t> n
            while self.tx_head != NULL:
                t = self.tx_head
                left = t.total - t.sent
                if covered < left:
                    t.sent += covered
                    break
                covered -= left
                t.sent = t.total
                self.tx_head = t.next
                if self.tx_head == NULL:
                    self.tx_tail = NULL
                t.queued = 0
                t.next = NULL
                self.n_pdus_tx += 1
                self.tx_done(t)
                if self.fd < 0:
                    return -1
                if covered == 0 and (self.tx_head == NULL or self.tx_head.sent != 0):
                    break
            if <uint64_t> n < offered:
                return 0                     # the socket is full
        return 0

    cdef void tx_done(self, tcp_tx* t) noexcept nogil:
        """A PDU has been handed to the kernel entirely."""
        cdef tcp_cmd* c
        if t.kind == TX_CONTROL:
            return
        c = &self.cmds[t.cid]
        if c.tx_busy:
            c.tx_busy -= 1
        if t.kind == TX_H2C:
            c.h2c_next += t.data_len
            if c.h2c_next < c.r2t_end:
                self.queue_h2c(c, t.req)
            else:
                c.r2t_active = 0
        if c.resp_deferred and c.tx_busy == 0:
            self.has_ready = 1

    cdef void queue_h2c(self, tcp_cmd* c, nvme_request* req) noexcept nogil:
        """The next H2CData PDU of the active R2T: at most MAXH2CDATA bytes from h2c_next."""
        cdef tcp_tx* t = &c.h2c
        cdef tcp_data_hdr* h = <tcp_data_hdr*> t.hdr
        cdef uint64_t off = c.h2c_next
        cdef uint64_t n = c.r2t_end - off
        cdef uint32_t hl = sizeof(tcp_data_hdr)
        cdef uint32_t pdo
        cdef uint8_t flags = 0
        if n > self.maxh2cdata:
            n = self.maxh2cdata
        memset(t.hdr, 0, sizeof(tcp_data_hdr))
        h.ch.type = PDU_H2C_DATA
        h.ch.hlen = sizeof(tcp_data_hdr)
        h.cccid = <uint16_t> (c - self.cmds)
        h.ttag = c.ttag
        h.datao = <uint32_t> off
        h.datal = <uint32_t> n
        if self.hdgst:
            flags |= PDU_FLAG_HDGST
            hl += DIGEST_LEN
        pdo = _round_up(hl, self.cpda_align)
        memset(t.hdr + hl, 0, pdo - hl)
        h.ch.pdo = <uint8_t> pdo
        if off + n == c.r2t_end:
            flags |= PDU_FLAG_LAST
        t.has_ddgst = 0
        if self.ddgst:
            flags |= PDU_FLAG_DDGST
            _put_le32(t.ddgst, _payload_crc(req, off, n, 0xFFFFFFFFU) ^ 0xFFFFFFFFU)
            t.has_ddgst = 1
        h.ch.flags = flags
        h.ch.plen = <uint32_t> (pdo + n + (DIGEST_LEN if t.has_ddgst else 0))
        if self.hdgst:
            _put_le32(t.hdr + sizeof(tcp_data_hdr), _digest(t.hdr, sizeof(tcp_data_hdr)))
        t.hdr_len = pdo
        t.data_len = <uint32_t> n
        t.data_off = off
        t.req = req
        t.kind = TX_H2C
        t.cid = h.cccid
        t.total = h.ch.plen
        c.tx_busy += 1
        self.tx_push(t)

    cdef void send_term(self, uint16_t fes, uint32_t fei) noexcept nogil:
        """H2CTermReq (best effort, only between PDUs): the offending header goes back."""
        cdef uint8_t buf[PDU_HDR_MAX]
        cdef tcp_term* h = <tcp_term*> buf
        cdef uint32_t n = self.rx_have
        if self.fd < 0 or (self.tx_head != NULL and self.tx_head.sent != 0):
            return
        if n > TERM_MAX_PLEN - sizeof(tcp_term):
            n = TERM_MAX_PLEN - sizeof(tcp_term)
        memset(buf, 0, sizeof(tcp_term))
        h.ch.type = PDU_H2C_TERM
        h.ch.hlen = sizeof(tcp_term)
        h.ch.plen = sizeof(tcp_term) + n
        h.fes = fes
        h.fei = fei
        memcpy(buf + sizeof(tcp_term), self.rx_buf, n)
        send(self.fd, buf, sizeof(tcp_term) + n, MSG_NOSIGNAL | MSG_DONTWAIT)

    # ---- receiving -------------------------------------------------------------------------------
    cdef int rx_poll(self, uint32_t max_completions) noexcept nogil:
        """Read and act on what the target sent, until the socket is empty. Completions made,
        or -1 when the connection failed."""
        cdef int done = 0, rc
        cdef ssize_t n
        cdef int e
        while self.fd >= 0:
            if self.rx_state == RX_HDR:
                if self.rx_have < self.rx_need:
                    n = recv(self.fd, self.rx_buf + self.rx_have, self.rx_need - self.rx_have,
                             MSG_DONTWAIT)
                    self.n_rx_calls += 1
                    if n == 0:
                        snprintf(self.err_msg, sizeof(self.err_msg),
                                 b"NVMe/TCP queue %u: %s closed the connection", self.qid,
                                 self.peer_name)
                        self.conn_fail(TCPERR_SOCKET)
                        return -1
                    if n < 0:
                        e = errno
                        if e == EAGAIN:
                            break
                        if e == EINTR:
                            continue
                        snprintf(self.err_msg, sizeof(self.err_msg),
                                 b"NVMe/TCP queue %u: receive from %s: %s", self.qid,
                                 self.peer_name, strerror(e))
                        self.conn_fail(TCPERR_SOCKET)
                        return -1
                    self.n_bytes_rx += n
                    self.rx_have += <uint32_t> n
                    if self.rx_have < self.rx_need:
                        break                    # the rest has not arrived yet
                rc = self.rx_header()
                if rc < 0:
                    return -1
                done += rc
            else:
                rc = self.rx_data()
                if rc < 0:
                    return -1 if rc == -1 else done
                done += rc
            if max_completions and <uint32_t> done >= max_completions:
                break
        return done

    cdef int rx_header(self) noexcept nogil:
        """A PDU header is in rx_buf (or its first part): check it, read the rest of it if
        longer, verify its digest, act on it. Completions made, or -1."""
        cdef tcp_ch* ch = <tcp_ch*> self.rx_buf
        cdef uint8_t t = ch.type
        cdef uint32_t want_hlen, total, plen = ch.plen
        cdef bint has_hd = False
        cdef bint ok
        cdef int rc
        if self.conn_state == CONN_ICREQ:
            ok = t == PDU_ICRESP or t == PDU_C2H_TERM
        else:
            ok = (t == PDU_CAPSULE_RESP or t == PDU_C2H_DATA or t == PDU_R2T
                  or t == PDU_C2H_TERM)
        if not ok:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): unexpected PDU type 0x%02x %s", self.qid,
                     self.peer_name, t,
                     b"before ICResp" if self.conn_state == CONN_ICREQ else b"from a controller")
            return self.protocol_error(TCPERR_PROTOCOL,
                                       FES_PDU_SEQUENCE if t <= PDU_R2T else FES_INVALID_HEADER, 0)
        want_hlen = sizeof(tcp_icresp) if t == PDU_ICRESP else 24
        if ch.hlen != want_hlen:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): PDU type 0x%02x with HLEN %u, expected %u",
                     self.qid, self.peer_name, t, ch.hlen, want_hlen)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 2)
        if t == PDU_CAPSULE_RESP or t == PDU_C2H_DATA or t == PDU_R2T:
            if (ch.flags & PDU_FLAG_HDGST != 0) != (self.hdgst != 0):
                snprintf(self.err_msg, sizeof(self.err_msg),
                         b"NVMe/TCP queue %u (%s): PDU type 0x%02x %s a header digest, but "
                         b"header digests are %s", self.qid, self.peer_name, t,
                         b"has" if ch.flags & PDU_FLAG_HDGST else b"lacks",
                         b"on" if self.hdgst else b"off")
                return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 1)
            has_hd = self.hdgst != 0
        total = want_hlen + (DIGEST_LEN if has_hd else 0)
        ok = True
        if t == PDU_ICRESP:
            ok = plen == sizeof(tcp_icresp)
        elif t == PDU_CAPSULE_RESP or t == PDU_R2T:
            ok = plen == total
        elif t == PDU_C2H_DATA:
            ok = plen > total
        elif t == PDU_C2H_TERM:
            ok = plen > sizeof(tcp_term) and plen <= TERM_MAX_PLEN
            total = plen
        if not ok:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): PDU type 0x%02x with PLEN %u (HLEN %u)",
                     self.qid, self.peer_name, t, plen, ch.hlen)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 4)
        if self.rx_have < total:
            self.rx_need = total         # the rest of a longer header
            return 0
        if has_hd and _digest(self.rx_buf, want_hlen) != _le32(self.rx_buf + want_hlen):
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): header digest mismatch in a PDU of type 0x%02x "
                     b"(got 0x%08x, computed 0x%08x)", self.qid, self.peer_name, t,
                     _le32(self.rx_buf + want_hlen), _digest(self.rx_buf, want_hlen))
            return self.protocol_error(TCPERR_DIGEST, FES_HDGST, 0)
        self.n_pdus_rx += 1
        if t == PDU_CAPSULE_RESP:
            rc = self.on_capsule_resp()
        elif t == PDU_C2H_DATA:
            rc = self.on_c2h_data()
        elif t == PDU_R2T:
            rc = self.on_r2t()
        elif t == PDU_ICRESP:
            rc = self.on_icresp()
        else:
            rc = self.on_term()
        if rc < 0 or self.fd < 0:
            return -1
        if self.rx_state == RX_HDR:
            self.rx_have = 0
            self.rx_need = 24 + self.hd
        return rc

    cdef int on_capsule_resp(self) noexcept nogil:
        cdef tcp_capsule_resp* r = <tcp_capsule_resp*> self.rx_buf
        cdef nvme_cqe cqe = r.cqe
        cdef uint16_t cid = cqe.cid
        if cid >= self.ntrackers or not self.trackers[cid].active:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): CapsuleResp for command %u, which is not "
                     b"outstanding", self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 20)
        if self.conn_state == CONN_FABRICS and self.trackers[cid].req != self.connect_req:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): CapsuleResp for command %u before the Fabrics "
                     b"Connect completed", self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_PDU_SEQUENCE, 20)
        cqe.status &= 0xFFFE
        cqe.sqid = self.qid
        return self.finish_command(cid, &cqe)

    cdef int on_c2h_data(self) noexcept nogil:
        cdef tcp_data_hdr* h = <tcp_data_hdr*> self.rx_buf
        cdef uint16_t cid = h.cccid
        cdef uint32_t hdr_end = sizeof(tcp_data_hdr) + self.hd
        cdef uint8_t flags = h.ch.flags
        cdef nvme_request* req
        cdef tcp_cmd* c
        if cid >= self.ntrackers or not self.trackers[cid].active:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): C2HData for command %u, which is not outstanding",
                     self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 8)
        req = self.trackers[cid].req
        c = &self.cmds[cid]
        if req.len == 0 or _direction(&req.cmd) != 2:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): C2HData for command %u, which reads no data",
                     self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 8)
        if h.datal == 0 or h.datao != c.c2h_next:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): C2HData for command %u with DATAO %u DATAL %u; "
                     b"expected DATAO %llu and data", self.qid, self.peer_name, cid, h.datao,
                     h.datal, c.c2h_next)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER,
                                       16 if h.datal == 0 else 12)
        if <uint64_t> h.datao + h.datal > req.len:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): C2HData for command %u, DATAO %u + DATAL %u is "
                     b"beyond its %llu bytes", self.qid, self.peer_name, cid, h.datao, h.datal,
                     req.len)
            return self.protocol_error(TCPERR_PROTOCOL, FES_OUT_OF_RANGE, 16)
        if ((flags & PDU_FLAG_SUCCESS and not flags & PDU_FLAG_LAST)
                or (flags & PDU_FLAG_DDGST != 0) != (self.ddgst != 0)):
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): C2HData for command %u with flags 0x%02x (data "
                     b"digests %s)", self.qid, self.peer_name, cid, flags,
                     b"on" if self.ddgst else b"off")
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 1)
        if (h.ch.pdo < hdr_end or h.ch.pdo - hdr_end > sizeof(self.rx_scratch)
                or h.ch.plen != <uint64_t> h.ch.pdo + h.datal + (DIGEST_LEN if self.ddgst else 0)):
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): C2HData for command %u with PDO %u, PLEN %u and "
                     b"DATAL %u", self.qid, self.peer_name, cid, h.ch.pdo, h.ch.plen, h.datal)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 3)
        c.c2h_next = <uint64_t> h.datao + h.datal
        self.rx_state = RX_DATA
        self.rx_cid = cid
        self.rx_flags = flags
        self.rx_pad_left = h.ch.pdo - hdr_end
        self.rx_data_off = h.datao
        self.rx_data_left = h.datal
        self.rx_ddgst_have = 0
        self.rx_crc = 0xFFFFFFFFU
        self.rx_have = 0
        return 0

    cdef int rx_data(self) noexcept nogil:
        """Read the data of a C2HData PDU straight into the command's buffers (and, in the same
        call, the next PDU's header). Completions made; -1 failed; -2 nothing more now."""
        cdef nvme_request* req = self.trackers[self.rx_cid].req
        cdef uint32_t niov = 0, k
        cdef uint64_t need = 0, covered = 0, got, take
        cdef bint whole = True
        cdef ssize_t n
        cdef int e
        if self.rx_pad_left:
            self.rx_iov[niov].iov_base = self.rx_scratch
            self.rx_iov[niov].iov_len = self.rx_pad_left
            niov += 1
            need += self.rx_pad_left
        if self.rx_data_left:
            k = _payload_iov(req, self.rx_data_off, self.rx_data_left, &self.rx_iov[niov],
                             RX_IOV_MAX - 2 - niov, &covered)
            niov += k
            need += covered
            whole = covered == self.rx_data_left
        if whole:
            if self.ddgst and self.rx_ddgst_have < DIGEST_LEN:
                self.rx_iov[niov].iov_base = self.rx_ddgst + self.rx_ddgst_have
                self.rx_iov[niov].iov_len = DIGEST_LEN - self.rx_ddgst_have
                niov += 1
                need += DIGEST_LEN - self.rx_ddgst_have
            # whatever follows is a PDU of at least this length: take its header along
            self.rx_iov[niov].iov_base = self.rx_buf
            self.rx_iov[niov].iov_len = 24 + self.hd
            niov += 1
        n = readv(self.fd, self.rx_iov, niov)
        self.n_rx_calls += 1
        if n == 0:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u: %s closed the connection in the middle of C2HData",
                     self.qid, self.peer_name)
            self.conn_fail(TCPERR_SOCKET)
            return -1
        if n < 0:
            e = errno
            if e == EAGAIN:
                return -2
            if e == EINTR:
                return 0
            snprintf(self.err_msg, sizeof(self.err_msg), b"NVMe/TCP queue %u: receive from %s: %s",
                     self.qid, self.peer_name, strerror(e))
            self.conn_fail(TCPERR_SOCKET)
            return -1
        self.n_bytes_rx += n
        got = <uint64_t> n
        take = got if got < self.rx_pad_left else self.rx_pad_left
        self.rx_pad_left -= <uint32_t> take
        got -= take
        take = got if got < self.rx_data_left else self.rx_data_left
        if take:
            if self.ddgst:
                self.rx_crc = _payload_crc(req, self.rx_data_off, take, self.rx_crc)
            self.rx_data_off += take
            self.rx_data_left -= take
            got -= take
        if self.ddgst and self.rx_data_left == 0:
            take = got if got < DIGEST_LEN - self.rx_ddgst_have else DIGEST_LEN - self.rx_ddgst_have
            self.rx_ddgst_have += <uint32_t> take
            got -= take
        if (self.rx_pad_left == 0 and self.rx_data_left == 0
                and (not self.ddgst or self.rx_ddgst_have == DIGEST_LEN)):
            self.rx_have = <uint32_t> got        # the next header's first bytes
            self.rx_state = RX_HDR
            self.rx_need = 24 + self.hd
            return self.rx_data_done()
        return -2 if <uint64_t> n < need else 0

    cdef int rx_data_done(self) noexcept nogil:
        cdef uint16_t cid = self.rx_cid
        cdef tcp_cmd* c = &self.cmds[cid]
        cdef nvme_tracker* tr = &self.trackers[cid]
        cdef nvme_cqe cqe
        if not tr.active:
            return 0
        if self.ddgst and (self.rx_crc ^ 0xFFFFFFFFU) != _le32(self.rx_ddgst):
            c.digest_error = 1          # completes with Transient Transport Error
            log_digest_error(self.qid, cid)
        if self.rx_flags & PDU_FLAG_LAST and self.rx_flags & PDU_FLAG_SUCCESS:
            if c.c2h_next != tr.req.len:
                snprintf(self.err_msg, sizeof(self.err_msg),
                         b"NVMe/TCP queue %u (%s): command %u reported success after %llu of "
                         b"its %llu bytes", self.qid, self.peer_name, cid, c.c2h_next,
                         tr.req.len)
                self.rx_have = 0
                return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 1)
            memset(&cqe, 0, sizeof(cqe))
            cqe.cid = cid
            cqe.sqid = self.qid
            return self.finish_command(cid, &cqe)
        return 0

    cdef int on_r2t(self) noexcept nogil:
        cdef tcp_r2t* r = <tcp_r2t*> self.rx_buf
        cdef uint16_t cid = r.cccid
        cdef nvme_request* req
        cdef tcp_cmd* c
        if cid >= self.ntrackers or not self.trackers[cid].active:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): R2T for command %u, which is not outstanding",
                     self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 8)
        req = self.trackers[cid].req
        c = &self.cmds[cid]
        if req.len == 0 or _direction(&req.cmd) != 1:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): R2T for command %u, which writes no data",
                     self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 8)
        if c.r2t_active:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): a second R2T for command %u (MAXR2T is 1)",
                     self.qid, self.peer_name, cid)
            return self.protocol_error(TCPERR_PROTOCOL, FES_LIMIT_EXCEEDED, 8)
        if r.r2tl == 0 or r.r2to != c.h2c_next or <uint64_t> r.r2to + r.r2tl > req.len:
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): R2T for command %u asks for %u bytes at %u; it "
                     b"has %llu bytes, %llu sent", self.qid, self.peer_name, cid, r.r2tl,
                     r.r2to, req.len, c.h2c_next)
            return self.protocol_error(TCPERR_PROTOCOL,
                                       FES_OUT_OF_RANGE if r.r2tl else FES_INVALID_HEADER,
                                       12 if r.r2to != c.h2c_next else 16)
        c.ttag = r.ttag
        c.r2t_end = <uint64_t> r.r2to + r.r2tl
        c.r2t_active = 1
        self.n_r2t += 1
        self.queue_h2c(c, req)
        return 0

    cdef int on_icresp(self) noexcept nogil:
        cdef tcp_icresp* r = <tcp_icresp*> self.rx_buf
        if (r.pfv != 0 or r.cpda > 31 or r.maxh2cdata < MIN_MAXH2CDATA
                or (r.dgst & 1 and not self.want_hdgst) or (r.dgst & 2 and not self.want_ddgst)
                or r.dgst & 0xFC):
            snprintf(self.err_msg, sizeof(self.err_msg),
                     b"NVMe/TCP queue %u (%s): ICResp with PFV %u, CPDA %u, MAXH2CDATA %u, "
                     b"digests 0x%x (asked for 0x%x)", self.qid, self.peer_name, r.pfv, r.cpda,
                     r.maxh2cdata, r.dgst,
                     (1 if self.want_hdgst else 0) | (2 if self.want_ddgst else 0))
            return self.protocol_error(TCPERR_PROTOCOL, FES_INVALID_HEADER, 8)
        self.hdgst = r.dgst & 1
        self.ddgst = (r.dgst >> 1) & 1
        self.hd = DIGEST_LEN if self.hdgst else 0
        self.cpda_align = (<uint32_t> r.cpda + 1) * 4
        self.maxh2cdata = r.maxh2cdata
        self.rx_have = 0
        self.rx_need = 24 + self.hd
        return self.send_connect()

    cdef int on_term(self) noexcept nogil:
        cdef tcp_term* h = <tcp_term*> self.rx_buf
        snprintf(self.err_msg, sizeof(self.err_msg),
                 b"NVMe/TCP queue %u (%s): the target terminated the connection (C2HTermReq, "
                 b"FES 0x%x: %s, FEI 0x%x)", self.qid, self.peer_name, h.fes, _fes_name(h.fes),
                 h.fei)
        self.rx_have = 0
        return self.protocol_error(TCPERR_TERM, 0, 0)

    cdef int finish_command(self, uint16_t cid, const nvme_cqe* cqe) noexcept nogil:
        """The controller is done with command `cid`: complete it, unless data for it is still
        being handed to the kernel (then once it has been)."""
        cdef nvme_tracker* tr = &self.trackers[cid]
        cdef tcp_cmd* c = &self.cmds[cid]
        cdef nvme_cqe e
        if c.tx_busy:
            # the controller answered early (an error): what has not started to go never will
            if c.h2c.queued and c.h2c.sent == 0:
                self.tx_unlink(&c.h2c)
                c.tx_busy -= 1
                c.r2t_active = 0
            if c.capsule.queued and c.capsule.sent == 0:
                self.tx_unlink(&c.capsule)
                c.tx_busy -= 1
            if c.tx_busy:
                c.deferred = cqe[0]
                c.resp_deferred = 1
                return 0
        if c.digest_error and (cqe.status >> 1) & 0x7FF == 0:
            e = cqe[0]
            e.status = (SCT_GENERIC << 9) | (SC_TRANSIENT_TRANSPORT_ERROR << 1)
            self.complete_tracker(tr, &e)
        else:
            self.complete_tracker(tr, cqe)
        return 1

    cdef void complete_ready(self) noexcept nogil:
        cdef nvme_tracker* tr = self.out_head
        cdef nvme_tracker* nxt
        cdef tcp_cmd* c
        cdef nvme_cqe e
        self.has_ready = 0
        while tr != NULL:
            nxt = tr.next
            c = &self.cmds[tr.cid]
            if c.resp_deferred and c.tx_busy == 0:
                c.resp_deferred = 0
                e = c.deferred
                self.finish_command(tr.cid, &e)
            tr = nxt

    cdef void tx_unlink(self, tcp_tx* t) noexcept nogil:
        cdef tcp_tx* p = self.tx_head
        cdef tcp_tx* prev = NULL
        while p != NULL and p != t:
            prev = p
            p = p.next
        if p == NULL:
            return
        if prev == NULL:
            self.tx_head = t.next
        else:
            prev.next = t.next
        if self.tx_tail == t:
            self.tx_tail = prev
        t.next = NULL
        t.queued = 0


    cdef int protocol_error(self, int kind, uint16_t fes, uint32_t fei) noexcept nogil:
        """The target sent something we cannot accept (err_msg says what): H2CTermReq, close."""
        if kind != TCPERR_TERM:
            self.send_term(fes, fei)
        self.conn_fail(kind)
        return -1
