"""Previews: merge and evaluate over a grid of alphas, fused, chunked, sharded and resumable.

`preview` evaluates `eval_fn(merge_fn(posteriors, alphas_chunk)[g], batch)` for every alpha. Each chunk of alphas is
one compiled call that merges and evaluates (`vmap` over the chunk), so only `chunk_size` merged models exist at
once however large G is. With a `workdir`, every finished chunk is written to disk as it completes; a run that is
interrupted and started again loads those chunks and computes only the rest (the results are identical).

The exact baseline (weighted joint training per alpha, paper Eq. 1) runs through the same chunked driver in
`bmerge.exact`. The module is `grid_eval` so that `bmerge.preview` can be the function.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bmerge import _checks
from bmerge import _sharding

PyTree = Any


def _fingerprint(alphas: np.ndarray, chunk_size: int, tag: str, salt: str) -> str:
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(alphas, dtype=np.float64).tobytes())
  h.update(f"{alphas.shape}|{chunk_size}|{tag}|{salt}".encode())
  return h.hexdigest()[:16]


def _save_chunk(path: str, tree: PyTree) -> None:
  leaves, _ = jax.tree.flatten(tree)
  tmp = path + ".tmp.npz"
  np.savez(tmp, *[np.asarray(x) for x in leaves])
  os.replace(tmp, path)  # atomic: a chunk file either is complete or does not exist


def _load_chunk(path: str, treedef) -> PyTree:
  with np.load(path) as f:
    return jax.tree.unflatten(treedef, [f[f"arr_{i}"] for i in range(len(f.files))])


def chunked_map(fn: Callable[[jax.Array], PyTree], alphas, *, chunk_size: int = 64, workdir: Optional[str] = None,
                tag: str = "map", salt: str = "", progress: bool = True, description: str = "") -> PyTree:
  """Applies `fn(alphas_chunk [C, T]) -> pytree with leading C axis` over `alphas` [G, T] chunk by chunk.

  The last chunk is padded (with its first row) to `chunk_size` so every call has one shape: one trace in all.
  With several devices each chunk is split across them along its rows. With `workdir`, chunk i is saved as
  `<workdir>/<tag>/chunk_<i>.npz` when it finishes and loaded instead of recomputed on the next run; a manifest
  holding a fingerprint of (alphas, chunk_size, tag, salt) guards against mixing runs: pass as `salt` anything else
  that determines the results (e.g. `bmerge.checkpoint.config_fingerprint(config)`), and a folder holding chunks of
  another run is refused, never overwritten.

  Returns the pytree of numpy arrays with a leading G axis.
  """
  alphas = np.asarray(alphas)
  g = alphas.shape[0]
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
  mesh = _sharding.grid_mesh()
  if mesh is not None:
    chunk_size = -(-chunk_size // mesh.size) * mesh.size
  chunk_size = min(chunk_size, -(-g // (mesh.size if mesh else 1)) * (mesh.size if mesh else 1))
  num_chunks = -(-g // chunk_size)
  folder = None
  if workdir is not None:
    folder = os.path.join(workdir, tag)
    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(folder, "manifest.json")
    fp = _fingerprint(alphas, chunk_size, tag, salt)
    if os.path.exists(manifest):
      with open(manifest) as f:
        old = json.load(f)
      if old.get("fingerprint") != fp:
        raise ValueError(f"`workdir` {folder} holds chunks of a different run (other alphas, chunk_size, tag or salt); "
                         "use a new workdir or delete that folder.")
    else:
      with open(manifest + ".tmp", "w") as f:
        json.dump({"fingerprint": fp, "num_alphas": g, "chunk_size": int(chunk_size), "tag": tag}, f)
      os.replace(manifest + ".tmp", manifest)

  outputs = [None] * num_chunks
  treedef = None
  todo = []
  for i in range(num_chunks):
    path = os.path.join(folder, f"chunk_{i:05d}.npz") if folder else None
    if path and os.path.exists(path):
      outputs[i] = path  # loaded below, once the tree structure is known
    else:
      todo.append(i)
  bar = tqdm(total=num_chunks, initial=num_chunks - len(todo), desc=description or tag, disable=not progress,
             unit="chunk", leave=False)
  for i in todo:
    rows = alphas[i * chunk_size:(i + 1) * chunk_size]
    n = rows.shape[0]
    if n < chunk_size:
      rows = np.concatenate([rows, np.repeat(rows[:1], chunk_size - n, axis=0)])
    sharded, _ = _sharding.shard_rows(rows, mesh)  # numpy rows go straight into the compiled call
    out = jax.tree.map(lambda x: np.asarray(x)[:n], fn(sharded))
    treedef = jax.tree.structure(out)
    if folder:
      _save_chunk(os.path.join(folder, f"chunk_{i:05d}.npz"), out)
    outputs[i] = out
    bar.update(1)
  bar.close()
  if treedef is None:  # everything was on disk: recover the structure by evaluating the tree shape of fn
    shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((chunk_size, alphas.shape[1]), jnp.asarray(alphas[:1]).dtype))
    treedef = jax.tree.structure(shape)
  outputs = [_load_chunk(o, treedef) if isinstance(o, str) else o for o in outputs]
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outputs)


@partial(jax.jit, static_argnums=(0, 1))
def _fused(merge_fn, eval_fn, chunk, posteriors, batch):
  """Merge and evaluate one chunk of alphas in one compiled call (cached per (merge_fn, eval_fn) and shapes)."""
  params = merge_fn(posteriors, chunk)
  return jax.vmap(eval_fn, in_axes=(0, None))(params, batch)


def _hashable(f) -> bool:
  try:
    hash(f)
    return True
  except TypeError:
    return False


def preview(merge_fn: Callable[[PyTree, jax.Array], PyTree], posteriors: PyTree, alphas,
            eval_fn: Callable[[PyTree, Any], Any], batch: Any, *, chunk_size: int = 64,
            workdir: Optional[str] = None, tag: str = "preview", salt: str = "", progress: bool = True) -> PyTree:
  """The preview: for every alpha, merge the task posteriors and evaluate the merged model (paper §1, Fig. 1).

  Args:
    merge_fn: `merge_fn(posteriors, alphas [C, T]) -> params with a leading C axis`, e.g.
      `bmerge.merge.hessian_weighted` or `functools.partial(bmerge.merge.mixture_weighted, num_iters=10)`.
    posteriors: the stacked task posteriors (anything `merge_fn` takes; passed as an argument, not baked into the
      compiled function, so large models compile fast).
    alphas: [G, T] grid (e.g. `bmerge.grid.simplex(T, 0.05)`).
    eval_fn: `eval_fn(params, batch) -> metric`, a scalar or a vector (e.g. per-task accuracies); jittable.
    batch: the evaluation data, passed to every `eval_fn` call.
    chunk_size: alphas merged and evaluated per compiled call (memory ~ chunk_size merged models).
    workdir: if given, finished chunks are saved under `<workdir>/<tag>/` and reused when run again.
    tag: the sub-folder name of this preview in `workdir` (use one tag per merge rule).
    salt: a string identifying the posteriors and data (e.g. a config fingerprint); chunks saved under another salt
      are refused instead of silently reused.
    progress: show a tqdm progress bar.

  Returns:
    The metrics with a leading G axis, as numpy arrays.
  """
  leaves = jax.tree.leaves(posteriors)
  if not leaves:
    raise ValueError("`posteriors` holds no arrays.")
  if not callable(merge_fn) or not callable(eval_fn):
    raise TypeError("`merge_fn` and `eval_fn` must be callables: merge_fn(posteriors, alphas) and eval_fn(params, batch).")
  a = np.asarray(alphas)
  if a.ndim != 2:
    raise ValueError(f"`alphas` must be a [G, T] grid, got shape {a.shape}.")
  _checks.alphas(a, a.shape[1])
  # Inside the compiled chunk the merge rule sees tracers and skips its value checks (sums to one, positive
  # precisions). Run it once eagerly on the row farthest from the simplex so bad input fails here, clearly.
  worst = int(np.argmax(np.abs(a.sum(axis=1) - 1.0)))
  jax.block_until_ready(merge_fn(posteriors, a[worst:worst + 1].astype(leaves[0].dtype)))

  if _hashable(merge_fn) and _hashable(eval_fn):  # the usual case: compiled once per (merge_fn, eval_fn, shapes)
    fused = partial(_fused, merge_fn, eval_fn)
  else:
    fused = jax.jit(partial(_fused.__wrapped__, merge_fn, eval_fn))
  return chunked_map(lambda chunk: fused(chunk, posteriors, batch), a.astype(leaves[0].dtype), chunk_size=chunk_size,
                     workdir=workdir, tag=tag, salt=salt, progress=progress, description=f"preview {tag}")
