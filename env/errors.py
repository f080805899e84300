"""The one exception hierarchy of userblk.

Every layer raises subclasses of `UserblkError`; upper layers (nvme, bdev, blob) extend it in their
own `errors` modules. Errors caused by a caller's bad argument also derive from `ValueError` (or
`TypeError`) so generic code can catch them the usual way. Each error keeps the facts it is about as
attributes, and its message says what to do where there is something to do.
"""


class UserblkError(Exception):
    """Base of every error raised by userblk."""


class InvalidArgument(UserblkError, ValueError):
    """A caller passed a value that cannot be valid (size, alignment, range, name...)."""


class EnvError(UserblkError):
    """The environment layer failed: memory, translation, PCI, vfio/uio or threads."""


class DmaMemoryError(EnvError, MemoryError):
    """DMA memory could not be allocated, pinned or mapped."""


class FreedBufferError(EnvError):
    """A `DmaBuffer` (or pool element) was used after it was freed, or freed twice."""


class BufferBusyError(EnvError):
    """A buffer cannot be freed: memoryviews of it are alive or I/O on it is outstanding."""


class TranslationError(EnvError):
    """A virtual address has no IOVA: the memory is not registered, or not usable for DMA."""

    def __init__(self, message, vaddr=None, size=None):
        super().__init__(message)
        self.vaddr = vaddr
        self.size = size


class PermissionRequired(EnvError, PermissionError):
    """The operation needs root (or a capability the process lacks)."""


class PciError(EnvError):
    """A PCI device could not be found, read, bound or unbound."""

    def __init__(self, message, address=None):
        super().__init__(message)
        self.address = address


class VfioError(EnvError):
    """A vfio step failed. `device` and `step` (the ioctl or file operation) say where."""

    def __init__(self, message, device=None, step=None, errno=None):
        super().__init__(message)
        self.device = device
        self.step = step
        self.errno = errno


class UioError(EnvError):
    """The uio_pci_generic path failed."""

    def __init__(self, message, device=None, step=None):
        super().__init__(message)
        self.device = device
        self.step = step


class ThreadError(EnvError):
    """Misuse of the threading model: no current Thread, a stopped Thread, a full message ring."""


class WrongThreadError(ThreadError):
    """A per-thread object (I/O channel, queue pair) was used from a thread that does not own it."""


class ResourceExhausted(EnvError):
    """A fixed-size resource (pool, ring, IOVA space) has no free element left."""


# ---- added with env.pci / env.vfio / env.uio ----------------------------------------------------
# A "not root" failure while touching a device is both an error of that device's layer (so
# `except VfioError` sees every vfio failure) and a PermissionRequired (so callers can catch "needs
# root" in one place, whichever path raised it).

class PciPermissionError(PciError, PermissionRequired):
    """Writing a PCI sysfs attribute (bind, unbind, driver_override) was refused: needs root."""


class VfioPermissionError(VfioError, PermissionRequired):
    """Opening or using a /dev/vfio file was refused: needs root or access to that file."""


class UioPermissionError(UioError, PermissionRequired):
    """Opening a device's sysfs resource/config file or /proc/self/pagemap was refused."""


# ---- added with env.thread -----------------------------------------------------------------------

class ThreadExitedError(ThreadError):
    """A Thread that has exited (or is exiting) was sent a message, polled, or given a poller or
    an I/O channel."""


class ThreadTimeoutError(ThreadError, TimeoutError):
    """A blocking wait on a Thread (run_until, Reactor.call/stop) did not finish in time."""


class MessageRingFull(ThreadError, ResourceExhausted):
    """A Thread's fixed-size message ring is full: its receiver is not polling fast enough."""


class InvalidCallback(InvalidArgument, TypeError):
    """A callback (message, poller, predicate, channel function, done) is not callable."""
