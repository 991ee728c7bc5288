"""Flattening a params pytree with leading batch axes into one [..., P] matrix and back.

The merge rules are matrix products over the parameter axis; flattening every leaf into one P axis (inside `jit`, so XLA
sees one concatenate) lets each rule be a handful of GEMMs whatever the model's pytree looks like.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


def flatten(tree: Any, num_lead: int) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
  """Concatenates every leaf of `tree` (leading `num_lead` axes kept) into `[*lead, P]`.

  Returns the matrix and `unflatten(x)`, which maps any `[*other_lead, P]` array back to the pytree structure, each
  leaf shaped `[*other_lead, *leaf_shape]`.
  """
  leaves, treedef = jax.tree.flatten(tree)
  lead = leaves[0].shape[:num_lead]
  shapes = [leaf.shape[num_lead:] for leaf in leaves]
  sizes = [math.prod(s) for s in shapes]
  dtype = jnp.result_type(*leaves)
  flat = jnp.concatenate([leaf.reshape(lead + (-1,)).astype(dtype) for leaf in leaves], axis=-1)

  def unflatten(x: jax.Array) -> Any:
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
      out.append(x[..., start:start + size].reshape(x.shape[:-1] + shape))
      start += size
    return jax.tree.unflatten(treedef, out)

  return flat, unflatten
