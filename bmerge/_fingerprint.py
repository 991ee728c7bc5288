"""Content fingerprints of everything that determines a result: arrays by their bytes, functions by name and bindings.

A resumable run (`bmerge.preview`, `bmerge.exact.joint_train`, `bmerge.chunked_map`) stores finished work under a key
made of these fingerprints, so a run with other inputs can never load it. What goes in:

- arrays (numpy, jax, PRNG keys): dtype, shape and a BLAKE2b hash of the bytes;
- pytrees (dicts, lists, tuples, NamedTuples, NNX states, any registered node): the tree structure and every leaf;
- functions: module and qualified name, the compiled code (so an edited lambda differs), default arguments and the
  values captured in closures (hashed the same way, recursively); `functools.partial` objects: the function and
  their bound arguments; `jax.jit`-wrapped functions: the function they wrap;
- callable objects and other values: their type and their attributes (`vars`), to a bounded depth.

Globals a function reads by name are not part of its fingerprint (a module-level constant that changes between runs
is not seen): pass such values as arguments, or bind them with `functools.partial`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import types
from typing import Any, Mapping

import jax
import numpy as np

_MAX_DEPTH = 6
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # '<function f at 0x7f...>' -> '<function f>'


def _h() -> "hashlib._Hash":
  return hashlib.blake2b(digest_size=16)


def _array(h, x) -> None:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    h.update(f"key<{jax.random.key_impl(x)}>".encode())
    x = jax.random.key_data(x)
  arr = np.ascontiguousarray(np.asarray(x))
  h.update(f"array|{arr.dtype.str}|{arr.shape}|".encode())
  h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _update(h, value: Any, depth: int, seen: set) -> None:
  """Feeds `value` into the hash `h` (recursively, bounded by depth and by cycles)."""
  if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
    h.update(f"{type(value).__name__}|{value!r}|".encode())
    return
  if _is_array(value):
    _array(h, value)
    return
  if depth > _MAX_DEPTH or id(value) in seen:
    h.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())
    return
  seen = seen | {id(value)}
  if isinstance(value, functools.partial):
    h.update(b"partial|")
    _update(h, value.func, depth + 1, seen)
    _update(h, value.args, depth + 1, seen)
    _update(h, dict(sorted(value.keywords.items())), depth + 1, seen)
    return
  if isinstance(value, types.MethodType):
    h.update(b"method|")
    _update(h, value.__func__, depth + 1, seen)
    _update(h, value.__self__, depth + 1, seen)
    return
  if isinstance(value, types.FunctionType):
    _function(h, value, depth, seen)
    return
  if isinstance(value, types.ModuleType):
    h.update(f"module|{value.__name__}|".encode())
    return
  if isinstance(value, type):
    h.update(f"type|{value.__module__}.{value.__qualname__}|".encode())
    return
  wrapped = getattr(value, "__wrapped__", None)  # jax.jit, functools.wraps and similar wrappers
  if wrapped is not None and callable(value):
    h.update(f"wrapped|{type(value).__qualname__}|".encode())
    _update(h, wrapped, depth + 1, seen)
    return
  if hasattr(value, "to_dict") and callable(value.to_dict) and type(value).__module__.startswith("ml_collections"):
    value = value.to_dict()
  if isinstance(value, dict):
    h.update(f"mapping|{type(value).__qualname__}|{len(value)}|".encode())
    for k in sorted(value, key=repr):
      _update(h, k, depth + 1, seen)
      _update(h, value[k], depth + 1, seen)
    return
  if isinstance(value, (list, tuple, set, frozenset)) and not hasattr(type(value), "_fields"):
    items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    h.update(f"{type(value).__name__}|{len(items)}|".encode())
    for v in items:
      _update(h, v, depth + 1, seen)
    return
  leaves, treedef = jax.tree_util.tree_flatten(value)
  if not (len(leaves) == 1 and leaves[0] is value):  # a pytree node (NamedTuple, NNX state, registered class)
    # Static data may print functions with their addresses (NNX graphdefs do), which change from run to run.
    h.update(f"tree|{_ADDRESS.sub('', str(treedef))}|".encode())
    for leaf in leaves:
      _update(h, leaf, depth + 1, seen)
    return
  # Any other object: its type and its attributes.
  h.update(f"object|{type(value).__module__}.{type(value).__qualname__}|".encode())
  attrs = getattr(value, "__dict__", None)
  if attrs:
    _update(h, {k: v for k, v in attrs.items() if not k.startswith("__")}, depth + 1, seen)


def _function(h, fn: types.FunctionType, depth: int, seen: set) -> None:
  h.update(f"function|{fn.__module__}|{fn.__qualname__}|".encode())
  _code(h, fn.__code__)
  _update(h, fn.__defaults__, depth + 1, seen)
  _update(h, fn.__kwdefaults__, depth + 1, seen)
  for cell in fn.__closure__ or ():
    try:
      contents = cell.cell_contents
    except ValueError:  # an empty cell (a name bound later)
      contents = "<empty cell>"
    _update(h, contents, depth + 1, seen)


def _code(h, code: types.CodeType) -> None:
  h.update(code.co_code)
  h.update(repr(code.co_names).encode())
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      _code(h, const)
    else:
      h.update(repr(const).encode())


def fingerprint(value: Any) -> str:
  """A 32-hex-digit content hash of `value` (arrays, pytrees, functions, partials, configs; see the module doc)."""
  h = _h()
  _update(h, value, 0, frozenset())
  return h.hexdigest()


def fingerprints(inputs: Mapping[str, Any]) -> dict[str, str]:
  """`{name: fingerprint(value)}` for every named input, in the order given."""
  return {str(k): fingerprint(v) for k, v in inputs.items()}


def combine(parts: Mapping[str, str]) -> str:
  """One hash of named fingerprints (order-independent)."""
  h = _h()
  for k in sorted(parts):
    h.update(f"{k}={parts[k]};".encode())
  return h.hexdigest()
