"""The userblk pytest plugin (entry point pytest11): options, fixtures, teardown - run in inner
pytest sessions with pytester, as a user's own test suite would use it."""
import json

import pytest

import bdev

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def no_bdev_left():
    before = {b.name for b in bdev.bdevs()}
    yield
    left = [b for b in bdev.bdevs() if b.name not in before]
    for b in left:
        b.unregister()
    assert not left, f"the inner session left {left} registered"


def config_file(pytester, *entries, name="stack.json"):
    p = pytester.path / name
    p.write_text(json.dumps({"subsystems": [{"subsystem": "bdev", "config": list(entries)}]}))
    return p


MALLOC = {"method": "bdev_malloc_create",
          "params": {"name": "PlugMalloc", "num_blocks": 2048, "block_size": 512}}
NULL = {"method": "bdev_null_create",
        "params": {"name": "PlugNull", "num_blocks": 4096, "block_size": 4096}}


def test_plugin_is_registered_by_its_entry_point():
    from importlib.metadata import entry_points
    eps = [ep for ep in entry_points(group="pytest11") if ep.name == "userblk"]
    assert [ep.value for ep in eps] == ["userblk.pytest_plugin"]


def test_default_stack_is_a_64_mib_malloc_bdev_and_the_fixtures_do_io(pytester):
    pytester.makepyfile("""
        import bdev

        def test_stack(bdev_stack):
            (b,) = bdev_stack
            assert b.module == "malloc" and b.size == 64 << 20
            assert b.name.startswith("Malloc")

        def test_roundtrip(bdev_desc, io_channel, dma_buffer, bdev_stack):
            assert bdev_desc.bdev is bdev_stack[0] and bdev_desc.writable
            buf = dma_buffer(8192)
            memoryview(buf)[:] = b"\\xab" * 8192
            bdev_desc.write_sync(io_channel, buf, 4096)
            out = dma_buffer(8192, zero=True)
            bdev_desc.read_sync(io_channel, out, 4096)
            assert bytes(out) == b"\\xab" * 8192

        def test_the_stack_lives_for_the_session(bdev_desc, io_channel, dma_buffer):
            out = dma_buffer(8192)
            bdev_desc.read_sync(io_channel, out, 4096)
            assert bytes(out) == b"\\xab" * 8192
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_config_and_bdev_name_options(pytester):
    cfg = config_file(pytester, MALLOC, NULL)
    pytester.makepyfile("""
        def test_stack(bdev_stack, bdev_desc, io_channel, dma_buffer):
            assert [b.name for b in bdev_stack] == ["PlugMalloc", "PlugNull"]
            assert bdev_desc.bdev.name == "PlugNull" and bdev_desc.bdev.block_size == 4096
            bdev_desc.write_sync(io_channel, dma_buffer(4096), 0)
    """)
    result = pytester.runpytest("--bdev-config", str(cfg), "--bdev-name", "PlugNull")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["userblk: bdev config *stack.json, bdev PlugNull"])


def test_ini_settings_and_a_path_relative_to_the_rootdir(pytester):
    config_file(pytester, MALLOC, NULL, name="ini_stack.json")
    pytester.makeini("""
        [pytest]
        bdev_config = ini_stack.json
    """)
    pytester.makepyfile("""
        def test_stack(bdev_desc):
            assert bdev_desc.bdev.name == "PlugMalloc"
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_the_stack_is_torn_down_when_the_session_ends(pytester):
    cfg = config_file(pytester, MALLOC)
    pytester.makepyfile("""
        import bdev
        def test_it(bdev_stack):
            assert "PlugMalloc" in [b.name for b in bdev.bdevs()]
    """)
    result = pytester.runpytest_inprocess("--bdev-config", str(cfg))
    result.assert_outcomes(passed=1)
    assert "PlugMalloc" not in [b.name for b in bdev.bdevs()]


def test_dma_buffers_are_freed_after_each_test(pytester):
    pytester.makepyfile("""
        made = []

        def test_make(dma_buffer):
            made.append(dma_buffer(4096))
            made.append(dma_buffer(1 << 20, 1 << 16))
            assert made[1].vaddr % (1 << 16) == 0
            assert not any(b.freed for b in made)

        def test_freed():
            assert len(made) == 2 and all(b.freed for b in made)
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)


def test_io_channel_is_put_after_the_test(pytester):
    pytester.makepyfile("""
        chans = []

        def test_use(io_channel):
            chans.append(io_channel)
            assert io_channel.refs == 1

        def test_released():
            assert chans[0].released
    """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=2)


def test_a_bad_bdev_name_is_a_clear_error(pytester):
    cfg = config_file(pytester, MALLOC)
    pytester.makepyfile("""
        def test_it(bdev_desc):
            pass
    """)
    result = pytester.runpytest("--bdev-config", str(cfg), "--bdev-name", "Nope")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--bdev-name Nope: no bdev named 'Nope' (registered: *"
                                 "PlugMalloc*"])


def test_a_bad_config_is_a_clear_error(pytester):
    cfg = config_file(pytester, {"method": "bdev_malloc_create",
                                 "params": {"name": "M", "num_blocks": 8}})
    pytester.makepyfile("""
        def test_it(bdev_stack):
            pass
    """)
    result = pytester.runpytest("--bdev-config", str(cfg))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--bdev-config: *stack.json: entry 0 (bdev_malloc_create "
                                 "'M'): missing parameter block_size*"])


def test_a_pytest_benchmark_suite_on_the_fixtures(pytester):
    pytest.importorskip("pytest_benchmark")
    pytester.makepyfile("""
        def test_read_4k(benchmark, bdev_desc, io_channel, dma_buffer):
            buf = dma_buffer(4096)
            benchmark(bdev_desc.read_sync, io_channel, buf, 0)
    """)
    result = pytester.runpytest("--benchmark-disable")
    result.assert_outcomes(passed=1)


def test_options_are_listed_in_help(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*userblk bdev fixtures*", "*--bdev-config=FILE*",
                                 "*--bdev-name=NAME*"])
