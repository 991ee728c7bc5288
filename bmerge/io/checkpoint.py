"""The one orbax adapter: posteriors, result arrays, and a content-keyed cache of built values with their costs.

A checkpoint is one orbax directory with two items, written together by `ocp.Checkpointer(CompositeCheckpointHandler)`:

* `state`: the array leaves, as a flat dict {"000000": leaf, ...} in the order of `jax.tree.leaves` (flat keys, so
  params names with dots or slashes never meet orbax's path rules);
* `bmerge`: JSON with the tree structure (dicts in their insertion order, lists, tuples, NamedTuples by import path,
  None), each leaf's dtype, shape and kind (jax array, numpy array, numpy scalar, Python scalar) and the user's
  metadata.

So `restore_*` needs no target: it rebuilds the exact pytree, with the exact dtypes and shapes (bfloat16 and float64
included; zero-size leaves are kept in the JSON only, as orbax refuses to write them).

Atomicity: orbax writes into `<path>.orbax-checkpoint-tmp` and renames it to `<path>` only after every item is written
and flushed, so `<path>` either holds a whole checkpoint or does not exist; a crash leaves only the tmp directory,
which the next save to the same path removes. `save_*(..., overwrite=True)` deletes an existing `<path>` first
(orbax's `force`): a crash then can lose the old checkpoint but never leaves a half one. Multi-host: call on every
host, as any orbax save.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bmerge import _fingerprint
from bmerge import timing
from bmerge.posteriors import Beta
from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import FullGaussian
from bmerge.posteriors import IsoGaussian
from bmerge.posteriors import Mixture

__all__ = [
    "Cached",
    "cached",
    "cached_call",
    "cached_posterior",
    "config_fingerprint",
    "restore_arrays",
    "restore_posterior",
    "save_arrays",
    "save_posterior",
    "timed",
]

_log = logging.getLogger(__name__)

_FORMAT = "bmerge.checkpoint/1"
_POSTERIOR_TYPES = (IsoGaussian, DiagGaussian, FullGaussian, Mixture, Beta)
_TMP_SUFFIX = ".orbax-checkpoint-tmp"

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------------------
# Pytree <-> (JSON spec, flat leaves). Written out explicitly because a jax treedef has no stable serialisation.


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _leaf_spec(x: Any, where: str) -> tuple[dict, np.ndarray | jax.Array]:
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise TypeError(f"{where} is a PRNG key array; save `jax.random.key_data(key)` instead.")
    kind, arr = "jax", x
  elif isinstance(x, np.ndarray):
    kind, arr = "numpy", x
  elif isinstance(x, np.generic):
    kind, arr = "numpy_scalar", np.asarray(x)
  elif isinstance(x, (bool, int, float, complex)):
    kind, arr = "python", np.asarray(x)
  else:
    raise TypeError(f"{where} is a {type(x).__module__}.{type(x).__qualname__}; expected an array, a numpy or Python "
                    "scalar, or a dict / list / tuple / NamedTuple / NNX State / None of those.")
  if arr.dtype == object:
    raise TypeError(f"{where} is an object array; expected a numeric array.")
  return {"kind": kind, "dtype": jnp.dtype(arr.dtype).name, "shape": list(arr.shape)}, arr


def _nnx():
  """flax.nnx if the user's program imported it (an NNX state can only come from there), else None."""
  return sys.modules.get("flax.nnx")


def _encode(tree: Any, where: str, specs: list, leaves: list) -> dict:
  """Appends the leaves of `tree` to `leaves` (their specs to `specs`) and returns the JSON structure of `tree`."""
  if tree is None:
    return {"none": True}
  nnx = _nnx()
  if nnx is not None and isinstance(tree, nnx.State):
    # raw_mapping keeps nested levels as they are (plain dicts inside an nnx.split state), so the tree structure
    # restored is the one saved.
    items = [[str(k), _encode(v, f"{where}[{k!r}]", specs, leaves)] for k, v in tree.raw_mapping.items()]
    return {"nnx_state": items}
  if nnx is not None and isinstance(tree, nnx.Variable):
    if isinstance(tree, nnx.RngState):
      raise TypeError(f"{where} is an NNX RNG variable; save only the parameters: `graphdef, params, rest = "
                      "nnx.split(model, nnx.Param, ...)`.")
    cls = type(tree)
    return {"nnx_variable": f"{cls.__module__}:{cls.__qualname__}", "metadata": _json_metadata(tree),
            "value": _encode(tree.get_value(), f"{where}.value", specs, leaves)}
  if type(tree) is dict:  # pylint: disable=unidiomatic-typecheck
    items = []
    for key, value in tree.items():
      if not isinstance(key, str):
        raise TypeError(f"{where} has the key {key!r}; dict keys must be str (as in Flax params).")
      items.append([key, _encode(value, f"{where}[{key!r}]", specs, leaves)])
    return {"dict": items}
  if _is_namedtuple(tree):
    cls = type(tree)
    fields = [[f, _encode(getattr(tree, f), f"{where}.{f}", specs, leaves)] for f in cls._fields]
    return {"namedtuple": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
  if type(tree) in (list, tuple):
    kind = type(tree).__name__
    return {kind: [_encode(v, f"{where}[{i}]", specs, leaves) for i, v in enumerate(tree)]}
  spec, arr = _leaf_spec(tree, where)
  spec["index"] = len(leaves)
  specs.append(spec)
  leaves.append(arr)
  return {"leaf": spec["index"]}


def _json_metadata(variable) -> dict:
  meta = variable.get_metadata()
  try:
    json.dumps(meta)
  except (TypeError, ValueError):
    meta = {k: v for k, v in meta.items() if isinstance(v, (bool, int, float, str, type(None)))}
  return meta


def _import_qualified(qualified: str, where: str) -> Any:
  module_name, _, qualname = qualified.partition(":")
  try:
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{where}: cannot import the type {qualified!r} the checkpoint was saved with.") from e
  return obj


def _import_namedtuple(qualified: str, where: str) -> type:
  obj = _import_qualified(qualified, where)
  if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
    raise ValueError(f"{where}: {qualified!r} is not a NamedTuple type.")
  return obj


def _decode(node: dict, leaves: list, where: str) -> Any:
  if "none" in node:
    return None
  if "leaf" in node:
    return leaves[node["leaf"]]
  if "dict" in node:
    return {k: _decode(v, leaves, where) for k, v in node["dict"]}
  if "list" in node:
    return [_decode(v, leaves, where) for v in node["list"]]
  if "tuple" in node:
    return tuple(_decode(v, leaves, where) for v in node["tuple"])
  if "nnx_state" in node:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.State({k: _decode(v, leaves, where) for k, v in node["nnx_state"]}, _copy=False)
  if "nnx_variable" in node:
    cls = _import_qualified(node["nnx_variable"], where)
    return cls(_decode(node["value"], leaves, where), **node.get("metadata", {}))
  if "namedtuple" in node:
    cls = _import_namedtuple(node["namedtuple"], where)
    return cls(**{f: _decode(v, leaves, where) for f, v in node["fields"]})
  raise ValueError(f"{where}: unknown node {sorted(node)} in the stored tree structure.")


def _from_stored(spec: dict, arr: np.ndarray | None) -> Any:
  dtype = jnp.dtype(spec["dtype"])
  shape = tuple(spec["shape"])
  if arr is None:  # zero-size: never written
    arr = np.zeros(shape, dtype)
  arr = np.asarray(arr)
  if arr.dtype != dtype or arr.shape != shape:
    raise ValueError(f"stored leaf {spec['index']} came back as {arr.dtype}{list(arr.shape)}, expected "
                     f"{dtype}{list(shape)}; the checkpoint is damaged.")
  kind = spec["kind"]
  if kind == "jax":
    return jnp.asarray(arr, dtype=dtype)
  if kind == "numpy":
    return arr
  if kind == "numpy_scalar":
    return arr[()]
  if kind == "python":
    return arr.item()
  raise ValueError(f"stored leaf {spec['index']} has unknown kind {kind!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Saving and restoring one tree.


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _key(i: int) -> str:
  return f"{i:06d}"


def _final_path(path: PathLike, name: str = "path") -> pathlib.Path:
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(f"`{name}` must be a non-empty path (str or os.PathLike), got {path!r}.")
  p = pathlib.Path(path).expanduser().absolute()
  if _TMP_SUFFIX in p.name:
    raise ValueError(f"`{name}` = {str(p)!r} is an orbax temporary directory (an unfinished save); use the final path.")
  return p


def _save_tree(path: PathLike, tree: Any, *, kind: str, type_name: str, metadata: Mapping, overwrite: bool,
               where: str) -> pathlib.Path:
  final = _final_path(path)
  if not isinstance(metadata, Mapping):
    raise TypeError(f"`metadata` must be a dict, got {type(metadata).__name__}.")
  try:
    json.dumps(metadata, allow_nan=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`metadata` must be JSON-serialisable (str keys, numbers, strings, lists, dicts): {e}") from e
  if final.exists() and not overwrite:
    raise FileExistsError(f"`path` = {str(final)!r} already exists; pass overwrite=True to replace it.")
  specs, leaves = [], []
  structure = _encode(tree, where, specs, leaves)
  state = {_key(s["index"]): a for s, a in zip(specs, leaves) if int(np.prod(s["shape"])) > 0}
  info = {"format": _FORMAT, "kind": kind, "type": type_name, "structure": structure, "leaves": specs,
          "metadata": dict(metadata)}
  items = {"bmerge": ocp.args.JsonSave(info)}
  if state:  # orbax refuses an empty pytree; a tree of zero-size leaves lives in the JSON alone
    items["state"] = ocp.args.PyTreeSave(state)
  final.parent.mkdir(parents=True, exist_ok=True)
  with _checkpointer() as ckpt:
    ckpt.save(final, args=ocp.args.Composite(**items), force=overwrite)
  return final


def _restore_tree(path: PathLike, kind: str) -> tuple[Any, dict]:
  final = _final_path(path)
  if not final.is_dir():
    raise FileNotFoundError(f"`path` = {str(final)!r} is not a checkpoint directory (it does not exist).")
  if not (final / "bmerge").is_dir():
    raise ValueError(f"`path` = {str(final)!r} is not a bmerge checkpoint (no `bmerge` item).")
  with _checkpointer() as ckpt:
    info = ckpt.restore(final, args=ocp.args.Composite(bmerge=ocp.args.JsonRestore()))["bmerge"]
    if info.get("format") != _FORMAT:
      raise ValueError(f"`path` = {str(final)!r} has format {info.get('format')!r}, expected {_FORMAT!r}.")
    if info["kind"] != kind:
      raise ValueError(f"`path` = {str(final)!r} holds {info['kind']}, not {kind}; use restore_{info['kind']}.")
    specs = info["leaves"]
    stored = [s for s in specs if int(np.prod(s["shape"])) > 0]
    state = {}
    if stored:
      restore_args = {_key(s["index"]): ocp.RestoreArgs(restore_type=np.ndarray) for s in stored}
      state = ckpt.restore(final, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(restore_args=restore_args)))["state"]
  leaves = [_from_stored(s, state.get(_key(s["index"]))) for s in specs]
  return _decode(info["structure"], leaves, f"`path` = {str(final)!r}"), info


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def save_posterior(path: PathLike, posterior, metadata: Mapping | None = None, *,
                   overwrite: bool = False) -> pathlib.Path:
  """Saves a posterior (any of the `bmerge.posteriors` types, stacked or not) with JSON metadata, atomically.

  The means and precisions may be any params pytree of dicts, lists, tuples and NamedTuples (e.g. Flax Linen params);
  `restore_posterior` gives back the same type, structure, dtypes, shapes and array kinds (jax vs numpy).

  Args:
    path: the checkpoint directory to create.
    posterior: an `IsoGaussian`, `DiagGaussian`, `FullGaussian`, `Mixture` (with nested components) or `Beta`.
    metadata: a JSON-serialisable dict stored alongside (tuples come back as lists, as in JSON).
    overwrite: replace an existing checkpoint at `path` (otherwise `FileExistsError`).

  Returns:
    The absolute path written.
  """
  if not isinstance(posterior, _POSTERIOR_TYPES):
    raise TypeError(f"`posterior` must be one of {[t.__name__ for t in _POSTERIOR_TYPES]}, "
                    f"got {type(posterior).__name__}.")
  return _save_tree(path, posterior, kind="posterior", type_name=type(posterior).__name__,
                    metadata={} if metadata is None else metadata, overwrite=overwrite, where="`posterior`")


def restore_posterior(path: PathLike) -> tuple[Any, dict]:
  """Restores `(posterior, metadata)` saved by `save_posterior`; no target structure needed.

  Leaves saved as jax arrays come back as jax arrays on the default device (reshard with `jax.device_put`), numpy
  leaves as numpy arrays.
  """
  posterior, info = _restore_tree(path, "posterior")
  if type(posterior).__name__ != info["type"]:
    raise ValueError(f"`path` = {os.fspath(path)!r}: restored a {type(posterior).__name__}, expected {info['type']}.")
  return posterior, info["metadata"]


def save_arrays(path: PathLike, arrays: Mapping[str, Any], *, overwrite: bool = False) -> pathlib.Path:
  """Saves a dict of result arrays (nested dicts allowed; e.g. alphas, preview and exact surfaces) atomically.

  Returns:
    The absolute path written.
  """
  if type(arrays) is not dict:  # pylint: disable=unidiomatic-typecheck
    raise TypeError(f"`arrays` must be a dict of name -> array, got {type(arrays).__name__}.")
  return _save_tree(path, arrays, kind="arrays", type_name="dict", metadata={}, overwrite=overwrite, where="`arrays`")


def restore_arrays(path: PathLike) -> dict:
  """Restores the dict saved by `save_arrays`, with the same keys, dtypes and shapes."""
  return _restore_tree(path, "arrays")[0]


def _jsonable(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _config_dict(config: Any) -> dict:
  if hasattr(config, "to_dict") and callable(config.to_dict):  # ml_collections.ConfigDict / FrozenConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"`config` must be a dict or an ml_collections ConfigDict, got {type(config).__name__}.")
  return dict(config)


def config_fingerprint(config: Any) -> str:
  """A stable hash of a configuration: sha256 of its canonical JSON (keys sorted at every level, no whitespace).

  Equal for dicts that differ only in key order; different when any value differs. Tuples hash like lists and numpy
  scalars like Python numbers (as JSON sees them).

  Args:
    config: a JSON-serialisable dict, or an ml_collections `ConfigDict` (its `to_dict()` is used).

  Returns:
    64 lowercase hex characters.
  """
  config = _config_dict(config)
  try:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_jsonable)
  except (TypeError, ValueError) as e:
    raise ValueError(f"`config` must be JSON-serialisable with str keys: {e}") from e
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Cached(NamedTuple):
  """What `cached` returns: the value and the honest cost of building it, wherever and whenever it was built."""

  value: Any  # what build_fn returned (or its restored copy: same structure, dtypes and shapes)
  seconds: float  # run seconds of the build without compilation, measured when it ran (never the time to load it)
  loaded: bool  # True when restored from the cache, False when built by this call
  machine: dict  # `bmerge.timing.machine()` of the build: hostname, cpu, backend, devices, date, run
  compile_seconds: float = 0.0  # tracing and compiling during the build

  def cost(self, stage: str) -> timing.Cost:
    """The build's cost as a `bmerge.timing.Cost` (one row, computed here or loaded), e.g. for `bmerge.compare`."""
    return timing.Cost(stage, self.seconds, 0.0 if self.loaded else self.compile_seconds, int(not self.loaded),
                       int(self.loaded), self.machine["run"], self.machine)


def _check_name(name: Any) -> None:
  if not isinstance(name, str) or not name or any(c in name for c in "/\\") or name in (".", ".."):
    raise ValueError(f"`name` must be a non-empty file name without path separators, got {name!r}.")


def cached(path_dir: PathLike, name: str, inputs: Any, build_fn: Callable[[], Any]) -> Cached:
  """`build_fn()` keyed by the content of `inputs`: restored if built before for the same inputs, else built and saved.

  The key is `bmerge._fingerprint.fingerprint(inputs)`: configs (dicts, ConfigDicts) by their values, numpy and jax
  arrays (PRNG keys included) by dtype, shape and bytes, functions by qualified name, code, defaults and closure
  values, `functools.partial` objects by their bound arguments. So a changed config value, data set (one element is
  enough), seed or bound argument misses the cache and builds again, and the old entry stays (switching back is free).
  Pass in `inputs` everything `build_fn` depends on; globals it reads by name are not seen.

  On a miss the build runs under `bmerge.timing.stopwatch()`, `jax.block_until_ready` waits for its arrays, and its
  run seconds (wall time minus compilation) and compile seconds are stored with the value in
  `path_dir/<name>-<first 16 hex of the fingerprint>` (an orbax checkpoint, written atomically), with the full
  fingerprint and `bmerge.timing.machine()` (hostname, CPU, backend, devices, date, run id). On a hit the value is
  restored and the *stored* seconds and machine are returned with `loaded=True`: a resumed run reports what the build
  cost where it ran, never the time to load it. A build that itself resumes saved work (`bmerge.exact.joint_train`
  with a workdir) is timed for what it computed in this call.

  Args:
    path_dir: directory holding the cache.
    name: what the value is, e.g. "task0-ivon"; letters, digits, `-`, `_`, `.` (a file name).
    inputs: anything that determines the value; e.g. `{"config": config, "x": train_x, "seed": 0}`.
    build_fn: `() -> value`, a pytree of arrays (posteriors, dicts, NamedTuples, NNX states), called only on a miss.

  Returns:
    `Cached(value, seconds, loaded, machine)`.

  Example:
    >>> import tempfile
    >>> x = np.arange(3.0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   first = cached(d, "double", {"x": x, "scale": 2}, lambda: {"y": 2 * x})
    ...   again = cached(d, "double", {"x": x, "scale": 2}, lambda: {"y": 2 * x})
    ...   changed = cached(d, "double", {"x": x + [0, 0, 1], "scale": 2}, lambda: {"y": 2 * x})
    >>> first.loaded, again.loaded, changed.loaded, again.seconds == first.seconds
    (False, True, False, True)
    >>> again.value["y"].tolist()
    [0.0, 2.0, 4.0]
  """
  _check_name(name)
  if not callable(build_fn):
    raise TypeError(f"`build_fn` must be a callable () -> value, got {type(build_fn).__name__}.")
  key = _fingerprint.fingerprint(inputs)
  path = _final_path(path_dir, "path_dir") / f"{name}-{key[:16]}"
  if path.is_dir():
    value, info = _restore_tree(path, "cached")
    meta = info["metadata"]
    if meta.get("fingerprint") != key:
      raise ValueError(f"`path_dir` holds {str(path)!r} for fingerprint {meta.get('fingerprint')!r}, not {key!r}; "
                       "remove it.")
    _log.info("cached: restored %s (built in %.2f s on %s)", path, meta["seconds"], meta["machine"]["hostname"])
    return Cached(value, float(meta["seconds"]), True, meta["machine"], float(meta["compile_seconds"]))
  with timing.stopwatch() as watch:
    value = jax.block_until_ready(build_fn())
  built = Cached(value, watch.wall - watch.compile_seconds, False, timing.machine(), watch.compile_seconds)
  if not path.exists():  # another process may have finished the same build meanwhile
    parts = _fingerprint.fingerprints(inputs) if isinstance(inputs, Mapping) else {}
    meta = {"name": name, "fingerprint": key, "inputs": parts, "seconds": built.seconds,
            "compile_seconds": built.compile_seconds, "machine": built.machine}
    _save_tree(path, value, kind="cached", type_name=type(value).__name__, metadata=meta, overwrite=False,
               where="the value of `build_fn`")
    _log.info("cached: built and saved %s", path)
  return built


def cached_call(path_dir: PathLike, name: str, fn: Callable[..., Any], *args: Any) -> Cached:
  """`fn(*args)` through `cached`, keyed by the content of `fn` and of `args`.

  The key holds `fn`'s qualified name, code, defaults and closure values (a `jax.jit` or `jax.vmap` wrapper by the
  function it wraps, a `functools.partial` by its bound arguments) and every argument's content (arrays by their
  bytes, PRNG keys by their key data), so settings closed over by `fn` and data passed to it both count.

  Example:
    >>> import tempfile
    >>> scale = lambda s: (lambda x: s * x)
    >>> with tempfile.TemporaryDirectory() as d:
    ...   first = cached_call(d, "scaled", scale(2.0), np.ones(2))
    ...   again = cached_call(d, "scaled", scale(2.0), np.ones(2))
    ...   other = cached_call(d, "scaled", scale(3.0), np.ones(2))
    >>> first.loaded, again.loaded, other.loaded, other.value.tolist()
    (False, True, False, [3.0, 3.0])
  """
  if not callable(fn):
    raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
  return cached(path_dir, name, {"fn": fn, "args": args}, lambda: fn(*args))


def cached_posterior(path_dir: PathLike, name: str, inputs: Any, build_fn: Callable[[], Any]):
  """`cached(path_dir, name, inputs, build_fn).value`: the posterior alone, for callers that keep no costs."""
  return cached(path_dir, name, inputs, build_fn).value


def timed(costs: dict, name: str, fn: Callable[[], Any]) -> Any:
  """Runs `fn()`, waits for its arrays (`jax.block_until_ready`) and adds its run seconds to `costs[name]`.

  Run seconds are the wall time minus JAX's compilation during the call (`bmerge.timing.stopwatch`), as for every
  stage's cost. For stages with no cache of their own (figures, tokenisation); cached builds carry their stored cost
  in `Cached.seconds` instead.

  Example:
    >>> costs = {}
    >>> timed(costs, "sum", lambda: int(np.arange(4).sum())), sorted(costs)
    (6, ['sum'])
  """
  with timing.stopwatch() as watch:
    out = jax.block_until_ready(fn())
  costs[name] = costs.get(name, 0.0) + watch.wall - watch.compile_seconds
  return out
