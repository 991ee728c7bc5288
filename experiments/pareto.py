r"""Benchmark of Pareto-front estimation: bmerge.pareto against baselines, replaying recorded exact grids.

  python -m experiments.pareto --config=configs/pareto.py --workdir=experiments/results/pareto
  python -m experiments.pareto --config=configs/pareto.py:small --workdir=/tmp/pareto

Every problem is an experiment's report folder with `surfaces.npz` (`bmerge.compare`): joint training's per-task
metrics e(alpha) [T] at every alpha of its exact grid, and each posterior family's preview p(alpha) there. An exact
run becomes a look-up (`Lookup`, which answers only for alphas of that grid), so a method may spend B "runs" and is
scored on what they found. Candidates are the exact grid's alphas. Methods (values "larger is better"; minimised
metrics are negated first):

* `pareto_<family>`: `bmerge.pareto.estimate` with that family's preview (budget B, one run per batch);
* the baselines of `experiments/pareto_baselines.py`: `preview_front` (the recommended family's preview, greedy by
  hypervolume contribution, no exact run informs it), `uniform`, `random`, `quadratic_surrogate` (MAP-style) and
  `ehvi_cold` (expected hypervolume improvement without previews).

Scores of the verified set V (B exact values), with E the exact front of the grid and r = `metrics.front_reference`
(the front's nadir minus 10 % of its range per task):

.. math::

  \mathrm{hv\_share} = \frac{\mathrm{HV}(V; r)}{\mathrm{HV}(V^\star_B; r)}, \qquad
  \mathrm{regret} = \frac{1}{200} \sum_{k=1}^{200} \Big(\max_{g} w_k^\top e_g - \max_{v \in V} w_k^\top v\Big),
  \quad w_k \sim \mathrm{Dir}(1), \qquad \mathrm{IGD}^+(V; E),

with :math:`V^\star_B` the B grid points chosen greedily by hypervolume contribution on the exact values (values of
hv_share above 1 are reported as they are). Each score is averaged over the repetitions (random keys; preview seeds
cycle through them) with a Student-t 95 % interval (`metrics.t_interval`); differences of hv_share between
bmerge.pareto and each baseline are paired over repetitions. Methods that choose one run at a time without knowing B
(all but `quadratic_surrogate`) run once with the largest budget; their first B runs are what budget B gives.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import multiprocessing
import pathlib
import time
import zlib
from typing import NamedTuple

from absl import app, flags
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

from bmerge.assess import metrics
from bmerge.assess import pareto
from bmerge.assess import plot
from bmerge.grid import lattice
from experiments import devices
from experiments import pareto_baselines as baselines

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = ("hv_share", "regret", "igd_plus")


# ---------------------------------------------------------------------------------------------------------------
# Problems.


class Problem(NamedTuple):
  """One recorded exact grid with its previews, every value "larger is better"."""

  name: str
  alphas: np.ndarray  # [G, T] the exact grid: the candidates
  exact: tuple  # per preview seed: [G, T] exact per-task values
  previews: dict  # family -> tuple of [G, T] previews at the same alphas, one per seed
  recommend: str  # the family the experiment recommends by default
  task_names: tuple
  maximize: bool  # whether the recorded metric is maximised (values here are negated otherwise)
  metric: str
  source: str  # where it came from


def _per_task(surface: np.ndarray, num_tasks: int, overall: str, name: str) -> np.ndarray:
  """The [G, T] per-task columns of a scored surface ([G, 1 + T] with overall="first", [G, T] with "weighted")."""
  surface = np.asarray(surface, np.float64)
  if surface.ndim == 2 and surface.shape[1] == num_tasks + 1 and overall == "first":
    return surface[:, 1:]
  if surface.ndim == 2 and surface.shape[1] == num_tasks:
    return surface
  raise ValueError(f"{name} has shape {surface.shape}; expected per-task metrics [G, {num_tasks}] or "
                   f"[G, 1 + {num_tasks}] (overall first).")


def _rows(alphas: np.ndarray, subset: np.ndarray) -> np.ndarray:
  """Row of `alphas` of every row of `subset`, matched to 1e-8 (-1 where missing)."""
  where = {tuple(np.rint(a * 1e8).astype(np.int64)): i for i, a in reversed(list(enumerate(alphas)))}
  return np.asarray([where.get(tuple(np.rint(a * 1e8).astype(np.int64)), -1) for a in subset], dtype=np.int64)


def load_problem(folder) -> Problem:
  """A report folder of `bmerge.compare` (its `surfaces.npz`, or one per seed in its subfolders) as a `Problem`."""
  folder = pathlib.Path(folder)
  files = sorted(folder.glob("surfaces.npz")) + sorted(folder.glob("*/surfaces.npz"))
  if not files:
    raise FileNotFoundError(f"{folder} holds no surfaces.npz (nor do its subfolders); re-record the experiment.")
  summary_path = folder / "metrics.json" if (folder / "metrics.json").is_file() else files[0].parent / "metrics.json"
  summary = json.loads(summary_path.read_text())
  sign = 1.0 if summary.get("maximize", True) else -1.0
  overall, t = summary.get("overall", "first"), int(summary["num_tasks"])
  alphas, exact, previews = None, [], {}
  families = [f for f in summary["methods"]]
  for path in files:
    with np.load(path) as z:
      ex_alphas = np.asarray(z["exact_alphas"] if "exact_alphas" in z.files else z["alphas"], np.float64)
      if alphas is None:
        alphas = ex_alphas
      elif ex_alphas.shape != alphas.shape or np.any(_rows(alphas, ex_alphas) != np.arange(len(alphas))):
        raise ValueError(f"{path} has another exact grid than {files[0]}; the seeds of a problem share one.")
      rows = _rows(np.asarray(z["alphas"], np.float64), ex_alphas)
      if np.any(rows < 0):
        raise ValueError(f"{path}: an exact alpha is not a row of the preview grid.")
      exact.append(sign * _per_task(z["surface/exact"], t, overall, f"{path}: surface/exact"))
      families = [f for f in families if f"surface/{f}" in z.files]
      for f in families:
        previews.setdefault(f, []).append(sign * _per_task(z[f"surface/{f}"], t, overall, f"{path}: surface/{f}")[rows])
  recommend = (summary.get("recommendation") or {}).get("from", families[-1])
  return Problem(folder.name, alphas, tuple(exact), {f: tuple(previews[f]) for f in families}, recommend,
                 tuple(summary.get("task_names") or [f"task {i + 1}" for i in range(t)]), sign > 0,
                 summary.get("metric", "accuracy"), str(folder))


def synthetic_problem(spacing: float = 0.1, seeds: int = 2, seed: int = 0) -> Problem:
  """Three tasks with a curved exact front and worse interior alphas (interference: about 40 % of the alphas are on
  the front), accuracies on a grid of 1/400; two previews: `good` (a monotone distortion of the exact values with a
  smooth bias in alpha, as a merged model's accuracy often is) and `poor` (a larger bias that moves its front), each
  with seed noise."""
  alphas = lattice.simplex(3, spacing)
  rng = np.random.default_rng(seed)
  interference = 27 * np.prod(alphas, axis=1, keepdims=True)  # 1 at the centre, 0 on the edges
  exact = 0.55 + 0.4 * np.sqrt(alphas) - 0.3 * interference + 0.02 * alphas[:, [1, 2, 0]]
  exact = np.round(exact * 400) / 400
  good, poor, exacts = [], [], []
  for _ in range(seeds):
    noise = 0.004 * rng.standard_normal(alphas.shape)
    exacts.append(exact)
    good.append(0.9 * exact ** 2 - 0.1 + 0.03 * np.sin(3 * alphas[:, [0, 0, 0]]) + noise)
    poor.append(exact - 0.15 * alphas[:, [1, 2, 0]] + 0.08 * np.cos(4 * alphas) + 3 * noise)
  return Problem("synthetic", alphas, tuple(exacts), {"poor": tuple(poor), "good": tuple(good)}, "good",
                 ("task 1", "task 2", "task 3"), True, "accuracy", f"synthetic (spacing {spacing})")


def problems(config) -> tuple[list[Problem], list[str]]:
  """The config's problems that can be replayed, and the folders that cannot (no surfaces.npz), with why."""
  out, missing = [], []
  for entry in config.problems:
    if entry == "synthetic":
      out.append(synthetic_problem(config.synthetic.spacing, config.synthetic.seeds, config.seed))
      continue
    folder = pathlib.Path(entry) if pathlib.Path(entry).is_absolute() else REPO / entry
    try:
      out.append(load_problem(folder))
    except FileNotFoundError as e:
      missing.append(f"{entry}: {e}")
  return out, missing


# ---------------------------------------------------------------------------------------------------------------
# The exact answer as a look-up.


class Lookup:
  """exact_fn over a recorded grid: the exact values of the asked alphas, which must be rows of the grid."""

  def __init__(self, alphas: np.ndarray, exact: np.ndarray):
    self.alphas, self.exact = np.asarray(alphas, np.float64), np.asarray(exact, np.float64)
    self.asked: list[int] = []  # grid rows in the order asked

  def __call__(self, alphas) -> np.ndarray:
    alphas = np.atleast_2d(np.asarray(alphas, np.float64))
    if alphas.ndim != 2 or alphas.shape[1] != self.alphas.shape[1]:
      raise ValueError(f"alphas must be [n, {self.alphas.shape[1]}], got shape {alphas.shape}.")
    rows = _rows(self.alphas, alphas)
    if np.any(rows < 0):
      bad = alphas[int(np.flatnonzero(rows < 0)[0])]
      raise ValueError(f"alpha {bad.tolist()} is not a row of the recorded exact grid; no exact value exists there.")
    self.asked += rows.tolist()
    return self.exact[rows].copy()


# ---------------------------------------------------------------------------------------------------------------
# One repetition of every method on one problem.


def _methods(problem: Problem, config) -> list[str]:
  return [f"pareto_{f}" for f in problem.previews] + list(config.baselines)


def choose(method: str, problem: Problem, seed_index: int, budget: int, key: int,
           rng: np.random.Generator) -> list[int]:
  """The grid rows `method` runs with `budget` exact runs (each asked of a fresh `Lookup`), in order."""
  lookup = Lookup(problem.alphas, problem.exact[seed_index])
  alphas = problem.alphas
  if method.startswith("pareto_"):
    preview = problem.previews[method[len("pareto_"):]][seed_index]
    pareto.estimate(alphas, preview, lookup, budget, key=key)
  elif method == "preview_front":
    picks = baselines.preview_front(alphas, problem.previews[problem.recommend][seed_index], budget)
    lookup(alphas[picks])
  elif method == "uniform":
    baselines.uniform_design(alphas, budget, lookup)
  elif method == "random":
    baselines.random_design(alphas, budget, rng, lookup)
  elif method == "quadratic_surrogate":
    baselines.quadratic_surrogate(alphas, budget, lookup, rng)
  elif method == "ehvi_cold":
    baselines.ehvi_cold(alphas, budget, lookup, rng)
  else:
    raise ValueError(f"unknown method {method!r}")
  if len(lookup.asked) != min(budget, len(alphas)) or len(set(lookup.asked)) != len(lookup.asked):
    raise RuntimeError(f"{method} ran {len(lookup.asked)} rows ({len(set(lookup.asked))} distinct) for B = {budget}.")
  return lookup.asked


class _Truth(NamedTuple):
  reference: np.ndarray  # [T]
  front: np.ndarray  # [F, T] exact front values
  best_hv: np.ndarray  # [max B + 1] HV of the greedy best b points, b = 0..max B
  weights: np.ndarray  # [K, T] preference vectors
  best_utility: np.ndarray  # [K] best weighted sum on the grid


def truth(exact: np.ndarray, max_budget: int, weights: np.ndarray) -> _Truth:
  """What the scores compare against on one exact grid."""
  ref = metrics.front_reference(exact)
  best = baselines.greedy_hv(exact, max_budget, ref)
  best_hv = np.array([0.0] + [metrics.hypervolume(exact[best[:b]], ref) for b in range(1, len(best) + 1)])
  return _Truth(ref, exact[metrics.pareto_front(exact)], best_hv, weights, np.max(exact @ weights.T, axis=0))


def scores(values: np.ndarray, t: _Truth, budget: int) -> dict:
  """hv_share, regret and IGD+ of a verified set [B, T]."""
  return {"hv_share": metrics.hypervolume(values, t.reference) / t.best_hv[min(budget, len(t.best_hv) - 1)],
          "regret": float(np.mean(t.best_utility - np.max(values @ t.weights.T, axis=0))),
          "igd_plus": metrics.igd_plus(values, t.front)}


def run_repetition(problem: Problem, rep: int, config_json: str) -> dict:
  """{method: {B: {metric: value}}} of one repetition (picklable arguments: it runs in a worker)."""
  config = json.loads(config_json)
  budgets = sorted(config["budgets"])
  seed_index = rep % len(problem.exact)
  exact = problem.exact[seed_index]
  weights = np.random.default_rng([config["seed"], 1]).dirichlet(np.ones(exact.shape[1]), config["preferences"])
  t = truth(exact, budgets[-1], weights)
  out = {}
  for method in [f"pareto_{f}" for f in problem.previews] + list(config["baselines"]):
    out[method] = {}
    sizes = budgets if method == "quadratic_surrogate" else [budgets[-1]]
    for size in sizes:
      rng = np.random.default_rng([config["seed"], rep, size, zlib.crc32(method.encode())])
      picks = choose(method, problem, seed_index, size, rep, rng)
      for b in (budgets if size == budgets[-1] and method != "quadratic_surrogate" else [size]):
        out[method][b] = scores(exact[picks[:b]], t, b)
  return out


# ---------------------------------------------------------------------------------------------------------------
# Aggregation.


def _interval(values) -> dict:
  mean, lo, hi = metrics.t_interval(np.asarray(values, np.float64))
  return {"mean": mean, "ci": [lo, hi]}


def aggregate(runs: dict, problem_list: list[Problem], config) -> dict:
  """metrics.json: {metric: {problem: {method: {B: {mean, ci}}}}} and "differences" of hv_share (paired)."""
  out = {m: {} for m in METRICS}
  out["differences"] = {}
  for p in problem_list:
    reps = runs[p.name]
    methods = list(reps[0])
    for m in METRICS:
      out[m][p.name] = {k: {str(b): _interval([r[k][b][m] for r in reps]) for b in config.budgets} for k in methods}
    ours = [k for k in methods if k.startswith("pareto_")]
    out["differences"][p.name] = {
        str(b): {f"{a}-{c}": _interval([r[a][b]["hv_share"] - r[c][b]["hv_share"] for r in reps])
                 for a in ours for c in config.baselines} for b in config.budgets}
  return out


def goal(result: dict, problem_list: list[Problem], config) -> dict:
  """The declared goal for each experiment's recommended family, met or not, with the numbers."""
  g = config.goal
  share = None
  for p in problem_list:
    if p.name == g.share_problem:
      cell = result["hv_share"][p.name][f"pareto_{p.recommend}"][str(g.share_budget)]
      share = {"problem": p.name, "family": p.recommend, **cell, "met": cell["mean"] >= g.share}
  beats = {}
  for p in problem_list:
    diffs = result["differences"][p.name][str(g.beat_budget)]
    ours = f"pareto_{p.recommend}"
    row = {c: diffs[f"{ours}-{c}"] for c in config.baselines}
    beats[p.name] = {"family": p.recommend, "differences": row, "met": all(d["ci"][0] > 0 for d in row.values())}
  count = sum(v["met"] for v in beats.values())
  return {"share": share, "beat": beats, "beat_count": count, "problems": len(problem_list),
          "met": bool(share is not None and share["met"] and count >= g.beat_problems)}


# ---------------------------------------------------------------------------------------------------------------
# Figures and the report.


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  FigureCanvasAgg(fig)
  fig.savefig(path, format="png")
  return path


def _style(method: str, recommend: str) -> dict:
  if method == f"pareto_{recommend}":
    return dict(color="C3", linewidth=2.4, marker="o")
  if method.startswith("pareto_"):
    return dict(color="C3", linewidth=0.9, linestyle="--", alpha=0.6)
  colors = {"preview_front": "C0", "uniform": "C2", "random": "0.5", "quadratic_surrogate": "C4", "ehvi_cold": "C1"}
  return dict(color=colors.get(method, "k"), linewidth=1.4, marker="s", markersize=4)


def share_figure(result: dict, problem_list: list[Problem], config, path: pathlib.Path) -> pathlib.Path:
  """hv_share against B per method, one panel per problem, with the 95 % intervals."""
  n = len(problem_list)
  cols = min(3, n)
  fig = Figure(figsize=(4.8 * cols, 3.8 * -(-n // cols)), dpi=110, layout="constrained")
  axes = fig.subplots(-(-n // cols), cols, squeeze=False).ravel()
  budgets = list(config.budgets)
  for ax, p in zip(axes, problem_list):
    for k, cells in result["hv_share"][p.name].items():
      mean = np.array([cells[str(b)]["mean"] for b in budgets])
      lo = np.array([cells[str(b)]["ci"][0] for b in budgets])
      hi = np.array([cells[str(b)]["ci"][1] for b in budgets])
      style = _style(k, p.recommend)
      ax.plot(budgets, mean, label=k, **style)
      ax.fill_between(budgets, lo, hi, color=style["color"], alpha=0.12)
    ax.axhline(1.0, color="k", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_title(f"{p.name} (recommended: {p.recommend})", fontsize=9)
    ax.set_xlabel("B (exact runs)")
    ax.set_ylabel("hv_share")
    ax.grid(alpha=0.3)
  for ax in axes[n:]:
    ax.set_visible(False)
  axes[0].legend(fontsize=7)
  return _save(fig, path)


def front_figure(problem: Problem, budget: int, path: pathlib.Path) -> pathlib.Path:
  """bmerge.pareto's estimated front (recommended family, first seed, B runs) against the exact front: every pair of
  tasks, and the alphas on the 3-task simplex."""
  exact = problem.exact[0]
  lookup = Lookup(problem.alphas, exact)
  est = pareto.estimate(problem.alphas, problem.previews[problem.recommend][0], lookup, budget, key=0)
  t = exact.shape[1]
  front = metrics.pareto_front(exact)
  pairs = list(itertools.combinations(range(t), 2))
  panels = len(pairs) + (1 if t == 3 else 0)
  fig = Figure(figsize=(3.6 * panels, 3.8), dpi=110, layout="constrained")
  axes = fig.subplots(1, panels, squeeze=False)[0]
  lo, hi = plot.front_view(np.vstack([exact[front], est.predicted[est.front]]))  # the body of both fronts
  raw = problem.previews[problem.recommend][0]
  raw_front = metrics.pareto_front(raw)
  for ax, (i, j) in zip(axes, pairs):
    ax.scatter(exact[:, i], exact[:, j], s=5, color="0.82", label="exact, every alpha")
    ax.scatter(exact[front, i], exact[front, j], s=12, color="black", label="exact front")
    ax.scatter(raw[raw_front, i], raw[raw_front, j], s=10, marker="x", color="C0", alpha=0.6,
               label=f"preview front ({problem.recommend})")
    ax.scatter(est.predicted[est.front, i], est.predicted[est.front, j], s=16, facecolors="none", edgecolors="C1",
               label="bmerge.pareto: predicted front")
    ax.scatter(est.verified_values[:, i], est.verified_values[:, j], s=40, marker="*", color="C3",
               label=f"verified ({budget} runs)")
    ax.set_xlim(lo[i], hi[i])
    ax.set_ylim(lo[j], hi[j])
    ax.set_xlabel(problem.task_names[i], fontsize=8)
    ax.set_ylabel(problem.task_names[j], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize=7)
  if t == 3:
    ax = axes[-1]
    xy = plot.barycentric_to_cartesian
    ax.plot(*xy(np.vstack([np.eye(3), np.eye(3)[:1]])).T, color="black", linewidth=1.0)
    ax.scatter(*xy(problem.alphas).T, s=4, color="0.85")
    ax.scatter(*xy(problem.alphas[front]).T, s=12, color="black", label="exact front")
    ax.scatter(*xy(est.alphas[est.front]).T, s=18, facecolors="none", edgecolors="C1", label="predicted front")
    ax.scatter(*xy(est.verified_alphas).T, s=50, marker="*", color="C3", label="verified")
    for k, name in enumerate(problem.task_names):
      ax.annotate(name, xy(np.eye(3)[k:k + 1])[0], fontsize=8, ha="center", va="bottom" if k == 2 else "top")
    ax.set_aspect("equal")
    ax.set_axis_off()
  fig.suptitle(f"{problem.name}: estimated and exact front (values larger is better)", fontsize=9)
  return _save(fig, path)


def _cell(c: dict, digits: int = 3) -> str:
  return f"{c['mean']:.{digits}f} [{c['ci'][0]:.{digits}f}, {c['ci'][1]:.{digits}f}]"


def _why(problem: Problem, result: dict, beat: dict, config) -> str:
  """Facts behind a goal not met: which baseline was not beaten and how the preview relates to the exact grid."""
  lost = {c: d for c, d in beat["differences"].items() if d["ci"][0] <= 0}
  parts = [", ".join(f"{c} ({'worse' if d['ci'][1] < 0 else 'not resolved'}: difference {_cell(d)})"
                     for c, d in lost.items())]
  raw, exact = problem.previews[problem.recommend][0], problem.exact[0]
  rho = [metrics.spearman(raw[:, k], exact[:, k]) for k in range(exact.shape[1])]
  front = metrics.pareto_front(exact)
  parts.append(f"the {problem.recommend} preview's per-task rank correlation with the exact values is "
               f"{', '.join(f'{r:.2f}' for r in rho)}; the exact front holds {len(front)} of {len(exact)} alphas")
  b = str(config.goal.beat_budget)
  best = result["hv_share"][problem.name]
  top = max(best, key=lambda k: best[k][b]["mean"])
  parts.append(f"the best method at B = {b} is {top} ({_cell(best[top][b])})")
  return "; ".join(parts) + "."


def markdown(result: dict, problem_list: list[Problem], missing: list[str], config, figures: list[str]) -> str:
  g = config.goal
  outcome = result["goal"]
  lines = ["# Pareto-front estimation: bmerge.pareto against baselines on recorded exact grids", "",
           "Each problem's exact grid (joint training at every alpha) is replayed: an exact run is a look-up, the "
           "candidates are the grid's alphas, and every method spends B runs. Scores of the B verified points: "
           "`hv_share` (their hypervolume over that of the best B grid points chosen greedily on the exact values; "
           "reference: the exact front's nadir minus 10 % of its range per task), `regret` (mean over "
           f"{config.preferences} Dirichlet(1) preference vectors of the best weighted sum on the grid minus the best "
           "among the verified points, in the metric's units) and IGD+ to the exact front. Each cell: the mean and "
           f"its 95 % Student-t interval over {config.repetitions} repetitions (random keys; the preview seeds cycle "
           "through them where a problem has several).", "",
           "Methods: `pareto_<family>` is `bmerge.pareto.estimate` with that posterior family's preview; "
           "`preview_front` the recommended family's preview, greedily by hypervolume contribution (no exact run "
           "informs it); `uniform` a space-filling design (greedy maximin snapped to the grid); `random` Dirichlet(1) "
           "draws snapped to the grid; `quadratic_surrogate` MAP-style (half of B random, one quadratic per task, the "
           "rest greedily on its predicted front); `ehvi_cold` expected hypervolume improvement under per-task "
           "Gaussian processes from T + 1 random runs, without previews (numpy; exact EHVI by cell decomposition).", ""]
  lines += ["## Problems", "", "| problem | tasks | alphas | exact front | seeds | families | recommended | source |",
            "|---|---|---|---|---|---|---|---|"]
  for p in problem_list:
    lines.append(f"| {p.name} | {', '.join(p.task_names)} | {len(p.alphas)} | "
                 f"{len(metrics.pareto_front(p.exact[0]))} | {len(p.exact)} | {', '.join(p.previews)} | "
                 f"{p.recommend} | {p.source} |")
  single = [p.name for p in problem_list if len(p.exact) == 1]
  if single:
    lines += ["", f"One preview seed ({', '.join(single)}): there `pareto_<family>`, `preview_front` and `uniform` are "
              "deterministic (a key only breaks ties), so their intervals are points, and the interval of a "
              "difference between two of them says nothing about another seed's training run."]
  if missing:
    lines += ["", "Not replayed (no saved surfaces): " + "; ".join(missing)]
  lines += ["", "## Goal (declared before the run)", "",
            f"For the family each experiment recommends by default: at B = {g.share_budget}, hv_share >= {g.share} "
            f"on {g.share_problem}; and at B = {g.beat_budget}, bmerge.pareto beats every baseline on hv_share with "
            f"the 95 % interval of the paired difference above 0 on at least {g.beat_problems} of the problems.", ""]
  share = outcome["share"]
  if share is None:
    lines.append(f"- hv_share on {g.share_problem}: **not measured** (the problem was not replayed).")
  else:
    lines.append(f"- hv_share of pareto_{share['family']} on {share['problem']} at B = {g.share_budget}: "
                 f"{_cell(share)}: **{'met' if share['met'] else 'not met'}** (mean against {g.share}"
                 f"{'; the whole interval is above it' if share['ci'][0] >= g.share else ''}).")
  lines.append(f"- Beats every baseline at B = {g.beat_budget}: on {outcome['beat_count']} of "
               f"{outcome['problems']} replayed problems (goal: {g.beat_problems}"
               f"{'' if outcome['problems'] >= g.beat_problems else '; fewer problems were replayed than it needs'}).")
  for name, beat in outcome["beat"].items():
    p = next(q for q in problem_list if q.name == name)
    verdict = "yes" if beat["met"] else "no: " + _why(p, result, beat, config)
    lines.append(f"  - {name} (pareto_{beat['family']}): {verdict}")
  lines += ["", f"Overall: **{'met' if outcome['met'] else 'not met'}**.", ""]
  names = {"hv_share": "hv_share (larger is better)", "regret": "regret (smaller is better)",
           "igd_plus": "IGD+ to the exact front (smaller is better)"}
  for p in problem_list:
    lines += [f"## {p.name}", ""]
    for m in METRICS:
      lines += [f"**{names[m]}**", "", "| method | " + " | ".join(f"B = {b}" for b in config.budgets) + " |",
                "|---|" + "---|" * len(config.budgets)]
      for k, cells in result[m][p.name].items():
        label = f"**{k}** (recommended)" if k == f"pareto_{p.recommend}" else k
        lines.append(f"| {label} | " + " | ".join(_cell(cells[str(b)], 4 if m != "hv_share" else 3)
                                                  for b in config.budgets) + " |")
      lines.append("")
    ours = f"pareto_{p.recommend}"
    lines += [f"**hv_share of {ours} minus each baseline** (paired over repetitions; above 0: bmerge.pareto better)",
              "", "| baseline | " + " | ".join(f"B = {b}" for b in config.budgets) + " |",
              "|---|" + "---|" * len(config.budgets)]
    for c in config.baselines:
      lines.append(f"| {c} | " + " | ".join(_cell(result["differences"][p.name][str(b)][f"{ours}-{c}"])
                                           for b in config.budgets) + " |")
    lines.append("")
  lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
  lines += [f"Problems: {', '.join(config.problems)}; budgets {', '.join(map(str, config.budgets))}; "
            f"{result['seconds']:.0f} s wall clock with {config.workers} worker process(es).", ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The run.


def run(config, workdir) -> dict:
  """Replays every problem, writes metrics.json, report.md and the figures; returns the metrics.json dict."""
  start = time.time()
  folder = pathlib.Path(config.output or workdir)
  folder.mkdir(parents=True, exist_ok=True)
  problem_list, missing = problems(config)
  if not problem_list:
    raise ValueError(f"no problem of `problems` {list(config.problems)} has surfaces.npz: " + "; ".join(missing))
  config_json = json.dumps({"budgets": list(config.budgets), "seed": config.seed, "preferences": config.preferences,
                            "baselines": list(config.baselines)})
  tasks = [(p, r) for p in problem_list for r in range(config.repetitions)]
  runs = {p.name: [None] * config.repetitions for p in problem_list}
  if config.workers > 1:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=ctx) as pool:
      futures = {pool.submit(run_repetition, p, r, config_json): (p.name, r) for p, r in tasks}
      for f in concurrent.futures.as_completed(futures):
        name, r = futures[f]
        runs[name][r] = f.result()
  else:
    for p, r in tasks:
      runs[p.name][r] = run_repetition(p, r, config_json)
  result = aggregate(runs, problem_list, config)
  result["goal"] = goal(result, problem_list, config)
  result["problems"] = {p.name: {"source": p.source, "num_alphas": len(p.alphas), "num_tasks": p.alphas.shape[1],
                                 "seeds": len(p.exact), "families": list(p.previews), "recommend": p.recommend,
                                 "exact_front_size": int(len(metrics.pareto_front(p.exact[0]))),
                                 "maximize": bool(p.maximize)} for p in problem_list}
  result["not_replayed"] = missing
  result["config"] = json.loads(config.to_json())
  figures = [share_figure(result, problem_list, config, folder / "hv_share.png").name]
  for p in problem_list:
    figures.append(front_figure(p, min(config.figure_budget, len(p.alphas)), folder / f"front_{p.name}.png").name)
  result["figures"] = figures
  result["seconds"] = time.time() - start
  (folder / "metrics.json").write_text(json.dumps(result, indent=1, allow_nan=False))
  (folder / "report.md").write_text(markdown(result, problem_list, missing, config, figures))
  return result


config_flags.DEFINE_config_file("config", None, "configs/pareto.py[:small]", lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics.json, report.md and the figures go (unless config.output).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  devices.apply()
  result = run(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"goal {'met' if result['goal']['met'] else 'not met'}; report: "
        f"{pathlib.Path(flags.FLAGS.config.output or flags.FLAGS.workdir).resolve() / 'report.md'}")


if __name__ == "__main__":
  app.run(main)
