"""End to end: the 2-D toy of Fig. 2 (experiments/toy2d.py, bmerge.models.toy2d) on its small config.

One run (module fixture) is checked for what must be true of it: the metrics against the saved arrays, the exact
map's first-order condition, the merges at the simplex vertices and at the surrogates' modes, the posteriors against
2-D quadrature of exp(-beta loss_t) (VON: the Gaussian variational fixed point and the moments; the mixture: its
KL divergence to the target), the figures; a second run in the same workdir must restore the posteriors instead of
training them again.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpy.polynomial.hermite_e import hermegauss

import bmerge
from bmerge.models import toy2d as toy
from bmerge.optim import mog as mog_lib
from bmerge.optim import von as von_lib
from configs import toy2d as toy_config
from experiments import toy2d

# One worker runs this module, so its module fixture (the `:small` run) is computed once (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("toy2d_small")

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
    return -jnp.sum(alpha * jax.vmap(lambda q: toy.log_density(q, theta))(stacked))

  return jax.vmap(jax.grad(surrogate, argnums=1))(alphas, thetas), jax.vmap(jax.hessian(surrogate, argnums=1))(
      alphas, thetas)


def _scale(posterior):
  """The largest precision entry of a stacked posterior: the scale of the surrogate's gradient."""
  prec = posterior.components.precision if isinstance(posterior, bmerge.Mixture) else posterior.precision
  return max(1.0, float(jnp.max(jnp.abs(prec))))


def test_metrics_json_matches_the_saved_arrays(small):
  config, workdir, result, _ = small
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(result["metrics"]))
  assert set(saved["methods"]) == {"simple", "von", "mog"}
  for m in saved["methods"].values():
    assert METHOD_KEYS <= set(m)
    assert len(m["best_alpha"]) == 3 and m["mse"] >= 0.0
  num = len(bmerge.grid.simplex(3, config.spacing))
  assert saved["num_alphas"] == saved["num_exact_alphas"] == num and not saved["maximize"]
  assert len(saved["exact_best_alpha"]) == 3
  stages = {"posteriors simple", "posteriors von", "posteriors mog", "preview simple", "preview von", "preview mog",
            "exact", "figures of the plane"}
  assert stages <= set(saved["costs"]) and all(v["seconds"] >= 0.0 for v in saved["costs"].values())
  order = saved["paper_ordering"]
  assert order["paper"] == ["simple", "von", "mog"]
  assert order["holds"] == (saved["methods"]["simple"]["mse"] > saved["methods"]["von"]["mse"] >
                            saved["methods"]["mog"]["mse"])
  # The exact surface is the minimum over theta, so no preview lies below it; the MSE is the mean squared excess.
  arr = result["arrays"]
  for m in ("simple", "von", "mog"):
    excess = arr[f"{m}_loss"] - arr["exact_loss"]
    assert np.all(excess >= -1e-5), m
    np.testing.assert_allclose(saved["methods"][m]["mse"], np.mean(excess ** 2), rtol=1e-6)
    d = np.linalg.norm(arr[f"{m}_theta"] - arr["exact_theta"], axis=1)
    np.testing.assert_allclose(saved["distance"][m]["mean"], np.mean(d), rtol=1e-5)
    # The preview's losses are those of the merged thetas (computed apart from bmerge.compare's preview).
    theta = jnp.asarray(arr[f"{m}_theta"])
    losses = np.asarray(jax.vmap(toy.task_losses, in_axes=(0, None, None))(theta, toy2d.make_tasks(config),
                                                                            config.l2))
    np.testing.assert_allclose(arr[f"{m}_loss"], np.sum(arr["alphas"] * losses, axis=1), rtol=1e-5)


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


def test_previews_off_the_vertices_equal_float64_oracles(small):
  """At every alpha off the vertices, each merged model is the float64 oracle's (Eq. 2, Eq. 10 solved alpha by alpha,
  Algorithm 1's EM, from the saved posteriors), and each preview's per-task losses are the float64 losses there."""
  import merge_oracles  # pylint: disable=g-import-not-at-top
  config, _, result, _ = small
  arr = result["arrays"]
  off = np.flatnonzero(np.max(arr["alphas"], axis=1) < 1)
  assert len(off) == len(arr["alphas"]) - 3
  a, b = _task_arrays(config)
  for m in ("simple", "von", "mog"):
    theta = merge_oracles.merged(result["posteriors"][m], arr["alphas"][off], config.em_iters)  # [G, 2]
    np.testing.assert_allclose(arr[f"{m}_theta"][off], theta, atol=2e-5, err_msg=m)
    z = np.einsum("tnp,gp->gtn", a, theta) + b  # [G, T, N]
    zmax = z.max(axis=-1)
    losses = zmax + np.log(np.exp(z - zmax[..., None]).sum(-1)) + 0.5 * config.l2 * np.sum(theta ** 2, -1)[:, None]
    np.testing.assert_allclose(result["previews"][m][off], losses, rtol=1e-5, atol=1e-5, err_msg=m)
  # The oracles tell the rules apart: the three merged models differ by far more than the tolerance.
  von, mog = (merge_oracles.merged(result["posteriors"][m], arr["alphas"][off], config.em_iters)
              for m in ("von", "mog"))
  assert np.max(np.abs(von - mog)) > 1e-2


def test_figures_and_report_are_written(small):
  _, workdir, result, _ = small
  names = {os.path.basename(p) for p in result["figures"]}
  assert {"contours.png", "pairs.png", "histograms.png", "pareto.png", "distance.png", "solutions.png",
          "surrogates.png"} <= names
  for path in result["figures"]:
    with open(path, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
  assert result["report"] == os.path.join(str(workdir), "report.md")
  text = open(result["report"]).read()
  assert all(f"| {m} | {toy2d.DESCRIBE[m]} |" in text for m in ("simple", "von", "mog"))
  assert ("**holds**" in text) != ("**does not hold**" in text)


def test_second_run_restores_the_posteriors(small):
  config, workdir, result, calls = small
  assert calls == {"von": 1, "mog": 1}  # the first run trained each learner once (all tasks in one vmapped fit)
  again, calls2 = _run_counted(config, workdir)
  assert calls2 == {"von": 0, "mog": 0}
  for m in ("simple", "von", "mog"):
    np.testing.assert_array_equal(again["arrays"][f"{m}_theta"], result["arrays"][f"{m}_theta"])
  assert again["metrics"]["methods"] == result["metrics"]["methods"]
  # Every stage restored reports the seconds, run and machine stored when it was computed; the figures are redrawn.
  first, second = result["metrics"]["costs"], again["metrics"]["costs"]
  for stage in ("posteriors simple", "posteriors von", "posteriors mog", "exact", "preview von", "preview mog"):
    assert not first[stage]["loaded"] and second[stage]["loaded"], stage
    assert second[stage]["run"] == first[stage]["run"], stage
    assert second[stage]["seconds"] == pytest.approx(first[stage]["seconds"], rel=1e-12), stage  # sums of chunks
  assert not second["figures of the plane"]["loaded"]


# ----------------------------------------------------------------------------------------------------------------
# The posteriors against 2-D quadrature of the target p_t(theta) ∝ exp(-beta loss_t(theta)), all in float64.


def _task_arrays(config):
  return tuple(np.asarray(x, np.float64) for x in toy2d.make_tasks(config))


def _scaled_loss_derivatives(theta, a, b, config):
  """beta * (gradient [M, 2], Hessian [M, 2, 2]) of loss_t at theta [M, 2], in closed form:
  softmax(z)^T a + l2 theta and a^T (diag(s) - s s^T) a + l2 I, with z = a theta + b, s = softmax(z)."""
  z = theta @ a.T + b
  s = np.exp(z - z.max(axis=1, keepdims=True))
  s /= s.sum(axis=1, keepdims=True)
  mean_a = s @ a
  hess = np.einsum("mi,ij,ik->mjk", s, a, a) - np.einsum("mj,mk->mjk", mean_a, mean_a) + config.l2 * np.eye(2)
  return config.inverse_temperature * (mean_a + config.l2 * theta), config.inverse_temperature * hess


def test_von_is_the_gaussian_variational_fixed_point(small):
  """Full-Gaussian VI of p_t stops where E_q[grad beta loss_t] = 0 and S = E_q[hess beta loss_t] (Khan & Rue 2023);
  the expectations by 40 x 40 Gauss-Hermite quadrature under q = N(m, S^-1). The Laplace start misses this by
  0.5-1.6 standard deviations in the mean and 35-180 % in the precision; the fit reaches it up to its Monte-Carlo
  noise (measured 0.03 and 6 %)."""
  config, _, result, _ = small
  a, b = _task_arrays(config)
  nodes, weights = hermegauss(40)
  eps = np.stack(np.meshgrid(nodes, nodes), -1).reshape(-1, 2)
  w = np.outer(weights, weights).ravel() / weights.sum() ** 2
  von = result["posteriors"]["von"]
  for t in range(a.shape[0]):
    mean, prec = np.asarray(von.mean[t], np.float64), np.asarray(von.precision[t], np.float64)
    chol_cov = np.linalg.cholesky(np.linalg.inv(prec))
    grad, hess = _scaled_loss_derivatives(mean + eps @ chol_cov.T, a[t], b[t], config)
    e_grad, e_hess = w @ grad, np.einsum("m,mjk->jk", w, hess)
    assert np.linalg.norm(chol_cov.T @ e_grad) < 0.08, t  # the mean's error in posterior standard deviations
    chol = np.linalg.cholesky(prec)
    whitened = np.linalg.solve(chol, np.linalg.solve(chol, e_hess).T)  # S^-1/2 E[hess] S^-T/2, I at the fixed point
    assert np.linalg.norm(whitened - np.eye(2), 2) < 0.15, t


def _target_on_a_box(config, a, b, centre, half, n=601):
  """Points [n^2, 2] of a box, its cell area and log p_t there (p_t normalised by the same Riemann sum)."""
  xs, ys = (np.linspace(c - h, c + h, n) for c, h in zip(centre, half))
  points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
  z = points @ a.T + b
  loss = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + 0.5 * config.l2 * np.sum(points ** 2, 1)
  log_w = -config.inverse_temperature * (loss - loss.min())
  area = (xs[1] - xs[0]) * (ys[1] - ys[0])
  edge = np.exp(log_w.reshape(n, n))
  assert max(edge[[0, -1]].max(), edge[:, [0, -1]].max()) < 1e-8  # the box holds the whole mass
  return points, area, log_w - np.log(np.sum(np.exp(log_w)) * area)


def _log_q(posterior, t, points):
  one = jax.tree.map(lambda x: x[t], posterior)
  return np.asarray(toy.log_density(one, jnp.asarray(points, jnp.float32)), np.float64)


def test_posteriors_against_quadrature_of_the_target(small):
  """On a box of +-15 VON standard deviations (the target's tails are exponential): the VON mean lies within 0.15
  standard deviations of p_t's mean and its covariance under-estimates p_t's (eigenvalues of the whitened ratio in
  [0.5, 1]: KL(q || p) is mode-seeking; measured 0.61-0.93); the mixture, which minimises the same KL over a family
  holding the Gaussians, is closer to p_t than VON (measured KL 0.02 vs 0.09-0.14, total variation 0.07 vs
  0.15-0.19)."""
  config, _, result, _ = small
  a, b = _task_arrays(config)
  von, mog = result["posteriors"]["von"], result["posteriors"]["mog"]
  for t in range(a.shape[0]):
    mean_q = np.asarray(von.mean[t], np.float64)
    cov_q = np.linalg.inv(np.asarray(von.precision[t], np.float64))
    points, area, log_p = _target_on_a_box(config, a[t], b[t], mean_q, 15 * np.sqrt(np.diag(cov_q)))
    p = np.exp(log_p)
    mean_p = area * p @ points
    d = points - mean_p
    cov_p = area * np.einsum("m,mj,mk->jk", p, d, d)
    chol_p = np.linalg.cholesky(cov_p)
    assert np.linalg.norm(np.linalg.solve(chol_p, mean_q - mean_p)) < 0.15, t
    ratio = np.linalg.eigvalsh(np.linalg.solve(chol_p, np.linalg.solve(chol_p, cov_q).T))
    assert np.all((ratio > 0.5) & (ratio <= 1.0)), (t, ratio)
    kl, tv = {}, {}
    for name, q in (("von", von), ("mog", mog)):
      log_q = _log_q(q, t, points)
      q_dens = np.exp(log_q)
      assert area * q_dens.sum() == pytest.approx(1.0, abs=1e-4)  # the density integrates to one on the box
      kl[name] = area * np.sum(q_dens * (log_q - log_p))
      tv[name] = 0.5 * area * np.sum(np.abs(q_dens - p))
    assert 0.0 <= kl["mog"] < 0.05 and kl["mog"] < 0.5 * kl["von"], (t, kl)
    assert tv["mog"] < 0.1 and tv["mog"] < tv["von"], (t, tv)


def test_results_do_not_depend_on_the_cpu_device_count(small, tmp_path):
  """The command line splits the CPU into one JAX device per core (`--cpu_devices`); run on 2 devices, the `:small`
  experiment reports what the fixture's single-device run reported, to 1e-5."""
  config, _, result, _ = small
  assert jax.device_count() == 1
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "experiments.preview", "--config=configs/toy2d.py:small",
                         f"--workdir={tmp_path}", "--cpu_devices=2"], cwd=root, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(tmp_path, "metrics.json")) as f:
    split = json.load(f)
  one = json.loads(json.dumps(result["metrics"]))
  assert {c["machine"]["device_count"] for c in split["costs"].values() if c.get("machine")} == {2}
  assert set(split["methods"]) == set(one["methods"])
  for name, m in one["methods"].items():
    for key in ("mse", "best_preview", "exact_at_best", "spearman"):
      np.testing.assert_allclose(split["methods"][name][key], m[key], rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}")
    np.testing.assert_allclose(split["methods"][name]["best_alpha"], m["best_alpha"], atol=1e-7)
