r"""The baselines of the Pareto-front benchmark (`experiments/pareto.py`): where to spend B exact runs without
bmerge.pareto's calibrated preview.

Every method chooses rows of a candidate grid `alphas` [G, T] and learns their exact values only by calling
`exact_fn` ([n, T] alphas -> [n, T] per-task values, larger is better), so what it learns is what the benchmark
scores. All values are "larger is better" here (the benchmark flips minimised tasks first).

* `preview_front`: B rows greedily by hypervolume contribution on the preview's own values (no exact run informs
  the choice);
* `uniform`: a space-filling design, the greedy maximin (farthest-point) sequence on a fine simplex lattice from the
  first vertex, each design point snapped to the nearest grid row not taken yet;
* `random`: Dirichlet(1) draws snapped to the nearest grid row not taken yet;
* `quadratic_surrogate`: MAP-style (Li et al., 2024): ceil(B / 2) random rows, one quadratic per task over alpha fitted
  to them by least squares (minimum norm where underdetermined), the other rows greedily by hypervolume contribution
  on the quadratics' predictions;
* `ehvi_cold`: multi-objective Bayesian optimisation without previews: T + 1 random rows, then one row at a time by
  expected hypervolume improvement (Emmerich et al., 2006) under independent Gaussian-process posteriors per task
  (squared-exponential kernel over alpha, length scale by leave-one-out, bmerge.pareto's GP). Written here in numpy:
  the maintained EHVI libraries (BoTorch, Trieste) need PyTorch or TensorFlow.

The hypervolume improvement of a point y over a set S with reference r is computed exactly on the grid of cells that
the coordinates of S cut the first T - 1 axes into: in a cell :math:`C = \prod_{t<T} [l_t, u_t]` the region S dominates
is :math:`C \times [r_T, z_C]` with :math:`z_C` the largest last coordinate of the points that cover C, so

.. math:: \mathrm{HVI}(y) = \sum_C \prod_{t<T} (\min(y_t, u_t) - l_t)_+ \, (y_T - z_C)_+ ,

and with independent Gaussian :math:`y_t \sim N(\mu_t, \sigma_t^2)` every factor has a closed-form expectation,
:math:`E[(\min(y, u) - l)_+] = h(l) - h(u)` with :math:`h(a) = E[(y - a)_+] = \sigma \varphi(z) + (\mu - a)\Phi(z)`,
:math:`z = (\mu - a) / \sigma`, which gives the EHVI exactly for any T.

References:
  Li, Zhang, Lin, Kwok, Lin. Model merging with amortized Pareto fronts (MAP), 2024.
  Emmerich, Giannakoglou, Naujoks. Single- and multiobjective evolutionary optimization assisted by Gaussian random
  field metamodels. IEEE TEC, 2006 (expected hypervolume improvement).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import scipy.special

from bmerge.assess import metrics
from bmerge.assess import pareto
from bmerge.grid import lattice


def _cells(base: np.ndarray, reference: np.ndarray):
  """(lower [C, T-1], upper [C, T-1], z [C]) of the cells the points `base` cut the first T - 1 axes into."""
  t = len(reference)
  base = np.maximum(np.asarray(base, np.float64).reshape(-1, t), reference)  # below r a point adds nothing
  edges = [np.unique(np.concatenate([[reference[d]], base[:, d], [np.inf]])) for d in range(t - 1)]
  lo = np.stack(np.meshgrid(*[e[:-1] for e in edges], indexing="ij"), -1).reshape(-1, t - 1)
  hi = np.stack(np.meshgrid(*[e[1:] for e in edges], indexing="ij"), -1).reshape(-1, t - 1)
  covers = np.all(base[None, :, :t - 1] >= hi[:, None, :], axis=-1)  # [C, N]: point n covers cell c
  z = np.max(np.where(covers, base[None, :, t - 1], reference[t - 1]), axis=1) if len(base) else np.full(
      len(lo), reference[t - 1])
  return lo, hi, z


def _tail(mean, std, at):
  """h(a) = E[(y - a)_+] for y ~ N(mean, std^2) (std None: (mean - a)_+, and 0 at a = inf)."""
  if std is None:
    return np.maximum(mean - at, 0.0)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    z = (mean - at) / std
    out = std * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) + (mean - at) * scipy.special.ndtr(z)
  out = np.where(std > 0, out, np.maximum(mean - at, 0.0))
  return np.where(np.isinf(at), 0.0, out)


def hv_improvement(points, base, reference, std=None) -> np.ndarray:
  r"""The hypervolume improvement of each row of `points` over the set `base`, or its expectation under
  independent Gaussians (`std`), exactly, for any T (maximisation; see the module docstring).

  Args:
    points: [N, T] the points y (the Gaussians' means with `std`).
    base: [M, T] the set S (M may be 0).
    reference: [T] the reference point r.
    std: optional [N, T] standard deviations; None for the improvement itself.

  Returns:
    [N] HV(S + {y}; r) - HV(S; r), or its expectation.

  Example:
    >>> import numpy as np
    >>> from experiments.pareto_baselines import hv_improvement
    >>> hv_improvement([[2.0, 2.0], [1.0, 3.0]], [[3.0, 1.0]], [0.0, 0.0]).tolist()   # 4 - 2 * 1; 3 - 1 * 1
    [2.0, 2.0]
  """
  points = np.asarray(points, np.float64)
  reference = np.asarray(reference, np.float64)
  std = None if std is None else np.asarray(std, np.float64)
  lo, hi, z = _cells(base, reference)
  out = np.zeros(len(points))
  for start in range(0, len(points), 256):  # [256, C, T] at a time
    mu = points[start:start + 256, None, :]
    sd = None if std is None else std[start:start + 256, None, :]
    side = _tail(mu[..., :-1], None if sd is None else sd[..., :-1], lo[None]) - _tail(
        mu[..., :-1], None if sd is None else sd[..., :-1], hi[None])
    last = _tail(mu[..., -1], None if sd is None else sd[..., -1], z[None])
    out[start:start + 256] = np.sum(np.prod(side, axis=-1) * last, axis=1)
  return out


def greedy_hv(values, count: int, reference, *, base=None, taken=None) -> list[int]:
  """`count` rows of `values` [G, T], one at a time by hypervolume contribution over `base` and the rows chosen
  before (ties: the first row); once nothing adds volume, the first rows not taken.

  Example:
    >>> from experiments.pareto_baselines import greedy_hv
    >>> greedy_hv([[3.0, 1.0], [2.0, 2.0], [1.0, 1.0], [1.0, 3.0]], 2, [0.0, 0.0])
    [1, 0]
  """
  values = np.asarray(values, np.float64)
  chosen = np.zeros(len(values), dtype=bool) if taken is None else np.asarray(taken, bool).copy()
  base = np.zeros((0, values.shape[1])) if base is None else np.asarray(base, np.float64).reshape(-1, values.shape[1])
  # A dominated row never adds more than the row dominating it: the non-dominated rows suffice while they add.
  front = metrics.pareto_front(values)
  picks = []
  for _ in range(min(count, int(np.sum(~chosen)))):
    left = front[~chosen[front]]
    gains = hv_improvement(values[left], base, reference) if len(left) else np.zeros(0)
    best = int(left[np.argmax(gains)]) if len(left) and np.max(gains) > 0 else int(np.flatnonzero(~chosen)[0])
    picks.append(best)
    chosen[best] = True
    base = np.vstack([base, values[best]])
  return picks


def _snap(alphas: np.ndarray, targets: np.ndarray, taken: np.ndarray) -> list[int]:
  """Each target to the nearest grid row not taken yet (in order; ties: the first row)."""
  taken = taken.copy()
  out = []
  for a in targets:
    d = np.sum((alphas - a) ** 2, axis=1)
    d[taken] = np.inf
    i = int(np.argmin(d))
    out.append(i)
    taken[i] = True
  return out


def _rows(alphas: np.ndarray, picks: list[int], exact_fn: Callable) -> np.ndarray:
  return np.asarray(exact_fn(alphas[np.asarray(picks, dtype=np.int64)]), np.float64).reshape(len(picks), -1)


def preview_front(alphas, preview, budget: int) -> list[int]:
  """B rows by hypervolume contribution on the preview's own values (reference: `metrics.front_reference` of them)."""
  preview = np.asarray(preview, np.float64)
  return greedy_hv(preview, budget, metrics.front_reference(preview))


def uniform_design(alphas, budget: int, exact_fn: Optional[Callable] = None) -> list[int]:
  """The space-filling design: greedy maximin on a fine lattice from the first vertex, snapped to the grid.

  Example:
    >>> from bmerge import grid
    >>> from experiments.pareto_baselines import uniform_design
    >>> a = grid.simplex(3, 0.25)
    >>> a[uniform_design(a, 4)].tolist()   # the three vertices, then the nearest row to the centre
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.25, 0.25]]
  """
  alphas = np.asarray(alphas, np.float64)
  t = alphas.shape[1]
  fine = lattice.simplex(t, {2: 0.005, 3: 0.02}.get(t, 0.1))
  design = [int(np.argmax(fine[:, 0]))]
  dist = np.sum((fine - fine[design[0]]) ** 2, axis=1)
  while len(design) < min(budget, len(alphas)):
    design.append(int(np.argmax(dist)))  # ties: the first lattice row
    dist = np.minimum(dist, np.sum((fine - fine[design[-1]]) ** 2, axis=1))
  picks = _snap(alphas, fine[design], np.zeros(len(alphas), dtype=bool))
  if exact_fn is not None:
    _rows(alphas, picks, exact_fn)
  return picks


def random_design(alphas, budget: int, rng: np.random.Generator, exact_fn: Optional[Callable] = None,
           taken=None) -> list[int]:
  """Dirichlet(1) draws, each snapped to the nearest grid row not taken yet."""
  alphas = np.asarray(alphas, np.float64)
  taken = np.zeros(len(alphas), dtype=bool) if taken is None else np.asarray(taken, bool)
  count = min(budget, int(np.sum(~taken)))
  picks = _snap(alphas, rng.dirichlet(np.ones(alphas.shape[1]), size=count), taken)
  if exact_fn is not None and picks:
    _rows(alphas, picks, exact_fn)
  return picks


def _quadratic_features(alphas: np.ndarray) -> np.ndarray:
  """[1, a_1..a_{T-1}, a_i a_j (i <= j < T)]: a full quadratic on the simplex (a_T = 1 - the others)."""
  free = alphas[:, :-1]
  i, j = np.triu_indices(free.shape[1])
  return np.concatenate([np.ones((len(alphas), 1)), free, free[:, i] * free[:, j]], axis=1)


def quadratic_surrogate(alphas, budget: int, exact_fn: Callable, rng: np.random.Generator) -> list[int]:
  """ceil(B / 2) random rows, a quadratic per task fitted to them, the rest by HV contribution on its predictions."""
  alphas = np.asarray(alphas, np.float64)
  first = random_design(alphas, math.ceil(budget / 2), rng)
  seen = _rows(alphas, first, exact_fn)
  features = _quadratic_features(alphas)
  coef = np.linalg.lstsq(features[first], seen, rcond=None)[0]  # minimum norm where underdetermined
  predicted = features @ coef
  predicted[first] = seen
  taken = np.isin(np.arange(len(alphas)), first)
  rest = greedy_hv(predicted, budget - len(first), metrics.front_reference(predicted), base=seen, taken=taken)
  if rest:
    _rows(alphas, rest, exact_fn)
  return first + rest


def _gp(alphas: np.ndarray, train: np.ndarray, values: np.ndarray):
  """Per task, bmerge.pareto's GP on the values less their mean (length scale by leave-one-out): mean and std."""
  mean, std = np.zeros((len(alphas), values.shape[1])), np.zeros((len(alphas), values.shape[1]))
  for task in range(values.shape[1]):
    y = values[:, task] - values[:, task].mean()
    fits = [pareto._gp_fit(train, y, length) for length in pareto._LENGTH_SCALES]  # pylint: disable=protected-access
    state = min(fits, key=lambda f: float(np.mean(f[1] ** 2)))[0]
    m, s = pareto._gp_predict(state, alphas)  # pylint: disable=protected-access
    mean[:, task], std[:, task] = m + values[:, task].mean(), s
  return mean, std


def ehvi_cold(alphas, budget: int, exact_fn: Callable, rng: np.random.Generator) -> list[int]:
  """T + 1 random rows, then one at a time by expected hypervolume improvement under per-task GPs."""
  alphas = np.asarray(alphas, np.float64)
  picks = random_design(alphas, min(budget, alphas.shape[1] + 1), rng)
  seen = _rows(alphas, picks, exact_fn)
  while len(picks) < min(budget, len(alphas)):
    taken = np.isin(np.arange(len(alphas)), picks)
    left = np.flatnonzero(~taken)
    mean, std = _gp(alphas[left], alphas[picks], seen)
    gains = hv_improvement(mean, seen, metrics.front_reference(seen), std=std)
    if np.max(gains) > 0:
      best = int(left[np.argmax(gains)])
    else:  # nothing is expected to add volume: the row farthest from every run
      best = int(left[np.argmax(np.min(np.sum((alphas[left, None] - alphas[None, picks]) ** 2, -1), axis=1))])
    picks.append(best)
    seen = np.vstack([seen, _rows(alphas, [best], exact_fn)])
  return picks
