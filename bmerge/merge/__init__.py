"""Merging rules over a whole grid of task weights: the mode of p0^gamma prod_t q_t^alpha_t (the paper's Eqs. 5-8).

Every rule takes `alphas` [G, T] (or one [T] vector) and returns the merged params with a leading G axis, in one
compiled call:

- `simple_average(means, alphas)`: sum_t alpha_t theta_t (Eq. 2).
- `task_arithmetic(base, finetuned, alphas)`: theta_base + sum_t alpha_t (theta_t - theta_base) (Eq. 3).
- `hessian_weighted(posteriors, alphas, prior=None)`: (sum_t alpha_t H_t)^-1 sum_t alpha_t H_t theta_t (Eq. 10), for
  isotropic, diagonal and full Gaussians.
- `mixture_weighted(mixtures, alphas, num_iters=...)`: the mode of the weighted product of mixtures (Eq. 11), found by
  the batched EM of `bmerge.merge.em` (Eq. 12, Algorithm 1).
- `exponential_family(...)`: the general form, natural parameters added with the weights (App. A.2, Eq. 13).

Example:
  >>> import jax.numpy as jnp
  >>> from bmerge import merge
  >>> means = {"w": jnp.array([[0.0, 2.0], [2.0, 4.0]])}  # two tasks, stacked
  >>> merge.simple_average(means, jnp.array([[0.5, 0.5]]))["w"]
  Array([[1., 3.]], dtype=float32)

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eqs. 2-3, 5-8, 10-13; Algorithm 1; App. A.2-A.3).
"""

from bmerge.merge import em
from bmerge.merge.rules import exponential_family
from bmerge.merge.rules import hessian_weighted
from bmerge.merge.rules import mixture_weighted
from bmerge.merge.rules import simple_average
from bmerge.merge.rules import task_arithmetic

__all__ = ["em", "exponential_family", "hessian_weighted", "mixture_weighted", "simple_average", "task_arithmetic"]
