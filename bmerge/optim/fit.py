"""Learner drivers: a user's `(key, loss_fn, params, batches)` in, a posterior to merge out.

Each driver runs a whole training loop and exports what the merge rules consume (paper Sec. 3.5):

  `ivon`        IVON (S Monte-Carlo samples per step), optionally started from a pretrained IVON posterior
                -> `DiagGaussian` for `bmerge.merge.hessian_weighted`;
  `adamw_sg`    AdamW, then one squared-gradient Fisher pass -> `DiagGaussian`;
  `multi_ivon`  IVON over seeds x stopping steps -> an equally weighted `Mixture` for `bmerge.merge.mixture_weighted`;
  `von`, `mog`  for small flat models: full-covariance VON and mixture-of-Gaussians VI started from a MAP with its
                Laplace precision -> `FullGaussian` / `Mixture`.

`loss_fn(params, batch) -> scalar` is the minibatch-mean loss; `params` any pytree (a Linen params dict, an NNX
`nnx.State` of `nnx.Param`s from `nnx.split(model, nnx.Param, ...)`, a flat vector). `batches` is either

  * a pytree of arrays with a leading steps axis (step i trains on `tree.map(lambda b: b[i], batches)`): the loop is
    one `lax.scan`, so the whole driver can be `jit`ted and `vmap`ped (e.g. over tasks padded to one length; a batch
    may hold example indices into data the `loss_fn` closes over), or
  * a stream of batches: a `list`, an iterator or generator, or any other iterable that is not a pytree of arrays
    (a `tf.data` / grain / PyTorch loader): a jitted step in a Python loop. `num_steps` caps it (and is required
    when the stream has no length). A tuple or dict is always read as one pytree with a steps axis.

Step i draws its randomness from the i-th key of `jax.random.split(key, num_steps)` in both forms, so the same
batches give the same posterior either way.

Example:
  A posterior for each of two tasks, merged by Eq. 10 (full-batch steps of a least-squares loss):

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> import bmerge
  >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
  >>> loss_fn = lambda p, target: 0.5 * jnp.mean((x @ p - target) ** 2)      # batches: task t's target, per step
  >>> qs = [bmerge.fit.ivon(jax.random.key(t), loss_fn, jnp.zeros(2), jnp.full((50,), float(t)), ess=64.0,
  ...                       learning_rate=0.1) for t in (0, 1)]
  >>> bmerge.merge.hessian_weighted(bmerge.stack(qs), jnp.array([[0.5, 0.5]])).shape
  (1, 2)

Diagnostics (`ivon`, `adamw_sg`, `multi_ivon`). Each run carries counters through its loop on the device (no host
synchronisation per step): the mean loss of every `log_every` steps and the steps with a non-finite loss, update or
batch. They are read once at the end (a stream's also every max(log_every, 10) steps) and warn, naming what to change, when
the loss or the params turn non-finite or a batch holds NaN or inf (`NonFiniteWarning`: which step, which batch), or
when IVON's Hessian estimate falls or rises by more than 100x over the run (`CurvatureWarning`, naming beta2,
hess_init, ess and the learning rate). `return_info=True` returns `(posterior, FitInfo)`: the loss curve, the
distance moved from the start, curvature statistics at the start and the end, and the counts. Under a caller's `jit`
or `vmap` the values are traced and nothing is warned: read the returned `FitInfo` instead.

Dtypes. The posterior's mean has the params' dtype (bfloat16 params give a bfloat16 mean); its precision is float32,
or wider for wider params. IVON keeps its Hessian estimate in float32 (ess (h + delta) reaches 1e6-1e10), and AdamW-SG
sums its squared gradients at the params widened to float32 (bfloat16 keeps 8 significant bits, too few for a sum
over thousands of examples).

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Sec. 3.5: IVON-Hess, AdamW-SG, MultiIVON-Hess; Eqs. 10-12).
  Shen et al. Variational Learning is Effective for Large Deep Networks. ICML 2024 (IVON).
  Daheim, Möllenhoff, Ponti, Gurevych, Khan. Model merging by uncertainty-based gradient matching. ICLR 2024.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmerge import _checks
from bmerge.optim import _ivon as optim
from bmerge.optim import _learner
from bmerge.optim import curvature
from bmerge.optim._learner import CurvatureWarning
from bmerge.optim._learner import FitInfo
from bmerge.optim._learner import FitWarning
from bmerge.optim._learner import NonFiniteWarning
from bmerge.optim import mog as _mog
from bmerge.optim import multi_ivon as _multi_ivon
from bmerge.optim import von as _von
from bmerge.posteriors import DiagGaussian, FullGaussian, Mixture

__all__ = ["CurvatureWarning", "FitInfo", "FitWarning", "NonFiniteWarning", "adamw_sg", "default_beta2", "ivon", "mog",
           "multi_ivon", "von"]

PyTree = Any

# h is an exponential moving average: after T steps with beta2 = 1 - c / T its start keeps the weight exp(-c). A fresh
# run forgets hess_init (c = 5: < 1 %); a run started from a pretrained posterior keeps its Hessian (c = 0.05: 95 %).
_HORIZON_FRESH = 5.0
_HORIZON_WARM = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Batches: a pytree with a leading steps axis (lax.scan) or a stream (a jitted step in a Python loop).


class _Batches(NamedTuple):
  stacked: Any  # pytree of arrays [num_steps, ...], or None for a stream
  stream: Any  # iterable of batches, or None
  num_steps: int


def _is_stream(batches: Any) -> bool:
  if isinstance(batches, list) or hasattr(batches, "__next__"):
    return True
  leaves = jax.tree.leaves(batches)
  if leaves and all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves):
    return False
  return isinstance(batches, Iterable) and not isinstance(batches, (tuple, dict))


def _batches(batches: Any, num_steps: Optional[int]) -> _Batches:
  if num_steps is not None:
    num_steps = _checks.integer(num_steps, "num_steps")
  if _is_stream(batches):
    if num_steps is None:
      if not hasattr(batches, "__len__"):
        raise ValueError("`num_steps` is required when `batches` is a stream without a length (a generator or "
                         "iterator); the defaults of the learner (beta2) derive from the run length.")
      num_steps = _checks.integer(len(batches), "len(batches)")
    return _Batches(None, batches, num_steps)
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError("`batches` holds no arrays; expected a pytree of arrays with a leading steps axis or an iterable "
                     "of batches.")
  for path, x in jax.tree_util.tree_leaves_with_path(batches):
    if not hasattr(x, "shape") or len(x.shape) == 0:
      raise ValueError(f"`batches{jax.tree_util.keystr(path)}` is not an array with a leading steps axis; expected a "
                       "pytree of arrays [num_steps, ...] or an iterable of batches (a list, an iterator).")
  n = leaves[0].shape[0]
  _checks.leading(batches, (n,), name="batches", what="the steps axis, shared by every leaf")
  if n < 1:
    raise ValueError("`batches` has 0 steps on its leading axis; expected at least one.")
  if num_steps is not None and num_steps != n:
    raise ValueError(f"`num_steps` = {num_steps} but `batches` has {n} steps on its leading axis.")
  return _Batches(batches, None, n)


def _run(step: Callable, static: Any, hp: Any, carry: Any, key: jax.Array, data: _Batches, log_every: int,
         checker: _learner.Checker) -> tuple[Any, _learner.Tracker]:
  """`carry = step(static, hp, keys[i], carry, batch_i)[0]` for every step, keys = `jax.random.split(key, n)`.

  `step` is a module-level function and `static` hashable (the user's loss function, discrete settings), numbers go
  in the pytree `hp`: the compiled loop is reused by every call with the same loss function (e.g. one per task).
  Returns the last carry and the diagnostics' counters (`_tracked`); a stream's are read every
  max(log_every, 10) steps (no host synchronisation per step).
  """
  tracked = (step, static, log_every)
  carry = (carry, _learner.tracker(data.num_steps, log_every))
  if data.stacked is not None:
    return _scan(_tracked, tracked, hp, carry, key, (jnp.arange(data.num_steps, dtype=jnp.int32), data.stacked))
  keys = jax.random.split(key, data.num_steps)
  done = 0
  for i, batch in enumerate(itertools.islice(data.stream, data.num_steps)):
    carry, _ = _jitted_step(_tracked, tracked, hp, keys[i], carry, (i, batch))
    done = i + 1
    if done % max(log_every, 10) == 0:  # a non-finite loss is reported while a long stream still runs
      checker.nonfinite(carry[1], done, stacklevel=4)
  if done < data.num_steps:
    raise ValueError(f"`batches` ran out after {done} batches; expected `num_steps` = {data.num_steps}.")
  return carry


def _tracked(tracked, hp, key, carry, indexed_batch):
  """`step` with the diagnostics' counters: carry = (the step's carry, Tracker), indexed_batch = (index, batch)."""
  step, static, log_every = tracked
  inner, counters = carry
  index, batch = indexed_batch
  inner, loss = step(static, hp, key, inner, batch)
  return (inner, _learner.track(counters, log_every, loss, inner, batch, index)), loss


@partial(jax.jit, static_argnums=(0, 1))
def _scan(step, static, hp, carry, key, batches):
  num_steps = jax.tree.leaves(batches)[0].shape[0]
  return _learner.scan_steps(partial(step, static, hp), carry, key, num_steps, batches)


_jitted_step = jax.jit(lambda step, static, hp, key, carry, batch: step(static, hp, key, carry, batch),
                       static_argnums=(0, 1))


def _first_steps(data: _Batches, num_steps: int) -> PyTree:
  """The first `num_steps` batches: a pytree with a leading steps axis, or a list when `data` is a stream."""
  if data.num_steps < num_steps:
    raise ValueError(f"`batches` has {data.num_steps} steps; expected at least {num_steps} (max(stop_steps)).")
  if data.stacked is not None:
    return jax.tree.map(lambda b: jnp.asarray(b[:num_steps]), data.stacked)
  taken = list(itertools.islice(data.stream, num_steps))
  if len(taken) < num_steps:
    raise ValueError(f"`batches` ran out after {len(taken)} batches; expected at least {num_steps} (max(stop_steps)).")
  return taken


# ----------------------------------------------------------------------------------------------------------------
# IVON.


def default_beta2(num_steps: int, warm_start: bool = False) -> float:
  """IVON's Hessian decay for a run of `num_steps` steps: 1 - c / num_steps within [0.9, 0.99999].

  h is an exponential moving average of Hessian estimates, so after T steps its starting value keeps the weight
  beta2^T ≈ exp(-T (1 - beta2)) = exp(-c).

  * A fresh run (c = 5) forgets `hess_init`: it keeps exp(-5) < 1 % of it, and the exported h averages the estimates
    of about the last T / 5 steps. The reference default beta2 = 0.99999 suits pretraining (1e5-1e6 steps); on a
    finetune of a few hundred steps it leaves h within a few per cent of `hess_init`, a posterior without curvature
    (its Hessian-weighted merge is simple averaging). What remains of `hess_init`, exp(-5) hess_init, acts as a
    floor under h: choose `hess_init` no larger than ~100x the curvature the loss is expected to have.
  * A run started from a pretrained posterior (`warm_start`, c = 0.05) keeps 95 % of the pretrained Hessian, as the
    paper's CIFAR-10 finetuning does (beta2 = 0.9999 over 25-150 steps keeps 98-99.75 %).

  Short runs use at least 0.9 (an average over ~10 steps); long ones at most the reference 0.99999.

  Args:
    num_steps: T, the run's length (>= 1).
    warm_start: whether the run starts from a pretrained posterior (c = 0.05 instead of 5).

  Returns:
    beta2 = min(0.99999, max(0.9, 1 - c / T)).

  Example:
    >>> from bmerge import fit
    >>> fit.default_beta2(600), fit.default_beta2(20), fit.default_beta2(10 ** 7), fit.default_beta2(500, True)
    (0.9916666666666667, 0.9, 0.99999, 0.9999)
  """
  num_steps = _checks.integer(num_steps, "num_steps")
  c = _HORIZON_WARM if warm_start else _HORIZON_FRESH
  return float(min(0.99999, max(0.9, 1.0 - c / num_steps)))


def _hashable(fn: Callable) -> Callable:
  """`fn`, or a wrapper compared by identity when `fn` itself cannot be hashed (jit's static arguments must be)."""
  try:
    hash(fn)
    return fn
  except TypeError:
    return _Identity(fn)


class _Identity:

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args):
    return self.fn(*args)


class _IVONStatic(NamedTuple):
  """What a compiled IVON step depends on besides numbers (hashable: jit's static argument)."""

  loss_fn: Callable
  schedule: Optional[Callable]  # the learning rate when it is an optax schedule, else None (a number, in `hp`)
  rescale_lr: bool
  debias: bool
  hess_approx: str
  mc_samples: int


def _ivon_tx(static: _IVONStatic, hp: dict) -> optax.GradientTransformationExtraArgs:
  lr = hp["learning_rate"] if static.schedule is None else static.schedule
  return optim.ivon(lr, hp["ess"], hp["hess_init"], hp["beta1"], hp["beta2"], hp["weight_decay"], hp["clip_radius"],
                    static.rescale_lr, static.debias, static.hess_approx)


def _ivon_step(static: _IVONStatic, hp: dict, key, carry, batch):
  """One IVON step on `batch`: S posterior samples, their gradients, the update. Returns ((params, state), loss)."""
  params, state = carry
  ess, wd = hp["ess"], hp["weight_decay"]
  value_and_grad = jax.value_and_grad(static.loss_fn)
  if static.mc_samples == 1:  # no Monte-Carlo axis: a plain gradient, cheaper than a vmap over one sample
    sample, noise = optim.ivon_sample(key, state, params, ess, wd)
    loss, grads = value_and_grad(sample, batch)
  else:
    samples, noise = optim.ivon_sample(key, state, params, ess, wd, static.mc_samples)
    losses, grads = jax.vmap(value_and_grad, in_axes=(0, None))(samples, batch)
    loss = jnp.mean(losses)
  updates, state = _ivon_tx(static, hp).update(grads, state, params, noise=noise)
  return (optax.apply_updates(params, updates), state), loss


def _ivon_setup(loss_fn, params, *, ess, learning_rate, num_steps, mc_samples, hess_init, beta1, beta2, weight_decay,
                clip_radius, rescale_lr, debias, hess_approx, init_posterior):
  """Validates the arguments once and returns (static, hp, the initial IVONState)."""
  _learner.check_loss_fn(loss_fn, "(params, batch) -> scalar minibatch-mean loss")
  mc_samples = _checks.integer(mc_samples, "mc_samples")
  beta2 = default_beta2(num_steps, init_posterior is not None) if beta2 is None else beta2
  tx = optim.ivon(learning_rate, ess, hess_init, beta1, beta2, weight_decay, clip_radius, rescale_lr, debias,
                  hess_approx)  # checks every hyperparameter, naming it
  state = tx.init(params)
  if init_posterior is not None:
    state = state._replace(hess=_pretrained_hess(init_posterior, params, state.hess, ess, weight_decay))
  schedule = learning_rate if callable(learning_rate) else None
  static = _IVONStatic(_hashable(loss_fn), schedule and _hashable(schedule), bool(rescale_lr), bool(debias),
                       hess_approx, mc_samples)
  hp = dict(learning_rate=0.0 if schedule else learning_rate, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, clip_radius=clip_radius)
  return static, jax.tree.map(jnp.asarray, hp), state


def _pretrained_hess(init_posterior, params, hess, ess, weight_decay):
  """h = precision / ess - weight_decay, so that the run's posterior ess (h + delta) starts as `init_posterior`."""
  if not isinstance(init_posterior, DiagGaussian):
    raise TypeError(f"`init_posterior` must be a DiagGaussian (e.g. from a pretraining `fit.ivon`), got "
                    f"{type(init_posterior).__name__}.")
  _checks.same_structure(init_posterior.mean, params, name_a="init_posterior.mean", name_b="params")
  _checks.same_structure(init_posterior.precision, params, name_a="init_posterior.precision", name_b="params")
  _checks.positive_finite(init_posterior.precision, name="init_posterior.precision")
  if all(_checks.is_concrete(x) for x in jax.tree.leaves((init_posterior.mean, params))):
    for (path, m), p in zip(jax.tree_util.tree_leaves_with_path(init_posterior.mean), jax.tree.leaves(params)):
      if not np.array_equal(np.asarray(m, np.asarray(p).dtype), np.asarray(p)):
        raise ValueError(f"`params` must equal `init_posterior.mean` (the run starts from the pretrained posterior: "
                         f"pass init_posterior.mean as params); they differ at {jax.tree_util.keystr(path)}.")
  return jax.tree.map(lambda h, prec: (jnp.asarray(prec, h.dtype) / ess - weight_decay).astype(h.dtype), hess,
                      init_posterior.precision)


def ivon(key: jax.Array, loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Any, *, ess,
         learning_rate: optax.ScalarOrSchedule, num_steps: Optional[int] = None, mc_samples: int = 1,
         hess_init=1.0, beta1=0.9, beta2: Optional[float] = None, weight_decay=1e-4, clip_radius=float("inf"),
         rescale_lr: bool = True, debias: bool = True, hess_approx: str = "price",
         init_posterior: Optional[DiagGaussian] = None, log_every: Optional[int] = None,
         return_info: bool = False) -> Union[DiagGaussian, tuple[DiagGaussian, FitInfo]]:
  r"""Trains with IVON and returns its posterior N(m, diag(ess (h + delta))^-1) (IVON-Hess, paper Sec. 3.5).

  Per step i, with S = `mc_samples`, lambda = `ess`, delta = `weight_decay` and the update of `bmerge.optim.ivon`:

  .. math::

    \theta_s = m + n_s,\; n_s \sim N(0, \operatorname{diag}(\lambda (h + \delta))^{-1}), \quad
    g_s = \nabla \texttt{loss\_fn}(\theta_s, \text{batch}_i), \quad (m, h) \leftarrow
    \text{IVON}(m, h; g_{1..S}, n_{1..S})

  Defaults for short runs: `beta2=None` takes `default_beta2(num_steps)` = 1 - 5 / num_steps (within [0.9,
  0.99999]), so the exported h is a Hessian estimate, not `hess_init` (the reference 0.99999 needs ~1e5 steps: after
  600 steps h has moved 1 - 0.99999^600 = 0.6 % of the way from `hess_init` to the estimates, and a Hessian-weighted
  merge of posteriors whose h are all near `hess_init` is simple averaging).

  Finetuning from a pretrained IVON posterior (the paper's CIFAR-10 finetuning, App. B.3): pass it as
  `init_posterior` and its mean as `params`. The run starts from its mean and its Hessian,
  h = precision / ess - weight_decay, so the posterior at step 0 is `init_posterior` itself and a short finetune
  keeps the curvature the pretraining learnt (the default beta2 is then `default_beta2(num_steps, warm_start=True)`,
  which keeps 95 % of it); `hess_init` then only scales the learning rate (`rescale_lr`).

  The prior: `weight_decay` delta is the prior precision per example, so the exported precision is that of the
  summed loss plus a Gaussian prior N(0, I / (ess delta)).

  Args:
    key: PRNG key; step i uses the i-th key of `jax.random.split(key, num_steps)`.
    loss_fn: `loss_fn(params, batch) -> scalar`, the minibatch-mean loss.
    params: the initial params (any pytree); with `init_posterior`, its mean.
    batches: a pytree of arrays with a leading steps axis, or a stream of batches (see the module docstring).
    ess: lambda > 0, the effective sample size (usually the training-set size). May be traced (vmap over tasks).
    learning_rate: eta, a number or an optax schedule of the step count.
    num_steps: the number of steps; default the leading axis of `batches` or the stream's length.
    mc_samples: S, posterior samples (gradients) per step.
    hess_init, beta1, weight_decay, clip_radius, rescale_lr, debias, hess_approx: as in `bmerge.optim.ivon`.
    beta2: the Hessian decay; default `default_beta2(num_steps, warm_start=init_posterior is not None)`.
    init_posterior: a `DiagGaussian` over `params`' structure to start from (mean = `params`).
    log_every: k, steps per point of the loss curve in `FitInfo` (default ceil(num_steps / 100)); a stream's
      counters are also read every max(k, 10) steps.
    return_info: also return a `FitInfo` (see the module docstring).

  Returns:
    `DiagGaussian(mean, precision)` with precision = ess (h + weight_decay), shaped like `params` (the mean in the
    params' dtype, the precision in float32 or wider); with `return_info`, `(posterior, FitInfo)`.

  Example:
    Linear regression whose mean-loss Hessian is diag(1, 4, 0.25): a 300-step run learns it (hess_init is 1).
    Batches are example indices into data that `loss_fn` closes over.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from bmerge import fit
    >>> rng = np.random.default_rng(0)
    >>> x = jnp.asarray(rng.normal(size=(512, 3)) * [1.0, 2.0, 0.5], jnp.float32)
    >>> y = x @ jnp.array([1.0, -1.0, 2.0])
    >>> loss_fn = lambda p, idx: 0.5 * jnp.mean((x[idx] @ p["w"] - y[idx]) ** 2)
    >>> batches = rng.integers(0, 512, size=(300, 32))                          # 300 steps of 32 examples
    >>> q = fit.ivon(jax.random.key(2), loss_fn, {"w": jnp.zeros(3)}, batches, ess=512.0, learning_rate=0.05,
    ...              mc_samples=4)
    >>> h = q.precision["w"] / 512.0 - 1e-4                                     # the learnt Hessian
    >>> bool(jnp.allclose(q.mean["w"], jnp.array([1.0, -1.0, 2.0]), atol=0.05))
    True
    >>> bool(jnp.allclose(h, jnp.array([1.0, 4.0, 0.25]), rtol=0.3))
    True

  References:
    Shen et al. Variational Learning is Effective for Large Deep Networks. ICML 2024.
    Monzón Maldonado et al. How to Weight Multitask Finetuning? Fast Previews via Bayesian Model-Merging. 2024
    (Sec. 3.5, Eq. 10; App. B.3 for finetuning from the pretrained posterior).
  """
  data = _batches(batches, num_steps)
  static, hp, state = _ivon_setup(loss_fn, params, ess=ess, learning_rate=learning_rate, num_steps=data.num_steps,
                                  mc_samples=mc_samples, hess_init=hess_init, beta1=beta1, beta2=beta2,
                                  weight_decay=weight_decay, clip_radius=clip_radius, rescale_lr=rescale_lr,
                                  debias=debias, hess_approx=hess_approx, init_posterior=init_posterior)
  log_every = _learner.check_log_every(log_every, data.num_steps)
  checker = _ivon_checker("fit.ivon", hp, learning_rate, init_posterior is None)
  hess_start = _learner.curvature_stats(state.hess)
  (mean, state), counters = _run(_ivon_step, static, hp, (params, state), key, data, log_every, checker)
  info = _learner.fit_info(counters, data.num_steps, log_every, params, mean,
                           hess_start, _learner.curvature_stats(state.hess))
  _check_info(checker, info, data.num_steps)
  posterior = optim.ivon_posterior(mean, state, ess, weight_decay)
  return (posterior, info) if return_info else posterior


def _ivon_checker(driver: str, hp: dict, learning_rate, fresh: bool, where: str = "") -> _learner.Checker:
  return _learner.Checker(driver, dict(beta2=hp["beta2"], hess_init=hp["hess_init"], ess=hp["ess"],
                                       learning_rate=learning_rate), where, fresh)


def _check_info(checker: _learner.Checker, info: FitInfo, num_steps: int) -> None:
  """The warnings of an IVON run: non-finite values, a collapsed or exploded Hessian estimate."""
  checker.nonfinite(info, num_steps, stacklevel=4)
  checker.curvature(info.hess_start, info.hess_end, num_steps, stacklevel=4)


def multi_ivon(key: jax.Array, loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Any, *,
               num_seeds: int, stop_steps, ess, learning_rate: optax.ScalarOrSchedule, mc_samples: int = 1,
               hess_init=1.0, beta1=0.9, beta2: Optional[float] = None, weight_decay=1e-4,
               clip_radius=float("inf"), rescale_lr: bool = True, debias: bool = True, hess_approx: str = "price",
               init_posterior: Optional[DiagGaussian] = None, shuffle: bool = True, log_every: Optional[int] = None,
               return_info: bool = False) -> Union[Mixture, tuple[Mixture, FitInfo]]:
  r"""MultiIVON-Hess (paper Sec. 3.5): IVON from `num_seeds` seeds, the posterior kept at every stop step, as the
  equally weighted mixture q = (1/K) sum_k N(theta_k, diag(h_k)^-1), K = num_seeds * len(stop_steps).

  Every seed starts from `params` (and `init_posterior`, as in `ivon`) and trains on the first L = max(stop_steps)
  batches; seeds differ in their Monte-Carlo noise and, with `shuffle`, in the order of those batches. The seed keys
  are `jax.random.split(key, num_seeds)` and each run follows `bmerge.optim.multi_ivon.collect`
  (`k_init_j, k_train_j = jax.random.split(seed_key_j)`), so the component of seed j at the last stop equals
  `ivon(k_train_j, ..., batches[order_j])` with order_j = `jax.random.permutation(k_init_j, L)` (`shuffle`) or the
  first L steps in order. `beta2=None` takes `default_beta2(L, warm_start)`. A stream is read once (its first L
  batches kept in a list) and each seed runs one compiled step per batch from Python, as `ivon` does: no `lax.scan`,
  inside which XLA runs convolutional networks on the CPU slower (the same mixture either way).

  Args:
    num_seeds: runs per task (the paper: 5).
    stop_steps: strictly increasing positive step counts (the paper: 25, 50, ..., 150).
    shuffle: each seed visits the L batches in its own random order.
    Others: as in `ivon`; `log_every` counts the L steps of each seed's run.

  Returns:
    A `Mixture` of `DiagGaussian` components (leading K axis, seed-major), log_weights = -log K, for
    `bmerge.merge.mixture_weighted`. With `return_info`, `(mixture, FitInfo)`, every field of the `FitInfo` with a
    leading [num_seeds] axis: each seed's run at its last stop.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from bmerge import fit
    >>> rng = np.random.default_rng(0)
    >>> x = jnp.asarray(rng.normal(size=(256, 2)), jnp.float32)
    >>> loss_fn = lambda p, idx: 0.5 * jnp.mean((x[idx] @ p - x[idx, 0]) ** 2)
    >>> batches = rng.integers(0, 256, size=(30, 16))
    >>> q = fit.multi_ivon(jax.random.key(2), loss_fn, jnp.zeros(2), batches, num_seeds=2, stop_steps=[10, 20, 30],
    ...                    ess=256.0, learning_rate=0.1)
    >>> q.components.mean.shape, q.log_weights.shape
    ((6, 2), (6,))

  References:
    Monzón Maldonado et al. How to Weight Multitask Finetuning? Fast Previews via Bayesian Model-Merging. 2024
    (Sec. 3.5, Eqs. 11-12; App. B.3: 5 seeds x stops 25..150 from the pretrained posterior).
  """
  num_seeds = _checks.integer(num_seeds, "num_seeds")
  stops = [int(s) for s in stop_steps]
  if not stops:
    raise ValueError("`stop_steps` is empty; expected strictly increasing positive integers.")
  last = max(stops)
  stream = _is_stream(batches)
  first = _first_steps(_batches(batches, last if stream else None), last)
  static, hp, state0 = _ivon_setup(loss_fn, params, ess=ess, learning_rate=learning_rate, num_steps=last,
                                   mc_samples=mc_samples, hess_init=hess_init, beta1=beta1, beta2=beta2,
                                   weight_decay=weight_decay, clip_radius=clip_radius, rescale_lr=rescale_lr,
                                   debias=debias, hess_approx=hess_approx, init_posterior=init_posterior)

  log_every = _learner.check_log_every(log_every, last)
  tracked = (_ivon_step, static, log_every)

  def init_fn(k_init):
    order = jax.random.permutation(k_init, last) if shuffle else jnp.arange(last)
    return params, state0, np.asarray(order) if stream else order, _learner.tracker(last, log_every)

  def step_fn(k, carry, i):
    params, state, order, counters = carry
    if stream:  # i is a Python int: pick the batch here, run the compiled step
      indexed = (int(order[i]), first[order[i]])
      (inner, counters), _ = _jitted_step(_tracked, tracked, hp, k, ((params, state), counters), indexed)
    else:
      indexed = (order[i], jax.tree.map(lambda b: b[order[i]], first))
      (inner, counters), _ = _tracked(tracked, hp, k, ((params, state), counters), indexed)
    return inner + (order, counters)

  carries = []  # every seed's carry at every stop, seed-major

  def posterior_fn(carry):
    carries.append(carry)
    return optim.ivon_posterior(carry[0], carry[1], ess, weight_decay)

  mixture = _multi_ivon.collect(jax.random.split(key, num_seeds), init_fn, step_fn, posterior_fn, stops,
                                step_loop="python" if stream else "scan")
  hess_start, infos = _learner.curvature_stats(state0.hess), []
  for j, (mean, state, _, counters) in enumerate(carries[len(stops) - 1::len(stops)]):  # each seed's last stop
    info = _learner.fit_info(counters, last, log_every, params, mean, hess_start, _learner.curvature_stats(state.hess))
    _check_info(_ivon_checker("fit.multi_ivon", hp, learning_rate, init_posterior is None, f" (seed {j})"), info,
                last)
    infos.append(info)
  return (mixture, jax.tree.map(lambda *x: jnp.stack(x), *infos)) if return_info else mixture


# ----------------------------------------------------------------------------------------------------------------
# AdamW + squared-gradient Fisher.


class _MaskedCategorical:
  """sqrt(w_i) * -log softmax(logits_fn(params, x_i))[y_i]: its squared gradient is w_i g_i^2 (w_i = 0 for padding).

  The 'true' variant draws y_i = categorical(k_i, logits_i) with k_i = fold_in(key, i), the labels of
  `bmerge.curvature.diagonal_fisher`. Hashable by (logits_fn, variant), so the compiled pass is reused.
  """

  def __init__(self, logits_fn, variant):
    self.logits_fn, self.variant = logits_fn, variant

  def __call__(self, params, x, extra):
    y, w, k = extra
    logits = self.logits_fn(params, jax.tree.map(lambda a: a[None], x))[0]
    if self.variant == "true":
      y = jax.random.categorical(k, jax.lax.stop_gradient(logits))
    return jnp.sqrt(w).astype(logits.dtype) * -jax.nn.log_softmax(logits)[y]

  def __hash__(self):
    return hash((_MaskedCategorical, self.logits_fn, self.variant))

  def __eq__(self, other):
    return (isinstance(other, _MaskedCategorical) and other.logits_fn == self.logits_fn
            and other.variant == self.variant)


def _fisher(key, logits_fn, params, data, mask, variant, chunk_size, scale, prior):
  """`curvature.diagonal_fisher`, with per-example weights `mask` [N] when given (padded tasks under vmap)."""
  if mask is None:
    return curvature.diagonal_fisher(key, logits_fn, params, data, variant=variant, chunk_size=chunk_size,
                                     prior_precision=prior, scale=scale).precision
  if variant not in curvature.VARIANTS:
    raise ValueError(f"`fisher` must be one of {curvature.VARIANTS}, got {variant!r}.")
  inputs, labels = data
  n = jax.tree.leaves(inputs)[0].shape[0]
  if jnp.shape(mask) != (n,):
    raise ValueError(f"`fisher_mask` must be [N] = ({n},) (one weight per example of `fisher_data`), got shape "
                     f"{jnp.shape(mask)}.")
  if variant == "true":
    if key is None:
      raise ValueError("`key` is required for fisher='true' (labels are sampled from the model); got None.")
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    labels = jnp.zeros((n,), jnp.int32) if labels is None else labels
  else:
    keys = jnp.zeros((n,), jnp.uint32)  # unused by the empirical Fisher
  sums = curvature.sum_squared_gradients(_MaskedCategorical(logits_fn, variant), params,
                                         (inputs, (labels, jnp.asarray(mask), keys)), chunk_size=chunk_size)
  return jax.tree.map(lambda s: (scale * s + prior).astype(s.dtype), sums)


def _widened(params):
  """Floating-point leaves in float32 or wider (the Fisher of bfloat16 params is summed in float32)."""
  return jax.tree.map(lambda p: p.astype(jnp.promote_types(p.dtype, jnp.float32))
                      if jnp.issubdtype(p.dtype, jnp.inexact) else p, params)


def _adamw_tx(static, hp):
  lr = hp["learning_rate"] if static[1] is None else static[1]
  return optax.adamw(lr, hp["b1"], hp["b2"], hp["eps"], weight_decay=hp["weight_decay"])


def _adamw_step(static, hp, key, carry, batch):
  del key  # AdamW is deterministic
  params, state = carry
  loss, grads = jax.value_and_grad(static[0])(params, batch)
  updates, state = _adamw_tx(static, hp).update(grads, state, params)
  return (optax.apply_updates(params, updates), state), loss


def adamw_sg(key: jax.Array, loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Any, *,
             learning_rate: optax.ScalarOrSchedule, fisher_data: tuple, logits_fn: Callable[[PyTree, Any], jax.Array],
             weight_decay=1e-4, num_steps: Optional[int] = None, b1=0.9, b2=0.999, eps=1e-8,
             fisher: str = "empirical", num_examples=None, prior_precision=None, fisher_mask=None,
             fisher_chunk_size: int = 256, log_every: Optional[int] = None,
             return_info: bool = False) -> Union[DiagGaussian, tuple[DiagGaussian, FitInfo]]:
  r"""AdamW-SG (paper Sec. 3.5): `optax.adamw` on the minibatch-mean loss, then one squared-gradient pass,

  .. math::

    h = \frac{N}{N_F} \sum_{i \in F} (\nabla_\theta -\log p(y_i \mid x_i, \theta))^2 + \delta_0, \qquad
    q = N(\theta, \operatorname{diag}(h)^{-1})

  over the N_F examples of `fisher_data` (`bmerge.curvature.diagonal_fisher`: 'empirical' labels by default, or
  'true', labels drawn from the model), scaled to the N = `num_examples` of the training set: the Fisher of the
  summed loss, the dataset-size scaling of Daheim et al. (2024). delta_0 = `prior_precision`.

  `prior_precision` next to AdamW's decoupled weight decay. `optax.adamw` steps theta <- theta - eta (u + lambda
  theta), u Adam's preconditioned momentum, lambda = `weight_decay` (optax and PyTorch both multiply the decay by
  the learning rate eta, so eta does not enter the prior). With the plain gradient in place of u this is gradient
  descent on L(theta) + lambda / 2 |theta|^2 for the mean loss L = (1/N) sum_i l_i, i.e. on
  sum_i l_i + N lambda / 2 |theta|^2: a Gaussian prior N(0, I / (N lambda)) on the summed loss. The driver adds
  that precision, delta_0 = N * weight_decay, to the Fisher by default. (Adam's preconditioning makes the decay act
  at its fixed point like a per-parameter precision N lambda (sqrt(v) + eps), v the second moment: the isotropic
  N lambda is the SGD-equivalent prior, and the curvature of the data comes from the Fisher.) delta_0 > 0 also keeps
  h > 0 for parameters that never receive a gradient, as the merge rules require; with `weight_decay=0` pass a
  small `prior_precision`.

  Args:
    key: PRNG key for the 'true' Fisher's labels (AdamW itself is deterministic).
    loss_fn: `loss_fn(params, batch) -> scalar`, the minibatch-mean loss AdamW minimises.
    params: the initial params (any pytree).
    batches: a pytree of arrays with a leading steps axis, or a stream of batches (see the module docstring).
    learning_rate: eta, a number or an optax schedule.
    fisher_data: `(inputs, labels)` with a leading example axis, for the Fisher pass (usually the training set).
    logits_fn: `logits_fn(params, x [B, ...]) -> logits [B, C]` (called with B = 1 per example).
    weight_decay: lambda, AdamW's decoupled weight decay.
    num_steps: the number of steps; default the leading axis of `batches` or the stream's length.
    b1, b2, eps: Adam's moment decays and epsilon.
    fisher: 'empirical' (observed labels; default) or 'true' (labels sampled from the model).
    num_examples: N, the training-set size the Fisher is scaled to; default the examples in `fisher_data`
      (with `fisher_mask`, their total weight). May be traced.
    prior_precision: delta_0; default N * weight_decay (see above).
    fisher_mask: optional [N_F] weights of the examples of `fisher_data` (0 for padding): tasks padded to one
      length can be `vmap`ped.
    fisher_chunk_size: examples per step of the Fisher pass (memory ~ chunk * params).
    log_every: k, steps per point of the loss curve in `FitInfo` (default ceil(num_steps / 100)).
    return_info: also return a `FitInfo`. Its curvature statistics are of the Fisher per example, (h - delta_0) / N,
      at the initial params (one more Fisher pass, made only here) and at the trained ones; AdamW does not train
      with its Fisher, so no curvature warning is raised.

  Returns:
    `DiagGaussian(mean=the AdamW params, precision=h)`: the mean in the params' dtype, h in float32 or wider; with
    `return_info`, `(posterior, FitInfo)`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from bmerge import fit
    >>> rng = np.random.default_rng(0)
    >>> x = jnp.asarray(rng.normal(size=(200, 2)), jnp.float32)
    >>> y = (x[:, 0] > 0).astype(jnp.int32)
    >>> logits_fn = lambda p, xb: xb @ p["w"] + p["b"]
    >>> loss_fn = lambda p, idx: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x[idx]), y[idx]).mean()
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    >>> batches = rng.integers(0, 200, size=(100, 20))
    >>> q = fit.adamw_sg(jax.random.key(2), loss_fn, params, batches, learning_rate=0.05, fisher_data=(x, y),
    ...                  logits_fn=logits_fn, weight_decay=1e-3)
    >>> nll = lambda p, xi, yi: -jax.nn.log_softmax(logits_fn(p, xi[None])[0])[yi]      # one example's loss
    >>> g = jax.jit(jax.vmap(jax.grad(nll), in_axes=(None, 0, 0)))(q.mean, x, y)
    >>> bool(jnp.allclose(q.precision["w"], jnp.sum(g["w"] ** 2, axis=0) + 200 * 1e-3, rtol=1e-5))
    True

  References:
    Daheim, Möllenhoff, Ponti, Gurevych, Khan. Model merging by uncertainty-based gradient matching. ICLR 2024.
    Loshchilov, Hutter. Decoupled weight decay regularization. ICLR 2019.
    Monzón Maldonado et al. How to Weight Multitask Finetuning? Fast Previews via Bayesian Model-Merging. 2024
    (Sec. 3.5, Eq. 10).
  """
  _learner.check_loss_fn(loss_fn, "(params, batch) -> scalar minibatch-mean loss")
  if not isinstance(fisher_data, (tuple, list)) or len(fisher_data) != 2:
    raise ValueError(f"`fisher_data` must be a pair (inputs, labels) with a leading example axis, got "
                     f"{type(fisher_data).__name__}.")
  data = _batches(batches, num_steps)
  schedule = learning_rate if callable(learning_rate) else None
  static = (_hashable(loss_fn), schedule and _hashable(schedule))
  hp = jax.tree.map(jnp.asarray, dict(learning_rate=0.0 if schedule else learning_rate, b1=b1, b2=b2, eps=eps,
                                      weight_decay=weight_decay))
  k_fisher, k_train = jax.random.split(key)
  log_every = _learner.check_log_every(log_every, data.num_steps)
  checker = _learner.Checker("fit.adamw_sg", dict(learning_rate=learning_rate, b2=b2, weight_decay=weight_decay))
  (mean, _), counters = _run(_adamw_step, static, hp, (params, _adamw_tx(static, hp).init(params)), k_train, data,
                             log_every, checker)
  checker.nonfinite(counters, data.num_steps)
  n_fisher = jax.tree.leaves(fisher_data[0])[0].shape[0]
  n_counted = n_fisher if fisher_mask is None else jnp.sum(jnp.asarray(fisher_mask, jnp.float32))
  n = n_counted if num_examples is None else num_examples
  prior = n * weight_decay if prior_precision is None else prior_precision
  fisher_at = lambda p, scale, delta: _fisher(k_fisher, logits_fn, _widened(p), tuple(fisher_data), fisher_mask,
                                              fisher, fisher_chunk_size, scale, delta)
  posterior = DiagGaussian(mean, fisher_at(mean, n / n_counted, prior))
  if not return_info:
    return posterior
  # The Fisher per example at the start (one more pass) and at the end, where it is (precision - delta_0) / N.
  start = _learner.curvature_stats(fisher_at(params, 1.0 / n_counted, 0.0))
  end = _learner.curvature_stats(jax.tree.map(lambda h: (h - prior) / n, posterior.precision))
  return posterior, _learner.fit_info(counters, data.num_steps, log_every, params, mean, start, end)


# ----------------------------------------------------------------------------------------------------------------
# Small flat models: VON and mixture VI from a MAP with its Laplace precision.


def _laplace(loss_fn, params, init_precision, estimator, gauss_newton_fn):
  if jnp.ndim(params) != 1:
    raise ValueError(f"`params` must be a flat parameter vector [P] (a MAP), got shape {jnp.shape(params)}.")
  if init_precision is not None:
    return init_precision
  curvature_fn = gauss_newton_fn if estimator == "gauss_newton" and callable(gauss_newton_fn) else jax.hessian(loss_fn)
  return jax.jit(curvature_fn)(params)  # one compiled program, not dozens of eagerly dispatched ones


@partial(jax.jit, static_argnums=2)
def _spread(key, params, num_components, precision, init_scale):
  """num_components means params + init_scale * L^-T eps_k, precision = L L^T, eps_k ~ N(0, I)."""
  eps = jax.random.normal(key, (num_components, params.shape[0]), _learner.float_dtype(params))
  chol = jnp.linalg.cholesky(precision)
  return params + init_scale * jax.scipy.linalg.solve_triangular(chol.T, eps.T, lower=False).T


def von(key: jax.Array, loss_fn: Callable[[jax.Array], jax.Array], params: jax.Array, *, num_steps: int,
        rho=0.1, num_samples: int = 3, estimator: str = "hessian", init_precision: Optional[jax.Array] = None,
        gauss_newton_fn: Optional[Callable] = None, pd_correction: Optional[bool] = None,
        antithetic: bool = False) -> FullGaussian:
  """Full-covariance VON from a MAP with its Laplace precision (`bmerge.optim.von.fit`) -> `FullGaussian`.

  For small flat models (P up to a few thousand): `loss_fn(theta [P]) -> loss-bar`, the summed loss plus the
  regulariser (-log joint; close over the data, there are no minibatches). The run starts from
  N(params, H^-1), H = `init_precision` or, by default, the Laplace precision at the MAP `params`: the
  generalised Gauss-Newton matrix `gauss_newton_fn(params)` for estimator='gauss_newton', else
  `jax.hessian(loss_fn)(params)`. Jittable and vmappable over tasks.

  Args:
    key: PRNG key of the run.
    loss_fn: theta [P] -> loss-bar.
    params: the MAP [P].
    num_steps: VON steps.
    init_precision: the starting precision [P, P]; default the Laplace precision at `params`.
    rho, num_samples, estimator, gauss_newton_fn, pd_correction, antithetic: as in `bmerge.optim.von.fit`.

  Returns:
    The fitted `FullGaussian` q = N(m, S^-1), the q_t of Eq. 10.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge import fit
    >>> a, b = jnp.array([[2.0, 0.5], [0.5, 1.0]]), jnp.array([1.0, -1.0])
    >>> loss_fn = lambda t: 0.5 * t @ a @ t - b @ t                  # Gaussian: the Laplace start is exact
    >>> q = fit.von(jax.random.key(0), loss_fn, jnp.linalg.solve(a, b), num_steps=5, rho=0.5)
    >>> bool(jnp.allclose(q.precision, a))
    True

  References:
    Khan, Rue. The Bayesian learning rule. JMLR 2023, Sec. 1.3.2.
    Monzón Maldonado et al. How to Weight Multitask Finetuning? Fast Previews via Bayesian Model-Merging. 2024
    (Eq. 10, App. B.2).
  """
  h0 = _laplace(loss_fn, params, init_precision, estimator, gauss_newton_fn)
  state = _von.fit(key, loss_fn, params, h0, num_steps, rho=rho, num_samples=num_samples, estimator=estimator,
                   gauss_newton_fn=gauss_newton_fn, pd_correction=pd_correction, antithetic=antithetic)
  return _von.posterior(state)


def mog(key: jax.Array, loss_fn: Callable[[jax.Array], jax.Array], params: jax.Array, *, num_components: int,
        num_steps: int, init_scale=1.0, beta=0.02, beta_w=None, num_samples: int = 3, estimator: str = "hessian",
        init_precision: Optional[jax.Array] = None, gauss_newton_fn: Optional[Callable] = None,
        antithetic: bool = False, control_variate: bool = False) -> Mixture:
  """Mixture-of-Gaussians VI (`bmerge.optim.mog.fit`) with K components started around a MAP -> `Mixture`.

  With H the Laplace precision at the MAP `params` (as in `von`) and H = L L^T, component k starts at
  mean params + init_scale * L^-T eps_k (eps_k ~ N(0, I): spread by `init_scale` Laplace standard deviations),
  precision H, equal weights; `k_init, k_fit = jax.random.split(key)` draw the spread and run the fit.

  Args:
    key: PRNG key of the spread and the run.
    loss_fn: theta [P] -> loss-bar, as in `von`.
    params: the MAP [P].
    num_components: K.
    num_steps: mixture-VI steps.
    init_scale: the spread of the starting means, in Laplace standard deviations.
    init_precision: the starting precision [P, P]; default the Laplace precision at `params`.
    beta, beta_w, num_samples, estimator, gauss_newton_fn, antithetic, control_variate: as in
      `bmerge.optim.mog.fit`.

  Returns:
    The fitted `Mixture` of K `FullGaussian` components, the q_t of Eq. 11.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge import fit
    >>> loss_fn = lambda t: 0.5 * jnp.sum(t ** 2)
    >>> q = fit.mog(jax.random.key(0), loss_fn, jnp.zeros(2), num_components=3, num_steps=2, beta=0.2)
    >>> q.components.mean.shape, q.components.precision.shape
    ((3, 2), (3, 2, 2))

  References:
    Lin, Khan, Schmidt. Fast and simple natural-gradient variational inference with mixture of exponential-family
    approximations. ICML 2019.
    Monzón Maldonado et al. How to Weight Multitask Finetuning? Fast Previews via Bayesian Model-Merging. 2024
    (Eqs. 11-12, App. B.2).
  """
  k = _checks.integer(num_components, "num_components")
  h0 = _laplace(loss_fn, params, init_precision, estimator, gauss_newton_fn)
  k_init, k_fit = jax.random.split(key)
  means = _spread(k_init, params, k, h0, init_scale)
  state = _mog.fit(k_fit, loss_fn, means, jnp.broadcast_to(h0, (k,) + jnp.shape(h0)), num_steps, beta=beta,
                   beta_w=beta_w, num_samples=num_samples, estimator=estimator, gauss_newton_fn=gauss_newton_fn,
                   antithetic=antithetic, control_variate=control_variate)
  return _mog.posterior(state)
