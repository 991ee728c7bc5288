"""MultiIVON: IVON posteriors over seeds and stopping steps as one equally weighted mixture (paper Sec. 3.5).

Per task, run IVON from several seeds and keep the posterior N(m, diag(ess (h + delta))^-1) at several stopping
steps; the K = num_seeds * num_stops diagonal Gaussians, equally weighted, form the task's mixture
q_t = (1/K) sum_k N(theta_tk, diag(h_tk)^-1) for `bmerge.merge.mixture_weighted` (Eqs. 11-12). The paper uses
5 seeds x steps {25, 50, ..., 150}: K = 30 per task. `bmerge.fit.multi_ivon` runs it on a user's loss and batches.

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Sec. 3.5, Eqs. 11-12, App. B.3).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import Mixture
from bmerge.posteriors import stack

__all__ = ["collect", "equal_mixture"]

PyTree = Any


def equal_mixture(posteriors: Sequence[DiagGaussian]) -> Mixture:
  """The equally weighted mixture (1/K) sum_k q_k of K `DiagGaussian`s: components stacked on a leading K axis.

  log_weights are all -log K (float32). Raises ValueError if `posteriors` is empty or the structures differ.

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> from bmerge.optim import multi_ivon
    >>> qs = [bmerge.DiagGaussian({"w": jnp.full(2, float(k))}, {"w": jnp.ones(2)}) for k in range(4)]
    >>> mix = multi_ivon.equal_mixture(qs)
    >>> mix.components.mean["w"].shape, jnp.exp(mix.log_weights).tolist()
    ((4, 2), [0.25, 0.25, 0.25, 0.25])
  """
  posteriors = list(posteriors)
  if not posteriors:
    raise ValueError("equal_mixture: `posteriors` is empty; expected at least one DiagGaussian.")
  for i, q in enumerate(posteriors):
    if not isinstance(q, DiagGaussian):
      raise TypeError(f"equal_mixture: `posteriors[{i}]` is a {type(q).__name__}; expected DiagGaussian.")
  k = len(posteriors)
  return Mixture(components=stack(posteriors), log_weights=jnp.full((k,), -math.log(k), jnp.float32))


def collect(keys: jax.Array,
            init_fn: Callable[[jax.Array], PyTree],
            step_fn: Callable[[jax.Array, PyTree, jax.Array], PyTree],
            posterior_fn: Callable[[PyTree], DiagGaussian],
            stop_steps: Sequence[int]) -> Mixture:
  """Trains one run per key and collects its posterior after each of `stop_steps` steps into an equal mixture.

  For each key (one per seed): `k_init, k_train = jax.random.split(key)`, `carry = init_fn(k_init)`, then step
  i = 0, 1, ..., max(stop_steps) - 1 runs `carry = step_fn(step_keys[i], carry, i)` with
  `step_keys = jax.random.split(k_train, max(stop_steps))` (inside a jitted `lax.scan`, one segment per stop), and
  after `s` steps, for every s in `stop_steps`, `posterior_fn(carry)` gives a component. Components are ordered
  seed-major: k = seed_index * len(stop_steps) + stop_index.

  Args:
    keys: a key array [num_seeds] (e.g. `jax.random.split(jax.random.key(0), 5)`), one run per key.
    init_fn: key -> carry, the training state (e.g. params and the IVON optimizer state).
    step_fn: (key, carry, step) -> carry, one training step; `step` is the int32 index of the step.
    posterior_fn: carry -> `DiagGaussian`, e.g. `lambda c: bmerge.optim.ivon_posterior(c.params, c.opt_state, ess,
      wd)`.
    stop_steps: strictly increasing positive step counts, e.g. `range(25, 151, 25)`.

  Returns:
    `Mixture(components, log_weights)` with K = num_seeds * len(stop_steps) components, log_weights = -log K.
  """
  stop_steps = [int(s) for s in stop_steps]
  if not stop_steps or stop_steps[0] < 1 or any(b <= a for a, b in zip(stop_steps, stop_steps[1:])):
    raise ValueError(f"collect: `stop_steps` = {stop_steps}; expected strictly increasing positive integers.")
  keys = jnp.asarray(keys)
  if keys.ndim != 1 or keys.shape[0] < 1 or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise ValueError(f"collect: `keys` has shape {keys.shape} and dtype {keys.dtype}; expected a non-empty key "
                     "array [num_seeds] from jax.random.split(jax.random.key(seed), num_seeds).")

  @jax.jit
  def run(carry, step_keys, steps):
    def body(c, xs):
      return step_fn(xs[0], c, xs[1]), None
    return jax.lax.scan(body, carry, (step_keys, steps))[0]

  components = []
  for key in keys:
    k_init, k_train = jax.random.split(key)
    step_keys = jax.random.split(k_train, stop_steps[-1])
    carry, done = init_fn(k_init), 0
    for s in stop_steps:
      carry = run(carry, step_keys[done:s], jnp.arange(done, s, dtype=jnp.int32))
      done = s
      components.append(posterior_fn(carry))
  return equal_mixture(components)
