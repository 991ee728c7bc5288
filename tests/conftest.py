"""Shared test fixtures, the `shipped_data` marker, and the problems and float64 oracles of the learner tests.

A test that needs data which `make test` installs (the MiniLM wheel, the sentiment data) is marked
`@pytest.mark.shipped_data(missing, reason=...)`: skipped with `reason` when `missing` is true, so a partial install
still runs the rest. With the environment variable BMERGE_REQUIRE_DATA=1 (as .ci/run sets it) every skip of such a
test, from the marker or from a `pytest.skip` in one of its fixtures, is a failure instead: CI cannot pass with the
data missing.

The tests share one persistent JAX compilation cache per run (across xdist workers and the subprocesses they start):
a function compiled by one test (say the `:small` experiments' mixture EM) is loaded, not compiled again, by the next.
Tests of compilation timing use functions that compile under the cache's one-second threshold.
"""

import functools
import os
import subprocess
import sys
import tempfile
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

REQUIRE_DATA = "BMERGE_REQUIRE_DATA"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  run = getattr(config, "workerinput", {}).get("testrunuid") or f"{os.getpid()}"
  cache = os.path.join(tempfile.gettempdir(), f"bmerge-tests-jax-cache-{run}")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache  # subprocesses started by tests inherit it
  jax.config.update("jax_compilation_cache_dir", cache)
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


def run_python(code: str, *, devices=None, timeout: float = 300, **env) -> str:
  """Runs `code` in a fresh Python process that imports bmerge from this checkout, and returns its stdout.

  With `devices`, JAX sees that many CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count). Keywords are
  set as environment variables. A non-zero exit fails the test with the end of the process's stderr.
  """
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
  if devices is not None:
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Problems and float64 oracles shared by the learner tests (import them: `from conftest import quadratic`).


class Quadratic(NamedTuple):
  """loss(params) = sum 1/2 a (params - c)^2: Hessian diag(a), minimiser c, over params {"b": [2], "w": [3, 2]}.

  `loss` pairs the leaves in pytree order, so it takes a dict or an NNX `State` of the same two entries; the params
  also serve as a linear classifier, logits = x @ w + b (3 features, 2 classes).
  """

  a: dict
  c: dict

  def loss(self, params, batch=None):
    del batch  # the minibatch of a fit driver: the loss is the same on every one
    return sum(jnp.sum(0.5 * a * (p - c) ** 2)
               for p, a, c in zip(jax.tree.leaves(params), jax.tree.leaves(self.a), jax.tree.leaves(self.c)))

  def start(self, dtype=jnp.float32):
    """A point away from the minimiser and from 0 (so gradient, momentum and weight decay all enter a step)."""
    return {"b": jnp.array([0.3, -0.2], dtype), "w": jnp.array([[0.5, -1.0], [2.0, 1.0], [-1.5, 0.25]], dtype)}


def quadratic() -> Quadratic:
  """Curvatures 0.25-8 and a minimiser with both signs."""
  return Quadratic(a={"b": np.array([3.0, 1.5]), "w": np.array([[0.5, 2.0], [8.0, 1.0], [4.0, 0.25]])},
                   c={"b": np.array([0.0, -1.0]), "w": np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 2.0]])})


def logistic_loss(theta, x, y, repeat=1.0):
  """repeat * sum_i [log(1 + exp(x_i theta)) - y_i x_i theta] + |theta|^2 / 2: logistic regression, prior N(0, I)."""
  z = x @ theta
  return repeat * jnp.sum(jnp.logaddexp(0.0, z) - y * z) + 0.5 * theta @ theta


class LogisticRegression(NamedTuple):
  loss: Callable  # theta [P] -> loss-bar, `logistic_loss` on this data
  x: np.ndarray  # [N, P] float64, the last column ones
  y: np.ndarray  # [N] float64 labels in {0, 1}
  map: np.ndarray  # [P] float64, the minimiser of loss-bar
  hessian: np.ndarray  # [P, P] float64, the Hessian of loss-bar at the MAP


@functools.lru_cache(maxsize=None)
def logistic_regression(seed=0, n=80, repeat=1.0) -> LogisticRegression:
  """N examples of 2 features and a bias from a logistic model, and the MAP with its Hessian by Newton's method in
  numpy float64."""
  rng = np.random.default_rng(seed)
  x = np.concatenate([rng.normal(size=(n, 2)), np.ones((n, 1))], axis=1)
  y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ np.array([1.5, -1.0, 0.5])))).astype(float)

  def grad_hess(theta):
    s = 1 / (1 + np.exp(-x @ theta))
    return repeat * x.T @ (s - y) + theta, repeat * (x.T * (s * (1 - s))) @ x + np.eye(3)

  theta = np.zeros(3)
  for _ in range(50):
    g, h = grad_hess(theta)
    theta = theta - np.linalg.solve(h, g)
  g, h = grad_hess(theta)
  assert np.max(np.abs(g)) < 1e-9, g
  return LogisticRegression(functools.partial(_logistic_on, x, y, repeat), x, y, theta, h)


def _logistic_on(x, y, repeat, theta):
  return logistic_loss(theta, x, y, repeat)


def ivon_step(tx, loss, ess, weight_decay, num_samples=2):
  """One IVON training step spelled out: `step(key, params, state, *batch) -> (params, state)` draws `num_samples`
  posterior samples, takes the gradient of `loss(params, *batch)` at each, and applies `tx`'s update."""
  from bmerge.optim import ivon_sample  # here, not at the top: conftest loads before every test, bmerge or not

  def step(key, params, state, *batch):
    samples, noise = ivon_sample(key, state, params, ess, weight_decay, num_samples)
    grads = jax.vmap(jax.grad(loss), in_axes=(0,) + (None,) * len(batch))(samples, *batch)
    updates, state = tx.update(grads, state, params, noise=noise)
    return optax.apply_updates(params, updates), state

  return step


def ivon_oracle(hp, params, hess, momentum, count, grads, noise):
  """One IVON update in numpy float64, leaf by leaf, from the equations (Shen et al. 2024; `bmerge.optim.ivon`).

  `hp`: lr, ess, h0, b1, b2, wd, and optionally clip (inf), hess_approx ('price'), rescale_lr and debias (True).
  `grads` and `noise` carry the Monte-Carlo axis first. Returns (updates, hess, momentum) as dicts of float64 arrays.
  """
  lr, ess, h0, b1, b2, wd = (hp[k] for k in ("lr", "ess", "h0", "b1", "b2", "wd"))
  out = ({}, {}, {})
  for k in params:
    g, n = np.asarray(grads[k], np.float64), np.asarray(noise[k], np.float64)
    p, h, m = (np.asarray(t[k], np.float64) for t in (params, hess, momentum))
    m = b1 * m + (1 - b1) * g.mean(0)
    h_hat = ess * (g * g).mean(0) if hp.get("hess_approx") == "gradsq" else ess * (h + wd) * (n * g).mean(0)
    h_new = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (h + wd)
    d = 1 - b1 ** (count + 1) if hp.get("debias", True) else 1.0
    step = np.clip((m / d + wd * p) / (h_new + wd), -hp.get("clip", np.inf), hp.get("clip", np.inf))
    out[0][k], out[1][k], out[2][k] = -lr * ((h0 + wd) if hp.get("rescale_lr", True) else 1.0) * step, h_new, m
  return out
