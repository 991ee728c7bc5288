"""Fig. 2 (App. B.1): previews of a 3-task, 2-parameter problem with log-sum-exp losses.

  loss_t(theta) = log sum_i exp(a_it^T theta + b_it) + l2 / 2 |theta|^2      (config: configs/toy2d.py)

Per task, three posteriors approximate exp(-loss_t): the minimiser alone (simple averaging, Eq. 2), a full Gaussian
by VON (Hessian-weighted merge, Eq. 10) and a mixture of full Gaussians by mixture VI (mixture-weighted merge, EM,
Eq. 12). For every alpha of the simplex grid the merged theta_alpha is compared with the exact map
theta*_alpha = argmin_theta sum_t alpha_t loss_t(theta) (joint training).

Metric (the preview): the true multitask loss L_alpha(theta) = sum_t alpha_t loss_t(theta) at the merged theta_alpha;
the exact surface is L_alpha(theta*_alpha), its minimum over theta, so preview >= exact everywhere and the MSE over the
grid is the mean squared excess loss. The parameter error |theta_alpha - theta*_alpha| is reported next to it.

Posteriors are cached per config in `<workdir>/posteriors`, preview and joint-training chunks in `<workdir>/<tag>`
(the tag carries a config fingerprint, so a changed config never reuses stale chunks), so a second run recomputes
nothing but the figures.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import matplotlib.collections
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import optax
from jax.scipy.special import logsumexp

import bmerge
from bmerge import checkpoint, exact, grid, merge, metrics, plot
from bmerge.optim import mog as mog_lib
from bmerge.optim import von as von_lib

METHODS = ("simple", "von", "mog")
LABEL = {"simple": "simple averaging", "von": "full Gaussian (VON)", "mog": "mixture of Gaussians"}
DESCRIBE = {"simple": "task minimisers -> simple averaging (Eq. 2)",
            "von": "VON, full covariance -> Hessian-weighted (Eq. 10)",
            "mog": "mixture VI, K full Gaussians -> mixture-weighted EM (Eq. 12)"}
_TASK_COLORS = ("tab:blue", "tab:orange", "tab:green")
_METHOD_COLORS = {"simple": "tab:red", "von": "tab:purple", "mog": "tab:cyan"}


# ----------------------------------------------------------------------------------------------------------------
# The problem.


def make_tasks(config) -> tuple[jax.Array, jax.Array]:
  """(a [T, N, 2], b [T, N]): normal draws for tasks 1, 2 and uniform draws for task 3 (App. B.1), from config.seed."""
  return _draw_tasks(jax.random.fold_in(jax.random.key(config.seed), 0), config.num_terms, config.normal_std,
                     config.uniform_a, config.uniform_b)


@partial(jax.jit, static_argnums=1)
def _draw_tasks(key, n, std, uniform_a, uniform_b):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  a12 = std * jax.random.normal(k1, (2, n, 2))
  b12 = std * jax.random.normal(k2, (2, n))
  a3 = jax.random.uniform(k3, (1, n, 2), minval=-uniform_a, maxval=uniform_a)
  b3 = jax.random.uniform(k4, (1, n), minval=-uniform_b, maxval=uniform_b)
  return jnp.concatenate([a12, a3]), jnp.concatenate([b12, b3])


def task_loss(theta: jax.Array, a: jax.Array, b: jax.Array, l2: float) -> jax.Array:
  """One task: log sum_i exp(a_i^T theta + b_i) + l2 / 2 |theta|^2 (convex, and strongly convex for l2 > 0)."""
  return logsumexp(a @ theta + b) + 0.5 * l2 * jnp.dot(theta, theta)


def task_losses(theta: jax.Array, tasks, l2: float) -> jax.Array:
  """[T] every task's loss at theta [2]; `tasks` = (a [T, N, 2], b [T, N])."""
  a, b = tasks
  return jax.vmap(task_loss, in_axes=(None, 0, 0, None))(theta, a, b, l2)


def log_density(q, theta: jax.Array) -> jax.Array:
  """log q(theta) for one FullGaussian or one Mixture of FullGaussian components (theta [..., P])."""
  if isinstance(q, bmerge.Mixture):
    comps = q.components
    lp = jax.vmap(lambda m, h: _gauss_logpdf(theta, m, h), out_axes=-1)(comps.mean, comps.precision)
    return logsumexp(lp + (q.log_weights - logsumexp(q.log_weights)), axis=-1)
  return _gauss_logpdf(theta, q.mean, q.precision)


def _gauss_logpdf(theta, mean, precision):
  d = theta - mean
  _, logdet = jnp.linalg.slogdet(precision)
  return -0.5 * jnp.einsum("...i,ij,...j->...", d, precision, d) + 0.5 * logdet - 0.5 * mean.shape[-1] * jnp.log(
      2 * jnp.pi)


# ----------------------------------------------------------------------------------------------------------------
# Posteriors.


def _subset(config, *names) -> dict:
  d = config.to_dict()
  out = {n: d[n] for n in names}
  for n in ("seed", "num_terms", "normal_std", "uniform_a", "uniform_b", "l2"):
    out[n] = d[n]
  return out


def _exact_optimizer(config):
  return optax.sgd(config.exact.learning_rate, momentum=config.exact.momentum or None)


def build_posteriors(config, tasks, cache: str, costs: dict) -> dict:
  """method -> stacked posterior over the T tasks, each through `checkpoint.cached_posterior`."""
  a, b = tasks
  num_tasks = a.shape[0]
  beta = config.inverse_temperature
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  k_von, k_mog = jax.random.split(key)

  # Task minimisers with the exact solver at the simplex vertices (same optimizer, budget and start as the exact map,
  # so simple averaging is exact at the vertices by construction).
  t0 = time.perf_counter()
  objective = lambda th, tk: task_losses(th, tk, config.l2)
  minimisers = checkpoint.cached_posterior(
      cache, "minimisers", _subset(config, "exact"),
      lambda: bmerge.IsoGaussian(jnp.asarray(exact.joint_train(objective, jnp.zeros(2), np.eye(num_tasks),
                                                               _exact_optimizer(config), config.exact.num_steps, tasks,
                                                               progress=False)), jnp.ones(num_tasks)))
  costs["minimisers_s"] = time.perf_counter() - t0
  mins = jnp.asarray(minimisers.mean)
  # Laplace approximation of exp(-beta loss_t) at the minimiser: the starting point of both learners.
  hess = beta * jax.vmap(jax.hessian(task_loss), in_axes=(0, 0, 0, None))(mins, a, b, config.l2)

  def gibbs(a_t, b_t):
    return lambda th: beta * task_loss(th, a_t, b_t, config.l2)

  # One compiled program fits all T tasks (vmap over the task data): compiling dominates the cost in 2-D.
  c = config.von

  def build_von():
    def one(k, a_t, b_t, m, h):
      return von_lib.fit(k, gibbs(a_t, b_t), m, h, c.num_steps, rho=c.rho, num_samples=c.num_samples,
                         estimator=c.estimator, antithetic=c.num_samples % 2 == 0)
    state = jax.jit(jax.vmap(one))(jax.random.split(k_von, num_tasks), a, b, mins, hess)
    return von_lib.posterior(state)

  t0 = time.perf_counter()
  von = checkpoint.cached_posterior(cache, "von", _subset(config, "exact", "inverse_temperature", "von"), build_von)
  costs["von_s"] = time.perf_counter() - t0

  c = config.mog

  def build_mog():
    def one(k, a_t, b_t, m, h):
      k_init, k_fit = jax.random.split(k)
      chol = jnp.linalg.cholesky(h)
      eps = jax.random.normal(k_init, (c.num_components, m.shape[0]))
      init_means = m + c.init_scale * jax.scipy.linalg.solve_triangular(chol.T, eps.T, lower=False).T
      return mog_lib.fit(k_fit, gibbs(a_t, b_t), init_means, jnp.broadcast_to(h, (c.num_components,) + h.shape),
                         c.num_steps, beta=c.beta, beta_w=c.beta_w, num_samples=c.num_samples, estimator=c.estimator,
                         antithetic=c.num_samples % 2 == 0)
    state = jax.jit(jax.vmap(one))(jax.random.split(k_mog, num_tasks), a, b, mins, hess)
    return mog_lib.posterior(state)

  t0 = time.perf_counter()
  mog = checkpoint.cached_posterior(cache, "mog", _subset(config, "exact", "inverse_temperature", "mog"), build_mog)
  costs["mog_s"] = time.perf_counter() - t0
  return {"simple": minimisers, "von": von, "mog": mog}


def merge_fn(method: str, config):
  """merge_fn(posteriors, alphas [G, T]) -> merged theta [G, 2]."""
  if method == "simple":
    return lambda q, al: merge.simple_average(q.mean, al)
  if method == "von":
    return merge.hessian_weighted
  if method == "mog":
    return lambda q, al: merge.mixture_weighted(q, al, num_iters=config.em_iters)
  raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


# ----------------------------------------------------------------------------------------------------------------
# The run.


def run(config, workdir: str) -> dict:
  """Builds the posteriors, previews every alpha, solves the exact map, writes metrics.json, figures, report.md.

  Returns:
    {'metrics': the metrics.json dict (bmerge.metrics.summarize with maximize=False on the multitask loss, plus
     'costs' in seconds, 'distance', 'exact_max_grad_norm', ...), 'report': path of report.md, 'figures': PNG paths,
     'arrays': alphas, exact and merged thetas and losses (also saved with bmerge.checkpoint in <workdir>/arrays),
     'posteriors': method -> stacked posterior}.
  """
  os.makedirs(workdir, exist_ok=True)
  costs: dict[str, float] = {}
  tasks = make_tasks(config)
  alphas = grid.simplex(len(config.task_names), config.spacing)
  g = len(alphas)
  # The surrogate panels' alphas ride along with the grid (one compiled preview / joint-training call for both); the
  # metrics use the grid rows [:g] only.
  surr = np.asarray(config.surrogate_alphas, np.float64).reshape(-1, alphas.shape[1])
  surr = surr / surr.sum(axis=1, keepdims=True)
  alphas_all = np.concatenate([alphas, surr])
  fp = checkpoint.config_fingerprint(config)[:12]
  posts = build_posteriors(config, tasks, os.path.join(workdir, "posteriors"), costs)

  eval_fn = lambda theta, tk: {"theta": theta, "losses": task_losses(theta, tk, config.l2)}
  previews = {}
  for method in METHODS:
    t0 = time.perf_counter()
    previews[method] = bmerge.preview(merge_fn(method, config), posts[method], alphas_all, eval_fn, tasks,
                                      chunk_size=config.chunk_size, workdir=workdir, tag=f"preview_{method}_{fp}",
                                      progress=False)
    costs[f"preview_{method}_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  objective = lambda th, tk: task_losses(th, tk, config.l2)
  ex = exact.joint_train(objective, jnp.zeros(2), alphas_all, _exact_optimizer(config), config.exact.num_steps, tasks,
                         eval_fn=eval_fn, eval_batch=tasks, chunk_size=config.chunk_size, workdir=workdir,
                         tag=f"exact_{fp}", progress=False)
  costs["exact_s"] = time.perf_counter() - t0
  costs["exact_per_alpha_s"] = costs["exact_s"] / len(alphas_all)
  surr_out = {"exact": jax.tree.map(lambda x: x[g:], ex), **{m: jax.tree.map(lambda x: x[g:], previews[m])
                                                             for m in METHODS}}
  ex = jax.tree.map(lambda x: x[:g], ex)
  previews = {m: jax.tree.map(lambda x: x[:g], v) for m, v in previews.items()}

  def multitask(out):
    return np.sum(alphas * np.asarray(out["losses"], np.float64), axis=1)

  exact_loss = multitask(ex)
  preview_loss = {m: multitask(previews[m]) for m in METHODS}
  dist = {m: np.linalg.norm(np.asarray(previews[m]["theta"]) - np.asarray(ex["theta"]), axis=1) for m in METHODS}
  # First-order condition of the exact map: |sum_t alpha_t grad loss_t(theta*_alpha)|.
  grads = jax.jit(jax.vmap(jax.jacobian(objective), in_axes=(0, None)))(jnp.asarray(ex["theta"]), tasks)  # [G, T, 2]
  residual = np.linalg.norm(np.einsum("gt,gtp->gp", alphas, np.asarray(grads, np.float64)), axis=1)

  summary = metrics.summarize(alphas, preview_loss, exact_loss, maximize=False)
  summary["metric"] = ("multitask loss sum_t alpha_t loss_t(theta) at the merged theta_alpha (preview) and at the "
                       "exact minimiser theta*_alpha (exact); lower is better")
  summary["distance"] = {m: {"mean": float(np.mean(d)), "max": float(np.max(d)), "mse": float(np.mean(d ** 2))}
                         for m, d in dist.items()}
  summary["exact_max_grad_norm"] = float(np.max(residual))
  mses = [summary["methods"][m]["mse"] for m in METHODS]
  summary["paper_ordering_holds"] = bool(mses[0] > mses[1] > mses[2])
  summary["num_alphas"] = int(len(alphas))
  summary["config"] = config.to_dict()

  arrays = {"alphas": alphas, "exact_theta": np.asarray(ex["theta"]), "exact_loss": exact_loss,
            **{f"{m}_theta": np.asarray(previews[m]["theta"]) for m in METHODS},
            **{f"{m}_loss": preview_loss[m] for m in METHODS}}
  checkpoint.save_arrays(os.path.join(workdir, "arrays"), arrays, overwrite=True)

  t0 = time.perf_counter()
  figures = _figures(workdir, config, tasks, posts, alphas, ex, previews, exact_loss, preview_loss, dist, surr,
                     surr_out)
  costs["figures_s"] = time.perf_counter() - t0
  summary["costs"] = costs
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=1)
  report = _write_report(workdir, summary, figures)
  return {"metrics": summary, "report": report, "figures": figures, "arrays": arrays, "posteriors": posts}


# ----------------------------------------------------------------------------------------------------------------
# Figures and report.


def _figures(workdir, config, tasks, posts, alphas, ex, previews, exact_loss, preview_loss, dist, surr,
             surr_out) -> list[str]:
  names = list(config.task_names)
  out = [str(plot.ternary_contours(
      alphas, {"exact": exact_loss, **{LABEL[m]: preview_loss[m] for m in METHODS}},
      os.path.join(workdir, "contours.png"), task_names=names, maximize=False, label="multitask loss",
      title="sum_t alpha_t loss_t at the merged model (preview) vs at the exact minimiser"))]
  out.append(str(plot.ternary_contours(
      alphas, {LABEL[m]: dist[m] for m in METHODS}, os.path.join(workdir, "distance.png"), task_names=names,
      best=False, label="|theta_alpha - theta*_alpha|", title="distance of the merged model to the exact minimiser")))
  out.append(_solutions_figure(os.path.join(workdir, "solutions.png"), config, tasks, posts, alphas, ex, previews,
                               dist))
  out.append(_surrogate_figure(os.path.join(workdir, "surrogates.png"), config, tasks, posts, surr, surr_out))
  return out


@jax.jit
def _mesh_surfaces(posts, tasks, flat, l2, beta):
  """Per-task surfaces [M, T] on mesh points flat [M, 2]: true loss_t and each method's -log q_t / beta (simple
  averaging: |theta - theta_t|^2 / 2, its N(theta_t, I) posterior), one compiled call."""
  neg_log_q = lambda stacked: -jax.vmap(lambda q: log_density(q, flat), out_axes=1)(stacked) / beta
  return {"exact": jax.vmap(task_losses, in_axes=(0, None, None))(flat, tasks, l2),
          "simple": 0.5 * jnp.sum((flat[:, None, :] - posts["simple"].mean[None]) ** 2, axis=-1),
          "von": neg_log_q(posts["von"]), "mog": neg_log_q(posts["mog"])}


def _box(points: np.ndarray, margin: float = 0.35):
  lo, hi = points.min(0), points.max(0)
  pad = margin * np.maximum(hi - lo, 1.0)
  return lo - pad, hi + pad


def _mesh(lo, hi, n=101):
  xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
  xx, yy = np.meshgrid(xs, ys)
  return xx, yy, jnp.asarray(np.stack([xx, yy], -1).reshape(-1, 2), jnp.float32)


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path, format="png")
  return path


def _solutions_figure(path, config, tasks, posts, alphas, ex, previews, dist) -> str:
  """The visual of Fig. 2: task-loss contours, the exact solutions theta*_alpha and each method's theta_alpha."""
  exact_theta = np.asarray(ex["theta"])
  mins = np.asarray(posts["simple"].mean)
  pts = np.concatenate([exact_theta, mins] + [np.asarray(previews[m]["theta"]) for m in METHODS])
  lo, hi = _box(pts)
  xx, yy, flat = _mesh(lo, hi)
  losses = np.asarray(_mesh_surfaces(posts, tasks, flat, config.l2, config.inverse_temperature)["exact"])  # [M, T]
  fig = Figure(figsize=(5.0 * len(METHODS), 5.0), dpi=110, layout="constrained")
  axes = fig.subplots(1, len(METHODS), sharex=True, sharey=True)
  for ax, m in zip(axes, METHODS):
    for t in range(losses.shape[1]):
      z = losses[:, t].reshape(xx.shape)
      levels = np.min(z) + np.array([0.05, 0.25, 0.6, 1.2, 2.0])
      ax.contour(xx, yy, z, levels=levels, colors=_TASK_COLORS[t], linewidths=0.9, alpha=0.8)
      ax.plot(*mins[t], marker="*", markersize=14, color=_TASK_COLORS[t], markeredgecolor="black",
              label=f"task {t + 1} ({config.task_names[t]}) minimiser", zorder=5)
    merged = np.asarray(previews[m]["theta"])
    segs = np.stack([exact_theta, merged], axis=1)
    ax.add_collection(matplotlib.collections.LineCollection(segs, colors="0.5", linewidths=0.5, alpha=0.6))
    ax.scatter(*exact_theta.T, s=9, color="0.25", label="exact theta*_alpha", zorder=3)
    ax.scatter(*merged.T, s=9, color=_METHOD_COLORS[m], label="merged theta_alpha", zorder=4)
    if m == "von":
      ax.scatter(*np.asarray(posts["von"].mean).T, marker="D", s=40, color=_TASK_COLORS[:mins.shape[0]],
                 edgecolors="black", label="VON means", zorder=6)
    ax.set_title(f"{LABEL[m]}: mean |theta_alpha - theta*_alpha| = {np.mean(dist[m]):.3f}", fontsize=10)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_xlabel("theta_1")
  axes[0].set_ylabel("theta_2")
  axes[0].legend(fontsize=7, loc="lower left")
  fig.suptitle(f"{len(alphas)} alphas on the simplex: task-loss contours, exact and merged solutions")
  return _save(fig, path)


def _surrogate_figure(path, config, tasks, posts, surr_alphas, surr_out) -> str:
  """For a few alphas: the true sum_t alpha_t loss_t next to each method's surrogate -sum_t alpha_t log q_t / beta.

  `surr_out` holds the exact and merged thetas at `surr_alphas` (computed with the grid).
  """
  beta = config.inverse_temperature
  mins = np.asarray(posts["simple"].mean)
  pts = np.concatenate([mins, np.asarray(posts["von"].mean)])
  lo, hi = _box(pts, 0.15)
  xx, yy, flat = _mesh(lo, hi)
  per_task = {k: np.asarray(v) for k, v in _mesh_surfaces(posts, tasks, flat, config.l2, beta).items()}
  merged = {m: np.asarray(surr_out[m]["theta"]) for m in METHODS}
  exact_theta = np.asarray(surr_out["exact"]["theta"])
  cols = ["exact"] + list(METHODS)
  fig = Figure(figsize=(3.8 * len(cols), 3.6 * len(surr_alphas)), dpi=110, layout="constrained")
  axes = np.asarray(fig.subplots(len(surr_alphas), len(cols), sharex=True, sharey=True)).reshape(len(surr_alphas), -1)
  for i, al in enumerate(surr_alphas):
    for j, name in enumerate(cols):
      ax = axes[i, j]
      z = (per_task[name] @ al).reshape(xx.shape)
      z = z - z.min()
      ax.contourf(xx, yy, np.minimum(z, 3.0), levels=np.linspace(0, 3.0, 13), cmap="viridis_r")
      ax.plot(*exact_theta[i], marker="x", color="black", markersize=10, mew=2, label="exact minimiser")
      if name != "exact":
        ax.plot(*merged[name][i], marker="o", color="white", markeredgecolor="black", markersize=7,
                label="merged (surrogate's mode)")
      for t in range(mins.shape[0]):
        ax.plot(*mins[t], marker="*", markersize=9, color=_TASK_COLORS[t], markeredgecolor="black")
      title = "true sum alpha_t loss_t" if name == "exact" else f"{LABEL[name]} surrogate"
      ax.set_title(f"{title}\nalpha = ({', '.join(f'{x:.2f}' for x in al)})", fontsize=9)
      ax.set_aspect("equal")
  axes[0, -1].legend(fontsize=7, loc="lower right")
  fig.suptitle("true multitask loss vs the surrogate -sum_t alpha_t log q_t (each minus its minimum, clipped at 3)")
  return _save(fig, path)


def _write_report(workdir: str, summary: dict, figures: list[str]) -> str:
  mses = {m: summary["methods"][m]["mse"] for m in METHODS}
  holds = summary["paper_ordering_holds"]
  lines = [
      "# Preview report: 2-D toy (paper Fig. 2, App. B.1)", "",
      f"{summary['num_alphas']} alphas on the simplex. Metric: the true multitask loss sum_t alpha_t loss_t(theta) at "
      "the merged theta_alpha (preview) vs at the exact minimiser theta*_alpha (exact; lower is better, so preview >= "
      "exact). MSE is over the grid; the distance column is |theta_alpha - theta*_alpha|.", "",
      "| method | posterior -> merge | MSE (loss) | mean distance | max distance | Spearman | best preview alpha | "
      "exact loss there |", "|---|---|---|---|---|---|---|---|"]
  for m in METHODS:
    s, d = summary["methods"][m], summary["distance"][m]
    sp = s.get("spearman")
    lines.append(f"| {m} | {DESCRIBE[m]} | {s['mse']:.3g} | {d['mean']:.4f} | {d['max']:.4f} | "
                 f"{('%.3f' % sp) if sp is not None else 'n/a'} | ({', '.join(f'{x:.2f}' for x in s['best_alpha'])}) "
                 f"| {s['exact_at_best']:.4f} |")
  lines += [f"| exact | joint training, max first-order residual {summary['exact_max_grad_norm']:.1e} | | | | | "
            f"({', '.join(f'{x:.2f}' for x in summary['exact_best_alpha'])}) | {summary['exact_best']:.4f} |", "",
            "Paper's ordering (MSE mixture < full Gaussian < simple): "
            f"**{'holds' if holds else 'does not hold'}** here "
            f"(simple {mses['simple']:.3g}, full Gaussian {mses['von']:.3g}, mixture {mses['mog']:.3g}).", ""]
  lines += ["## Cost of each stage (seconds, this machine; cached stages cost ~0 on a re-run)", "",
            "| stage | seconds |", "|---|---|"]
  lines += [f"| {k[:-2] if k.endswith('_s') else k} | {v:.2f} |" for k, v in summary["costs"].items()]
  lines += ["", "## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures] + [""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
