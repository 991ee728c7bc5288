"""MultiIVON: IVON posteriors over seeds and stopping steps as one equally weighted mixture (paper Sec. 3.5).

Per task, run IVON from several seeds and keep the posterior N(m, diag(ess (h + delta))^-1) at several stopping
steps; the K = num_seeds * num_stops diagonal Gaussians, equally weighted, form the task's mixture
q_t = (1/K) sum_k N(theta_tk, diag(h_tk)^-1) for `bmerge.merge.mixture_weighted` (Eqs. 11-12). The paper uses
5 seeds x steps {25, 50, ..., 150}: K = 30 per task. `bmerge.fit.multi_ivon` runs it on a user's loss and batches.

Example:
  >>> import jax.numpy as jnp
  >>> import bmerge
  >>> from bmerge.optim import multi_ivon
  >>> qs = [bmerge.DiagGaussian(jnp.full(2, float(k)), jnp.ones(2)) for k in range(6)]   # 2 seeds x 3 stops
  >>> mix = multi_ivon.select(multi_ivon.equal_mixture(qs), stop_steps=(25, 50, 75), keep_stops=(75,))
  >>> mix.components.mean[:, 0].tolist(), jnp.exp(mix.log_weights).tolist()            # the last stop of each seed
  ([2.0, 5.0], [0.5, 0.5])

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Sec. 3.5, Eqs. 11-12, App. B.3).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import Mixture
from bmerge.posteriors import stack

__all__ = ["collect", "equal_mixture", "select"]

STEP_LOOPS = ("scan", "python")

PyTree = Any


def equal_mixture(posteriors: Sequence[DiagGaussian]) -> Mixture:
  """The equally weighted mixture (1/K) sum_k q_k of K `DiagGaussian`s: components stacked on a leading K axis.

  log_weights are all -log K (float32). Raises ValueError if `posteriors` is empty or the structures differ.

  Args:
    posteriors: K >= 1 `DiagGaussian`s of one structure.

  Returns:
    `Mixture(stack(posteriors), log_weights = -log K)`.

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
            stop_steps: Sequence[int],
            step_loop: str = "scan") -> Mixture:
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
    step_loop: "scan" (default): the steps between two stops are one jitted `lax.scan` and `step` is traced;
      "python": `step_fn` is called from Python once per step with `step` a Python int, and compiles its own work
      (e.g. calls a jitted step). Use "python" for convolutional networks on the CPU, where XLA runs a step inside
      `lax.scan` slower than the same step compiled alone.

  Returns:
    `Mixture(components, log_weights)` with K = num_seeds * len(stop_steps) components, log_weights = -log K.

  Example:
    A "training run" that adds 1 to the mean per step, kept after 1 and 3 steps, from two seeds:

    >>> import jax, jax.numpy as jnp
    >>> import bmerge
    >>> from bmerge.optim import multi_ivon
    >>> mix = multi_ivon.collect(jax.random.split(jax.random.key(0), 2), lambda key: jnp.zeros(1),
    ...                          lambda key, carry, step: carry + 1.0,
    ...                          lambda carry: bmerge.DiagGaussian(carry, jnp.ones(1)), stop_steps=[1, 3])
    >>> mix.components.mean[:, 0].tolist()                       # seed-major: (seed 0: 1, 3), (seed 1: 1, 3)
    [1.0, 3.0, 1.0, 3.0]
  """
  stop_steps = [int(s) for s in stop_steps]
  if not stop_steps or stop_steps[0] < 1 or any(b <= a for a, b in zip(stop_steps, stop_steps[1:])):
    raise ValueError(f"collect: `stop_steps` = {stop_steps}; expected strictly increasing positive integers.")
  keys = jnp.asarray(keys)
  if keys.ndim != 1 or keys.shape[0] < 1 or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise ValueError(f"collect: `keys` has shape {keys.shape} and dtype {keys.dtype}; expected a non-empty key "
                     "array [num_seeds] from jax.random.split(jax.random.key(seed), num_seeds).")
  if step_loop not in STEP_LOOPS:
    raise ValueError(f"collect: `step_loop` must be one of {STEP_LOOPS}, got {step_loop!r}.")

  @jax.jit
  def scanned(carry, step_keys, steps):
    def body(c, xs):
      return step_fn(xs[0], c, xs[1]), None
    return jax.lax.scan(body, carry, (step_keys, steps))[0]

  def looped(carry, step_keys, steps):
    for k, i in zip(step_keys, steps):
      carry = step_fn(k, carry, int(i))
    return carry

  run = scanned if step_loop == "scan" else looped

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


def select(mixture: Mixture, stop_steps: Sequence[int], keep_stops: Optional[Sequence[int]] = None,
           seeds: Optional[Sequence[int]] = None) -> Mixture:
  """The components of a MultiIVON mixture kept at some of its stop steps (and seeds), equally re-weighted.

  `collect` and `bmerge.fit.multi_ivon` order the K = num_seeds * len(stop_steps) components seed-major,
  k = seed * len(stop_steps) + stop_index. The paper's smaller mixtures keep every seed and the later stops (App. B.3,
  5 seeds, stops {25, 50, ..., 150}): K = 10 keeps stops {100, 150}, K = 20 keeps {75, 100, 125, 150}, K = 30 all.
  One seed at the last stop is a single IVON run (IVON-Hess; a K = 1 mixture merges like Eq. 10).

  Works on a stack of mixtures too (a leading task axis, `bmerge.stack` of per-task mixtures): components are
  selected along the component axis, the last axis of `log_weights`.

  Args:
    mixture: a `Mixture` from `collect` / `bmerge.fit.multi_ivon`, or a stack of them.
    stop_steps: the stop steps it was collected at, in order (K must be a multiple of their number).
    keep_stops: the stop steps to keep (a subset of `stop_steps`); default all.
    seeds: the seed indices to keep (in 0 .. num_seeds - 1); default all.

  Returns:
    A `Mixture` of the kept components (seed-major, in the order of `mixture`) with equal weights -log K'.

  Example:
    >>> import jax.numpy as jnp
    >>> import bmerge
    >>> from bmerge.optim import multi_ivon
    >>> qs = [bmerge.DiagGaussian(jnp.full(1, 10.0 * seed + stop), jnp.ones(1))
    ...       for seed in range(2) for stop in (1, 2, 3)]    # 2 seeds x stops (1, 2, 3), seed-major
    >>> mix = multi_ivon.equal_mixture(qs)
    >>> multi_ivon.select(mix, (1, 2, 3), keep_stops=(2, 3)).components.mean[:, 0].tolist()
    [2.0, 3.0, 12.0, 13.0]
    >>> multi_ivon.select(mix, (1, 2, 3), keep_stops=(3,), seeds=(0,)).components.mean.tolist()
    [[3.0]]

  References:
    Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
    Bayesian Model-Merging. 2024 (Sec. 3.5, App. B.3: mixtures of 10, 20 and 30 components).
  """
  if not isinstance(mixture, Mixture):
    raise TypeError(f"select: `mixture` must be a Mixture, got {type(mixture).__name__}.")
  stops = [int(s) for s in stop_steps]
  if not stops or len(set(stops)) != len(stops):
    raise ValueError(f"select: `stop_steps` = {stops}; expected the distinct stop steps the mixture was collected at.")
  axis = jnp.ndim(mixture.log_weights) - 1
  k = jnp.shape(mixture.log_weights)[axis]
  if k % len(stops):
    raise ValueError(f"select: the mixture has {k} components, not a multiple of len(`stop_steps`) = {len(stops)}.")
  num_seeds = k // len(stops)
  keep_stops = stops if keep_stops is None else [int(s) for s in keep_stops]
  seeds = list(range(num_seeds)) if seeds is None else [int(s) for s in seeds]
  missing = sorted(set(keep_stops) - set(stops))
  if not keep_stops or missing or len(set(keep_stops)) != len(keep_stops):
    raise ValueError(f"select: `keep_stops` must be distinct stop steps out of `stop_steps` {stops}; got {keep_stops}.")
  if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < num_seeds for s in seeds):
    raise ValueError(f"select: `seeds` must be distinct seed indices in [0, {num_seeds}); got {seeds}.")
  index = np.asarray([s * len(stops) + stops.index(t) for s in seeds for t in sorted(keep_stops, key=stops.index)])
  components = jax.tree.map(lambda x: jnp.take(x, index, axis=axis), mixture.components)
  log_weights = jnp.full(jnp.shape(mixture.log_weights)[:axis] + (len(index),), -math.log(len(index)),
                         jnp.asarray(mixture.log_weights).dtype)
  return Mixture(components=components, log_weights=log_weights)
