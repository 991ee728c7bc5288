"""bmerge.checkpoint: exact round trips of every posterior type, the config fingerprint, the cache, atomic saves."""

import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bmerge import checkpoint
from bmerge import timing
from bmerge.posteriors import Beta
from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import FullGaussian
from bmerge.posteriors import IsoGaussian
from bmerge.posteriors import Mixture
from bmerge.posteriors import stack


def _linen_params(rng, lead=()):
  """A Flax Linen-style params dict with mixed dtypes, a scalar and names orbax paths would dislike."""
  return {
      "Dense_0": {"kernel": jnp.asarray(rng.normal(size=lead + (4, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=lead + (3,)), jnp.bfloat16)},
      "Conv.1/odd": {"kernel": rng.normal(size=lead + (2, 2, 1, 2)).astype(np.float64)},
      "LayerNorm_0": {"scale": jnp.asarray(rng.uniform(1, 2, size=lead + (3,)), jnp.float16),
                      "count": np.arange(int(np.prod(lead)) or 1, dtype=np.int32).reshape(lead or ())},
  }


def _positive(tree):
  return jax.tree.map(lambda x: x * 0 + 2 if np.issubdtype(np.asarray(x).dtype, np.integer) else abs(x) + 1, tree)


def _posteriors():
  rng = np.random.default_rng(0)
  params = _linen_params(rng)
  diag = DiagGaussian(params, _positive(_linen_params(rng)))
  full = FullGaussian(jnp.asarray(rng.normal(size=5), jnp.float32), jnp.eye(5, dtype=jnp.float32) * 3.0)
  k_full = FullGaussian(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), jnp.broadcast_to(jnp.eye(5), (3, 5, 5)))
  return {
      "iso": IsoGaussian(params, jnp.asarray(2.5, jnp.float32)),
      "diag": diag,
      "diag_stacked": stack([diag, diag]),
      "full": full,
      "mixture_diag": Mixture(DiagGaussian(_linen_params(rng, (4,)), _positive(_linen_params(rng, (4,)))),
                              jnp.asarray(rng.normal(size=4), jnp.float32)),
      "mixture_full": Mixture(k_full, np.log(np.full(3, 1 / 3))),
      "beta": Beta(np.asarray(rng.uniform(1, 5, size=(2, 3)), np.float64), jnp.asarray([3.0, 4.0], jnp.bfloat16)),
  }


def _assert_identical(restored, original):
  """Same type at every node, same dict key order, same leaf kinds, dtypes, shapes and values."""
  assert jax.tree.structure(restored) == jax.tree.structure(original)
  assert type(restored) is type(original)
  if isinstance(original, dict):
    assert list(restored) == list(original)
    for k in original:
      _assert_identical(restored[k], original[k])
  elif isinstance(original, tuple):
    for r, o in zip(restored, original):
      _assert_identical(r, o)
  else:
    assert isinstance(restored, jax.Array) == isinstance(original, jax.Array)
    assert restored.dtype == original.dtype and restored.shape == original.shape
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(original), strict=True)


@pytest.mark.parametrize("kind", list(_posteriors()))
def test_posterior_round_trip_is_exact(tmp_path, kind):
  posterior = _posteriors()[kind]
  metadata = {"task": kind, "ess": 1e4, "seeds": [0, 1], "nested": {"ok": True}}
  written = checkpoint.save_posterior(tmp_path / kind, posterior, metadata)
  assert written == tmp_path / kind
  restored, meta = checkpoint.restore_posterior(tmp_path / kind)
  _assert_identical(restored, posterior)
  assert meta == metadata


def test_leaves_of_every_kind_and_zero_size_round_trip(tmp_path):
  mean = {"w": np.zeros((0, 3), np.float32), "s": np.float32(1.5), "p": 2.0, "i": 7, "none": None,
          "seq": [jnp.arange(3), (np.ones(2, np.uint8),)]}
  posterior = IsoGaussian(mean, jnp.asarray(1.0))
  checkpoint.save_posterior(tmp_path / "c", posterior)
  restored, meta = checkpoint.restore_posterior(tmp_path / "c")
  assert meta == {}
  assert restored.mean["none"] is None
  assert type(restored.mean["s"]) is np.float32 and restored.mean["s"] == np.float32(1.5)
  assert type(restored.mean["p"]) is float and type(restored.mean["i"]) is int
  assert isinstance(restored.mean["seq"], list) and isinstance(restored.mean["seq"][1], tuple)
  assert restored.mean["w"].shape == (0, 3) and restored.mean["w"].dtype == np.float32
  _assert_identical(restored.mean["seq"][0], mean["seq"][0])
  _assert_identical(restored.mean["seq"][1][0], mean["seq"][1][0])


def test_nnx_state_is_saved_as_is_and_its_pure_dict_too(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  checkpoint.save_posterior(tmp_path / "state", DiagGaussian(state, state))
  restored, _ = checkpoint.restore_posterior(tmp_path / "state")
  assert isinstance(restored.mean, nnx.State) and isinstance(restored.mean["kernel"], nnx.Param)
  assert jax.tree.structure(restored) == jax.tree.structure(DiagGaussian(state, state))
  jax.tree.map(np.testing.assert_array_equal, restored.mean, state)
  pure = nnx.to_pure_dict(state)
  checkpoint.save_posterior(tmp_path / "ok", DiagGaussian(pure, pure))
  restored, _ = checkpoint.restore_posterior(tmp_path / "ok")
  _assert_identical(restored.mean, pure)


def test_arrays_round_trip_and_kind_is_checked(tmp_path):
  arrays = {"alphas": np.eye(3), "preview": {"simple": np.linspace(0, 1, 3, dtype=np.float32)},
            "exact": jnp.asarray([0.1, 0.2, 0.3])}
  checkpoint.save_arrays(tmp_path / "res", arrays)
  _assert_identical(checkpoint.restore_arrays(tmp_path / "res"), arrays)
  with pytest.raises(ValueError, match="holds arrays"):
    checkpoint.restore_posterior(tmp_path / "res")


def test_boundary_errors_name_the_argument(tmp_path):
  q = _posteriors()["full"]
  with pytest.raises(TypeError, match="`posterior`"):
    checkpoint.save_posterior(tmp_path / "x", {"mean": q.mean})
  with pytest.raises(ValueError, match="`metadata`"):
    checkpoint.save_posterior(tmp_path / "x", q, {"bad": object()})
  with pytest.raises(TypeError, match="`arrays`"):
    checkpoint.save_arrays(tmp_path / "x", [np.ones(2)])
  with pytest.raises(FileNotFoundError, match="`path`"):
    checkpoint.restore_posterior(tmp_path / "missing")
  checkpoint.save_posterior(tmp_path / "x", q)
  with pytest.raises(FileExistsError, match="`path`"):
    checkpoint.save_posterior(tmp_path / "x", q)
  replacement = FullGaussian(q.mean + 1, q.precision)
  checkpoint.save_posterior(tmp_path / "x", replacement, overwrite=True)
  _assert_identical(checkpoint.restore_posterior(tmp_path / "x")[0], replacement)


def test_crash_before_commit_leaves_no_checkpoint(tmp_path, monkeypatch):
  """Everything is written but the process dies before orbax's rename: `path` must not exist (no half checkpoint)."""
  q = _posteriors()["diag"]

  def crash(self, directory):
    raise KeyboardInterrupt("simulated crash")

  with monkeypatch.context() as m:
    m.setattr(ocp.CompositeCheckpointHandler, "finalize", crash)
    with pytest.raises(KeyboardInterrupt):
      checkpoint.save_posterior(tmp_path / "c", q, {"a": 1})
  assert not (tmp_path / "c").exists()
  leftovers = [p.name for p in tmp_path.iterdir()]
  assert leftovers and all(".orbax-checkpoint-tmp" in name for name in leftovers)
  with pytest.raises(FileNotFoundError):
    checkpoint.restore_posterior(tmp_path / "c")
  with pytest.raises(ValueError, match="temporary"):
    checkpoint.restore_posterior(tmp_path / leftovers[0])
  # The next save to the same path clears the stale temporary directory and commits.
  checkpoint.save_posterior(tmp_path / "c", q, {"a": 1})
  _assert_identical(checkpoint.restore_posterior(tmp_path / "c")[0], q)
  assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_config_fingerprint_is_stable_and_sensitive():
  a = {"lr": 0.1, "model": {"width": 64, "depth": 2}, "tasks": [0, 1], "name": "digits"}
  b = {"name": "digits", "tasks": [0, 1], "model": {"depth": 2, "width": 64}, "lr": 0.1}
  fa = checkpoint.config_fingerprint(a)
  assert fa == checkpoint.config_fingerprint(b)
  assert len(fa) == 64 and int(fa, 16) >= 0
  # A known value pins the canonical form across versions: sha256 of '{"a":1,"b":[1.5,"x"]}'.
  expected = hashlib.sha256(b'{"a":1,"b":[1.5,"x"]}').hexdigest()
  assert checkpoint.config_fingerprint({"b": [1.5, "x"], "a": 1}) == expected
  for changed in ({**a, "lr": 0.2}, {**a, "model": {"width": 64, "depth": 3}}, {**a, "tasks": [1, 0]},
                  {**a, "extra": None}):
    assert checkpoint.config_fingerprint(changed) != fa
  assert checkpoint.config_fingerprint({"x": np.float32(0.5)}) == checkpoint.config_fingerprint({"x": 0.5})
  with pytest.raises(ValueError, match="`config`"):
    checkpoint.config_fingerprint({"f": object()})
  with pytest.raises(TypeError, match="`config`"):
    checkpoint.config_fingerprint([1, 2])


def test_config_fingerprint_of_a_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"lr": 0.1, "model": {"width": 64}})
  assert checkpoint.config_fingerprint(cfg) == checkpoint.config_fingerprint({"model": {"width": 64}, "lr": 0.1})


def _cache_dirs(folder, name):
  return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"{name}-"))


def test_cached_builds_once_per_content_of_its_inputs(tmp_path):
  """A changed config value, data array (one element), seed or bound function argument misses; the same hits."""
  calls = []
  posterior = _posteriors()["diag"]

  def build():
    calls.append(1)
    return jax.tree.map(lambda x: x * len(calls), posterior)

  def loss(theta, x, scale):
    return scale * jnp.sum((x - theta) ** 2)

  x = np.linspace(0.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
  inputs = lambda **kw: {"config": {"lr": 0.1, "steps": 10}, "x": x, "seed": 0,
                         "loss": functools.partial(loss, scale=2.0), **kw}
  first = checkpoint.cached(tmp_path, "task0", inputs(), build)
  assert not first.loaded and first.seconds > 0 and len(calls) == 1
  x_copy = x.copy()  # equal content, another object: a hit
  again = checkpoint.cached(tmp_path, "task0", inputs(x=x_copy, config={"steps": 10, "lr": 0.1}), build)
  assert again.loaded and len(calls) == 1
  _assert_identical(again.value, first.value)
  # A resumed call reports the first build's seconds and machine exactly, not the time to load.
  assert again.seconds == first.seconds and again.machine == first.machine
  assert set(first.machine) >= {"hostname", "cpu", "backend", "device_kind", "device_count", "date", "run"}
  assert first.compile_seconds >= 0 and again.compile_seconds == first.compile_seconds
  assert first.machine["run"] == timing.RUN
  cost = again.cost("posteriors task0")
  assert (cost.seconds, cost.compile_seconds, cost.computed_rows, cost.loaded_rows) == (first.seconds, 0.0, 0, 1)
  assert first.cost("x").computed_rows == 1 and first.cost("x").compile_seconds == first.compile_seconds
  one_changed = x.copy()
  one_changed[2, 1] += 1e-3
  misses = [inputs(config={"lr": 0.2, "steps": 10}), inputs(x=one_changed), inputs(seed=1),
            inputs(loss=functools.partial(loss, scale=3.0)), inputs(x=x.astype(np.float64))]
  for k, changed in enumerate(misses):
    out = checkpoint.cached(tmp_path, "task0", changed, build)
    assert not out.loaded and len(calls) == 2 + k, k
    _assert_identical(out.value, jax.tree.map(lambda v: v * (2 + k), posterior))
  assert len(_cache_dirs(tmp_path, "task0")) == 1 + len(misses)
  # Another name is another entry; switching back to the first inputs restores without building.
  assert not checkpoint.cached(tmp_path, "task1", inputs(), build).loaded
  back = checkpoint.cached(tmp_path, "task0", inputs(), build)
  assert back.loaded and back.seconds == first.seconds and len(calls) == 2 + len(misses)
  _assert_identical(back.value, first.value)


def test_cached_stores_its_fingerprint_and_checks_it(tmp_path):
  value = {"w": np.arange(3.0), "b": jnp.ones(2, jnp.bfloat16)}
  out = checkpoint.cached(tmp_path, "v", {"a": 1}, lambda: value)
  (path,) = [tmp_path / n for n in _cache_dirs(tmp_path, "v")]
  _assert_identical(out.value, value)
  _assert_identical(checkpoint.cached(tmp_path, "v", {"a": 1}, lambda: None).value, value)
  # A directory whose stored fingerprint disagrees with its name is refused, not loaded.
  other = tmp_path / "other"
  checkpoint.cached(other, "v", {"a": 2}, lambda: value)
  (stored,) = list(other.iterdir())
  os.rename(stored, other / path.name)
  with pytest.raises(ValueError, match="`path_dir`"):
    checkpoint.cached(other, "v", {"a": 1}, lambda: value)
  with pytest.raises(ValueError, match="`name`"):
    checkpoint.cached(tmp_path, "a/b", {}, lambda: value)
  with pytest.raises(TypeError, match="`build_fn`"):
    checkpoint.cached(tmp_path, "v", {}, value)


def test_cached_posterior_is_the_value_of_cached(tmp_path):
  posterior = _posteriors()["iso"]
  built = checkpoint.cached_posterior(tmp_path, "t", {"a": 1}, lambda: posterior)
  _assert_identical(built, posterior)
  restored = checkpoint.cached(tmp_path, "t", {"a": 1}, lambda: None)
  assert restored.loaded
  _assert_identical(restored.value, posterior)


def test_timed_adds_the_seconds_of_each_call():
  costs = {"other": 1.0}
  assert checkpoint.timed(costs, "stage", lambda: jnp.arange(3).sum()) == 3
  first = costs["stage"]
  checkpoint.timed(costs, "stage", lambda: time.sleep(0.05))
  assert first > 0 and costs["stage"] >= first + 0.05 and costs["other"] == 1.0


def test_cached_posterior_rebuilds_after_a_crashed_save(tmp_path, monkeypatch):
  calls = []
  posterior = _posteriors()["full"]

  def build():
    calls.append(1)
    return posterior

  with monkeypatch.context() as m:
    m.setattr(ocp.CompositeCheckpointHandler, "finalize", lambda self, d: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
      checkpoint.cached_posterior(tmp_path, "t", {"a": 1}, build)
  restored = checkpoint.cached_posterior(tmp_path, "t", {"a": 1}, build)
  assert len(calls) == 2
  _assert_identical(restored, posterior)
  checkpoint.cached_posterior(tmp_path, "t", {"a": 1}, build)
  assert len(calls) == 2
  assert not any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())
  assert len(_cache_dirs(tmp_path, "t")) == 1


def test_cached_call_keys_on_the_function_and_its_arguments(tmp_path):
  """A setting closed over by a jit-vmapped function, or an argument's bytes, changes the key; equal ones hit."""
  make = lambda scale: jax.jit(jax.vmap(lambda x: scale * x))
  x = np.arange(6.0).reshape(3, 2)
  first = checkpoint.cached_call(tmp_path, "f", make(2.0), x)
  np.testing.assert_array_equal(first.value, 2 * x)
  assert checkpoint.cached_call(tmp_path, "f", make(2.0), x.copy()).loaded
  assert not checkpoint.cached_call(tmp_path, "f", make(3.0), x).loaded
  assert not checkpoint.cached_call(tmp_path, "f", make(2.0), x + np.eye(3, 2)).loaded
  assert not checkpoint.cached_call(tmp_path, "f", jax.jit(jax.vmap(lambda x: 2.0 * x + 0.0)), x).loaded  # new code
  with pytest.raises(TypeError, match="`fn`"):
    checkpoint.cached_call(tmp_path, "f", 3.0, x)
