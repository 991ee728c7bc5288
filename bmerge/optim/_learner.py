"""Internals shared by the natural-gradient learners (`von`, `mog`) and the drivers of `bmerge.fit`.

Boundary checks (once, in Python, values only when concrete), Gaussian noise, symmetrisation, step-size halving and
the compiled loop over pre-split keys. Nothing here is public.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

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
