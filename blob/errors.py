"""Errors of the blobstore (on the project's one hierarchy, env.errors.UserblkError).

Completion callbacks receive these as their `error` argument; the blocking forms raise them.
"""
from env.errors import InvalidArgument, UserblkError


class BlobError(UserblkError):
    """Base of the blobstore's errors; `blob_id` names the blob where there is one."""

    def __init__(self, message, blob_id=None):
        super().__init__(message)
        self.blob_id = blob_id


class BlobstoreCorrupt(BlobError):
    """What the device holds is not a valid blobstore: `where` names the structure (super block,
    a bitmap, a metadata page or a blob's chain) and the message the rule it breaks."""

    def __init__(self, message, where=None, blob_id=None):
        super().__init__(message, blob_id)
        self.where = where


class BlobNotFound(BlobError, KeyError):
    """No blob with that id exists."""

    def __str__(self):                       # KeyError would quote the message
        return self.args[0]


class BlobReadOnly(BlobError, PermissionError):
    """A write, resize or metadata change of a read-only blob (a snapshot)."""


class BlobBusy(BlobError):
    """The operation needs the blob (or the store) idle: closed, or without open channels."""


class BlobHasClones(BlobBusy):
    """A snapshot with clones cannot be deleted; `clones` lists their ids."""

    def __init__(self, message, blob_id=None, clones=()):
        super().__init__(message, blob_id)
        self.clones = list(clones)


class NoSpace(BlobError):
    """No free cluster (or metadata page, or blob id) is left in the store."""


class BlobIoError(BlobError):
    """An I/O of the blobstore failed on its base bdev; `errno` says how where it is known."""

    def __init__(self, message, blob_id=None, errno=None):
        super().__init__(message, blob_id)
        self.errno = errno


class BlobstoreClosed(BlobError):
    """The store was unloaded (or its load failed): nothing more can be done through it."""


__all__ = ["BlobError", "BlobstoreCorrupt", "BlobNotFound", "BlobReadOnly", "BlobBusy",
           "BlobHasClones", "NoSpace", "BlobIoError", "BlobstoreClosed", "InvalidArgument"]
