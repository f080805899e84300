"""Where a command's data is: walking PRPs and SGLs into a list of (IOVA, length) segments.

The rules are the spec's, enforced the way a strict controller does, so that a driver bug in PRP
or SGL construction fails a test with the status a real controller would give:

PRPs (Base 4.1.1): PRP1 may start anywhere in a memory page (CC.MPS) but dword aligned (bits 1:0
clear, else PRP Offset Invalid); if the data ends within the next page, PRP2 points to it and
must be page aligned; otherwise PRP2 points to a PRP list. List entries are page aligned; a list
fills its memory page, and when more entries are needed the last entry of the page points to the
next list page (chaining).

SGLs (Base 4.1.2): SGL1 in the command is a Data Block, Bit Bucket, Segment or Last Segment
descriptor. A Segment points to a segment of descriptors whose last entry may be a (Last) Segment
descriptor pointing to the next one; a Last Segment points to the final segment, which holds no
segment descriptors. The data descriptors must cover the transfer exactly, or more when the
controller allows it (SGLS bit 18). Bit Bucket descriptors discard read data.
"""
import struct

from nvme.emu.errors import CommandFailed
from nvme.spec import SglDescriptor, SglType
from nvme.status import Generic

MAX_SGL_DESCRIPTORS = 4096      # a loop guard: a segment chain longer than this is refused


def prp_segments(mem, prp1, prp2, length, page_size):
    """[(iova, nbytes), ...] of a PRP-described transfer of `length` bytes."""
    if length == 0:
        return []
    mask = page_size - 1
    if prp1 & 3:
        raise CommandFailed(Generic.PRP_OFFSET_INVALID, why=f"PRP1 0x{prp1:x} not dword aligned")
    first = min(length, page_size - (prp1 & mask))
    segments = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return segments
    if remaining <= page_size:                        # PRP2 is the second data page
        if prp2 & mask:
            raise CommandFailed(Generic.PRP_OFFSET_INVALID,
                                why=f"PRP2 0x{prp2:x} (a data pointer) not page aligned")
        segments.append((prp2, remaining))
        return segments
    # PRP2 points to a PRP list
    if prp2 & 3:
        raise CommandFailed(Generic.PRP_OFFSET_INVALID,
                            why=f"PRP list pointer 0x{prp2:x} not dword aligned")
    list_addr = prp2
    while remaining:
        needed = -(-remaining // page_size)
        room = (page_size - (list_addr & mask)) // 8     # entries left in this list page
        if room == 0:
            raise CommandFailed(Generic.PRP_OFFSET_INVALID,
                                why=f"PRP list at 0x{list_addr:x} has no room for an entry")
        chained = needed > room
        count = room if chained else needed
        entries = struct.unpack(f"<{count}Q", mem.read(list_addr, 8 * count))
        data_entries = entries[:-1] if chained else entries
        for entry in data_entries:
            if entry & mask:
                raise CommandFailed(Generic.PRP_OFFSET_INVALID,
                                    why=f"PRP list entry 0x{entry:x} not page aligned")
            n = min(remaining, page_size)
            if segments[-1][0] + segments[-1][1] == entry:
                segments[-1] = (segments[-1][0], segments[-1][1] + n)   # merge contiguous pages
            else:
                segments.append((entry, n))
            remaining -= n
        if chained:
            list_addr = entries[-1]
            if list_addr & mask:
                raise CommandFailed(Generic.PRP_OFFSET_INVALID,
                                    why=f"chained PRP list pointer 0x{list_addr:x} not page "
                                        "aligned")
    return segments


def sgl_segments(mem, sgl1, length, *, write, dword_aligned=False, bit_bucket=False,
                 larger_than_data=False):
    """[(iova or None, nbytes), ...] of an SGL-described transfer of `length` bytes. `sgl1` is
    the SglDescriptor in the command. None marks bit-bucket bytes (read data discarded).
    `write`: the data goes host -> controller (bit buckets are not allowed then)."""
    segments = []
    total = 0
    descriptors = 0

    def add_data(desc):
        nonlocal total
        if desc.subtype != 0:
            raise CommandFailed(Generic.SGL_OFFSET_INVALID,
                                why="SGL address subtype other than 0h (offsets are fabrics-only)")
        if dword_aligned and (desc.address & 3 or desc.length & 3):
            raise CommandFailed(Generic.SGL_DATA_BLOCK_GRANULARITY_INVALID,
                                why=f"SGL data block 0x{desc.address:x}+{desc.length} not dword "
                                    "aligned")
        if desc.length:
            segments.append((desc.address, desc.length))
        total += desc.length

    def add(desc, last_in_segment, in_last_segment):
        """Handle one descriptor; return the next segment's (address, length, is_last) or None."""
        nonlocal total
        if desc.type == SglType.DATA_BLOCK:
            add_data(desc)
        elif desc.type == SglType.BIT_BUCKET:
            if not bit_bucket or write:
                raise CommandFailed(Generic.SGL_DESCRIPTOR_TYPE_INVALID,
                                    why="SGL Bit Bucket descriptor " + (
                                        "in a write" if write else "not supported"))
            if desc.length:
                segments.append((None, desc.length))
            total += desc.length
        elif desc.type in (SglType.SEGMENT, SglType.LAST_SEGMENT):
            if in_last_segment:
                raise CommandFailed(Generic.INVALID_SGL_SEGMENT_DESCRIPTOR,
                                    why="a segment descriptor inside the last segment")
            if not last_in_segment:
                raise CommandFailed(Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                                    why="a segment descriptor that is not the last of its segment")
            if desc.length == 0 or desc.length % 16:
                raise CommandFailed(Generic.INVALID_SGL_SEGMENT_DESCRIPTOR,
                                    why=f"SGL segment length {desc.length} is not a non-zero "
                                        "multiple of 16")
            if desc.subtype != 0:
                raise CommandFailed(Generic.SGL_OFFSET_INVALID)
            return desc.address, desc.length, desc.type == SglType.LAST_SEGMENT
        else:
            raise CommandFailed(Generic.SGL_DESCRIPTOR_TYPE_INVALID,
                                why=f"SGL descriptor type {desc.type:x}h")
        return None

    nxt = add(sgl1, True, False)
    while nxt is not None:
        address, nbytes, is_last = nxt
        count = nbytes // 16
        descriptors += count
        if descriptors > MAX_SGL_DESCRIPTORS:
            raise CommandFailed(Generic.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                                why=f"more than {MAX_SGL_DESCRIPTORS} SGL descriptors")
        raw = mem.read(address, nbytes)
        nxt = None
        for i in range(count):
            desc = SglDescriptor.unpack(raw, 16 * i)
            step = add(desc, i == count - 1, is_last)
            if step is not None:
                nxt = step
        if is_last and nxt is not None:      # add() refuses this already; belt and braces
            raise CommandFailed(Generic.INVALID_SGL_SEGMENT_DESCRIPTOR)
    if total < length or (total > length and not larger_than_data):
        raise CommandFailed(Generic.DATA_SGL_LENGTH_INVALID,
                            why=f"the SGL describes {total} bytes for a {length}-byte transfer")
    if total > length:                       # keep exactly `length` bytes
        out, need = [], length
        for iova, n in segments:
            if need == 0:
                break
            out.append((iova, min(n, need)))
            need -= min(n, need)
        segments = out
    return segments


def gather(mem, segments):
    """The bytes the segments describe (host -> controller)."""
    if len(segments) == 1:
        return mem.read(*segments[0])
    return b"".join(mem.read(iova, n) for iova, n in segments)


def scatter(mem, segments, data):
    """Copy `data` out along the segments (controller -> host); bit-bucket bytes are dropped."""
    pos = 0
    view = memoryview(data)
    for iova, n in segments:
        if iova is not None:
            mem.write(iova, view[pos:pos + n])
        pos += n
