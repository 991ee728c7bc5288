"""Variational online Newton with a full covariance (Khan & Rue 2023, Sec. 1.3.2), for small models.

The user gives the total loss over a flat parameter vector, loss-bar(theta) = sum_i loss_i(theta) + R(theta), and VON
fits q(theta) = N(m, S^-1) by natural-gradient steps of size rho on E_q[loss-bar] - H(q) (the variational objective of
the paper's Eq. 7, the regulariser playing the prior):

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

Each `step` returns `(state, info)` as blackjax's kernels do; `fit` runs the steps in one `lax.scan`, and
`bmerge.fit.von` starts it from a MAP with its Laplace precision.

Example:
  On a quadratic loss-bar the exact posterior is a fixed point: a step from it stays there.

  >>> import jax, jax.numpy as jnp
  >>> from bmerge.optim import von
  >>> a, b = jnp.array([[2.0, 0.5], [0.5, 1.0]]), jnp.array([1.0, -1.0])
  >>> algo = von.von(lambda t: 0.5 * t @ a @ t - b @ t, rho=0.5, num_samples=2, antithetic=True)
  >>> state = algo.init(jnp.linalg.solve(a, b), a)                 # N(A^-1 b, A^-1)
  >>> new, info = algo.step(jax.random.key(0), state)
  >>> bool(jnp.allclose(new.mean, state.mean, atol=1e-6) and jnp.allclose(new.precision, a))
  True

References:
  Khan, Rue. The Bayesian learning rule. JMLR 2023, Sec. 1.3.2.
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eq. 10; App. B.2 fits the full-Gaussian posteriors of the logistic-regression
  experiments with rho = 0.1, 3 samples, 25 iterations).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bmerge import _checks
from bmerge.optim import _learner
from bmerge.optim._learner import ESTIMATORS, Schedule, draw_noise
from bmerge.posteriors import FullGaussian

__all__ = ["ESTIMATORS", "VONAlgorithm", "VONInfo", "VONState", "draw_noise", "estimate", "fit", "gauss_newton",
           "init", "posterior", "sample", "step", "update", "von"]


class VONState(NamedTuple):
  """The variational posterior N(m, S^-1): m = `mean` [P], S = `precision` [P, P].

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> von.VONState(jnp.zeros(2), jnp.eye(2))._fields
    ('mean', 'precision')
  """

  mean: jax.Array  # [P]
  precision: jax.Array  # [P, P] symmetric positive definite


class VONInfo(NamedTuple):
  """Diagnostics of one `step`: the mean of loss-bar over its Monte-Carlo samples and the rho used.

  Example:
    >>> from bmerge.optim import von
    >>> von.VONInfo._fields
    ('loss', 'step_size')
  """

  loss: jax.Array  # [] mean of loss-bar over the step's Monte-Carlo samples
  step_size: jax.Array  # [] the rho used


class VONAlgorithm(NamedTuple):
  """`init(mean, precision) -> VONState` and a jitted `step(key, state) -> (VONState, VONInfo)` (see `von`).

  Example:
    >>> from bmerge.optim import von
    >>> algo = von.von(lambda t: 0.5 * t @ t)
    >>> isinstance(algo, von.VONAlgorithm), algo.init is von.init
    (True, True)
  """

  init: Callable[..., VONState]
  step: Callable[[jax.Array, VONState], tuple[VONState, VONInfo]]


def _check_args(loss_fn, num_samples, antithetic, estimator, gauss_newton_fn):
  _learner.check_loss_fn(loss_fn)
  _learner.check_num_samples(num_samples, antithetic)
  _learner.check_estimator(estimator, gauss_newton_fn)


# ----------------------------------------------------------------------------------------------------------------
# The algorithm.


def init(mean: jax.Array, precision: jax.Array) -> VONState:
  """The initial state N(mean, precision^-1), e.g. the prior or a Laplace approximation.

  Args:
    mean: [P] initial mean.
    precision: [P, P] symmetric positive-definite initial precision.

  Returns:
    A `VONState` with both arrays in one floating dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> von.init(jnp.zeros(2), 2.0 * jnp.eye(2)).precision.dtype
    dtype('float32')
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
  dtype = _learner.float_dtype(mean, precision)
  return VONState(jnp.asarray(mean, dtype), jnp.asarray(precision, dtype))


def sample(key: jax.Array, state: VONState, num_samples: int = 1, antithetic: bool = False) -> jax.Array:
  """theta_s = m + L^-T eps_s with S = L L^T, eps_s ~ N(0, I): [num_samples, P] draws from q.

  Args:
    key: PRNG key of the noise.
    state: the `VONState` q = N(m, S^-1).
    num_samples: S, even with `antithetic`.
    antithetic: the second half of the noise is minus the first.

  Returns:
    [num_samples, P] samples.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> theta = von.sample(jax.random.key(0), von.init(jnp.ones(2), jnp.eye(2)), num_samples=4, antithetic=True)
    >>> theta.shape, bool(jnp.allclose(theta.mean(axis=0), 1.0))       # the pairs cancel around the mean
    ((4, 2), True)
  """
  _learner.check_num_samples(num_samples, antithetic)
  chol = jnp.linalg.cholesky(state.precision)
  eps = draw_noise(key, num_samples, state.mean.shape[0], state.mean.dtype, antithetic)
  return _to_theta(state.mean, chol, eps)


def _to_theta(mean, chol, eps):
  """m + L^-T eps for every row of eps [S, P]."""
  return mean + jax.scipy.linalg.solve_triangular(chol.T, eps.T, lower=False).T


def estimate(loss_fn: Callable, theta: jax.Array, eps: jax.Array, chol: jax.Array, estimator: str = "hessian",
             gauss_newton_fn: Optional[Callable] = None) -> tuple[jax.Array, jax.Array]:
  """Monte-Carlo estimates of E_q[grad loss-bar] [P] and E_q[hess loss-bar] [P, P] from samples theta [S, P].

  `eps` [S, P] is the noise that made the samples (theta = m + L^-T eps) and `chol` the Cholesky factor L of the
  precision; the Stein estimator uses S (theta - m) = L eps.

  Args:
    loss_fn: theta [P] -> scalar loss-bar.
    theta: samples [S, P].
    eps: their noise [S, P].
    chol: the lower Cholesky factor L of the precision [P, P].
    estimator: 'hessian', 'stein' or 'gauss_newton' (see the module docstring).
    gauss_newton_fn: theta [P] -> [P, P], for 'gauss_newton'.

  Returns:
    (g_hat [P], H_hat [P, P], symmetric).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> import jax
    >>> a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    >>> estimate = jax.jit(lambda theta, eps, chol: von.estimate(lambda t: 0.5 * t @ a @ t, theta, eps, chol))
    >>> g, h = estimate(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.eye(2))
    >>> g.tolist(), bool(jnp.allclose(h, a))                        # A theta and A at theta = (1, 1)
    ([2.5, 1.5], True)
  """
  return _estimate(loss_fn, theta, eps, chol, estimator, gauss_newton_fn)[1:]


def _estimate(loss_fn, theta, eps, chol, estimator, gauss_newton_fn):
  """(mean loss-bar, E_q[grad] estimate, E_q[hess] estimate) from the samples."""
  losses, grads = jax.vmap(jax.value_and_grad(loss_fn))(theta)  # [S], [S, P]
  g_hat = jnp.mean(grads, axis=0)
  if estimator == "hessian":
    h_hat = jnp.mean(jax.vmap(jax.hessian(loss_fn))(theta), axis=0)
  elif estimator == "gauss_newton":
    h_hat = jnp.mean(jax.vmap(gauss_newton_fn)(theta), axis=0)
  elif estimator == "stein":
    # E_q[hess f] = S E_q[(theta - m) grad f^T] (Stein's lemma), symmetrised.
    h_hat = jnp.einsum("ij,sj,sk->ik", chol, eps, grads) / theta.shape[0]
  else:
    raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
  return jnp.mean(losses), g_hat, _learner.sym(h_hat)


def update(state: VONState, grad_estimate: jax.Array, hess_estimate: jax.Array, rho, pd_correction: bool = False
           ) -> VONState:
  """One VON update from estimates of E_q[grad loss-bar] and E_q[hess loss-bar].

    S' = (1 - rho) S + rho H_hat                       (pd_correction=False)
    S' = S + rho G + rho^2 / 2 G S^-1 G, G = H_hat - S  (pd_correction=True; positive definite for any symmetric G)
    m' = m - rho S'^-1 g_hat

  With rho = 1, g_hat = grad loss-bar(m) and H_hat = hess loss-bar(m) this is one Newton step.

  Args:
    state: the current `VONState`.
    grad_estimate: g_hat [P].
    hess_estimate: H_hat [P, P], symmetric.
    rho: the step size.
    pd_correction: use the positive-definite form of the precision step.

  Returns:
    The new `VONState`.

  Example:
    One Newton step (rho = 1) on the quadratic 1/2 t^T A t - b^T t from 0 lands on its minimiser A^-1 b:

    >>> import jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> a, b = jnp.array([[2.0, 0.5], [0.5, 1.0]]), jnp.array([1.0, -1.0])
    >>> new = von.update(von.init(jnp.zeros(2), jnp.eye(2)), -b, a, 1.0)   # gradient at 0 is -b
    >>> bool(jnp.allclose(new.mean, jnp.linalg.solve(a, b)))
    True
  """
  s = state.precision
  g = hess_estimate - s
  s_new = s + rho * g
  if pd_correction:
    chol = jnp.linalg.cholesky(s)
    s_new = s_new + 0.5 * rho**2 * g @ jax.scipy.linalg.cho_solve((chol, True), g)
  s_new = _learner.sym(s_new)
  chol_new = jnp.linalg.cholesky(s_new)
  m_new = state.mean - rho * jax.scipy.linalg.cho_solve((chol_new, True), grad_estimate)
  return VONState(m_new.astype(state.mean.dtype), s_new.astype(state.precision.dtype))


def step(key: jax.Array, state: VONState, loss_fn: Callable, rho=0.1, num_samples: int = 3,
         estimator: str = "hessian", *, gauss_newton_fn: Optional[Callable] = None,
         pd_correction: Optional[bool] = None, antithetic: bool = False) -> tuple[VONState, VONInfo]:
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
    `(state, info)`: the new `VONState` and a `VONInfo` (mean loss-bar over the samples, the rho used).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> step = jax.jit(lambda key, state: von.step(key, state, lambda t: 0.5 * t @ t, rho=0.5))
    >>> state, info = step(jax.random.key(0), von.init(jnp.zeros(2), jnp.eye(2)))
    >>> float(info.step_size), bool(jnp.allclose(state.precision, jnp.eye(2)))   # hess = I: S stays I
    (0.5, True)
  """
  _check_args(loss_fn, num_samples, antithetic, estimator, gauss_newton_fn)
  _learner.check_step_size(rho, "rho", at_most_one=True)
  if pd_correction is None:
    pd_correction = estimator == "stein"
  chol = jnp.linalg.cholesky(state.precision)
  eps = draw_noise(key, num_samples, state.mean.shape[0], state.mean.dtype, antithetic)
  theta = _to_theta(state.mean, chol, eps)
  loss, g_hat, h_hat = _estimate(loss_fn, theta, eps, chol, estimator, gauss_newton_fn)
  new = update(state, g_hat, h_hat.astype(state.precision.dtype), rho, pd_correction)
  return new, VONInfo(loss.astype(state.mean.dtype), jnp.asarray(rho, state.mean.dtype))


def von(loss_fn: Callable, rho=0.1, num_samples: int = 3, estimator: str = "hessian", *,
        gauss_newton_fn: Optional[Callable] = None, pd_correction: Optional[bool] = None,
        antithetic: bool = False) -> VONAlgorithm:
  """VON with its hyperparameters bound: `init(mean, precision)` and a jitted `step(key, state) -> (state, info)`.

  Args:
    loss_fn, rho, num_samples, estimator, gauss_newton_fn, pd_correction, antithetic: as in `step`.

  Returns:
    A `VONAlgorithm(init, step)`.

  Example:
    Conjugate Bayesian linear regression: VON reaches the exact posterior N(A^-1 b, A^-1).

    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> a, b = jnp.array([[2.0, 0.5], [0.5, 1.0]]), jnp.array([1.0, -1.0])
    >>> loss_fn = lambda t: 0.5 * t @ a @ t - b @ t           # loss-bar = -log joint, up to a constant
    >>> algo = von.von(loss_fn, rho=0.5, num_samples=2, antithetic=True)
    >>> state = algo.init(jnp.zeros(2), jnp.eye(2))
    >>> for key in jax.random.split(jax.random.key(0), 40):
    ...   state, info = algo.step(key, state)
    >>> q = von.posterior(state)                                # a bmerge.FullGaussian
    >>> print(jnp.allclose(q.mean, jnp.linalg.solve(a, b), atol=1e-5), jnp.allclose(q.precision, a))
    True True
  """
  _check_args(loss_fn, num_samples, antithetic, estimator, gauss_newton_fn)
  _learner.check_step_size(rho, "rho", at_most_one=True)

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
  `bmerge.fit.von` starts it from a MAP with the Laplace precision and returns the posterior.

  Args:
    key: PRNG key, split into one key per step.
    loss_fn: theta [P] -> scalar loss-bar.
    init_mean: [P].
    init_precision: [P, P] symmetric positive definite.
    num_steps: the number of steps (>= 0).
    rho: a constant step size in (0, 1] or a schedule `count -> rho`.
    num_samples, estimator, gauss_newton_fn, pd_correction, antithetic: as in `step`.

  Returns:
    The final `VONState`; `posterior(state)` is the `FullGaussian` to merge.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> a, b = jnp.array([[2.0, 0.5], [0.5, 1.0]]), jnp.array([1.0, -1.0])
    >>> state = von.fit(jax.random.key(0), lambda t: 0.5 * t @ a @ t - b @ t, jnp.zeros(2), jnp.eye(2), 30, rho=0.5,
    ...                 num_samples=2, antithetic=True)
    >>> bool(jnp.allclose(state.mean, jnp.linalg.solve(a, b), atol=1e-4))
    True
  """
  _check_args(loss_fn, num_samples, antithetic, estimator, gauss_newton_fn)
  num_steps = _checks.integer(num_steps, "num_steps", minimum=0)
  rhos = _learner.schedule_values(rho, num_steps, "rho", at_most_one=True)
  state = _init(init_mean, init_precision, "init_mean", "init_precision")
  return _fit_scan(key, state, rhos.astype(state.mean.dtype), loss_fn, num_samples, estimator, gauss_newton_fn,
                   pd_correction, antithetic)


@partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _fit_scan(key, state, rhos, loss_fn, num_samples, estimator, gauss_newton_fn, pd_correction, antithetic):
  def one(k, s, r):
    return step(k, s, loss_fn, r, num_samples, estimator, gauss_newton_fn=gauss_newton_fn,
                pd_correction=pd_correction, antithetic=antithetic)

  return _learner.scan_steps(one, state, key, rhos.shape[0], rhos)


def posterior(state: VONState) -> FullGaussian:
  """The fitted q = N(m, S^-1) as a `bmerge.FullGaussian` (input to `bmerge.merge.hessian_weighted`, Eq. 10).

  Args:
    state: a `VONState`.

  Returns:
    `FullGaussian(state.mean, state.precision)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> type(von.posterior(von.init(jnp.zeros(2), jnp.eye(2)))).__name__
    'FullGaussian'
  """
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

  Example:
    Least squares 1/2 |X theta - y|^2: outputs X theta, output Hessian 1, so GGN = X^T X.

    >>> import jax.numpy as jnp
    >>> from bmerge.optim import von
    >>> x = jnp.array([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    >>> ggn = von.gauss_newton(lambda t: x @ t, lambda out: jnp.ones_like(out))
    >>> bool(jnp.allclose(ggn(jnp.zeros(2)), x.T @ x))
    True
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
