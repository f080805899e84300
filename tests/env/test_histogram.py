"""Histogram: bucket edges, percentiles and merging against exact computations."""
import random

import pytest

from env.errors import InvalidArgument
from env.histogram import Histogram


def exact_percentile(values, p):
    values = sorted(values)
    k = max(1, int(p / 100 * len(values) + 0.5))
    return values[k - 1]


def test_small_values_are_exact():
    h = Histogram()
    for v in range(100):
        h.add(v)
    assert h.count == 100 and h.min == 0 and h.max == 99
    assert h.percentile(50) == 49 and h.percentile(100) == 99
    assert h.mean == pytest.approx(49.5)


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_within_one_percent(seed):
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(10, 1.5)) for _ in range(20000)]
    h = Histogram()
    for v in values:
        h.add(v)
    for p in (1, 50, 90, 99, 99.9):
        exact = exact_percentile(values, p)
        assert exact <= h.percentile(p) <= exact * 1.008 + 1


def test_huge_values_and_extremes():
    h = Histogram()
    h.add((1 << 64) - 1)
    h.add(1 << 40)
    assert h.max == (1 << 64) - 1 and h.min == 1 << 40
    assert h.percentile(100) == (1 << 64) - 1


def test_merge_equals_single_histogram():
    a, b, both = Histogram(), Histogram(), Histogram()
    for v in range(0, 100000, 7):
        (a if v % 2 else b).add(v)
        both.add(v)
    a.merge(b)
    assert a.count == both.count and a.total == both.total
    assert a.buckets_nonzero() == both.buckets_nonzero()
    assert a.summary() == both.summary()


def test_empty_and_bad_percentile():
    h = Histogram()
    assert h.percentile(99) == 0 and h.summary()["min"] == 0
    with pytest.raises(InvalidArgument):
        h.percentile(101)
    h.add(5, times=3)
    h.reset()
    assert h.count == 0


def test_bucket_edges_cover_every_value_once():
    h = Histogram()
    for v in [127, 128, 129, 255, 256, 257, 1000, 4095, 4096]:
        h.add(v)
    rows = h.buckets_nonzero()
    for low, high, _ in rows:
        assert low <= high
    for (_, high, _), (low, _, _) in zip(rows, rows[1:]):
        assert high < low
