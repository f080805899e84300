"""The QEMU guest harness: an emulated NVMe controller behind a vIOMMU, for tests that need one.

``runner`` boots a guest and runs one command in it; ``image`` builds and caches the guest image;
``plugin`` runs pytest modules marked ``@pytest.mark.guest(...)`` inside such a guest.
See README.md beside this file.
"""
