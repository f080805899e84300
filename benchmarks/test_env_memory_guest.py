"""DmaBuffer allocate+free again inside the QEMU guest, where 2 MiB hugepages are reserved, so
the hugepage backend is measured beside the anonymous one (the host has no hugepages)."""
import os

import pytest

from benchmarks.test_env_memory import test_allocate_free  # noqa: F401

pytestmark = [pytest.mark.guest(),
              pytest.mark.skipif(os.environ.get("USERBLK_IN_GUEST") != "1",
                                 reason="needs the QEMU test guest (hugepages reserved)")]
