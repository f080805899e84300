"""A store on a file (the aio bdev) outlives its process: written by one process - unloaded
cleanly, or killed without unloading - and read back by another."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WRITER = """
import os, random, sys
from bdev import aio
from blob import Blobstore
path, mode = sys.argv[1], sys.argv[2]
aio.create("PersistA", path, create_size=64 << 20)
bs = Blobstore.init("PersistA", cluster_size=256 << 10)
ch = bs.get_io_channel()
thick = bs.open(bs.create(8, xattrs={"name": b"thick"}))
thin = bs.open(bs.create(40, thin=True))
data = random.Random(1).randbytes(3 << 20)
thick.write(ch, data[:2 << 20], 0)
for i in range(20):
    thin.write(ch, data[i * 4096:(i + 1) * 4096], i * 1000)
thick.set_xattr("note", b"synced")
thick.sync_md()
snap = bs.snapshot(thin.id)
thin.write(ch, b"after" * 1024 * 8, 0)          # 40 KiB, copy-on-write
clone = bs.clone(snap)
print(thick.id, thin.id, snap, clone, flush=True)
if mode == "crash":
    os._exit(0)                                  # no unload: the next load is dirty
thick.close(); thin.close(); ch.put(); bs.unload()
"""

READER = """
import random, sys
from bdev import aio
from blob import Blobstore
path = sys.argv[1]
thick_id, thin_id, snap, clone = map(int, sys.argv[2:6])
aio.create("PersistB", path)
bs = Blobstore.load("PersistB")
print("clean" if bs.loaded_clean else "dirty")
ch = bs.get_io_channel()
data = random.Random(1).randbytes(3 << 20)
thick = bs.open(thick_id)
buf = bytearray(2 << 20)
thick.read(ch, buf, 0)
assert buf == data[:2 << 20]
assert thick.get_xattr("name") == b"thick" and thick.get_xattr("note") == b"synced"
thin = bs.open(thin_id)
assert thin.parent_id == snap and bs.info(snap)["clones"] == sorted([thin_id, clone])
b = bytearray(40960)
thin.read(ch, b, 0)
assert b == b"after" * 1024 * 8
c = bs.open(clone)
for i in range(20):
    b = bytearray(4096)
    c.read(ch, b, i * 1000)
    assert b == data[i * 4096:(i + 1) * 4096], i
    thin.read(ch, b, i * 1000)
    assert i < 10 or b == data[i * 4096:(i + 1) * 4096], i
thick.close(); thin.close(); c.close(); ch.put(); bs.unload()
print("verified")
"""


def _py(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


@pytest.mark.parametrize("mode", ["unload", "crash"])
def test_a_store_on_a_file_outlives_its_process(tmp_path, mode):
    path = tmp_path / "store.img"
    w = _py(WRITER, path, mode)
    assert w.returncode == 0, w.stderr
    ids = w.stdout.split()
    r = _py(READER, path, *ids)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["clean" if mode == "unload" else "dirty", "verified"]
