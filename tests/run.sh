#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine or a developer's:
#   bash tests/run.sh [extra pytest arguments]
# 1. installs the Debian packages the tests need when they are missing (root only; without root
#    the tests that need them skip and say why): QEMU and debootstrap for the guest tests (a QEMU
#    guest with an emulated NVMe controller), fio for the kernel baselines;
# 2. installs the project with its test extras into .venv (made from python3 when missing);
# 3. runs pytest on tests/ (guest tests included), then every benchmark once as a smoke test.
# CI (CI=true) requires the guest tests to run: a guest test that cannot run fails instead of
# skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || pkgs+=("$2"); }
need qemu-system-x86_64 qemu-system-x86
need qemu-img qemu-utils
need debootstrap debootstrap
need mkfs.ext4 e2fsprogs
need fio fio
need gcc gcc
PY="${PYTHON:-python3}"
"$PY" -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
"$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || pkgs+=(python3-dev)
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing ${pkgs[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  else
    echo "tests/run.sh: missing ${pkgs[*]} (not root: the tests that need them will skip)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

guest=auto
[ "${CI:-}" = true ] && guest=require
.venv/bin/python -m pytest -q --guest="$guest" tests "$@"
USERBLK_BENCH_SECONDS=1 .venv/bin/python -m pytest -q --guest="$guest" --benchmark-disable benchmarks
