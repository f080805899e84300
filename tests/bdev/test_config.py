"""bdev.config: SPDK-format JSON configs build stacks, save_config gives the live stack back."""
import json
import uuid

import pytest

import bdev
from bdev import config, malloc, null
from bdev import PyBdev
from bdev.config import ConfigError


class PyRam(PyBdev):
    """A Python bdev with no config entry (as test bdevs are)."""

    def __init__(self, name, num_blocks=8, block_size=512):
        super().__init__(name, block_size=block_size, num_blocks=num_blocks, module="pyram",
                         io_types=("read", "write"))

    def submit(self, io):
        io.complete("success")


def doc(*entries):
    return {"subsystems": [{"subsystem": "bdev", "config": list(entries)}]}


def entry(method, **params):
    return {"method": method, "params": params} if params else {"method": method}


@pytest.fixture(autouse=True)
def clean_registry():
    before = {b.name for b in bdev.bdevs()}
    yield
    leftover = [b for b in bdev.bdevs() if b.name not in before]
    for b in leftover:
        b.unregister()
    assert not leftover, f"the test left {leftover} registered"


def names():
    return [b.name for b in bdev.bdevs()]


def roundtrip_data(b, nbytes=4096):
    d = bdev.open_bdev(b.name, write=True)
    ch = d.get_io_channel()
    try:
        d.write_sync(ch, b"\x5a" * nbytes, 0)
        out = bytearray(nbytes)
        d.read_sync(ch, out, 0)
        return bytes(out)
    finally:
        ch.put()
        d.close()


# ---- loading ---------------------------------------------------------------------------------
def test_load_malloc_and_null_in_order():
    u = str(uuid.uuid4())
    created = config.load_config(doc(
        entry("bdev_malloc_create", name="Malloc0", num_blocks=2048, block_size=512, uuid=u),
        entry("bdev_null_create", name="Null0", num_blocks=4096, block_size=4096, md_size=0),
        entry("bdev_wait_for_examine")))
    try:
        assert [b.name for b in created] == ["Malloc0", "Null0"]
        m, n = created
        assert (m.module, m.num_blocks, m.block_size, str(m.uuid)) == ("malloc", 2048, 512, u)
        assert (n.module, n.num_blocks, n.block_size) == ("null", 4096, 4096)
        assert roundtrip_data(m) == b"\x5a" * 4096
    finally:
        config.teardown(created)
    assert "Malloc0" not in names() and "Null0" not in names()


def test_load_from_a_file_and_from_json_text(tmp_path):
    d = doc(entry("bdev_malloc_create", name="FileM", num_blocks=64, block_size=512))
    p = tmp_path / "stack.json"
    p.write_text(json.dumps(d))
    created = config.load_config(p)              # a PathLike
    assert [b.name for b in created] == ["FileM"]
    config.teardown(created)
    created = config.load_config(str(p))         # a path string
    assert [b.name for b in created] == ["FileM"]
    config.teardown(created)
    created = config.load_config(json.dumps(d))  # JSON text
    assert [b.name for b in created] == ["FileM"]
    config.teardown(created)


def test_malloc_without_a_name_gets_the_next_free_one():
    first = malloc.create("Malloc0", num_blocks=8)
    try:
        created = config.load_config(doc(
            entry("bdev_malloc_create", num_blocks=8, block_size=512),
            entry("bdev_malloc_create", name="", num_blocks=8, block_size=512)))
        assert [b.name for b in created] == ["Malloc1", "Malloc2"]
        config.teardown(created)
    finally:
        first.unregister()


def test_a_config_as_spdk_saves_it_loads():
    """What SPDK's save_config writes: other subsystems, the option entries, malloc and null
    parameters at their defaults (md_size 0, dif_type 0, physical_block_size ...)."""
    spdk = {"subsystems": [
        {"subsystem": "keyring", "config": []},
        {"subsystem": "iobuf", "config": [
            {"method": "iobuf_set_options",
             "params": {"small_pool_count": 8192, "large_pool_count": 1024}}]},
        {"subsystem": "sock", "config": [{"method": "sock_set_default_impl",
                                          "params": {"impl_name": "posix"}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options",
             "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256,
                        "bdev_auto_examine": True, "iobuf_small_cache_size": 128,
                        "iobuf_large_cache_size": 16}},
            {"method": "bdev_raid_set_options",
             "params": {"process_window_size_kb": 1024, "process_max_bandwidth_mb_sec": 0}},
            {"method": "bdev_iscsi_set_options", "params": {"timeout_sec": 30}},
            {"method": "bdev_nvme_set_options",
             "params": {"action_on_timeout": "none", "timeout_us": 0,
                        "bdev_retry_count": 3, "transport_retry_count": 4}},
            {"method": "bdev_nvme_set_hotplug",
             "params": {"period_us": 100000, "enable": False}},
            {"method": "bdev_malloc_create",
             "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512,
                        "physical_block_size": 512,
                        "uuid": "7d4b3b6e-8f0a-4d43-9a55-5a7b2e0c3f11",
                        "optimal_io_boundary": 0, "md_size": 0, "dif_type": 0,
                        "dif_is_head_of_md": False, "dif_pi_format": 0}},
            {"method": "bdev_null_create",
             "params": {"name": "Null0", "num_blocks": 262144, "block_size": 512,
                        "physical_block_size": 512, "md_size": 0, "dif_type": 0,
                        "dif_is_head_of_md": False, "dif_pi_format": 0,
                        "uuid": "2a6f7b43-34a1-4f1f-8d3b-9c5b1c2e7a90"}},
            {"method": "bdev_wait_for_examine"}]}]}
    created = config.load_config(spdk)
    try:
        assert [(b.name, b.num_blocks, str(b.uuid)) for b in created] == [
            ("Malloc0", 131072, "7d4b3b6e-8f0a-4d43-9a55-5a7b2e0c3f11"),
            ("Null0", 262144, "2a6f7b43-34a1-4f1f-8d3b-9c5b1c2e7a90")]
    finally:
        config.teardown(created)


def test_a_lone_bdev_subsystem_object_is_accepted():
    created = config.load_config({"subsystem": "bdev", "config": [
        entry("bdev_null_create", name="LoneNull", num_blocks=8, block_size=512)]})
    assert [b.name for b in created] == ["LoneNull"]
    config.teardown(created)


def test_bdev_enable_histogram_is_applied():
    created = config.load_config(doc(
        entry("bdev_malloc_create", name="HistM", num_blocks=64, block_size=512),
        entry("bdev_enable_histogram", name="HistM", enable=True)))
    try:
        roundtrip_data(created[0])
        assert created[0].histogram().count == 2
    finally:
        config.teardown(created)


# ---- saving ----------------------------------------------------------------------------------
def test_save_gives_spdk_format_and_save_load_recreates_the_stack():
    m = malloc.create("SaveM", num_blocks=1024, block_size=4096)
    n = null.create("SaveN", num_blocks=512, block_size=512)
    saved = config.save_config()
    json.dumps(saved)                                   # JSON as it is
    (sub,) = saved["subsystems"]
    assert sub["subsystem"] == "bdev"
    methods = [e["method"] for e in sub["config"]]
    assert methods[-1] == "bdev_wait_for_examine"
    mine = {e["params"]["name"]: e for e in sub["config"] if "params" in e}
    assert mine["SaveM"] == {"method": "bdev_malloc_create",
                             "params": {"name": "SaveM", "num_blocks": 1024, "block_size": 4096,
                                        "uuid": str(m.uuid)}}
    assert mine["SaveN"]["method"] == "bdev_null_create"
    facts = {b.name: (b.module, b.num_blocks, b.block_size, str(b.uuid)) for b in (m, n)}
    config.teardown([m, n])
    assert "SaveM" not in names()
    again = config.load_config(saved)
    try:
        got = {b.name: (b.module, b.num_blocks, b.block_size, str(b.uuid)) for b in again}
        assert {k: got[k] for k in facts} == facts
        assert config.save_config() == saved            # and saving once more is stable
    finally:
        config.teardown(again)


def test_save_of_chosen_bdevs_and_bdevs_without_an_entry_are_left_out():
    m = malloc.create("OnlyM", num_blocks=8)
    n = null.create("NotM", num_blocks=8)
    r = PyRam("PyOnly").register()
    try:
        saved = config.save_config([m, r])
        entries = saved["subsystems"][0]["config"]
        assert [e["params"]["name"] for e in entries[:-1]] == ["OnlyM"]
    finally:
        config.teardown([m, n])
        r.unregister()


def test_save_orders_bases_before_the_bdevs_built_on_them():
    """A (future) virtual bdev names its base in params: its entry comes after the base's,
    whatever the names' order."""
    class Virtual(PyRam):
        def config_json(self):
            return {"method": "bdev_passthru_create",
                    "params": {"name": self.name, "base_bdev_name": "ZBase"}}

    base = malloc.create("ZBase", num_blocks=8)
    v = Virtual("AVirtual").register()
    try:
        entries = config.save_config([v, base])["subsystems"][0]["config"]
        assert [e["params"]["name"] for e in entries[:-1]] == ["ZBase", "AVirtual"]
    finally:
        v.unregister()
        config.teardown([base])


# ---- errors ----------------------------------------------------------------------------------
def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError) as ei:
        config.load_config(doc(entry("bdev_lvol_create", name="x")))
    msg = str(ei.value)
    assert "entry 0 (bdev_lvol_create 'x')" in msg and "unknown method" in msg
    for known in ("bdev_malloc_create", "bdev_null_create", "bdev_nvme_attach_controller",
                  "bdev_aio_create", "bdev_set_options", "bdev_wait_for_examine"):
        assert known in msg
    assert ei.value.entry == 0 and ei.value.method == "bdev_lvol_create"


def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(ConfigError) as ei:
        config.load_config(doc(entry("bdev_malloc_create", name="M", num_blocks=8,
                                     block_size=512, size_mb=4)))
    msg = str(ei.value)
    assert "unknown parameter size_mb" in msg
    assert "block_size, " in msg and "num_blocks" in msg and "uuid" in msg


def test_a_setting_the_module_lacks_is_refused_not_dropped():
    with pytest.raises(ConfigError, match=r"md_size=8 is not supported by bdev.malloc"):
        config.load_config(doc(entry("bdev_malloc_create", name="M", num_blocks=8,
                                     block_size=512, md_size=8)))
    with pytest.raises(ConfigError, match=r"dif_type=1"):
        config.load_config(doc(entry("bdev_null_create", name="N", num_blocks=8,
                                     block_size=512, dif_type=1)))


def test_missing_parameters_are_named():
    with pytest.raises(ConfigError, match=r"entry 0 \(bdev_null_create\): missing parameter name"):
        config.load_config(doc(entry("bdev_null_create", num_blocks=8, block_size=512)))
    with pytest.raises(ConfigError, match=r"missing parameters num_blocks, block_size"):
        config.load_config(doc(entry("bdev_malloc_create", name="M")))


def test_a_failing_entry_tears_down_what_came_before_and_is_named():
    with pytest.raises(ConfigError) as ei:
        config.load_config(doc(
            entry("bdev_malloc_create", name="Before0", num_blocks=8, block_size=512),
            entry("bdev_null_create", name="Before1", num_blocks=8, block_size=512),
            entry("bdev_malloc_create", name="Bad", num_blocks=8, block_size=500)))
    msg = str(ei.value)
    assert "entry 2 (bdev_malloc_create 'Bad') failed" in msg and "block size" in msg
    assert ei.value.entry == 2
    assert not {"Before0", "Before1", "Bad"} & set(names())


def test_a_name_taken_twice_fails_on_the_second_entry():
    with pytest.raises(ConfigError) as ei:
        config.load_config(doc(
            entry("bdev_malloc_create", name="Twice", num_blocks=8, block_size=512),
            entry("bdev_null_create", name="Twice", num_blocks=8, block_size=512)))
    assert "entry 1 (bdev_null_create 'Twice') failed: BdevExists" in str(ei.value)
    assert isinstance(ei.value.__cause__, bdev.BdevExists)
    assert "Twice" not in names()


@pytest.mark.parametrize("bad, words", [
    ({"foo": 1}, "\"subsystems\" list"),
    ({"subsystems": {}}, "\"subsystems\" list"),
    ({"subsystems": [{"config": []}]}, "subsystems[0]"),
    ({"subsystems": [{"subsystem": "bdev", "config": {}}]}, "not a list"),
    (doc("bdev_malloc_create"), "entry 0 is not an object"),
    (doc({"method": "bdev_malloc_create", "params": [1]}), "\"params\" is not an object"),
    (doc({"method": "bdev_wait_for_examine", "parms": {}}), "unexpected key parms"),
    (doc(entry("bdev_enable_histogram", enable=True)), "takes name and enable"),
])
def test_malformed_documents(bad, words):
    with pytest.raises(ConfigError) as ei:
        config.load_config(bad)
    assert words in str(ei.value)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"cannot read the JSON config .*nope.json"):
        config.load_config(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"subsystems": [\n  {"subsystem": "bdev",,}\n]}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 2"):
        config.load_config(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc(entry("bdev_foo_create"))))
    with pytest.raises(ConfigError, match=r"bad.json: entry 0 \(bdev_foo_create\)"):
        config.load_config(bad)
    with pytest.raises(ConfigError, match="not int"):
        config.load_config(42)


def test_teardown_skips_removed_bdevs_and_removes_the_rest():
    created = config.load_config(doc(
        entry("bdev_malloc_create", name="TdA", num_blocks=8, block_size=512),
        entry("bdev_null_create", name="TdB", num_blocks=8, block_size=512)))
    created[0].unregister()
    config.teardown(created)
    assert created[1].removed and "TdB" not in names()


# ---- other modules: only where they exist ----------------------------------------------------
def _module(name):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.skip(reason=f"{name} is not available yet ({e})")


def test_nvme_emulated_controller_save_teardown_load():
    bdev_nvme = _module("bdev.nvme")
    from nvme.emu import EmulatedController
    from nvme.emu.storage import EmuNamespace
    emu = EmulatedController([EmuNamespace(2048), EmuNamespace(1024, block_size=4096)],
                             name="cfgemu")
    created_names = bdev_nvme.attach_emulated("CfgNvme", emu)
    assert created_names == ["CfgNvmen1", "CfgNvmen2"]
    try:
        saved = config.save_config([bdev.get_bdev(n) for n in created_names])
        entries = saved["subsystems"][0]["config"]
        # one controller entry for its two namespaces
        assert [e["method"] for e in entries] == ["bdev_nvme_attach_controller",
                                                  "bdev_wait_for_examine"]
        assert entries[0]["params"]["name"] == "CfgNvme"
        config.teardown([bdev.get_bdev(n) for n in created_names])
        assert not set(created_names) & set(names())
        again = config.load_config(saved)
        assert [b.name for b in again] == created_names
        assert [(b.num_blocks, b.block_size) for b in again] == [(2048, 512), (1024, 4096)]
        assert roundtrip_data(again[1]) == b"\x5a" * 4096
        config.teardown(again)
        assert not set(created_names) & set(names())
    finally:
        for n in created_names:
            if n in names():
                bdev_nvme.detach_controller("CfgNvme")
                break


def test_nvme_attach_of_an_unknown_controller_is_a_named_failure():
    _module("bdev.nvme")
    with pytest.raises(ConfigError) as ei:
        config.load_config(doc(
            entry("bdev_malloc_create", name="NvBefore", num_blocks=8, block_size=512),
            entry("bdev_nvme_attach_controller", name="Ghost", trtype="emulated",
                  traddr="no-such-emulator")))
    assert "entry 1 (bdev_nvme_attach_controller 'Ghost') failed" in str(ei.value)
    assert "NvBefore" not in names()


def test_nvme_unsupported_settings_are_refused():
    _module("bdev.nvme")
    with pytest.raises(ConfigError, match=r"prchk_reftag=True is not supported"):
        config.load_config(doc(entry("bdev_nvme_attach_controller", name="N", trtype="PCIe",
                                     traddr="0000:00:04.0", prchk_reftag=True)))


def test_aio_save_teardown_load(tmp_path):
    _module("bdev.aio")
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(1 << 20))
    created = config.load_config(doc(entry("bdev_aio_create", name="CfgAio", filename=str(f),
                                           block_size=4096, readonly=False)))
    try:
        (b,) = created
        assert (b.module, b.block_size, b.num_blocks) == ("aio", 4096, 256)
        assert roundtrip_data(b) == b"\x5a" * 4096
        saved = config.save_config(created)
        assert saved["subsystems"][0]["config"][0]["method"] == "bdev_aio_create"
    finally:
        config.teardown(created)
    again = config.load_config(saved)
    try:
        assert [(b.name, b.block_size, b.num_blocks) for b in again] == [("CfgAio", 4096, 256)]
        assert roundtrip_data(again[0]) == b"\x5a" * 4096
    finally:
        config.teardown(again)
