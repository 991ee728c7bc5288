"""Posterior types and the exponential-family view of merging.

Every posterior is a NamedTuple of arrays (a pytree with a fixed structure), so it passes through `jit`, `vmap`,
`lax.scan` and orbax unchanged. A stack of T posteriors is the same type with a leading T axis on every array
(`stack`); a mixture carries a leading K axis on its components.

Merging is natural-parameter aggregation (paper App. A.2): for q_t ∝ exp(lambda_t^T T(theta)),
`lambda_alpha = sum_t alpha_t lambda_t + gamma lambda_0` with gamma = 1 - sum_t alpha_t, and the merged model is the
mode of the family with natural parameter lambda_alpha. `natural_params`, `aggregate`, `from_natural` and `mode` spell
that out for every family here; `bmerge.merge.exponential_family` chains them over a grid.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Beta",
    "BetaNatural",
    "DiagGaussian",
    "FullGaussian",
    "GaussianNatural",
    "IsoGaussian",
    "Mixture",
    "Posterior",
    "aggregate",
    "as_diag",
    "from_natural",
    "mode",
    "natural_params",
    "stack",
    "unstack",
]

PyTree = Any


class IsoGaussian(NamedTuple):
  """N(mean, I / precision): one scalar precision for every parameter (the prior of simple averaging, Eq. 2)."""

  mean: PyTree  # params pytree
  precision: jax.Array  # [] scalar > 0


class DiagGaussian(NamedTuple):
  """N(mean, diag(precision)^-1); `precision` is a pytree shaped like `mean` (Eq. 10)."""

  mean: PyTree  # params pytree
  precision: PyTree  # same structure and shapes as `mean`, every entry > 0


class FullGaussian(NamedTuple):
  """N(mean, precision^-1) over a flat parameter vector (small models)."""

  mean: jax.Array  # [P]
  precision: jax.Array  # [P, P] symmetric positive definite


class Mixture(NamedTuple):
  """sum_k exp(log_weights[k]) N(component k) (Eq. 11).

  `components` is a `DiagGaussian` or `FullGaussian` whose arrays carry a leading K axis; `log_weights` need not be
  normalised (they are normalised with logsumexp wherever used).
  """

  components: Union[DiagGaussian, FullGaussian]  # arrays with a leading [K] axis
  log_weights: jax.Array  # [K]


class Beta(NamedTuple):
  """Beta(a, b) over pi = sigmoid(theta): the Beta-Bernoulli example of App. A.2 (a second, non-Gaussian family)."""

  a: jax.Array  # [...] > 1 for a finite mode
  b: jax.Array  # [...] > 1 for a finite mode


Posterior = Union[IsoGaussian, DiagGaussian, FullGaussian, Mixture, Beta]


def stack(posteriors) -> Posterior:
  """Stacks T posteriors of one type and structure into one posterior with a leading T axis on every array."""
  posteriors = list(posteriors)
  if not posteriors:
    raise ValueError("stack: `posteriors` is empty; expected at least one posterior.")
  kinds = {type(p) for p in posteriors}
  if len(kinds) != 1:
    raise TypeError(f"stack: `posteriors` mixes types {sorted(k.__name__ for k in kinds)}; expected one type.")
  structs = [jax.tree.structure(p) for p in posteriors]
  for i, s in enumerate(structs[1:], start=1):
    if s != structs[0]:
      raise ValueError(f"stack: posterior {i} has pytree structure {s}, expected {structs[0]} (that of posterior 0).")
  shapes0 = [np.shape(x) for x in jax.tree.leaves(posteriors[0])]
  for i, p in enumerate(posteriors[1:], start=1):
    shapes = [np.shape(x) for x in jax.tree.leaves(p)]
    if shapes != shapes0:
      raise ValueError(f"stack: posterior {i} has leaf shapes {shapes}, expected {shapes0} (those of posterior 0).")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *posteriors)


def unstack(posterior: Posterior) -> list:
  """Inverse of `stack`: a list of posteriors, one per entry of the leading axis."""
  n = jax.tree.leaves(posterior)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], posterior) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Exponential-family interface. Natural parameters are returned as a tuple of pytrees; every function below works
# unchanged on stacked posteriors (leading axes broadcast), which is what `aggregate` relies on.


class GaussianNatural(NamedTuple):
  """Natural parameters of a Gaussian: eta1 = H m and eta2 = -H / 2 (H diagonal pytree, or [P, P])."""

  eta1: PyTree
  eta2: PyTree


class BetaNatural(NamedTuple):
  """Natural parameters of a Beta with sufficient statistics (log pi, log(1 - pi)): (a - 1, b - 1)."""

  eta1: jax.Array
  eta2: jax.Array


def natural_params(q: Posterior):
  """The natural parameters lambda of q (App. A.2)."""
  if isinstance(q, DiagGaussian):
    return GaussianNatural(jax.tree.map(jnp.multiply, q.precision, q.mean),
                           jax.tree.map(lambda h: -0.5 * h, q.precision))
  if isinstance(q, IsoGaussian):
    return natural_params(_iso_to_diag(q))
  if isinstance(q, FullGaussian):
    return GaussianNatural(jnp.einsum("...ij,...j->...i", q.precision, q.mean), -0.5 * q.precision)
  if isinstance(q, Beta):
    return BetaNatural(q.a - 1.0, q.b - 1.0)
  raise TypeError(f"natural_params: expected IsoGaussian, DiagGaussian, FullGaussian or Beta, got {type(q).__name__}.")


def from_natural(kind: type, lam) -> Posterior:
  """The posterior of type `kind` with natural parameters `lam` (inverse of `natural_params`)."""
  if kind in (DiagGaussian, IsoGaussian):
    prec = jax.tree.map(lambda e2: -2.0 * e2, lam.eta2)
    return DiagGaussian(jax.tree.map(jnp.divide, lam.eta1, prec), prec)
  if kind is FullGaussian:
    prec = -2.0 * lam.eta2
    return FullGaussian(jnp.linalg.solve(prec, lam.eta1[..., None])[..., 0], prec)
  if kind is Beta:
    return Beta(lam.eta1 + 1.0, lam.eta2 + 1.0)
  raise TypeError(f"from_natural: unsupported kind {kind!r}.")


def aggregate(stacked_lam, alphas: jax.Array, prior_lam=None):
  """lambda_alpha = sum_t alpha_t lambda_t + gamma lambda_0 for every row of `alphas` [G, T] (leading G axis out)."""
  alphas = jnp.asarray(alphas)
  out = jax.tree.map(lambda lam: jnp.tensordot(alphas, lam, axes=(1, 0)), stacked_lam)
  if prior_lam is not None:
    gamma = 1.0 - jnp.sum(alphas, axis=1)
    out = jax.tree.map(lambda o, l0: o + gamma.reshape((-1,) + (1,) * jnp.ndim(l0)) * l0, out, prior_lam)
  return out


def mode(q: Posterior) -> PyTree:
  """The mode in the merging parametrisation: the mean of a Gaussian, theta = logit-mode log((a-1)/(b-1)) of a Beta."""
  if isinstance(q, (DiagGaussian, IsoGaussian, FullGaussian)):
    return q.mean
  if isinstance(q, Beta):
    return jnp.log(q.a - 1.0) - jnp.log(q.b - 1.0)
  raise TypeError(f"mode: expected a Gaussian or Beta posterior, got {type(q).__name__}.")


def _iso_to_diag(q: IsoGaussian) -> DiagGaussian:
  lead = jnp.ndim(q.precision)
  return DiagGaussian(q.mean, jax.tree.map(
      lambda m: jnp.broadcast_to(jnp.reshape(q.precision, jnp.shape(q.precision) + (1,) * (jnp.ndim(m) - lead)),
                                 jnp.shape(m)), q.mean))


def as_diag(q: Union[IsoGaussian, DiagGaussian]) -> DiagGaussian:
  """An `IsoGaussian` (possibly stacked) as the equivalent `DiagGaussian`; a `DiagGaussian` is returned as is."""
  if isinstance(q, DiagGaussian):
    return q
  if isinstance(q, IsoGaussian):
    return _iso_to_diag(q)
  raise TypeError(f"as_diag: expected IsoGaussian or DiagGaussian, got {type(q).__name__}.")
