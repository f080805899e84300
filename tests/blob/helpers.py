"""Helpers shared by the blobstore tests: stores on malloc bdevs, reading and writing in units."""
import itertools
import random

import pytest

from bdev import malloc
from blob import Blobstore

_names = itertools.count()


def fresh_name(prefix="BlobM"):
    return f"{prefix}{next(_names)}"


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


class Store:
    """A blobstore on a new malloc bdev, with this thread's channel; `reload()` unloads (or
    drops, for a crash) and loads it again; `close()` undoes everything."""

    def __init__(self, size=64 << 20, block_size=512, cluster_size=1 << 20, kind=malloc, **kw):
        self.name = fresh_name()
        self.bdev = kind.create(self.name, size=size, block_size=block_size)
        self.bs = Blobstore.init(self.name, cluster_size=cluster_size, **kw)
        self.ch = self.bs.get_io_channel()
        self.unit = block_size

    def put_channel(self):
        if self.ch is not None:
            self.ch.put()
            self.ch = None

    def reload(self, clean=True):
        self.put_channel()
        if clean:
            self.bs.unload()
        else:
            crash(self.bs)
        self.bs = Blobstore.load(self.name)
        self.ch = self.bs.get_io_channel()
        return self.bs

    def close(self):
        self.put_channel()
        if not self.bs.closed:
            self.bs.unload()
        self.bdev.unregister()

    def read(self, blob, offset, num):
        buf = bytearray(num * self.unit)
        blob.read(self.ch, buf, offset)
        return bytes(buf)


def crash(bs):
    """Drop a store without unloading it (what a crash leaves: no clean super block)."""
    for b in list(bs.blobs.values()):
        for h in list(b.handles):
            h._closed = True
    for ch in bs._dev.channels():
        while not ch.released:
            ch.put()
    bs._close_base()


@pytest.fixture
def store():
    s = Store()
    yield s
    s.close()
