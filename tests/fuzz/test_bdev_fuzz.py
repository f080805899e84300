"""Fuzz the public bdev API with a hypothesis state machine (tests/fuzz/machine.py), one device
kind per test, each run in a child process (tests/fuzz/runner.py) so that a segfault or a hang
fails the test with the steps that led to it instead of killing pytest.

What the machine does and checks is in machine.py's docstring; the devices and what the model
may assume of each (which of them store data, what a read after unmap returns) in devices.py.
Defects of today's code that the machine steps around are switches in known_bugs.py, each with
a reproducer in test_known_bugs.py.

CI runs the bounded profile "ci" (derandomized: the same examples every run; the whole module
takes well under a minute). The long profile draws new random examples every run:

    USERBLK_FUZZ_PROFILE=long .venv/bin/python -m pytest -q --guest=off tests/fuzz/test_bdev_fuzz.py

or one device kind, with more control:

    USERBLK_FUZZ_PROFILE=long USERBLK_FUZZ_EXAMPLES=2000 USERBLK_FUZZ_STEPS=100 \\
        .venv/bin/python -m tests.fuzz.runner nvme

A failure prints hypothesis' shrunk steps; a crash prints the child's faulthandler traceback and
the journal of the example that was running (every step as it was taken).
"""
import os

import pytest

from tests.fuzz.devices import KINDS
from tests.fuzz.runner import PROFILE_ENV
from tests.fuzz.subproc import run_python

# the child's own limit (it dumps every thread's stack when a step hangs) and the parent's
LIMITS = {"ci": (150, 180), "long": (3000, 3600)}


@pytest.mark.parametrize("kind", KINDS + ("config",))
def test_bdev_api_fuzz(kind, tmp_path):
    """`config`: load_config with random and mutated JSON (config_fuzz.py)."""
    profile = os.environ.get(PROFILE_ENV, "ci")
    child_limit, limit = LIMITS.get(profile, LIMITS["long"])
    journal = tmp_path / "journal.txt"
    r = run_python(["-m", "tests.fuzz.runner", kind], timeout=limit,
                   env={"USERBLK_FUZZ_JOURNAL": str(journal),
                        "USERBLK_FUZZ_HANG_DUMP_S": str(child_limit)})
    if r.returncode == 0:
        return
    steps = journal.read_text() if journal.exists() else "(no journal)"
    first = journal.with_name(journal.name + ".failure")
    first = first.read_text() if first.exists() else "(none)"
    pytest.fail(f"fuzz machine on {kind}: {r.describe()}\n--- steps of the last example "
                f"(journal) ---\n{steps[-30000:]}\n--- the first example that failed ---\n"
                f"{first[-30000:]}", pytrace=False)
