"""bmerge.curvature: the chunked squared-gradient pass against a Python loop over examples."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmerge
from bmerge import curvature
from bmerge.models import logistic, mlp


def _problem(n=23, d=5, c=4, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, d)))
  y = jnp.asarray(rng.integers(0, c, size=n), jnp.int32)
  params = {"w": jnp.asarray(rng.normal(size=(d, c))), "b": jnp.asarray(rng.normal(size=(c,)))}
  return params, x, y


def _example_nll(logits_fn, params, x, y):
  return -jax.nn.log_softmax(logits_fn(params, x[None])[0])[y]


def _brute_force(logits_fn, params, x, y):
  """sum_i grad(nll_i)^2 with a Python loop over examples."""
  h = jax.tree.map(jnp.zeros_like, params)
  grad = jax.jit(jax.grad(lambda p, xi, yi: _example_nll(logits_fn, p, xi, yi)))  # compiled once, called per example
  for i in range(x.shape[0]):
    g = grad(params, x[i], y[i])
    h = jax.tree.map(lambda a, b: a + b ** 2, h, g)
  return h


def test_empirical_equals_loop_over_examples(x64):
  params, x, y = _problem()  # N = 23: chunks of 5 leave a partial last chunk (masked)
  ref = _brute_force(logistic.logits, params, x, y)
  for chunk_size in (1, 5, 23, 100):
    q = curvature.diagonal_fisher(None, logistic.logits, params, (x, y), chunk_size=chunk_size)
    assert isinstance(q, bmerge.DiagGaussian)
    chex.assert_trees_all_equal(q.mean, params)
    chex.assert_trees_all_close(q.precision, ref, rtol=1e-10, atol=1e-10)


def test_empirical_equals_loop_on_a_linen_mlp(x64):
  _, x, y = _problem(n=11, d=6, c=3)
  model = mlp.make(hidden=(7,), num_classes=3)
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        jax.jit(model.init, static_argnums=1)(jax.random.key(1), (6,)))
  q = curvature.diagonal_fisher(None, model.apply, params, (x, y), chunk_size=4)
  chex.assert_trees_all_close(q.precision, _brute_force(model.apply, params, x, y), rtol=1e-10, atol=1e-10)


def test_empirical_on_an_nnx_state(x64):
  _, x, y = _problem(n=9, d=5, c=4)
  graphdef, state = nnx.split(nnx.Linear(5, 4, rngs=nnx.Rngs(0), param_dtype=jnp.float64))
  apply = lambda s, xb: nnx.merge(graphdef, s)(xb)
  q = curvature.diagonal_fisher(None, apply, state, (x, y), chunk_size=4)
  ref = _brute_force(apply, state, x, y)
  chex.assert_trees_all_close(q.precision, ref, rtol=1e-10, atol=1e-10)
  assert jax.tree.structure(q.precision) == jax.tree.structure(state)


def test_true_variant_equals_loop_with_the_same_sampled_labels(x64):
  params, x, _ = _problem()
  key = jax.random.key(3)
  fisher = lambda cs: curvature.diagonal_fisher(key, logistic.logits, params, (x, jnp.zeros(23, jnp.int32)),
                                                variant="true", chunk_size=cs)
  draw = jax.jit(lambda i, xi: curvature.sample_label(key, i, logistic.logits(params, xi[None])[0]))
  sampled = jnp.stack([draw(i, x[i]) for i in range(23)])  # the documented contract, example by example
  ref = _brute_force(logistic.logits, params, x, sampled)
  chex.assert_trees_all_close(fisher(5).precision, ref, rtol=1e-10, atol=1e-10)
  chex.assert_trees_all_close(fisher(23).precision, ref, rtol=1e-10, atol=1e-10)  # labels independent of chunking
  no_labels = curvature.diagonal_fisher(key, logistic.logits, params, (x, None), variant="true", chunk_size=5)
  chex.assert_trees_all_close(no_labels.precision, ref, rtol=1e-10, atol=1e-10)
  # The sampled labels are not the observed ones: the variant changes the result.
  assert not np.allclose(ref["w"], _brute_force(logistic.logits, params, x, _problem()[2])["w"])


def test_true_variant_estimates_the_gauss_newton_diagonal(x64):
  # E_{y ~ p(y|x)}[g^2] is the diagonal of the Fisher = GGN = Hessian for logistic regression (closed form in
  # `logistic.hessian`). 6 inputs repeated 500 times each get independent labels: every entry is within 20 %
  # (the largest error is 7-11 % over keys 0-3).
  rng = np.random.default_rng(5)
  x = jnp.asarray(np.repeat(rng.normal(size=(6, 3)), 500, axis=0))
  theta = jnp.asarray(rng.normal(size=logistic.num_params(3, 4)))
  q = curvature.diagonal_fisher(jax.random.key(7), lambda t, xb: logistic.logits(t, xb, 4), theta,
                                (x, jnp.zeros(len(x), jnp.int32)), variant="true", chunk_size=500)
  exact = jnp.diagonal(logistic.hessian(theta, x, 4))
  np.testing.assert_allclose(q.precision, exact, rtol=0.2)


def test_scale_and_prior_precision(x64):
  params, x, y = _problem()
  base = curvature.diagonal_fisher(None, logistic.logits, params, (x, y)).precision
  q = curvature.diagonal_fisher(None, logistic.logits, params, (x, y), scale=1 / 23, prior_precision=0.5)
  chex.assert_trees_all_close(q.precision, jax.tree.map(lambda h: h / 23 + 0.5, base), rtol=1e-12)


def test_generic_sum_squared_gradients_is_the_empirical_fisher(x64):
  params, x, y = _problem()
  loss = lambda p, xi, yi: _example_nll(logistic.logits, p, xi, yi)
  h = curvature.sum_squared_gradients(loss, params, (x, y), chunk_size=6)
  chex.assert_trees_all_close(h, _brute_force(logistic.logits, params, x, y), rtol=1e-10, atol=1e-10)
  # A regression loss with pytree inputs: 0.5 (a.x1 + x2 - y)^2, gradient (residual) * x1.
  xs = {"x1": x[:, :3], "x2": x[:, 3]}
  yr = x[:, 4]
  h = curvature.sum_squared_gradients(lambda a, xi, yi: 0.5 * (a @ xi["x1"] + xi["x2"] - yi) ** 2, jnp.ones(3),
                                      (xs, yr), chunk_size=4)
  res = x[:, :3] @ jnp.ones(3) + x[:, 3] - yr
  np.testing.assert_allclose(h, jnp.sum((res[:, None] * x[:, :3]) ** 2, axis=0), rtol=1e-10)


def test_peak_memory_does_not_grow_with_the_data():
  d, c, chunk = 64, 10, 10
  params = {"w": jnp.zeros((d, c)), "b": jnp.zeros((c,))}

  def stats(n):
    f = jax.jit(lambda x, y: curvature.diagonal_fisher(None, logistic.logits, params, (x, y),
                                                       chunk_size=chunk).precision)
    compiled = f.lower(jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)).compile()
    return compiled.memory_analysis()

  small, large = stats(1_000), stats(100_000)
  assert large.argument_size_in_bytes - small.argument_size_in_bytes == 99_000 * (d + 1) * 4  # the inputs grow
  # Working memory is a chunk of per-example gradients, the same for 100x the data (no padded copy of the inputs).
  assert large.temp_size_in_bytes == small.temp_size_in_bytes
  assert small.temp_size_in_bytes < 20 * chunk * (d + 1) * c * 4
  # A non-multiple N (last chunk masked) does not copy the data either.
  assert stats(100_003).temp_size_in_bytes == small.temp_size_in_bytes


def test_fisher_posteriors_merge_back_to_each_task():
  params, x, y = _problem(n=40)
  q1 = curvature.diagonal_fisher(None, logistic.logits, params, (x[:20], y[:20]), prior_precision=1.0)
  params2 = jax.tree.map(lambda p: p + 1.0, params)
  q2 = curvature.diagonal_fisher(jax.random.key(0), logistic.logits, params2, (x[20:], y[20:]), variant="true",
                                 prior_precision=1.0)
  merged = bmerge.merge.hessian_weighted(bmerge.stack([q1, q2]), jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
  chex.assert_trees_all_close(jax.tree.map(lambda m: m[0], merged), params, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda m: m[1], merged), params2, rtol=1e-5, atol=1e-5)
  # alpha = (1/2, 1/2): the precision-weighted average (Eq. 10).
  expect = jax.tree.map(lambda m1, h1, m2, h2: (h1 * m1 + h2 * m2) / (h1 + h2), q1.mean, q1.precision, q2.mean,
                        q2.precision)
  chex.assert_trees_all_close(jax.tree.map(lambda m: m[2], merged), expect, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_themselves():
  params, x, y = _problem()
  fisher = lambda *a, **k: curvature.diagonal_fisher(None, logistic.logits, params, *a, **k)
  with pytest.raises(ValueError, match="chunk_size"):
    fisher((x, y), chunk_size=0)
  with pytest.raises(ValueError, match="inputs and labels"):
    fisher((x, y[:-1]))
  with pytest.raises(ValueError, match="variant"):
    fisher((x, y), variant="fisher")
  with pytest.raises(ValueError, match="key"):
    fisher((x, y), variant="true")
  with pytest.raises(ValueError, match="prior_precision"):
    fisher((x, y), prior_precision=-1.0)
  with pytest.raises(ValueError, match="scale"):
    fisher((x, y), scale=0.0)
  with pytest.raises(ValueError, match="data"):
    fisher(x)
  with pytest.raises(ValueError, match="labels"):
    fisher((x, y.astype(jnp.float32)))
