"""The batched mixture mode finder: Algorithm 1 / Eq. 12 for a whole grid of alphas as matrix products.

For mixtures q_t = sum_k pi_tk N(theta_tk, diag(1/h_tk)) and weights alpha, EM on the lower bound of App. A.3 iterates

  r_tk  = pi_tk N(theta | theta_tk, 1/h_tk) / sum_k' (...)            (responsibilities, per task, by logsumexp)
  theta <- sum_{t,k} r_tk alpha_t h_tk theta_tk / sum_{t,k} r_tk alpha_t h_tk

and never decreases F(theta) = sum_t alpha_t log q_t(theta) (+ gamma log p0 with a prior). For a grid [G, T] every
step is two GEMMs (REFERENCE §2): with x = theta - ref and d_tk = theta_tk - ref (centred on the mean component,
so float32 keeps the small differences between finetuned models),

  log N_tk(theta_g) = -1/2 [x_g^2, x_g] . [h_tk; -2 h_tk d_tk] - 1/2 d_tk . h_tk d_tk + 1/2 sum log h_tk - P/2 log 2pi
  [num, den]_g      = sum_tk W_gtk [h_tk d_tk, h_tk],   W_gtk = r_gtk alpha_gt

i.e. ([G, P] x [P, TK]) twice, then ([G, TK] x [TK, P]) twice (the [x^2, x] concatenation written as two
products). `find_mode_reference` is the same algorithm for one alpha as written (elementwise over [T, K, P]);
tests use it as the oracle and the benchmark as the baseline.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from bmerge import _checks
from bmerge import _tree
from bmerge import merge as _merge
from bmerge import posteriors as post
from bmerge.posteriors import DiagGaussian, FullGaussian, IsoGaussian, Mixture

PyTree = Any
_LOG_2PI = math.log(2.0 * math.pi)


class EMResult(NamedTuple):
  """What the batched mode finder returns."""

  params: PyTree  # merged params, leading G axis (a [G, P] array for full-covariance components)
  objective: jax.Array  # [num_iters + 1, G]: F(theta^(i)) for i = 0..num_iters (non-decreasing along axis 0)
  step_size: jax.Array  # [G]: max_p |theta^(n) - theta^(n-1)| of the last iteration, the convergence measure


def _log_pi(log_weights):
  return log_weights - logsumexp(log_weights, axis=-1, keepdims=True)


@partial(jax.jit, static_argnames=("num_iters", "init_given"))
def _diag_em(alphas, means, precisions, log_weights, prior_mean, prior_precision, init, num_iters, init_given):
  d, unflatten = _tree.flatten(means, 2)  # [T, K, P]
  h, _ = _tree.flatten(precisions, 2)
  dtype = d.dtype
  h = h.astype(dtype)
  t, k, p = d.shape
  alphas = alphas.astype(dtype)
  log_pi = _log_pi(log_weights.astype(dtype)).reshape(t * k)
  d = d.reshape(t * k, p)
  h = h.reshape(t * k, p)
  ref = jnp.mean(d, axis=0)
  d = d - ref
  hd = h * d
  logh = jnp.log(h)
  logh_ref = jnp.mean(logh, axis=0)  # centring the log-determinants too keeps their sums small in float32
  half_logdet = 0.5 * jnp.sum(logh - logh_ref, axis=1)  # [TK]
  common = 0.5 * jnp.sum(logh_ref) - 0.5 * p * _LOG_2PI  # shared by every component
  h_t, m2hd_t = h.T, (-2.0 * hd).T  # [P, TK] each
  quad_const = jnp.sum(d * hd, axis=1)  # [TK]
  sum_a = jnp.sum(alphas, axis=1)  # [G]
  has_prior = prior_mean is not None
  if has_prior:
    m0, _ = _tree.flatten(prior_mean, 0)
    h0, _ = _tree.flatten(prior_precision, 0)
    d0 = m0.astype(dtype) - ref
    h0 = h0.astype(dtype)
    gamma = 1.0 - sum_a
    prior_logdet = 0.5 * jnp.sum(jnp.log(h0)) - 0.5 * p * _LOG_2PI

  def log_joint(x):
    """[G, T, K]: log pi_tk + log N_tk(x), and the objective F [G]."""
    # Two GEMMs into one [G, TK] result; separate products avoid materialising a [G, 2P] concatenation
    # (measured equal or faster than the concatenated single GEMM).
    quad = (x * x) @ h_t + x @ m2hd_t + quad_const
    lj = (log_pi + half_logdet - 0.5 * quad + common).reshape(-1, t, k)
    obj = jnp.sum(alphas * logsumexp(lj, axis=2), axis=1)
    if has_prior:
      obj = obj + gamma * (prior_logdet - 0.5 * jnp.sum(h0 * (x - d0) ** 2, axis=1))
    return lj, obj

  def update(weights):
    w = weights.reshape(-1, t * k)
    num, den = w @ hd, w @ h
    if has_prior:
      num = num + gamma[:, None] * (h0 * d0)
      den = den + gamma[:, None] * h0
    return num / den

  if init_given:
    x0 = _tree.flatten(init, 1)[0].astype(dtype) - ref
  else:  # responsibilities = mixture weights: the Hessian-weighted merge of all components (Eq. 10 when K = 1).
    x0 = update(alphas[:, :, None] * jnp.exp(log_pi).reshape(1, t, k))

  def body(carry, _):
    x, _ = carry
    lj, obj = log_joint(x)
    r = jnp.exp(lj - logsumexp(lj, axis=2, keepdims=True))
    return (update(r * alphas[:, :, None]), x), obj

  # The previous iterate rides along so the step size is one pass at the end, not one per iteration.
  (x, x_prev), objs = jax.lax.scan(body, (x0, x0), None, length=num_iters)
  _, last = log_joint(x)
  objective = jnp.concatenate([objs, last[None]], axis=0).T  # [G, num_iters + 1]: grid axis first for sharding
  step = jnp.max(jnp.abs(x - x_prev), axis=1)
  return EMResult(unflatten(x + ref), objective, step)


@partial(jax.jit, static_argnames=("num_iters", "init_given", "chunk_size"))
def _full_em(alphas, means, precisions, log_weights, prior_mean, prior_precision, init, num_iters, init_given,
             chunk_size):
  t, k, p = means.shape
  dtype = means.dtype
  log_pi = _log_pi(log_weights.astype(dtype))
  ref = jnp.mean(means.reshape(t * k, p), axis=0)
  d = means - ref
  hd = jnp.einsum("tkij,tkj->tki", precisions, d)
  chol = jnp.linalg.cholesky(precisions)
  half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1) - 0.5 * p * _LOG_2PI  # [T, K]
  has_prior = prior_mean is not None
  if has_prior:
    d0 = prior_mean - ref
    hd0 = prior_precision @ d0
    prior_logdet = jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(prior_precision)))) - 0.5 * p * _LOG_2PI

  def one(args):
    a, x0 = args
    gamma = 1.0 - jnp.sum(a)

    def log_joint(x):
      diff = x - d
      lj = log_pi + half_logdet - 0.5 * jnp.einsum("tki,tkij,tkj->tk", diff, precisions, diff)
      obj = jnp.sum(a * logsumexp(lj, axis=1))
      if has_prior:
        obj = obj + gamma * (prior_logdet - 0.5 * (x - d0) @ prior_precision @ (x - d0))
      return lj, obj

    def update(w):
      s = jnp.einsum("tk,tkij->ij", w, precisions)
      rhs = jnp.einsum("tk,tki->i", w, hd)
      if has_prior:
        s = s + gamma * prior_precision
        rhs = rhs + gamma * hd0
      return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(s), True), rhs)

    x = x0 - ref if init_given else update(a[:, None] * jnp.exp(log_pi))

    def body(x, _):
      lj, obj = log_joint(x)
      r = jnp.exp(lj - logsumexp(lj, axis=1, keepdims=True))
      x_new = update(r * a[:, None])
      return x_new, (obj, jnp.max(jnp.abs(x_new - x)))

    x, (objs, steps) = jax.lax.scan(body, x, None, length=num_iters)
    objective = jnp.concatenate([objs, log_joint(x)[1][None]])
    step = steps[-1] if num_iters > 0 else jnp.zeros((), dtype)
    return x + ref, objective, step

  x0 = init if init_given else jnp.zeros((alphas.shape[0], p), dtype)
  params, objective, step = jax.lax.map(one, (alphas.astype(dtype), x0), batch_size=chunk_size)
  return EMResult(params, objective, step)


def _check_mixture_stack(mixtures: Mixture, name: str = "mixtures") -> tuple[int, int]:
  if not isinstance(mixtures, Mixture):
    raise TypeError(f"`{name}` must be a stacked `bmerge.Mixture` (components with leading [T, K] axes), "
                    f"got {type(mixtures).__name__}.")
  lw = mixtures.log_weights
  if jnp.ndim(lw) != 2:
    raise ValueError(f"`{name}.log_weights` must be [T, K] (T stacked mixtures of K components), "
                     f"got shape {jnp.shape(lw)}.")
  t, k = jnp.shape(lw)
  comps = mixtures.components
  if isinstance(comps, IsoGaussian):
    comps = post.as_diag(comps)
  if isinstance(comps, DiagGaussian):
    _checks.leading(comps.mean, (t, k), name=f"{name}.components.mean",
                    what=f"T = {t} tasks and K = {k} components, as in log_weights")
    _checks.same_structure(comps.precision, comps.mean, name_a=f"{name}.components.precision",
                           name_b=f"{name}.components.mean")
    _checks.positive_finite(comps.precision, name=f"{name}.components.precision")
  elif isinstance(comps, FullGaussian):
    shape = jnp.shape(comps.mean)
    if len(shape) != 3 or shape[:2] != (t, k):
      raise ValueError(f"`{name}.components.mean` must be [T, K, P] with (T, K) = {(t, k)} as in log_weights, "
                       f"got shape {shape}.")
    if jnp.shape(comps.precision) != shape + (shape[2],):
      raise ValueError(f"`{name}.components.precision` must be [T, K, P, P] = {shape + (shape[2],)}, "
                       f"got {jnp.shape(comps.precision)}.")
    _checks.positive_definite(comps.precision, name=f"{name}.components.precision")
  else:
    raise TypeError(f"`{name}.components` must be DiagGaussian or FullGaussian, got {type(comps).__name__}.")
  _checks.finite(comps.mean, name=f"{name}.components.mean")
  _checks.finite(lw, name=f"{name}.log_weights")
  return t, k


def find_modes(mixtures: Mixture, alphas, num_iters: int = 10, *, prior=None, init: Optional[PyTree] = None,
               chunk_size: int = 8) -> EMResult:
  """The EM mode of prod_t q_t^alpha_t (p0^gamma) for every alpha of a grid, as matrix products (Algorithm 1).

  Args:
    mixtures: T stacked mixtures: `Mixture(components, log_weights)` with `log_weights` [T, K] and components
      `DiagGaussian` (leaves [T, K, ...]) or `FullGaussian` (mean [T, K, P], precision [T, K, P, P]; small P).
      Stack per-task mixtures with `bmerge.stack`; every task needs the same K (pad with -inf log-weights if not).
    alphas: [G, T] (or [T]) non-negative weights; without `prior` rows must sum to 1.
    num_iters: fixed number of EM iterations (the paper uses 5-10).
    prior: optional Gaussian p0 (no T or K axis) weighted by gamma = 1 - sum(alpha).
    init: optional starting point, params with a leading G axis; default: the Hessian-weighted merge of all component
      means with responsibilities set to the mixture weights (exactly Eq. 10 when K = 1).
    chunk_size: alphas solved at once for full-covariance components.

  Returns:
    `EMResult(params, objective, step_size)`: merged params with a leading G axis, F(theta^(i)) for every iteration
    (non-decreasing: EM), and the size of the last step (max |change| per alpha) as the convergence measure.
  """
  t, k = _check_mixture_stack(mixtures)
  if not isinstance(num_iters, int) or num_iters < 0:
    raise ValueError(f"`num_iters` must be a non-negative integer, got {num_iters!r}.")
  alphas, single = _checks.alphas(alphas, t)
  comps = mixtures.components
  full = isinstance(comps, FullGaussian)
  if full:
    if not isinstance(chunk_size, int) or chunk_size < 1:
      raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
  else:
    comps = post.as_diag(comps)
  if prior is None:
    _checks.rows_sum_to_one(alphas, what="Without a prior gamma = 1 - sum(alpha) must be 0; pass `prior=`.")
    m0 = h0 = None
  else:
    like = FullGaussian(comps.mean[:, 0], comps.precision[:, 0]) if full else jax.tree.map(lambda x: x[:, 0], comps)
    m0, h0 = _merge._prior_as(prior, like)
  init_given = init is not None
  if init_given:
    g = alphas.shape[0]
    like_mean = comps.mean[0, 0] if full else jax.tree.map(lambda x: x[0, 0], comps.mean)
    _checks.same_structure(init, like_mean, name_a="init", name_b="mixtures.components.mean", lead_a=1)
    _checks.leading(init, (g,), name="init", what=f"one starting point per alpha, G = {g}")
  if full:
    fn = lambda a, m, h, lw, pm, ph, x0=None: _full_em(a, m, h, lw, pm, ph, x0, num_iters, init_given, chunk_size)
  else:
    fn = lambda a, m, h, lw, pm, ph, x0=None: _diag_em(a, m, h, lw, pm, ph, x0, num_iters, init_given)
  res = _merge._run_on_grid(fn, alphas, False, comps.mean, comps.precision, mixtures.log_weights, m0, h0, rows=init)
  res = res._replace(objective=res.objective.T)
  if single:
    res = EMResult(jax.tree.map(lambda x: x[0], res.params), res.objective[:, 0], res.step_size[0])
  return res


def find_mode_reference(mixtures: Mixture, alpha: jax.Array, num_iters: int = 10) -> PyTree:
  """Algorithm 1 as written, for one alpha [T] and diagonal components: elementwise over [T, K, P], uncentred.

  The readable form of the update; `find_modes` computes the same for a grid with matrix products. Jit it (and
  `vmap` it) yourself; the benchmark and tests use it as the baseline and oracle.
  """
  comps = post.as_diag(mixtures.components)
  m, unflatten = _tree.flatten(comps.mean, 2)  # [T, K, P]
  h, _ = _tree.flatten(comps.precision, 2)
  log_pi = _log_pi(mixtures.log_weights)
  a = jnp.asarray(alpha, m.dtype)

  def update(r):
    w = (r * a[:, None])[..., None] * h
    return jnp.sum(w * m, axis=(0, 1)) / jnp.sum(w, axis=(0, 1))

  theta = update(jnp.exp(log_pi))
  half_logdet = 0.5 * jnp.sum(jnp.log(h), -1)  # loop-invariant, hoisted

  def body(_, theta):
    lj = log_pi + half_logdet - 0.5 * jnp.sum(h * (theta - m) ** 2, -1)
    r = jnp.exp(lj - logsumexp(lj, axis=1, keepdims=True))
    return update(r)

  return unflatten(jax.lax.fori_loop(0, num_iters, body, theta))
