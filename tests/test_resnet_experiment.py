"""Fig. 3 pipeline (experiments/resnet.py, configs/resnet20_multiivon.py) and the library pieces it added:
`bmerge.optim.multi_ivon.select` (the paper's seed x stop subsets), `collect(step_loop='python')` and
`bmerge.exact.joint_train_ivon` (weighted joint finetuning with IVON).

The ResNet-20 parameter count is checked in tests/test_resnet.py and the warm start's Hessian on a closed form in
tests/test_fit.py. Here the `:small` run (one module fixture) is checked against oracles computed in the tests: its
previews at every alpha off the vertices against the float64 merges (Eqs. 2, 10 and the EM of Eq. 12) evaluated
alone, its vertices against the tasks' own finetunes, the exact answer at a vertex against a single-task IVON run,
its posteriors' cache keys against changes of config, data and seed, and its resumption.
"""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bmerge
from bmerge import _fingerprint
from bmerge import checkpoint
from bmerge import data
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import metrics
from bmerge.merge import em
from bmerge.models import resnet
from bmerge.optim import ivon, ivon_posterior, ivon_sample
from bmerge.optim import multi_ivon

# One worker runs this module, so its module fixture (the `:small` run) is computed once (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("resnet_small")


# ---------------------------------------------------------------------------------------------------------------
# Library pieces, on small closed-form problems.


def _mixture(num_tasks, num_seeds, stops):
  """Component (t, seed, stop) has mean 100 t + 10 seed + stop: its position is readable from its value."""
  means = [[100.0 * t + 10.0 * s + stop for s in range(num_seeds) for stop in stops] for t in range(num_tasks)]
  k = num_seeds * len(stops)
  return bmerge.Mixture(bmerge.DiagGaussian({"w": jnp.asarray(means)[..., None]},
                                            {"w": jnp.ones((num_tasks, k, 1))}),
                        jnp.full((num_tasks, k), -math.log(k)))


def test_select_keeps_the_papers_seed_by_stop_subsets():
  stops = (25, 50, 75, 100, 125, 150)
  mix = _mixture(3, 5, stops)  # stacked over 3 tasks, K = 30 seed-major
  for keep, k in (((100, 150), 10), ((75, 100, 125, 150), 20), (stops, 30)):
    sub = multi_ivon.select(mix, stops, keep_stops=keep)
    assert sub.log_weights.shape == (3, k)
    np.testing.assert_allclose(sub.log_weights, -math.log(k), rtol=1e-6)
    expected = [[100 * t + 10 * s + stop for s in range(5) for stop in keep] for t in range(3)]
    np.testing.assert_array_equal(sub.components.mean["w"][..., 0], expected)
    assert sub.components.precision["w"].shape == (3, k, 1)
  # IVON-Hess: one seed at the last stop; keep_stops given out of order still come in stop order.
  one = multi_ivon.select(mix, stops, keep_stops=[150], seeds=[2])
  np.testing.assert_array_equal(one.components.mean["w"][:, 0, 0], [170.0, 270.0, 370.0])
  two = multi_ivon.select(mix, stops, keep_stops=[150, 25], seeds=[1])
  np.testing.assert_array_equal(two.components.mean["w"][0, :, 0], [35.0, 160.0])
  # A K = 1 selection merges like the Hessian-weighted rule on its component (paper: EM with K = 1 is Eq. 10).
  alphas = grid.simplex(3, 0.5)
  chex.assert_trees_all_close(bmerge.merge.mixture_weighted(one, alphas, num_iters=3),
                              bmerge.merge.hessian_weighted(jax.tree.map(lambda a: a[:, 0], one.components), alphas),
                              rtol=1e-6)
  for bad, match in (([200], "`keep_stops`"), ([25, 25], "`keep_stops`"), ([], "`keep_stops`")):
    with pytest.raises(ValueError, match=match):
      multi_ivon.select(mix, stops, keep_stops=bad)
  with pytest.raises(ValueError, match="`seeds`"):
    multi_ivon.select(mix, stops, seeds=[5])
  with pytest.raises(ValueError, match="multiple"):
    multi_ivon.select(mix, (25, 50, 75, 100), keep_stops=[25])
  with pytest.raises(TypeError, match="`mixture`"):
    multi_ivon.select(mix.components, stops)


def _linear_problem():
  x = jax.random.normal(jax.random.key(3), (64, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5])
  loss = lambda p, idx: jnp.mean((x[idx] @ p["w"] + p["b"] - y[idx]) ** 2)
  task_losses = lambda p, idx: jnp.stack([loss(p, idx), jnp.mean((x[idx] @ p["w"] + p["b"]) ** 2)])
  return loss, task_losses


def test_collect_python_step_loop_equals_the_scanned_loop():
  loss, _ = _linear_problem()
  ess, wd = 64.0, 1e-3
  tx = ivon(0.05, ess, hess_init=0.5, beta2=0.99, weight_decay=wd)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  batches = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(9, 8)))

  def step(key, carry, i):
    p, s = carry
    samples, noise = ivon_sample(key, s, p, ess, wd, 2)
    grads = jax.vmap(jax.grad(loss), in_axes=(0, None))(samples, batches[i])
    updates, s = tx.update(grads, s, p, noise=noise)
    return optax.apply_updates(p, updates), s

  seen = []
  jitted = jax.jit(step)

  def python_step(key, carry, i):
    seen.append(type(i))
    return jitted(key, carry, i)

  keys = jax.random.split(jax.random.key(4), 2)
  init = lambda k: (params, tx.init(params))
  posterior = lambda c: ivon_posterior(c[0], c[1], ess, wd)
  scanned = multi_ivon.collect(keys, init, step, posterior, [3, 6, 9])
  looped = multi_ivon.collect(keys, init, python_step, posterior, [3, 6, 9], step_loop="python")
  chex.assert_trees_all_close(looped, scanned, rtol=1e-5, atol=1e-6)
  assert seen == [int] * 18  # every step from Python, with a concrete step index
  with pytest.raises(ValueError, match="`step_loop`"):
    multi_ivon.collect(keys, init, step, posterior, [3], step_loop="while")


def test_joint_train_ivon_is_ivon_on_the_weighted_loss_for_every_alpha(tmp_path):
  _, task_losses = _linear_problem()
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  batches = [np.arange(i, i + 16) % 64 for i in range(0, 192, 16)]
  alphas = np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
  kw = dict(ess=64.0, learning_rate=0.1, hess_init=0.5, weight_decay=1e-3, mc_samples=2)
  key = jax.random.key(5)
  means = exact.joint_train_ivon(key, task_losses, params, alphas, batches, progress=False, **kw)
  # Oracle per alpha: fit.ivon on alpha . task_losses with the same key and batches.
  for g, a in enumerate(alphas):
    alone = fit.ivon(key, lambda p, b, a=a: jnp.dot(a, task_losses(p, b)), params, batches, **kw)
    chex.assert_trees_all_close(jax.tree.map(lambda x, g=g: x[g], means), alone.mean, rtol=1e-5, atol=1e-6)
  assert not np.allclose(means["w"][1], means["w"][2])
  # Chunks of several alphas (one vmapped run), a stacked pytree of batches (lax.scan) and resuming agree.
  stacked = np.stack(batches)
  metric = lambda p, target: jnp.sum((p["w"] - target) ** 2)
  out = exact.joint_train_ivon(key, task_losses, params, alphas, stacked, eval_fn=metric, eval_batch=jnp.ones(3),
                               chunk_size=2, workdir=str(tmp_path), progress=False, **kw)
  np.testing.assert_allclose(out, np.sum((np.asarray(means["w"]) - 1.0) ** 2, axis=1), rtol=1e-4)
  again = exact.joint_train_ivon(key, task_losses, params, alphas[::-1], stacked, eval_fn=metric,
                                 eval_batch=jnp.ones(3), chunk_size=2, workdir=str(tmp_path), progress=False, **kw)
  np.testing.assert_array_equal(again, out[::-1])
  with pytest.raises(ValueError, match="iterator"):
    exact.joint_train_ivon(key, task_losses, params, alphas, iter(batches), **kw)
  with pytest.raises(ValueError, match="T = 3"):
    exact.joint_train_ivon(key, task_losses, params, np.ones((1, 3)) / 3, batches, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The experiment end to end on its `:small` config.


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  from configs import resnet20_multiivon
  from experiments import resnet as exp
  config = resnet20_multiivon.get_config("small")
  config.lock()  # the experiment adds nothing to its config
  workdir = str(tmp_path_factory.mktemp("resnet_small"))
  return config, workdir, exp.run(config, workdir)


def _rows(alphas, vertex):
  return int(np.flatnonzero(np.all(np.isclose(alphas, vertex), axis=1))[0])


def _pipeline(config, workdir):
  """The run's data, model and posteriors, rebuilt by the experiment's own stages (the posteriors from its cache)."""
  from experiments import resnet as exp
  d = exp.load_data(config)
  model = resnet.make(d.num_classes, config.width, config.blocks_per_stage)
  k_post, k_joint = jax.random.split(jax.random.key(config.seed))
  posteriors = exp.build_posteriors(config, model, d, k_post, os.path.join(workdir, "cache"))
  return model, d, posteriors, k_joint


def _decisions(model, d):
  """`decide(params) -> (correct [N], margin [N])` of one network on the test images, from its logits: whether the
  top class is the label, and the gap between its two largest logits (BatchNorm statistics recomputed on the
  calibration batch, as every evaluation of the experiment)."""
  logits_fn = jax.jit(resnet.make_eval_fn(model, lambda logits, y: logits, map_over_models=False))

  def decide(params):
    logits = np.asarray(logits_fn(params, d.test), np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (np.argmax(logits, axis=1) == d.test[2]).astype(np.float32), top2[:, 1] - top2[:, 0]
  return decide


def _assert_same_decisions(got, want, margin, err_msg=""):
  """Per-example results agree wherever the reference network's decision is not a near-tie (top-2 logit gap >= 1e-4;
  float32 rounding moves logits by ~1e-6); near-ties are rare, so the check covers almost every example."""
  decided = margin >= 1e-4
  assert decided.mean() > 0.99, err_msg
  np.testing.assert_array_equal(np.asarray(got)[decided], want[decided], err_msg=err_msg)


@pytest.fixture(scope="module")
def rebuilt(small_run):
  """The `:small` run's model, data and posteriors rebuilt from its cache, and `decide` on its test images."""
  config, workdir, _ = small_run
  model, d, posteriors, k_joint = _pipeline(config, workdir)
  return model, d, posteriors, k_joint, _decisions(model, d)


def test_small_run_reports_every_method_and_stage(small_run):
  config, workdir, comparison = small_run
  m = json.load(open(os.path.join(workdir, "metrics.json")))
  assert m == json.loads(json.dumps(comparison.summary))
  assert set(m["methods"]) == {"simple", "ivon_hess", "multi_ivon_k4", "multi_ivon_k6"}
  assert m["num_alphas"] == len(grid.simplex(3, config.spacing)) == 15
  assert m["num_exact_alphas"] == len(grid.simplex(3, config.exact_spacing)) == 6
  # Per-example results: one column per test image; an image of class 5 counts in two tasks.
  assert sum(m["test_examples_per_task"]) > m["num_examples"] == comparison.exact.shape[1]
  for name, row in m["methods"].items():
    assert 0 <= row["mse"] < 1 and any(np.allclose(row["best_alpha"], a) for a in grid.simplex(3, config.spacing))
    assert row["mse_ci"][0] <= row["mse"] <= row["mse_ci"][1], name  # bootstrap over the test images
  seconds = {stage: cost["seconds"] for stage, cost in m["costs"].items()}
  for stage in ("pretraining", "exact", "posteriors ivon_hess", "posteriors multi_ivon_k6", "preview ivon_hess"):
    assert seconds[stage] > 0 and not m["costs"][stage]["loaded"], stage
  assert seconds["posteriors ivon_hess"] == pytest.approx(seconds["posteriors multi_ivon_k6"] / 2)  # 1 seed of 2
  assert set(m["pareto"]) == set(m["methods"]) and m["recommendation"]["from"] == "multi_ivon_k6"
  assert m["paper"]["methods"]["simple"]["mse"] == 0.0252 and "multi_ivon_k30" not in m["paper"]["methods"]
  text = open(comparison.paths["report"]).read()
  assert "## Reading" in text and "BatchNorm" in text and "calibration batch" in text
  # The reading is generated from the numbers: the mixture MSEs appear in it, with the trend they show.
  k4, k6 = m["methods"]["multi_ivon_k4"]["mse"], m["methods"]["multi_ivon_k6"]["mse"]
  assert f"K = 4: {k4:.4g}, K = 6: {k6:.4g}" in text
  assert ("MSE falls as K grows" in text) == (k6 < k4) and ("MSE rises as K grows" in text) == (k6 > k4)
  for fig in ("contours.png", "histograms.png", "pareto.png"):
    with open(os.path.join(workdir, fig), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_small_run_previews_at_interior_alphas_match_float64_oracles(small_run, rebuilt):
  """At the alphas inside the simplex and the edge midpoints, each preview's per-image results are those of the
  merged network its rule defines, computed here in float64 from the cached posteriors: simple averaging
  sum_t alpha_t theta_t (Eq. 2), IVON-Hess (sum_t alpha_t H_t)^-1 sum_t alpha_t H_t theta_t (Eq. 10), and the
  mixtures' EM (Eq. 12) by `bmerge.merge.em.find_mode_reference` (Algorithm 1 as written, per alpha) in float64."""
  from experiments import resnet as exp
  config, _, comparison = small_run
  _, d, posteriors, _, decide = rebuilt
  assert posteriors.loaded  # the same config, data and seed find the run's posteriors
  alphas = grid.simplex(3, config.spacing)
  rows = [g for g, a in enumerate(alphas) if np.all(a > 0) or np.count_nonzero(a == 0.5) == 2]
  assert len(rows) == 6  # (0.5, 0.25, 0.25), (0.5, 0.5, 0) and their permutations
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  for e in exp.entries(config, posteriors.mixtures):
    q, a = f64(e.posteriors), alphas[rows]
    if e.name == "simple":
      theta = jax.tree.map(lambda m: np.tensordot(a, m, 1), q)
    elif e.name == "ivon_hess":
      theta = jax.tree.map(lambda m, h: np.tensordot(a, h * m, 1) / np.tensordot(a, h, 1), q.mean, q.precision)
    else:
      with jax.enable_x64(True):
        reference = jax.vmap(lambda alpha, q=q: em.find_mode_reference(q, alpha, config.em_iters))
        theta = f64(jax.jit(reference)(jnp.asarray(a)))
    for r, g in enumerate(rows):
      want, margin = decide(jax.tree.map(lambda x, r=r: jnp.asarray(x[r], jnp.float32), theta))
      _assert_same_decisions(comparison.previews[e.name][g], want, margin, f"{e.name} at alpha {alphas[g]}")
      np.testing.assert_allclose(comparison.surfaces[e.name][g],
                                 metrics.per_task_accuracy(comparison.previews[e.name][g], d.test_tasks))


def test_small_run_vertices_curvature_and_exact_answer_against_independent_oracles(small_run, rebuilt):
  from experiments import resnet as exp
  config, _, comparison = small_run
  model, d, posteriors, k_joint, decide = rebuilt
  pre, mixtures = posteriors.pretrained, posteriors.mixtures
  alphas = grid.simplex(3, config.spacing)
  f = config.finetune

  # The K = 4 mixture is seeds {0, 1} x stops {4, 6}: components 1, 2, 4, 5 of the seed-major K = 6 mixture.
  items = {e.name: e for e in exp.entries(config, mixtures)}
  chex.assert_trees_all_equal(items["multi_ivon_k4"].posteriors.components,
                              jax.tree.map(lambda a: a[:, [1, 2, 4, 5]], mixtures.components))

  # At a vertex the IVON-Hess and simple previews are that task's finetuned model (seed 0, last stop), evaluated
  # here without any merge.
  for t in range(3):
    want, margin = decide(jax.tree.map(lambda a, t=t: a[t, 2], mixtures.components.mean))  # seed 0, stop 6
    for name in ("ivon_hess", "simple"):
      _assert_same_decisions(comparison.previews[name][_rows(alphas, np.eye(3)[t])], want, margin, f"{name} {t}")

  # The finetunes started from the pretrained posterior keep its Hessian (beta2 0.9999 over 6 updates: the noisy
  # Hessian estimates move a few parameters by several per cent), while their means moved. A run that ignored the
  # pretrained posterior would restart every parameter from hess_init = 0.1 (precision 5,000).
  ratios = np.concatenate([np.reshape(np.asarray(q) / np.asarray(p)[None, None], (3, -1)) for q, p in
                           zip(jax.tree.leaves(mixtures.components.precision), jax.tree.leaves(pre.precision))], 1)
  for t in range(3):
    assert abs(np.median(ratios[t]) - 1) < 0.01 and np.mean(np.abs(ratios[t] - 1) < 0.05) > 0.95, t
  moved = max(float(jnp.max(jnp.abs(m - p[None, None]))) for m, p in zip(jax.tree.leaves(mixtures.components.mean),
                                                                          jax.tree.leaves(pre.mean)))
  assert moved > 1e-4
  assert abs(np.log(comparison.summary["hessian_kept"]["median"])) < 0.02

  # The exact answer at the vertex of task 2 is task 2's own IVON finetune from the pretrained posterior on the same
  # mixed minibatches (its loss: the cross-entropy of the batch's task-2 examples), same key and budget; the
  # minibatches are rebuilt here from the library's index stream of the joint data.
  n = config.joint.num_steps * f.updates_per_step
  idx = data.minibatch_indices(config.seed, [len(d.joint[1])], n, f.batch_size)[0]
  batches = [tuple(a[i] for a in d.joint) for i in idx]
  task2 = fit.ivon(k_joint, lambda p, b: resnet.task_cross_entropies(model, p, b)[1], pre.mean, batches,
                   ess=config.pretrain.ess, learning_rate=f.learning_rate, mc_samples=f.mc_samples,
                   hess_init=config.pretrain.hess_init, beta1=f.beta1, beta2=f.beta2, weight_decay=f.weight_decay,
                   init_posterior=pre)
  exact_alphas = grid.simplex(3, config.exact_spacing)
  _assert_same_decisions(comparison.exact[_rows(exact_alphas, [0, 1, 0])], *decide(task2.mean))
  # Joint finetuning differs across alphas (the weights matter); the surfaces are per-task accuracies in [0, 1].
  surface = comparison.surfaces["exact"]
  np.testing.assert_allclose(surface, metrics.per_task_accuracy(comparison.exact, d.test_tasks))
  assert np.ptp(surface[:, 0]) > 0 and np.all((surface >= 0) & (surface <= 1))


def test_posterior_cache_keys_follow_the_config_the_data_and_the_seed(small_run, rebuilt, monkeypatch):
  """The posteriors' cache keys (`checkpoint.cached`) change with a learner's setting, with one pixel of a task's
  images and with the seed, and only where the posterior depends on them; nothing is trained here (the cache is
  intercepted and answers with the run's posteriors)."""
  from experiments import resnet as exp
  config = small_run[0]
  model, d, posteriors, _, _ = rebuilt
  pre = posteriors.pretrained

  def keys(config, d):
    seen = {}

    def intercept(path_dir, name, inputs, build_fn):
      del path_dir, build_fn
      seen[name] = _fingerprint.fingerprint(inputs)
      value = pre if name == "pretrain" else jax.tree.map(lambda a: a[0], posteriors.mixtures)
      return checkpoint.Cached(value, 1.0, True, bmerge.timing.machine())
    with monkeypatch.context() as m:
      m.setattr(exp.checkpoint, "cached", intercept)
      exp.build_posteriors(config, model, d, jax.random.split(jax.random.key(config.seed))[0], "unused")
    return seen

  base = keys(config, d)
  assert set(base) == {"pretrain", "task0-multi_ivon", "task1-multi_ivon", "task2-multi_ivon"}
  changed = lambda new: {n for n in base if new[n] != base[n]}
  assert keys(config, d) == base
  lr = config.copy_and_resolve_references()
  lr.finetune.learning_rate *= 2
  assert changed(keys(lr, d)) == {"task0-multi_ivon", "task1-multi_ivon", "task2-multi_ivon"}
  ess = config.copy_and_resolve_references()
  ess.pretrain.ess *= 2
  assert changed(keys(ess, d)) == set(base)
  x, y = d.tasks[1]
  pixel = x.copy()
  pixel.flat[0] += 0.5
  assert changed(keys(config, d._replace(tasks=[d.tasks[0], (pixel, y), d.tasks[2]]))) == {"task1-multi_ivon"}
  seed = config.copy_and_resolve_references()
  seed.seed = 1
  assert changed(keys(seed, exp.load_data(seed))) == set(base)


def _stored(workdir):
  """Modification times of every file the run stored below its folder (cache, joint-training and preview rows)."""
  return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, names in os.walk(workdir)
          for n in names if d != workdir}


def test_small_run_resumes_without_recomputing(small_run):
  from experiments import resnet as exp
  config, workdir, comparison = small_run
  files = _stored(workdir)
  again = exp.run(config, workdir)
  assert _stored(workdir) == files  # no posterior, preview or joint-training row was computed or written again
  np.testing.assert_array_equal(again.exact, comparison.exact)
  for name, values in comparison.previews.items():
    np.testing.assert_array_equal(again.previews[name], values)
  # The cached stages report the seconds their builds took when they ran, not the time to load them.
  for stage in ("pretraining", "posteriors multi_ivon (all seeds and stops)", "exact"):
    before, after = comparison.summary["costs"][stage], again.summary["costs"][stage]
    assert after["seconds"] == before["seconds"] and after["run"] == before["run"], stage
    assert after["loaded"] and not before["loaded"], stage


def test_paper_variant_runs_its_cifar10_path_on_tfds_mock_data(tmp_path):
  """`:paper` as an accelerator would run it (CIFAR-10 through tfds at 32x32x3, several IVON updates per finetuning
  step, the merged models evaluated as one batch, chunks of 22), shrunk only in sizes: mock images, ResNet-8 at
  width 0.25, batches of 8, 2 updates per step, a few steps. Checked: the network sees the colour images, the
  vertices of the previews are the tasks' own finetunes evaluated alone (the batched evaluation path), and the exact
  answer has a value in [0, 1] at every alpha."""
  import tensorflow_datasets as tfds
  from configs import resnet20_multiivon
  from experiments import resnet as exp
  config = resnet20_multiivon.get_config("paper")
  paper = config.copy_and_resolve_references()
  config.width, config.blocks_per_stage, config.calibration_size = 0.25, 1, 32
  config.pretrain.num_steps, config.pretrain.mc_samples, config.pretrain.batch_size = 2, 2, 8
  config.finetune.batch_size = 8
  config.finetune.num_seeds, config.finetune.stop_steps, config.finetune.updates_per_step = 2, (1, 2), 2
  config.mixture_stops = ((2,), (1, 2))  # K = 2, 4
  config.joint.num_steps, config.spacing, config.exact_spacing, config.em_iters = 1, 0.5, 0.5, 2
  kept = ("dataset", "pool", "tasks", "overlap", "chunk_size", "map_over_models")
  assert all(config[k] == paper[k] for k in kept) and config.joint.chunk_size == paper.joint.chunk_size
  assert (config.dataset, config.pool, config.map_over_models) == ("cifar10", 1, False)
  with tfds.testing.mock_data(num_examples=120):
    comparison = exp.run(config, str(tmp_path))
    model, d, posteriors, _ = _pipeline(config, str(tmp_path))
  assert d.test[1].shape[1:] == (32, 32, 3)
  assert posteriors.pretrained.mean["stem_conv"]["kernel"].shape == (3, 3, 3, 4)  # three colour channels in
  decide = _decisions(model, d)
  alphas = grid.simplex(3, config.spacing)
  for t in range(3):
    want, margin = decide(jax.tree.map(lambda a, t=t: a[t, 1], posteriors.mixtures.components.mean))
    _assert_same_decisions(comparison.previews["simple"][_rows(alphas, np.eye(3)[t])], want, margin)
  assert set(comparison.summary["methods"]) == {"simple", "ivon_hess", "multi_ivon_k2", "multi_ivon_k4"}
  assert comparison.exact.shape == comparison.previews["simple"].shape == (len(alphas), len(d.test[2]))
  assert np.all((comparison.surfaces["exact"] >= 0) & (comparison.surfaces["exact"] <= 1))
