"""The grid benchmarks run at tiny sizes, and their batched and looped results agree (no timing is asserted)."""

import os
import re
import subprocess
import sys

from experiments.benchmarks import exact_grid, preview_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preview_grid_batched_equals_loop():
  r = preview_grid.run(spacing=0.25, chunk_size=8, repeats=0, map_steps=10, full=True, full_alphas=3, floor=False)
  assert r["num_alphas"] == 15
  assert r["diag"]["max_abs_nll_diff"] < 1e-5
  assert r["diag"]["acc_flips"] <= 1  # a near-tie argmax may flip under a different summation order
  assert r["full"]["max_abs_nll_diff"] < 1e-4  # a Cholesky solve per alpha, batched vs one at a time
  assert r["full"]["num_alphas"] == 3


def test_exact_grid_joint_train_equals_loop():
  r = exact_grid.run(spacing=0.5, steps=20, chunk_sizes=[2, 6], repeats=1, loop_alphas=3, floor=False)
  assert r["num_alphas"] == 6 and r["loop_alphas"] == 3
  assert r["best_chunk_size"] in (2, 6)
  assert r["max_abs_nll_diff"] < 1e-5
  assert r["acc_flips"] <= 1


def test_streaming_memory_script_runs_and_agrees():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.streaming_memory", "--params=200000", "--layers=2",
       "--spacing=0.25", "--chunk_size=4", "--check_alphas=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "G=15 alphas" in out
  assert re.search(r"peak RSS of the process \(ru_maxrss\) [\d.]+ GB", out)
  diff = float(re.search(r"max \|preview - per-alpha merge \+ evaluate\| = (\S+)", out).group(1))
  assert diff < 1e-5
