"""The blobstore with `await`, on an asyncio event loop (env.asyncio_driver polls the loop's
thread, so completions resolve futures there).

    import asyncio
    from blob.async_io import AsyncBlobstore

    async def main():
        abs_ = await AsyncBlobstore.init("Malloc0", cluster_size=1 << 20)
        blob = await abs_.open(await abs_.create(num_clusters=4, thin=True))
        await blob.write(b"x" * 512, 0)
        buf = await blob.read(bytearray(512), 0)
        await asyncio.gather(*(blob.write(bytes([i]) * 512, i) for i in range(64)))
        snap = await abs_.snapshot(blob.id)
        await blob.close()
        await abs_.unload()

    asyncio.run(main())

Every method starts the operation at once and returns an awaitable of its result; a refused call
raises at once (InvalidArgument, BlobNotFound...), a failed operation raises from the await. The
store's metadata thread is the loop's thread. Data I/O of an AsyncBlob uses the loop thread's
channel of the store, taken on the blob's first I/O and put when it is closed.
`call(fn, *args, **kw)` does the same for any operation that takes `cb`.
"""
from blob.store import Blobstore
from env.asyncio_driver import get_driver


def _result(value, error):
    if error is not None:
        raise error
    return value


def call(fn, *args, **kw):
    """A future of `fn(*args, cb=..., **kw)`'s result (fn: any blobstore operation)."""
    return get_driver().submit(lambda cb: fn(*args, cb=cb, **kw), _result)


class AsyncBlobstore:
    """A Blobstore for coroutines (see the module); `.store` is the Blobstore."""

    def __init__(self, store):
        self.store = store

    @classmethod
    async def init(cls, bdev, cluster_size=1 << 20, **kw):
        return cls(await call(Blobstore.init, bdev, cluster_size, **kw))

    @classmethod
    async def load(cls, bdev):
        return cls(await call(Blobstore.load, bdev))

    def create(self, num_clusters=0, thin=False, xattrs=None):
        return call(self.store.create, num_clusters, thin, xattrs)

    async def open(self, blob_id):
        return AsyncBlob(self, await call(self.store.open, blob_id))

    def delete(self, blob_id):
        return call(self.store.delete, blob_id)

    def snapshot(self, blob_id, xattrs=None):
        return call(self.store.snapshot, blob_id, xattrs)

    def clone(self, snapshot_id, xattrs=None):
        return call(self.store.clone, snapshot_id, xattrs)

    def inflate(self, blob_id):
        return call(self.store.inflate, blob_id)

    def decouple_parent(self, blob_id):
        return call(self.store.decouple_parent, blob_id)

    def unload(self):
        return call(self.store.unload)

    def __iter__(self):
        return iter(self.store)

    def info(self, blob_id):
        return self.store.info(blob_id)


class AsyncBlob:
    """An open blob for coroutines; offsets and lengths in I/O units, as Blob's."""

    def __init__(self, astore, blob):
        self.astore = astore
        self.blob = blob
        self.id = blob.id
        self._ch = None

    def _channel(self):
        if self._ch is None:
            self._ch = self.astore.store.get_io_channel()
        return self._ch

    def read(self, buf, offset, num=None):
        """Gives `buf`."""
        return call(self.blob.read, self._channel(), buf, offset, num)

    def write(self, buf, offset, num=None):
        return call(self.blob.write, self._channel(), buf, offset, num)

    def readv(self, buffers, offset):
        return call(self.blob.readv, self._channel(), buffers, offset)

    def writev(self, buffers, offset):
        return call(self.blob.writev, self._channel(), buffers, offset)

    def write_zeroes(self, offset, num):
        return call(self.blob.write_zeroes, self._channel(), offset, num)

    def unmap(self, offset, num):
        return call(self.blob.unmap, self._channel(), offset, num)

    def resize(self, num_clusters):
        return call(self.blob.resize, num_clusters)

    def sync_md(self):
        return call(self.blob.sync_md)

    def set_xattr(self, name, value):
        self.blob.set_xattr(name, value)

    def get_xattr(self, name):
        return self.blob.get_xattr(name)

    def remove_xattr(self, name):
        self.blob.remove_xattr(name)

    async def close(self):
        """Wait for the metadata to be durable, close the blob, put the channel."""
        try:
            await call(self.blob.close)
        finally:
            if self._ch is not None:
                ch, self._ch = self._ch, None
                ch.put()

    @property
    def num_units(self):
        return self.blob.num_units

    @property
    def num_clusters(self):
        return self.blob.num_clusters
