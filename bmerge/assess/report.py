"""The files of a comparison: figures, `report.md` and a text table, from the summary `bmerge.compare` writes.

Everything here formats results that already exist: `figures` draws the PNGs from the metric arrays, `markdown` /
`write` turn the `metrics.json` summary into the report, `table` prints it for a terminal. The summary's keys are
documented in `bmerge.compare`; every key but "methods" is optional, so a summary of previews without exact results
(or one written by an older experiment) still reads.

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Tables 1-2: MSE and best alphas; Figs. 3-9: contours, curves, histograms).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from bmerge import _checks
from bmerge.assess import plot

__all__ = ["figures", "markdown", "table", "write"]


# ----------------------------------------------------------------------------------------------------------------
# Figures.


def figures(folder, alphas, previews: Mapping[str, Any], *, exact=None, exact_alphas=None,
            per_task_previews: Optional[Mapping[str, Any]] = None, per_task_exact=None,
            task_names: Optional[Sequence[str]] = None, maximize: bool = True, label: str = "accuracy",
            task_label: Optional[str] = None, directions=None) -> list[pathlib.Path]:
  """Every figure that fits the grid, as PNGs in `folder`; returns their paths.

  * `contours.png`: ternary contours of the exact surface and each preview (T = 3, grid on the simplex);
  * `curves.png`: the two-task curves (T = 2, on the simplex);
  * `pairs.png`: two-task curves along every edge of the simplex (T >= 3), from the per-task metrics when given (the
    pair's metric is the mean of its two tasks' metrics), else from the overall metric;
  * `scaling.png`: metric against lambda for each direction of a grid off the simplex (task arithmetic's sweep);
  * `histograms.png`: how many alphas reach each metric level, exact and every preview;
  * `pareto.png`: the exact per-task metrics, the exact Pareto front and the alphas on each preview's front (needs
    per-task metrics of the previews and the exact results).

  Args:
    folder: where the PNGs go (created if missing).
    alphas: [G, T] the preview grid.
    previews: name -> [G] overall metric of each preview.
    exact: optional [G'] overall metric of joint training at `exact_alphas` (default `alphas`).
    exact_alphas: [G', T] rows of `alphas` (e.g. a coarser lattice).
    per_task_previews: optional name -> [G, T] per-task metrics of each preview.
    per_task_exact: optional [G', T] per-task metrics of joint training.
    task_names: the T task names.
    maximize: whether larger metrics are better.
    label: the metric's name on the axes.
    task_label: the per-task metric's name (default `label`).
    directions: optional [D, T] directions of a scaled grid (see `bmerge.grid.scaled`).

  Returns:
    The paths of the PNGs written.

  Example:
    >>> import numpy as np
    >>> from bmerge import grid, report
    >>> a = grid.simplex(3, 0.25)
    >>> [p.name for p in report.figures("report_doc", a, {"simple": a[:, 0]}, exact=a[:, 0] + 0.1)]
    ['contours.png', 'pairs.png', 'histograms.png']
  """
  folder = pathlib.Path(_checks.workdir(folder, "folder"))
  alphas = _checks.matrix(alphas, "alphas")
  t = alphas.shape[1]
  names = [f"task {i + 1}" for i in range(t)] if task_names is None else list(task_names)
  exact_alphas = alphas if exact_alphas is None else _checks.matrix(exact_alphas, "exact_alphas")
  surfaces = dict(previews)
  if exact is not None:
    surfaces = {"exact": (exact_alphas, exact), **surfaces}
  sums = alphas.sum(axis=1)
  on_simplex = bool(np.all(alphas >= 0) and np.all(np.abs(sums - 1.0) <= 1e-6))
  common = dict(maximize=maximize, label=label)
  out = []
  if on_simplex and t == 3:
    # Contours need a triangulation: exact results at fewer than three points off one line (e.g. a few runs at the
    # recommended alphas) are left out of this figure.
    spread = np.linalg.matrix_rank(exact_alphas[:, :2] - exact_alphas[:1, :2], tol=1e-9) if exact is not None else 2
    contour_surfaces = surfaces if spread == 2 else {k: v for k, v in surfaces.items() if k != "exact"}
    out.append(plot.ternary_contours(alphas, contour_surfaces, folder / "contours.png", task_names=names, **common))
  if on_simplex and t == 2:
    curves = {k: (v[0][:, 0], v[1]) if isinstance(v, tuple) else v for k, v in surfaces.items()}
    out.append(plot.two_task_curves(alphas[:, 0], curves, folder / "curves.png", task_names=names, **common))
  if on_simplex and t >= 3:
    if per_task_previews is not None and (exact is None or per_task_exact is not None):
      pair_surfaces = dict(per_task_previews)
      if exact is not None:
        pair_surfaces = {"exact": (exact_alphas, per_task_exact), **pair_surfaces}
      pair_label = f"{task_label or label} (mean over the pair)"
    else:
      pair_surfaces, pair_label = surfaces, label
    out.append(plot.pair_curves(alphas, pair_surfaces, folder / "pairs.png", task_names=names, maximize=maximize,
                                label=pair_label))
  if not on_simplex:
    out.append(plot.scaling_curves(alphas, surfaces, folder / "scaling.png", directions=directions, **common))
  values = {k: (v[1] if isinstance(v, tuple) else v) for k, v in surfaces.items()}
  out.append(plot.histograms(values, folder / "histograms.png", label=label))
  if per_task_previews is not None and per_task_exact is not None and t >= 2:
    rows = _rows_of(alphas, exact_alphas)
    chosen = {k: np.asarray(v)[rows] for k, v in per_task_previews.items()}
    out.append(plot.pareto_fronts(per_task_exact, chosen, folder / "pareto.png", task_names=names, maximize=maximize,
                                  label=task_label or label))
  return out


def _rows_of(alphas: np.ndarray, subset: np.ndarray) -> np.ndarray:
  """Index in `alphas` of every row of `subset` (matched to 1e-8); -1 where a row is missing."""
  def key(row):
    return tuple(np.rint(np.asarray(row) * 1e8).astype(np.int64).tolist())
  where = {}
  for i, row in enumerate(alphas):
    where.setdefault(key(row), i)
  return np.asarray([where.get(key(row), -1) for row in subset], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# report.md and the terminal table.


def _formatter(summary: Mapping[str, Any]):
  """Values as percentages (accuracies) or with 4 significant digits (other metrics); None as n/a."""
  pct = summary.get("percent", "accuracy" in str(summary.get("metric", "accuracy")))

  def fmt(v):
    if v is None:
      return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.4g}"
  return fmt


def _alpha(a) -> str:
  return "(" + ", ".join(f"{x:.2f}" for x in a) + ")"


def _spearman(v) -> str:
  return "n/a" if v is None else f"{v:.3f}"


def _mse(m: Mapping[str, Any]) -> str:
  """A method's MSE, with its interval "[lo, hi]" where the summary has one."""
  if m.get("mse") is None:
    return "n/a"
  ci = m.get("mse_ci")
  return f"{m['mse']:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def table(summary: Mapping[str, Any]) -> str:
  """The Table 1/2 rows of a summary as text: MSE, Spearman, best preview alpha, its preview and exact metric.

  Example:
    >>> from bmerge import report
    >>> summary = {"metric": "accuracy", "exact_best": 0.9, "exact_best_alpha": [0.0, 1.0],
    ...            "methods": {"simple": {"mse": 0.01, "spearman": 0.5, "best_alpha": [0.5, 0.5],
    ...                                   "best_preview": 0.8, "exact_at_best": 0.85}}}
    >>> print(report.table(summary))
    method               MSE  spearman     best alpha (preview)  preview    exact
    simple              0.01     0.500             (0.50, 0.50)     80.0     85.0
    exact (joint)                                  (0.00, 1.00)              90.0
  """
  fmt = _formatter(summary)
  mses = {name: _mse(m) for name, m in summary["methods"].items()}
  w = max([9] + [len(v) for v in mses.values()])
  rows = [f"{'method':<14} {'MSE':>{w}} {'spearman':>9} {'best alpha (preview)':>24} {'preview':>8} {'exact':>8}"]
  for name, m in summary["methods"].items():
    rows.append(f"{name:<14} {mses[name]:>{w}} {_spearman(m.get('spearman')):>9} {_alpha(m['best_alpha']):>24} "
                f"{fmt(m.get('best_preview')):>8} {fmt(m.get('exact_at_best')):>8}")
  if summary.get("exact_best") is not None:
    rows.append(f"{'exact (joint)':<14} {'':>{w}} {'':>9} {_alpha(summary['exact_best_alpha']):>24} {'':>8} "
                f"{fmt(summary['exact_best']):>8}")
  return "\n".join(rows)


def _grid_sentence(summary: Mapping[str, Any]) -> str:
  g, ge = summary.get("num_alphas"), summary.get("num_exact_alphas")
  where = "on the simplex" if summary.get("on_simplex", True) else (
      "off the simplex (task arithmetic's scaling sweep alpha = lambda d; see scaling.png)")
  text = f"{g} alphas {where}" if g is not None else "The grid"
  if ge:
    text += f"; exact (joint-training) results at {ge} of them" + (" (a coarser grid)" if ge < g else "")
  better = "higher" if summary.get("maximize", True) else "lower"
  text += f". Metric: {summary.get('metric', 'accuracy')} ({better} is better)"
  if summary.get("overall") == "weighted":
    text += ", the overall metric at alpha being sum_t alpha_t m_t (the weighted multitask objective of Eq. 1)"
  text += "."
  if ge:
    text += (f" MSE, Spearman's rank correlation and regret@k (what is lost by jointly training only the preview's top "
             f"k alphas) are over the {ge} alphas with exact results.")
  if summary.get("overall") == "weighted":
    best = "maximises" if summary.get("maximize", True) else "minimises"
    text += (f" \"Best alpha\", of the preview and of joint training alike, {best} the weighted objective "
             "sum_t alpha_t m_t(alpha) over the grid: each alpha is scored with its own weights, the preview's with "
             "its predicted per-task metrics and joint training's with the measured ones. Both bests answer the same "
             "question, but the objective changes with alpha (at a corner it is one task's metric alone), so a best "
             "alpha favours the weighting whose tasks are easiest; the per-task metrics and Pareto fronts compare "
             "trade-offs without that.")
  interval = summary.get("interval")
  if interval:
    text += (f" Intervals in [brackets] are {100 * interval.get('level', 0.95):g} % intervals from a "
             f"{interval.get('kind', 'bootstrap')} ({interval.get('samples')} resamples, paired: the same resample for "
             f"every method and the exact results; {interval.get('seeds', 1)} training seed, so they cover the test "
             "set's sampling only).")
  return text


def _main_table(summary, fmt) -> list[str]:
  methods = summary["methods"]
  has_exact = summary.get("exact_best") is not None
  entries = summary.get("entries", {})
  if has_exact:
    lines = ["| method | posterior -> merge | MSE | Spearman | best preview alpha | preview | exact there | regret@1 |",
             "|---|---|---|---|---|---|---|---|"]
  else:
    lines = ["| method | posterior -> merge | best preview alpha | preview |", "|---|---|---|---|"]
  for name, m in methods.items():
    desc = entries.get(name, {}).get("description", "")
    if has_exact:
      r1 = m.get("regret_at_1")
      lines.append(f"| {name} | {desc} | {_mse(m)} | {_spearman(m.get('spearman'))} | {_alpha(m['best_alpha'])} "
                   f"| {fmt(m['best_preview'])} | {fmt(m['exact_at_best'])} | {fmt(r1) if r1 is not None else ''} |")
    else:
      lines.append(f"| {name} | {desc} | {_alpha(m['best_alpha'])} | {fmt(m['best_preview'])} |")
  if has_exact:
    lines.append(f"| exact (joint training) | | | | {_alpha(summary['exact_best_alpha'])} | | "
                 f"{fmt(summary['exact_best'])} | |")
  lines.append("")
  grid_rows = [(n, e) for n, e in entries.items() if "grid_best_alpha" in e]
  if has_exact and grid_rows:
    lines += [f"On the whole preview grid ({summary.get('num_alphas')} alphas), where joint training was not run at "
              "every alpha:", "", "| method | best preview alpha | preview | exact there |", "|---|---|---|---|"]
    lines += [f"| {n} | {_alpha(e['grid_best_alpha'])} | {fmt(e['grid_best_preview'])} | "
              f"{fmt(e.get('grid_exact_at_best')) if e.get('grid_exact_at_best') is not None else 'not computed'} |"
              for n, e in grid_rows]
    lines.append("")
  return lines


def _paper_section(summary, fmt) -> list[str]:
  paper = summary.get("paper")
  if not paper:
    return []
  methods = summary["methods"]
  lines = [f"## Next to the paper ({paper.get('source', 'its reported numbers')})", "",
           "| ours | paper's column | our MSE | paper MSE | our best preview (exact there) | paper's |",
           "|---|---|---|---|---|---|"]
  for name, p in paper.get("methods", {}).items():
    if name not in methods:
      continue
    m = methods[name]
    ours_mse = _mse(m)
    paper_mse = f"{p['mse']:.4g}" if p.get("mse") is not None else (
        f"rank {p['mse_rank']}" if p.get("mse_rank") is not None else "")
    paper_best = (f"{p['best_preview']} ({p['exact_at_best']})" if p.get("best_preview") is not None else "")
    lines.append(f"| {name} | {p.get('label', name)} | {ours_mse} | {paper_mse} | "
                 f"{fmt(m['best_preview'])} ({fmt(m.get('exact_at_best'))}) | {paper_best} |")
  if paper.get("exact_best") is not None and summary.get("exact_best") is not None:
    lines.append(f"| exact | best multitask | | | {fmt(summary['exact_best'])} | {paper['exact_best']} |")
  lines.append("")
  order = summary.get("paper_ordering")
  if order:
    ours_text = ", ".join(f"{n} {_mse(methods[n])}" for n in order["ours"])
    verdict = order.get("verdict", "holds" if order["holds"] else "does not hold")
    why = ("" if "verdict" not in order else ": the interval of every pair's difference excludes 0" if
           verdict == "holds" else ": the interval of some pair's difference contains 0" if verdict == "not resolved"
           else ": the interval of some pair's difference lies on the other side of 0")
    lines += [f"The paper's ordering of the MSEs ({' > '.join(order['paper'])}) **{verdict}** here ({ours_text}){why}.",
              ""]
  return lines


def _differences_section(summary) -> list[str]:
  """Each pair of methods once, the larger MSE first, with the interval of the difference and whether it is resolved."""
  differences = summary.get("differences")
  if not differences:
    return []
  level = summary.get("interval", {}).get("level", 0.95)
  lines = ["## Which preview is closer", "",
           f"MSE of one method minus another's, with its {100 * level:g} % interval over the same resamples of the "
           "test examples. An ordering holds only when the interval excludes 0.", "",
           "| ordering | MSE difference | interval | |", "|---|---|---|---|"]
  names = list(summary["methods"])
  for i, first in enumerate(names):
    for second in names[i + 1:]:
      if f"{first}-{second}" not in differences:
        continue
      a, b = (second, first) if differences[f"{first}-{second}"]["mse"] < 0 else (first, second)  # larger first
      d = differences[f"{a}-{b}"]
      ci = d.get("ci")
      holds = ci is not None and (ci[0] > 0 or ci[1] < 0)
      interval = f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "n/a"
      lines.append(f"| {a} > {b} | {d['mse']:.3g} | {interval} | {'holds' if holds else 'not resolved'} |")
  return lines + [""]


def _pareto_section(summary) -> list[str]:
  pareto = summary.get("pareto")
  if not pareto:
    return []
  names = summary.get("task_names")
  tasks = f" ({', '.join(names)})" if names else ""
  lines = ["## Per-task metrics: Pareto fronts", "",
           f"Each alpha gives one metric per task{tasks}. The exact front is the set of alphas whose joint-training "
           "metrics no other alpha beats in every task; a preview's front is the same for its own predictions. "
           "Judged on the exact metrics: recall is the share of the exact front's alphas that some alpha of the "
           "preview's front reaches to within epsilon in every task (epsilon: 1 % of the exact front's range per "
           "task); IGD the mean distance from the exact front to the nearest alpha of "
           "the preview's front; IGD+ the same counting only shortfalls (Pareto compliant; 0 is perfect); HV the "
           "hypervolume of the exact metrics at the preview front's alphas, as a share of the exact front's "
           "(reference: the exact front's nadir, 10 % of its range further out). In (parentheses): the mean of a "
           "uniformly random subset of as many alphas, what a preview that knows nothing gets.", "",
           "| method | recall (random) | IGD | IGD+ (random) | HV share (random) | preview front size | "
           "exact front size |", "|---|---|---|---|---|---|---|"]
  for m, v in pareto.items():
    hv, total = v.get("hypervolume_preview"), v.get("hypervolume_exact")
    share = f"{hv / total:.3f}" if hv is not None and total else "n/a"
    igd_plus = f"{v['igd_plus']:.4f}" if v.get("igd_plus") is not None else "n/a"
    recall = f"{v['recall']:.2f}"
    if v.get("recall_random") is not None:
      recall += f" ({v['recall_random']:.2f})"
    if v.get("igd_plus_random") is not None and v.get("igd_plus") is not None:
      igd_plus += f" ({v['igd_plus_random']:.4f})"
    if v.get("hypervolume_random") is not None and total:
      share += f" ({v['hypervolume_random'] / total:.3f})"
    lines.append(f"| {m} | {recall} | {v['igd']:.4f} | {igd_plus} | {share} | {v['preview_front_size']} | "
                 f"{v['exact_front_size']} |")
  return lines + [""]


def _cost_section(summary) -> list[str]:
  costs = summary.get("costs") or {}
  if not costs:
    return []
  costs = {k: v if isinstance(v, Mapping) else {"seconds": v} for k, v in costs.items()}
  runs = {v.get("run") for v in costs.values()}
  lines = ["## Cost of each stage", "",
           "Run time without compilation, measured once when the stage was computed and stored with its results: a "
           "resumed run reports the stored seconds (loaded: yes). Ratios compare only stages measured in the same "
           "run.", "", "| stage | seconds | compile seconds | loaded | run |", "|---|---|---|---|---|"]
  for k, v in costs.items():
    compile_s = "n/a" if v.get("compile_seconds") is None else f"{v['compile_seconds']:.2f}"
    lines.append(f"| {k} | {v['seconds']:.2f} | {compile_s} | {'yes' if v.get('loaded') else 'no'} | "
                 f"{v.get('run') or 'n/a'} |")
  lines.append("")
  machines = {}  # one line per run: its machine, and the date of its first stage
  for v in costs.values():
    m = v.get("machine")
    if isinstance(m, Mapping) and (m.get("run") not in machines or str(m.get("date")) < str(
        machines[m.get("run")].get("date"))):
      machines[m.get("run")] = m
  for m in machines.values():
    lines.append(f"Run {m.get('run')}: {m.get('cpu')}, {m.get('cores')} cores, {m.get('backend')} x"
                 f"{m.get('device_count')} ({m.get('device_kind')}), from {m.get('date')}.")
  if machines:
    lines.append("")
  g, ge = summary.get("num_alphas"), summary.get("num_exact_alphas")
  exact = costs.get("exact")
  previews = {n: costs[f"preview {n}"] for n in summary["methods"] if f"preview {n}" in costs}
  if exact and ge and previews and g:
    per_exact = exact["seconds"] / ge
    lines += [f"Joint training: {per_exact:.3g} s per alpha ({exact['seconds']:.1f} s for {ge} alphas)."]
    for n, c in previews.items():
      built = costs.get(f"posteriors {n}")
      total = (f"; with its posteriors ({built['seconds']:.1f} s) {built['seconds'] + c['seconds']:.1f} s in all"
               if built is not None else "")
      if c.get("run") != exact.get("run") or c.get("run") in (None, "mixed"):
        speed = ", not compared with joint training (measured in another run)"
      else:
        ratio = per_exact / (c["seconds"] / g) if c["seconds"] > 0 else float("inf")
        speed = f", {ratio:.3g}x faster per alpha" if ratio >= 1 else f", {1 / ratio:.3g}x slower per alpha"
      lines.append(f"- {n}: {c['seconds'] / g:.3g} s per alpha ({c['seconds']:.1f} s for {g} alphas{speed}){total}.")
    lines.append("")
  if len(runs) > 1:
    lines += [f"Stages come from {len(runs)} runs: figures of different runs are not compared.", ""]
  return lines


def _recommendation_section(summary, fmt) -> list[str]:
  rec = summary.get("recommendation")
  if not rec:
    return []
  lines = ["## Recommended weights", "", f"Top {len(rec['alphas'])} alphas of the `{rec['from']}` preview, ready for a "
           "real multitask run (`alphas` in a config):", "", "```python",
           f"alphas = {[[round(a, 4) for a in row] for row in rec['alphas']]}", "```", ""]
  exact = rec.get("exact")
  if exact and any(e is not None for e in exact):
    lines += ["Joint training there: " + ", ".join(fmt(e) for e in exact) + "."]
    if rec.get("regret") is not None:
      lines[-1] += f" Regret against the best exact alpha: {fmt(rec['regret'])}."
    lines.append("")
  return lines


def markdown(summary: Mapping[str, Any], figure_paths: Sequence[Any] = ()) -> str:
  """`report.md` of a comparison: the table, the paper's numbers, Pareto fronts, costs, recommendation, figures.

  Args:
    summary: the `metrics.json` dict of `bmerge.compare` (only "methods" is required).
    figure_paths: PNGs to show, referenced by file name (they sit next to the report).

  Returns:
    The markdown text.

  Example:
    >>> from bmerge import report
    >>> text = report.markdown({"title": "toy", "methods": {"simple": {"best_alpha": [1.0, 0.0],
    ...                                                                 "best_preview": 0.8}}})
    >>> text.splitlines()[0]
    '# toy'
  """
  fmt = _formatter(summary)
  lines = [f"# {summary.get('title', 'Preview comparison')}", "", _grid_sentence(summary), ""]
  lines += _main_table(summary, fmt)
  lines += _differences_section(summary)
  lines += _paper_section(summary, fmt)
  lines += _pareto_section(summary)
  lines += _cost_section(summary)
  lines += _recommendation_section(summary, fmt)
  if summary.get("notes"):
    lines += ["## Notes", "", str(summary["notes"]), ""]
  if figure_paths:
    lines += ["## Figures", ""] + [f"![{os.path.basename(os.fspath(f))}]({os.path.basename(os.fspath(f))})"
                                   for f in figure_paths] + [""]
  return "\n".join(lines)


def write(folder, summary: Mapping[str, Any], figure_paths: Sequence[Any] = ()) -> pathlib.Path:
  """Writes `<folder>/report.md` (see `markdown`); returns its path."""
  folder = pathlib.Path(_checks.workdir(folder, "folder"))
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "report.md"
  path.write_text(markdown(summary, figure_paths))
  return path

