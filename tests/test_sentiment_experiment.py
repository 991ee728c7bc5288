"""The sentiment experiment (experiments/sentiment.py) end to end on its `:small` config: the real MiniLM with LoRA on
a handful of texts per task. One run (a module fixture) is checked against what must hold whatever the numbers."""

import functools
import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import bmerge
from bmerge import _fingerprint
from bmerge.io import _sentiment
from bmerge import checkpoint
from bmerge import exact
from bmerge import grid
from bmerge import merge
from bmerge.models import bert
from configs import sentiment as sentiment_config
from experiments import sentiment

_CACHE = _sentiment.data_dir() / _sentiment.SUBDIR
needs_model_and_data = pytest.mark.shipped_data(
    importlib.util.find_spec(bert.MINILM_PACKAGE) is None
    or not all((_CACHE / n).is_file() for n in _sentiment.FILES.values()),
    reason=f"needs the MiniLM wheel ({bert.MINILM_INSTALL}) and the sentiment data in {_CACHE} "
           "(`python -m bmerge.io._sentiment`)")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
  config = sentiment_config.get_config("small")
  workdir = str(tmp_path_factory.mktemp("sentiment"))
  out = sentiment.run(config, workdir)
  setup = sentiment.prepare(config, workdir)  # the hidden states come back from the run's cache
  posts = {name: checkpoint.restore_posterior(next(pathlib.Path(workdir, "posteriors").glob(f"{name}-*")))[0]
           for name in ("adamw_sg", "ivon")}
  return config, workdir, out, setup, posts


def _row(alphas, alpha) -> int:
  return int(np.flatnonzero(np.all(np.isclose(alphas, alpha), axis=1))[0])


@needs_model_and_data
def test_preview_at_a_vertex_is_that_tasks_model(done):
  config, _, out, setup, posts = done
  alphas = grid.simplex(3, config.spacing)
  accuracy = jax.jit(bert.task_accuracies)
  for method, post in (("simple", posts["adamw_sg"]), ("adamw_sg", posts["adamw_sg"]), ("ivon", posts["ivon"])):
    for t, model_t in enumerate(bmerge.unstack(post.mean)):
      expected = np.asarray(accuracy(setup.apply, model_t, setup.test))
      np.testing.assert_allclose(out.previews[method][_row(alphas, np.eye(3)[t])], expected, atol=1e-6,
                                 err_msg=f"{method}, task {t}")


@needs_model_and_data
def test_joint_training_at_a_vertex_is_the_single_task_adamw_run(done):
  config, _, out, setup, posts = done
  # Same init, optimizer, budget and minibatches: alpha = e_t trains exactly what task t's AdamW run trained.
  joint_batches = jax.tree.map(lambda x: np.swapaxes(x, 0, 1), setup.task_batches)
  vertices = exact.joint_train(functools.partial(bert.task_losses, setup.apply), setup.init, np.eye(3),
                               sentiment.adamw(config), None, joint_batches, stepwise=True, progress=False)
  chex.assert_trees_all_close(vertices, posts["adamw_sg"].mean, atol=1e-5, rtol=1e-4)
  # ... so the exact accuracies at the vertices are those of the simple-averaging preview there.
  exact_alphas, alphas = grid.simplex(3, config.exact_spacing), grid.simplex(3, config.spacing)
  for t in range(3):
    np.testing.assert_allclose(out.exact[_row(exact_alphas, np.eye(3)[t])],
                               out.previews["simple"][_row(alphas, np.eye(3)[t])], atol=1e-6)


@needs_model_and_data
def test_merging_acts_only_on_lora_and_head(done):
  config, _, _, setup, posts = done
  # The posteriors hold exactly the LoRA adapters of the chosen layers and the head.
  keys = set(posts["adamw_sg"].mean)
  assert keys == set(posts["ivon"].mean) == set(setup.init)
  top = bert.load().config.num_layers - 1
  assert keys == {f"encoder.layers.{top}.attention.{p}.lora.lora_{ab}" for p in config.lora.targets for ab in "ab"} | {
      "head.kernel", "head.bias"}
  # A merged model written into the classifier changes those parameters and nothing else: every other array is the
  # pretrained MiniLM's, and the classifier computes what the previews' `apply` computes.
  merged = jax.tree.map(lambda x: x[0], merge.hessian_weighted(posts["adamw_sg"], np.array([[0.2, 0.3, 0.5]])))
  model = setup.model  # at the common initialisation; only its trainable parameters are rewritten
  bert.merge_trainable(model, merged)
  state = bert.flatten_state(nnx.to_pure_dict(nnx.state(model)))
  pretrained = bert.read_hf_weights()
  frozen = set(state) - keys
  assert frozen == set(pretrained)
  for key in frozen:
    np.testing.assert_array_equal(np.asarray(state[key]), pretrained[key], err_msg=key)
  for key in keys:
    np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(merged[key]), err_msg=key)
  hidden = setup.test[0]
  np.testing.assert_allclose(model(hidden, bert.frozen_layers(model)), setup.apply(merged, hidden), atol=1e-5)


@needs_model_and_data
def test_metrics_json_the_paper_row_and_the_reading(done):
  config, workdir, out, _, _ = done
  m = json.loads(pathlib.Path(workdir, "metrics.json").read_text())
  assert m == out.summary
  assert set(m["methods"]) == {"simple", "adamw_sg", "ivon"}
  assert (m["num_alphas"], m["num_exact_alphas"], m["num_tasks"]) == (15, 6, 3)
  assert m["task_names"] == list(config.tasks) and m["percent"] and m["maximize"]
  for row in m["methods"].values():
    assert 0 <= row["mse"] <= 1 and 0 <= row["best_preview"] <= 1 and 0 <= row["exact_at_best"] <= 1
  paper = m["paper"]["methods"]
  assert (paper["simple"]["mse"], paper["adamw_sg"]["mse"], m["paper"]["exact_best"]) == (0.0314, 0.0281, 95.5)
  assert (paper["simple"]["best_preview"], paper["adamw_sg"]["best_preview"]) == (93.5, 93.6)
  assert m["paper_ordering"]["paper"] == ["simple", "adamw_sg"]
  simple, hessian = m["methods"]["simple"]["mse"], m["methods"]["adamw_sg"]["mse"]
  if simple != hessian:  # (a tie keeps the paper's order)
    assert m["paper_ordering"]["holds"] == (simple > hessian)
  assert {"load + cache frozen layers", "posteriors adamw_sg", "posteriors ivon", "exact", "preview simple",
          "preview adamw_sg", "preview ivon"} <= set(m["costs"])

  # The overall accuracy is the mean of the per-task accuracies, in the previews and in joint training.
  for values in itertools.chain(out.previews.values(), [out.exact]):
    np.testing.assert_allclose(values[:, 0], values[:, 1:].mean(axis=1), atol=1e-6)

  # The two-task lines, by brute force: exact alphas with the third weight 0, the pair's mean accuracy.
  alphas, exact_alphas = grid.simplex(3, config.spacing), grid.simplex(3, config.exact_spacing)
  names = config.tasks
  assert set(m["pair_lines"]) == {f"{names[i]} & {names[j]}" for i, j in itertools.combinations(range(3), 2)}
  for i, j in itertools.combinations(range(3), 2):
    other = 3 - i - j
    rows = [r for r, a in enumerate(exact_alphas) if a[other] == 0]
    assert len(rows) == round(1 / config.exact_spacing) + 1
    exact_pair = out.exact[rows][:, [1 + i, 1 + j]].mean(axis=1)
    for method, values in out.previews.items():
      preview_pair = values[[_row(alphas, exact_alphas[r]) for r in rows]][:, [1 + i, 1 + j]].mean(axis=1)
      line = m["pair_lines"][f"{names[i]} & {names[j]}"][method]
      assert line["mse"] == pytest.approx(np.mean((preview_pair - exact_pair) ** 2), abs=1e-12)
      assert abs(line["largest_gap"]) == pytest.approx(np.max(np.abs(preview_pair - exact_pair)), abs=1e-12)

  # The reading is written from these numbers.
  for method in ("adamw_sg", "ivon"):
    mse, simple = m["methods"][method]["mse"], m["methods"]["simple"]["mse"]
    verdict = "tracks joint training better than" if mse < simple else "does not track joint training better than"
    assert f"{method} {verdict} simple averaging by MSE: {mse:.4f} vs {simple:.4f}" in m["notes"]
  report = (pathlib.Path(workdir) / "report.md").read_text()
  assert m["notes"] in report and "0.0314" in report and "95.5" in report
  assert {"contours.png", "pairs.png", "pareto.png"} <= set(m["figures"])
  assert all((pathlib.Path(workdir) / f).is_file() for f in m["figures"])


@needs_model_and_data
def test_resume_keys_are_the_same_in_a_new_process(done):
  # Joint training and the previews store their chunks under a content hash of `apply`, whose NNX graphdefs print
  # functions with their memory addresses; a rerun (a new process) must find this run's chunks, not train again.
  config, _, _, setup, _ = done
  code = ("import functools; from bmerge import _fingerprint; from bmerge.models import bert; "
          "from configs import sentiment as c; from experiments import sentiment as s; "
          "model = s.build_model(c.get_config('small')); "
          "apply, _ = bert.split(model, start_layer=bert.frozen_layers(model)); "
          "print(_fingerprint.fingerprint([functools.partial(f, apply) for f in (bert.task_losses, "
          "bert.task_accuracies)]))")
  root = pathlib.Path(__file__).resolve().parents[1]
  there = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
  here = _fingerprint.fingerprint([functools.partial(f, setup.apply) for f in (bert.task_losses, bert.task_accuracies)])
  assert there.stdout.strip() == here


def test_config_variants():
  default, small, paper = (sentiment_config.get_config(a) for a in (None, "small", "paper"))
  assert len(grid.simplex(3, default.spacing)) == 231 and len(grid.simplex(3, default.exact_spacing)) == 66
  assert len(grid.simplex(3, paper.spacing)) == 231 and len(grid.simplex(3, paper.exact_spacing)) == 66
  for c in (default, small, paper):  # every joint-training alpha is a preview alpha
    assert all(np.any(np.all(np.isclose(grid.simplex(3, c.spacing), a), axis=1))
               for a in grid.simplex(3, c.exact_spacing))
  with pytest.raises(ValueError, match="unknown config variant"):
    sentiment_config.get_config("huge")


def test_minibatches_are_epochs_of_a_permutation():
  config = sentiment_config.get_config("small")
  idx = sentiment.minibatches(config, 3)
  assert idx.shape == (config.num_steps, 3, config.batch_size)
  for t in range(3):
    seq = idx[:, t].reshape(-1)
    for start in range(0, len(seq), config.num_train):  # each full epoch visits every text once
      epoch = seq[start:start + config.num_train]
      assert len(set(epoch.tolist())) == len(epoch) and epoch.max() < config.num_train
  assert not np.array_equal(idx[:, 0], idx[:, 1])  # tasks draw their own orders
