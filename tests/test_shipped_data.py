"""The `shipped_data` marker of tests/conftest.py: a skip for missing shipped data, a failure with BMERGE_REQUIRE_DATA=1.

Run in a fresh pytest process on a small test file next to a copy of the real conftest.py.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

CONFTEST = pathlib.Path(__file__).resolve().parent / "conftest.py"

CASES = '''
import pytest


@pytest.fixture
def finds_it_missing():
  pytest.skip("the fixture finds the MiniLM missing")


@pytest.mark.shipped_data(True, reason="the MiniLM wheel is not installed")
def test_data_missing():
  raise AssertionError("never runs")


@pytest.mark.shipped_data(False, reason="the sentiment data are not cached")
def test_data_present():
  pass


@pytest.mark.shipped_data(False, reason="present for the marker")
def test_skipped_by_its_fixture(finds_it_missing):
  raise AssertionError("never runs")


@pytest.mark.skipif(True, reason="unrelated to shipped data")
def test_other_skip():
  pass


@pytest.mark.shipped_data(reason="no condition")
def test_malformed_marker():
  pass
'''


def _run(tmp_path, require: str) -> tuple[dict, list, str]:
  """({test name: outcome} of the tests that ran, the skip reasons, the output) of one pytest run over CASES with
  BMERGE_REQUIRE_DATA = `require`."""
  shutil.copyfile(CONFTEST, tmp_path / "conftest.py")
  (tmp_path / "test_cases.py").write_text(CASES)
  (tmp_path / "pytest.ini").write_text("[pytest]\n")
  env = dict(os.environ, BMERGE_REQUIRE_DATA=require)
  out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rA", "-q",
                        "--rootdir", str(tmp_path), str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300, check=False)
  outcomes = {name: word for word, name in re.findall(r"^(PASSED|FAILED|ERROR) test_cases\.py::(\w+)", out.stdout,
                                                     flags=re.M)}
  skipped = re.findall(r"^SKIPPED \[\d+\] \S+:\d+: (.*)$", out.stdout, flags=re.M)
  return outcomes, skipped, out.stdout


def test_missing_data_skips_without_the_variable(tmp_path):
  outcomes, skipped, stdout = _run(tmp_path, "0")
  assert outcomes.get("test_data_present") == "PASSED", stdout
  assert outcomes.get("test_malformed_marker") == "ERROR", stdout  # a marker without its condition is refused
  assert sorted(skipped) == ["the MiniLM wheel is not installed", "the fixture finds the MiniLM missing",
                             "unrelated to shipped data"], stdout


def test_missing_data_fails_with_the_variable(tmp_path):
  outcomes, skipped, stdout = _run(tmp_path, "1")
  # A failure in the setup phase (the marker, a fixture) is reported as an error; both fail the run.
  assert outcomes.get("test_data_missing") in ("FAILED", "ERROR"), stdout
  assert outcomes.get("test_skipped_by_its_fixture") in ("FAILED", "ERROR"), stdout
  assert outcomes.get("test_data_present") == "PASSED", stdout
  assert skipped == ["unrelated to shipped data"], stdout  # other skips stay skips
  assert "the MiniLM wheel is not installed" in stdout and "BMERGE_REQUIRE_DATA=1 requires it" in stdout
