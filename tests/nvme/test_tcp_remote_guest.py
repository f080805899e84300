"""NVMe/TCP across machines: two guests on one virtual Ethernet (a QEMU socket network), the
kernel's nvmet-tcp in one (tests/nvme/tcp_peer_target.py, booted by the `peer=` marker), userblk
in this one: discovery over the network, then `userblk perf -w verify` on the remote namespace
through a JSON config's bdev_nvme_attach_controller."""
import json
import subprocess
import sys
import time

import pytest

from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST
from tests.nvme.nvmet import TEST_NQN

pytestmark = [pytest.mark.guest(peer="tests.nvme.tcp_peer_target", nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]


@pytest.fixture(scope="module")
def remote():
    """The peer's address, once its target answers (it boots at the same time as this guest)."""
    from nvme.discovery import discover
    from nvme.errors import TransportError
    from tests.guest import net
    ours = net.configure()
    peer = net.peer_address()
    assert ours != peer
    deadline = time.monotonic() + 180
    while True:
        try:
            log = discover(f"trtype:TCP adrfam:IPv4 traddr:{peer} trsvcid:4420")
            if any(e.subnqn == TEST_NQN for e in log.entries):
                return peer, log
        except TransportError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"the target guest never answered: {e}") from e
        time.sleep(1)


def test_discovery_over_the_network(remote):
    peer, log = remote
    entry = next(e for e in log.entries if e.subnqn == TEST_NQN)
    assert entry.traddr == peer and entry.trsvcid == "4420" and entry.to_dict()["trtype"] == "tcp"


def test_identify_of_the_remote_controller(remote):
    import nvme
    peer, _ = remote
    c = nvme.connect(f"trtype:TCP adrfam:IPv4 traddr:{peer} trsvcid:4420 subnqn:{TEST_NQN}")
    try:
        assert c.data.mn.strip() == "Linux" and c.data.subnqn == TEST_NQN
        assert c.namespace(1).size == 256 << 20
    finally:
        c.detach()


def test_userblk_perf_verify_on_the_remote_namespace(remote, tmp_path):
    peer, _ = remote
    config = {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller",
         "params": {"name": "Remote0", "trtype": "TCP", "adrfam": "IPv4", "traddr": peer,
                    "trsvcid": "4420", "subnqn": TEST_NQN, "ddgst": True}}]}]}
    path = tmp_path / "remote.json"
    path.write_text(json.dumps(config))
    out_json = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "userblk", "perf", "--config", str(path), "-b", "Remote0n1",
           "-w", "verify", "-q", "16", "-o", "8k", "-t", "5", "--no-progress",
           "--results", str(out_json)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Remote0n1" in run.stdout
    total = json.loads(out_json.read_text())["total"]
    assert total["ios"] > 0 and total["errors"] == 0 and total["miscompares"] == 0, total
