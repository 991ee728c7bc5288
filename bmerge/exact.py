"""The exact baseline: weighted multitask training sum_t alpha_t loss_t(theta) (paper Eq. 1) for every alpha.

What a preview approximates. For small models every alpha of a chunk trains at once (`vmap` over the chunk, `lax.scan`
over steps), all from the same initialisation with the same optimizer and budget; chunks are resumable exactly like
`bmerge.preview` (same driver).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bmerge import _checks
from bmerge.grid_eval import chunked_map

PyTree = Any


def _train_one(task_losses, optimizer, num_steps, alpha, params, batch):
  objective = lambda p: jnp.dot(alpha, task_losses(p, batch))
  opt_state = optimizer.init(params)

  def step(carry, _):
    params, opt_state = carry
    grads = jax.grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, opt_state), None, length=num_steps)
  return params


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _train_chunk(task_losses, optimizer, num_steps, eval_fn, chunk, params, batch, eval_batch):
  """Trains every alpha of a chunk at once; compiled once per (losses, optimizer, steps, eval_fn, shapes)."""
  trained = jax.vmap(partial(_train_one, task_losses, optimizer, num_steps), in_axes=(0, None, None))(
      chunk, params, batch)
  if eval_fn is None:
    return trained
  return jax.vmap(eval_fn, in_axes=(0, None))(trained, eval_batch)


def joint_train(task_losses: Callable[[PyTree, Any], jax.Array], init_params: PyTree, alphas,
                optimizer: optax.GradientTransformation, num_steps: int, batch: Any, *,
                eval_fn: Optional[Callable[[PyTree, Any], Any]] = None, eval_batch: Any = None,
                chunk_size: int = 64, workdir: Optional[str] = None, tag: str = "exact", salt: str = "",
                progress: bool = True) -> PyTree:
  """Trains argmin_theta sum_t alpha_t loss_t(theta) for every alpha of a grid, full batch.

  Args:
    task_losses: `task_losses(params, batch) -> [T]`, the per-task losses (each including its share of any
      regulariser, so that with sum(alpha) = 1 the objective is the weighted multitask loss plus the regulariser).
    init_params: the common initialisation (e.g. the pretrained model).
    alphas: [G, T] task weights.
    optimizer: an optax transformation, applied for `num_steps` full-batch steps (same budget for every alpha).
    batch: the training data passed to `task_losses` at every step.
    eval_fn: optional `eval_fn(params, eval_batch) -> metric`; when given, only the metrics are kept (and saved per
      chunk), not the trained models.
    eval_batch: data for `eval_fn`.
    chunk_size: alphas trained together in one compiled call.
    workdir: if given, finished chunks are saved under `<workdir>/<tag>/` and reused on the next run.
    tag: sub-folder in `workdir`.
    salt: identifies the data, losses and optimizer (e.g. a config fingerprint); chunks of another salt are refused.
    progress: show a progress bar.

  Returns:
    The trained params with a leading G axis, or the metrics [G, ...] when `eval_fn` is given (numpy).
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
    raise ValueError(f"`num_steps` must be a non-negative integer, got {num_steps!r}.")
  a = np.asarray(alphas)
  if a.ndim != 2:
    raise ValueError(f"`alphas` must be a [G, T] grid, got shape {a.shape}.")
  losses0 = jax.eval_shape(task_losses, init_params, batch)
  if losses0.shape != (a.shape[1],):
    raise ValueError(f"`task_losses` returns shape {losses0.shape} but `alphas` has T = {a.shape[1]} columns; "
                     f"expected task_losses(params, batch) -> [{a.shape[1]}].")
  _checks.alphas(a, a.shape[1])
  _checks.finite(init_params, name="init_params")
  dtype = jax.tree.leaves(init_params)[0].dtype

  chunk_fn = partial(_train_chunk, task_losses, optimizer, int(num_steps), eval_fn)
  return chunked_map(lambda chunk: chunk_fn(chunk, init_params, batch, eval_batch), a.astype(dtype),
                     chunk_size=chunk_size, workdir=workdir, tag=tag, salt=salt, progress=progress,
                     description=f"joint training {tag}")
