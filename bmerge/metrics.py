"""How good is a preview? Scores of a preview surface against the exact (joint-training) surface over one alpha grid.

A *surface* is one metric per grid point: `preview[g]` is the metric of the model merged with weights `alphas[g]`,
`exact[g]` that of the model jointly trained with the same weights (paper Sec. 4). Everything here is numpy/scipy on
concrete arrays, pure, and returns plain Python numbers or numpy arrays; `summarize` returns the `metrics.json` dict.

With `maximize=True` (accuracy, BLEU) larger is better; with `maximize=False` (a loss) smaller is better. Ties are
always broken by the first grid index, so every result is deterministic.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np
import scipy.stats

__all__ = [
    "Best",
    "FrontComparison",
    "Histogram",
    "best",
    "compare_fronts",
    "histogram",
    "hypervolume_2d",
    "mse",
    "pareto_front",
    "regret_at_k",
    "spearman",
    "summarize",
]


# ----------------------------------------------------------------------------------------------------------------
# Validation at the boundary: every error names the argument.


def _numeric(value, name: str) -> np.ndarray:
  """`value` as a float64 array; a TypeError naming `name` if it is not numeric."""
  arr = np.asarray(value)
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise TypeError(f"`{name}` must be a numeric array, got dtype {arr.dtype}.")
  return arr.astype(np.float64)


def _vector(value, name: str, *, size: Optional[int] = None, size_of: str = "") -> np.ndarray:
  arr = _numeric(value, name)
  if arr.ndim != 1:
    raise ValueError(f"`{name}` must have shape [G] (one metric per grid point), got shape {arr.shape}.")
  if arr.shape[0] == 0:
    raise ValueError(f"`{name}` is empty; expected at least one grid point.")
  if size is not None and arr.shape[0] != size:
    raise ValueError(f"`{name}` has {arr.shape[0]} entries but {size_of} has G = {size}; expected shape [{size}].")
  if not np.all(np.isfinite(arr)):
    bad = int(np.flatnonzero(~np.isfinite(arr))[0])
    raise ValueError(f"`{name}` must be finite; entry {bad} is {arr[bad]}.")
  return arr


def _matrix(value, name: str, *, rows: Optional[int] = None, rows_of: str = "", what: str = "[G, T]") -> np.ndarray:
  arr = _numeric(value, name)
  if arr.ndim != 2:
    raise ValueError(f"`{name}` must have shape {what}, got shape {arr.shape}.")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"`{name}` must have shape {what} with G, and the second axis, positive; got shape {arr.shape}.")
  if rows is not None and arr.shape[0] != rows:
    raise ValueError(f"`{name}` has {arr.shape[0]} rows but {rows_of} has G = {rows}; expected {rows} rows.")
  if not np.all(np.isfinite(arr)):
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
    raise ValueError(f"`{name}` must be finite; entry {bad} is {arr[bad]}.")
  return arr


def _pair(preview, exact) -> tuple[np.ndarray, np.ndarray]:
  exact = _vector(exact, "exact")
  preview = _vector(preview, "preview", size=exact.shape[0], size_of="`exact`")
  return preview, exact


def _sign(maximize: bool) -> float:
  if not isinstance(maximize, (bool, np.bool_)):
    raise TypeError(f"`maximize` must be a bool, got {maximize!r}.")
  return 1.0 if maximize else -1.0


def _first_best(values: np.ndarray, maximize: bool) -> int:
  # np.argmax / np.argmin return the first index among ties.
  return int(np.argmax(values) if maximize else np.argmin(values))


# ----------------------------------------------------------------------------------------------------------------
# Scores of one preview surface.


def mse(preview, exact) -> float:
  r"""Mean squared error between the preview and the exact surface (paper Table 1).

  .. math:: \mathrm{MSE} = \frac{1}{G} \sum_{g=1}^{G} (\hat m(\alpha_g) - m(\alpha_g))^2

  Args:
    preview: [G] metric of the merged model at each alpha.
    exact: [G] metric of the jointly trained model at the same alphas.

  Returns:
    The MSE as a Python float, in the squared units of the metric (Table 1 uses accuracy in [0, 1]).
  """
  preview, exact = _pair(preview, exact)
  return float(np.mean((preview - exact) ** 2))


class Best(NamedTuple):
  """The alpha a preview recommends and what it is really worth (paper Tables 2-3)."""

  index: int  # grid index g* = argbest_g preview[g] (first among ties)
  alpha: np.ndarray  # [T] alphas[g*]
  preview: float  # preview[g*]: what the preview promises
  exact_at_best: float  # exact[g*]: what joint training at the recommended alpha really gives
  exact_index: int  # argbest_g exact[g] (first among ties)
  exact_alpha: np.ndarray  # [T] alphas[exact_index]
  exact_best: float  # exact[exact_index]: the best any alpha of the grid gives


def best(alphas, preview, exact, maximize: bool = True) -> Best:
  r"""The preview's best alpha, its preview and exact metric, and the best exact metric over the grid.

  .. math:: g^\star = \arg\max_g \hat m(\alpha_g)

  and reports :math:`\hat m(\alpha_{g^\star})`, :math:`m(\alpha_{g^\star})` and :math:`\max_g m(\alpha_g)`
  (`argmin`/`min` when `maximize=False`). Ties are broken by the first grid index. Table 2 of the paper reads
  "76.8 (true 90.0), best 90.4" as `preview`, `exact_at_best`, `exact_best`.

  Args:
    alphas: [G, T] task weights of the grid.
    preview: [G] preview metric.
    exact: [G] exact metric.
    maximize: whether larger metrics are better (accuracy) or smaller (loss).

  Returns:
    A `Best`.
  """
  _sign(maximize)  # validates the flag
  preview, exact = _pair(preview, exact)
  alphas = _matrix(alphas, "alphas", rows=exact.shape[0], rows_of="`exact`")
  g = _first_best(preview, maximize)
  e = _first_best(exact, maximize)
  return Best(index=g, alpha=alphas[g].copy(), preview=float(preview[g]), exact_at_best=float(exact[g]),
              exact_index=e, exact_alpha=alphas[e].copy(), exact_best=float(exact[e]))


def spearman(preview, exact) -> float:
  r"""Spearman's rank correlation between the preview and the exact surface (`scipy.stats.spearmanr`).

  .. math:: \rho = \mathrm{corr}(\mathrm{rank}(\hat m), \mathrm{rank}(m)) \in [-1, 1]

  with average ranks for ties. A rank correlation asks only whether the preview *orders* the alphas like joint training
  does, which is what choosing a weight needs.

  Returns:
    rho as a Python float. If either surface is constant (or G < 2) the correlation is undefined and the result is
    `nan`, without scipy's warning; `summarize` writes it as `null`.
  """
  preview, exact = _pair(preview, exact)
  if preview.shape[0] < 2 or np.all(preview == preview[0]) or np.all(exact == exact[0]):
    return float("nan")
  return float(scipy.stats.spearmanr(preview, exact).statistic)


def regret_at_k(preview, exact, k: int, maximize: bool = True) -> float:
  r"""How much is lost by jointly training only the top-k alphas of the preview instead of the whole grid.

  .. math:: \mathrm{regret@}k = \max_g m(\alpha_g) - \max_{g \in \mathrm{top}_k(\hat m)} m(\alpha_g)

  (for `maximize=False`: min over the top-k minus the min over all, so regret is always >= 0). `top_k` ranks the
  preview best first, ties by the first index; k larger than G is clipped to G (regret 0).

  Args:
    preview: [G] preview metric.
    exact: [G] exact metric.
    k: how many alphas one would jointly train, >= 1.
    maximize: whether larger metrics are better.

  Returns:
    The regret as a Python float, >= 0, in the units of the metric.
  """
  sign = _sign(maximize)
  preview, exact = _pair(preview, exact)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"`k` must be a positive integer, got {k!r}.")
  order = np.argsort(-sign * preview, kind="stable")  # best first; stable keeps the first index among ties
  top = order[:min(int(k), preview.shape[0])]
  return float(np.max(sign * exact) - np.max(sign * exact[top]))


class Histogram(NamedTuple):
  counts: np.ndarray  # [bins] int64 number of values in each bin
  edges: np.ndarray  # [bins + 1] float64 bin edges; the last bin is closed on the right


def histogram(values, bins: int | Sequence[float] = 10,
              range: Optional[tuple[float, float]] = None) -> Histogram:  # pylint: disable=redefined-builtin
  """How many grid points reach each metric level (the histograms of paper Figs. 3, 4, 6), via `np.histogram`.

  Give several surfaces the same `range` (or the same edges as `bins`) to compare them bin by bin.

  Args:
    values: [G] metric values.
    bins: number of equal-width bins, or the [B + 1] increasing edges.
    range: (low, high) for equal-width bins; default the min and max of `values`.

  Returns:
    A `Histogram(counts, edges)`.
  """
  values = _vector(values, "values")
  if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
    if bins < 1:
      raise ValueError(f"`bins` must be a positive integer or increasing edges, got {bins!r}.")
  else:
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.shape[0] < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
      raise ValueError("`bins` must be a positive integer or at least two strictly increasing finite edges, "
                       f"got {bins!r}.")
    bins = edges
  if range is not None:
    low, high = (float(r) for r in range)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
      raise ValueError(f"`range` must be finite (low, high) with low < high, got {range!r}.")
    range = (low, high)
  counts, edges = np.histogram(values, bins=bins, range=range)
  return Histogram(counts.astype(np.int64), edges.astype(np.float64))


# ----------------------------------------------------------------------------------------------------------------
# Several metrics per alpha (e.g. one accuracy per task): Pareto fronts.


def pareto_front(points, maximize: bool = True) -> np.ndarray:
  r"""Indices of the non-dominated rows of `points` [G, M], increasing.

  Row q dominates row p when it is at least as good in every column and strictly better in one:
  :math:`q \succ p \iff \forall j: q_j \ge p_j \wedge \exists j: q_j > p_j` (reversed for `maximize=False`).
  Duplicate rows do not dominate each other, so all copies of a non-dominated row are on the front.

  Sorting the rows lexicographically best-first puts every dominator before what it dominates, and by transitivity a
  dominated row is dominated by a front row already found; so each row is compared with the current front only:
  O(G log G + G |front| M).

  Args:
    points: [G, M] metrics per grid point (e.g. per-task accuracy).
    maximize: whether larger is better in every column.

  Returns:
    int64 [F] sorted indices of the front.
  """
  sign = _sign(maximize)
  pts = sign * _matrix(points, "points", what="[G, M]")
  order = np.lexsort(-pts.T[::-1])  # by column 0 descending, then column 1, ...
  front: list[int] = []
  for i in order:
    p = pts[i]
    if front:
      f = pts[front]
      if np.any(np.all(f >= p, axis=1) & np.any(f > p, axis=1)):
        continue
    front.append(int(i))
  return np.sort(np.asarray(front, dtype=np.int64))


def hypervolume_2d(points, reference, maximize: bool = True) -> float:
  r"""Area dominated by a set of 2-D points and bounded by a reference point (Zitzler & Thiele, 1999).

  .. math:: \mathrm{HV}(P; r) = \lambda\Big(\bigcup_{p \in P} [r_1, p_1] \times [r_2, p_2]\Big)

  for maximisation (boxes [p, r] for minimisation). Points not better than `reference` in both columns add nothing.
  Larger is better: a front with larger hypervolume reaches further toward the best corner.

  Args:
    points: [N, 2] points (N may be 0).
    reference: [2] the worst corner, e.g. the column-wise worst of all exact points.
    maximize: whether larger is better in both columns.

  Returns:
    The area as a Python float.
  """
  sign = _sign(maximize)
  ref = _vector(reference, "reference")
  if ref.shape != (2,):
    raise ValueError(f"`reference` must have shape [2], got {ref.shape}.")
  pts = np.asarray(points, dtype=np.float64)
  if pts.size == 0:
    return 0.0
  pts = _matrix(points, "points", what="[N, 2]")
  if pts.shape[1] != 2:
    raise ValueError(f"`points` must have shape [N, 2], got {pts.shape}.")
  # Work in the maximising frame relative to the reference, dropping points that dominate no area.
  pts = sign * (pts - ref)
  pts = pts[np.all(pts > 0, axis=1)]
  if pts.shape[0] == 0:
    return 0.0
  pts = pts[pareto_front(pts)]
  pts = pts[np.argsort(-pts[:, 0], kind="stable")]  # x descending, so y ascending on a front
  area, y_prev = 0.0, 0.0
  for x, y in pts:
    if y > y_prev:
      area += x * (y - y_prev)
      y_prev = y
  return float(area)


class FrontComparison(NamedTuple):
  """The preview's Pareto front judged by the exact metrics of its alphas."""

  exact_front: np.ndarray  # [F] indices of the exact front
  preview_front: np.ndarray  # [F'] indices of the preview's front
  recovered: np.ndarray  # indices on both fronts
  recall: float  # |recovered| / |exact_front|: share of the truly Pareto-optimal alphas the preview finds
  igd: float  # inverted generational distance, see `compare_fronts`
  hypervolume_exact: float  # HV of exact[exact_front] (2-D only, else nan)
  hypervolume_preview: float  # HV of exact[preview_front] (2-D only, else nan)
  reference: np.ndarray  # [M] the HV reference point: column-wise worst of `exact` minus 10 % of its range


def compare_fronts(alphas, preview, exact, maximize: bool = True) -> FrontComparison:
  r"""Compares the Pareto front of the preview with the exact one, for several metrics per alpha ([G, M]).

  The question is whether the alphas the preview calls Pareto-optimal are really good trade-offs. With E the exact
  front and P the preview's front (both sets of grid indices), and every score computed on the *exact* metrics m:

  * recall = |E ∩ P| / |E|, the share of exactly Pareto-optimal alphas the preview recovers;
  * IGD (inverted generational distance, Coello & Cortés 2005): the mean over the exact front of the distance to the
    nearest alpha of the preview front, 0 when P covers E, in the units of the metric:
    :math:`\frac{1}{|E|}\sum_{e \in E} \min_{p \in P} \|m(\alpha_e) - m(\alpha_p)\|_2`;
  * for M = 2, the hypervolumes HV(m[E]; r) and HV(m[P]; r) (`hypervolume_2d`) with r the column-wise worst exact
    metric moved 10 % of the column's range further out (the usual "slightly worse than the nadir" reference);
    HV(m[P]) <= HV(m[E]), with equality when the preview's choices lose nothing.

  Args:
    alphas: [G, T] the grid (used for validation of G only; the indices refer to its rows).
    preview: [G, M] preview metrics (e.g. per-task accuracy of the merged model).
    exact: [G, M] exact metrics.
    maximize: whether larger is better in every column.

  Returns:
    A `FrontComparison`.
  """
  sign = _sign(maximize)
  exact = _matrix(exact, "exact", what="[G, M]")
  preview = _matrix(preview, "preview", rows=exact.shape[0], rows_of="`exact`", what="[G, M]")
  if preview.shape != exact.shape:
    raise ValueError(f"`preview` has shape {preview.shape} but `exact` has {exact.shape}; expected equal shapes.")
  _matrix(alphas, "alphas", rows=exact.shape[0], rows_of="`exact`")
  e_front = pareto_front(exact, maximize)
  p_front = pareto_front(preview, maximize)
  recovered = np.intersect1d(e_front, p_front)
  dist = np.linalg.norm(exact[e_front][:, None, :] - exact[p_front][None, :, :], axis=-1)
  # Reference: 10 % of the range beyond the column-wise worst exact value, so the extreme points of the front add
  # area too (with the worst point itself as reference they would add none).
  worst, top = np.min(sign * exact, axis=0), np.max(sign * exact, axis=0)
  ref = sign * (worst - 0.1 * np.where(top > worst, top - worst, 1.0))
  if exact.shape[1] == 2:
    hv_e = hypervolume_2d(exact[e_front], ref, maximize)
    hv_p = hypervolume_2d(exact[p_front], ref, maximize)
  else:
    hv_e = hv_p = float("nan")
  return FrontComparison(exact_front=e_front, preview_front=p_front, recovered=recovered,
                         recall=float(recovered.size / e_front.size), igd=float(np.mean(np.min(dist, axis=1))),
                         hypervolume_exact=hv_e, hypervolume_preview=hv_p, reference=ref)


# ----------------------------------------------------------------------------------------------------------------
# The metrics.json of an experiment.


def _json_float(x: float) -> Optional[float]:
  return None if math.isnan(x) else float(x)


def summarize(alphas, previews: Mapping[str, object], exact, maximize: bool = True) -> dict:
  """Every score of every preview method, as the `metrics.json` structure (plain Python floats, lists, None).

  Returns::

    {"methods": {name: {"mse", "best_alpha", "best_preview", "exact_at_best", "spearman", "regret_at_1",
                        "regret_at_5"}},
     "exact_best": float, "exact_best_alpha": [T floats]}

  `spearman` is `None` (JSON null) where a surface is constant; regret@5 uses min(5, G) alphas.

  Args:
    alphas: [G, T] the grid.
    previews: method name -> [G] preview metric.
    exact: [G] exact metric.
    maximize: whether larger metrics are better.

  Example:
    >>> import numpy as np
    >>> from bmerge import metrics
    >>> alphas = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    >>> out = metrics.summarize(alphas, {"simple": [0.7, 0.9, 0.6]}, [0.8, 0.85, 0.9])
    >>> out["methods"]["simple"]["best_alpha"], out["methods"]["simple"]["exact_at_best"], out["exact_best"]
    ([0.5, 0.5], 0.85, 0.9)
  """
  exact_v = _vector(exact, "exact")
  alphas = _matrix(alphas, "alphas", rows=exact_v.shape[0], rows_of="`exact`")
  if not isinstance(previews, Mapping) or not previews:
    raise ValueError("`previews` must be a non-empty dict of method name -> [G] metric, "
                     f"got {type(previews).__name__}.")
  methods = {}
  for name, preview in previews.items():
    if not isinstance(name, str):
      raise TypeError(f"`previews` keys must be method names (str), got {name!r}.")
    label = f"previews[{name!r}]"
    p = _vector(preview, label, size=exact_v.shape[0], size_of="`exact`")
    b = best(alphas, p, exact_v, maximize)
    methods[name] = {
        "mse": mse(p, exact_v),
        "best_alpha": [float(a) for a in b.alpha],
        "best_preview": b.preview,
        "exact_at_best": b.exact_at_best,
        "spearman": _json_float(spearman(p, exact_v)),
        "regret_at_1": regret_at_k(p, exact_v, 1, maximize),
        "regret_at_5": regret_at_k(p, exact_v, 5, maximize),
    }
  e = _first_best(exact_v, maximize)
  return {"methods": methods, "exact_best": float(exact_v[e]), "exact_best_alpha": [float(a) for a in alphas[e]]}
