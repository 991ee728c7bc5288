"""Mixture-of-Gaussians VI: recovering mixture targets exactly, K = 1 is VON, diagonal = full in 1-D, merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import logistic_regression
from jax.scipy.special import logsumexp
from jax.scipy.stats import multivariate_normal, norm

import bmerge
from bmerge import merge
from bmerge.optim import mog, von

# The bimodal target: 0.3 N(-2, 0.5^2) + 0.7 N(2, 0.5^2).
WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([-2.0, 2.0])
PRECS = np.array([4.0, 4.0])


def _bimodal_loss(z):
  z = z[0]
  return -jnp.logaddexp(jnp.log(0.3) + norm.logpdf(z, -2.0, 0.5), jnp.log(0.7) + norm.logpdf(z, 2.0, 0.5))


# Settings for the 1-D target: components start outside the modes (at +-3) so each moves inward onto one of them.
# Once q equals the target, f = log p - log q is 0 everywhere, so the Monte-Carlo noise vanishes at the solution and
# the fit is exact to ~1e-7. Over 200 seeds none missed the 2 % tolerance with these settings.
FIT_1D = dict(num_steps=200, beta=0.2, beta_w=0.1, num_samples=10)
INIT_1D = (np.array([[-3.0], [3.0]]), np.ones((2, 1, 1)))


def _rel_errors(state):
  w = np.exp(np.asarray(state.log_weights))
  return (np.max(np.abs(w - WEIGHTS) / WEIGHTS), np.max(np.abs(np.ravel(state.mean) - MEANS) / np.abs(MEANS)),
          np.max(np.abs(np.ravel(state.precision) - PRECS) / PRECS))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k2_recovers_the_bimodal_target(x64, seed):
  state = mog.fit(jax.random.key(seed), _bimodal_loss, *INIT_1D, **FIT_1D)
  assert max(_rel_errors(state)) <= 0.02
  np.testing.assert_allclose(logsumexp(state.log_weights), 0.0, atol=1e-12)
  q = mog.posterior(state)
  assert isinstance(q, bmerge.Mixture) and isinstance(q.components, bmerge.FullGaussian)
  assert q.components.mean.shape == (2, 1) and q.components.precision.shape == (2, 1, 1)


def test_k2_recovers_a_correlated_2d_mixture(x64):
  # Full 2x2 precisions exercise every term of the entropy Hessian (the a_c a_c^T terms vanish in 1-D with K = 1).
  mu = np.array([[-2.0, 1.0], [2.0, -1.0]])
  cov = np.array([[[0.5, 0.3], [0.3, 0.4]], [[0.3, -0.1], [-0.1, 0.6]]])
  w = np.array([0.4, 0.6])

  def loss(z):
    return -jnp.logaddexp(jnp.log(w[0]) + multivariate_normal.logpdf(z, mu[0], cov[0]),
                          jnp.log(w[1]) + multivariate_normal.logpdf(z, mu[1], cov[1]))

  state = mog.fit(jax.random.key(0), loss, np.array([[-4.0, 0.0], [4.0, 0.0]]), np.stack([np.eye(2)] * 2),
                  num_steps=200, beta=0.2, beta_w=0.1, num_samples=10)
  prec = np.linalg.inv(cov)
  np.testing.assert_allclose(np.exp(state.log_weights), w, rtol=0.02)
  np.testing.assert_allclose(state.mean, mu, rtol=0.02, atol=0.02)
  assert np.max(np.abs(state.precision - prec)) <= 0.02 * np.max(np.abs(prec))


@pytest.mark.parametrize("estimator, antithetic, control_variate, num_samples", [
    ("hessian", False, True, 3),  # any samples: the control variate removes E[a_1]'s Monte-Carlo term exactly
    ("hessian", True, False, 4),  # the plain estimator: antithetic pairs make that term 0 to rounding
    ("stein", True, False, 4),
])
def test_k1_is_von(x64, estimator, antithetic, control_variate, num_samples):
  # Same key, same samples, same trajectory. (VON's default PD form for Stein is a different precision step, so
  # Stein is compared with the plain form; MoG's halving never triggers here.)
  loss = logistic_regression(1, 60).loss
  kw = dict(num_samples=num_samples, estimator=estimator, antithetic=antithetic)
  algo_von = von.von(loss, 0.3, pd_correction=False, **kw)
  algo_mog = mog.mog(loss, 0.3, control_variate=control_variate, **kw)
  s_von = algo_von.init(np.zeros(3), np.eye(3))
  s_mog = algo_mog.init(np.zeros((1, 3)), np.eye(3)[None])
  for key in jax.random.split(jax.random.key(0), 10):
    s_von, info_von = algo_von.step(key, s_von)
    s_mog, info_mog = algo_mog.step(key, s_mog)
    np.testing.assert_allclose(info_mog.loss, info_von.loss, rtol=1e-12)
    np.testing.assert_allclose(s_mog.mean[0], s_von.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s_mog.precision[0], s_von.precision, rtol=1e-10)
  assert float(info_mog.step_size) == 0.3


def test_step_halves_beta_until_precisions_stay_positive_definite(x64):
  # Components three times too narrow must widen (E[delta_c hess f] > 0), so a huge beta would flip the sign.
  state = mog.init(INIT_1D[0], 12.0 * np.ones((2, 1, 1)))
  step = jax.jit(mog.step, static_argnums=(2, 5))
  big, info = step(jax.random.key(0), state, _bimodal_loss, 64.0, None, 10)
  b = float(info.step_size)
  assert 0 < b < 64.0 and np.log2(64.0 / b) == int(np.log2(64.0 / b))  # a power-of-two fraction of beta
  assert np.all(np.linalg.eigvalsh(big.precision) > 0)
  # Same key, same samples: asking for b directly takes it unchanged and gives the same state; asking for 2b halves.
  direct, info = step(jax.random.key(0), state, _bimodal_loss, b, None, 10)
  assert float(info.step_size) == b
  np.testing.assert_allclose(direct.precision, big.precision, rtol=1e-12)
  np.testing.assert_allclose(direct.mean, big.mean, rtol=1e-12)
  assert float(step(jax.random.key(0), state, _bimodal_loss, 2 * b, None, 10)[1].step_size) == b


def test_diagonal_equals_full_in_one_dimension(x64):
  kw = FIT_1D  # the same compiled full-covariance fit as the recovery test
  full = mog.fit(jax.random.key(1), _bimodal_loss, *INIT_1D, **kw)
  diag = mog.fit_diag(jax.random.key(1), _bimodal_loss, INIT_1D[0], np.ones((2, 1)), estimator="hessian", **kw)
  np.testing.assert_allclose(diag.mean[:, 0], full.mean[:, 0], rtol=1e-10)
  np.testing.assert_allclose(diag.precision[:, 0], full.precision[:, 0, 0], rtol=1e-10)
  np.testing.assert_allclose(diag.log_weights, full.log_weights, rtol=1e-10, atol=1e-12)


def test_diagonal_on_a_params_pytree_finds_the_exact_gaussian(x64):
  # A separable Gaussian target over a Linen-like params dict: q = target is reachable with K = 1, and with exact
  # diagonal Hessians and antithetic pairs the iteration is deterministic, like VON on linear regression.
  target_mean = {"dense": {"kernel": np.arange(6.0).reshape(2, 3) / 3, "bias": np.array([-1.0, 0.5, 2.0])}}
  target_prec = jax.tree.map(lambda m: 1.0 + np.abs(m), target_mean)

  def loss(params):
    return sum(jnp.sum(0.5 * h * (p - m) ** 2) for p, m, h in
               zip(jax.tree.leaves(params), jax.tree.leaves(target_mean), jax.tree.leaves(target_prec)))

  init_mean = jax.tree.map(lambda m: np.zeros((1,) + m.shape), target_mean)
  init_prec = jax.tree.map(lambda m: np.ones((1,) + m.shape), target_mean)
  state = mog.fit_diag(jax.random.key(0), loss, init_mean, init_prec, num_steps=60, beta=0.5, num_samples=2,
                       estimator="hessian", antithetic=True)
  q = mog.posterior(state)
  assert isinstance(q.components, bmerge.DiagGaussian)
  assert jax.tree.structure(q.components.mean) == jax.tree.structure(init_mean)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-9),
               q.components.mean, target_mean)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got[0], want, rtol=1e-6), q.components.precision,
               target_prec)


def test_diagonal_stein_is_unbiased_on_a_gaussian_target(x64):
  # Gradient-only diagonal Hessians: E_{N}[h (z - mu) * grad] = diag hess; after a run with many samples the
  # precision is within Monte-Carlo error of the target's.
  h = np.array([1.0, 4.0, 9.0])
  loss = lambda z: 0.5 * jnp.sum(h * (z - 1.0) ** 2)
  state = mog.fit_diag(jax.random.key(0), loss, np.zeros((1, 3)), np.ones((1, 3)), num_steps=60, beta=0.3,
                       num_samples=400, antithetic=True)
  np.testing.assert_allclose(state.precision[0], h, rtol=0.1)
  np.testing.assert_allclose(state.mean[0], 1.0, rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: mog.init(np.zeros((0, 2)), np.zeros((0, 2, 2))), "K >= 1"),
    (lambda: mog.init(np.zeros((2, 2)), np.stack([np.eye(2), -np.eye(2)])), "precision"),
    (lambda: mog.init(np.zeros((2, 2)), np.stack([np.eye(2)] * 2), np.zeros(3)), "log_weights"),
    (lambda: mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, 3, beta=0.0), "beta"),
    (lambda: mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, 3, beta=-1.0), "beta"),
    (lambda: mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, 3, beta_w=0.0), "beta_w"),
    (lambda: mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, 3, num_samples=0), "num_samples"),
    (lambda: mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, 3, estimator="exact"), "estimator"),
    (lambda: mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, -2), "num_steps"),
    (lambda: mog.fit_diag(jax.random.key(0), _bimodal_loss, INIT_1D[0], -np.ones((2, 1)), 3), "precision"),
    (lambda: mog.fit_diag(jax.random.key(0), _bimodal_loss, INIT_1D[0], np.ones((2, 1)), 3, estimator="gauss_newton"),
     "estimator"),
    (lambda: mog.mog(_bimodal_loss, beta=0.1, num_samples=3, antithetic=True), "num_samples"),
])
def test_validation_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ---------------------------------------------------------------------------------------------------------------
# End to end: fitted mixtures straight into the mixture-weighted merge.


def _log_q(state, z):
  """log q(z) of a fitted 1-D mixture on a grid z [N]."""
  m, h, lw = np.ravel(state.mean), np.ravel(state.precision), np.asarray(state.log_weights)
  comp = lw + 0.5 * np.log(h / (2 * np.pi)) - 0.5 * h * (z[:, None] - m) ** 2
  return np.asarray(logsumexp(comp, axis=1))


def test_mixture_merge_of_fitted_mixtures(x64):
  q1 = mog.fit(jax.random.key(0), _bimodal_loss, *INIT_1D, **FIT_1D)

  def loss2(z):  # a second task: 0.5 N(-1, 1) + 0.5 N(3, 0.8^2)
    z = z[0]
    return -jnp.logaddexp(jnp.log(0.5) + norm.logpdf(z, -1.0, 1.0), jnp.log(0.5) + norm.logpdf(z, 3.0, 0.8))

  q2 = mog.fit(jax.random.key(1), loss2, *INIT_1D, **FIT_1D)
  stacked = bmerge.stack([mog.posterior(q1), mog.posterior(q2)])
  alphas = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
  merged = np.asarray(merge.mixture_weighted(stacked, alphas, num_iters=50))
  assert merged.shape == (4, 1)
  grid = np.linspace(-6, 6, 120001)
  # One-hot: the merge is a mode of that task's mixture; here both start in the basin of the global mode, so it is
  # the brute-force argmax of log q on a fine grid.
  np.testing.assert_allclose(merged[0, 0], grid[np.argmax(_log_q(q1, grid))], atol=1e-3)
  np.testing.assert_allclose(merged[1, 0], grid[np.argmax(_log_q(q2, grid))], atol=1e-3)
  # Every merge is a stationary point (a local maximum) of F(theta) = sum_t alpha_t log q_t(theta).
  for alpha, theta in zip(alphas, merged[:, 0]):
    f = lambda z: alpha[0] * _log_q(q1, z) + alpha[1] * _log_q(q2, z)
    eps = 1e-4
    fz = f(np.array([theta - eps, theta, theta + eps]))
    assert abs(fz[2] - fz[0]) / (2 * eps) < 1e-4 * max(1.0, abs(fz[1]))
    assert fz[1] >= max(fz[0], fz[2])


def test_k1_mixture_merge_equals_hessian_merge(x64):
  # A one-component mixture from MoG is VON's posterior (test_k1_is_von); EM with K = 1 is Eq. 10.
  fitted = mog.fit(jax.random.key(0), logistic_regression(1, 60).loss, np.zeros((1, 3)), np.eye(3)[None], 20, 0.5,
                   num_samples=4, antithetic=True)
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 3))
  other = bmerge.Mixture(bmerge.FullGaussian(rng.normal(size=(1, 3)), (a @ a.T + np.eye(3))[None]), np.zeros(1))
  alphas = np.array([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
  mixtures = bmerge.stack([mog.posterior(fitted), other])
  by_mixture = np.asarray(merge.mixture_weighted(mixtures, alphas, num_iters=3))
  gaussians = bmerge.FullGaussian(mixtures.components.mean[:, 0], mixtures.components.precision[:, 0])
  np.testing.assert_allclose(by_mixture, merge.hessian_weighted(gaussians, alphas), rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(by_mixture[0], fitted.mean[0], rtol=1e-10)
  h, m = gaussians.precision, gaussians.mean
  closed = np.linalg.solve(0.3 * h[0] + 0.7 * h[1], 0.3 * h[0] @ m[0] + 0.7 * h[1] @ m[1])
  np.testing.assert_allclose(by_mixture[1], closed, rtol=1e-8)
