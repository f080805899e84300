"""Guest half of the pytest integration: hand every test's reports to the host pytest.

The host starts the guest pytest with ``-p tests.guest.report`` and a directory shared over 9p
(``$USERBLK_GUEST_REPORT_DIR``, mounted without caching, so each file reaches the host as soon as
it is written). Per test, one JSON file holds the test's setup/call/teardown reports, serialized
with pytest's own ``pytest_report_to_serializable`` (the hook pytest-xdist uses), so that the host
re-creates them exactly: outcome, longrepr, captured output, skip reason, duration.

Files appear atomically (written aside, then renamed), named by a hash of the node id, so the
host can wait for one test while the guest is still running the next.

PYTEST_DONT_REWRITE: loaded with -p in the guest, this module would be assertion-rewritten, i.e.
recompiled under TCG in every boot, instead of using the .pyc the host keeps fresh.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

REPORT_DIR_ENV = "USERBLK_GUEST_REPORT_DIR"
COLLECT_ERRORS = "collect-errors.json"
SESSION = "session.json"


def report_file(directory: Path, nodeid: str) -> Path:
    return directory / (hashlib.sha1(nodeid.encode()).hexdigest()[:24] + ".json")


def write_atomically(path: Path, data: object) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, default=repr)  # user_properties may hold anything
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class ReportWriter:
    def __init__(self, config: pytest.Config, directory: Path):
        self.config = config
        self.directory = directory
        self.pending: dict[str, list[dict]] = {}
        self.collect_errors: list[dict] = []

    def _serialize(self, report) -> dict:
        return self.config.hook.pytest_report_to_serializable(config=self.config, report=report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.pending.setdefault(report.nodeid, []).append(self._serialize(report))

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        reports = self.pending.pop(nodeid, [])
        write_atomically(report_file(self.directory, nodeid),
                         {"nodeid": nodeid, "reports": reports})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append({"nodeid": report.nodeid,
                                        "longrepr": str(report.longrepr)})
            write_atomically(self.directory / COLLECT_ERRORS, self.collect_errors)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        write_atomically(self.directory / SESSION, {"exitstatus": int(exitstatus),
                                                   "collected": session.testscollected})


def pytest_configure(config: pytest.Config) -> None:
    directory = os.environ.get(REPORT_DIR_ENV)
    if directory:
        config.pluginmanager.register(ReportWriter(config, Path(directory)),
                                      "userblk-guest-report-writer")
