"""A scripted NVMe/TCP peer on loopback, for malformed-PDU fuzzing ONLY.

It is not a target and never stands in for one: everything the transport must do right is
tested against the Linux kernel's nvmet-tcp in the guest (tests/nvme/test_tcp_guest.py). This
peer answers the connection set-up (ICResp, the Fabrics Connect's CapsuleResp) the way a target
would, or with what the test gives instead, then sends exactly the bytes the test scripted, once
the host's command has arrived, and closes. It reads and discards whatever the host sends.
"""
import socket
import struct
import threading

ICRESP = struct.Struct("<BBBBIHBBI112x")        # type flags hlen pdo plen pfv cpda dgst maxh2cdata
CAPSULE_RESP = struct.Struct("<BBBBIIIHHHH")    # ch + CQE (cdw0 cdw1 sqhd sqid cid status)
DATA_HDR = struct.Struct("<BBBBIHHIII")         # ch + cccid ttag datao datal rsvd


def icresp(*, pfv=0, cpda=0, dgst=0, maxh2cdata=0x400000, type_=1, hlen=128, plen=128):
    return ICRESP.pack(type_, 0, hlen, 0, plen, pfv, cpda, dgst, maxh2cdata)


def capsule_resp(cid, status=0, cdw0=0, hdgst=None):
    pdu = CAPSULE_RESP.pack(5, 1 if hdgst else 0, 24, 0, 24 + (4 if hdgst else 0), cdw0, 0, 0,
                            0, cid, status << 1)
    return pdu + (hdgst(pdu) if hdgst else b"")


def c2h_data(cid, datao, data, *, last=True, success=True, hdgst=None, ddgst=None):
    hd = 4 if hdgst else 0
    flags = (4 if last else 0) | (8 if success else 0) | (1 if hdgst else 0) | (2 if ddgst else 0)
    pdo = 24 + hd
    plen = pdo + len(data) + (4 if ddgst else 0)
    hdr = DATA_HDR.pack(7, flags, 24, pdo, plen, cid, 0, datao, len(data), 0)
    return hdr + (hdgst(hdr) if hdgst else b"") + data + (ddgst(data) if ddgst else b"")


def r2t(cid, r2to, r2tl, ttag=1, hdgst=None):
    hdr = DATA_HDR.pack(9, 1 if hdgst else 0, 24, 0, 24 + (4 if hdgst else 0), cid, ttag, r2to,
                        r2tl, 0)
    return hdr + (hdgst(hdr) if hdgst else b"")


class FakePeer:
    """Listens on 127.0.0.1; serves one connection: ICReq -> `icresp_bytes`; the Connect
    capsule -> `connect_bytes` (default: success, CNTLID 1); then, once `trigger` more bytes
    (the host's command) have arrived, `script`; then closes."""

    def __init__(self, *, icresp_bytes=None, connect_bytes=None, script=b"", trigger=72,
                 linger=0.05, hdgst=None):
        self.icresp_bytes = icresp() if icresp_bytes is None else icresp_bytes
        self.connect_bytes = connect_bytes
        self.script = script
        self.trigger = trigger
        self.linger = linger
        self.hdgst = hdgst              # digest function: the Connect response carries one
        self.received = bytearray()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.error = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv_at_least(self, conn, n):
        while len(self.received) < n:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            self.received += chunk
        return True

    def _serve(self):
        conn = None
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            if not self._recv_at_least(conn, 128):
                return
            conn.sendall(self.icresp_bytes)
            # the Connect capsule: 72-byte header (+ digest) + 1024 bytes of data (+ digest)
            if not self._recv_at_least(conn, 128 + 72 + 1024):
                return
            cid = struct.unpack_from("<H", self.received, 128 + 8 + 2)[0]
            conn.sendall(capsule_resp(cid, cdw0=1, hdgst=self.hdgst) if self.connect_bytes is None
                         else self.connect_bytes)
            if self.script:
                connect_len = self._capsule_len(128)
                if not self._recv_at_least(conn, 128 + connect_len + self.trigger):
                    return
                conn.sendall(self.script)
            conn.settimeout(self.linger)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        except OSError as e:
            self.error = e
        finally:
            if conn is not None:
                conn.close()
            self.listener.close()

    def _capsule_len(self, off):
        return struct.unpack_from("<I", self.received, off + 4)[0]

    def join(self, timeout=10):
        self.thread.join(timeout)
