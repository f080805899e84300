"""userblk: the application level (the `userblk` command, JSON config, JSON-RPC)."""
__version__ = "0.1.0"
