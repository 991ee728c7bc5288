"""The sentiment experiment (experiments/sentiment.py) end to end on its `:small` config: the real MiniLM with LoRA on
a handful of texts per task. One run (a module fixture) is checked against what must hold whatever the numbers, and
its previews against float64 oracles at alphas inside the simplex."""

import functools
import importlib.util
import itertools
import json
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmerge
from bmerge import _fingerprint
from bmerge import checkpoint
from bmerge import exact
from bmerge import grid
from bmerge import merge
from bmerge import metrics
from bmerge.io import _sentiment
from bmerge.models import bert
from conftest import run_python
from configs import sentiment as sentiment_config
from experiments import sentiment

# One worker runs this module, so its module fixture (the `:small` run) is computed once (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("sentiment_small")

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
  cache = os.path.join(workdir, "cache")
  d = sentiment.load_data(config, cache)  # the hidden states come back from the run's cache
  cached = sentiment.build_posteriors(config, d, cache)
  assert all(c.loaded for c in cached.values())  # the same config, data and seed find the run's posteriors
  return config, workdir, out, d, {name: c.value for name, c in cached.items()}


@pytest.fixture(scope="module")
def decide(done):
  return _decisions(done[3])


def _row(alphas, alpha) -> int:
  return int(np.flatnonzero(np.all(np.isclose(alphas, alpha), axis=1))[0])


def _decisions(d):
  """`decide(trainable) -> (correct [N], margin [N])` on the test texts, from the logits: whether the predicted label
  is right, and the gap between the two logits."""
  logits_fn = jax.jit(lambda trainable: d.apply(trainable, d.test[0]))

  def decide(trainable):
    logits = np.asarray(logits_fn(trainable), np.float64)
    return (np.argmax(logits, axis=1) == d.test[1]).astype(np.float32), np.abs(logits[:, 1] - logits[:, 0])
  return decide


def _assert_same_decisions(got, want, margin, err_msg=""):
  """Per-example results agree wherever the reference model's decision is not a near-tie (logit gap >= 1e-4; float32
  rounding moves logits by ~1e-6); near-ties are rare, so the check covers almost every text."""
  decided = margin >= 1e-4
  assert decided.mean() > 0.95, err_msg
  np.testing.assert_array_equal(np.asarray(got)[decided], want[decided], err_msg=err_msg)


@needs_model_and_data
def test_preview_at_a_vertex_is_that_tasks_model(done, decide):
  config, _, out, _, posts = done
  alphas = grid.simplex(3, config.spacing)
  for method, post in (("simple", posts["adamw_sg"]), ("adamw_sg", posts["adamw_sg"]), ("ivon", posts["ivon"])):
    for t, model_t in enumerate(bmerge.unstack(post.mean)):
      _assert_same_decisions(out.previews[method][_row(alphas, np.eye(3)[t])], *decide(model_t),
                             err_msg=f"{method}, task {t}")


@needs_model_and_data
def test_previews_at_interior_alphas_match_float64_oracles(done, decide):
  """At every previewed alpha off the vertices (edges and interior), each preview's per-text results are those of the
  merged LoRA + head its rule defines, computed here in float64 from the cached posteriors: simple averaging
  sum_t alpha_t theta_t (Eq. 2) and the Hessian-weighted merge (sum_t alpha_t H_t)^-1 sum_t alpha_t H_t theta_t
  (Eq. 10) of AdamW-SG and of IVON."""
  config, _, out, d, posts = done
  alphas = grid.simplex(3, config.spacing)
  rows = [g for g, a in enumerate(alphas) if np.count_nonzero(a) > 1]
  assert sum(np.all(alphas[g] > 0) for g in rows) == 3  # (0.5, 0.25, 0.25) and its permutations
  for e in sentiment.entries(posts):
    q = jax.tree.map(lambda x: np.asarray(x, np.float64), e.posteriors)
    merged = e.rule(e.posteriors, alphas[rows])  # as the preview merges, in float32
    for r, g in enumerate(rows):
      a = alphas[g]
      if e.name == "simple":
        theta = {k: np.tensordot(a, m, 1) for k, m in q.mean.items()}
      else:
        theta = {k: np.tensordot(a, q.precision[k] * m, 1) / np.tensordot(a, q.precision[k], 1)
                 for k, m in q.mean.items()}
      chex.assert_trees_all_close({k: np.asarray(v[r], np.float64) for k, v in merged.items()}, theta, rtol=1e-5,
                                  atol=1e-6)
      want, margin = decide({k: jnp.asarray(v, jnp.float32) for k, v in theta.items()})
      _assert_same_decisions(out.previews[e.name][g], want, margin, f"{e.name} at alpha {a}")
  # The scored surfaces are the per-task accuracies of those per-text results.
  for name, values in out.previews.items():
    np.testing.assert_allclose(out.surfaces[name], metrics.per_task_accuracy(values, d.test_tasks))


@needs_model_and_data
def test_joint_training_at_a_vertex_is_the_single_task_adamw_run(done, decide):
  config, _, out, d, posts = done
  # Same init, optimizer, budget and minibatches: alpha = e_t trains exactly what task t's AdamW run trained.
  joint_batches = jax.tree.map(lambda x: np.swapaxes(x, 0, 1), sentiment.task_batches(d))
  vertices = exact.joint_train(functools.partial(bert.task_losses, d.apply), d.init, np.eye(3),
                               sentiment.adamw(config), None, joint_batches, stepwise=True, progress=False)
  chex.assert_trees_all_close(vertices, posts["adamw_sg"].mean, atol=1e-5, rtol=1e-4)
  # ... so the exact results at the vertices are those of the simple-averaging preview there.
  exact_alphas, alphas = grid.simplex(3, config.exact_spacing), grid.simplex(3, config.spacing)
  for t, model_t in enumerate(bmerge.unstack(posts["adamw_sg"].mean)):
    want, margin = decide(model_t)
    _assert_same_decisions(out.exact[_row(exact_alphas, np.eye(3)[t])], want, margin, f"exact, task {t}")
    _assert_same_decisions(out.previews["simple"][_row(alphas, np.eye(3)[t])], want, margin, f"simple, task {t}")


@needs_model_and_data
def test_merging_acts_only_on_lora_and_head(done):
  config, _, _, d, posts = done
  # The posteriors hold exactly the LoRA adapters of the chosen layers and the head.
  keys = set(posts["adamw_sg"].mean)
  assert keys == set(posts["ivon"].mean) == set(d.init)
  top = bert.load().config.num_layers - 1
  assert keys == {f"encoder.layers.{top}.attention.{p}.lora.lora_{ab}" for p in config.lora.targets for ab in "ab"} | {
      "head.kernel", "head.bias"}
  # A merged model written into the classifier changes those parameters and nothing else: every other array is the
  # pretrained MiniLM's, and the classifier computes what the previews' `apply` computes.
  merged = jax.tree.map(lambda x: x[0], merge.hessian_weighted(posts["adamw_sg"], np.array([[0.2, 0.3, 0.5]])))
  model = nnx.clone(d.model)  # at the common initialisation; only its trainable parameters are rewritten
  bert.merge_trainable(model, merged)
  state = bert.flatten_state(nnx.to_pure_dict(nnx.state(model)))
  pretrained = bert.read_hf_weights()
  frozen = set(state) - keys
  assert frozen == set(pretrained)
  for key in frozen:
    np.testing.assert_array_equal(np.asarray(state[key]), pretrained[key], err_msg=key)
  for key in keys:
    np.testing.assert_array_equal(np.asarray(state[key]), np.asarray(merged[key]), err_msg=key)
  hidden = d.test[0]
  np.testing.assert_allclose(model(hidden, bert.frozen_layers(model)), d.apply(merged, hidden), atol=1e-5)


@needs_model_and_data
def test_metrics_json_the_paper_row_and_the_reading(done):
  config, workdir, out, d, _ = done
  m = json.loads(pathlib.Path(workdir, "metrics.json").read_text())
  assert m == out.summary
  assert set(m["methods"]) == {"simple", "adamw_sg", "ivon"}
  assert (m["num_alphas"], m["num_exact_alphas"], m["num_tasks"]) == (15, 6, 3)
  assert m["num_examples"] == 3 * config.num_test == out.exact.shape[1]
  assert m["task_names"] == list(config.tasks) and m["percent"] and m["maximize"]
  for row in m["methods"].values():
    assert 0 <= row["mse"] <= 1 and 0 <= row["best_preview"] <= 1 and 0 <= row["exact_at_best"] <= 1
    assert row["mse_ci"][0] <= row["mse"] <= row["mse_ci"][1]  # bootstrap over the test texts
  paper = m["paper"]["methods"]
  assert (paper["simple"]["mse"], paper["adamw_sg"]["mse"], m["paper"]["exact_best"]) == (0.0314, 0.0281, 95.5)
  assert (paper["simple"]["best_preview"], paper["adamw_sg"]["best_preview"]) == (93.5, 93.6)
  assert m["paper_ordering"]["paper"] == ["simple", "adamw_sg"]
  simple, hessian = m["methods"]["simple"]["mse"], m["methods"]["adamw_sg"]["mse"]
  if simple != hessian:  # (a tie keeps the paper's order)
    assert m["paper_ordering"]["holds"] == (simple > hessian)
  assert {"hidden states (frozen layers)", "posteriors adamw_sg", "posteriors ivon", "exact", "preview simple",
          "preview adamw_sg", "preview ivon"} <= set(m["costs"])

  # Every task has num_test texts, so the overall accuracy is also the mean of the per-task accuracies.
  for values in out.surfaces.values():
    np.testing.assert_allclose(values[:, 0], values[:, 1:].mean(axis=1), atol=1e-6)

  # The two-task lines, by brute force: exact alphas with the third weight 0, the pair's mean accuracy.
  alphas, exact_alphas = grid.simplex(3, config.spacing), grid.simplex(3, config.exact_spacing)
  names = config.tasks
  assert set(m["pair_lines"]) == {f"{names[i]} & {names[j]}" for i, j in itertools.combinations(range(3), 2)}
  exact_acc = metrics.per_task_accuracy(out.exact, d.test_tasks)
  for i, j in itertools.combinations(range(3), 2):
    other = 3 - i - j
    rows = [r for r, a in enumerate(exact_alphas) if a[other] == 0]
    assert len(rows) == round(1 / config.exact_spacing) + 1
    exact_pair = exact_acc[rows][:, [1 + i, 1 + j]].mean(axis=1)
    for method, values in out.previews.items():
      accuracy = metrics.per_task_accuracy(values, d.test_tasks)
      preview_pair = accuracy[[_row(alphas, exact_alphas[r]) for r in rows]][:, [1 + i, 1 + j]].mean(axis=1)
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
def test_cache_keys_follow_the_config_and_the_data(done, monkeypatch):
  """The posteriors' cache keys (`checkpoint.cached`) change with a learner's setting (that learner's only) and with
  one label of the training texts (both); nothing is trained here (the cache is intercepted)."""
  config, _, _, d, posts = done

  def keys(config, d):
    seen = {}

    def intercept(path_dir, name, inputs, build_fn):
      del path_dir, build_fn
      seen[name] = _fingerprint.fingerprint(inputs)
      return checkpoint.Cached(posts[name], 1.0, True, bmerge.timing.machine())
    with monkeypatch.context() as m:
      m.setattr(sentiment.checkpoint, "cached", intercept)
      sentiment.build_posteriors(config, d, "unused")
    return seen

  base = keys(config, d)
  assert set(base) == {"adamw_sg", "ivon"} and keys(config, d) == base
  changed = lambda new: {n for n in base if new[n] != base[n]}
  lr = config.copy_and_resolve_references()
  lr.adamw.learning_rate *= 2
  assert changed(keys(lr, d)) == {"adamw_sg"}
  labels = d.train[1].copy()
  labels[1, 0] = 1 - labels[1, 0]
  assert changed(keys(config, d._replace(train=(d.train[0], labels)))) == {"adamw_sg", "ivon"}


@needs_model_and_data
def test_resume_keys_are_the_same_in_a_new_process(done):
  # The cached hidden states are keyed on the model, joint training and the previews on `apply`, whose NNX graphdefs
  # print functions with their memory addresses; a rerun (a new process) must find this run's work, not redo it.
  d = done[3]
  code = ("import functools; from bmerge import _fingerprint; from bmerge.models import bert; "
          "from configs import sentiment as c; from experiments import sentiment as s; "
          "model = s.build_model(c.get_config('small')); "
          "apply, _ = bert.split(model, start_layer=bert.frozen_layers(model)); "
          "print(_fingerprint.fingerprint([model] + [functools.partial(f, apply) for f in (bert.task_losses, "
          "s.correct)]))")
  there = run_python(code, timeout=120)
  here = _fingerprint.fingerprint([d.model] + [functools.partial(f, d.apply) for f in (bert.task_losses,
                                                                                      sentiment.correct)])
  assert there.strip() == here


def test_config_variants():
  default, small, paper = (sentiment_config.get_config(a) for a in (None, "small", "paper"))
  assert len(grid.simplex(3, default.spacing)) == 231 and len(grid.simplex(3, default.exact_spacing)) == 66
  assert len(grid.simplex(3, paper.spacing)) == 231 and len(grid.simplex(3, paper.exact_spacing)) == 66
  for c in (default, small, paper):  # every joint-training alpha is a preview alpha
    grid.nested_simplex(3, c.spacing, c.exact_spacing)
  with pytest.raises(ValueError, match="unknown config variant"):
    sentiment_config.get_config("huge")
