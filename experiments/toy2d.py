"""Fig. 2 (App. B.1): previews of a 3-task, 2-parameter problem with log-sum-exp losses (`bmerge.models.toy2d`).

The module reads in the order the experiment runs:

1. config (`configs/toy2d.py`);
2. data (`make_tasks`): the affine pieces of every task's loss, drawn from `config.seed`;
3. posteriors (`build_posteriors`): per task, three approximations of exp(-loss_t): the minimiser alone (simple
   averaging, Eq. 2), a full Gaussian by VON (Hessian-weighted merge, Eq. 10) and a mixture of full Gaussians by
   mixture VI (mixture-weighted merge, EM, Eq. 12); one compiled call `vmap`ped over the tasks each;
4. preview and exact: `bmerge.compare` merges and evaluates every alpha of the simplex; `solve_exact` computes the
   exact map theta*_alpha = argmin_theta sum_t alpha_t loss_t(theta) (joint training);
5. report: `bmerge.compare` writes metrics.json, surfaces.npz, report.md and the figures; the figures of the plane
   (`plane_figures`) and the distance of each merged model to the exact map are added.

Metric: the true multitask loss L_alpha(theta) = sum_t alpha_t loss_t(theta) at the merged theta_alpha
(overall='weighted' over the per-task losses); the exact surface is L_alpha(theta*_alpha), its minimum over theta, so
preview >= exact everywhere and the MSE is the mean squared excess loss. Posteriors are cached in
`<workdir>/posteriors` by `bmerge.checkpoint.cached` (keyed by the learner's code and settings, the task arrays and
the PRNG keys), preview and joint-training chunks in `<workdir>/<tag>/<inputs key>`, so a second run recomputes
nothing but the figures and reports the seconds each stage took when it was computed.
"""

from __future__ import annotations

import os
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
from bmerge import timing
from bmerge.models import toy2d

METHODS = ("simple", "von", "mog")
DESCRIBE = {"simple": "task minimisers -> simple averaging (Eq. 2)",
            "von": "VON, full covariance -> Hessian-weighted (Eq. 10)",
            "mog": "mixture VI, K full Gaussians -> mixture-weighted EM (Eq. 12)"}


def make_tasks(config) -> toy2d.Tasks:
  """The config's tasks (drawn from config.seed)."""
  return toy2d.make_tasks(jax.random.fold_in(jax.random.key(config.seed), 0), config.num_terms, config.normal_std,
                          config.uniform_a, config.uniform_b)


def _exact_optimizer(settings):
  """Full-batch heavy-ball gradient descent with `config.exact`'s settings: the minimisers' and the exact map's."""
  return optax.sgd(settings["learning_rate"], momentum=settings["momentum"] or None)


def build_posteriors(config, tasks: toy2d.Tasks, cache: str) -> tuple[dict, dict]:
  """(method -> stacked posterior over the T tasks, stage -> `checkpoint.Cached`).

  The task minimisers come from the exact solver at the simplex vertices (same optimizer, budget and start as the
  exact map, so simple averaging is exact at the vertices); VON and the mixture (`bmerge.fit.von` / `bmerge.fit.mog`)
  start at the Laplace approximation of exp(-beta loss_t) there, and one compiled program fits all T tasks (vmap
  over the task data). Each is cached on the function (its code and the settings it closes over) and its arguments.
  """
  num_tasks, beta, l2 = tasks.a.shape[0], config.inverse_temperature, config.l2
  k_von, k_mog = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  stages = {}

  def cached_fit(name, fn, *args):
    stages[f"posteriors {name}"] = checkpoint.cached_call(cache, name, fn, *args)
    return stages[f"posteriors {name}"].value

  losses = partial(toy2d.task_losses, l2=l2)
  minimise = lambda tasks, settings: bmerge.IsoGaussian(jnp.asarray(exact.joint_train(
      losses, jnp.zeros(2), np.eye(num_tasks), _exact_optimizer(settings), settings["num_steps"], tasks,
      progress=False)), jnp.ones(num_tasks))
  minimisers = cached_fit("simple", minimise, tasks, config.exact.to_dict())
  mins = jnp.asarray(minimisers.mean)
  hess = beta * jax.vmap(jax.hessian(toy2d.task_loss), in_axes=(0, 0, 0, None))(mins, tasks.a, tasks.b, l2)
  gibbs = lambda a_t, b_t: lambda th: beta * toy2d.task_loss(th, a_t, b_t, l2)
  v, m = config.von.to_dict(), config.mog.to_dict()

  def von_one(k, a_t, b_t, mean, h):
    return fit.von(k, gibbs(a_t, b_t), mean, num_steps=v["num_steps"], rho=v["rho"], num_samples=v["num_samples"],
                   estimator=v["estimator"], init_precision=h, antithetic=v["num_samples"] % 2 == 0)

  def mog_one(k, a_t, b_t, mean, h):
    return fit.mog(k, gibbs(a_t, b_t), mean, num_components=m["num_components"], num_steps=m["num_steps"],
                   init_scale=m["init_scale"], beta=m["beta"], beta_w=m["beta_w"], num_samples=m["num_samples"],
                   estimator=m["estimator"], init_precision=h, antithetic=m["num_samples"] % 2 == 0)

  out = {"simple": minimisers}
  for name, one, key in (("von", von_one, k_von), ("mog", mog_one, k_mog)):
    out[name] = cached_fit(name, jax.jit(jax.vmap(one)), jax.random.split(key, num_tasks), tasks.a, tasks.b, mins,
                           hess)
  return out, stages


def merge_fn(method: str, config):
  """merge_fn(posteriors, alphas [G, T]) -> merged theta [G, 2]."""
  if method == "simple":
    return merge.simple_average  # takes the minimisers' IsoGaussian and uses its means
  if method == "von":
    return merge.hessian_weighted
  if method == "mog":
    return partial(merge.mixture_weighted, num_iters=config.em_iters)
  raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def solve_exact(config, tasks: toy2d.Tasks, alphas, workdir: str) -> tuple[np.ndarray, timing.Cost]:
  """The exact map theta*_alpha [G, 2] for every alpha [G, T] (joint training from theta = 0), and what it cost."""
  losses = partial(toy2d.task_losses, l2=config.l2)
  with timing.recording() as log:
    theta = exact.joint_train(losses, jnp.zeros(2), alphas, _exact_optimizer(config.exact), config.exact.num_steps,
                              tasks, chunk_size=config.chunk_size, workdir=workdir, tag="exact", progress=False)
  return np.asarray(theta), timing.combine("exact", log)


def _surfaces(posts, tasks, config) -> dict:
  """name -> per-task values on points of the plane [M, 2] -> [M, T]: the true losses, and the surrogate
  -log q_t / beta of each rule's posteriors (simple averaging: |theta - theta_t|^2 / 2, its N(theta_t, I))."""
  beta = config.inverse_temperature
  on_points = lambda f: jax.jit(lambda p: jax.vmap(f, out_axes=0)(p.astype(jnp.float32)))
  neg_log_q = lambda stacked: on_points(lambda p: -jax.vmap(lambda q: toy2d.log_density(q, p))(stacked) / beta)
  return {"exact": on_points(lambda p: toy2d.task_losses(p, tasks, config.l2)),
          "simple": on_points(lambda p: 0.5 * jnp.sum((p - posts["simple"].mean) ** 2, axis=-1)),
          "von": neg_log_q(posts["von"]), "mog": neg_log_q(posts["mog"])}


def plane_figures(config, workdir, posts, tasks, alphas, dist, exact_theta, merged, surr) -> list[str]:
  """distance.png (|theta_alpha - theta*_alpha| on the simplex), solutions.png (the task losses' contours with the
  exact and merged solutions) and surrogates.png (true multitask loss vs each rule's surrogate at `surr` alphas)."""
  g, names = len(alphas), list(config.task_names)
  surfaces = _surfaces(posts, tasks, config)
  return [
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


def run(config, workdir: str) -> dict:
  """Config -> tasks -> posteriors -> previews and the exact map -> report.

  Returns:
    {'metrics': the metrics.json dict (of `bmerge.compare`, with the loss minimised: maximize=False; plus
     'distance', 'exact_max_grad_norm', 'paper_ordering_holds', 'config'), 'report': path of report.md,
     'figures': PNG paths, 'arrays': alphas, exact and merged thetas and losses (also saved with bmerge.checkpoint
     in <workdir>/arrays), 'previews': method -> per-task losses [G, T] of the merged models (`bmerge.compare`),
     'posteriors': method -> stacked posterior}.
  """
  os.makedirs(workdir, exist_ok=True)
  alphas = grid.simplex(len(config.task_names), config.spacing)
  g = len(alphas)
  # The surrogate panels' alphas ride along with the grid in the joint training (one compiled call for both).
  surr = np.asarray(config.surrogate_alphas, np.float64).reshape(-1, alphas.shape[1])
  surr = surr / surr.sum(axis=1, keepdims=True)
  alphas_all = np.concatenate([alphas, surr])

  tasks = make_tasks(config)
  posts, stages = build_posteriors(config, tasks, os.path.join(workdir, "posteriors"))
  costs = {k: c.cost(k) for k, c in stages.items()}
  exact_theta, costs["exact"] = solve_exact(config, tasks, alphas_all, workdir)
  losses = partial(toy2d.task_losses, l2=config.l2)
  exact_losses = np.asarray(jax.jit(jax.vmap(losses, in_axes=(0, None)))(jnp.asarray(exact_theta), tasks),
                            np.float64)  # [G + S, T]
  merged = {m: np.asarray(merge_fn(m, config)(posts[m], alphas_all)) for m in METHODS}  # [G + S, 2] each
  dist = {m: np.linalg.norm(merged[m][:g] - exact_theta[:g], axis=1) for m in METHODS}
  # First-order condition of the exact map: |sum_t alpha_t grad loss_t(theta*_alpha)|.
  grads = jax.jit(jax.vmap(jax.jacobian(losses), in_axes=(0, None)))(jnp.asarray(exact_theta[:g]), tasks)
  residual = np.linalg.norm(np.einsum("gt,gtp->gp", alphas, np.asarray(grads, np.float64)), axis=1)
  extra = checkpoint.timed(costs, "figures of the plane", lambda: plane_figures(
      config, workdir, posts, tasks, alphas, dist, exact_theta, merged, surr))

  distance = {m: {"mean": float(np.mean(d)), "max": float(np.max(d)), "mse": float(np.mean(d ** 2))}
              for m, d in dist.items()}
  notes = ["The distance is |theta_alpha - theta*_alpha| over the grid; the exact map's largest first-order residual "
           f"|sum_t alpha_t grad loss_t| is {np.max(residual):.1e}.", "",
           "| method | mean distance | max distance |", "|---|---|---|"]
  notes += [f"| {m} | {d['mean']:.4f} | {d['max']:.4f} |" for m, d in distance.items()]
  options = bmerge.CompareOptions(
      metric="multitask loss", task_metric="task loss", task_names=list(config.task_names), costs=costs,
      title="2-D toy (paper Fig. 2, App. B.1)", notes="\n".join(notes), chunk_size=config.chunk_size,
      extra_figures=extra, progress=False,
      paper={"source": "Fig. 2, which shows the errors' ordering only",
             "methods": {"simple": {"label": "Simple", "mse_rank": 3}, "von": {"label": "Full Gaussian", "mse_rank": 2},
                         "mog": {"label": "Mixture", "mse_rank": 1}}},
      details={"distance": distance, "exact_max_grad_norm": float(np.max(residual)), "config": config.to_dict()})
  entries = [bmerge.Entry(m, posts[m], merge_fn(m, config), DESCRIBE[m]) for m in METHODS]
  out = bmerge.compare(entries, losses, tasks, alphas, exact=exact_losses[:g], overall="weighted", maximize=False,
                       folder=workdir, workdir=workdir, options=options)

  multitask = lambda per: np.sum(alphas * np.asarray(per, np.float64), axis=1)
  arrays = {"alphas": alphas, "exact_theta": exact_theta[:g], "exact_loss": multitask(exact_losses[:g]),
            **{f"{m}_theta": merged[m][:g] for m in METHODS},
            **{f"{m}_loss": multitask(out.previews[m]) for m in METHODS}}
  checkpoint.save_arrays(os.path.join(workdir, "arrays"), arrays, overwrite=True)
  figures = [str(p) for k, p in out.paths.items() if k not in ("report", "metrics", "surfaces")]
  return {"metrics": out.summary, "report": str(out.paths["report"]), "figures": figures, "arrays": arrays,
          "previews": dict(out.previews), "posteriors": posts}
