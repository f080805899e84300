"""Errors of the block-device layer (on the project's one hierarchy, env.errors.UserblkError).

Submission-time problems raise at once (before anything reaches a device); a failed I/O reaches its
completion callback as an `IoStatus`, and the blocking helpers raise `IoError` carrying it.
"""
import os

from env.errors import (InvalidArgument, ResourceExhausted, ThreadError, UserblkError,  # noqa: F401
                        WrongThreadError)


class BdevError(UserblkError):
    """Base of the bdev layer's errors; `bdev` names the block device where there is one."""

    def __init__(self, message, bdev=None):
        super().__init__(message)
        self.bdev = bdev


class BdevNotFound(BdevError, KeyError):
    def __str__(self):                       # KeyError would quote the message
        return self.args[0]


class BdevExists(BdevError, InvalidArgument):
    """A bdev (or alias) of that name is already registered."""


class BdevClaimed(BdevError, PermissionError):
    """The bdev is claimed by a module (e.g. a virtual bdev stacked on it): no other writer."""


class BdevRemoved(BdevError):
    """The bdev was hot-removed (or unregistered): its descriptors refuse new I/O."""


class DescriptorClosed(BdevError):
    """I/O or a channel was asked of a closed descriptor."""


class ReadOnlyDescriptor(BdevError, PermissionError):
    """A write-type I/O through a descriptor opened without write=True."""


class UnsupportedIoType(BdevError, InvalidArgument):
    """The bdev does not support this I/O type (see Bdev.io_types)."""


class ChannelReleased(BdevError, ThreadError):
    """I/O on a channel that was released: by `put()`, or when its thread was destroyed."""


class IoCompletedError(BdevError):
    """A Python module completed an I/O (PyIo) that is no longer its own: completed already,
    handed back to the layer by submit's return value, or aborted when its channel was put."""


class IoError(BdevError):
    """A blocking I/O helper saw its I/O fail; `status` is the IoStatus the callback got.
    `errno` and `strerror` repeat the status's errno (0 and None when the failure had none)."""

    def __init__(self, message, status=None, bdev=None):
        super().__init__(message, bdev)
        self.status = status
        self.errno = getattr(status, "errno", 0) or 0
        self.strerror = os.strerror(self.errno) if self.errno else None
