"""Build every Cython module of the layered packages.

Each `.pyx` under env/, nvme/, bdev/, blob/ and userblk/ becomes an extension named after its path
(env/memory.pyx -> env.memory). Modules cimport across packages by those names, so the repository
root is the Cython include path. No -march=native: the extensions must also load inside the QEMU
test guest, whose emulated CPU lacks some of the host's instruction sets.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

PACKAGES = ("env", "nvme", "bdev", "blob", "userblk")
HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    sources = sorted(p for pkg in PACKAGES for p in glob.glob(f"{pkg}/**/*.pyx", recursive=True))
    return [
        Extension(
            os.path.splitext(src)[0].replace(os.sep, "."),
            [src],
            extra_compile_args=["-O3", "-Wno-unused-function", "-Wno-unreachable-code"],
        )
        for src in sources
    ]


setup(
    ext_modules=cythonize(
        extensions(),
        include_path=[HERE],
        nthreads=os.cpu_count() or 1,
        # Hot modules turn off bounds checks and wraparound per function or per file, where the
        # code is written for it; Python-level code keeps Python semantics.
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
