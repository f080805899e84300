"""Fast host-side tests of the guest harness: no QEMU, no root, no image.

The apt-configuration forms the image build must cope with, GuestConfig validation, the image
cache's key/staleness/locking rules (with a fake build), and what ``--guest`` does when guests
cannot run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.guest import build as recipe
from tests.guest import image as image_mod
from tests.guest.runner import GuestConfig, Share, parse_size

REPO = Path(__file__).resolve().parents[2]


# ---- the host's apt configuration -> mirror ------------------------------------------------------

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""
NODESOURCE = """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"""


def _apt(tmp_path: Path, sources_list: str | None = None, **parts: str) -> Path:
    (tmp_path / "sources.list.d").mkdir(parents=True, exist_ok=True)
    if sources_list is not None:
        (tmp_path / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (tmp_path / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_mirror_from_deb822_only(tmp_path):
    apt = _apt(tmp_path, aaa_nodesource_sources=NODESOURCE, debian_sources=DEB822)
    assert recipe.host_mirror(apt) == "http://deb.debian.org/debian"


def test_mirror_from_sources_list_only(tmp_path):
    apt = _apt(tmp_path, "deb http://security.debian.org/debian-security bookworm-security main\n"
                         "deb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian/ "
                         "bookworm main contrib\n"
                         "deb-src http://ftp.de.debian.org/debian bookworm main\n")
    assert recipe.host_mirror(apt) == "http://ftp.de.debian.org/debian"


def test_mirror_skips_third_party_lists_and_disabled_stanzas(tmp_path):
    apt = _apt(tmp_path, None,
               google_list="deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
               off_sources="Types: deb\nURIs: http://old.example/debian\nSuites: bookworm\n"
                           "Components: main\nEnabled: no\n",
               x_sources=DEB822.replace("deb.debian.org", "mirror.example"))
    assert recipe.host_mirror(apt) == "http://mirror.example/debian"


def test_mirror_without_any_apt_configuration(tmp_path, monkeypatch):
    assert recipe.host_mirror(tmp_path / "missing") is None
    monkeypatch.setattr(recipe, "host_mirror", lambda: None)
    monkeypatch.delenv(recipe.MIRROR_ENV, raising=False)
    assert recipe.choose_mirror() == recipe.FALLBACK_MIRROR
    monkeypatch.setenv(recipe.MIRROR_ENV, "http://snapshot.example/debian/20250520T000000Z")
    assert recipe.choose_mirror() == "http://snapshot.example/debian/20250520T000000Z"


# ---- GuestConfig --------------------------------------------------------------------------------

def test_config_normalizes_and_hashes():
    a = GuestConfig(shares=["/tmp", "/srv:/mnt/srv"], env={"B": 2, "A": "x"}, nvme_size="64M")
    b = GuestConfig(shares=[Share("/tmp"), ("/srv", "/mnt/srv")], env=[("A", "x"), "B=2"],
                    nvme_size=64 << 20)
    assert a == b and hash(a) == hash(b)
    assert a.shares[0] == Share("/tmp", "/tmp", "loose")
    assert a.env == (("A", "x"), ("B", "2"))
    assert GuestConfig.from_json(a.to_json()) == a
    assert parse_size("1G") == 1 << 30 and parse_size("512k") == 512 << 10


@pytest.mark.parametrize("kwargs, message", [
    ({"nvme_backend": "nfs"}, "nvme_backend"),
    ({"null_latency_ns": 5}, "null_latency_ns needs nvme_backend='null'"),
    ({"iommu_aw": 40}, "iommu_aw must be 39 or 48"),
    ({"nvme_ctrls": 16}, "at most 15"),
    ({"nvme_size": "lots"}, "not a size"),
    ({"memory": "2 gigs"}, "memory"),
    ({"accel": "hvf"}, "accel"),
    ({"nvme_ns": -1}, "non-negative"),
    ({"colour": "red"}, "unknown GuestConfig field(s) colour; valid: shares, env"),
    ({"net": "bridge:br0"}, "net must be listen:PORT or connect:PORT"),
    ({"net": "listen:70000"}, "net must be listen:PORT or connect:PORT"),
    ({"peer": "tests/nvme/x.py"}, "peer must be a Python module name"),
])
def test_config_rejects_nonsense_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GuestConfig.from_kwargs(**kwargs)


def test_network_of_two_guests_in_the_qemu_command(tmp_path):
    from tests.guest.runner import NET_MACS, GuestRun

    class Image:
        kernel = initrd = rootfs = tmp_path / "x"

    cmds = {}
    for role in ("listen", "connect"):
        run = GuestRun(GuestConfig(net=f"{role}:4567", nvme_ctrls=0), ["true"], Image())
        run.rundir, run.console_path = tmp_path, tmp_path / "console"
        cmds[role] = run.qemu_command()
        i = cmds[role].index("-netdev")
        assert cmds[role][i + 1] == f"socket,id=net0,{role}=127.0.0.1:4567"
        assert cmds[role][i + 3] == f"virtio-net-pci,netdev=net0,mac={NET_MACS[role]}"
    assert NET_MACS["listen"] != NET_MACS["connect"]
    run = GuestRun(GuestConfig(nvme_ctrls=0), ["true"], Image())
    run.rundir, run.console_path = tmp_path, tmp_path / "console"
    assert "-netdev" not in run.qemu_command()
    assert "peer=" in GuestConfig(peer="tests.x").describe()


def test_listening_reads_proc_net_tcp():
    import socket
    from tests.guest.plugin import _listening
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not _listening(port)
        s.listen(1)
        assert _listening(port)


# ---- the image cache ----------------------------------------------------------------------------

def test_key_follows_init_scripts_packages_and_mirror_override(tmp_path, monkeypatch):
    monkeypatch.delenv(recipe.MIRROR_ENV, raising=False)
    monkeypatch.delenv(recipe.EXTRA_PACKAGES_ENV, raising=False)
    base = recipe.recipe_digest()
    assert recipe.recipe_digest() == base  # deterministic
    copies = []
    for script in recipe.INIT_SCRIPTS:
        copy = tmp_path / script.name
        copy.write_bytes(script.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(recipe, "INIT_SCRIPTS", tuple(copies))
    assert recipe.recipe_digest() == base  # same content, same key
    copies[0].write_text(copies[0].read_text() + "\n# changed\n")
    changed_init = recipe.recipe_digest()
    assert changed_init != base
    monkeypatch.setenv(recipe.EXTRA_PACKAGES_ENV, "htop")
    assert recipe.recipe_digest() != changed_init
    monkeypatch.setenv(recipe.MIRROR_ENV, "http://snapshot.example/debian")
    assert len({base, changed_init, recipe.recipe_digest()}) == 3


FAKE_BUILD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.guest import build as recipe, image
recipe.build_problem = lambda: None
image.image_key = lambda: "k1"
def fake_build(out, logfile, say):
    with open(os.path.join(os.environ["USERBLK_GUEST_CACHE"], "builds"), "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(0.3)  # long enough for the others to find the lock taken
    for name in recipe.ARTIFACTS:
        (out / name).write_bytes(b"x" * 100)
    return {{"kernel": "fake"}}
recipe.build = fake_build
print(image.ensure_image(say=lambda m: None).path)
"""


def _fake_ensure(cache: Path, n: int = 1) -> list[subprocess.Popen]:
    script = FAKE_BUILD.format(repo=str(REPO))
    env = dict(os.environ, USERBLK_GUEST_CACHE=str(cache))
    return [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(n)]


def test_concurrent_processes_build_the_image_once(tmp_path):
    procs = _fake_ensure(tmp_path, 3)
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o[0].strip() for o in outs} == {str(tmp_path / "k1")}
    assert len((tmp_path / "builds").read_text().split()) == 1
    manifest = json.loads((tmp_path / "k1" / "manifest.json").read_text())
    assert manifest["key"] == "k1" and manifest["files"]["rootfs.ext4"] == 100
    assert not list(tmp_path.glob("tmp-*"))


def test_partial_or_stale_images_are_rebuilt(tmp_path):
    (p,) = _fake_ensure(tmp_path)
    assert p.wait(60) == 0
    assert image_mod._load(tmp_path / "k1", "k1") is not None
    # a truncated file (disk full, a copy interrupted) no longer matches the manifest
    (tmp_path / "k1" / "rootfs.ext4").write_bytes(b"x" * 10)
    assert image_mod._load(tmp_path / "k1", "k1") is None
    # and a killed build's temporary directory is left behind
    (tmp_path / "tmp-k1-424242" / "rootfs").mkdir(parents=True)
    (p,) = _fake_ensure(tmp_path)
    assert p.wait(60) == 0
    assert len((tmp_path / "builds").read_text().split()) == 2
    assert image_mod._load(tmp_path / "k1", "k1") is not None
    assert not (tmp_path / "tmp-k1-424242").exists()


def test_missing_image_without_build_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(image_mod.CACHE_ENV, str(tmp_path))
    with pytest.raises(image_mod.ImageUnavailable, match="is not built"):
        image_mod.ensure_image(build=False)
    monkeypatch.setattr(recipe, "build_problem", lambda: "building the guest image needs root")
    with pytest.raises(image_mod.ImageUnavailable, match="needs root"):
        image_mod.ensure_image(build=True)


# ---- the plugin when guests cannot run ----------------------------------------------------------

MODULE = """
import pytest

@pytest.mark.guest(nvme_ns=2)
def test_in_guest():
    pass

@pytest.mark.guest(colour="red")
def test_bad_marker():
    pass

def test_on_the_host():
    pass
"""


def _pytest_without_qemu(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_mod.py").write_text(textwrap.dedent(MODULE))
    # a PATH without QEMU: only the interpreter's own directory
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=str(Path(sys.executable).parent))
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.guest.plugin",
                           "-p", "no:cacheprovider", "-rA", *args, "test_mod.py"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)


def test_auto_skips_with_the_reason(tmp_path):
    proc = _pytest_without_qemu(tmp_path, "--guest=auto")
    assert re.search(r"SKIPPED \[1\] test_mod.py:\d+: qemu-system-x86_64 is not installed: "
                     r"apt-get install qemu-system-x86\n", proc.stdout), proc.stdout
    assert "invalid @pytest.mark.guest: unknown GuestConfig field(s) colour" in proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout


def test_require_turns_the_skip_into_a_failure(tmp_path):
    proc = _pytest_without_qemu(tmp_path, "--guest=require")
    assert "qemu-system-x86_64 is not installed: apt-get install qemu-system-x86 " \
           "(--guest=require)" in proc.stdout, proc.stdout
    assert "2 failed, 1 passed" in proc.stdout


def test_off_skips_without_looking(tmp_path):
    proc = _pytest_without_qemu(tmp_path, "--guest=off")
    assert "guest tests are off (--guest=off)" in proc.stdout, proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout
