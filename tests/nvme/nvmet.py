"""The Linux kernel's NVMe over Fabrics target (nvmet, nvmet-tcp) configured through configfs, and
the kernel's own NVMe/TCP initiator (`nvme connect`): the references the NVMe/TCP transport is
tested against inside the guest. Nothing here imitates a target; it only drives the kernel's.

    t = NvmetTarget(device="/dev/nvme0n1").setup()      # subsystem, namespace 1, TCP port
    t.trid                                              # "trtype:TCP adrfam:IPv4 traddr:..."
    t.unlink_port() / t.link_port()                     # the port disappears / comes back
    k = KernelInitiator(t).connect()                    # /dev/nvmeXnY through nvme-tcp
    k.disconnect(); t.teardown()
"""
import json
import os
import re
import subprocess
import time
import uuid

CONFIGFS = "/sys/kernel/config"
NVMET = f"{CONFIGFS}/nvmet"
TEST_NQN = "nqn.2024-01.io.userblk:tcp-test"


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def wait_for(predicate, timeout=15.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


class NvmetTarget:
    """One subsystem with one namespace on one TCP port of the kernel's target."""

    def __init__(self, device="/dev/nvme0n1", *, nqn=TEST_NQN, traddr="127.0.0.1", trsvcid=4420,
                 portid=1, adrfam="ipv4", inline_data_size=None):
        self.device = device
        self.nqn = nqn
        self.traddr = traddr
        self.trsvcid = int(trsvcid)
        self.portid = portid
        self.adrfam = adrfam
        self.inline_data_size = inline_data_size
        self.subsys = f"{NVMET}/subsystems/{nqn}"
        self.port = f"{NVMET}/ports/{portid}"
        self.link = f"{self.port}/subsystems/{nqn}"

    def setup(self):
        sh("modprobe", "nvmet")
        sh("modprobe", "nvmet-tcp")
        if not os.path.isdir(NVMET):
            sh("mount", "-t", "configfs", "none", CONFIGFS, check=False)
        assert os.path.isdir(NVMET), "nvmet's configfs did not appear"
        os.makedirs(self.subsys, exist_ok=True)
        _write(f"{self.subsys}/attr_allow_any_host", 1)
        ns = f"{self.subsys}/namespaces/1"
        os.makedirs(ns, exist_ok=True)
        _write(f"{ns}/device_path", self.device)
        _write(f"{ns}/enable", 1)
        os.makedirs(self.port, exist_ok=True)
        if not os.listdir(f"{self.port}/subsystems"):
            # (a port serving a subsystem already is enabled: its address cannot change)
            _write(f"{self.port}/addr_trtype", "tcp")
            _write(f"{self.port}/addr_adrfam", self.adrfam)
            _write(f"{self.port}/addr_traddr", self.traddr)
            _write(f"{self.port}/addr_trsvcid", self.trsvcid)
            if self.inline_data_size is not None:
                _write(f"{self.port}/param_inline_data_size", self.inline_data_size)
        self.link_port()
        return self

    def link_port(self):
        """Expose the subsystem on the port (the port listens again)."""
        if not os.path.islink(self.link):
            os.symlink(self.subsys, self.link)

    def unlink_port(self):
        """Take the subsystem off the port: its connections are dropped and, the port having
        no subsystem left, nothing listens on it any more."""
        if os.path.islink(self.link):
            os.unlink(self.link)

    def teardown(self):
        """Remove the subsystem, and the port unless another subsystem still uses it."""
        self.unlink_port()
        if os.path.isdir(self.port) and not os.listdir(f"{self.port}/subsystems"):
            os.rmdir(self.port)
        ns = f"{self.subsys}/namespaces/1"
        if os.path.isdir(ns):
            _write(f"{ns}/enable", 0)
            os.rmdir(ns)
        if os.path.isdir(self.subsys):
            os.rmdir(self.subsys)

    @property
    def trid(self):
        fam = "IPv6" if self.adrfam == "ipv6" else "IPv4"
        return (f"trtype:TCP adrfam:{fam} traddr:{self.traddr} trsvcid:{self.trsvcid} "
                f"subnqn:{self.nqn}")


class KernelInitiator:
    """The kernel's NVMe/TCP host connected to a target: its controller and namespace."""

    def __init__(self, target, hostnqn=None):
        self.target = target
        self.hostid = str(uuid.uuid4())
        self.hostnqn = hostnqn or f"nqn.2014-08.org.nvmexpress:uuid:{self.hostid}"
        self.ctrl = None

    def _find(self):
        for name in sorted(os.listdir("/sys/class/nvme")):
            base = f"/sys/class/nvme/{name}"
            try:
                with open(f"{base}/transport") as f:
                    transport = f.read().strip()
                with open(f"{base}/subsysnqn") as f:
                    nqn = f.read().strip()
                with open(f"{base}/hostnqn") as f:
                    host = f.read().strip()
            except OSError:
                continue
            if transport == "tcp" and nqn == self.target.nqn and host == self.hostnqn:
                return name
        return None

    def connect(self, *extra):
        sh("modprobe", "nvme-tcp")
        sh("nvme", "connect", "-t", "tcp", "-a", self.target.traddr, "-s",
           str(self.target.trsvcid), "-n", self.target.nqn, "--hostnqn", self.hostnqn,
           "--hostid", self.hostid, *extra)
        assert wait_for(lambda: self._find() is not None), "nvme connect made no controller"
        self.ctrl = self._find()
        assert wait_for(lambda: self.block_device() is not None), "no namespace block device"
        return self

    def block_device(self, nsid=1):
        """/dev/nvmeXnY of a namespace: the controller's own (nvme1n1), or with native
        multipath the subsystem's head of its path (nvme1c1n1 -> nvme1n1)."""
        base = f"/sys/class/nvme/{self.ctrl}"
        for entry in sorted(os.listdir(base)):
            m = re.fullmatch(r"nvme(\d+)c\d+n(\d+)", entry) or re.fullmatch(r"nvme(\d+)n(\d+)",
                                                                          entry)
            if m and int(m.group(2)) == nsid:
                dev = f"/dev/nvme{m.group(1)}n{m.group(2)}"
                if os.path.exists(dev):
                    return dev
        return None

    @property
    def char_device(self):
        return f"/dev/{self.ctrl}"

    def id_ctrl(self):
        return json.loads(sh("nvme", "id-ctrl", self.char_device, "-o", "json").stdout)

    def id_ns(self, nsid=1):
        return json.loads(sh("nvme", "id-ns", self.char_device, "-n", str(nsid), "-o",
                             "json").stdout)

    def disconnect(self):
        if self.ctrl is not None:
            sh("nvme", "disconnect", "-d", self.ctrl, check=False)
            self.ctrl = None
