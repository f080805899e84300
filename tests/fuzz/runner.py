"""Run the bdev fuzz machine for one kind of device, in this process:

    python -m tests.fuzz.runner KIND          # KIND: one of tests.fuzz.devices.KINDS
    python -m tests.fuzz.runner config        # load_config with random and mutated JSON

test_bdev_fuzz.py runs this in a subprocess, so that a segfault or a hang is a failed test with
the steps that led to it, not a dead pytest. Settings come from a hypothesis profile
(USERBLK_FUZZ_PROFILE: "ci", the default, or "long"; see test_bdev_fuzz.py). Exit status 0: no
failure; otherwise hypothesis' report (the shrunk steps) is on stdout/stderr.
"""
import faulthandler
import logging
import os
import sys
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

# CI: the same examples every run (derandomize), no example database, a bounded size
settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=20, stateful_step_count=40,
    deadline=None, print_blob=False, suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate, Phase.shrink))
# by hand: new random examples every run (the seed and a reproduction blob are printed)
settings.register_profile(
    "long", derandomize=False, database=None, max_examples=400, stateful_step_count=80,
    deadline=None, print_blob=True, suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate, Phase.shrink))

PROFILE_ENV = "USERBLK_FUZZ_PROFILE"


def profile_settings():
    name = os.environ.get(PROFILE_ENV, "ci")
    s = settings.get_profile(name)
    examples = os.environ.get("USERBLK_FUZZ_EXAMPLES")
    steps = os.environ.get("USERBLK_FUZZ_STEPS")
    if examples or steps:
        s = settings(s, max_examples=int(examples or s.max_examples),
                     stateful_step_count=int(steps or s.stateful_step_count))
    return name, s


def main(argv):
    from tests.fuzz.devices import KINDS
    from tests.fuzz.machine import machine_for
    if len(argv) != 1 or argv[0] not in KINDS + ("config",):
        print(f"usage: python -m tests.fuzz.runner {{{','.join(KINDS)},config}}",
              file=sys.stderr)
        return 2
    kind = argv[0]
    if kind == "config":
        return run_config()
    faulthandler.enable(all_threads=True)
    hang = float(os.environ.get("USERBLK_FUZZ_HANG_DUMP_S", "0"))
    if hang > 0:
        # a hang prints every thread's stack (and ends the process) before the parent's limit
        faulthandler.dump_traceback_later(hang, exit=True)
    # the layers log refusals and removals at warning/error level: expected here
    logging.basicConfig(level=logging.CRITICAL)
    name, s = profile_settings()
    t0 = time.monotonic()
    run_state_machine_as_test(machine_for(kind), settings=s)
    from tests.fuzz.machine import STATS
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(STATS.items())))
    print(f"fuzz {kind}: profile {name}, {s.max_examples} examples x up to "
          f"{s.stateful_step_count} steps: passed in {time.monotonic() - t0:.1f} s")
    return 0


def run_config():
    """The config fuzz (config_fuzz.py): as many examples as the profile's, times six (one
    load is cheap)."""
    import collections
    from tests.fuzz.config_fuzz import make_fuzz_test
    faulthandler.enable(all_threads=True)
    logging.basicConfig(level=logging.CRITICAL)
    name, s = profile_settings()
    stats = collections.Counter()
    test, cleanup = make_fuzz_test(settings(s, max_examples=s.max_examples * 6), stats)
    t0 = time.monotonic()
    try:
        test()
    finally:
        cleanup()
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    print(f"fuzz config: profile {name}, {s.max_examples * 6} examples: passed in "
          f"{time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
