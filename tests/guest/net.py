"""Inside a guest booted with a network (GuestConfig.net, or a `peer=` marker): bring the NIC up
with the address the harness chose (USERBLK_NET_ADDR), no udev and no DHCP."""
import os
import subprocess
import time


def configure(addr=None, timeout=10.0):
    """modprobe virtio_net, wait for eth0, give it `addr` (default $USERBLK_NET_ADDR, e.g.
    10.0.2.1/24) and bring it up. Returns the address without its prefix length."""
    addr = addr or os.environ["USERBLK_NET_ADDR"]
    subprocess.run(["modprobe", "virtio_net"], check=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists("/sys/class/net/eth0"):
        if time.monotonic() > deadline:
            raise RuntimeError("no eth0 appeared (is the guest booted with a network?)")
        time.sleep(0.05)
    subprocess.run(["ip", "addr", "replace", addr, "dev", "eth0"], check=True)
    subprocess.run(["ip", "link", "set", "eth0", "up"], check=True)
    return addr.split("/")[0]


def peer_address():
    return os.environ["USERBLK_PEER_ADDR"]
