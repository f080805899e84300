"""The NVMe/TCP transport against the Linux kernel's NVMe over Fabrics target (nvmet-tcp), inside
the test guest, with the kernel's own NVMe/TCP initiator as the reference.

The target is configured through configfs on loopback: one subsystem whose namespace is the
guest's QEMU NVMe namespace (/dev/nvme0n1). Identify through our transport must equal what the
kernel initiator reports (`nvme id-ctrl` / `id-ns` after `nvme connect -t tcp`); data written by
either initiator is read back by the other; then every transfer size from 512 B to beyond the
largest transfer (in-capsule writes, R2T and H2CData, C2HData, splits), vectored and unaligned
buffers, header and data digests, queue depths beyond the queue, several queue pairs on several
threads, Write Zeroes / Deallocate / Flush, refused connections, detach with I/O in flight,
discovery against `nvme discover`, and the `userblk identify` / `userblk discover` commands.
"""
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from env.memory import allocate
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST, kernel_read, kernel_write
from tests.nvme.nvmet import KernelInitiator, NvmetTarget

pytestmark = [pytest.mark.guest(nvme_ns=1, nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

KiB, MiB = 1024, 1 << 20


class AdminPoller:
    """What the bdev module's admin poller does for a controller used directly: poll_admin
    (Keep Alive every KATO/2, events, reconnects) every 20 ms, on its own thread."""

    def __init__(self, ctrlr):
        self.ctrlr = ctrlr
        self.stop = threading.Event()
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.02):
            try:
                self.ctrlr.poll_admin()
            except Exception as e:          # noqa: BLE001 - reported by the fixture
                self.errors.append(e)

    def close(self):
        self.stop.set()
        self.thread.join(5)


@pytest.fixture(scope="module")
def target():
    t = NvmetTarget(device="/dev/nvme0n1").setup()
    yield t
    t.teardown()


@pytest.fixture(scope="module")
def kernel(target):
    k = KernelInitiator(target).connect()
    yield k
    k.disconnect()


def _connect(target, **options):
    import nvme
    return nvme.connect(target.trid, options or None)


@pytest.fixture(scope="module")
def ctrlr(target):
    c = _connect(target)
    poller = AdminPoller(c)
    yield c
    poller.close()
    assert not poller.errors, poller.errors
    c.detach()


@pytest.fixture(scope="module")
def qp(ctrlr):
    return ctrlr.create_io_qpair(128)


@pytest.fixture(scope="module")
def ns(ctrlr):
    return ctrlr.namespace(1)


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


def fill(buf, data, offset=0):
    mv = memoryview(buf)
    mv[offset:offset + len(data)] = data
    mv.release()


def content(buf, offset=0, n=None):
    mv = memoryview(buf)
    try:
        return bytes(mv[offset:offset + (len(buf) - offset if n is None else n)])
    finally:
        mv.release()


def write_read(ns, qp, data, lba, *, offset=0):
    """Write `data` at `lba` from `offset` in a DMA buffer, read it back into another."""
    n = len(data)
    out = allocate(n + offset + 4096)
    fill(out, data, offset)
    ns.write_sync(qp, out, lba, n // ns.block_size, offset=offset)
    back = allocate(n + offset + 4096)
    fill(back, bytes(n), offset)
    ns.read_sync(qp, back, lba, n // ns.block_size, offset=offset)
    return content(back, offset, n)


# ---- bring-up and Identify --------------------------------------------------------------------
def _norm(v):
    # nvme-cli prints 128-bit fields (tnvmcap, ...) as decimal strings
    if isinstance(v, str):
        v = v.strip()
        return int(v) if v.isdigit() else v
    return v


def test_identify_controller_matches_the_kernel_initiator(ctrlr, kernel):
    ours = ctrlr.data.to_dict()
    theirs = kernel.id_ctrl()
    # CNTLID differs by design: each association gets its own controller (dynamic model)
    compared = sorted(k for k in theirs if k in ours and k not in ("cntlid", "psds"))
    assert len(compared) >= 40, f"too few common keys: {compared}"
    diffs = {k: (ours[k], theirs[k]) for k in compared if _norm(ours[k]) != _norm(theirs[k])}
    assert not diffs
    assert ours["subnqn"] == ctrlr.trid.subnqn and ours["mn"].strip() == "Linux"
    assert ours["cntlid"] != theirs["cntlid"]
    for key in ("ioccsz", "iorcsz", "icdoff", "msdbd"):         # the Fabrics fields
        assert key in compared


def test_identify_namespace_matches_the_kernel_initiator(ns, kernel):
    ours = ns.data.to_dict()
    theirs = kernel.id_ns(1)
    compared = sorted(k for k in theirs if k in ours and k != "lbafs")
    assert len(compared) >= 20
    diffs = {k: (ours[k], theirs[k]) for k in compared if _norm(ours[k]) != _norm(theirs[k])}
    assert not diffs
    assert ns.nblocks * ns.block_size == 256 * MiB


def test_bring_up_through_properties(ctrlr, qp):
    from nvme.controller import CC, CSTS
    assert ctrlr.state == "ready" and ctrlr.cntlid == ctrlr.data.cntlid
    assert ctrlr.get_property(CSTS) & 1 == 1                # CSTS.RDY, read by Property Get
    assert ctrlr.get_property(CC) & 1 == 1
    assert ctrlr.mqes >= 128 and ctrlr.version.startswith("1.")
    assert ctrlr.in_capsule == ctrlr.data.ioccsz * 16 - 64 > 0
    neg = qp.negotiated
    assert neg == {"hdgst": False, "ddgst": False, "maxh2cdata": neg["maxh2cdata"],
                   "cpda_align": 4, "in_capsule": ctrlr.in_capsule}
    assert neg["maxh2cdata"] >= 4096 and qp.live and ctrlr.admin_qpair.live


def test_keep_alive_keeps_the_association(ctrlr, ns, qp):
    """KATO is 10 s and the admin poller sends Keep Alive every 5 s: the association outlives
    twice KATO of idle time between two reads."""
    before = ctrlr.reset_count
    buf = allocate(4096)
    ns.read_sync(qp, buf, 0, 8)
    time.sleep(2 * ctrlr.options.keep_alive_timeout_ms / 1000 + 1)
    ns.read_sync(qp, buf, 0, 8)
    assert ctrlr.reset_count == before and ctrlr.state == "ready"


# ---- data --------------------------------------------------------------------------------------
def test_data_crosses_from_the_kernel_initiator_to_ours(ns, qp, kernel):
    dev = kernel.block_device()
    for i, size in enumerate((512, 4 * KiB, 128 * KiB, 1 * MiB)):
        data = pattern(size, 100 + i)
        off = (1000 + 4096 * i) * 512
        kernel_write(dev, off, data)
        buf = allocate(size)
        ns.read_sync(qp, buf, off // 512, size // 512)
        assert content(buf) == data, size


def test_data_crosses_from_ours_to_the_kernel_initiator(ns, qp, kernel):
    dev = kernel.block_device()
    for i, size in enumerate((512, 16 * KiB, 16 * KiB + 512, 1 * MiB)):
        data = pattern(size, 200 + i)
        off = (40000 + 4096 * i) * 512
        buf = allocate(size)
        fill(buf, data)
        ns.write_sync(qp, buf, off // 512, size // 512)
        assert kernel_read(dev, off, size) == data, size


SIZES = [512, 1 * KiB, 4 * KiB, 16 * KiB - 512, 16 * KiB, 16 * KiB + 512, 64 * KiB, 132 * KiB,
         1 * MiB, 2 * MiB, 2 * MiB + 4 * KiB, 5 * MiB + 512]


@pytest.mark.parametrize("size", SIZES)
def test_every_transfer_size(ctrlr, ns, qp, size):
    """In-capsule writes up to IOCCSZ, R2T/H2CData beyond, C2HData reads, split above the
    largest transfer (2 MiB: the driver's cap; nvmet reports no MDTS)."""
    before = qp.stats()
    data = pattern(size, size)
    assert write_read(ns, qp, data, 3000) == data
    after = qp.stats()
    commands = -(-size // ctrlr.max_transfer)
    assert after["completed"] - before["completed"] == 2 * commands
    if size <= ctrlr.in_capsule:
        assert after["in_capsule"] - before["in_capsule"] == 1
        assert after["r2t"] == before["r2t"]
    else:
        assert after["r2t"] - before["r2t"] >= 1
    assert (after["splits"] > before["splits"]) == (size > ctrlr.max_transfer)


def test_unaligned_and_vectored_buffers(ns, qp):
    """TCP takes any memory: a buffer at an odd address, and iovecs of odd pieces."""
    data = pattern(8 * KiB, 7)
    assert write_read(ns, qp, data, 5000, offset=1) == data
    a, b, c = allocate(4096), allocate(4096), allocate(4096)
    pieces = [(a, 3, 512), (b, 1, 2048 + 512), (c, 0, 1024)]
    blob = pattern(4096, 8)
    pos = 0
    for buf, off, n in pieces:
        fill(buf, blob[pos:pos + n], off)
        pos += n
    done = []
    ns.writev(qp, pieces, 6000, cb=done.append)
    while not done:
        qp.process_completions()
    assert done[0].ok
    back = allocate(4096)
    ns.read_sync(qp, back, 6000, 8)
    assert content(back) == blob
    for buf, off, n in pieces:
        fill(buf, bytes(n), off)
    done.clear()
    ns.readv(qp, pieces, 6000, cb=done.append)
    while not done:
        qp.process_completions()
    got = b"".join(content(buf, off, n) for buf, off, n in pieces)
    assert done[0].ok and got == blob


def test_queue_depth_beyond_the_queue(ctrlr, ns):
    small = ctrlr.create_io_qpair(8)
    try:
        bufs = [allocate(4096) for _ in range(100)]
        for i, b in enumerate(bufs):
            fill(b, pattern(4096, 1000 + i))
        done = []
        for i, b in enumerate(bufs):
            ns.write(small, b, 20000 + 8 * i, 8, cb=done.append)
        assert small.stats()["queued"] > 0
        deadline = time.monotonic() + 30
        while len(done) < 100 and time.monotonic() < deadline:
            small.process_completions()
        assert len(done) == 100 and all(c.ok for c in done)
        for i in range(100):
            r = allocate(4096)
            ns.read_sync(small, r, 20000 + 8 * i, 8)
            assert content(r) == pattern(4096, 1000 + i)
    finally:
        ctrlr.delete_io_qpair(small)


def test_write_zeroes_deallocate_flush(ctrlr, ns, qp):
    data = pattern(64 * KiB, 9)
    assert write_read(ns, qp, data, 9000) == data
    if ns.supports_write_zeroes:
        ns.write_zeroes_sync(qp, 9000, 128)
        assert _read(ns, qp, 9000, 64 * KiB) == bytes(64 * KiB)
    if ns.supports_deallocate:
        ns.deallocate_sync(qp, [(9000, 128)])
    ns.flush_sync(qp)


def _read(ns, qp, lba, n):
    buf = allocate(n)
    ns.read_sync(qp, buf, lba, n // ns.block_size)
    return content(buf)


def test_several_queue_pairs_on_several_threads(ctrlr, ns):
    errors = []

    def worker(k):
        try:
            q = ctrlr.create_io_qpair(64)
            try:
                for i in range(40):
                    size = 4 * KiB * (1 + (i % 9))
                    data = pattern(size, k * 1000 + i)
                    lba = 100000 + k * 20000 + i * 80
                    if write_read(ns, q, data, lba) != data:
                        errors.append((k, i))
            finally:
                ctrlr.delete_io_qpair(q)
        except Exception as e:            # noqa: BLE001
            errors.append((k, repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)


def test_digests_on(target, kernel):
    c = _connect(target, hdgst=True, ddgst=True)
    try:
        assert c.admin_qpair.negotiated["hdgst"] and c.admin_qpair.negotiated["ddgst"]
        q = c.create_io_qpair(32)
        ns = c.namespace(1)
        for size in (512, 4 * KiB, 16 * KiB, 64 * KiB, 1 * MiB):
            data = pattern(size, 300 + size)
            assert write_read(ns, q, data, 7000) == data
            assert kernel_read(kernel.block_device(), 7000 * 512, size) == data
        s = q.stats()
        assert s["connections_lost"] == 0 and s["in_capsule"] and s["r2t"]
        c.delete_io_qpair(q)
    finally:
        c.detach()


# ---- failures that are ours to report ------------------------------------------------------------
def test_refused_connection_says_why(target):
    import nvme
    from nvme.errors import TransportError
    with pytest.raises(TransportError, match="Connection refused") as e:
        nvme.connect(target.trid.replace("trsvcid:4420", "trsvcid:4999"))
    assert e.value.kind == "socket"


def test_unknown_subsystem_is_rejected_by_connect(target):
    import nvme
    from nvme.errors import TransportError
    with pytest.raises(TransportError, match="Fabrics Connect rejected") as e:
        nvme.connect(target.trid.replace(target.nqn, "nqn.2024-01.io.userblk:nobody"))
    assert e.value.kind == "rejected"


def test_detach_with_io_in_flight_completes_everything_once(target):
    c = _connect(target)
    q = c.create_io_qpair(64)
    ns = c.namespace(1)
    done = []
    bufs = [allocate(64 * KiB) for _ in range(48)]
    for i, b in enumerate(bufs):
        ns.read(q, b, 8 * i, 128, cb=done.append)
    c.detach()
    deadline = time.monotonic() + 10
    while len(done) < len(bufs) and time.monotonic() < deadline:
        try:
            q.process_completions()
        except Exception:            # destroyed: everything was completed by the drain
            break
    assert len(done) == len(bufs)
    assert len({id(d) for d in done}) == len(done)


# ---- discovery and the command line -------------------------------------------------------------
def test_discovery_log_matches_nvme_discover(target):
    from nvme.discovery import discover
    ours = discover(target.trid).to_dict()
    out = subprocess.run(["nvme", "discover", "-t", "tcp", "-a", target.traddr, "-s",
                          str(target.trsvcid), "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    theirs = json.loads(out)
    key = lambda r: (r["subnqn"], r["traddr"], r["trsvcid"])          # noqa: E731
    want = {key(r): r for r in theirs["records"]}
    got = {key(r): r for r in ours["records"]}
    assert set(got) == set(want) and (target.nqn, "127.0.0.1", "4420") in got
    for k, r in want.items():
        for field in ("trtype", "adrfam", "subtype", "portid", "subnqn", "traddr", "trsvcid"):
            assert str(got[k][field]) == str(r[field]), (k, field)


def test_userblk_identify_and_discover_commands(target):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "userblk", "identify", target.trid, "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["controller"]["subnqn"] == target.nqn and "1" in doc["namespaces"]
    out = subprocess.run([sys.executable, "-m", "userblk", "discover", "-a", target.traddr,
                          "-s", str(target.trsvcid)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Discovery Log Number of Records" in out.stdout and target.nqn in out.stdout
    out = subprocess.run([sys.executable, "-m", "userblk", "discover", "-a", target.traddr,
                          "-s", "4999"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "Connection refused" in out.stderr
