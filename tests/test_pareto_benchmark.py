"""The Pareto-front benchmark (experiments/pareto.py, experiments/pareto_baselines.py) and the front metrics it shares
with compare (metrics.front_reference, compare_fronts' epsilon recall and random-subset values): brute-force oracles
for every score, the look-up that stands for joint training, and the small run's metrics.json."""

import itertools
import json

import jax.numpy as jnp
import moocore
import numpy as np
import pytest

import bmerge
from bmerge import grid
from bmerge import metrics
from configs import pareto as pareto_config
from experiments import pareto as bench
from experiments import pareto_baselines as baselines


@pytest.fixture(scope="module")
def problem():
  return bench.synthetic_problem(0.1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Shared front metrics.


def test_front_reference_is_the_fronts_nadir_minus_a_tenth_of_its_range():
  exact = np.array([[0.9, 0.2], [0.6, 0.6], [0.3, 0.8], [0.0, 0.0]])  # the last row is far below the front
  np.testing.assert_allclose(metrics.front_reference(exact), [0.3 - 0.06, 0.2 - 0.06])
  np.testing.assert_allclose(metrics.front_reference(-exact, maximize=False), [-0.24, -0.14])
  # One front point: its column ranges are 0, so the range of all rows stands in.
  single = np.array([[1.0, 1.0], [0.0, 0.5]])
  np.testing.assert_allclose(metrics.front_reference(single), [1.0 - 0.1, 1.0 - 0.05])


def _brute_force_random(exact, size, eps, reference, front):
  """Mean recall, HV and IGD+ over every subset of `size` rows, by loops."""
  recalls, hvs, igds = [], [], []
  for subset in itertools.combinations(range(len(exact)), size):
    chosen = exact[list(subset)]
    hit = [any(all(c[j] >= exact[e, j] - eps[j] for j in range(exact.shape[1])) for c in chosen) for e in front]
    recalls.append(np.mean(hit))
    hvs.append(moocore.hypervolume(chosen, ref=reference, maximise=True))
    igds.append(moocore.igd_plus(chosen, ref=exact[front], maximise=True))
  return np.mean(recalls), np.mean(hvs), np.mean(igds)


@pytest.mark.parametrize("epsilon", [None, 0.05])
def test_random_subset_values_match_a_brute_force_average(epsilon):
  rng = np.random.default_rng(3)
  exact = np.round(rng.random((9, 3)), 2)
  preview = exact + 0.2 * rng.standard_normal(exact.shape)
  c = metrics.compare_fronts(np.ones((9, 1)), preview, exact, epsilon=epsilon, num_samples=1000)
  eps = c.epsilon
  if epsilon is None:  # 1 % of the exact front's range per task
    front = exact[c.exact_front]
    np.testing.assert_allclose(eps, 0.01 * (front.max(0) - front.min(0)))
  recall, hv, igd = _brute_force_random(exact, c.preview_front.size, eps, c.reference, c.exact_front)
  assert c.random_recall == pytest.approx(recall, abs=1e-12)
  assert c.random_hypervolume == pytest.approx(hv, rel=1e-12)
  assert c.random_igd_plus == pytest.approx(igd, rel=1e-12)
  # The recall is counted the same way for the preview's own front.
  hit = [e for e in c.exact_front if np.any(np.all(exact[c.preview_front] >= exact[e] - eps, axis=1))]
  np.testing.assert_array_equal(c.recovered, hit)
  # Sampled subsets (fewer than all of them): the recall stays exact, the others are sample means near the truth.
  sampled = metrics.compare_fronts(np.ones((9, 1)), preview, exact, epsilon=epsilon, num_samples=20, seed=1)
  assert sampled.random_recall == pytest.approx(recall, abs=1e-12)
  assert sampled.random_hypervolume != c.random_hypervolume


def test_compare_fronts_rejects_a_bad_epsilon():
  with pytest.raises(ValueError, match="`epsilon`"):
    metrics.compare_fronts(np.ones((3, 1)), np.eye(3)[:, :2], np.eye(3)[:, :2], epsilon=[-0.1, 0.0])


# ---------------------------------------------------------------------------------------------------------------
# Baselines and their hypervolume arithmetic.


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
def test_hv_improvement_is_moocore_exactly_and_its_expectation_matches_monte_carlo(num_tasks):
  rng = np.random.default_rng(num_tasks)
  base, points, ref = rng.random((5, num_tasks)), rng.random((20, num_tasks)), np.full(num_tasks, 0.1)
  before = moocore.hypervolume(base, ref=ref, maximise=True)
  want = [moocore.hypervolume(np.vstack([base, p]), ref=ref, maximise=True) - before for p in points]
  np.testing.assert_allclose(baselines.hv_improvement(points, base, ref), want, rtol=0, atol=1e-12)
  np.testing.assert_allclose(baselines.hv_improvement(points, np.zeros((0, num_tasks)), ref),
                             np.prod(np.clip(points - ref, 0, None), axis=1), rtol=0, atol=1e-12)
  std = 0.1 * rng.random(points.shape)
  draws = points + std * rng.standard_normal((2000,) + points.shape)
  samples = baselines.hv_improvement(draws.reshape(-1, num_tasks), base, ref).reshape(len(draws), len(points))
  error = np.abs(baselines.hv_improvement(points, base, ref, std=std) - samples.mean(0))
  assert np.all(error <= 5 * samples.std(0) / np.sqrt(len(draws)) + 1e-4)  # 1e-4: events no draw met


def test_the_greedy_best_set_is_moocores_greedy_and_has_hv_share_one(problem):
  exact = problem.exact[0]
  ref = metrics.front_reference(exact)
  picks = baselines.greedy_hv(exact, 6, ref)
  chosen = []  # the same greedy loop by moocore, first index among ties
  for _ in range(6):
    gains = [moocore.hypervolume(exact[chosen + [i]], ref=ref, maximise=True) if i not in chosen else -1.0
             for i in range(len(exact))]
    chosen.append(int(np.argmax(np.round(gains, 12))))
  assert moocore.hypervolume(exact[picks], ref=ref, maximise=True) == pytest.approx(
      moocore.hypervolume(exact[chosen], ref=ref, maximise=True), rel=1e-12)
  truth = bench.truth(exact, 6, np.random.default_rng(0).dirichlet(np.ones(3), 20))
  for b in (1, 3, 6):
    assert bench.scores(exact[picks[:b]], truth, b)["hv_share"] == pytest.approx(1.0, abs=1e-12)


def test_the_look_up_never_answers_outside_the_grid(problem):
  lookup = bench.Lookup(problem.alphas, problem.exact[0])
  np.testing.assert_array_equal(lookup(problem.alphas[[4, 1]]), problem.exact[0][[4, 1]])
  for alpha in ([0.35, 0.35, 0.3], [0.3 + 1e-6, 0.4, 0.3 - 1e-6]):
    with pytest.raises(ValueError, match="not a row of the recorded exact grid"):
      lookup(np.array([problem.alphas[0], alpha]))
  with pytest.raises(ValueError, match=r"\[n, 3\]"):
    lookup(np.array([[0.5, 0.5, 0.0, 0.0]]))
  assert lookup.asked == [4, 1]  # a refused call records nothing


@pytest.mark.parametrize("budget", [3, 7])
@pytest.mark.parametrize("method", ["pareto_good", "preview_front", "uniform", "random", "quadratic_surrogate",
                                    "ehvi_cold"])
def test_every_method_runs_exactly_b_distinct_grid_rows(problem, method, budget):
  calls = []

  class Counting(bench.Lookup):
    def __call__(self, alphas):
      calls.append(np.asarray(alphas).copy())
      return super().__call__(alphas)

  original, bench.Lookup = bench.Lookup, Counting
  try:
    picks = bench.choose(method, problem, 1, budget, key=2, rng=np.random.default_rng(0))
  finally:
    bench.Lookup = original
  asked = np.concatenate(calls)
  assert len(picks) == budget == len(asked) == len(set(picks))
  np.testing.assert_array_equal(problem.alphas[picks], asked)  # what was asked is what is scored


def test_uniform_is_a_space_filling_prefix_and_random_draws_follow_the_key(problem):
  a = problem.alphas
  design = baselines.uniform_design(a, 10)
  assert baselines.uniform_design(a, 4) == design[:4]
  np.testing.assert_array_equal(a[design[:3]], np.eye(3))  # maximin from the first vertex: the vertices first
  one = baselines.random_design(a, 8, np.random.default_rng(5))
  assert one == baselines.random_design(a, 8, np.random.default_rng(5))
  assert one != baselines.random_design(a, 8, np.random.default_rng(6))


# ---------------------------------------------------------------------------------------------------------------
# Problems from report folders, and the small run.


def test_a_compare_folder_loads_with_previews_on_the_exact_rows(tmp_path):
  q = bmerge.stack([bmerge.DiagGaussian(jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0])),
                    bmerge.DiagGaussian(jnp.array([2.0, -1.0]), jnp.array([3.0, 1.0]))])
  alphas = grid.simplex(2, 0.125)
  exact_alphas = alphas[::2]

  def score(theta, _):  # [overall, task 1, task 2] losses: smaller is better
    per_task = jnp.stack([jnp.sum((theta - jnp.array([0.0, 1.0])) ** 2),
                          jnp.sum((theta - jnp.array([2.0, -1.0])) ** 2)])
    return jnp.concatenate([jnp.mean(per_task, keepdims=True), per_task])

  joint = np.array([[0.5, 0.3, 0.7]]) * np.ones((len(exact_alphas), 1)) + exact_alphas[:, :1]
  entries = [bmerge.Entry("simple", q, lambda p, a: bmerge.merge.simple_average(p.mean, a)),
             bmerge.Entry("hessian", q, bmerge.merge.hessian_weighted)]
  out = bmerge.compare(entries, score, None, alphas, exact=joint, exact_alphas=exact_alphas, maximize=False,
                       folder=tmp_path / "toy", progress=False, recommend="simple")
  loaded = bench.load_problem(tmp_path / "toy")
  np.testing.assert_array_equal(loaded.alphas, exact_alphas)
  rows = np.arange(0, len(alphas), 2)
  for name in ("simple", "hessian"):  # negated (a loss), the per-task columns, the exact rows
    np.testing.assert_allclose(loaded.previews[name][0], -out.surfaces[name][rows, 1:])
  np.testing.assert_allclose(loaded.exact[0], -joint[:, 1:])
  assert loaded.recommend == "simple" and not loaded.maximize and len(loaded.exact) == 1
  # Seeds in subfolders: one seed per surfaces.npz.
  (tmp_path / "toy" / "seed_1").mkdir()
  (tmp_path / "toy" / "seed_1" / "surfaces.npz").write_bytes((tmp_path / "toy" / "surfaces.npz").read_bytes())
  assert len(bench.load_problem(tmp_path / "toy").exact) == 2
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="surfaces.npz"):
    bench.load_problem(tmp_path / "empty")


def test_the_small_run_writes_metrics_json_in_the_stated_structure(tmp_path):
  config = pareto_config.get_config("small")
  result = bench.run(config, str(tmp_path))
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["goal"] == json.loads(json.dumps(result["goal"]))
  methods = ["pareto_poor", "pareto_good"] + list(config.baselines)
  budgets = [str(b) for b in config.budgets]
  for metric in ("hv_share", "regret", "igd_plus"):
    cells = saved[metric]["synthetic"]
    assert list(cells) == methods
    for method in methods:
      assert list(cells[method]) == budgets
      for b in budgets:
        lo, hi = cells[method][b]["ci"]
        assert lo <= cells[method][b]["mean"] <= hi
  assert all(c["regret"]["synthetic"][m][b]["mean"] >= 0 for c in [saved] for m in methods for b in budgets)
  differences = saved["differences"]["synthetic"]
  assert list(differences) == budgets
  for b in budgets:
    assert set(differences[b]) == {f"{o}-{c}" for o in methods[:2] for c in config.baselines}
    for c in config.baselines:  # paired over repetitions: the mean difference is the difference of the means
      d = differences[b][f"pareto_good-{c}"]
      assert d["mean"] == pytest.approx(saved["hv_share"]["synthetic"]["pareto_good"][b]["mean"] -
                                        saved["hv_share"]["synthetic"][c][b]["mean"], abs=1e-12)
  # A deterministic design varies with nothing here: its interval is a point.
  assert saved["hv_share"]["synthetic"]["uniform"]["3"]["ci"][0] == pytest.approx(
      saved["hv_share"]["synthetic"]["uniform"]["3"]["ci"][1])
  assert all((tmp_path / f).is_file() for f in saved["figures"])
  report = (tmp_path / "report.md").read_text()
  assert "## Goal (declared before the run)" in report and ("**met**" in report or "**not met**" in report)
