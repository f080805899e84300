"""The target guest of test_tcp_remote_guest.py (run as `python -m tests.nvme.tcp_peer_target`
by the guest harness's `peer=` marker): the kernel's nvmet-tcp serving this guest's NVMe
namespace on its network address, until the harness stops the guest."""
import time

from tests.guest import net
from tests.nvme.nvmet import NvmetTarget


def main():
    addr = net.configure()
    t = NvmetTarget(device="/dev/nvme0n1", traddr=addr).setup()
    print(f"nvmet-tcp serves {t.nqn} at {addr}:{t.trsvcid}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
