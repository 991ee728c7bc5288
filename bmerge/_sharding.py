"""Sharding the grid axis (and, for big models, the parameters) across devices with JAX's own sharding.

With one device these are no-ops. With several, the [G, T] grid is padded to a multiple of the grid axis size (with
copies of its first row, a valid alpha) and split along G; every other input is replicated, and XLA's sharding
propagation splits the whole merge along G. The caller slices the padding off the result.

A model too big for one device uses a 2-D mesh with axes ("grid", "model"): the alphas split along "grid" and every
parameter array along "model" (`shard_params`), so each device holds 1 / |model| of every posterior; XLA inserts the
collectives the evaluation needs. `bmerge.preview(..., mesh=mesh)` does this.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bmerge import _checks

GRID_AXIS = "grid"
MODEL_AXIS = "model"


def grid_mesh(devices: Optional[list] = None) -> Optional[Mesh]:
  """A 1-D mesh over `devices` (default: all) named "grid", or None with a single device.

  Example:
    >>> import jax
    >>> from bmerge import _sharding
    >>> _sharding.grid_mesh(jax.devices()[:1]) is None, _sharding.grid_size(None)
    (True, 1)
  """
  devices = jax.devices() if devices is None else devices
  if len(devices) <= 1:
    return None
  return Mesh(np.asarray(devices), (GRID_AXIS,))


def grid_size(mesh: Optional[Mesh]) -> int:
  """How many ways the grid axis is split (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape[GRID_AXIS])


def check_mesh(mesh: Any, name: str = "mesh") -> Mesh:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`{name}` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  if GRID_AXIS not in mesh.axis_names or not set(mesh.axis_names) <= {GRID_AXIS, MODEL_AXIS}:
    raise ValueError(f"`{name}` must have the axis {GRID_AXIS!r} (the alphas) and optionally {MODEL_AXIS!r} (the "
                     f"parameters); got axes {mesh.axis_names}.")
  return mesh


def shard_params(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Places every leaf of `tree` split along the mesh's "model" axis (replicated over "grid").

  Each array is split along its largest axis after the first (the first is the task or component axis) whose size
  the "model" axis divides; arrays with no such axis are replicated. Any choice gives the same results; this one
  spreads the big matrices of a network.
  """
  if mesh is None or MODEL_AXIS not in mesh.axis_names:
    return replicate(tree, mesh)
  n = int(mesh.shape[MODEL_AXIS])

  def place(x):
    if not _checks.is_concrete(x):
      return x
    shape = np.shape(x)
    axes = [i for i in range(1, len(shape)) if shape[i] % n == 0 and shape[i] >= n]
    spec = [None] * len(shape)
    if axes:
      spec[max(axes, key=lambda i: shape[i])] = MODEL_AXIS
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

  return jax.tree.map(place, tree)


def pad_rows(x: Any, multiple: int) -> Any:
  """[G, ...] padded along axis 0 to a multiple of `multiple` with copies of its first row (for a grid: a valid
  alpha); `x` itself when G already is one.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import _sharding
    >>> _sharding.pad_rows(jnp.array([[1.0], [2.0], [3.0]]), 2)[:, 0].tolist()
    [1.0, 2.0, 3.0, 1.0]
  """
  pad = (-x.shape[0]) % multiple
  return jnp.concatenate([jnp.asarray(x), jnp.repeat(jnp.asarray(x)[:1], pad, axis=0)], axis=0) if pad else x


def even_chunk(g: int, most: int, multiple: int = 1) -> int:
  """Rows per chunk when g rows go in n = ceil(g / most) chunks of one size: ceil(g / n) rounded up to a multiple of
  `multiple` (never above `most` when `most` is itself a multiple), so the last chunk pads few rows.

  Example:
    >>> from bmerge import _sharding
    >>> _sharding.even_chunk(66, 64), _sharding.even_chunk(66, 64, multiple=4), _sharding.even_chunk(10, 64)
    (33, 36, 10)
  """
  num = -(-g // most)
  rows = -(-g // num)
  return -(-rows // multiple) * multiple


def shard_rows(x: Any, mesh: Optional[Mesh]) -> tuple[Any, int]:
  """Pads axis 0 of `x` to a multiple of the grid axis size and places it split along that axis; returns (x, G)."""
  g = x.shape[0]
  if mesh is None or not _checks.is_concrete(x):
    return x, g
  x = pad_rows(x, grid_size(mesh))
  spec = PartitionSpec(GRID_AXIS, *([None] * (x.ndim - 1)))
  return jax.device_put(x, NamedSharding(mesh, spec)), g


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  if mesh is None or not all(_checks.is_concrete(x) for x in jax.tree.leaves(tree)):
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


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
