"""Mixture-of-Gaussians variational inference by natural gradients (Lin, Khan & Schmidt 2019, Sec. 4.1).

Fits q(z) = sum_c pi_c N(z | mu_c, S_c^-1), c = 1..K (the mixture posterior of the paper's Eq. 11), to
exp(-loss-bar(z)) (loss-bar = sum of per-example losses + regulariser) by the variational objective of Eq. 7.
Each step draws z_j ~ q (c_j ~ pi, then z_j = mu_{c_j} + L_{c_j}^-T eps_j), forms the importance
weights delta_c(z) = N_c(z) / q(z) and f(z) = -loss-bar(z) - log q(z), and with step beta:

  S_c  <- S_c - beta E_q[delta_c hess f]                     (beta halved until every S_c stays positive definite)
  mu_c <- mu_c + beta S_c^-1 E_q[delta_c grad f]             (with the new S_c)
  log(pi_c / pi_K) <- log(pi_c / pi_K) + beta_w (E_q[delta_c f] - E_q[delta_K f])

E_q[delta_c h] = E_{N_c}[h], so each component sees a Newton-like step on its own region. The entropy derivatives
are in closed form: with a_c = S_c (mu_c - z) and responsibilities r_c = pi_c N_c(z) / q(z) (by logsumexp),

  -grad log q = -sum_c r_c a_c,
  -hess log q = sum_c r_c S_c - sum_c r_c a_c a_c^T + (sum_c r_c a_c)(sum_c r_c a_c)^T.

The expected loss Hessian is `jax.hessian` at the samples ('hessian'), a user Gauss-Newton matrix ('gauss_newton',
see `bmerge.optim.von.gauss_newton`), or Stein's lemma per component, E_{N_c}[hess] = E_q[delta_c sym(S_c (z - mu_c)
grad^T)] ('stein'; gradients only). With K = 1 every delta is 1, -hess log q = S and the step is VON's
(`bmerge.optim.von`): the same samples give the same trajectory when the Monte-Carlo term E[a_1] (zero in expectation)
vanishes, i.e. with antithetic samples or with `control_variate=True`.

`control_variate=True` uses E_q[delta_c grad log N_c] = 0, E_q[delta_c hess log N_c] = -S_c and
E_q[delta_c log N_c] = -entropy(N_c) exactly, i.e. estimates E[delta_c (grad f + a_c)], E[delta_c (hess f - S_c)] + S_c
and E[delta_c (f + log N_c)] - E_{N_c}[log N_c]. It is unbiased like the plain estimator; the plain one (the default,
as written above) has zero variance once q equals the target, the control variate makes K = 1 exactly VON.

`fit_diag` / `step_diag` are the same algorithm with diagonal precisions over a params pytree (larger models): every
matrix above becomes its diagonal, and the loss-Hessian diagonal comes from Stein's lemma (gradients only) or, for
small tests, from P Hessian-vector products.

The fitted q is exported as `bmerge.Mixture` (components `FullGaussian` or `DiagGaussian` with a leading K axis) and
goes straight into `bmerge.merge.mixture_weighted`.

Each `step` returns `(state, info)` as blackjax's kernels do (`MoGInfo`: the step size used after halving, the mean
loss-bar over the samples); `fit` / `fit_diag` run the steps in one `lax.scan`, and `bmerge.fit.mog` starts K
components around a MAP, spread by its Laplace covariance.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bmerge.optim import mog
  >>> state = mog.init(jnp.array([[-1.0], [1.0]]), jnp.ones((2, 1, 1)))          # K = 2 components, P = 1
  >>> q = mog.posterior(state)                                                    # a bmerge.Mixture
  >>> q.components.mean.shape, jnp.exp(q.log_weights).tolist()
  ((2, 1), [0.5, 0.5])

References:
  Lin, Khan, Schmidt. Fast and simple natural-gradient variational inference with mixture of exponential-family
  approximations. ICML 2019, Sec. 4.1.
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eqs. 11-12; App. B.2: K = 20, beta = 0.02 for means and precisions, 3e-6 for the
  weights, 3 samples, 25 iterations).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from bmerge import _checks
from bmerge import _tree
from bmerge.optim import _learner
from bmerge.optim._learner import ESTIMATORS, LOG_2PI
from bmerge.posteriors import DiagGaussian, FullGaussian, Mixture

__all__ = ["DIAG_ESTIMATORS", "DiagMoGState", "ESTIMATORS", "MoGAlgorithm", "MoGInfo", "MoGState", "fit", "fit_diag",
           "init", "init_diag", "mog", "posterior", "sample", "step", "step_diag"]

PyTree = Any
DIAG_ESTIMATORS = ("stein", "hessian")


class MoGState(NamedTuple):
  """q = sum_c exp(log_weights[c]) N(mean[c], precision[c]^-1), full [P, P] precisions.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> mog.init(jnp.zeros((3, 2)), jnp.broadcast_to(jnp.eye(2), (3, 2, 2))).precision.shape
    (3, 2, 2)
  """

  mean: jax.Array  # [K, P]
  precision: jax.Array  # [K, P, P] symmetric positive definite
  log_weights: jax.Array  # [K] normalised: logsumexp = 0


class DiagMoGState(NamedTuple):
  """q = sum_c exp(log_weights[c]) N(mean[c], diag(precision[c])^-1) over a params pytree.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> mog.init_diag({"w": jnp.zeros((2, 3))}, {"w": jnp.ones((2, 3))}).log_weights.shape
    (2,)
  """

  mean: PyTree  # params pytree, every leaf with a leading [K] axis
  precision: PyTree  # same structure and shapes as `mean`, entries > 0
  log_weights: jax.Array  # [K] normalised: logsumexp = 0


class MoGInfo(NamedTuple):
  """Diagnostics of one `step` / `step_diag`: the beta used after halving, the mean loss-bar over the samples.

  Example:
    >>> from bmerge.optim import mog
    >>> mog.MoGInfo._fields
    ('step_size', 'loss')
  """

  step_size: jax.Array  # [] the beta used, after halving until every precision stayed positive (0: no step)
  loss: jax.Array  # [] mean of loss-bar over the step's Monte-Carlo samples


class MoGAlgorithm(NamedTuple):
  """`init(mean, precision, log_weights=None)` and a jitted `step(key, state) -> (state, MoGInfo)` (see `mog`).

  Example:
    >>> from bmerge.optim import mog
    >>> algo = mog.mog(lambda z: 0.5 * z @ z)
    >>> isinstance(algo, mog.MoGAlgorithm), algo.init is mog.init
    (True, True)
  """

  init: Callable[..., Any]
  step: Callable[[jax.Array, Any], tuple[Any, MoGInfo]]


# ----------------------------------------------------------------------------------------------------------------
# Validation.


def _check_common(loss_fn, beta, beta_w, num_samples, antithetic):
  _learner.check_loss_fn(loss_fn)
  _learner.check_step_size(beta, "beta")
  if beta_w is not None:
    _learner.check_step_size(beta_w, "beta_w")
  _learner.check_num_samples(num_samples, antithetic)


def _check_log_weights(log_weights, k, dtype, name="log_weights"):
  if log_weights is None:
    return jnp.full((k,), -math.log(k), dtype)
  if jnp.shape(log_weights) != (k,):
    raise ValueError(f"`{name}` must be [K] = ({k},), got shape {jnp.shape(log_weights)}.")
  if _checks.is_concrete(log_weights):
    arr = np.asarray(log_weights, dtype=np.float64)
    if np.any(np.isnan(arr)) or np.any(arr == np.inf) or not np.any(np.isfinite(arr)):
      raise ValueError(f"`{name}` must be finite or -inf (an empty component), with at least one finite entry.")
  lw = jnp.asarray(log_weights, dtype)
  return lw - logsumexp(lw)


# ----------------------------------------------------------------------------------------------------------------
# Full-covariance components (small models).


def init(mean: jax.Array, precision: jax.Array, log_weights: Optional[jax.Array] = None) -> MoGState:
  """The initial mixture.

  Args:
    mean: [K, P] component means (K >= 1); spread them out, components that start equal stay equal.
    precision: [K, P, P] positive-definite component precisions.
    log_weights: [K] log mixture weights (normalised here); default uniform.

  Returns:
    A `MoGState` with log_weights normalised (logsumexp = 0).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> state = mog.init(jnp.zeros((2, 1)), jnp.ones((2, 1, 1)), jnp.log(jnp.array([1.0, 3.0])))
    >>> jnp.exp(state.log_weights).tolist()
    [0.25, 0.75]
  """
  return _init(mean, precision, log_weights, "")


def _init(mean, precision, log_weights, prefix):
  if jnp.ndim(mean) != 2:
    raise ValueError(f"`{prefix}mean` must be [K, P] (K components over a flat parameter vector), "
                     f"got {jnp.shape(mean)}.")
  k, p = jnp.shape(mean)
  if k < 1:
    raise ValueError(f"`{prefix}mean` must hold K >= 1 components, got K = {k}.")
  if jnp.shape(precision) != (k, p, p):
    raise ValueError(f"`{prefix}precision` must be [K, P, P] = {(k, p, p)}, got shape {jnp.shape(precision)}.")
  _checks.finite(mean, name=f"{prefix}mean")
  _checks.positive_definite(precision, name=f"{prefix}precision")
  dtype = _learner.float_dtype(mean, precision)
  return MoGState(jnp.asarray(mean, dtype), jnp.asarray(precision, dtype),
                  _check_log_weights(log_weights, k, dtype, f"{prefix}log_weights"))


def _draw(key, log_weights, num_samples, dim, dtype, antithetic):
  """Component indices c [S] and noise eps [S, P]; with K = 1 exactly VON's noise (no component draw)."""
  k = log_weights.shape[0]
  if k == 1:
    return jnp.zeros((num_samples,), jnp.int32), _learner.draw_noise(key, num_samples, dim, dtype, antithetic)
  key_eps, key_c = jax.random.split(key)
  eps = _learner.draw_noise(key_eps, num_samples, dim, dtype, antithetic)
  if antithetic:  # the pair (eps, -eps) mirrors around the same component
    c = jax.random.categorical(key_c, log_weights, shape=(num_samples // 2,))
    c = jnp.concatenate([c, c])
  else:
    c = jax.random.categorical(key_c, log_weights, shape=(num_samples,))
  return c, eps


def sample(key: jax.Array, state: MoGState, num_samples: int = 1) -> jax.Array:
  """[num_samples, P] draws from q: c_j ~ pi, then z_j = mu_{c_j} + L_{c_j}^-T eps_j, S_c = L_c L_c^T.

  Args:
    key: PRNG key of the draws.
    state: the `MoGState`.
    num_samples: how many draws.

  Returns:
    [num_samples, P].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> state = mog.init(jnp.array([[-5.0], [5.0]]), 1e4 * jnp.ones((2, 1, 1)))      # two narrow components
    >>> z = mog.sample(jax.random.key(0), state, num_samples=6)
    >>> z.shape, bool(jnp.all(jnp.abs(jnp.abs(z) - 5.0) < 0.1))
    ((6, 1), True)
  """
  _learner.check_num_samples(num_samples, False)
  chol = jnp.linalg.cholesky(state.precision)
  c, eps = _draw(key, state.log_weights, num_samples, state.mean.shape[1], state.mean.dtype, False)
  return _full_theta(state.mean, chol, c, eps)


def _full_theta(mean, chol, c, eps):
  lt = jnp.swapaxes(chol[c], -1, -2)  # [S, P, P] upper factors L_c^T
  return mean[c] + jax.vmap(lambda u, e: jax.scipy.linalg.solve_triangular(u, e, lower=False))(lt, eps)


def _full_expectations(state, loss_fn, z, estimator, gauss_newton_fn, control_variate):
  """E_q[delta_c grad f] [K, P], E_q[delta_c hess f] [K, P, P], E_q[delta_c f] [K] and the mean loss from z [S, P]."""
  mean, prec, log_w = state.mean, state.precision, state.log_weights
  chol = jnp.linalg.cholesky(prec)
  n = z.shape[0]
  diff = mean[None] - z[:, None]  # [S, K, P] mu_c - z
  a = jnp.einsum("kpq,skq->skp", prec, diff)  # a_c = S_c (mu_c - z)
  half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)  # [K]
  log_n = -0.5 * jnp.einsum("skp,skp->sk", diff, a) + half_logdet - 0.5 * z.shape[1] * LOG_2PI  # [S, K]
  log_joint = log_w + log_n
  log_q = logsumexp(log_joint, axis=1)  # [S]
  r = jnp.exp(log_joint - log_q[:, None])  # responsibilities
  delta = jnp.exp(log_n - log_q[:, None])  # N_c / q
  abar = jnp.einsum("sk,skp->sp", r, a)

  losses, grads = jax.vmap(jax.value_and_grad(loss_fn))(z)
  f = -losses - log_q  # [S]
  grad_f = -grads - abar  # [S, P]
  neg_hess_log_q = (jnp.einsum("sk,kpq->spq", r, prec) - jnp.einsum("sk,skp,skq->spq", r, a, a)
                    + jnp.einsum("sp,sq->spq", abar, abar))
  if estimator == "stein":  # per component: E_{N_c}[hess loss] = E_q[delta_c sym(S_c (z - mu_c) grad^T)]
    loss_h = _learner.sym(jnp.einsum("sk,skp,sq->kpq", delta, -a, grads)) / n
  else:
    h = jax.vmap(jax.hessian(loss_fn))(z) if estimator == "hessian" else jax.vmap(gauss_newton_fn)(z)
    loss_h = jnp.einsum("sk,spq->kpq", delta, _learner.sym(h)) / n
  e_hess = -loss_h + jnp.einsum("sk,spq->kpq", delta, neg_hess_log_q) / n
  if control_variate:
    e_grad = jnp.einsum("sk,skp->kp", delta, grad_f[:, None] + a) / n
    e_hess = e_hess + prec * (1.0 - jnp.mean(delta, axis=0))[:, None, None]
    neg_entropy = half_logdet - 0.5 * z.shape[1] * (1.0 + LOG_2PI)  # E_{N_c}[log N_c]
    e_f = jnp.einsum("sk,sk->k", delta, f[:, None] + log_n) / n - neg_entropy
  else:
    e_grad = jnp.einsum("sk,sp->kp", delta, grad_f) / n
    e_f = jnp.einsum("sk,s->k", delta, f) / n
  return e_grad, _learner.sym(e_hess), e_f, jnp.mean(losses)


def _update_weights(log_w, e_f, beta_w):
  """log(pi_c / pi_K) += beta_w (E[delta_c f] - E[delta_K f]), then renormalised (empty components stay empty)."""
  # Adding the same constant to every log weight changes nothing after normalising, so log pi_K's own term cancels.
  v = jnp.where(jnp.isfinite(log_w), log_w + beta_w * (e_f - e_f[-1]), -jnp.inf)
  return v - logsumexp(v)


def step(key: jax.Array, state: MoGState, loss_fn: Callable, beta=0.02, beta_w=None, num_samples: int = 3,
         estimator: str = "hessian", *, gauss_newton_fn: Optional[Callable] = None, antithetic: bool = False,
         control_variate: bool = False) -> tuple[MoGState, MoGInfo]:
  """One natural-gradient step of mixture VI (pure; see the module docstring for the math).

  Args:
    key: PRNG key (split inside into the component draw and the noise; with K = 1 used as VON uses it).
    state: the current `MoGState`.
    loss_fn: z [P] -> scalar loss-bar (-log of the unnormalised target).
    beta: step size for means and precisions (> 0; halved within the step until every precision stays PD).
    beta_w: step size for the log mixture weights (> 0); default 0.01 * beta. Halved together with beta.
    num_samples: Monte-Carlo samples from q per step (even with `antithetic`).
    estimator: 'hessian', 'stein' or 'gauss_newton' for E[delta_c hess loss-bar].
    gauss_newton_fn: theta [P] -> [P, P] GGN of loss-bar, for 'gauss_newton'.
    antithetic: pairs (eps, -eps) around the same component.
    control_variate: subtract each component's own score (unbiased; see the module docstring).

  Returns:
    `(state, info)`: the new `MoGState` and a `MoGInfo` (the beta used after halving, the mean loss-bar).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> step = jax.jit(lambda key, state: mog.step(key, state, lambda z: 0.5 * z @ z, beta=0.1))
    >>> state, info = step(jax.random.key(0), mog.init(jnp.array([[-1.0], [1.0]]), jnp.ones((2, 1, 1))))
    >>> state.mean.shape, round(float(info.step_size), 6)
    ((2, 1), 0.1)
  """
  _check_common(loss_fn, beta, beta_w, num_samples, antithetic)
  _learner.check_estimator(estimator, gauss_newton_fn, ESTIMATORS)
  dtype = state.mean.dtype
  chol = jnp.linalg.cholesky(state.precision)
  c, eps = _draw(key, state.log_weights, num_samples, state.mean.shape[1], dtype, antithetic)
  z = _full_theta(state.mean, chol, c, eps)
  e_grad, e_hess, e_f, loss = _full_expectations(state, loss_fn, z, estimator, gauss_newton_fn, control_variate)

  def new_prec(b, e_hess):
    return _learner.sym(state.precision - b * e_hess)

  def new_mean(b, prec, e_grad):
    chol_new = jnp.linalg.cholesky(prec)
    return state.mean + b * jax.vmap(lambda l, g: jax.scipy.linalg.cho_solve((l, True), g))(chol_new, e_grad)

  ok = lambda b, e_hess: jnp.all(jnp.isfinite(jnp.linalg.cholesky(new_prec(b, e_hess))))
  mean, prec, log_w, info = _natural_step(state.log_weights, e_grad, e_hess, e_f, loss, beta, beta_w, ok, new_prec,
                                          new_mean)
  return MoGState(mean.astype(dtype), prec.astype(dtype), log_w), info


def _natural_step(log_w, e_grad, e_hess, e_f, loss, beta, beta_w, ok, new_prec, new_mean):
  """The update shared by full and diagonal components: beta halved until `ok(beta, e_hess)`, then the precisions
  `new_prec(beta, e_hess)`, the means `new_mean(beta, prec, e_grad)` and the log weights.

  `e_grad` and `e_hess` carry a leading K axis; an empty (-inf weight) component keeps its parameters. Returns
  (mean, precision, log_weights, MoGInfo).
  """
  dtype = log_w.dtype
  beta = jnp.asarray(beta, dtype)
  beta_w = 0.01 * beta if beta_w is None else jnp.asarray(beta_w, dtype)
  alive = jnp.isfinite(log_w)
  e_grad = jnp.where(alive.reshape((-1,) + (1,) * (e_grad.ndim - 1)), e_grad, 0.0)
  e_hess = jnp.where(alive.reshape((-1,) + (1,) * (e_hess.ndim - 1)), e_hess, 0.0)
  b = _learner.halve_until(lambda b: ok(b, e_hess), beta)
  prec = new_prec(b, e_hess)
  mean = new_mean(b, prec, e_grad)
  log_w = _update_weights(log_w, e_f, beta_w * (b / beta)).astype(dtype)
  return mean, prec, log_w, MoGInfo(b, loss.astype(dtype))


def mog(loss_fn: Callable, beta=0.02, beta_w=None, num_samples: int = 3, estimator: str = "hessian", *,
        gauss_newton_fn: Optional[Callable] = None, antithetic: bool = False,
        control_variate: bool = False) -> MoGAlgorithm:
  """Mixture VI with its hyperparameters bound: `init(mean, precision, log_weights=None)` and a jitted
  `step(key, state) -> (state, info)`.

  Args:
    loss_fn, beta, beta_w, num_samples, estimator, gauss_newton_fn, antithetic, control_variate: as in `step`.

  Returns:
    A `MoGAlgorithm(init, step)`.

  Example:
    Two components fit the bimodal target 0.3 N(-2, 0.5^2) + 0.7 N(2, 0.5^2) exactly: weights, means, precisions.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.scipy.stats import norm
    >>> from bmerge.optim import mog
    >>> def loss_fn(z):                                     # -log target
    ...   return -jnp.logaddexp(jnp.log(0.3) + norm.logpdf(z[0], -2.0, 0.5), jnp.log(0.7) + norm.logpdf(z[0], 2.0, 0.5))
    >>> algo = mog.mog(loss_fn, beta=0.2, beta_w=0.1, num_samples=10)
    >>> state = algo.init(jnp.array([[-3.0], [3.0]]), jnp.ones((2, 1, 1)))
    >>> for key in jax.random.split(jax.random.key(0), 100):
    ...   state, info = algo.step(key, state)
    >>> q = mog.posterior(state)                            # a bmerge.Mixture of FullGaussian components
    >>> show = lambda x: np.round(np.asarray(x, np.float64), 2)
    >>> print(show(jnp.exp(q.log_weights)), show(q.components.mean[:, 0]), show(q.components.precision[:, 0, 0]))
    [0.3 0.7] [-2.  2.] [4. 4.]
  """
  _check_common(loss_fn, beta, beta_w, num_samples, antithetic)
  _learner.check_estimator(estimator, gauss_newton_fn, ESTIMATORS)

  @jax.jit
  def step_fn(key, state):
    return step(key, state, loss_fn, beta, beta_w, num_samples, estimator, gauss_newton_fn=gauss_newton_fn,
                antithetic=antithetic, control_variate=control_variate)

  return MoGAlgorithm(init, step_fn)


def fit(key: jax.Array, loss_fn: Callable, init_mean: jax.Array, init_precision: jax.Array, num_steps: int,
        beta=0.02, beta_w=None, num_samples: int = 3, estimator: str = "hessian", *,
        init_log_weights: Optional[jax.Array] = None, gauss_newton_fn: Optional[Callable] = None,
        antithetic: bool = False, control_variate: bool = False) -> MoGState:
  """Runs `num_steps` steps in one compiled `lax.scan`; step i uses the i-th key of `jax.random.split(key, num_steps)`.

  Args:
    key: PRNG key, split into one key per step.
    loss_fn: z [P] -> scalar loss-bar.
    init_mean: [K, P].
    init_precision: [K, P, P].
    num_steps: the number of steps (>= 0).
    beta, beta_w, num_samples, estimator, gauss_newton_fn, antithetic, control_variate: as in `step`.
    init_log_weights: [K] (default uniform).

  Returns:
    The final `MoGState`; `posterior(state)` is the `Mixture` to merge.

  Example:
    K = 1 on a Gaussian target N(1, 1/2): the component converges to it.

    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> state = mog.fit(jax.random.key(0), lambda z: jnp.sum((z - 1.0) ** 2), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)),
    ...                 30, beta=0.5, num_samples=2, antithetic=True)
    >>> print(state.mean.round(3), state.precision.round(3))
    [[1.]] [[[2.]]]
  """
  state, beta, beta_w, num_steps = _fit_inputs(
      loss_fn, beta, beta_w, num_samples, antithetic, estimator, gauss_newton_fn, ESTIMATORS, num_steps,
      lambda: _init(init_mean, init_precision, init_log_weights, "init_"))
  return _fit_full(key, state, beta, beta_w, num_steps, loss_fn, num_samples, estimator, gauss_newton_fn, antithetic,
                   control_variate)


def _fit_inputs(loss_fn, beta, beta_w, num_samples, antithetic, estimator, gauss_newton_fn, allowed, num_steps, init):
  """Checks a fit's arguments once; returns (initial state, beta, beta_w in the state's dtype, num_steps)."""
  _check_common(loss_fn, beta, beta_w, num_samples, antithetic)
  _learner.check_estimator(estimator, gauss_newton_fn, allowed)
  num_steps = _checks.integer(num_steps, "num_steps", minimum=0)
  state = init()
  dtype = state.log_weights.dtype
  beta_w = 0.01 * beta if beta_w is None else beta_w
  return state, jnp.asarray(beta, dtype), jnp.asarray(beta_w, dtype), num_steps


@partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9, 10))
def _fit_full(key, state, beta, beta_w, num_steps, loss_fn, num_samples, estimator, gauss_newton_fn, antithetic,
              control_variate):
  def one(k, s, _):
    return step(k, s, loss_fn, beta, beta_w, num_samples, estimator, gauss_newton_fn=gauss_newton_fn,
                antithetic=antithetic, control_variate=control_variate)

  return _learner.scan_steps(one, state, key, num_steps)


def posterior(state: MoGState | DiagMoGState) -> Mixture:
  """The fitted mixture as `bmerge.Mixture` (components `FullGaussian` or `DiagGaussian` with a leading K axis),
  the q_t of Eq. 11 for `bmerge.merge.mixture_weighted`.

  Args:
    state: a `MoGState` or `DiagMoGState`.

  Returns:
    `Mixture(components, log_weights)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> q = mog.posterior(mog.init_diag({"w": jnp.zeros((2, 3))}, {"w": jnp.ones((2, 3))}))
    >>> type(q.components).__name__
    'DiagGaussian'
  """
  if isinstance(state, DiagMoGState):
    return Mixture(DiagGaussian(state.mean, state.precision), state.log_weights)
  return Mixture(FullGaussian(state.mean, state.precision), state.log_weights)


# ----------------------------------------------------------------------------------------------------------------
# Diagonal components over a params pytree (larger models).


def init_diag(mean: PyTree, precision: PyTree, log_weights: Optional[jax.Array] = None) -> DiagMoGState:
  """The initial diagonal mixture.

  Args:
    mean: params pytree whose leaves carry a leading K axis (K >= 1 components).
    precision: the same structure and shapes, entries > 0.
    log_weights: [K] (normalised here); default uniform.

  Returns:
    A `DiagMoGState` in one floating dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> state = mog.init_diag({"w": jnp.zeros((4, 2))}, {"w": jnp.ones((4, 2))})
    >>> jnp.exp(state.log_weights).tolist()
    [0.25, 0.25, 0.25, 0.25]
  """
  return _init_diag(mean, precision, log_weights, "")


def _init_diag(mean, precision, log_weights, prefix):
  leaves = jax.tree.leaves(mean)
  if not leaves:
    raise ValueError(f"`{prefix}mean` has no arrays; expected a params pytree with a leading K axis on every leaf.")
  if jnp.ndim(leaves[0]) < 1 or jnp.shape(leaves[0])[0] < 1:
    raise ValueError(f"`{prefix}mean` leaves must carry a leading K >= 1 axis, got shape {jnp.shape(leaves[0])}.")
  k = jnp.shape(leaves[0])[0]
  _checks.leading(mean, (k,), name=f"{prefix}mean", what="K mixture components")
  _checks.same_structure(precision, mean, name_a=f"{prefix}precision", name_b=f"{prefix}mean")
  _checks.finite(mean, name=f"{prefix}mean")
  _checks.positive_finite(precision, name=f"{prefix}precision")
  dtype = _learner.float_dtype(*leaves, *jax.tree.leaves(precision))
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return DiagMoGState(cast(mean), cast(precision), _check_log_weights(log_weights, k, dtype, f"{prefix}log_weights"))


def _diag_expectations(mean, prec, log_w, loss_flat, z, estimator, control_variate):
  """Diagonal analogue of `_full_expectations`: E[delta_c grad f] [K, P], E[delta_c diag hess f] [K, P], E[delta_c f],
  mean loss."""
  n, p = z.shape
  diff = mean[None] - z[:, None]  # [S, K, P]
  a = prec[None] * diff
  half_logdet = 0.5 * jnp.sum(jnp.log(prec), axis=-1)
  log_n = -0.5 * jnp.sum(diff * a, axis=-1) + half_logdet - 0.5 * p * LOG_2PI
  log_joint = log_w + log_n
  log_q = logsumexp(log_joint, axis=1)
  r = jnp.exp(log_joint - log_q[:, None])
  delta = jnp.exp(log_n - log_q[:, None])
  abar = jnp.einsum("sk,skp->sp", r, a)
  losses, grads = jax.vmap(jax.value_and_grad(loss_flat))(z)
  f = -losses - log_q
  grad_f = -grads - abar
  neg_hess_log_q = r @ prec - jnp.einsum("sk,skp->sp", r, a * a) + abar * abar  # diagonal of the full expression
  if estimator == "stein":
    loss_h = jnp.einsum("sk,skp,sp->kp", delta, -a, grads) / n
  else:  # exact diagonal from P Hessian-vector products (small models only)
    eye = jnp.eye(p, dtype=z.dtype)

    def diag_h(x):
      hvp = lambda v: jax.jvp(jax.grad(loss_flat), (x,), (v,))[1]
      return jnp.sum(jax.vmap(hvp)(eye) * eye, axis=1)

    loss_h = jnp.einsum("sk,sp->kp", delta, jax.vmap(diag_h)(z)) / n
  e_hess = -loss_h + jnp.einsum("sk,sp->kp", delta, neg_hess_log_q) / n
  if control_variate:
    e_grad = jnp.einsum("sk,skp->kp", delta, grad_f[:, None] + a) / n
    e_hess = e_hess + prec * (1.0 - jnp.mean(delta, axis=0))[:, None]
    neg_entropy = half_logdet - 0.5 * p * (1.0 + LOG_2PI)
    e_f = jnp.einsum("sk,sk->k", delta, f[:, None] + log_n) / n - neg_entropy
  else:
    e_grad = jnp.einsum("sk,sp->kp", delta, grad_f) / n
    e_f = jnp.einsum("sk,s->k", delta, f) / n
  return e_grad, e_hess, e_f, jnp.mean(losses)


def step_diag(key: jax.Array, state: DiagMoGState, loss_fn: Callable, beta=0.02, beta_w=None, num_samples: int = 3,
              estimator: str = "stein", *, antithetic: bool = False, control_variate: bool = False
              ) -> tuple[DiagMoGState, MoGInfo]:
  """One step of diagonal mixture VI over a params pytree; `loss_fn(params) -> scalar`.

  The same updates as `step` with every precision diagonal: h_c <- h_c - beta E[delta_c diag hess f] (beta halved
  until every h_c > 0), mu_c <- mu_c + beta E[delta_c grad f] / h_c. `estimator`: 'stein' (gradients only,
  E_{N_c}[diag hess] = E_q[delta_c h_c (z - mu_c) * grad]) or 'hessian' (exact diagonal, P Hessian-vector products).

  Args:
    key: PRNG key (split into the component draw and the noise).
    state: the current `DiagMoGState`.
    loss_fn: params -> scalar loss-bar.
    beta, beta_w, num_samples, antithetic, control_variate: as in `step`.
    estimator: 'stein' or 'hessian'.

  Returns:
    `(state, info)` like `step`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> step = jax.jit(lambda key, s: mog.step_diag(key, s, lambda p: 0.5 * jnp.sum(p["w"] ** 2), beta=0.1))
    >>> state, info = step(jax.random.key(0), mog.init_diag({"w": jnp.ones((2, 3))}, {"w": jnp.ones((2, 3))}))
    >>> state.mean["w"].shape, round(float(info.step_size), 6)
    ((2, 3), 0.1)
  """
  _check_common(loss_fn, beta, beta_w, num_samples, antithetic)
  _learner.check_estimator(estimator, None, DIAG_ESTIMATORS)
  mean, unflatten = _tree.flatten(state.mean, 1)  # [K, P]
  prec, _ = _tree.flatten(state.precision, 1)
  dtype = mean.dtype
  prec = prec.astype(dtype)
  c, eps = _draw(key, state.log_weights, num_samples, mean.shape[1], dtype, antithetic)
  z = mean[c] + eps / jnp.sqrt(prec[c])
  loss_flat = lambda x: loss_fn(unflatten(x))
  e_grad, e_hess, e_f, loss = _diag_expectations(mean, prec, state.log_weights, loss_flat, z, estimator,
                                                 control_variate)
  new_prec = lambda b, e_hess: prec - b * e_hess
  ok = lambda b, e_hess: jnp.all(new_prec(b, e_hess) > 0)
  new_mean = lambda b, prec_new, e_grad: mean + b * e_grad / prec_new
  mean_new, prec_new, log_w, info = _natural_step(state.log_weights, e_grad, e_hess, e_f, loss, beta, beta_w, ok,
                                                  new_prec, new_mean)
  return DiagMoGState(unflatten(mean_new), unflatten(prec_new), log_w), info


def fit_diag(key: jax.Array, loss_fn: Callable, init_mean: PyTree, init_precision: PyTree, num_steps: int,
             beta=0.02, beta_w=None, num_samples: int = 3, estimator: str = "stein", *,
             init_log_weights: Optional[jax.Array] = None, antithetic: bool = False,
             control_variate: bool = False) -> DiagMoGState:
  """`step_diag` `num_steps` times in one `lax.scan` (keys `jax.random.split(key, num_steps)`).

  Args:
    key: PRNG key, split into one key per step.
    loss_fn: params -> scalar loss-bar.
    init_mean: params pytree with a leading K axis.
    init_precision: the same shapes, entries > 0.
    num_steps: the number of steps (>= 0).
    beta, beta_w, num_samples, estimator, antithetic, control_variate: as in `step_diag`.
    init_log_weights: [K] (default uniform).

  Returns:
    The final `DiagMoGState`.

  Example:
    K = 1 on the Gaussian target N(1, 1/2) per coordinate (Stein's estimator, gradients only):

    >>> import jax, jax.numpy as jnp
    >>> from bmerge.optim import mog
    >>> state = mog.fit_diag(jax.random.key(0), lambda p: jnp.sum((p["w"] - 1.0) ** 2), {"w": jnp.zeros((1, 2))},
    ...                      {"w": jnp.ones((1, 2))}, 200, beta=0.1, num_samples=8)
    >>> bool(jnp.allclose(state.mean["w"], 1.0, atol=0.1)), bool(jnp.allclose(state.precision["w"], 2.0, rtol=0.3))
    (True, True)
  """
  state, beta, beta_w, num_steps = _fit_inputs(
      loss_fn, beta, beta_w, num_samples, antithetic, estimator, None, DIAG_ESTIMATORS, num_steps,
      lambda: _init_diag(init_mean, init_precision, init_log_weights, "init_"))
  return _fit_diag(key, state, beta, beta_w, num_steps, loss_fn, num_samples, estimator, antithetic, control_variate)


@partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _fit_diag(key, state, beta, beta_w, num_steps, loss_fn, num_samples, estimator, antithetic, control_variate):
  def one(k, s, _):
    return step_diag(k, s, loss_fn, beta, beta_w, num_samples, estimator, antithetic=antithetic,
                     control_variate=control_variate)

  return _learner.scan_steps(one, state, key, num_steps)
