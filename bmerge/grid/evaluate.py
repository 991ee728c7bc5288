"""Previews: merge and evaluate over a grid of alphas, fused, chunked, sharded and resumable.

For every row alpha_g of a grid [G, T] the preview is

  m_g = eval_fn(theta_hat(alpha_g), batch),   theta_hat(alpha) = argmax_theta gamma log p0(theta)
                                                                 + sum_t alpha_t log q_t(theta)   (paper Eq. 8),

the merged model computed by a merge rule of `bmerge.merge`. `preview` evaluates
`eval_fn(merge_fn(posteriors, alphas_chunk)[g], batch)` for every alpha. Each chunk of alphas is one compiled call
that merges and evaluates (`vmap` over the chunk), so only `chunk_size` merged models exist at once however large G
is. With a `workdir`, every finished chunk is written to disk as it completes; a run that is interrupted and started
again loads those chunks and computes only the rest (the results are identical).

The exact baseline (weighted joint training per alpha, paper Eq. 1) runs through the same chunked driver in
`bmerge.grid.joint` (`bmerge.exact`).

Example:
  >>> import jax.numpy as jnp
  >>> import bmerge
  >>> means = {"w": jnp.array([[0.0], [4.0]])}                              # two task models
  >>> bmerge.preview(bmerge.merge.simple_average, means, bmerge.grid.line(0.25), lambda p, _: p["w"][0], None,
  ...                progress=False).tolist()                              # alpha = (a, 1 - a): 4 (1 - a)
  [4.0, 3.0, 2.0, 1.0, 0.0]

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Sec. 3, Eqs. 1 and 8, Fig. 1).
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from bmerge import _checks
from bmerge import _fingerprint
from bmerge import _sharding
from bmerge import timing as _timing

__all__ = [
    "chunked_map",
    "compute_dtype",
    "preview",
]

PyTree = Any


_log = logging.getLogger(__name__)
_MANIFEST = "manifest.json"


def _row_keys(alphas: np.ndarray) -> list[bytes]:
  """One key per row: its float64 bytes (rows are compared exactly, as stored)."""
  rows = np.ascontiguousarray(alphas, dtype=np.float64)
  return [r.tobytes() for r in rows]


def _save_chunk(path: str, rows: np.ndarray, tree: PyTree, seconds: float) -> None:
  """The rows, their outputs, and what computing them cost (run seconds without compilation, run, machine)."""
  leaves = jax.tree.leaves(tree)
  tmp = path + ".tmp.npz"
  np.savez(tmp, alphas=np.asarray(rows, np.float64), seconds=np.float64(seconds), run=np.str_(_timing.RUN),
           machine=np.str_(json.dumps(_timing.machine())), **{f"out_{i}": np.asarray(x) for i, x in enumerate(leaves)})
  os.replace(tmp, path)  # atomic: a chunk file either is complete or does not exist


def _load_chunk(path: str) -> tuple[np.ndarray, list[np.ndarray]]:
  with np.load(path) as f:
    n = sum(1 for k in f.files if k.startswith("out_"))
    return f["alphas"], [f[f"out_{i}"] for i in range(n)]


def _check_name(value: Any, name: str) -> str:
  if not isinstance(value, str) or not value or value in (".", "..") or any(c in value for c in "/\\"):
    raise ValueError(f"`{name}` must be a non-empty name without path separators, got {value!r}.")
  return value


def _run_folder(workdir: str, tag: str, parts: dict[str, str]) -> str:
  """`<workdir>/<tag>/<key>`: the folder of this run's inputs; says which inputs changed if an older run is there."""
  _checks.workdir(workdir)
  key = _fingerprint.combine(parts)[:16]
  parent = os.path.join(workdir, tag)
  folder = os.path.join(parent, key)
  if os.path.isdir(folder):
    return folder
  others = []
  if os.path.isdir(parent):
    for name in os.listdir(parent):
      manifest = os.path.join(parent, name, _MANIFEST)
      if os.path.isfile(manifest):
        others.append((os.path.getmtime(manifest), name, manifest))
  if others:
    _, name, manifest = max(others)
    with open(manifest) as f:
      old = json.load(f).get("inputs", {})
    changed = sorted(k for k in set(old) | set(parts) if old.get(k) != parts.get(k))
    _log.info("%s: the inputs differ from the run in %s (changed: %s); computing into %s.", tag,
              os.path.join(parent, name), ", ".join(changed), folder)  # INFO: a new eval_fn in one workdir is normal
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, _MANIFEST + ".tmp"), "w") as f:
    json.dump({"tag": tag, "inputs": parts}, f, indent=1)
  os.replace(os.path.join(folder, _MANIFEST + ".tmp"), os.path.join(folder, _MANIFEST))
  return folder


def chunked_map(fn: Callable[[jax.Array], PyTree], alphas, *, chunk_size: int = 64, workdir: Optional[str] = None,
                tag: str = "map", inputs: Optional[Mapping[str, Any]] = None, progress: bool = True,
                description: str = "", mesh: Optional[Mesh] = None) -> PyTree:
  """Applies `fn(alphas_chunk [C, T]) -> pytree with leading C axis` over `alphas` [G, T] chunk by chunk.

  The rows are spread evenly over ceil(G / chunk_size) calls of one size (at most `chunk_size`; the last chunk padded
  with its first row), so every call has one shape, one trace in all, and at most a few rows are padded (G = 66 with
  chunk_size 64: two calls of 33, not 64 + 2 with 62 padded). With several devices each chunk is split across them
  along its rows.

  With `workdir`, every finished chunk is saved (with its alpha rows) under `<workdir>/<tag>/<key>/`, where `key` is a
  content hash of `inputs`: everything besides the alphas that determines `fn`'s results (arrays by the hash of their
  bytes, functions by qualified name, code and bound or captured values; see `bmerge.preview`, which fills it in).
  A later run with the same inputs loads the rows it finds there, whatever grid or `chunk_size` they were computed
  with, and computes only the missing rows; a run whose inputs differ in anything gets another folder, and a message
  logged at INFO names the inputs that changed and the folder it computes into. Finished rows are never overwritten.

  Args:
    fn: maps a chunk of alphas [C, T] to a pytree of arrays with a leading C axis (the same structure every call).
    alphas: [G, T] task weights.
    chunk_size: the most rows per call.
    workdir: optional folder for finished chunks (created if missing).
    tag: a sub-folder name for this computation.
    inputs: named inputs that determine `fn`'s results; default `{"fn": fn}` (its code and captured values).
    progress: show a tqdm progress bar.
    description: label of the progress bar.
    mesh: the devices the chunks are split across along their rows (its "grid" axis); default all devices.

  Returns:
    The pytree of numpy arrays with a leading G axis.

  Example:
    >>> import numpy as np
    >>> import bmerge
    >>> out = bmerge.chunked_map(lambda a: a.sum(axis=1), np.eye(3), chunk_size=2, progress=False)
    >>> out.tolist()
    [1.0, 1.0, 1.0]
  """
  alphas = np.asarray(alphas)
  if alphas.ndim != 2:
    raise ValueError(f"`alphas` must be a [G, T] grid, got shape {alphas.shape}.")
  g = alphas.shape[0]
  _checks.positive_int(chunk_size, "chunk_size")
  mesh = _sharding.grid_mesh() if mesh is None else _sharding.check_mesh(mesh)
  n_dev = _sharding.grid_size(mesh)
  chunk_size = -(-chunk_size // n_dev) * n_dev
  chunk_size = min(chunk_size, -(-g // n_dev) * n_dev)
  folder = None
  found: dict[bytes, tuple[str, int]] = {}
  stored: dict[str, tuple[float, str, Any]] = {}  # chunk file -> (seconds per row, run, machine)
  if workdir is not None:
    _check_name(tag, "tag")
    parts = _fingerprint.fingerprints({"fn": fn} if inputs is None else inputs)
    folder = _run_folder(workdir, tag, parts)
    for name in sorted(os.listdir(folder)):
      if name.endswith(".npz") and not name.endswith(".tmp.npz"):
        path = os.path.join(folder, name)
        with np.load(path) as f:
          rows = f["alphas"]
          for i, key in enumerate(_row_keys(rows)):
            found.setdefault(key, (path, i))
          if "seconds" in f.files:
            stored[path] = (float(f["seconds"]) / max(len(rows), 1), str(f["run"]), json.loads(str(f["machine"])))
          else:  # written without its cost: unknown
            stored[path] = (float("nan"), "unknown", "unknown")
  keys = _row_keys(alphas) if found else []
  todo = (np.asarray([i for i, k in enumerate(keys) if k not in found], dtype=np.int64) if found
          else np.arange(g, dtype=np.int64))
  num_chunks = -(-len(todo) // chunk_size)
  if num_chunks:  # the same number of calls, evenly filled (a multiple of the devices each)
    chunk_size = _sharding.even_chunk(len(todo), chunk_size, n_dev)
    num_chunks = -(-len(todo) // chunk_size)
  seconds = compile_seconds = 0.0
  computed: dict[int, tuple[PyTree, int]] = {}  # row -> (chunk output, index in it)
  outs = []  # the chunk outputs in order: the result itself when nothing came from disk
  treedef = None
  bar = tqdm(total=num_chunks, desc=description or tag, disable=not progress, unit="chunk", leave=False)
  for c in range(num_chunks):
    idx = todo[c * chunk_size:(c + 1) * chunk_size]
    rows = alphas[idx]
    n = rows.shape[0]
    if n < chunk_size:
      rows = np.concatenate([rows, np.repeat(rows[:1], chunk_size - n, axis=0)])
    sharded, _ = _sharding.shard_rows(rows, mesh)  # numpy rows go straight into the compiled call
    with _timing.stopwatch() as watch:
      out = jax.tree.map(lambda x: np.asarray(x)[:n], fn(sharded))  # numpy: computed by the end of the block
    seconds, compile_seconds = seconds + watch.wall - watch.compile_seconds, compile_seconds + watch.compile_seconds
    treedef = jax.tree.structure(out)
    if folder:
      _save_chunk(os.path.join(folder, f"rows-{_fingerprint.fingerprint(alphas[idx])[:16]}.npz"), alphas[idx], out,
                  watch.wall - watch.compile_seconds)
    outs.append(out)
    if found:
      leaves = jax.tree.leaves(out)
      for j, i in enumerate(idx):
        computed[int(i)] = (leaves, j)
    bar.update(1)
  bar.close()
  from_disk = [found[k][0] for i, k in enumerate(keys) if k in found and i not in computed]
  costs = [_timing.Cost(tag, seconds, compile_seconds, len(todo), 0, _timing.RUN, _timing.machine())]
  costs += [_timing.Cost(tag, stored[p][0], 0.0, 0, 1, stored[p][1], stored[p][2]) for p in from_disk]
  _timing.report(_timing.combine(tag, costs))
  if outs and not found:  # every row computed here, in order: no per-row bookkeeping
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)
  if treedef is None:  # everything was on disk: recover the structure from the tree shape of fn
    shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((chunk_size, alphas.shape[1]), alphas.dtype))
    treedef = jax.tree.structure(shape)
  loaded: dict[str, list[np.ndarray]] = {}
  columns = []
  for i, key in enumerate(keys):
    if i in computed:
      leaves, j = computed[i]
    else:
      path, j = found[key]
      if path not in loaded:
        loaded[path] = _load_chunk(path)[1]
      leaves = loaded[path]
    columns.append([leaf[j] for leaf in leaves])
  return jax.tree.unflatten(treedef, [np.stack(col) for col in zip(*columns)])


@partial(jax.jit, static_argnums=(0, 1))
def _fused(merge_fn, eval_fn, chunk, posteriors, batch):
  """Merge and evaluate one chunk of alphas in one compiled call (cached per (merge_fn, eval_fn) and shapes)."""
  params = merge_fn(posteriors, chunk)
  return jax.vmap(eval_fn, in_axes=(0, None))(params, batch)


def clear_cache() -> None:
  """Forgets the compiled fused previews, so the next `preview` compiles (and is charged) its own.

  Returns:
    None.

  Example:
    >>> from bmerge.grid import evaluate
    >>> evaluate.clear_cache()
  """
  _fused.clear_cache()


def _hashable(f) -> bool:
  try:
    hash(f)
    return True
  except TypeError:
    return False


def _rule_name(fn: Any) -> str:
  """A readable default tag for a merge rule: its function name (that of a partial's or a jit's function)."""
  while True:
    if isinstance(fn, partial):
      fn = fn.func
    elif getattr(fn, "__wrapped__", None) is not None:
      fn = fn.__wrapped__
    else:
      break
  name = getattr(fn, "__name__", type(fn).__name__)
  name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "rule"
  return f"preview_{name}"


def compute_dtype() -> jnp.dtype:
  """float32, or float64 when `jax_enable_x64` is on: the dtype alphas and merges are computed in.

  Returns:
    A numpy dtype.

  Example:
    >>> import jax
    >>> from bmerge import grid
    >>> grid.compute_dtype() == (jax.numpy.float64 if jax.config.jax_enable_x64 else jax.numpy.float32)
    True
  """
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def preview(merge_fn: Callable[[PyTree, jax.Array], PyTree], posteriors: PyTree, alphas,
            eval_fn: Callable[[PyTree, Any], Any], batch: Any, *, chunk_size: int = 64,
            workdir: Optional[str] = None, tag: Optional[str] = None, progress: bool = True,
            mesh: Optional[Mesh] = None) -> PyTree:
  """The preview: for every alpha, merge the task posteriors and evaluate the merged model (paper Sec. 3, Fig. 1).

  m_g = eval_fn(merge_fn(posteriors, alpha_g), batch) for every row alpha_g of the grid, where the merge is the mode
  of p0^gamma prod_t q_t^alpha_t (Eq. 8) under the rule's posteriors.

  Each chunk of alphas is one compiled call that merges (`merge_fn`) and evaluates (`eval_fn`, `vmap`ped over the
  chunk), so only `chunk_size` merged models exist at once however large the grid.

  Resuming. With a `workdir`, finished chunks are saved as they complete and a later call loads them instead of
  computing them again. They are stored under a content key of everything that determines the results: the posteriors
  (a hash of every array's bytes, shape and dtype), the merge rule (qualified name, code, and the bound arguments of a
  `functools.partial`), `eval_fn` (likewise, with the values its closure captures) and the evaluation batch; each row
  is stored with its alpha. So a call with other posteriors, another rule or another batch never loads these results
  (it computes into a new folder and logs which inputs changed), and a call with other alphas or another
  `chunk_size` reuses every row already computed.

  Args:
    merge_fn: `merge_fn(posteriors, alphas [C, T]) -> params with a leading C axis`, e.g.
      `bmerge.merge.hessian_weighted` or `functools.partial(bmerge.merge.mixture_weighted, num_iters=10)`.
    posteriors: the stacked task posteriors (anything `merge_fn` takes; passed as an argument, not baked into the
      compiled function, so large models compile fast).
    alphas: [G, T] grid (e.g. `bmerge.grid.simplex(T, 0.05)`), or one [T] vector (the result then has no G axis).
      Computed in float32 (float64 under `jax_enable_x64`) whatever the params' dtype.
    eval_fn: `eval_fn(params, batch) -> metric`, a scalar, a vector (e.g. per-task accuracies) or any pytree; jittable.
      Functions a closure calls are identified by name; global values `eval_fn` reads are not part of the resume key,
      so pass them in `batch` or bind them with `functools.partial`.
    batch: the evaluation data, passed to every `eval_fn` call.
    chunk_size: the most alphas merged and evaluated per compiled call (memory ~ chunk_size merged models); the
      grid is spread evenly over the calls, so a few rows at most are padded.
    workdir: if given, finished chunks are saved under `<workdir>/<tag>/<key>/` and reused when run again.
    tag: the sub-folder of this preview in `workdir`; default `preview_<rule name>`.
    progress: show a tqdm progress bar.
    mesh: for a model too big for one device, a `jax.sharding.Mesh` with axes ("grid", "model"): every chunk of
      alphas is split along "grid" and every posterior array along "model" (its largest axis that the "model" size
      divides), so each device holds a slice of the model; the results equal those on one device. Default: the
      alphas split across all devices, the posteriors replicated. On several hosts, call
      `jax.distributed.initialize()` first on every host and build the mesh from `jax.devices()` (all hosts'
      devices); every host runs the same program.

  Returns:
    The metrics with a leading G axis, as numpy arrays.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import bmerge
    >>> q = bmerge.stack([bmerge.DiagGaussian({"w": jnp.array([0.0, 1.0])}, {"w": jnp.array([1.0, 1.0])}),
    ...                   bmerge.DiagGaussian({"w": jnp.array([2.0, 1.0])}, {"w": jnp.array([3.0, 1.0])})])
    >>> alphas = bmerge.grid.simplex(2, 0.5)                       # (1, 0), (0.5, 0.5), (0, 1)
    >>> distance = lambda params, target: jnp.abs(params["w"][0] - target)
    >>> bmerge.preview(bmerge.merge.hessian_weighted, q, alphas, distance, 2.0, progress=False).tolist()
    [2.0, 0.5, 0.0]
  """
  leaves = jax.tree.leaves(posteriors)
  if not leaves:
    raise ValueError("`posteriors` holds no arrays.")
  if not callable(merge_fn):
    raise TypeError(f"`merge_fn` must be a callable merge_fn(posteriors, alphas), got {type(merge_fn).__name__}.")
  if not callable(eval_fn):
    raise TypeError(f"`eval_fn` must be a callable eval_fn(params, batch), got {type(eval_fn).__name__}.")
  if workdir is not None:
    _checks.workdir(workdir)
  a = np.asarray(alphas)
  single = a.ndim == 1
  if single:
    a = a[None]
  if a.ndim != 2:
    raise ValueError(f"`alphas` must be a [G, T] grid or one [T] vector, got shape {a.shape}.")
  _checks.alphas(a, a.shape[1])
  a = a.astype(compute_dtype())
  # Inside the compiled chunk the merge rule sees tracers and skips its value checks (sums to one, positive
  # precisions). Run it once eagerly on the row farthest from the simplex so bad input fails here, clearly, with
  # errors naming that row's index in the grid.
  worst = int(np.argmax(np.abs(a.astype(np.float64).sum(axis=1) - 1.0)))
  with _checks.row_offset(worst):
    jax.block_until_ready(merge_fn(posteriors, a[worst:worst + 1]))

  if _hashable(merge_fn) and _hashable(eval_fn):  # the usual case: compiled once per (merge_fn, eval_fn, shapes)
    fused = partial(_fused, merge_fn, eval_fn)
  else:
    fused = jax.jit(partial(_fused.__wrapped__, merge_fn, eval_fn))
  tag = _rule_name(merge_fn) if tag is None else tag
  if mesh is not None:
    mesh = _sharding.check_mesh(mesh)
    posteriors = _sharding.shard_params(posteriors, mesh)
    batch = _sharding.replicate(batch, mesh)
  inputs = {"merge_fn": merge_fn, "posteriors": posteriors, "eval_fn": eval_fn, "batch": batch} if workdir else None
  out = chunked_map(lambda chunk: fused(chunk, posteriors, batch), a, chunk_size=chunk_size, workdir=workdir, tag=tag,
                    inputs=inputs, progress=progress, description=f"preview {tag}", mesh=mesh)
  return jax.tree.map(lambda x: x[0], out) if single else out
