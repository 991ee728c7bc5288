"""bmerge.models: parameter counts, shapes, closed forms of the logistic model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from bmerge.models import Model, cnn, logistic, mlp


def test_logistic_digits_has_650_params_and_logits_are_affine():
  model = logistic.make(num_classes=10)
  assert isinstance(model, Model)
  params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (64,))
  assert sum(p.size for p in jax.tree.leaves(params)) == 650 == logistic.num_params(64, 10)
  x = np.random.default_rng(1).uniform(size=(7, 64)).astype(np.float32)
  out = model.apply(params, x)
  assert out.shape == (7, 10)
  np.testing.assert_allclose(out, np.asarray(x) @ np.asarray(params["w"]) + np.asarray(params["b"]), rtol=1e-5,
                             atol=1e-6)
  # The flat form [W; b] row-major gives the same logits, and round-trips.
  theta = logistic.flatten(params)
  assert theta.shape == (650,)
  np.testing.assert_array_equal(logistic.logits(theta, x, 10), out)
  chex.assert_trees_all_equal(logistic.unflatten(theta, 10), params)
  # Images are flattened per example.
  np.testing.assert_allclose(logistic.logits(params, x.reshape(7, 8, 8)), out, rtol=1e-6)


def test_logistic_hessian_is_the_autodiff_hessian_of_the_task_loss(x64):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(13, 4)))
  y = jnp.asarray(rng.integers(0, 3, size=13))
  theta = jnp.asarray(rng.normal(size=logistic.num_params(4, 3)))
  loss = logistic.task_loss_fn(x, y, 3, prior_precision=0.7)
  closed = jax.jit(logistic.hessian, static_argnums=2)(theta, x, 3, 0.7)
  np.testing.assert_allclose(closed, jax.jit(jax.hessian(loss))(theta), rtol=1e-10, atol=1e-10)
  # The task loss is the summed cross-entropy plus the prior term.
  p = jax.nn.softmax(x @ theta.reshape(5, 3)[:4] + theta.reshape(5, 3)[4])
  expect = -jnp.sum(jnp.log(p[jnp.arange(13), y])) + 0.35 * jnp.sum(theta ** 2)
  np.testing.assert_allclose(jax.jit(loss)(theta), expect, rtol=1e-12)
  # Weights: zero-weight (padding) rows change nothing; the weighted Hessian is the autodiff one.
  w = jnp.asarray(rng.uniform(size=13)).at[-3:].set(0.0)
  wloss = logistic.task_loss_fn(x, y, 3, 0.7, weights=w)
  np.testing.assert_allclose(logistic.hessian(theta, x, 3, 0.7, weights=w), jax.hessian(wloss)(theta), atol=1e-10)
  ones = jnp.ones(13).at[-3:].set(0.0)
  np.testing.assert_allclose(logistic.task_loss_fn(x, y, 3, 0.7, weights=ones)(theta),
                             logistic.task_loss_fn(x[:-3], y[:-3], 3, 0.7)(theta), rtol=1e-12)


def test_multitask_losses_equal_each_task_loss(x64):
  rng = np.random.default_rng(1)
  tasks = [(rng.normal(size=(n, 4)), rng.integers(0, 3, size=n)) for n in (5, 9, 2)]
  theta = jnp.asarray(rng.normal(size=15))
  batch = logistic.multitask_batch(tasks, 3)
  assert batch.x.shape == (3, 9, 4) and float(batch.mask.sum()) == 16
  expect = [logistic.task_loss_fn(x, y, 3, 0.3)(theta) for x, y in tasks]
  np.testing.assert_allclose(logistic.multitask_losses(theta, batch, 0.3), expect, rtol=1e-12)
  with pytest.raises(ValueError, match="task_data"):
    logistic.multitask_batch([(np.zeros((2, 4)), np.array([0, 3]))], 3)


def test_accuracy_and_mean_ce():
  params = {"w": jnp.eye(3), "b": jnp.zeros(3)}
  x = jnp.eye(3)
  assert float(logistic.accuracy(params, x, jnp.array([0, 1, 0]))) == pytest.approx(2 / 3)
  expect = -np.log(np.e / (np.e + 2))
  assert float(logistic.mean_ce(params, x, jnp.array([0, 1, 2]))) == pytest.approx(expect, rel=1e-6)


def test_mlp_shapes_and_param_count():
  model = mlp.make(hidden=(16, 8), num_classes=10)
  params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (8, 8))  # one compile, not op by op
  assert sum(p.size for p in jax.tree.leaves(params)) == mlp.num_params(64, (16, 8), 10) == 65 * 16 + 17 * 8 + 9 * 10
  assert jax.eval_shape(model.apply, params, jnp.ones((5, 8, 8))).shape == (5, 10)
  # One hidden layer with identity activation is affine: apply(x) = (x W1 + b1) W2 + b2.
  lin = mlp.make(hidden=(4,), num_classes=3, activation=lambda z: z)
  p = jax.jit(lin.init, static_argnums=1)(jax.random.key(1), (6,))
  x = np.random.default_rng(2).normal(size=(2, 6))
  p_np = jax.tree.map(np.asarray, p)
  d0, d1 = p_np["Dense_0"], p_np["Dense_1"]
  expect = (x @ d0["kernel"] + d0["bias"]) @ d1["kernel"] + d1["bias"]
  np.testing.assert_allclose(jax.jit(lin.apply)(p, x), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("input_shape,image_shape", [((28, 28, 1), None), ((64,), (8, 8, 1))])
def test_cnn_shapes_and_batch_independence(input_shape, image_shape):
  model = cnn.make(features=(4, 8), num_classes=10, image_shape=image_shape)
  params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), input_shape)
  assert params["Conv_0"]["kernel"].shape == (3, 3, 1, 4) and params["Dense_0"]["kernel"].shape == (8, 10)
  x = np.random.default_rng(1).uniform(size=(3, *input_shape)).astype(np.float32)
  apply = jax.jit(model.apply)
  out = apply(params, x)
  assert out.shape == (3, 10)
  # No batch statistics: each example's logits depend on that example only.
  np.testing.assert_allclose(apply(params, x[1:2]), out[1:2], rtol=1e-5, atol=1e-6)


def cnn_reference(params, x):
  """The CNN's forward pass in float64 with scipy: 'same' 3x3 cross-correlations, 2x2 mean pooling of whole patches."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  num_stages = sum(k.startswith("Conv_") for k in p)
  for s in range(num_stages):
    kernel, bias = p[f"Conv_{s}"]["kernel"], p[f"Conv_{s}"]["bias"]  # [3, 3, C_in, C_out], [C_out]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for n in range(x.shape[0]):
      for o in range(kernel.shape[-1]):
        out[n, :, :, o] = bias[o] + sum(scipy.signal.correlate2d(x[n, :, :, c], kernel[:, :, c, o], mode="same")
                                        for c in range(x.shape[-1]))
    x = np.maximum(out, 0.0)
    h, w = x.shape[1] // 2, x.shape[2] // 2
    if h and w:  # a trailing odd row or column is dropped
      x = np.stack([np.stack([x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2)) for j in range(w)], axis=1)
                    for i in range(h)], axis=1)
  return x.mean(axis=(1, 2)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


def test_cnn_forward_equals_a_scipy_reference(x64):
  model = cnn.make(features=(3, 5), num_classes=4)
  rng = np.random.default_rng(0)
  params = jax.jit(model.init, static_argnums=1)(jax.random.key(0), (7, 7, 2))
  params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), params)  # non-zero biases too
  x = rng.uniform(size=(3, 7, 7, 2))  # 7 -> 3 -> 1: odd sizes drop their last row and column when pooled
  expect = cnn_reference(params, x)
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(params, x), expect, rtol=1e-10, atol=1e-12)
  p32 = jax.tree.map(lambda a: a.astype(np.float32), params)
  np.testing.assert_allclose(apply(p32, x.astype(np.float32)), expect, rtol=1e-5, atol=1e-5)
