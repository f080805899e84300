"""Self-tests of the guest harness: they boot real guests from the host.

Boots are the expensive part (4-6 s each under TCG) and a booting guest keeps about one core
busy, so one module fixture starts every guest these tests need at the same time (which also
proves that parallel guests keep to their own files), plus a nested host pytest on a
guest-marked module; the tests then check what each run produced. They skip with the reason
when QEMU or the image is unavailable, and fail instead under ``--guest=require``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.guest.runner import EXIT_NO_STATUS, EXIT_TIMEOUT, GuestConfig, GuestRun

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]

# Prints what the guest sees as JSON on stdout, a marker on stderr, and exits 7.
PROBE = r"""
import glob, json, os, sys, time
def read(p):
    try:
        return open(p).read().strip()
    except OSError as e:
        return f"<{e.strerror}>"
facts = {
    "uid": os.geteuid(),
    "env": os.environ.get("HARNESS_PROBE"),
    "cwd": os.getcwd(),
    "namespaces": sorted(os.path.basename(p) for p in glob.glob("/sys/block/nvme*n*")),
    "devnodes": sorted(p for p in glob.glob("/dev/nvme*n*")),
    "serials": {a: read(glob.glob(f"/sys/bus/pci/devices/{a}/nvme/nvme*/serial")[0])
                for a in ("0000:00:10.0", "0000:00:11.0")
                if glob.glob(f"/sys/bus/pci/devices/{a}/nvme/nvme*/serial")},
    "lbs": read("/sys/block/nvme0n1/queue/logical_block_size"),
    "max_hw_kb": read("/sys/block/nvme0n1/queue/max_hw_sectors_kb"),
    "hugepages": read("/proc/sys/vm/nr_hugepages"),
    "iommus": os.listdir("/sys/class/iommu") if os.path.isdir("/sys/class/iommu") else [],
    "shared_file": read(os.path.join(sys.argv[1], "from-host.txt")),
}
if len(sys.argv) > 2:  # time one direct 4 KiB read (null backend latency)
    fd = os.open("/dev/nvme0n1", os.O_RDONLY | os.O_DIRECT)
    import mmap
    buf = mmap.mmap(-1, 4096)
    t = time.monotonic()
    os.preadv(fd, [buf], 0)
    facts["read_seconds"] = time.monotonic() - t
    facts["read_zeroes"] = buf[:] == bytes(4096)
with open(os.path.join(sys.argv[1], "from-guest.txt"), "w") as f:
    f.write("written in the guest\n" + "x" * (4 << 20))  # 9p cache=loose: dirty pages in the guest
print(json.dumps(facts))
print("probe-stderr-marker", file=sys.stderr)
sys.exit(7)
"""


GUEST_MODULE = '''
import os
import pytest

pytestmark = pytest.mark.guest(nvme_size="16M", hugepages=8)


def test_passes():
    assert os.environ["USERBLK_IN_GUEST"] == "1" and os.geteuid() == 0


def test_fails():
    value = 1 + 1
    assert value == 3, "deliberate failure in the guest"


def test_skips():
    pytest.skip(reason="deliberately skipped in the guest")


def test_crashes_the_guest():
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")  # kernel panic: the guest dies without reporting


def test_after_the_crash():
    pass
'''


class Runs:
    """Everything this module booted: guest results by name, probe facts, the nested pytest."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.results: dict = {}
        self.facts: dict = {}
        self.nested_rc: int | None = None
        self.nested_out = ""
        self.nested_outcomes: dict = {}


def _probe_run(image, tmp: Path, config: GuestConfig, *extra: str) -> GuestRun:
    tmp.mkdir()
    (tmp / "probe.py").write_text(PROBE)
    (tmp / "from-host.txt").write_text("written on the host\n")
    config = config.replace(shares=[str(tmp)], env={"HARNESS_PROBE": "yes"},
                            console_log=str(tmp / "console.log"), timeout=300)
    return GuestRun(config, ["python3", str(tmp / "probe.py"), str(tmp), *extra], image)


def _nested_pytest(tmp: Path) -> subprocess.Popen:
    """A host pytest on GUEST_MODULE: pass, fail, skip, a test that crashes the guest, and one
    after it that is never reported."""
    tmp.mkdir()
    (tmp / "test_in_guest.py").write_text(textwrap.dedent(GUEST_MODULE))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTEST_ADDOPTS", None)
    with open(tmp / "output.txt", "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "tests.guest.plugin", "-p", "no:cacheprovider",
             "--guest=require", "--guest-timeout=300", "-rA", "--junitxml", str(tmp / "j.xml"),
             "test_in_guest.py"],
            cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def runs(guest_image, tmp_path_factory) -> Runs:
    runs = Runs(tmp_path_factory.mktemp("harness"))
    tmp = runs.tmp
    guests = {
        # 2 controllers x 2 namespaces, 4 KiB blocks, mdts=2, a share, env; exits 7
        "topology": _probe_run(guest_image, tmp / "topology", GuestConfig(
            nvme_ctrls=2, nvme_ns=2, nvme_size="64M", nvme_opts="mdts=2",
            ns_opts="logical_block_size=4096,physical_block_size=4096")),
        # null-co with a latency, no vIOMMU, few hugepages; times one read
        "null": _probe_run(guest_image, tmp / "null", GuestConfig(
            nvme_backend="null", null_latency_ns=200_000_000, nvme_size="16M", iommu=False,
            hugepages=16), "read"),
        "timeout": GuestRun(GuestConfig(timeout=3, console_log=str(tmp / "timeout.log")),
                            ["sleep", "600"], guest_image),
        "refused": GuestRun(GuestConfig(nvme_opts="no_such_property=1"), ["true"], guest_image),
    }
    nested = _nested_pytest(tmp / "nested")
    try:
        for run in guests.values():
            run.start()
        while len(runs.results) < len(guests):
            for name, run in guests.items():
                if name not in runs.results and (result := run.poll()) is not None:
                    runs.results[name] = result
            time.sleep(0.05)
        runs.nested_rc = nested.wait(600)
    finally:
        for run in guests.values():
            run.close()
        if nested.poll() is None:
            nested.kill()
    for name in ("topology", "null"):
        result = runs.results[name]
        assert result.status_reported, result.problem()
        runs.facts[name] = json.loads(result.stdout)
    runs.nested_out = (tmp / "nested" / "output.txt").read_text()
    for case in ET.parse(tmp / "nested" / "j.xml").getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        runs.nested_outcomes[case.get("name")] = kinds[0] if kinds else "passed"
    return runs


def test_exit_status_and_separate_output_channels(runs):
    result = runs.results["topology"]
    assert result.returncode == 7
    assert result.stdout.decode().count("\n") == 1  # only the JSON line: nothing else mixed in
    assert result.stderr == b"probe-stderr-marker\n"
    assert "[userblk-init] running the command" in result.console
    assert result.boot_seconds is not None and result.command_seconds is not None


def test_runs_as_root_with_env_and_workdir(runs):
    facts = runs.facts["topology"]
    assert facts["uid"] == 0
    assert facts["env"] == "yes"
    assert facts["cwd"] == str(runs.tmp / "topology")  # the first share is the working directory


def test_share_at_the_same_path_both_ways(runs):
    assert runs.facts["topology"]["shared_file"] == "written on the host"
    # complete on the host although QEMU is stopped as soon as the guest reports its status
    written = (runs.tmp / "topology" / "from-guest.txt").read_text()
    assert written == "written in the guest\n" + "x" * (4 << 20)


def test_parallel_guests_keep_their_own_consoles(runs):
    for name in ("topology", "null"):
        console = (runs.tmp / name / "console.log").read_text()
        assert str(runs.tmp / name) in console  # its own share, mounted by its own init
        other = "null" if name == "topology" else "topology"
        assert str(runs.tmp / other) not in console


def test_two_controllers_with_two_namespaces_each(runs):
    facts = runs.facts["topology"]
    assert facts["namespaces"] == ["nvme0n1", "nvme0n2", "nvme1n1", "nvme1n2"]
    assert facts["devnodes"] == ["/dev/nvme0n1", "/dev/nvme0n2", "/dev/nvme1n1", "/dev/nvme1n2"]
    assert facts["serials"] == {"0000:00:10.0": "USERBLK0", "0000:00:11.0": "USERBLK1"}


def test_controller_and_namespace_properties(runs):
    facts = runs.facts["topology"]
    assert facts["lbs"] == "4096"           # ns_opts
    assert facts["max_hw_kb"] == "16"       # nvme_opts mdts=2: 2^2 x 4 KiB pages
    assert facts["hugepages"] == "256"
    assert facts["iommus"], "the vIOMMU is on by default"


def test_null_backend_latency_makes_commands_slow(runs):
    facts = runs.facts["null"]
    assert facts["read_zeroes"]
    assert facts["read_seconds"] >= 0.2


def test_iommu_off_and_hugepages_option(runs):
    facts = runs.facts["null"]
    assert facts["iommus"] == []
    assert facts["hugepages"] == "16"


def test_timeout_kills_the_guest_with_a_distinct_status(runs):
    result = runs.results["timeout"]
    assert result.returncode == EXIT_TIMEOUT and result.timed_out
    assert not result.status_reported
    assert "killed by the timeout" in result.problem()
    assert result.total_seconds < 30


def test_qemu_refusing_its_options_is_reported(runs):
    result = runs.results["refused"]
    assert result.returncode == EXIT_NO_STATUS and not result.status_reported
    assert result.boot_seconds is None
    assert "no_such_property" in result.problem()  # QEMU's own message


def test_guest_marked_module_outcomes_reach_the_host(runs):
    out = runs.nested_out
    assert runs.nested_rc == 1, out
    assert runs.nested_outcomes == {
        "test_passes": "passed", "test_fails": "failure", "test_skips": "skipped",
        "test_crashes_the_guest": "failure", "test_after_the_crash": "failure"}, out
    assert "deliberate failure in the guest" in out and "assert 2 == 3" in out
    assert "deliberately skipped in the guest" in out
    assert "the guest never reported this test" in out
    assert "reported no exit status" in out
    assert "Kernel panic" in out  # the console excerpt starts at the panic
    assert "the guest never reported this test: the guest reported no exit status" in out
    assert "(details under test_in_guest.py::test_crashes_the_guest)" in out
    assert "userblk guest runs" in out and "NO STATUS" in out
