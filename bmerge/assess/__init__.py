"""How good is a preview: metrics against the exact answer, figures, reports, and `compare` that does all three.

- `bmerge.assess.metrics`: MSE, Spearman, best alpha and regret, histograms, Pareto fronts, hypervolume, IGD+;
  per-task accuracy from per-example results, bootstrap and t intervals.
- `bmerge.assess.plot`: ternary contours, two-task curves, histograms, Pareto fronts (matplotlib).
- `bmerge.assess.report`: a report folder (markdown table, figures, metrics.json).
- `bmerge.assess.comparison`: `compare(entries, eval_fn, batch, alphas, ...)` -> `Comparison`, one call for all of it,
  its settings in `CompareOptions`.
- `bmerge.assess.pareto`: `estimate(alphas, preview, exact_fn, budget)`: the Pareto front from a preview and a few
  real runs chosen where they matter.

Example:
  The headline number of the paper's Table 1: the mean squared error between a preview and the exact metric over
  the grid, (1/G) sum_g (preview_g - exact_g)^2.

  >>> from bmerge import assess
  >>> assess.metrics.mse([0.8, 0.9, 0.7], [0.9, 0.9, 0.9])                 # (0.01 + 0 + 0.04) / 3
  0.01666...
"""

from bmerge.assess import comparison
from bmerge.assess import metrics
from bmerge.assess import pareto
from bmerge.assess import plot
from bmerge.assess import report
from bmerge.assess.comparison import CompareOptions
from bmerge.assess.comparison import Comparison
from bmerge.assess.comparison import Entry
from bmerge.assess.comparison import compare
from bmerge.assess.comparison import train_at
from bmerge.assess.pareto import ParetoEstimate

__all__ = ["CompareOptions", "Comparison", "Entry", "ParetoEstimate", "compare", "comparison", "metrics", "pareto", "plot",
           "report", "train_at"]
