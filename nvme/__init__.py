"""nvme: a polled, user-space NVMe driver on the env layer (see DESIGN.md)."""
