"""The full-covariance kernels (blocked Cholesky, Eq. 10, Algorithm 1) against float64 numpy oracles and the
per-alpha formulation they replaced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmerge.merge import _fullcov as fc
from bmerge import grid
from merge_oracles import em as _em_oracle
from merge_oracles import eq10 as _eq10_oracle


def _spd(rng, lead, p, log_spread=1.0):
  """Random SPD matrices [*lead, P, P] with eigenvalues exp(log_spread * N(0, 1))."""
  q = np.linalg.qr(rng.normal(size=lead + (p, p)))[0]
  return q @ (np.exp(log_spread * rng.normal(size=lead + (p,)))[..., None] * np.swapaxes(q, -1, -2))


def _inputs(rng, t=3, k=3, p=21, log_spread=1.0):
  return rng.normal(size=(t, k, p)), _spd(rng, (t, k), p, log_spread), rng.normal(size=(t, k))


def test_blocked_cholesky_solve_and_logdet_equal_numpy(x64):
  rng = np.random.default_rng(0)
  p = 70
  bounds = fc._bounds(p, 64)
  assert bounds == ((0, 6), (6, 70))  # the remainder first; the 64-wide tile is factored recursively (> _BASE)
  a = _spd(rng, (4,), p)
  factor = fc.cholesky(fc.half_panels(jnp.asarray(a), bounds), bounds)
  want = np.linalg.cholesky(a)
  for (s, e), (panel, l_jj, inv) in zip(bounds, factor):
    np.testing.assert_allclose(l_jj, want[:, s:e, s:e], atol=1e-12)
    np.testing.assert_allclose(panel, want[:, s:, s:e], atol=1e-12)
    np.testing.assert_allclose(inv @ l_jj, np.broadcast_to(np.eye(e - s), l_jj.shape), atol=1e-12)
  rhs = rng.normal(size=(4, p))
  np.testing.assert_allclose(fc.solve(factor, jnp.asarray(rhs)), np.linalg.solve(a, rhs[..., None])[..., 0], atol=1e-10)
  x, diagonal = fc.factor_solve(fc.half_panels(jnp.asarray(a), bounds), jnp.asarray(rhs), bounds)
  np.testing.assert_allclose(x, np.linalg.solve(a, rhs[..., None])[..., 0], atol=1e-10)
  np.testing.assert_allclose(np.sum(np.log(diagonal), -1), 0.5 * np.linalg.slogdet(a)[1], atol=1e-10)
  assert np.all(diagonal > 0)
  not_pd = a.copy()
  not_pd[1] -= 2 * np.linalg.eigvalsh(a[1])[0] * np.eye(p)  # smallest eigenvalue flips sign
  _, diagonal = fc.factor_solve(fc.half_panels(jnp.asarray(not_pd), bounds), jnp.asarray(rhs), bounds)
  assert list(np.all(np.asarray(diagonal) > 0, -1)) == [True, False, True, True]


def test_factor_solve_in_sub_chunks_equals_one_factorisation(monkeypatch):
  """On a CPU a chunk is factorised in cache-sized sub-chunks (padded to a multiple of them): same results."""
  assert fc.solve_rows(128, 650) == 8 and fc.solve_rows(64, 650) == 8 and fc.solve_rows(9, 650) == 9
  assert fc.solve_rows(121, 650) == 4  # 31 sub-chunks of 4 pad 3 rows (8 would pad 7)
  assert fc.solve_rows(16, 1970) == fc.CPU_SOLVE_MIN == 4 and fc.solve_rows(128, 650, platform="gpu") == 128
  rng = np.random.default_rng(1)
  p, c = 40, 7
  bounds = fc._bounds(p, 16)
  a = _spd(rng, (c,), p).astype(np.float32)
  rhs = jnp.asarray(rng.normal(size=(c, p)), jnp.float32)
  panels = fc.half_panels(jnp.asarray(a), bounds)
  whole = fc.factor_solve(panels, rhs, bounds)
  monkeypatch.setattr(fc, "CPU_SOLVE_BYTES", 0)
  monkeypatch.setattr(fc, "CPU_SOLVE_MIN", 3)
  assert fc.solve_rows(c, p) == 3  # three sub-chunks of 3, two padded rows
  split = fc.factor_solve(panels, rhs, bounds)
  for got, want in zip(split, whole):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(split[0], np.linalg.solve(a.astype(np.float64), np.asarray(rhs, np.float64)[..., None])[..., 0],
                             rtol=1e-3, atol=1e-4)


def test_bounds_and_chunks():
  assert fc._bounds(650, 128) == ((0, 10), (10, 138), (138, 266), (266, 394), (394, 522), (522, 650))
  assert fc._bounds(650) == ((0, 10),) + tuple((s, s + 64) for s in range(10, 650, 64))
  assert fc._bounds(1970)[:2] == ((0, 50), (50, 178)) and fc._bounds(256) == ((0, 64), (64, 128), (128, 192), (192, 256))
  assert fc._bounds(3) == ((0, 3),)
  assert fc.chunk_alphas(1326, 650, 128) == 121  # 11 chunks of 121 (5 padded rows), within the memory budget
  c = fc.chunk_alphas(1326, 1970, 128)
  assert 2 * 1970 ** 2 * 4 * c <= fc.CHUNK_BYTES and fc.chunk_alphas(5, 10, 128) == 5 and fc.chunk_alphas(9, 10, 4) == 3


@pytest.mark.parametrize("with_prior", [False, True])
def test_hessian_weighted_equals_solve_and_per_alpha_reference(x64, with_prior):
  rng = np.random.default_rng(1)
  means, precs, _ = _inputs(rng, k=1, p=37)
  means, precs = means[:, 0], precs[:, 0]
  alphas = grid.simplex(3, 0.25)  # 15 alphas: chunks of 4 pad the last one
  prior = (rng.normal(size=37), _spd(rng, (), 37)) if with_prior else None
  if with_prior:
    alphas = 0.8 * alphas
  args = (jnp.asarray(alphas), means, precs) + (prior if with_prior else (None, None))
  out, ok = fc.hessian_weighted(*args, 4, block=16)  # blocks (0, 5), (5, 21), (21, 37)
  np.testing.assert_allclose(out, _eq10_oracle(alphas, means, precs, prior), atol=1e-10)
  ref, ref_ok = fc.reference_hessian_weighted(*args, 4)
  np.testing.assert_allclose(out, ref, atol=1e-10)
  assert bool(ok) and bool(ref_ok)


def test_hessian_weighted_flags_an_indefinite_merged_precision(x64):
  rng = np.random.default_rng(2)
  means, precs = rng.normal(size=(2, 9)), _spd(rng, (2,), 9)
  prior = (np.zeros(9), 10.0 * np.eye(9))  # gamma = 1 - 1.6 < 0: 0.6 * ... - 6 I is indefinite
  for alphas, want in (([[0.5, 0.5]], True), ([[0.8, 0.8]], False)):
    assert bool(fc.hessian_weighted(jnp.asarray(alphas), means, precs, *prior, 4)[1]) == want
    assert bool(fc.reference_hessian_weighted(jnp.asarray(alphas), means, precs, *prior, 4)[1]) == want


@pytest.mark.parametrize("with_prior,with_init", [(False, False), (True, False), (False, True), (True, True)])
def test_mixture_em_equals_numpy_algorithm_and_per_alpha_reference(x64, with_prior, with_init):
  rng = np.random.default_rng(3)
  means, precs, log_weights = _inputs(rng, k=3, p=21)
  alphas = grid.simplex(3, 0.25)
  prior = (rng.normal(size=21), _spd(rng, (), 21)) if with_prior else None
  if with_prior:
    alphas = 0.7 * alphas
  init = rng.normal(size=(len(alphas), 21)) if with_init else None
  args = (jnp.asarray(alphas), means, precs, log_weights) + (prior if with_prior else (None, None)) + (init,)
  params, objective, step = fc.mixture_em(*args, 6, with_init, 4, block=8)  # blocks (0, 5), (5, 13), (13, 21)
  assert objective.shape == (len(alphas), 7)
  for g in range(len(alphas)):
    x, f, s = _em_oracle(alphas[g], means, precs, log_weights, 6, prior, None if init is None else init[g])
    np.testing.assert_allclose(params[g], x, atol=1e-9)
    np.testing.assert_allclose(objective[g], f, rtol=1e-10)
    np.testing.assert_allclose(step[g], s, atol=1e-9)
  ref = fc.reference_mixture_em(*args, 6, with_init, 4)
  for got, want in zip((params, objective, step), ref):
    np.testing.assert_allclose(got, want, atol=1e-9)
  assert np.all(np.diff(np.asarray(objective), axis=1) >= -1e-9)  # EM never decreases F


def test_mixture_em_with_one_component_is_eq10(x64):
  rng = np.random.default_rng(4)
  means, precs, _ = _inputs(rng, k=1, p=13)
  prior = (rng.normal(size=13), _spd(rng, (), 13))
  alphas = 0.9 * grid.simplex(3, 0.2)
  params, objective, step = fc.mixture_em(jnp.asarray(alphas), means, precs, np.zeros((3, 1)), *prior, None, 3,
                                          False, 8, block=8)
  np.testing.assert_allclose(params, _eq10_oracle(alphas, means[:, 0], precs[:, 0], prior), atol=1e-10)
  np.testing.assert_allclose(step, 0.0, atol=1e-10)  # Eq. 10 is the fixed point
  np.testing.assert_allclose(np.diff(objective, axis=1), 0.0, atol=1e-10)


def test_float32_finetuned_scale_matches_float64():
  """|theta| ~ 1, components 1e-3 apart, precisions over 3 orders of magnitude: the centred float32 kernels agree
  with the float64 algorithm as closely as the per-alpha formulation they replaced."""
  rng = np.random.default_rng(5)
  t, k, p = 3, 4, 40
  means = rng.normal(size=p) + 1e-3 * rng.normal(size=(t, k, p))
  precs = _spd(rng, (t, k), p, log_spread=1.2) * 100.0
  log_weights = rng.normal(size=(t, k))
  alphas = grid.simplex(3, 0.2)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  args = (f32(alphas), f32(means), f32(precs), f32(log_weights), None, None, None, 10, False, 8)
  params, objective, _ = fc.mixture_em(*args, block=16)
  ref_params, ref_objective, _ = fc.reference_mixture_em(*args)
  want = np.stack([_em_oracle(a, means, precs, log_weights, 10)[0] for a in alphas])
  err, ref_err = np.max(np.abs(params - want)), np.max(np.abs(ref_params - want))
  assert err < 1e-6 and err < 3 * ref_err + 1e-7, (err, ref_err)
  np.testing.assert_allclose(objective, ref_objective, rtol=1e-5)
  assert np.all(np.diff(np.asarray(objective), axis=1) >= -1e-5 * np.abs(np.asarray(objective[:, 1:])))
  out, _ = fc.hessian_weighted(f32(alphas), f32(means[:, 0]), f32(precs[:, 0]), None, None, 8, block=16)
  want = _eq10_oracle(alphas, means[:, 0], precs[:, 0])
  ref, _ = fc.reference_hessian_weighted(f32(alphas), f32(means[:, 0]), f32(precs[:, 0]), None, None, 8)
  assert np.max(np.abs(out - want)) < 1e-6 and np.max(np.abs(out - ref)) < 1e-6


def test_one_trace_per_shape():
  rng = np.random.default_rng(6)
  means, precs, log_weights = (jnp.asarray(x, jnp.float32) for x in _inputs(rng, k=2, p=5))
  fc.mixture_em.clear_cache()
  for seed in range(2):
    alphas = jnp.asarray(np.random.default_rng(seed).dirichlet(np.ones(3), size=6), jnp.float32)
    fc.mixture_em(alphas, means, precs, log_weights, None, None, None, 2, False, 4)
  assert fc.mixture_em._cache_size() == 1
