r"""The 2-D toy problem of the paper's Fig. 2 (App. B.1): T tasks with log-sum-exp losses over theta in R^2.

.. math:: \ell_t(\theta) = \log \sum_{i=1}^{N} \exp(a_{it}^\top \theta + b_{it}) + \frac{l_2}{2} \|\theta\|^2

with a, b drawn from normal distributions for tasks 1 and 2 and uniformly for task 3. A log-sum-exp of affine
functions is convex but bounded below only when 0 lies in the convex hull of the a_it, which random draws do not
guarantee; the L2 term (a N(0, 1/l2) prior) makes every loss strongly convex and exp(-loss_t) a proper density.

`log_density` evaluates the full-Gaussian and mixture posteriors fitted to exp(-beta loss_t), for the surrogate
figures and for checking the fits against quadrature in the plane.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bmerge.models import toy2d
  >>> tasks = toy2d.make_tasks(jax.random.key(0), num_terms=4)
  >>> toy2d.task_losses(jnp.zeros(2), tasks, l2=0.1).shape                   # one loss per task, T = 3
  (3,)

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Fig. 2, App. B.1).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from bmerge import _checks
from bmerge.posteriors import FullGaussian, Mixture

__all__ = ["Tasks", "log_density", "make_tasks", "task_loss", "task_losses"]


class Tasks(NamedTuple):
  """The affine pieces a_it, b_it of every task's log-sum-exp l_t(theta) = log sum_i exp(a_it^T theta + b_it).

  Example:
    >>> import jax
    >>> from bmerge.models import toy2d
    >>> toy2d.make_tasks(jax.random.key(0), num_terms=5)._fields
    ('a', 'b')
  """

  a: jax.Array  # [T, N, 2] slopes a_it
  b: jax.Array  # [T, N] offsets b_it


def make_tasks(key: jax.Array, num_terms: int = 8, normal_std: float = 1.0, uniform_a: float = 1.5,
               uniform_b: float = 2.0) -> Tasks:
  """Three tasks as in App. B.1: a_it, b_it ~ N(0, std^2) for t = 1, 2; a_it ~ U[-uniform_a, uniform_a]^2 and
  b_it ~ U[-uniform_b, uniform_b] for t = 3.

  Args:
    key: PRNG key of the draws.
    num_terms: N, affine pieces per task.
    normal_std: std of the normal draws (tasks 1 and 2).
    uniform_a: half-width of the uniform slopes (task 3).
    uniform_b: half-width of the uniform offsets (task 3).

  Returns:
    `Tasks(a [3, N, 2], b [3, N])`.

  Example:
    >>> import jax
    >>> from bmerge.models import toy2d
    >>> tasks = toy2d.make_tasks(jax.random.key(0), num_terms=4)
    >>> tasks.a.shape, tasks.b.shape
    ((3, 4, 2), (3, 4))
  """
  num_terms = _checks.positive_int(num_terms, "num_terms")
  return _draw(key, num_terms, normal_std, uniform_a, uniform_b)


@partial(jax.jit, static_argnums=1)
def _draw(key, n, std, uniform_a, uniform_b):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  a12 = std * jax.random.normal(k1, (2, n, 2))
  b12 = std * jax.random.normal(k2, (2, n))
  a3 = jax.random.uniform(k3, (1, n, 2), minval=-uniform_a, maxval=uniform_a)
  b3 = jax.random.uniform(k4, (1, n), minval=-uniform_b, maxval=uniform_b)
  return Tasks(jnp.concatenate([a12, a3]), jnp.concatenate([b12, b3]))


def task_loss(theta: jax.Array, a: jax.Array, b: jax.Array, l2: float) -> jax.Array:
  """One task's loss log sum_i exp(a_i^T theta + b_i) + l2 / 2 |theta|^2 at theta [2] (a [N, 2], b [N]).

  Args:
    theta: the point [2].
    a: slopes [N, 2].
    b: offsets [N].
    l2: the L2 weight (a N(0, 1/l2) prior).

  Returns:
    The scalar loss.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import toy2d
    >>> round(float(toy2d.task_loss(jnp.zeros(2), jnp.ones((2, 2)), jnp.zeros(2), 0.1)), 5)   # log 2
    0.69315
  """
  return logsumexp(a @ theta + b) + 0.5 * l2 * jnp.dot(theta, theta)


def task_losses(theta: jax.Array, tasks: Tasks, l2: float) -> jax.Array:
  """[T] every task's loss l_t(theta) at theta [2]: the `task_losses(params, batch)` of `bmerge.exact.joint_train`.

  Args:
    theta: the point [2].
    tasks: the `Tasks` (a [T, N, 2], b [T, N]).
    l2: the L2 weight of every loss.

  Returns:
    [T] losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import toy2d
    >>> tasks = toy2d.Tasks(jnp.zeros((3, 2, 2)), jnp.zeros((3, 2)))      # every loss is log 2 at theta = 0
    >>> print(toy2d.task_losses(jnp.zeros(2), tasks, 0.1).round(4))
    [0.6931 0.6931 0.6931]
  """
  a, b = tasks
  return jax.vmap(task_loss, in_axes=(None, 0, 0, None))(theta, a, b, l2)


def _gauss_logpdf(theta, mean, precision):
  d = theta - mean
  _, logdet = jnp.linalg.slogdet(precision)
  quad = jnp.einsum("...i,ij,...j->...", d, precision, d)
  return -0.5 * quad + 0.5 * logdet - 0.5 * mean.shape[-1] * jnp.log(2 * jnp.pi)


def log_density(q: Union[FullGaussian, Mixture], theta: jax.Array) -> jax.Array:
  """log q(theta) of one `FullGaussian` (mean [P], precision [P, P]) or one `Mixture` of them, at theta [..., P].

  log N(theta | m, H^-1) = -1/2 (theta - m)^T H (theta - m) + 1/2 log det H - P/2 log 2 pi; a mixture adds its
  normalised log weights and takes the logsumexp over components (Eq. 11).

  Args:
    q: a `FullGaussian` or a `Mixture` of `FullGaussian` components.
    theta: points [..., P].

  Returns:
    log q at every point, shape [...].

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import FullGaussian
    >>> from bmerge.models import toy2d
    >>> q = FullGaussian(jnp.zeros(2), jnp.eye(2))
    >>> round(float(toy2d.log_density(q, jnp.zeros(2))), 4)   # -log(2 pi)
    -1.8379
  """
  if isinstance(q, Mixture):
    comps = q.components
    lp = jax.vmap(lambda m, h: _gauss_logpdf(theta, m, h), out_axes=-1)(comps.mean, comps.precision)
    return logsumexp(lp + (q.log_weights - logsumexp(q.log_weights)), axis=-1)
  if not isinstance(q, FullGaussian):
    raise TypeError(f"`q` must be a FullGaussian or a Mixture of FullGaussian components, got {type(q).__name__}.")
  return _gauss_logpdf(theta, q.mean, q.precision)
