"""NVMe over Fabrics pieces that need no target: transport IDs, the reconnect knobs' rules (as
SPDK checks them), socket addresses, the Connect data, the discovery log page's layout, and the
TCP queue pair's checks of its own arguments."""
import struct
import uuid

import pytest

from env.errors import InvalidArgument
from nvme.discovery import DiscoveryLog
from nvme.fabrics import NQN_DISCOVERY, FabricsOptions, TransportId
from nvme.tcp import _connect_data, sockaddr_of


# ---- transport IDs ------------------------------------------------------------------------------
def test_transport_id_string():
    t = TransportId.parse("trtype:TCP adrfam:IPv4 traddr:10.0.0.2 trsvcid:4421 subnqn:nqn.a:b")
    assert (t.traddr, t.trsvcid, t.adrfam, t.subnqn) == ("10.0.0.2", "4421", "IPv4", "nqn.a:b")
    assert str(t) == "trtype:TCP adrfam:IPv4 traddr:10.0.0.2 trsvcid:4421 subnqn:nqn.a:b"
    assert TransportId.parse(str(t)) == t


def test_transport_id_defaults_like_spdk():
    t = TransportId.parse("trtype:tcp traddr:127.0.0.1")
    assert t.trsvcid == "4420" and t.adrfam == "IPv4" and t.subnqn == NQN_DISCOVERY


def test_transport_id_ipv6():
    t = TransportId.parse("trtype:TCP adrfam:ipv6 traddr:fe80::1 trsvcid:4420 subnqn:nqn.a:b")
    assert t.traddr == "fe80::1" and t.adrfam == "IPv6"


@pytest.mark.parametrize("text,words", [
    ("trtype:RDMA traddr:10.0.0.1", "not TCP"),
    ("trtype:TCP", "needs traddr"),
    ("trtype:TCP traddr:10.0.0.300", "not an IPv4 address"),
    ("trtype:TCP traddr:10.0.0.1 trsvcid:70000", "not a TCP port"),
    ("trtype:TCP traddr:10.0.0.1 trsvcid:http", "port number"),
    ("trtype:TCP traddr:10.0.0.1 adrfam:IB", "IPv4 or IPv6"),
    ("trtype:TCP traddr:10.0.0.1 colour:blue", "unknown key 'colour'"),
    ("trtype:TCP traddr:10.0.0.1 traddr:10.0.0.2", "traddr given twice"),
    ("trtype:TCP traddr", "is not key:value"),
    ("trtype:TCP traddr:10.0.0.1 subnqn:" + "x" * 300, "subnqn must be an NQN"),
    ("", "non-empty string"),
])
def test_bad_transport_ids_say_what_is_wrong(text, words):
    with pytest.raises(InvalidArgument, match=words):
        TransportId.parse(text)


# ---- reconnect knobs: SPDK's rules ---------------------------------------------------------------
@pytest.mark.parametrize("loss,delay,fast", [(0, 0, 0), (-1, 1, 0), (-1, 2, 5), (10, 1, 0),
                                             (10, 2, 5), (10, 10, 10)])
def test_valid_reconnect_knobs(loss, delay, fast):
    FabricsOptions(ctrlr_loss_timeout_sec=loss, reconnect_delay_sec=delay,
                   fast_io_fail_timeout_sec=fast).check()


@pytest.mark.parametrize("loss,delay,fast,words", [
    (-2, 1, 0, "less than -1"),
    (0, 1, 0, "must be 0 when ctrlr_loss_timeout_sec is 0"),
    (0, 0, 3, "must be 0 when ctrlr_loss_timeout_sec is 0"),
    (10, 0, 0, "reconnect_delay_sec can't be 0"),
    (-1, 0, 0, "reconnect_delay_sec can't be 0"),
    (5, 10, 0, "can't be more than ctrlr_loss_timeout_sec"),
    (10, 5, 2, "can't be more than fast_io_fail_timeout_sec"),
    (10, 2, 20, "fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec"),
])
def test_invalid_reconnect_knobs(loss, delay, fast, words):
    with pytest.raises(InvalidArgument, match=words):
        FabricsOptions(ctrlr_loss_timeout_sec=loss, reconnect_delay_sec=delay,
                       fast_io_fail_timeout_sec=fast).check()


def test_option_types_are_checked():
    with pytest.raises(InvalidArgument, match="hdgst must be true or false"):
        FabricsOptions(hdgst="yes").check()
    with pytest.raises(InvalidArgument, match="ctrlr_loss_timeout_sec must be an integer"):
        FabricsOptions(ctrlr_loss_timeout_sec=1.5).check()
    with pytest.raises(InvalidArgument, match="hostnqn must be an NQN"):
        FabricsOptions(hostnqn="").check()
    with pytest.raises(InvalidArgument, match="hostid must be a UUID"):
        FabricsOptions(hostid="not-a-uuid").check()
    assert FabricsOptions(hostid=str(uuid.UUID(int=5))).check().hostid == uuid.UUID(int=5)
    with pytest.raises(InvalidArgument, match="bad controller options"):
        FabricsOptions.coerce({"colour": 1})


def test_tcp_controller_rejects_bad_knobs_before_connecting():
    from nvme.fabrics import TcpController
    with pytest.raises(InvalidArgument, match="reconnect_delay_sec can't be 0"):
        TcpController("trtype:TCP traddr:127.0.0.1 subnqn:nqn.a:b",
                      {"ctrlr_loss_timeout_sec": 5})


# ---- wire layouts -------------------------------------------------------------------------------
def test_sockaddr_layouts():
    import socket
    fam, sa, name = sockaddr_of("10.1.2.3", 4420)
    assert fam == socket.AF_INET and name == "10.1.2.3:4420" and len(sa) == 16
    assert sa[2:4] == (4420).to_bytes(2, "big") and sa[4:8] == bytes([10, 1, 2, 3])
    fam, sa, name = sockaddr_of("::1", "8009", "IPv6")
    assert fam == socket.AF_INET6 and len(sa) == 28 and sa[8:24] == socket.inet_pton(
        socket.AF_INET6, "::1")


def test_connect_data_layout():
    hostid = uuid.uuid4().bytes
    d = _connect_data(hostid, 0xFFFF, "nqn.sub:x", "nqn.host:y")
    assert len(d) == 1024 and d[:16] == hostid and d[16:18] == b"\xff\xff"
    assert d[256:265] == b"nqn.sub:x" and d[265] == 0
    assert d[512:522] == b"nqn.host:y" and not any(d[18:256]) and not any(d[768:])
    with pytest.raises(InvalidArgument, match="subnqn must be 1 to 223 bytes"):
        _connect_data(hostid, 1, "n" * 224, "nqn.h")


def _entry(trtype=3, adrfam=1, subtype=2, treq=4, portid=1, cntlid=0xFFFF, asqsz=32,
           trsvcid=b"4420", subnqn=b"nqn.a:b", traddr=b"10.0.0.2"):
    e = bytearray(1024)
    struct.pack_into("<BBBBHHHH", e, 0, trtype, adrfam, subtype, treq, portid, cntlid, asqsz, 0)
    e[32:32 + len(trsvcid)] = trsvcid
    e[256:256 + len(subnqn)] = subnqn
    e[512:512 + len(traddr)] = traddr
    return bytes(e)


def test_discovery_log_page():
    head = bytearray(1024)
    struct.pack_into("<QQH", head, 0, 7, 2, 0)
    page = bytes(head) + _entry(subtype=3, subnqn=NQN_DISCOVERY.encode()) + _entry()
    log = DiscoveryLog.parse(page)
    assert log.genctr == 7 and log.numrec == 2
    e = log.entries[1]
    assert (e.subnqn, e.traddr, e.trsvcid, e.portid) == ("nqn.a:b", "10.0.0.2", "4420", 1)
    assert e.to_dict()["treq"] == "not specified, sq flow control disable supported"
    assert e.to_dict()["subtype"] == "nvme subsystem" and e.to_dict()["trtype"] == "tcp"
    assert e.trid == "trtype:TCP adrfam:IPv4 traddr:10.0.0.2 trsvcid:4420 subnqn:nqn.a:b"
    assert log.to_dict()["records"][0]["subtype"] == "current discovery subsystem"
    text = log.format_text()
    assert "Discovery Log Number of Records 2, Generation counter 7" in text
    assert "=====Discovery Log Entry 1======" in text and "subnqn:  nqn.a:b" in text


def test_a_short_discovery_log_page_is_refused():
    from nvme.errors import DataFormatError
    head = bytearray(1024)
    struct.pack_into("<QQH", head, 0, 1, 3, 0)
    with pytest.raises(DataFormatError, match="says 3 records but holds 1"):
        DiscoveryLog.parse(bytes(head) + _entry())
    with pytest.raises(DataFormatError, match="header is 1024 bytes"):
        DiscoveryLog.parse(bytes(100))


# ---- the queue pair's own checks -----------------------------------------------------------------
def test_tcp_queue_pair_argument_checks():
    from nvme.tcp import TcpQueuePair, TcpTransport
    qp = TcpQueuePair(TcpTransport("t"), 1, 8, cq_batch=0)
    with pytest.raises(InvalidArgument, match="configure"):
        qp.start_connect()
    fam, sa, name = sockaddr_of("127.0.0.1", 4420)
    with pytest.raises(InvalidArgument, match="hostid must be 16 bytes"):
        qp.configure(fam, sa, name, subnqn="nqn.a:b", hostnqn="nqn.a:c", hostid=b"x")
    with pytest.raises(InvalidArgument, match="connect timeout must be positive"):
        qp.configure(fam, sa, name, subnqn="nqn.a:b", hostnqn="nqn.a:c", hostid=bytes(16),
                     connect_timeout_s=0)
    assert qp.connection == "down" and qp.error is None and not qp.live
