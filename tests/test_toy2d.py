"""End to end: the 2-D toy of Fig. 2 (experiments/toy2d.py) on its small config.

One run (module fixture) is checked for what must be true of it: the metrics schema, the exact map's first-order
condition, the merges at the simplex vertices and at the surrogates' modes, the figures; a second run in the same
workdir must restore the posteriors instead of training them again.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmerge
from bmerge.optim import mog as mog_lib
from bmerge.optim import von as von_lib
from configs import toy2d as toy_config
from experiments import toy2d

METHOD_KEYS = {"mse", "best_alpha", "best_preview", "exact_at_best", "spearman", "regret_at_1", "regret_at_5"}


class _Counter:
  """Wraps a learner's `fit` and counts the calls (each build of a posterior traces `fit` once)."""

  def __init__(self, fn):
    self.fn, self.calls = fn, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.fn(*args, **kwargs)


def _run_counted(config, workdir):
  with pytest.MonkeyPatch.context() as mp:
    von_fit, mog_fit = _Counter(von_lib.fit), _Counter(mog_lib.fit)
    mp.setattr(von_lib, "fit", von_fit)
    mp.setattr(mog_lib, "fit", mog_fit)
    result = toy2d.run(config, str(workdir))
  return result, {"von": von_fit.calls, "mog": mog_fit.calls}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("toy2d")
  config = toy_config.get_config("small")
  result, calls = _run_counted(config, workdir)
  return config, workdir, result, calls


def _grad_numpy(theta, alpha, config):
  """sum_t alpha_t grad loss_t(theta) in float64 numpy: softmax(a theta + b)^T a + l2 theta per task."""
  a, b = (np.asarray(x, np.float64) for x in toy2d.make_tasks(config))
  z = np.einsum("tnp,p->tn", a, theta) + b
  w = np.exp(z - z.max(axis=1, keepdims=True))
  w /= w.sum(axis=1, keepdims=True)
  grads = np.einsum("tn,tnp->tp", w, a) + config.l2 * theta
  return alpha @ grads


@jax.jit
def _surrogate_derivatives(stacked, alphas, thetas):
  """Gradient [G, 2] and Hessian [G, 2, 2] of -sum_t alpha_t log q_t at thetas [G, 2] (stacked q over T tasks)."""

  def surrogate(alpha, theta):
    return -jnp.sum(alpha * jax.vmap(lambda q: toy2d.log_density(q, theta))(stacked))

  return jax.vmap(jax.grad(surrogate, argnums=1))(alphas, thetas), jax.vmap(jax.hessian(surrogate, argnums=1))(
      alphas, thetas)


def _scale(posterior):
  """The largest precision entry of a stacked posterior: the scale of the surrogate's gradient."""
  prec = posterior.components.precision if isinstance(posterior, bmerge.Mixture) else posterior.precision
  return max(1.0, float(jnp.max(jnp.abs(prec))))


def test_metrics_json_has_the_summarize_schema_and_costs(small):
  config, workdir, result, _ = small
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result["metrics"]))
  assert set(saved["methods"]) == {"simple", "von", "mog"}
  for m in saved["methods"].values():
    assert METHOD_KEYS <= set(m)
    assert len(m["best_alpha"]) == 3 and m["mse"] >= 0.0
  num = len(bmerge.grid.simplex(3, config.spacing))
  assert saved["num_alphas"] == num
  assert len(saved["exact_best_alpha"]) == 3
  stages = {"minimisers_s", "von_s", "mog_s", "preview_simple_s", "preview_von_s", "preview_mog_s", "exact_s",
            "figures_s"}
  assert stages <= set(saved["costs"]) and all(v >= 0.0 for v in saved["costs"].values())
  assert isinstance(saved["paper_ordering_holds"], bool)
  # The exact surface is the minimum over theta, so no preview lies below it; the MSE is the mean squared excess.
  arr = result["arrays"]
  for m in ("simple", "von", "mog"):
    excess = arr[f"{m}_loss"] - arr["exact_loss"]
    assert np.all(excess >= -1e-5), m
    np.testing.assert_allclose(saved["methods"][m]["mse"], np.mean(excess ** 2), rtol=1e-6)
    d = np.linalg.norm(arr[f"{m}_theta"] - arr["exact_theta"], axis=1)
    np.testing.assert_allclose(saved["distance"][m]["mean"], np.mean(d), rtol=1e-5)


def test_exact_map_satisfies_the_first_order_condition(small):
  config, _, result, _ = small
  arr = result["arrays"]
  rng = np.random.default_rng(0)
  for g in [0, len(arr["alphas"]) // 2, len(arr["alphas"]) - 1] + list(rng.choice(len(arr["alphas"]), 3)):
    theta, alpha = arr["exact_theta"][g].astype(np.float64), arr["alphas"][g]
    assert np.linalg.norm(_grad_numpy(theta, alpha, config)) < 1e-4, (g, alpha)
  assert result["metrics"]["exact_max_grad_norm"] < 1e-4


def test_vertices_return_each_tasks_own_model(small):
  """At alpha = e_t every rule returns task t's own model: simple -> its minimiser (= the exact map there),
  Hessian-weighted -> the VON mean m_t, mixture -> a mode of q_t. Only simple averaging is exact at the vertices:
  the Gibbs density exp(-loss_t) is skewed, so the VON mean is not the minimiser."""
  _, _, result, _ = small
  arr, posts = result["arrays"], result["posteriors"]
  vertex_thetas = []
  for t in range(3):
    g = int(np.flatnonzero(np.all(arr["alphas"] == np.eye(3)[t], axis=1))[0])
    vertex_thetas.append(arr["mog_theta"][g])
    np.testing.assert_allclose(arr["simple_theta"][g], posts["simple"].mean[t], atol=1e-5)
    np.testing.assert_allclose(arr["exact_theta"][g], posts["simple"].mean[t], atol=1e-4)
    np.testing.assert_allclose(arr["simple_loss"][g], arr["exact_loss"][g], atol=1e-5)
    np.testing.assert_allclose(arr["von_theta"][g], posts["von"].mean[t], atol=1e-4)
  # ... and the Hessian-weighted preview is *not* exact there: the VON mean of a skewed exp(-loss_t) is off its mode.
  assert np.max(np.linalg.norm(np.asarray(posts["von"].mean) - np.asarray(posts["simple"].mean), axis=1)) > 0.05
  # The mixture merge at a vertex is EM on q_t alone: it stops at a maximum of q_t (zero gradient, negative definite
  # Hessian of log q_t, i.e. positive definite for the surrogate -log q_t).
  grad, hess = _surrogate_derivatives(posts["mog"], jnp.eye(3, dtype=jnp.float32), jnp.asarray(vertex_thetas))
  for t in range(3):
    assert float(jnp.linalg.norm(grad[t])) < 1e-3 * _scale(posts["mog"]), (t, grad[t])
    assert np.all(np.linalg.eigvalsh(np.asarray(hess[t], np.float64)) > 0), t


def test_merged_models_minimise_their_surrogates(small):
  """theta_alpha is a stationary point of -sum_t alpha_t log q_t (Hessian-weighted: exactly; EM: at convergence)."""
  _, _, result, _ = small
  arr, posts = result["arrays"], result["posteriors"]
  alphas = jnp.asarray(arr["alphas"], jnp.float32)
  for m in ("von", "mog"):
    grad, _ = _surrogate_derivatives(posts[m], alphas, jnp.asarray(arr[f"{m}_theta"]))
    norms = np.linalg.norm(np.asarray(grad), axis=1)
    assert np.all(norms < 1e-3 * _scale(posts[m])), (m, norms.max())


def test_figures_and_report_are_written(small):
  _, workdir, result, _ = small
  names = {os.path.basename(p) for p in result["figures"]}
  assert {"contours.png", "distance.png", "solutions.png", "surrogates.png"} <= names
  for path in result["figures"]:
    with open(path, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
  assert result["report"] == os.path.join(str(workdir), "report.md")
  text = open(result["report"]).read()
  assert all(f"| {m} |" in text for m in ("simple", "von", "mog"))
  assert ("**holds**" in text) != ("**does not hold**" in text)


def test_second_run_restores_the_posteriors(small):
  config, workdir, result, calls = small
  assert calls == {"von": 1, "mog": 1}  # the first run trained each learner once (all tasks in one vmapped fit)
  again, calls2 = _run_counted(config, workdir)
  assert calls2 == {"von": 0, "mog": 0}
  for m in ("simple", "von", "mog"):
    np.testing.assert_array_equal(again["arrays"][f"{m}_theta"], result["arrays"][f"{m}_theta"])
  assert again["metrics"]["methods"] == result["metrics"]["methods"]
