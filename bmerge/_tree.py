"""Params pytrees as the merge rules see them: floating leaves flattened into one [..., P] matrix, others set aside.

The merge rules are matrix products over the parameter axis; flattening every leaf into one P axis (inside `jit`, so XLA
sees one concatenate) lets each rule be a handful of GEMMs whatever the model's pytree looks like.

Dtypes. Merging runs in float32 (float64 when the params are float64, under `jax_enable_x64`) whatever the params'
dtype: bfloat16 and float16 leaves are widened before any product and every merged leaf is returned in its own dtype.
Leaves that are not floating point (integer step counters, PRNG keys, booleans) are never averaged: `split_floating`
sets them aside, checks that every task holds the same value, and `restore` puts that value back.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bmerge import _checks


def compute_dtype(*dtypes) -> jnp.dtype:
  """The dtype a merge of leaves of `dtypes` is computed in: their common type, at least float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import _tree
    >>> _tree.compute_dtype(jnp.bfloat16), _tree.compute_dtype(jnp.float32, jnp.int32)
    (dtype('float32'), dtype('float32'))
  """
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def flatten(tree: Any, num_lead: int, dtype=None) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """Concatenates every leaf of `tree` (leading `num_lead` axes kept) into `[*lead, P]` in the merge dtype.

  Returns the matrix (in `dtype`, default `compute_dtype` of the leaves) and `unflatten(x)`, which maps any
  `[*other_lead, P]` array back to the pytree structure, each leaf shaped `[*other_lead, *leaf_shape]` and cast back to
  the dtype of the corresponding leaf of `tree`.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import _tree
    >>> tree = {"b": jnp.zeros((3, 2)), "w": jnp.ones((3, 2, 2), jnp.bfloat16)}   # T = 3 stacked models, P = 6
    >>> flat, unflatten = _tree.flatten(tree, 1)
    >>> flat.shape, flat.dtype, unflatten(flat[0])["w"].dtype
    ((3, 6), dtype('float32'), dtype(bfloat16))
  """
  leaves, treedef = jax.tree.flatten(tree)
  lead = leaves[0].shape[:num_lead]
  shapes = [leaf.shape[num_lead:] for leaf in leaves]
  dtypes = [leaf.dtype for leaf in leaves]
  sizes = [math.prod(s) for s in shapes]
  dtype = compute_dtype(*leaves) if dtype is None else dtype
  flat = jnp.concatenate([leaf.reshape(lead + (-1,)).astype(dtype) for leaf in leaves], axis=-1)

  def unflatten(x: jax.Array) -> Any:
    out, start = [], 0
    for shape, size, dt in zip(shapes, sizes, dtypes):
      out.append(x[..., start:start + size].reshape(x.shape[:-1] + shape).astype(dt))
      start += size
    return jax.tree.unflatten(treedef, out)

  return flat, unflatten


def _is_floating(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _check_no_rng_state(tree: Any, name: str) -> None:
  """An NNX state with RNG variables is a whole-model state: point the user to splitting out the parameters."""
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return
  found = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0] if isinstance(v, nnx.RngState)]
  if found:
    raise TypeError(f"`{name}` holds NNX RNG variables ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}), so "
                    "it is a whole-model state; merge only the parameters: `graphdef, params, rest = "
                    "nnx.split(model, nnx.Param, ...)` and build the posteriors from `params`.")


def split_floating(tree: Any, num_lead: int, name: str) -> tuple[Any, Callable[[Any, tuple], Any]]:
  """The floating leaves of a stacked `tree` (others replaced by None) and `restore(merged, lead)`.

  Non-floating leaves (integer counters, PRNG keys, booleans) must hold the same value in every one of the stacked
  models (the leading `num_lead` axes, e.g. T tasks or T x K components); otherwise a `ValueError` names the leaf.
  `restore(merged, lead)` fills them back into `merged` (the merge of the floating part, leading axes `lead`, e.g.
  (G,) or () for one alpha), broadcast to `lead`.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import _tree
    >>> stacked = {"step": jnp.array([7, 7]), "w": jnp.array([[0.0], [2.0]])}    # T = 2 models
    >>> floating, restore = _tree.split_floating(stacked, 1, "means")
    >>> floating["step"] is None, restore({"step": None, "w": jnp.array([1.0])}, ())["step"].tolist()
    (True, 7)
  """
  _check_no_rng_state(tree, name)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  kept, fixed = [], {}
  for i, (path, leaf) in enumerate(leaves):
    if _is_floating(leaf):
      kept.append(leaf)
      continue
    kept.append(None)
    value = leaf
    is_key = jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key)
    data = jax.random.key_data(leaf) if is_key else leaf
    if _checks.is_concrete(data):
      data = np.asarray(data)
      first = data[(0,) * num_lead]
      if not np.all(data == first):
        raise ValueError(f"`{name}{jax.tree_util.keystr(path)}` is a non-floating leaf ({jnp.result_type(leaf)}) "
                         "that differs between the stacked models; such leaves (step counters, PRNG keys) are never "
                         "averaged: make them equal, or leave them out of the posteriors.")
    fixed[i] = value[(0,) * num_lead]
  if len(fixed) == len(leaves):
    raise ValueError(f"`{name}` has no floating-point leaves to merge.")
  floating = jax.tree.unflatten(treedef, kept) if fixed else tree

  def restore(merged: Any, lead: tuple) -> Any:
    if not fixed:
      return merged
    out = jax.tree_util.tree_flatten(merged, is_leaf=lambda x: x is None)[0]
    for i, value in fixed.items():
      out[i] = jnp.broadcast_to(value, tuple(lead) + jnp.shape(value))
    return jax.tree.unflatten(treedef, out)

  return floating, restore


def like_floating(tree: Any, floating: Any, name: str) -> Any:
  """`tree` (same structure as the tree `floating` came from) with the leaves `floating` dropped set to None."""
  mask = jax.tree_util.tree_flatten(floating, is_leaf=lambda x: x is None)[0]
  leaves, treedef = jax.tree.flatten(tree)
  if len(leaves) != len(mask):
    raise ValueError(f"`{name}` has {len(leaves)} leaves; expected {len(mask)}, one per leaf of the means.")
  return jax.tree.unflatten(treedef, [x if m is not None else None for x, m in zip(leaves, mask)])
