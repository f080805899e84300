"""Power cuts at random points under random workloads (the harness: tests/blob/crash.py).

Each workload - random creates, resizes, writes, write zeroes, xattrs, sync_md, snapshots,
clones, inflates, decouples, closes and deletes on a 4 MiB store of 16 KiB clusters - runs to
its end on a bdev that journals every write. A cut at journal position k gives the device as it
was: writes before k whole, write k torn at block granularity, nothing after. The store loaded
from it must hold every blob and byte that was durable before the cut and nothing that never
was; after a clean unload, `blob.check` must find no leaked or doubly held cluster.

The CI profile checks 480 cuts at 512-byte blocks (60 workloads, 8 random cuts each) and 48
at 4 KiB blocks, in about 20 s. The
long profile runs by hand:

    USERBLK_BLOB_CRASH_CUTS=10000 .venv/bin/python -m pytest -q tests/blob/test_crash.py

(any number of cuts; USERBLK_BLOB_CRASH_SEED picks the first workload's seed, default 1; a
failure names its seed and cut: `Workload(seed).run()` then `verify_cut` reproduces it).
"""
import os
import random

import pytest

from tests.blob.crash import Workload, decode_unit, images_at, unit_data, verify_cut

CUTS = int(os.environ.get("USERBLK_BLOB_CRASH_CUTS", "480"))
FIRST_SEED = int(os.environ.get("USERBLK_BLOB_CRASH_SEED", "1"))
PER_WORKLOAD = 8


def _run_cuts(total, block_size, first_seed, name):
    done = 0
    seed = first_seed
    outcomes = {}
    while done < total:
        w = Workload(seed, block_size=block_size, nops=random.Random(seed).randint(20, 60),
                     name=f"{name}J").run()
        rng = random.Random(seed * 7919)
        n = min(PER_WORKLOAD, total - done, len(w.journal) + 1)
        cuts = rng.sample(range(len(w.journal) + 1), n)
        for k, image in images_at(w.journal, w.size, w.block_size, cuts, rng):
            try:
                what = verify_cut(w, k, image, f"{name}C")
            except BaseException as e:
                raise AssertionError(f"workload seed {seed}, block size {block_size}, cut at "
                                     f"journal position {k} of {len(w.journal)}: {e}") from e
            outcomes[what] = outcomes.get(what, 0) + 1
            done += 1
        seed += 1
    return outcomes


def test_power_cuts_512_byte_blocks():
    outcomes = _run_cuts(CUTS, 512, FIRST_SEED, "Cut512")
    assert sum(outcomes.values()) >= CUTS and outcomes.get("ok", 0) > CUTS // 2


def test_power_cuts_4k_blocks():
    n = max(16, CUTS // 10)
    outcomes = _run_cuts(n, 4096, FIRST_SEED + 100000, "Cut4k")
    assert sum(outcomes.values()) >= n


def test_the_harness_sees_lost_data():
    """The check is not blind: a store that lost an acknowledged write fails it."""
    for seed in range(3, 40):
        w = Workload(seed, nops=30).run()
        k = len(w.journal)
        image = next(images_at(w.journal, w.size, w.block_size, [k], random.Random(1)))[1]
        sure, _ = w.expected(k)
        for m in sure.values():
            for u, allowed in sorted(m.allowed.items()):
                (wid,) = allowed if len(allowed) == 1 else (0,)
                if wid and u < len(m.cur):
                    at = image.find(unit_data(wid, u, w.block_size))
                    assert at >= 0
                    image[at:at + w.block_size] = bytes(w.block_size)   # lose that write
                    with pytest.raises(AssertionError, match="expected one of"):
                        verify_cut(w, k, image, "CutBlind")
                    return
    pytest.fail("no workload left a written unit to lose")


def test_unit_patterns():
    d = unit_data(5, 9, 512)
    assert decode_unit(d, 9) == 5 and decode_unit(bytes(512), 9) == 0
    with pytest.raises(AssertionError, match="no write put there"):
        decode_unit(d, 10)
