"""The NVMe bdev on NVMe/TCP, against the kernel's nvmet-tcp target inside the test guest.

`bdev_nvme_attach_controller` with SPDK's TCP parameters (from a JSON config too) makes the
target's namespace a bdev that the whole bdev layer and the C workload engine run on, exactly as
on PCIe. Then the failures: the target's port is removed in the middle of a verify run and
restored (the controller reconnects, the I/O in flight is sent again, every I/O completes once
and verify finds no miscompare); `fast_io_fail_timeout_sec` fails waiting I/O while reconnecting
goes on; a port never restored fails the controller after `ctrlr_loss_timeout_sec` (its bdev is
removed, every I/O completes once, with an error).
"""
import threading
import time

import pytest

import bdev
from bdev import config
from bdev import nvme as bdev_nvme
from tests.bdev.helpers import Completions, poll_until, two_threads_write_read
from tests.bdev.test_nvme_bdev import (Open, _collect_garbage_at_safe_points,  # noqa: F401
                                       pattern)
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST
from tests.nvme.nvmet import NvmetTarget

pytestmark = [pytest.mark.guest(nvme_ns=1, nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

KiB, MiB = 1024, 1 << 20


@pytest.fixture(scope="module")
def target():
    t = NvmetTarget(device="/dev/nvme0n1").setup()
    yield t
    t.link_port()
    t.teardown()


@pytest.fixture
def attached(target):
    """attach(name, **params) -> the NvmeController; detached at the end."""
    names = []

    def attach(name, **params):
        bdev_nvme.attach_controller(name, target.trid, **params)
        names.append(name)
        return bdev_nvme.get_controller(name)

    yield attach
    target.link_port()
    for n in names:
        if any(c.name == n for c in bdev_nvme.controllers()):
            bdev_nvme.detach_controller(n)
        poll_until(lambda: not any(c.name == n for c in bdev_nvme.controllers()), timeout=30)


def later(delay, fn):
    t = threading.Timer(delay, fn)
    t.start()
    return t


def test_attach_from_a_json_config_and_save_it_again(target):
    entry = {"method": "bdev_nvme_attach_controller",
             "params": {"name": "Tcp0", "trtype": "TCP", "adrfam": "IPv4",
                        "traddr": target.traddr, "trsvcid": str(target.trsvcid),
                        "subnqn": target.nqn, "hostnqn": "nqn.2024-01.io.userblk:host-a",
                        "hdgst": True, "ddgst": False, "ctrlr_loss_timeout_sec": 10,
                        "reconnect_delay_sec": 1, "fast_io_fail_timeout_sec": 5}}
    created = config.load_config({"subsystems": [{"subsystem": "bdev", "config": [entry]}]})
    try:
        assert [b.name for b in created] == ["Tcp0n1"]
        b = bdev.get_bdev("Tcp0n1")
        assert b.module == "nvme" and b.block_size == 512 and b.num_blocks * 512 == 256 * MiB
        assert b.required_alignment == 1 and not b.dma_required
        ds = b.info()["driver_specific"]["nvme"]
        assert ds["trid"] == {"trtype": "TCP", "adrfam": "IPv4", "traddr": target.traddr,
                              "trsvcid": str(target.trsvcid), "subnqn": target.nqn}
        assert ds["model"] == "Linux" and ds["pci_address"] is None
        c = bdev_nvme.get_controller("Tcp0").ctrlr
        assert c.hostnqn == "nqn.2024-01.io.userblk:host-a"
        assert c.admin_qpair.negotiated["hdgst"] and not c.admin_qpair.negotiated["ddgst"]
        saved = config.save_config()["subsystems"][0]["config"][0]
        assert saved["method"] == "bdev_nvme_attach_controller"
        assert {k: v for k, v in saved["params"].items()} == entry["params"]
    finally:
        config.teardown(created)


def test_a_verify_workload_on_the_tcp_bdev(attached):
    from bdev import perf
    attached("Tcp1")
    o = Open("Tcp1n1")
    try:
        out = perf.run(o.desc, o.ch, queue_depth=32, io_size=4096, workload="verify",
                       seconds=2.0)
        assert out["errors"] == 0 and out["miscompares"] == 0 and out["ios"] > 100
        out = perf.run(o.desc, o.ch, queue_depth=8, io_size=128 * KiB, workload="randrw",
                       read_pct=50, seconds=1.0)
        assert out["errors"] == 0 and out["ios"] > 0
        s = o.ch.queue_pair.stats()
        assert s["submitted"] == s["completed"] and s["outstanding"] == 0
    finally:
        o.close()


def test_bdev_io_of_every_kind(attached):
    attached("Tcp2")
    o = Open("Tcp2n1")
    try:
        data = pattern(3 * MiB + 512, 5)          # split by the bdev layer, then by the driver
        o.desc.write_sync(o.ch, data, 512 * 1000)
        back = bytearray(len(data))
        o.desc.read_sync(o.ch, back, 512 * 1000)
        assert back == data
        odd = bytearray(pattern(4096, 6))         # not DMA memory, any alignment: no bounce
        o.desc.write_sync(o.ch, odd, 512 * 9000)
        r = bytearray(4096)
        o.desc.read_sync(o.ch, r, 512 * 9000)
        assert r == odd
        b = bdev.get_bdev("Tcp2n1")
        if "write_zeroes" in b.io_types:
            o.desc.write_zeroes_sync(o.ch, 512 * 9000, 4096)
            o.desc.read_sync(o.ch, r, 512 * 9000)
            assert r == bytes(4096)
        if "unmap" in b.io_types:
            o.desc.unmap_sync(o.ch, 512 * 9000, 64 * KiB)
        o.desc.flush_sync(o.ch)
    finally:
        o.close()


def test_two_threads_two_tcp_queue_pairs(attached):
    attached("Tcp3")
    o = Open("Tcp3n1")
    try:
        qids = two_threads_write_read(o.desc, base=20000, stride=64, count=20,
                                      size=lambda i: 4096 * (1 + i % 8), timeout=120)
        assert len(set(qids.values())) == 2
    finally:
        o.close()


def test_a_reset_reconnects(attached):
    nc = attached("Tcp4")
    o = Open("Tcp4n1")
    try:
        cnt = nc.ctrlr.cntlid
        done = Completions()
        done.submit(o.desc.reset, "reset", o.ch)
        done.wait(o.ch, 1, timeout=60)
        assert done.done["reset"][0]
        assert nc.ctrlr.state == "ready" and nc.ctrlr.cntlid != cnt
        data = pattern(64 * KiB, 8)
        o.desc.write_sync(o.ch, data, 0)
        back = bytearray(len(data))
        o.desc.read_sync(o.ch, back, 0)
        assert back == data
    finally:
        o.close()


def test_port_removed_during_verify_then_restored(attached, target):
    from bdev import perf
    nc = attached("Tcp5", ctrlr_loss_timeout_sec=60, reconnect_delay_sec=1)
    o = Open("Tcp5n1")
    try:
        epoch = nc.ctrlr.assoc.epoch
        timers = [later(1.5, target.unlink_port), later(4.5, target.link_port)]
        out = perf.run(o.desc, o.ch, queue_depth=16, io_size=8192, workload="verify",
                       seconds=9.0)
        for t in timers:
            t.join()
        assert out["errors"] == 0 and out["miscompares"] == 0, out
        assert out["ios"] > 100
        c = nc.ctrlr
        # one outage, one recovery (failed attempts while the port was gone included)
        assert c.state == "ready" and c.reset_count == 1 and c.assoc.epoch == epoch + 1
        s = o.ch.queue_pair.stats()
        assert s["connections_lost"] >= 1 and s["requeued"] >= 1
        assert s["submitted"] == s["completed"] + s["requeued"] and s["outstanding"] == 0
        assert bdev.get_bdev("Tcp5n1") is not None and not o.events
    finally:
        o.close()


def test_fast_io_fail_fails_waiting_io_while_reconnecting(attached, target):
    nc = attached("Tcp6", ctrlr_loss_timeout_sec=30, reconnect_delay_sec=1,
                  fast_io_fail_timeout_sec=2)
    o = Open("Tcp6n1")
    try:
        target.unlink_port()
        poll_until(lambda: nc.ctrlr.state == "reconnecting", timeout=10)
        lost = time.monotonic()
        done = Completions()
        done.submit(o.desc.read, "waits", o.ch, bytearray(4096), 0)
        done.wait(o.ch, 1, timeout=20)
        waited = time.monotonic() - lost
        ok, status = done.done["waits"]
        assert not ok and status.nvme is not None
        assert (status.nvme.sct, status.nvme.sc) == (3, 0x70)      # Host Pathing Error
        assert 1.0 <= waited <= 6.0, waited
        target.link_port()
        poll_until(lambda: nc.ctrlr.state == "ready", timeout=30)
        o.desc.read_sync(o.ch, bytearray(4096), 0)        # served again
    finally:
        o.close()


def test_port_never_restored_fails_after_ctrlr_loss_timeout(attached, target):
    nc = attached("Tcp7", ctrlr_loss_timeout_sec=3, reconnect_delay_sec=1)
    o = Open("Tcp7n1")
    try:
        done = Completions()
        for i in range(8):
            done.submit(o.desc.read, i, o.ch, bytearray(64 * KiB), 64 * KiB * i)
        t0 = time.monotonic()
        target.unlink_port()
        for i in range(8, 16):
            done.submit(o.desc.read, i, o.ch, bytearray(4096), 4096 * i)
        poll_until(lambda: nc.state == "failed" or nc.ctrlr.state == "failed", timeout=20)
        elapsed = time.monotonic() - t0
        assert 2.5 <= elapsed <= 8.0, elapsed
        done.wait(o.ch, 16, timeout=20)
        failed = [t for t, (ok, _) in done.done.items() if not ok]
        assert set(failed) >= set(range(8, 16))          # those submitted after the loss
        poll_until(lambda: ("remove", "Tcp7n1") in o.events, timeout=10)
    finally:
        o.close()
