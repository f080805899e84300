"""env.setup (`userblk setup`) against a fake machine: the fake sysfs of test_pci (whose writes
act like the kernel's PCI core) plus a hugepage pool that acts like the kernel's (it spreads a
global count over the NUMA nodes and gives no more than each node has), fake /proc/mounts,
/proc/swaps and /proc/<pid>/fd, and a `mount` that appends to the fake mounts file.

Nothing here touches the real machine: every path comes from the `Host` the tests build, and the
CLI tests point `env.setup.default_host` at it.
"""
import json
import os
import shutil

import pytest

from env import setup
from env.errors import InvalidArgument, PermissionRequired
from env.pci import PciDevice
from env.setup import Host, SetupError, SetupPermissionError
from tests.env.test_pci import NVME_CLASS, FakeSysfs, make_nvme
from userblk import cli

A, B, C = "0000:00:10.0", "0000:00:11.0", "0000:00:12.0"
HP = "kernel/mm/hugepages/hugepages-2048kB"


class FakeMachine(FakeSysfs):
    """FakeSysfs plus /sys/kernel/mm/hugepages and /sys/devices/system/node/nodeN/hugepages."""

    def __init__(self, root, nodes=2, node_capacity=100000, hugepages=True):
        super().__init__(root)
        self.nodes = nodes
        self.capacity = [node_capacity] * nodes     # 2 MiB pages each node can give
        self.used = [0] * nodes                      # pages in use (not free)
        self.pool = [0] * nodes
        if hugepages:
            for kb in (2048, 1048576):
                os.makedirs(self.path(f"kernel/mm/hugepages/hugepages-{kb}kB"))
                for n in range(nodes):
                    os.makedirs(self.path(f"devices/system/node/node{n}/hugepages/"
                                          f"hugepages-{kb}kB"))
            self._publish()
        else:
            for n in range(nodes):
                os.makedirs(self.path(f"devices/system/node/node{n}"))

    def _put(self, rel, value):
        with open(self.path(rel), "w") as f:
            f.write(f"{value}\n")

    def _publish(self):
        for kb in (2048, 1048576):
            pool = self.pool if kb == 2048 else [0] * self.nodes
            used = self.used if kb == 2048 else [0] * self.nodes
            for n in range(self.nodes):
                base = f"devices/system/node/node{n}/hugepages/hugepages-{kb}kB"
                self._put(f"{base}/nr_hugepages", pool[n])
                self._put(f"{base}/free_hugepages", pool[n] - used[n])
            base = f"kernel/mm/hugepages/hugepages-{kb}kB"
            self._put(f"{base}/nr_hugepages", sum(pool))
            self._put(f"{base}/free_hugepages", sum(pool) - sum(used))

    def set_pool(self, *per_node, used=None):
        self.pool = list(per_node)
        self.used = list(used or [0] * self.nodes)
        self._publish()

    def write(self, rel, text):
        super().write(rel, text)
        if not rel.endswith("nr_hugepages") or "2048kB" not in rel:
            return
        want = int(text)
        if rel.startswith("devices/system/node/"):
            n = int(rel.split("/")[3][4:])
            self.pool[n] = max(self.used[n], min(want, self.capacity[n]))
        else:        # the kernel spreads the change over the nodes, each giving what it can
            pool = [max(u, min(p, want)) for p, u in zip(self.pool, self.used)]
            n = 0
            while sum(pool) < want and any(p < c for p, c in zip(pool, self.capacity)):
                if pool[n] < self.capacity[n]:
                    pool[n] += 1
                n = (n + 1) % self.nodes
            while sum(pool) > want and any(p > u for p, u in zip(pool, self.used)):
                n = max(range(self.nodes), key=lambda i: pool[i] - self.used[i])
                pool[n] -= 1
            self.pool = pool
        self._publish()


@pytest.fixture
def machine(tmp_path):
    fake = FakeMachine(tmp_path / "sys")
    fake.add_driver("nvme", classes={NVME_CLASS})
    fake.add_driver("vfio-pci")
    fake.loadable["uio_pci_generic"] = ("uio_pci_generic", {})
    yield fake
    fake.join()


class Mounts:
    """The fake /proc/mounts and the `mount` that adds to it."""

    def __init__(self, path):
        self.path = path
        self.calls = []
        path.write_text("proc /proc proc rw 0 0\n")

    def add(self, line):
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def mount(self, target):
        self.calls.append(target)
        self.add(f"nodev {target} hugetlbfs rw,relatime,pagesize=2M 0 0")


@pytest.fixture
def mounts(tmp_path):
    return Mounts(tmp_path / "mounts")


@pytest.fixture
def host(machine, mounts, tmp_path):
    (tmp_path / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
    (tmp_path / "proc").mkdir()
    return Host(sysfs=machine, mounts=str(mounts.path), swaps=str(tmp_path / "swaps"),
                proc=str(tmp_path / "proc"), dev=str(tmp_path / "dev"),
                state_file=str(tmp_path / "run" / "userblk" / "setup.json"),
                hugetlbfs_dir=str(tmp_path / "dev" / "hugepages"), euid=0, mount=mounts.mount)


def user_host(host):
    """The same machine seen by a non-root user."""
    return Host(sysfs=host.sysfs, mounts=host.mounts, swaps=host.swaps, proc=host.proc,
                dev=host.dev, state_file=host.state_file, hugetlbfs_dir=host.hugetlbfs_dir,
                euid=1000, mount=host._mount)


def state(host):
    with open(host.state_file) as f:
        return json.load(f)["devices"]


def by_address(report):
    return {d["address"]: d for d in report["devices"]}


def lines_for(text, bdf):
    return [line for line in text.splitlines() if line.startswith(bdf)]


# ---- configure: binding decisions -------------------------------------------------------------
def test_every_idle_nvme_function_goes_to_vfio_with_an_iommu(machine, host):
    make_nvme(machine, A, group=4, numa_node=0)
    make_nvme(machine, B, group=5, numa_node=1)
    machine.add_driver("e1000e", classes={0x020000})
    machine.add_device("0000:00:02.0", class_code=0x020000, driver="e1000e", iommu_group=1)

    report = setup.configure(host, hugemem_mib=512)

    assert report["ok"] and report["driver"]["name"] == "vfio-pci"
    assert "IOMMU active, 3 groups" in report["driver"]["why"]
    assert machine.driver_of(A) == machine.driver_of(B) == "vfio-pci"
    assert machine.driver_of("0000:00:02.0") == "e1000e"          # not NVMe: not touched
    assert [d["address"] for d in report["devices"]] == [A, B]
    assert state(host) == {A: {"original_driver": "nvme", "driver": "vfio-pci"},
                           B: {"original_driver": "nvme", "driver": "vfio-pci"}}
    text = setup.format_report(report)
    assert lines_for(text, A) == [f"{A} (1b36 0010): nvme -> vfio-pci"]
    assert "driver: vfio-pci (IOMMU active, 3 groups)" in text


def test_without_an_iommu_it_loads_and_uses_uio_pci_generic(machine, host):
    make_nvme(machine, A, group=None)
    report = setup.configure(host, hugemem_mib=64)
    assert machine.modprobes == ["uio_pci_generic"]
    assert machine.driver_of(A) == "uio_pci_generic"
    assert report["driver"] == {"name": "uio_pci_generic", "loaded_now": True,
                                "why": "no IOMMU and vfio no-IOMMU mode off"}
    assert "(module loaded)" in setup.format_report(report)


def test_vfio_noiommu_mode_picks_vfio_without_an_iommu(machine, host):
    make_nvme(machine, A, group=None)
    os.makedirs(machine.path("module/vfio/parameters"))
    with open(machine.path("module/vfio/parameters/enable_unsafe_noiommu_mode"), "w") as f:
        f.write("Y\n")
    assert setup.choose_driver(host) == ("vfio-pci", "no IOMMU, vfio in unsafe no-IOMMU mode")


def test_asking_for_vfio_without_an_iommu_says_what_to_do(machine, host):
    make_nvme(machine, A, group=None)
    with pytest.raises(SetupError, match="intel_iommu=on.*enable_unsafe_noiommu_mode=1.*"
                                         "uio_pci_generic"):
        setup.configure(host, driver="vfio-pci")
    assert machine.driver_of(A) == "nvme" and machine.writes == []


def test_asking_for_uio_with_an_iommu_is_honoured(machine, host):
    make_nvme(machine, A, group=4)
    report = setup.configure(host, driver="uio_pci_generic", hugepages=8)
    assert machine.driver_of(A) == "uio_pci_generic"
    assert report["driver"]["why"] == "IOMMU active, 1 groups; asked for"


def test_devices_in_use_are_skipped_with_the_reason(machine, host, mounts, tmp_path):
    make_nvme(machine, A, group=4)
    machine.add_namespace(A, "nvme0", "nvme0n1")
    make_nvme(machine, B, group=5)
    machine.add_namespace(B, "nvme1", "nvme1n1")
    make_nvme(machine, C, group=6)
    machine.add_namespace(C, "nvme2", "nvme2n1", holders=("dm-0",))
    make_nvme(machine, "0000:00:13.0", group=7)
    machine.add_namespace("0000:00:13.0", "nvme3", "nvme3n1")       # idle: bound
    mounts.add("/dev/nvme0n1p2 /data ext4 rw,relatime 0 0")
    with open(host.swaps, "a") as f:
        f.write("/dev/nvme1n1 partition 1048572 0 -2\n")

    report = setup.configure(host, hugepages=16)

    assert report["ok"]
    devs = by_address(report)
    assert devs[A]["action"] == devs[B]["action"] == devs[C]["action"] == "skip"
    assert devs[A]["reason"] == "in use: /dev/nvme0n1p2 mounted at /data"
    assert devs[B]["reason"] == "in use: /dev/nvme1n1 used as swap"
    assert devs[C]["reason"] == "in use: /dev/nvme2n1 is held by dm-0"
    assert [machine.driver_of(x) for x in (A, B, C)] == ["nvme"] * 3
    assert machine.driver_of("0000:00:13.0") == "vfio-pci"
    text = setup.format_report(report)
    assert lines_for(text, A) == [f"{A} (1b36 0010): nvme, skipped: in use: /dev/nvme0n1p2 "
                                  "mounted at /data"]
    assert set(state(host)) == {"0000:00:13.0"}


def test_allow_and_block_lists(machine, host):
    for bdf, group in ((A, 4), (B, 5), (C, 6)):
        make_nvme(machine, bdf, group=group)
    report = setup.configure(host, hugepages=4, allow=["00:10.0,0000:00:11.0", "0000:00:1f.0"],
                             block=["0000:00:11.0"])
    devs = by_address(report)
    assert (devs[A]["action"], devs[B]["reason"], devs[C]["reason"]) == \
        ("bind", "in --block", "not in --allow")          # the block list wins over the allow list
    assert [machine.driver_of(x) for x in (A, B, C)] == ["vfio-pci", "nvme", "nvme"]
    assert report["notes"] == ["0000:00:1f.0 (in --allow) is not an NVMe function on this machine"]
    assert "note: 0000:00:1f.0 (in --allow) is not an NVMe function" in \
        setup.format_report(report)


def test_a_bad_address_in_a_list_is_refused_before_anything_changes(machine, host):
    make_nvme(machine, A)
    with pytest.raises(InvalidArgument, match="'reset' is not a PCI address"):
        setup.configure(host, allow=[A, "reset"])
    assert machine.writes == []


def test_devices_already_on_a_user_space_driver_are_left_alone(machine, host):
    machine.add_driver("uio_pci_generic")
    make_nvme(machine, A, group=4, driver="vfio-pci")
    make_nvme(machine, B, group=5, driver="uio_pci_generic")
    report = setup.configure(host, hugepages=4)
    devs = by_address(report)
    assert devs[A]["reason"] == "already bound to vfio-pci"
    assert devs[B]["reason"].startswith("bound to uio_pci_generic, another user-space driver")
    assert "`userblk setup reset` first" in devs[B]["reason"]
    assert not [w for w in machine.writes if "pci" in w[0]]       # no PCI write at all
    assert machine.modprobes == []                 # nothing to bind: no module loaded either
    assert not os.path.exists(host.state_file)


def test_a_failed_bind_is_reported_and_the_device_goes_back(machine, host, capsys, monkeypatch):
    machine.drivers["vfio-pci"].probe_fails = True
    monkeypatch.setattr(setup, "BIND_TIMEOUT", 0.05)
    make_nvme(machine, A, group=4)
    report = setup.configure(host, hugepages=4)
    d = by_address(report)[A]
    assert not report["ok"] and d["action"] == "error"
    assert "did not take effect" in d["reason"] and d["driver_after"] == "nvme"
    assert machine.driver_of(A) == "nvme" and not os.path.exists(host.state_file)
    monkeypatch.setattr(setup, "default_host", lambda: host)
    assert cli.main(["setup", "--hugepages", "4"]) == 1
    assert f"{A} (1b36 0010): nvme, FAILED: binding" in capsys.readouterr().out


def test_a_group_shared_with_a_kernel_driven_device_gets_a_note(machine, host):
    make_nvme(machine, A, group=4)
    machine.add_driver("snd_hda_intel", classes={0x040300})
    machine.add_device("0000:00:10.1", class_code=0x040300, driver="snd_hda_intel", iommu_group=4)
    report = setup.configure(host, hugepages=4)
    assert any("IOMMU group 4 also holds 0000:00:10.1 (snd_hda_intel)" in n
               for n in report["notes"])


# ---- dry run and root -------------------------------------------------------------------------
def test_dry_run_changes_nothing_and_needs_no_root(machine, host, mounts):
    make_nvme(machine, A, group=None)
    machine.set_pool(10, 10)
    report = setup.configure(user_host(host), hugemem_mib=100, dry_run=True)
    assert machine.writes == [] and machine.modprobes == [] and mounts.calls == []
    assert not os.path.exists(host.state_file) and machine.driver_of(A) == "nvme"
    assert by_address(report)[A]["driver_after"] == "uio_pci_generic"
    text = setup.format_report(report)
    assert text.splitlines() == [
        "dry run: nothing is changed",
        "hugepages: would set 20 -> 50 x 2 MiB (100 MiB)",
        f"hugetlbfs: would mount at {host.hugetlbfs_dir}",
        "driver: uio_pci_generic (no IOMMU and vfio no-IOMMU mode off) (would load the module)",
        f"{A} (1b36 0010): would move nvme -> uio_pci_generic",
    ]


def test_not_root_is_a_clear_error_and_nothing_changes(machine, host, capsys, monkeypatch):
    make_nvme(machine, A, group=4)
    with pytest.raises(SetupPermissionError) as info:
        setup.configure(user_host(host))
    assert isinstance(info.value, PermissionRequired)
    assert "needs root: reserving hugepages" in str(info.value) and "--dry-run" in str(info.value)
    with pytest.raises(SetupPermissionError, match="needs root: giving NVMe devices back"):
        setup.reset(user_host(host))
    assert machine.writes == [] and machine.driver_of(A) == "nvme"

    monkeypatch.setattr(setup, "default_host", lambda: user_host(host))
    assert cli.main(["setup"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("userblk setup: needs root: reserving hugepages, mounting hugetlbfs, "
                          "loading the driver module and binding NVMe devices")
    assert cli.main(["setup", "--dry-run"]) == 0          # the plan, as a user
    assert f"{A} (1b36 0010): would move nvme -> vfio-pci" in capsys.readouterr().out
    assert cli.main(["setup", "status"]) == 0             # status reads only
    assert machine.writes == []


# ---- hugepages --------------------------------------------------------------------------------
@pytest.mark.parametrize("mib,pages,expected", [(2048, None, 1024), (None, None, 1024),
                                                 (1, None, 1), (3, None, 2), (0, None, 0),
                                                 (None, 7, 7), (None, 0, 0)])
def test_hugepage_arithmetic(mib, pages, expected):
    assert setup.pages_for(mib, pages) == expected


@pytest.mark.parametrize("mib,pages,why", [(512, 256, "not both"), (-1, None, ">= 0"),
                                           (None, -2, ">= 0"), ("512", None, "MiB")])
def test_bad_hugepage_amounts_are_refused(mib, pages, why):
    with pytest.raises(InvalidArgument, match=why):
        setup.pages_for(mib, pages)


def test_setup_raises_the_pool_and_reports_what_the_kernel_gave(machine, host):
    report = setup.configure(host, hugemem_mib=1024)
    hp = report["hugepages"]
    assert (hp["before"], hp["requested"], hp["after"], hp["short"]) == (0, 512, 512, False)
    assert machine.pool == [256, 256]                      # the kernel spread them
    assert machine.writes[0] == (f"{HP}/nr_hugepages", "512")
    assert "hugepages: 0 -> 512 x 2 MiB (1024 MiB), 512 asked" in setup.format_report(report)


def test_setup_never_shrinks_the_pool(machine, host):
    machine.set_pool(200, 200, used=[50, 0])
    report = setup.configure(host, hugemem_mib=512)
    assert not report["hugepages"]["changed"] and machine.pool == [200, 200]
    assert not [w for w in machine.writes if "hugepages" in w[0]]
    assert "hugepages: 400 x 2 MiB already reserved (800 MiB), 256 asked: left as they are" in \
        setup.format_report(report)


def test_a_short_reservation_is_reported_with_a_hint(machine, host):
    machine.capacity = [100, 50]
    report = setup.configure(host, hugemem_mib=2048)
    hp = report["hugepages"]
    assert (hp["after"], hp["short"]) == (150, True)
    text = setup.format_report(report)
    assert "hugepages: 0 -> 150 x 2 MiB (300 MiB), 1024 asked; the kernel gave only 150" in text
    assert "note: the kernel gave 150 of 1024 2048 kB pages" in text
    assert report["ok"]          # a short pool is worth a note, not a failure


def test_pages_on_one_numa_node(machine, host):
    machine.set_pool(10, 10)
    report = setup.configure(host, hugepages=64, node=1)
    hp = report["hugepages"]
    assert (hp["node"], hp["before"], hp["after"], hp["total"]) == (1, 10, 64, 74)
    assert machine.pool == [10, 64]
    assert [w[0] for w in machine.writes] == [
        "devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"]
    assert "x 2 MiB on NUMA node 1" in setup.format_report(report)
    with pytest.raises(SetupError, match="NUMA node 5 offers no 2048 kB hugepages"):
        setup.configure(host, hugepages=64, node=5)


def test_a_kernel_without_hugepages_still_binds_for_vfio(tmp_path, mounts):
    fake = FakeMachine(tmp_path / "sys", hugepages=False)
    fake.add_driver("nvme", classes={NVME_CLASS})
    fake.add_driver("vfio-pci")
    make_nvme(fake, A, group=4)
    (tmp_path / "swaps").write_text("")
    host = Host(sysfs=fake, mounts=str(mounts.path), swaps=str(tmp_path / "swaps"),
                proc=str(tmp_path), state_file=str(tmp_path / "state.json"),
                hugetlbfs_dir=str(tmp_path / "hp"), euid=0, mount=mounts.mount)
    report = setup.configure(host)
    assert report["ok"] and fake.driver_of(A) == "vfio-pci"
    assert report["hugepages"] is None and mounts.calls == []
    assert "this kernel offers no 2048 kB hugepages" in report["notes"][0]


# ---- hugetlbfs --------------------------------------------------------------------------------
def test_hugetlbfs_is_mounted_once(host, mounts):
    report = setup.configure(host, hugepages=8)
    assert mounts.calls == [host.hugetlbfs_dir] and os.path.isdir(host.hugetlbfs_dir)
    assert report["hugetlbfs"] == {"mount": host.hugetlbfs_dir, "mounted_now": True}
    report = setup.configure(host, hugepages=8)
    assert mounts.calls == [host.hugetlbfs_dir]
    assert report["hugetlbfs"] == {"mount": host.hugetlbfs_dir, "mounted_now": False}


def test_an_existing_2m_hugetlbfs_is_used_and_other_ones_are_not(host, mounts, tmp_path):
    mounts.add(f"nodev {host.hugetlbfs_dir} hugetlbfs rw,pagesize=1024M 0 0")
    mounts.add(f"nodev {tmp_path}/ro hugetlbfs ro,pagesize=2M 0 0")
    report = setup.configure(host, hugepages=8)
    # /dev/hugepages holds 1 GiB pages (not covered up); the read-only 2 MiB one is no use
    assert mounts.calls == [host.hugetlbfs_dir + "-2M"]
    assert report["hugetlbfs"]["mount"] == host.hugetlbfs_dir + "-2M"
    mounts2 = tmp_path / "mounts2"
    mounts2.write_text(f"hugetlbfs {tmp_path}/mine hugetlbfs rw,relatime,pagesize=2M 0 0\n")
    host.mounts = str(mounts2)
    assert setup.ensure_hugetlbfs(host) == (f"{tmp_path}/mine", False)


def test_no_hugepages_no_mount(host, mounts):
    report = setup.configure(host, hugepages=0)
    assert report["hugetlbfs"]["mount"] is None and mounts.calls == []
    assert "hugetlbfs: not mounted (no hugepages reserved)" in setup.format_report(report)


# ---- reset ------------------------------------------------------------------------------------
def test_reset_gives_everything_back_and_forgets_it(machine, host, mounts):
    machine.add_driver("uio_pci_generic")
    make_nvme(machine, A, group=4)
    make_nvme(machine, B, group=5)
    make_nvme(machine, C, group=6, driver="uio_pci_generic")     # bound by hand: no record
    setup.configure(host, hugepages=32)
    assert [machine.driver_of(x) for x in (A, B, C)] == ["vfio-pci", "vfio-pci",
                                                         "uio_pci_generic"]
    report = setup.reset(host)

    assert report["ok"] and report["hugepages"] is None
    assert [machine.driver_of(x) for x in (A, B, C)] == ["nvme"] * 3
    assert all(machine.override_of(x) is None for x in (A, B, C))
    assert not os.path.exists(host.state_file)
    assert machine.pool == [16, 16]                          # untouched without --hugemem
    assert mounts.calls == [host.hugetlbfs_dir]              # and the mount stays
    text = setup.format_report(report)
    assert lines_for(text, A) == [f"{A} (1b36 0010): vfio-pci -> nvme"]
    assert lines_for(text, C) == [f"{C} (1b36 0010): uio_pci_generic -> nvme"]

    again = setup.reset(host)
    assert [d["reason"] for d in again["devices"]] == ["on nvme, not a user-space driver"] * 3


def test_reset_forgets_a_device_given_back_by_other_means(machine, host):
    make_nvme(machine, A, group=4)
    setup.configure(host, hugepages=2)
    PciDevice(A, machine).restore()
    assert set(state(host)) == {A}
    report = setup.reset(host)
    assert by_address(report)[A]["reason"] == "on nvme, not a user-space driver"
    assert not os.path.exists(host.state_file)


def test_reset_can_free_or_resize_the_hugepages(machine, host):
    machine.set_pool(100, 100, used=[10, 0])
    report = setup.reset(host, hugemem_mib=0)
    hp = report["hugepages"]
    assert (hp["before"], hp["after"], hp["short"], hp["in_use"]) == (200, 10, False, 10)
    assert machine.pool == [10, 0]
    assert ("hugepages: 200 -> 10 x 2 MiB (20 MiB), 0 asked; 10 still in use (freed when their "
            "users let go)") in setup.format_report(report)
    setup.reset(host, hugepages=40)
    assert sum(machine.pool) == 40


def test_reset_respects_allow_and_block(machine, host):
    for bdf, group in ((A, 4), (B, 5), (C, 6)):
        make_nvme(machine, bdf, group=group)
    setup.configure(host, hugepages=2)
    report = setup.reset(host, allow=[A, B], block=[B])
    assert [machine.driver_of(x) for x in (A, B, C)] == ["nvme", "vfio-pci", "vfio-pci"]
    assert [d["reason"] for d in report["devices"]] == [None, "in --block", "not in --allow"]
    assert set(state(host)) == {B, C}                        # still to be given back later


def test_reset_skips_a_device_a_process_holds(machine, host, tmp_path):
    make_nvme(machine, A, group=4)
    make_nvme(machine, B, group=5, driver=None)
    machine.add_driver("uio_pci_generic")
    setup.configure(host, hugepages=2)
    fd_dir = tmp_path / "proc" / "4242" / "fd"
    fd_dir.mkdir(parents=True)
    (tmp_path / "proc" / "4242" / "comm").write_text("spdk_tgt\n")
    os.symlink(f"{host.dev}/vfio/4", fd_dir / "7")
    # another process maps B's BAR through sysfs, the way the uio path does
    os.makedirs(tmp_path / "proc" / "77")
    real = os.path.realpath(machine.path(f"bus/pci/devices/{B}"))
    (tmp_path / "proc" / "77" / "maps").write_text(
        f"7f00000000-7f00004000 rw-s 00000000 00:15 123   {real}/resource0\n")

    report = setup.reset(host)
    devs = by_address(report)
    assert devs[A]["reason"].startswith("in use by pid 4242 (spdk_tgt): stop it first")
    assert devs[B]["reason"].startswith("in use by pid 77 (?)")
    assert machine.driver_of(A) == "vfio-pci" and machine.driver_of(B) == "vfio-pci"
    assert set(state(host)) == {A, B}


def test_reset_returns_a_device_setup_took_from_no_driver(machine, host):
    make_nvme(machine, A, group=4, driver=None)
    setup.configure(host, hugepages=2)
    assert state(host)[A]["original_driver"] is None
    report = setup.reset(host)
    # no driver to wait for: the kernel's choice, which for an NVMe function is nvme
    assert by_address(report)[A]["restore_to"] is None
    assert machine.driver_of(A) == "nvme"


def test_reset_loads_the_recorded_driver_when_it_was_unloaded(tmp_path, mounts):
    fake = FakeMachine(tmp_path / "sys")
    fake.add_driver("vfio-pci")
    fake.loadable["nvme"] = ("nvme", {"classes": {NVME_CLASS}})
    make_nvme(fake, A, group=4, driver="vfio-pci")
    fake.write(f"bus/pci/devices/{A}/driver_override", "vfio-pci")
    (tmp_path / "swaps").write_text("")
    (tmp_path / "proc").mkdir()
    host = Host(sysfs=fake, mounts=str(mounts.path), swaps=str(tmp_path / "swaps"),
                proc=str(tmp_path / "proc"), state_file=str(tmp_path / "state.json"), euid=0)
    setup.save_state(host, {A: {"original_driver": "nvme", "driver": "vfio-pci"}})
    report = setup.reset(host)
    assert report["ok"] and fake.modprobes == ["nvme"] and fake.driver_of(A) == "nvme"


def test_reset_dry_run(machine, host):
    make_nvme(machine, A, group=4)
    setup.configure(host, hugepages=2)
    before = list(machine.writes)
    report = setup.reset(user_host(host), hugemem_mib=0, dry_run=True)
    assert machine.writes == before and machine.driver_of(A) == "vfio-pci"
    assert setup.format_report(report).splitlines() == [
        "dry run: nothing is changed",
        f"{A} (1b36 0010): would move vfio-pci -> nvme",
        "hugepages: would set 2 -> 0 x 2 MiB (0 MiB)",
    ]


# ---- status -----------------------------------------------------------------------------------
def test_status_table(machine, host):
    make_nvme(machine, A, group=4, numa_node=0)
    machine.add_namespace(A, "nvme0", "nvme0n1")
    os.makedirs(machine.path(f"devices/pci0000:00/{A}/nvme/nvme0/nvme0n2"))
    make_nvme(machine, B, group=5, numa_node=1)
    setup.configure(host, hugepages=6, allow=[B])
    info = setup.status(host)
    text = setup.format_status(info)
    lines = text.splitlines()
    assert lines[:5] == ["Hugepages",
                         "node     hugesize     free / total   ",
                         "node0       2 MiB        3 / 3       ",
                         "node0       1 GiB        0 / 0       ",
                         "node1       2 MiB        3 / 3       "]
    assert f"hugetlbfs (2 MiB): {host.hugetlbfs_dir}" in lines
    row_a = next(line for line in lines if A in line).split()
    row_b = next(line for line in lines if B in line).split()
    assert row_a == ["NVMe", A, "1b36", "0010", "0", "nvme", "nvme0", "nvme0n1,nvme0n2"]
    assert row_b == ["NVMe", B, "1b36", "0010", "1", "vfio-pci", "(was", "nvme)", "vfio/5", "-"]
    assert info["nvme"][1]["original_driver"] == "nvme"


def test_status_without_nodes_shows_the_machine_pool(tmp_path, mounts):
    fake = FakeMachine(tmp_path / "sys", nodes=1)
    fake.set_pool(12)
    for n in fake.listdir("devices/system/node"):
        shutil.rmtree(fake.path(f"devices/system/node/{n}"))
    host = Host(sysfs=fake, mounts=str(mounts.path), state_file=str(tmp_path / "s.json"))
    rows = setup.status(host)["hugepages"]
    assert rows == [{"node": None, "page_kb": 2048, "total": 12, "free": 12},
                    {"node": None, "page_kb": 1048576, "total": 0, "free": 0}]
    assert "-           2 MiB       12 / 12      " in setup.format_status(setup.status(host))


# ---- the command ------------------------------------------------------------------------------
def test_cli_json_reports(machine, host, capsys, monkeypatch):
    monkeypatch.setattr(setup, "default_host", lambda: host)
    make_nvme(machine, A, group=4)
    assert cli.main(["setup", "--hugemem", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"][0]["action"] == "bind" and out["devices"][0]["driver_after"] == "vfio-pci"
    assert cli.main(["setup", "status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nvme"][0]["driver"] == "vfio-pci" and out["hugepages"][0]["total"] == 1
    assert cli.main(["setup", "reset", "--hugemem", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{A} (1b36 0010): vfio-pci -> nvme" in out and machine.pool == [0, 0]


@pytest.mark.parametrize("argv,words", [
    (["setup", "status", "--hugemem", "4"], "--hugemem does not apply to status"),
    (["setup", "reset", "--driver", "vfio-pci"], "--driver does not apply to reset"),
    (["setup", "reset", "--node", "0"], "--node does not apply to reset"),
])
def test_cli_options_that_do_not_apply_exit_2(argv, words, capsys, host, monkeypatch):
    monkeypatch.setattr(setup, "default_host", lambda: host)
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err
    assert host.sysfs.writes == []


def test_cli_names_every_option_that_does_not_apply(capsys):
    assert cli.main(["setup", "status", "--dry-run", "--block", A]) == 2
    assert "--block, --dry-run do not apply to status" in capsys.readouterr().err


def test_cli_hugemem_and_hugepages_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["setup", "--hugemem", "4", "--hugepages", "2"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
