"""bmerge.grid: lattices against brute-force enumeration, Dirichlet samples against their moments, the scaled sweep
of task arithmetic and its ray decomposition."""

import math

import jax
import numpy as np
import pytest

from bmerge import grid


@pytest.mark.parametrize("t,spacing", [(1, 0.5), (2, 0.1), (3, 0.05), (3, 0.02), (4, 0.25)])
def test_simplex_is_the_whole_lattice(t, spacing):
  a = grid.simplex(t, spacing)
  n = round(1 / spacing)
  assert a.shape == (math.comb(n + t - 1, t - 1), t)
  np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)
  assert np.all(a >= 0)
  counts = np.rint(a * n).astype(int)
  np.testing.assert_allclose(counts / n, a, atol=1e-12)  # on the lattice
  assert len({tuple(r) for r in counts}) == len(counts)  # unique
  for v in np.eye(t):  # vertices included
    assert np.any(np.all(np.isclose(a, v), axis=1))
  # Brute force: every integer vector in [0, n]^t summing to n is present.
  brute = {c for c in np.ndindex(*(n + 1,) * t) if sum(c) == n}
  assert brute == {tuple(r) for r in counts}


def test_simplex_231_points_for_paper_grid():
  assert grid.simplex(3, 0.05).shape == (231, 3)
  assert grid.simplex(3, 0.02).shape == (1326, 3)


@pytest.mark.parametrize("spacing", [0.03, 0.3, 0.0, -0.1, 1.5, float("nan")])
def test_simplex_rejects_spacing_not_one_over_n(spacing):
  with pytest.raises(ValueError, match="spacing"):
    grid.simplex(3, spacing)


@pytest.mark.parametrize("spacing,coarse", [(0.05, 0.1), (0.25, 0.5), (1 / 6, 1 / 3), (0.1, 0.1), (0.2, 1.0)])
def test_nested_simplex_coarse_points_are_fine_points(spacing, coarse):
  fine, rough = grid.nested_simplex(3, spacing, coarse)
  np.testing.assert_array_equal(fine, grid.simplex(3, spacing))
  np.testing.assert_array_equal(rough, grid.simplex(3, coarse))
  assert all(np.any(np.all(np.isclose(fine, row, atol=1e-12), axis=1)) for row in rough)


@pytest.mark.parametrize("spacing,coarse", [(0.25, 1 / 3), (0.1, 0.25), (0.5, 0.25)])
def test_nested_simplex_rejects_a_coarse_grid_off_the_fine_one(spacing, coarse):
  # Each pair has a coarse point that is no fine point (e.g. 1/3 on the lattice of 1/4), so scoring would fail late.
  assert not all(np.any(np.all(np.isclose(grid.simplex(3, spacing), row), axis=1))
                 for row in grid.simplex(3, coarse))
  with pytest.raises(ValueError, match="`coarse_spacing`.*multiple of `spacing`"):
    grid.nested_simplex(3, spacing, coarse)
  with pytest.raises(ValueError, match="`coarse_spacing`"):
    grid.nested_simplex(3, spacing, 0.3)  # not 1/m


def test_simplex_rejects_bad_num_tasks():
  with pytest.raises(ValueError, match="num_tasks"):
    grid.simplex(0, 0.1)


def test_line():
  a = grid.line(0.25)
  np.testing.assert_allclose(a, [[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]])


def test_dirichlet_on_simplex_and_keyed():
  a = grid.dirichlet(jax.random.key(0), 3, 500)
  assert a.shape == (500, 3)
  np.testing.assert_allclose(np.asarray(a).sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a).mean(0), 1 / 3, atol=0.05)  # uniform Dirichlet mean
  np.testing.assert_array_equal(a, grid.dirichlet(jax.random.key(0), 3, 500))
  assert not np.allclose(a, grid.dirichlet(jax.random.key(1), 3, 500))


def test_refine_stays_near_points():
  p = np.array([[0.5, 0.3, 0.2]])
  r = grid.refine(p, 0.01, radius=2)
  np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-12)
  assert np.all(np.abs(r - p).max(1) <= 0.02 + 1e-9)
  assert np.any(np.all(np.isclose(r, p), axis=1))
  # All lattice points within the box are found (brute force over the fine simplex).
  fine = grid.simplex(3, 0.01)
  inside = fine[np.abs(fine - p).max(1) <= 0.02 + 1e-9]
  assert {tuple(np.round(x, 6)) for x in inside} == {tuple(np.round(x, 6)) for x in r}


@pytest.mark.parametrize("t,c", [(3, 0.2), (3, 1.0), (3, 5.0), (5, 0.5)])
def test_dirichlet_concentration_sets_the_marginal_variance(t, c):
  """alpha_i ~ Beta(c, (T - 1) c): mean 1 / T, variance (T - 1) / (T^2 (T c + 1))."""
  a = np.asarray(grid.dirichlet(jax.random.key(1), t, 40_000, concentration=c), np.float64)
  np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-5)
  np.testing.assert_allclose(a.mean(0), 1 / t, atol=0.01)
  # 40k samples: the variance estimate is within a few per cent (its relative sd is about sqrt(2 / n) x kurtosis).
  np.testing.assert_allclose(a.var(0), (t - 1) / (t ** 2 * (t * c + 1)), rtol=0.06)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_dirichlet_rejects_bad_concentration(bad):
  with pytest.raises(ValueError, match="concentration"):
    grid.dirichlet(jax.random.key(0), 3, 4, concentration=bad)


def test_scaled_is_lambda_times_direction_row_by_row():
  directions = np.array([[1.0, 1.0, 1.0], [0.5, 0.0, 0.5]])
  lambdas = np.array([0.0, 0.25, 2.0])
  a = grid.scaled(directions, lambdas)
  assert a.shape == (6, 3)
  for d in range(2):
    for l in range(3):
      np.testing.assert_array_equal(a[d * 3 + l], lambdas[l] * directions[d])
  np.testing.assert_array_equal(grid.scaled(np.ones(2), [1.0]), [[1.0, 1.0]])  # one [T] direction
  with pytest.raises(ValueError, match="`lambdas`"):
    grid.scaled(directions, [-0.5])
  with pytest.raises(ValueError, match="`directions`"):
    grid.scaled([[1.0, np.nan]], [1.0])
  with pytest.raises(ValueError, match="`lambdas`"):
    grid.scaled(directions, [])


def test_scaling_inverts_scaled_and_infers_simplex_directions():
  directions = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
  lambdas = np.linspace(0.0, 1.5, 7)
  a = grid.scaled(directions, lambdas)
  s = grid.scaling(a, directions)
  np.testing.assert_array_equal(s.directions, directions)
  for d in range(3):
    rows = slice(d * 7, (d + 1) * 7)
    np.testing.assert_allclose(s.lambdas[rows, d], lambdas, atol=1e-12)
    # Brute force: a row is on ray d' exactly when it is a non-negative multiple of directions[d'].
    for g in range(d * 7, (d + 1) * 7):
      for e in range(3):
        on = np.allclose(np.cross(a[g], directions[e]), 0.0) and np.all(a[g] * directions[e] >= 0)
        assert np.isfinite(s.lambdas[g, e]) == (on or not a[g].any()), (g, e)
  # Inferred: the distinct points alpha / sum(alpha) of the simplex, lambda the total weight.
  inferred = grid.scaling(a)
  np.testing.assert_allclose(inferred.directions, directions / directions.sum(1, keepdims=True), atol=1e-12)
  np.testing.assert_allclose(np.nanmax(inferred.lambdas, axis=1), a.sum(1), atol=1e-12)
  with pytest.raises(ValueError, match="all-zero"):
    grid.scaling(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="`directions` has 2 columns"):
    grid.scaling(a, np.ones((1, 2)))


@pytest.mark.parametrize("t,spacing", [(2, 0.25), (3, 0.1), (4, 0.25)])
def test_pair_edges_are_the_two_task_lines_of_the_simplex(t, spacing):
  a = grid.simplex(t, spacing)
  edges = grid.pair_edges(a)
  assert set(edges) == {(i, j) for i in range(t) for j in range(i + 1, t)}
  n = round(1 / spacing)
  for (i, j), rows in edges.items():
    # Brute force: exactly the rows whose weight is all on tasks i and j, ordered by alpha_i.
    expected = [g for g in range(len(a)) if a[g, i] + a[g, j] > 1 - 1e-12]
    assert sorted(rows.tolist()) == expected
    assert len(rows) == n + 1 and np.all(np.diff(a[rows, i]) > 0)
    np.testing.assert_allclose(a[rows][:, [i, j]], grid.line(spacing), atol=1e-12)  # (alpha_i, 1 - alpha_i)
