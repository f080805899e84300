"""blob: the blobstore, a crash-safe blob allocator on any bdev (thin provisioning, snapshots,
clones). See blob.store for the API and blob/FORMAT.md for the on-disk format.

    from blob import Blobstore
    bs = Blobstore.init("Malloc0")                 # or Blobstore.load("Malloc0")
    blob = bs.open(bs.create(num_clusters=4))
    ch = bs.get_io_channel()
    blob.write(ch, b"x" * 512, 0)
"""
from blob.errors import (BlobBusy, BlobError, BlobHasClones, BlobIoError, BlobNotFound,
                         BlobReadOnly, BlobstoreClosed, BlobstoreCorrupt, NoSpace)
from blob.store import Blob, Blobstore

__all__ = ["Blob", "Blobstore", "BlobBusy", "BlobError", "BlobHasClones", "BlobIoError",
           "BlobNotFound", "BlobReadOnly", "BlobstoreClosed", "BlobstoreCorrupt", "NoSpace"]
