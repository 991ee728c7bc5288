r"""Benchmark: which IVON settings make a good Hessian-weighted preview, measured on a small user-like problem.

The problem a new user brings: scikit-learn's digits split into 3 tasks by class (`bmerge.data.BALANCED`), a small
Flax MLP (64 -> hidden -> 10) pretrained with `fit.ivon` on all the training data, then finetuned on each task with
`fit.ivon` (a) from the pretrained posterior (`init_posterior=`, the paper's recipe, App. B.3) or (b) from the
pretrained mean with a fresh `hess_init` (what a user does who passes only the params). For every setting of
start x beta2 x learning rate x ess it records, over the finetunes of the 3 tasks (`FitInfo`):

  kept     the median Hessian estimate at the end over the one at the start (mean over tasks; 1 = kept);
  dist     how far each task's mean moved from the pretrained mean, |m_t - m_pre|_2 (mean over tasks);
  warned   whether the driver warned (`CurvatureWarning`: h moved > 100x; `NonFiniteWarning`);

and the preview against the exact answer on a simplex grid (spacing `--spacing`): the preview is
`merge.hessian_weighted` of the 3 posteriors, evaluated by test accuracy over all 10 classes; the exact answer is
`exact.joint_train_ivon` at every alpha (sum_t alpha_t loss_t, the same start, settings, keys and batches):

  exact best   the best exact test accuracy over the grid (%);
  pick         the exact accuracy at the preview's best alpha (%), and gap = best - pick (points; ok: gap <= 3);
  err          mean |preview - exact| over the grid (points).

Run (a few minutes on 2 CPU cores with the defaults):
  python -m experiments.benchmarks.ivon_settings [--starts=posterior,mean] [--beta2=default,0.999,0.9999,0.99999]
      [--lrs=0.01,0.05] [--ess_scales=1,10] [--steps=200] [--spacing=0.25]
"""

from __future__ import annotations

import datetime
import os
import platform
import time
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import bmerge
from bmerge import data, exact, fit

FLAGS = flags.FLAGS

WEIGHT_DECAY = 1e-4


def define_flags():
  """Defined when run as a script only, so the module imports (tests, other benchmarks) without flag clashes."""
  flags.DEFINE_list("starts", ["posterior", "mean"], "finetune from the pretrained posterior (init_posterior) and/or "
                    "from its mean with a fresh hess_init")
  flags.DEFINE_list("beta2", ["default", "0.999", "0.9999", "0.99999"], "beta2 values ('default': fit.default_beta2)")
  flags.DEFINE_list("lrs", ["0.01", "0.05"], "learning rates of the finetunes")
  flags.DEFINE_list("ess_scales", ["1", "10"], "ess of the finetunes as a multiple of the mean task size")
  flags.DEFINE_integer("hidden", 32, "width of the MLP's hidden layer")
  flags.DEFINE_integer("pretrain_steps", 1000, "IVON steps of pretraining on all training data")
  flags.DEFINE_float("pretrain_lr", 0.2, "learning rate of pretraining")
  flags.DEFINE_list("pretrain_beta2", ["0.999", "default"], "beta2 of pretraining: the finetunes start from the "
                    "first; the others are pretrained too and reported for comparison")
  flags.DEFINE_integer("steps", 200, "IVON steps of each finetune (and of each exact run)")
  flags.DEFINE_integer("batch", 32, "examples per step and task")
  flags.DEFINE_float("hess_init", 0.5, "hess_init of pretraining and of the finetunes from the mean")
  flags.DEFINE_float("spacing", 0.25, "spacing of the simplex grid (0.25: 15 alphas)")
  flags.DEFINE_list("seeds", ["0"], "seeds of the data split, pretraining, the batches and the keys (one problem each)")


class MLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x)))


class Problem(NamedTuple):
  """The pretrained posterior, each task's and the joint runs' batches, the test set and the loss functions."""

  q_pre: bmerge.DiagGaussian
  task_batches: list  # T pytrees (x [S, B, 64], y [S, B])
  joint_batches: tuple  # (x [S, T, B, 64], y [S, T, B])
  test: tuple
  mean_task_size: float
  loss_fn: object
  task_losses: object
  accuracy: object


def _beta2(value: str):
  return None if value == "default" else float(value)


def make_problem(seed: int, hidden: int, pretrain_steps: int, pretrain_lr: float, pretrain_beta2, steps: int,
                 batch: int, hess_init: float) -> Problem:
  """The digits problem: pretraining on all training data with `pretrain_beta2` (None: the default), task batches."""
  ds = data.load("digits", seed=seed)
  tasks = data.split_by_classes(ds.train_x, ds.train_y, data.BALANCED)
  model = MLP(hidden)

  def loss_fn(params, b):
    x, y = b
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()

  def task_losses(params, b):  # b = (x [T, B, 64], y [T, B]): each task's mean loss on its own minibatch
    return jax.vmap(loss_fn, in_axes=(None, 0))(params, b)

  @jax.jit
  def accuracy(params, b):
    x, y = b
    return 100.0 * jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  n = len(ds.train_y)
  idx = data.minibatch_indices(seed, [n], pretrain_steps, batch)[0]
  params0 = model.init(jax.random.key(seed), ds.train_x[:1])["params"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", fit.FitWarning)  # the default beta2's collapse is reported by main
    q_pre = fit.ivon(jax.random.key(seed + 1), loss_fn, params0, (ds.train_x[idx], ds.train_y[idx]), ess=float(n),
                     learning_rate=pretrain_lr, hess_init=hess_init, weight_decay=WEIGHT_DECAY, beta2=pretrain_beta2)
  sizes = [len(y) for _, y in tasks]
  idx = data.minibatch_indices(seed + 2, sizes, steps, batch)  # [T, S, B]
  task_batches = [(x[i], y[i]) for (x, y), i in zip(tasks, idx)]
  joint = (np.stack([b[0] for b in task_batches], 1), np.stack([b[1] for b in task_batches], 1))
  return Problem(q_pre, task_batches, joint, (ds.test_x, ds.test_y), float(np.mean(sizes)), loss_fn, task_losses,
                 accuracy)


class Row(NamedTuple):
  seed: int
  start: str
  beta2: float
  lr: float
  ess: float
  kept: float
  dist: float
  warned: str
  best: float
  pick: float
  gap: float
  err: float
  alpha_best: tuple
  alpha_pick: tuple


def measure(p: Problem, start: str, beta2, lr: float, ess: float, *, spacing: float, seed: int, steps: int,
            hess_init: float) -> Row:
  """Finetunes the 3 tasks and trains the exact grid with one setting (beta2 None: the default); a row of the table.

  `start` is 'posterior' (init_posterior=q_pre: `hess_init` is then left at its default 1 and only scales the learning
  rate) or 'mean' (from q_pre.mean with `hess_init`).
  """
  kw = dict(ess=ess, learning_rate=lr, weight_decay=WEIGHT_DECAY, beta2=beta2)
  if start == "posterior":
    kw["init_posterior"] = p.q_pre
  else:
    kw["hess_init"] = hess_init
  qs, infos, kinds = [], [], set()
  for t, batches in enumerate(p.task_batches):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", fit.FitWarning)
      q, info = fit.ivon(jax.random.key(seed + 10 + t), p.loss_fn, p.q_pre.mean, batches, return_info=True, **kw)
    kinds |= {type(w.message).__name__.replace("Warning", "") for w in caught if issubclass(w.category, fit.FitWarning)}
    qs.append(q)
    infos.append(info)
  alphas = bmerge.grid.simplex(len(qs), spacing)
  merged = bmerge.merge.hessian_weighted(bmerge.stack(qs), alphas)
  preview = np.asarray(jax.vmap(p.accuracy, in_axes=(0, None))(merged, p.test))
  # Every alpha with the same key (the joint runs share the noise draws), batches, start and settings.
  truth = np.asarray(exact.joint_train_ivon(jax.random.key(seed + 10), p.task_losses, p.q_pre.mean, alphas,
                                            p.joint_batches, eval_fn=p.accuracy, eval_batch=p.test,
                                            chunk_size=len(alphas), progress=False, **kw))
  kept = np.mean([float(i.hess_end[1] / i.hess_start[1]) for i in infos])
  dist = np.mean([float(i.distance) for i in infos])
  best, pick = int(np.argmax(truth)), int(np.argmax(preview))
  used = fit.default_beta2(steps, start == "posterior") if beta2 is None else beta2
  return Row(seed, start, used, lr, ess, kept, dist, ",".join(sorted(kinds)) or "-", truth[best], truth[pick],
             truth[best] - truth[pick], float(np.mean(np.abs(preview - truth))), tuple(alphas[best]),
             tuple(alphas[pick]))


def table(rows) -> str:
  lines = ["| seed | start | beta2 | lr | ess | kept | dist | warned | exact best | pick | gap | ok | err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.seed} | {r.start} | {r.beta2:.6g} | {r.lr:g} | {r.ess:.0f} | {r.kept:.3g} | {r.dist:.3g} | {r.warned} | "
                 f"{r.best:.1f} | {r.pick:.1f} | {r.gap:.1f} | {'yes' if r.gap <= 3 else 'NO'} | {r.err:.1f} |")
  return "\n".join(lines)


def summary(rows) -> str:
  """One line per setting over its seeds: kept and err averaged, dist and exact best as ranges, the largest gap."""
  lines = ["| start | beta2 | lr | ess | kept | dist | warned | exact best | worst gap | ok | err |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  groups = {}
  for r in rows:
    groups.setdefault((r.start, r.beta2, r.lr, r.ess), []).append(r)
  span = lambda xs, fmt: f"{min(xs):{fmt}}-{max(xs):{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"
  for (start, beta2, lr, ess), rs in groups.items():
    warned = ",".join(sorted({k for r in rs for k in r.warned.split(",") if k != "-"})) or "-"
    gap = max(r.gap for r in rs)
    lines.append(f"| {start} | {beta2:.6g} | {lr:g} | {ess:.0f} | {np.mean([r.kept for r in rs]):.3g} | "
                 f"{span([r.dist for r in rs], '.3g')} | {warned} | {span([r.best for r in rs], '.1f')} | {gap:.1f} | "
                 f"{'yes' if gap <= 3 else 'NO'} | {np.mean([r.err for r in rs]):.1f} |")
  return "\n".join(lines)


def main(_):
  t0 = time.perf_counter()
  print(f"{datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), jax {jax.__version__} "
        f"{jax.devices()[0].platform}; digits, tasks {data.BALANCED}, MLP 64-{FLAGS.hidden}-10; finetunes "
        f"{FLAGS.steps} steps x {FLAGS.batch} examples, grid spacing {FLAGS.spacing}", flush=True)
  rows = []
  for seed in map(int, FLAGS.seeds):
    problems = []
    for b2 in FLAGS.pretrain_beta2:
      q = make_problem(seed, FLAGS.hidden, FLAGS.pretrain_steps, FLAGS.pretrain_lr, _beta2(b2), FLAGS.steps,
                       FLAGS.batch, FLAGS.hess_init)
      h_pre = jax.tree.leaves(jax.tree.map(lambda x, q=q: x / (3 * q.mean_task_size) - WEIGHT_DECAY, q.q_pre.precision))
      used = fit.default_beta2(FLAGS.pretrain_steps) if b2 == "default" else float(b2)
      print(f"seed {seed}: pretrained {FLAGS.pretrain_steps} steps, lr {FLAGS.pretrain_lr}, hess_init "
            f"{FLAGS.hess_init}, beta2 {used:.6g}: test accuracy {float(q.accuracy(q.q_pre.mean, q.test)):.1f} %, "
            f"median h {float(np.median(np.concatenate([np.ravel(x) for x in h_pre]))):.3g}"
            + ("" if problems else "  <- the finetunes start here"), flush=True)
      problems.append(q)
    p = problems[0]
    for start in FLAGS.starts:
      for b2 in FLAGS.beta2:
        for lr in map(float, FLAGS.lrs):
          for scale in map(float, FLAGS.ess_scales):
            rows.append(measure(p, start, _beta2(b2), lr, scale * p.mean_task_size, spacing=FLAGS.spacing, seed=seed,
                                steps=FLAGS.steps, hess_init=FLAGS.hess_init))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
  print()
  print(table(rows))
  print(f"\nOver the seeds {','.join(FLAGS.seeds)}:\n{summary(rows)}")
  print(f"\n{len(rows)} settings in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
