"""The batched mixture mode finder: Algorithm 1 / Eq. 12 for a whole grid of alphas as matrix products.

For mixtures q_t = sum_k pi_tk N(theta_tk, diag(1/h_tk)) and weights alpha, EM on the lower bound of App. A.3 iterates

  r_tk  = pi_tk N(theta | theta_tk, 1/h_tk) / sum_k' (...)            (responsibilities, per task, by logsumexp)
  theta <- sum_{t,k} r_tk alpha_t h_tk theta_tk / sum_{t,k} r_tk alpha_t h_tk

and never decreases F(theta) = sum_t alpha_t log q_t(theta) (+ gamma log p0 with a prior). For a grid [G, T] every
step is two GEMMs (App. A.3 written for a grid): with x = theta - ref and d_tk = theta_tk - ref (centred on the mean
component, so float32 keeps the small differences between finetuned models),

  log N_tk(theta_g) = -1/2 [x_g^2, x_g] . [h_tk; -2 h_tk d_tk] - 1/2 d_tk . h_tk d_tk + 1/2 sum log h_tk - P/2 log 2pi
  [num, den]_g      = sum_tk W_gtk [h_tk d_tk, h_tk],   W_gtk = r_gtk alpha_gt

i.e. ([G, P] x [P, TK]) twice, then ([G, TK] x [TK, P]) twice. Since x enters the next E-step only through the
[G, TK] log-densities, each iteration is one sweep over cache-sized blocks of parameters (M-step of the block, then
its share of the log-densities), and the [G, P] iterate is formed only once, at the end. `find_mode_reference` is
the same algorithm for one alpha as written (elementwise over [T, K, P]); tests use it as the oracle and the
benchmark as the baseline.

Example:
  With K = 1 the EM is Eq. 10 at once: the Hessian-weighted merge, reached before the first iteration.

  >>> import jax.numpy as jnp
  >>> import bmerge
  >>> comps = bmerge.DiagGaussian({"w": jnp.array([[[0.0]], [[1.0]]])}, {"w": jnp.array([[[1.0]], [[3.0]]])})
  >>> res = bmerge.em.find_modes(bmerge.Mixture(comps, jnp.zeros((2, 1))), jnp.array([[0.5, 0.5]]), num_iters=2)
  >>> res.params["w"].tolist(), res.step_size.tolist()               # (0.5 * 3 * 1) / (0.5 + 1.5)
  ([[0.75]], [0.0])

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eqs. 11-12 and 14, Algorithm 1, App. A.3).
  Carreira-Perpiñán. Mode-finding for mixtures of Gaussian distributions. IEEE TPAMI 22(11), 2000 (Sec. 5: the
  fixed-point iteration this generalises).
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
from bmerge.merge import _fullcov
from bmerge import _sharding
from bmerge import posteriors as post
from bmerge.posteriors import DiagGaussian, FullGaussian, IsoGaussian, Mixture

__all__ = [
    "EMResult",
    "find_mode_reference",
    "find_modes",
]

PyTree = Any
_LOG_2PI = math.log(2.0 * math.pi)


class EMResult(NamedTuple):
  """What the batched mode finder returns: the merged params, F(theta^(i)) per iteration, the last step's size.

  Example:
    >>> from bmerge import em
    >>> em.EMResult._fields
    ('params', 'objective', 'step_size')
  """

  params: PyTree  # merged params, leading G axis (a [G, P] array for full-covariance components)
  objective: jax.Array  # [num_iters + 1, G]: F(theta^(i)) for i = 0..num_iters (non-decreasing along axis 0)
  step_size: jax.Array  # [G]: max_p |theta^(n) - theta^(n-1)| of the last iteration, the convergence measure


def _log_pi(log_weights):
  return log_weights - logsumexp(log_weights, axis=-1, keepdims=True)


@partial(jax.jit, static_argnames=("num_iters", "init_given", "block_size"))
def _diag_em(alphas, means, precisions, log_weights, prior_mean, prior_precision, init, num_iters, init_given,
             block_size=4096):
  d, unflatten = _tree.flatten(means, 2)  # [T, K, P]
  h, _ = _tree.flatten(precisions, 2)
  dtype = d.dtype
  h = h.astype(dtype)
  t, k, p = d.shape
  g = alphas.shape[0]
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

  def objective(quad, prior_quad):
    """From quad [G, TK] = |x - d_tk|^2_{h_tk} - d.hd (and the prior's square): log pi + log N [G, T, K] and F [G]."""
    lj = (log_pi + half_logdet - 0.5 * (quad + quad_const) + common).reshape(-1, t, k)
    obj = jnp.sum(alphas * logsumexp(lj, axis=2), axis=1)
    if has_prior:
      obj = obj + gamma * (prior_logdet - 0.5 * prior_quad)
    return lj, obj

  def update(w):
    """The M-step theta = sum_tk w h d / sum_tk w h over all parameters at once ([G, P])."""
    num, den = w @ hd, w @ h
    if has_prior:
      num = num + gamma[:, None] * (h0 * d0)
      den = den + gamma[:, None] * h0
    return num / den

  # The EM iterate x enters the next E-step only through quad = [x^2, x] . [h; -2 hd] ([G, TK]). So each iteration
  # is one sweep over blocks of parameters: the M-step for a block ([G, TK] x [TK, B] twice), then that block's
  # share of quad ([G, B] x [B, TK] twice), all in cache; x itself is formed only at the end. Per iteration this
  # reads the [TK, P] components once instead of streaming several [G, P] arrays through memory.
  bsz = min(block_size, p)
  nb = -(-p // bsz)
  pad = nb * bsz - p
  blocked = lambda a, v: jnp.pad(a, ((0, 0), (0, pad)), constant_values=v).reshape(-1, nb, bsz).transpose(1, 0, 2)
  blocks = [blocked(h, 1.0), blocked(hd, 0.0), blocked(-2.0 * hd, 0.0)]  # padding: h = 1, d = 0 -> x = 0, adds 0
  if has_prior:
    blocks += [blocked(h0[None], 1.0)[:, 0], blocked(d0[None], 0.0)[:, 0]]

  def m_step_block(w, blk):
    h_b, hd_b = blk[:2]
    num, den = w @ hd_b, w @ h_b
    if has_prior:
      h0_b, d0_b = blk[3:]
      num = num + gamma[:, None] * (h0_b * d0_b)
      den = den + gamma[:, None] * h0_b
    return num / den

  def sweep(w):
    def one_block(acc, blk):
      x_b = m_step_block(w, blk)
      h_b, m2hd_b = blk[0], blk[2]
      quad = acc[0] + (x_b * x_b) @ h_b.T + x_b @ m2hd_b.T
      prior_quad = acc[1] + (jnp.sum(blk[3] * (x_b - blk[4]) ** 2, axis=1) if has_prior else 0.0)
      return (quad, prior_quad), None

    (quad, prior_quad), _ = jax.lax.scan(one_block, (jnp.zeros((g, t * k), dtype), jnp.zeros((g,), dtype)),
                                         tuple(blocks))
    return quad, prior_quad

  def final_sweep(w, w_prev):
    """The last iterate x (M-step of w) written block by block, and max |x - x_prev| without forming x_prev."""
    def one_block(carry, blk):
      x_buf, step = carry
      i, blk = blk[0], blk[1:]
      x_b, xp_b = m_step_block(w, blk), m_step_block(w_prev, blk)
      x_buf = jax.lax.dynamic_update_slice(x_buf, x_b, (0, i * bsz))
      return (x_buf, jnp.maximum(step, jnp.max(jnp.abs(x_b - xp_b), axis=1))), None

    init = (jnp.zeros((g, nb * bsz), dtype), jnp.zeros((g,), dtype))
    (x_buf, step), _ = jax.lax.scan(one_block, init, (jnp.arange(nb), *blocks))
    return x_buf[:, :p], step

  if init_given:
    x0 = _tree.flatten(init, 1)[0].astype(dtype) - ref
    quad0 = (x0 * x0) @ h.T - 2.0 * (x0 @ hd.T)
    prior_quad0 = jnp.sum(h0 * (x0 - d0) ** 2, axis=1) if has_prior else jnp.zeros((g,), dtype)
    w0 = jnp.zeros((g, t * k), dtype)  # unused: x0 is given
  else:  # responsibilities = mixture weights: the Hessian-weighted merge of all components (Eq. 10 when K = 1).
    w0 = (alphas[:, :, None] * jnp.exp(log_pi).reshape(1, t, k)).reshape(g, t * k)
    quad0, prior_quad0 = sweep(w0)

  def body(carry, _):
    quad, prior_quad, _, w = carry
    lj, obj = objective(quad, prior_quad)
    r = jnp.exp(lj - logsumexp(lj, axis=2, keepdims=True))
    w_new = (r * alphas[:, :, None]).reshape(g, t * k)
    return (*sweep(w_new), w, w_new), obj

  (quad, prior_quad, w_prev, w_last), objs = jax.lax.scan(body, (quad0, prior_quad0, w0, w0), None,
                                                           length=num_iters)
  _, last = objective(quad, prior_quad)
  objective_trace = jnp.concatenate([objs, last[None]], axis=0).T  # [G, num_iters + 1]: grid axis first
  if init_given and num_iters <= 1:  # the iterate before the last is x0 itself
    x = x0 if num_iters == 0 else update(w_last)
    step = jnp.max(jnp.abs(x - x0), axis=1) if num_iters else jnp.zeros((g,), dtype)
  elif num_iters == 0:
    x, step = update(w_last), jnp.zeros((g,), dtype)
  else:
    x, step = final_sweep(w_last, w_prev)
  return EMResult(unflatten(x + ref), objective_trace, step)


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
               chunk_size: int = 128, block_size: int = 4096) -> EMResult:
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
    chunk_size: alphas solved at once for full-covariance components (about 2 chunk_size P^2 floats, kept within
      512 MB; on a CPU their factorisations run a few at a time, within 32 MB, so they stay in cache); with several
      devices each device works through its own share of the grid in such chunks.
    block_size: parameters per block of each EM sweep for diagonal components (cache-sized; results do not depend on
      it beyond float rounding).

  Returns:
    `EMResult(params, objective, step_size)`: merged params with a leading G axis, F(theta^(i)) for every iteration
    (non-decreasing: EM), and the size of the last step (max |change| per alpha) as the convergence measure.

  Example:
    Two tasks, each an equal mixture of two unit Gaussians in one dimension, over a grid of three alphas: the
    objective F = sum_t alpha_t log q_t(theta) never decreases.

    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> comps = bmerge.DiagGaussian(jnp.array([[[-2.0], [1.0]], [[0.0], [3.0]]]), jnp.ones((2, 2, 1)))
    >>> mixtures = bmerge.Mixture(comps, jnp.zeros((2, 2)))
    >>> res = bmerge.em.find_modes(mixtures, bmerge.grid.simplex(2, 0.5), num_iters=5)
    >>> res.params.shape, res.objective.shape, bool(jnp.all(jnp.diff(res.objective, axis=0) >= -1e-6))
    ((3, 1), (6, 3), True)
  """
  restore = None
  if isinstance(mixtures, Mixture) and isinstance(mixtures.components, (DiagGaussian, IsoGaussian)):
    # Only floating leaves are merged; others (step counters, keys) must agree and are passed through.
    comps = mixtures.components
    floating, restore = _tree.split_floating(comps.mean, 2, "mixtures.components.mean")
    if floating is not comps.mean:
      comps = post.as_diag(comps)
      comps = DiagGaussian(floating, _tree.like_floating(comps.precision, floating, "mixtures.components.precision"))
      mixtures = mixtures._replace(components=comps)
      if isinstance(prior, (IsoGaussian, DiagGaussian)):
        prior = post.as_diag(prior)
        prior = DiagGaussian(*(_tree.like_floating(x, floating, f"prior.{n}") for x, n in zip(prior, prior._fields)))
      if init is not None:
        init = _tree.like_floating(init, floating, "init")
  t, k = _check_mixture_stack(mixtures)
  num_iters = _checks.positive_int(num_iters, "num_iters", allow_zero=True)
  alphas, single = _checks.alphas(alphas, t)
  comps = mixtures.components
  full = isinstance(comps, FullGaussian)
  _checks.positive_int(block_size, "block_size")
  if full:
    _checks.positive_int(chunk_size, "chunk_size")
    dtype = _tree.compute_dtype(comps.mean)
    comps = FullGaussian(jnp.asarray(comps.mean, dtype), jnp.asarray(comps.precision, dtype))
  else:
    comps = post.as_diag(comps)
  if prior is None:
    _checks.rows_sum_to_one(alphas, what="Without a prior gamma = 1 - sum(alpha) must be 0; pass `prior=`.")
    m0 = h0 = None
  else:
    like = FullGaussian(comps.mean[:, 0], comps.precision[:, 0]) if full else jax.tree.map(lambda x: x[:, 0], comps)
    m0, h0 = _checks.prior_as(prior, like)
  init_given = init is not None
  if init_given:
    g = alphas.shape[0]
    like_mean = comps.mean[0, 0] if full else jax.tree.map(lambda x: x[0, 0], comps.mean)
    _checks.same_structure(init, like_mean, name_a="init", name_b="mixtures.components.mean", lead_a=1)
    _checks.leading(init, (g,), name="init", what=f"one starting point per alpha, G = {g}")
  if full:
    fn = lambda a, m, h, lw, pm, ph, x0=None: _fullcov.mixture_em(a, m, h, lw, pm, ph, x0, num_iters, init_given,
                                                                  chunk_size)
  else:
    fn = lambda a, m, h, lw, pm, ph, x0=None: _diag_em(a, m, h, lw, pm, ph, x0, num_iters, init_given, block_size)
  res = EMResult(*_sharding.run_on_grid(fn, alphas, False, comps.mean, comps.precision, mixtures.log_weights, m0, h0,
                                        rows=init))
  res = res._replace(objective=res.objective.T)
  if full:
    res = res._replace(params=res.params.astype(jnp.result_type(mixtures.components.mean)))
  if single:
    res = EMResult(jax.tree.map(lambda x: x[0], res.params), res.objective[:, 0], res.step_size[0])
  if restore is not None:
    res = res._replace(params=restore(res.params, () if single else (alphas.shape[0],)))
  return res


def find_mode_reference(mixtures: Mixture, alpha: jax.Array, num_iters: int = 10) -> PyTree:
  """Algorithm 1 as written, for one alpha [T] and diagonal components: elementwise over [T, K, P], uncentred.

  The readable form of the update; `find_modes` computes the same for a grid with matrix products. Jit it (and
  `vmap` it) yourself; the benchmark and tests use it as the baseline and oracle.

  Args:
    mixtures: T stacked mixtures with diagonal components (leading [T, K] axes).
    alpha: [T] task weights summing to 1.
    num_iters: EM iterations after the initial Hessian-weighted merge of all components.

  Returns:
    The merged params (no G axis).

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> comps = bmerge.DiagGaussian(jnp.array([[[-2.0], [1.0]], [[0.0], [3.0]]]), jnp.ones((2, 2, 1)))
    >>> mixtures = bmerge.Mixture(comps, jnp.zeros((2, 2)))
    >>> ref = bmerge.em.find_mode_reference(mixtures, jnp.array([0.5, 0.5]), num_iters=5)
    >>> res = bmerge.em.find_modes(mixtures, jnp.array([0.5, 0.5]), num_iters=5)
    >>> bool(jnp.allclose(ref, res.params, atol=1e-5))
    True
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
