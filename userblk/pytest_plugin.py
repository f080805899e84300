"""pytest plugin: fixtures for tests and pytest-benchmark suites on your own bdev stacks.

Installed with userblk (entry point `pytest11`), so any pytest run in that environment has it:

    pytest --bdev-config stack.json --bdev-name Nvme0n1 tests/

    def test_roundtrip(bdev_desc, io_channel, dma_buffer):
        buf = dma_buffer(4096)
        memoryview(buf)[:] = b"\\xab" * 4096
        bdev_desc.write_sync(io_channel, buf, 0)
        out = dma_buffer(4096)
        bdev_desc.read_sync(io_channel, out, 0)
        assert bytes(out) == bytes(buf)

Options (also as ini settings `bdev_config` / `bdev_name`; the command line wins):
  --bdev-config FILE   an SPDK JSON config (bdev subsystem) that builds the stack for the
                       session; without one, a 64 MiB malloc bdev is made (Malloc0, or the next
                       free MallocN)
  --bdev-name NAME     the bdev `bdev_desc` opens (default: the first bdev the stack created)

Fixtures:
  bdev_stack   (session) the list of bdevs the config (or the default) created; torn down
               (bdev.config.teardown) when the session ends
  bdev_desc    (function) a read-write Descriptor of --bdev-name, closed afterwards
  io_channel   (function) the calling thread's channel of bdev_desc, put afterwards
  dma_buffer   (function) a factory: dma_buffer(size, align=4096, zero=False) -> an
               env.memory.DmaBuffer; every buffer it made is freed afterwards
"""
import gc
import logging

import pytest

log = logging.getLogger("userblk.pytest_plugin")

DEFAULT_SIZE = 64 << 20


def pytest_addoption(parser):
    group = parser.getgroup("userblk", "userblk bdev fixtures")
    group.addoption("--bdev-config", metavar="FILE", default=None,
                    help="SPDK JSON config (bdev subsystem) building the bdev stack of the "
                    "bdev_stack fixture (default: a 64 MiB malloc bdev)")
    group.addoption("--bdev-name", metavar="NAME", default=None,
                    help="bdev that bdev_desc opens (default: the first one created)")
    parser.addini("bdev_config", "default of --bdev-config", default=None)
    parser.addini("bdev_name", "default of --bdev-name", default=None)


def _option(config, name):
    value = config.getoption(f"--{name.replace('_', '-')}")
    if value is None:
        value = config.getini(name) or None
    return value


def pytest_report_header(config):
    path = _option(config, "bdev_config")
    name = _option(config, "bdev_name")
    if path is None and name is None:
        return None
    return (f"userblk: bdev config {path or '(64 MiB malloc default)'}, "
            f"bdev {name or '(first created)'}")


@pytest.fixture(scope="session")
def bdev_stack(pytestconfig):
    """The bdevs of the session's stack (a list of bdev.Bdev), built once and torn down at the
    end of the session."""
    from bdev import config as bdev_config
    path = _option(pytestconfig, "bdev_config")
    if path is not None:
        path = _resolve(pytestconfig, path)
        try:
            created = bdev_config.load_config(path)
        except bdev_config.ConfigError as e:
            pytest.fail(f"--bdev-config: {e}", pytrace=False)
        if not created:
            pytest.fail(f"--bdev-config {path} creates no bdev", pytrace=False)
    else:
        from bdev import malloc
        from bdev.config import _free_name
        created = [malloc.create(_free_name("Malloc"), size=DEFAULT_SIZE)]
    try:
        yield created
    finally:
        bdev_config.teardown(created)


def _resolve(config, path):
    """A relative config path: from the current directory, else from pytest's rootdir."""
    import os
    if os.path.isabs(path) or os.path.exists(path):
        return path
    alt = config.rootpath / path
    return str(alt) if alt.exists() else path


@pytest.fixture
def bdev_desc(bdev_stack, pytestconfig):
    """A read-write Descriptor of --bdev-name (default: the stack's first bdev)."""
    import bdev
    name = _option(pytestconfig, "bdev_name")
    if name is None:
        target = bdev_stack[0]
    else:
        try:
            target = bdev.get_bdev(name)
        except bdev.BdevNotFound as e:
            pytest.fail(f"--bdev-name {name}: {e}", pytrace=False)
    desc = bdev.open_bdev(target, write=True)
    try:
        yield desc
    finally:
        desc.close()


@pytest.fixture
def io_channel(bdev_desc):
    """The calling thread's channel of bdev_desc (the test's thread), put afterwards."""
    ch = bdev_desc.get_io_channel()
    try:
        yield ch
    finally:
        ch.put()


@pytest.fixture
def dma_buffer():
    """A factory of DMA buffers: `dma_buffer(size, align=4096, zero=False)`; all freed after
    the test."""
    from env import memory
    made = []

    def make(size, align=4096, *, zero=False):
        buf = memory.allocate(size, align, zero=zero)
        made.append(buf)
        return buf

    yield make
    busy = []
    for buf in reversed(made):
        if buf.freed:
            continue
        try:
            buf.free()
        except Exception:
            busy.append(buf)
    if busy:
        gc.collect()                 # memoryviews the test left behind
        for buf in busy:
            try:
                buf.free()
            except Exception as e:
                log.warning("dma_buffer: %r not freed: %s", buf, e)
