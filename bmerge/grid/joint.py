"""The exact baseline: weighted multitask training sum_t alpha_t loss_t(theta) (paper Eq. 1) for every alpha.

  theta*_alpha = argmin_theta sum_t alpha_t loss_t(theta),

found by the same optimizer, initialisation and budget for every alpha: what a preview approximates. For small
models every alpha of a chunk trains at once (`vmap` over the chunk, `lax.scan` over steps); chunks are resumable
exactly like `bmerge.preview` (same driver).

Example:
  Two quadratic tasks (theta - 1)^2 and (theta + 1)^2: the weighted minimiser is alpha_1 - alpha_2.

  >>> import jax.numpy as jnp, optax
  >>> from bmerge import exact, grid
  >>> task_losses = lambda p, _: jnp.stack([(p - 1.0) ** 2, (p + 1.0) ** 2])
  >>> theta = exact.joint_train(task_losses, jnp.asarray(0.0), grid.line(0.5), optax.sgd(0.25), 50, None,
  ...                           progress=False)
  >>> theta.round(4).tolist()                                      # alpha_1 = 0, 0.5, 1
  [-1.0, 0.0, 1.0]

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eq. 1; Sec. 4: the exact multitask answer the previews are compared with).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmerge import _checks
from bmerge.optim import fit
from bmerge.grid.evaluate import chunked_map, compute_dtype

__all__ = [
    "joint_train",
    "joint_train_ivon",
]

PyTree = Any


def _train_one(task_losses, optimizer, num_steps, stepwise, alpha, params, batch):
  objective = lambda p, b: jnp.dot(alpha, task_losses(p, b).astype(alpha.dtype))
  opt_state = optimizer.init(params)

  def step(carry, b):
    params, opt_state = carry
    grads = jax.grad(objective)(params, batch if b is None else b)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  xs = batch if stepwise else None
  (params, _), _ = jax.lax.scan(step, (params, opt_state), xs, length=None if stepwise else num_steps)
  return params


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _train_chunk(task_losses, optimizer, num_steps, stepwise, eval_fn, chunk, params, batch, eval_batch):
  """Trains every alpha of a chunk at once; compiled once per (losses, optimizer, steps, eval_fn, shapes)."""
  trained = jax.vmap(partial(_train_one, task_losses, optimizer, num_steps, stepwise), in_axes=(0, None, None))(
      chunk, params, batch)
  if eval_fn is None:
    return trained
  return jax.vmap(eval_fn, in_axes=(0, None))(trained, eval_batch)


@partial(jax.jit, static_argnums=(0, 1))
def _chunk_step(task_losses, optimizer, chunk, params, opt_state, b):
  """One step of every alpha of a chunk (params and optimizer states carry the leading chunk axis)."""
  def one(alpha, p, s):
    grads = jax.grad(lambda q: jnp.dot(alpha, task_losses(q, b).astype(alpha.dtype)))(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s
  return jax.vmap(one)(chunk, params, opt_state)


@partial(jax.jit, static_argnums=(0, 1))
def _chunk_init(optimizer, size, params):
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (size,) + jnp.shape(x)), params)
  return stacked, jax.vmap(optimizer.init)(stacked)


@partial(jax.jit, static_argnums=0)
def _chunk_eval(eval_fn, trained, eval_batch):
  return jax.vmap(eval_fn, in_axes=(0, None))(trained, eval_batch)


def _train_chunk_python(task_losses, optimizer, num_steps, stepwise, eval_fn, chunk, params, batch, eval_batch):
  """`_train_chunk` with the steps in a Python loop of one compiled step (for convolutional networks on the CPU,
  where XLA runs a step inside `lax.scan` slower than the same step compiled alone)."""
  p, s = _chunk_init(optimizer, chunk.shape[0], params)
  for i in range(num_steps):
    b = jax.tree.map(lambda x: x[i], batch) if stepwise else batch
    p, s = _chunk_step(task_losses, optimizer, chunk, p, s, b)
  return p if eval_fn is None else _chunk_eval(eval_fn, p, eval_batch)


def joint_train(task_losses: Callable[[PyTree, Any], jax.Array], init_params: PyTree, alphas,
                optimizer: optax.GradientTransformation, num_steps: Optional[int], batch: Any, *,
                stepwise: bool = False, eval_fn: Optional[Callable[[PyTree, Any], Any]] = None, eval_batch: Any = None,
                chunk_size: int = 64, workdir: Optional[str] = None, tag: str = "exact",
                progress: bool = True, step_loop: str = "scan") -> PyTree:
  """Trains argmin_theta sum_t alpha_t loss_t(theta) for every alpha of a grid (paper Eq. 1).

  Every alpha starts from `init_params` with the same optimizer, the same data in the same order and the same budget,
  so the results differ only by the weighting. Full batch by default; with `stepwise=True` step i uses the i-th slice
  of `batch` along its leading axis (minibatches prepared in advance, e.g. `[num_steps, B, ...]` arrays).

  Args:
    task_losses: `task_losses(params, batch) -> [T]`, the per-task losses (each including its share of any
      regulariser, so that with sum(alpha) = 1 the objective is the weighted multitask loss plus the regulariser).
    init_params: the common initialisation (e.g. the pretrained model).
    alphas: [G, T] task weights, or one vector [T] (then the result has no leading G axis).
    optimizer: an optax transformation, applied for `num_steps` steps (same budget for every alpha).
    num_steps: the number of steps; with `stepwise=True` it must equal the leading axis of `batch` (or be None).
    batch: the training data passed to `task_losses` at every step (or, stepwise, one slice per step).
    stepwise: whether `batch` holds one minibatch per step along its leading axis.
    eval_fn: optional `eval_fn(params, eval_batch) -> metric`; when given, only the metrics are kept (and saved per
      chunk), not the trained models.
    eval_batch: data for `eval_fn`.
    chunk_size: alphas trained together in one compiled call.
    workdir: if given, finished chunks are saved under `<workdir>/<tag>/<key>/` and reused on the next run. The key
      is a content hash of everything that determines the results (`task_losses`, `optimizer` with the
      hyperparameters its functions capture, `num_steps`, `init_params`, `batch`, `eval_fn`, `eval_batch`), and each
      row is stored with its alpha: changed inputs never load old results, another grid or `chunk_size` reuses the
      rows already trained.
    tag: sub-folder in `workdir`.
    progress: show a progress bar.
    step_loop: "scan" (default): the whole training of a chunk is one compiled `lax.scan`; "python": one compiled
      step (all alphas of the chunk) called `num_steps` times from Python. Same results; "python" is faster for
      convolutional networks on the CPU, and with `chunk_size=1` it is the per-alpha loop.

  Returns:
    The trained params with a leading G axis, or the metrics [G, ...] when `eval_fn` is given (numpy); without the
    G axis for one alpha vector.

  Example:
    Least squares per task, evaluated (only the metric kept) at three alphas:

    >>> import jax.numpy as jnp, numpy as np, optax
    >>> from bmerge import exact
    >>> targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])                       # task t pulls theta to targets[t]
    >>> task_losses = lambda p, t: 0.5 * jnp.sum((p - t) ** 2, axis=1)
    >>> distance = lambda p, t: jnp.linalg.norm(p - t.mean(0))              # from the uniform weighting's answer
    >>> out = exact.joint_train(task_losses, jnp.zeros(2), np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]),
    ...                         optax.sgd(0.5), 40, targets, eval_fn=distance, eval_batch=targets, progress=False)
    >>> print(out.round(4))                                                   # |e_t - (1/2, 1/2)| = 1/sqrt(2)
    [0.7071 0.     0.7071]
  """
  if stepwise:
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or -1 in sizes:
      raise ValueError(f"With `stepwise=True` every leaf of `batch` needs the same leading steps axis; got leading "
                       f"sizes {sorted(sizes)}.")
    steps = sizes.pop()
    if num_steps is not None and num_steps != steps:
      raise ValueError(f"`num_steps` = {num_steps} but `batch` holds {steps} steps along its leading axis.")
    num_steps = steps
  num_steps = _checks.positive_int(num_steps, "num_steps", allow_zero=True)
  if workdir is not None:
    _checks.workdir(workdir)
  a, single = _grid(alphas)
  first = jax.tree.map(lambda x: x[0], batch) if stepwise else batch
  losses0 = jax.eval_shape(task_losses, init_params, first)
  if losses0.shape != (a.shape[1],):
    raise ValueError(f"`task_losses` returns shape {losses0.shape} but `alphas` has T = {a.shape[1]} columns; "
                     f"expected task_losses(params, batch) -> [{a.shape[1]}].")
  _checks.finite(init_params, name="init_params")
  if step_loop not in ("scan", "python"):
    raise ValueError(f"`step_loop` must be 'scan' or 'python', got {step_loop!r}.")
  train = _train_chunk if step_loop == "scan" else _train_chunk_python
  chunk_fn = partial(train, task_losses, optimizer, num_steps, bool(stepwise), eval_fn)
  inputs = dict(task_losses=task_losses, optimizer=optimizer, num_steps=num_steps, stepwise=bool(stepwise),
                init_params=init_params, batch=batch, eval_fn=eval_fn, eval_batch=eval_batch)
  out = chunked_map(lambda chunk: chunk_fn(chunk, init_params, batch, eval_batch), a.astype(compute_dtype()),
                    chunk_size=chunk_size, workdir=workdir, tag=tag, inputs=inputs, progress=progress,
                    description=f"joint training {tag}")
  return jax.tree.map(lambda x: x[0], out) if single else out


def _grid(alphas) -> tuple[np.ndarray, bool]:
  """`alphas` as a checked [G, T] grid, and whether it was one vector [T] (then results lose the G axis)."""
  a = np.asarray(alphas)
  if a.ndim not in (1, 2):
    raise ValueError(f"`alphas` must be one weight vector [T] or a grid [G, T], got shape {a.shape}.")
  return _checks.alphas(a, a.shape[-1])


def _alpha_weighted(task_losses, params, batch):
  """sum_t alpha_t task_losses(params, b)_t for batch = (b, alpha): alpha rides with the data, so one compiled IVON
  step serves every alpha."""
  b, alpha = batch
  return jnp.dot(alpha, task_losses(params, b).astype(alpha.dtype))


@partial(jax.jit, static_argnums=0)
def _evaluate(eval_fn, params, eval_batch):
  return eval_fn(params, eval_batch)


def joint_train_ivon(key: jax.Array, task_losses: Callable[[PyTree, Any], jax.Array], params: PyTree, alphas,
                     batches: Any, *, ess, learning_rate, eval_fn: Optional[Callable[[PyTree, Any], Any]] = None,
                     eval_batch: Any = None, chunk_size: int = 1, workdir: Optional[str] = None,
                     tag: str = "exact", progress: bool = True, **ivon_kwargs) -> PyTree:
  """Weighted multitask finetuning with IVON for every alpha of a grid (paper Eq. 1): the exact baseline of
  IVON-Hess and MultiIVON-Hess previews, trained with the same learner as the task posteriors.

  For every alpha, `bmerge.fit.ivon(key, loss_alpha, params, batches, ess=ess, learning_rate=learning_rate,
  **ivon_kwargs)` with loss_alpha(params, b) = sum_t alpha_t task_losses(params, b)_t, and the posterior mean kept.
  Every alpha uses the same `key` (the same standard-normal draws for IVON's weight noise), the same batches in the
  same order, the same start (`params`, and `init_posterior` when finetuning from a pretrained IVON posterior) and
  the same budget: runs differ only by the weighting, and at a vertex alpha = e_t the run is `fit.ivon` on the loss
  `task_losses(params, b)[t]` itself. (`bmerge.exact.joint_train` does the same for optax optimizers; IVON draws its
  noise from its own state before each gradient, which an optax update cannot.)

  Args:
    key: PRNG key of every run.
    task_losses: `task_losses(params, batch) -> [T]` per-task minibatch losses, e.g. the per-task cross-entropies of
      one mixed minibatch (`bmerge.models.resnet.task_cross_entropies`).
    params: the common start (with `init_posterior`, its mean).
    alphas: [G, T] task weights, or one vector [T] (then the result has no leading G axis).
    batches: a list of batches (a stream, one compiled step per batch from Python: the fast form for convolutional
      networks on the CPU) or a pytree with a leading steps axis (one `lax.scan`). Not an iterator: every alpha
      reads the same batches.
    ess, learning_rate: as in `bmerge.fit.ivon`.
    eval_fn: optional `eval_fn(params, eval_batch) -> metric`; when given, only the metrics are kept (and saved per
      chunk), not the trained models.
    eval_batch: data for `eval_fn`.
    chunk_size: alphas per call. 1 (default) trains one alpha after the other; larger chunks `vmap` the runs of a
      chunk (one batched step for all of them: worth it on accelerators, slower for convolutions on the CPU).
    workdir: if given, finished rows are saved under `<workdir>/<tag>/<key>/` and reused on the next run, keyed by
      a content hash of every input (as in `joint_train`).
    tag: sub-folder in `workdir`.
    progress: show a progress bar.
    **ivon_kwargs: the other arguments of `bmerge.fit.ivon` (mc_samples, hess_init, beta1, beta2, weight_decay,
      init_posterior, ...).

  Returns:
    The trained means with a leading G axis, or the metrics [G, ...] when `eval_fn` is given (numpy); without the
    G axis for one alpha vector.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from bmerge import exact, fit
    >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
    >>> task_losses = lambda p, idx: jnp.stack([jnp.mean((x[idx] @ p - 1.0) ** 2), jnp.mean((x[idx] @ p) ** 2)])
    >>> batches = [np.arange(i, i + 16) % 64 for i in range(0, 160, 16)]          # 10 steps, a list
    >>> means = exact.joint_train_ivon(jax.random.key(0), task_losses, jnp.zeros(2), np.eye(2), batches,
    ...                                ess=64.0, learning_rate=0.1, progress=False)
    >>> alone = fit.ivon(jax.random.key(0), lambda p, idx: task_losses(p, idx)[0], jnp.zeros(2), batches,
    ...                  ess=64.0, learning_rate=0.1)                              # task 1 alone
    >>> bool(jnp.allclose(means[0], alone.mean, atol=1e-6))
    True

  References:
    Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
    Bayesian Model-Merging. 2024 (Eq. 1; App. B.3: the joint solution finetuned with IVON from the pretrained model).
    Shen et al. Variational Learning is Effective for Large Deep Networks. ICML 2024 (IVON).
  """
  if not callable(task_losses):
    raise TypeError(f"`task_losses` must be callable as task_losses(params, batch) -> [T], got "
                    f"{type(task_losses).__name__}.")
  if eval_fn is not None and not callable(eval_fn):
    raise TypeError(f"`eval_fn` must be callable as eval_fn(params, eval_batch), got {type(eval_fn).__name__}.")
  if workdir is not None:
    _checks.workdir(workdir)
  a, single = _grid(alphas)
  if hasattr(batches, "__next__"):
    raise ValueError("`batches` is an iterator; every alpha trains on the same batches: pass a list of batches or a "
                     "pytree with a leading steps axis.")
  listed = isinstance(batches, list)
  if not listed and not jax.tree.leaves(batches):
    raise ValueError("`batches` holds no arrays; expected a list of batches or a pytree [num_steps, ...].")
  first = batches[0] if listed else jax.tree.map(lambda x: x[0], batches)
  losses0 = jax.eval_shape(task_losses, params, first)
  if losses0.shape != (a.shape[1],):
    raise ValueError(f"`task_losses` returns shape {losses0.shape} but `alphas` has T = {a.shape[1]} columns; "
                     f"expected task_losses(params, batch) -> [{a.shape[1]}].")
  loss_fn = partial(_alpha_weighted, task_losses)  # one object: every alpha reuses the compiled step
  num_steps = len(batches) if listed else jax.tree.leaves(batches)[0].shape[0]

  def one(alpha):
    with_alpha = ([(b, alpha) for b in batches] if listed else
                  (batches, jnp.broadcast_to(alpha, (num_steps,) + alpha.shape)))
    mean = fit.ivon(key, loss_fn, params, with_alpha, ess=ess, learning_rate=learning_rate, **ivon_kwargs).mean
    return mean if eval_fn is None else _evaluate(eval_fn, mean, eval_batch)

  def chunk_fn(chunk):
    chunk = jnp.asarray(chunk)
    if chunk.shape[0] == 1:  # no vmap: a batch of one model would still batch the convolutions over kernels
      return jax.tree.map(lambda x: x[None], one(chunk[0]))
    return jax.vmap(one)(chunk)

  inputs = dict(key=key, task_losses=task_losses, params=params, batches=batches, ess=ess,
                learning_rate=learning_rate, ivon_kwargs=dict(sorted(ivon_kwargs.items())), eval_fn=eval_fn,
                eval_batch=eval_batch)
  out = chunked_map(chunk_fn, a.astype(compute_dtype()), chunk_size=chunk_size, workdir=workdir, tag=tag,
                    inputs=inputs, progress=progress, description=f"IVON joint training {tag}")
  return jax.tree.map(lambda x: x[0], out) if single else out
