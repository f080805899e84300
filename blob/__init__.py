"""blob: a blob allocator (blobstore) on any bdev. Not built yet; no issue has asked for it."""
