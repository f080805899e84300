"""What this machine offers a user-space storage stack: the facts `userblk env` prints.

Hugepages reserved and free per size, hugetlbfs mounts, whether an IOMMU is active, the vfio and
uio modules (loaded, available, or absent), vfio's no-IOMMU mode, the DMA memory backend that
`env.memory.allocate()` would use, and every NVMe PCI function with its driver. Each probe reads
sysfs/procfs only and copes with what is missing (containers, chroots): "unknown" is an answer.
"""
import os
import platform

from env import memory
from env.pci import NVME_CLASS, enumerate_devices

MODULES = ("vfio", "vfio_pci", "vfio_iommu_type1", "uio", "uio_pci_generic")


def module_state(name, sys_root="/sys", modules_root="/lib/modules"):
    """'loaded', 'available' (a .ko or built in), 'absent', or 'unknown' (no module tree here)."""
    if os.path.isdir(f"{sys_root}/module/{name}"):
        return "loaded"
    tree = f"{modules_root}/{platform.release()}"
    if not os.path.isdir(tree):
        return "unknown"
    wanted = {name, name.replace("_", "-")}
    for index in ("modules.dep", "modules.builtin"):
        try:
            with open(f"{tree}/{index}") as f:
                for line in f:
                    base = os.path.basename(line.split(":", 1)[0].strip())
                    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
                        if base.endswith(suffix) and base[:-len(suffix)] in wanted:
                            return "available"
        except OSError:
            continue
    return "absent"


def iommu_state(sys_root="/sys"):
    """(active, number of IOMMU groups)."""
    try:
        groups = os.listdir(f"{sys_root}/kernel/iommu_groups")
    except OSError:
        groups = []
    return bool(groups), len(groups)


def noiommu_mode(sys_root="/sys"):
    try:
        with open(f"{sys_root}/module/vfio/parameters/enable_unsafe_noiommu_mode") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def _size_name(size):
    return f"{size >> 30}GiB" if size >= 1 << 30 else f"{size >> 20}MiB"


def gather(sys_root="/sys"):
    """Everything as a JSON-friendly dict."""
    pages = memory.hugepage_status(f"{sys_root}/kernel/mm/hugepages")
    active, ngroups = iommu_state(sys_root)
    devices = []
    try:
        for dev in enumerate_devices(sys_root, class_code=NVME_CLASS):
            devices.append({
                "address": str(dev.address),
                "vendor": f"{dev.vendor_id:04x}", "device": f"{dev.device_id:04x}",
                "driver": dev.driver, "iommu_group": dev.iommu_group, "numa_node": dev.numa_node,
                "block_devices": dev.block_devices(),
            })
    except Exception as e:           # a broken sysfs entry must not hide the rest
        devices.append({"error": str(e)})
    free_2m = pages.get(2 << 20, (0, 0))[1]
    return {
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "root": os.geteuid() == 0,
        "hugepages": {_size_name(size): {"reserved": total, "free": free}
                      for size, (total, free) in pages.items()},
        "hugetlbfs": memory.hugetlbfs_mount(),
        "iommu": {"active": active, "groups": ngroups},
        "vfio": {"container": os.path.exists("/dev/vfio/vfio"), "noiommu_mode": noiommu_mode(sys_root)},
        "modules": {m: module_state(m, sys_root) for m in MODULES},
        "dma_backend": "hugepage-2M" if free_2m else "anonymous (hugepage-free)",
        "nvme": devices,
    }


def format_text(info):
    """The report as aligned text lines."""
    def row(key, value):
        return f"  {key:<14}{value}"

    pages = "; ".join(f"{size}: {v['reserved']} reserved, {v['free']} free"
                      for size, v in info["hugepages"].items()) or "not supported by this kernel"
    mods = ", ".join(f"{m} {s}" for m, s in info["modules"].items())
    iommu = info["iommu"]
    lines = [
        "userblk env: what this machine offers",
        row("kernel", info["kernel"]),
        row("user", "root" if info["root"] else "not root (vfio, uio and binding need root)"),
        row("hugepages", pages),
        row("hugetlbfs", info["hugetlbfs"] or "no writable 2 MiB hugetlbfs mounted"),
        row("IOMMU", f"active, {iommu['groups']} groups (vfio with IOVA = VA)" if iommu["active"]
            else "none (vfio needs no-IOMMU mode, or uio_pci_generic with hugepages)"),
        row("vfio", ("/dev/vfio/vfio present" if info["vfio"]["container"]
                     else "/dev/vfio/vfio absent (modprobe vfio-pci)")
            + ("; unsafe no-IOMMU mode ON" if info["vfio"]["noiommu_mode"] else "")),
        row("modules", mods),
        row("DMA memory", info["dma_backend"]),
    ]
    if not info["nvme"]:
        lines.append(row("NVMe", "no NVMe PCI functions (class 0x010802)"))
    for d in info["nvme"]:
        if "error" in d:
            lines.append(row("NVMe", f"error reading sysfs: {d['error']}"))
            continue
        extra = f" ({', '.join(d['block_devices'])})" if d["block_devices"] else ""
        lines.append(row("NVMe", f"{d['address']} {d['vendor']}:{d['device']} "
                                 f"driver={d['driver'] or 'none'} iommu_group={d['iommu_group']} "
                                 f"numa={d['numa_node']}{extra}"))
    return "\n".join(lines)
