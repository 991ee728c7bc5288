"""Input validation at the public boundary, run once in Python before anything is traced or compiled.

Every error names the argument and says what was expected. Value checks (signs, finiteness) run only on concrete
arrays: under a user's `jit` the inputs are tracers and are assumed valid, as inside the library.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmerge import posteriors as post
from bmerge.posteriors import DiagGaussian, FullGaussian, IsoGaussian


# Row numbers in error messages are offset by this much: `bmerge.preview` checks one row of its grid at a time and
# the error must name that row's index in the user's grid.
_ROW_OFFSET = contextvars.ContextVar("row_offset", default=0)


@contextlib.contextmanager
def row_offset(offset: int):
  """Within the block, errors about rows of `alphas` report row `i + offset`."""
  token = _ROW_OFFSET.set(int(offset))
  try:
    yield
  finally:
    _ROW_OFFSET.reset(token)


def _row(i) -> int:
  return int(i) + _ROW_OFFSET.get()


def optional_import(module: str, extra: str, purpose: str, package: str | None = None):
  """Imports `module`, a dependency of an optional part of bmerge, or says which extra installs it.

  The core install (`pip install bmerge`) brings what the library needs; data sets and experiments need
  `bmerge[experiments]`, the tokenizer of the pretrained transformers `bmerge[text]`.

  Args:
    module: the module to import, e.g. "sklearn.model_selection".
    extra: the extra of bmerge that installs it, e.g. "experiments".
    purpose: what needs it, for the message, e.g. "bmerge.data.load('digits')".
    package: the distribution's name when it differs from the module's top level (e.g. "scikit-learn").

  Returns:
    The imported module.

  Example:
    >>> from bmerge import _checks
    >>> _checks.optional_import("json", "experiments", "an example").dumps([1])
    '[1]'
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    name = package or module.split(".")[0]
    raise ImportError(f"{purpose} needs the package {name!r}, which the core install of bmerge does not bring: "
                      f"pip install 'bmerge[{extra}]'") from e


def sha256(data: bytes, expected: str, name: str) -> None:
  """Checks that a shipped or downloaded file is the one bmerge was tested with: its SHA-256 must be `expected`.

  Args:
    data: the file's bytes.
    expected: the SHA-256 hex digest (64 lowercase hex digits).
    name: the file, for the message (a path, or a package resource).

  Raises:
    ValueError: naming the file, the expected and the actual digest.

  Example:
    >>> from bmerge import _checks
    >>> abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2's test vector
    >>> _checks.sha256(b"abc", abc, "abc.txt")
    >>> _checks.sha256(b"abd", abc, "abd.txt")
    Traceback (most recent call last):
    ValueError: abd.txt has SHA-256 a52d159f..., expected ba7816bf...
  """
  actual = hashlib.sha256(data).hexdigest()
  if actual != expected:
    raise ValueError(f"{name} has SHA-256 {actual}, expected {expected}: it is not the file bmerge was tested with "
                     "(a changed release of the package that ships it, or a damaged download).")


def is_concrete(x: Any) -> bool:
  """True unless `x` is a tracer (value checks run only on concrete values)."""
  return not isinstance(x, jax.core.Tracer)


def integer(value: Any, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
  """The one rule for integer arguments: a Python or numpy integer (never a bool or a float) in [minimum, maximum]."""
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum and (
      maximum is None or value <= maximum)
  if not ok:
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    if maximum is not None:
      what = f"an integer in [{minimum}, {maximum}]"
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")
  return int(value)


def positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
  """`integer` > 0 (>= 0 with `allow_zero`)."""
  return integer(value, name, minimum=0 if allow_zero else 1)


def workdir(value: Any, name: str = "workdir") -> str:
  """A path to a directory (created later if missing); an existing file there is an error naming the argument."""
  if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
    raise TypeError(f"`{name}` must be a path (str or os.PathLike) to a directory, got {value!r}.")
  path = os.fspath(value)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"`{name}` = {path!r} is a file, not a directory; give a directory (created if missing).")
  return path


def _leaves_concrete(tree: Any) -> bool:
  return all(is_concrete(x) for x in jax.tree.leaves(tree))


def alphas(value: Any, num_tasks: int, *, name: str = "alphas") -> tuple[Any, bool]:
  """Checks a grid [G, T] (or one vector [T]); returns it as [G, T] and whether the input was a single vector.

  Example:
    >>> import numpy as np
    >>> from bmerge import _checks
    >>> a, single = _checks.alphas(np.array([0.5, 0.5]), 2)
    >>> a.shape, single
    ((1, 2), True)
    >>> _checks.alphas(np.array([[0.5, -0.5]]), 2)
    Traceback (most recent call last):
    ...
    ValueError: `alphas` must be non-negative; row 0 has -0.5 at task 1.
  """
  if is_concrete(value):
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number):
      raise TypeError(f"`{name}` must be numeric, got dtype {arr.dtype}.")
  else:
    arr = value
  if arr.ndim not in (1, 2):
    raise ValueError(f"`{name}` must have shape [G, T] or [T] with T = {num_tasks} tasks, got shape {tuple(arr.shape)}.")
  single = arr.ndim == 1
  if single:
    arr = arr[None, :]
  if arr.shape[1] != num_tasks:
    raise ValueError(f"`{name}` has {arr.shape[1]} weights per row but the posteriors stack T = {num_tasks} tasks; "
                     f"expected shape [G, {num_tasks}], got {tuple(arr.shape)}.")
  if arr.shape[0] == 0:
    raise ValueError(f"`{name}` is an empty grid (G = 0); expected at least one row of {num_tasks} weights.")
  if is_concrete(arr):
    if not np.all(np.isfinite(arr)):
      bad = np.argwhere(~np.isfinite(arr))[0]
      raise ValueError(f"`{name}` must be finite; row {_row(bad[0])} has {arr[tuple(bad)]} at task {bad[1]}.")
    if np.any(arr < 0):
      bad = np.argwhere(arr < 0)[0]
      raise ValueError(f"`{name}` must be non-negative; row {_row(bad[0])} has {arr[tuple(bad)]} at task {bad[1]}.")
  return arr, single


def rows_sum_to_one(value: Any, *, name: str = "alphas", what: str = "", atol: float = 1e-5) -> None:
  """Without a prior, gamma = 1 - sum(alpha) must be 0 (paper Eqs. 5-8: the prior carries the weight gamma)."""
  if not is_concrete(value):
    return
  sums = np.asarray(value, dtype=np.float64).sum(axis=1)
  bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
  if bad.size:
    raise ValueError(f"`{name}` row {_row(bad[0])} sums to {sums[bad[0]]:.6g}, not 1. {what}")


def leading(tree: Any, lead: Sequence[int], *, name: str, what: str = "") -> None:
  """Every leaf of `tree` must start with the axes `lead` (e.g. (T,) for a stack of T tasks)."""
  lead = tuple(lead)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = tuple(np.shape(leaf))
    if shape[:len(lead)] != lead:
      raise ValueError(f"`{name}{jax.tree_util.keystr(path)}` has shape {shape}; expected leading axes {lead}"
                       f"{' (' + what + ')' if what else ''}.")


def same_structure(a: Any, b: Any, *, name_a: str, name_b: str, lead_a: int = 0, lead_b: int = 0) -> None:
  """`a` and `b` must be the same pytree with the same leaf shapes after dropping `lead_a` / `lead_b` leading axes."""
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise ValueError(f"`{name_a}` and `{name_b}` must have the same pytree structure; "
                     f"{_first_difference(a, b, name_a, name_b)}.")
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    xs, ys = tuple(np.shape(x))[lead_a:], tuple(np.shape(y))[lead_b:]
    if xs != ys:
      raise ValueError(f"`{name_a}{jax.tree_util.keystr(path)}` has shape {xs} per model but `{name_b}` has {ys} there; "
                       "expected equal shapes.")


def _first_difference(a: Any, b: Any, name_a: str, name_b: str) -> str:
  """Where two pytrees of different structures first differ: the first leaf path of one that the other lacks."""
  pa = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)]
  pb = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(b)]
  i = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
  if i < min(len(pa), len(pb)):
    return f"they first differ at {name_a}{pa[i]} vs {name_b}{pb[i]} (leaf {i}; {len(pa)} and {len(pb)} leaves)"
  if len(pa) != len(pb):
    longer, extra, shorter = (name_a, pa[i], name_b) if len(pa) > len(pb) else (name_b, pb[i], name_a)
    return f"{longer}{extra} has no counterpart in `{shorter}` ({len(pa)} leaves vs {len(pb)})"
  return (f"their leaves have the same paths but their containers differ (e.g. a tuple for a list, a None): "
          f"{jax.tree.structure(a)} vs {jax.tree.structure(b)}")


def positive_finite(tree: Any, *, name: str) -> None:
  """Every entry finite and > 0 (precisions)."""
  if not _leaves_concrete(tree):
    return
  finite(tree, name=name)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.asarray(leaf)
    if np.any(arr <= 0):
      raise ValueError(f"`{name}{jax.tree_util.keystr(path)}` must be > 0 (a precision); its smallest entry is "
                       f"{arr.min():.6g}.")


def finite(tree: Any, *, name: str) -> None:
  if not _leaves_concrete(tree):
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.asarray(leaf)
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"`{name}{jax.tree_util.keystr(path)}` must be finite; it holds {arr[~np.isfinite(arr)].flat[0]}.")


@jax.jit
def _spd_stats(mats):
  """(max |A - A^T|, max |A|, all finite, every Cholesky diagonal > 0) of [N, P, P], one matrix at a time (so the
  check holds one matrix's temporaries, not N: T K precisions of P = 2,000 are a gigabyte)."""

  def one(a):
    diag = jnp.diagonal(jnp.linalg.cholesky(a))  # NaN where not positive definite
    return jnp.max(jnp.abs(a - a.T)), jnp.max(jnp.abs(a)), jnp.all(jnp.isfinite(a)), jnp.all(diag > 0)

  asym, scale, finite, pd = jax.lax.map(one, mats)
  return jnp.max(asym), jnp.max(scale), jnp.all(finite), jnp.all(pd)


def positive_definite(mats: Any, *, name: str) -> None:
  """Symmetric positive definite [..., P, P] matrices, checked by Cholesky in their own precision (float32 by
  default: the precision the merge factorises them in)."""
  if not is_concrete(mats):
    return
  shape = np.shape(mats)
  if len(shape) < 2 or shape[-1] != shape[-2]:
    raise ValueError(f"`{name}` must be square matrices [..., P, P], got shape {shape}.")
  if not np.prod(shape):
    return
  with jax.ensure_compile_time_eval():  # concrete inputs give concrete answers, also while a caller traces
    arr = jnp.asarray(mats)
    if not jnp.issubdtype(arr.dtype, jnp.floating) or arr.dtype.itemsize < 4:
      arr = arr.astype(jnp.float32)
    asym, scale, is_finite, pd = (np.asarray(x) for x in _spd_stats(arr.reshape((-1,) + shape[-2:])))
  if not is_finite:
    raise ValueError(f"`{name}` must be finite.")
  if asym > 1e-5 * max(float(scale), 1e-30):
    raise ValueError(f"`{name}` must be symmetric; max |A - A^T| = {float(asym):.3g}.")
  if not pd:
    raise ValueError(f"`{name}` must be positive definite (a precision matrix); Cholesky failed.")


def prior_as(prior, like, name="prior"):
  """Checks `prior` and returns it as (mean, precision) of the same kind as `like` (DiagGaussian over the params pytree, or FullGaussian over [P])."""
  if isinstance(like, FullGaussian):
    p = jnp.shape(like.mean)[1]
    if isinstance(prior, FullGaussian):
      m0, h0 = prior.mean, prior.precision
      positive_definite(h0, name=f"{name}.precision")
    elif isinstance(prior, (IsoGaussian, DiagGaussian)):
      positive_finite(prior.precision, name=f"{name}.precision")
      m0 = prior.mean
      h0 = jnp.diag(jnp.broadcast_to(jnp.asarray(prior.precision), (p,)))
    else:
      raise TypeError(f"`{name}` must be a Gaussian posterior (FullGaussian, DiagGaussian or IsoGaussian), "
                      f"got {type(prior).__name__}.")
    if jnp.shape(m0) != (p,) or jnp.shape(h0) != (p, p):
      raise ValueError(f"`{name}` must have mean [P] = ({p},) and precision [P, P]; got mean {jnp.shape(m0)} and "
                       f"precision {jnp.shape(h0)}.")
    finite(m0, name=f"{name}.mean")
    return jnp.asarray(m0, like.mean.dtype), jnp.asarray(h0, like.mean.dtype)
  if not isinstance(prior, (IsoGaussian, DiagGaussian)):
    raise TypeError(f"`{name}` must be an IsoGaussian or DiagGaussian over the params pytree, got {type(prior).__name__}.")
  same_structure(prior.mean, like.mean, name_a=f"{name}.mean", name_b="posteriors.mean", lead_b=1)
  finite(prior.mean, name=f"{name}.mean")
  positive_finite(prior.precision, name=f"{name}.precision")
  prior = post.as_diag(prior)
  return prior.mean, prior.precision


# ----------------------------------------------------------------------------------------------------------------
# Concrete numeric arrays of metrics and grids (bmerge.metrics, bmerge.plot, bmerge.compare), as float64 numpy.


def numeric(value: Any, name: str) -> np.ndarray:
  """`value` as a float64 numpy array; a TypeError naming `name` unless its dtype is numeric or boolean."""
  arr = np.asarray(value)
  if arr.dtype == object or not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == bool):
    raise TypeError(f"`{name}` must be a numeric array, got dtype {arr.dtype}.")
  return arr.astype(np.float64)


def vector(value: Any, name: str, *, size: int | None = None, size_of: str = "",
           what: str = "[G] (one value per grid point)") -> np.ndarray:
  """A non-empty, finite 1-D float64 array; of `size` entries (the G of the argument `size_of`) when given."""
  arr = numeric(value, name)
  if arr.ndim != 1:
    raise ValueError(f"`{name}` must have shape {what}, got shape {arr.shape}.")
  if arr.shape[0] == 0:
    raise ValueError(f"`{name}` is empty; expected at least one value.")
  if size is not None and arr.shape[0] != size:
    raise ValueError(f"`{name}` has {arr.shape[0]} entries but {size_of} has G = {size}; expected shape [{size}].")
  if not np.all(np.isfinite(arr)):
    bad = int(np.flatnonzero(~np.isfinite(arr))[0])
    raise ValueError(f"`{name}` must be finite; entry {bad} is {arr[bad]}.")
  return arr


def matrix(value: Any, name: str, *, rows: int | None = None, rows_of: str = "", what: str = "[G, T]") -> np.ndarray:
  """A finite 2-D float64 array with both sizes positive; of `rows` rows (the G of the argument `rows_of`) when given."""
  arr = numeric(value, name)
  if arr.ndim != 2:
    raise ValueError(f"`{name}` must have shape {what}, got shape {arr.shape}.")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"`{name}` must have shape {what} with both sizes positive; got shape {arr.shape}.")
  if rows is not None and arr.shape[0] != rows:
    raise ValueError(f"`{name}` has {arr.shape[0]} rows but {rows_of} has G = {rows}; expected {rows} rows.")
  if not np.all(np.isfinite(arr)):
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
    raise ValueError(f"`{name}` must be finite; entry {bad} is {arr[bad]}.")
  return arr


def flag(value: Any, name: str) -> bool:
  """A Python or numpy bool (not a truthy number or string)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool, got {value!r}.")
  return bool(value)


def on_simplex(arr: np.ndarray, name: str, *, atol: float = 1e-6) -> None:
  """Rows >= 0 that sum to 1 (points of the probability simplex); the error names the first row that is not."""
  neg = np.flatnonzero(np.any(arr < -atol, axis=1))
  if neg.size:
    raise ValueError(f"`{name}` must be non-negative (points of the simplex); row {_row(neg[0])} is {arr[neg[0]]}.")
  sums = arr.sum(axis=1)
  bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
  if bad.size:
    raise ValueError(f"`{name}` rows must sum to 1 (points of the simplex); row {_row(bad[0])} sums to "
                     f"{sums[bad[0]]:.6g}.")
