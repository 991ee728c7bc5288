"""Shared test fixtures."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test body with float64 enabled (the oracle precision)."""
  with jax.enable_x64(True):
    yield
