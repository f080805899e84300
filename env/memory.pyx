# cython: language_level=3
"""DMA memory.

`allocate()` returns a `DmaBuffer`: a contiguous, pinned, 4 KiB-aligned (at least) region a device
may DMA to. Buffers are carved out of 2 MiB-aligned regions that are registered in the process-wide
translation map (`env.memmap`), so every buffer has an IOVA and a vfio container maps each region
once. Region backends:

- ``hugepage-2M`` / ``hugepage-1G``: anonymous ``mmap(MAP_HUGETLB)`` of reserved hugepages;
- ``hugetlbfs``: a file on a mounted hugetlbfs, which other processes can map too (``shared=True``
  keeps the file and gives its ``path``; ``open_shared(path)`` maps it elsewhere);
- ``anonymous``: plain ``mmap`` + ``mlock`` when no hugepages are reserved ("hugepage-free"). DMA to
  it needs an IOMMU (IOVA = VA); without one only hugepages have fixed physical addresses.

``backend="auto"`` (the default) takes 2 MiB hugepages while any are free and falls back to
anonymous memory otherwise, saying so once in the log.

`Pool` is a fixed-size pool of equal elements (plain or DMA memory) with a C-level get/put for the
hot path: no Python object per element.
"""
import errno as _errno
import logging
import os
import threading

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE
from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.stdlib cimport posix_memalign

from env.errors import (BufferBusyError, DmaMemoryError, FreedBufferError, InvalidArgument,
                        ResourceExhausted)
from env.memmap cimport g_vtophys, IOVA_INVALID

log = logging.getLogger("userblk.env.memory")

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int mlock(const void* addr, size_t length)
    int madvise(void* addr, size_t length, int advice)
    void* MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_PRIVATE
        MAP_ANONYMOUS
        MAP_NORESERVE
        MAP_POPULATE
        MAP_HUGETLB
        MADV_DONTFORK
        MADV_HUGEPAGE

cdef extern from "<linux/mman.h>":
    enum:
        MAP_HUGE_SHIFT

cdef extern from "<string.h>" nogil:
    char* strerror(int errnum)

cdef extern from "<sys/vfs.h>" nogil:
    cdef struct statfs_t "statfs":
        long f_type
    int fstatfs(int fd, statfs_t* buf)

cdef extern from "<linux/magic.h>":
    enum:
        HUGETLBFS_MAGIC

# (an unsigned C value: Cython would hand the enum to Python as a negative int)
cdef unsigned int _HUGETLBFS_TYPE = <unsigned int> HUGETLBFS_MAGIC


def _filesystem_type(int fd):
    """The f_type of the file system holding `fd` (fstatfs)."""
    cdef statfs_t st
    if fstatfs(fd, &st) != 0:
        e = errno
        raise OSError(e, os.strerror(e))
    return <unsigned long> st.f_type & 0xFFFFFFFF


cdef enum:
    PAGE = 4096
cdef char* _FORMAT_BYTES = "B"     # buffer-protocol format of unsigned bytes
cdef size_t SIZE_2MB = 2 * 1024 * 1024
cdef size_t SIZE_1GB = 1024 * 1024 * 1024
# No single buffer may exceed this: larger requests are mistakes, not workloads.
cdef size_t MAX_BUFFER = 1ULL << 40

BACKENDS = ("auto", "hugepage-2M", "hugepage-1G", "hugetlbfs", "anonymous")


def _oserror(what):
    e = errno
    return e, f"{what}: {strerror(e).decode()}"


# ---- regions ----------------------------------------------------------------------------------
class _Region:
    """A 2 MiB-aligned, registered mapping from one backend, handed out in 4 KiB pages.
    `free_extents` is a sorted list of [first_page, npages] holes."""
    __slots__ = ("base", "size", "backend", "hugepage", "path", "owner", "free_extents",
                 "free_pages", "heap", "dedicated", "__weakref__")

    def __repr__(self):
        return f"<region {self.backend} 0x{self.base:x}+0x{self.size:x} free={self.free_pages}>"


cdef uintptr_t _mmap_anonymous(size_t size) except 0:
    """`size` bytes of anonymous memory at a 2 MiB-aligned address, faulted in and (if allowed)
    locked."""
    cdef size_t span = size + SIZE_2MB
    cdef char* raw = <char*> mmap(NULL, span, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if <void*> raw == MAP_FAILED:
        e, msg = _oserror(f"mmap of {size} bytes of anonymous memory")
        raise DmaMemoryError(msg)
    cdef uintptr_t start = <uintptr_t> raw
    cdef uintptr_t aligned = (start + SIZE_2MB - 1) & ~(<uintptr_t> SIZE_2MB - 1)
    if aligned > start:
        munmap(raw, aligned - start)
    if start + span > aligned + size:
        munmap(<void*> (aligned + size), start + span - aligned - size)
    # Keep DMA pages out of a fork()ed child: copy-on-write would move them under the device.
    madvise(<void*> aligned, size, MADV_DONTFORK)
    madvise(<void*> aligned, size, MADV_HUGEPAGE)   # fewer TLB misses; harmless if THP is off
    if mlock(<void*> aligned, size) != 0:
        _warn_unlocked(errno)
        memset(<void*> aligned, 0, size)             # at least fault the pages in
    return aligned


_warned = set()


def _warn_once(key, message, *args):
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _warn_unlocked(int e):
    _warn_once("mlock", "cannot mlock DMA memory (%s): pages are not locked in RAM; raise "
               "RLIMIT_MEMLOCK (ulimit -l) or run as root for real devices",
               strerror(e).decode())


cdef uintptr_t _mmap_hugetlb(size_t size, int page_shift) except 0:
    cdef int flags = (MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE
                      | (page_shift << MAP_HUGE_SHIFT))
    cdef void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0)
    if p == MAP_FAILED:
        e, msg = _oserror(f"mmap(MAP_HUGETLB) of {size >> 20} MiB in {1 << (page_shift - 20)} MiB "
                          "hugepages")
        raise DmaMemoryError(msg + (" (not enough free hugepages reserved)"
                                    if e == _errno.ENOMEM else ""))
    madvise(p, size, MADV_DONTFORK)
    return <uintptr_t> p


def hugetlbfs_mounts(mounts="/proc/mounts", default_page_size=None):
    """Every hugetlbfs mount as (path, page size in bytes, read-only?). A mount without a
    pagesize option has the kernel's default hugepage size (`default_page_size`, else read
    from /proc/meminfo)."""
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        opts = dict(o.partition("=")[::2] for o in fields[3].split(","))
        try:
            size = _parse_size(opts.get("pagesize", ""))
        except ValueError:
            continue
        size = size or default_page_size or _default_hugepage_size()
        out.append((fields[1].replace("\\040", " "), size, "ro" in opts))
    return out


def hugetlbfs_mount(page_size=SIZE_2MB, mounts="/proc/mounts"):
    """The mount point of a hugetlbfs with pages of `page_size` bytes that we may write to, or
    None."""
    for path, size, readonly in hugetlbfs_mounts(mounts):
        if size == page_size and not readonly and os.access(path, os.W_OK):
            return path
    return None


def _parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if not text:
        return 0
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def _default_hugepage_size():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return SIZE_2MB


_file_counter = 0


def _mmap_hugetlbfs(size_t size, keep, path=None):
    """Map `size` bytes of a hugetlbfs file: a new one (kept if `keep`), or the existing `path`.
    Returns (address, path or None)."""
    global _file_counter
    cdef int fd
    cdef void* p
    create = path is None
    if create:
        mount = hugetlbfs_mount()
        if mount is None:
            raise DmaMemoryError("no writable hugetlbfs with 2 MiB pages is mounted "
                                 "(mount -t hugetlbfs nodev /dev/hugepages)")
        _file_counter += 1
        path = os.path.join(mount, f"userblk.{os.getpid()}.{_file_counter}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    else:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise InvalidArgument(f"cannot open shared DMA buffer {path}: "
                                  f"{e.strerror or e}") from None
    try:
        if create:
            os.ftruncate(fd, size)
        else:
            fs = _filesystem_type(fd)
            if fs != _HUGETLBFS_TYPE:
                # a file elsewhere is page cache: its physical pages move and are written back,
                # so registering it as hugepage memory would give devices stale addresses
                raise InvalidArgument(
                    f"{path} is not on hugetlbfs (its file system type is 0x{fs:x}): "
                    "open_shared maps only the hugetlbfs files of allocate(..., shared=True), "
                    "whose pages stay put for DMA")
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0)
        if p == MAP_FAILED:
            e, msg = _oserror(f"mmap of {size >> 20} MiB from hugetlbfs file {path}")
            raise DmaMemoryError(msg + (" (not enough free hugepages reserved)"
                                        if e == _errno.ENOMEM else ""))
    except BaseException:
        os.close(fd)
        if create:
            os.unlink(path)
        raise
    os.close(fd)
    if create and not keep:
        os.unlink(path)
        path = None
    madvise(p, size, MADV_DONTFORK)
    return <uintptr_t> p, path


class _Heap:
    """The regions of one backend, and first-fit allocation of 4 KiB pages from them."""

    def __init__(self, backend, region_size):
        self.backend = backend
        self.region_size = region_size
        self.regions = []
        # Re-entrant, because the garbage collector may free a DmaBuffer in the middle of an
        # allocation on the same thread: that free is deferred (`busy`) and done on the way out.
        self.lock = threading.RLock()
        self.busy = False
        self.deferred = []

    def _new_region(self, size_t size, shared=False, path=None):
        cdef uintptr_t base
        owner = True
        hugepage = self.backend != "anonymous"
        if self.backend == "anonymous":
            base = _mmap_anonymous(size)
        elif self.backend == "hugepage-2M":
            base = _mmap_hugetlb(size, 21)
        elif self.backend == "hugepage-1G":
            base = _mmap_hugetlb(size, 30)
        else:
            owner = path is None
            base, path = _mmap_hugetlbfs(size, shared, path)
        r = _Region()
        r.base, r.size, r.backend, r.hugepage, r.path, r.owner = base, size, self.backend, hugepage, path, owner
        r.free_extents = [[0, size // PAGE]]
        r.free_pages = size // PAGE
        r.heap = self
        r.dedicated = shared or not owner or size != self.region_size
        try:
            g_vtophys.register(base, size, hugepage=hugepage)
        except BaseException:
            self._unmap(r)
            raise
        return r

    def _unmap(self, r):
        munmap(<void*> <uintptr_t> r.base, r.size)
        if r.path is not None and r.owner:
            try:
                os.unlink(r.path)
            except FileNotFoundError:
                pass

    def _release_region(self, r):
        g_vtophys.unregister(r.base, r.size)
        self._unmap(r)

    @staticmethod
    def _take(r, size_t npages, size_t align_pages):
        """First fit of `npages` aligned to `align_pages` in region `r`; page index or -1."""
        cdef size_t start, length, first, base_page = r.base // PAGE
        for i, (start, length) in enumerate(r.free_extents):
            # alignment is of the absolute address, not of the offset in the region
            first = ((base_page + start + align_pages - 1) // align_pages) * align_pages - base_page
            if first + npages > start + length:
                continue
            ext = []
            if first > start:
                ext.append([start, first - start])
            if first + npages < start + length:
                ext.append([first + npages, start + length - first - npages])
            r.free_extents[i:i + 1] = ext
            r.free_pages -= npages
            return first
        return -1

    @staticmethod
    def _give(r, size_t first, size_t npages):
        ext = r.free_extents
        i = 0
        while i < len(ext) and ext[i][0] < first:
            i += 1
        ext.insert(i, [first, npages])
        # merge with the neighbours
        if i + 1 < len(ext) and ext[i][0] + ext[i][1] == ext[i + 1][0]:
            ext[i][1] += ext[i + 1][1]
            del ext[i + 1]
        if i > 0 and ext[i - 1][0] + ext[i - 1][1] == ext[i][0]:
            ext[i - 1][1] += ext[i][1]
            del ext[i]
        r.free_pages += npages

    def alloc(self, size_t npages, size_t align_pages, shared=False):
        """(region, first page) for `npages` pages."""
        with self.lock:
            self.busy = True
            try:
                return self._alloc(npages, align_pages, shared)
            finally:
                self._settle()

    def _alloc(self, size_t npages, size_t align_pages, shared):
        cdef size_t need = npages * PAGE
        cdef long first
        if not shared and need <= self.region_size:
            for r in self.regions:
                if not r.dedicated and r.free_pages >= npages:
                    first = self._take(r, npages, align_pages)
                    if first >= 0:
                        return r, first
        size = ((need + self.region_size - 1) // self.region_size) * self.region_size
        r = self._new_region(size, shared=shared)
        if not r.dedicated:
            self.regions.append(r)
        first = self._take(r, npages, align_pages)
        assert first >= 0
        return r, first

    def free(self, r, size_t first, size_t npages):
        with self.lock:
            if self.busy:
                # re-entered from the garbage collector inside alloc/free: finish that first
                self.deferred.append((r, first, npages))
                return
            self.busy = True
            try:
                self._free(r, first, npages)
            finally:
                self._settle()

    def _settle(self):
        """Do the frees that arrived while busy, then leave (the lock is still held)."""
        while self.deferred:
            self._free(*self.deferred.pop())
        self.busy = False

    def _free(self, r, size_t first, size_t npages):
        self._give(r, first, npages)
        if r.free_pages * PAGE != r.size:
            return
        if r.dedicated:
            self._release_region(r)
            return
        # keep one empty region for the next allocation, give back the others
        empties = [x for x in self.regions if x.free_pages * PAGE == x.size]
        if len(empties) > 1:
            self.regions.remove(r)
            self._release_region(r)


_heaps = {
    "hugepage-2M": _Heap("hugepage-2M", SIZE_2MB),
    "hugepage-1G": _Heap("hugepage-1G", SIZE_1GB),
    "hugetlbfs": _Heap("hugetlbfs", SIZE_2MB),
    "anonymous": _Heap("anonymous", SIZE_2MB),
}


def _alloc_auto(size_t npages, size_t align_pages):
    try:
        return _heaps["hugepage-2M"].alloc(npages, align_pages)
    except DmaMemoryError as e:
        _warn_once("fallback", "no free 2 MiB hugepages: DMA memory comes from anonymous mmap + "
                   "mlock instead (fine with an IOMMU or for in-memory devices; `userblk setup` "
                   "reserves hugepages)")
        log.debug("hugepage allocation failed: %s", e)
        return _heaps["anonymous"].alloc(npages, align_pages)


# ---- DmaBuffer --------------------------------------------------------------------------------
cdef class DmaBuffer:
    """A contiguous range of DMA memory. Supports the buffer protocol (`memoryview(buf)`, numpy),
    `with` (frees on exit) and an explicit `free()`. Do not create directly: use `allocate()`."""

    def __cinit__(self):
        self._freed = True   # until allocate() fills it in

    cdef int check_live(self) except -1:
        if self._freed:
            raise FreedBufferError(f"{self!r} was freed")
        return 0

    @property
    def vaddr(self):
        """The virtual address of the first byte."""
        self.check_live()
        return <uintptr_t> self._ptr

    @property
    def size(self):
        return self._size

    @property
    def alignment(self):
        return self._align

    @property
    def backend(self):
        """Which backend served the buffer: hugepage-2M, hugepage-1G, hugetlbfs or anonymous."""
        return self._region.backend if self._region is not None else None

    @property
    def hugepage(self):
        return self._region is not None and self._region.hugepage

    @property
    def path(self):
        """The hugetlbfs file of a shared buffer (None otherwise)."""
        return self._region.path if self._region is not None else None

    @property
    def freed(self):
        return self._freed

    @property
    def iova(self):
        """The IOVA of the first byte in the process-wide translation map."""
        self.check_live()
        return g_vtophys.translate(<uintptr_t> self._ptr, 1)[0]

    def translate(self, size_t offset=0, size=None):
        """(iova, contiguous bytes) at `offset`, for up to `size` bytes (default: to the end)."""
        self.check_live()
        if offset >= self._size:
            raise InvalidArgument(f"offset {offset} is past the end of a {self._size}-byte buffer")
        n = self._size - offset if size is None else size
        if n <= 0 or offset + n > self._size:
            raise InvalidArgument(f"range {offset}+{n} is outside the {self._size}-byte buffer")
        return g_vtophys.translate(<uintptr_t> self._ptr + offset, n)

    def zero(self):
        self.check_live()
        memset(self._ptr, 0, self._size)

    def free(self):
        """Give the memory back. Raises if already freed, if views of it are alive, or if a
        driver still has I/O outstanding on it."""
        self.check_live()
        if self._exports:
            raise BufferBusyError(f"{self!r} has {self._exports} live memoryview(s); release "
                                  "them before freeing")
        if self._pins:
            raise BufferBusyError(f"{self!r} has {self._pins} I/O(s) outstanding")
        self._release()

    cdef _release(self):
        self._freed = True
        region, self._region = self._region, None
        if region is not None:
            region.heap.free(region, self._first_page, self._npages)
        self._ptr = NULL

    def __dealloc__(self):
        if not self._freed and self._region is not None:
            try:
                self._release()
            except Exception:
                pass

    def __enter__(self):
        self.check_live()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._freed:
            return False
        if exc_type is not None and (self._exports or self._pins):
            return False     # do not hide the error in flight; the buffer is freed when collected
        self.free()
        return False

    def __len__(self):
        return self._size

    def __getbuffer__(self, Py_buffer* view, int flags):
        self.check_live()
        self._shape[0] = self._size
        self._strides[0] = 1
        view.buf = self._ptr
        view.obj = self
        view.len = self._size
        view.readonly = 0
        view.itemsize = 1
        view.format = _FORMAT_BYTES if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = self._shape if flags & PyBUF_ND else NULL
        view.strides = self._strides if flags & PyBUF_STRIDES == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self._exports -= 1

    def __repr__(self):
        if self._freed:
            return f"<DmaBuffer freed, {self._size} bytes>"
        return (f"<DmaBuffer {self._size} bytes at 0x{<uintptr_t> self._ptr:x} "
                f"({self._region.backend})>")


cdef DmaBuffer _make_buffer(region, size_t first, size_t npages, size_t size, size_t align):
    cdef DmaBuffer b = DmaBuffer.__new__(DmaBuffer)
    b._ptr = <char*> <uintptr_t> (region.base + first * PAGE)
    b._size = size
    b._align = align
    b._region = region
    b._first_page = first
    b._npages = npages
    b._freed = False
    return b


def allocate(size, align=PAGE, *, zero=False, backend="auto", shared=False):
    """A new `DmaBuffer` of `size` bytes, aligned to `align` (a power of two, at least 4 KiB).

    `backend` is one of ``auto`` (2 MiB hugepages while free ones remain, then anonymous memory),
    ``hugepage-2M``, ``hugepage-1G``, ``hugetlbfs`` or ``anonymous``. `shared=True` (hugetlbfs)
    keeps the file so that other processes can `open_shared(buf.path)`. `zero=True` clears it.
    """
    if not isinstance(size, int) or isinstance(size, bool):
        raise InvalidArgument(f"size must be an int, not {type(size).__name__}")
    if size <= 0:
        raise InvalidArgument(f"size must be positive, not {size}")
    if size > MAX_BUFFER:
        raise InvalidArgument(f"size {size} is absurd (more than {MAX_BUFFER >> 30} GiB)")
    if not isinstance(align, int) or align < PAGE or align & (align - 1):
        raise InvalidArgument(f"align must be a power of two of at least {PAGE}, not {align!r}")
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if shared and backend != "hugetlbfs":
        raise InvalidArgument("shared=True needs backend='hugetlbfs' (a file other processes can "
                              "map)")
    cdef size_t npages = (<size_t> size + PAGE - 1) // PAGE
    if backend == "hugepage-1G" and align > SIZE_1GB or backend != "hugepage-1G" and align > SIZE_2MB:
        raise InvalidArgument(f"align {align} is larger than the backend's region alignment")
    cdef size_t align_pages = align // PAGE
    if backend == "auto":
        region, first = _alloc_auto(npages, align_pages)
    else:
        region, first = _heaps[backend].alloc(npages, align_pages, shared=shared)
    buf = _make_buffer(region, first, npages, size, align)
    if zero:
        memset((<DmaBuffer> buf)._ptr, 0, npages * PAGE)
    return buf


def open_shared(path):
    """Map a hugetlbfs file that another process allocated with `allocate(..., shared=True)`.

    Only a file on hugetlbfs is taken: its memory is hugepages, which stay at their physical
    address, so devices may DMA to it with or without an IOMMU. A file anywhere else is refused
    (InvalidArgument) rather than mapped as something less: page-cache pages move and are
    written back, and no caller of open_shared wants that for a DMA buffer it shares."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise InvalidArgument(f"cannot open shared DMA buffer {path}: "
                              f"{e.strerror or e}") from None
    if size <= 0 or size % SIZE_2MB:
        raise InvalidArgument(f"{path} is not a userblk shared DMA buffer (size {size})")
    heap = _heaps["hugetlbfs"]
    with heap.lock:
        heap.busy = True
        try:
            region = heap._new_region(size, path=path)
            first = heap._take(region, size // PAGE, 1)
        finally:
            heap._settle()
    return _make_buffer(region, first, size // PAGE, size, PAGE)


def hugepage_status(root="/sys/kernel/mm/hugepages"):
    """{page size in bytes: (total, free)} for every hugepage size the kernel offers."""
    out = {}
    try:
        names = os.listdir(root)
    except OSError:
        return out
    for name in names:
        if not name.startswith("hugepages-"):
            continue
        size = int(name[len("hugepages-"):-2]) * 1024
        try:
            with open(f"{root}/{name}/nr_hugepages") as f:
                total = int(f.read())
            with open(f"{root}/{name}/free_hugepages") as f:
                free_ = int(f.read())
        except OSError:
            continue
        out[size] = (total, free_)
    return dict(sorted(out.items()))


def heap_stats():
    """Per backend: how many regions and bytes are mapped and how many bytes are free."""
    stats = {}
    for name, heap in _heaps.items():
        with heap.lock:
            stats[name] = {"regions": len(heap.regions),
                           "mapped": sum(r.size for r in heap.regions),
                           "free": sum(r.free_pages * PAGE for r in heap.regions)}
    return stats


# ---- Pool -------------------------------------------------------------------------------------
cdef class Pool:
    """`count` elements of `element_size` bytes, each aligned to `align`, handed out and taken back
    in O(1). C code uses `get()`/`put()` (pointers, no GIL, no Python objects); Python code uses
    `acquire()`/`release()` with element indices. With `dma=True` the elements live in DMA memory
    (`iova(index)` gives their address for a device). A pool is not thread-safe: give each thread
    its own, as SPDK gives each thread a cache."""

    def __cinit__(self, size_t count, size_t element_size, *, dma=False, size_t align=64):
        cdef void* mem = NULL
        cdef size_t i
        if count == 0 or count > 0xFFFFFFFF:
            raise InvalidArgument(f"count must be between 1 and 2**32-1, not {count}")
        if element_size == 0:
            raise InvalidArgument("element_size must be positive")
        if align == 0 or align & (align - 1):
            raise InvalidArgument(f"align must be a power of two, not {align}")
        self.count = count
        self.element_size = element_size
        self._stride = (element_size + align - 1) & ~(align - 1)
        if self._stride * count > MAX_BUFFER:
            raise InvalidArgument(f"a pool of {count} x {element_size} bytes is absurd")
        if dma:
            self._dma = allocate(self._stride * count, max(PAGE, align), zero=True)
            self._base = (<DmaBuffer> self._dma)._ptr
        else:
            if posix_memalign(&mem, max(align, sizeof(void*)), self._stride * count) != 0:
                raise MemoryError(f"cannot allocate a pool of {count} x {self._stride} bytes")
            memset(mem, 0, self._stride * count)
            self._base = <char*> mem
        self._stack = <uint32_t*> malloc(count * sizeof(uint32_t))
        self._in_use = <uint8_t*> malloc(count)
        if self._stack == NULL or self._in_use == NULL:
            raise MemoryError("cannot allocate the pool's free list")
        memset(self._in_use, 0, count)
        # hand out low indices first
        for i in range(count):
            self._stack[i] = <uint32_t> (count - 1 - i)
        self._nfree = count

    def __dealloc__(self):
        if self._dma is None and self._base != NULL:
            free(self._base)
        free(self._stack)
        free(self._in_use)

    cdef void* get(self) noexcept nogil:
        """A free element, or NULL when none is left."""
        cdef uint32_t i
        if self._nfree == 0:
            return NULL
        self._nfree -= 1
        i = self._stack[self._nfree]
        self._in_use[i] = 1
        return self._base + i * self._stride

    cdef int put(self, void* element) noexcept nogil:
        """Return an element: 0, or -1 if it is not one of this pool's, -2 if it was not taken."""
        cdef char* p = <char*> element
        cdef size_t off, i
        if p < self._base:
            return -1
        off = p - self._base
        i = off // self._stride
        if i >= self.count or off % self._stride:
            return -1
        if not self._in_use[i]:
            return -2
        self._in_use[i] = 0
        self._stack[self._nfree] = <uint32_t> i
        self._nfree += 1
        return 0

    # -- Python API --
    @property
    def available(self):
        return self._nfree

    @property
    def stride(self):
        return self._stride

    def acquire(self):
        """Take a free element and return its index (ResourceExhausted when none is left)."""
        cdef void* p = self.get()
        if p == NULL:
            raise ResourceExhausted(f"pool of {self.count} x {self.element_size} bytes is empty")
        return self.index_of(p)

    def release(self, size_t index):
        """Give element `index` back."""
        if index >= self.count:
            raise InvalidArgument(f"index {index} is not in a pool of {self.count}")
        rc = self.put(self.element(index))
        if rc == -2:
            raise FreedBufferError(f"pool element {index} was not taken (released twice?)")

    def address(self, size_t index):
        if index >= self.count:
            raise InvalidArgument(f"index {index} is not in a pool of {self.count}")
        return <uintptr_t> self.element(index)

    def iova(self, size_t index):
        if self._dma is None:
            raise InvalidArgument("this pool is not DMA memory (create it with dma=True)")
        return g_vtophys.translate(self.address(index), 1)[0]

    def view(self, size_t index):
        """A writable memoryview of element `index`."""
        if index >= self.count:
            raise InvalidArgument(f"index {index} is not in a pool of {self.count}")
        return memoryview(self)[index * self._stride:index * self._stride + self.element_size]

    def __getbuffer__(self, Py_buffer* view, int flags):
        self._shape[0] = self._stride * self.count
        view.buf = self._base
        view.obj = self
        view.len = self._shape[0]
        view.readonly = 0
        view.itemsize = 1
        view.format = _FORMAT_BYTES if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = self._shape if flags & PyBUF_ND else NULL
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self._exports -= 1

    def __repr__(self):
        return (f"<Pool {self.count} x {self.element_size} B, {self._nfree} free"
                f"{', dma' if self._dma is not None else ''}>")
