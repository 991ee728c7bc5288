r"""Prints the results table of the recorded runs as markdown, from their `metrics.json` files only.

  python -m experiments.summary                                   # every folder of experiments/results/
  python -m experiments.summary --experiments=digits_imbalanced,sentiment

One row per method of every chosen run: the preview's mean squared error against exact (weighted joint training)
results over the alphas where both exist,

.. math::

  \mathrm{MSE} = \frac{1}{G'} \sum_{g=1}^{G'} (\hat m(\alpha_g) - m(\alpha_g))^2,

with its interval and the number of seeds behind it where the run recorded them (`methods.<name>.mse_ci` = [lo, hi]
and `interval` = {kind, seeds, samples, level} in `metrics.json`, written by `bmerge.compare` given per-example
results); a run recorded without them prints "n/a (not re-recorded)" and its one seed, never an interval of its own
making. The README's results table is this script's output for the
experiments its marker names, and a test checks that the two are equal.

Example:
  >>> summary = {"title": "toy", "entries": {"simple": {"description": "means -> simple averaging"}},
  ...            "methods": {"simple": {"mse": 0.012345}}}
  >>> print(rows("toy", summary)[0])
  | [toy](experiments/results/toy/report.md) | simple: means -> simple averaging | 0.0123 | n/a (not re-recorded) | 1 |
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Optional, Sequence

from absl import app, flags

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LINK_ROOT = "experiments/results"  # links are written relative to the repository root, where the README is
HEADER = ("| experiment (report) | method: posterior -> merge | MSE vs exact | 95 % interval | seeds |\n"
          "|---|---|---|---|---|")
NOT_RECORDED = "n/a (not re-recorded)"

__all__ = ["HEADER", "NOT_RECORDED", "RESULTS", "available", "load", "rows", "table"]


def available(results: pathlib.Path = RESULTS) -> list[str]:
  """The names of the result folders whose `metrics.json` scores previews (has "methods"), sorted.

  Other records (the Pareto benchmark's, which compares front estimators) have reports of their own.
  """
  return sorted(p.parent.name for p in pathlib.Path(results).glob("*/metrics.json")
                if "methods" in json.loads(p.read_text()))


def load(name: str, results: pathlib.Path = RESULTS) -> dict:
  """The summary (`metrics.json`) of one recorded run.

  Args:
    name: a folder of `results`, e.g. "digits_imbalanced".
    results: the folder holding the runs.

  Returns:
    The parsed `metrics.json`.
  """
  path = pathlib.Path(results) / name / "metrics.json"
  if not path.is_file():
    raise ValueError(f"`experiments` names {name!r}, which has no {path}; recorded runs: {available(results)}.")
  return json.loads(path.read_text())


def _interval(method: Mapping, interval: Optional[Mapping]) -> tuple[str, str]:
  """The interval and seeds cells of one method: recorded values only."""
  if interval is None:
    return NOT_RECORDED, "1"
  seeds = str(interval.get("seeds", 1))
  ci = method.get("mse_ci")
  if ci is None:  # recorded, but undefined for this method (e.g. no exact results to resample)
    return "n/a (none recorded)", seeds
  lo, hi = ci
  details = [interval[k] for k in ("kind",) if interval.get(k)]
  if interval.get("samples"):
    details.append(f"{interval['samples']} resamples")
  level = interval.get("level", 0.95)
  if abs(level - 0.95) > 1e-9:
    details.append(f"{100 * level:g} %")
  return f"[{lo:.3g}, {hi:.3g}]" + (f" ({', '.join(details)})" if details else ""), seeds


def rows(name: str, summary: Mapping) -> list[str]:
  """The table rows of one run: one per method, the run's name (a link to its report) on the first.

  Args:
    name: the run's folder name.
    summary: its `metrics.json`.

  Returns:
    Markdown table rows.
  """
  methods = summary.get("methods") or {}
  if not methods:
    raise ValueError(f"experiments/results/{name}/metrics.json has no scored methods.")
  entries = summary.get("entries") or {}
  out = []
  for i, (method, scores) in enumerate(methods.items()):
    if scores.get("mse") is None:
      raise ValueError(f"experiments/results/{name}/metrics.json: method {method!r} has no MSE (no exact results).")
    run = f"[{name}]({LINK_ROOT}/{name}/report.md)" if i == 0 else ""
    description = (entries.get(method) or {}).get("description")
    label = f"{method}: {description}" if description else method
    interval, seeds = _interval(scores, summary.get("interval"))
    out.append(f"| {run} | {label} | {scores['mse']:.3g} | {interval} | {seeds} |")
  return out


def table(names: Optional[Sequence[str]] = None, results: pathlib.Path = RESULTS) -> str:
  """The markdown table of the chosen runs (default: every recorded run), in the order given.

  Args:
    names: folder names under `results`; None takes them all, sorted.
    results: the folder holding the runs.

  Returns:
    The table, header included, without a trailing newline.
  """
  names = available(results) if names is None else list(names)
  if not names:
    raise ValueError(f"no recorded runs chosen (`experiments` is empty; {results} holds {available(results)}).")
  lines = [HEADER]
  for name in names:
    lines += rows(name, load(name, results))
  return "\n".join(lines)


def define_flags() -> None:
  """Defined when run as a script only, so the module imports (tests) without flag clashes."""
  flags.DEFINE_list("experiments", [], "result folders to print, in this order (default: all, sorted)")


def main(argv: Sequence[str]) -> None:
  """Prints the table of the runs named by --experiments (default: every recorded run)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  print(table(flags.FLAGS.experiments or None))


if __name__ == "__main__":
  define_flags()
  app.run(main)
