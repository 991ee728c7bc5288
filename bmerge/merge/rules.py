"""Merging rules over a grid of task weights (paper Secs. 2-3, Eqs. 2, 3, 10-12 and App. A.2).

Every rule takes T posteriors stacked along a leading axis and `alphas` of shape [G, T] (a single [T] vector also
works and returns one model) and returns the merged params pytree with a leading G axis. Each rule is a few matrix
products of the [G, T] grid with the [T, P] stacked parameters, run in one `jit` (one trace per shape), never a
Python loop over G. Parameters are centred on the mean of the task models (or on the prior mean) before any product
so float32 keeps the small task vectors (|theta_t - theta_s| ~ 1e-3 next to |theta| ~ 1).

With `sum_t alpha_t != 1`, gamma = 1 - sum_t alpha_t weights a prior p0: `p_alpha ∝ p0^gamma prod_t q_t^alpha_t`
(Eqs. 5-8). Rules whose prior is not implied by the rule (Hessian-weighted, mixture) need it passed as `prior`.

Dtypes: every rule computes in float32 (float64 for float64 params under `jax_enable_x64`) and returns each leaf in
its own dtype (bfloat16 params come back bfloat16); leaves that are not floating point (step counters, PRNG keys) must
hold the same value in every task and are passed through, never averaged.

Example:
  A grid of three alphas for two tasks at once (the rows of `alphas`), returned with a leading G axis:

  >>> import jax.numpy as jnp
  >>> from bmerge import grid, merge
  >>> means = {"w": jnp.array([[0.0], [4.0]])}
  >>> merge.simple_average(means, grid.line(0.5))["w"][:, 0].tolist()          # alpha = (a, 1 - a)
  [4.0, 2.0, 0.0]

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via Bayesian
  Model-Merging. 2024.
  Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi. Editing Models with Task Arithmetic. ICLR 2023.
  Daheim, Möllenhoff, Ponti, Gurevych, Khan. Model Merging by Uncertainty-Based Gradient Matching. ICLR 2024.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from bmerge import _checks
from bmerge.merge import _fullcov
from bmerge import _sharding
from bmerge import _tree
from bmerge.merge import em
from bmerge import posteriors as post
from bmerge.posteriors import Beta, DiagGaussian, FullGaussian, IsoGaussian, Mixture

__all__ = [
    "exponential_family",
    "hessian_weighted",
    "mixture_weighted",
    "simple_average",
    "task_arithmetic",
]

PyTree = Any


def _num_tasks(tree: PyTree, name: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"`{name}` has no arrays; expected a params pytree stacked along a leading task axis.")
  shape = jax.numpy.shape(leaves[0])
  if len(shape) == 0:
    raise ValueError(f"`{name}` leaves must carry a leading task axis T; got a scalar leaf.")
  return shape[0]


def _lead(alphas, single: bool) -> tuple:
  """The leading axes of a merged result: (G,) for a grid, () for one alpha vector."""
  return () if single else (alphas.shape[0],)


# ---------------------------------------------------------------------------------------------------------------
# Simple averaging and task arithmetic: one GEMM each.


_UNROLL_MAX_TASKS = 16


def _weighted_sum(alphas, rows):
  """alphas [G, T] @ rows [T, P] -> [G, P].

  For the usual handful of tasks an unrolled sum of T scaled rows, which XLA fuses with what follows into one pass
  writing the [G, P] output once (a GEMM with inner dimension T is memory-bound); a GEMM for many tasks.
  """
  if rows.shape[0] > _UNROLL_MAX_TASKS:
    return alphas @ rows
  return sum(alphas[:, t, None] * rows[t] for t in range(rows.shape[0]))


@jax.jit
def _affine_core(alphas, stacked, base):
  """base * (1 - sum alpha) + sum_t alpha_t stacked_t, computed leaf by leaf as base + alphas @ (stacked - base).

  Leaf by leaf (no flattening into one [T, P] matrix): the rule is elementwise over parameters, and each merged leaf
  keeps the layout (and, on a mesh, the sharding) of its inputs.
  """
  def one(m, b):
    dtype = _tree.compute_dtype(m)
    a = alphas.astype(dtype)
    rows = m.astype(dtype).reshape(m.shape[0], -1)
    ref = jnp.mean(rows, axis=0) if b is None else b.astype(dtype).reshape(-1)
    out = _weighted_sum(a, rows - ref)
    # Simple averaging: the prior N(0, I) contributes gamma * 0, so only ref * sum(alpha) remains.
    out = out + (jnp.sum(a, axis=1, keepdims=True) * ref if b is None else ref)
    return out.reshape((a.shape[0],) + m.shape[1:]).astype(m.dtype)

  if base is None:
    return jax.tree.map(lambda m: one(m, None), stacked)
  return jax.tree.map(one, stacked, base)


def simple_average(means: Union[PyTree, IsoGaussian, DiagGaussian], alphas) -> PyTree:
  """Simple averaging (Eq. 2): theta_alpha = sum_t alpha_t theta_t.

  It is the Hessian-weighted merge with isotropic unit posteriors N(theta_t, I) and prior N(0, I), so rows of
  `alphas` need not sum to 1 (the prior adds gamma * 0).

  Args:
    means: the T task models, a params pytree whose leaves carry a leading T axis (or a stacked Gaussian posterior,
      whose means are used).
    alphas: [G, T] task weights (or one [T] vector), non-negative.

  Returns:
    The merged params pytree with a leading G axis (no G axis for a [T] input), each leaf in its own dtype (merged
    in float32 or wider; non-floating leaves, equal across tasks, are passed through).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import merge
    >>> means = {"w": jnp.array([[0.0, 2.0], [4.0, 6.0]])}          # T = 2 models of two parameters
    >>> merge.simple_average(means, jnp.array([0.25, 0.75]))["w"].tolist()
    [3.0, 5.0]
  """
  if isinstance(means, (IsoGaussian, DiagGaussian)):
    means = means.mean
  t = _num_tasks(means, "means")
  _checks.leading(means, (t,), name="means", what="T stacked task models")
  alphas, single = _checks.alphas(alphas, t)
  floating, restore = _tree.split_floating(means, 1, "means")
  _checks.finite(floating, name="means")
  out = _sharding.run_on_grid(lambda a, m: _affine_core(a, m, None), alphas, single, floating)
  return restore(out, _lead(alphas, single))


def task_arithmetic(base: PyTree, finetuned: PyTree, alphas) -> PyTree:
  """Task arithmetic (Eq. 3): theta_alpha = theta_base + sum_t alpha_t (theta_t - theta_base).

  The Hessian-weighted merge with posteriors N(theta_t, I) and the prior N(theta_base, I) (Ilharco et al., 2023).

  Args:
    base: the pretrained model (params pytree, no task axis).
    finetuned: the T finetuned models, the same pytree with a leading T axis on every leaf.
    alphas: [G, T] (or [T]) non-negative task weights (the scaling factors; they need not sum to 1).

  Returns:
    The merged params pytree with a leading G axis, each leaf in its own dtype (non-floating leaves, equal across
    the finetuned models, are passed through).

  On the simplex (rows summing to 1) task arithmetic equals simple averaging exactly: the base cancels.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import merge
    >>> base = {"w": jnp.array([1.0, 1.0])}
    >>> finetuned = {"w": jnp.array([[2.0, 1.0], [1.0, 3.0]])}          # task vectors (1, 0) and (0, 2)
    >>> merge.task_arithmetic(base, finetuned, jnp.array([0.5, 0.5]))["w"].tolist()   # 1 + (0.5, 1)
    [1.5, 2.0]
  """
  t = _num_tasks(finetuned, "finetuned")
  _checks.leading(finetuned, (t,), name="finetuned", what="T stacked task models")
  _checks.same_structure(finetuned, base, name_a="finetuned", name_b="base", lead_a=1)
  alphas, single = _checks.alphas(alphas, t)
  floating, restore = _tree.split_floating(finetuned, 1, "finetuned")
  base = _tree.like_floating(base, floating, "base")
  _checks.finite(floating, name="finetuned")
  _checks.finite(base, name="base")
  out = _sharding.run_on_grid(lambda a, m, b: _affine_core(a, m, b), alphas, single, floating, base)
  return restore(out, _lead(alphas, single))


# ---------------------------------------------------------------------------------------------------------------
# Hessian-weighted merging (Eq. 10), diagonal and full.


@jax.jit
def _diag_core(alphas, means, precisions, prior_mean, prior_precision):
  """Eq. 10 with diagonal precisions, leaf by leaf: per leaf two [G, T] x [T, P_leaf] products."""
  def one(m, h, m0, h0):
    out_dtype = m.dtype
    dtype = _tree.compute_dtype(m)
    rows = m.astype(dtype).reshape(m.shape[0], -1)
    h = h.astype(dtype).reshape(rows.shape)
    a = alphas.astype(dtype)
    if m0 is None:
      ref = jnp.mean(rows, axis=0)
      # Numerator sum_t a_t h_t (theta_t - ref) and denominator sum_t a_t h_t.
      num = _weighted_sum(a, h * (rows - ref))
      den = _weighted_sum(a, h)
    else:
      # Centred on the prior mean theta_0 the prior's share of the numerator vanishes, and the denominator
      # sum_t a_t h_t + gamma h_0 is written as h_0 + sum_t a_t (h_t - h_0). Large weights then cannot cancel: with
      # Daheim et al.'s global scale (alphas = s, gamma = 1 - s T << 0) and h_t = a_t F_t + h_0 the direct form loses
      # the Fisher under s T h_0 in float32, while h_t - h_0 is exact for h_t near h_0.
      ref = m0.astype(dtype).reshape(-1)
      h0 = h0.astype(dtype).reshape(-1)
      num = _weighted_sum(a, h * (rows - ref))
      den = h0 + _weighted_sum(a, h - h0)
    out = (ref + num / den).reshape((a.shape[0],) + m.shape[1:]).astype(out_dtype)
    return out, jnp.min(den)

  if prior_mean is None:
    pairs = jax.tree.map(lambda m, h: one(m, h, None, None), means, precisions)
  else:
    pairs = jax.tree.map(one, means, precisions, prior_mean, prior_precision)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not isinstance(x[0], tuple)
  out = jax.tree.map(lambda pr: pr[0], pairs, is_leaf=is_pair)
  min_den = jnp.min(jnp.stack([pr[1] for pr in jax.tree.leaves(pairs, is_leaf=is_pair)]))
  return out, min_den


def _check_gaussian_stack(posteriors, name):
  t = _num_tasks(posteriors.mean, f"{name}.mean")
  if isinstance(posteriors, FullGaussian):
    if jnp.ndim(posteriors.mean) != 2:
      raise ValueError(f"`{name}.mean` must be [T, P] for stacked FullGaussian posteriors, "
                       f"got shape {jnp.shape(posteriors.mean)}.")
    p = jnp.shape(posteriors.mean)[1]
    if jnp.shape(posteriors.precision) != (t, p, p):
      raise ValueError(f"`{name}.precision` must be [T, P, P] = {(t, p, p)}, got {jnp.shape(posteriors.precision)}.")
    _checks.finite(posteriors.mean, name=f"{name}.mean")
    _checks.positive_definite(posteriors.precision, name=f"{name}.precision")
  else:
    _checks.leading(posteriors.mean, (t,), name=f"{name}.mean", what="T stacked task models")
    if isinstance(posteriors, IsoGaussian):
      if jnp.shape(posteriors.precision) != (t,):
        raise ValueError(f"`{name}.precision` of stacked IsoGaussian posteriors must be [T] = ({t},), "
                         f"got {jnp.shape(posteriors.precision)}.")
    else:
      _checks.same_structure(posteriors.precision, posteriors.mean, name_a=f"{name}.precision", name_b=f"{name}.mean")
    _checks.finite(posteriors.mean, name=f"{name}.mean")
    _checks.positive_finite(posteriors.precision, name=f"{name}.precision")
  return t


def hessian_weighted(posteriors: Union[DiagGaussian, IsoGaussian, FullGaussian], alphas,
                     prior: Optional[Union[DiagGaussian, IsoGaussian, FullGaussian]] = None,
                     *, chunk_size: int = 128) -> PyTree:
  """Hessian-weighted merging (Eq. 10): the mode of p0^gamma prod_t N(theta_t, H_t^-1)^alpha_t.

    theta_alpha = (sum_t alpha_t H_t + gamma H_0)^-1 (sum_t alpha_t H_t theta_t + gamma H_0 theta_0),
    gamma = 1 - sum_t alpha_t,

  elementwise for diagonal precisions (two GEMMs of [G, T] by [T, P]) and with a Cholesky solve per alpha for full
  ones. Daheim et al. (2024) is this rule with the prior centred at the pretrained model.

  Args:
    posteriors: T stacked posteriors: `DiagGaussian` / `IsoGaussian` (leaves with a leading T axis) or `FullGaussian`
      (mean [T, P], precision [T, P, P]).
    alphas: [G, T] (or [T]) non-negative task weights. Without `prior` every row must sum to 1 (gamma = 0).
    prior: p0, needed when rows do not sum to 1; a Gaussian over the same parameters (no T axis).
    chunk_size: for full precisions, how many alphas are factorised at once (about 2 chunk_size P^2 floats, kept
      within 512 MB; on a CPU within 32 MB, at least 4, so the factorisation stays in cache); with several devices
      each device works through its own share of the grid in such chunks.

  Returns:
    The merged params pytree with a leading G axis (a [P] vector per alpha for `FullGaussian`). Computed in float32
    (float64 for float64 params under `jax_enable_x64`) and returned in each leaf's own dtype; non-floating leaves
    (step counters, PRNG keys) must be equal across tasks and are passed through, never averaged.

  Raises:
    ValueError: if a merged precision is not positive (possible only with a prior and sum(alpha) > 1).

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian({"w": jnp.array([0.0])}, {"w": jnp.array([1.0])}),
    ...                   bmerge.DiagGaussian({"w": jnp.array([1.0])}, {"w": jnp.array([3.0])})])
    >>> bmerge.merge.hessian_weighted(q, jnp.array([[0.5, 0.5]]))["w"].tolist()   # (0.5*0 + 0.5*3*1) / (0.5 + 1.5)
    [[0.75]]

  Daheim et al. (2024) merge finetuned models theta_t with Fishers F_t (scaled by dataset-size factors a_t), a prior
  precision H_0 at the pretrained theta_0 and one global scale s:
  theta_0 + s sum_t (a_t F_t + H_0)(theta_t - theta_0) / (s sum_t a_t F_t + H_0). That is this rule with
  `posteriors = stack([DiagGaussian(theta_t, a_t F_t + H_0)])`, `alphas = [s] * T` and `prior = DiagGaussian(theta_0,
  H_0)`; the prior's weight gamma = 1 - s T is then large and negative, and the denominator is computed as
  H_0 + sum_t alpha_t (h_t - H_0) so that float32 keeps the Fisher under it.

  References:
    Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
    Bayesian Model-Merging. 2024 (Eq. 10).
    Daheim, Möllenhoff, Ponti, Gurevych, Khan. Model Merging by Uncertainty-Based Gradient Matching. ICLR 2024.
  """
  if isinstance(posteriors, Mixture):
    raise TypeError("`posteriors` is a Mixture; use `bmerge.merge.mixture_weighted` for mixture posteriors.")
  if not isinstance(posteriors, (DiagGaussian, IsoGaussian, FullGaussian)):
    raise TypeError(f"`posteriors` must be stacked DiagGaussian, IsoGaussian or FullGaussian posteriors, "
                    f"got {type(posteriors).__name__}.")
  restore, set_aside = None, False
  if not isinstance(posteriors, FullGaussian):
    _num_tasks(posteriors.mean, "posteriors.mean")
    floating, restore = _tree.split_floating(posteriors.mean, 1, "posteriors.mean")
    set_aside = floating is not posteriors.mean  # some leaves are not floating point
    if isinstance(posteriors, DiagGaussian):
      _checks.same_structure(posteriors.precision, posteriors.mean, name_a="posteriors.precision",
                             name_b="posteriors.mean")
    precision = posteriors.precision if isinstance(posteriors, IsoGaussian) else _tree.like_floating(
        posteriors.precision, floating, "posteriors.precision")
    posteriors = type(posteriors)(floating, precision)
  t = _check_gaussian_stack(posteriors, "posteriors")
  alphas, single = _checks.alphas(alphas, t)
  if prior is None:
    _checks.rows_sum_to_one(alphas, what="Without a prior gamma = 1 - sum(alpha) must be 0; pass `prior=` (the "
                            "regulariser p0) to merge with weights that do not sum to 1.")
    m0 = h0 = None
  else:
    if set_aside and isinstance(prior, (IsoGaussian, DiagGaussian)):  # the prior's floating leaves only
      prior = post.as_diag(prior)
      prior = DiagGaussian(_tree.like_floating(prior.mean, posteriors.mean, "prior.mean"),
                           _tree.like_floating(prior.precision, posteriors.mean, "prior.precision"))
    m0, h0 = _checks.prior_as(prior, posteriors)
  if isinstance(posteriors, FullGaussian):
    _checks.positive_int(chunk_size, "chunk_size")
    dtype = _tree.compute_dtype(posteriors.mean)
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    out, ok = _sharding.run_on_grid(
        lambda a, m, h, pm, ph: _fullcov.hessian_weighted(a, m, h, pm, ph, chunk_size), alphas, False,
        cast(posteriors.mean), cast(posteriors.precision), cast(m0), cast(h0))
    if _checks.is_concrete(ok) and not bool(ok):
      raise ValueError("The merged precision sum_t alpha_t H_t + gamma H_0 is not positive definite for some alpha; "
                       "with a prior, keep sum(alpha) <= 1 or use a prior that keeps it positive definite.")
    out = out.astype(jnp.result_type(posteriors.mean))
    return out[0] if single else out
  diag = post.as_diag(posteriors)
  out, min_den = _sharding.run_on_grid(lambda a, m, h, pm, ph: _diag_core(a, m, h, pm, ph), alphas, False,
                                       diag.mean, diag.precision, m0, h0)
  if _checks.is_concrete(min_den) and not float(min_den) > 0:
    raise ValueError(f"The merged precision sum_t alpha_t h_t + gamma h_0 reaches {float(min_den):.4g} <= 0 for some "
                     "alpha; with a prior, keep sum(alpha) <= 1 or its precision small enough.")
  out = jax.tree.map(lambda x: x[0], out) if single else out
  return restore(out, _lead(alphas, single))


# ---------------------------------------------------------------------------------------------------------------
# Mixtures (Eqs. 11-12, Algorithm 1) and general exponential families (App. A.2).


def mixture_weighted(mixtures: Mixture, alphas, num_iters: int = 10, **kwargs) -> PyTree:
  """Mixture-weighted merging (Eqs. 11-12, Algorithm 1): the EM mode of prod_t q_t^alpha_t for mixtures q_t.

  For q_t = sum_k pi_tk N(theta_tk, H_tk^-1), iterate (Eq. 12)

    r_tk  ∝ pi_tk N(theta | theta_tk, H_tk^-1) (normalised over k),
    theta <- (sum_{t,k} r_tk alpha_t H_tk)^-1 sum_{t,k} r_tk alpha_t H_tk theta_tk,

  which never decreases sum_t alpha_t log q_t(theta); with K = 1 it is Eq. 10. A thin wrapper over
  `bmerge.em.find_modes` returning only the merged params; use that function for the convergence measures.

  Args:
    mixtures: T stacked `Mixture`s (log_weights [T, K], components with leading [T, K] axes).
    alphas: [G, T] (or [T]) non-negative task weights; without a `prior=` rows must sum to 1.
    num_iters: EM iterations.
    **kwargs: `prior`, `init`, `chunk_size`, `block_size` of `bmerge.em.find_modes`.

  Returns:
    The merged params pytree with a leading G axis.

  Example:
    Two tasks, each a mixture of two unit Gaussians in one dimension; at alpha = (1, 0) the EM climbs from the
    weighted mean of task 1's components, 0.3 (-3) + 0.7 (2) = 0.5, to the mode of its mixture, next to 2:

    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> comps = bmerge.DiagGaussian(jnp.array([[[-3.0], [2.0]], [[0.0], [1.0]]]), jnp.ones((2, 2, 1)))
    >>> mixtures = bmerge.Mixture(comps, jnp.log(jnp.array([[0.3, 0.7], [0.5, 0.5]])))
    >>> round(float(bmerge.merge.mixture_weighted(mixtures, jnp.array([1.0, 0.0]), num_iters=20)[0]), 3)
    2.0
  """
  return em.find_modes(mixtures, alphas, num_iters=num_iters, **kwargs).params


def _widen(tree):
  """Every floating leaf in float32 or wider (the dtype merging runs in)."""
  return jax.tree.map(lambda x: jnp.asarray(x, _tree.compute_dtype(x)), tree)


@partial(jax.jit, static_argnames="kind")
def _expfam_core(alphas, lam, prior_lam, kind):
  return post.mode(post.from_natural(kind, post.aggregate(lam, alphas, prior_lam)))


def exponential_family(posteriors: Union[DiagGaussian, IsoGaussian, FullGaussian, Beta], alphas,
                       prior=None) -> PyTree:
  """Merging by natural-parameter aggregation for any supported family (App. A.2, Eq. 13).

  lambda_alpha = sum_t alpha_t lambda_t + gamma lambda_0, then the mode of the family at lambda_alpha. For Gaussians
  this is Eq. 10 (prefer `hessian_weighted`, which also centres for float32); for `Beta` it is the Beta-Bernoulli
  example: theta_alpha = log((a_alpha - 1) / (b_alpha - 1)), the logit of the merged coin probability.

  Args:
    posteriors: T stacked `DiagGaussian`, `IsoGaussian`, `FullGaussian` or `Beta` posteriors.
    alphas: [G, T] (or [T]) non-negative task weights; without `prior` rows must sum to 1.
    prior: p0, of the same family (no T axis), weighted by gamma = 1 - sum_t alpha_t.

  Returns:
    The modes with a leading G axis (none for a [T] input), in the posteriors' dtypes.

  Example:
    Coin flips: task 1 saw heads (a, b) = (3, 2), task 2 tails (2, 3); with weights (1/2, 1/2) the merged Beta is
    (2.5, 2.5), whose mode is pi = 1/2, theta = logit(1/2) = 0:

    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.Beta(jnp.array([3.0, 2.0]), jnp.array([2.0, 3.0]))
    >>> print(bmerge.merge.exponential_family(q, jnp.array([[0.5, 0.5], [1.0, 0.0]])).round(4))   # 0 and log 2
    [0.     0.6931]
  """
  if not isinstance(posteriors, (DiagGaussian, IsoGaussian, FullGaussian, Beta)):
    raise TypeError(f"`posteriors` must be a stacked DiagGaussian, IsoGaussian, FullGaussian or Beta, "
                    f"got {type(posteriors).__name__}.")
  if isinstance(posteriors, Beta):
    t = _num_tasks(posteriors.a, "posteriors.a")
    _checks.same_structure(posteriors.a, posteriors.b, name_a="posteriors.a", name_b="posteriors.b")
    _checks.positive_finite(posteriors.a, name="posteriors.a")
    _checks.positive_finite(posteriors.b, name="posteriors.b")
  else:
    t = _check_gaussian_stack(posteriors, "posteriors")
  alphas, single = _checks.alphas(alphas, t)
  if prior is None:
    _checks.rows_sum_to_one(alphas, what="Without a prior gamma must be 0; pass `prior=`.")
    prior_lam = None
  else:
    if type(prior) is not type(posteriors) and not (
        isinstance(prior, (IsoGaussian, DiagGaussian)) and isinstance(posteriors, (IsoGaussian, DiagGaussian))):
      raise TypeError(f"`prior` must be a {type(posteriors).__name__} like the posteriors, got {type(prior).__name__}.")
    prior_lam = post.natural_params(_widen(prior))
  kind = DiagGaussian if isinstance(posteriors, IsoGaussian) else type(posteriors)
  # Natural parameters and their aggregation in float32 or wider; the mode comes back in the inputs' dtypes.
  like = posteriors.a if isinstance(posteriors, Beta) else posteriors.mean
  out = _sharding.run_on_grid(lambda a, lam, lam0: _expfam_core(a, lam, lam0, kind), alphas, single,
                              post.natural_params(_widen(posteriors)), prior_lam)
  return jax.tree.map(lambda o, x: o.astype(jnp.result_type(x)), out, like)
