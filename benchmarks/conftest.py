"""Benchmarks share the guest harness with the tests (guest-marked benchmark modules boot QEMU)."""
pytest_plugins = ["tests.guest.plugin"]
