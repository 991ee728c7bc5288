"""Grids of task weights alpha: rows of a [G, T] array, usually on the simplex (sum_t alpha_t = 1).

Off the simplex, task arithmetic's scaling sweep alpha = lambda * d (`scaled`) weights a prior with
gamma = 1 - sum_t alpha_t; merge rules with an implied prior (simple averaging, task arithmetic) and rules given a
`prior=` accept such rows. On the simplex task arithmetic is simple averaging exactly (gamma = 0 removes the base).

Example:
  The simplex lattice of spacing 1/n has C(n + T - 1, T - 1) points: 231 for T = 3 tasks and spacing 0.05.

  >>> from bmerge import grid
  >>> a = grid.simplex(3, 0.05)
  >>> a.shape, bool(abs(a.sum(axis=1) - 1.0).max() < 1e-12)
  ((231, 3), True)

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Eqs. 1-3 and 5-8: the weights alpha, gamma = 1 - sum_t alpha_t).
  Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi. Editing Models with Task Arithmetic,
  ICLR 2023 (the scaling coefficient lambda).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bmerge import _checks

__all__ = ["Scaling", "dirichlet", "line", "nested_simplex", "pair_edges", "refine", "scaled", "scaling", "simplex"]


def _divisions(spacing: float, name: str = "spacing") -> int:
  if not isinstance(spacing, (int, float, np.floating)) or not math.isfinite(spacing) or spacing <= 0 or spacing > 1:
    raise ValueError(f"`{name}` must be a number in (0, 1], got {spacing!r}.")
  n = round(1.0 / spacing)
  if n < 1 or abs(n * spacing - 1.0) > 1e-9:
    raise ValueError(f"`{name}` must be 1/n for an integer n so the lattice reaches every vertex; got {spacing!r} "
                     f"(1/{spacing!r} = {1.0 / spacing:.6g}). Try {1.0 / max(n, 1):.6g}.")
  return n


def simplex(num_tasks: int, spacing: float) -> np.ndarray:
  """Every point of the simplex lattice with step `spacing` = 1/n: rows of non-negative multiples of 1/n summing to 1.

  There are C(n + T - 1, T - 1) points (231 for T = 3, spacing 0.05), vertices included, in lexicographic order of
  (alpha_1, ..., alpha_T) descending.

  Args:
    num_tasks: T.
    spacing: 1/n for an integer n.

  Returns:
    float64 [G, T]; rows sum to 1 exactly in float64 up to rounding.

  Example:
    >>> from bmerge import grid
    >>> grid.simplex(3, 0.5).tolist()
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
  """
  num_tasks = _checks.positive_int(num_tasks, "num_tasks")
  n = _divisions(spacing)
  # Compositions of n into T non-negative parts, by stars and bars.
  rows = []
  for bars in itertools.combinations(range(n + num_tasks - 1), num_tasks - 1):
    edges = (-1,) + bars + (n + num_tasks - 1,)
    rows.append([edges[i + 1] - edges[i] - 1 for i in range(num_tasks)])
  counts = np.asarray(rows, dtype=np.int64)[::-1].reshape(-1, num_tasks)
  return counts / float(n)


def nested_simplex(num_tasks: int, spacing: float, coarse_spacing: float) -> tuple[np.ndarray, np.ndarray]:
  """A fine simplex lattice and a coarser one inside it: the preview grid and the joint-training (exact) grid.

  The lattice of spacing 1/m is a subset of the lattice of spacing 1/n exactly when m divides n (a point k/m is
  (k n/m)/n), so previews on the fine grid can be scored at every point of the coarse one. Checked here, before any
  training, with an error naming both spacings.

  Args:
    num_tasks: T.
    spacing: the fine lattice's step 1/n (the preview grid).
    coarse_spacing: the coarse lattice's step 1/m, with m dividing n (the exact grid; equal to `spacing` for one grid).

  Returns:
    `(simplex(num_tasks, spacing), simplex(num_tasks, coarse_spacing))`.

  Example:
    >>> from bmerge import grid
    >>> fine, coarse = grid.nested_simplex(3, 0.05, 0.1)
    >>> fine.shape, coarse.shape
    ((231, 3), (66, 3))
    >>> bool(all((fine == row).all(axis=1).any() for row in coarse))   # every coarse point is a fine one
    True
  """
  n, m = _divisions(spacing), _divisions(coarse_spacing, "coarse_spacing")
  if n % m:
    raise ValueError(f"`coarse_spacing` = {coarse_spacing!r} must be a multiple of `spacing` = {spacing!r} (1/spacing "
                     f"= {n} a multiple of 1/coarse_spacing = {m}), so that every coarse point is a fine one.")
  return simplex(num_tasks, spacing), simplex(num_tasks, coarse_spacing)


def line(spacing: float) -> np.ndarray:
  """The two-task line alpha = (a, 1 - a) for a = 0, spacing, ..., 1 ([G, 2], a ascending).

  Args:
    spacing: 1/n for an integer n.

  Returns:
    float64 [n + 1, 2].

  Example:
    >>> from bmerge import grid
    >>> grid.line(0.5).tolist()
    [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
  """
  n = _divisions(spacing)
  a = np.arange(n + 1) / float(n)
  return np.stack([a, 1.0 - a], axis=1)


def pair_edges(alphas, *, atol: float = 1e-9) -> dict[tuple[int, int], np.ndarray]:
  """The two-task lines inside a grid: for every pair of tasks i < j, the rows where only tasks i and j have weight.

  On a simplex grid these are the edges of the simplex (alpha_i + alpha_j = 1), so a T-task preview also gives the
  two-task curves of every pair (paper Fig. 5) without merging again; a vertex belongs to the T - 1 edges that meet
  there.

  Args:
    alphas: [G, T] non-negative task weights, T >= 2.
    atol: weights at most this large count as zero.

  Returns:
    (i, j) -> int64 row indices, sorted by increasing alpha_i (then by row).

  Example:
    >>> from bmerge import grid
    >>> a = grid.simplex(3, 0.5)      # (1,0,0) (.5,.5,0) (.5,0,.5) (0,1,0) (0,.5,.5) (0,0,1)
    >>> {pair: rows.tolist() for pair, rows in grid.pair_edges(a).items()}
    {(0, 1): [3, 1, 0], (0, 2): [5, 2, 0], (1, 2): [5, 4, 3]}
  """
  a = _nonnegative(alphas, "alphas", "[G, T]")
  if a.shape[1] < 2:
    raise ValueError(f"`alphas` must have T >= 2 task weights per row, got shape {a.shape}.")
  nonzero = a > atol
  out = {}
  for i, j in itertools.combinations(range(a.shape[1]), 2):
    others = np.delete(nonzero, [i, j], axis=1)
    rows = np.flatnonzero(~np.any(others, axis=1) & np.any(nonzero[:, [i, j]], axis=1))
    out[(i, j)] = rows[np.argsort(a[rows, i], kind="stable")].astype(np.int64)
  return out


def dirichlet(key: jax.Array, num_tasks: int, num_points: int, concentration: float = 1.0) -> jax.Array:
  r"""`num_points` samples from Dirichlet(concentration * 1) on the simplex ([G, T]); concentration 1 is uniform.

  Each weight is marginally :math:`\alpha_t \sim \mathrm{Beta}(c, (T - 1) c)`, with mean 1/T and variance
  :math:`(T - 1) / (T^2 (T c + 1))`: a large concentration c gathers the points near the uniform weighting, a small
  one pushes them to the vertices.

  Args:
    key: PRNG key of the draw.
    num_tasks: T.
    num_points: G.
    concentration: c > 0.

  Returns:
    [G, T] points of the simplex.

  Example:
    >>> import jax
    >>> from bmerge import grid
    >>> grid.dirichlet(jax.random.key(0), 3, 4).shape
    (4, 3)
  """
  num_tasks = _checks.positive_int(num_tasks, "num_tasks")
  num_points = _checks.positive_int(num_points, "num_points")
  if isinstance(concentration, bool) or not isinstance(concentration, (int, float, np.floating, np.integer)) or not (
      math.isfinite(concentration) and concentration > 0):
    raise ValueError(f"`concentration` must be a finite number > 0, got {concentration!r}.")
  return jax.random.dirichlet(key, jnp.full((num_tasks,), concentration), shape=(num_points,))


def refine(points: np.ndarray, spacing: float, radius: int = 1) -> np.ndarray:
  """A finer simplex lattice (step `spacing`) restricted to within `radius` steps of any of `points` ([N, T]).

  Use it to zoom in around the best alphas of a coarse preview: `refine(top_k_alphas, 0.01)`. Points are snapped to
  the fine lattice.

  Args:
    points: [N, T] centres (e.g. the best alphas of a coarse preview).
    spacing: the fine lattice's step, 1/n.
    radius: how many fine steps around each point (>= 0).

  Returns:
    float64 [G, T]: the unique lattice points, each with max_t |alpha_t - p_t| <= radius * spacing for some p.

  Example:
    >>> from bmerge import grid
    >>> grid.refine([[0.5, 0.5]], 0.1).tolist()
    [[0.6, 0.4], [0.5, 0.5], [0.4, 0.6]]
  """
  points = np.atleast_2d(np.asarray(points, dtype=np.float64))
  num_tasks = points.shape[1]
  n = _divisions(spacing)
  radius = _checks.positive_int(radius, "radius", allow_zero=True)
  out = set()
  offsets = itertools.product(range(-radius, radius + 1), repeat=num_tasks - 1)
  offsets = [np.asarray(o) for o in offsets]
  for p in points:
    base = np.rint(p * n).astype(np.int64)
    for off in offsets:
      head = base[:-1] + off
      last = n - head.sum()
      cand = np.append(head, last)
      if np.all(cand >= 0) and np.max(np.abs(cand - p * n)) <= radius + 0.5 + 1e-9:
        out.add(tuple(cand.tolist()))
  counts = np.asarray(sorted(out, reverse=True), dtype=np.int64).reshape(-1, num_tasks)
  return counts / float(n)


def _nonnegative(value, name: str, what: str) -> np.ndarray:
  """A non-empty, finite, non-negative float64 array of the shape `what` ("[L]" or "[G, T]")."""
  arr = _checks.numeric(value, name)
  if arr.ndim != what.count(",") + 1 or arr.size == 0:
    raise ValueError(f"`{name}` must have shape {what} with every size positive, got shape {arr.shape}.")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"`{name}` must be finite and non-negative, got {value!r:.120}.")
  return arr


def scaled(directions, lambdas) -> np.ndarray:
  r"""Task arithmetic's scaling sweep: alpha = lambda * d for every direction d and every scale lambda.

  Row `d * L + l` is `lambdas[l] * directions[d]`, so a [D * L] vector of results reshapes to [D, L]: one curve
  over lambda per direction. With the all-ones direction this is the usual sweep of Ilharco et al. (2023),
  theta_base + lambda sum_t (theta_t - theta_base), run by `bmerge.merge.task_arithmetic` (whose prior is the base
  model, weighted by gamma = 1 - T lambda); directions on the simplex give a rescaled simplex point each. Rows need
  not sum to 1, so only rules with a prior take them (simple averaging, task arithmetic, or a rule given `prior=`).

  Args:
    directions: [D, T] (or one [T]) non-negative task weights, e.g. `numpy.ones(T)` or a simplex grid.
    lambdas: [L] non-negative scales, e.g. `numpy.linspace(0, 1, 21)`.

  Returns:
    float64 [D * L, T].

  Example:
    >>> import numpy as np
    >>> from bmerge import grid
    >>> grid.scaled(np.ones(2), [0.0, 0.5, 1.0]).tolist()
    [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
  """
  d = _nonnegative(np.atleast_2d(_checks.numeric(directions, "directions")), "directions", "[D, T]")
  lam = _nonnegative(lambdas, "lambdas", "[L]")
  return (lam[None, :, None] * d[:, None, :]).reshape(-1, d.shape[1])


class Scaling(NamedTuple):
  """Where each row of a grid lies on the rays lambda * d of some directions (see `scaling`).

  Example:
    >>> import numpy as np
    >>> from bmerge import grid
    >>> grid.scaling(np.array([[0.5, 0.5], [1.0, 0.0]])).directions.tolist()   # inferred: alpha / sum(alpha)
    [[0.5, 0.5], [1.0, 0.0]]
  """

  directions: np.ndarray  # [D, T] the directions d
  lambdas: np.ndarray  # [G, D] lambda with alphas[g] = lambda * directions[d]; nan where row g is off that ray


def scaling(alphas, directions: Optional[np.ndarray] = None, *, atol: float = 1e-9) -> Scaling:
  r"""Decomposes the rows of a grid as alpha = lambda * d along given (or inferred) directions.

  For each row and direction, :math:`\lambda = lpha \cdot d / d \cdot d` (least squares), kept when
  :math:`\|lpha - \lambda d\|_\infty \le` `atol` (times max(1, |alpha|)) and lambda >= 0, so the all-zero row lies on
  every ray. Without `directions` they are inferred as the distinct rows alpha / sum(alpha) (points of the simplex,
  in order of first appearance), so lambda is the total weight sum_t alpha_t; pass the directions given to `scaled`
  to get its lambdas back.

  Args:
    alphas: [G, T] non-negative task weights.
    directions: optional [D, T] (or [T]) non-negative directions, none all zero.
    atol: tolerance of the ray test.

  Returns:
    A `Scaling(directions [D, T], lambdas [G, D])`.

  Example:
    >>> import numpy as np
    >>> from bmerge import grid
    >>> s = grid.scaling(grid.scaled(np.ones(2), [0.0, 0.5, 1.0]), np.ones(2))
    >>> s.lambdas[:, 0].tolist()
    [0.0, 0.5, 1.0]
  """
  a = _nonnegative(alphas, "alphas", "[G, T]")
  if directions is None:
    sums = a.sum(axis=1)
    rows = a[sums > 0] / sums[sums > 0, None]
    if rows.shape[0] == 0:
      raise ValueError("`alphas` has only all-zero rows; directions cannot be inferred, pass `directions`.")
    keys = np.round(rows / atol).astype(np.int64) if atol > 0 else rows
    _, first = np.unique(keys, axis=0, return_index=True)
    d = rows[np.sort(first)]
  else:
    d = _nonnegative(np.atleast_2d(_checks.numeric(directions, "directions")), "directions", "[D, T]")
    if d.shape[1] != a.shape[1]:
      raise ValueError(f"`directions` has {d.shape[1]} columns but `alphas` has T = {a.shape[1]}.")
    if np.any(np.all(d == 0, axis=1)):
      raise ValueError("`directions` has an all-zero row; every direction needs a positive weight.")
  lam = (a @ d.T) / np.sum(d * d, axis=1)  # [G, D]
  resid = np.max(np.abs(a[:, None, :] - lam[..., None] * d[None]), axis=-1)
  tol = atol * np.maximum(1.0, np.max(np.abs(a), axis=1))[:, None]
  return Scaling(directions=d, lambdas=np.where((resid <= tol) & (lam >= -atol), np.maximum(lam, 0.0), np.nan))
