"""bmerge.pareto: Pareto-front estimation from a preview and a budget of exact runs, on synthetic problems with a
known front."""

import moocore
import numpy as np
import pytest

import bmerge
from bmerge import grid
from bmerge import pareto


def _exact(alphas):
  """Concave per-task results: task t grows with alpha_t (the front is every alpha of the simplex, curved)."""
  a = np.asarray(alphas)
  return np.sqrt(np.clip(a, 0.0, 1.0)) + 0.1 * a * a[:, ::-1][:, :a.shape[1]]


def _distorted(alphas):
  """The preview: a monotone per-task distortion of the exact values plus a smooth bias in alpha."""
  e = _exact(alphas)
  return 0.6 * e ** 2 - 0.05 + 0.03 * np.sin(3.0 * np.asarray(alphas)[:, :1])


class Counter:
  """exact_fn that counts the rows it is asked for."""

  def __init__(self, fn=_exact):
    self.fn, self.rows, self.calls = fn, 0, 0

  def __call__(self, alphas):
    self.rows += len(alphas)
    self.calls += 1
    return self.fn(alphas)


def _best_subset_hv(values, reference, size):
  """Greedy hypervolume subset of the exact values (the benchmark's normaliser)."""
  chosen = []
  for _ in range(size):
    gains = [moocore.hypervolume(values[chosen + [i]], ref=reference, maximise=True) if i not in chosen else -1
             for i in range(len(values))]
    chosen.append(int(np.argmax(gains)))
  return moocore.hypervolume(values[chosen], ref=reference, maximise=True)


@pytest.mark.parametrize("num_tasks, spacing", [(2, 0.05), (3, 0.1)])
def test_calibration_recovers_the_exact_front_and_the_share_rises_with_budget(num_tasks, spacing):
  alphas = grid.simplex(num_tasks, spacing)
  exact = _exact(alphas)
  reference = exact.min(axis=0) - 0.1 * np.ptp(exact, axis=0)
  front_exact = exact[moocore.is_nondominated(exact, maximise=True)]
  raw = _distorted(alphas)
  raw_error = moocore.igd_plus(raw[moocore.is_nondominated(raw, maximise=True)], ref=front_exact, maximise=True)
  shares, errors = [], []
  for budget in (2, 5, 10):
    est = pareto.estimate(alphas, raw, Counter(), budget, key=0, reference=reference)
    hv = moocore.hypervolume(est.verified_values, ref=reference, maximise=True)
    shares.append(hv / _best_subset_hv(exact, reference, budget))
    # How far the predicted front (its predicted values) lies from the exact front.
    errors.append(moocore.igd_plus(est.predicted[est.front], ref=front_exact, maximise=True))
  assert shares[0] < shares[2] and shares[2] > 0.85, shares
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.05 and errors[2] < raw_error / 10, (errors, raw_error)


def test_with_an_exact_preview_the_first_pick_has_the_largest_box():
  alphas = grid.simplex(3, 0.1)
  values = _exact(alphas)
  reference = np.zeros(3)
  est = pareto.estimate(alphas, values, Counter(), 1, key=0, reference=reference)
  boxes = np.prod(np.clip(values - reference, 0, None), axis=1)
  np.testing.assert_array_equal(est.verified_alphas[0], alphas[np.argmax(boxes)])


def test_exact_fn_is_never_asked_for_more_than_the_budget_and_picks_are_a_prefix():
  alphas = grid.simplex(3, 0.1)
  runs = {}
  for budget, batch in [(3, 1), (7, 1), (7, 3)]:
    counter = Counter()
    est = pareto.estimate(alphas, _distorted(alphas), counter, budget, key=1, batch_size=batch)
    assert counter.rows == budget == len(est.verified_alphas)
    assert counter.calls == -(-budget // batch)
    runs[budget, batch] = est.verified_alphas
  np.testing.assert_array_equal(runs[7, 1][:3], runs[3, 1])
  # Verified alphas are distinct rows of the grid.
  assert len({tuple(a) for a in runs[7, 3]}) == 7


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_any_number_of_tasks_and_minimisation(num_tasks):
  alphas = grid.simplex(num_tasks, 0.25 if num_tasks == 4 else 0.1)
  loss = lambda a: -_exact(a)  # minimise the negated values: the same front
  est = pareto.estimate(alphas, -_distorted(alphas), loss, 4, key=0, maximize=False)
  assert est.verified_values.shape == (4, num_tasks) and not est.maximize.any()
  np.testing.assert_allclose(est.verified_values, loss(est.verified_alphas))
  same = pareto.estimate(alphas, _distorted(alphas), _exact, 4, key=0)
  np.testing.assert_array_equal(est.verified_alphas, same.verified_alphas)
  alpha, values, verified = pareto.recommend(est, "maximin")
  assert verified and np.all(values >= -1e-12 + np.min(est.verified_values, axis=0))



def test_default_reference_follows_the_calibrated_prediction():
  # A preview 1.0 above the exact values: a reference fixed in the preview's units would lie above every exact value
  # (no verified run adds volume). With the default, one run calibrates the offset and the picks are the greedy best.
  alphas = grid.simplex(3, 0.1)
  exact = _exact(alphas)
  est = pareto.estimate(alphas, exact + 1.0, _exact, 5, key=0)
  reference = bmerge.metrics.front_reference(exact)
  np.testing.assert_allclose(est.reference, reference, atol=1e-12)
  share = moocore.hypervolume(est.verified_values, ref=reference, maximise=True) / _best_subset_hv(exact, reference, 5)
  assert share == pytest.approx(1.0, abs=1e-9)
  assert np.all(np.diff(est.history.hypervolume) > 0)

_CALLS, _FAILING = [], set()  # module level: the exact function's fingerprint (the store's key) stays the same


def _flaky(a):
  """Raises on its second call and whenever it meets that alpha again; returns NaN for a task on its third call."""
  _CALLS.append(a.copy())
  if len(_CALLS) == 2:
    _FAILING.add(tuple(a[0]))
  if any(tuple(row) in _FAILING for row in a):
    raise RuntimeError("out of memory")
  out = _exact(a)
  if len(_CALLS) == 3:
    out[0, 1] = np.nan
  return out


def test_failures_are_reported_count_against_the_budget_and_runs_resume(tmp_path):
  alphas = grid.simplex(2, 0.1)
  _CALLS.clear()
  _FAILING.clear()
  with pytest.warns(RuntimeWarning, match="alpha"):
    est = pareto.estimate(alphas, _distorted(alphas), _flaky, 5, key=0, workdir=str(tmp_path))
  assert len(_CALLS) == 5 and len(est.verified_alphas) == 5
  bad = ~np.all(np.isfinite(est.verified_values), axis=1)
  assert bad.sum() == 2 and len(est.errors) == 2
  assert "out of memory" in est.errors[0][1] and est.errors[0][0] == est.verified_alphas[1].tolist()
  # A rerun with the same inputs reads the finished runs (the NaN one too) and asks again only for the one that
  # raised (which fails again here, so every later pick is the same).
  _CALLS.clear()
  with pytest.warns(RuntimeWarning, match="out of memory"):
    again = pareto.estimate(alphas, _distorted(alphas), _flaky, 5, key=0, workdir=str(tmp_path))
  assert [c.tolist() for c in _CALLS] == [[est.verified_alphas[1].tolist()]]
  np.testing.assert_array_equal(again.verified_alphas, est.verified_alphas)
  np.testing.assert_array_equal(again.verified_values, est.verified_values)


def test_callable_preview_refines_the_candidates_around_the_front():
  alphas = grid.simplex(2, 0.2)
  est = pareto.estimate(alphas, _distorted, Counter(), 4, key=0)
  assert len(est.alphas) > len(alphas) and est.predicted.shape == est.alphas.shape
  np.testing.assert_allclose(est.alphas.sum(axis=1), 1.0)
  steps = np.unique(np.round(np.abs(np.diff(np.sort(est.alphas[:, 0]))), 9))
  assert steps[steps > 0].min() == pytest.approx(0.05)


def test_recommend_follows_the_preference():
  alphas = grid.simplex(2, 0.1)
  est = pareto.estimate(alphas, _exact(alphas), _exact, len(alphas), key=0)  # everything verified
  values = _exact(alphas)
  for w in ([1.0, 0.0], [0.3, 0.7]):
    alpha, got, verified = pareto.recommend(est, w)
    assert verified and got @ np.asarray(w) == pytest.approx(np.max(values @ np.asarray(w)))
  z = np.array([0.5, 0.5])
  alpha, got, _ = pareto.recommend(est, "reference", reference_point=z)
  assert np.min(got - z) == pytest.approx(np.max(np.min(values - z, axis=1)))
  assert isinstance(est, bmerge.ParetoEstimate)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alphas=np.ones((4, 1))), "`alphas` must be a grid"),
    (dict(preview=np.ones((3, 2))), "`preview` must have shape"),
    (dict(preview=np.full((11, 2), np.nan)), "`preview` must be finite"),
    (dict(budget=0), "budget"),
    (dict(maximize=[True]), "`maximize` must be"),
])
def test_bad_inputs_get_clear_errors(kwargs, match):
  args = dict(alphas=grid.simplex(2, 0.1), preview=_exact(grid.simplex(2, 0.1)), exact_fn=_exact, budget=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pareto.estimate(args.pop("alphas"), args.pop("preview"), args.pop("exact_fn"), args.pop("budget"), **args)
