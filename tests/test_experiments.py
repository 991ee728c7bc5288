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
  if "experiment" in full:  # run by experiments/preview.py: the module it dispatches to exists
    assert full.experiment == small.experiment
    importlib.import_module(f"experiments.{full.experiment}")
  else:  # a benchmark with its own main, experiments/<config name>.py
    assert "experiment" not in small
    importlib.import_module(f"experiments.{name}")
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
  from bmerge import metrics  # pylint: disable=g-import-not-at-top
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  assert m == json.loads(json.dumps(comparison.summary))
  alphas = grid.simplex(3, config.spacing)
  assert set(m["methods"]) == set(config.methods)
  assert m["num_alphas"] == len(alphas)
  # Joint training's per-example results [G, N], read from its chunks; the accuracies follow from the task of each
  # test example's class (counted here from the labels, apart from the experiment).
  exact = _chunks(os.path.join(workdir, "exact"), alphas)
  onehot = _task_onehot(config)
  assert exact.shape == (len(alphas), len(onehot)) and set(np.unique(exact)) <= {0.0, 1.0}
  exact_acc = metrics.per_task_accuracy(exact.astype(np.float64), onehot)  # [G, 1 + T]
  np.testing.assert_allclose(comparison.surfaces["exact"], exact_acc, atol=1e-6)
  for name, row in m["methods"].items():
    assert any(np.allclose(row["best_alpha"], a) for a in alphas)
    # The best preview alpha's exact accuracy is the exact surface there (a lookup that could go wrong).
    g = int(np.flatnonzero(np.all(np.isclose(alphas, row["best_alpha"]), axis=1))[0])
    assert row["exact_at_best"] == pytest.approx(float(exact_acc[g, 0]), abs=1e-6)
    lo, hi = row["mse_ci"]  # a bootstrap over the test examples (one training seed)
    assert lo <= row["mse"] <= hi
  assert m["costs"]["exact"]["seconds"] > 0 and m["costs"]["exact"]["computed_rows"] == len(alphas)
  assert all(m["costs"][f"posteriors {k}"]["seconds"] > 0 for k in ("maps", "von"))

  # At the vertices the merged model of every rule built on the task MAPs is that MAP, and the MAP is the joint
  # training at that vertex (same optimizer, budget and init): preview == exact there, example by example.
  vertices = [int(np.flatnonzero(np.all(np.isclose(alphas, v), axis=1))[0]) for v in np.eye(3)]
  for method in set(config.methods) & {"simple", "laplace_diag", "laplace_full"}:
    prev = _chunks(os.path.join(workdir, f"preview_{method}"), alphas)
    np.testing.assert_array_equal(prev[vertices], exact[vertices])
    np.testing.assert_array_equal(comparison.previews[method], prev)
  # The overall accuracy is the class-count-weighted mean of the per-task accuracies.
  counts = np.asarray(m["test_examples_per_task"])
  np.testing.assert_array_equal(counts, onehot.sum(0))
  np.testing.assert_allclose(exact_acc[:, 0], exact_acc[:, 1:] @ counts / counts.sum(), atol=1e-6)
  for name, front in m["pareto"].items():
    assert 0 <= front["recall"] <= 1 and front["igd"] >= 0
  return m


def _task_onehot(config):
  """[N, T]: the task of each test example's class, from the data set's labels."""
  from bmerge import data  # pylint: disable=g-import-not-at-top
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool, flatten=True)
  task_of_class = {c: t for t, group in enumerate(config.tasks) for c in group}
  return np.eye(len(config.tasks))[[task_of_class[int(c)] for c in ds.test_y]]


def _posterior_checks(config, workdir):
  """Each learner's posterior against an independent one: the Laplace posterior at the MAP (exact Hessian of the
  summed loss + prior, autodiff-checked in test_models), or the exact Hessian diagonal at the learner's own mean.

  Returns the posteriors (restored from the run's cache) and the experiment's data."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from scipy.stats import spearmanr  # pylint: disable=g-import-not-at-top
  from bmerge import data  # pylint: disable=g-import-not-at-top
  from bmerge.models import logistic  # pylint: disable=g-import-not-at-top
  from experiments import logistic as exp  # pylint: disable=g-import-not-at-top

  d = exp.load_data(config)
  posts, stages = exp.build_posteriors(config, d, os.path.join(workdir, "posteriors"))
  assert all(c.loaded for c in stages.values())  # restored from the run's cache, not rebuilt
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool, flatten=True)
  tasks = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data.split_by_classes(ds.train_x, ds.train_y, config.tasks)]
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
    d_von = von.mean - theta
    assert float(d_von @ h_map @ d_von) / d_von.size < 0.1
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
  return posts, d


def _oracle_checks(config, comparison, posts, d):
  """At every alpha off the vertices, each preview's per-example results are those of the float64 oracle's merged
  model (`merge_oracles.merged`: Eq. 2, Eq. 10 or the EM, from the saved posteriors), except where that model's two
  largest logits are within `tie` of each other (float32 rounding of the merge can decide those)."""
  import merge_oracles  # pylint: disable=g-import-not-at-top
  alphas = grid.simplex(3, config.spacing)
  off_vertex = np.flatnonzero(np.max(alphas, axis=1) < 1)
  x, y = (np.asarray(v, np.float64) for v in d.test)
  x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  c = d.num_classes
  tie = 1e-4 * np.max(np.abs(x1).sum(axis=1))  # |logit change| <= sum_d |x_d| max|delta theta|, max|delta theta| 1e-4
  ties, oracles = {}, {}
  for method in config.methods:
    theta = merge_oracles.merged(posts[method], alphas[off_vertex], config.em_iters)  # [G, P]
    w, b = theta[:, :-c].reshape(len(theta), -1, c), theta[:, -c:]
    logits = np.einsum("nd,gdc->gnc", x, w) + b[:, None]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    near = top2[..., 1] - top2[..., 0] < tie
    oracle = (np.argmax(logits, axis=-1) == y).astype(np.float32)
    prev = comparison.previews[method][off_vertex]
    np.testing.assert_array_equal(np.where(near, 0, prev), np.where(near, 0, oracle), err_msg=method)
    ties[method], oracles[method] = int(near.sum()), oracle
    assert ties[method] <= 0.01 * near.size, (method, ties[method])
  # The check tells the rules apart: another rule's oracle disagrees with a preview on many examples.
  for method, other in (("laplace_full", "simple"), ("mog", "von")):
    assert np.sum(comparison.previews[method][off_vertex] != oracles[other]) > 20, (method, other)
  return ties


def test_logistic_small_end_to_end_and_resume(tmp_path):
  from experiments import logistic as exp

  config = _load_config("digits_imbalanced", "small")
  config.run_recommended = True
  config.lock()  # the experiment adds nothing to its config
  workdir = str(tmp_path / "run")
  comparison = exp.run(config, workdir)
  m = _check_logistic_run(config, workdir, comparison)
  posts, d = _posterior_checks(config, workdir)
  _oracle_checks(config, comparison, posts, d)
  # Joint training at the recommended alphas reproduces the exact baseline there; the regret follows from it.
  rec, joint = m["recommendation"], m["recommended_joint"]
  alphas = grid.simplex(3, config.spacing)
  exact = _chunks(os.path.join(workdir, "exact"), alphas).mean(axis=1)
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

  # The command line on the same workdir resumes: nothing is trained or previewed again, results are identical, and
  # every stage reports the seconds, run and machine stored when it was computed, marked as loaded.
  before = _mtimes(workdir)
  proc = subprocess.run([sys.executable, "-m", "experiments.preview", "--config=configs/digits_imbalanced.py:small",
                         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == f"run folder: {os.path.abspath(workdir)}"
  after = _mtimes(workdir)
  changed = [p for p, t in before.items() if after.get(p) != t and not p.endswith(("metrics.json", "surfaces.npz"))]
  assert changed == []
  m2 = json.load(open(os.path.join(workdir, "metrics.json")))
  for name in m["methods"]:
    assert m2["methods"][name]["mse"] == m["methods"][name]["mse"]
  assert len({cost["run"] for cost in m["costs"].values()}) == 1  # all computed by the first run
  for stage, cost in m["costs"].items():
    assert m2["costs"][stage]["loaded"], stage
    assert m2["costs"][stage]["seconds"] == pytest.approx(cost["seconds"], rel=1e-12), stage
    assert m2["costs"][stage]["run"] == cost["run"], stage


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
  assert m["test_examples_per_task"] and sum(m["test_examples_per_task"]) == 200 == m["num_examples"]


@pytest.mark.slow
def test_digits_full_config(tmp_path):
  from experiments import logistic as exp
  assert exp.run(_load_config("digits_imbalanced"), str(tmp_path)).summary["num_alphas"] == 1326
