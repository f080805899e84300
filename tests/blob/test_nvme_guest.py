"""A blobstore on userblk's NVMe bdev (QEMU's emulated controller through vfio, in the test
guest) outlives its process: one process makes blobs, snapshots and clones and writes - then
unloads cleanly, or exits without unloading - and another attaches the controller again, loads
the store and finds everything that was durable."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.nvme.kernel_side import GUEST_REASON, IN_GUEST

pytestmark = [pytest.mark.guest(nvme_ns=1, nvme_size="256M"),
              pytest.mark.skipif(not IN_GUEST, reason=GUEST_REASON)]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BDF = "0000:00:10.0"

WRITER = """
import os, random, sys
from bdev import nvme
from blob import Blobstore
mode = sys.argv[1]
nvme.attach_controller("Nvme0", "trtype:PCIe traddr:%s")
bs = Blobstore.init("Nvme0n1", cluster_size=1 << 20)
ch = bs.get_io_channel()
data = random.Random(2).randbytes(4 << 20)
thick = bs.open(bs.create(4, xattrs={"name": b"thick"}))
thick.write(ch, data, 0)
thin = bs.open(bs.create(64, thin=True))
for i in range(32):
    thin.write(ch, data[i * 4096:(i + 1) * 4096], i * 4000)
snap = bs.snapshot(thin.id)
thin.write(ch, b"cow!" * 1024, 8)
clone = bs.clone(snap)
thick.set_xattr("more", b"yes")
thick.sync_md()
print(thick.id, thin.id, snap, clone, flush=True)
if mode == "crash":
    os._exit(0)
thick.close(); thin.close(); ch.put(); bs.unload()
nvme.detach_controller("Nvme0")
""" % BDF

READER = """
import random, sys
from bdev import nvme
from blob import Blobstore
thick_id, thin_id, snap, clone = map(int, sys.argv[1:5])
nvme.attach_controller("Nvme0", "trtype:PCIe traddr:%s")
bs = Blobstore.load("Nvme0n1")
print("clean" if bs.loaded_clean else "dirty")
ch = bs.get_io_channel()
data = random.Random(2).randbytes(4 << 20)
thick = bs.open(thick_id)
buf = bytearray(4 << 20)
thick.read(ch, buf, 0)
assert buf == data and thick.get_xattr("more") == b"yes"
thin, c = bs.open(thin_id), bs.open(clone)
assert thin.parent_id == snap and c.parent_id == snap
b = bytearray(4096)
thin.read(ch, b, 8)
assert b == b"cow!" * 1024
for i in range(32):
    c.read(ch, b, i * 4000)
    assert b == data[i * 4096:(i + 1) * 4096], i
thick.close(); thin.close(); c.close(); ch.put(); bs.unload()
nvme.detach_controller("Nvme0")
print("verified")
""" % BDF


def _py(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.parametrize("mode", ["unload", "crash"])
def test_a_store_on_the_nvme_bdev_outlives_its_process(mode):
    w = _py(WRITER, mode)
    assert w.returncode == 0, w.stderr
    r = _py(READER, *w.stdout.split())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["clean" if mode == "unload" else "dirty", "verified"]
