"""Sharding the grid axis across devices with JAX's own sharding (Mesh + NamedSharding).

With one device these are no-ops. With several, the [G, T] grid is padded to a multiple of the device count (with
copies of its first row, a valid alpha) and split along G; every other input is replicated, and XLA's sharding
propagation splits the whole merge along G. The caller slices the padding off the result.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

GRID_AXIS = "grid"


def grid_mesh(devices: Optional[list] = None) -> Optional[Mesh]:
  """A 1-D mesh over `devices` (default: all) named "grid", or None with a single device."""
  devices = jax.devices() if devices is None else devices
  if len(devices) <= 1:
    return None
  return Mesh(np.asarray(devices), (GRID_AXIS,))


def shard_rows(x: Any, mesh: Optional[Mesh]) -> tuple[Any, int]:
  """Pads axis 0 of `x` to a multiple of the mesh size and places it split along that axis; returns (x, G)."""
  g = x.shape[0]
  if mesh is None or not _is_concrete(x):
    return x, g
  n = mesh.size
  pad = (-g) % n
  if pad:
    x = jnp.concatenate([jnp.asarray(x), jnp.repeat(jnp.asarray(x)[:1], pad, axis=0)], axis=0)
  spec = PartitionSpec(GRID_AXIS, *([None] * (x.ndim - 1)))
  return jax.device_put(x, NamedSharding(mesh, spec)), g


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  if mesh is None or not all(_is_concrete(x) for x in jax.tree.leaves(tree)):
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def run_on_grid(fn, alphas, single: bool, *operands, rows=None):
  """Calls `fn(alphas, *operands[, rows])` with the grid sharded across devices; strips padding (and G if single).

  `rows` (optional) is a pytree with the same leading G axis as `alphas`, sharded with it.
  """
  mesh = grid_mesh()
  alphas, g = shard_rows(alphas, mesh)
  operands = replicate(operands, mesh)
  if rows is not None:
    rows = jax.tree.map(lambda x: shard_rows(x, mesh)[0], rows)
  out = fn(alphas, *operands) if rows is None else fn(alphas, *operands, rows)
  padded = alphas.shape[0]
  if padded != g:  # outputs with a leading grid axis lose the padding; summaries (scalars) stay
    out = jax.tree.map(lambda x: x[:g] if x.ndim and x.shape[0] == padded else x, out)
  if single:
    out = jax.tree.map(lambda x: x[0], out)
  return out
