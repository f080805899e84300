"""NVMe bdev vs the raw driver in the guest (see benchmarks/nvme_vs_raw.py), on QEMU's null-co
driver: a device that costs nothing on the host, where the bdev layer's own cost shows at its
largest. Figures: results/bdev_nvme_vs_raw_null.json."""
from benchmarks import nvme_vs_raw

globals().update(nvme_vs_raw.tests(backend="null", name="bdev_nvme_vs_raw_null"))
