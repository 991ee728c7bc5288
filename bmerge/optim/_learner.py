"""Internals shared by the natural-gradient learners (`von`, `mog`) and the drivers of `bmerge.fit`.

Boundary checks (once, in Python, values only when concrete), Gaussian noise, symmetrisation, step-size halving, the
compiled loop over pre-split keys, and the diagnostics the drivers carry through their loops (`FitInfo` and the
warnings, public as `bmerge.fit.FitInfo`, `bmerge.fit.FitWarning`, ...).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bmerge import _checks

ESTIMATORS = ("hessian", "stein", "gauss_newton")
LOG_2PI = math.log(2.0 * math.pi)
MAX_HALVINGS = 50

Schedule = Union[float, Callable[[jax.Array], jax.Array]]


# ----------------------------------------------------------------------------------------------------------------
# Boundary checks.


def check_loss_fn(loss_fn: Any, expected: str = "theta [P] -> scalar loss-bar") -> None:
  if not callable(loss_fn):
    raise ValueError(f"`loss_fn` must be a function {expected}, got {loss_fn!r}.")


def check_num_samples(num_samples: Any, antithetic: bool) -> None:
  _checks.integer(num_samples, "num_samples")
  if antithetic and num_samples % 2:
    raise ValueError(f"`num_samples` must be even with `antithetic=True` (pairs eps, -eps), got {num_samples}.")


def check_estimator(estimator: Any, gauss_newton_fn: Optional[Callable], allowed=ESTIMATORS) -> None:
  if estimator not in allowed:
    raise ValueError(f"`estimator` must be one of {allowed}, got {estimator!r}.")
  if estimator == "gauss_newton" and not callable(gauss_newton_fn):
    raise ValueError("`gauss_newton_fn` must be a function theta [P] -> [P, P] (the generalised Gauss-Newton matrix "
                     f"of loss-bar) when estimator='gauss_newton', got {gauss_newton_fn!r}.")
  if estimator != "gauss_newton" and gauss_newton_fn is not None:
    raise ValueError(f"`gauss_newton_fn` is only used with estimator='gauss_newton', got estimator={estimator!r}.")


def check_step_size(value: Any, name: str, *, at_most_one: bool = False) -> None:
  """A scalar step size > 0 (and <= 1 with `at_most_one`); traced values are assumed valid."""
  if callable(value):
    raise ValueError(f"`{name}` must be a scalar step size here; schedules `count -> {name}` go to `fit`.")
  if not _checks.is_concrete(value):
    return
  arr = np.asarray(value, dtype=np.float64)
  expected = "in (0, 1]" if at_most_one else "finite and > 0"
  if arr.ndim != 0:
    raise ValueError(f"`{name}` must be a scalar step size {expected}, got shape {arr.shape}.")
  v = float(arr)
  if not (v > 0 and math.isfinite(v) and (v <= 1 or not at_most_one)):
    raise ValueError(f"`{name}` must be {expected}, got {v!r}.")


def schedule_values(value: Schedule, num_steps: int, name: str, *, at_most_one: bool = False) -> jax.Array:
  """The step sizes of `num_steps` steps: a constant, or an optax-style schedule `count -> value` (count from 0)."""
  if not callable(value):
    check_step_size(value, name, at_most_one=at_most_one)
    return jnp.full((num_steps,), value)
  values = jnp.asarray(jax.vmap(value)(jnp.arange(num_steps)))
  if values.shape != (num_steps,):
    raise ValueError(f"`{name}` schedule must return a scalar per step, got shape {values.shape[1:]}.")
  if not _checks.is_concrete(values):  # under a user's jit / vmap: values are not known, assume valid
    return values
  arr = np.asarray(values, dtype=np.float64)
  ok = (arr > 0) & np.isfinite(arr) & ((arr <= 1) | (not at_most_one))
  bad = np.flatnonzero(~ok)
  if bad.size:
    raise ValueError(f"`{name}` schedule must stay {'in (0, 1]' if at_most_one else '> 0'}; at step {bad[0]} it is "
                     f"{arr[bad[0]]!r}.")
  return values


def float_dtype(*xs) -> jnp.dtype:
  dtype = jnp.result_type(*xs)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


# ----------------------------------------------------------------------------------------------------------------
# Numerics.


def draw_noise(key: jax.Array, num_samples: int, dim: int, dtype, antithetic: bool = False) -> jax.Array:
  """eps [num_samples, dim] ~ N(0, I); with `antithetic` the second half is minus the first (pairs eps, -eps)."""
  if antithetic:
    half = jax.random.normal(key, (num_samples // 2, dim), dtype)
    return jnp.concatenate([half, -half], axis=0)
  return jax.random.normal(key, (num_samples, dim), dtype)


def sym(a: jax.Array) -> jax.Array:
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def halve_until(ok_fn: Callable[[jax.Array], jax.Array], step_size: jax.Array) -> jax.Array:
  """The largest step_size / 2^i (i = 0..MAX_HALVINGS) with ok_fn(step_size / 2^i), else 0."""

  def cond(carry):
    b, i = carry
    return jnp.logical_and(i < MAX_HALVINGS, jnp.logical_not(ok_fn(b)))

  b, _ = jax.lax.while_loop(cond, lambda c: (0.5 * c[0], c[1] + 1), (step_size, 0))
  return jnp.where(ok_fn(b), b, jnp.zeros_like(b))


def scan_steps(step_fn: Callable, state: Any, key: jax.Array, num_steps: int, xs: Any = None) -> Any:
  """`state = step_fn(keys[i], state, xs[i])[0]` for i < num_steps in one `lax.scan`, keys = split(key, num_steps).

  `step_fn` returns `(state, info)` (blackjax's convention); the infos are dropped.
  """
  keys = jax.random.split(key, num_steps)

  def body(s, args):
    k, x = args
    return step_fn(k, s, x)[0], None

  state, _ = jax.lax.scan(body, state, (keys, xs))
  return state


# ----------------------------------------------------------------------------------------------------------------
# Diagnostics of a driver's run: counters carried through the loop on the device, read once at the end (or every
# `log_every` steps of a stream), and warnings that name the setting to change.

LOSS_POINTS = 100  # the default `log_every` keeps about this many points of the loss curve
MEDIAN_SAMPLE = 2 ** 20  # the median of a curvature reads at most about this many evenly spaced entries
CURVATURE_RATIO = 100.0  # a median Hessian estimate that moves by more than this factor over a run is warned about


class FitWarning(RuntimeWarning):
  """A learner driver's run went wrong in a way that a setting (named in the message) or the data can fix."""


class CurvatureWarning(FitWarning):
  """The Hessian estimate collapsed or exploded over the run: its median moved by more than 100x."""


class NonFiniteWarning(FitWarning):
  """The loss, the params or optimizer state, or the training batches held NaN or inf."""


class FitInfo(NamedTuple):
  r"""What a learner driver's run saw: `bmerge.fit.ivon`, `adamw_sg` and `multi_ivon` with `return_info=True`.

  With n steps, k = `log_every`, l_i the loss of step i (IVON: at its Monte-Carlo samples, averaged over them) and
  theta_0 the params the run starts from,

  .. math::

    \texttt{loss}_w = \frac{1}{|S_w|} \sum_{i \in S_w} l_i, \quad S_w = \{wk, \dots, \min((w+1)k, n) - 1\},
    \qquad \texttt{distance} = \lVert m - \theta_0 \rVert_2 = \Big(\sum_j (m_j - \theta_{0j})^2\Big)^{1/2}

  over every entry j of every leaf. The curvature statistics are (min, median, max) over every entry (the median of
  at most about 2^20 evenly spaced ones) of IVON's Hessian estimate h (at the start `hess_init`, or the pretrained
  posterior's h = precision / ess - weight_decay; at the end the exported one), or for AdamW-SG of the
  squared-gradient Fisher per example, (precision - delta_0) / N, at the initial and at the trained params.

  Every field is an array; `multi_ivon` gives each a leading [num_seeds] axis (each seed's run at its last stop).
  Non-finite values are counted on the device inside the loop (no host synchronisation per step); batches are
  checked in their floating-point leaves only (an integer batch of example indices cannot hold NaN: a NaN in data
  that `loss_fn` closes over shows in the loss).

  Attributes:
    loss: [W] float32, the mean step loss of each window, W = ceil(n / k) (the last window may be shorter).
    loss_steps: [W] int32, the steps done at the end of each window: k, 2k, ..., n (the x axis of `loss`).
    distance: [] float32, how far the mean moved from the start.
    hess_start: [3] float32, (min, median, max) of the curvature at the start.
    hess_end: [3] float32, the same at the end.
    nonfinite_loss: [] int32, steps whose loss was NaN or inf.
    first_nonfinite_step: [] int32, the first of them (-1: none).
    first_nonfinite_batch: [] int32, the index of that step's batch in `batches` (the step itself, except for the
      shuffled seeds of `multi_ivon`; -1: none).
    nonfinite_update: [] int32, steps after which the params or the optimizer state held NaN or inf.
    nonfinite_data: [] int32, steps whose batch held NaN or inf.
    first_nonfinite_data: [] int32, the index of the first such batch (-1: none).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from bmerge import fit
    >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
    >>> loss_fn = lambda p, idx: 0.5 * jnp.mean((x[idx] @ p - 1.0) ** 2)
    >>> batches = np.arange(160).reshape(10, 16) % 64                        # 10 steps
    >>> q, info = fit.ivon(jax.random.key(0), loss_fn, jnp.zeros(2), batches, ess=64.0, learning_rate=0.1,
    ...                    log_every=4, return_info=True)
    >>> info.loss.shape, info.loss_steps.tolist(), int(info.first_nonfinite_step)
    ((3,), [4, 8, 10], -1)
    >>> bool(jnp.isclose(info.distance, jnp.linalg.norm(q.mean)))            # it started at zero
    True
  """

  loss: jax.Array
  loss_steps: jax.Array
  distance: jax.Array
  hess_start: jax.Array
  hess_end: jax.Array
  nonfinite_loss: jax.Array
  first_nonfinite_step: jax.Array
  first_nonfinite_batch: jax.Array
  nonfinite_update: jax.Array
  nonfinite_data: jax.Array
  first_nonfinite_data: jax.Array


COUNTS = FitInfo._fields[5:]  # nonfinite_loss, ..., first_nonfinite_data: carried as one int32 vector


class Tracker(NamedTuple):
  """The counters a driver's loop carries: steps done, the loss sums per window, `COUNTS` [6] int32 in their order."""

  step: jax.Array
  loss_sums: jax.Array
  counts: jax.Array

  def as_dict(self) -> dict:
    return {k: self.counts[..., i] for i, k in enumerate(COUNTS)}


def check_log_every(log_every: Any, num_steps: int) -> int:
  """`log_every`, or by default ceil(num_steps / LOSS_POINTS) (about 100 points of the loss curve)."""
  if log_every is None:
    return max(1, -(-num_steps // LOSS_POINTS))
  return _checks.integer(log_every, "log_every")


def tracker(num_steps: int, log_every: int) -> Tracker:
  counts = jnp.asarray([-1 if k.startswith("first_") else 0 for k in COUNTS], jnp.int32)  # -1: none yet
  return Tracker(jnp.zeros([], jnp.int32), jnp.zeros([-(-num_steps // log_every)], jnp.float32), counts)


def all_finite(tree: Any) -> jax.Array:
  """True when every entry of every floating-point leaf of `tree` is finite (other leaves are skipped)."""
  oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(oks)) if oks else jnp.asarray(True)


def track(t: Tracker, log_every: int, loss: jax.Array, state: Any, batch: Any, batch_index: Any) -> Tracker:
  """`t` after one step whose loss is `loss` on batch number `batch_index`, leaving `state` (params, opt state)."""
  bad_loss, bad_data = ~jnp.isfinite(loss), ~all_finite(batch)
  first = lambda current, bad, value: jnp.where((current < 0) & bad, jnp.asarray(value, jnp.int32), current)
  c = t.as_dict()
  new = dict(nonfinite_loss=c["nonfinite_loss"] + bad_loss,
             first_nonfinite_step=first(c["first_nonfinite_step"], bad_loss, t.step),
             first_nonfinite_batch=first(c["first_nonfinite_batch"], bad_loss, batch_index),
             nonfinite_update=c["nonfinite_update"] + ~all_finite(state),
             nonfinite_data=c["nonfinite_data"] + bad_data,
             first_nonfinite_data=first(c["first_nonfinite_data"], bad_data, batch_index))
  return Tracker(t.step + 1, t.loss_sums.at[t.step // log_every].add(jnp.asarray(loss, jnp.float32)),
                 jnp.stack([new[k] for k in COUNTS]).astype(jnp.int32))


def curvature_stats(tree: Any) -> jax.Array:
  """[3] float32: (min, median, max) over every entry of `tree`; the median of about MEDIAN_SAMPLE evenly spaced."""
  leaves = [jnp.ravel(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(tree)]
  stride = max(1, sum(x.size for x in leaves) // MEDIAN_SAMPLE)
  lo = jnp.min(jnp.stack([jnp.min(x) for x in leaves]))
  hi = jnp.max(jnp.stack([jnp.max(x) for x in leaves]))
  return jnp.stack([lo, jnp.median(jnp.concatenate([x[::stride] for x in leaves])), hi])


def distance(a: Any, b: Any) -> jax.Array:
  """|a - b|_2 over every entry of two pytrees of one structure, in float32 (or wider)."""
  sq = [jnp.sum(jnp.square(jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32)) - y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return jnp.sqrt(sum(sq))


def fit_info(t: Tracker, num_steps: int, log_every: int, start: Any, end: Any, hess_start: jax.Array,
             hess_end: jax.Array) -> FitInfo:
  """The `FitInfo` of a run of `num_steps` steps from params `start` to mean `end`, its counters `t`."""
  ends = np.minimum(np.arange(1, t.loss_sums.shape[-1] + 1) * log_every, num_steps)
  sizes = np.diff(ends, prepend=0)
  return FitInfo(loss=t.loss_sums / sizes.astype(np.float32), loss_steps=jnp.asarray(ends, jnp.int32),
                 distance=distance(end, start), hess_start=hess_start, hess_end=hess_end, **t.as_dict())


def _setting(value: Any) -> str:
  if callable(value):
    return "a schedule"
  try:
    return f"{float(value):.6g}"
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return "traced"


class Checker:
  """Warns about what a run's counters show, once per kind; silent while they are traced (under a user's jit / vmap).

  `driver` names the call in the messages ("fit.ivon"), `settings` the hyperparameters to name (e.g. beta2, hess_init,
  ess, learning_rate), `where` what the run is (" (seed 2)"), `fresh` whether h started at `hess_init` (no pretrained
  posterior).
  """

  def __init__(self, driver: str, settings: dict, where: str = "", fresh: bool = False):
    self.prefix, self.fresh = driver + where, fresh
    self.settings = ", ".join(f"{k}={_setting(v)}" for k, v in settings.items())
    self.warned = set()

  def _warn(self, kind: str, message: str, category: type, stacklevel: int) -> None:
    if kind not in self.warned:
      self.warned.add(kind)
      warnings.warn(f"{self.prefix}: {message}", category, stacklevel=stacklevel + 1)

  def nonfinite(self, counters: Union[Tracker, FitInfo], done: int, stacklevel: int = 3) -> None:
    """Non-finite batches, losses and updates among the first `done` steps."""
    t = FitInfo(*[None] * 5, **counters.as_dict()) if isinstance(counters, Tracker) else counters
    if not all(_checks.is_concrete(x) for x in jax.tree.leaves(t)):
      return
    if int(t.nonfinite_data):
      self._warn("data", f"{int(t.nonfinite_data)} of {done} training batches hold NaN or inf (the first: batch "
                 f"{int(t.first_nonfinite_data)}); the loss and the posterior cannot be trusted: clean or mask the "
                 "data before training.", NonFiniteWarning, stacklevel)
    if int(t.nonfinite_loss):
      s, b = int(t.first_nonfinite_step), int(t.first_nonfinite_batch)
      self._warn("loss", f"the loss turned non-finite at step {s} (batch {b}); {int(t.nonfinite_loss)} of {done} "
                 f"steps had a non-finite loss. {self.settings}: try a smaller learning_rate, or look for NaN/inf in "
                 f"batch {b} and in the loss function.", NonFiniteWarning, stacklevel)
    elif int(t.nonfinite_update):
      self._warn("update", f"the params or the optimizer state held NaN or inf after {int(t.nonfinite_update)} of "
                 f"{done} steps while the loss stayed finite. {self.settings}: try a smaller learning_rate.",
                 NonFiniteWarning, stacklevel)

  def curvature(self, start: jax.Array, end: jax.Array, num_steps: int, stacklevel: int = 3) -> None:
    """The median Hessian estimate moving by more than CURVATURE_RATIO between `start` and `end` ([3] statistics)."""
    if not (_checks.is_concrete(start) and _checks.is_concrete(end)):
      return
    a, b = float(start[1]), float(end[1])
    if not (a > 0 and math.isfinite(a) and math.isfinite(b)):
      return
    change = f"(its median over the params) in {num_steps} steps"
    if b * CURVATURE_RATIO < a:
      self._warn("curvature", f"{self.settings}: the Hessian estimate fell from {a:.3g} to {b:.3g} {change}, so the "
                 "steps, which scale as 1 / (h + weight_decay), grew as much; try beta2 closer to 1 or a smaller "
                 "learning rate." + (" Finetuning from pretrained params: pass their IVON posterior as init_posterior "
                                     "(h then starts from the curvature it learnt). From scratch, h falling from "
                                     "hess_init to the loss's curvature is expected: only the larger steps need care."
                                     if self.fresh else ""), CurvatureWarning, stacklevel)
    elif b > a * CURVATURE_RATIO:
      self._warn("curvature", f"{self.settings}: the Hessian estimate rose from {a:.3g} to {b:.3g} {change}, so the "
                 "steps, which scale as 1 / (h + weight_decay), shrank as much; try a hess_init closer to the loss's "
                 "curvature, beta2 closer to 1, or a larger learning rate.", CurvatureWarning, stacklevel)
