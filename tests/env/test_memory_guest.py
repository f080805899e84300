"""The DMA memory tests again, inside the guest, where 2 MiB hugepages are reserved and hugetlbfs
is mounted: the hugepage backends (anonymous MAP_HUGETLB and hugetlbfs files shared between
processes) and the automatic choice of hugepages, which the host (no hugepages) cannot show."""
import os

import pytest

from env import memory
from tests.env.test_memory import (test_allocate_sizes_are_aligned_and_translate,  # noqa: F401
                                   test_backend_is_visible, test_hugepage_buffer,
                                   test_hugetlbfs_buffer_is_shared_between_processes)

IN_GUEST = os.environ.get("USERBLK_IN_GUEST") == "1"
pytestmark = [pytest.mark.guest(),
              pytest.mark.skipif(not IN_GUEST, reason="needs the QEMU test guest (hugepages "
                                                      "reserved, hugetlbfs mounted)")]


def test_auto_backend_takes_hugepages_when_reserved():
    with memory.allocate(64 * 1024) as b:
        assert b.backend == "hugepage-2M" and b.hugepage
