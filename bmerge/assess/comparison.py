"""One call for a user's comparison: several (posteriors, merge rule) previews against exact results, with a report.

`bmerge.compare` runs `bmerge.preview` for every entry over one grid of alphas, matches the exact (joint-training)
results to the grid by value (they may sit on a coarser grid), scores every preview with `bmerge.metrics`, and writes
`metrics.json`, the figures and `report.md` into a folder. The module is `comparison` so that `bmerge.compare` can be
the function.

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Sec. 4: previews against joint training; Tables 1-2; Figs. 3-9).
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from bmerge import _checks
from bmerge.grid import evaluate as grid_eval
from bmerge.assess import metrics
from bmerge.assess import report

__all__ = ["Comparison", "Entry", "compare"]

PyTree = Any


class Entry(NamedTuple):
  """One preview to compare: stacked task posteriors and the rule that merges them."""

  name: str  # a short name: the row of the tables, the label of the figures, the resume tag
  posteriors: PyTree  # the T stacked posteriors (anything `rule` takes)
  rule: Callable[[PyTree, jax.Array], PyTree]  # rule(posteriors, alphas [C, T]) -> params with a leading C axis
  description: str = ""  # e.g. "IVON -> Hessian-weighted (Eq. 10)", shown in the report


class Comparison(NamedTuple):
  """What `compare` returns."""

  summary: dict  # the metrics.json content (plain Python types)
  previews: dict  # entry name -> [G] or [G, M] numpy outputs of eval_fn at every alpha of the grid
  exact: Optional[np.ndarray]  # the exact results as given, [G'] or [G', M], or None
  paths: dict  # "report", "metrics" and each figure's stem ("contours", "pareto", ...) -> pathlib.Path


def _entries(entries) -> list[Entry]:
  if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or not entries:
    raise ValueError("`entries` must be a non-empty list of (name, posteriors, rule[, description]) entries.")
  out = []
  for i, e in enumerate(entries):
    if not isinstance(e, tuple) or len(e) not in (3, 4):
      raise ValueError(f"`entries[{i}]` must be an Entry or a tuple (name, posteriors, rule[, description]), got "
                       f"{type(e).__name__}.")
    e = Entry(*e)
    if not isinstance(e.name, str) or not e.name.strip():
      raise ValueError(f"`entries[{i}].name` must be a non-empty string, got {e.name!r}.")
    if not callable(e.rule):
      raise TypeError(f"`entries[{i}].rule` ({e.name!r}) must be callable as rule(posteriors, alphas), got "
                      f"{type(e.rule).__name__}.")
    if not isinstance(e.description, str):
      raise TypeError(f"`entries[{i}].description` must be a string, got {type(e.description).__name__}.")
    out.append(e)
  names = [e.name for e in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"`entries` names must be unique; repeated: {dup}.")
  return out


def _tag(name: str) -> str:
  """The resume folder of an entry: its name with anything but letters, digits, '-', '_' and '.' replaced."""
  return "preview_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _width(num_tasks: int, overall: str) -> str:
  return f"[{num_tasks}] per-task metrics" if overall == "weighted" else f"a scalar, or [1 + T] = [{1 + num_tasks}]"


def _layout(values: np.ndarray, alphas: np.ndarray, overall: str, name: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(overall metric [G], per-task metrics [G, T] or None) of one output array, by the convention of `compare`."""
  t = alphas.shape[1]
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if overall == "weighted":
    if values.ndim != 2 or values.shape[1] != t:
      raise ValueError(f"`{name}` has shape {values.shape}; with overall='weighted' each alpha needs "
                       f"{_width(t, overall)}, i.e. shape [G, {t}].")
    return np.sum(alphas * values, axis=1), values
  if values.ndim == 1:
    return values, None
  if values.ndim == 2 and values.shape[1] == 1 + t:
    return values[:, 0], values[:, 1:]
  raise ValueError(f"`{name}` has shape {values.shape}; each alpha needs {_width(t, overall)} values: column 0 the "
                   "overall metric, columns 1..T the per-task metrics.")


def _check_eval(entry: Entry, eval_fn, batch, alphas: np.ndarray, overall: str) -> None:
  """Traces (does not run) the merged model's evaluation once, so a wrong output fails before any preview runs."""
  a = jax.ShapeDtypeStruct((1, alphas.shape[1]), grid_eval.compute_dtype())
  shape = jax.eval_shape(lambda x: jax.vmap(eval_fn, in_axes=(0, None))(entry.rule(entry.posteriors, x), batch), a)
  if not isinstance(shape, jax.ShapeDtypeStruct):
    raise TypeError(f"`eval_fn` must return one array ({_width(alphas.shape[1], overall)}), got a "
                    f"{type(shape).__name__} of arrays (for {entry.name!r}).")
  _layout(np.zeros(shape.shape), alphas[:1], overall, f"eval_fn(params, batch) for {entry.name!r}")


def _match_rows(alphas: np.ndarray, exact_alphas: np.ndarray) -> np.ndarray:
  rows = report._rows_of(alphas, exact_alphas)  # pylint: disable=protected-access
  missing = np.flatnonzero(rows < 0)
  if missing.size:
    i = int(missing[0])
    raise ValueError(f"`exact_alphas` row {i} {exact_alphas[i].tolist()} is not a row of `alphas`; exact results "
                     "must sit on points of the preview grid (e.g. a coarser lattice of the same simplex).")
  return rows


def _costs(costs) -> dict[str, float]:
  if costs is None:
    return {}
  if not isinstance(costs, Mapping):
    raise TypeError(f"`costs` must be a dict of stage name -> seconds, got {type(costs).__name__}.")
  out = {}
  for k, v in costs.items():
    if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not (
        math.isfinite(v) and v >= 0):
      raise ValueError(f"`costs` must map stage names to non-negative seconds; got {k!r}: {v!r}.")
    out[k] = float(v)
  return out


def _jsonable(value, name: str):
  try:
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise ValueError(f"`{name}` must hold only JSON values (str, numbers, lists, dicts): {e}") from None


def _paper(paper) -> Optional[dict]:
  if paper is None:
    return None
  if not isinstance(paper, Mapping) or not isinstance(paper.get("methods", {}), Mapping) or not all(
      isinstance(v, Mapping) for v in paper.get("methods", {}).values()):
    raise ValueError("`paper` must be a dict like {'source': str, 'methods': {name: {'label': str, 'mse': float, ...}},"
                     f" 'exact_best': float}}, got {paper!r:.200}.")
  return _jsonable(dict(paper), "paper")


def _paper_ordering(paper: Mapping, methods: Mapping) -> Optional[dict]:
  """The paper's ordering of the MSEs (largest first) over the entries it reports, by its "mse" values or, where it
  gives none, its "mse_rank" (1 = smallest), and whether our MSEs fall in the same order."""
  listed = {n: p for n, p in paper.get("methods", {}).items() if methods.get(n, {}).get("mse") is not None}
  for key in ("mse", "mse_rank"):
    if len(listed) >= 2 and all(p.get(key) is not None for p in listed.values()):
      theirs = sorted(listed, key=lambda n: -listed[n][key])
      ours = sorted(listed, key=lambda n: -methods[n]["mse"])
      return {"paper": theirs, "ours": ours, "holds": theirs == ours}
  return None


def _best(values: np.ndarray, maximize: bool) -> int:
  return int(np.argmax(values) if maximize else np.argmin(values))


_SUMMARY_KEYS = {"title", "metric", "maximize", "percent", "overall", "num_tasks", "task_names", "num_alphas",
                 "num_exact_alphas", "on_simplex", "entries", "methods", "exact_best", "exact_best_alpha", "pareto",
                 "recommendation", "costs", "paper", "paper_ordering", "notes", "figures"}


class _Exact(NamedTuple):
  alphas: np.ndarray  # [G', T] where joint training ran
  rows: np.ndarray  # [G'] their rows in the preview grid
  overall: np.ndarray  # [G'] overall metric
  per_task: Optional[np.ndarray]  # [G', T] or None


def _scores(alphas, over: dict, per_task: dict, ex: Optional[_Exact], maximize: bool, entries: dict) -> dict:
  """"methods" (and "exact_best", "exact_best_alpha", "pareto") of the summary; adds the whole-grid best alphas to
  `entries` when the exact grid is coarser."""
  if ex is None:
    methods = {}
    for n, v in over.items():
      b = _best(v, maximize)
      methods[n] = {"best_alpha": alphas[b].tolist(), "best_preview": float(v[b])}
    return {"methods": methods}
  out = metrics.summarize(ex.alphas, {n: v[ex.rows] for n, v in over.items()}, ex.overall, maximize)
  exact_at = {int(r): i for i, r in enumerate(ex.rows)}
  if len(exact_at) < alphas.shape[0]:  # a coarser exact grid: also the preview's own best over the whole grid
    for n, v in over.items():
      b = _best(v, maximize)
      entries[n].update(grid_best_alpha=alphas[b].tolist(), grid_best_preview=float(v[b]),
                        grid_exact_at_best=float(ex.overall[exact_at[b]]) if b in exact_at else None)
  if ex.per_task is not None and ex.per_task.shape[1] >= 2:
    out["pareto"] = {}
    for n, v in per_task.items():
      if v is not None:
        fc = metrics.compare_fronts(ex.alphas, v[ex.rows], ex.per_task, maximize)
        out["pareto"][n] = {
            "recall": fc.recall, "igd": fc.igd, "igd_plus": fc.igd_plus,
            "hypervolume_exact": fc.hypervolume_exact, "hypervolume_preview": fc.hypervolume_preview,
            "exact_front_size": int(fc.exact_front.size), "preview_front_size": int(fc.preview_front.size)}
  return out


def _recommendation(alphas, values: np.ndarray, name: str, ex: Optional[_Exact], maximize: bool, k: int) -> dict:
  """The top k alphas of one preview, with the exact metric there where joint training ran."""
  order = np.argsort(-values if maximize else values, kind="stable")[:k]
  rec = {"from": name, "alphas": alphas[order].tolist(), "preview": values[order].tolist()}
  if ex is not None:
    exact_at = {int(r): i for i, r in enumerate(ex.rows)}
    rec["exact"] = [float(ex.overall[exact_at[int(i)]]) if int(i) in exact_at else None for i in order]
  return rec


def compare(entries: Sequence[Entry | tuple], eval_fn: Callable[[PyTree, Any], Any], batch: Any, alphas, *,
            exact=None, exact_alphas=None, folder=None, workdir=None, overall: str = "first", maximize: bool = True,
            metric: str = "accuracy", task_metric: Optional[str] = None, percent: bool = False,
            task_names: Optional[Sequence[str]] = None, directions=None, costs: Optional[Mapping[str, float]] = None,
            paper: Optional[Mapping] = None, title: str = "Preview comparison", notes: str = "",
            details: Optional[Mapping] = None, extra_figures: Sequence[Any] = (), recommend: Optional[str] = None,
            top_k: int = 5, chunk_size: int = 64, progress: bool = False) -> Comparison:
  r"""Previews every entry over one grid, scores each against exact results, and writes a report folder.

  For every entry, `bmerge.preview(rule, posteriors, alphas, eval_fn, batch)` (resumable in `workdir`, one folder
  per entry name). Then, on the alphas that have exact results, the scores of `bmerge.metrics.summarize` (MSE,
  Spearman, best alpha and its exact value, regret@1 and @5), and, with per-task metrics, the Pareto-front comparison
  of `bmerge.metrics.compare_fronts` (recall, IGD, IGD+, hypervolumes; any number of tasks).

  **What `eval_fn` returns** (`eval_fn(params, batch)` of one merged model), by `overall`:

  * "first" (default): a scalar (the metric), or a vector [1 + T]: column 0 the overall metric (e.g. accuracy on the
    whole test set), columns 1..T the metric on each task (e.g. accuracy on each task's test examples); the per-task
    columns give the Pareto comparison and the pair curves.
  * "weighted": a vector [T] of per-task metrics m_t; the overall metric at alpha is
    :math:`\sum_t \alpha_t m_t` (the weighted multitask objective of Eq. 1, e.g. for per-task losses).

  `exact` follows the same layout, one row per row of `exact_alphas`. Exact results may sit on a coarser grid than
  the preview (e.g. preview spacing 0.05, joint training at 0.1): rows are matched to the grid by value (to 1e-8),
  every exact row must be a grid row, and scores use the matched rows; the best preview alpha over the whole grid is
  reported too. Grids off the simplex (task arithmetic's `bmerge.grid.scaled` sweep) are scored the same way and drawn
  against lambda.

  Files written into `folder` (when given): `metrics.json` (the summary), `report.md`, and the figures that fit the
  grid (`bmerge.report.figures`: contours for T = 3, curves for T = 2, curves for every pair of tasks, scaling curves
  off the simplex, histograms, Pareto fronts).

  The summary (`metrics.json`) holds: "title", "metric", "maximize", "percent", "overall", "num_tasks", "task_names",
  "num_alphas", "num_exact_alphas", "on_simplex"; "methods": name -> the `metrics.summarize` scores (without exact
  results: "best_alpha" and "best_preview" on the grid); "exact_best" and "exact_best_alpha"; "entries": name ->
  "description" (and, when the exact grid is coarser, "grid_best_alpha", "grid_best_preview", "grid_exact_at_best");
  "pareto": name -> recall, IGD, IGD+, hypervolumes and front sizes; "costs": stage -> seconds, with
  "preview <name>" measured here; "paper" and "paper_ordering" ({"paper", "ours", "holds"}); "recommendation": the
  `top_k` alphas of the `recommend` entry; "figures"; "notes"; and the keys of `details`.

  Args:
    entries: `bmerge.comparison.Entry(name, posteriors, rule, description)` items (or plain tuples), e.g.
      `Entry("hessian", q, bmerge.merge.hessian_weighted, "IVON -> Hessian-weighted")`. Give rules with bound
      arguments as `functools.partial` (e.g. `partial(bmerge.merge.task_arithmetic, base)`), so resuming sees them.
    eval_fn: `eval_fn(params, batch)` of one merged model, jittable; see above for what it returns.
    batch: the evaluation data.
    alphas: [G, T] the preview grid (`bmerge.grid.simplex`, `bmerge.grid.scaled`, ...).
    exact: optional exact results at `exact_alphas`: [G'] or [G', M] in the layout above.
    exact_alphas: [G', T] rows of `alphas` where `exact` was computed; default `alphas` itself.
    folder: the report folder (created if missing); None writes nothing.
    workdir: where preview chunks are saved and resumed from (`bmerge.preview`); None computes everything.
    overall: "first" or "weighted" (see above).
    maximize: whether larger metrics are better (accuracy) or smaller (loss).
    metric: the metric's name for tables and axes.
    task_metric: the per-task metric's name, when it differs (e.g. "task loss" with overall='weighted').
    percent: print the metric as a percentage (accuracies in [0, 1]).
    task_names: the T task names.
    directions: optional [D, T] directions of a scaled grid, for the scaling figure's lambda axis.
    costs: stage name -> seconds measured by the caller, e.g. {"posteriors hessian": 40.0, "exact": 98.0}.
      "exact" (the exact baseline over `exact_alphas`) and "posteriors <entry name>" give the speed-up lines.
    paper: optional numbers reported by a paper, printed next to ours:
      {"source": "Table 1, MNIST imbalanced", "methods": {name: {"label": "Simple", "mse": 0.2067,
      "best_preview": 76.8, "exact_at_best": 90.0}}, "exact_best": 90.4} (values shown as given). Where the paper
      shows only the order of the errors, give "mse_rank" (1 = smallest) instead of "mse". Whether our MSEs fall in
      the paper's order goes into the summary as "paper_ordering".
    title: the report's title.
    notes: markdown appended to the report under "Notes".
    details: more JSON values stored in the summary (their keys must be new).
    extra_figures: PNG files already in `folder` to show in the report after the standard ones.
    recommend: the entry whose top alphas are recommended; default the last entry.
    top_k: how many alphas to recommend.
    chunk_size: alphas per compiled preview call.
    progress: show progress bars.

  Returns:
    A `Comparison(summary, previews, exact, paths)`.

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian(jnp.array([0.0]), jnp.array([1.0])),
    ...                   bmerge.DiagGaussian(jnp.array([2.0]), jnp.array([3.0]))])
    >>> alphas = bmerge.grid.simplex(2, 0.25)
    >>> score = lambda theta, target: -jnp.abs(theta[0] - target)      # best at theta = 1
    >>> exact = -abs(alphas @ jnp.array([0.0, 2.0]) - 1.0)             # joint training: theta = sum alpha_t theta_t
    >>> out = bmerge.compare([("simple", q, lambda p, a: bmerge.merge.simple_average(p.mean, a)),
    ...                       ("hessian", q, bmerge.merge.hessian_weighted)], score, 1.0, alphas, exact=exact)
    >>> out.summary["methods"]["simple"]["mse"], out.summary["methods"]["hessian"]["best_alpha"]
    (0.0, [0.75, 0.25])
  """
  entries = _entries(entries)
  if not callable(eval_fn):
    raise TypeError(f"`eval_fn` must be callable as eval_fn(params, batch), got {type(eval_fn).__name__}.")
  alphas = _checks.matrix(alphas, "alphas")
  if np.any(alphas < 0):
    raise ValueError(f"`alphas` must be non-negative task weights; row {int(np.argmax(np.any(alphas < 0, 1)))} is not.")
  g, t = alphas.shape
  if overall not in ("first", "weighted"):
    raise ValueError(f"`overall` must be 'first' or 'weighted', got {overall!r}.")
  maximize = _checks.flag(maximize, "maximize")
  percent = _checks.flag(percent, "percent")
  names = [f"task {i + 1}" for i in range(t)] if task_names is None else list(task_names)
  if len(names) != t or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`task_names` must be {t} strings (one per column of `alphas`), got {task_names!r}.")
  top_k = _checks.positive_int(top_k, "top_k")
  recommend = entries[-1].name if recommend is None else recommend
  if recommend not in [e.name for e in entries]:
    raise ValueError(f"`recommend` must name an entry, got {recommend!r}.")
  stage_costs = _costs(costs)
  paper = _paper(paper)
  details = _jsonable(dict(details), "details") if details is not None else {}
  if set(details) & _SUMMARY_KEYS:
    raise ValueError(f"`details` keys {sorted(set(details) & _SUMMARY_KEYS)} are the summary's own; use other names.")
  folder = pathlib.Path(_checks.workdir(folder, "folder")) if folder is not None else None

  ex = None
  if exact is not None:
    ex_raw = _checks.numeric(exact, "exact")
    if ex_raw.ndim not in (1, 2):
      raise ValueError(f"`exact` must have shape [G'] or [G', M], got {ex_raw.shape}.")
    if exact_alphas is None:
      if ex_raw.shape[0] != g:
        raise ValueError(f"`exact` has {ex_raw.shape[0]} rows but `alphas` has G = {g}; pass `exact_alphas`, the "
                         "grid rows where the exact results were computed.")
      ex_alphas = alphas
    else:
      ex_alphas = _checks.matrix(exact_alphas, "exact_alphas", rows=ex_raw.shape[0], rows_of="`exact`")
    _checks.matrix(ex_raw.reshape(ex_raw.shape[0], -1), "exact", what="[G', M]")  # finite
    if ex_alphas.shape[1] != t:
      raise ValueError(f"`exact_alphas` has {ex_alphas.shape[1]} columns but `alphas` has T = {t}.")
    ex = _Exact(ex_alphas, _match_rows(alphas, ex_alphas), *_layout(ex_raw, ex_alphas, overall, "exact"))
  elif exact_alphas is not None:
    raise ValueError("`exact_alphas` was given without `exact`; pass the exact results computed there.")

  for e in entries:  # cheap: traces only, so a wrong eval_fn fails before the first preview runs
    _check_eval(e, eval_fn, batch, alphas, overall)
  raw, over, per_task = {}, {}, {}
  for e in entries:
    t0 = time.perf_counter()
    out = grid_eval.preview(e.rule, e.posteriors, alphas, eval_fn, batch, chunk_size=chunk_size, workdir=workdir,
                            tag=_tag(e.name), progress=progress)
    stage_costs[f"preview {e.name}"] = time.perf_counter() - t0
    raw[e.name] = np.asarray(out)
    over[e.name], per_task[e.name] = _layout(np.asarray(out, np.float64), alphas, overall, f"preview of {e.name!r}")
    _checks.vector(over[e.name], f"preview of {e.name!r}")  # finite

  summary: dict[str, Any] = {
      "title": title, "metric": metric, "maximize": maximize, "percent": percent, "overall": overall,
      "num_tasks": t, "task_names": names, "num_alphas": g, "num_exact_alphas": 0 if ex is None else len(ex.rows),
      "on_simplex": bool(np.all(np.abs(alphas.sum(axis=1) - 1.0) <= 1e-6)),
      "entries": {e.name: {"description": e.description} for e in entries}}
  summary.update(_scores(alphas, over, per_task, ex, maximize, summary["entries"]))
  summary["recommendation"] = _recommendation(alphas, over[recommend], recommend, ex, maximize, top_k)
  summary["costs"] = stage_costs
  if paper is not None:
    summary["paper"] = paper
    ordering = _paper_ordering(paper, summary["methods"])
    if ordering is not None:
      summary["paper_ordering"] = ordering
  if notes:
    summary["notes"] = str(notes)
  summary.update(details)

  paths: dict[str, pathlib.Path] = {}
  exact_out = None if exact is None else np.asarray(exact)
  if folder is not None:
    figs = report.figures(folder, alphas, over, exact=None if ex is None else ex.overall,
                          exact_alphas=None if ex is None else ex.alphas,
                          per_task_previews=per_task if all(v is not None for v in per_task.values()) else None,
                          per_task_exact=None if ex is None else ex.per_task, task_names=names, maximize=maximize,
                          label=metric, task_label=task_metric, directions=directions)
    figs += [pathlib.Path(f) for f in extra_figures]
    summary["figures"] = [f.name for f in figs]
    paths.update({f.stem: f for f in figs})
    paths["metrics"] = folder / "metrics.json"
    paths["metrics"].write_text(json.dumps(summary, indent=1, allow_nan=False))
    paths["report"] = report.write(folder, summary, figs)
  return Comparison(summary=summary, previews=raw, exact=exact_out, paths=paths)
