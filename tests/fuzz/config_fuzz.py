"""Fuzz bdev.config.load_config with random and mutated SPDK-style JSON configs.

Each example starts from a valid config (malloc, null and aio bdevs on a temporary file, and
the methods SPDK writes around them), applies a few mutations (a value replaced by any JSON
value, a key deleted or added, an entry duplicated or dropped, the text cut short or a character
changed), and hands it to `load_config` as a dict, a JSON text or a file. Some examples are not
configs at all (other types, a JSON list, deep nesting, bytes that are not UTF-8).

Invariants: load_config either builds the stack (which is then torn down) or raises
`bdev.config.ConfigError`, nothing else; a failed load leaves no bdev registered. Run by
`python -m tests.fuzz.runner config` (test_bdev_fuzz.py runs it in a child process)."""
import copy
import json
import os
import tempfile

from hypothesis import given
from hypothesis import strategies as st

import bdev
from bdev.config import ConfigError, load_config, teardown
from tests.fuzz.known_bugs import present

SIZE = 64 * 512

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
              st.sampled_from(["", "FzCfgM0", "malloc", "bdev_malloc_create", "512", "-1",
                               "0x200", "/nonexistent/file"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)

MUTATIONS = st.lists(st.tuples(st.sampled_from(["replace", "delete", "add_key", "duplicate",
                                                 "drop_entry"]),
                               st.integers(0, 10**6), JSON_VALUES, st.text(max_size=8)),
                     min_size=0, max_size=3)

SHAPES = st.sampled_from(["dict", "dict", "text", "file", "file_cut", "text_flip"])

NOT_CONFIGS = st.sampled_from(["[1]", "[", "{", "", "null", "5", "{\"subsystems\": 5}",
                               "deep", "not_utf8", "list", "int", "none", "bytes"])


def seed_config(path):
    return {"subsystems": [
        {"subsystem": "accel", "config": [{"method": "accel_set_options", "params": {}}]},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535}},
            {"method": "bdev_malloc_create",
             "params": {"name": "FzCfgM0", "num_blocks": 64, "block_size": 512}},
            {"method": "bdev_null_create",
             "params": {"name": "FzCfgN0", "num_blocks": 64, "block_size": 4096}},
            {"method": "bdev_aio_create",
             "params": {"name": "FzCfgA0", "filename": path, "block_size": 512}},
            {"method": "bdev_enable_histogram", "params": {"name": "FzCfgM0", "enable": True}},
            {"method": "bdev_wait_for_examine"}]}]}


def _paths(doc, prefix=()):
    """Every (container, key) in the document, depth first."""
    out = []
    if isinstance(doc, dict):
        for k in list(doc):
            out.append((doc, k))
            out.extend(_paths(doc[k]))
    elif isinstance(doc, list):
        for i in range(len(doc)):
            out.append((doc, i))
            out.extend(_paths(doc[i]))
    return out


def mutate(doc, mutations):
    doc = copy.deepcopy(doc)
    for action, pick, value, key in mutations:
        paths = _paths(doc)
        if not paths:
            break
        container, k = paths[pick % len(paths)]
        if action == "replace":
            container[k] = value
        elif action == "delete" or action == "drop_entry":
            del container[k]
        elif action == "add_key" and isinstance(container[k], dict):
            container[k][key] = value
        elif action == "duplicate" and isinstance(container, list):
            container.insert(k, copy.deepcopy(container[k]))
    return doc


class Leftovers(AssertionError):
    pass


def _registered():
    return {b.name for b in bdev.bdevs()}


def check_load(source):
    """load_config(source): a stack (torn down here) or a ConfigError; nothing else."""
    before = _registered()
    try:
        created = load_config(source)
    except ConfigError:
        left = _registered() - before
        if left:
            raise Leftovers(f"a failed load_config left {sorted(left)} registered") from None
        return "refused"
    except Exception as e:
        if isinstance(e, tolerated()):
            return "tolerated"
        raise AssertionError(f"load_config raised {type(e).__module__}.{type(e).__name__}: "
                             f"{str(e)[:300]}, not a ConfigError") from e
    teardown(created)
    left = _registered() - before
    if left:
        raise Leftovers(f"teardown of a loaded config left {sorted(left)} registered")
    return "loaded"


def tolerated():
    out = []
    if present("config_raw_errors"):
        out.extend((UnicodeDecodeError, RecursionError, TypeError))
    return tuple(out)


def make_fuzz_test(settings_obj, stats):
    tmp = tempfile.mkdtemp(prefix="userblk-cfgfuzz-", dir="/var/tmp")
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    seed = seed_config(disk)
    textfile = os.path.join(tmp, "config.json")

    @settings_obj
    @given(mutations=MUTATIONS, shape=SHAPES, cut=st.integers(0, 2000),
           other=st.one_of(st.none(), st.none(), st.none(), NOT_CONFIGS))
    def fuzz_config(mutations, shape, cut, other):
        if other is not None:
            source = not_a_config(other, textfile)
        else:
            doc = mutate(seed, mutations)
            if shape == "dict":
                source = doc
            else:
                text = json.dumps(doc)
                if shape == "file_cut":
                    text = text[:cut % (len(text) + 1)]
                elif shape == "text_flip" and text:
                    i = cut % len(text)
                    text = text[:i] + chr((ord(text[i]) + 1) % 128) + text[i + 1:]
                if shape == "text" or shape == "text_flip":
                    source = text
                else:
                    with open(textfile, "w") as f:
                        f.write(text)
                    source = textfile
        stats[check_load(source)] += 1

    def cleanup():
        for p in (disk, textfile):
            try:
                os.unlink(p)
            except OSError:
                pass
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    return fuzz_config, cleanup


def not_a_config(kind, textfile):
    if kind == "deep":
        depth = 50 if present("config_raw_errors") else 100000   # (known bug: RecursionError)
        return '{"subsystems": ' + "[" * depth + "]" * depth + "}"
    if kind == "not_utf8":
        with open(textfile, "wb") as f:
            f.write(b'{"subsystems": [\xff\xfe]}')
        return textfile
    return {"list": [1], "int": 5, "none": None, "bytes": b"{}"}.get(kind, kind)
