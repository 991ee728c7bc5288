"""Fig. 3 and the ResNet rows of Tables 1-2 (Sec. 4.1, App. B.3): ResNet-20 with IVON and MultiIVON mixtures.

Pipeline (all learners from `bmerge.fit`, all merges from `bmerge.merge`, the comparison by `bmerge.compare`):

1. pretrain a ResNet-20 with IVON on a stratified part of the training split (all classes);
2. per task, `fit.multi_ivon` from the pretrained posterior (its Hessian carried over): seeds x stop steps;
3. previews over the simplex: IVON-Hess (seed 0 at the last stop: one model per task, Hessian-weighted, Eq. 10),
   MultiIVON-Hess mixtures of K components (`multi_ivon.select` of the paper's seed x stop subsets, EM, Eq. 12),
   simple averaging of the IVON-Hess means (Eq. 2);
4. the exact answer: weighted joint finetuning with the same IVON settings from the pretrained posterior at every
   alpha (`exact.joint_train_ivon`), on mixed minibatches of the tasks' data.

Every evaluated network recomputes its BatchNorm statistics on a calibration batch of training inputs
(`bmerge.models.resnet.make_eval_fn`). Posteriors are cached in `<workdir>/posteriors`, preview and joint-training
rows in `<workdir>/<tag>/<inputs key>`: an interrupted run resumes where it stopped.

  python -m experiments.preview --config=configs/resnet20_multiivon.py --workdir=runs/resnet20
"""

from __future__ import annotations

import functools
import itertools
import os
import time

import jax
import numpy as np

import bmerge
from bmerge import checkpoint
from bmerge import data
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import merge
from bmerge.assess.comparison import Entry
from bmerge.models import resnet
from bmerge.optim import multi_ivon

# Tables 1-2, ResNet-20 on CIFAR-10: MSE, best preview accuracy and the exact accuracy there (%). The paper's
# mixture row is taken as its largest mixture (K = 30).
PAPER = {"simple": ("Simple", 0.0252, 62.4, 67.4), "ivon_hess": ("Hessian (IVON-Hess)", 0.0098, 62.3, 64.6),
         "multi_ivon_k30": ("Mixture (MultiIVON-Hess)", 0.0084, 64.5, 67.4)}
PAPER_EXACT_BEST = 68.1
DATASETS = {"mnist5k": "MNIST-5k", "mnist": "MNIST", "cifar10": "CIFAR-10"}


def _stream(seed: int, arrays, batch_size: int, num_steps: int, lazy: bool = False):
  """`num_steps` minibatches of `batch_size` (full batches only), epoch after epoch, reshuffled per epoch: a list,
  or with `lazy` an iterator (the paper's 500,000 pretraining batches of CIFAR-10 would not fit in memory)."""
  per_epoch = len(arrays[0]) // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(arrays[0])} examples it draws from.")
  epochs = -(-num_steps // per_epoch)
  batches = itertools.islice(data.minibatches(seed, arrays, batch_size, num_epochs=epochs, drop_remainder=True),
                             num_steps)
  return batches if lazy else list(batches)


def _mixture_name(k: int) -> str:
  return f"multi_ivon_k{k}"


def _subset(config, *names) -> dict:
  """The part of the config that determines a posterior: the data, the model and the named learners."""
  d = config.to_dict()
  keys = ("seed", "dataset", "pool", "test_fraction", "pretrain_fraction", "width", "blocks_per_stage")
  return {**{n: d[n] for n in names}, **{k: d[k] for k in keys}}


def _prepare(config):
  """Data splits, minibatch streams and the evaluation batch."""
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool)
  (pre_x, pre_y), (rest_x, rest_y) = data.split_fraction(ds.train_x, ds.train_y, config.pretrain_fraction,
                                                         seed=config.seed)
  tasks = data.split_by_classes(rest_x, rest_y, config.tasks, overlap=config.overlap, seed=config.seed)
  # Joint finetuning and calibration: the finetuning part's examples of the tasks' classes, each once, with the
  # tasks it belongs to (a shared class belongs to two).
  task_classes = sorted({c for g in config.tasks for c in g})
  keep = np.isin(rest_y, task_classes)
  joint_x, joint_y = rest_x[keep], rest_y[keep]
  joint_m = data.task_membership(joint_y, config.tasks)
  rng = np.random.default_rng(config.seed)
  calibration_x = joint_x[rng.permutation(len(joint_x))[:config.calibration_size]]
  test = np.isin(ds.test_y, task_classes)
  eval_batch = (calibration_x, ds.test_x[test], ds.test_y[test], data.task_membership(ds.test_y[test], config.tasks))
  return ds, (pre_x, pre_y), tasks, (joint_x, joint_y, joint_m), eval_batch


def build_posteriors(config, model, pre_data, tasks, key, cache: str, costs: dict):
  """(pretrained DiagGaussian, stacked per-task MultiIVON mixtures), each cached in `cache` by its config."""
  k_init, k_pre, k_tasks = jax.random.split(key, 3)
  loss_fn = functools.partial(resnet.mean_cross_entropy, model)
  p = config.pretrain
  steps = p.num_steps

  def pretrain():
    params = model.init(k_init, pre_data[0].shape[1:])
    return fit.ivon(k_pre, loss_fn, params, _stream(config.seed, pre_data, p.batch_size, steps, lazy=True),
                    num_steps=steps, ess=p.ess, learning_rate=p.learning_rate, mc_samples=p.mc_samples,
                    hess_init=p.hess_init, beta1=p.beta1, beta2=p.beta2, weight_decay=p.weight_decay)

  t0 = time.perf_counter()
  pre = jax.block_until_ready(checkpoint.cached_posterior(cache, "pretrain", _subset(config, "pretrain"), pretrain))
  costs["pretraining"] = time.perf_counter() - t0

  f = config.finetune
  stops = [s * f.updates_per_step for s in f.stop_steps]
  mixtures = []
  t0 = time.perf_counter()
  for t, (k, (x, y)) in enumerate(zip(jax.random.split(k_tasks, len(tasks)), tasks)):
    build = lambda k=k, x=x, y=y, t=t: fit.multi_ivon(
        k, loss_fn, pre.mean, _stream(config.seed + 1 + t, (x, y), f.batch_size, stops[-1]), num_seeds=f.num_seeds,
        stop_steps=stops, ess=p.ess, learning_rate=f.learning_rate, mc_samples=f.mc_samples, hess_init=p.hess_init,
        beta1=f.beta1, beta2=f.beta2, weight_decay=f.weight_decay, init_posterior=pre)
    subset = {**_subset(config, "pretrain", "finetune", "tasks", "overlap"), "task": t}
    mixtures.append(jax.block_until_ready(checkpoint.cached_posterior(cache, f"task{t}-multi_ivon", subset, build)))
  costs["posteriors multi_ivon (all seeds and stops)"] = time.perf_counter() - t0
  return pre, bmerge.stack(mixtures)


def entries(config, mixtures) -> list[Entry]:
  """The previews: simple averaging and IVON-Hess on seed 0's last stop, and one mixture per kept stop subset."""
  f = config.finetune
  stops = [s * f.updates_per_step for s in f.stop_steps]
  one = multi_ivon.select(mixtures, stops, keep_stops=[stops[-1]], seeds=[0])
  single = jax.tree.map(lambda a: a[:, 0], one.components)  # a DiagGaussian per task
  out = [Entry("simple", single.mean, merge.simple_average,
               "IVON means (seed 0, last stop) -> simple averaging (Eq. 2)"),
         Entry("ivon_hess", single, merge.hessian_weighted,
               "IVON-Hess (seed 0, last stop) -> Hessian-weighted (Eq. 10)")]
  em = functools.partial(merge.mixture_weighted, num_iters=config.em_iters)
  for kept in config.mixture_stops:
    sub = multi_ivon.select(mixtures, stops, keep_stops=[s * f.updates_per_step for s in kept])
    k = sub.log_weights.shape[-1]
    out.append(Entry(_mixture_name(k), sub, em, f"MultiIVON-Hess, {f.num_seeds} seeds x stops {tuple(kept)} "
                     f"(K = {k}) -> mixture-weighted EM (Eq. 12)"))
  return out


def _paper(config) -> dict:
  names = [_mixture_name(config.finetune.num_seeds * len(s)) for s in config.mixture_stops]
  methods = {}
  for name, (label, mse, best, there) in PAPER.items():
    if name in ("simple", "ivon_hess") or name in names:
      methods[name] = {"label": label, "mse": mse, "best_preview": best, "exact_at_best": there}
  return {"source": "Tables 1-2, ResNet-20 on CIFAR-10 (50,000 images, width 1, 32x32x3)", "methods": methods,
          "exact_best": PAPER_EXACT_BEST}


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


def hessian_kept(config, pre, mixtures) -> dict:
  """Quantiles over parameters and tasks of precision(IVON-Hess task posterior) / precision(pretrained posterior)."""
  f = config.finetune
  stops = [s * f.updates_per_step for s in f.stop_steps]
  one = multi_ivon.select(mixtures, stops, keep_stops=[stops[-1]], seeds=[0])
  ratios = np.concatenate([np.ravel(np.asarray(q[:, 0]) / np.asarray(p0)[None]) for q, p0 in
                           zip(jax.tree.leaves(one.components.precision), jax.tree.leaves(pre.precision))])
  q05, q50, q95 = np.quantile(ratios, [0.05, 0.5, 0.95])
  return {"p05": float(q05), "median": float(q50), "p95": float(q95)}


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
      f"Pretraining: IVON, {sizes['pretrain_steps']} steps of {p.batch_size}, {p.mc_samples} MC sample(s), "
      f"ess {p.ess:g}, h0 {p.hess_init}. Finetuning: IVON from the pretrained posterior (its Hessian carried over), "
      f"lr {f.learning_rate}, no weight decay, beta2 {f.beta2}, {f.num_seeds} seeds x stops "
      f"{[s * f.updates_per_step for s in f.stop_steps]} updates of {f.batch_size}. Joint finetuning: the same IVON "
      f"settings from the pretrained posterior, {config.joint.num_steps * f.updates_per_step} updates on mixed "
      "minibatches, the same batches and IVON noise draws for every alpha.",
      "",
      f"Curvature: the IVON-Hess task precisions are {kept['median']:.3f} x the pretrained precision at the median "
      f"parameter (5-95 %: {kept['p05']:.3f}-{kept['p95']:.3f}); beta2 = {f.beta2} over "
      f"{f.stop_steps[-1] * f.updates_per_step} updates keeps {f.beta2 ** (f.stop_steps[-1] * f.updates_per_step):.1%} "
      "of the pretrained Hessian, so the Hessian weights differ between tasks only as much as their curvature "
      "estimates moved it.",
      "",
      "BatchNorm: its scale and bias are parameters and are merged like every other parameter; its batch statistics "
      "are not merged. Every evaluated network (task models at the vertices, every merged model, every jointly "
      f"finetuned model) recomputes them on the same calibration batch of {config.calibration_size} training inputs "
      "of the tasks before its test pass (`bmerge.models.resnet.make_eval_fn`), so previews and joint finetuning are "
      "evaluated by one rule.",
      "",
      "Costs: the pretraining is shared by every method and by the exact answer. The MultiIVON runs (every seed and "
      "stop) serve all mixtures; IVON-Hess and simple averaging use one seed of them, about 1/"
      f"{f.num_seeds} of that cost."])


def run(config, workdir: str):
  """Pretrains, builds the posteriors, previews every alpha, finetunes jointly at every alpha, compares."""
  os.makedirs(workdir, exist_ok=True)
  costs: dict[str, float] = {}
  ds, pre_data, tasks, joint_data, eval_batch = _prepare(config)
  model = resnet.make(ds.num_classes, config.width, config.blocks_per_stage)
  key = jax.random.key(config.seed)
  k_post, k_joint = jax.random.split(key)
  pre, mixtures = build_posteriors(config, model, pre_data, tasks, k_post, os.path.join(workdir, "posteriors"), costs)

  f = config.finetune
  alphas = grid.simplex(len(config.tasks), config.spacing)
  evaluate = resnet.make_eval_fn(model, resnet.accuracies, map_over_models=config.map_over_models)
  num_updates = config.joint.num_steps * f.updates_per_step
  t0 = time.perf_counter()
  exact_acc = exact.joint_train_ivon(
      k_joint, functools.partial(resnet.task_cross_entropies, model), pre.mean, alphas,
      _stream(config.seed, joint_data, f.batch_size, num_updates), ess=config.pretrain.ess,
      learning_rate=f.learning_rate, mc_samples=f.mc_samples, hess_init=config.pretrain.hess_init, beta1=f.beta1,
      beta2=f.beta2, weight_decay=f.weight_decay, init_posterior=pre, eval_fn=evaluate, eval_batch=eval_batch,
      chunk_size=config.joint.chunk_size, workdir=workdir, tag="exact")
  costs["exact"] = time.perf_counter() - t0

  items = entries(config, mixtures)
  k_max = max(int(e.name.rsplit("k", 1)[1]) for e in items if e.name.startswith("multi_ivon_k"))
  for e in items:
    built = costs["posteriors multi_ivon (all seeds and stops)"]
    costs[f"posteriors {e.name}"] = built if e.name.startswith("multi_ivon") else built / f.num_seeds
  sizes = {"image": "x".join(map(str, ds.train_x.shape[1:])), "pretrain": len(pre_data[0]),
           "rest": len(ds.train_x) - len(pre_data[0]), "tasks": [len(x) for x, _ in tasks],
           "joint": len(joint_data[0]), "test": len(eval_batch[1]), "params": resnet.num_params(pre.mean),
           "pretrain_steps": config.pretrain.num_steps}
  kept = hessian_kept(config, pre, mixtures)
  pre_acc = np.asarray(jax.jit(evaluate)(pre.mean, eval_batch)).tolist()  # [overall, task 1, ..., task T]
  details = {"config": config.to_dict(), "sizes": sizes, "hessian_kept": kept, "pretrained_accuracy": pre_acc,
             "test_examples_per_task": np.asarray(eval_batch[3].sum(0)).astype(int).tolist()}
  comparison = bmerge.compare(
      items, evaluate, eval_batch, alphas, exact=exact_acc, folder=workdir, workdir=workdir, percent=True,
      metric="test accuracy", task_names=list(config.task_names), costs=costs, paper=_paper(config),
      title=(f"{DATASETS.get(config.dataset, config.dataset)} ({sizes['image']}): ResNet-"
             f"{6 * config.blocks_per_stage + 2} (width {config.width}, P = {sizes['params']:,}), IVON and MultiIVON "
             "previews vs joint finetuning"),
      notes=_notes(config, sizes, kept), details=details, recommend=_mixture_name(k_max), top_k=config.recommend_k,
      chunk_size=config.chunk_size)
  with open(comparison.paths["report"], "a") as fh:
    fh.write(f"\n## Reading\n\n{_reading(comparison.summary)}\n")
  return comparison
