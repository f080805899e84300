"""The guest image cache: find a built image, or build one, safely under concurrency.

Images live in ``~/.cache/userblk/guest/<key>/`` (``$USERBLK_GUEST_CACHE`` overrides the
directory), where ``<key>`` hashes the recipe (``build.py``, the init scripts and the build
knobs): a changed package list or init script gets a new image, never a stale one.

Why the care:

* Two pytest processes may want the image at the same moment. The build runs under an
  exclusive ``flock`` on ``<cache>/build.lock``; whoever waited re-checks the cache first.
* A build that died half way (Ctrl-C, kill -9, full disk) must not be mistaken for an image.
  Builds happen in ``<cache>/tmp-<key>-<pid>/`` and are renamed into place only when complete;
  ``manifest.json`` records every file's size, and an image whose files do not match it is
  rebuilt. Left-over temporary directories are removed by the next build (after unmounting
  whatever a killed build left mounted inside its chroot).

``python -m tests.guest.image`` builds (or checks) the image by hand.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests.guest import build as recipe

CACHE_ENV = "USERBLK_GUEST_CACHE"
KEEP_IMAGES = 3  # older images (other keys) are pruned after a build, by last use
LOCK_WAIT_S = 3600.0


class ImageUnavailable(RuntimeError):
    """No usable image and none can be built here; ``str()`` is the reason to show."""


@dataclass(frozen=True)
class GuestImage:
    path: Path
    key: str
    kernel_version: str

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs.ext4"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "userblk" / "guest"


def image_key() -> str:
    return recipe.recipe_digest()


def _load(path: Path, key: str) -> GuestImage | None:
    """The image at ``path`` if it is complete and matches its manifest, else None."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("key") != key:
            return None
        for name, size in manifest["files"].items():
            if (path / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return GuestImage(path, key, manifest.get("kernel", "?"))


def find_image(key: str | None = None) -> GuestImage | None:
    """The cached, complete image for the current recipe, or None. Never builds."""
    key = key or image_key()
    image = _load(cache_root() / key, key)
    if image is not None:
        try:  # last use, for pruning
            os.utime(image.path / "manifest.json")
        except OSError:
            pass
    return image


def ensure_image(build: bool = True, say: Callable[[str], None] | None = None) -> GuestImage:
    """The image for the current recipe, built first if missing and ``build`` allows it.

    Raises ImageUnavailable with the reason (not root, no debootstrap, build failed + log).
    """
    say = say or (lambda msg: print(f"[guest-image] {msg}", file=sys.stderr, flush=True))
    key = image_key()
    image = find_image(key)
    if image is not None:
        return image
    if not build:
        raise ImageUnavailable(f"the guest image {key} is not built ({cache_root()})")
    problem = recipe.build_problem()
    if problem:
        raise ImageUnavailable(problem)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "build.lock", say):
        image = find_image(key)  # somebody else built it while we waited
        if image is not None:
            return image
        _remove_stale(root, key)
        return _build_locked(root, key, say)


class _locked:
    def __init__(self, path: Path, say: Callable[[str], None]):
        self.path, self.say = path, say

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.say(f"waiting for another process that is building the guest image ({self.path})")
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(self.fd)
                        raise ImageUnavailable(f"gave up waiting for the build lock {self.path}")
                    time.sleep(1)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the flock


def _unmount_below(path: Path) -> None:
    """Unmount whatever a killed build left mounted in its chroot (deepest first)."""
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/mounts") as f:
            targets = [line.split()[1].replace("\\040", " ") for line in f]
    except OSError:
        return
    for target in sorted((t for t in targets if t.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], stderr=subprocess.DEVNULL)


def _rmtree(path: Path) -> None:
    _unmount_below(path)
    # --one-file-system: never follow into a mount that survived the unmount above
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], stderr=subprocess.DEVNULL)


def _remove_stale(root: Path, key: str) -> None:
    """Under the build lock, every tmp-* directory is a dead build's; an invalid <key> too."""
    for child in root.glob("tmp-*"):
        _rmtree(child)
    if (root / key).exists():
        _rmtree(root / key)


def _prune(root: Path, keep: str) -> None:
    images = [p for p in root.iterdir()
              if p.is_dir() and p.name != keep and (p / "manifest.json").exists()]
    images.sort(key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES - 1:]:
        _rmtree(old)


def _build_locked(root: Path, key: str, say: Callable[[str], None]) -> GuestImage:
    tmp = root / f"tmp-{key}-{os.getpid()}"
    logfile = root / f"build-{key}.log"
    logfile.write_text(f"userblk guest image {key}, built {time.ctime()}\n")
    say(f"building the guest image {key} in {root} (1-5 minutes; log: {logfile})")
    t0 = time.monotonic()
    tmp.mkdir()
    try:
        facts = recipe.build(tmp, logfile, say)
        files = {name: (tmp / name).stat().st_size for name in recipe.ARTIFACTS}
        manifest = {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": files, **facts}
        # Written last and renamed with the directory: a manifest means a complete image.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, root / key)
    except recipe.BuildError as e:
        raise ImageUnavailable(f"building the guest image failed: {e}") from None
    finally:
        if tmp.exists():
            _rmtree(tmp)
    say(f"guest image {key} built in {time.monotonic() - t0:.0f} s")
    try:
        _prune(root, key)
    except OSError:
        pass
    image = _load(root / key, key)
    assert image is not None
    return image


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.guest.image", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only say whether the image is built")
    ap.add_argument("--force", action="store_true", help="rebuild even if the image is cached")
    args = ap.parse_args(argv)
    key = image_key()
    if args.check:
        image = find_image(key)
        print(image.path if image else f"not built: {cache_root() / key}")
        return 0 if image else 1
    if args.force and (cache_root() / key).exists():
        root = cache_root()
        with _locked(root / "build.lock", print):
            _rmtree(root / key)
    try:
        image = ensure_image(build=True)
    except ImageUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{image.path} (kernel {image.kernel_version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
