# NVMe/TCP: the PDUs of the NVMe/TCP Transport Specification 1.0 as C structs, and the queue pair
# that carries NVMe commands over one TCP connection. See tcp.pyx. Multi-byte fields are
# little-endian on the wire, as on the hosts we build for (x86-64).
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from nvme.qpair cimport QueuePair, nvme_request, nvme_tracker
from nvme.spec cimport nvme_cqe, nvme_sqe
from nvme.transport cimport Transport

cdef enum:
    # PDU types (TCP transport spec, figure "PDU Type")
    PDU_ICREQ = 0x00
    PDU_ICRESP = 0x01
    PDU_H2C_TERM = 0x02
    PDU_C2H_TERM = 0x03
    PDU_CAPSULE_CMD = 0x04
    PDU_CAPSULE_RESP = 0x05
    PDU_H2C_DATA = 0x06
    PDU_C2H_DATA = 0x07
    PDU_R2T = 0x09
    # common header flags
    PDU_FLAG_HDGST = 0x01
    PDU_FLAG_DDGST = 0x02
    PDU_FLAG_LAST = 0x04         # H2CData / C2HData: the last PDU of this transfer
    PDU_FLAG_SUCCESS = 0x08      # C2HData: the command succeeded, no CapsuleResp follows
    # fatal error status of a TermReq
    FES_INVALID_HEADER = 0x01
    FES_PDU_SEQUENCE = 0x02
    FES_HDGST = 0x03
    FES_OUT_OF_RANGE = 0x04
    FES_LIMIT_EXCEEDED = 0x05
    FES_UNSUPPORTED_PARAM = 0x06

    DIGEST_LEN = 4
    TERM_MAX_PLEN = 152          # a TermReq carries at most 128 bytes of the offending header
    PDU_HDR_MAX = 152            # the longest header we send or receive (a TermReq)

    # connection states of a TcpQueuePair
    CONN_DOWN = 0                # no socket
    CONN_CONNECTING = 1          # TCP connect() in progress
    CONN_ICREQ = 2               # ICReq sent, waiting for ICResp
    CONN_FABRICS = 3             # Fabrics Connect outstanding
    CONN_LIVE = 4

    # why a connection ended (TcpQueuePair.err_kind)
    TCPERR_NONE = 0
    TCPERR_SOCKET = 1            # connect/send/recv failed, or the peer closed
    TCPERR_PROTOCOL = 2          # the target sent something malformed
    TCPERR_DIGEST = 3            # a header digest did not match
    TCPERR_TERM = 4              # the target sent C2HTermReq
    TCPERR_TIMEOUT = 5           # connect, ICResp or Connect took too long
    TCPERR_REJECTED = 6          # Fabrics Connect completed with an error status
    TCPERR_LOCAL = 7             # closed by us (shutdown, association gone)

cdef packed struct tcp_ch:         # common header, 8 bytes
    uint8_t type
    uint8_t flags
    uint8_t hlen
    uint8_t pdo
    uint32_t plen

cdef packed struct tcp_icreq:      # 128 bytes
    tcp_ch ch
    uint16_t pfv
    uint8_t hpda
    uint8_t dgst
    uint32_t maxr2t
    uint8_t rsvd[112]

cdef packed struct tcp_icresp:     # 128 bytes
    tcp_ch ch
    uint16_t pfv
    uint8_t cpda
    uint8_t dgst
    uint32_t maxh2cdata
    uint8_t rsvd[112]

cdef packed struct tcp_capsule_cmd:    # 72 bytes
    tcp_ch ch
    nvme_sqe sqe

cdef packed struct tcp_capsule_resp:   # 24 bytes
    tcp_ch ch
    nvme_cqe cqe

cdef packed struct tcp_data_hdr:   # H2CData and C2HData (ttag reserved in C2HData), 24 bytes
    tcp_ch ch
    uint16_t cccid
    uint16_t ttag
    uint32_t datao
    uint32_t datal
    uint32_t rsvd

cdef packed struct tcp_r2t:        # 24 bytes
    tcp_ch ch
    uint16_t cccid
    uint16_t ttag
    uint32_t r2to
    uint32_t r2tl
    uint32_t rsvd

cdef packed struct tcp_term:       # TermReq header, 24 bytes (+ up to 128 bytes of data)
    tcp_ch ch
    uint16_t fes
    uint32_t fei
    uint8_t rsvd[10]

# One PDU to send: a header we built (with its digest and padding), then optionally a slice of a
# request's payload (sent straight from the caller's buffers) and its data digest.
cdef struct tcp_tx:
    uint8_t hdr[PDU_HDR_MAX]
    uint32_t hdr_len             # header + header digest + padding
    uint32_t data_len
    uint64_t data_off            # offset of the slice in the request's payload
    nvme_request* req            # whose payload, or NULL
    uint8_t ddgst[DIGEST_LEN]
    uint8_t has_ddgst
    uint8_t queued
    uint8_t kind                 # TX_CAPSULE, TX_H2C, TX_CONTROL
    uint16_t cid
    uint64_t total               # hdr_len + data_len (+ 4)
    uint64_t sent                # bytes handed to the kernel
    tcp_tx* next

# NVMe/TCP state of one command (one per tracker / CID)
cdef struct tcp_cmd:
    tcp_tx capsule
    tcp_tx h2c
    nvme_cqe deferred            # a response that came while our data was still being sent
    uint64_t c2h_next            # the DATAO the next C2HData must carry
    uint64_t h2c_next            # where the next H2CData starts
    uint64_t r2t_end             # end of the data the active R2T asked for
    uint16_t ttag
    uint8_t r2t_active
    uint8_t resp_deferred
    uint8_t digest_error         # a data digest did not match: complete with an error
    uint8_t tx_busy              # PDUs of this command still in the send queue

# What one controller association shares with its queue pairs (written by the admin side,
# read by each queue pair's owner thread without locks: single words, x86 ordering).
cdef struct tcp_assoc:
    uint32_t epoch               # bumped when an association is torn down
    uint32_t ready_epoch         # == epoch once the admin queue is up: I/O queues may connect
    uint32_t lost_epoch          # set by a queue pair that lost its connection in that epoch
    uint16_t cntlid
    uint8_t fail_io              # fast_io_fail_timeout_sec passed: queued I/O fails
    uint8_t dead                 # the controller failed or is detached


cdef class TcpTransport(Transport):
    cdef public object controller_ref        # weak reference to the controller (properties)


cdef class TcpAssociation:
    cdef tcp_assoc* a


cdef class TcpQueuePair(QueuePair):
    cdef tcp_cmd* cmds
    # connection
    cdef int fd
    cdef int conn_state
    cdef uint32_t conn_epoch
    cdef tcp_assoc* assoc
    cdef object assoc_ref
    cdef uint8_t peer[128]               # sockaddr_in / sockaddr_in6
    cdef uint32_t peer_len
    cdef int family
    cdef char peer_name[96]              # "127.0.0.1:4420" for messages
    cdef uint64_t connect_timeout_ns
    cdef uint64_t conn_deadline_ns
    cdef bint requeue_on_loss            # I/O queues: keep requests across a reconnect
    cdef bint auto_reconnect             # I/O queues: reconnect when the association is ready
    cdef uint32_t failed_epoch           # a connect attempt failed in this epoch: wait for the next
    # negotiated (ICReq/ICResp)
    cdef uint8_t want_hdgst
    cdef uint8_t want_ddgst
    cdef uint8_t hdgst
    cdef uint8_t ddgst
    cdef uint32_t hd                     # 4 when header digests are on
    cdef uint32_t cpda_align             # data in H2C PDUs starts at a multiple of this
    cdef uint32_t maxh2cdata
    cdef uint32_t icd_max                # in-capsule data the controller accepts
    cdef uint32_t icd_conf               # what the owner configured (0: none)
    # Fabrics Connect
    cdef nvme_request* connect_req       # reserved: never in the pool
    cdef uint8_t connect_data[1024]
    cdef uint16_t sqsize                 # 0's based
    cdef uint32_t kato
    cdef uint8_t cattr
    cdef readonly uint16_t cntlid        # from the admin queue's Connect response
    # send queue
    cdef tcp_tx* tx_head
    cdef tcp_tx* tx_tail
    cdef tcp_tx ctl                      # ICReq / H2CTermReq
    cdef iovec* tx_iov
    # receive
    cdef uint8_t rx_buf[256]
    cdef uint32_t rx_have
    cdef uint32_t rx_need
    cdef int rx_state
    cdef uint16_t rx_cid
    cdef uint8_t rx_flags
    cdef uint32_t rx_pad_left
    cdef uint64_t rx_data_off            # where the rest of the data goes in the payload
    cdef uint64_t rx_data_left
    cdef uint32_t rx_ddgst_have
    cdef uint8_t rx_ddgst[DIGEST_LEN]
    cdef uint32_t rx_crc
    cdef uint8_t rx_scratch[256]         # PDU padding is read into here
    cdef iovec* rx_iov
    cdef uint16_t ready_head             # commands whose deferred response may complete now
    cdef uint8_t has_ready
    # errors and counters
    cdef readonly int err_kind
    cdef char err_msg[320]
    cdef uint64_t n_pdus_rx
    cdef uint64_t n_pdus_tx
    cdef uint64_t n_rx_calls
    cdef uint64_t n_tx_calls
    cdef uint64_t n_bytes_rx
    cdef uint64_t n_bytes_tx
    cdef uint64_t n_conn_lost
    cdef uint64_t n_requeued
    cdef uint64_t n_r2t
    cdef uint64_t n_in_capsule

    # connection
    cdef int conn_start(self) noexcept nogil
    cdef int conn_step(self) noexcept nogil
    cdef void conn_fail(self, int kind) noexcept nogil
    cdef void conn_close(self) noexcept nogil
    cdef void conn_release(self) noexcept nogil
    cdef void untrack(self, nvme_tracker* tr) noexcept nogil
    cdef void _untrack_connect(self) noexcept nogil
    cdef void send_icreq(self) noexcept nogil
    cdef int send_connect(self) noexcept nogil
    cdef void connect_done(self, const nvme_cqe* cpl) noexcept nogil
    cdef void check_assoc(self) noexcept nogil
    cdef void fail_queued(self, uint16_t sct, uint16_t sc) noexcept nogil
    # send
    cdef void tx_push(self, tcp_tx* t) noexcept nogil
    cdef int tx_flush(self) noexcept nogil
    cdef void tx_done(self, tcp_tx* t) noexcept nogil
    cdef void tx_unlink(self, tcp_tx* t) noexcept nogil
    cdef void queue_h2c(self, tcp_cmd* c, nvme_request* req) noexcept nogil
    cdef void send_term(self, uint16_t fes, uint32_t fei) noexcept nogil
    # receive
    cdef int rx_poll(self, uint32_t max_completions) noexcept nogil
    cdef int rx_header(self) noexcept nogil
    cdef int rx_data(self) noexcept nogil
    cdef int rx_data_done(self) noexcept nogil
    cdef int on_capsule_resp(self) noexcept nogil
    cdef int on_c2h_data(self) noexcept nogil
    cdef int on_r2t(self) noexcept nogil
    cdef int on_icresp(self) noexcept nogil
    cdef int on_term(self) noexcept nogil
    cdef int finish_command(self, uint16_t cid, const nvme_cqe* cqe) noexcept nogil
    cdef void complete_ready(self) noexcept nogil
    cdef int protocol_error(self, int kind, uint16_t fes, uint32_t fei) noexcept nogil
