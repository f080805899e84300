"""bdev: the generic block-device layer (see DESIGN.md)."""
