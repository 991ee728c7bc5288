"""The batched mixture mode finder against the per-alpha algorithm, closed forms and the EM invariant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import bmerge
from bmerge import em
from bmerge import grid
from bmerge import merge


def _mixtures(rng, t=3, k=4, shape=(6,), spread=1.0, jitter=1.0):
  means = {"a": rng.normal(size=(t, 1) + shape) + jitter * rng.normal(size=(t, k) + shape),
           "b": rng.normal(size=(t, k, 2, 2))}
  precs = jax.tree.map(lambda x: np.exp(spread * rng.normal(size=x.shape)), means)
  return bmerge.Mixture(bmerge.DiagGaussian(means, precs), rng.normal(size=(t, k)))


def _flat(tree, lead):
  return np.concatenate([np.reshape(x, np.shape(x)[:lead] + (-1,)) for x in jax.tree.leaves(tree)], axis=-1)


def _objective(mix, alpha, theta):
  """Brute-force sum_t alpha_t log q_t(theta) in float64 numpy."""
  m, h = _flat(mix.components.mean, 2), _flat(mix.components.precision, 2)
  logpi = mix.log_weights - logsumexp(mix.log_weights, axis=1, keepdims=True)
  lj = logpi + 0.5 * np.sum(np.log(h / (2 * np.pi)), -1) - 0.5 * np.sum(h * (theta - m) ** 2, -1)
  return float(np.sum(alpha * logsumexp(lj, axis=1)))


def test_k1_equals_eq10(x64):
  rng = np.random.default_rng(0)
  mix = _mixtures(rng, k=1)
  alphas = grid.simplex(3, 0.1)
  diag = jax.tree.map(lambda x: x[:, 0], mix.components)
  res = em.find_modes(mix, alphas, num_iters=5)
  np.testing.assert_allclose(_flat(res.params, 1), _flat(merge.hessian_weighted(diag, alphas), 1), atol=1e-12)
  np.testing.assert_allclose(res.step_size, 0.0, atol=1e-12)  # Eq. 10 is the fixed point


def test_objective_is_true_log_density_and_never_decreases(x64):
  rng = np.random.default_rng(1)
  mix = _mixtures(rng, k=5, jitter=2.0)
  alphas = grid.simplex(3, 0.1)
  res = em.find_modes(mix, alphas, num_iters=30)
  assert res.objective.shape == (31, len(alphas))
  assert np.all(np.diff(np.asarray(res.objective), axis=0) >= -1e-9)
  assert np.any(np.diff(np.asarray(res.objective), axis=0) > 1e-3)  # it actually moves
  params = _flat(res.params, 1)
  for g in range(0, len(alphas), 9):
    np.testing.assert_allclose(res.objective[-1, g], _objective(mix, alphas[g], params[g]), rtol=1e-10)


def test_converged_mode_is_stationary(x64):
  rng = np.random.default_rng(2)
  mix = _mixtures(rng, k=3, jitter=0.5)
  alpha = np.array([0.2, 0.5, 0.3])
  res = em.find_modes(mix, alpha, num_iters=500)
  theta = _flat(res.params, 0)
  m, h = _flat(mix.components.mean, 2), _flat(mix.components.precision, 2)

  def f(x):
    logpi = jax.nn.log_softmax(mix.log_weights, axis=1)
    lj = logpi + 0.5 * jnp.sum(jnp.log(h), -1) - 0.5 * jnp.sum(h * (x - m) ** 2, -1)
    return jnp.sum(alpha * jax.scipy.special.logsumexp(lj, axis=1))

  assert res.step_size < 1e-10
  np.testing.assert_allclose(jax.grad(f)(theta), 0.0, atol=1e-7)


def test_batched_grid_equals_per_alpha_algorithm(x64):
  rng = np.random.default_rng(3)
  mix = _mixtures(rng, k=4, jitter=1.5)
  alphas = grid.simplex(3, 0.1)
  res = em.find_modes(mix, alphas, num_iters=8)
  ref = jax.jit(jax.vmap(em.find_mode_reference, in_axes=(None, 0, None)), static_argnums=2)(mix, alphas, 8)
  np.testing.assert_allclose(_flat(res.params, 1), _flat(ref, 1), atol=1e-10)


def test_float32_realistic_matches_float64():
  """Finetuned components near one base (|theta| ~ 1, offsets ~ 1e-3), precisions over 4 decades."""
  rng = np.random.default_rng(4)
  t, k, p = 3, 5, 4000
  base = rng.normal(size=p)
  means = base + 1e-3 * rng.normal(size=(t, 1, p)) + 3e-4 * rng.normal(size=(t, k, p))
  precs = 10.0 ** rng.uniform(0, 4, size=(t, k, p))
  logw = rng.normal(size=(t, k))
  alphas = grid.simplex(3, 0.05)
  with jax.enable_x64(True):
    want = np.asarray(em.find_modes(bmerge.Mixture(bmerge.DiagGaussian(means, precs), logw), alphas, 10).params)
  m32 = bmerge.Mixture(bmerge.DiagGaussian(jnp.asarray(means, jnp.float32), jnp.asarray(precs, jnp.float32)),
                       jnp.asarray(logw, jnp.float32))
  got = em.find_modes(m32, jnp.asarray(alphas, jnp.float32), 10)
  assert got.params.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(got.params, np.float64) - want)) < 2e-6
  # The iterations matter here: the mode moved well beyond the tolerance from its starting point.
  with jax.enable_x64(True):
    start = np.asarray(em.find_modes(bmerge.Mixture(bmerge.DiagGaussian(means, precs), logw), alphas, 0).params)
  assert np.max(np.abs(want - start)) > 1e-5


def test_prior_and_init(x64):
  rng = np.random.default_rng(5)
  mix = _mixtures(rng, k=1)
  diag = jax.tree.map(lambda x: x[:, 0], mix.components)
  prior = bmerge.DiagGaussian(jax.tree.map(lambda x: np.zeros(x.shape[1:]), diag.mean),
                              jax.tree.map(lambda x: np.full(x.shape[1:], 2.0), diag.mean))
  alphas = 0.6 * grid.simplex(3, 0.25)
  res = em.find_modes(mix, alphas, num_iters=3, prior=prior)
  np.testing.assert_allclose(_flat(res.params, 1), _flat(merge.hessian_weighted(diag, alphas, prior=prior), 1),
                             atol=1e-12)
  # Starting anywhere, K = 1 reaches Eq. 10 in one step.
  init = jax.tree.map(lambda x: rng.normal(size=(len(alphas),) + x.shape[1:]), diag.mean)
  res = em.find_modes(mix, alphas, num_iters=1, prior=prior, init=init)
  np.testing.assert_allclose(_flat(res.params, 1), _flat(merge.hessian_weighted(diag, alphas, prior=prior), 1),
                             atol=1e-12)


def _full_mixtures(rng, t=2, k=3, p=3):
  means = rng.normal(size=(t, k, p))
  qs = np.linalg.qr(rng.normal(size=(t, k, p, p)))[0]
  precs = qs @ (np.exp(rng.normal(size=(t, k, p)))[..., None] * np.swapaxes(qs, -1, -2))
  return bmerge.Mixture(bmerge.FullGaussian(means, precs), rng.normal(size=(t, k)))


def test_full_covariance_em(x64):
  rng = np.random.default_rng(6)
  mix = _full_mixtures(rng)
  alphas = grid.simplex(2, 0.1)
  res = em.find_modes(mix, alphas, num_iters=20, chunk_size=4)
  assert np.all(np.diff(np.asarray(res.objective), axis=0) >= -1e-9)
  m, h = mix.components.mean, mix.components.precision
  logpi = mix.log_weights - logsumexp(mix.log_weights, axis=1, keepdims=True)
  for g, a in enumerate(alphas):
    # Brute-force Algorithm 1 with matrices.
    w = a[:, None] * np.exp(logpi)
    x = np.linalg.solve(np.einsum("tk,tkij->ij", w, h), np.einsum("tk,tkij,tkj->i", w, h, m))
    for _ in range(20):
      diff = x - m
      lj = logpi + 0.5 * np.linalg.slogdet(h)[1] - 0.5 * np.einsum("tki,tkij,tkj->tk", diff, h, diff)
      r = np.exp(lj - logsumexp(lj, axis=1, keepdims=True)) * a[:, None]
      x = np.linalg.solve(np.einsum("tk,tkij->ij", r, h), np.einsum("tk,tkij,tkj->i", r, h, m))
    np.testing.assert_allclose(res.params[g], x, atol=1e-10)
  # K = 1 full components: Eq. 10 with full matrices.
  one = bmerge.Mixture(jax.tree.map(lambda x: x[:, :1], mix.components), np.zeros((2, 1)))
  full = jax.tree.map(lambda x: x[:, 0], mix.components)
  np.testing.assert_allclose(em.find_modes(one, alphas, 2).params, merge.hessian_weighted(full, alphas), atol=1e-12)


def test_mixture_weighted_wrapper_and_traces():
  rng = np.random.default_rng(7)
  mix = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _mixtures(rng))
  em._diag_em.clear_cache()
  alphas = grid.simplex(3, 0.1)
  a = merge.mixture_weighted(mix, alphas, num_iters=4)
  b = merge.mixture_weighted(mix, alphas, num_iters=4)
  assert em._diag_em._cache_size() == 1
  jax.tree.map(np.testing.assert_array_equal, a, b)
  single = merge.mixture_weighted(mix, alphas[5], num_iters=4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x[5], y, atol=2e-6), a, single)


def test_errors():
  rng = np.random.default_rng(8)
  mix = _mixtures(rng, k=4)
  with pytest.raises(ValueError, match=r"`mixtures.components.mean\['a'\]` has shape .* expected leading axes \(3, 2\)"):
    em.find_modes(bmerge.Mixture(mix.components, np.zeros((3, 2))), np.eye(3))
  with pytest.raises(ValueError, match=r"`mixtures.log_weights` must be \[T, K\]"):
    em.find_modes(bmerge.Mixture(mix.components, np.zeros(4)), np.eye(3))
  with pytest.raises(TypeError, match=r"`mixtures` must be a stacked `bmerge.Mixture`"):
    em.find_modes(mix.components, np.eye(3))
  with pytest.raises(ValueError, match=r"`num_iters` must be a non-negative integer"):
    em.find_modes(mix, np.eye(3), num_iters=-1)
  with pytest.raises(ValueError, match=r"`alphas` has 2 weights per row"):
    em.find_modes(mix, np.ones((3, 2)) / 2)
  bad = bmerge.Mixture(bmerge.DiagGaussian(mix.components.mean, jax.tree.map(lambda x: 0 * x, mix.components.mean)),
                       mix.log_weights)
  with pytest.raises(ValueError, match=r"`mixtures.components.precision\['a'\]` must be > 0"):
    em.find_modes(bad, np.eye(3))
  with pytest.raises(ValueError, match=r"`mixtures.log_weights` must be finite"):
    em.find_modes(bmerge.Mixture(mix.components, np.full((3, 4), np.nan)), np.eye(3))


@pytest.mark.parametrize("num_iters", [0, 1, 6])
def test_blocked_sweep_is_independent_of_block_size(x64, num_iters):
  """Blocks of 4 over P = 10 (the last one padded) give the one-block result, with a prior and an init."""
  rng = np.random.default_rng(9)
  mix = _mixtures(rng, k=3, jitter=1.5)
  alphas = 0.8 * grid.simplex(3, 0.25)
  prior = bmerge.DiagGaussian(jax.tree.map(lambda x: rng.normal(size=x.shape[2:]), mix.components.mean),
                              jax.tree.map(lambda x: np.exp(rng.normal(size=x.shape[2:])), mix.components.mean))
  init = jax.tree.map(lambda x: rng.normal(size=(len(alphas),) + x.shape[2:]), mix.components.mean)
  for kw in ({}, {"init": init}):
    one = em.find_modes(mix, alphas, num_iters, prior=prior, **kw)
    blocked = em.find_modes(mix, alphas, num_iters, prior=prior, block_size=4, **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12), one, blocked)
  if num_iters:
    assert np.all(np.diff(np.asarray(blocked.objective), axis=0) >= -1e-9)
  with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
    em.find_modes(mix, alphas, 1, prior=prior, block_size=0)
