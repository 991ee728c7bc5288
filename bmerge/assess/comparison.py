"""One call for a user's comparison: several (posteriors, merge rule) previews against exact results, with a report.

`bmerge.compare` runs `bmerge.preview` for every entry over one grid of alphas, matches the exact (joint-training)
results to the grid by value (they may sit on a coarser grid), scores every preview with `bmerge.metrics`, and writes
`metrics.json`, `surfaces.npz`, the figures and `report.md` into a folder. The module is `comparison` so that
`bmerge.compare` can be the function. `compare` is a short pipeline of stages, each a function below: check the
inputs, preview the entries, score them against the exact results, compare Pareto fronts, bound the scores with
intervals (per-example results), recommend, write the report.

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Sec. 4: previews against joint training; Tables 1-2; Figs. 3-9).
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from bmerge import _checks
from bmerge import timing
from bmerge.grid import evaluate as grid_eval
from bmerge.assess import metrics
from bmerge.assess import report

__all__ = ["CompareOptions", "Comparison", "Entry", "compare", "train_at"]

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
  previews: dict  # entry name -> numpy outputs of eval_fn at every alpha: [G], [G, M], or [G, N] per example
  exact: Optional[np.ndarray]  # the exact results as given, [G'], [G', M] or [G', N], or None
  paths: dict  # "report", "metrics", "surfaces" and each figure's stem ("contours", "pareto", ...) -> pathlib.Path
  surfaces: Optional[dict] = None  # entry name (and "exact") -> the scored surface: [G], [G, 1 + T] or [G, T]
  call: Optional[dict] = None  # the arguments of the `compare` call, so `train_at` can rescore with more exact runs


class CompareOptions(NamedTuple):
  """How `compare` presents and reports a comparison; every field has a default.

  Pass one as `compare(..., options=CompareOptions(metric="test accuracy", percent=True))`, or give the fields as
  keyword arguments of `compare` (`compare(..., percent=True)`), which replace those of `options`.

  Example:
    >>> from bmerge import CompareOptions
    >>> opts = CompareOptions(metric="test accuracy", percent=True)
    >>> opts.percent, opts._replace(top_k=3).top_k, opts.progress
    (True, 3, True)
  """

  metric: str = "accuracy"  # the metric's name for tables and axes
  task_metric: Optional[str] = None  # the per-task metric's name, when it differs (e.g. "task loss")
  percent: bool = False  # print the metric as a percentage (accuracies in [0, 1])
  task_names: Optional[Sequence[str]] = None  # the T task names (default "task 1", ...)
  directions: Any = None  # [D, T] directions of a scaled grid, for the scaling figure's lambda axis
  costs: Optional[Mapping[str, Any]] = None  # stage name -> seconds, timing.Cost or Cached ("exact", "posteriors X")
  paper: Optional[Mapping] = None  # numbers a paper reports, printed next to ours (see `compare`)
  title: str = "Preview comparison"  # the report's title
  notes: str = ""  # markdown appended to the report under "Notes"
  details: Optional[Mapping] = None  # more JSON values stored in the summary (their keys must be new)
  extra_figures: Sequence[Any] = ()  # PNG files already in the folder, shown after the standard ones
  recommend: Optional[str] = None  # the entry whose top alphas are recommended (default the last entry)
  top_k: int = 5  # how many alphas to recommend
  chunk_size: int = 64  # alphas per compiled preview call
  progress: bool = True  # show progress bars
  num_samples: int = 1000  # bootstrap resamples of the test examples (with `examples`)
  level: float = 0.95  # coverage of the intervals
  seed: int = 0  # seed of the bootstrap


def _options(options: Optional[CompareOptions], overrides: Mapping[str, Any]) -> CompareOptions:
  if options is None:
    options = CompareOptions()
  elif not isinstance(options, CompareOptions):
    raise TypeError(f"`options` must be a bmerge.CompareOptions, got {type(options).__name__}.")
  unknown = sorted(set(overrides) - set(CompareOptions._fields))
  if unknown:
    raise TypeError(f"compare() got an unexpected keyword argument {unknown[0]!r}; besides its own arguments it "
                    f"takes the fields of CompareOptions: {', '.join(CompareOptions._fields)}.")
  return options._replace(**overrides)


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the inputs, checked once.


class _Setup(NamedTuple):
  alphas: np.ndarray  # [G, T] the preview grid
  overall: str  # "first" or "weighted"
  maximize: bool
  examples: Optional[np.ndarray]  # [N, T] task membership of the test examples, or None
  task_names: list  # T names
  recommend: str  # the entry whose top alphas are recommended
  costs: dict  # stage -> {"seconds", "compile_seconds", "loaded", "run", "machine"}: the caller's and the previews'
  paper: Optional[dict]
  details: dict
  folder: Optional[pathlib.Path]


_SUMMARY_KEYS = {"title", "metric", "maximize", "percent", "overall", "num_tasks", "task_names", "num_alphas",
                 "num_exact_alphas", "num_examples", "on_simplex", "entries", "methods", "exact_best",
                 "exact_best_alpha", "pareto", "interval", "differences", "recommendation", "costs", "paper",
                 "paper_ordering", "notes", "figures", "surfaces"}


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
  if "exact" in names:
    raise ValueError("`entries` names must not be 'exact', the name of the exact results in figures and surfaces.")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"`entries` names must be unique; repeated: {dup}.")
  return out


def _cost(k: str, v: Any) -> dict:
  """One stage's cost as stored in the summary: seconds, compile_seconds, loaded, run, machine."""
  if isinstance(v, timing.Cost):
    return v.to_json()
  if hasattr(v, "seconds") and hasattr(v, "loaded") and isinstance(getattr(v, "machine", None), Mapping):
    v = {"seconds": v.seconds, "loaded": v.loaded, "run": v.machine.get("run"), "machine": dict(v.machine)}
  if isinstance(v, Mapping):
    seconds = v.get("seconds")
    out = {"seconds": seconds, "compile_seconds": v.get("compile_seconds"), "loaded": bool(v.get("loaded", False)),
           "run": v.get("run"), "machine": v.get("machine")}
  else:  # plain seconds: measured by the caller in this run
    seconds = v
    out = {"seconds": v, "compile_seconds": None, "loaded": False, "run": timing.RUN, "machine": None}
  if isinstance(seconds, bool) or not isinstance(seconds, (int, float, np.number)) or not (
      math.isfinite(seconds) and seconds >= 0):
    raise ValueError(f"`costs` must map stage names to non-negative seconds (a number, a bmerge.timing.Cost, a "
                     f"checkpoint.Cached or a dict with 'seconds'); got {k!r}: {v!r}.")
  out["seconds"] = float(seconds)
  return out


def _costs(costs) -> dict[str, dict]:
  if costs is None:
    return {}
  if not isinstance(costs, Mapping):
    raise TypeError(f"`costs` must be a dict of stage name -> seconds, got {type(costs).__name__}.")
  if any(not isinstance(k, str) for k in costs):
    raise ValueError(f"`costs` must have str stage names, got {sorted(map(repr, costs))}.")
  return {k: _cost(k, v) for k, v in costs.items()}


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


def _examples(examples, num_tasks: int) -> Optional[np.ndarray]:
  if examples is None:
    return None
  z = _checks.matrix(examples, "examples", what=f"[N, {num_tasks}] (task membership of each test example)")
  if z.shape[1] != num_tasks:
    raise ValueError(f"`examples` has {z.shape[1]} columns but `alphas` has T = {num_tasks}; expected shape "
                     f"[N, {num_tasks}], the task membership of each test example.")
  if not np.all((z == 0) | (z == 1)):
    bad = tuple(int(i) for i in np.argwhere((z != 0) & (z != 1))[0])
    raise ValueError(f"`examples` must hold 0 or 1 (task membership); entry {bad} is {z[bad]}.")
  return z


def _setup(entries: list[Entry], eval_fn, alphas, overall, maximize, examples, folder, opts: CompareOptions) -> _Setup:
  if not callable(eval_fn):
    raise TypeError(f"`eval_fn` must be callable as eval_fn(params, batch), got {type(eval_fn).__name__}.")
  alphas = _checks.matrix(alphas, "alphas")
  if np.any(alphas < 0):
    raise ValueError(f"`alphas` must be non-negative task weights; row {int(np.argmax(np.any(alphas < 0, 1)))} is not.")
  t = alphas.shape[1]
  if overall not in ("first", "weighted"):
    raise ValueError(f"`overall` must be 'first' or 'weighted', got {overall!r}.")
  _checks.flag(opts.percent, "percent")
  _checks.flag(opts.progress, "progress")
  _checks.positive_int(opts.top_k, "top_k")
  _checks.positive_int(opts.num_samples, "num_samples")
  _checks.integer(opts.seed, "seed", minimum=0)
  if isinstance(opts.level, bool) or not isinstance(opts.level, (int, float)) or not 0 < opts.level < 1:
    raise ValueError(f"`level` must be a probability strictly between 0 and 1 (e.g. 0.95), got {opts.level!r}.")
  names = [f"task {i + 1}" for i in range(t)] if opts.task_names is None else list(opts.task_names)
  if len(names) != t or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`task_names` must be {t} strings (one per column of `alphas`), got {opts.task_names!r}.")
  recommend = entries[-1].name if opts.recommend is None else opts.recommend
  if recommend not in [e.name for e in entries]:
    raise ValueError(f"`recommend` must name an entry, got {recommend!r}.")
  details = _jsonable(dict(opts.details), "details") if opts.details is not None else {}
  if set(details) & _SUMMARY_KEYS:
    raise ValueError(f"`details` keys {sorted(set(details) & _SUMMARY_KEYS)} are the summary's own; use other names.")
  return _Setup(alphas=alphas, overall=overall, maximize=_checks.flag(maximize, "maximize"),
                examples=_examples(examples, t), task_names=names, recommend=recommend, costs=_costs(opts.costs),
                paper=_paper(opts.paper), details=details,
                folder=pathlib.Path(_checks.workdir(folder, "folder")) if folder is not None else None)


def _width(s: _Setup) -> str:
  t = s.alphas.shape[1]
  return f"[{t}] per-task metrics" if s.overall == "weighted" else f"a scalar, or [1 + T] = [{1 + t}]"


def _layout(values: np.ndarray, alphas: np.ndarray, overall: str, name: str, width: str) -> tuple[np.ndarray,
                                                                                                 Optional[np.ndarray]]:
  """(overall metric [G], per-task metrics [G, T] or None) of one surface, by the convention of `compare`."""
  t = alphas.shape[1]
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if overall == "weighted":
    if values.ndim != 2 or values.shape[1] != t:
      raise ValueError(f"`{name}` has shape {values.shape}; with overall='weighted' each alpha needs {width}, i.e. "
                       f"shape [G, {t}].")
    return np.sum(alphas * values, axis=1), values
  if values.ndim == 1:
    return values, None
  if values.ndim == 2 and values.shape[1] == 1 + t:
    return values[:, 0], values[:, 1:]
  raise ValueError(f"`{name}` has shape {values.shape}; each alpha needs {width} values: column 0 the "
                   "overall metric, columns 1..T the per-task metrics.")


def _scored(accuracy: np.ndarray, overall: str) -> np.ndarray:
  """[..., 1 + T] per-task accuracy -> the scored layout: all of it (overall="first") or its [..., T] task columns."""
  return accuracy[..., 1:] if overall == "weighted" else accuracy


def _surface(values: np.ndarray, s: _Setup) -> np.ndarray:
  """The scored surface of raw results: with `examples`, per-example [G, N] -> `per_task_accuracy`, scored;
  otherwise the results themselves."""
  return values if s.examples is None else _scored(metrics.per_task_accuracy(values, s.examples), s.overall)


class _Exact(NamedTuple):
  alphas: np.ndarray  # [G', T] where joint training ran
  rows: np.ndarray  # [G'] their rows in the preview grid
  raw: np.ndarray  # [G'], [G', M] or [G', N]: as given
  surface: np.ndarray  # [G'], [G', 1 + T] or [G', T]: as scored
  overall: np.ndarray  # [G'] overall metric
  per_task: Optional[np.ndarray]  # [G', T] or None


def _match_rows(alphas: np.ndarray, exact_alphas: np.ndarray) -> np.ndarray:
  rows = report._rows_of(alphas, exact_alphas)  # pylint: disable=protected-access
  missing = np.flatnonzero(rows < 0)
  if missing.size:
    i = int(missing[0])
    raise ValueError(f"`exact_alphas` row {i} {exact_alphas[i].tolist()} is not a row of `alphas`; exact results "
                     "must sit on points of the preview grid (e.g. a coarser lattice of the same simplex).")
  return rows


def _exact(exact, exact_alphas, s: _Setup) -> Optional[_Exact]:
  if exact is None:
    if exact_alphas is not None:
      raise ValueError("`exact_alphas` was given without `exact`; pass the exact results computed there.")
    return None
  g, t = s.alphas.shape
  raw = _checks.numeric(exact, "exact")
  if s.examples is not None and (raw.ndim != 2 or raw.shape[1] != s.examples.shape[0]):
    raise ValueError(f"`exact` has shape {raw.shape}; with `examples` it holds per-example results, shape [G', N] "
                     f"with N = {s.examples.shape[0]} (the rows of `examples`).")
  if raw.ndim not in (1, 2):
    raise ValueError(f"`exact` must have shape [G'] or [G', M], got {raw.shape}.")
  if exact_alphas is None:
    if raw.shape[0] != g:
      raise ValueError(f"`exact` has {raw.shape[0]} rows but `alphas` has G = {g}; pass `exact_alphas`, the "
                       "grid rows where the exact results were computed.")
    ex_alphas = s.alphas
  else:
    ex_alphas = _checks.matrix(exact_alphas, "exact_alphas", rows=raw.shape[0], rows_of="`exact`")
  _checks.matrix(raw.reshape(raw.shape[0], -1), "exact", what="[G', M]")  # finite
  if ex_alphas.shape[1] != t:
    raise ValueError(f"`exact_alphas` has {ex_alphas.shape[1]} columns but `alphas` has T = {t}.")
  surface = _surface(raw, s)
  return _Exact(ex_alphas, _match_rows(s.alphas, ex_alphas), np.asarray(exact), surface,
                *_layout(surface, ex_alphas, s.overall, "exact", _width(s)))


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: preview every entry.


class _Previews(NamedTuple):
  raw: dict  # name -> the outputs of eval_fn at every alpha, as computed
  surface: dict  # name -> the scored surface
  overall: dict  # name -> [G] overall metric
  per_task: dict  # name -> [G, T] or None


def _tag(name: str) -> str:
  """The resume folder of an entry: its name with anything but letters, digits, '-', '_' and '.' replaced."""
  return "preview_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _check_eval(entry: Entry, eval_fn, batch, s: _Setup) -> None:
  """Traces (does not run) the merged model's evaluation once, so a wrong output fails before any preview runs."""
  a = jax.ShapeDtypeStruct((1, s.alphas.shape[1]), grid_eval.compute_dtype())
  shape = jax.eval_shape(lambda x: jax.vmap(eval_fn, in_axes=(0, None))(entry.rule(entry.posteriors, x), batch), a)
  what = f"[N] = [{s.examples.shape[0]}] per-example results" if s.examples is not None else _width(s)
  if not isinstance(shape, jax.ShapeDtypeStruct):
    raise TypeError(f"`eval_fn` must return one array ({what}), got a {type(shape).__name__} of arrays (for "
                    f"{entry.name!r}).")
  if s.examples is not None:
    if shape.shape != (1, s.examples.shape[0]):
      raise ValueError(f"`eval_fn(params, batch)` for {entry.name!r} returns shape {shape.shape[1:]}; with "
                       f"`examples` it must return {what}, one per row of `examples`.")
    return
  _layout(np.zeros(shape.shape), s.alphas[:1], s.overall, f"eval_fn(params, batch) for {entry.name!r}", _width(s))


def _compile_key(entry: Entry, eval_fn, batch):
  """What the compiled fused preview is cached by: the rule and eval_fn objects and the input shapes and dtypes."""
  try:
    shapes = tuple((jax.tree.structure(x), tuple((np.shape(l), str(getattr(l, "dtype", np.asarray(l).dtype)))
                                                 for l in jax.tree.leaves(x))) for x in (entry.posteriors, batch))
    key = (entry.rule, eval_fn, shapes)
    hash(key)
    return key
  except TypeError:
    return None


def _preview_entries(entries: list[Entry], eval_fn, batch, workdir, s: _Setup, opts: CompareOptions,
                     given: Optional[Mapping[str, Any]] = None) -> _Previews:
  given = dict(given or {})
  for e in entries:  # cheap: traces only, so a wrong eval_fn fails before the first preview runs
    if e.name not in given:
      _check_eval(e, eval_fn, batch, s)
  out = _Previews({}, {}, {}, {})
  compiled: dict = {}  # compile key -> the compile seconds of the entry that compiled it
  for e in entries:
    if e.name in given:  # computed by an earlier call over the same grid (`train_at`)
      values = np.asarray(given[e.name])
      if values.shape[0] != s.alphas.shape[0]:
        raise ValueError(f"`previews[{e.name!r}]` has {values.shape[0]} rows; expected G = {s.alphas.shape[0]}.")
      out.raw[e.name] = values
      out.surface[e.name] = _surface(np.asarray(values, np.float64), s)
      out.overall[e.name], out.per_task[e.name] = _layout(out.surface[e.name], s.alphas, s.overall,
                                                          f"preview of {e.name!r}", _width(s))
      continue
    with timing.recording() as log:
      values = grid_eval.preview(e.rule, e.posteriors, s.alphas, eval_fn, batch, chunk_size=opts.chunk_size,
                                 workdir=workdir, tag=_tag(e.name), progress=opts.progress)
    cost = timing.combine(f"preview {e.name}", log)
    # An entry with the rule, eval_fn and shapes of an earlier one reuses its compiled preview; it is charged the
    # same compilation (each entry pays one, as it would alone), not nothing.
    key = _compile_key(e, eval_fn, batch)
    if cost.computed_rows and key is not None:
      if cost.compile_seconds == 0.0 and key in compiled:
        cost = cost._replace(compile_seconds=compiled[key])
      compiled.setdefault(key, cost.compile_seconds)
    s.costs[f"preview {e.name}"] = cost.to_json()
    out.raw[e.name] = np.asarray(values)
    out.surface[e.name] = _surface(np.asarray(values, np.float64), s)
    out.overall[e.name], out.per_task[e.name] = _layout(out.surface[e.name], s.alphas, s.overall,
                                                        f"preview of {e.name!r}", _width(s))
    _checks.vector(out.overall[e.name], f"preview of {e.name!r}")  # finite
  return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: scores against the exact results, and Pareto fronts.


def _header(entries: list[Entry], ex: Optional[_Exact], s: _Setup, opts: CompareOptions) -> dict:
  """What was compared: the settings, the grid's and the test set's sizes, the entries' descriptions."""
  g, t = s.alphas.shape
  out: dict[str, Any] = {
      "title": opts.title, "metric": opts.metric, "maximize": s.maximize, "percent": bool(opts.percent),
      "overall": s.overall, "num_tasks": t, "task_names": s.task_names, "num_alphas": g,
      "num_exact_alphas": 0 if ex is None else len(ex.rows),
      "on_simplex": bool(np.all(np.abs(s.alphas.sum(axis=1) - 1.0) <= 1e-6)),
      "entries": {e.name: {"description": e.description} for e in entries}}
  if s.examples is not None:
    out["num_examples"] = int(s.examples.shape[0])
  return out


def _best(values: np.ndarray, maximize: bool) -> int:
  return int(np.argmax(values) if maximize else np.argmin(values))


def _scores(p: _Previews, ex: Optional[_Exact], s: _Setup, entries: dict) -> dict:
  """"methods", "exact_best" and "exact_best_alpha" of the summary; adds the whole-grid best alphas to `entries`
  when the exact grid is coarser."""
  if ex is None:
    methods = {}
    for n, v in p.overall.items():
      b = _best(v, s.maximize)
      methods[n] = {"best_alpha": s.alphas[b].tolist(), "best_preview": float(v[b])}
    return {"methods": methods}
  out = metrics.summarize(ex.alphas, {n: v[ex.rows] for n, v in p.overall.items()}, ex.overall, s.maximize)
  exact_at = {int(r): i for i, r in enumerate(ex.rows)}
  if len(exact_at) < s.alphas.shape[0]:  # a coarser exact grid: also the preview's own best over the whole grid
    for n, v in p.overall.items():
      b = _best(v, s.maximize)
      entries[n].update(grid_best_alpha=s.alphas[b].tolist(), grid_best_preview=float(v[b]),
                        grid_exact_at_best=float(ex.overall[exact_at[b]]) if b in exact_at else None)
  return out


def _pareto(p: _Previews, ex: Optional[_Exact], s: _Setup) -> dict:
  """"pareto": name -> the `metrics.compare_fronts` scores, where there are per-task metrics of two tasks or more."""
  if ex is None or ex.per_task is None or ex.per_task.shape[1] < 2:
    return {}
  out = {}
  for n, v in p.per_task.items():
    if v is not None:
      fc = metrics.compare_fronts(ex.alphas, v[ex.rows], ex.per_task, s.maximize)
      out[n] = {"recall": fc.recall, "igd": fc.igd, "igd_plus": fc.igd_plus,
                "hypervolume_exact": fc.hypervolume_exact, "hypervolume_preview": fc.hypervolume_preview,
                "exact_front_size": int(fc.exact_front.size), "preview_front_size": int(fc.preview_front.size),
                "epsilon": fc.epsilon.tolist(), "recall_random": fc.random_recall,
                "igd_plus_random": fc.random_igd_plus, "hypervolume_random": fc.random_hypervolume}
  return {"pareto": out}


# ----------------------------------------------------------------------------------------------------------------
# Stage 4: intervals over the test examples (per-example results only).


def _resampled_surfaces(results: np.ndarray, members: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """`per_task_accuracy` of B resamples of the examples, [B, G, 1 + T], from how often each example is drawn.

  A resample that draws example n k_n times has, in column j of `members` = [1, z] ([N, 1 + T]), the mean
  sum_n k_n c_gn z_nj / max(1, sum_n k_n z_nj): matrix products with the counts k [B, N] instead of B copies of the
  [G, N] results.
  """
  g, n = results.shape
  weighted = (members.T[:, None, :] * results[None]).reshape(-1, n)  # [(1 + T) G, N]: c_gn z_nj
  sums = (weighted @ counts.T).reshape(members.shape[1], g, -1)  # [1 + T, G, B]
  return np.transpose(sums, (2, 1, 0)) / np.maximum(counts @ members, 1.0)[:, None, :]


def _intervals(p: _Previews, ex: Optional[_Exact], s: _Setup, opts: CompareOptions, methods: dict) -> dict:
  """Bootstrap intervals over the test examples: "mse_ci", "spearman_ci", "regret_at_1_ci" in `methods`, and the
  summary's "differences" (MSE of A minus MSE of B, every ordered pair) and "interval".

  One resample of the N examples is applied to every preview and to the exact results alike (paired), so the
  interval of a difference reflects how the two methods differ on the same examples.
  """
  if s.examples is None or ex is None:
    return {}
  names = list(p.raw)
  members = np.concatenate([np.ones((s.examples.shape[0], 1)), s.examples], axis=1)
  results = [np.asarray(ex.raw, np.float64)] + [np.asarray(p.raw[k], np.float64)[ex.rows] for k in names]
  pairs = list(itertools.permutations(range(len(names)), 2))
  sign = 1.0 if s.maximize else -1.0
  spearman_rows, regret_rows = metrics._spearman_rows, metrics._regret_rows  # pylint: disable=protected-access

  def overall(accuracy):  # [B, G', 1 + T] -> [B, G'] overall metric, as `_layout`
    return accuracy[..., 0] if s.overall == "first" else np.sum(ex.alphas * accuracy[..., 1:], axis=-1)

  def statistic(idx):  # [B, N] example indices -> [B, 3 M + M (M - 1)]
    b, n = idx.shape
    counts = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(float)
    exact_b, *previews = [overall(_resampled_surfaces(r, members, counts)) for r in results]
    mses = [np.mean((v - exact_b) ** 2, axis=-1) for v in previews]
    cols = [c for v, m in zip(previews, mses) for c in (m, spearman_rows(v, exact_b), regret_rows(v, exact_b, 1, sign))]
    return np.stack(cols + [mses[i] - mses[j] for i, j in pairs], axis=-1)

  est, lo, hi = metrics.bootstrap_interval(statistic, np.arange(s.examples.shape[0]), seed=opts.seed,
                                           num_samples=opts.num_samples, level=opts.level, vectorized=True)
  ci = lambda k: None if math.isnan(lo[k]) or math.isnan(hi[k]) else [float(lo[k]), float(hi[k])]
  for i, n in enumerate(names):
    methods[n].update(mse_ci=ci(3 * i), spearman_ci=ci(3 * i + 1), regret_at_1_ci=ci(3 * i + 2))
  first = 3 * len(names)
  differences = {f"{names[i]}-{names[j]}": {"mse": float(est[first + k]), "ci": ci(first + k)}
                 for k, (i, j) in enumerate(pairs)}
  return {"interval": {"kind": "bootstrap over test examples", "seeds": 1, "samples": opts.num_samples,
                       "level": float(opts.level)},
          "differences": differences}


# ----------------------------------------------------------------------------------------------------------------
# Stage 5: what to train next, costs, and the paper's numbers.


def _recommendation(p: _Previews, ex: Optional[_Exact], s: _Setup, k: int) -> dict:
  """The top k alphas of one preview, with the exact metric there where joint training ran."""
  values = p.overall[s.recommend]
  order = np.argsort(-values if s.maximize else values, kind="stable")[:k]
  rec = {"from": s.recommend, "alphas": s.alphas[order].tolist(), "preview": values[order].tolist()}
  if ex is not None:
    exact_at = {int(r): i for i, r in enumerate(ex.rows)}
    rec["exact"] = [float(ex.overall[exact_at[int(i)]]) if int(i) in exact_at else None for i in order]
  return rec


def _verdict(pairs: list[Optional[list]]) -> str:
  """"holds" when every interval of (larger - smaller) lies above 0, "does not hold" when one lies below, else
  "not resolved"."""
  if any(ci is not None and ci[1] < 0 for ci in pairs):
    return "does not hold"
  if all(ci is not None and ci[0] > 0 for ci in pairs):
    return "holds"
  return "not resolved"


def _paper_ordering(paper: Mapping, methods: Mapping, differences: Optional[Mapping]) -> Optional[dict]:
  """The paper's ordering of the MSEs (largest first) over the entries it reports, by its "mse" values or, where it
  gives none, its "mse_rank" (1 = smallest), whether our MSEs fall in the same order ("holds") and, with intervals,
  whether every pair's difference is resolved in that order ("verdict")."""
  listed = {n: p for n, p in paper.get("methods", {}).items() if methods.get(n, {}).get("mse") is not None}
  for key in ("mse", "mse_rank"):
    if len(listed) >= 2 and all(p.get(key) is not None for p in listed.values()):
      theirs = sorted(listed, key=lambda n: -listed[n][key])
      ours = sorted(listed, key=lambda n: -methods[n]["mse"])
      out = {"paper": theirs, "ours": ours, "holds": theirs == ours}
      if differences:
        out["verdict"] = _verdict([differences[f"{a}-{b}"]["ci"] for a, b in itertools.combinations(theirs, 2)])
      return out
  return None


def _outcome(p: _Previews, ex: Optional[_Exact], s: _Setup, opts: CompareOptions, summary: dict) -> dict:
  """"recommendation", "costs", "paper", "paper_ordering", "notes" and the caller's details."""
  out: dict[str, Any] = {"recommendation": _recommendation(p, ex, s, opts.top_k), "costs": s.costs}
  if s.paper is not None:
    out["paper"] = s.paper
    ordering = _paper_ordering(s.paper, summary["methods"], summary.get("differences"))
    if ordering is not None:
      out["paper_ordering"] = ordering
  if opts.notes:
    out["notes"] = str(opts.notes)
  out.update(s.details)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Stage 6: the report folder.


def _save_surfaces(path: pathlib.Path, p: _Previews, ex: Optional[_Exact], s: _Setup) -> None:
  """`surfaces.npz`: "alphas", "preview/<name>" (as computed) and "surface/<name>" (as scored) of every entry, and
  "exact_alphas", "exact" (as given) and "surface/exact" where there are exact results; "examples" with them."""
  arrays = {"alphas": s.alphas, **{f"preview/{n}": v for n, v in p.raw.items()},
            **{f"surface/{n}": v for n, v in p.surface.items()}}
  if ex is not None:
    arrays.update({"exact_alphas": ex.alphas, "exact": ex.raw, "surface/exact": ex.surface})
  if s.examples is not None:
    arrays["examples"] = s.examples
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _write(p: _Previews, ex: Optional[_Exact], s: _Setup, opts: CompareOptions, summary: dict) -> dict:
  folder = s.folder
  figs = report.figures(folder, s.alphas, p.overall, exact=None if ex is None else ex.overall,
                        exact_alphas=None if ex is None else ex.alphas,
                        per_task_previews=p.per_task if all(v is not None for v in p.per_task.values()) else None,
                        per_task_exact=None if ex is None else ex.per_task, task_names=s.task_names,
                        maximize=s.maximize, label=opts.metric, task_label=opts.task_metric,
                        directions=opts.directions)
  figs += [pathlib.Path(f) for f in opts.extra_figures]
  paths = {f.stem: f for f in figs}
  paths["surfaces"] = folder / "surfaces.npz"
  _save_surfaces(paths["surfaces"], p, ex, s)
  summary["figures"] = [f.name for f in figs]
  summary["surfaces"] = paths["surfaces"].name
  paths["metrics"] = folder / "metrics.json"
  paths["metrics"].write_text(json.dumps(summary, indent=1, allow_nan=False))
  paths["report"] = report.write(folder, summary, figs)
  return paths


def compare(entries: Sequence[Entry | tuple], eval_fn: Callable[[PyTree, Any], Any], batch: Any, alphas, *,
            exact=None, exact_alphas=None, folder=None, workdir=None, overall: str = "first", maximize: bool = True,
            examples=None, previews: Optional[Mapping[str, Any]] = None, options: Optional[CompareOptions] = None,
            **overrides) -> Comparison:
  r"""Previews every entry over one grid, scores each against exact results, and writes a report folder.
  For every entry, `bmerge.preview(rule, posteriors, alphas, eval_fn, batch)` (resumable in `workdir`, one folder
  per entry name). Then, on the alphas that have exact results, the scores of `bmerge.metrics.summarize` (paper
  Tables 1-2): with :math:`\hat m_g` the preview's and :math:`m_g` the exact overall metric at the G' alphas,

  .. math:: \mathrm{MSE} = \frac{1}{G'} \sum_g (\hat m_g - m_g)^2, \quad
            \rho = \mathrm{corr}(\mathrm{rank}\,\hat m, \mathrm{rank}\,m), \quad
            \mathrm{regret@}k = \max_g m_g - \max_{g \in \mathrm{top}_k(\hat m)} m_g,

  the best alpha :math:`\arg\max_g \hat m_g` with its exact value, and, with per-task metrics, the Pareto-front
  comparison of `bmerge.metrics.compare_fronts` (recall, IGD, IGD+, hypervolumes; any number of tasks).

  **What `eval_fn` returns** (`eval_fn(params, batch)` of one merged model), by `overall`:

  * "first" (default): a scalar (the metric), or a vector [1 + T]: column 0 the overall metric (e.g. accuracy on the
    whole test set), columns 1..T the metric on each task (e.g. accuracy on each task's test examples); the per-task
    columns give the Pareto comparison and the pair curves.
  * "weighted": a vector [T] of per-task metrics m_t; the overall metric at alpha is
    :math:`\sum_t \alpha_t m_t` (the weighted multitask objective of Eq. 1, e.g. for per-task losses). The best
    alpha, of the preview and of joint training alike, is the one whose own weighted objective is best, so each
    alpha is judged by its own weighting (the report says so).
  * with `examples` ([N, T] task membership of the test examples): per-example results [N] (e.g. 1.0 where the
    merged model is right). `compare` aggregates them with `bmerge.metrics.per_task_accuracy` into [1 + T]
    (overall="first") or its per-task columns [T] (overall="weighted"), and adds 95 % intervals from a paired
    bootstrap over the test examples (`bmerge.metrics.bootstrap_interval`): one resample of the N examples applied to
    every preview and to the exact results, for each method's MSE, Spearman and regret@1 ("mse_ci", "spearman_ci",
    "regret_at_1_ci") and for the MSE difference of every ordered pair of methods ("differences"). A single training
    run is behind the numbers, so the intervals cover the test-set sampling, not the training seed.

  `exact` follows the same layout, one row per row of `exact_alphas`. Exact results may sit on a coarser grid than
  the preview (e.g. preview spacing 0.05, joint training at 0.1): rows are matched to the grid by value (to 1e-8),
  every exact row must be a grid row, and scores use the matched rows; the best preview alpha over the whole grid is
  reported too. Grids off the simplex (task arithmetic's `bmerge.grid.scaled` sweep) are scored the same way and drawn
  against lambda.

  Files written into `folder` (when given): `metrics.json` (the summary), `surfaces.npz` (the arrays: "alphas",
  "preview/<name>" as computed, "surface/<name>" as scored, and "exact_alphas", "exact", "surface/exact",
  "examples" where given), `report.md`, and the figures that fit the grid (`bmerge.report.figures`: contours for
  T = 3, curves for T = 2, curves for every pair of tasks, scaling curves off the simplex, histograms, Pareto fronts).

  The summary (`metrics.json`) holds: "title", "metric", "maximize", "percent", "overall", "num_tasks", "task_names",
  "num_alphas", "num_exact_alphas", ("num_examples"), "on_simplex"; "methods": name -> the `metrics.summarize` scores
  (without exact results: "best_alpha" and "best_preview" on the grid; with `examples` also the intervals);
  "exact_best" and "exact_best_alpha"; "entries": name -> "description" (and, when the exact grid is coarser,
  "grid_best_alpha", "grid_best_preview", "grid_exact_at_best"); "pareto": name -> recall, IGD, IGD+, hypervolumes
  and front sizes; with `examples`, "differences" ({"A-B": {"mse", "ci"}}) and "interval" ({"kind", "seeds",
  "samples", "level"}); "costs": stage -> {"seconds" (run time without compilation), "compile_seconds", "loaded", "run",
  "machine"}, with "preview <name>" measured here (each entry compiles its own preview; a resumed entry reports the
  seconds stored with its rows, and the run that measured them); "paper" and
  "paper_ordering" ({"paper", "ours", "holds"}, and with intervals "verdict": "holds" only where every difference's
  interval excludes 0, else "not resolved" or "does not hold"); "recommendation": the `top_k` alphas of the
  `recommend` entry; "figures"; "surfaces"; "notes"; and the keys of `details`.

  Args:
    entries: `bmerge.Entry(name, posteriors, rule, description)` items (or plain tuples), e.g.
      `Entry("hessian", q, bmerge.merge.hessian_weighted, "IVON -> Hessian-weighted")`. Give rules with bound
      arguments as `functools.partial` (e.g. `partial(bmerge.merge.task_arithmetic, base)`), so resuming sees them.
    eval_fn: `eval_fn(params, batch)` of one merged model, jittable; see above for what it returns.
    batch: the evaluation data.
    alphas: [G, T] the preview grid (`bmerge.grid.simplex`, `bmerge.grid.scaled`, ...).
    exact: optional exact results at `exact_alphas`: [G'], [G', M] or, with `examples`, [G', N] in the layout above.
    exact_alphas: [G', T] rows of `alphas` where `exact` was computed; default `alphas` itself.
    folder: the report folder (created if missing); None writes nothing.
    workdir: where preview chunks are saved and resumed from (`bmerge.preview`); None computes everything.
    overall: "first" or "weighted" (see above).
    maximize: whether larger metrics are better (accuracy) or smaller (loss).
    examples: optional [N, T] 0/1 task membership of the test examples (tasks may overlap); then `eval_fn` and
      `exact` give per-example results.
    previews: optional entry name -> outputs of `eval_fn` already computed over `alphas` (e.g. `Comparison.previews`
      of an earlier call); those entries are not previewed again.
    options: a `CompareOptions` with the presentation and report settings (metric, task_metric, percent, task_names,
      directions, costs, paper, title, notes, details, extra_figures, recommend, top_k, chunk_size, progress,
      num_samples, level, seed); see its fields. `paper` is {"source": "Table 1, MNIST imbalanced", "methods":
      {name: {"label": "Simple", "mse": 0.2067, "best_preview": 76.8, "exact_at_best": 90.0}}, "exact_best": 90.4}
      (values shown as given; "mse_rank", 1 = smallest, where the paper shows only the order of the errors).
      `costs` gives the speed-up lines with "exact" (the exact baseline over `exact_alphas`) and
      "posteriors <entry name>": each value is seconds measured in this run, a `bmerge.timing.Cost` (e.g.
      `bmerge.timing.combine("exact", log)` of a `bmerge.timing.recording()` around `joint_train`) or a
      `bmerge.checkpoint.Cached`; ratios are printed only between stages of the same run.
    **overrides: fields of `CompareOptions` given by name; they replace those of `options`. Any other name is a
      TypeError.

  Returns:
    A `Comparison(summary, previews, exact, paths, surfaces)`.

  Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian(jnp.array([0.0]), jnp.array([1.0])),
    ...                   bmerge.DiagGaussian(jnp.array([2.0]), jnp.array([3.0]))])
    >>> alphas = bmerge.grid.simplex(2, 0.25)
    >>> score = lambda theta, target: -jnp.abs(theta[0] - target)      # best at theta = 1
    >>> exact = -abs(alphas @ jnp.array([0.0, 2.0]) - 1.0)             # joint training: theta = sum alpha_t theta_t
    >>> entries = [bmerge.Entry("simple", q, lambda p, a: bmerge.merge.simple_average(p.mean, a)),
    ...            bmerge.Entry("hessian", q, bmerge.merge.hessian_weighted)]
    >>> opts = bmerge.CompareOptions(metric="negative distance", progress=False)
    >>> out = bmerge.compare(entries, score, 1.0, alphas, exact=exact, options=opts)
    >>> out.summary["methods"]["simple"]["mse"], out.summary["methods"]["hessian"]["best_alpha"]
    (0.0, [0.75, 0.25])

    Per-example results: 40 test examples, the first 20 of task 1; an example is right when the merged theta is
    within its tolerance of 1, so the overall accuracy is the share of tolerances above |theta - 1|.

    >>> tol = jnp.linspace(0.05, 2.0, 40)
    >>> right = lambda theta, tol: (jnp.abs(theta[0] - 1.0) < tol).astype(jnp.float32)
    >>> exact = np.asarray(np.abs(np.asarray(alphas) @ [0.0, 2.0] - 1.0)[:, None] < np.asarray(tol), np.float32)
    >>> members = np.repeat(np.eye(2), 20, axis=0)
    >>> out = bmerge.compare(entries, right, tol, alphas, exact=exact, examples=members, options=opts)
    >>> out.surfaces["simple"].shape, out.summary["methods"]["simple"]["mse_ci"]
    ((5, 3), [0.0, 0.0])
  """
  opts = _options(options, overrides)
  entries = _entries(entries)
  s = _setup(entries, eval_fn, alphas, overall, maximize, examples, folder, opts)
  ex = _exact(exact, exact_alphas, s)
  p = _preview_entries(entries, eval_fn, batch, workdir, s, opts, previews)
  stages = tqdm(total=5 if s.folder is not None else 4, desc="comparison: scores", unit="stage", leave=False,
                disable=not opts.progress)
  summary = _header(entries, ex, s, opts)
  summary.update(_scores(p, ex, s, summary["entries"]))
  stages.update(1)
  stages.set_description("comparison: Pareto fronts")
  summary.update(_pareto(p, ex, s))
  stages.update(1)
  stages.set_description("comparison: intervals")
  summary.update(_intervals(p, ex, s, opts, summary["methods"]))
  stages.update(1)
  stages.set_description("comparison: recommendation")
  summary.update(_outcome(p, ex, s, opts, summary))
  stages.update(1)
  stages.set_description("comparison: report and figures")
  paths = _write(p, ex, s, opts, summary) if s.folder is not None else {}
  stages.update(1 if s.folder is not None else 0)
  stages.close()
  surfaces = dict(p.surface, **({} if ex is None else {"exact": ex.surface}))
  call = dict(entries=entries, eval_fn=eval_fn, batch=batch, alphas=alphas, exact_alphas=None if ex is None else
              ex.alphas, folder=folder, workdir=workdir, overall=overall, maximize=maximize, examples=examples,
              options=opts)
  return Comparison(summary=summary, previews=p.raw, exact=None if ex is None else ex.raw, paths=paths,
                    surfaces=surfaces, call=call)


def train_at(result: Comparison, exact_fn: Callable[[np.ndarray], Any], alphas=None, *, top_k: Optional[int] = None,
             folder=None) -> Comparison:
  """Runs the exact answer where the preview points, and scores and reports the comparison again with it.

  `exact_fn` maps alphas [k, T] to exact results [k, ...] in the layout of `compare`'s `exact` (e.g. a closure over
  `bmerge.exact.joint_train(task_losses, init, alphas, optimizer, num_steps, batch, eval_fn=..., eval_batch=...)`,
  which accepts a grid or one vector). The new rows join the exact results already in `result` (alphas already there
  are not trained again) and every score, interval, figure and the report are recomputed from the stored previews;
  the new runs' cost goes into `costs` as "exact at chosen alphas".

  Args:
    result: a `Comparison` from `compare`.
    exact_fn: `exact_fn(alphas [k, T]) -> [k]`, `[k, M]` or, with `examples`, `[k, N]`.
    alphas: where to train: [k, T] rows of the preview grid (or one [T] vector); default the recommended alphas
      (`summary["recommendation"]`).
    top_k: with the default `alphas`, train only the first `top_k` recommended.
    folder: the report folder; default that of `result` (None if it wrote none).

  Returns:
    The updated `Comparison`.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian(jnp.array([0.0]), jnp.array([1.0])),
    ...                   bmerge.DiagGaussian(jnp.array([2.0]), jnp.array([3.0]))])
    >>> alphas = bmerge.grid.simplex(2, 0.25)
    >>> score = lambda theta, target: 1.0 - jnp.abs(theta[0] - target)
    >>> joint = lambda a: 1.0 - np.abs((np.asarray(a) @ [0.0, 2.0]) - 1.0)  # the exact answer at alphas [k, 2]
    >>> out = bmerge.compare([bmerge.Entry("hessian", q, bmerge.merge.hessian_weighted)], score, 1.0, alphas,
    ...                      top_k=2, progress=False)
    >>> out = bmerge.train_at(out, joint)                                  # train at the 2 recommended alphas
    >>> out.summary["num_exact_alphas"], out.summary["recommendation"]["exact"]
    (2, [0.5, 1.0])
  """
  if not isinstance(result, Comparison) or result.call is None:
    raise TypeError(f"`result` must be the Comparison returned by bmerge.compare, got {type(result).__name__}.")
  if not callable(exact_fn):
    raise TypeError(f"`exact_fn` must be callable as exact_fn(alphas [k, T]) -> exact results, got "
                    f"{type(exact_fn).__name__}.")
  call = dict(result.call)
  grid = np.asarray(call["alphas"], np.float64)
  if alphas is None:
    rec = result.summary.get("recommendation") or {}
    chosen = np.asarray(rec.get("alphas", []), np.float64).reshape(-1, grid.shape[1])
    if top_k is not None:
      chosen = chosen[:_checks.integer(top_k, "top_k")]
  else:
    chosen = np.atleast_2d(np.asarray(alphas, np.float64))
    if chosen.ndim != 2 or chosen.shape[1] != grid.shape[1]:
      raise ValueError(f"`alphas` must be [k, {grid.shape[1]}] rows of the preview grid, got shape "
                       f"{np.shape(alphas)}.")
  missing = np.flatnonzero(report._rows_of(grid, chosen) < 0)  # pylint: disable=protected-access
  if missing.size:
    raise ValueError(f"`alphas` row {int(missing[0])} {chosen[missing[0]].tolist()} is not a row of the preview grid "
                     "of `result`; train at grid points (or compare again over a grid that holds them).")
  old_alphas = call.pop("exact_alphas")
  old = None if result.exact is None else np.asarray(result.exact)
  have = set() if old_alphas is None else {np.asarray(a, np.float64).tobytes() for a in old_alphas}
  new = np.asarray([a for a in chosen if a.tobytes() not in have]).reshape(-1, grid.shape[1])
  costs = dict(call["options"].costs or {})
  if len(new):
    with timing.stopwatch() as watch:
      got = np.asarray(jax.block_until_ready(exact_fn(new)))
    if got.shape[0] != len(new):
      raise ValueError(f"`exact_fn` returned {got.shape[0]} rows for {len(new)} alphas; expected one per alpha.")
    costs["exact at chosen alphas"] = timing.Cost("exact at chosen alphas", watch.wall - watch.compile_seconds,
                                                   watch.compile_seconds, len(new), 0, timing.RUN, timing.machine())
    exact = got if old is None else np.concatenate([old, got.reshape((len(got),) + old.shape[1:])])
    exact_alphas = new if old_alphas is None else np.concatenate([np.asarray(old_alphas, np.float64), new])
  else:
    exact, exact_alphas = old, old_alphas
  if folder is None and "report" in result.paths:
    folder = pathlib.Path(result.paths["report"]).parent
  call["folder"] = folder
  call["options"] = call["options"]._replace(costs=costs)
  return compare(exact=exact, exact_alphas=exact_alphas, previews=result.previews, **call)
