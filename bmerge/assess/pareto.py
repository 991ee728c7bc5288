r"""Pareto-front estimation: the preview as a prior, a small budget of real runs to correct it.

A preview gives, for every alpha of a dense grid, a nearly free estimate p(alpha) [T] of the per-task results of
weighted multitask finetuning; an exact run e(alpha) (joint finetuning at alpha) costs a training run. `estimate`
spends a budget of B exact runs where they matter for the Pareto front of e over the grid (the view of the paper's
later version, which reads merging as Pareto-front estimation):

1. **Predict.** Every candidate's per-task value is predicted by a correction of the preview fitted to the runs
   verified so far (values compared in the "larger is better" direction, `maximize` per task):

   * ``offset``: e_t = p_t + c_t;
   * ``affine``: e_t = a_t p_t + b_t (from 3 runs);
   * ``isotonic``: e_t = g_t(p_t) with g_t non-decreasing (pool-adjacent-violators, `scipy.optimize`; slope 1
     outside the verified range; from 3 runs);
   * ``gp``: e_t = p_t + c_t + r_t(alpha), a Gaussian process on the residual over alpha (squared-exponential
     kernel, length scale chosen by leave-one-out; from 3 runs).

   For each task the model with the smallest leave-one-out error is used (ties: the simpler one); its uncertainty is
   the leave-one-out RMSE (the GP adds its posterior variance), 0 at verified alphas, whose exact values replace the
   prediction.
2. **Choose.** The candidates are the epsilon-non-dominated predicted points (epsilon: the predicted std). The next
   batch is chosen greedily by predicted hypervolume contribution,

   .. math:: \Delta(c) = \mathrm{HV}(S \cup \{\hat e(c)\}; r) - \mathrm{HV}(S; r),

   where S holds the verified exact values and the predictions of the batch's earlier picks (so a batch spreads
   over the front). Nothing depends on the budget, so the picks of a smaller budget are a prefix of a larger one's.
3. **Verify** the batch with `exact_fn`, refit, repeat until B rows were asked for.

With a callable preview the candidate set is refined around the predicted front after every batch
(`bmerge.grid.refine`, down to a quarter of the grid's spacing).

Example:
  >>> import numpy as np
  >>> from bmerge import grid, pareto
  >>> alphas = grid.simplex(2, 0.1)
  >>> exact = lambda a: np.sqrt(np.clip(a, 0, 1))            # a concave front: every alpha is Pareto-optimal
  >>> preview = 0.8 * exact(alphas) - 0.1                      # a distorted, biased preview
  >>> est = pareto.estimate(alphas, preview, exact, budget=4, key=0)
  >>> est.verified_alphas.shape, bool(np.allclose(est.verified_values, exact(est.verified_alphas)))
  ((4, 2), True)
  >>> bool(np.max(np.abs(est.predicted - exact(est.alphas))) < 1e-6)  # the affine correction is exact here
  True

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. Variational Model Merging for Pareto Front Estimation in
  Multitask Finetuning. arXiv 2412.08147 (v2).
  Zitzler & Thiele. Multiobjective evolutionary algorithms: a comparative case study and the strength Pareto
  approach. IEEE TEC, 1999 (hypervolume).
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import moocore
import numpy as np
import scipy.optimize

from bmerge import _checks
from bmerge import _fingerprint
from bmerge.assess import metrics
from bmerge.grid import lattice

__all__ = ["MODELS", "ParetoEstimate", "ParetoHistory", "estimate", "recommend"]

MODELS = ("offset", "affine", "isotonic", "gp")
_LENGTH_SCALES = (0.1, 0.2, 0.4, 0.8)


class ParetoHistory(NamedTuple):
  """One row per verified batch."""

  num_verified: np.ndarray  # [R] rows asked of exact_fn so far
  hypervolume: np.ndarray  # [R] hypervolume of the verified exact values (reference: `ParetoEstimate.reference`)
  model: np.ndarray  # [R, T] the correction chosen per task (a name of MODELS)
  loo_rmse: np.ndarray  # [R, T] its leave-one-out RMSE (NaN with fewer than 2 runs)


class ParetoEstimate(NamedTuple):
  """What `estimate` found: the verified runs and the corrected prediction at every candidate."""

  verified_alphas: np.ndarray  # [B, T] the alphas given to exact_fn, in the order chosen
  verified_values: np.ndarray  # [B, T] their exact values (NaN rows: a run that failed or returned NaN)
  alphas: np.ndarray  # [G, T] the final candidate set (the input grid, refined when `preview` is callable)
  predicted: np.ndarray  # [G, T] corrected predictions (the exact values at verified candidates)
  predicted_std: np.ndarray  # [G, T] their uncertainty (0 at verified candidates; NaN before any correction)
  front: np.ndarray  # indices into `alphas` of the predicted Pareto front
  reference: np.ndarray  # [T] the hypervolume reference point, in the values' own units
  maximize: np.ndarray  # [T] bool, per task
  history: ParetoHistory
  errors: tuple  # (alpha as a list, message) of every failed run


# ---------------------------------------------------------------------------------------------------------------
# Boundary checks.


def _signs(maximize, num_tasks: int) -> np.ndarray:
  m = np.asarray(maximize)
  if m.dtype != bool or m.ndim > 1 or (m.ndim == 1 and m.shape[0] != num_tasks):
    raise ValueError(f"`maximize` must be a bool or {num_tasks} bools (one per task), got {maximize!r}.")
  return np.where(np.broadcast_to(m, (num_tasks,)), 1.0, -1.0)


def _values(value, shape, name: str) -> np.ndarray:
  arr = np.asarray(value, dtype=np.float64)
  if arr.shape != tuple(shape):
    raise ValueError(f"`{name}` must have shape {tuple(shape)} (one value per alpha and task), got {arr.shape}.")
  if not np.all(np.isfinite(arr)):
    bad = np.argwhere(~np.isfinite(arr))[0]
    raise ValueError(f"`{name}` must be finite; row {bad[0]} has {arr[tuple(bad)]} at task {bad[1]}.")
  return arr


# ---------------------------------------------------------------------------------------------------------------
# Corrections from preview to exact, per task, chosen by leave-one-out error.


def _gp_fit(alphas, residual, length):
  scale = max(float(np.var(residual)), 1e-12)
  d2 = np.sum((alphas[:, None, :] - alphas[None, :, :]) ** 2, axis=-1)
  k = scale * np.exp(-0.5 * d2 / length ** 2) + (1e-6 + 1e-3 * scale) * np.eye(len(alphas))
  kinv = np.linalg.inv(k)
  weights = kinv @ residual
  loo = weights / np.diag(kinv)  # r_i - (prediction of r_i from the others), Rasmussen & Williams Eq. 5.12
  return (scale, length, alphas, kinv, weights), loo


def _gp_predict(state, alphas):
  scale, length, train, kinv, weights = state
  d2 = np.sum((alphas[:, None, :] - train[None, :, :]) ** 2, axis=-1)
  ks = scale * np.exp(-0.5 * d2 / length ** 2)
  var = np.maximum(scale - np.einsum("gi,ij,gj->g", ks, kinv, ks), 0.0)
  return ks @ weights, np.sqrt(var)


def _isotonic(p, e):
  order = np.argsort(p, kind="stable")
  fitted = scipy.optimize.isotonic_regression(e[order]).x
  return p[order], fitted


def _isotonic_predict(state, p):
  xs, ys = state
  inside = np.interp(p, xs, ys)
  return np.where(p < xs[0], ys[0] + p - xs[0], np.where(p > xs[-1], ys[-1] + p - xs[-1], inside))


def _fit_task(p, e, alphas):
  """The corrections that the runs allow, each as (name, predict(p, alphas) -> (mean, extra std), loo residuals)."""
  n = len(p)
  fits = []
  c = float(np.mean(e - p))
  loo = (e - p) - (c * n - (e - p)) / (n - 1) if n > 1 else np.full(n, np.nan)
  fits.append(("offset", lambda q, a, c=c: (q + c, 0.0), loo))
  if n >= 3 and np.ptp(p) > 0:
    design = np.stack([p, np.ones(n)], axis=1)
    coef = np.linalg.lstsq(design, e, rcond=None)[0]
    hat = design @ np.linalg.pinv(design)
    loo = (e - design @ coef) / np.maximum(1.0 - np.diag(hat), 1e-12)
    fits.append(("affine", lambda q, a, coef=coef: (coef[0] * q + coef[1], 0.0), loo))
  if n >= 3:
    loo = np.array([e[i] - _isotonic_predict(_isotonic(np.delete(p, i), np.delete(e, i)), p[i:i + 1])[0]
                    for i in range(n)])
    state = _isotonic(p, e)
    fits.append(("isotonic", lambda q, a, state=state: (_isotonic_predict(state, q), 0.0), loo))
    residual = e - p - c
    best = None
    for length in _LENGTH_SCALES:
      state, loo = _gp_fit(alphas, residual, length)
      if best is None or np.mean(loo ** 2) < np.mean(best[1] ** 2) - 1e-15:
        best = (state, loo)

    def gp(q, a, state=best[0]):
      mean, std = _gp_predict(state, a)
      return q + c + mean, std

    fits.append(("gp", gp, best[1]))
  return fits


def _correct(preview, alphas, verified_idx, exact_max):
  """Corrected predictions [G, T], their std [G, T], the chosen model and its LOO RMSE per task."""
  g, t = preview.shape
  ok = np.all(np.isfinite(exact_max), axis=1)
  idx, ex = np.asarray(verified_idx)[ok], exact_max[ok]
  pred, std = preview.copy(), np.full((g, t), np.nan)
  models, rmse = ["none"] * t, np.full(t, np.nan)
  if len(idx):
    for task in range(t):
      fits = _fit_task(preview[idx, task], ex[:, task], alphas[idx])
      scores = [np.sqrt(np.mean(loo ** 2)) if len(loo) > 1 else np.inf for _, _, loo in fits]
      j = int(np.argmin(scores))  # the first of equal scores: the simpler model
      name, fn, _ = fits[j]
      mean, extra = fn(preview[:, task], alphas)
      # One run has no leave-one-out error: the size of the one correction seen stands for it.
      spread = scores[j] if np.isfinite(scores[j]) else abs(ex[0, task] - preview[idx[0], task])
      pred[:, task], std[:, task] = mean, np.sqrt(spread ** 2 + np.square(extra))
      models[task], rmse[task] = name, scores[j] if np.isfinite(scores[j]) else np.nan
    pred[idx], std[idx] = ex, 0.0
  return pred, std, models, rmse


# ---------------------------------------------------------------------------------------------------------------
# Choosing where to run.


def _eps_nondominated(values, eps):
  """Rows not dominated by another row by a margin eps (per row, per task): no j with v_j >= v_i + eps_i."""
  keep = np.ones(len(values), dtype=bool)
  front = values[moocore.is_nondominated(values, maximise=True)]  # a row dominating by eps has a front row that does
  for start in range(0, len(values), 512):
    block = values[start:start + 512]
    margin = block + eps[start:start + 512]
    dominated = np.all(front[None, :, :] >= margin[:, None, :], axis=-1) & np.any(
        front[None, :, :] > margin[:, None, :], axis=-1)
    keep[start:start + 512] = ~np.any(dominated, axis=1)
  return np.flatnonzero(keep)


def _hv(points, reference):
  points = np.asarray(points, dtype=np.float64).reshape(-1, len(reference))
  points = points[np.all(np.isfinite(points), axis=1)]
  return float(moocore.hypervolume(points, ref=reference, maximise=True)) if len(points) else 0.0


def _pick(pred, std, taken, reference, count, order, alphas):
  """`count` candidate indices, greedily by predicted hypervolume contribution over the verified set."""
  eps = np.where(np.isfinite(std), std, 0.0)
  candidates = np.intersect1d(_eps_nondominated(pred, eps), np.flatnonzero(~taken))
  if len(candidates) == 0:
    candidates = np.flatnonzero(~taken)
  candidates = candidates[np.argsort(order[candidates], kind="stable")]  # ties go to the earlier in `order`
  chosen = []
  base = list(pred[taken & np.all(np.isfinite(pred), axis=1)])
  for _ in range(count):
    left = [c for c in candidates if c not in chosen]
    if not left:
      left = [c for c in np.flatnonzero(~taken) if c not in chosen]
      if not left:
        break
    now = _hv(base, reference)
    gains = np.array([_hv(base + [pred[c]], reference) - now for c in left])
    if np.max(gains) > 0:
      best = left[int(np.argmax(gains))]
    else:  # nothing predicted adds volume: spread out, away from what was run or chosen
      seen = alphas[taken | np.isin(np.arange(len(pred)), chosen)]
      dist = np.min(np.sum((alphas[left][:, None] - seen[None]) ** 2, axis=-1), axis=1) if len(seen) else \
          np.zeros(len(left))
      best = left[int(np.argmax(dist))]
    chosen.append(best)
    base.append(pred[best])
  return chosen


# ---------------------------------------------------------------------------------------------------------------
# The store of verified runs.


class _Store:
  """Verified runs on disk, keyed by the exact function's fingerprint and the alpha's bytes."""

  def __init__(self, workdir, exact_fn):
    self.folder = None
    if workdir is not None:
      _checks.workdir(workdir)
      self.folder = pathlib.Path(workdir) / "pareto" / _fingerprint.fingerprint(exact_fn)[:24]
      self.folder.mkdir(parents=True, exist_ok=True)

  def _path(self, alpha):
    return self.folder / f"{_fingerprint.fingerprint(np.asarray(alpha, np.float64))[:24]}.json"

  def get(self, alpha):
    if self.folder is None or not self._path(alpha).is_file():
      return None
    row = json.loads(self._path(alpha).read_text())
    return np.array([np.nan if v is None else v for v in row["values"]], dtype=np.float64)

  def put(self, alpha, values):
    if self.folder is None:
      return
    path = self._path(alpha)
    tmp = path.with_suffix(".tmp")
    row = {"alpha": np.asarray(alpha, np.float64).tolist(),
           "values": [None if not np.isfinite(v) else float(v) for v in values]}
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)  # atomic: a run stopped mid-write leaves no half a row


def _run_exact(exact_fn, alphas, num_tasks, store, errors):
  """exact_fn on the rows not stored yet; failures become NaN rows (reported), finished rows are stored at once."""
  out = np.full((len(alphas), num_tasks), np.nan)
  todo = []
  for i, a in enumerate(alphas):
    stored = store.get(a)
    if stored is None:
      todo.append(i)
    else:
      out[i] = stored
  if todo:
    try:
      got = np.asarray(exact_fn(np.asarray(alphas[todo])), dtype=np.float64)
      if got.shape != (len(todo), num_tasks):
        raise ValueError(f"`exact_fn` returned shape {got.shape} for {len(todo)} alphas; expected "
                         f"({len(todo)}, {num_tasks}).")
    except Exception as e:  # pylint: disable=broad-except  (a user's training run: report it, keep the others)
      for i in todo:
        errors.append((alphas[i].tolist(), f"{type(e).__name__}: {e}"))
        warnings.warn(f"exact_fn failed at alpha {alphas[i].tolist()}: {type(e).__name__}: {e}", RuntimeWarning,
                      stacklevel=3)
      return out
    for row, i in zip(got, todo):
      out[i] = row
      if not np.all(np.isfinite(row)):
        errors.append((alphas[i].tolist(), f"non-finite result {row.tolist()}"))
        warnings.warn(f"exact_fn returned {row.tolist()} at alpha {alphas[i].tolist()}", RuntimeWarning,
                      stacklevel=3)
      store.put(alphas[i], row)
  return out


# ---------------------------------------------------------------------------------------------------------------
# The estimate.


def _spacing(alphas) -> float:
  diffs = np.abs(alphas[:, None, :] - alphas[None, :, :]) if len(alphas) <= 2000 else np.abs(np.diff(alphas, axis=0))
  diffs = diffs[diffs > 1e-9]
  return float(np.min(diffs)) if diffs.size else 0.5


def estimate(alphas, preview: Union[np.ndarray, Callable[[np.ndarray], np.ndarray]],
             exact_fn: Callable[[np.ndarray], np.ndarray], budget: int, *, key: Any = 0,
             maximize: Union[bool, Sequence[bool]] = True, batch_size: int = 1, reference=None,
             workdir: Optional[str] = None) -> ParetoEstimate:
  """Estimates the Pareto front of exact per-task results over `alphas`, verifying at most `budget` alphas.

  See the module docstring for the method. Nothing but `exact_fn` is expensive; it is called once per batch.

  Args:
    alphas: [G, T] candidate weightings (T >= 2), e.g. `bmerge.grid.simplex(T, 0.05)`.
    preview: [G, T] the preview's per-task metric at each alpha, or a callable mapping [n, T] alphas to [n, T]
      previews (then the candidates are refined around the predicted front after every batch).
    exact_fn: maps [n, T] alphas to [n, T] exact per-task metrics (e.g. joint finetuning at each). A call that
      raises, or a row with NaN, is reported (a RuntimeWarning and `errors`) and counts against the budget.
    budget: the most rows `exact_fn` is ever asked for (>= 1).
    key: an int seed or a `jax.random` key; breaks ties between candidates of equal predicted contribution.
    maximize: whether larger is better, for all tasks or one bool per task.
    batch_size: alphas per call of `exact_fn` (the last batch may be smaller).
    reference: [T] the hypervolume reference point in the metrics' units; default: `metrics.front_reference` of
      the current prediction (the predicted front's nadir moved 10 % of its range further out, per task), recomputed
      after every calibration, so a preview in other units than the exact values (a biased one) does not leave it
      beyond every exact value.
    workdir: where verified runs are stored (keyed by the content of `exact_fn` and of each alpha); a rerun with the
      same inputs reads them instead of calling `exact_fn` again.

  Returns:
    A `ParetoEstimate`.
  """
  alphas = np.asarray(alphas, dtype=np.float64)
  if alphas.ndim != 2 or alphas.shape[1] < 2 or alphas.shape[0] < 1:
    raise ValueError(f"`alphas` must be a grid [G, T] with T >= 2 tasks, got shape {alphas.shape}.")
  _checks.alphas(alphas, alphas.shape[1])
  num_tasks = alphas.shape[1]
  budget = _checks.integer(budget, "budget")
  batch_size = _checks.integer(batch_size, "batch_size")
  if not callable(exact_fn):
    raise TypeError(f"`exact_fn` must be callable as exact_fn(alphas [n, T]) -> [n, T], got "
                    f"{type(exact_fn).__name__}.")
  sign = _signs(maximize, num_tasks)
  preview_fn = preview if callable(preview) else None
  values = _values(preview_fn(alphas) if preview_fn else preview, alphas.shape, "preview")
  prior = values * sign  # every task "larger is better" from here on
  if reference is None:  # follows the prediction: calibrated values may sit far from the preview's units
    ref = metrics.front_reference(prior)
  else:
    ref = _values(np.reshape(reference, (1, -1)) if np.ndim(reference) == 1 else reference, (1, num_tasks),
                  "reference")[0] * sign
  seed = int(np.asarray(key).ravel()[0]) if np.ndim(key) or isinstance(key, (int, np.integer)) else 0
  try:
    import jax  # pylint: disable=g-import-not-at-top
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
  except ImportError:
    pass
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(alphas))
  spacing = _spacing(alphas) if preview_fn is not None else 0.0  # refinement only with a callable preview
  finest = spacing / 4

  store = _Store(workdir, exact_fn)
  errors: list = []
  verified_idx: list[int] = []
  verified_vals = np.zeros((0, num_tasks))
  hist_n, hist_hv, hist_model, hist_rmse = [], [], [], []
  pred, std = prior.copy(), np.full(prior.shape, np.nan)
  while len(verified_idx) < budget:
    taken = np.isin(np.arange(len(alphas)), verified_idx)
    if taken.all():
      break
    picks = _pick(pred, std, taken, ref, min(batch_size, budget - len(verified_idx)), order, alphas)
    got = _run_exact(exact_fn, alphas[picks], num_tasks, store, errors)
    verified_idx += list(picks)
    verified_vals = np.concatenate([verified_vals, got * sign])
    if preview_fn is not None and spacing / 2 >= finest - 1e-12:
      front = np.flatnonzero(moocore.is_nondominated(pred, maximise=True))
      spacing /= 2
      fresh = lattice.refine(alphas[front], spacing)
      known = {tuple(np.round(a, 9)) for a in alphas}
      fresh = np.array([a for a in fresh if tuple(np.round(a, 9)) not in known]).reshape(-1, num_tasks)
      if len(fresh):
        alphas = np.concatenate([alphas, fresh])
        prior = np.concatenate([prior, _values(preview_fn(fresh), fresh.shape, "preview(refined alphas)") * sign])
        order = np.concatenate([order, len(order) + rng.permutation(len(fresh))])
    pred, std, models, rmse = _correct(prior, alphas, verified_idx, verified_vals)
    if reference is None:
      ref = metrics.front_reference(pred)
    hist_n.append(len(verified_idx))
    hist_model.append(models)
    hist_rmse.append(rmse)

  front = np.flatnonzero(moocore.is_nondominated(np.where(np.isfinite(pred), pred, -np.inf), maximise=True))
  hist_hv = [_hv(verified_vals[:n], ref) for n in hist_n]  # against the final reference, comparable across rows
  history = ParetoHistory(np.asarray(hist_n, dtype=np.int64), np.asarray(hist_hv),
                          np.asarray(hist_model, dtype=str).reshape(-1, num_tasks),
                          np.asarray(hist_rmse).reshape(-1, num_tasks))
  return ParetoEstimate(alphas[verified_idx], verified_vals * sign, alphas, pred * sign, std, front, ref * sign,
                        sign > 0, history, tuple(errors))


def recommend(result: ParetoEstimate, preference: Union[str, Sequence[float]] = "maximin", *,
              reference_point=None, verified_only: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
  r"""The alpha to train for a user's preference, preferring verified points.

  Utilities, in the "larger is better" direction of each task (values v, signs s = +1 to maximise, -1 to minimise):

  * weights w [T] (`preference` a sequence): :math:`\sum_t w_t s_t v_t`;
  * ``"maximin"``: :math:`\min_t s_t v_t`, the best worst task;
  * ``"reference"``: :math:`\min_t s_t (v_t - z_t)` for `reference_point` z, the achievement function that prefers
    points that dominate z by the largest margin.

  Args:
    result: a `ParetoEstimate`.
    preference: weights [T], "maximin" or "reference".
    reference_point: [T] z, with preference="reference".
    verified_only: choose among verified runs (default); False also considers predictions at unverified candidates.

  Returns:
    (alpha [T], its values [T] (exact if verified, else predicted), whether it was verified).

  Example:
    >>> import numpy as np
    >>> from bmerge import grid, pareto
    >>> alphas = grid.simplex(2, 0.25)
    >>> est = pareto.estimate(alphas, np.sqrt(alphas), np.sqrt, budget=5, key=0)   # every alpha verified
    >>> alpha, values, verified = pareto.recommend(est, "maximin")
    >>> alpha.tolist(), verified
    ([0.5, 0.5], True)
  """
  sign = np.where(result.maximize, 1.0, -1.0)
  num_tasks = len(sign)
  if isinstance(preference, str):
    if preference == "maximin":
      utility = lambda v: np.min(v * sign, axis=1)
    elif preference == "reference":
      if reference_point is None:
        raise ValueError("`reference_point` [T] is required with preference='reference'.")
      z = _values(np.reshape(reference_point, (1, -1)), (1, num_tasks), "reference_point")[0]
      utility = lambda v: np.min((v - z) * sign, axis=1)
    else:
      raise ValueError(f"`preference` must be weights [T], 'maximin' or 'reference', got {preference!r}.")
  else:
    w = _values(np.reshape(preference, (1, -1)), (1, num_tasks), "preference")[0]
    utility = lambda v: (v * sign) @ w
  ok = np.all(np.isfinite(result.verified_values), axis=1)
  options = [(result.verified_alphas[ok], result.verified_values[ok], True)]
  if not verified_only or not ok.any():
    options.append((result.alphas, result.predicted, False))
  best = None
  for a, v, verified in options:
    if len(a):
      u = utility(v)
      i = int(np.argmax(u))
      if best is None or u[i] > best[0]:
        best = (u[i], a[i], v[i], verified)
  if best is None:
    raise ValueError("`result` has neither verified runs nor predictions to recommend from.")
  return np.asarray(best[1]), np.asarray(best[2]), bool(best[3])
