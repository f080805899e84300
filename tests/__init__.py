"""userblk's test suite (a package, so that ``tests.guest`` is importable from the repo root)."""
