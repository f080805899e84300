"""Commands that time out on QEMU's controller.

The namespace is backed by QEMU's null-co driver with a 2-second latency, so every I/O command
takes 2 s while the driver's I/O timeout is 0.5 s: the driver aborts it (QEMU's Abort never aborts
a command that reached the block layer, it answers "not aborted"), then resets the controller.
Every submitted command must complete exactly once - with ABORTED - SQ DELETION - and the queue
pair must work again after the reset.
"""
import time

import pytest

from env.memory import allocate
from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST

pytestmark = [pytest.mark.guest(nvme_backend="null", null_latency_ns=2_000_000_000,
                                nvme_size="64M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]


@pytest.fixture(scope="module")
def ctrlr():
    import nvme
    from nvme.controller import ControllerOptions
    c = nvme.attach("0000:00:10.0", ControllerOptions(io_timeout_s=0.5, abort_timeout_s=0.5))
    yield c
    c.detach()


def test_timed_out_commands_are_aborted_then_reset_and_complete_once(ctrlr):
    qp = ctrlr.create_io_qpair(16)
    ns = ctrlr.namespace(1)
    buf = allocate(4096 * 8)
    done = []
    for i in range(8):
        ns.read(qp, buf, i * 8, 8, lambda c, i=i: done.append((i, c)), offset=i * 4096)
    deadline = time.monotonic() + 60
    while len(done) < 8 and time.monotonic() < deadline:
        qp.process_completions()
        ctrlr.poll_admin()
    assert sorted(i for i, _ in done) == list(range(8))      # each exactly once
    assert qp.stats()["timeouts"] >= 1
    assert ctrlr.reset_count >= 1
    assert all(not c.ok and (c.sct, c.sc) == (0, 0x08) for _, c in done)
    # nothing more arrives later
    end = time.monotonic() + 1
    while time.monotonic() < end:
        qp.process_completions()
        ctrlr.poll_admin()
    assert len(done) == 8
    assert qp.state == "enabled"


def test_a_reused_command_id_times_out_again(ctrlr):
    """Two slow commands in a row on one CID: each is reported as timed out once (aborted, then
    reset), the second as surely as the first - a tracker's "timeout reported" mark belongs to
    its command, not to the tracker."""
    qp = ctrlr.create_io_qpair(4)
    ns = ctrlr.namespace(1)
    buf = allocate(4096)
    resets = ctrlr.reset_count
    cids = []
    for n in (1, 2):
        done = []
        ns.read(qp, buf, 0, 1, done.append)
        deadline = time.monotonic() + 60
        while not done and time.monotonic() < deadline:
            qp.process_completions()
            ctrlr.poll_admin()
        assert len(done) == 1, "the command did not complete"
        c = done[0]
        assert not c.ok and (c.sct, c.sc) == (0, 0x08), c       # timed out: aborted by reset
        assert qp.stats()["timeouts"] == n
        assert ctrlr.reset_count == resets + n
        cids.append(c.cid)
    assert cids[0] == cids[1]
    ctrlr.delete_io_qpair(qp)


def test_queue_pair_works_after_the_reset(ctrlr):
    from nvme.controller import ControllerOptions   # noqa: F401  (same module-scoped controller)
    qp = ctrlr.create_io_qpair(4)
    ctrlr.options.io_timeout_s = 0        # let one slow command finish normally
    qp.set_timeout(0)
    ns = ctrlr.namespace(1)
    t = time.monotonic()
    cpl = ns.read_sync(qp, allocate(4096), 0, 8)
    assert cpl.ok and time.monotonic() - t >= 1.5      # the null device's latency, not an error
