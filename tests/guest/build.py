"""The recipe of the guest image: what goes into it and how it is made.

This file, the two init scripts under ``init/`` and the few environment knobs below are the
*inputs* of the image: ``image.py`` hashes them into the cache key, so changing a package, a
build step or an init script builds a new image instead of silently reusing a stale one.
Keep code that does not change the image (caching, locking) out of this file.

The image is made of three files, booted by ``runner.py``:

``vmlinux``
    The Debian kernel, uncompressed ELF. QEMU boots it through its PVH entry point: no firmware
    real-mode loader and no in-guest decompression, which cost 2-4 s per boot under TCG.
``initrd.img``
    A busybox initramfs (``init/initramfs-init``) with just the modules needed to mount the root
    disk and run ``userblk-init``; about 2 s faster per boot than the distribution's.
``rootfs.ext4``
    debootstrap (minbase) + the packages below, with ``init/userblk-init`` as PID 1. The runner
    opens it with ``snapshot=on``, so it is never modified.

Needs root (debootstrap, chroot, mounts) and debootstrap + mkfs.ext4 on the host.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable

HERE = Path(__file__).resolve().parent
INIT_SCRIPTS = (HERE / "init" / "userblk-init", HERE / "init" / "initramfs-init")

SUITE = "bookworm"
ARCH = "amd64"
#: Where Debian lives when the host's apt configuration names no usable Debian archive.
FALLBACK_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "USERBLK_GUEST_MIRROR"
EXTRA_PACKAGES_ENV = "USERBLK_GUEST_EXTRA_PACKAGES"

# Installed with --no-install-recommends. linux-image-amd64 pulls in initramfs-tools (a hard
# dependency); its initrd is never generated (INITRD=No below) because the guest boots our own.
PACKAGES = (
    # kernel and module tools (no udev in the guest: tests modprobe vfio-pci themselves)
    "linux-image-amd64", "kmod", "busybox-static", "zstd",
    # the host venv runs in the guest; Cython extensions may be rebuilt there
    "python3", "python3-venv", "python3-dev", "gcc", "make", "libc6-dev",
    # shared libraries a pyenv-built CPython on the host may link, so that a venv made from it
    # also runs in the guest (ssl, ctypes, sqlite3, readline, bz2, lzma, zlib, curses, uuid, dbm)
    "libssl3", "libffi8", "libsqlite3-0", "libreadline8", "libbz2-1.0", "liblzma5", "zlib1g",
    "libncursesw6", "libuuid1", "libgdbm6",
    # tools the tests and their debugging use
    "pciutils", "fio", "nvme-cli", "procps", "util-linux", "e2fsprogs", "iproute2", "strace",
)

# Modules the mini initramfs loads (with their dependencies, in order): the root disk, and what
# userblk-init needs before the command (NVMe bound to the kernel driver, virtio-serial ports,
# fw_cfg for the command, 9p for the shares). nvme first: its controller reset runs in the
# background while the others load (measured: about -0.3 s to the command).
INITRD_MODULES = ("nvme", "virtio_pci", "virtio_blk", "ext4", "virtio_console", "qemu_fw_cfg",
                  "9pnet_virtio", "9p")

# Dropped from the root file system: a test guest reads no documentation, and QEMU emulates no
# sound, GPU, media, wireless or bluetooth hardware. About 200 MiB less to pack and to boot from.
TRIM_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
             "var/cache/apt", "var/lib/apt/lists")
TRIM_MODULE_DIRS = ("sound", "drivers/gpu", "drivers/media", "drivers/net/wireless",
                    "drivers/staging", "drivers/iio", "drivers/bluetooth", "drivers/infiniband",
                    "net/wireless", "net/mac80211", "net/bluetooth")

ARTIFACTS = ("vmlinux", "initrd.img", "rootfs.ext4")

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The image could not be built; the message says which step and where its log is."""


# ---- inputs -------------------------------------------------------------------------------------

def extra_packages() -> tuple[str, ...]:
    return tuple(os.environ.get(EXTRA_PACKAGES_ENV, "").split())


def recipe_digest() -> str:
    """Hash of everything that decides the image's content (the cache key)."""
    h = hashlib.sha256()
    for path in (Path(__file__).resolve(), *INIT_SCRIPTS):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    # The host's default mirror is transport only and stays out of the key; an explicit override
    # (e.g. a dated snapshot of the archive) is a different input and gets its own image.
    knobs = {"suite": SUITE, "arch": ARCH, "extra": extra_packages(),
             "mirror": os.environ.get(MIRROR_ENV, "")}
    h.update(json.dumps(knobs, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _parse_one_line_sources(text: str) -> Iterable[tuple[str, list[str], list[str]]]:
    """``deb [opts] URI SUITE COMP...`` lines -> (uri, suites, components)."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue  # deb-src, blank, comments
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=amd64 signed-by=...]
        fields = line.split()
        if len(fields) >= 3:
            yield fields[1], [fields[2]], fields[3:]


def _parse_deb822_sources(text: str) -> Iterable[tuple[str, list[str], list[str]]]:
    """deb822 ``.sources`` stanzas -> (uri, suites, components), one per URI."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:  # continuation line
                fields[key] += " " + line.strip()
                continue
            if ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


def host_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The first plain Debian archive for our suite in the host's apt configuration.

    Accepts every form: ``sources.list``, ``sources.list.d/*.list`` and deb822
    ``sources.list.d/*.sources``, any of them missing. Security archives and third-party
    repositories (nodesource, google, ...) are skipped: they never carry ``bookworm`` itself.
    """
    entries: list[tuple[str, list[str], list[str]]] = []
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        try:
            entries += _parse_one_line_sources(path.read_text(errors="replace"))
        except OSError:
            continue
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        try:
            entries += _parse_deb822_sources(path.read_text(errors="replace"))
        except OSError:
            continue
    for uri, suites, components in entries:
        if not re.match(r"^(https?|ftp|file):", uri) or "security" in uri:
            continue
        if SUITE in suites and "main" in components:
            return uri.rstrip("/")
    return None


def choose_mirror() -> str:
    return os.environ.get(MIRROR_ENV) or host_mirror() or FALLBACK_MIRROR


def build_problem() -> str | None:
    """Why this host cannot build the image, or None."""
    if os.geteuid() != 0:
        return "building the guest image needs root (debootstrap, chroot)"
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("chroot", "coreutils")):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            return f"building the guest image needs {tool}: apt-get install {package}"
    return None


# ---- the build ----------------------------------------------------------------------------------

class _Builder:
    def __init__(self, out: Path, logfile: Path, say: Log):
        self.out = out
        self.root = out / "rootfs"
        self.logfile = logfile
        self.say = say
        self.mounted: list[Path] = []

    def run(self, argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
        # debootstrap, chroot, mkfs.ext4 live in sbin, which a root shell's PATH may lack (su)
        env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        with open(self.logfile, "a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.run(argv, stdout=kw.pop("stdout", log), stderr=log,
                                  stdin=subprocess.DEVNULL, env=env, **kw)
        if proc.returncode != 0:
            tail = "".join(self.logfile.read_text(errors="replace").splitlines(True)[-25:])
            raise BuildError(f"{what} failed (exit {proc.returncode}); log: {self.logfile}\n{tail}")
        return proc

    def chroot(self, *argv: str, what: str, **kw) -> subprocess.CompletedProcess:
        env = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
               "DEBIAN_FRONTEND=noninteractive",
               # the kernel's postinst would otherwise build an initramfs-tools initrd we never boot
               "INITRD=No"]
        return self.run(["chroot", str(self.root), *env, *argv], what, **kw)

    def mount(self, fstype: str, target: Path) -> None:
        self.run(["mount", "-t", fstype, fstype, str(target)], f"mount {target}")
        self.mounted.append(target)

    def unmount_all(self) -> None:
        while self.mounted:
            subprocess.run(["umount", "-l", str(self.mounted.pop())], stderr=subprocess.DEVNULL)

    # -- steps --

    def debootstrap(self, mirror: str) -> None:
        self.say(f"debootstrap --variant=minbase {SUITE} from {mirror}")
        self.run(["debootstrap", "--variant=minbase", f"--arch={ARCH}", SUITE, str(self.root),
                  mirror], "debootstrap")

    def install_packages(self, mirror: str) -> None:
        packages = PACKAGES + extra_packages()
        self.say(f"apt-get install {len(packages)} packages and their dependencies")
        (self.root / "etc/apt/sources.list").write_text(
            f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n")
        policy = self.root / "usr/sbin/policy-rc.d"  # never start a daemon inside the chroot
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        self.mount("proc", self.root / "proc")
        self.mount("sysfs", self.root / "sys")
        self.chroot("apt-get", "update", what="apt-get update")
        self.chroot("apt-get", "install", "-y", "--no-install-recommends", *packages,
                    what="apt-get install")
        self.chroot("apt-get", "clean", what="apt-get clean")
        policy.unlink()

    def configure(self) -> str:
        root = self.root
        shutil.copy(INIT_SCRIPTS[0], root / "sbin/userblk-init")
        (root / "sbin/userblk-init").chmod(0o755)
        (root / "etc/hostname").write_text("userblk-guest\n")
        (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 userblk-guest\n")
        (root / "etc/fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n")
        for d in ("dev/hugepages", "run", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        versions = sorted((p.name for p in (root / "lib/modules").iterdir()),
                          key=lambda v: [(0, int(x), "") if x.isdigit() else (1, 0, x)
                                         for x in re.split(r"[.-]", v)])
        if not versions:
            raise BuildError("no kernel was installed in the root file system")
        kver = versions[-1]
        for d in TRIM_DIRS:
            _remove_contents(root / d)
        for d in TRIM_MODULE_DIRS:
            shutil.rmtree(root / "lib/modules" / kver / "kernel" / d, ignore_errors=True)
        self.chroot("depmod", "-a", kver, what="depmod")
        return kver

    def kernel(self, kver: str) -> None:
        vmlinuz = self.root / "boot" / f"vmlinuz-{kver}"
        config = (self.root / "boot" / f"config-{kver}").read_text(errors="replace")
        if "\nCONFIG_PVH=y" not in config:
            raise BuildError(f"kernel {kver} has no PVH entry point (CONFIG_PVH); "
                             "QEMU cannot boot its vmlinux directly")
        (self.out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))

    def initramfs(self, kver: str) -> None:
        self.say("mini initramfs")
        deps = self.chroot("modprobe", "--show-depends", "-S", kver, "-a", *INITRD_MODULES,
                           what="modprobe --show-depends", stdout=subprocess.PIPE, text=True)
        modules: list[str] = []
        for line in deps.stdout.splitlines():  # "insmod /lib/modules/.../x.ko" or "builtin x"
            fields = line.split()
            if fields[:1] == ["insmod"] and fields[1] not in modules:
                modules.append(fields[1])
        if not modules:
            raise BuildError("modprobe --show-depends listed no module for the initramfs")
        entries: list[tuple[str, int, bytes]] = [("bin", 0o40755, b""), ("dev", 0o40755, b""),
                                                  ("dev/console", 0o20600, b"")]
        entries.append(("bin/busybox", 0o100755, (self.root / "bin/busybox").read_bytes()))
        entries.append(("init", 0o100755, INIT_SCRIPTS[1].read_bytes()))
        listed = []
        for mod in modules:
            data = (self.root / mod.lstrip("/")).read_bytes()
            if mod.endswith(".xz"):  # busybox insmod cannot decompress: do it here
                data, mod = lzma.decompress(data), mod[:-3]
            elif mod.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc"], input=data, stdout=subprocess.PIPE,
                                      check=True).stdout
                mod = mod[:-4]
            parts = mod.lstrip("/").split("/")
            for i in range(1, len(parts)):
                entries.append(("/".join(parts[:i]), 0o40755, b""))
            entries.append((mod.lstrip("/"), 0o100644, data))
            listed.append(mod)
        entries.append(("modules.list", 0o100644, ("\n".join(listed) + "\n").encode()))
        (self.out / "initrd.img").write_bytes(newc_archive(entries))

    def ext4(self) -> None:
        used = _tree_size(self.root)
        size_mib = (int(used * 1.3) // 2**20 + 512 + 63) // 64 * 64  # 30% + 512 MiB headroom
        self.say(f"rootfs.ext4: {size_mib} MiB for {used // 2**20} MiB of files")
        self.run(["mkfs.ext4", "-q", "-F", "-L", "userblk-root", "-E", "root_owner=0:0",
                  "-d", str(self.root), str(self.out / "rootfs.ext4"), f"{size_mib}M"],
                 "mkfs.ext4")


def build(out: Path, logfile: Path, say: Log = print) -> dict:
    """Build the image into the empty directory ``out``; returns facts for the manifest."""
    t0 = time.monotonic()
    mirror = choose_mirror()
    b = _Builder(out, logfile, say)
    try:
        b.debootstrap(mirror)
        b.install_packages(mirror)
        b.unmount_all()
        kver = b.configure()
        b.kernel(kver)
        b.initramfs(kver)
        b.ext4()
    finally:
        b.unmount_all()
    # The tree is packed into rootfs.ext4; keeping it would double the cache's size.
    shutil.rmtree(b.root, ignore_errors=True)
    return {"kernel": kver, "mirror": mirror, "suite": SUITE,
            "packages": list(PACKAGES + extra_packages()),
            "build_seconds": round(time.monotonic() - t0, 1)}


# ---- helpers ------------------------------------------------------------------------------------

def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: find the compressed payload by its magic and inflate it.

    Tries every occurrence of each known magic, since the setup code can contain the same bytes.
    """
    def xz(b): return lzma.LZMADecompressor().decompress(b)
    def gz(b): return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)
    def zst(b): return subprocess.run(["zstd", "-dc"], input=b, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL).stdout
    for magic, inflate in ((b"\xfd7zXZ\x00", xz), (b"\x1f\x8b\x08", gz),
                           (b"\x28\xb5\x2f\xfd", zst)):
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = inflate(bzimage[start:])
            except (lzma.LZMAError, zlib.error, OSError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            start = bzimage.find(magic, start + 1)
    raise BuildError("no compressed ELF kernel found in the bzImage")


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's "newc" format: (path, mode, data) entries, no cpio tool.

    Character devices are written with major 5 minor 1 (/dev/console), so the kernel has a
    console before devtmpfs is mounted.
    """
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    seen = set()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        if name in seen:
            continue
        seen.add(name)
        is_chr = stat.S_ISCHR(mode)
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, 5 if is_chr else 0, 1 if is_chr else 0, len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += name.encode() + b"\0"
        pad4()
        out += data
        pad4()
    return bytes(out)


def _remove_contents(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
