"""JSON configuration of bdev stacks in SPDK's format, with SPDK's method and parameter names.

    {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create",
         "params": {"name": "Malloc0", "num_blocks": 131072, "block_size": 512}},
        {"method": "bdev_wait_for_examine"}]}]}

    from bdev import config
    created = config.load_config("stack.json")     # a path, a JSON string's parsed dict, ...
    doc = config.save_config()                     # the live stack, in the same format
    config.teardown(created)

`load_config` runs the entries in order and returns the bdevs they created, in creation order.
If an entry fails, what the earlier entries created is torn down again and a `ConfigError` names
the entry (its position, method and bdev name) and the cause. Unknown methods or parameters are
errors that list what is known. `save_config` asks every registered bdev for its `config_json()`
(an NVMe controller's namespaces all give the same `bdev_nvme_attach_controller` entry: it is
written once) and orders the entries so that a bdev comes after the bdevs it is built on.

Methods that create bdevs (parameters as in SPDK's RPC documentation):

- `bdev_malloc_create`: name (default: the first free MallocN), num_blocks, block_size, uuid,
  optimal_io_boundary.
- `bdev_null_create`: name, num_blocks, block_size, md_size, uuid.
- `bdev_aio_create`: name, filename, block_size (0: the device's own), readonly, uuid
  (fallocate: accepted at its default).
- `bdev_uring_create`: name, filename, block_size, uuid: the aio module with engine="uring".
- `bdev_nvme_attach_controller`: name, trtype, traddr, adrfam, trsvcid, subnqn, priority (the
  transport ID, passed to `bdev.nvme.attach_controller` as an SPDK transport ID string), and the
  controller options that module accepts (num_io_queues; for trtype TCP hostnqn, hdgst, ddgst,
  ctrlr_loss_timeout_sec, reconnect_delay_sec, fast_io_fail_timeout_sec,
  fabrics_connect_timeout_us; the userblk extensions io_queue_size, io_queue_requests). Creates
  one bdev per namespace, `<name>n<nsid>`. trtype "emulated" (a userblk extension) names an
  in-process nvme.emu controller attached before.

Parameters SPDK writes but a module here does not implement (e.g. `md_size`, `dif_type` of a
malloc bdev, `prchk_reftag` of an NVMe controller) are accepted when they hold SPDK's default,
and rejected with an error otherwise (a setting that would change the device is never dropped
silently). Hints without effect here (`physical_block_size`, `hostnqn`, `multipath` ...) are
accepted with any value.

Methods SPDK writes around them, accepted and what they do here:

- `bdev_set_options`, `bdev_nvme_set_options`, `bdev_nvme_set_hotplug`, `bdev_raid_set_options`,
  `bdev_iscsi_set_options`, `bdev_aio_set_options`: ignored (pool and cache sizes are per channel
  here and fixed; there is no hotplug monitor). Logged at INFO.
- `bdev_wait_for_examine`, `bdev_examine`: no-ops (nothing examines bdevs asynchronously here).
- `bdev_enable_histogram` (name, enable): applied (`Bdev.enable_histogram`).

Subsystems other than "bdev" (accel, iobuf, sock, vmd, ... in a file SPDK saved) are skipped,
logged at INFO.
"""
import inspect
import json
import logging
import os
import re

from bdev.errors import BdevError

log = logging.getLogger("userblk.bdev.config")

__all__ = ["ConfigError", "load_config", "save_config", "teardown", "KNOWN_METHODS"]


class ConfigError(BdevError):
    """A JSON config could not be read or applied. `entry` is the 0-based position of the
    failing entry in the bdev subsystem's config list (None for a problem with the whole
    document), `method` its method."""

    def __init__(self, message, entry=None, method=None, bdev=None):
        super().__init__(message, bdev)
        self.entry = entry
        self.method = method


_REQUIRED = object()     # a parameter the method cannot do without
_ANY = object()          # accepted with any value, and ignored unless the module takes it


class _Method:
    """How to run one SPDK method: which parameters exist (with SPDK's default, _REQUIRED or
    _ANY), which of them are given to the module function under another name."""

    def __init__(self, name, module, func, params, rename=None, prepare=None, creates=True):
        self.name = name
        self.module = module        # "bdev.malloc" etc.: imported when the method runs
        self.func = func            # function name in that module
        self.params = params
        self.rename = rename or {}
        self.prepare = prepare      # params -> (positional args, kwargs) adjustments
        self.creates = creates

    def function(self, what):
        import importlib
        try:
            mod = importlib.import_module(self.module)
        except ImportError as e:
            raise ConfigError(f"{what}: needs the {self.module} module, which is not "
                              f"available ({e})", method=self.name) from e
        return getattr(mod, self.func)


def _trid(params):
    """SPDK's transport ID string from bdev_nvme_attach_controller's transport parameters."""
    fields = [("trtype", params.pop("trtype")), ("traddr", params.pop("traddr"))]
    for key in ("adrfam", "trsvcid", "subnqn", "priority"):
        value = params.pop(key, None)
        if value not in (None, ""):
            fields.append((key, value))
    return " ".join(f"{k}:{v}" for k, v in fields)


def _prepare_nvme(params):
    name = params.pop("name")
    return [name, _trid(params)], params


def _prepare_uring(params):
    params["engine"] = "uring"
    return [], params


_DIF = {"md_size": 0, "md_interleave": False, "dif_type": 0, "dif_is_head_of_md": False,
        "dif_pi_format": 0, "physical_block_size": _ANY}

METHODS = {m.name: m for m in [
    _Method("bdev_malloc_create", "bdev.malloc", "create",
            dict({"name": None, "num_blocks": _REQUIRED, "block_size": _REQUIRED, "uuid": None,
                  "optimal_io_boundary": 0}, **_DIF)),
    _Method("bdev_null_create", "bdev.null", "create",
            dict(_DIF, **{"name": _REQUIRED, "num_blocks": _REQUIRED, "block_size": _REQUIRED,
                          "md_size": 0, "uuid": None})),
    _Method("bdev_aio_create", "bdev.aio", "create",
            {"name": _REQUIRED, "filename": _REQUIRED, "block_size": 0, "readonly": False,
             "fallocate": False, "uuid": None}),
    _Method("bdev_nvme_attach_controller", "bdev.nvme", "attach_controller",
            {"name": _REQUIRED, "trtype": _REQUIRED, "traddr": _REQUIRED, "adrfam": _ANY,
             "trsvcid": _ANY, "subnqn": _ANY, "priority": _ANY, "hostnqn": _ANY,
             "hostaddr": _ANY, "hostsvcid": _ANY, "multipath": _ANY, "num_io_queues": _ANY,
             "fabrics_connect_timeout_us": _ANY, "max_bdevs": _ANY,
             "allow_unrecognized_csi": _ANY,
             "prchk_reftag": False, "prchk_guard": False, "hdgst": False, "ddgst": False,
             "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0,
             "fast_io_fail_timeout_sec": 0, "psk": None, "dhchap_key": None,
             "dhchap_ctrlr_key": None,
             # userblk extensions (bdev.nvme writes them when they differ from the defaults)
             "io_queue_size": _ANY, "io_queue_requests": _ANY},
            prepare=_prepare_nvme),
    _Method("bdev_uring_create", "bdev.aio", "create",
            {"name": _REQUIRED, "filename": _REQUIRED, "block_size": 0, "uuid": None},
            prepare=_prepare_uring),
]}

# methods accepted and ignored (SPDK writes them into every saved config)
IGNORED_METHODS = ("bdev_set_options", "bdev_nvme_set_options", "bdev_nvme_set_hotplug",
                   "bdev_raid_set_options", "bdev_iscsi_set_options", "bdev_aio_set_options")
NOOP_METHODS = ("bdev_wait_for_examine", "bdev_examine")
APPLIED_METHODS = ("bdev_enable_histogram",)

KNOWN_METHODS = tuple(sorted(list(METHODS) + list(IGNORED_METHODS) + list(NOOP_METHODS)
                             + list(APPLIED_METHODS)))

# how to remove a bdev of each module ("module name": (python module, function, argument))
_DELETE = {"malloc": ("bdev.malloc", "delete"), "null": ("bdev.null", "delete"),
           "aio": ("bdev.aio", "delete")}


# ---- reading ----------------------------------------------------------------------------------
def _read(source):
    """The parsed document of a path, a JSON text, or an already parsed dict."""
    if isinstance(source, dict):
        return source, "<dict>"
    if isinstance(source, (str, os.PathLike)):
        text_given = isinstance(source, str) and source.lstrip().startswith("{")
        if text_given:
            where, text = "<string>", source
        else:
            where = os.fspath(source)
            try:
                with open(where) as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read the JSON config {where}: {e.strerror}") from e
        try:
            return json.loads(text), where
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg})") from e
    raise ConfigError(f"a config is a path, a JSON text or a dict, not {type(source).__name__}")


def _bdev_entries(doc, where):
    """The bdev subsystem's config entries of a document (several bdev subsystems: in order)."""
    if isinstance(doc, dict) and "subsystem" in doc and "subsystems" not in doc:
        doc = {"subsystems": [doc]}          # a lone subsystem object
    if not isinstance(doc, dict) or not isinstance(doc.get("subsystems"), list):
        raise ConfigError(f"{where}: a config is an object with a \"subsystems\" list "
                          '({"subsystems": [{"subsystem": "bdev", "config": [...]}]})')
    entries = []
    for i, sub in enumerate(doc["subsystems"]):
        if not isinstance(sub, dict) or "subsystem" not in sub:
            raise ConfigError(f"{where}: subsystems[{i}] is not an object with a \"subsystem\" "
                              "name")
        name = sub["subsystem"]
        config = sub.get("config")
        if config is None:                   # SPDK writes "config": null for empty ones
            config = []
        if not isinstance(config, list):
            raise ConfigError(f"{where}: the config of subsystem {name!r} is not a list")
        if name != "bdev":
            if config:
                log.info("%s: subsystem %r skipped (%d entries): only the bdev subsystem is "
                         "configured here", where, name, len(config))
            continue
        entries.extend(config)
    return entries


# ---- running entries --------------------------------------------------------------------------
def _describe(index, method, params):
    name = params.get("name") if isinstance(params, dict) else None
    return f"entry {index} ({method}{' ' + repr(name) if name else ''})"


def _free_name(prefix):
    import bdev
    taken = {b.name for b in bdev.bdevs()} | {a for b in bdev.bdevs() for a in b.aliases}
    i = 0
    while f"{prefix}{i}" in taken:
        i += 1
    return f"{prefix}{i}"


def _accepts(func):
    """(parameter names, takes **kwargs) of a module function; (set(), True) when unknown."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _run_create(m, params, what):
    unknown = sorted(set(params) - set(m.params))
    if unknown:
        raise ConfigError(f"{what}: unknown parameter{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}; {m.name} takes {', '.join(sorted(m.params))}")
    params = dict(params)
    if m.name == "bdev_malloc_create" and params.get("name") in (None, ""):
        params["name"] = _free_name("Malloc")
    missing = [k for k, d in m.params.items() if d is _REQUIRED and params.get(k) is None]
    if missing:
        raise ConfigError(f"{what}: missing parameter{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}")
    func = m.function(what)
    args = []
    if m.prepare is not None:
        args, params = m.prepare(params)
    accepted, var_kw = _accepts(func)
    kwargs = {}
    for key, value in params.items():
        if key == "engine" and m.name == "bdev_uring_create":
            kwargs[key] = value
            continue
        arg = m.rename.get(key, key)
        if arg in accepted or var_kw:
            kwargs[arg] = value
            continue
        default = m.params[key]
        if default is _ANY or value == default or (default is None and value in ("", None)):
            log.debug("%s: %s=%r accepted and ignored", what, key, value)
            continue
        raise ConfigError(f"{what}: {key}={value!r} is not supported by {m.module} (only "
                          f"SPDK's default {default!r} is accepted)")
    if m.module == "bdev.aio" and not kwargs.get("block_size"):
        kwargs["block_size"] = None          # SPDK: 0 = the device's own block size
    return func(*args, **kwargs)


def _run_entry(index, entry):
    """Run one config entry; returns the bdevs it created (registry difference)."""
    import bdev
    if not isinstance(entry, dict) or "method" not in entry:
        raise ConfigError(f"entry {index} is not an object with a \"method\"", entry=index)
    method = entry["method"]
    params = entry.get("params") or {}
    what = _describe(index, method, params)
    if not isinstance(params, dict):
        raise ConfigError(f"{what}: \"params\" is not an object", index, method)
    extra = sorted(set(entry) - {"method", "params"})
    if extra:
        raise ConfigError(f"{what}: unexpected key{'s' if len(extra) > 1 else ''} "
                          f"{', '.join(extra)} (an entry has \"method\" and \"params\")",
                          index, method)
    if method in IGNORED_METHODS:
        log.info("%s ignored: not applicable here", what)
        return []
    if method in NOOP_METHODS:
        return []
    if method == "bdev_enable_histogram":
        unknown = sorted(set(params) - {"name", "enable", "opc", "granularity"})
        if unknown or "name" not in params:
            raise ConfigError(f"{what}: takes name and enable"
                              + (f", not {', '.join(unknown)}" if unknown else ""),
                              index, method)
        bdev.get_bdev(params["name"]).enable_histogram(bool(params.get("enable", True)))
        return []
    m = METHODS.get(method)
    if m is None:
        raise ConfigError(f"{what}: unknown method {method!r}; known: "
                          f"{', '.join(KNOWN_METHODS)}", index, method)
    before = {id(b) for b in bdev.bdevs()}
    try:
        _run_create(m, params, what)
    except ConfigError as e:
        e.entry, e.method = index, method
        raise
    return [b for b in _creation_sorted(bdev.bdevs()) if id(b) not in before]


def _creation_sorted(bdevs):
    # names like Nvme0n2 / Nvme0n10 in numeric order
    def key(b):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", b.name)]
    return sorted(bdevs, key=key)


def load_config(source):
    """Build the bdev stack `source` describes (a path to a JSON file, a JSON text, or a dict);
    returns the bdevs created, in order. On failure, what was created is torn down and a
    ConfigError names the failing entry."""
    doc, where = _read(source)
    entries = _bdev_entries(doc, where)
    created = []
    for index, entry in enumerate(entries):
        try:
            created.extend(_run_entry(index, entry))
        except BaseException as e:
            try:
                teardown(created)
            except Exception:
                log.exception("tearing down after a failed config entry")
            prefix = "" if where.startswith("<") else f"{where}: "
            if isinstance(e, ConfigError):
                e.args = (f"{prefix}{e}",) + e.args[1:]
                raise
            if not isinstance(e, Exception):
                raise                       # KeyboardInterrupt & co: torn down, passed on
            method = entry.get("method") if isinstance(entry, dict) else None
            params = entry.get("params") if isinstance(entry, dict) else None
            raise ConfigError(f"{prefix}{_describe(index, method, params or {})} failed: "
                              f"{type(e).__name__}: {e}", index, method) from e
    return created


# ---- saving -----------------------------------------------------------------------------------
_BASE_KEYS = ("base_bdev_name", "base_bdev", "base_bdevs", "base_name", "bdev_name")


def _refs(params):
    out = set()
    for key in _BASE_KEYS:
        v = params.get(key)
        if isinstance(v, str):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(x for x in v if isinstance(x, str))
    return out


def save_config(bdevs=None):
    """The live stack (every registered bdev, or those given) in SPDK's format: each bdev's
    `config_json()`, once per distinct entry (an NVMe controller's namespaces share theirs),
    bases before the bdevs built on them, `bdev_wait_for_examine` last. Bdevs without a config
    entry (e.g. Python test bdevs) are left out."""
    import bdev as _bdev
    if bdevs is None:
        bdevs = _bdev.bdevs()
    entries = []          # [entry, names it creates]
    seen = {}
    for b in _creation_sorted(bdevs):
        e = b.config_json()
        if e is None:
            log.info("bdev %s (%s) has no config entry: not saved", b.name, b.module)
            continue
        key = json.dumps(e, sort_keys=True, default=str)
        if key in seen:
            seen[key][1].add(b.name)
            continue
        item = [e, {b.name, *b.aliases}]
        seen[key] = item
        entries.append(item)
    # stable topological order: an entry waits for the entries creating the bdevs it names
    creator = {n: i for i, (_, names) in enumerate(entries) for n in names}
    ordered, placed = [], set()

    def place(i, stack=()):
        if i in placed or i in stack:
            return
        for n in sorted(_refs(entries[i][0].get("params") or {})):
            j = creator.get(n)
            if j is not None and j != i:
                place(j, stack + (i,))
        placed.add(i)
        ordered.append(entries[i][0])

    for i in range(len(entries)):
        place(i)
    config = [json.loads(json.dumps(e, default=str)) for e in ordered]
    config.append({"method": "bdev_wait_for_examine"})
    return {"subsystems": [{"subsystem": "bdev", "config": config}]}


def save_config_file(path, bdevs=None):
    """save_config() written to `path` (indented JSON, as SPDK writes it)."""
    with open(path, "w") as f:
        json.dump(save_config(bdevs), f, indent=2)
        f.write("\n")


# ---- tearing down -----------------------------------------------------------------------------
def teardown(bdevs):
    """Remove `bdevs` (as load_config returned them), last created first. NVMe bdevs go with
    their controller (`bdev.nvme.detach_controller`), once per controller. Bdevs already
    removed are skipped; the first error is raised after trying every bdev."""
    import importlib
    first = None
    detached = set()
    for b in reversed(list(bdevs)):
        if b.removed:
            continue
        try:
            if b.module == "nvme":
                ctrlr = getattr(getattr(b, "controller", None), "name", None)
                if ctrlr is None:
                    ctrlr = ((b.config_json() or {}).get("params") or {}).get("name")
                nv = importlib.import_module("bdev.nvme")
                detach = getattr(nv, "detach_controller", None)
                if ctrlr is not None and detach is not None:
                    if ctrlr not in detached:
                        detached.add(ctrlr)
                        detach(ctrlr)
                    if not b.removed:
                        b.unregister()
                    continue
            spec = _DELETE.get(b.module)
            delete = None
            if spec is not None:
                try:
                    delete = getattr(importlib.import_module(spec[0]), spec[1], None)
                except ImportError:
                    delete = None
            if delete is not None:
                delete(b.name)
            else:
                b.unregister()
        except Exception as e:
            log.warning("teardown of bdev %s failed: %s", b.name, e)
            if first is None:
                first = e
    if first is not None:
        raise first
