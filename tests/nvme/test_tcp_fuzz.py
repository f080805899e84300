"""A target that answers garbage: malformed PDUs (bad types, lengths, offsets, command ids,
digests, truncated streams) must end the connection with a clear error, complete every command
exactly once, and never write outside the command's buffer or crash the process.

The peer here is a scripted socket (tests/nvme/fake_tcp_target.py), only for this; the protocol
itself is tested against the kernel's nvmet-tcp in test_tcp_guest.py. Runs on any host: no root,
no guest (loopback TCP).
"""
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from env.crc32c import crc32c
from env.memory import allocate
from nvme.errors import TransportError
from tests.nvme.fake_tcp_target import (DATA_HDR, FakePeer, c2h_data, capsule_resp, icresp, r2t)

READ_LEN = 8192
GUARD = 4096
CID = 0          # the first free command id after Connect's completion


def _digest(b):
    return struct.pack("<I", crc32c(b))


def make_qpair(peer, *, hdgst=False, ddgst=False, in_capsule=4096):
    from nvme.tcp import TcpQueuePair, TcpTransport, sockaddr_of
    family, sa, name = sockaddr_of("127.0.0.1", peer.port)
    qp = TcpQueuePair(TcpTransport("fuzz"), 1, 16, cq_batch=0, max_transfer=1 << 20)
    qp.configure(family, sa, name, subnqn="nqn.2024-01.io.userblk:fuzz",
                 hostnqn="nqn.2024-01.io.userblk:host", hostid=bytes(16), cntlid=1,
                 hdgst=hdgst, ddgst=ddgst, connect_timeout_s=5.0, in_capsule=in_capsule)
    return qp


class Guarded:
    """A payload of `n` bytes with guard zones before and after it."""

    def __init__(self, n, fill=0x5A):
        self.n = n
        self.buf = allocate(n + 2 * GUARD)
        mv = memoryview(self.buf)
        mv[:] = bytes([fill]) * len(mv)
        mv.release()

    def guards_intact(self, fill=0x5A):
        mv = memoryview(self.buf)
        try:
            return (bytes(mv[:GUARD]) == bytes([fill]) * GUARD
                    and bytes(mv[GUARD + self.n:]) == bytes([fill]) * GUARD)
        finally:
            mv.release()


def run_command(peer, *, write=False, hdgst=False, ddgst=False, timeout=10.0):
    """Connect, submit one read (or write) of READ_LEN bytes, poll until the connection is gone
    and the command has completed; returns (completions, qpair, guarded buffer)."""
    qp = make_qpair(peer, hdgst=hdgst, ddgst=ddgst)
    qp.connect()
    g = Guarded(READ_LEN)
    done = []
    opc = 0x01 if write else 0x02
    qp.submit_nvm(opc, 1, 0, READ_LEN // 512, 9, g.buf, GUARD, cb=done.append)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (qp.live or not done):
        qp.process_completions()
        if done and not qp.live:
            break
        time.sleep(0.0002)
    return done, qp, g


def check_outcome(done, qp, g):
    assert len(done) == 1, f"{len(done)} completions"
    assert g.guards_intact(), "bytes were written outside the command's buffer"
    if not qp.live:
        assert qp.error in ("protocol", "digest", "socket", "terminated"), qp.error
        assert qp.error_message and "NVMe/TCP queue 1" in qp.error_message
    s = qp.stats()
    assert s["outstanding"] == 0 and s["queued"] == 0
    qp.destroy()


# ---- hand-written cases: each malformation gets its own clear message ---------------------------
def test_a_well_formed_read_completes():
    data = bytes(range(256)) * (READ_LEN // 256)
    peer = FakePeer(script=c2h_data(CID, 0, data))
    done, qp, g = run_command(peer)
    assert done[0].ok
    mv = memoryview(g.buf)
    assert bytes(mv[GUARD:GUARD + READ_LEN]) == data
    mv.release()
    check_outcome(done, qp, g)


@pytest.mark.parametrize("script,error,words", [
    (b"\x42" + bytes(23), "protocol", "unexpected PDU type 0x42"),
    (capsule_resp(CID)[:2] + b"\x30" + capsule_resp(CID)[3:], "protocol", "HLEN 48"),
    (capsule_resp(7), "protocol", "command 7, which is not outstanding"),
    (c2h_data(CID, 4096, bytes(4096)), "protocol", "expected DATAO 0"),
    (c2h_data(CID, 0, bytes(READ_LEN + 512)), "protocol", "beyond its 8192 bytes"),
    (c2h_data(CID, 0, bytes(4096), last=True, success=True), "protocol",
     "success after 4096 of its 8192 bytes"),
    (c2h_data(CID, 0, bytes(512), last=False, success=True), "protocol", "flags 0x08"),
    (r2t(CID, 0, 4096), "protocol", "writes no data"),
    (DATA_HDR.pack(7, 0x0C, 24, 20, 24 + 8192, CID, 0, 0, 8192, 0), "protocol", "PDO 20"),
    (DATA_HDR.pack(7, 0x0C, 24, 24, 24, CID, 0, 0, 0, 0), "protocol", "PLEN 24"),
    (struct.pack("<BBBBIHI10x", 3, 0, 24, 0, 28, 2, 0) + bytes(4), "terminated", "FES 0x2"),
    (c2h_data(CID, 0, bytes(1000), last=False, success=False), "socket", "closed the connection"),
])
def test_malformed_pdus_end_the_connection_with_a_clear_error(script, error, words):
    peer = FakePeer(script=script)
    done, qp, g = run_command(peer)
    assert not qp.live and qp.error == error
    assert words in qp.error_message, qp.error_message
    assert not done[0].ok                    # ABORTED - SQ DELETION: the connection is gone
    check_outcome(done, qp, g)


def test_a_bad_header_digest_ends_the_connection():
    hdr = capsule_resp(CID)
    bad = hdr[:1] + b"\x01" + hdr[2:4] + struct.pack("<I", 28) + hdr[8:] + b"\0\0\0\0"
    peer = FakePeer(icresp_bytes=icresp(dgst=1), script=bad, hdgst=_digest)
    done, qp, g = run_command(peer, hdgst=True)
    assert qp.error == "digest" and "header digest mismatch" in qp.error_message
    check_outcome(done, qp, g)


def test_a_bad_data_digest_fails_the_command_only():
    data = bytes(READ_LEN)
    good = c2h_data(CID, 0, data, hdgst=_digest, ddgst=_digest)
    bad = good[:-4] + b"\xde\xad\xbe\xef"
    peer = FakePeer(icresp_bytes=icresp(dgst=3), script=bad, linger=0.5, hdgst=_digest)
    done, qp, g = run_command(peer, hdgst=True, ddgst=True, timeout=3)
    assert len(done) == 1 and done[0].sct == 0 and done[0].sc == 0x22   # Transient Transport Error
    check_outcome(done, qp, g)


def test_an_r2t_beyond_the_data_is_refused():
    peer = FakePeer(script=r2t(CID, 0, READ_LEN + 4096))
    done, qp, g = run_command(peer, write=True)
    assert qp.error == "protocol" and "asks for 12288 bytes at 0" in qp.error_message
    check_outcome(done, qp, g)


def test_a_second_r2t_while_one_is_active_is_refused():
    peer = FakePeer(script=r2t(CID, 0, 4096) + r2t(CID, 0, 4096))
    done, qp, g = run_command(peer, write=True)
    # whether the first R2T's H2CData has left yet or not, the second is refused: a second
    # active R2T, or one that does not start where the data stands
    assert qp.error == "protocol" and "R2T for command 0" in qp.error_message
    check_outcome(done, qp, g)


@pytest.mark.parametrize("resp,words", [
    (icresp(pfv=1), "PFV 1"),
    (icresp(maxh2cdata=512), "MAXH2CDATA 512"),
    (icresp(cpda=40), "CPDA 40"),
    (icresp(dgst=2), "digests 0x2"),
    (icresp(type_=5), "unexpected PDU type 0x05 before ICResp"),
    (icresp(plen=4096), "PLEN 4096"),
])
def test_a_bad_icresp_refuses_the_connection(resp, words):
    peer = FakePeer(icresp_bytes=resp)
    qp = make_qpair(peer)
    with pytest.raises(TransportError, match="ICResp|PDU type|PLEN") as e:
        qp.connect()
    assert e.value.kind == "protocol" and words in str(e.value)
    qp.destroy()


def test_a_rejected_connect_says_so():
    peer = FakePeer(connect_bytes=capsule_resp(0, status=(1 << 8) | 0x82))
    qp = make_qpair(peer)
    with pytest.raises(TransportError, match="Fabrics Connect rejected: SCT 1 SC 0x82") as e:
        qp.connect()
    assert e.value.kind == "rejected"
    qp.destroy()


def test_a_silent_peer_times_out():
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    from nvme.tcp import TcpQueuePair, TcpTransport, sockaddr_of
    family, sa, name = sockaddr_of("127.0.0.1", srv.getsockname()[1])
    qp = TcpQueuePair(TcpTransport("fuzz"), 0, 4, cq_batch=0)
    qp.configure(family, sa, name, subnqn="nqn.a:b", hostnqn="nqn.a:c", hostid=bytes(16),
                 connect_timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="ICReq/ICResp did not complete within 0.3 s"):
        qp.connect()
    assert time.monotonic() - t0 < 3
    srv.close()


# ---- random garbage ---------------------------------------------------------------------------
PDU_TYPES = st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A,
                             0x7F, 0xFF])


@st.composite
def pdus(draw):
    """A PDU whose header fields are drawn around the valid ones (and sometimes anywhere)."""
    t = draw(PDU_TYPES)
    hlen = draw(st.sampled_from([24, 128, 0, 8, 23, 25, 255]))
    datal = draw(st.sampled_from([0, 512, 4096, 8192, 8704, 0xFFFFFFFF])
                 | st.integers(0, (1 << 32) - 1))
    datao = draw(st.sampled_from([0, 4096, 8191, 0xFFFFFFF0]) | st.integers(0, (1 << 32) - 1))
    pdo = draw(st.sampled_from([0, 24, 28, 32, 255]) | st.integers(0, 255))
    flags = draw(st.integers(0, 255))
    cid = draw(st.sampled_from([CID, 1, 15, 0xFFFF]))
    body = draw(st.binary(max_size=64))
    payload_len = draw(st.sampled_from([0, 16, 512, 4096]))
    plen = draw(st.sampled_from([24, 28, 24 + payload_len, pdo + datal if datal < 1 << 20 else 24,
                                 0, 0xFFFFFFFF]))
    hdr = DATA_HDR.pack(t, flags, hlen, pdo, plen & 0xFFFFFFFF, cid, 0, datao & 0xFFFFFFFF,
                        datal & 0xFFFFFFFF, 0)
    if t == 0x05:
        hdr = capsule_resp(cid, status=draw(st.integers(0, 0x7FFF)))[:24]
        hdr = bytes([t, flags & 0x0E, hlen]) + hdr[3:]
    return hdr + body + bytes(payload_len)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(pdus(), min_size=1, max_size=3), st.booleans(), st.booleans())
def test_random_pdus_never_crash_or_overrun(script, prefix_valid_data, write):
    if prefix_valid_data and not write:
        script = [c2h_data(CID, 0, bytes(4096), last=False, success=False)] + script
    peer = FakePeer(script=b"".join(script))
    done, qp, g = run_command(peer, write=write, timeout=5)
    check_outcome(done, qp, g)
    peer.join()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_after_the_command_never_crash(junk):
    peer = FakePeer(script=junk)
    done, qp, g = run_command(peer, timeout=5)
    check_outcome(done, qp, g)
    peer.join()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 127), st.integers(0, 255))
def test_mutated_icresp_never_crashes(pos, value):
    resp = bytearray(icresp())
    resp[pos] = value
    peer = FakePeer(icresp_bytes=bytes(resp))
    qp = make_qpair(peer)
    try:
        qp.connect()
    except TransportError as e:
        assert e.kind in ("protocol", "socket", "timeout", "rejected") and str(e)
    qp.destroy()
    peer.join()
