"""`userblk setup`: prepare a machine for user-space NVMe, as SPDK's scripts/setup.sh does.

`configure()` (`userblk setup`) reserves 2 MiB hugepages, mounts hugetlbfs at /dev/hugepages when
no writable 2 MiB hugetlbfs is mounted, loads the driver module, and binds every NVMe function
(class 0x010802) to vfio-pci (when an IOMMU is active or vfio runs in no-IOMMU mode) or to
uio_pci_generic. It skips, saying why, functions whose namespaces are in use (mounted, swap, held
by LVM/md), functions in the block list or missing from the allow list, and functions already
bound to the wanted driver (or to the other user-space driver: a process may be using them).

`reset()` (`userblk setup reset`) gives every NVMe function on a user-space driver (vfio-pci,
uio_pci_generic, igb_uio) back to its kernel driver, leaves the hugetlbfs mount, and frees or
resizes the hugepages only when asked (`--hugemem`). A function some process still has open
(its /dev/vfio group, /dev/uioN, or its sysfs config/BARs) is skipped: unbinding vfio-pci under a
user blocks in the kernel until that user lets go.

`status()` (`userblk setup status`) is the table of SPDK's `setup.sh status`: hugepages per size
and NUMA node, and per NVMe function its address, ids, NUMA node, driver and block devices.

Original drivers: `restore()` clears driver_override and lets the kernel probe, so a device goes
back to the kernel's default driver for it, as with SPDK. `configure()` also records what each
device it bound was taken from in a small state file (`/run/userblk/setup.json`, gone at reboot
like the binding itself); `reset()` uses the record to know which driver to wait for (and to load
it if it was unloaded meanwhile), and falls back to `nvme` for devices it has no record of (bound
by hand, or by `userblk identify --keep`).

Hugepages: `configure()` raises the 2 MiB pool to at least the pages asked for and never shrinks
it (other programs' pages may be in it); `reset(hugepages=N)` sets it to exactly N (0 frees the
free ones; pages still in use are released by the kernel when their users let go). What the kernel
really gave is read back and reported: with fragmented memory it gives fewer than asked.

Every sysfs, procfs and /dev path comes from a `Host`, so the unit tests run all of this against a
fake tree. Nothing here prints: the functions return reports and `format_*()` renders them.
"""
import json
import logging
import os
import re
import subprocess

from env.errors import EnvError, InvalidArgument, PciError, PermissionRequired
from env.pci import (NVME_CLASS, USERSPACE_DRIVERS, PciAddress, Sysfs, enumerate_devices,
                     load_driver)

log = logging.getLogger("userblk.env.setup")

HUGEPAGE_KB = 2048
HUGEPAGE_SIZE = HUGEPAGE_KB << 10
DEFAULT_HUGEMEM_MIB = 2048
STATE_FILE = "/run/userblk/setup.json"
HUGETLBFS_DIR = "/dev/hugepages"
BIND_TIMEOUT = 10.0          # seconds for a bind, unbind or the kernel driver's return
VFIO = "vfio-pci"
UIO = "uio_pci_generic"
KERNEL_NVME_DRIVER = "nvme"
DRIVER_CHOICES = {"auto": "auto", "vfio-pci": VFIO, "vfio": VFIO, "uio_pci_generic": UIO,
                  "uio": UIO}
_HUGEPAGES_DIR = f"kernel/mm/hugepages/hugepages-{HUGEPAGE_KB}kB"
_NOIOMMU_PARAM = "module/vfio/parameters/enable_unsafe_noiommu_mode"


class SetupError(EnvError):
    """`userblk setup` cannot do what it was asked (bad list entry, impossible driver)."""


class SetupPermissionError(SetupError, PermissionRequired):
    """`userblk setup` needs root for what it was asked to do."""


# ---- the machine ------------------------------------------------------------------------------
class Host:
    """Where setup reads and writes: the sysfs root, procfs files, the state file, the hugetlbfs
    mount point, the effective uid, and how to run `mount`. Defaults are the real machine's."""

    def __init__(self, sysfs="/sys", mounts="/proc/mounts", swaps="/proc/swaps", proc="/proc",
                 dev="/dev", state_file=STATE_FILE, hugetlbfs_dir=HUGETLBFS_DIR, euid=None,
                 mount=None):
        self.sysfs = sysfs if isinstance(sysfs, Sysfs) else Sysfs(sysfs)
        self.mounts, self.swaps, self.proc, self.dev = mounts, swaps, proc, dev
        self.state_file = state_file
        self.hugetlbfs_dir = hugetlbfs_dir
        self.euid = os.geteuid() if euid is None else euid
        self._mount = mount or _run_mount

    @property
    def is_root(self):
        return self.euid == 0

    def mount_hugetlbfs(self, target):
        os.makedirs(target, exist_ok=True)
        self._mount(target)


def default_host():
    """The real machine (the unit tests replace this to point the CLI at a fake tree)."""
    return Host()


def _run_mount(target):
    try:
        res = subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={HUGEPAGE_KB}K",
                              "nodev", target], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SetupError("cannot mount hugetlbfs: the mount command is not installed "
                         "(package mount / util-linux)") from None
    if res.returncode != 0:
        raise SetupError(f"mount -t hugetlbfs nodev {target} failed: "
                         f"{(res.stderr or res.stdout).strip() or 'no message'}")


def require_root(host, what):
    if not host.is_root:
        raise SetupPermissionError(
            f"needs root: {what}. Run it as root (sudo), or add --dry-run to see what it would do")


# ---- arguments --------------------------------------------------------------------------------
def pages_for(hugemem_mib=None, hugepages=None, default_mib=DEFAULT_HUGEMEM_MIB):
    """The number of 2 MiB pages for `hugemem_mib` MiB (rounded up) or `hugepages` pages; the
    default when neither is given; None when the default is None."""
    if hugemem_mib is not None and hugepages is not None:
        raise InvalidArgument("give --hugemem or --hugepages, not both")
    if hugepages is not None:
        if not isinstance(hugepages, int) or isinstance(hugepages, bool) or hugepages < 0:
            raise InvalidArgument(f"--hugepages must be a count >= 0, not {hugepages!r}")
        return hugepages
    mib = default_mib if hugemem_mib is None else hugemem_mib
    if mib is None:
        return None
    if not isinstance(mib, int) or isinstance(mib, bool) or mib < 0:
        raise InvalidArgument(f"--hugemem must be a number of MiB >= 0, not {mib!r}")
    return -(-mib * (1 << 20) // HUGEPAGE_SIZE)


def parse_addresses(items):
    """A set of PciAddress from BDF strings; each item may hold several, separated by commas or
    whitespace (SPDK's PCI_ALLOWED="a b" spelling works too)."""
    out = set()
    for item in items or ():
        for word in re.split(r"[\s,]+", str(item).strip()):
            if word:
                out.add(PciAddress.parse(word))
    return out


# ---- hugepages --------------------------------------------------------------------------------
def _read_int(sysfs, rel):
    try:
        return int(sysfs.read(rel))
    except (OSError, ValueError):
        return None


def hugepage_table(sysfs):
    """[(node or None, page size in kB, total, free)]: per NUMA node when the kernel shows nodes,
    else one row per size for the whole machine (node None)."""
    rows = []
    for node in sysfs.listdir("devices/system/node"):
        if not re.fullmatch(r"node\d+", node):
            continue
        base = f"devices/system/node/{node}/hugepages"
        for name in sysfs.listdir(base):
            m = re.fullmatch(r"hugepages-(\d+)kB", name)
            total = _read_int(sysfs, f"{base}/{name}/nr_hugepages")
            if m and total is not None:
                free = _read_int(sysfs, f"{base}/{name}/free_hugepages") or 0
                rows.append((int(node[4:]), int(m.group(1)), total, free))
    if rows:
        return sorted(rows)
    for name in sysfs.listdir("kernel/mm/hugepages"):
        m = re.fullmatch(r"hugepages-(\d+)kB", name)
        total = _read_int(sysfs, f"kernel/mm/hugepages/{name}/nr_hugepages")
        if m and total is not None:
            free = _read_int(sysfs, f"kernel/mm/hugepages/{name}/free_hugepages") or 0
            rows.append((None, int(m.group(1)), total, free))
    return sorted(rows, key=lambda r: r[1])


def _pool_file(node):
    if node is None:
        return f"{_HUGEPAGES_DIR}/nr_hugepages"
    return f"devices/system/node/node{node}/hugepages/hugepages-{HUGEPAGE_KB}kB/nr_hugepages"


def set_hugepages(host, pages, node=None, exact=False, dry_run=False):
    """Make the 2 MiB pool (of NUMA node `node`, or the machine's) hold `pages` pages: at least
    that many, or exactly that many with `exact`. Returns a dict: node, before, requested, after
    (what the kernel gave, read back), changed, short (the kernel gave fewer than asked), in_use
    (shrinking: pages kept because they are in use), total (the machine's pool afterwards)."""
    sysfs = host.sysfs
    rel = _pool_file(node)
    before = _read_int(sysfs, rel)
    if before is None:
        where = f"NUMA node {node}" if node is not None else "this kernel"
        raise SetupError(f"{where} offers no {HUGEPAGE_KB} kB hugepages ({sysfs.path(rel)} is "
                         "missing): a kernel without CONFIG_HUGETLBFS, or no such node")
    want = pages if exact else max(pages, before)
    out = {"page_kb": HUGEPAGE_KB, "node": node, "before": before, "requested": pages,
           "after": before, "changed": False, "short": False, "in_use": 0}
    if want != before:
        out["changed"] = True
        if dry_run:
            out["after"] = None
        else:
            try:
                sysfs.write(rel, str(want))
            except PermissionError as e:
                raise SetupPermissionError(
                    f"writing {sysfs.path(rel)} was refused ({e.strerror}): reserving hugepages "
                    "needs root") from None
            except OSError as e:
                raise SetupError(f"writing {want} to {sysfs.path(rel)} failed: "
                                 f"{e.strerror or e}") from None
            out["after"] = _read_int(sysfs, rel)
            if out["after"] is not None:
                out["short"] = out["after"] < want
                out["in_use"] = max(0, out["after"] - want)    # shrinking: pages still used
    out["total"] = _read_int(sysfs, f"{_HUGEPAGES_DIR}/nr_hugepages")
    return out


def _mount_points(host):
    try:
        with open(host.mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [(f[1].replace("\\040", " "), f[2]) for f in (line.split() for line in lines)
            if len(f) >= 3]


def _default_page_size(host):
    try:
        with open(os.path.join(host.proc, "meminfo")) as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return HUGEPAGE_SIZE


def find_hugetlbfs(host):
    """The mount point of a read-write hugetlbfs with 2 MiB pages, or None. (Root may write to
    any read-write mount: the test env.memory.hugetlbfs_mount() makes with access(W_OK) is the
    same one for root, and this one also answers for a dry run as a user.)"""
    from env.memory import hugetlbfs_mounts
    for path, size, readonly in hugetlbfs_mounts(host.mounts, _default_page_size(host)):
        if size == HUGEPAGE_SIZE and not readonly:
            return path
    return None


def ensure_hugetlbfs(host, dry_run=False):
    """The mount point of a read-write 2 MiB hugetlbfs, mounting one when there is none.
    Returns (mount point, mounted now?)."""
    found = find_hugetlbfs(host)
    if found is not None:
        return found, False
    target = host.hugetlbfs_dir
    if any(point == target for point, _fs in _mount_points(host)):
        target = f"{target}-2M"        # something else (e.g. a 1 GiB hugetlbfs) is mounted there
    if not dry_run:
        host.mount_hugetlbfs(target)
        log.info("mounted hugetlbfs (2 MiB pages) at %s", target)
    return target, True


# ---- the driver -------------------------------------------------------------------------------
def _iommu_groups(sysfs):
    return len(sysfs.listdir("kernel/iommu_groups"))


def _noiommu(sysfs):
    try:
        return sysfs.read(_NOIOMMU_PARAM) in ("Y", "1")
    except OSError:
        return False


def choose_driver(host, requested="auto"):
    """(driver, why) for `requested` ("auto", "vfio-pci", "uio_pci_generic"; "vfio" and "uio"
    too). auto, like SPDK: vfio-pci when an IOMMU is active or vfio's no-IOMMU mode is on, else
    uio_pci_generic."""
    kind = DRIVER_CHOICES.get(requested)
    if kind is None:
        raise InvalidArgument(f"--driver must be auto, vfio-pci or uio_pci_generic, not "
                              f"{requested!r}")
    groups = _iommu_groups(host.sysfs)
    noiommu = _noiommu(host.sysfs)
    if groups:
        why = f"IOMMU active, {groups} groups"
    elif noiommu:
        why = "no IOMMU, vfio in unsafe no-IOMMU mode"
    else:
        why = "no IOMMU and vfio no-IOMMU mode off"
    if kind == "auto":
        return (VFIO if groups or noiommu else UIO), why
    if kind == VFIO and not groups and not noiommu:
        raise SetupError("--driver vfio-pci needs an IOMMU (boot with intel_iommu=on or "
                         "amd_iommu=on) or vfio's no-IOMMU mode (modprobe vfio "
                         "enable_unsafe_noiommu_mode=1); use --driver uio_pci_generic")
    return kind, f"{why}; asked for"


# ---- processes holding a device ---------------------------------------------------------------
def _device_paths(host, pci):
    """(exact paths, path prefixes) whose opening or mapping means a process uses `pci` through
    vfio or uio."""
    exact, prefixes = set(), []
    group = pci.iommu_group
    if group is not None:
        exact |= {f"{host.dev}/vfio/{group}", f"{host.dev}/vfio/noiommu-{group}"}
    for name in pci.sysfs.listdir(f"bus/pci/devices/{pci.address}/uio"):
        exact.add(f"{host.dev}/{name}")
    real = os.path.realpath(pci.attr_path(""))
    prefixes.append(real.rstrip("/") + "/")
    return exact, prefixes


def processes_using(host, pci):
    """['pid 123 (python3)', ...]: processes with the device's vfio group, uio node, or sysfs
    config/BAR files open or mapped."""
    exact, prefixes = _device_paths(host, pci)

    def hit(path):
        path = path.split(" (deleted)")[0]
        return path in exact or any(path.startswith(p) for p in prefixes)

    users = []
    try:
        pids = [p for p in os.listdir(host.proc) if p.isdigit()]
    except OSError:
        return users
    for pid in sorted(pids, key=int):
        base = os.path.join(host.proc, pid)
        found = False
        try:
            for fd in os.listdir(os.path.join(base, "fd")):
                try:
                    if hit(os.readlink(os.path.join(base, "fd", fd))):
                        found = True
                        break
                except OSError:
                    continue
        except OSError:
            pass
        if not found:
            try:
                with open(os.path.join(base, "maps")) as f:
                    found = any(hit(line.split(None, 5)[5].strip()) for line in f
                                if len(line.split(None, 5)) == 6)
            except OSError:
                pass
        if found:
            try:
                with open(os.path.join(base, "comm")) as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            users.append(f"pid {pid} ({comm})")
    return users


# ---- the state file ---------------------------------------------------------------------------
def load_state(host):
    """{bdf: {"original_driver": ..., "driver": ...}} recorded by earlier `configure()` runs."""
    try:
        with open(host.state_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", host.state_file, e)
        return {}
    devices = data.get("devices") if isinstance(data, dict) else None
    return dict(devices) if isinstance(devices, dict) else {}


def save_state(host, devices):
    path = host.state_file
    if not devices:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "devices": devices}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ---- per device -------------------------------------------------------------------------------
def _describe(pci):
    return {"address": str(pci.address), "vendor": f"{pci.vendor_id:04x}",
            "device": f"{pci.device_id:04x}", "numa_node": pci.numa_node,
            "iommu_group": pci.iommu_group, "driver_before": pci.driver,
            "block_devices": pci.block_devices()}


def _list_problems(devices, allow, block):
    """Notes for --allow/--block entries that name no NVMe function here."""
    present = {d.address for d in devices}
    notes = []
    for flag, addrs in (("--allow", allow), ("--block", block)):
        for a in sorted(addrs - present):
            notes.append(f"{a} (in {flag}) is not an NVMe function on this machine")
    return notes


def _group_note(pci, target):
    """A note when vfio will refuse the device's IOMMU group because other members of it are on
    kernel drivers."""
    if target != VFIO:
        return None
    others = [m for m in pci.iommu_group_members()
              if m.address != pci.address and m.driver not in (None, VFIO, "pcieport")]
    if not others:
        return None
    names = ", ".join(f"{m.address} ({m.driver})" for m in others)
    return (f"{pci.address}: IOMMU group {pci.iommu_group} also holds {names}: vfio refuses a "
            "group until every member is on vfio-pci (or no driver)")


def _skip_reason(pci, target, allow, block, host):
    if pci.address in block:
        return "in --block"
    if allow and pci.address not in allow:
        return "not in --allow"
    current = pci.driver
    if current == target:
        return f"already bound to {target}"
    if current in USERSPACE_DRIVERS:
        return (f"bound to {current}, another user-space driver (a process may be using it): "
                "`userblk setup reset` first")
    users = pci.active_users(host.mounts, host.swaps)
    if users:
        return f"in use: {'; '.join(users)}"
    return None


def configure(host=None, *, hugepages=None, hugemem_mib=None, node=None, driver="auto",
              allow=(), block=(), dry_run=False, timeout=None):
    """`userblk setup`: hugepages, hugetlbfs, driver module, NVMe bindings. Returns a report
    dict (see format_report); report["ok"] is False when some device could not be bound."""
    host = host or default_host()
    if not dry_run:
        require_root(host, "reserving hugepages, mounting hugetlbfs, loading the driver module and "
                           "binding NVMe devices (sysfs driver_override)")
    allow, block = parse_addresses(allow), parse_addresses(block)
    pages = pages_for(hugemem_mib, hugepages)
    target, why = choose_driver(host, driver)
    report = {"command": "config", "dry_run": dry_run, "notes": [], "devices": [], "ok": True}

    # hugepages first: uio_pci_generic is useless without them
    try:
        hp = set_hugepages(host, pages, node, exact=False, dry_run=dry_run)
    except SetupPermissionError:
        raise
    except SetupError as e:
        if node is not None:
            raise
        hp = None          # vfio works without hugepages; say so and go on with the devices
        report["notes"].append(str(e))
    report["hugepages"] = hp
    if hp and hp["short"]:
        report["notes"].append(
            f"the kernel gave {hp['after']} of {max(pages, hp['before'])} {HUGEPAGE_KB} kB pages: "
            "memory is too fragmented or too small (reserve them right after boot, or boot with "
            f"hugepages={max(pages, hp['before'])})")
    if hp and (hp["total"] or (dry_run and hp["changed"] and pages)):
        point, now = ensure_hugetlbfs(host, dry_run)
        report["hugetlbfs"] = {"mount": point, "mounted_now": now}
    else:
        report["hugetlbfs"] = {"mount": None, "mounted_now": False}
        if target == UIO:
            report["notes"].append("no hugepages are reserved: uio_pci_generic devices can only "
                                   "DMA to hugepages")

    devices = enumerate_devices(host.sysfs, NVME_CLASS)
    report["notes"] += _list_problems(devices, allow, block)
    plan = []
    for pci in devices:
        entry = _describe(pci)
        entry["driver_after"] = entry["driver_before"]
        reason = _skip_reason(pci, target, allow, block, host)
        entry["action"] = "skip" if reason else "bind"
        entry["reason"] = reason
        report["devices"].append(entry)
        if not reason:
            plan.append((pci, entry))
            note = _group_note(pci, target)
            if note:
                report["notes"].append(note)

    report["driver"] = {"name": target, "why": why, "loaded_now": False}
    if plan:
        if not host.sysfs.exists(f"bus/pci/drivers/{target}"):
            report["driver"]["loaded_now"] = True
            if not dry_run:
                load_driver(target, host.sysfs)
    if dry_run:
        for _pci, entry in plan:
            entry["driver_after"] = target
        return report

    state = load_state(host)
    for pci, entry in plan:
        before = entry["driver_before"]
        try:
            pci.bind(target, timeout=BIND_TIMEOUT if timeout is None else timeout)
            entry["driver_after"] = pci.driver
            state.setdefault(str(pci.address), {"original_driver": before})["driver"] = target
        except EnvError as e:
            entry.update(action="error", reason=str(e), driver_after=pci.driver)
            report["ok"] = False
    save_state(host, state)
    return report


def reset(host=None, *, hugepages=None, hugemem_mib=None, allow=(), block=(), dry_run=False,
          timeout=None):
    """`userblk setup reset`: give every NVMe function on a user-space driver back to the kernel;
    with `hugepages`/`hugemem_mib`, set the 2 MiB pool to exactly that (0 frees it). The
    hugetlbfs mount stays. Returns a report dict like configure()'s."""
    host = host or default_host()
    if not dry_run:
        require_root(host, "giving NVMe devices back to the kernel (sysfs driver_override, "
                           "unbind) and resizing hugepages")
    allow, block = parse_addresses(allow), parse_addresses(block)
    pages = pages_for(hugemem_mib, hugepages, default_mib=None)
    report = {"command": "reset", "dry_run": dry_run, "notes": [], "devices": [], "ok": True,
              "hugepages": None}
    state = load_state(host)
    devices = enumerate_devices(host.sysfs, NVME_CLASS)
    report["notes"] += _list_problems(devices, allow, block)
    for pci in devices:
        entry = _describe(pci)
        current = entry["driver_before"]
        entry["driver_after"] = current
        report["devices"].append(entry)
        record = state.get(str(pci.address))
        ours = current in USERSPACE_DRIVERS or (
            current is None and (pci.driver_override in USERSPACE_DRIVERS or record is not None))
        reason = None
        if pci.address in block:
            reason = "in --block"
        elif allow and pci.address not in allow:
            reason = "not in --allow"
        elif not ours:
            reason = f"on {current}, not a user-space driver" if current else \
                "no driver, and setup did not bind it"
            if record is not None and not dry_run:
                state.pop(str(pci.address))      # given back by other means meanwhile
        else:
            users = processes_using(host, pci)
            if users:
                reason = (f"in use by {', '.join(users)}: stop it first (unbinding {current} "
                          "would wait for it)")
        # the driver to wait for: the recorded one, nvme without a record; None (setup took
        # it from no driver): the kernel's choice, not waited for
        want = record.get("original_driver") if record else KERNEL_NVME_DRIVER
        entry["action"] = "skip" if reason else "restore"
        entry["reason"] = reason
        entry["restore_to"] = want
        if reason or dry_run:
            if not reason:
                entry["driver_after"] = want
            continue
        try:
            if want is not None and not host.sysfs.exists(f"bus/pci/drivers/{want}"):
                try:
                    load_driver(want, host.sysfs)
                except PciError as e:
                    report["notes"].append(f"{pci.address}: {e}; the kernel picks a driver")
                    want = None
            pci.original_driver = want
            pci.restore(BIND_TIMEOUT if timeout is None else timeout)
            entry["driver_after"] = pci.driver
            state.pop(str(pci.address), None)
        except EnvError as e:
            entry.update(action="error", reason=str(e), driver_after=pci.driver)
            report["ok"] = False
    if not dry_run:
        present = {str(d.address) for d in devices}
        save_state(host, {k: v for k, v in state.items() if k in present})
    if pages is not None:
        report["hugepages"] = set_hugepages(host, pages, exact=True, dry_run=dry_run)
    return report


def status(host=None):
    """Hugepages per size and NUMA node, the hugetlbfs mount, and every NVMe function."""
    host = host or default_host()
    state = load_state(host)
    rows = []
    for pci in enumerate_devices(host.sysfs, NVME_CLASS):
        d = _describe(pci)
        d["driver"] = d.pop("driver_before")
        d["controllers"] = pci.sysfs.listdir(f"bus/pci/devices/{pci.address}/nvme")
        if d["driver"] == VFIO and d["iommu_group"] is not None:
            d["controllers"] = [f"vfio/{d['iommu_group']}"]         # its /dev/vfio group
        d["controllers"] += pci.sysfs.listdir(f"bus/pci/devices/{pci.address}/uio")
        record = state.get(str(pci.address))
        d["original_driver"] = record.get("original_driver") if record else None
        rows.append(d)
    return {"hugepages": [{"node": n, "page_kb": kb, "total": t, "free": f}
                          for n, kb, t, f in hugepage_table(host.sysfs)],
            "hugetlbfs": find_hugetlbfs(host),
            "driver_choice": dict(zip(("name", "why"), choose_driver(host))),
            "nvme": rows}


# ---- text -------------------------------------------------------------------------------------
def _ids(d):
    return f"{d['address']} ({d['vendor']} {d['device']})"


def _size(kb):
    return f"{kb >> 20} GiB" if kb >= 1 << 20 else f"{kb >> 10} MiB" if kb >= 1024 else f"{kb} kB"


def _hugepage_line(hp, dry_run):
    where = f" on NUMA node {hp['node']}" if hp["node"] is not None else ""
    mib = lambda n: n * HUGEPAGE_KB >> 10   # noqa: E731
    if not hp["changed"]:
        return (f"hugepages: {hp['before']} x 2 MiB{where} already reserved ({mib(hp['before'])} "
                f"MiB), {hp['requested']} asked: left as they are")
    if dry_run:
        return (f"hugepages: would set {hp['before']} -> {hp['requested']} x 2 MiB{where} "
                f"({mib(hp['requested'])} MiB)")
    gave = hp["after"]
    tail = f"; the kernel gave only {gave}" if hp["short"] else ""
    if hp.get("in_use"):
        tail = f"; {hp['in_use']} still in use (freed when their users let go)"
    return (f"hugepages: {hp['before']} -> {gave} x 2 MiB{where} ({mib(gave or 0)} MiB), "
            f"{hp['requested']} asked{tail}")


def format_report(report):
    """The report of configure() or reset() as text lines, SPDK style."""
    dry = report["dry_run"]
    lines = []
    if dry:
        lines.append("dry run: nothing is changed")
    if report["command"] == "config":
        if report["hugepages"] is not None:
            lines.append(_hugepage_line(report["hugepages"], dry))
        fs = report["hugetlbfs"]
        if fs["mount"] is None:
            lines.append("hugetlbfs: not mounted (no hugepages reserved)")
        elif fs["mounted_now"]:
            lines.append(f"hugetlbfs: {'would mount' if dry else 'mounted'} at {fs['mount']}")
        else:
            lines.append(f"hugetlbfs: mounted at {fs['mount']}")
    if report["command"] == "config":
        drv = report["driver"]
        load = (" (would load the module)" if dry else " (module loaded)") \
            if drv["loaded_now"] else ""
        lines.append(f"driver: {drv['name']} ({drv['why']}){load}")
    if not report["devices"]:
        lines.append("no NVMe functions (class 0x010802) on this machine")
    for d in report["devices"]:
        before = d["driver_before"] or "no driver"
        if d["action"] in ("bind", "restore"):
            after = d["driver_after"] or "the kernel's choice"
            if d["action"] == "restore" and d["driver_after"] is None and not dry:
                after = "no driver"
            lines.append(f"{_ids(d)}: {'would move ' if dry else ''}{before} -> {after}")
        elif d["action"] == "skip":
            lines.append(f"{_ids(d)}: {before}, skipped: {d['reason']}")
        else:
            lines.append(f"{_ids(d)}: {before}, FAILED: {d['reason']}")
    if report["command"] == "reset" and report["hugepages"] is not None:
        lines.append(_hugepage_line(report["hugepages"], dry).replace(
            " asked: left as they are", " asked: unchanged"))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def format_status(info):
    """The status as two tables, like SPDK's `setup.sh status`."""
    lines = ["Hugepages", f"{'node':<6} {'hugesize':>10} {'free':>8} / {'total':<8}"]
    if not info["hugepages"]:
        lines.append("(this kernel offers no hugepages)")
    for h in info["hugepages"]:
        node = "-" if h["node"] is None else f"node{h['node']}"
        lines.append(f"{node:<6} {_size(h['page_kb']):>10} {h['free']:>8} / {h['total']:<8}")
    lines.append(f"hugetlbfs (2 MiB): {info['hugetlbfs'] or 'not mounted (writable)'}")
    choice = info["driver_choice"]
    lines.append(f"setup would use: {choice['name']} ({choice['why']})")
    lines.append("")
    header = (f"{'Type':<5} {'BDF':<13} {'Vendor':<6} {'Device':<6} {'NUMA':<4} {'Driver':<24} "
              f"{'Device name':<12} Block devices")
    lines.append(header)
    if not info["nvme"]:
        lines.append("(no NVMe functions, class 0x010802)")
    for d in info["nvme"]:
        numa = "-" if d["numa_node"] is None else str(d["numa_node"])
        name = ",".join(d["controllers"]) or "-"
        blocks = ",".join(d["block_devices"]) or "-"
        driver = d["driver"] or "-"
        if d["original_driver"] and d["driver"] != d["original_driver"]:
            driver += f" (was {d['original_driver']})"
        lines.append(f"{'NVMe':<5} {d['address']:<13} {d['vendor']:<6} {d['device']:<6} "
                     f"{numa:<4} {driver:<24} {name:<12} {blocks}")
    return "\n".join(lines)


__all__ = ["DEFAULT_HUGEMEM_MIB", "Host", "STATE_FILE", "SetupError", "SetupPermissionError",
           "choose_driver", "configure", "default_host", "ensure_hugetlbfs", "find_hugetlbfs",
           "format_report", "format_status", "hugepage_table", "pages_for", "parse_addresses",
           "processes_using", "reset", "set_hugepages", "status"]
