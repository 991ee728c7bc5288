"""Content fingerprints of everything that determines a result: arrays by their bytes, functions by name and bindings.

A resumable run (`bmerge.preview`, `bmerge.exact.joint_train`, `bmerge.chunked_map`, `bmerge.checkpoint.cached`)
stores finished work under a key made of these fingerprints, so a run with other inputs can never load it. What goes
in, at any depth (a walk with its own stack, so deep nesting costs no recursion):

- numbers, strings, bytes, None: their type and value;
- arrays (numpy, jax, PRNG keys): dtype, shape and a BLAKE2b hash of the bytes;
- pytrees (dicts, lists, tuples, NamedTuples, NNX states, any registered node): the tree structure and every leaf;
- functions: module and qualified name, the compiled code (so an edited lambda differs), default arguments and the
  values captured in closures; `functools.partial` objects: the function and their bound arguments; bound methods:
  the function and the object; `jax.jit` and other `__wrapped__` wrappers: the function they wrap;
- modules, classes and named globals (builtins, numpy ufuncs, C functions reachable as `module.qualname`): that name;
- other objects: their type and their attributes (`__dict__` and `__slots__`), or, for objects implemented in C
  without attributes, their pickled form (`__reduce_ex__`).

A value met again inside itself (a cycle) is marked as such. An iterator or generator (a data stream: reading it
consumes it) and what none of the rules above can read (a lock, an open file: not picklable, no attributes) raise a
`TypeError` naming the type and where it sits, e.g. `inputs['eval_fn'].<closure lock>`: a fingerprint that skipped
it could load a result it did not make.

Globals a function reads by name are not part of its fingerprint (a module-level constant that changes between runs
is not seen): pass such values as arguments, or bind them with `functools.partial`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
import sys
import types
from collections.abc import Iterator
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["combine", "fingerprint", "fingerprints"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # '<function f at 0x7f...>' -> '<function f>'
_SCALARS = (bool, int, float, complex, str, bytes)


class _Leave:
  """Stack marker: the walk has finished `value` (kept alive so its id cannot be reused while on the path)."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


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


def _code(h, code: types.CodeType) -> None:
  h.update(code.co_code)
  h.update(repr(code.co_names).encode())
  for const in code.co_consts:
    if isinstance(const, types.CodeType):
      _code(h, const)
    else:
      h.update(repr(const).encode())


def _global_name(value) -> str | None:
  """`module.qualname` when that name, imported, is `value` itself (builtins, ufuncs, C functions), else None."""
  module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
  qualname = qualname or getattr(value, "__name__", None)
  if not isinstance(module, str) or not isinstance(qualname, str):
    return None
  try:
    found = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
      found = getattr(found, part)
  except (ImportError, AttributeError):
    return None
  return f"{module}.{qualname}" if found is value else None


def _attributes(value) -> dict:
  """The instance attributes of `value`: `__dict__` and `__slots__`, without dunders (a ufunc's `__qualname__`)."""
  attrs = {}
  for cls in type(value).__mro__:
    slots = cls.__dict__.get("__slots__", ())
    for name in (slots,) if isinstance(slots, str) else slots:
      if name not in ("__dict__", "__weakref__") and hasattr(value, name):
        attrs[name] = getattr(value, name)
  found = getattr(value, "__dict__", None)
  if isinstance(found, Mapping):
    attrs.update(found)
  return {k: v for k, v in attrs.items() if not (k.startswith("__") and k.endswith("__"))}


def _refuse(value, where: str, why: str):
  kind = f"{type(value).__module__}.{type(value).__qualname__}"
  raise TypeError(f"fingerprint: cannot hash the {kind} at {where}: {why}. Keep it out of the inputs (create it inside "
                  "the function, or read it as a global), or pass what determines it (arrays, numbers, strings, a "
                  "config) instead.")


def _children(h, value, where: str) -> list[tuple[Any, str]]:
  """Writes the header of `value` into `h`; returns its children with their places, in order (none for a leaf)."""
  if isinstance(value, functools.partial):
    h.update(b"partial|")
    return ([(value.func, f"{where}.func")] + [(a, f"{where}.args[{i}]") for i, a in enumerate(value.args)]
            + [(value.keywords[k], f"{where}.keywords[{k!r}]") for k in sorted(value.keywords)])
  if isinstance(value, types.MethodType):
    h.update(b"method|")
    return [(value.__func__, f"{where}.__func__"), (value.__self__, f"{where}.__self__")]
  if isinstance(value, types.FunctionType):
    h.update(f"function|{value.__module__}|{value.__qualname__}|".encode())
    _code(h, value.__code__)
    cells = []
    for name, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
      try:
        cells.append((cell.cell_contents, f"{where}.<closure {name}>"))
      except ValueError:  # an empty cell (a name bound later)
        cells.append(("<empty cell>", f"{where}.<closure {name}>"))
    return [(value.__defaults__, f"{where}.__defaults__"), (value.__kwdefaults__, f"{where}.__kwdefaults__")] + cells
  if isinstance(value, types.ModuleType):
    h.update(f"module|{value.__name__}|".encode())
    return []
  if isinstance(value, type):
    h.update(f"type|{value.__module__}.{value.__qualname__}|".encode())
    return []
  wrapped = getattr(value, "__wrapped__", None)  # jax.jit, functools.wraps and similar wrappers
  if wrapped is not None and callable(value):
    h.update(f"wrapped|{type(value).__qualname__}|".encode())
    return [(wrapped, f"{where}.__wrapped__")]
  if isinstance(value, Iterator):  # reading a stream consumes it, and its attributes do not say what it yields
    _refuse(value, where, "an iterator or generator: hash the data it yields (e.g. stacked arrays), not the stream")
  if hasattr(value, "to_dict") and callable(value.to_dict) and type(value).__module__.startswith("ml_collections"):
    value = value.to_dict()
  if isinstance(value, dict):
    h.update(f"mapping|{type(value).__qualname__}|{len(value)}|".encode())
    out = []
    for k in sorted(value, key=repr):
      out += [(k, f"{where}.<key {k!r}>"), (value[k], f"{where}[{k!r}]")]
    return out
  if isinstance(value, (list, tuple, set, frozenset)) and not hasattr(type(value), "_fields"):
    items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    h.update(f"{type(value).__name__}|{len(items)}|".encode())
    return [(v, f"{where}[{i}]") for i, v in enumerate(items)]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(value)
  if not (len(leaves) == 1 and leaves[0][1] is value):  # a pytree node (NamedTuple, NNX state, registered class)
    # Static data may print functions with their addresses (NNX graphdefs do), which change from run to run.
    h.update(f"tree|{_ADDRESS.sub('', str(treedef))}|".encode())
    return [(leaf, f"{where}{jax.tree_util.keystr(path)}") for path, leaf in leaves]
  attrs = _attributes(value)
  if attrs:
    h.update(f"object|{type(value).__module__}.{type(value).__qualname__}|".encode())
    return [(attrs[k], f"{where}.{k}") for k in sorted(attrs)]
  # No attributes: a named global (a builtin, a ufunc), or what pickling would store (its class, C-held state).
  name = _global_name(value)
  if name is not None:
    h.update(f"global|{name}|".encode())
    return []
  try:
    reduced = value.__reduce_ex__(4)
  except Exception as e:  # noqa: BLE001 - whatever stops pickling stops hashing
    _refuse(value, where, f"it has no attributes and cannot be pickled ({e})")
  if isinstance(reduced, str):  # pickled by reference to a global name
    h.update(f"global|{type(value).__module__}.{reduced}|".encode())
    return []
  parts = list(reduced[:3]) + [None if x is None else list(x) for x in reduced[3:5]]  # items iterators, materialised
  h.update(f"reduce|{type(value).__module__}.{type(value).__qualname__}|".encode())
  return [(part, f"{where}.<pickled {i}>") for i, part in enumerate(parts)]


def _update(h, root: Any, where: str) -> None:
  """Feeds `root` and everything it holds into the hash `h`, depth first, with an explicit stack."""
  stack: list[Any] = [(root, where)]
  path: set[int] = set()  # ids of the containers being walked (a value met again among them is a cycle)
  while stack:
    item = stack.pop()
    if isinstance(item, _Leave):
      path.discard(id(item.value))
      h.update(b"end|")
      continue
    value, where = item
    if value is None or isinstance(value, _SCALARS):
      h.update(f"{type(value).__name__}|{value!r}|".encode())
      continue
    if _is_array(value):
      _array(h, value)
      continue
    if id(value) in path:
      h.update(f"cycle|{type(value).__module__}.{type(value).__qualname__}|".encode())
      continue
    children = _children(h, value, where)
    if children:
      path.add(id(value))
      stack.append(_Leave(value))
      stack.extend(reversed(children))


def fingerprint(value: Any) -> str:
  """A 32-hex-digit content hash of `value` (arrays, pytrees, functions, partials, configs; see the module doc).

  Equal content gives the same hash in every process; any difference in an array's bytes, a number, a closure value,
  a bound argument or a nested entry (at any depth) gives another. Raises `TypeError`, naming the value's type and
  place, for what cannot be read (a lock, an open file) and for iterators and generators (streams).

  Example:
    >>> import numpy as np
    >>> scale = lambda s: (lambda x: s * x)
    >>> fingerprint(scale(2.0)) == fingerprint(scale(2.0)), fingerprint(scale(2.0)) == fingerprint(scale(3.0))
    (True, False)
    >>> fingerprint({"w": np.zeros(3)}) == fingerprint({"w": np.zeros(3, np.float32)})
    False
  """
  h = _h()
  _update(h, value, "value")
  return h.hexdigest()


def fingerprints(inputs: Mapping[str, Any]) -> dict[str, str]:
  """`{name: fingerprint(value)}` for every named input, in the order given (errors name `inputs[name]`)."""
  out = {}
  for k, v in inputs.items():
    h = _h()
    _update(h, v, f"inputs[{k!r}]")
    out[str(k)] = h.hexdigest()
  return out


def combine(parts: Mapping[str, str]) -> str:
  """One hash of named fingerprints (order-independent).

  Example:
    >>> combine({"a": "1", "b": "2"}) == combine({"b": "2", "a": "1"}) != combine({"a": "1", "b": "3"})
    True
  """
  h = _h()
  for k in sorted(parts):
    h.update(f"{k}={parts[k]};".encode())
  return h.hexdigest()
