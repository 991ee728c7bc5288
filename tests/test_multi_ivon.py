"""Tests of bmerge.optim.multi_ivon and of IVON / MultiIVON posteriors going straight into the merge rules."""

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ivon_step

import bmerge
from bmerge.optim import IVONState, ivon, ivon_posterior
from bmerge.optim import multi_ivon

ESS, WD = 32.0, 1e-3
TX = ivon(0.05, ESS, hess_init=0.5, beta2=0.99, weight_decay=WD)


class Carry(NamedTuple):
  params: dict
  opt_state: IVONState


def _task(t):
  """Linear regression data of task t (32 points, 3 features)."""
  x = jax.random.normal(jax.random.key(100 + t), (32, 3))
  w = jnp.array([[1.0, -2.0, 0.5], [-1.0, 0.5, 2.0]])[t]
  return x, x @ w + 0.3 * t


def _loss(p, x, y):
  return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def _fns(t):
  x, y = _task(t)

  def init_fn(key):
    params = {"w": 0.1 * jax.random.normal(key, (3,)), "b": jnp.zeros(())}
    return Carry(params, TX.init(params))

  train = ivon_step(TX, _loss, ESS, WD, 2)

  def step_fn(key, carry, step):
    i = (step % 4) * 8  # minibatches of 8 cycle over the 32 points
    xb, yb = jax.lax.dynamic_slice_in_dim(x, i, 8), jax.lax.dynamic_slice_in_dim(y, i, 8)
    return Carry(*train(key, carry.params, carry.opt_state, xb, yb))

  posterior_fn = lambda c: ivon_posterior(c.params, c.opt_state, ESS, WD)
  return init_fn, step_fn, posterior_fn


def test_equal_mixture_weights_and_components():
  qs = [bmerge.DiagGaussian({"a": jnp.full(2, float(k))}, {"a": jnp.full(2, k + 1.0)}) for k in range(4)]
  mix = multi_ivon.equal_mixture(qs)
  assert isinstance(mix, bmerge.Mixture)
  np.testing.assert_allclose(mix.log_weights, np.full(4, -math.log(4)), rtol=1e-6)
  np.testing.assert_allclose(jax.nn.logsumexp(mix.log_weights), 0.0, atol=1e-6)
  chex.assert_trees_all_equal(mix.components, bmerge.stack(qs))
  with pytest.raises(ValueError, match="`posteriors`"):
    multi_ivon.equal_mixture([])
  with pytest.raises(TypeError, match=r"`posteriors\[1\]`"):
    multi_ivon.equal_mixture([qs[0], {"a": 1}])


def test_collect_equals_ivon_posteriors_at_the_stop_steps():
  init_fn, step_fn, posterior_fn = _fns(0)
  keys = jax.random.split(jax.random.key(0), 2)
  stops = [3, 6, 9]
  mix = multi_ivon.collect(keys, init_fn, step_fn, posterior_fn, stops)
  k = len(keys) * len(stops)
  assert mix.log_weights.shape == (k,)
  np.testing.assert_allclose(mix.log_weights, -math.log(k), rtol=1e-6)
  chex.assert_tree_shape_prefix(mix.components, (k,))

  # Oracle: the documented key derivation, a plain Python loop over steps, no jit.
  expected, step_fn = [], jax.jit(step_fn)
  for key in keys:
    k_init, k_train = jax.random.split(key)
    step_keys = jax.random.split(k_train, stops[-1])
    carry = init_fn(k_init)
    for i in range(stops[-1]):
      carry = step_fn(step_keys[i], carry, jnp.int32(i))
      if i + 1 in stops:
        expected.append(posterior_fn(carry))
  chex.assert_trees_all_close(mix.components, bmerge.stack(expected), rtol=1e-5, atol=1e-6)
  # Components differ across stop steps and seeds (else the mixture would be one Gaussian).
  means = np.asarray(mix.components.mean["w"])
  assert np.min([np.abs(means[i] - means[j]).max() for i in range(k) for j in range(i)]) > 1e-4


def test_collect_validates_its_arguments():
  init_fn, step_fn, posterior_fn = _fns(0)
  keys = jax.random.split(jax.random.key(0), 2)
  for bad in ([], [0, 3], [5, 5], [6, 3]):
    with pytest.raises(ValueError, match="`stop_steps`"):
      multi_ivon.collect(keys, init_fn, step_fn, posterior_fn, bad)
  with pytest.raises(ValueError, match="`keys`"):
    multi_ivon.collect(jnp.zeros((2, 2), jnp.uint32), init_fn, step_fn, posterior_fn, [3])


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_multi_ivon_mixtures_go_straight_into_the_merge_rules():
  # Per-task MultiIVON mixtures -> bmerge.merge.mixture_weighted; single IVON posteriors ->
  # bmerge.merge.hessian_weighted; K = 1 mixtures reduce to the Hessian-weighted merge.
  keys = jax.random.split(jax.random.key(1), 2)
  mixtures = [multi_ivon.collect(keys, *_fns(t), stop_steps=[10, 20, 30]) for t in range(2)]
  stacked = bmerge.stack(mixtures)
  alphas = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75]])
  merged = bmerge.merge.mixture_weighted(stacked, alphas, num_iters=100)
  chex.assert_tree_shape_prefix(merged, (4,))

  # Oracle for every alpha: the EM fixed point theta = sum r a h theta_k / sum r a h, with r_tk the responsibilities
  # of theta under each task's mixture, in float64 numpy (paper Eq. 12, Algorithm 1).
  means = np.stack([[_flat(jax.tree.map(lambda x, k=k: x[k], m.components.mean)) for k in range(6)]
                    for m in mixtures])  # [T, K, P]
  precs = np.stack([[_flat(jax.tree.map(lambda x, k=k: x[k], m.components.precision)) for k in range(6)]
                    for m in mixtures])
  for g, alpha in enumerate(np.asarray(alphas)):
    theta = _flat(jax.tree.map(lambda x, g=g: x[g], merged))
    logp = -0.5 * np.sum(precs * (theta - means) ** 2, -1) + 0.5 * np.sum(np.log(precs), -1)  # [T, K]
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    w = (alpha[:, None] * r)[..., None] * precs
    np.testing.assert_allclose(theta, np.sum(w * means, (0, 1)) / np.sum(w, (0, 1)), rtol=1e-4, atol=1e-5)
  # One-hot: the mode lies inside the hull of that task's component means, not the other task's.
  for t in range(2):
    theta = _flat(jax.tree.map(lambda x, t=t: x[t], merged))
    assert np.all(theta >= means[t].min(0) - 1e-5) and np.all(theta <= means[t].max(0) + 1e-5)

  # K = 1: the last IVON posterior of each task as a one-component mixture merges like Eq. 10.
  last = [jax.tree.map(lambda x: x[-1], m.components) for m in mixtures]
  single = bmerge.stack([multi_ivon.equal_mixture([q]) for q in last])
  hess = bmerge.merge.hessian_weighted(bmerge.stack(last), alphas)
  chex.assert_trees_all_close(bmerge.merge.mixture_weighted(single, alphas, num_iters=3), hess,
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], hess), last[0].mean, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], hess), last[1].mean, rtol=1e-6, atol=1e-6)
