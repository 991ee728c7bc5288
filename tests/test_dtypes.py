"""Every dtype merges correctly: low-precision params in float32, non-floating leaves passed through, NNX states."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmerge
from bmerge import checkpoint
from bmerge import grid
from bmerge import merge


def _params(rng, t, dtype):
  """T stacked models whose FIRST leaf (in pytree order) is an integer step counter."""
  return {"a_count": np.full((t,), 7, np.int32),
          "w": rng.normal(size=(t, 4, 3)).astype(dtype),
          "b": (1.0 + 1e-2 * rng.normal(size=(t, 3))).astype(dtype)}


def _eval(params, x):
  return jnp.mean((x @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)) ** 2, axis=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float32])
def test_int_leaf_first_and_low_precision_preview_equals_merging_in_float32(dtype):
  rng = np.random.default_rng(0)
  mean = _params(rng, 3, dtype)
  prec = {"a_count": np.ones((3,), np.int32), "w": np.exp(rng.normal(size=(3, 4, 3))).astype(dtype),
          "b": np.exp(rng.normal(size=(3, 3))).astype(dtype)}
  q = bmerge.DiagGaussian(mean, prec)
  alphas = grid.simplex(3, 0.1)
  x = rng.normal(size=(20, 4)).astype(np.float32)
  for rule, posts in [(merge.hessian_weighted, q), (merge.simple_average, q.mean)]:
    got = bmerge.preview(rule, posts, alphas, _eval, x, chunk_size=16, progress=False)
    # The oracle: the floating leaves cast to float32 by hand, merged, then rounded to the leaf dtype.
    f32 = jax.tree.map(lambda v: v.astype(np.float32), posts)
    f32 = f32._replace(mean={k: v for k, v in f32.mean.items() if k != "a_count"},
                       precision={k: v for k, v in f32.precision.items() if k != "a_count"}) \
        if isinstance(f32, bmerge.DiagGaussian) else {k: v for k, v in f32.items() if k != "a_count"}
    merged = rule(f32, alphas)
    merged = jax.tree.map(lambda v: v.astype(dtype), merged)
    want = jax.vmap(_eval, in_axes=(0, None))(merged, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The merged params keep each leaf's dtype, and the counter is passed through (never averaged to 0).
  out = merge.hessian_weighted(q, alphas)
  assert out["w"].dtype == dtype and out["a_count"].dtype == np.int32
  np.testing.assert_array_equal(out["a_count"], np.full((len(alphas),), 7))
  single = merge.simple_average(q.mean, np.array([0.2, 0.3, 0.5]))
  assert single["a_count"].shape == () and int(single["a_count"]) == 7


def test_low_precision_mixture_and_full_gaussian_merge_in_float32():
  rng = np.random.default_rng(1)
  mean = _params(rng, 3, np.float32)
  mix32 = bmerge.Mixture(bmerge.DiagGaussian({k: np.stack([v, v + (0.1 if k != "a_count" else 0)], 1) for k, v in
                                              mean.items()},
                                             {k: np.ones((3, 2) + v.shape[1:], np.float32) for k, v in mean.items()}),
                         np.zeros((3, 2), np.float32))
  mix16 = mix32._replace(components=jax.tree.map(
      lambda v: v.astype(jnp.bfloat16) if v.dtype == np.float32 else v, mix32.components))
  alphas = grid.simplex(3, 0.25)
  got = merge.mixture_weighted(mix16, alphas, num_iters=3)
  widen = lambda v: v.astype(np.float32) if v.dtype == jnp.bfloat16 else v
  ref = merge.mixture_weighted(mix16._replace(components=jax.tree.map(widen, mix16.components)), alphas, num_iters=3)
  assert got["w"].dtype == jnp.bfloat16 and got["a_count"].dtype == np.int32
  np.testing.assert_array_equal(np.asarray(got["w"], np.float32), np.asarray(ref["w"].astype(jnp.bfloat16), np.float32))
  np.testing.assert_array_equal(got["a_count"], 7)
  # Full Gaussians in bfloat16: solved in float32, returned in bfloat16.
  p = 4
  a = rng.normal(size=(3, p, p))
  h = (np.einsum("tij,tkj->tik", a, a) + p * np.eye(p)).astype(np.float32)
  m = rng.normal(size=(3, p)).astype(np.float32)
  q16 = bmerge.FullGaussian(jnp.asarray(m, jnp.bfloat16), jnp.asarray(h, jnp.bfloat16))
  out = merge.hessian_weighted(q16, alphas)
  want = merge.hessian_weighted(bmerge.FullGaussian(np.asarray(q16.mean, np.float32), np.asarray(q16.precision,
                                                                                                  np.float32)), alphas)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))


def test_non_floating_leaves_that_differ_are_rejected_by_name_and_keys_pass_through():
  rng = np.random.default_rng(2)
  mean = _params(rng, 3, np.float32)
  mean["a_count"] = np.array([7, 7, 8], np.int32)
  q = bmerge.DiagGaussian(mean, jax.tree.map(np.ones_like, mean))
  with pytest.raises(ValueError, match=r"`posteriors.mean\['a_count'\]` is a non-floating leaf \(int32\) that differs"):
    merge.hessian_weighted(q, grid.simplex(3, 0.5))
  with pytest.raises(ValueError, match=r"`means\['a_count'\]` is a non-floating leaf"):
    merge.simple_average(mean, grid.simplex(3, 0.5))
  keys = jax.random.split(jax.random.key(0), 1)
  same = {"key": jnp.concatenate([keys] * 3), "w": mean["w"]}
  out = merge.simple_average(same, grid.simplex(3, 0.5))
  assert out["key"].shape == (6,)
  np.testing.assert_array_equal(jax.random.key_data(out["key"][4]), jax.random.key_data(keys[0]))
  differ = {"key": jax.random.split(jax.random.key(0), 3), "w": mean["w"]}
  with pytest.raises(ValueError, match=r"`means\['key'\]` is a non-floating leaf"):
    merge.simple_average(differ, grid.simplex(3, 0.5))


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(3, 2, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.steps = nnx.Variable(jnp.array(5, jnp.int32))

  def __call__(self, x):
    return self.dense(x)


def test_nnx_states_with_and_without_rng_variables(tmp_path):
  models = [_Net(nnx.Rngs(i, dropout=10)) for i in range(2)]
  whole = [nnx.split(m)[1] for m in models]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *[nnx.split(m, nnx.Param, ...)[1] for m in models])
  # Whole-model states hold RNG variables: a clear error pointing to nnx.split.
  wq = bmerge.stack([bmerge.DiagGaussian(s, jax.tree.map(jnp.ones_like, s)) for s in whole])
  with pytest.raises(TypeError, match=r"NNX RNG variables.*nnx.split\(model, nnx.Param, \.\.\.\)"):
    merge.hessian_weighted(wq, grid.simplex(2, 0.5))
  with pytest.raises(TypeError, match=r"nnx.split\(model, nnx.Param, \.\.\.\)"):
    checkpoint.save_posterior(tmp_path / "whole", bmerge.unstack(wq)[0])
  # Parameters only: merged per leaf, an NNX State comes back and goes straight into nnx.merge.
  q = bmerge.DiagGaussian(stacked, jax.tree.map(jnp.ones_like, stacked))
  alphas = grid.simplex(2, 0.5)
  out = merge.hessian_weighted(q, alphas)
  assert isinstance(out, nnx.State)
  np.testing.assert_allclose(out["dense"]["kernel"][...][1], 0.5 * (stacked["dense"]["kernel"][...][0] +
                                                                    stacked["dense"]["kernel"][...][1]), rtol=1e-6)
  graphdef, _, rest = nnx.split(models[0], nnx.Param, ...)
  merged_model = nnx.merge(graphdef, jax.tree.map(lambda x: x[1], out), rest)
  x = jnp.ones((1, 3))
  np.testing.assert_allclose(merged_model(x), x @ out["dense"]["kernel"][...][1] + out["dense"]["bias"][...][1],
                             rtol=1e-6)
  # A state with an integer variable (no RNG): the integer is passed through.
  with_int = jax.tree.map(lambda *x: jnp.stack(x), *[nnx.split(m, (nnx.Param, nnx.Variable), ...)[1] for m in models])
  # nnx.split with the first filter catching all Variables (RNG ones too) would hold RNG state; keep ints only:
  ints = nnx.State({"steps": with_int["steps"], "dense": with_int["dense"]})
  qi = bmerge.DiagGaussian(ints, jax.tree.map(jnp.ones_like, ints))
  outi = merge.hessian_weighted(qi, alphas)
  np.testing.assert_array_equal(outi["steps"][...], 5)
  # checkpoint round trip of an NNX State posterior: same structure, same arrays.
  path = checkpoint.save_posterior(tmp_path / "q", q, {"kind": "nnx"})
  back, meta = checkpoint.restore_posterior(path)
  assert jax.tree.structure(back) == jax.tree.structure(q) and meta == {"kind": "nnx"}
  jax.tree.map(np.testing.assert_array_equal, back, q)


def _peer_merge(theta0, thetas, fishers, sizes, h0, s):
  """Daheim et al. (2024)'s merge, written as they write it (float64):
  theta_0 + s sum_t (a_t F_t + H0)(theta_t - theta_0) / (s sum_t a_t F_t + H0)."""
  num = sum((a * f + h0) * (th - theta0) for th, f, a in zip(thetas, fishers, sizes))
  den = s * sum(a * f for f, a in zip(fishers, sizes)) + h0
  return theta0 + s * num / den


@pytest.mark.parametrize("scale", [0.3, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_ukplab_recipe_reproduces_the_peer_merge(scale, precision, request):
  if precision == "float64":
    request.getfixturevalue("x64")
  dtype = np.float64 if precision == "float64" else np.float32
  rng = np.random.default_rng(3)
  t, p = 3, 2000
  theta0 = rng.normal(size=p)  # |theta| ~ 1, task vectors ~ 1e-3: the realistic regime
  thetas = [theta0 + 1e-3 * rng.normal(size=p) for _ in range(t)]
  fishers = [np.exp(rng.normal(size=p) - 2.0) for _ in range(t)]  # per-example-averaged Fishers
  sizes = [1000.0, 250.0, 4000.0]  # a_t: dataset sizes
  h0 = 1e-2 * np.exp(rng.normal(size=p)) + 1e-4  # c * F_pretrained + delta_0
  want = _peer_merge(theta0, thetas, fishers, sizes, h0, scale)
  q = bmerge.stack([bmerge.DiagGaussian(jnp.asarray(th, dtype), jnp.asarray(a * f + h0, dtype))
                    for th, f, a in zip(thetas, fishers, sizes)])
  got = merge.hessian_weighted(q, np.full((t,), scale), prior=bmerge.DiagGaussian(jnp.asarray(theta0, dtype),
                                                                                  jnp.asarray(h0, dtype)))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-6)


def test_mixture_rule_partial_arguments_with_int_leaf_in_preview():
  rng = np.random.default_rng(4)
  mean = _params(rng, 3, np.float32)
  comps = bmerge.DiagGaussian({k: np.stack([v, v], 1) for k, v in mean.items()},
                              {k: np.ones((3, 2) + v.shape[1:], np.float32) for k, v in mean.items()})
  mix = bmerge.Mixture(comps, np.zeros((3, 2), np.float32))
  alphas = grid.simplex(3, 0.25)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  got = bmerge.preview(functools.partial(merge.mixture_weighted, num_iters=2), mix, alphas, _eval, x, progress=False)
  want = bmerge.preview(merge.hessian_weighted, bmerge.DiagGaussian(mean, jax.tree.map(np.ones_like, mean)), alphas,
                        _eval, x, progress=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
