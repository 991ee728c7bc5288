"""Fig. 3 and the ResNet rows of Tables 1-2 (Sec. 4.1, App. B.3): ResNet-20 with IVON and MultiIVON mixtures.

Read top-down, one stage after the other (config: `configs/resnet20_multiivon.py`):

1. data: a stratified part of the training split (all classes) pretrains, the rest is split into the tasks by class;
   the test images of the tasks' classes, with the task(s) each belongs to, are the evaluation set;
2. posteriors: IVON pretraining, then per task `fit.multi_ivon` from the pretrained posterior (its Hessian carried
   over), seeds x stop steps; each cached by `bmerge.checkpoint.cached` on its learner's arguments, the content of
   its data and minibatch indices, so a changed config, data set or seed never loads a stale posterior;
3. previews over the simplex: IVON-Hess (seed 0 at the last stop: one model per task, Hessian-weighted, Eq. 10),
   MultiIVON-Hess mixtures of K components (`multi_ivon.select` of the paper's seed x stop subsets, EM, Eq. 12),
   simple averaging of the IVON-Hess means (Eq. 2);
4. the exact answer: weighted joint finetuning with the same IVON settings from the pretrained posterior at every
   alpha of the exact grid (`exact.joint_train_ivon`), on mixed minibatches of the tasks' data;
5. report: `bmerge.compare` scores every preview against the exact answer, from per-example results (correct or
   not, per test image) so that intervals over test examples can be computed.

Every evaluated network recomputes its BatchNorm statistics on a calibration batch of training inputs
(`bmerge.models.resnet.make_eval_fn`). Posteriors and the exact answer are cached in `<workdir>/cache` with the
seconds their build took, preview and joint-training rows in `<workdir>/<tag>/<inputs key>`: an interrupted run
resumes where it stopped.

  python -m experiments.preview --config=configs/resnet20_multiivon.py --workdir=runs/resnet20

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Eqs. 2, 10, 12; Sec. 4.1; App. B.3; Fig. 3; Tables 1-2).
  Shen et al. Variational Learning is Effective for Large Deep Networks. ICML 2024 (IVON).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import bmerge
from bmerge import checkpoint
from bmerge import data
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import merge
from bmerge import metrics
from bmerge import timing
from bmerge.assess.comparison import Entry
from bmerge.models import resnet
from bmerge.optim import multi_ivon

# Tables 1-2, ResNet-20 on CIFAR-10: MSE, best preview accuracy and the exact accuracy there (%). The paper's
# mixture row is taken as its largest mixture (K = 30).
PAPER = {"simple": ("Simple", 0.0252, 62.4, 67.4), "ivon_hess": ("Hessian (IVON-Hess)", 0.0098, 62.3, 64.6),
         "multi_ivon_k30": ("Mixture (MultiIVON-Hess)", 0.0084, 64.5, 67.4)}
PAPER_EXACT_BEST = 68.1
DATASETS = {"mnist5k": "MNIST-5k", "mnist": "MNIST", "cifar10": "CIFAR-10"}
MULTI_IVON_COST = "posteriors multi_ivon (all seeds and stops)"


# ---------------------------------------------------------------------------------------------------------------
# Data.


class Data(NamedTuple):
  """The experiment's data: numpy arrays, each image [H, W, C]."""

  pretrain: tuple  # (x, y): a stratified part of the training split, every class
  tasks: list  # [(x, y)] per task: the rest of the training split, the examples of the task's classes
  joint: tuple  # (x, y, membership [N, T]): the rest's examples of the tasks' classes, each once, for joint training
  test: tuple  # (calibration_x, x, y): the batch of `make_eval_fn`, the test images of the tasks' classes
  test_tasks: np.ndarray  # [N, T] 1 where test image n belongs to task t (a shared class belongs to two)
  num_classes: int
  num_train: int  # images in the training split (pretraining and finetuning parts)


def load_data(config) -> Data:
  """The splits of `config.dataset` by `config.seed`: pretraining part, tasks, joint data and the test batch."""
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool)
  pretrain, (rest_x, rest_y) = data.split_fraction(ds.train_x, ds.train_y, config.pretrain_fraction,
                                                   seed=config.seed)
  tasks = data.split_by_classes(rest_x, rest_y, config.tasks, overlap=config.overlap, seed=config.seed)
  task_classes = sorted({c for g in config.tasks for c in g})
  keep = np.isin(rest_y, task_classes)
  joint_x, joint_y = rest_x[keep], rest_y[keep]
  calibration_x = joint_x[np.random.default_rng(config.seed).permutation(len(joint_x))[:config.calibration_size]]
  test = np.isin(ds.test_y, task_classes)
  return Data(pretrain, tasks, (joint_x, joint_y, data.task_membership(joint_y, config.tasks)),
              (calibration_x, ds.test_x[test], ds.test_y[test]), data.task_membership(ds.test_y[test], config.tasks),
              ds.num_classes, len(ds.train_x))


def _batches(arrays: tuple, idx: np.ndarray):
  """The minibatches `tuple(a[i] for a in arrays)` for the rows i of an index stream [S, B], one at a time."""
  return (tuple(a[i] for a in arrays) for i in idx)


def _stops(config) -> list[int]:
  """The finetuning's stop steps in IVON updates."""
  return [s * config.finetune.updates_per_step for s in config.finetune.stop_steps]


# ---------------------------------------------------------------------------------------------------------------
# Posteriors.


class Posteriors(NamedTuple):
  """The posteriors of `build_posteriors` and what their builds cost."""

  pretrained: bmerge.DiagGaussian  # the IVON posterior of pretraining
  mixtures: bmerge.Mixture  # the T per-task MultiIVON mixtures, stacked (K = seeds x stops, seed-major)
  costs: dict  # stage -> `bmerge.timing.Cost` of the builds (as measured when they ran)
  loaded: bool  # whether every posterior came from the cache


def build_posteriors(config, model: resnet.ResNetModel, d: Data, key: jax.Array, cache: str) -> Posteriors:
  """IVON pretraining, then per task MultiIVON from the pretrained posterior; each cached in `cache`.

  A cache entry is keyed on the learner with all its arguments but the batches (a `functools.partial` of `fit.*`:
  key, loss, start, hyperparameters), the content of its data and its minibatch indices
  (`bmerge.data.minibatch_indices` from `config.seed`).
  """
  k_init, k_pre, k_tasks = jax.random.split(key, 3)
  loss_fn = functools.partial(resnet.mean_cross_entropy, model)
  p, f = config.pretrain, config.finetune

  pretrain = functools.partial(
      fit.ivon, k_pre, loss_fn, model.init(k_init, d.pretrain[0].shape[1:]), num_steps=p.num_steps, ess=p.ess,
      learning_rate=p.learning_rate, mc_samples=p.mc_samples, hess_init=p.hess_init, beta1=p.beta1, beta2=p.beta2,
      weight_decay=p.weight_decay)
  idx = data.minibatch_indices(config.seed, [len(d.pretrain[1])], p.num_steps, p.batch_size)[0]
  pre = checkpoint.cached(cache, "pretrain", {"fit": pretrain, "data": d.pretrain, "minibatches": idx},
                          lambda: pretrain(_batches(d.pretrain, idx)))

  stops = _stops(config)
  idx = data.minibatch_indices(config.seed, [len(y) for _, y in d.tasks], stops[-1], f.batch_size)
  tasks = []
  for t, (k, task) in enumerate(zip(jax.random.split(k_tasks, len(d.tasks)), d.tasks)):
    finetune = functools.partial(
        fit.multi_ivon, k, loss_fn, pre.value.mean, num_seeds=f.num_seeds, stop_steps=stops, ess=p.ess,
        learning_rate=f.learning_rate, mc_samples=f.mc_samples, hess_init=p.hess_init, beta1=f.beta1, beta2=f.beta2,
        weight_decay=f.weight_decay, init_posterior=pre.value)
    tasks.append(checkpoint.cached(cache, f"task{t}-multi_ivon", {"fit": finetune, "data": task, "minibatches": idx[t]},
                                   lambda finetune=finetune, task=task, i=idx[t]: finetune(list(_batches(task, i)))))
  costs = {"pretraining": pre.cost("pretraining"),
           MULTI_IVON_COST: timing.combine(MULTI_IVON_COST, [c.cost(MULTI_IVON_COST) for c in tasks])}
  return Posteriors(pre.value, bmerge.stack([c.value for c in tasks]), costs,
                    pre.loaded and all(c.loaded for c in tasks))


# ---------------------------------------------------------------------------------------------------------------
# Previews.


def correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  """[N] per test image: 1.0 where the predicted class argmax_c logits[n, c] is the label y[n], else 0.0."""
  return (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)


def _mixture_name(k: int) -> str:
  return f"multi_ivon_k{k}"


def entries(config, mixtures: bmerge.Mixture) -> list[Entry]:
  """The previews: simple averaging and IVON-Hess on seed 0's last stop, and one mixture per kept stop subset."""
  stops = _stops(config)
  one = multi_ivon.select(mixtures, stops, keep_stops=[stops[-1]], seeds=[0])
  single = jax.tree.map(lambda a: a[:, 0], one.components)  # a DiagGaussian per task
  out = [Entry("simple", single.mean, merge.simple_average,
               "IVON means (seed 0, last stop) -> simple averaging (Eq. 2)"),
         Entry("ivon_hess", single, merge.hessian_weighted,
               "IVON-Hess (seed 0, last stop) -> Hessian-weighted (Eq. 10)")]
  em = functools.partial(merge.mixture_weighted, num_iters=config.em_iters)
  for kept in config.mixture_stops:
    sub = multi_ivon.select(mixtures, stops, keep_stops=[s * config.finetune.updates_per_step for s in kept])
    k = sub.log_weights.shape[-1]
    out.append(Entry(_mixture_name(k), sub, em, f"MultiIVON-Hess, {config.finetune.num_seeds} seeds x stops "
                     f"{tuple(kept)} (K = {k}) -> mixture-weighted EM (Eq. 12)"))
  return out


# ---------------------------------------------------------------------------------------------------------------
# The exact answer.


def joint_finetuning(config, model: resnet.ResNetModel, d: Data, pre: bmerge.DiagGaussian, key: jax.Array, alphas,
                     evaluate, cache: str, workdir: str) -> checkpoint.Cached:
  """Per-example results [G', N] of weighted joint finetuning from the pretrained posterior at every alpha.

  IVON with the finetuning's settings on mixed minibatches of the joint data (the same batches and noise draws for
  every alpha), evaluated by `evaluate`; rows are resumable in `workdir`, the whole answer cached in `cache`.
  """
  f, p = config.finetune, config.pretrain
  train = functools.partial(
      exact.joint_train_ivon, key, functools.partial(resnet.task_cross_entropies, model), pre.mean, alphas,
      ess=p.ess, learning_rate=f.learning_rate, mc_samples=f.mc_samples, hess_init=p.hess_init, beta1=f.beta1,
      beta2=f.beta2, weight_decay=f.weight_decay, init_posterior=pre, eval_fn=evaluate, eval_batch=d.test,
      chunk_size=config.joint.chunk_size)
  idx = data.minibatch_indices(config.seed, [len(d.joint[1])], config.joint.num_steps * f.updates_per_step,
                               f.batch_size)[0]
  return checkpoint.cached(cache, "exact", {"train": train, "data": d.joint, "minibatches": idx},
                           lambda: train(list(_batches(d.joint, idx)), workdir=workdir, tag="exact"))


# ---------------------------------------------------------------------------------------------------------------
# Report.


def _paper(config) -> dict:
  names = [_mixture_name(config.finetune.num_seeds * len(s)) for s in config.mixture_stops]
  methods = {}
  for name, (label, mse, best, there) in PAPER.items():
    if name in ("simple", "ivon_hess") or name in names:
      methods[name] = {"label": label, "mse": mse, "best_preview": best, "exact_at_best": there}
  return {"source": "Tables 1-2, ResNet-20 on CIFAR-10 (50,000 images, width 1, 32x32x3)", "methods": methods,
          "exact_best": PAPER_EXACT_BEST}


def hessian_kept(config, pre: bmerge.DiagGaussian, mixtures: bmerge.Mixture) -> dict:
  """Quantiles over parameters and tasks of precision(IVON-Hess task posterior) / precision(pretrained posterior)."""
  stops = _stops(config)
  one = multi_ivon.select(mixtures, stops, keep_stops=[stops[-1]], seeds=[0])
  ratios = np.concatenate([np.ravel(np.asarray(q[:, 0]) / np.asarray(p0)[None]) for q, p0 in
                           zip(jax.tree.leaves(one.components.precision), jax.tree.leaves(pre.precision))])
  q05, q50, q95 = np.quantile(ratios, [0.05, 0.5, 0.95])
  return {"p05": float(q05), "median": float(q50), "p95": float(q95)}


def _reading(summary: dict) -> str:
  """What this run's numbers say (generated from them): the MSE order, the trend with K, the best alphas."""
  rows = summary["methods"]
  fmt = lambda v: f"{100 * v:.1f} %"
  err = lambda v: f"{v:.4g}"
  at = lambda a: "(" + ", ".join(f"{x:.2f}" for x in a) + ")"
  order = sorted(rows, key=lambda m: rows[m]["mse"])
  lines = ["Preview MSE against joint finetuning, best first: " + ", ".join(f"{m} {err(rows[m]['mse'])}"
                                                                           for m in order) + "."]
  ks = sorted((int(m.rsplit("k", 1)[1]), m) for m in rows if m.startswith("multi_ivon_k"))
  if len(ks) >= 2:
    mses = [rows[m]["mse"] for _, m in ks]
    trend = ("falls as K grows" if all(b < a for a, b in zip(mses, mses[1:])) else
             "rises as K grows" if all(b > a for a, b in zip(mses, mses[1:])) else
             "does not change monotonically with K")
    listing = ", ".join(f"K = {k}: {err(rows[m]['mse'])}" for k, m in ks)
    verdict = "as in Fig. 3" if trend.startswith("falls") else "unlike Fig. 3, where more components help"
    lines.append(f"The mixture preview's MSE {trend} ({listing}), {verdict}.")
    hess = rows.get("ivon_hess", {}).get("mse")
    if hess is not None:
      better = [f"K = {k}" for k, m in ks if rows[m]["mse"] < hess]
      lines.append(f"Against the single-model Hessian preview (MSE {err(hess)}): " +
                   (f"{', '.join(better)} {'is' if len(better) == 1 else 'are'} better." if better else
                    "no mixture is better."))
  best = summary.get("exact_best")
  if best is not None:
    there = ", ".join(f"{m} {fmt(r['exact_at_best'])} at {at(r['best_alpha'])}" for m, r in rows.items())
    lines.append(f"Joint finetuning is best at alpha = {at(summary['exact_best_alpha'])} ({fmt(best)}); at each "
                 f"preview's best alpha it reaches {there}.")
  pre = summary.get("pretrained_accuracy")
  if pre is not None:
    lines.append(f"The pretrained model, the start of every finetune, scores {fmt(pre[0])}.")
  return " ".join(lines)


def _notes(config, sizes: dict, kept: dict) -> str:
  f, p = config.finetune, config.pretrain
  return "\n".join([
      f"Data: {DATASETS.get(config.dataset, config.dataset)}, {sizes['image']} images; pretraining on "
      f"{sizes['pretrain']} training images of all classes ({config.pretrain_fraction:.0%} of every class), "
      f"finetuning on the other {sizes['rest']}: tasks {list(config.task_names)} with "
      f"{sizes['tasks']} examples (class 5 in tasks 2 and 3: overlap '{config.overlap}'), joint finetuning on the "
      f"{sizes['joint']} examples of the tasks' classes, each once. Metric: accuracy on the {sizes['test']} test "
      "images of the tasks' classes (per task: on its classes' images).",
      "",
      f"Model: ResNet-{6 * config.blocks_per_stage + 2}, width {config.width}, {sizes['params']:,} parameters. "
      f"Pretraining: IVON, {p.num_steps} steps of {p.batch_size}, {p.mc_samples} MC sample(s), "
      f"ess {p.ess:g}, h0 {p.hess_init}. Finetuning: IVON from the pretrained posterior (its Hessian carried over), "
      f"lr {f.learning_rate}, no weight decay, beta2 {f.beta2}, {f.num_seeds} seeds x stops "
      f"{_stops(config)} updates of {f.batch_size}. Joint finetuning: the same IVON "
      f"settings from the pretrained posterior, {config.joint.num_steps * f.updates_per_step} updates on mixed "
      "minibatches, the same batches and IVON noise draws for every alpha.",
      "",
      f"Curvature: the IVON-Hess task precisions are {kept['median']:.3f} x the pretrained precision at the median "
      f"parameter (5-95 %: {kept['p05']:.3f}-{kept['p95']:.3f}); beta2 = {f.beta2} over "
      f"{_stops(config)[-1]} updates keeps {f.beta2 ** _stops(config)[-1]:.1%} "
      "of the pretrained Hessian, so the Hessian weights differ between tasks only as much as their curvature "
      "estimates moved it.",
      "",
      "BatchNorm: its scale and bias are parameters and are merged like every other parameter; its batch statistics "
      "are not merged. Every evaluated network (task models at the vertices, every merged model, every jointly "
      f"finetuned model) recomputes them on the same calibration batch of {config.calibration_size} training inputs "
      "of the tasks before its test pass (`bmerge.models.resnet.make_eval_fn`), so previews and joint finetuning are "
      "evaluated by one rule.",
      "",
      "Costs: the seconds each build took when it ran (a resumed run reports them as stored). The pretraining is "
      "shared by every method and by the exact answer. The MultiIVON runs (every seed and stop) serve all mixtures; "
      f"IVON-Hess and simple averaging use one seed of them, about 1/{f.num_seeds} of that cost."])


def run(config, workdir: str) -> bmerge.Comparison:
  """Data, posteriors, previews, the exact answer and the report, in that order; everything cached in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  cache = os.path.join(workdir, "cache")
  # The preview grid and the joint-training grid inside it (checked before any training).
  alphas, exact_alphas = grid.nested_simplex(len(config.tasks), config.spacing, config.exact_spacing)

  d = load_data(config)
  model = resnet.make(d.num_classes, config.width, config.blocks_per_stage)
  k_post, k_joint = jax.random.split(jax.random.key(config.seed))
  posteriors = build_posteriors(config, model, d, k_post, cache)

  items = entries(config, posteriors.mixtures)
  evaluate = resnet.make_eval_fn(model, correct, map_over_models=config.map_over_models)

  joint = joint_finetuning(config, model, d, posteriors.pretrained, k_joint, exact_alphas, evaluate, cache, workdir)

  built = posteriors.costs[MULTI_IVON_COST]
  one_seed = built._replace(seconds=built.seconds / config.finetune.num_seeds,
                            compile_seconds=built.compile_seconds / config.finetune.num_seeds)
  costs = {**posteriors.costs, "exact": joint.cost("exact"),
           **{f"posteriors {e.name}": built if e.name.startswith("multi_ivon") else one_seed for e in items}}
  sizes = {"image": "x".join(map(str, d.test[1].shape[1:])), "pretrain": len(d.pretrain[1]),
           "rest": d.num_train - len(d.pretrain[1]), "tasks": [len(y) for _, y in d.tasks],
           "joint": len(d.joint[1]), "test": len(d.test[2]), "params": resnet.num_params(posteriors.pretrained.mean)}
  kept = hessian_kept(config, posteriors.pretrained, posteriors.mixtures)
  pre_acc = metrics.per_task_accuracy(np.asarray(jax.jit(evaluate)(posteriors.pretrained.mean, d.test)), d.test_tasks)
  details = {"config": config.to_dict(), "sizes": sizes, "hessian_kept": kept, "pretrained_accuracy": pre_acc.tolist(),
             "test_examples_per_task": d.test_tasks.sum(0).astype(int).tolist()}
  k_max = max(int(e.name.rsplit("k", 1)[1]) for e in items if e.name.startswith("multi_ivon_k"))
  options = bmerge.CompareOptions(
      metric="test accuracy", percent=True, task_names=list(config.task_names), costs=costs, paper=_paper(config),
      title=(f"{DATASETS.get(config.dataset, config.dataset)} ({sizes['image']}): ResNet-"
             f"{6 * config.blocks_per_stage + 2} (width {config.width}, P = {sizes['params']:,}), IVON and MultiIVON "
             "previews vs joint finetuning"),
      notes=_notes(config, sizes, kept), details=details, recommend=_mixture_name(k_max), top_k=config.recommend_k,
      chunk_size=config.chunk_size)
  comparison = bmerge.compare(items, evaluate, d.test, alphas, exact=joint.value, exact_alphas=exact_alphas,
                              examples=d.test_tasks, folder=workdir, workdir=workdir, options=options)
  with open(comparison.paths["report"], "a") as fh:
    fh.write(f"\n## Reading\n\n{_reading(comparison.summary)}\n")
  return comparison
