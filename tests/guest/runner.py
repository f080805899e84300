"""Boot the userblk test guest under QEMU, run one command in it as root, return its status.

    python -m tests.guest.runner [options] -- COMMAND [ARG...]      (-h lists the options)

The guest is a small Debian (see ``build.py``) on a q35 machine with an ``intel-iommu`` (so vfio
works with a real IOMMU), emulated NVMe controllers bound to the kernel ``nvme`` driver at
start, 2 MiB hugepages reserved and mounted at ``/dev/hugepages``, and host directories shared
over 9p. The command runs with exactly its argv (no shell: use ``bash -c`` for shell syntax).

Channels, chosen so that nothing mixes or gets lost:

* the command's stdout and stderr: two virtio-serial ports, each written by QEMU into a FIFO that
  a thread here drains while the guest runs, so output streams live, byte-exact, separately;
* ``userblk.status``: ``start T0`` when the command starts, ``exit RC T0 T1`` when it ended;
* the serial console (kernel and init messages): a log file, never mixed into the output;
* the command itself and the share list: fw_cfg files (no length or quoting limits).

Exit status: the command's; ``EXIT_TIMEOUT`` (124) when the timeout killed the guest;
``EXIT_NO_STATUS`` (255) when the guest ended without reporting one (kernel panic, QEMU refused
its options, ...), in which case the result carries QEMU's messages and the console tail.

Each run has its own temporary directory (FIFOs, backing files, QEMU's snapshot overlay) and
console log, so guests may run in parallel. QEMU is killed on every exit path: errors,
KeyboardInterrupt, and the death of this process (``setpriv --pdeathsig``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 255
EXIT_BAD_WORKDIR = 125  # the command never started: its working directory is missing

QEMU = "qemu-system-x86_64"
ACCEL_ENV = "USERBLK_GUEST_ACCEL"
FIRST_NVME_SLOT = 0x10  # controller c is 0000:00:1<c>.0 (slot 0x10 + c)
MAX_NVME_CTRLS = 15     # slots 0x10..0x1e; 0x1f holds the ICH9 functions of q35
SHARE_CACHE_MODES = ("loose", "mmap", "none")
RUNDIR_PREFIX = "userblk-guest-run-"


# ---- configuration ------------------------------------------------------------------------------

def parse_size(value: int | str) -> int:
    """Bytes from ``1073741824``, ``"64M"``, ``"1G"``, ``"512k"`` (binary units)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (e.g. 64M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def _format_size(n: int) -> str:
    for unit in "TGMK":
        shift = 10 * (" KMGT".index(unit))
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


@dataclass(frozen=True)
class Share:
    """A host directory shared into the guest over 9p, by default at the same path."""
    host: str
    guest: str = ""
    cache: str = "loose"  # loose: fastest; the guest caches, so do not change files meanwhile

    def __post_init__(self):
        host = os.path.abspath(os.path.expanduser(self.host))
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "guest", self.guest or host)
        if not os.path.isabs(self.guest):
            raise ValueError(f"share guest path must be absolute: {self.guest!r}")
        if "\n" in self.host or "\n" in self.guest:
            raise ValueError("share paths cannot contain newlines")
        if self.cache not in SHARE_CACHE_MODES:
            raise ValueError(f"share cache must be one of {SHARE_CACHE_MODES}, not {self.cache!r}")

    @classmethod
    def parse(cls, spec: "Share | str | tuple | Mapping") -> "Share":
        if isinstance(spec, Share):
            return spec
        if isinstance(spec, Mapping):
            return cls(**spec)
        if isinstance(spec, (tuple, list)):
            return cls(*spec)
        host, sep, guest = str(spec).partition(":")
        return cls(host, guest if sep else "")


#: the MAC address of the NIC of the listening and of the connecting guest (GuestConfig.net)
NET_MACS = {"listen": "52:54:00:75:62:01", "connect": "52:54:00:75:62:02"}


@dataclass(frozen=True)
class GuestConfig:
    """Everything that decides what a guest looks like. Frozen and hashable: the pytest plugin
    groups the tests of a module by it, one boot per distinct configuration."""

    shares: tuple[Share, ...] = ()       # "HOST[:GUEST]", (host, guest[, cache]) or Share
    env: tuple[tuple[str, str], ...] = ()  # given as a mapping or pairs
    workdir: str | None = None           # default: the first share's guest path, else /root
    nvme_ctrls: int = 1                  # controller c at 0000:00:1<c>.0, serial USERBLK<c>
    nvme_ns: int = 1                     # namespaces per controller, nsid 1..N
    nvme_size: int = 1 << 30             # bytes per namespace (also "64M", "1G")
    nvme_opts: str = ""                  # extra -device nvme properties: "mdts=2,max_ioqpairs=4"
    ns_opts: str = ""                    # extra -device nvme-ns properties, e.g.
    #                                      "logical_block_size=4096,physical_block_size=4096"
    nvme_backend: str = "file"           # file: sparse raw files; null: null-co (reads zeroes,
    #                                      drops writes: emulation cost only)
    null_latency_ns: int = 0             # null-co latency-ns: makes every command take that long
    nvme_image: str | None = None        # back controller 0 / namespace 1 with this file (kept)
    iommu: bool = True                   # intel-iommu; False: no vIOMMU (uio_pci_generic tests)
    iommu_aw: int = 48                   # vIOMMU address width; 39 reproduces the small aperture
    smp: int = 2                         # 1 vCPU loses nvme interrupts under TCG: keep >= 2
    memory: str = "2G"
    hugepages: int = 256                 # 2 MiB pages reserved at boot, on /dev/hugepages
    append: str = ""                     # extra kernel command line
    qemu_args: tuple[str, ...] = ()      # extra QEMU arguments
    timeout: float = 900.0               # seconds from QEMU start until the guest is killed
    console_log: str | None = None       # where to write the serial console (else the run dir)
    accel: str = "auto"                  # auto: kvm only with a writable /dev/kvm AND vmx/svm
    net: str = ""                        # "listen:PORT" / "connect:PORT": a virtio-net NIC on a
    #                                      QEMU socket network (host 127.0.0.1:PORT) joining
    #                                      two guests; configure it in the guest (eth0)
    peer: str = ""                       # the pytest plugin boots a second guest running
    #                                      `python -m PEER`, on a network with this one

    def __post_init__(self):
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        shares = self.shares
        if isinstance(shares, (str, Share)):
            shares = (shares,)
        put("shares", tuple(Share.parse(s) for s in shares))
        env = self.env
        if isinstance(env, Mapping):
            env = env.items()
        pairs = []
        for item in env:
            k, v = item.split("=", 1) if isinstance(item, str) else item
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"not an environment variable name: {k!r}")
            pairs.append((k, str(v)))
        put("env", tuple(sorted(pairs)))
        put("qemu_args", (self.qemu_args,) if isinstance(self.qemu_args, str)
            else tuple(str(a) for a in self.qemu_args))
        put("nvme_size", parse_size(self.nvme_size))
        put("memory", str(self.memory))
        put("timeout", float(self.timeout))
        put("iommu", bool(self.iommu))
        for name in ("nvme_ctrls", "nvme_ns", "null_latency_ns", "iommu_aw", "smp", "hugepages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
        if self.nvme_ctrls > MAX_NVME_CTRLS:
            raise ValueError(f"nvme_ctrls: at most {MAX_NVME_CTRLS} controllers")
        if self.nvme_backend not in ("file", "null"):
            raise ValueError(f"nvme_backend must be 'file' or 'null', not {self.nvme_backend!r}")
        if self.null_latency_ns and self.nvme_backend != "null":
            raise ValueError("null_latency_ns needs nvme_backend='null'")
        if self.nvme_image and self.nvme_backend != "file":
            raise ValueError("nvme_image needs nvme_backend='file'")
        if self.iommu_aw not in (39, 48):
            raise ValueError(f"iommu_aw must be 39 or 48, not {self.iommu_aw}")
        if self.smp < 1:
            raise ValueError("smp must be at least 1")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {self.accel!r}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        for name in ("nvme_opts", "ns_opts", "append"):
            if not isinstance(getattr(self, name), str) or "\n" in getattr(self, name):
                raise ValueError(f"{name} must be a one-line string")
        if not re.fullmatch(r"\d+[MG]?", self.memory):
            raise ValueError(f"memory must look like 2G or 1536M, not {self.memory!r}")
        m = re.fullmatch(r"(listen|connect):(\d+)", self.net) if self.net else None
        if self.net and (m is None or not 0 < int(m.group(2)) < 65536):
            raise ValueError(f"net must be listen:PORT or connect:PORT, not {self.net!r}")
        if self.peer and not re.fullmatch(r"[A-Za-z_][\w.]*", self.peer):
            raise ValueError(f"peer must be a Python module name, not {self.peer!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "GuestConfig":
        """Like the constructor, with an error that lists the valid fields."""
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GuestConfig field(s) {', '.join(sorted(unknown))}; valid: "
                             + ", ".join(f.name for f in dataclasses.fields(cls)))
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "GuestConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """The fields that differ from the defaults (shares and env left out), for summaries."""
        default = GuestConfig()
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("shares", "env", "console_log", "timeout") \
                    or value == getattr(default, f.name):
                continue
            shown = _format_size(value) if f.name == "nvme_size" else repr(value)
            parts.append(f"{f.name}={shown}")
        return ", ".join(parts) or "defaults"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GuestConfig":
        data = json.loads(text)
        data["shares"] = [Share(**s) for s in data.get("shares", ())]
        return cls(**data)


# ---- host checks --------------------------------------------------------------------------------

def qemu_problem() -> str | None:
    """Why QEMU cannot run guests here, or None."""
    if not shutil.which(QEMU):
        return f"{QEMU} is not installed: apt-get install qemu-system-x86"
    return None


def kvm_usable() -> bool:
    """True only with hardware virtualization. A /dev/kvm from kvm_pvm (a PVM host, as on the
    project's machines) has no vmx/svm and runs a stock Debian kernel ~100x slower than TCG."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) is not None


def choose_accel(requested: str = "auto") -> str:
    if requested == "auto":
        requested = os.environ.get(ACCEL_ENV, "auto")
    if requested == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return requested


# ---- results ------------------------------------------------------------------------------------

@dataclass
class GuestResult:
    returncode: int
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    status_reported: bool = False    # the guest said "exit RC": the command really ran to its end
    boot_seconds: float | None = None     # QEMU start -> the command starts (host clock)
    command_seconds: float | None = None  # the command's run time (guest clock)
    total_seconds: float = 0.0
    console: str = ""
    qemu_log: str = ""
    qemu_returncode: int | None = None
    accel: str = ""
    console_log: str | None = None   # a kept copy of the console, when there is one

    def console_tail(self, lines: int = 30) -> str:
        return "\n".join(self.console.rstrip("\n").splitlines()[-lines:])

    def console_excerpt(self) -> str:
        """The console lines worth reading: from the first panic/oops/BUG line on (a stack trace
        below it says little), plus the very end; else simply the tail."""
        lines = self.console.rstrip("\n").splitlines()
        for i, line in enumerate(lines):
            if _KERNEL_TROUBLE.search(line):
                head = lines[max(0, i - 3):i + 10]
                rest = lines[i + 10:]
                if len(rest) > 6:
                    return "\n".join(head + [f"  [... {len(rest) - 6} lines ...]"] + rest[-6:])
                return "\n".join(head + rest)
        return self.console_tail()

    @property
    def ok(self) -> bool:
        return self.status_reported and self.returncode == 0

    def problem(self) -> str | None:
        """For a timeout or a guest that reported no status: what happened, with QEMU's messages
        and the console tail. None when the command ran to its end."""
        if self.timed_out:
            head = f"the guest was killed by the timeout after {self.total_seconds:.0f} s"
            if self.boot_seconds is None:
                head += " (the command had not started: still booting?)"
        elif not self.status_reported:
            head = (f"the guest reported no exit status (QEMU exit status {self.qemu_returncode};"
                    " a kernel panic or a QEMU error)")
        else:
            return None
        parts = [head]
        if self.qemu_log.strip():
            parts.append("QEMU said:\n" + _indent(self.qemu_log.strip()))
        where = f" ({self.console_log})" if self.console_log else ""
        parts.append(f"console{where}:\n" + _indent(self.console_excerpt() or "(empty)"))
        return "\n".join(parts)

    def summary(self) -> str:
        boot = f"{self.boot_seconds:.1f}s" if self.boot_seconds is not None else "-"
        cmd = f"{self.command_seconds:.1f}s" if self.command_seconds is not None else "-"
        return (f"accel={self.accel} rc={self.returncode} boot-to-command={boot} "
                f"command={cmd} total={self.total_seconds:.1f}s")


_KERNEL_TROUBLE = re.compile(r"Kernel panic|BUG:|Oops|general protection fault|"
                             r"sysrq: Trigger a crash|hung_task|Out of memory")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# ---- the run ------------------------------------------------------------------------------------

Sink = Callable[[bytes], None]


def _to_sink(target: BinaryIO | Sink | None) -> Sink | None:
    if target is None or callable(target):
        return target

    def write(chunk: bytes, f=target) -> None:
        f.write(chunk)
        f.flush()
    return write


class _Pump(threading.Thread):
    """Drains one FIFO that QEMU writes into. Opened here *before* QEMU starts writing: QEMU's
    open of a FIFO blocks until a reader exists, and a reader that stopped would block the guest."""

    def __init__(self, fifo: Path, sinks: list[Sink]):
        super().__init__(daemon=True, name=f"guest-{fifo.name}")
        self.fifo, self.sinks = fifo, sinks

    def run(self) -> None:
        with open(self.fifo, "rb", buffering=0) as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    return
                for sink in list(self.sinks):
                    try:
                        sink(chunk)
                    except Exception:  # a broken sink must not stop the draining
                        self.sinks.remove(sink)

    def unblock(self) -> None:
        """If QEMU never opened the FIFO, our open() still waits: satisfy it so it sees EOF."""
        try:
            os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


class _ConsoleTail(threading.Thread):
    """Follows the console log file (for --verbose), prefixing each line."""

    def __init__(self, path: Path, out: BinaryIO, prefix: bytes = b"[console] "):
        super().__init__(daemon=True, name="guest-console")
        self.path, self.out, self.prefix = path, out, prefix
        self.stop = threading.Event()

    def run(self) -> None:
        pos, partial = 0, b""
        while True:
            stopping = self.stop.is_set()
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                    pos += len(data)
            except OSError:
                data = b""
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            for line in lines:
                self.out.write(self.prefix + line.rstrip(b"\r") + b"\n")
            self.out.flush()
            if stopping:
                return
            self.stop.wait(0.1)


def _remove_dead_rundirs() -> None:
    """Run directories of runners that were SIGKILLed (no cleanup ran): their owner is gone."""
    for path in Path(tempfile.gettempdir()).glob(RUNDIR_PREFIX + "*"):
        try:
            pid = int((path / "owner").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            pass  # not ours to judge (no owner file yet, another user's, ...)


def _quote_opt(value: str) -> str:
    return str(value).replace(",", ",,")  # QEMU option syntax: a literal comma is doubled


class GuestRun:
    """One guest, one command. Use as a context manager (cleanup on every path)::

        with GuestRun(config, ["nvme", "list"], image=image) as run:
            result = run.wait()

    ``poll()`` lets a caller do other work meanwhile (the pytest plugin reads per-test reports
    while the guest runs). Start and stop it from the same thread: QEMU dies with the thread that
    started it (pdeathsig).
    """

    def __init__(self, config: GuestConfig, argv: Iterable[str], image=None, *,
                 stdout: BinaryIO | Sink | None = None, stderr: BinaryIO | Sink | None = None,
                 capture: bool = True, console_stream: BinaryIO | None = None):
        self.config = config
        self.argv = [str(a) for a in argv]
        if not self.argv:
            raise ValueError("no command given")
        self.image = image
        self.capture = capture
        self._out_sink, self._err_sink = _to_sink(stdout), _to_sink(stderr)
        self._console_stream = console_stream
        self._stdout, self._stderr = bytearray(), bytearray()
        self.rundir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.command: list[str] = []  # the QEMU argv, once started
        self._pumps: list[_Pump] = []
        self._tail: _ConsoleTail | None = None
        self._t0 = 0.0
        self._t_start: float | None = None
        self._t_exit: float | None = None
        self._timed_out = False
        self._result: GuestResult | None = None
        self.accel = choose_accel(config.accel)

    # -- building the QEMU command --

    @staticmethod
    def _drive_opts(directory: Path) -> str:
        """cache.direct=on + io_uring (fastest, measured), or what the host and the file system
        holding the backing file support."""
        aio = "io_uring"
        try:
            if Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() != "0":
                aio = "native"  # io_uring switched off on the host
        except OSError:
            pass
        probe = directory / f".userblk-odirect-probe-{os.getpid()}"
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600))
        except OSError:  # e.g. tmpfs: no O_DIRECT, so the page cache and a thread pool
            return "cache.direct=off,aio=threads"
        finally:
            probe.unlink(missing_ok=True)
        return f"cache.direct=on,aio={aio}"

    def _nvme_args(self) -> list[str]:
        c = self.config
        args: list[str] = []
        for ctrl in range(c.nvme_ctrls):
            dev = f"nvme,id=nvme{ctrl},serial=USERBLK{ctrl},addr={FIRST_NVME_SLOT + ctrl:#x}"
            args += ["-device", dev + (f",{c.nvme_opts}" if c.nvme_opts else "")]
            for ns in range(1, c.nvme_ns + 1):
                node = f"nvme{ctrl}n{ns}"
                if c.nvme_backend == "null":
                    blk = f"driver=null-co,node-name={node},size={c.nvme_size},read-zeroes=on"
                    if c.null_latency_ns:
                        blk += f",latency-ns={c.null_latency_ns}"
                    args += ["-blockdev", blk]
                else:
                    if ctrl == 0 and ns == 1 and c.nvme_image:
                        path = Path(c.nvme_image).resolve()
                        if not path.exists():
                            path.parent.mkdir(parents=True, exist_ok=True)
                            with open(path, "wb") as f:
                                f.truncate(c.nvme_size)
                    else:
                        path = self.rundir / f"{node}.img"
                        with open(path, "wb") as f:  # sparse: costs no disk until written
                            f.truncate(c.nvme_size)
                    # discard=unmap on both nodes: a Deallocate punches holes in the backing
                    # file, so deallocated blocks read back as zeroes, as the namespace's
                    # DLFEAT promises (without it QEMU drops discards silently)
                    args += ["-blockdev", f"driver=file,node-name={node}f,"
                                          f"filename={_quote_opt(path)},discard=unmap,"
                                          f"{self._drive_opts(path.parent)}",
                             "-blockdev", f"driver=raw,node-name={node},file={node}f,"
                                          "discard=unmap"]
                ns_dev = f"nvme-ns,drive={node},bus=nvme{ctrl},nsid={ns}"
                args += ["-device", ns_dev + (f",{c.ns_opts}" if c.ns_opts else "")]
        return args

    def _net_args(self) -> list[str]:
        """A virtio-net NIC on a QEMU socket network: the listening guest and the connecting
        one exchange Ethernet frames over host TCP 127.0.0.1:PORT (each its own MAC)."""
        if not self.config.net:
            return []
        role, port = self.config.net.split(":")
        mac = NET_MACS[role]
        return ["-netdev", f"socket,id=net0,{role}=127.0.0.1:{port}",
                "-device", f"virtio-net-pci,netdev=net0,mac={mac}"]

    def _kernel_cmdline(self) -> str:
        c = self.config
        parts = [
            "console=ttyS0,115200 root=/dev/vda rw rootfstype=ext4 init=/sbin/userblk-init",
            "panic=-1",  # with QEMU's -no-reboot a panic ends QEMU instead of hanging it
            "quiet loglevel=4 mitigations=off nokaslr tsc=reliable no_timer_check",
            "random.trust_cpu=on fsck.mode=skip",
            # Debian zeroes every allocation by default, 512 MiB of hugepages included: ~0.3 s
            "init_on_alloc=0",
            f"hugepagesz=2M hugepages={c.hugepages}",
            "intel_iommu=on iommu=pt" if c.iommu
            # harmless with the Debian kernel (no CONFIG_VFIO_NOIOMMU), useful with others
            else "vfio.enable_unsafe_noiommu_mode=1",
            f"userblk.nvme={c.nvme_ctrls}:{c.nvme_ns}",
        ]
        if c.append:
            parts.append(c.append)
        return " ".join(parts)

    def qemu_command(self) -> list[str]:
        """The full QEMU argv (needs the run directory: call after ``_prepare``)."""
        c, image, run = self.config, self.image, self.rundir
        if self.accel == "kvm":
            # -cpu host trips over MSR 0x10a on PVM hosts; intremap=on needs the split irqchip
            accel = ["-machine", "q35,kernel-irqchip=split", "-accel", "kvm",
                     "-cpu", "host,-arch-capabilities"]
        else:
            # multi-threaded TCG; -cpu max keeps SSE4.2/AVX2 (no AVX-512: do not build with
            # -march=native on the host)
            accel = ["-machine", "q35", "-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]
        cmd = [QEMU, "-name", "userblk-guest", *accel, "-smp", str(c.smp), "-m", c.memory,
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
        if c.iommu:
            # first of all PCI devices; aw-bits=48 so that user virtual addresses fit as IOVAs
            # (the default 39 makes VFIO_IOMMU_MAP_DMA with IOVA = VA fail with EINVAL);
            # intremap=on makes the MSI-X table BAR mmappable through vfio
            cmd += ["-device", f"intel-iommu,intremap=on,caching-mode=on,aw-bits={c.iommu_aw}"]
        cmd += ["-kernel", str(image.kernel), "-initrd", str(image.initrd),
                "-append", self._kernel_cmdline(),
                # snapshot=on: every run starts from the same clean root disk
                "-drive", f"file={_quote_opt(image.rootfs)},if=virtio,format=raw,snapshot=on,"
                          "cache=unsafe"]
        cmd += self._nvme_args()  # before the auto-addressed devices: fixed slots 0x10+
        cmd += self._net_args()
        cmd += ["-chardev", f"file,id=console,path={_quote_opt(self.console_path)}",
                "-serial", "chardev:console",
                "-device", "virtio-serial-pci,id=vser"]
        for name in ("stdout", "stderr", "status"):
            cmd += ["-chardev", f"file,id={name},path={_quote_opt(run / name)}",
                    "-device", f"virtserialport,bus=vser.0,chardev={name},name=userblk.{name}"]
        cmd += ["-fw_cfg", f"name=opt/userblk/cmd,file={_quote_opt(run / 'cmd')}",
                "-fw_cfg", f"name=opt/userblk/shares,file={_quote_opt(run / 'shares')}"]
        for i, share in enumerate(c.shares):
            cmd += ["-fsdev", f"local,id=fs{i},path={_quote_opt(share.host)},"
                              "security_model=none,multidevs=remap",
                    "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag=share{i}"]
        cmd += list(c.qemu_args)
        return cmd

    def _command_script(self) -> str:
        c = self.config
        lines = ["#!/bin/bash"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in c.env]
        workdir = c.workdir or (c.shares[0].guest if c.shares else "/root")
        lines.append(f"cd {shlex.quote(workdir)} || exit {EXIT_BAD_WORKDIR}")
        lines.append("exec " + " ".join(shlex.quote(a) for a in self.argv))
        return "\n".join(lines) + "\n"

    def _shares_file(self) -> str:
        # parents before children, so that a share inside another one stays visible
        order = sorted(range(len(self.config.shares)),
                       key=lambda i: self.config.shares[i].guest.rstrip("/").count("/"))
        return "".join(f"share{i} {self.config.shares[i].cache} {self.config.shares[i].guest}\n"
                       for i in order)

    def _prepare(self) -> None:
        if self.image is None:
            from tests.guest.image import ensure_image
            self.image = ensure_image(build=True)
        for share in self.config.shares:
            if not os.path.isdir(share.host):
                raise ValueError(f"share {share.host} is not a directory")
        _remove_dead_rundirs()
        self.rundir = Path(tempfile.mkdtemp(prefix=RUNDIR_PREFIX))
        (self.rundir / "owner").write_text(f"{os.getpid()}\n")
        self.console_path = (Path(self.config.console_log).resolve() if self.config.console_log
                             else self.rundir / "console.log")
        self.console_path.parent.mkdir(parents=True, exist_ok=True)
        self.console_path.write_bytes(b"")
        (self.rundir / "cmd").write_text(self._command_script())
        (self.rundir / "shares").write_text(self._shares_file())
        (self.rundir / "status").write_bytes(b"")
        for name in ("stdout", "stderr"):
            os.mkfifo(self.rundir / name)

    # -- lifecycle --

    def start(self) -> "GuestRun":
        problem = qemu_problem()
        if problem:
            raise RuntimeError(problem)
        self._prepare()
        cmd = self.command = self.qemu_command()
        # QEMU must not outlive us: killed when the thread that started it dies (even by SIGKILL,
        # where no finally clause runs). setpriv execs QEMU, the death signal survives the exec.
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        out_sinks = [s for s in (self.capture and self._stdout.extend, self._out_sink) if s]
        err_sinks = [s for s in (self.capture and self._stderr.extend, self._err_sink) if s]
        self._pumps = [_Pump(self.rundir / "stdout", out_sinks),
                       _Pump(self.rundir / "stderr", err_sinks)]
        for pump in self._pumps:
            pump.start()
        env = dict(os.environ, TMPDIR=str(self.rundir))  # the snapshot overlay goes there too
        self._t0 = time.monotonic()
        with open(self.rundir / "qemu.log", "wb") as qlog:
            # own session: a Ctrl-C on the terminal reaches us, and we stop QEMU in order
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if self._console_stream is not None:
            self._tail = _ConsoleTail(self.console_path, self._console_stream)
            self._tail.start()
        return self

    def _read_status(self) -> list[str]:
        """Complete lines only: a line still being written must not be taken for a status."""
        try:
            text = (self.rundir / "status").read_text(errors="replace")
        except OSError:
            return []
        return [line[:-1] for line in text.splitlines(keepends=True) if line.endswith("\n")]

    @property
    def boot_seconds(self) -> float | None:
        return None if self._t_start is None else self._t_start - self._t0

    def poll(self) -> GuestResult | None:
        """Non-blocking: the result once the guest has ended, else None (enforces the timeout)."""
        if self._result is not None:
            return self._result
        if self.proc is None:
            raise RuntimeError("poll() before start()")
        now = time.monotonic()
        if self._t_start is None or self._t_exit is None:
            status = self._read_status()
            if self._t_start is None and any(s.startswith("start") for s in status):
                self._t_start = now
            if self._t_exit is None and any(s.startswith("exit") for s in status):
                self._t_exit = now
        if self.proc.poll() is None:
            if self._t_exit is not None:
                # Nothing is lost by not waiting for the ACPI power-off (~0.4 s): a guest write
                # to a virtio-serial port returns only once QEMU took the data, and the init
                # flushed and unmounted the shares before it reported "exit".
                self._stop_qemu()
            elif now - self._t0 > self.config.timeout:
                self._timed_out = True
                self._stop_qemu()
            else:
                return None
        return self._finish()

    def wait(self) -> GuestResult:
        while True:
            result = self.poll()
            if result is not None:
                return result
            time.sleep(0.02)

    def _stop_qemu(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _finish(self) -> GuestResult:
        total = time.monotonic() - self._t0
        self._stop_qemu()
        for pump in self._pumps:  # EOF follows QEMU's exit; unblock a pump QEMU never opened
            pump.join(5)
            if pump.is_alive():
                pump.unblock()
                pump.join(5)
        if self._tail is not None:
            self._tail.stop.set()
            self._tail.join(2)
        rc, guest_t0, guest_t1 = EXIT_NO_STATUS, None, None
        reported = False
        for line in self._read_status():
            fields = line.split()
            if fields[:1] == ["exit"] and len(fields) >= 2 and fields[1].lstrip("-").isdigit():
                reported, rc = True, int(fields[1])
                if len(fields) >= 4:
                    guest_t0, guest_t1 = float(fields[2]), float(fields[3])
        if self._timed_out:
            rc, reported = EXIT_TIMEOUT, False
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        self._result = GuestResult(
            returncode=rc, stdout=bytes(self._stdout), stderr=bytes(self._stderr),
            timed_out=self._timed_out, status_reported=reported,
            boot_seconds=self.boot_seconds,
            command_seconds=None if guest_t0 is None else guest_t1 - guest_t0,
            total_seconds=total, console=read(self.console_path),
            qemu_log=read(self.rundir / "qemu.log"),
            qemu_returncode=self.proc.returncode, accel=self.accel,
            console_log=str(self.console_path) if self.config.console_log else None)
        return self._result

    def close(self) -> None:
        """Stop QEMU and the readers, remove the run directory. Safe to call more than once."""
        if self.proc is not None and self._result is None:
            self._stop_qemu()
            for pump in self._pumps:
                pump.unblock()
        for pump in self._pumps:
            pump.join(2)
        if self._tail is not None:
            self._tail.stop.set()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    def __enter__(self) -> "GuestRun":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def run_guest(config: GuestConfig, argv: Iterable[str], image=None, **kw) -> GuestResult:
    """Boot, run ``argv`` as root, wait; see GuestRun for the keyword arguments."""
    with GuestRun(config, argv, image, **kw) as run:
        return run.wait()


# ---- command line -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    d = GuestConfig()
    ap = argparse.ArgumentParser(
        prog="python -m tests.guest.runner",
        usage="%(prog)s [options] -- COMMAND [ARG...]",
        description="Boot the userblk test guest, run COMMAND in it as root, stream its stdout "
                    "and stderr, exit with its status (124: timeout, 255: no status reported).")
    a = ap.add_argument
    a("--share", action="append", default=[], metavar="HOST[:GUEST]",
      help="share HOST over 9p at GUEST (default: the same path); repeatable; the first one is "
           "the working directory unless --workdir")
    a("--share-cache", default="loose", choices=SHARE_CACHE_MODES,
      help="9p cache mode of the shares (default loose: fast, do not change files meanwhile)")
    a("--env", action="append", default=[], metavar="NAME=VALUE", help="repeatable")
    a("--workdir", help="the command's working directory in the guest")
    a("--nvme-ctrls", type=int, default=d.nvme_ctrls, help="NVMe controllers (default 1)")
    a("--nvme-ns", type=int, default=d.nvme_ns, help="namespaces per controller (default 1)")
    a("--nvme-size", default="1G", help="bytes per namespace (default 1G)")
    a("--nvme-opts", default="", metavar="PROPS", help="e.g. mdts=2,max_ioqpairs=4")
    a("--ns-opts", default="", metavar="PROPS",
      help="e.g. logical_block_size=4096,physical_block_size=4096")
    a("--nvme-backend", default="file", choices=("file", "null"))
    a("--null-latency-ns", type=int, default=0, metavar="NS", help="null backend latency")
    a("--nvme-image", metavar="FILE", help="back controller 0 namespace 1 with FILE (kept)")
    a("--iommu", default="on", choices=("on", "off"))
    a("--iommu-aw", type=int, default=48, choices=(39, 48))
    a("--net", default="", metavar="listen:PORT|connect:PORT",
      help="a virtio-net NIC on a QEMU socket network through host 127.0.0.1:PORT: start one "
           "guest with listen:PORT, then one with connect:PORT; they are one Ethernet")
    a("--smp", type=int, default=d.smp)
    a("--memory", default=d.memory)
    a("--hugepages", type=int, default=d.hugepages)
    a("--append", default="", help="extra kernel command line")
    a("--qemu-arg", action="append", default=[], metavar="ARG", help="repeatable")
    a("--timeout", type=float, default=d.timeout, help="seconds (default 900)")
    a("--console", metavar="FILE", help="keep the serial console log in FILE")
    a("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    a("--no-build", action="store_true", help="fail instead of building a missing image")
    a("--print-qemu", action="store_true", help="print the QEMU command line and exit")
    a("-v", "--verbose", action="store_true",
      help="stream the console to stderr ('[console] ' prefix) and print a timing summary")
    a("command", nargs=argparse.REMAINDER)
    return ap


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the context manager stops QEMU


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no COMMAND given (put it after --)")
    try:
        config = GuestConfig(
            shares=[dataclasses.replace(Share.parse(s), cache=args.share_cache)
                    for s in args.share],
            env=args.env, workdir=args.workdir, nvme_ctrls=args.nvme_ctrls,
            nvme_ns=args.nvme_ns, nvme_size=args.nvme_size, nvme_opts=args.nvme_opts,
            ns_opts=args.ns_opts, nvme_backend=args.nvme_backend,
            null_latency_ns=args.null_latency_ns, nvme_image=args.nvme_image,
            iommu=args.iommu == "on", iommu_aw=args.iommu_aw, smp=args.smp, memory=args.memory,
            hugepages=args.hugepages, append=args.append, qemu_args=args.qemu_arg,
            timeout=args.timeout, console_log=args.console, accel=args.accel, net=args.net)
        from tests.guest.image import ImageUnavailable, ensure_image
        image = ensure_image(build=not args.no_build)
    except (ValueError, ImageUnavailable) as e:
        print(f"runner: {e}", file=sys.stderr)
        return EXIT_NO_STATUS
    run = GuestRun(config, command, image, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                   capture=False, console_stream=sys.stderr.buffer if args.verbose else None)
    if args.print_qemu:
        try:
            run._prepare()
            print(shlex.join(run.qemu_command()))
        finally:
            run.close()
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with run:
            if args.verbose:
                print("[runner] " + shlex.join(run.command), file=sys.stderr)
            result = run.wait()
    except KeyboardInterrupt:
        print("runner: interrupted, guest stopped", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:  # bad share, QEMU missing, ...
        print(f"runner: {e}", file=sys.stderr)
        return EXIT_NO_STATUS
    problem = result.problem()
    if problem:
        if not args.console:  # keep the whole console of a failed boot for a closer look
            kept = Path(tempfile.gettempdir()) / f"userblk-guest-console-{os.getpid()}.log"
            kept.write_text(result.console)
            problem += f"\n(whole console: {kept})"
        print(f"runner: {problem}", file=sys.stderr)
    if args.verbose:
        print(f"[runner] {result.summary()}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
