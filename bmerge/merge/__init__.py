"""Merging rules over a whole grid of task weights (the paper's Eqs. 8-11).

Every rule takes `alphas` [G, T] (or one [T] vector) and returns the merged params with a leading G axis, in one
compiled call:

- `simple_average(means, alphas)`: sum_t alpha_t theta_t (Eq. 8).
- `task_arithmetic(base, finetuned, alphas, ...)`: the base plus weighted task vectors.
- `hessian_weighted(posteriors, alphas, prior=None)`: (sum_t alpha_t H_t)^-1 sum_t alpha_t H_t theta_t (Eq. 10), for
  isotropic, diagonal and full Gaussians.
- `mixture_weighted(mixtures, alphas, num_iters=...)`: the mode of the weighted product of mixtures (Eq. 11), found by
  the batched EM of `bmerge.merge.em`.
- `exponential_family(...)`: the general form, natural parameters added with the weights.

Example:
  >>> import jax.numpy as jnp
  >>> from bmerge import merge
  >>> means = {"w": jnp.array([[0.0, 2.0], [2.0, 4.0]])}  # two tasks, stacked
  >>> merge.simple_average(means, jnp.array([[0.5, 0.5]]))["w"]
  Array([[1., 3.]], dtype=float32)
"""

from bmerge.merge import em
from bmerge.merge.rules import exponential_family
from bmerge.merge.rules import hessian_weighted
from bmerge.merge.rules import mixture_weighted
from bmerge.merge.rules import simple_average
from bmerge.merge.rules import task_arithmetic

__all__ = ["em", "exponential_family", "hessian_weighted", "mixture_weighted", "simple_average", "task_arithmetic"]
