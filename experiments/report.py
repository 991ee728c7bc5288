"""Report helpers of the experiments: the library's `bmerge.report`, under the names the experiments call.

`table` is `bmerge.report.table`. `figures` and `write` keep the call signatures an experiment that does not yet go
through `bmerge.compare` uses (digits), translating its summary into the one `bmerge.report` reads; an experiment
calling `bmerge.compare` gets its figures and report from that call and needs neither.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from bmerge import report
from bmerge.report import table

__all__ = ["figures", "table", "write"]


def figures(workdir: str, alphas: np.ndarray, previews: dict, exact: np.ndarray, task_names) -> list[str]:
  """Contours (T = 3) or curves (T = 2), pair curves and histograms of the overall metric; PNG paths."""
  paths = report.figures(workdir, alphas, previews, exact=exact, task_names=list(task_names), label="test accuracy")
  return [str(p) for p in paths]


def write(workdir: str, *, title: str, summary: dict, paper: Optional[dict], paper_column: dict, describe: dict,
          figures: list[str]) -> str:  # pylint: disable=redefined-outer-name
  """Writes <workdir>/report.md for an experiment's summary, with the paper's rows (`paper`: mse / best / exact_best
  keyed by our method names, `paper_column`: our name -> the paper's column) next to ours."""
  s = dict(summary, title=f"Preview report: {title}", percent=True, metric="test accuracy",
           entries={m: {"description": describe.get(m, "")} for m in summary["methods"]})
  if paper:
    s["paper"] = {"source": "MNIST, Tables 1 and 2", "exact_best": paper.get("exact_best"),
                  "methods": {m: {"label": col, "mse": paper["mse"].get(m),
                                  "best_preview": paper["best"].get(m, (None, None))[0],
                                  "exact_at_best": paper["best"].get(m, (None, None))[1]}
                              for m, col in paper_column.items()}}
  s["costs"] = {(k[:-2] if k.endswith("_s") else k).replace("_", " "): v for k, v in summary.get("costs", {}).items()}
  rec = summary.get("recommendation")
  if rec and "joint_accuracy" in rec:
    s["recommendation"] = dict(rec, exact=rec["joint_accuracy"])
  return str(report.write(workdir, s, figures))
