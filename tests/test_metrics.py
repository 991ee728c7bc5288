"""bmerge.metrics against values worked out by hand, and Pareto fronts, hypervolumes and IGD+ against brute force."""

import json
import math
import warnings

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.stats

from bmerge import metrics

# Four grid points of a 3-task simplex, used throughout:
#   g   alpha          preview  exact
#   0   (1, 0, 0)      0.70     0.80
#   1   (.5, .5, 0)    0.90     0.85
#   2   (0, 1, 0)      0.60     0.90
#   3   (0, 0, 1)      0.50     0.40
ALPHAS = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
PREVIEW = np.array([0.70, 0.90, 0.60, 0.50])
EXACT = np.array([0.80, 0.85, 0.90, 0.40])


def test_mse_by_hand():
  # differences -0.1, 0.05, -0.3, 0.1 -> squares 0.01 + 0.0025 + 0.09 + 0.01 = 0.1125, over 4 = 0.028125
  assert metrics.mse(PREVIEW, EXACT) == pytest.approx(0.028125, abs=1e-15)
  assert metrics.mse(EXACT, EXACT) == 0.0


def test_best_by_hand_for_accuracy_and_loss():
  b = metrics.best(ALPHAS, PREVIEW, EXACT)
  # preview is largest at g = 1 (0.90); joint training there gives 0.85; the best exact is 0.90 at g = 2.
  assert b.index == 1 and b.preview == 0.90 and b.exact_at_best == 0.85
  np.testing.assert_array_equal(b.alpha, [0.5, 0.5, 0.0])
  assert b.exact_index == 2 and b.exact_best == 0.90
  np.testing.assert_array_equal(b.exact_alpha, [0.0, 1.0, 0.0])
  # As a loss: preview is smallest at g = 3 (0.50), exact there 0.40, which is also the smallest exact.
  b = metrics.best(ALPHAS, PREVIEW, EXACT, maximize=False)
  assert (b.index, b.preview, b.exact_at_best, b.exact_index, b.exact_best) == (3, 0.50, 0.40, 3, 0.40)


def test_ties_go_to_the_first_index():
  alphas = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
  preview, exact = np.array([0.9, 0.9, 0.1]), np.array([0.2, 0.8, 0.8])
  b = metrics.best(alphas, preview, exact)
  assert b.index == 0 and b.exact_at_best == 0.2 and b.exact_index == 1
  # top-1 of the preview is g = 0 (first of the tie): regret 0.8 - 0.2; top-2 adds g = 1: regret 0.
  assert metrics.regret_at_k(preview, exact, 1) == pytest.approx(0.6)
  assert metrics.regret_at_k(preview, exact, 2) == 0.0


def test_spearman_by_hand():
  # ranks of preview (0.7, 0.9, 0.6, 0.5) = (3, 4, 2, 1); of exact (0.8, 0.85, 0.9, 0.4) = (2, 3, 4, 1);
  # d = (1, 1, -2, 0), sum d^2 = 6, rho = 1 - 6 * 6 / (4 * (16 - 1)) = 0.4
  assert metrics.spearman(PREVIEW, EXACT) == pytest.approx(0.4)
  # ties get average ranks: (1, 1, 2) -> (1.5, 1.5, 3) against (1, 2, 3): cov 1.5 / sqrt(1.5 * 2) = sqrt(3) / 2
  assert metrics.spearman([1.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(3) / 2)
  assert metrics.spearman(EXACT, EXACT) == pytest.approx(1.0)
  assert metrics.spearman(-EXACT, EXACT) == pytest.approx(-1.0)


def test_spearman_and_regret_of_many_rows_equal_scipy_and_the_loop():
  """The row-wise forms the bootstrap uses: rho against scipy.stats.spearmanr row by row (ties and a constant row
  included), regret@k against a sort of each row."""
  rng = np.random.default_rng(2)
  preview, exact = rng.integers(0, 4, (20, 9)).astype(float), rng.random((20, 9))  # integer previews: many ties
  preview[3] = 1.0
  rho = metrics._spearman_rows(preview, exact)  # pylint: disable=protected-access
  for p, e, r in zip(preview, exact, rho):
    if np.all(p == p[0]):
      assert math.isnan(r)
    else:
      assert r == pytest.approx(scipy.stats.spearmanr(p, e).statistic, abs=1e-12)
  for sign in (1.0, -1.0):
    regret = metrics._regret_rows(preview, exact, 2, sign)  # pylint: disable=protected-access
    for p, e, r in zip(preview, exact, regret):
      top = sorted(range(9), key=lambda g: (-sign * p[g], g))[:2]  # best first, ties by the first index
      assert r == pytest.approx(max(sign * e) - max(sign * e[g] for g in top), abs=1e-15)


def test_spearman_of_a_constant_surface_is_nan_without_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert math.isnan(metrics.spearman(np.full(4, 0.5), EXACT))
    assert math.isnan(metrics.spearman(EXACT, np.zeros(4)))
    assert math.isnan(metrics.spearman([0.3], [0.2]))


def test_regret_by_hand():
  # preview ranks g = 1, 0, 2, 3; exact there 0.85, 0.80, 0.90, 0.40; best exact 0.90.
  assert metrics.regret_at_k(PREVIEW, EXACT, 1) == pytest.approx(0.05)
  assert metrics.regret_at_k(PREVIEW, EXACT, 2) == pytest.approx(0.05)
  assert metrics.regret_at_k(PREVIEW, EXACT, 3) == 0.0
  assert metrics.regret_at_k(PREVIEW, EXACT, 100) == 0.0  # k > G is clipped
  # As a loss with exact (0.3, 0.85, 0.9, 0.4): preview ranks g = 3, 2, 0, 1 (smallest first); best exact 0.3 at g = 0.
  exact = np.array([0.30, 0.85, 0.90, 0.40])
  assert metrics.regret_at_k(PREVIEW, exact, 1, maximize=False) == pytest.approx(0.1)
  assert metrics.regret_at_k(PREVIEW, exact, 2, maximize=False) == pytest.approx(0.1)
  assert metrics.regret_at_k(PREVIEW, exact, 3, maximize=False) == 0.0


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.integers(1, 12).flatmap(lambda g: st.tuples(
    hnp.arrays(np.float64, g, elements=st.floats(0, 1)), hnp.arrays(np.float64, g, elements=st.floats(0, 1)))),
                  st.integers(1, 14), st.booleans())
def test_regret_is_nonnegative_and_nonincreasing_in_k(pair, k, maximize):
  preview, exact = pair
  r_k = metrics.regret_at_k(preview, exact, k, maximize)
  assert r_k >= 0.0
  assert metrics.regret_at_k(preview, exact, k + 1, maximize) <= r_k
  # regret@1 is exactly the gap between the best exact and the exact at the preview's best alpha.
  b = metrics.best(np.ones((preview.size, 1)), preview, exact, maximize)
  assert metrics.regret_at_k(preview, exact, 1, maximize) == pytest.approx(abs(b.exact_best - b.exact_at_best))


def test_histogram_by_hand():
  # bins [0, .25), [.25, .5), [.5, .75), [.75, 1]: 0.1, 0.2, 0.2 in the first, 1.0 (right edge) in the last.
  h = metrics.histogram([0.1, 0.2, 0.2, 1.0], bins=4, range=(0.0, 1.0))
  np.testing.assert_array_equal(h.counts, [3, 0, 0, 1])
  np.testing.assert_allclose(h.edges, [0.0, 0.25, 0.5, 0.75, 1.0])
  h = metrics.histogram([0.1, 0.2, 0.6], bins=[0.0, 0.5, 1.0])
  np.testing.assert_array_equal(h.counts, [2, 1])
  with pytest.raises(ValueError, match="`bins`"):
    metrics.histogram([0.1], bins=[1.0, 0.0])
  with pytest.raises(ValueError, match="`range`"):
    metrics.histogram([0.1], bins=3, range=(1.0, 1.0))


def test_pareto_front_by_hand():
  points = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2]])
  # (1, 1) is dominated by all others; the two copies of (2, 2) do not dominate each other.
  np.testing.assert_array_equal(metrics.pareto_front(points), [0, 1, 2, 4])
  # Minimising, (1, 1) dominates every other point.
  np.testing.assert_array_equal(metrics.pareto_front(points, maximize=False), [3])


def _brute_force_front(points, maximize):
  pts = points if maximize else -points
  return [i for i in range(len(pts))
          if not any(np.all(pts[j] >= pts[i]) and np.any(pts[j] > pts[i]) for j in range(len(pts)))]


# Few distinct values force ties and duplicate rows.
_points = st.tuples(st.integers(1, 25), st.integers(1, 4)).flatmap(
    lambda s: hnp.arrays(np.int64, s, elements=st.integers(0, 3)))


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(_points, st.booleans())
def test_pareto_front_matches_brute_force(points, maximize):
  np.testing.assert_array_equal(metrics.pareto_front(points, maximize), _brute_force_front(points, maximize))


def test_hypervolume_by_hand():
  # Boxes [0,3]x[0,1], [0,2]x[0,2], [0,1]x[0,3]: a staircase of area 3 + 2 + 1 = 6.
  pts = np.array([[3, 1], [1, 3], [2, 2]])
  assert metrics.hypervolume(pts, [0, 0]) == pytest.approx(6.0)
  # From (1, 1) the points are (2, 0), (0, 2), (1, 1): only the last encloses area, 1 x 1.
  assert metrics.hypervolume(pts, [1, 1]) == pytest.approx(1.0)
  assert metrics.hypervolume(np.zeros((0, 2)), [0, 0]) == 0.0
  assert metrics.hypervolume([[-1, 5]], [0, 0]) == 0.0  # worse than the reference in one column
  # 3-D: unit cube plus a 2 x 0.5 x 0.5 slab overlapping it in a 1 x 0.5 x 0.5 block: 1 + 0.5 - 0.25.
  assert metrics.hypervolume([[1, 1, 1], [2, 0.5, 0.5]], [0, 0, 0]) == pytest.approx(1.25)


def _unit_cells(points, size):
  """Brute-force hypervolume of integer points against the origin: the unit cells [c, c + 1] (c in [0, size)^M)
  that lie inside some box [0, p]."""
  m = points.shape[1]
  upper = np.indices((size,) * m).reshape(m, -1).T + 1  # the upper corner of every cell
  inside = np.zeros(len(upper), bool)
  for p in points:
    inside |= np.all(upper <= p, axis=1)
  return int(inside.sum())


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(st.integers(2, 3).flatmap(lambda m: st.integers(0, 10).flatmap(
    lambda n: hnp.arrays(np.int64, (n, m), elements=st.integers(-2, 5)))))
def test_hypervolume_matches_counting_unit_cells_in_2d_and_3d(points):
  # With integer points and the origin as reference, the union of boxes [0, p] is a union of unit cells: count them.
  m = points.shape[1]
  cells = _unit_cells(points, 5)
  assert metrics.hypervolume(points, np.zeros(m)) == pytest.approx(cells)
  # Minimising the negated points is the same problem.
  assert metrics.hypervolume(-points, np.zeros(m), maximize=False) == pytest.approx(cells)


def _igd_plus_brute(points, front, maximize):
  """mean over the front of the nearest point's shortfall, written out with loops."""
  sign = 1.0 if maximize else -1.0
  total = 0.0
  for r in front:
    total += min(math.sqrt(sum(max(sign * (rj - pj), 0.0) ** 2 for rj, pj in zip(r, p))) for p in points)
  return total / len(front)


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(st.integers(2, 3).flatmap(lambda m: st.tuples(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.just(m)), elements=st.floats(0, 1)),
    hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.just(m)), elements=st.floats(0, 1)))), st.booleans())
def test_igd_plus_matches_brute_force(pair, maximize):
  points, front = pair
  assert metrics.igd_plus(points, front, maximize) == pytest.approx(_igd_plus_brute(points, front, maximize),
                                                                     abs=1e-12)
  # The front itself (or anything dominating it) scores 0.
  assert metrics.igd_plus(front, front, maximize) == 0.0


def test_hypervolume_and_igd_plus_errors_name_the_argument():
  with pytest.raises(ValueError, match="`points` has 3 columns but `reference` has M = 2"):
    metrics.hypervolume(np.ones((2, 3)), [0, 0])
  with pytest.raises(ValueError, match="`reference` must be finite"):
    metrics.hypervolume(np.ones((2, 2)), [0, np.nan])
  with pytest.raises(ValueError, match="`points` has 2 columns but `reference_front` has 3"):
    metrics.igd_plus(np.ones((2, 2)), np.ones((1, 3)))
  with pytest.raises(TypeError, match="`maximize`"):
    metrics.hypervolume(np.ones((2, 2)), [0, 0], maximize=1)


def test_compare_fronts_by_hand():
  exact = np.array([[0.9, 0.1], [0.6, 0.6], [0.1, 0.9], [0.5, 0.5]])
  preview = np.array([[0.9, 0.2], [0.4, 0.4], [0.2, 0.9], [0.5, 0.5]])
  alphas = np.array([[1.0, 0.0], [0.6, 0.4], [0.0, 1.0], [0.4, 0.6]])
  c = metrics.compare_fronts(alphas, preview, exact)
  # exact front {0, 1, 2} ((.5,.5) < (.6,.6)); preview front {0, 2, 3} ((.4,.4) < (.5,.5)); both: {0, 2}.
  np.testing.assert_array_equal(c.exact_front, [0, 1, 2])
  np.testing.assert_array_equal(c.preview_front, [0, 2, 3])
  np.testing.assert_array_equal(c.recovered, [0, 2])
  assert c.recall == pytest.approx(2 / 3)
  # IGD: exact front points 0 and 2 are hit; (.6,.6) is sqrt(.02) from (.5,.5): mean sqrt(.02) / 3. IGD+ is the
  # same here: the nearest preview alpha (.5,.5) falls short of (.6,.6) in both columns.
  assert c.igd == pytest.approx(math.sqrt(0.02) / 3)
  assert c.igd_plus == pytest.approx(math.sqrt(0.02) / 3)
  # Reference: worst 0.1 per column minus 10 % of the range 0.8 -> (0.02, 0.02). Shifted exact front
  # (.88,.08), (.58,.58), (.08,.88): .88*.08 + .58*.50 + .08*.30 = .3844. Preview alphas' exact points
  # (.88,.08), (.48,.48), (.08,.88): .88*.08 + .48*.40 + .08*.40 = .2944.
  np.testing.assert_allclose(c.reference, [0.02, 0.02])
  assert c.hypervolume_exact == pytest.approx(0.3844)
  assert c.hypervolume_preview == pytest.approx(0.2944)
  same = metrics.compare_fronts(alphas, exact, exact)
  assert same.recall == 1.0 and same.igd == 0.0 and same.igd_plus == 0.0
  assert same.hypervolume_preview == same.hypervolume_exact
  # Three tasks: a third column equal to the first leaves the fronts as they were; the reference gets a third
  # coordinate 0.02 and every box a third side m_1 - 0.02, so the volumes are sums of three-sided boxes.
  three = metrics.compare_fronts(np.ones((4, 1)), np.c_[preview, preview[:, :1]], np.c_[exact, exact[:, :1]])
  assert three.recall == pytest.approx(2 / 3)
  np.testing.assert_allclose(three.reference, [0.02, 0.02, 0.02])
  # Exact front (.88,.08,.88), (.58,.58,.58), (.08,.88,.08) shifted; cells by brute force on a 0.01 lattice below.
  shifted = np.rint((np.c_[exact, exact[:, :1]][[0, 1, 2]] - 0.02) * 100).astype(np.int64)
  assert three.hypervolume_exact == pytest.approx(_unit_cells(shifted, 88) / 100 ** 3)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.tuples(st.integers(1, 15), st.integers(2, 3)).flatmap(lambda s: st.tuples(
    hnp.arrays(np.float64, s, elements=st.floats(0, 1)), hnp.arrays(np.float64, s, elements=st.floats(0, 1)))),
                  st.booleans())
def test_preview_front_never_beats_the_exact_front(pair, maximize):
  preview, exact = pair
  c = metrics.compare_fronts(np.ones((len(exact), 1)), preview, exact, maximize)
  assert 0.0 <= c.recall <= 1.0 and c.igd >= 0.0
  assert c.hypervolume_preview <= c.hypervolume_exact + 1e-12
  assert c.igd_plus <= c.igd + 1e-12  # only shortfalls count


def test_summarize_by_hand_and_json():
  out = metrics.summarize(ALPHAS, {"simple": PREVIEW, "flat": np.full(4, 0.5)}, EXACT)
  text = json.dumps(out, allow_nan=False)  # plain Python types only, no NaN
  assert json.loads(text) == out
  s = out["methods"]["simple"]
  assert s["mse"] == pytest.approx(0.028125)
  assert s["best_alpha"] == [0.5, 0.5, 0.0] and s["best_preview"] == 0.9 and s["exact_at_best"] == 0.85
  assert s["spearman"] == pytest.approx(0.4)
  assert s["regret_at_1"] == pytest.approx(0.05) and s["regret_at_5"] == 0.0
  f = out["methods"]["flat"]
  assert f["spearman"] is None  # constant preview: undefined rank correlation
  assert f["best_alpha"] == [1.0, 0.0, 0.0] and f["exact_at_best"] == 0.8  # first of the tie
  assert out["exact_best"] == 0.9 and out["exact_best_alpha"] == [0.0, 1.0, 0.0]
  assert set(s) == {"mse", "best_alpha", "best_preview", "exact_at_best", "spearman", "regret_at_1", "regret_at_5"}
  loss = metrics.summarize(ALPHAS, {"simple": PREVIEW}, EXACT, maximize=False)
  assert loss["exact_best"] == 0.4 and loss["methods"]["simple"]["best_alpha"] == [0.0, 0.0, 1.0]


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="`preview`.*G = 4"):
    metrics.mse(PREVIEW[:3], EXACT)
  with pytest.raises(ValueError, match="`exact` must be finite"):
    metrics.mse(PREVIEW, np.array([0.1, np.nan, 0.2, 0.3]))
  with pytest.raises(ValueError, match="`preview` must be finite"):
    metrics.spearman(np.array([0.1, np.inf, 0.2, 0.3]), EXACT)
  with pytest.raises(ValueError, match="`alphas`"):
    metrics.best(ALPHAS[:3], PREVIEW, EXACT)
  with pytest.raises(ValueError, match="`alphas`"):
    metrics.best(ALPHAS[0], PREVIEW, EXACT)
  with pytest.raises(ValueError, match="`preview` must have shape"):
    metrics.mse(PREVIEW[:, None], EXACT)
  with pytest.raises(ValueError, match="`k`"):
    metrics.regret_at_k(PREVIEW, EXACT, 0)
  with pytest.raises(ValueError, match=r"previews\['simple'\]` must be finite"):
    metrics.summarize(ALPHAS, {"simple": np.array([0.1, 0.2, np.nan, 0.3])}, EXACT)
  with pytest.raises(ValueError, match="`previews`"):
    metrics.summarize(ALPHAS, {}, EXACT)
  with pytest.raises(ValueError, match="`points`"):
    metrics.pareto_front(np.array([1.0, 2.0]))
  with pytest.raises(TypeError, match="`maximize`"):
    metrics.best(ALPHAS, PREVIEW, EXACT, maximize="yes")


# ----------------------------------------------------------------------------------------------------------------
# Per-example results: per-task accuracy, bootstrap and t intervals.


def test_per_task_accuracy_matches_loops_with_overlapping_and_empty_tasks():
  rng = np.random.default_rng(3)
  n, t = 40, 4
  onehot = (rng.random((n, t)) < 0.4).astype(np.float64)
  onehot[:, 3] = 0.0  # a task without examples reads 0
  correct = rng.random((2, 3, n)) < 0.7  # leading batch axes
  out = metrics.per_task_accuracy(correct, onehot)
  assert out.shape == (2, 3, 1 + t) and out.dtype == np.float64
  for i in range(2):
    for j in range(3):
      c = correct[i, j]
      assert out[i, j, 0] == pytest.approx(sum(c) / n, abs=1e-15)
      for k in range(t):
        members = [c[m] for m in range(n) if onehot[m, k] == 1]
        assert out[i, j, 1 + k] == pytest.approx(sum(members) / len(members) if members else 0.0, abs=1e-15)


def test_per_task_accuracy_under_jit_equals_numpy():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  onehot = np.eye(3)[rng.integers(0, 3, 30)]
  correct = (rng.random((5, 30)) < 0.5).astype(np.float32)
  on_device = jax.jit(metrics.per_task_accuracy)(jnp.asarray(correct), jnp.asarray(onehot))
  assert isinstance(on_device, jax.Array) and on_device.shape == (5, 4)
  np.testing.assert_allclose(on_device, metrics.per_task_accuracy(correct, onehot), rtol=1e-6)
  with pytest.raises(ValueError, match="`correct` must have shape"):
    metrics.per_task_accuracy(correct[:, :29], onehot)
  with pytest.raises(ValueError, match="`task_onehot` must have shape"):
    metrics.per_task_accuracy(correct, onehot[:, 0])
  with pytest.raises(ValueError, match="`task_onehot` must hold 0 or 1"):
    metrics.per_task_accuracy(correct, 2 * onehot)


def test_bootstrap_resamples_are_paired_and_the_interval_is_their_percentiles():
  n = 25
  x, y = np.arange(n, dtype=np.float64), 10.0 * np.arange(n)
  seen = []

  def stat(a, b):
    np.testing.assert_array_equal(b, 10.0 * a)  # the same example indices in both arrays
    assert np.all(np.isin(a, x))
    seen.append(a.mean())
    return a.mean()

  est, lo, hi = metrics.bootstrap_interval(stat, x, y, seed=5, num_samples=300, level=0.9)
  assert est == pytest.approx(x.mean()) and len(seen) == 301  # the full arrays, then 300 resamples
  assert (lo, hi) == pytest.approx(tuple(np.quantile(seen[1:], [0.05, 0.95])), rel=1e-12)
  # Deterministic for a seed; the vectorised form draws the same resamples.
  assert metrics.bootstrap_interval(np.mean, x, seed=5, num_samples=300, level=0.9) == (est, lo, hi)
  vec = metrics.bootstrap_interval(lambda a: a.mean(axis=-1), x, seed=5, num_samples=300, level=0.9, vectorized=True)
  assert vec == pytest.approx((est, lo, hi), rel=1e-12)
  assert metrics.bootstrap_interval(np.mean, x, seed=6, num_samples=300, level=0.9)[1:] != (lo, hi)
  # Paired differences of arrays that differ by a constant have no spread at all.
  d = metrics.bootstrap_interval(lambda a, b: np.mean(a - b), x + 2.0, x, num_samples=50)
  assert d == pytest.approx((2.0, 2.0, 2.0))


def test_bootstrap_vector_statistics_and_other_axes():
  rng = np.random.default_rng(7)
  data = rng.normal(size=(3, 60))
  est, lo, hi = metrics.bootstrap_interval(lambda a: a.mean(axis=-1), data, num_samples=200)
  np.testing.assert_allclose(est, data.mean(axis=1))
  assert est.shape == lo.shape == hi.shape == (3,) and np.all(lo < est) and np.all(est < hi)
  # The examples on axis 0, vectorised: the resample axis comes first, the examples axis is then axis 1.
  est0, lo0, hi0 = metrics.bootstrap_interval(lambda a: a.mean(axis=1), data.T, num_samples=200, axis=0,
                                              vectorized=True)
  np.testing.assert_allclose(np.stack([est0, lo0, hi0]), np.stack([est, lo, hi]), rtol=1e-12)
  # nan resamples are left out; an all-nan statistic gives nan.
  _, lo, hi = metrics.bootstrap_interval(lambda a: np.nan, data[0], num_samples=20)
  assert math.isnan(lo) and math.isnan(hi)
  with pytest.raises(ValueError, match="same positive number of examples"):
    metrics.bootstrap_interval(lambda a, b: 0.0, data[0], data[0, :10])
  with pytest.raises(ValueError, match="`level`"):
    metrics.bootstrap_interval(np.mean, data[0], level=95)
  with pytest.raises(ValueError, match="`num_samples`"):
    metrics.bootstrap_interval(np.mean, data[0], num_samples=0)
  with pytest.raises(ValueError, match="`statistic` must return a scalar or a \\[k\\] vector"):
    metrics.bootstrap_interval(lambda a: np.zeros((2, 2)), data[0])


def test_t_interval_closed_form_and_errors():
  # n = 3: mean 2, s = 1, t_{0.975, 2} = 4.3027 (tables): 2 -+ 4.3027 / sqrt(3)
  mean, lo, hi = metrics.t_interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and (lo, hi) == pytest.approx((2.0 - 4.3027 / math.sqrt(3), 2.0 + 4.3027 / math.sqrt(3)),
                                                   abs=1e-4)
  # n = 5 at 90 %: t_{0.95, 4} = 2.1318
  values = np.array([0.80, 0.82, 0.79, 0.85, 0.84])
  mean, lo, hi = metrics.t_interval(values, level=0.9)
  assert hi - mean == pytest.approx(2.1318 * values.std(ddof=1) / math.sqrt(5), rel=1e-4)
  both = metrics.t_interval(np.stack([values, 2 * values], axis=1), level=0.9)
  np.testing.assert_allclose(np.stack(both)[:, 0], [mean, lo, hi], rtol=1e-12)
  with pytest.raises(ValueError, match="n >= 2"):
    metrics.t_interval([0.8])
  with pytest.raises(ValueError, match="`level`"):
    metrics.t_interval([0.8, 0.9], level=1.0)


def _covers(intervals, truth) -> float:
  return float(np.mean([lo <= truth <= hi for lo, hi in intervals]))


def test_intervals_cover_the_truth_at_close_to_the_nominal_rate():
  """Simulated coverage over 400 data sets: within 3 binomial standard errors of 95 % (a slightly low rate for the
  percentile bootstrap, whose variance is that of the data divided by n rather than n - 1)."""
  reps, level = 400, 0.95
  tol = 3 * math.sqrt(level * (1 - level) / reps)
  rng = np.random.default_rng(11)
  p, n = 0.3, 100  # a Bernoulli accuracy on 100 test examples
  boot = [metrics.bootstrap_interval(lambda a: a.mean(axis=-1), rng.random(n) < p, seed=i, vectorized=True)[1:]
          for i in range(reps)]
  assert abs(_covers(boot, p) - level) <= tol
  for size in (3, 5):  # seeds
    t = [metrics.t_interval(rng.normal(1.0, 0.5, size))[1:] for _ in range(reps)]
    assert abs(_covers(t, 1.0) - level) <= tol
