"""blob: the blobstore, a crash-safe blob allocator on any bdev. Its on-disk format is
blob/FORMAT.md (blob.layout, blob.mdpage); the store itself comes next."""
