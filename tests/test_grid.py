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
