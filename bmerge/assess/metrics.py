"""How good is a preview? Scores of a preview surface against the exact (joint-training) surface over one alpha grid.

A *surface* is one metric per grid point: `preview[g]` is the metric of the model merged with weights `alphas[g]`,
`exact[g]` that of the model jointly trained with the same weights (paper Sec. 4). Everything here is numpy/scipy on
concrete arrays, pure, and returns plain Python numbers or numpy arrays; `summarize` returns the `metrics.json` dict.
`per_task_accuracy` (per-example results -> overall and per-task accuracy) also runs on jax arrays inside `jit`.

How sure a score is: `bootstrap_interval` resamples the test examples (one training run), `t_interval` spreads over
a few runs (seeds).

With `maximize=True` (accuracy, BLEU) larger is better; with `maximize=False` (a loss) smaller is better. Ties are
always broken by the first grid index, so every result is deterministic. Grids need not lie on the simplex: the
scaled grids of task arithmetic (`bmerge.grid.scaled`) are scored the same way.

Several metrics per alpha (one per task) are compared as Pareto fronts; non-dominated filtering, hypervolume and
IGD+ come from moocore (López-Ibáñez et al.), exact in any number of tasks.

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Sec. 4, Tables 1-2: MSE and best alphas of previews against joint training).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import moocore
import numpy as np
import scipy.stats

from bmerge import _checks

__all__ = [
    "Best",
    "FrontComparison",
    "Histogram",
    "best",
    "bootstrap_interval",
    "compare_fronts",
    "front_reference",
    "histogram",
    "hypervolume",
    "igd_plus",
    "mse",
    "pareto_front",
    "per_task_accuracy",
    "regret_at_k",
    "spearman",
    "summarize",
    "t_interval",
]


# ----------------------------------------------------------------------------------------------------------------
# Validation at the boundary (bmerge._checks): every error names the argument.


def _pair(preview, exact) -> tuple[np.ndarray, np.ndarray]:
  exact = _checks.vector(exact, "exact")
  preview = _checks.vector(preview, "preview", size=exact.shape[0], size_of="`exact`")
  return preview, exact


def _sign(maximize: bool) -> float:
  return 1.0 if _checks.flag(maximize, "maximize") else -1.0


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

  Example:
    >>> from bmerge import metrics
    >>> metrics.mse([0.7, 0.9], [0.8, 0.9])   # (0.1^2 + 0) / 2
    0.005000000000000009
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

  Example:
    >>> from bmerge import metrics
    >>> b = metrics.best([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], [0.7, 0.9, 0.6], [0.8, 0.85, 0.9])
    >>> b.alpha.tolist(), b.preview, b.exact_at_best, b.exact_best
    ([0.5, 0.5], 0.9, 0.85, 0.9)
  """
  _sign(maximize)  # validates the flag
  preview, exact = _pair(preview, exact)
  alphas = _checks.matrix(alphas, "alphas", rows=exact.shape[0], rows_of="`exact`")
  g = _first_best(preview, maximize)
  e = _first_best(exact, maximize)
  return Best(index=g, alpha=alphas[g].copy(), preview=float(preview[g]), exact_at_best=float(exact[g]),
              exact_index=e, exact_alpha=alphas[e].copy(), exact_best=float(exact[e]))


def spearman(preview, exact) -> float:
  r"""Spearman's rank correlation between the preview and the exact surface.

  .. math:: \rho = \mathrm{corr}(\mathrm{rank}(\hat m), \mathrm{rank}(m)) \in [-1, 1]

  with average ranks for ties (`scipy.stats.rankdata`), as `scipy.stats.spearmanr`. A rank correlation asks only
  whether the preview *orders* the alphas like joint training does, which is what choosing a weight needs.

  Returns:
    rho as a Python float. If either surface is constant (or G < 2) the correlation is undefined and the result is
    `nan`, without a warning; `summarize` writes it as `null`.

  Example:
    >>> from bmerge import metrics
    >>> metrics.spearman([0.1, 0.5, 0.3], [0.2, 0.9, 0.4])   # same order
    1.0
  """
  preview, exact = _pair(preview, exact)
  return float(_spearman_rows(preview[None], exact[None])[0])


def _spearman_rows(preview: np.ndarray, exact: np.ndarray) -> np.ndarray:
  """[B] rho of each row of [B, G] surfaces (bootstrap resamples): Pearson's correlation of the average ranks."""
  ranks = [r - r.mean(axis=-1, keepdims=True) for r in (scipy.stats.rankdata(preview, axis=-1),
                                                          scipy.stats.rankdata(exact, axis=-1))]
  num, sp, se = np.sum(ranks[0] * ranks[1], -1), np.sum(ranks[0] ** 2, -1), np.sum(ranks[1] ** 2, -1)
  defined = (sp > 0) & (se > 0)  # a constant row has all ranks equal
  return np.where(defined, np.clip(num / np.sqrt(np.where(defined, sp * se, 1.0)), -1.0, 1.0), np.nan)


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

  Example:
    >>> from bmerge import metrics
    >>> preview, exact = [0.9, 0.8, 0.1], [0.85, 0.95, 0.2]
    >>> metrics.regret_at_k(preview, exact, 1), metrics.regret_at_k(preview, exact, 2)
    (0.09999999999999998, 0.0)
  """
  sign = _sign(maximize)
  preview, exact = _pair(preview, exact)
  k = _checks.positive_int(k, "k")
  return float(_regret_rows(preview[None], exact[None], k, sign)[0])


def _regret_rows(preview: np.ndarray, exact: np.ndarray, k: int, sign: float) -> np.ndarray:
  """[B] regret@k of each row of [B, G] surfaces (bootstrap resamples); `sign` is +1 to maximise, -1 to minimise."""
  order = np.argsort(-sign * preview, axis=-1, kind="stable")  # best first; stable keeps the first index among ties
  top = np.take_along_axis(sign * exact, order[..., :min(k, preview.shape[-1])], axis=-1)
  return np.max(sign * exact, axis=-1) - np.max(top, axis=-1)


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

  Example:
    >>> from bmerge import metrics
    >>> metrics.histogram([0.1, 0.2, 0.2, 1.0], bins=4, range=(0.0, 1.0)).counts.tolist()
    [3, 0, 0, 1]
  """
  values = _checks.vector(values, "values")
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
  r"""Indices of the non-dominated rows of `points` [G, M], increasing (`moocore.is_nondominated`).

  Row q dominates row p when it is at least as good in every column and strictly better in one:
  :math:`q \succ p \iff \forall j: q_j \ge p_j \wedge \exists j: q_j > p_j` (reversed for `maximize=False`).
  Duplicate rows do not dominate each other, so all copies of a non-dominated row are on the front. moocore runs the
  O(G log G) dimension sweep of Kung, Luccio & Preparata (1975) for M <= 3.

  Args:
    points: [G, M] metrics per grid point (e.g. per-task accuracy).
    maximize: whether larger is better in every column.

  Returns:
    int64 [F] sorted indices of the front.

  Example:
    >>> from bmerge import metrics
    >>> metrics.pareto_front([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]]).tolist()   # (1, 1) is dominated
    [0, 1, 2, 4]
  """
  maximize = _checks.flag(maximize, "maximize")
  pts = _checks.matrix(points, "points", what="[G, M]")
  keep = moocore.is_nondominated(pts, maximise=maximize, keep_weakly=True)
  return np.flatnonzero(keep).astype(np.int64)


def _points_and_reference(points, reference) -> tuple[np.ndarray, np.ndarray]:
  """[N, M] points (N may be 0) and the [M] reference point they are measured against."""
  ref = _checks.vector(reference, "reference", what="[M] (one value per objective)")
  pts = _checks.numeric(points, "points")
  if pts.size == 0:
    return np.zeros((0, ref.shape[0])), ref
  pts = _checks.matrix(pts, "points", what=f"[N, {ref.shape[0]}]")
  if pts.shape[1] != ref.shape[0]:
    raise ValueError(f"`points` has {pts.shape[1]} columns but `reference` has M = {ref.shape[0]} values; expected "
                     f"shape [N, {ref.shape[0]}].")
  return pts, ref


def hypervolume(points, reference, maximize: bool = True) -> float:
  r"""Volume dominated by a set of points and bounded by a reference point, in any dimension (`moocore.hypervolume`).

  .. math:: \mathrm{HV}(P; r) = \lambda\Big(\bigcup_{p \in P} [r_1, p_1] \times \dots \times [r_M, p_M]\Big)

  for maximisation (boxes [p, r] for minimisation; Zitzler & Thiele, 1999). Points not better than `reference` in
  every column add nothing. Larger is better: a front with larger hypervolume reaches further toward the best corner.
  moocore computes it exactly in O(N log N) for M <= 3 and with the HV4D+ / recursive algorithms above.

  Args:
    points: [N, M] points (N may be 0).
    reference: [M] the worst corner, e.g. the column-wise worst of all exact points.
    maximize: whether larger is better in every column.

  Returns:
    The hypervolume as a Python float.

  Example:
    >>> from bmerge import metrics
    >>> metrics.hypervolume([[3, 1], [2, 2], [1, 3]], [0, 0])   # a staircase of boxes: 3 + 2 + 1
    6.0
    >>> metrics.hypervolume([[1, 1, 1], [2, 0.5, 0.5]], [0, 0, 0])   # 1 + 2 * 0.25 - 1 * 0.25
    1.25
  """
  maximize = _checks.flag(maximize, "maximize")
  pts, ref = _points_and_reference(points, reference)
  if pts.shape[0] == 0:
    return 0.0
  return float(moocore.hypervolume(pts, ref=ref, maximise=maximize))


def igd_plus(points, reference_front, maximize: bool = True) -> float:
  r"""IGD+ of a set of points against a reference front (Ishibuchi et al., 2015; `moocore.igd_plus`).

  .. math:: \mathrm{IGD}^+(P; R) = \frac{1}{|R|} \sum_{r \in R} \min_{p \in P}
            \big\| \max(r - p, 0) \big\|_2

  for maximisation (``max(p - r, 0)`` when minimising): only the shortfall of p behind r counts, so a point that
  is better than r in some column is not penalised for it. 0 when every point of R is weakly dominated by some p,
  and, unlike plain IGD, Pareto compliant: a set that dominates another never scores worse.

  Args:
    points: [N, M] the approximation (e.g. the exact metrics at the alphas a preview calls Pareto-optimal), N >= 1.
    reference_front: [F, M] the reference (e.g. the exact Pareto front).
    maximize: whether larger is better in every column.

  Returns:
    IGD+ as a Python float, >= 0, in the units of the metric.

  Example:
    >>> from bmerge import metrics
    >>> front = [[0.9, 0.1], [0.6, 0.6], [0.1, 0.9]]
    >>> d = metrics.igd_plus([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]], front)  # (.6, .6) falls short by (.1, .1)
    >>> round(d, 6), round(2 ** 0.5 * 0.1 / 3, 6)
    (0.04714, 0.04714)
  """
  maximize = _checks.flag(maximize, "maximize")
  ref = _checks.matrix(reference_front, "reference_front", what="[F, M]")
  pts = _checks.matrix(points, "points", what=f"[N, {ref.shape[1]}]")
  if pts.shape[1] != ref.shape[1]:
    raise ValueError(f"`points` has {pts.shape[1]} columns but `reference_front` has {ref.shape[1]}; expected equal.")
  return float(moocore.igd_plus(pts, ref=ref, maximise=maximize))


def front_reference(exact, maximize: bool = True) -> np.ndarray:
  r"""The hypervolume reference point of a set of exact results: the exact front's nadir, 10 % of its range further out.

  With E the exact Pareto front of `exact` [G, M] and s = +1 to maximise (-1 to minimise), per column j

  .. math:: r_j = s \big( \min_{e \in E} s\,m_{ej} - 0.1\,(\max_{e \in E} s\,m_{ej} - \min_{e \in E} s\,m_{ej}) \big),

  so the front's extreme points add volume too (with the nadir itself as reference they would add none), and alphas
  that give a task up entirely (worse than every front point there) add nothing. A column whose front range is 0
  takes the range of all G rows instead, and 1 where that is 0 too. `compare_fronts` and the Pareto-front benchmark
  (`experiments/pareto.py`) measure every hypervolume against this point.

  Args:
    exact: [G, M] exact metrics (e.g. per-task accuracy of joint training at every alpha).
    maximize: whether larger is better in every column.

  Returns:
    [M] the reference point, in the metrics' units.

  Example:
    >>> from bmerge import metrics
    >>> exact = [[0.9, 0.1], [0.6, 0.6], [0.1, 0.9], [0.05, 0.05]]   # the last row is off the front
    >>> metrics.front_reference(exact).round(3).tolist()           # front nadir 0.1, range 0.8
    [0.02, 0.02]
  """
  sign = _sign(maximize)
  values = sign * _checks.matrix(exact, "exact", what="[G, M]")
  front = values[pareto_front(values)]
  nadir, span = front.min(axis=0), front.max(axis=0) - front.min(axis=0)
  span = np.where(span > 0, span, np.ptp(values, axis=0))
  return sign * (nadir - 0.1 * np.where(span > 0, span, 1.0))


def _front_span(values: np.ndarray) -> np.ndarray:
  """[M] the range of the Pareto front of `values` (larger is better), per column."""
  front = values[pareto_front(values)]
  return front.max(axis=0) - front.min(axis=0)


def _covered(chosen: np.ndarray, targets: np.ndarray, eps: np.ndarray) -> np.ndarray:
  """[len(targets)] bool: some row of `chosen` reaches every column of a target row to within eps (larger is
  better), i.e. additively eps-dominates it."""
  if len(chosen) == 0:
    return np.zeros(len(targets), dtype=bool)
  return np.any(np.all(chosen[None, :, :] >= targets[:, None, :] - eps, axis=-1), axis=1)


def _random_subsets(num_rows: int, size: int, num_samples: int, seed: int):
  """Every `size`-subset of range(num_rows) when there are at most `num_samples` of them, else `num_samples` uniform
  random ones (`np.random.default_rng(seed)`)."""
  if math.comb(num_rows, size) <= num_samples:
    return [np.asarray(c, dtype=np.int64) for c in itertools.combinations(range(num_rows), size)]
  rng = np.random.default_rng(seed)
  return [np.sort(rng.choice(num_rows, size, replace=False)) for _ in range(num_samples)]


class FrontComparison(NamedTuple):
  """The preview's Pareto front judged by the exact metrics of its alphas, next to a random subset of its size."""

  exact_front: np.ndarray  # [F] indices of the exact front
  preview_front: np.ndarray  # [F'] indices of the preview's front
  recovered: np.ndarray  # indices of the exact front within `epsilon` of the preview front's exact values
  recall: float  # |recovered| / |exact_front|: share of the truly Pareto-optimal alphas the preview finds
  igd: float  # inverted generational distance, see `compare_fronts`
  igd_plus: float  # IGD+ (Pareto compliant), see `igd_plus`
  hypervolume_exact: float  # HV of exact[exact_front]
  hypervolume_preview: float  # HV of exact[preview_front]
  reference: np.ndarray  # [M] the HV reference point (`front_reference`)
  epsilon: np.ndarray  # [M] the tolerance of `recall`, in the metrics' units
  random_recall: float  # the mean recall of a uniformly random subset of F' alphas (exact)
  random_igd_plus: float  # its mean IGD+
  random_hypervolume: float  # its mean HV


def compare_fronts(alphas, preview, exact, maximize: bool = True, *, epsilon=None, num_samples: int = 200,
                   seed: int = 0) -> FrontComparison:
  r"""Compares the Pareto front of the preview with the exact one, for several metrics per alpha ([G, M]).

  The question is whether the alphas the preview calls Pareto-optimal are really good trade-offs (the view of the
  paper's later version, "Variational Model Merging for Pareto Front Estimation in Multitask Finetuning"). With E the
  exact front and P the preview's front (both sets of grid indices), every score computed on the *exact*
  metrics m, and s = +1 to maximise (-1 to minimise):

  * recall: the share of E that P reaches to within epsilon in every metric,
    :math:`\frac{1}{|E|}\,\big|\{e \in E : \exists p \in P,\ \forall j:\ s\,m_{pj} \ge s\,m_{ej} - \epsilon_j\}\big|`
    (additive epsilon-dominance; with epsilon = 0 only the front's own points, or ties, count);
  * IGD (inverted generational distance, Coello & Cortés 2005): the mean over the exact front of the distance to the
    nearest alpha of the preview front, 0 when P covers E, in the units of the metric:
    :math:`\frac{1}{|E|}\sum_{e \in E} \min_{p \in P} \|m(\alpha_e) - m(\alpha_p)\|_2`;
  * IGD+ (`igd_plus`) of m[P] against m[E]: the same with only shortfalls counted, Pareto compliant;
  * the hypervolumes HV(m[E]; r) and HV(m[P]; r) (`hypervolume`, any M) with r = `front_reference(exact)`, the exact
    front's nadir moved 10 % of its range further out; HV(m[P]) <= HV(m[E]), with equality when the preview's choices
    lose nothing.

  Each score of P is worth reading next to that of a uniformly random subset S of |P| alphas of the grid, which a
  preview that knows nothing also achieves: the mean recall is exact,
  :math:`\frac{1}{|E|}\sum_{e \in E} \big(1 - \binom{G - c_e}{|P|} / \binom{G}{|P|}\big)` with :math:`c_e` the
  number of alphas that reach e to within epsilon; the mean IGD+ and HV are averaged over every subset when there are
  at most `num_samples` of them, else over `num_samples` random ones.

  Args:
    alphas: [G, T] the grid (used for validation of G only; the indices refer to its rows).
    preview: [G, M] preview metrics (e.g. per-task accuracy of the merged model).
    exact: [G, M] exact metrics.
    maximize: whether larger is better in every column.
    epsilon: the tolerance of `recall` in the metrics' units, one value or [M]; default 1 % of the exact front's range
      per column (a tenth of the reference point's margin).
    num_samples: random subsets behind the mean IGD+ and HV of a random subset.
    seed: seed of those subsets.

  Returns:
    A `FrontComparison`.

  Example:
    >>> import numpy as np
    >>> from bmerge import metrics
    >>> exact = np.array([[0.9, 0.1], [0.6, 0.6], [0.1, 0.9], [0.5, 0.5]])
    >>> preview = np.array([[0.9, 0.2], [0.4, 0.4], [0.2, 0.9], [0.5, 0.5]])
    >>> c = metrics.compare_fronts(np.ones((4, 1)), preview, exact)
    >>> c.exact_front.tolist(), c.preview_front.tolist(), round(c.recall, 3), round(c.random_recall, 3)
    ([0, 1, 2], [0, 2, 3], 0.667, 0.75)
    >>> c = metrics.compare_fronts(np.ones((4, 1)), preview, exact, epsilon=0.1)   # (.5, .5) reaches (.6, .6)
    >>> round(c.recall, 3)
    1.0
  """
  sign = _sign(maximize)
  exact = _checks.matrix(exact, "exact", what="[G, M]")
  preview = _checks.matrix(preview, "preview", rows=exact.shape[0], rows_of="`exact`", what="[G, M]")
  if preview.shape != exact.shape:
    raise ValueError(f"`preview` has shape {preview.shape} but `exact` has {exact.shape}; expected equal shapes.")
  _checks.matrix(alphas, "alphas", rows=exact.shape[0], rows_of="`exact`")
  num_samples = _checks.positive_int(num_samples, "num_samples")
  seed = _checks.integer(seed, "seed", minimum=0)
  g, m = exact.shape
  values = sign * exact
  if epsilon is None:
    eps = 0.01 * _front_span(values)
  else:
    eps = _checks.numeric(epsilon, "epsilon")
    if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != m) or not np.all(np.isfinite(eps)) or np.any(eps < 0):
      raise ValueError(f"`epsilon` must be one non-negative value or {m} (one per column of `exact`), got {epsilon!r}.")
    eps = np.broadcast_to(eps, (m,)).astype(np.float64)
  e_front = pareto_front(exact, maximize)
  p_front = pareto_front(preview, maximize)
  recovered = e_front[_covered(values[p_front], values[e_front], eps)]
  ref = front_reference(exact, maximize)
  # A random subset of |P| alphas: the chance that it holds one of the c_e alphas that reach e is exact.
  k = p_front.size
  reach = np.sum(np.all(values[None, :, :] >= values[e_front][:, None, :] - eps, axis=-1), axis=1)
  random_recall = float(np.mean([1.0 - math.comb(g - int(c), k) / math.comb(g, k) for c in reach]))
  subsets = _random_subsets(g, k, num_samples, seed)
  random_igd_plus = float(np.mean([igd_plus(exact[s], exact[e_front], maximize) for s in subsets]))
  return FrontComparison(exact_front=e_front, preview_front=p_front, recovered=recovered,
                         recall=float(recovered.size / e_front.size),
                         igd=float(moocore.igd(exact[p_front], ref=exact[e_front])),
                         igd_plus=igd_plus(exact[p_front], exact[e_front], maximize),
                         hypervolume_exact=hypervolume(exact[e_front], ref, maximize),
                         hypervolume_preview=hypervolume(exact[p_front], ref, maximize), reference=ref,
                         epsilon=eps, random_recall=random_recall,
                         random_igd_plus=random_igd_plus,
                         random_hypervolume=float(np.mean([hypervolume(exact[s], ref, maximize) for s in subsets])))


# ----------------------------------------------------------------------------------------------------------------
# From per-example results to metrics, and how sure they are.


def per_task_accuracy(correct, task_onehot):
  r"""The accuracy on all test examples and on each task's examples, from per-example results.

  With :math:`c_n \in \{0, 1\}` (or any per-example score) and the membership :math:`z_{nt} \in \{0, 1\}` of example
  n in task t (tasks may overlap),

  .. math:: a_0 = \frac{1}{N} \sum_{n=1}^N c_n, \qquad
            a_t = \frac{\sum_n c_n z_{nt}}{\max(1, \sum_n z_{nt})}, \quad t = 1..T,

  so a task without examples reads 0. Column 0 is the "overall" metric and columns 1..T the per-task metrics of
  `bmerge.compare`'s default layout (`overall="first"`). Leading axes of `correct` are batch axes (alphas, bootstrap
  resamples). Numpy inputs give a float64 numpy result; jax inputs (also tracers, inside `jit`) a jax array, so an
  `eval_fn` can call it on the device.

  Args:
    correct: [..., N] per test example: bool or 0/1 (any float score is averaged the same way).
    task_onehot: [N, T] task membership, 0/1.

  Returns:
    [..., 1 + T]: the mean over all N examples, then the mean over each task's examples.

  Example:
    >>> import numpy as np
    >>> from bmerge import metrics
    >>> correct = np.array([1, 0, 1, 1])
    >>> onehot = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])   # examples 0, 1 in task 1; 2, 3 in task 2
    >>> metrics.per_task_accuracy(correct, onehot).tolist()
    [0.75, 0.5, 1.0]
  """
  on_device = isinstance(correct, jax.Array) or isinstance(task_onehot, jax.Array)
  xp = jnp if on_device else np
  if on_device:
    correct = jnp.asarray(correct)
    correct = correct.astype(jnp.result_type(float)) if not jnp.issubdtype(correct.dtype, jnp.floating) else correct
    task_onehot = jnp.asarray(task_onehot, correct.dtype)
  else:
    correct, task_onehot = _checks.numeric(correct, "correct"), _checks.numeric(task_onehot, "task_onehot")
  if task_onehot.ndim != 2:
    raise ValueError(f"`task_onehot` must have shape [N, T] (task membership of each example), got shape "
                     f"{task_onehot.shape}.")
  if correct.ndim < 1 or correct.shape[-1] != task_onehot.shape[0] or task_onehot.shape[0] == 0:
    raise ValueError(f"`correct` must have shape [..., N] with N = {task_onehot.shape[0]} (the rows of "
                     f"`task_onehot`, at least one), got shape {correct.shape}.")
  if not on_device and not np.all((task_onehot == 0) | (task_onehot == 1)):
    bad = tuple(int(i) for i in np.argwhere((task_onehot != 0) & (task_onehot != 1))[0])
    raise ValueError(f"`task_onehot` must hold 0 or 1 (membership); entry {bad} is {task_onehot[bad]}.")
  per_task = (correct @ task_onehot) / xp.maximum(xp.sum(task_onehot, axis=0), 1.0)
  return xp.concatenate([xp.mean(correct, axis=-1, keepdims=True), per_task], axis=-1)


def _level(level) -> float:
  if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0.0 < float(level) < 1.0:
    raise ValueError(f"`level` must be a probability strictly between 0 and 1 (e.g. 0.95), got {level!r}.")
  return float(level)


# Resamples are drawn and evaluated this many example indices at a time (B * N <= _BATCH_ELEMENTS).
_BATCH_ELEMENTS = 1 << 22


def bootstrap_interval(statistic, *arrays, seed: int = 0, num_samples: int = 1000, level: float = 0.95,
                       axis: int = -1, vectorized: bool = False):
  r"""A paired percentile bootstrap interval over the examples axis of one or more arrays.

  Resample b draws N example indices :math:`i^{(b)}_1, \dots, i^{(b)}_N` uniformly with replacement and applies the
  *same* indices to every array (paired: a difference between two methods evaluated on the same examples keeps its
  correlation). With :math:`s_b = S(x_{i^{(b)}}, y_{i^{(b)}}, \dots)` the statistic of resample b, the interval is
  the percentile interval (Efron & Tibshirani, 1993, Sec. 13.3)

  .. math:: [\,q_{(1 - \ell)/2}(s_1..s_B),\; q_{(1 + \ell)/2}(s_1..s_B)\,]

  with :math:`\ell` the `level` and q the empirical quantile (linear interpolation). Resamples whose statistic is
  `nan` (e.g. a rank correlation of a constant surface) are left out of the quantiles; all `nan` gives `nan`. The
  indices come from `np.random.default_rng(seed)` in batches of resamples, so the result is deterministic for a seed.

  Args:
    statistic: `statistic(*resampled_arrays)` -> a scalar or a [k] vector. With `vectorized=True` it receives the
      resampled arrays with one more leading axis [B, ...] (B resamples at once) and returns [B] or [B, k].
    *arrays: one or more arrays with the same number N of examples along `axis`.
    seed: seed of the resampling.
    num_samples: B, the number of resamples.
    level: the interval's coverage, e.g. 0.95.
    axis: the examples axis of every array.
    vectorized: whether `statistic` takes a leading axis of resamples (faster: one call per batch).

  Returns:
    (estimate, lo, hi): the statistic of the full arrays and the interval's ends, Python floats for a scalar statistic,
    else [k] float64 arrays.

  Example:
    >>> import numpy as np
    >>> from bmerge import metrics
    >>> correct = np.arange(400) % 5 != 0                          # 400 test examples, accuracy 0.8
    >>> est, lo, hi = metrics.bootstrap_interval(np.mean, correct)
    >>> est, bool(lo < est < hi), abs(hi - lo - 2 * 1.96 * (0.8 * 0.2 / 400) ** 0.5) < 0.01   # normal approximation
    (0.8, True, True)
  """
  if not callable(statistic):
    raise TypeError(f"`statistic` must be callable as statistic(*arrays), got {type(statistic).__name__}.")
  if not arrays:
    raise ValueError("`arrays` is empty; pass at least one array to resample.")
  num_samples = _checks.positive_int(num_samples, "num_samples")
  level = _level(level)
  seed = _checks.integer(seed, "seed", minimum=0)
  vectorized = _checks.flag(vectorized, "vectorized")
  arrs = []
  for i, a in enumerate(arrays):
    a = np.asarray(a)
    if a.ndim == 0 or not -a.ndim <= axis < a.ndim:
      raise ValueError(f"`arrays[{i}]` has shape {a.shape}, which has no axis {axis} (the examples axis).")
    arrs.append(np.moveaxis(a, axis, -1))
  n = arrs[0].shape[-1]
  sizes = [a.shape[-1] for a in arrs]
  if n == 0 or any(s != n for s in sizes):
    raise ValueError(f"`arrays` must have the same positive number of examples along axis {axis}; got {sizes}.")

  def back(a):  # the examples axis where the caller had it (a leading resample axis shifts a non-negative one)
    return np.moveaxis(a, -1, axis + 1 if (vectorized and axis >= 0) else axis)

  if vectorized:  # the full arrays as a batch of one resample
    estimate = np.asarray(statistic(*(back(a[None]) for a in arrs)), np.float64)[0]
  else:
    estimate = np.asarray(statistic(*(np.moveaxis(a, -1, axis) for a in arrs)), np.float64)
  if estimate.ndim > 1:
    raise ValueError(f"`statistic` must return a scalar or a [k] vector, got shape {estimate.shape}.")
  rng = np.random.default_rng(seed)
  per_batch = max(1, min(num_samples, _BATCH_ELEMENTS // max(1, max(a.size for a in arrs))))
  stats = []
  for start in range(0, num_samples, per_batch):
    idx = rng.integers(0, n, size=(min(per_batch, num_samples - start), n))
    if vectorized:
      out = np.asarray(statistic(*(back(np.moveaxis(a[..., idx], -2, 0)) for a in arrs)), np.float64)
      stats.append(out.reshape(idx.shape[0], *estimate.shape))
    else:
      stats += [np.asarray(statistic(*(np.moveaxis(a[..., row], -1, axis) for a in arrs)), np.float64).reshape(
          estimate.shape) for row in idx]
  stats = np.stack(stats) if not vectorized else np.concatenate(stats)
  tail = (1.0 - level) / 2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns give nan
    lo, hi = np.nanquantile(stats, [tail, 1.0 - tail], axis=0)
  if estimate.ndim == 0:
    return float(estimate), float(lo), float(hi)
  return estimate, lo, hi


def t_interval(values, level: float = 0.95):
  r"""Student's t interval for the mean of a few independent runs (e.g. seeds).

  With n values :math:`x_1..x_n`, mean :math:`\bar x` and sample standard deviation
  :math:`s = \sqrt{\sum_i (x_i - \bar x)^2 / (n - 1)}`,

  .. math:: \bar x \pm t_{(1 + \ell)/2,\, n - 1} \, s / \sqrt{n},

  exact for normally distributed values (`scipy.stats.t` gives the quantile).

  Args:
    values: [n] one value per run, n >= 2 (or [n, k]: k intervals at once, over axis 0).
    level: the interval's coverage, e.g. 0.95.

  Returns:
    (mean, lo, hi), Python floats for [n] values, else [k] arrays.

  Example:
    >>> from bmerge import metrics
    >>> mean, lo, hi = metrics.t_interval([1.0, 2.0, 3.0])      # s = 1, t_{0.975, 2} = 4.303
    >>> mean, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
  """
  level = _level(level)
  x = _checks.numeric(values, "values")
  if x.ndim not in (1, 2) or x.shape[0] < 2:
    raise ValueError(f"`values` must have shape [n] or [n, k] with n >= 2 runs (an interval needs a spread), got "
                     f"shape {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError("`values` must be finite.")
  n = x.shape[0]
  mean = x.mean(axis=0)
  half = scipy.stats.t.ppf((1.0 + level) / 2, n - 1) * x.std(axis=0, ddof=1) / math.sqrt(n)
  if x.ndim == 1:
    return float(mean), float(mean - half), float(mean + half)
  return mean, mean - half, mean + half


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
  exact_v = _checks.vector(exact, "exact")
  alphas = _checks.matrix(alphas, "alphas", rows=exact_v.shape[0], rows_of="`exact`")
  if not isinstance(previews, Mapping) or not previews:
    raise ValueError("`previews` must be a non-empty dict of method name -> [G] metric, "
                     f"got {type(previews).__name__}.")
  methods = {}
  for name, preview in previews.items():
    if not isinstance(name, str):
      raise TypeError(f"`previews` keys must be method names (str), got {name!r}.")
    label = f"previews[{name!r}]"
    p = _checks.vector(preview, label, size=exact_v.shape[0], size_of="`exact`")
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
