"""Fig. 2 (App. B.1): previews of a 3-task, 2-parameter problem with log-sum-exp losses (`bmerge.models.toy2d`).

Per task, three posteriors approximate exp(-loss_t): the minimiser alone (simple averaging, Eq. 2), a full Gaussian
by VON (Hessian-weighted merge, Eq. 10) and a mixture of full Gaussians by mixture VI (mixture-weighted merge, EM,
Eq. 12). For every alpha of the simplex grid the merged theta_alpha is compared with the exact map
theta*_alpha = argmin_theta sum_t alpha_t loss_t(theta) (joint training).

Metric: the true multitask loss L_alpha(theta) = sum_t alpha_t loss_t(theta) at the merged theta_alpha (`bmerge.compare`
with overall='weighted' over the per-task losses); the exact surface is L_alpha(theta*_alpha), its minimum over
theta, so preview >= exact everywhere and the MSE is the mean squared excess loss. Posteriors are cached in
`<workdir>/posteriors`, preview and joint-training chunks in `<workdir>/<tag>/<inputs key>`, so a second run
recomputes nothing but the figures.
"""

from __future__ import annotations

import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bmerge
from bmerge import checkpoint
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import merge
from bmerge import plot
from bmerge.assess.comparison import Entry
from bmerge.models import toy2d

METHODS = ("simple", "von", "mog")
DESCRIBE = {"simple": "task minimisers -> simple averaging (Eq. 2)",
            "von": "VON, full covariance -> Hessian-weighted (Eq. 10)",
            "mog": "mixture VI, K full Gaussians -> mixture-weighted EM (Eq. 12)"}


def make_tasks(config) -> toy2d.Tasks:
  """The config's tasks (drawn from config.seed)."""
  return toy2d.make_tasks(jax.random.fold_in(jax.random.key(config.seed), 0), config.num_terms, config.normal_std,
                          config.uniform_a, config.uniform_b)


def _subset(config, *names) -> dict:
  d = config.to_dict()
  return {n: d[n] for n in names + ("seed", "num_terms", "normal_std", "uniform_a", "uniform_b", "l2")}


def _exact_optimizer(config):
  return optax.sgd(config.exact.learning_rate, momentum=config.exact.momentum or None)


def build_posteriors(config, tasks, cache: str, costs: dict) -> dict:
  """method -> stacked posterior over the T tasks, each through `checkpoint.cached_posterior`.

  The task minimisers come from the exact solver at the simplex vertices (same optimizer, budget and start as the
  exact map, so simple averaging is exact at the vertices); VON and the mixture (`bmerge.fit.von` / `bmerge.fit.mog`)
  start at the Laplace approximation of exp(-beta loss_t) there, and one compiled program fits all T tasks (vmap
  over the task data).
  """
  num_tasks, beta = tasks.a.shape[0], config.inverse_temperature
  k_von, k_mog = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  losses = partial(toy2d.task_losses, l2=config.l2)

  t0 = time.perf_counter()
  minimisers = checkpoint.cached_posterior(
      cache, "minimisers", _subset(config, "exact"),
      lambda: bmerge.IsoGaussian(jnp.asarray(exact.joint_train(losses, jnp.zeros(2), np.eye(num_tasks),
                                                               _exact_optimizer(config), config.exact.num_steps,
                                                               tasks, progress=False)), jnp.ones(num_tasks)))
  costs["posteriors simple"] = time.perf_counter() - t0
  mins = jnp.asarray(minimisers.mean)
  hess = beta * jax.vmap(jax.hessian(toy2d.task_loss), in_axes=(0, 0, 0, None))(mins, tasks.a, tasks.b, config.l2)
  gibbs = lambda a_t, b_t: lambda th: beta * toy2d.task_loss(th, a_t, b_t, config.l2)
  v, m = config.von, config.mog

  def von_one(k, a_t, b_t, mean, h):
    return fit.von(k, gibbs(a_t, b_t), mean, num_steps=v.num_steps, rho=v.rho, num_samples=v.num_samples,
                   estimator=v.estimator, init_precision=h, antithetic=v.num_samples % 2 == 0)

  def mog_one(k, a_t, b_t, mean, h):
    return fit.mog(k, gibbs(a_t, b_t), mean, num_components=m.num_components, num_steps=m.num_steps,
                   init_scale=m.init_scale, beta=m.beta, beta_w=m.beta_w, num_samples=m.num_samples,
                   estimator=m.estimator, init_precision=h, antithetic=m.num_samples % 2 == 0)

  out = {"simple": minimisers}
  for name, one, key in (("von", von_one, k_von), ("mog", mog_one, k_mog)):
    t0 = time.perf_counter()
    out[name] = checkpoint.cached_posterior(
        cache, name, _subset(config, "exact", "inverse_temperature", name),
        lambda one=one, key=key: jax.jit(jax.vmap(one))(jax.random.split(key, num_tasks), tasks.a, tasks.b, mins,
                                                        hess))
    costs[f"posteriors {name}"] = time.perf_counter() - t0
  return out


def merge_fn(method: str, config):
  """merge_fn(posteriors, alphas [G, T]) -> merged theta [G, 2]."""
  if method == "simple":
    return merge.simple_average  # takes the minimisers' IsoGaussian and uses its means
  if method == "von":
    return merge.hessian_weighted
  if method == "mog":
    return partial(merge.mixture_weighted, num_iters=config.em_iters)
  raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def _surfaces(posts, tasks, config) -> dict:
  """name -> per-task values on points of the plane [M, 2] -> [M, T]: the true losses, and the surrogate
  -log q_t / beta of each rule's posteriors (simple averaging: |theta - theta_t|^2 / 2, its N(theta_t, I))."""
  beta = config.inverse_temperature
  on_points = lambda f: jax.jit(lambda p: jax.vmap(f, out_axes=0)(p.astype(jnp.float32)))
  neg_log_q = lambda stacked: on_points(lambda p: -jax.vmap(lambda q: toy2d.log_density(q, p))(stacked) / beta)
  return {"exact": on_points(lambda p: toy2d.task_losses(p, tasks, config.l2)),
          "simple": on_points(lambda p: 0.5 * jnp.sum((p - posts["simple"].mean) ** 2, axis=-1)),
          "von": neg_log_q(posts["von"]), "mog": neg_log_q(posts["mog"])}


def run(config, workdir: str) -> dict:
  """Builds the posteriors, previews every alpha, solves the exact map, writes metrics.json, figures, report.md.

  Returns:
    {'metrics': the metrics.json dict (of `bmerge.compare`, with the loss minimised: maximize=False; plus
     'distance', 'exact_max_grad_norm', 'paper_ordering_holds', 'config'), 'report': path of report.md,
     'figures': PNG paths, 'arrays': alphas, exact and merged thetas and losses (also saved with bmerge.checkpoint
     in <workdir>/arrays), 'posteriors': method -> stacked posterior}.
  """
  os.makedirs(workdir, exist_ok=True)
  costs: dict[str, float] = {}
  tasks = make_tasks(config)
  alphas = grid.simplex(len(config.task_names), config.spacing)
  g = len(alphas)
  # The surrogate panels' alphas ride along with the grid in the joint training (one compiled call for both).
  surr = np.asarray(config.surrogate_alphas, np.float64).reshape(-1, alphas.shape[1])
  surr = surr / surr.sum(axis=1, keepdims=True)
  alphas_all = np.concatenate([alphas, surr])
  posts = build_posteriors(config, tasks, os.path.join(workdir, "posteriors"), costs)
  losses = partial(toy2d.task_losses, l2=config.l2)

  t0 = time.perf_counter()
  exact_theta = np.asarray(exact.joint_train(losses, jnp.zeros(2), alphas_all, _exact_optimizer(config),
                                             config.exact.num_steps, tasks, chunk_size=config.chunk_size,
                                             workdir=workdir, tag="exact", progress=False))
  costs["exact"] = time.perf_counter() - t0
  per_task = jax.jit(jax.vmap(losses, in_axes=(0, None)))
  exact_losses = np.asarray(per_task(jnp.asarray(exact_theta), tasks), np.float64)  # [G + S, T]
  merged = {m: np.asarray(merge_fn(m, config)(posts[m], alphas_all)) for m in METHODS}  # [G + S, 2] each
  dist = {m: np.linalg.norm(merged[m][:g] - exact_theta[:g], axis=1) for m in METHODS}
  # First-order condition of the exact map: |sum_t alpha_t grad loss_t(theta*_alpha)|.
  grads = jax.jit(jax.vmap(jax.jacobian(losses), in_axes=(0, None)))(jnp.asarray(exact_theta[:g]), tasks)
  residual = np.linalg.norm(np.einsum("gt,gtp->gp", alphas, np.asarray(grads, np.float64)), axis=1)

  t0 = time.perf_counter()
  names = list(config.task_names)
  surfaces = _surfaces(posts, tasks, config)
  extra = [
      plot.ternary_contours(alphas, dist, os.path.join(workdir, "distance.png"), task_names=names, best=False,
                            label="|theta_alpha - theta*_alpha|",
                            title="distance of the merged model to the exact minimiser"),
      plot.solutions_2d(os.path.join(workdir, "solutions.png"), surfaces["exact"],
                        posts["simple"].mean, exact_theta[:g], {m: merged[m][:g] for m in METHODS}, task_names=names,
                        extra={"von": posts["von"].mean},
                        title=f"{g} alphas on the simplex: task-loss contours, exact and merged solutions"),
      plot.surrogates_2d(os.path.join(workdir, "surrogates.png"), surfaces, surr,
                         exact_theta[g:], {m: merged[m][g:] for m in METHODS}, minimisers=posts["simple"].mean,
                         title="true multitask loss vs the surrogate -sum_t alpha_t log q_t "
                               "(each minus its minimum, clipped at 3)")]
  costs["figures of the plane"] = time.perf_counter() - t0

  distance = {m: {"mean": float(np.mean(d)), "max": float(np.max(d)), "mse": float(np.mean(d ** 2))}
              for m, d in dist.items()}
  notes = ["The distance is |theta_alpha - theta*_alpha| over the grid; the exact map's largest first-order residual "
           f"|sum_t alpha_t grad loss_t| is {np.max(residual):.1e}.", "",
           "| method | mean distance | max distance |", "|---|---|---|"]
  notes += [f"| {m} | {d['mean']:.4f} | {d['max']:.4f} |" for m, d in distance.items()]
  out = bmerge.compare(
      [Entry(m, posts[m], merge_fn(m, config), DESCRIBE[m]) for m in METHODS], losses, tasks, alphas,
      exact=exact_losses[:g], overall="weighted", maximize=False, metric="multitask loss", task_metric="task loss",
      task_names=names, costs=costs, title="2-D toy (paper Fig. 2, App. B.1)", notes="\n".join(notes), folder=workdir,
      workdir=workdir, chunk_size=config.chunk_size, extra_figures=extra,
      paper={"source": "Fig. 2, which shows the errors' ordering only",
             "methods": {"simple": {"label": "Simple", "mse_rank": 3}, "von": {"label": "Full Gaussian", "mse_rank": 2},
                         "mog": {"label": "Mixture", "mse_rank": 1}}},
      details={"distance": distance, "exact_max_grad_norm": float(np.max(residual)), "config": config.to_dict()})
  summary = out.summary

  multitask = lambda per: np.sum(alphas * np.asarray(per, np.float64), axis=1)
  arrays = {"alphas": alphas, "exact_theta": exact_theta[:g], "exact_loss": multitask(exact_losses[:g]),
            **{f"{m}_theta": merged[m][:g] for m in METHODS},
            **{f"{m}_loss": multitask(out.previews[m]) for m in METHODS}}
  checkpoint.save_arrays(os.path.join(workdir, "arrays"), arrays, overwrite=True)
  figures = [str(p) for k, p in out.paths.items() if k not in ("report", "metrics")]
  return {"metrics": summary, "report": str(out.paths["report"]), "figures": figures, "arrays": arrays,
          "posteriors": posts}
