"""Posterior types and the exponential-family view of merging.

Every posterior is a NamedTuple of arrays (a pytree with a fixed structure), so it passes through `jit`, `vmap`,
`lax.scan` and orbax unchanged. A stack of T posteriors is the same type with a leading T axis on every array
(`stack`); a mixture carries a leading K axis on its components.

Merging is natural-parameter aggregation (paper Eq. 5 and App. A.2): for q_t ∝ exp(lambda_t^T T(theta)),

  p_alpha ∝ p0^gamma prod_t q_t^alpha_t   <=>   lambda_alpha = sum_t alpha_t lambda_t + gamma lambda_0,
  gamma = 1 - sum_t alpha_t,

and the merged model is the mode of the family with natural parameter lambda_alpha (Eq. 13). `natural_params`,
`aggregate`, `from_natural` and `mode` spell that out for every family here; `bmerge.merge.exponential_family` chains
them over a grid.

Example:
  Two unit-precision Gaussians at 0 and 2, merged with weights (1/2, 1/2): the mode of the product is 1.

  >>> import jax.numpy as jnp
  >>> from bmerge import posteriors as post
  >>> q = post.stack([post.DiagGaussian(jnp.array([0.0]), jnp.array([1.0])),
  ...                 post.DiagGaussian(jnp.array([2.0]), jnp.array([1.0]))])
  >>> lam = post.aggregate(post.natural_params(q), jnp.array([[0.5, 0.5]]))
  >>> post.mode(post.from_natural(post.DiagGaussian, lam)).tolist()
  [[1.0]]

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eqs. 5, 9-11 and 13; App. A.2).
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
  """N(mean, I / precision): one scalar precision h for every parameter (Eq. 9).

  -log q(theta) = h / 2 |theta - mean|^2 + const: with h = 1 the surrogate of simple averaging (Eq. 2) and task
  arithmetic (Eq. 3). Stacked, `precision` is [T].

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.IsoGaussian({"w": jnp.zeros(3)}, jnp.asarray(1.0))
    >>> bmerge.posteriors.as_diag(q).precision["w"].tolist()
    [1.0, 1.0, 1.0]
  """

  mean: PyTree  # params pytree
  precision: jax.Array  # [] scalar > 0


class DiagGaussian(NamedTuple):
  """N(mean, diag(h)^-1) with h = `precision`, a pytree shaped like `mean`: Eq. 10 with diagonal H_t.

  -log q(theta) = 1/2 sum_p h_p (theta_p - mean_p)^2 + const. What IVON and the squared-gradient Fisher produce
  (paper Sec. 3.5).

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.DiagGaussian(mean={"w": jnp.array([1.0, 2.0])}, precision={"w": jnp.array([4.0, 0.5])})
    >>> q.precision["w"].tolist()
    [4.0, 0.5]
  """

  mean: PyTree  # params pytree
  precision: PyTree  # same structure and shapes as `mean`, every entry > 0


class FullGaussian(NamedTuple):
  """N(mean, H^-1) over a flat parameter vector theta [P] with H = `precision` [P, P] (small models; Eq. 10).

  -log q(theta) = 1/2 (theta - mean)^T H (theta - mean) + const.

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.FullGaussian(jnp.zeros(2), jnp.array([[2.0, 0.5], [0.5, 1.0]]))
    >>> q.mean.shape, q.precision.shape
    ((2,), (2, 2))
  """

  mean: jax.Array  # [P]
  precision: jax.Array  # [P, P] symmetric positive definite


class Mixture(NamedTuple):
  """q(theta) = sum_k pi_k N(theta | theta_k, H_k^-1), pi_k ∝ exp(log_weights[k]) (Eq. 11).

  `components` is a `DiagGaussian` or `FullGaussian` whose arrays carry a leading K axis; `log_weights` [K] need not
  be normalised (they are normalised with logsumexp wherever used). Stacked over T tasks every array gains a leading
  T axis (`log_weights` [T, K]).

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> comps = bmerge.DiagGaussian({"w": jnp.array([[0.0], [1.0]])}, {"w": jnp.ones((2, 1))})    # K = 2
    >>> mix = bmerge.Mixture(comps, jnp.log(jnp.array([0.25, 0.75])))
    >>> jnp.exp(mix.log_weights).round(2).tolist()
    [0.25, 0.75]
  """

  components: Union[DiagGaussian, FullGaussian]  # arrays with a leading [K] axis
  log_weights: jax.Array  # [K]


class Beta(NamedTuple):
  """Beta(a, b) over pi = sigmoid(theta): the Beta-Bernoulli example of App. A.2 (a second, non-Gaussian family).

  q(pi) ∝ pi^(a - 1) (1 - pi)^(b - 1), sufficient statistics T = (log pi, log(1 - pi)), natural parameters
  lambda = (a - 1, b - 1); its mode in theta = logit(pi) is log((a - 1) / (b - 1)).

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> float(bmerge.posteriors.mode(bmerge.Beta(jnp.asarray(3.0), jnp.asarray(2.0))))   # log(2 / 1)
    0.6931...
  """

  a: jax.Array  # [...] > 1 for a finite mode
  b: jax.Array  # [...] > 1 for a finite mode


Posterior = Union[IsoGaussian, DiagGaussian, FullGaussian, Mixture, Beta]


def stack(posteriors) -> Posterior:
  """Stacks T posteriors of one type and structure into one posterior with a leading T axis on every array.

  The merge rules take the T task posteriors q_1..q_T of Eq. 5 in this form.

  Args:
    posteriors: a sequence of T >= 1 posteriors of the same type, pytree structure and leaf shapes.

  Returns:
    One posterior of that type whose every array has a leading T axis.

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})] * 3)
    >>> q.mean["w"].shape
    (3, 2)
  """
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
  """Inverse of `stack`: a list of posteriors, one per entry of the leading axis.

  Args:
    posterior: a posterior whose arrays share a leading axis of size T.

  Returns:
    A list of T posteriors of the same type without that axis.

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian(jnp.full(2, float(t)), jnp.ones(2)) for t in range(3)])
    >>> [p.mean.tolist() for p in bmerge.unstack(q)]
    [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
  """
  n = jax.tree.leaves(posterior)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], posterior) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Exponential-family interface. Natural parameters are returned as a tuple of pytrees; every function below works
# unchanged on stacked posteriors (leading axes broadcast), which is what `aggregate` relies on.


class GaussianNatural(NamedTuple):
  """Natural parameters of a Gaussian N(m, H^-1): eta1 = H m and eta2 = -H / 2 (H diagonal pytree, or [P, P]).

  With sufficient statistics T(theta) = (theta, theta theta^T), log q = eta1 . theta + tr(eta2 theta theta^T) + const
  (paper Sec. 3.3).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> lam = post.natural_params(post.DiagGaussian(jnp.array([2.0]), jnp.array([3.0])))
    >>> lam.eta1.tolist(), lam.eta2.tolist()
    ([6.0], [-1.5])
  """

  eta1: PyTree
  eta2: PyTree


class BetaNatural(NamedTuple):
  """Natural parameters of a Beta with sufficient statistics (log pi, log(1 - pi)): (a - 1, b - 1) (App. A.2).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> lam = post.natural_params(post.Beta(jnp.asarray(3.0), jnp.asarray(2.0)))
    >>> float(lam.eta1), float(lam.eta2)
    (2.0, 1.0)
  """

  eta1: jax.Array
  eta2: jax.Array


def natural_params(q: Posterior):
  """The natural parameters lambda of q ∝ exp(lambda^T T(theta)) (paper Sec. 3.3 and App. A.2).

  Gaussians N(m, H^-1): lambda = (H m, -H / 2) (`GaussianNatural`; an `IsoGaussian` as the equivalent diagonal one);
  Beta(a, b): lambda = (a - 1, b - 1) (`BetaNatural`). Works unchanged on stacked posteriors.

  Args:
    q: an `IsoGaussian`, `DiagGaussian`, `FullGaussian` or `Beta` (possibly stacked).

  Returns:
    A `GaussianNatural` or `BetaNatural` with the arrays of `q`'s shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> lam = post.natural_params(post.FullGaussian(jnp.array([1.0, 1.0]), jnp.array([[2.0, 0.0], [0.0, 4.0]])))
    >>> lam.eta1.tolist()
    [2.0, 4.0]
  """
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
  """The posterior of type `kind` with natural parameters `lam` (inverse of `natural_params`).

  Gaussians: H = -2 eta2, m = H^-1 eta1; Beta: (a, b) = (eta1 + 1, eta2 + 1).

  Args:
    kind: `DiagGaussian`, `IsoGaussian` (returned as a `DiagGaussian`), `FullGaussian` or `Beta`.
    lam: the natural parameters, as `natural_params` or `aggregate` return them.

  Returns:
    The posterior of that family.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> q = post.from_natural(post.DiagGaussian, post.GaussianNatural(jnp.array([6.0]), jnp.array([-1.5])))
    >>> q.mean.tolist(), q.precision.tolist()
    ([2.0], [3.0])
  """
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
  """lambda_alpha = sum_t alpha_t lambda_t + gamma lambda_0, gamma = 1 - sum_t alpha_t, for every row of a grid.

  The natural parameters of p_alpha ∝ p0^gamma prod_t q_t^alpha_t (Eq. 5; App. A.2, step 2).

  Args:
    stacked_lam: natural parameters of T stacked posteriors (leading T axis on every array).
    alphas: [G, T] task weights.
    prior_lam: natural parameters of the prior p0 (no T axis), or None (gamma must then be 0 for the result to mean
      Eq. 5).

  Returns:
    The natural parameters lambda_alpha with a leading G axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> lam = post.BetaNatural(jnp.array([2.0, 0.0]), jnp.array([0.0, 2.0]))    # two tasks
    >>> post.aggregate(lam, jnp.array([[0.25, 0.75]])).eta1.tolist()
    [0.5]
  """
  alphas = jnp.asarray(alphas)
  out = jax.tree.map(lambda lam: jnp.tensordot(alphas, lam, axes=(1, 0)), stacked_lam)
  if prior_lam is not None:
    gamma = 1.0 - jnp.sum(alphas, axis=1)
    out = jax.tree.map(lambda o, l0: o + gamma.reshape((-1,) + (1,) * jnp.ndim(l0)) * l0, out, prior_lam)
  return out


def mode(q: Posterior) -> PyTree:
  """The mode in the merging parametrisation (Eq. 13): the mean of a Gaussian; log((a - 1) / (b - 1)) of a Beta.

  For a Beta over pi = sigmoid(theta) the mode in theta is the logit of (a - 1) / (a + b - 2) (App. A.2).

  Args:
    q: a Gaussian or `Beta` posterior (possibly stacked).

  Returns:
    The mode, shaped like the posterior's parameters.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> post.mode(post.DiagGaussian({"w": jnp.array([1.5])}, {"w": jnp.array([2.0])}))["w"].tolist()
    [1.5]
  """
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
  """An `IsoGaussian` (possibly stacked) as the equivalent `DiagGaussian`; a `DiagGaussian` is returned as is.

  N(m, I / h) = N(m, diag(h 1)^-1): the scalar precision broadcast to every parameter.

  Args:
    q: an `IsoGaussian` (precision [] or, stacked, [T]) or a `DiagGaussian`.

  Returns:
    A `DiagGaussian` with a precision pytree shaped like the mean.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import posteriors as post
    >>> q = post.stack([post.IsoGaussian(jnp.zeros(2), jnp.asarray(h)) for h in (1.0, 3.0)])
    >>> post.as_diag(q).precision.tolist()
    [[1.0, 1.0], [3.0, 3.0]]
  """
  if isinstance(q, DiagGaussian):
    return q
  if isinstance(q, IsoGaussian):
    return _iso_to_diag(q)
  raise TypeError(f"as_diag: expected IsoGaussian or DiagGaussian, got {type(q).__name__}.")
