"""NVMe bdev vs the raw driver in the guest (see benchmarks/nvme_vs_raw.py), on a sparse raw file:
the guest's standard NVMe device. The issue's target: the bdev within 10 % of the raw driver.
Figures: results/bdev_nvme_vs_raw.json."""
from benchmarks import nvme_vs_raw

globals().update(nvme_vs_raw.tests(backend="file", name="bdev_nvme_vs_raw"))
