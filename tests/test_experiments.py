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


def _check_digits_run(config, workdir, result):
  """What every digits run must satisfy; returns metrics.json."""
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  alphas = grid.simplex(3, config.spacing)
  assert set(m["methods"]) == set(config.methods)
  for name, row in m["methods"].items():
    assert set(row) >= {"mse", "best_alpha", "best_preview", "exact_at_best"}
    assert 0 <= row["mse"] <= 1 and 0 <= row["best_preview"] <= 1
    assert any(np.allclose(row["best_alpha"], a) for a in alphas)
  assert 0 < m["exact_best"] <= 1 and any(np.allclose(m["exact_best_alpha"], a) for a in alphas)
  assert m["costs"]["posteriors_s"] > 0 and m["costs"]["exact_s"] > 0

  # At the vertices the merged model of every rule built on the task MAPs is that MAP, and the MAP is the joint
  # training at that vertex (same optimizer, budget and init): preview == exact there, for every accuracy.
  exact = _chunks(os.path.join(workdir, "exact"), alphas)
  assert exact.shape == (len(alphas), 4)  # overall accuracy and one per task
  vertices = [int(np.flatnonzero(np.all(np.isclose(alphas, v), axis=1))[0]) for v in np.eye(3)]
  for method in set(config.methods) & {"simple", "laplace_diag", "laplace_full"}:
    prev = _chunks(os.path.join(workdir, f"preview_{method}"), alphas)
    np.testing.assert_allclose(prev[vertices], exact[vertices], atol=1e-6)
  # The overall accuracy is the class-count-weighted mean of the per-task accuracies.
  counts = np.asarray(m["test_examples_per_task"])
  np.testing.assert_allclose(exact[:, 0], exact[:, 1:] @ counts / counts.sum(), atol=1e-6)
  for name, front in m["pareto"].items():
    assert 0 <= front["recall"] <= 1 and front["igd"] >= 0
  return m


def test_digits_small_end_to_end_and_resume(tmp_path):
  from experiments import digits

  config = _load_config("digits_imbalanced", "small")
  config.run_recommended = True
  workdir = str(tmp_path / "run")
  result = digits.run(config, workdir)
  m = _check_digits_run(config, workdir, result)
  # Joint training at the recommended alphas reproduces the exact baseline there; the regret follows from it.
  rec = result["recommendation"]
  alphas = grid.simplex(3, config.spacing)
  exact = _chunks(os.path.join(workdir, "exact"), alphas)[:, 0]
  idx = [int(np.flatnonzero(np.all(np.isclose(alphas, a), axis=1))[0]) for a in rec["alphas"]]
  np.testing.assert_allclose(rec["joint_accuracy"], exact[idx], atol=1e-6)
  assert rec["regret"] == pytest.approx(exact.max() - max(rec["joint_accuracy"]))
  assert rec["regret"] >= 0

  for fig in ("contours.png", "histograms.png"):
    with open(os.path.join(workdir, fig), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = open(result["report"]).read()
  assert "Next to the paper" in text and "0.0463" in text  # the paper's mixture MSE sits next to ours
  assert len(result["recommendation"]["alphas"]) == config.recommend_k

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


def test_digits_balanced_small(tmp_path):
  from experiments import digits
  config = _load_config("digits_balanced", "small")
  result = digits.run(config, str(tmp_path))
  _check_digits_run(config, str(tmp_path), result)
  assert "balanced split" in open(result["report"]).read()


def test_digits_experiment_on_mnist_through_tfds_mock_data(tmp_path):
  """The dataset='mnist' path (tfds.data_source) end to end, on tfds's mock data (no network here)."""
  import tensorflow_datasets as tfds
  from experiments import digits
  config = _load_config("digits_imbalanced", "small")
  config.dataset = "mnist"
  config.methods = ("simple", "ivon", "adamw_sg")  # diagonal learners: full covariance at P = 7,850 is not small
  config.spacing = 0.5
  with tfds.testing.mock_data(num_examples=200):
    result = digits.run(config, str(tmp_path))
  m = result["metrics"]
  assert set(m["methods"]) == {"simple", "ivon", "adamw_sg"} and m["num_alphas"] == 6
  assert m["test_examples_per_task"] and sum(m["test_examples_per_task"]) == 200


@pytest.mark.slow
def test_digits_full_config(tmp_path):
  from experiments import digits
  result = digits.run(_load_config("digits_imbalanced"), str(tmp_path))
  assert result["metrics"]["num_alphas"] == 1326
