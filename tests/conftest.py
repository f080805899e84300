"""Suite-wide pytest configuration.

The QEMU guest harness lives in tests/guest/plugin.py: ``@pytest.mark.guest(...)`` runs a module's
tests inside a guest with emulated NVMe controllers, ``--guest=auto|require|off`` decides what
happens where that cannot be done. See tests/guest/README.md.
"""
pytest_plugins = ["tests.guest.plugin"]
