"""Content fingerprints (the keys of resumed previews and cached builds): what differs hashes differently, at any depth;
equal content hashes the same, in this process and in a fresh one; what cannot be read is refused by type and place."""

import functools
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

import bmerge
from bmerge import _fingerprint
from bmerge import grid
from bmerge import merge
from bmerge._fingerprint import fingerprint


def _scaled(scale):
  """The same function (one code object) with `scale` captured in its closure."""
  return lambda params, batch: {"score": jnp.sum(batch @ params["w"]) * scale}


def _nested(depth, leaf):
  """{"l": {"l": ... {"w": leaf}}} with `depth` levels of dicts above the leaf."""
  tree = {"w": leaf}
  for _ in range(depth - 1):
    tree = {"l": tree}
  return tree


class _SlotRule:
  """A merge rule as a callable object with __slots__ (no __dict__): simple averaging times `scale`."""

  __slots__ = ("scale",)

  def __init__(self, scale):
    self.scale = scale

  def __call__(self, means, alphas):
    return jax.tree.map(lambda m: self.scale * m, merge.simple_average(means, alphas))


@pytest.mark.parametrize("captured", [
    (1.0, 2.0),
    (np.array([1.0, 2.0]), np.array([1.0, 2.5])),
    (_nested(12, np.ones(3)), _nested(12, np.array([1.0, 1.0, 2.0]))),  # a value deep inside the closure
    (functools.partial(max, 0), functools.partial(min, 0)),  # builtins, by name
    (np.add, np.multiply),  # ufuncs (C objects), by name
    (_SlotRule(1.0), _SlotRule(2.0)),  # attributes in __slots__
    (np.random.default_rng(0), np.random.default_rng(1)),  # C state, by what pickling stores
])
def test_same_function_with_other_closure_values_differs(captured):
  a, b = captured
  assert fingerprint(_scaled(a)) != fingerprint(_scaled(b))
  # A closure of a closure: the value sits several functions deep.
  wrap = lambda f: (lambda params, batch: f(params, batch))
  assert fingerprint(wrap(wrap(_scaled(a)))) != fingerprint(wrap(wrap(_scaled(b))))
  assert fingerprint(_scaled(a)) == fingerprint(_scaled(a))


@pytest.mark.parametrize("depth", [8, 40, 3000])
def test_nested_dicts_deeper_than_six_levels_differ_by_their_leaves(depth):
  base = _nested(depth, np.zeros(3, np.float32))
  other = _nested(depth, np.array([0.0, 0.0, 1e-7], np.float32))
  assert fingerprint(base) != fingerprint(other)
  assert fingerprint(base) == fingerprint(_nested(depth, np.zeros(3, np.float32)))
  assert fingerprint(_nested(depth, 1)) != fingerprint(_nested(depth + 1, 1))  # the structure counts too
  lists = lambda leaf: functools.reduce(lambda x, _: [x], range(depth), leaf)
  assert fingerprint(lists(1)) != fingerprint(lists(2))


def test_cycles_hash_and_count():
  a, b = {"x": 1}, {"x": 1}
  a["self"], b["self"] = a, b
  assert fingerprint(a) == fingerprint(b)
  b["x"] = 2
  assert fingerprint(a) != fingerprint(b)


def _deep_params(seed, t=2):
  """A transformer-like params tree: leaves 7 dicts deep, a leading task axis."""
  rng = np.random.default_rng(seed)
  leaf = lambda *s: rng.normal(size=(t,) + s).astype(np.float32)
  return {"encoder": {"layers": {"0": {"attention": {"query": {"proj": {"kernel": leaf(4, 3), "bias": leaf(3)}}}}}}}


def _deep_eval(params, batch):
  kernel = params["encoder"]["layers"]["0"]["attention"]["query"]["proj"]["kernel"]
  return {"score": jnp.sum(batch @ kernel)}


@pytest.mark.parametrize("rules", ["task_arithmetic_base", "slot_rule", "jitted_closure"])
def test_same_tag_with_other_rules_never_loads_the_first_rules_rows(tmp_path, rules):
  # Weights that sum to less than one, so task arithmetic's base enters the merge: (1 - sum alpha) base.
  finetuned, batch, alphas = _deep_params(0), np.ones((5, 4), np.float32), 0.5 * grid.simplex(2, 0.25)
  first_base = jax.tree.map(lambda x: x[0], _deep_params(1))
  if rules == "task_arithmetic_base":  # the bases differ in one entry, 8 levels down (partial -> args -> tree)
    other_base = jax.tree.map(lambda x: x.copy(), first_base)
    other_base["encoder"]["layers"]["0"]["attention"]["query"]["proj"]["kernel"][0, 0] += 1.0
    rule, other = (functools.partial(merge.task_arithmetic, b) for b in (first_base, other_base))
  elif rules == "slot_rule":
    rule, other = _SlotRule(1.0), _SlotRule(3.0)
  else:
    rule, other = (jax.jit(lambda q, a, s=s: jax.tree.map(lambda m: s * m, merge.simple_average(q, a)))
                   for s in (1.0, 0.5))
  assert fingerprint(rule) != fingerprint(other)
  kw = dict(workdir=str(tmp_path), tag="rule", progress=False)
  bmerge.preview(rule, finetuned, alphas, _deep_eval, batch, **kw)
  got = bmerge.preview(other, finetuned, alphas, _deep_eval, batch, **kw)
  fresh = bmerge.preview(other, finetuned, alphas, _deep_eval, batch, progress=False)
  first = bmerge.preview(rule, finetuned, alphas, _deep_eval, batch, progress=False)
  np.testing.assert_array_equal(got["score"], fresh["score"])
  assert not np.allclose(fresh["score"], first["score"])  # the rules do give other results
  assert len(list((tmp_path / "rule").iterdir())) == 2  # one folder per rule under the one tag


def test_what_cannot_be_read_is_refused_by_type_and_place():
  def with_lock():
    lock = threading.Lock()
    return lambda params, batch: lock

  with pytest.raises(TypeError, match=r"_thread\.lock at inputs\['eval_fn'\]\.<closure lock>"):
    _fingerprint.fingerprints({"eval_fn": with_lock()})
  stream = (i for i in range(3))
  with pytest.raises(TypeError, match=r"builtins\.generator at value\['data'\]\[1\]: an iterator"):
    fingerprint({"data": [np.zeros(2), stream]})
  with pytest.raises(TypeError, match=r"list_iterator at value\.<closure batches>: an iterator"):
    batches = iter([np.zeros(2)])
    fingerprint(lambda: batches)


# Everything an input may hold, built the same way twice: in this process and in a fresh one.
EQUAL_INPUTS = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np, optax
    import ml_collections
    from flax import nnx
    from bmerge import merge

    def build():
      rng = np.random.default_rng(0)
      _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      offset = {"deep": [{"a": {"b": {"c": {"d": {"e": {"f": rng.normal(size=3)}}}}}}]}
      eval_fn = lambda params, batch: jnp.sum(batch @ params["w"]) + offset["deep"][0]["a"]["b"]["c"]["d"]["e"]["f"]
      return {"rule": functools.partial(merge.mixture_weighted, num_iters=3), "eval_fn": eval_fn,
              "jitted": jax.jit(eval_fn), "nnx": state, "config": ml_collections.ConfigDict({"lr": 0.1, "k": [1, 2]}),
              "key": jax.random.key(3), "tx": optax.adam(1e-3), "ufunc": np.add, "rng": np.random.default_rng(5),
              "f16": jnp.arange(4, dtype=jnp.bfloat16)}
""")


def test_equal_inputs_fingerprint_the_same_here_and_in_a_fresh_process():
  scope = {"__name__": "__main__"}  # the module name its functions carry, as in `python -c`
  exec(EQUAL_INPUTS, scope)
  here = _fingerprint.fingerprints(scope["build"]())
  assert here == _fingerprint.fingerprints(scope["build"]())  # equal objects built twice
  code = EQUAL_INPUTS + "from bmerge import _fingerprint\nprint(sorted(_fingerprint.fingerprints(build()).items()))"
  assert run_python(code, timeout=120).strip() == str(sorted(here.items()))
  # Each input changes the combined key: one entry of one array is enough.
  changed = scope["build"]()
  changed["nnx"] = jax.tree.map(lambda x: x.at[0].add(1.0) if x.ndim else x, changed["nnx"])
  assert _fingerprint.combine(_fingerprint.fingerprints(changed)) != _fingerprint.combine(here)
