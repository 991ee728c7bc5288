"""The experiments end to end on their `:small` configs (the full ones are marked slow)."""

import importlib
import json
import os
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


def test_digits_small_end_to_end_and_resume(tmp_path):
  from experiments import digits

  config = _load_config("digits_imbalanced", "small")
  workdir = str(tmp_path / "run")
  result = digits.run(config, workdir)
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
  # training at that vertex (same optimizer, budget and init): preview == exact there, exactly.
  exact = np.load(os.path.join(workdir, "exact", "chunk_00000.npz"))["arr_0"]
  vertices = [int(np.flatnonzero(np.all(np.isclose(alphas, v), axis=1))[0]) for v in np.eye(3)]
  for method in ("simple", "laplace_diag", "laplace_full"):
    prev = np.concatenate([np.load(os.path.join(workdir, f"preview_{method}", f))["arr_0"]
                           for f in sorted(os.listdir(os.path.join(workdir, f"preview_{method}"))) if f.endswith(".npz")])
    exact_all = np.concatenate([np.load(os.path.join(workdir, "exact", f))["arr_0"]
                                for f in sorted(os.listdir(os.path.join(workdir, "exact"))) if f.endswith(".npz")])
    np.testing.assert_allclose(prev[vertices], exact_all[vertices], atol=1e-6)
  assert exact.shape == (config.chunk_size,)

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


@pytest.mark.slow
def test_digits_full_config(tmp_path):
  from experiments import digits
  result = digits.run(_load_config("digits_imbalanced"), str(tmp_path))
  assert result["metrics"]["num_alphas"] == 1326
