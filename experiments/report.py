"""Figures, tables and report.md for a preview run (shared by the experiments)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from bmerge import plot


def figures(workdir: str, alphas: np.ndarray, previews: dict, exact: np.ndarray, task_names) -> list[str]:
  """Ternary contours (exact | each preview) for T = 3, two-task curves for T = 2, and histograms; PNG paths."""
  surfaces = {"exact": np.asarray(exact), **{k: np.asarray(v) for k, v in previews.items()}}
  out = []
  t = alphas.shape[1]
  if t == 3:
    out.append(str(plot.ternary_contours(alphas, surfaces, os.path.join(workdir, "contours.png"),
                                         task_names=list(task_names), label="test accuracy")))
  elif t == 2:
    out.append(str(plot.two_task_curves(alphas[:, 0], surfaces, os.path.join(workdir, "curves.png"),
                                        task_names=list(task_names), label="test accuracy")))
  out.append(str(plot.histograms(surfaces, os.path.join(workdir, "histograms.png"), label="test accuracy")))
  return out


def table(summary: dict) -> str:
  """The Table 1/2 rows of this run as text: MSE, best preview alpha, its preview and exact metric, Spearman."""
  # Accuracies print as percentages; other metrics (a loss, summarised with maximize=False) as they are.
  pct = "accuracy" in summary.get("metric", "accuracy")
  fmt = (lambda v: f"{100 * v:>7.1f}%") if pct else (lambda v: f"{v:>8.4g}")
  rows = [f"{'method':<14} {'MSE':>9} {'spearman':>9} {'best alpha (preview)':>24} {'preview':>8} {'exact':>8}"]
  for name, m in summary["methods"].items():
    alpha = "(" + ", ".join(f"{a:.2f}" for a in m["best_alpha"]) + ")"
    sp = m.get("spearman")
    rows.append(f"{name:<14} {m['mse']:>9.3g} {('%.3f' % sp) if sp is not None else 'n/a':>9} {alpha:>24} "
                f"{fmt(m['best_preview'])} {fmt(m['exact_at_best'])}")
  best_alpha = "(" + ", ".join(f"{a:.2f}" for a in summary["exact_best_alpha"]) + ")"
  rows.append(f"{'exact (joint)':<14} {'':>9} {'':>9} {best_alpha:>24} {'':>8} {fmt(summary['exact_best'])}")
  return "\n".join(rows)


def write(workdir: str, *, title: str, summary: dict, paper: Optional[dict], paper_column: dict, describe: dict,
          figures: list[str]) -> str:
  """Writes <workdir>/report.md: this run's Table 1/2 rows next to the paper's, costs, recommendation, figures."""
  lines = [f"# Preview report: {title}", "",
           f"{summary['num_alphas']} alphas on the simplex. Metric: test accuracy (all classes). "
           "MSE is between the preview and the exact (joint-training) accuracy over the grid, accuracies in [0, 1].",
           "", "| method | posterior -> merge | MSE | Spearman | best preview alpha | preview acc. | exact acc. there |",
           "|---|---|---|---|---|---|---|"]
  for name, m in summary["methods"].items():
    alpha = ", ".join(f"{a:.2f}" for a in m["best_alpha"])
    sp = m.get("spearman")
    lines.append(f"| {name} | {describe.get(name, '')} | {m['mse']:.4f} | {('%.3f' % sp) if sp is not None else 'n/a'}"
                 f" | ({alpha}) | {100 * m['best_preview']:.1f} | {100 * m['exact_at_best']:.1f} |")
  ea = ", ".join(f"{a:.2f}" for a in summary["exact_best_alpha"])
  lines += [f"| exact (joint training) | | | | ({ea}) | | {100 * summary['exact_best']:.1f} |", ""]
  if paper:
    lines += ["## Next to the paper (MNIST, Tables 1 and 2)", "",
              "| paper column | ours | our MSE | paper MSE | our best preview (exact there) | paper's |", "|---|---|---|---|---|---|"]
    for name, col in paper_column.items():
      if name in summary["methods"]:
        m = summary["methods"][name]
        pb = paper["best"][name]
        lines.append(f"| {col} | {name} | {m['mse']:.4f} | {paper['mse'][name]:.4f} | "
                     f"{100 * m['best_preview']:.1f} ({100 * m['exact_at_best']:.1f}) | {pb[0]} ({pb[1]}) |")
    lines += [f"| best multitask | exact | | | {100 * summary['exact_best']:.1f} | {paper['exact_best']} |", ""]
    order = [n for n in ("simple", "von", "mog") if n in summary["methods"]]
    if len(order) == 3:
      mses = [summary["methods"][n]["mse"] for n in order]
      holds = mses[0] > mses[1] > mses[2]
      lines += [f"Paper's ordering MSE Simple > Hessian > Mixture: **{'holds' if holds else 'does not hold'}** here "
                f"({' > '.join(f'{n} {v:.4f}' for n, v in zip(order, mses)) if holds else ', '.join(f'{n} {v:.4f}' for n, v in zip(order, mses))}).", ""]
  pareto = summary.get("pareto")
  if pareto:
    lines += ["## Per-task accuracies: Pareto fronts", "",
              "Each alpha gives one accuracy per task. Recall: the share of the exact Pareto-optimal alphas that the "
              "preview's own front also finds; IGD: mean distance (exact accuracies) from the exact front to the "
              "preview front's alphas (0 is perfect).", "",
              "| method | recall | IGD | preview front size | exact front size |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {v['recall']:.2f} | {v['igd']:.4f} | {v['preview_front_size']} | {v['exact_front_size']} |"
              for m, v in pareto.items()]
    lines.append("")
  costs = summary.get("costs", {})
  if costs:
    lines += ["## Cost of each stage (seconds, this machine)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k[:-2] if k.endswith('_s') else k} | {v:.2f} |" for k, v in costs.items()]
    previews = sum(v for k, v in costs.items() if k.startswith("preview_"))
    if "exact_per_alpha_s" in costs and previews:
      n = summary["num_alphas"]
      lines += ["", f"All previews together: {previews:.1f} s for {n} alphas x {len(summary['methods'])} methods; "
                f"joint training: {costs['exact_per_alpha_s']:.3f} s per alpha (batched) = {costs.get('exact_s', 0):.1f} s "
                "for the grid. Building the posteriors is paid once per task, whatever the grid.", ""]
  rec = summary.get("recommendation")
  if rec:
    lines += ["## Recommended weights", "", f"Top {len(rec['alphas'])} alphas of the `{rec['from']}` preview, ready "
              "for a real multitask run (`alphas` in a config):", "", "```python",
              f"alphas = {[[round(a, 4) for a in row] for row in rec['alphas']]}", "```", ""]
    if "regret" in rec:
      lines += [f"Joint training at those alphas reached {', '.join(f'{100 * a:.1f}' for a in rec['joint_accuracy'])}"
                f"; regret against the best exact alpha: {100 * rec['regret']:.2f} points.", ""]
  lines += ["## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures] + [""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
