"""pytest integration of the guest harness: ``@pytest.mark.guest(**GuestConfig fields)``.

A test module that needs the emulated NVMe controller says so::

    pytestmark = pytest.mark.guest(iommu=True, nvme_ns=2)

On the host (``USERBLK_IN_GUEST`` unset) such tests never run in the host process. The guest-marked
items of one module that share one marker configuration are run together in **one** guest boot,
by the host's own interpreter: ``<sys.executable> -m pytest <their node ids>`` with
``USERBLK_IN_GUEST=1``. The checkout is shared at the same path (an editable install works
unchanged), and so are the venv and a non-/usr base interpreter (pyenv) when they lie outside it.
The guest pytest writes one JSON file per test (``report.py``) into a shared log directory; each
host item waits for its file and reports the guest's outcome as its own: passed, failed with the
guest's traceback, skipped with the guest's reason. A test the guest never reported (crash, panic,
timeout, collection error) fails with the reason, the guest pytest's output tail and the console
tail. Boots are serialized: the machines have two cores.

Inside the guest (``USERBLK_IN_GUEST=1``), guest-marked tests run normally and anything else is
deselected.

``--guest=auto`` (default; env ``USERBLK_GUEST_MODE``) runs guest tests when QEMU is installed
and the image is cached or can be built here, and otherwise skips them with the reason;
``--guest=require`` turns those skips into failures (CI); ``--guest=off`` skips them all.
Host-side tests that boot guests themselves (the harness self-tests) use the ``guest_image``
fixture, which obeys the same option.

PYTEST_DONT_REWRITE: loaded with -p in the guest, this module would be assertion-rewritten, i.e.
recompiled under TCG in every boot, instead of using the .pyc the host keeps fresh.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import py_compile
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from tests.guest import report as guest_report
from tests.guest.runner import GuestConfig, GuestResult, GuestRun, Share, qemu_problem

IN_GUEST_ENV = "USERBLK_IN_GUEST"
CONFIG_ENV = "USERBLK_GUEST_CONFIG"
MODE_ENV = "USERBLK_GUEST_MODE"
DEFAULT_TIMEOUT = 1800.0  # per guest boot, when neither the marker nor --guest-timeout says
KEEP_SESSIONS = 10        # guest log directories of older pytest sessions are pruned
TAIL_LINES = 40
HOST_ONLY_ENV = re.compile(r"^USERBLK_(GUEST_|IN_GUEST$)")  # never forwarded into the guest
# Plugins that double pytest's start-up, which under TCG costs 4-5 s per guest module; they are
# left out of the guest pytest unless the module or a conftest above it names the word.
OPTIONAL_PLUGINS = {"hypothesispytest": "hypothesis", "benchmark": "benchmark"}
SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules", "venv", "results"}


def in_guest() -> bool:
    return os.environ.get(IN_GUEST_ENV) == "1"


def guest_config_of(item: pytest.Item) -> GuestConfig:
    """The item's marker configuration: module, class, function markers merged, closest wins."""
    kwargs: dict = {}
    for mark in reversed(list(item.iter_markers(name="guest"))):
        if mark.args:
            raise ValueError("pytest.mark.guest takes keyword arguments only (GuestConfig fields)")
        kwargs.update(mark.kwargs)
    return GuestConfig.from_kwargs(**kwargs)


def _compile_if_stale(source: Path) -> None:
    """Write ``__pycache__/<name>.<tag>.pyc`` for ``source`` unless a fresh one is there
    (same source mtime and size in its header)."""
    cfile = source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc"
    try:
        st = source.stat()
        with open(cfile, "rb") as f:
            header = f.read(16)
        if header[:4] == importlib.util.MAGIC_NUMBER and header[4:8] == bytes(4) and \
                int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF and \
                int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF:
            return
    except OSError:
        pass
    try:
        py_compile.compile(str(source), cfile=str(cfile), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    except (py_compile.PyCompileError, OSError):
        pass  # then the guest compiles it in memory, as it would anyway


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# ---- options, markers, fixtures (both sides) ----------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("userblk guest", "QEMU guest harness (tests/guest)")
    group.addoption("--guest", choices=("auto", "require", "off"),
                    default=os.environ.get(MODE_ENV, "auto"),
                    help="guest-marked tests: auto (run when QEMU and the image are available, "
                         "else skip), require (unavailable = failure), off (skip). "
                         f"Default: ${MODE_ENV} or auto.")
    group.addoption("--guest-timeout", type=float, default=None, metavar="SEC",
                    help=f"kill a guest after SEC seconds (default: the marker's timeout, "
                         f"else {DEFAULT_TIMEOUT:.0f})")
    group.addoption("--guest-logs", default=None, metavar="DIR",
                    help="where guest runs keep their logs (default: $TMPDIR/userblk-guest-logs)")
    group.addoption("--guest-pytest-args", default="", metavar="ARGS",
                    help="extra arguments for the pytest inside the guest "
                         "(one shell-quoted string)")
    group.addoption("--guest-all-plugins", action="store_true",
                    help="load every pytest plugin in the guest (by default hypothesis and "
                         "benchmark are left out of modules that do not mention them)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "guest(**options): run inside a QEMU guest with emulated NVMe controllers; "
                   "options are GuestConfig fields (tests/guest/runner.py)")
    config.addinivalue_line(
        "markers", "qemu: a host-side test that boots QEMU guests itself (obeys --guest)")
    if in_guest():
        config.pluginmanager.register(GuestSide(), "userblk-guest-side")
    else:
        config.pluginmanager.register(HostSide(config), "userblk-guest-host")


@pytest.fixture(scope="session")
def guest_config() -> GuestConfig:
    """Inside the guest: the configuration this guest was booted with."""
    if not in_guest():
        pytest.skip(reason="guest_config exists only inside a guest")
    return GuestConfig.from_json(os.environ[CONFIG_ENV])


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest):
    """On the host: the guest image, for tests that boot guests themselves. Skips (or, with
    --guest=require, fails) with the reason when guests cannot run here."""
    host: HostSide | None = request.config.pluginmanager.get_plugin("userblk-guest-host")
    if host is None:
        pytest.skip(reason="no nested guests: this already runs inside one")
    problem = host.unavailable()
    if problem:
        if host.mode == "require":
            pytest.fail(f"{problem} (--guest=require)", pytrace=False)
        pytest.skip(reason=problem)
    return host.image


# ---- inside the guest ---------------------------------------------------------------------------

class GuestSide:
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list) -> None:
        # only the node ids the host passed should be here; never run a host test as guest root
        selected = [i for i in items if i.get_closest_marker("guest")]
        deselected = [i for i in items if not i.get_closest_marker("guest")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = selected


# ---- on the host --------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Group:
    """The guest-marked items of one module with one marker configuration: one boot."""
    index: int
    module: str
    config: GuestConfig | None
    error: str | None = None
    explicit_timeout: bool = False
    items: list = dataclasses.field(default_factory=list)
    run: GuestRun | None = None
    result: GuestResult | None = None
    logdir: Path | None = None
    started_at: float = 0.0
    boot_seconds: float | None = None
    start_problem: str | None = None
    reported: set = dataclasses.field(default_factory=set)
    files: list = dataclasses.field(default_factory=list)  # the open stdout/stderr logs
    accel: str = ""
    first_unreported: str | None = None
    peer: GuestRun | None = None      # the second guest of a `peer=` marker

    @property
    def reports_dir(self) -> Path:
        return self.logdir / "reports"

    @property
    def finished(self) -> bool:
        return self.result is not None or self.start_problem is not None


_GROUP = pytest.StashKey[_Group]()
MAIN_ADDR, PEER_ADDR = "10.0.2.1", "10.0.2.2"   # a `peer=` marker's two guests


def _listening(port: int) -> bool:
    """Is something on this host listening on TCP 127.0.0.1:port? (/proc/net/tcp: no probe
    connection)"""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            return any(line.split()[1] == want and line.split()[3] == "0A" for line in f
                       if line.strip() and not line.lstrip().startswith("sl"))
    except OSError:
        return False


class HostSide:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.mode: str = config.getoption("--guest")
        self.groups: list[_Group] = []
        self.active: _Group | None = None
        self.image = None
        self._problem: str | None = None
        self._checked = False
        self._logroot: Path | None = None

    # -- availability --

    def unavailable(self) -> str | None:
        """Why guests cannot run here (checked once; may build the image), or None."""
        if self.mode == "off":
            return "guest tests are off (--guest=off)"
        if not self._checked:
            self._checked = True
            self._problem = qemu_problem()
            if self._problem is None:
                from tests.guest.image import ImageUnavailable, ensure_image
                try:
                    self.image = ensure_image(build=True, say=self._say)
                except ImageUnavailable as e:
                    reason = str(e)
                    if "\n" in reason:  # a failed build: its log tail once, one line per test
                        self._say(reason)
                    self._problem = reason.splitlines()[0]
        return self._problem

    def _say(self, message: str) -> None:
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"[guest] {message}")
        else:
            print(f"[guest] {message}", file=sys.stderr, flush=True)

    # -- grouping --

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        by_key: dict = {}
        for item in session.items:
            if item.get_closest_marker("guest") is None:
                continue
            module = item.nodeid.split("::", 1)[0]
            try:
                config, error = guest_config_of(item), None
            except (ValueError, TypeError) as e:
                config, error = None, f"invalid @pytest.mark.guest: {e}"
            key = (module, config, error)
            group = by_key.get(key)
            if group is None:
                group = by_key[key] = _Group(len(self.groups) + 1, module, config, error)
                group.explicit_timeout = any("timeout" in m.kwargs
                                             for m in item.iter_markers(name="guest"))
                self.groups.append(group)
            group.items.append(item)
            item.stash[_GROUP] = group

    # -- running --

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem) -> bool | None:
        group = item.stash.get(_GROUP, None)
        if group is None:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        try:
            reports = self._reports_for(item, group)
        except BaseException:  # KeyboardInterrupt included: QEMU must not outlive the session
            self._close(group)
            raise
        for rep in reports:
            ihook.pytest_runtest_logreport(report=rep)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        # A host item before this one may have left module fixtures set up; tear down what
        # the next item does not share, as pytest's own protocol would have.
        setupstate = getattr(item.session, "_setupstate", None)
        if setupstate is not None:
            setupstate.teardown_exact(nextitem)
        return True

    def _reports_for(self, item: pytest.Item, group: _Group) -> list:
        if group.error:
            return self._failed(item, group.error)
        problem = self.unavailable()
        if problem:
            if self.mode == "require":
                return self._failed(item, f"{problem} (--guest=require)")
            return self._skipped(item, problem)
        if group.run is None and not group.finished:
            self._start(group)
        if group.start_problem:
            return self._failed(item, f"the guest for {group.module} did not start: "
                                      f"{group.start_problem}")
        path = guest_report.report_file(group.reports_dir, item.nodeid)
        while not path.exists():
            if group.result is not None or group.run is None or group.run.poll() is not None:
                self._collect(group)
                break
            time.sleep(0.05)
        if path.exists():
            return self._guest_reports(item, group, path)
        if group.first_unreported is None:
            group.first_unreported = item.nodeid
            return self._failed(item, self._never_reported(group))
        return self._failed(item, f"the guest never reported this test: {self._headline(group)} "
                                  f"(details under {group.first_unreported})")

    def _guest_reports(self, item: pytest.Item, group: _Group, path: Path) -> list:
        group.reported.add(item.nodeid)
        try:
            data = json.loads(path.read_text())
            reports = [self.config.hook.pytest_report_from_serializable(config=self.config,
                                                                         data=d)
                       for d in data["reports"]]
        except Exception as e:  # a broken report must fail its test, not the whole session
            return self._failed(item, f"unreadable guest report {path}: {type(e).__name__}: {e}")
        for rep in reports:
            if isinstance(rep.longrepr, list):  # a skip's (path, line, reason) after JSON
                rep.longrepr = tuple(rep.longrepr)
            if rep.failed:
                rep.sections.append(("userblk guest", f"ran in guest run {group.index} "
                                     f"({group.config.describe()}); logs: {group.logdir}"))
        return reports or self._failed(item, "the guest sent an empty report for this test")

    @staticmethod
    def _headline(group: _Group) -> str:
        result = group.result
        if result is None:
            return "the guest run was stopped"
        problem = result.problem()
        if problem:
            return problem.splitlines()[0]
        return f"the guest pytest exited with status {result.returncode}"

    def _never_reported(self, group: _Group) -> str:
        lines = ["the guest never reported this test: its run ended while or before it ran."]
        result = group.result
        if result is not None:
            problem = result.problem()
            if problem:
                lines.append(problem)
            else:
                lines.append(f"The guest pytest exited with status {result.returncode}.")
        collect_errors = group.reports_dir / guest_report.COLLECT_ERRORS
        if collect_errors.exists():
            lines.append("Collection errors in the guest:\n" + collect_errors.read_text())
        for name in ("stdout", "stderr"):
            tail = _tail(group.logdir / f"{name}.log")
            if tail:
                lines.append(f"guest pytest {name} (last lines of {group.logdir / name}.log):\n"
                             + tail)
        lines.append(f"logs: {group.logdir}")
        return "\n".join(lines)

    def _session_logdir(self) -> Path:
        if self._logroot is None:
            base = Path(self.config.getoption("--guest-logs")
                        or Path(tempfile.gettempdir()) / "userblk-guest-logs")
            base.mkdir(parents=True, exist_ok=True)
            old = sorted(base.glob("session-*"), key=lambda p: p.stat().st_mtime)
            for stale in old[:max(0, len(old) - KEEP_SESSIONS + 1)]:
                shutil.rmtree(stale, ignore_errors=True)
            self._logroot = Path(tempfile.mkdtemp(
                prefix=time.strftime("session-%Y%m%d-%H%M%S-"), dir=base))
        return self._logroot

    def _guest_argv(self, group: _Group) -> list[str]:
        opt = self.config.option
        argv = [sys.executable, "-m", "pytest", *[i.nodeid for i in group.items],
                # the reporter first: the plugin imports it, and a plugin module imported
                # before its -p cannot be assertion-rewritten (a warning in every run);
                # the plugin too, for a suite whose conftest does not load it (self-tests)
                "-p", "tests.guest.report", "-p", "tests.guest.plugin",
                "-p", "no:cacheprovider",  # the shared checkout is read-mostly
                "--rootdir", str(self.config.rootpath), "-v", "--color=no",
                f"--tb={getattr(opt, 'tbstyle', 'auto')}"]
        if self.config.inipath:
            argv += ["-c", str(self.config.inipath)]
        if getattr(opt, "showlocals", False):
            argv.append("-l")
        if getattr(opt, "capture", None) == "no":
            argv.append("-s")
        if getattr(opt, "maxfail", 0):
            argv.append(f"--maxfail={opt.maxfail}")
        for w in getattr(opt, "pythonwarnings", None) or ():
            argv += ["-W", w]
        for name in self._unneeded_plugins(group):
            argv += ["-p", f"no:{name}"]
        argv += shlex.split(self.config.getoption("--guest-pytest-args"))
        return argv

    def _unneeded_plugins(self, group: _Group) -> list[str]:
        if self.config.getoption("--guest-all-plugins"):
            return []
        module = group.items[0].path
        sources = [module] + [d / "conftest.py" for d in module.parents
                              if d == self.config.rootpath or self.config.rootpath in d.parents]
        text = ""
        for path in sources:
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return [name for name, word in OPTIONAL_PLUGINS.items()
                if self.config.pluginmanager.has_plugin(name) and word not in text]

    def _shares(self, logdir: Path) -> list[Share]:
        """The checkout, the interpreter and its packages, and the log directory, each at its
        own path, so that paths (and an editable install) mean the same inside the guest."""
        import tests
        chosen: list[Path] = []

        def add(path) -> None:
            path = Path(path).resolve()
            if path.is_dir() and not any(path == p or p in path.parents for p in chosen):
                chosen[:] = [p for p in chosen if path not in p.parents] + [path]

        add(self.config.rootpath)
        add(Path(tests.__file__).resolve().parent.parent)
        add(sys.prefix)
        if not sys.base_prefix.startswith("/usr"):
            add(sys.base_prefix)  # e.g. pyenv: the guest has only Debian's /usr/bin/python3
        stdlib = {Path(sysconfig.get_path(k)).resolve() for k in ("stdlib", "platstdlib")}
        # site-packages outside the venv (system pip, a venv with --system-site-packages)
        for entry in sys.path:
            if entry and os.path.isdir(entry) and Path(entry).resolve() not in stdlib \
                    and not any(s in Path(entry).resolve().parents for s in stdlib):
                add(entry)
        shares = [Share(str(p)) for p in chosen]
        # no caching for the reports: the host reads each file as soon as the guest writes it
        shares.append(Share(str(logdir), cache="none"))
        self._refresh_bytecode(chosen)
        return shares

    def _refresh_bytecode(self, shared: list[Path]) -> None:
        """Fresh .pyc files beside the shared Python sources, compiled here (natively).

        The guest reads bytecode but must not write into the checkout, and under TCG compiling
        a module costs ~30x what it costs here: a stale or missing .pyc (the host may run with
        PYTHONDONTWRITEBYTECODE and never refresh __pycache__) costs seconds per guest module,
        every boot. The guest's own standard library keeps its own __pycache__ (its Debian
        build may differ from the host's, so the host's .pyc files would be stale there).
        """
        sources = set()
        for module in list(sys.modules.values()):
            source = getattr(module, "__file__", None)
            if source and source.endswith(".py"):
                sources.add(Path(source))
        root = self.config.rootpath
        for dirpath, dirnames, filenames in os.walk(root):
            # not into virtual environments, VCS data, build trees (imported parts come above)
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                           and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg"))]
            sources.update(Path(dirpath, f) for f in filenames if f.endswith(".py"))
        for source in sources:
            real = source.resolve()
            if any(s in real.parents for s in shared):
                _compile_if_stale(source)

    def _guest_env(self, group: _Group) -> dict[str, str]:
        import tests
        env = {k: v for k, v in os.environ.items()
               if k.startswith("USERBLK_") and not HOST_ONLY_ENV.match(k)}
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        env.update({
            IN_GUEST_ENV: "1",
            CONFIG_ENV: group.config.to_json(),
            guest_report.REPORT_DIR_ENV: str(group.reports_dir),
            "PATH": f"{Path(sys.executable).parent}:{path}",
            "PYTHONPATH": str(Path(tests.__file__).resolve().parent.parent),
            # the guest reads the bytecode compiled here, never writes into the checkout
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(dict(group.config.env))  # the marker's own env wins
        return env

    def _start(self, group: _Group) -> None:
        if self.active is not None and self.active is not group:
            self._finish(self.active)  # one guest at a time: two cores
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", group.module)
        group.logdir = self._session_logdir() / f"{group.index:02d}-{slug}"
        group.reports_dir.mkdir(parents=True)
        timeout = (group.config.timeout if group.explicit_timeout
                   else self.config.getoption("--guest-timeout") or DEFAULT_TIMEOUT)
        config = group.config.replace(
            shares=(*group.config.shares, *self._shares(group.logdir)),
            env=self._guest_env(group), workdir=str(self.config.rootpath), timeout=timeout,
            console_log=str(group.logdir / "console.log"))
        stream = getattr(self.config.option, "capture", None) == "no"
        sinks = []
        for name in ("stdout", "stderr"):
            f = open(group.logdir / f"{name}.log", "wb")
            term = getattr(sys, f"__{name}__").buffer if stream else None

            def sink(chunk: bytes, f=f, term=term) -> None:
                f.write(chunk)
                f.flush()
                if term is not None:
                    term.write(chunk)
                    term.flush()
            sinks.append(sink)
            group.files.append(f)
        (group.logdir / "command").write_text(shlex.join(self._guest_argv(group)) + "\n")
        if self.config.option.verbose > 0 or stream:
            self._say(f"booting a guest for {group.module} ({group.config.describe()}): "
                      f"{len(group.items)} test(s); logs: {group.logdir}")
        if group.config.peer:
            config = self._start_peer(group, config)
            if group.start_problem:
                self._close(group)
                return
        group.run = GuestRun(config, self._guest_argv(group), self.image, stdout=sinks[0],
                             stderr=sinks[1], capture=False)
        group.started_at = time.monotonic()
        try:
            group.run.start()
        except Exception as e:  # QEMU missing after all, unwritable temp dir, ...
            group.start_problem = f"{type(e).__name__}: {e}"
            self._close(group)
            return
        group.accel = group.run.accel
        self.active = group

    def _start_peer(self, group: _Group, config: GuestConfig) -> GuestConfig:
        """Boot the `peer=` guest (`python -m PEER`, same shares and devices) listening on a
        QEMU socket network; returns the module guest's configuration joined to it. The peer
        gets USERBLK_NET_ADDR=PEER_ADDR/24 and USERBLK_PEER_ADDR=MAIN_ADDR, the module guest the
        reverse (tests.guest.net.configure() sets the address up)."""
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(config.env)
        peer_config = config.replace(
            net=f"listen:{port}", peer="", console_log=str(group.logdir / "peer-console.log"),
            env={**env, "USERBLK_NET_ADDR": f"{PEER_ADDR}/24", "USERBLK_PEER_ADDR": MAIN_ADDR})
        out = [open(group.logdir / f"peer-{name}.log", "wb") for name in ("stdout", "stderr")]
        group.files.extend(out)
        group.peer = GuestRun(peer_config, [sys.executable, "-m", group.config.peer],
                              self.image, stdout=out[0], stderr=out[1], capture=False)
        try:
            group.peer.start()
            # QEMU binds the listening socket before it boots the guest; connecting before
            # that would fail (and a probe connection would take the network's one slot)
            deadline = time.monotonic() + 60
            while not _listening(port):
                if group.peer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the peer guest's QEMU is not listening on {port}")
                time.sleep(0.05)
        except Exception as e:
            group.start_problem = f"peer guest: {type(e).__name__}: {e}"
            return config
        return config.replace(net=f"connect:{port}",
                              env={**env, "USERBLK_NET_ADDR": f"{MAIN_ADDR}/24",
                                   "USERBLK_PEER_ADDR": PEER_ADDR})

    def _collect(self, group: _Group) -> None:
        """The run has ended: keep its result, release QEMU and the log files."""
        if group.run is not None and group.result is None:
            group.result = group.run.poll()
        if group.result is not None:
            group.boot_seconds = group.result.boot_seconds
        self._close(group)

    def _finish(self, group: _Group) -> None:
        """Wait for a started run to end by itself (its guest pytest is past its last test)."""
        if group.run is not None and group.result is None:
            try:
                group.result = group.run.wait()
            finally:
                self._collect(group)

    def _close(self, group: _Group) -> None:
        if group.run is not None:
            if group.result is None:
                group.boot_seconds = group.run.boot_seconds
            group.run.close()
            group.run = None
        if group.peer is not None:          # it serves the module guest only: stop it now
            group.peer.close()
            group.peer = None
        for f in group.files:
            f.close()
        group.files.clear()
        if self.active is group:
            self.active = None

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for group in self.groups:
            if group.run is None:
                continue
            if session.shouldstop or session.shouldfail:
                self._close(group)  # -x or an interrupt: do not wait for the rest
            else:
                self._finish(group)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        for group in self.groups:
            self._close(group)

    # -- synthetic reports --

    def _report(self, item: pytest.Item, when: str, outcome: str, longrepr=None):
        now = time.time()
        return pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords},
                                 outcome, longrepr, when, duration=0.0, start=now, stop=now)

    def _failed(self, item: pytest.Item, message: str) -> list:
        return [self._report(item, "setup", "passed"),
                self._report(item, "call", "failed", message),
                self._report(item, "teardown", "passed")]

    def _skipped(self, item: pytest.Item, reason: str) -> list:
        path, lineno, _ = item.location
        return [self._report(item, "setup", "skipped",
                             (str(self.config.rootpath / path), (lineno or 0) + 1,
                              f"Skipped: {reason}")),
                self._report(item, "teardown", "passed")]

    # -- summary --

    def pytest_terminal_summary(self, terminalreporter) -> None:
        ran = [g for g in self.groups if g.logdir is not None or g.start_problem]
        if not ran:
            return
        tr = terminalreporter
        tr.section("userblk guest runs")
        for g in ran:
            r = g.result
            boot = f"boot {g.boot_seconds:.1f}s" if g.boot_seconds is not None else "no boot"
            total = f"total {r.total_seconds:.1f}s" if r else "not finished"
            if g.start_problem:
                state = f"did not start: {g.start_problem}"
            elif r is None:
                state = "stopped early"
            elif r.problem():
                state = "TIMEOUT" if r.timed_out else "NO STATUS (crash?)"
            else:
                state = f"guest pytest exit {r.returncode}"
            tr.line(f"[{g.index}] {g.module} ({g.config.describe()}): {len(g.items)} test(s), "
                    f"{boot}, {total}, accel={g.accel or '?'}, "
                    f"{state}")
            failed = r is None or r.problem() or r.returncode not in (0, 5) \
                or len(g.reported) < len(g.items)
            if failed or tr.config.option.verbose > 0:
                tr.line(f"    logs: {g.logdir} (stdout.log, stderr.log, console.log)")

