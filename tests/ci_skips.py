"""Under CI (`.ci/run` sets CI=1) a skipped test fails the run: CI must prove what it claims, so a test that could
not run there (missing data, Chromium, an optional package) is a failure to fix, not a quiet "s" in the summary.
Loaded by conftest.py; outside CI skips stay skips (a laptop without Chromium still runs the rest)."""

import os

import pytest

_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("CI") or not _skipped:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"CI=1: {len(_skipped)} test(s) skipped, and under CI a skip is a failure:"]
    lines += [f"  {nodeid}: {reason}" for nodeid, reason in _skipped]
    lines.append("Fix: give this machine what the test needs (see each reason), or run outside CI")
    for line in ["", *lines]:  # "" ends pytest's progress line
        reporter.write_line(line) if reporter else print(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
