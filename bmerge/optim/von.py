"""Variational online Newton with a full covariance (Khan & Rue 2023, Sec. 1.3.2), for small models.

The user gives the total loss over a flat parameter vector, loss-bar(theta) = sum_i loss_i(theta) + R(theta), and VON
fits q(theta) = N(m, S^-1) by natural-gradient steps of size rho on E_q[loss-bar] - H(q):

  S <- (1 - rho) S + rho E_q[hess loss-bar(theta)]
  m <- m - rho S^-1 E_q[grad loss-bar(theta)]                           (with the new S)

Expectations are Monte-Carlo averages over theta_s = m + L^-T eps_s, S = L L^T, eps_s ~ N(0, I). The expected Hessian
comes from one of three estimators:

  'hessian'       mean_s hess loss-bar(theta_s)                            (exact Hessians, vmapped `jax.hessian`)
  'stein'         mean_s sym(S (theta_s - m) g_s^T) = mean_s sym(L eps_s g_s^T)   (gradients only; Stein's lemma)
  'gauss_newton'  mean_s GGN(theta_s) from a user `gauss_newton_fn(theta) -> [P, P]` (see `gauss_newton`)

The Stein estimate is indefinite in general, so by default it uses the positive-definite form of the precision step

  S <- S + rho G + rho^2 / 2 G S^-1 G,   G = H_hat - S,

which equals 1/2 S + 1/2 (S + rho G) S^-1 (S + rho G) and so stays positive definite for any symmetric G.

With rho = 1 and the expectations replaced by values at the mean, the step is Newton's method (`update` with the
gradient and Hessian at m). On a quadratic loss-bar (conjugate Bayesian linear regression) the fixed point is the
exact posterior; with antithetic samples (eps, -eps) the gradient average is exact there too, so the 'hessian'
estimator reaches it to rounding.

The posterior is exported as `bmerge.FullGaussian(m, S)` and goes straight into `bmerge.merge.hessian_weighted`.

Reference: M. E. Khan and H. Rue, "The Bayesian learning rule", JMLR 2023, Sec. 1.3.2. Used for the full-Gaussian
posteriors of the logistic-regression experiments (paper App. B.2: rho = 0.1, 3 samples, 25 iterations).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bmerge import _checks
from bmerge.posteriors import FullGaussian

ESTIMATORS = ("hessian", "stein", "gauss_newton")

Schedule = Union[float, Callable[[jax.Array], jax.Array]]


class VONState(NamedTuple):
  """The variational posterior N(mean, precision^-1)."""

  mean: jax.Array  # [P]
  precision: jax.Array  # [P, P] symmetric positive definite


class VONAlgorithm(NamedTuple):
  """`init(mean, precision) -> VONState` and a jitted `step(key, state) -> VONState` with hyperparameters bound."""

  init: Callable[..., VONState]
  step: Callable[[jax.Array, VONState], VONState]


# ----------------------------------------------------------------------------------------------------------------
# Validation (at the boundary, once, in Python).


def _check_rho(rho: Any, name: str = "rho") -> None:
  if callable(rho):
    raise ValueError(f"`{name}` must be a scalar step size in (0, 1] here; schedules `count -> rho` go to `fit`.")
  if not _checks.is_concrete(rho):
    return
  arr = np.asarray(rho, dtype=np.float64)
  if arr.ndim != 0:
    raise ValueError(f"`{name}` must be a scalar step size in (0, 1], got shape {arr.shape}.")
  if not (0.0 < float(arr) <= 1.0):
    raise ValueError(f"`{name}` must be in (0, 1], got {float(arr)!r}.")


def _check_num_samples(num_samples: Any, antithetic: bool) -> None:
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
  if antithetic and num_samples % 2:
    raise ValueError(f"`num_samples` must be even with `antithetic=True` (pairs eps, -eps), got {num_samples}.")


def _check_estimator(estimator: Any, gauss_newton_fn: Optional[Callable], allowed=ESTIMATORS) -> None:
  if estimator not in allowed:
    raise ValueError(f"`estimator` must be one of {allowed}, got {estimator!r}.")
  if estimator == "gauss_newton" and not callable(gauss_newton_fn):
    raise ValueError("`gauss_newton_fn` must be a function theta [P] -> [P, P] (the generalised Gauss-Newton matrix "
                     f"of loss-bar) when estimator='gauss_newton', got {gauss_newton_fn!r}.")
  if estimator != "gauss_newton" and gauss_newton_fn is not None:
    raise ValueError(f"`gauss_newton_fn` is only used with estimator='gauss_newton', got estimator={estimator!r}.")


def _check_loss_fn(loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise ValueError(f"`loss_fn` must be a function theta [P] -> scalar loss-bar, got {loss_fn!r}.")


def _schedule_values(rho: Schedule, num_steps: int) -> jax.Array:
  """The step sizes of `num_steps` steps: a constant, or an optax-style schedule `count -> rho` (count from 0)."""
  if callable(rho):
    values = jnp.asarray(jax.vmap(rho)(jnp.arange(num_steps)))
    if values.shape != (num_steps,):
      raise ValueError(f"`rho` schedule must return a scalar per step, got shape {values.shape[1:]}.")
    if isinstance(values, jax.core.Tracer):  # under a user's jit / vmap: values are not known, assume valid
      return values
    arr = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~((arr > 0) & (arr <= 1)))
    if bad.size:
      raise ValueError(f"`rho` schedule must stay in (0, 1]; at step {bad[0]} it is {arr[bad[0]]!r}.")
    return values
  _check_rho(rho)
  return jnp.full((num_steps,), rho)


def _float_dtype(*xs):
  dtype = jnp.result_type(*xs)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


# ----------------------------------------------------------------------------------------------------------------
# The algorithm.


def init(mean: jax.Array, precision: jax.Array) -> VONState:
  """The initial state N(mean, precision^-1), e.g. the prior or a Laplace approximation.

  Args:
    mean: [P] initial mean.
    precision: [P, P] symmetric positive-definite initial precision.

  Returns:
    A `VONState` with both arrays in one floating dtype.
  """
  return _init(mean, precision, "mean", "precision")


def _init(mean, precision, mean_name, precision_name):
  if jnp.ndim(mean) != 1:
    raise ValueError(f"`{mean_name}` must be a flat parameter vector [P], got shape {jnp.shape(mean)}.")
  p = jnp.shape(mean)[0]
  if jnp.shape(precision) != (p, p):
    raise ValueError(f"`{precision_name}` must be [P, P] = {(p, p)}, got shape {jnp.shape(precision)}.")
  _checks.finite(mean, name=mean_name)
  _checks.positive_definite(precision, name=precision_name)
  dtype = _float_dtype(mean, precision)
  return VONState(jnp.asarray(mean, dtype), jnp.asarray(precision, dtype))


def draw_noise(key: jax.Array, num_samples: int, dim: int, dtype, antithetic: bool = False) -> jax.Array:
  """eps [num_samples, dim] ~ N(0, I); with `antithetic` the second half is minus the first (pairs eps, -eps)."""
  if antithetic:
    half = jax.random.normal(key, (num_samples // 2, dim), dtype)
    return jnp.concatenate([half, -half], axis=0)
  return jax.random.normal(key, (num_samples, dim), dtype)


def sample(key: jax.Array, state: VONState, num_samples: int = 1, antithetic: bool = False) -> jax.Array:
  """theta_s = m + L^-T eps_s with S = L L^T: [num_samples, P] draws from q."""
  _check_num_samples(num_samples, antithetic)
  chol = jnp.linalg.cholesky(state.precision)
  eps = draw_noise(key, num_samples, state.mean.shape[0], state.mean.dtype, antithetic)
  return _to_theta(state.mean, chol, eps)


def _to_theta(mean, chol, eps):
  """m + L^-T eps for every row of eps [S, P]."""
  return mean + jax.scipy.linalg.solve_triangular(chol.T, eps.T, lower=False).T


def _sym(a):
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def estimate(loss_fn: Callable, theta: jax.Array, eps: jax.Array, chol: jax.Array, estimator: str = "hessian",
             gauss_newton_fn: Optional[Callable] = None) -> tuple[jax.Array, jax.Array]:
  """Monte-Carlo estimates of E_q[grad loss-bar] [P] and E_q[hess loss-bar] [P, P] from samples theta [S, P].

  `eps` [S, P] is the noise that made the samples (theta = m + L^-T eps) and `chol` the Cholesky factor L of the
  precision; the Stein estimator uses S (theta - m) = L eps.
  """
  grads = jax.vmap(jax.grad(loss_fn))(theta)  # [S, P]
  g_hat = jnp.mean(grads, axis=0)
  if estimator == "hessian":
    h_hat = jnp.mean(jax.vmap(jax.hessian(loss_fn))(theta), axis=0)
  elif estimator == "gauss_newton":
    h_hat = jnp.mean(jax.vmap(gauss_newton_fn)(theta), axis=0)
  elif estimator == "stein":
    # E_q[hess f] = S E_q[(theta - m) grad f^T] (Stein's lemma), symmetrised.
    h_hat = _sym(jnp.einsum("ij,sj,sk->ik", chol, eps, grads) / theta.shape[0])
  else:
    raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
  return g_hat, _sym(h_hat)


def update(state: VONState, grad_estimate: jax.Array, hess_estimate: jax.Array, rho, pd_correction: bool = False
           ) -> VONState:
  """One VON update from estimates of E_q[grad loss-bar] and E_q[hess loss-bar].

    S' = (1 - rho) S + rho H_hat                       (pd_correction=False)
    S' = S + rho G + rho^2 / 2 G S^-1 G, G = H_hat - S  (pd_correction=True; positive definite for any symmetric G)
    m' = m - rho S'^-1 g_hat

  With rho = 1, g_hat = grad loss-bar(m) and H_hat = hess loss-bar(m) this is one Newton step.
  """
  s = state.precision
  g = hess_estimate - s
  s_new = s + rho * g
  if pd_correction:
    chol = jnp.linalg.cholesky(s)
    s_new = s_new + 0.5 * rho**2 * g @ jax.scipy.linalg.cho_solve((chol, True), g)
  s_new = _sym(s_new)
  chol_new = jnp.linalg.cholesky(s_new)
  m_new = state.mean - rho * jax.scipy.linalg.cho_solve((chol_new, True), grad_estimate)
  return VONState(m_new.astype(state.mean.dtype), s_new.astype(state.precision.dtype))


def step(key: jax.Array, state: VONState, loss_fn: Callable, rho=0.1, num_samples: int = 3,
         estimator: str = "hessian", *, gauss_newton_fn: Optional[Callable] = None,
         pd_correction: Optional[bool] = None, antithetic: bool = False) -> VONState:
  """One VON step (pure; jit it with `loss_fn`, `num_samples`, `estimator`, ... static, or use `von`).

  Args:
    key: PRNG key for the Monte-Carlo noise (used once).
    state: the current `VONState`.
    loss_fn: theta [P] -> scalar loss-bar (sum of per-example losses + regulariser, i.e. -log joint).
    rho: step size in (0, 1].
    num_samples: Monte-Carlo samples per step (even with `antithetic`).
    estimator: 'hessian', 'stein' or 'gauss_newton' (see the module docstring).
    gauss_newton_fn: theta [P] -> [P, P] generalised Gauss-Newton matrix of loss-bar; needed for 'gauss_newton'.
    pd_correction: use the positive-definite precision step; default True for 'stein', False otherwise.
    antithetic: draw pairs (eps, -eps); the gradient average is then exact for a quadratic loss-bar.

  Returns:
    The new `VONState`.
  """
  _check_loss_fn(loss_fn)
  _check_rho(rho)
  _check_num_samples(num_samples, antithetic)
  _check_estimator(estimator, gauss_newton_fn)
  if pd_correction is None:
    pd_correction = estimator == "stein"
  chol = jnp.linalg.cholesky(state.precision)
  eps = draw_noise(key, num_samples, state.mean.shape[0], state.mean.dtype, antithetic)
  theta = _to_theta(state.mean, chol, eps)
  g_hat, h_hat = estimate(loss_fn, theta, eps, chol, estimator, gauss_newton_fn)
  return update(state, g_hat, h_hat.astype(state.precision.dtype), rho, pd_correction)


def von(loss_fn: Callable, rho=0.1, num_samples: int = 3, estimator: str = "hessian", *,
        gauss_newton_fn: Optional[Callable] = None, pd_correction: Optional[bool] = None,
        antithetic: bool = False) -> VONAlgorithm:
  """VON with its hyperparameters bound: `init(mean, precision)` and a jitted `step(key, state)`.

  Example:
    >>> algo = von(loss_fn, rho=0.1, num_samples=3)
    >>> state = algo.init(jnp.zeros(p), jnp.eye(p))
    >>> for key in jax.random.split(jax.random.key(0), 25):
    ...   state = algo.step(key, state)
    >>> q = posterior(state)  # bmerge.FullGaussian

  See `step` for the arguments.
  """
  _check_loss_fn(loss_fn)
  _check_rho(rho)
  _check_num_samples(num_samples, antithetic)
  _check_estimator(estimator, gauss_newton_fn)

  @jax.jit
  def step_fn(key, state):
    return step(key, state, loss_fn, rho, num_samples, estimator, gauss_newton_fn=gauss_newton_fn,
                pd_correction=pd_correction, antithetic=antithetic)

  return VONAlgorithm(init, step_fn)


def fit(key: jax.Array, loss_fn: Callable, init_mean: jax.Array, init_precision: jax.Array, num_steps: int,
        rho: Schedule = 0.1, num_samples: int = 3, estimator: str = "hessian", *,
        gauss_newton_fn: Optional[Callable] = None, pd_correction: Optional[bool] = None,
        antithetic: bool = False) -> VONState:
  """Runs `num_steps` VON steps from N(init_mean, init_precision^-1) in one compiled `lax.scan`.

  Step i uses the i-th key of `jax.random.split(key, num_steps)` and step size `rho` (a constant, or an optax-style
  schedule `count -> rho` with count = 0, 1, ...), so it reproduces a loop of `step` with those keys.

  Returns:
    The final `VONState`; `posterior(state)` is the `FullGaussian` to merge.
  """
  _check_loss_fn(loss_fn)
  _check_num_samples(num_samples, antithetic)
  _check_estimator(estimator, gauss_newton_fn)
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
    raise ValueError(f"`num_steps` must be a non-negative integer, got {num_steps!r}.")
  rhos = _schedule_values(rho, num_steps)
  state = _init(init_mean, init_precision, "init_mean", "init_precision")
  return _fit_scan(key, state, rhos.astype(state.mean.dtype), loss_fn, num_samples, estimator, gauss_newton_fn,
                   pd_correction, antithetic)


@partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _fit_scan(key, state, rhos, loss_fn, num_samples, estimator, gauss_newton_fn, pd_correction, antithetic):
  keys = jax.random.split(key, rhos.shape[0])

  def body(s, xs):
    k, r = xs
    return step(k, s, loss_fn, r, num_samples, estimator, gauss_newton_fn=gauss_newton_fn,
                pd_correction=pd_correction, antithetic=antithetic), None

  state, _ = jax.lax.scan(body, state, (keys, rhos))
  return state


def posterior(state: VONState) -> FullGaussian:
  """The fitted q = N(m, S^-1) as a `bmerge.FullGaussian` (input to `bmerge.merge.hessian_weighted`)."""
  return FullGaussian(state.mean, state.precision)


def gauss_newton(outputs_fn: Callable, output_hessian_fn: Callable,
                 regularizer_hessian: Optional[jax.Array] = None) -> Callable[[jax.Array], jax.Array]:
  """A `gauss_newton_fn` for `step`: GGN(theta) = sum_i J_i^T Lambda_i J_i (+ hess of the regulariser).

  Args:
    outputs_fn: theta [P] -> per-example outputs [N] or [N, O] (e.g. logits); J_i is their Jacobian.
    output_hessian_fn: outputs [N] or [N, O] -> the Hessian of each example's loss in its outputs, [N] or [N, O, O]
      (targets closed over), e.g. sigmoid(z)(1 - sigmoid(z)) for logistic regression, 1/sigma^2 for a Gaussian.
    regularizer_hessian: optional constant [P, P] Hessian of the regulariser (a Gaussian prior's precision).

  Returns:
    theta [P] -> [P, P], exact for losses that are linear-in-theta outputs composed with convex losses.
  """

  def ggn(theta):
    out = outputs_fn(theta)
    jac = jax.jacfwd(outputs_fn)(theta)  # [N, (O,) P]
    lam = output_hessian_fn(out)
    if jnp.ndim(out) == 1:
      res = jnp.einsum("np,n,nq->pq", jac, lam, jac)
    else:
      res = jnp.einsum("nop,nor,nrq->pq", jac, lam, jac)
    if regularizer_hessian is not None:
      res = res + regularizer_hessian
    return res

  return ggn
