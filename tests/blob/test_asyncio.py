"""The blobstore with await: the same operations through env.asyncio_driver."""
import asyncio

import pytest

from bdev import malloc
from blob import BlobNotFound, BlobReadOnly
from blob.async_io import AsyncBlobstore
from tests.blob.helpers import fresh_name


def test_await_every_kind_of_operation():
    name = fresh_name()
    b = malloc.create(name, size=32 << 20)

    async def main():
        astore = await AsyncBlobstore.init(name, cluster_size=1 << 20)
        bid = await astore.create(num_clusters=4, thin=True, xattrs={"a": b"1"})
        blob = await astore.open(bid)
        await asyncio.gather(*(blob.write(bytes([i + 1]) * 512, i * 200) for i in range(40)))
        bufs = await asyncio.gather(*(blob.read(bytearray(512), i * 200) for i in range(40)))
        assert [bytes(x) for x in bufs] == [bytes([i + 1]) * 512 for i in range(40)]
        await blob.resize(6)
        blob.set_xattr("b", b"2")
        await blob.sync_md()
        sid = await astore.snapshot(bid)
        cid = await astore.clone(sid)
        clone = await astore.open(cid)
        assert bytes(await clone.read(bytearray(512), 200)) == b"\x02" * 512
        snap = await astore.open(sid)
        with pytest.raises(BlobReadOnly):
            await snap.write(b"x" * 512, 0)
        await snap.close()
        await astore.inflate(cid)
        await clone.close()
        await blob.close()
        await astore.delete(cid)
        with pytest.raises(BlobNotFound):
            await astore.delete(cid)
        assert sorted(astore) == sorted([bid, sid])
        await astore.unload()
        astore = await AsyncBlobstore.load(name)
        assert astore.info(bid)["xattrs"] == {"a": b"1", "b": b"2"}
        await astore.unload()

    try:
        asyncio.run(main())
    finally:
        b.unregister()
