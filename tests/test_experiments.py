"""The experiments end to end on their `:small` configs (the full ones are marked slow)."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from bmerge import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "__init__.py")


def _load_config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_with_small_variant(name):
  full, small = _load_config(name), _load_config(name, "small")
  assert full.experiment == small.experiment
  importlib.import_module(f"experiments.{full.experiment}")  # the module the main job dispatches to exists
  with pytest.raises(ValueError, match="unknown config variant"):
    _load_config(name, "huge")


def _mtimes(folder):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(folder) for f in files if f.endswith((".npz", ".json")) or "ocdbt" in d}


def _chunks(folder, alphas):
  """The first result array saved under `folder` (any run key), in the row order of `alphas`."""
  rows, outs = [], []
  for path in sorted(pathlib.Path(folder).rglob("rows-*.npz")):
    with np.load(path) as f:
      rows.append(f["alphas"])
      outs.append(f["out_0"])
  rows, outs = np.concatenate(rows), np.concatenate(outs)
  idx = [int(np.flatnonzero(np.all(np.isclose(rows, a, atol=1e-6), axis=1))[0]) for a in alphas]
  return outs[idx]


def _check_logistic_run(config, workdir, comparison):
  """What every logistic-regression run must satisfy; returns metrics.json."""
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  assert m == json.loads(json.dumps(comparison.summary))
  alphas = grid.simplex(3, config.spacing)
  assert set(m["methods"]) == set(config.methods)
  assert m["num_alphas"] == len(alphas)
  for name, row in m["methods"].items():
    assert any(np.allclose(row["best_alpha"], a) for a in alphas)
    # The best preview alpha's exact accuracy is the exact surface there (a lookup that could go wrong).
    exact = _chunks(os.path.join(workdir, "exact"), alphas)
    g = int(np.flatnonzero(np.all(np.isclose(alphas, row["best_alpha"]), axis=1))[0])
    assert row["exact_at_best"] == pytest.approx(float(exact[g, 0]), abs=1e-6)
  assert m["costs"]["exact"] > 0 and all(m["costs"][f"posteriors {k}"] >= 0 for k in ("maps", "von"))

  # At the vertices the merged model of every rule built on the task MAPs is that MAP, and the MAP is the joint
  # training at that vertex (same optimizer, budget and init): preview == exact there, for every accuracy.
  exact = _chunks(os.path.join(workdir, "exact"), alphas)
  assert exact.shape == (len(alphas), 4)  # overall accuracy and one per task
  vertices = [int(np.flatnonzero(np.all(np.isclose(alphas, v), axis=1))[0]) for v in np.eye(3)]
  for method in set(config.methods) & {"simple", "laplace_diag", "laplace_full"}:
    prev = _chunks(os.path.join(workdir, f"preview_{method}"), alphas)
    np.testing.assert_allclose(prev[vertices], exact[vertices], atol=1e-6)
    np.testing.assert_allclose(comparison.previews[method], prev, atol=0)
  # The overall accuracy is the class-count-weighted mean of the per-task accuracies.
  counts = np.asarray(m["test_examples_per_task"])
  np.testing.assert_allclose(exact[:, 0], exact[:, 1:] @ counts / counts.sum(), atol=1e-6)
  for name, front in m["pareto"].items():
    assert 0 <= front["recall"] <= 1 and front["igd"] >= 0
  return m


def _posterior_checks(config, workdir):
  """Each learner's posterior against an independent one: the Laplace posterior at the MAP (exact Hessian of the
  summed loss + prior, autodiff-checked in test_models), or the exact Hessian diagonal at the learner's own mean."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from scipy.stats import spearmanr  # pylint: disable=g-import-not-at-top
  from bmerge import data  # pylint: disable=g-import-not-at-top
  from bmerge.models import logistic  # pylint: disable=g-import-not-at-top
  from experiments import logistic as exp  # pylint: disable=g-import-not-at-top

  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool, flatten=True)
  tasks = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data.split_by_classes(ds.train_x, ds.train_y, config.tasks)]
  costs = {}
  posts = exp.build_posteriors(config, ds, tasks, jax.random.key(config.seed), os.path.join(workdir, "posteriors"),
                               costs)
  assert all(k.startswith("posteriors ") for k in costs)  # restored from the run's cache, not rebuilt
  c, prior = ds.num_classes, config.prior_precision
  for t, (x, y) in enumerate(tasks):
    theta = posts["simple"][t]
    h_map = logistic.hessian(theta, x, c, prior)
    # The MAP: the gradient of the task loss nearly vanishes (relative to the data gradient's scale).
    grad = jax.grad(logistic.task_loss_fn(x, y, c, prior))(theta)
    assert float(jnp.linalg.norm(grad)) < 0.05 * float(jnp.sqrt(jnp.trace(h_map)))
    # VON (started at the Laplace posterior): stays within a small Mahalanobis distance of the MAP, and its precision
    # is the expected Hessian near it (the full-config run is checked in the recorded report).
    von = jax.tree.map(lambda a: a[t], posts["von"])
    d = von.mean - theta
    assert float(d @ h_map @ d) / d.size < 0.1
    assert float(jnp.linalg.norm(von.precision - h_map) / jnp.linalg.norm(h_map)) < 0.7
    # The mixture's components spread around the MAP by about one Laplace standard deviation per parameter.
    for mean in posts["mog"].components.mean[t]:
      assert 0.2 < float((mean - theta) @ h_map @ (mean - theta)) / theta.size < 2.0
    # IVON and AdamW-SG: the diagonal precision ranks parameters like the exact Hessian diagonal at the learner's
    # own mean (a fresh IVON posterior still at hess_init would rank them randomly, with ratios in the hundreds).
    for name, lo, hi in (("ivon", 0.5, 10.0), ("adamw_sg", 0.5, 2.0)):
      q = jax.tree.map(lambda a: a[t], posts[name])
      h_own = np.asarray(jnp.diagonal(logistic.hessian(q.mean, x, c, prior)))
      assert spearmanr(np.asarray(q.precision), h_own).correlation > 0.6, name
      assert lo < float(np.median(np.asarray(q.precision) / h_own)) < hi, name


def test_logistic_small_end_to_end_and_resume(tmp_path):
  from experiments import logistic as exp

  config = _load_config("digits_imbalanced", "small")
  config.run_recommended = True
  config.lock()  # the experiment adds nothing to its config
  workdir = str(tmp_path / "run")
  comparison = exp.run(config, workdir)
  m = _check_logistic_run(config, workdir, comparison)
  _posterior_checks(config, workdir)
  # Joint training at the recommended alphas reproduces the exact baseline there; the regret follows from it.
  rec, joint = m["recommendation"], m["recommended_joint"]
  alphas = grid.simplex(3, config.spacing)
  exact = _chunks(os.path.join(workdir, "exact"), alphas)[:, 0]
  idx = [int(np.flatnonzero(np.all(np.isclose(alphas, a), axis=1))[0]) for a in joint["alphas"]]
  np.testing.assert_allclose(joint["joint_accuracy"], exact[idx], atol=1e-6)
  assert joint["regret"] == pytest.approx(exact.max() - max(joint["joint_accuracy"]))
  assert np.allclose(rec["alphas"], joint["alphas"]) and len(rec["alphas"]) == config.recommend_k

  for fig in ("contours.png", "histograms.png"):
    with open(os.path.join(workdir, fig), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = open(comparison.paths["report"]).read()
  assert "0.0463" in text  # the paper's mixture MSE sits next to ours
  assert "## Reading" in text and f"{m['methods']['von']['mse']:.4f}" in text

  # The command line on the same workdir resumes: nothing is trained or previewed again, results are identical.
  before = _mtimes(workdir)
  proc = subprocess.run([sys.executable, "-m", "experiments.preview", "--config=configs/digits_imbalanced.py:small",
                         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == f"run folder: {os.path.abspath(workdir)}"
  after = _mtimes(workdir)
  changed = [p for p, t in before.items() if after.get(p) != t and not p.endswith("metrics.json")]
  assert changed == []
  m2 = json.load(open(os.path.join(workdir, "metrics.json")))
  for name in m["methods"]:
    assert m2["methods"][name]["mse"] == m["methods"][name]["mse"]


def test_logistic_balanced_small(tmp_path):
  from experiments import logistic as exp
  config = _load_config("digits_balanced", "small")
  comparison = exp.run(config, str(tmp_path))
  _check_logistic_run(config, str(tmp_path), comparison)
  assert "balanced split" in open(comparison.paths["report"]).read()


def test_logistic_experiment_on_mnist_through_tfds_mock_data(tmp_path):
  """The dataset='mnist' path (tfds.data_source) end to end, on tfds's mock data (no network here)."""
  import tensorflow_datasets as tfds
  from experiments import logistic as exp
  config = _load_config("digits_imbalanced", "small")
  config.dataset = "mnist"
  config.methods = ("simple", "ivon", "adamw_sg")  # diagonal learners: full covariance at P = 7,850 is not small
  config.spacing = config.exact_spacing = 0.5
  with tfds.testing.mock_data(num_examples=200):
    m = exp.run(config, str(tmp_path)).summary
  assert set(m["methods"]) == {"simple", "ivon", "adamw_sg"} and m["num_alphas"] == 6
  assert m["test_examples_per_task"] and sum(m["test_examples_per_task"]) == 200


@pytest.mark.slow
def test_digits_full_config(tmp_path):
  from experiments import logistic as exp
  assert exp.run(_load_config("digits_imbalanced"), str(tmp_path)).summary["num_alphas"] == 1326
