"""Figs. 8/9 on real data shipped with scikit-learn: logistic regression on digits, three tasks by class.

Every posterior type of the paper is built per task, previewed over the simplex and compared with weighted joint
training at every alpha. Posteriors, preview chunks and joint-training chunks are saved in the workdir and reused,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bmerge
from bmerge import checkpoint, curvature, data, exact, grid, merge, metrics
from bmerge.models import logistic
from bmerge.optim import ivon, ivon_posterior, ivon_sample as ivon_sample_params
from bmerge.optim import mog as mog_lib
from bmerge.optim import von as von_lib
from experiments import report

# The paper's rows for this experiment (Tables 1-2), keyed by our method names.
PAPER = {
    "imbalanced": {"mse": {"simple": 0.2067, "von": 0.1528, "mog": 0.0463},
                   "best": {"simple": (76.8, 90.0), "von": (80.3, 89.4), "mog": (87.2, 90.4)}, "exact_best": 90.4},
    "balanced": {"mse": {"simple": 0.2015, "von": 0.1191, "mog": 0.0809},
                 "best": {"simple": (71.3, 90.7), "von": (78.5, 90.5), "mog": (83.2, 90.2)}, "exact_best": 90.7},
}
PAPER_COLUMN = {"simple": "Simple", "von": "Hessian (full, VON)", "mog": "Mixture (MoG VI)"}
MERGE_RULE = {"simple": "simple averaging", "laplace_diag": "Hessian-weighted, diagonal",
              "laplace_full": "Hessian-weighted, full", "von": "Hessian-weighted, full",
              "mog": "mixture-weighted (EM)", "ivon": "Hessian-weighted, diagonal",
              "adamw_sg": "Hessian-weighted, diagonal"}
LEARNER = {"simple": "GD (MAP)", "laplace_diag": "GD + diagonal of the exact Hessian",
           "laplace_full": "GD + exact Hessian (Laplace)", "von": "VON, full covariance",
           "mog": "mixture-of-Gaussians VI", "ivon": "IVON", "adamw_sg": "AdamW + squared-gradient Fisher"}


def _timed(costs: dict, name: str):
  class _T:
    def __enter__(self):
      self.t0 = time.perf_counter()

    def __exit__(self, *exc):
      costs[name] = costs.get(name, 0.0) + time.perf_counter() - self.t0
  return _T()


def _gd(config):
  return optax.sgd(config.gd.learning_rate, momentum=config.gd.momentum or None)


def build_posteriors(config, ds, task_data, key, costs: Optional[dict] = None) -> dict:
  """Every requested posterior through the checkpoint cache; returns method -> posterior stacked over tasks.

  Tasks are padded to a common length (zero weights) so each learner is one compiled call `vmap`ped over tasks.
  The seconds each learner took (only the restore when cached) go into `costs["posterior_<name>_s"]`.
  """
  costs = {} if costs is None else costs

  def cached(name, subset, build):
    with _timed(costs, f"posterior_{name}_s"):
      return jax.block_until_ready(checkpoint.cached_posterior(config.workdir_posteriors, name, subset, build))

  num_tasks, p = len(task_data), logistic.num_params(ds.num_features, ds.num_classes)
  prior, c = config.prior_precision, ds.num_classes
  n_train = ds.train_x.shape[0]
  batch = logistic.multitask_batch(task_data, c)  # x [T, N_max, D], y [T, N_max], mask [T, N_max]
  sizes = jnp.asarray([len(y) for _, y in task_data])

  # MAP of every task: the joint-training driver at the vertices of the simplex (same optimizer and budget as the
  # exact baseline, so the preview's vertices are the exact solution's).
  task_losses = lambda theta, b: logistic.multitask_losses(theta, b, prior) / n_train
  maps = cached(
      "maps", _subset(config, "gd", "prior_precision"),
      lambda: bmerge.IsoGaussian(jnp.asarray(exact.joint_train(task_losses, jnp.zeros(p), np.eye(num_tasks), _gd(config),
                                                               config.gd.num_steps, batch, progress=False)),
                                 jnp.ones(num_tasks)))
  means = maps.mean
  out = {}
  methods = set(config.methods)
  hess = None  # [T, P, P] exact Hessians at the MAPs, only when a method needs them (P^2 memory per task)
  if methods & {"laplace_full", "laplace_diag", "von", "mog"}:
    hess = jax.jit(jax.vmap(lambda m, x, w: logistic.hessian(m, x, c, prior, weights=w)))(means, batch.x, batch.mask)
  if "simple" in methods:
    out["simple"] = maps
  if "laplace_full" in methods:
    out["laplace_full"] = bmerge.FullGaussian(means, hess)
  if "laplace_diag" in methods:
    out["laplace_diag"] = bmerge.DiagGaussian(means, jnp.diagonal(hess, axis1=1, axis2=2))
  keys = jax.random.split(key, 4)
  task_keys = lambda k: jax.random.split(k, num_tasks)

  if "von" in methods:
    def fit_von(k, x, y, w, mean, h0):
      state = von_lib.fit(k, logistic.task_loss_fn(x, y, c, prior, weights=w), mean, h0, config.von.num_steps,
                          rho=config.von.rho, num_samples=config.von.num_samples, estimator="gauss_newton",
                          gauss_newton_fn=lambda th: logistic.hessian(th, x, c, prior, weights=w))
      return von_lib.posterior(state)
    out["von"] = cached(
        "von", _subset(config, "gd", "prior_precision", "von", "seed"),
        lambda: jax.jit(jax.vmap(fit_von))(task_keys(keys[0]), batch.x, batch.y, batch.mask, means, hess))

  if "mog" in methods:
    k_comp = config.mog.num_components

    def fit_mog(k, x, y, w, mean, h0):
      k1, k2 = jax.random.split(k)
      # Components start around the MAP, spread by the Laplace covariance, all with the Laplace precision.
      chol = jnp.linalg.cholesky(h0)
      eps = jax.random.normal(k1, (k_comp, p))
      init_means = mean + config.mog.init_scale * jax.scipy.linalg.solve_triangular(chol.T, eps.T, lower=False).T
      state = mog_lib.fit(k2, logistic.task_loss_fn(x, y, c, prior, weights=w), init_means,
                          jnp.broadcast_to(h0, (k_comp, p, p)), config.mog.num_steps, beta=config.mog.beta,
                          beta_w=config.mog.beta_w, num_samples=config.mog.num_samples, estimator="gauss_newton",
                          gauss_newton_fn=lambda th: logistic.hessian(th, x, c, prior, weights=w))
      return mog_lib.posterior(state)
    out["mog"] = cached(
        "mog", _subset(config, "gd", "prior_precision", "mog", "seed"),
        lambda: jax.jit(jax.vmap(fit_mog))(task_keys(keys[1]), batch.x, batch.y, batch.mask, means, hess))

  if "ivon" in methods:
    fit = lambda k, x, y, n: _train_ivon(config, k, x, y, n, c, p)
    out["ivon"] = cached(
        "ivon", _subset(config, "prior_precision", "ivon", "seed"),
        lambda: jax.jit(jax.vmap(fit))(task_keys(keys[2]), batch.x, batch.y, sizes))
  if "adamw_sg" in methods:
    def build_adamw_sg():
      fit = lambda k, x, y, n: _train_adamw(config, k, x, y, n, c, p)
      thetas = jax.jit(jax.vmap(fit))(task_keys(keys[3]), batch.x, batch.y, sizes)
      # One squared-gradient pass per task over its own (unpadded) examples: precision = Fisher + prior.
      return bmerge.stack([
          curvature.diagonal_fisher(jax.random.fold_in(keys[3], t), lambda th, xb: logistic.logits(th, xb, c), theta,
                                    task_data[t], variant=config.adamw.fisher, prior_precision=prior)
          for t, theta in enumerate(thetas)])
    out["adamw_sg"] = cached(
        "adamw_sg", _subset(config, "prior_precision", "adamw", "seed"), build_adamw_sg)
  return out


def _minibatch_loop(key, step_fn, state, n, batch_size, num_steps):
  """lax.scan over `num_steps` steps; step_fn(key, state, idx) with idx a uniform minibatch (with replacement) of
  the first n examples (n may be traced: tasks padded to one length share the compiled loop)."""
  def body(state, k):
    k1, k2 = jax.random.split(k)
    idx = jax.random.randint(k1, (batch_size,), 0, n)
    return step_fn(k2, state, idx), None
  state, _ = jax.lax.scan(body, state, jax.random.split(key, num_steps))
  return state


def _train_ivon(config, key, x, y, n, num_classes, p):
  """IVON on one task: minibatch mean cross-entropy, ess = N_t, weight decay = prior / N_t (so the exported precision
  ess (h + wd) is on the scale of the summed loss plus the prior, like the other posteriors)."""
  cfg = config.ivon
  n = n.astype(jnp.float32)
  wd = config.prior_precision / n
  tx = ivon(cfg.learning_rate, ess=n, hess_init=cfg.hess_init, beta2=cfg.beta2, weight_decay=wd)
  mean_loss = lambda th, idx: logistic.mean_ce(th, x[idx], y[idx], num_classes)
  theta0 = jnp.zeros(p)

  def step(k, carry, idx):
    theta, opt_state = carry
    samples, noise = ivon_sample_params(k, opt_state, theta, n, wd, cfg.mc_samples)
    grads = jax.vmap(jax.grad(mean_loss), in_axes=(0, None))(samples, idx)
    updates, opt_state = tx.update(grads, opt_state, theta, noise=noise)
    return optax.apply_updates(theta, updates), opt_state

  theta, opt_state = _minibatch_loop(key, step, (theta0, tx.init(theta0)), n.astype(jnp.int32), cfg.batch_size,
                                     cfg.num_steps)
  return ivon_posterior(theta, opt_state, n, wd)


def _train_adamw(config, key, x, y, n, num_classes, p):
  """AdamW on one task's minibatch mean cross-entropy with decoupled weight decay prior / N_t."""
  cfg = config.adamw
  tx = optax.adamw(cfg.learning_rate, weight_decay=config.prior_precision / n)
  mean_loss = lambda th, idx: logistic.mean_ce(th, x[idx], y[idx], num_classes)
  theta0 = jnp.zeros(p)

  def step(k, carry, idx):
    theta, opt_state = carry
    updates, opt_state = tx.update(jax.grad(mean_loss)(theta, idx), opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state

  theta, _ = _minibatch_loop(key, step, (theta0, tx.init(theta0)), n, cfg.batch_size, cfg.num_steps)
  return theta


def _subset(config, *names) -> dict:
  d = config.to_dict()
  out = {n: d[n] for n in names}
  out.update(dataset=d["dataset"], tasks=d["tasks"], test_fraction=d["test_fraction"], seed=d["seed"])
  return out


def accuracies(theta, batch, num_classes):
  """[overall accuracy, accuracy on the test examples of task 1, ..., task T] of the flat softmax regression."""
  x, y, task_onehot = batch  # task_onehot [N, T]: the task each test example's class belongs to
  correct = (jnp.argmax(logistic.logits(theta, x, num_classes), axis=1) == y).astype(jnp.float32)
  per_task = (correct @ task_onehot) / jnp.maximum(jnp.sum(task_onehot, axis=0), 1.0)
  return jnp.concatenate([jnp.mean(correct)[None], per_task])


def merge_fn(method: str, config):
  if method == "simple":
    return lambda q, a: merge.simple_average(q.mean, a)
  if method == "mog":
    return lambda q, a: merge.mixture_weighted(q, a, num_iters=config.em_iters)
  return merge.hessian_weighted


def run(config, workdir: str) -> dict:
  """Runs the whole experiment into `workdir`; returns {'metrics': ..., 'report': path, 'recommendation': ...}."""
  os.makedirs(workdir, exist_ok=True)
  costs: dict[str, float] = {}
  key = jax.random.key(config.seed)
  with config.unlocked():
    config.workdir_posteriors = os.path.join(workdir, "posteriors")
  ds = data.load(config.dataset, seed=config.seed, test_fraction=config.test_fraction)
  task_data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in data.split_by_classes(ds.train_x, ds.train_y, config.tasks)]
  num_tasks = len(task_data)
  # Test examples with the task of their class: the metric is [overall accuracy, accuracy on each task's classes].
  task_of_class = np.full(ds.num_classes, -1)
  for t, group in enumerate(config.tasks):
    task_of_class[list(group)] = t
  test = (jnp.asarray(ds.test_x), jnp.asarray(ds.test_y), jax.nn.one_hot(task_of_class[ds.test_y], num_tasks))
  alphas = grid.simplex(num_tasks, config.spacing)
  evaluate = lambda theta, batch: accuracies(theta, batch, ds.num_classes)
  with _timed(costs, "posteriors_s"):
    posts = build_posteriors(config, ds, task_data, key, costs)

  previews = {}
  for method in config.methods:
    with _timed(costs, f"preview_{method}_s"):
      previews[method] = bmerge.preview(merge_fn(method, config), posts[method], alphas, evaluate, test,
                                        chunk_size=config.chunk_size, workdir=workdir, tag=f"preview_{method}")

  n_train = ds.train_x.shape[0]
  batch = logistic.multitask_batch(task_data, ds.num_classes)
  task_losses = lambda theta, b: logistic.multitask_losses(theta, b, config.prior_precision) / n_train
  p = logistic.num_params(ds.num_features, ds.num_classes)
  with _timed(costs, "exact_s"):
    exact_all = exact.joint_train(task_losses, jnp.zeros(p), alphas, _gd(config), config.gd.num_steps, batch,
                                  eval_fn=evaluate, eval_batch=test, chunk_size=config.chunk_size, workdir=workdir,
                                  tag="exact")
  costs["exact_per_alpha_s"] = costs["exact_s"] / len(alphas)
  exact_acc = exact_all[:, 0]

  summary = metrics.summarize(alphas, {m: v[:, 0] for m, v in previews.items()}, exact_acc, maximize=True)
  # Per-task accuracies: does the preview's Pareto front pick truly Pareto-optimal trade-offs?
  summary["pareto"] = {}
  for m, v in previews.items():
    fc = metrics.compare_fronts(alphas, v[:, 1:], exact_all[:, 1:], maximize=True)
    summary["pareto"][m] = {"recall": fc.recall, "igd": fc.igd, "exact_front_size": int(len(fc.exact_front)),
                            "preview_front_size": int(len(fc.preview_front))}
  summary["costs"] = costs
  summary["num_alphas"] = len(alphas)
  summary["metric"] = "test accuracy (all classes); per-task accuracies in the preview_*/exact chunks, columns 1..T"
  summary["test_examples_per_task"] = np.asarray(test[2].sum(axis=0)).astype(int).tolist()
  summary["config"] = config.to_dict()

  # Recommendation: the top-k alphas of the preview a user would trust (the mixture if built), as a config.
  source = "mog" if "mog" in previews else config.methods[-1]
  top = np.argsort(-previews[source][:, 0], kind="stable")[:config.recommend_k]
  rec = {"from": source, "alphas": alphas[top].tolist(), "preview": previews[source][top, 0].tolist()}
  if config.run_recommended:
    with _timed(costs, "recommended_joint_s"):
      rec_acc = exact.joint_train(task_losses, jnp.zeros(p), alphas[top], _gd(config), config.gd.num_steps, batch,
                                  eval_fn=evaluate, eval_batch=test, chunk_size=len(top), progress=False)[:, 0]
    rec["joint_accuracy"] = np.asarray(rec_acc).tolist()
    rec["regret"] = float(np.max(exact_acc) - np.max(rec_acc))
  summary["recommendation"] = rec

  figures = report.figures(workdir, alphas, {m: v[:, 0] for m, v in previews.items()}, exact_acc, config.task_names)
  split = "balanced" if tuple(map(tuple, config.tasks)) == ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9)) else "imbalanced"
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=1)
  path = report.write(workdir, title=f"digits, {split} split ({config.dataset})", summary=summary,
                      paper=PAPER[split] if config.dataset in ("digits", "mnist") else None,
                      paper_column=PAPER_COLUMN, describe={m: f"{LEARNER[m]} -> {MERGE_RULE[m]}" for m in previews},
                      figures=figures)
  return {"metrics": summary, "report": path, "recommendation": rec}
