"""Virtual to physical address lookups through /proc/self/pagemap.

Used only where there is no IOMMU (vfio no-IOMMU mode, uio): the device then DMAs to physical
addresses, which stay put only for hugepages. Since Linux 4.0 the page frame numbers read back as
zero without CAP_SYS_ADMIN, so this needs root.
"""
import os
import struct

from env.errors import PermissionRequired, TranslationError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


def virt_to_phys(vaddr, path="/proc/self/pagemap"):
    """Physical address of virtual address `vaddr` in this process (the page must be present)."""
    with open(path, "rb", buffering=0) as f:
        entry = struct.unpack("<Q", os.pread(f.fileno(), 8, (vaddr // PAGE_SIZE) * 8))[0]
    if not entry & _PRESENT:
        raise TranslationError(f"page at 0x{vaddr:x} is not present in memory (touch it first)",
                               vaddr=vaddr)
    pfn = entry & _PFN_MASK
    if pfn == 0:
        raise PermissionRequired(
            "physical addresses read as zero from /proc/self/pagemap: this needs root "
            "(CAP_SYS_ADMIN)")
    return pfn * PAGE_SIZE + vaddr % PAGE_SIZE
