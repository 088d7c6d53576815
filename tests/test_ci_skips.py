"""CI proves what it claims: with CI set, a skipped test makes pytest fail and names the test and its reason."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def _run_pytest(folder: Path, ci: bool) -> subprocess.CompletedProcess:
    (folder / "test_sample.py").write_text(
        "import pytest\n\n"
        "def test_runs():\n    assert True\n\n"
        "def test_needs_something():\n    pytest.skip('needs headless Chromium')\n\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_known_failure():\n    assert False\n")
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PYTHONPATH"] = str(TESTS)
    if ci:
        env["CI"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-q", "-p", "no:cacheprovider",
                           str(folder / "test_sample.py")], capture_output=True, text=True, env=env, cwd=folder)


def test_a_skip_fails_the_run_under_ci(tmp_path):
    result = _run_pytest(tmp_path, ci=True)
    assert result.returncode == 1, result.stdout
    assert "\nCI=1: 1 test(s) skipped" in result.stdout
    assert "test_sample.py::test_needs_something: Skipped: needs headless Chromium" in result.stdout


def test_outside_ci_a_skip_stays_a_skip(tmp_path):
    result = _run_pytest(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout and "CI=1" not in result.stdout
