"""Merge rules against float64 numpy oracles, closed forms and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import bmerge
from bmerge import grid
from bmerge import merge
from bmerge.merge import rules


def _params(rng, t, scale=1.0, lead=()):
  """A Linen-like params pytree with T stacked models."""
  return {"dense": {"kernel": scale * rng.normal(size=lead + (t, 4, 3)), "bias": scale * rng.normal(size=lead + (t, 3))},
          "out": scale * rng.normal(size=lead + (t, 5))}


def _flat(tree, lead):
  return np.concatenate([np.reshape(x, np.shape(x)[:lead] + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def _diag_oracle(means, precs, alphas, m0=None, h0=None):
  m, h = _flat(means, 1), _flat(precs, 1)
  num = alphas @ (h * m)
  den = alphas @ h
  if m0 is not None:
    gamma = 1 - alphas.sum(1, keepdims=True)
    num = num + gamma * (h0 * m0)
    den = den + gamma * h0
  return num / den


def _stacked_diag(rng, t=3, spread=1.0):
  means = _params(rng, t)
  precs = jax.tree.map(lambda x: np.exp(spread * rng.normal(size=x.shape)), means)
  return bmerge.DiagGaussian(means, precs)


def test_one_hot_alpha_returns_that_task(x64):
  rng = np.random.default_rng(0)
  q = _stacked_diag(rng)
  eye = np.eye(3)
  for out in (merge.hessian_weighted(q, eye), merge.simple_average(q.mean, eye),
              merge.task_arithmetic(jax.tree.map(lambda x: x[0] * 0.3, q.mean), q.mean, eye)):
    np.testing.assert_allclose(_flat(out, 1), _flat(q.mean, 1), rtol=0, atol=1e-12)
  full = bmerge.FullGaussian(rng.normal(size=(3, 6)), _spd(rng, 3, 6))
  np.testing.assert_allclose(merge.hessian_weighted(full, eye), full.mean, atol=1e-12)


def _spd(rng, t, p, cond=10.0):
  out = []
  for _ in range(t):
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    out.append(q @ np.diag(np.geomspace(1.0, cond, p)) @ q.T)
  return np.stack(out)


def test_linear_rules_match_oracle(x64):
  rng = np.random.default_rng(1)
  q = _stacked_diag(rng)
  alphas = grid.simplex(3, 0.1)
  np.testing.assert_allclose(_flat(merge.simple_average(q.mean, alphas), 1), alphas @ _flat(q.mean, 1), atol=1e-12)
  base = jax.tree.map(lambda x: rng.normal(size=x.shape[1:]), q.mean)
  scaled = 1.7 * alphas  # task arithmetic scaling factors need not sum to 1
  want = _flat(base, 0) + scaled @ (_flat(q.mean, 1) - _flat(base, 0))
  np.testing.assert_allclose(_flat(merge.task_arithmetic(base, q.mean, scaled), 1), want, atol=1e-12)
  # Simple averaging with weights not summing to one: the N(0, I) prior contributes gamma * 0.
  np.testing.assert_allclose(_flat(merge.simple_average(q.mean, 0.5 * alphas), 1), 0.5 * alphas @ _flat(q.mean, 1),
                             atol=1e-12)


def test_simple_average_is_isotropic_hessian_weighted(x64):
  rng = np.random.default_rng(2)
  q = _stacked_diag(rng)
  iso = bmerge.IsoGaussian(q.mean, np.ones(3))
  prior = bmerge.IsoGaussian(jax.tree.map(lambda x: np.zeros(x.shape[1:]), q.mean), np.ones(()))
  alphas = 0.8 * grid.simplex(3, 0.25)
  np.testing.assert_allclose(_flat(merge.hessian_weighted(iso, alphas, prior=prior), 1),
                             _flat(merge.simple_average(q.mean, alphas), 1), atol=1e-12)


def test_diag_hessian_matches_oracle_with_and_without_prior(x64):
  rng = np.random.default_rng(3)
  q = _stacked_diag(rng)
  alphas = grid.simplex(3, 0.05)
  np.testing.assert_allclose(_flat(merge.hessian_weighted(q, alphas), 1),
                             _diag_oracle(q.mean, q.precision, alphas), atol=1e-12)
  prior = bmerge.DiagGaussian(jax.tree.map(lambda x: rng.normal(size=x.shape[1:]), q.mean),
                              jax.tree.map(lambda x: np.exp(rng.normal(size=x.shape[1:])), q.mean))
  sub = 0.7 * alphas  # gamma = 0.3 goes to the prior
  np.testing.assert_allclose(_flat(merge.hessian_weighted(q, sub, prior=prior), 1),
                             _diag_oracle(q.mean, q.precision, sub, _flat(prior.mean, 0), _flat(prior.precision, 0)),
                             atol=1e-12)


def test_full_hessian_minimises_quadratic_surrogate(x64):
  rng = np.random.default_rng(4)
  t, p = 3, 5
  means, precs = rng.normal(size=(t, p)), _spd(rng, t, p)
  alphas = grid.simplex(3, 0.25)
  out = np.asarray(merge.hessian_weighted(bmerge.FullGaussian(means, precs), alphas))
  for a, theta in zip(alphas, out):
    surrogate = lambda x, a=a: sum(a[i] * 0.5 * (x - means[i]) @ precs[i] @ (x - means[i]) for i in range(t))
    best = scipy.optimize.minimize(surrogate, np.zeros(p), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(theta, best, atol=1e-6)
    grad = sum(a[i] * precs[i] @ (theta - means[i]) for i in range(t))
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)


def test_full_with_diagonal_precisions_equals_diag_rule(x64):
  rng = np.random.default_rng(5)
  t, p = 3, 7
  means, h = rng.normal(size=(t, p)), np.exp(rng.normal(size=(t, p)))
  full = bmerge.FullGaussian(means, np.stack([np.diag(x) for x in h]))
  alphas = grid.simplex(3, 0.1)
  prior = bmerge.DiagGaussian(np.zeros(p), np.full(p, 0.5))
  np.testing.assert_allclose(merge.hessian_weighted(full, 0.9 * alphas, prior=prior),
                             merge.hessian_weighted(bmerge.DiagGaussian(means, h), 0.9 * alphas, prior=prior),
                             atol=1e-12)


def test_batched_grid_equals_loop_over_alphas():
  rng = np.random.default_rng(6)
  q = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _stacked_diag(rng))
  alphas = grid.simplex(3, 0.1)
  batched = merge.hessian_weighted(q, alphas)
  for i in range(0, len(alphas), 7):
    one = merge.hessian_weighted(q, alphas[i])
    jax.tree.map(lambda b, o: np.testing.assert_allclose(b[i], o, atol=2e-6), batched, one)


def test_one_trace_per_shape():
  rng = np.random.default_rng(7)
  q = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _stacked_diag(rng))
  rules._diag_core.clear_cache()
  for spacing in (0.1, 0.1, 0.1):
    merge.hessian_weighted(q, grid.simplex(3, spacing))
  assert rules._diag_core._cache_size() == 1
  merge.hessian_weighted(q, grid.simplex(3, 0.05))
  assert rules._diag_core._cache_size() == 2


def test_beta_bernoulli_matches_appendix_a2(x64):
  # Three coin flips y_t with a Beta(a0, b0) prior: a_t = y_t + a0, b_t = 1 - y_t + b0.
  a0, b0 = 2.0, 3.0
  y = np.array([1.0, 0.0, 1.0])
  q = bmerge.Beta(y + a0, 1 - y + b0)
  alphas = grid.simplex(3, 0.1)
  theta = np.asarray(merge.exponential_family(q, alphas))
  a_al, b_al = alphas @ q.a, alphas @ q.b  # weighted averages of a_t and b_t
  np.testing.assert_allclose(theta, np.log((a_al - 1) / (b_al - 1)), atol=1e-12)
  pi = 1 / (1 + np.exp(-theta))
  np.testing.assert_allclose(pi, (a_al - 1) / (a_al + b_al - 2), atol=1e-12)  # the Beta mode
  # The mode maximises the aggregated log density theta (a - 1) - (a + b - 2) log(1 + e^theta).
  for th, a, b in zip(theta, a_al, b_al):
    f = lambda x: -(x * (a - 1) - (a + b - 2) * np.logaddexp(0, x))
    assert abs(scipy.optimize.minimize_scalar(f).x - th) < 1e-5
  # With a prior: lambda_alpha = sum alpha_t lambda_t + gamma lambda_0.
  sub = 0.6 * alphas
  theta_p = np.asarray(merge.exponential_family(q, sub, prior=bmerge.Beta(np.array(a0), np.array(b0))))
  gam = 1 - sub.sum(1)
  np.testing.assert_allclose(theta_p, np.log((sub @ (q.a - 1) + gam * (a0 - 1)) / (sub @ (q.b - 1) + gam * (b0 - 1))),
                             atol=1e-12)


def test_exponential_family_gaussian_is_eq10(x64):
  rng = np.random.default_rng(8)
  q = _stacked_diag(rng)
  alphas = grid.simplex(3, 0.2)
  np.testing.assert_allclose(_flat(merge.exponential_family(q, alphas), 1),
                             _flat(merge.hessian_weighted(q, alphas), 1), atol=1e-10)
  full = bmerge.FullGaussian(rng.normal(size=(3, 4)), _spd(rng, 3, 4))
  np.testing.assert_allclose(merge.exponential_family(full, alphas), merge.hessian_weighted(full, alphas), atol=1e-10)


def test_float32_realistic_finetuned_weights_match_float64():
  """|theta| ~ 1, task vectors ~ 1e-3, precisions over 4 orders of magnitude: float32 within 2e-6 of float64."""
  rng = np.random.default_rng(9)
  t, shape = 3, (200, 50)
  base = rng.normal(size=shape)
  means64 = {"w": base + 1e-3 * rng.normal(size=(t,) + shape), "b": 1.0 + 1e-3 * rng.normal(size=(t, 50))}
  precs64 = jax.tree.map(lambda x: 10.0 ** rng.uniform(0, 4, size=x.shape), means64)
  alphas = grid.simplex(3, 0.05)
  want_h = _diag_oracle(means64, precs64, alphas)
  want_s = alphas @ _flat(means64, 1)
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  got_h = _flat(merge.hessian_weighted(bmerge.DiagGaussian(f32(means64), f32(precs64)), alphas.astype(np.float32)), 1)
  got_s = _flat(merge.simple_average(f32(means64), alphas.astype(np.float32)), 1)
  base32 = {"w": jnp.asarray(base, jnp.float32), "b": jnp.ones(50, jnp.float32)}
  got_t = _flat(merge.task_arithmetic(base32, f32(means64), alphas.astype(np.float32)), 1)
  # The float64 oracle for task arithmetic uses the float32-rounded base, as the user's base is float32.
  base_r = _flat(jax.tree.map(np.asarray, base32), 0).astype(np.float64)
  want_t = base_r + alphas @ (_flat(jax.tree.map(lambda x: np.asarray(x, np.float32), means64), 1) - base_r)
  assert got_h.dtype == np.float32
  for got, want in ((got_h, want_h), (got_s, want_s), (got_t, want_t)):
    # Inputs are rounded to float32 first (|theta| ~ 1 so ~6e-8); the rest must not add more than 2e-6.
    assert np.max(np.abs(got - want)) < 2e-6


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before compilation, naming the argument.


def test_errors_alphas_shape_and_values():
  rng = np.random.default_rng(10)
  q = _stacked_diag(rng)
  with pytest.raises(ValueError, match=r"`alphas` has 2 weights per row .* T = 3"):
    merge.hessian_weighted(q, np.ones((4, 2)) / 2)
  with pytest.raises(ValueError, match=r"`alphas` must be non-negative; row 1"):
    merge.hessian_weighted(q, np.array([[1, 0, 0], [1.5, -0.5, 0]]))
  with pytest.raises(ValueError, match=r"`alphas` must be finite"):
    merge.simple_average(q.mean, np.array([[np.nan, 0.5, 0.5]]))
  with pytest.raises(ValueError, match=r"empty grid"):
    merge.simple_average(q.mean, np.zeros((0, 3)))
  with pytest.raises(ValueError, match=r"shape \[G, T\] or \[T\]"):
    merge.simple_average(q.mean, np.ones((2, 3, 1)))
  with pytest.raises(ValueError, match=r"row 0 sums to 0.9.*pass `prior=`"):
    merge.hessian_weighted(q, np.array([[0.3, 0.3, 0.3]]))


def test_errors_structures_and_precisions():
  rng = np.random.default_rng(11)
  q = _stacked_diag(rng)
  bad_struct = bmerge.DiagGaussian(q.mean, {"dense": q.precision["dense"]})
  with pytest.raises(ValueError, match=r"`posteriors.precision` and `posteriors.mean` must have the same pytree"):
    merge.hessian_weighted(bad_struct, np.eye(3))
  bad_shape = bmerge.DiagGaussian(q.mean, {**q.precision, "out": np.ones((3, 6))})
  with pytest.raises(ValueError, match=r"precision\['out'\]` has shape \(3, 6\) per model but `posteriors.mean` has \(3, 5\)"):
    merge.hessian_weighted(bad_shape, np.eye(3))
  uneven = {**q.mean, "out": np.ones((2, 5))}
  with pytest.raises(ValueError, match=r"`means\['out'\]` has shape \(2, 5\); expected leading axes \(3,\)"):
    merge.simple_average(uneven, np.eye(3))
  neg = bmerge.DiagGaussian(q.mean, {**q.precision, "out": -np.ones((3, 5))})
  with pytest.raises(ValueError, match=r"`posteriors.precision\['out'\]` must be > 0"):
    merge.hessian_weighted(neg, np.eye(3))
  inf = bmerge.DiagGaussian(q.mean, {**q.precision, "out": np.full((3, 5), np.inf)})
  with pytest.raises(ValueError, match=r"`posteriors.precision\['out'\]` must be finite"):
    merge.hessian_weighted(inf, np.eye(3))
  nan_mean = bmerge.DiagGaussian({**q.mean, "out": np.full((3, 5), np.nan)}, q.precision)
  with pytest.raises(ValueError, match=r"`posteriors.mean\['out'\]` must be finite"):
    merge.hessian_weighted(nan_mean, np.eye(3))
  base = {"dense": q.mean["dense"]}
  with pytest.raises(ValueError, match=r"`finetuned` and `base` must have the same pytree structure"):
    merge.task_arithmetic(jax.tree.map(lambda x: x[0], base), q.mean, np.eye(3))
  with pytest.raises(TypeError, match="mixture_weighted"):
    merge.hessian_weighted(bmerge.Mixture(q, np.zeros((3, 1))), np.eye(3))
  not_pd = bmerge.FullGaussian(np.zeros((2, 3)), np.stack([np.eye(3), -np.eye(3)]))
  with pytest.raises(ValueError, match=r"`posteriors.precision` must be positive definite"):
    merge.hessian_weighted(not_pd, np.eye(2))
  with pytest.raises(ValueError, match=r"`prior.precision` must be > 0"):
    merge.hessian_weighted(q, 0.5 * np.eye(3), prior=bmerge.IsoGaussian(jax.tree.map(lambda x: x[0], q.mean),
                                                                         np.array(-1.0)))


def test_error_negative_merged_precision_with_prior():
  rng = np.random.default_rng(12)
  q = _stacked_diag(rng)
  prior = bmerge.IsoGaussian(jax.tree.map(lambda x: x[0], q.mean), np.array(1e6))
  with pytest.raises(ValueError, match=r"merged precision .* <= 0"):
    merge.hessian_weighted(q, np.array([[1.0, 1.0, 0.0]]), prior=prior)


def test_works_on_nnx_state():
  from flax import nnx
  models = [nnx.Linear(3, 2, rngs=nnx.Rngs(i)) for i in range(3)]
  states = [nnx.split(m)[1] for m in models]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
  out = merge.simple_average(stacked, np.array([[0.2, 0.3, 0.5]]))
  want = sum(w * s["kernel"][...] for w, s in zip([0.2, 0.3, 0.5], states))
  np.testing.assert_allclose(out["kernel"][...][0], want, atol=1e-6)
  assert jax.tree.structure(jax.tree.map(lambda x: x[0], out)) == jax.tree.structure(states[0])


def test_composes_inside_user_jit():
  rng = np.random.default_rng(13)
  q = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _stacked_diag(rng))

  @jax.jit
  def f(alpha):
    return merge.hessian_weighted(q, alpha)

  a = jnp.asarray(grid.simplex(3, 0.25), jnp.float32)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), f(a), merge.hessian_weighted(q, a))
