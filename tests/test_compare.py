"""bmerge.compare on quadratic tasks, where joint training has a closed form: the Hessian-weighted merge is exact.

Task t has the loss l_t(theta) = 1/2 (theta - m_t)^T diag(h_t) (theta - m_t), so joint training at alpha minimises to
theta*_alpha = (sum_t alpha_t h_t m_t) / (sum_t alpha_t h_t): the Hessian-weighted merge of N(m_t, diag(h_t)^-1).
The metric per task is -l_t; the overall metric the mean over tasks. Every score is checked against an independent
computation (numpy, float64, loops over the matched rows).
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmerge
from bmerge import comparison
from bmerge import grid
from bmerge import merge
from bmerge import metrics
from bmerge import report

MEANS = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 2.5]])
PRECISIONS = np.array([[1.0, 4.0], [3.0, 0.5], [2.0, 2.0]])
TASKS = ("a", "b", "c")


def _posteriors(means=MEANS, precisions=PRECISIONS):
  return bmerge.DiagGaussian(jnp.asarray(means, jnp.float32), jnp.asarray(precisions, jnp.float32))


def per_task_and_overall(theta, tasks):
  """[1 + T]: the mean of the per-task metrics, then -l_t(theta) for every task."""
  means, precisions = tasks
  scores = -0.5 * jnp.sum(precisions * (theta - means) ** 2, axis=1)
  return jnp.concatenate([jnp.mean(scores)[None], scores])


def simple(q, alphas):
  return merge.simple_average(q.mean, alphas)


def _exact(alphas):
  """[G, 1 + T] the metrics of the closed-form joint training, float64."""
  theta = (alphas @ (PRECISIONS * MEANS)) / (alphas @ PRECISIONS)
  scores = -0.5 * np.sum(PRECISIONS[None] * (theta[:, None, :] - MEANS[None]) ** 2, axis=2)
  return np.concatenate([scores.mean(axis=1, keepdims=True), scores], axis=1)


BATCH = (jnp.asarray(MEANS, jnp.float32), jnp.asarray(PRECISIONS, jnp.float32))
ENTRIES = [comparison.Entry("simple", _posteriors(), simple, "means -> simple averaging"),
           comparison.Entry("hessian", _posteriors(), merge.hessian_weighted, "diagonal -> Hessian-weighted")]


@pytest.fixture(scope="module")
def coarse_run(tmp_path_factory):
  """Preview at spacing 0.125 (45 alphas), exact at spacing 0.25 (15 alphas, a sub-lattice)."""
  folder = tmp_path_factory.mktemp("compare")
  alphas, exact_alphas = grid.simplex(3, 0.125), grid.simplex(3, 0.25)
  out = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=_exact(exact_alphas),
                       exact_alphas=exact_alphas, folder=folder, workdir=folder / "chunks", task_names=TASKS,
                       metric="negative loss", costs={"exact": 3.0, "posteriors hessian": 1.0}, top_k=3,
                       paper={"source": "a made-up table", "methods": {"simple": {"label": "Simple", "mse": 0.2},
                                                                       "hessian": {"label": "Hessian", "mse": 0.1}}})
  return folder, alphas, exact_alphas, out


def test_previews_are_those_of_bmerge_preview(coarse_run):
  _, alphas, _, out = coarse_run
  for e in ENTRIES:
    direct = bmerge.preview(e.rule, e.posteriors, alphas, per_task_and_overall, BATCH, progress=False)
    np.testing.assert_array_equal(out.previews[e.name], direct)


def test_scores_on_the_coarse_rows_match_an_independent_computation(coarse_run):
  _, alphas, exact_alphas, out = coarse_run
  exact = _exact(exact_alphas)
  s = out.summary
  assert s["num_alphas"] == 45 and s["num_exact_alphas"] == 15 and s["on_simplex"] and s["task_names"] == list(TASKS)
  for name, prev in out.previews.items():
    # Match by brute force: the preview row equal to each exact row.
    rows = [int(np.flatnonzero(np.all(np.abs(alphas - a) < 1e-12, axis=1))[0]) for a in exact_alphas]
    p = np.asarray(prev, np.float64)[rows, 0]
    m = s["methods"][name]
    assert m["mse"] == pytest.approx(np.mean((p - exact[:, 0]) ** 2), rel=1e-12, abs=1e-15)
    g = int(np.argmax(p))
    assert m["best_alpha"] == exact_alphas[g].tolist() and m["exact_at_best"] == pytest.approx(exact[g, 0])
    assert m["regret_at_1"] == pytest.approx(exact[:, 0].max() - exact[g, 0], abs=1e-12)
    # The best preview over the whole (finer) grid, and its exact value when joint training ran there.
    full = int(np.argmax(np.asarray(prev)[:, 0]))
    e = s["entries"][name]
    assert e["grid_best_alpha"] == alphas[full].tolist()
    on_coarse = [i for i, r in enumerate(rows) if r == full]
    assert e["grid_exact_at_best"] == (pytest.approx(exact[on_coarse[0], 0]) if on_coarse else None)
    fc = metrics.compare_fronts(exact_alphas, np.asarray(prev, np.float64)[rows, 1:], exact[:, 1:])
    assert s["pareto"][name]["recall"] == fc.recall and s["pareto"][name]["igd_plus"] == fc.igd_plus
    assert s["pareto"][name]["hypervolume_preview"] == pytest.approx(fc.hypervolume_preview)
  # Quadratic tasks: the Hessian-weighted merge is joint training, so its preview is exact up to float32.
  assert s["methods"]["hessian"]["mse"] < 1e-10 and s["methods"]["simple"]["mse"] > 1e-3
  assert s["methods"]["hessian"]["regret_at_1"] < 1e-6
  assert s["pareto"]["hessian"]["hypervolume_preview"] == pytest.approx(s["pareto"]["hessian"]["hypervolume_exact"],
                                                                         rel=1e-5)


def test_recommendation_costs_and_files(coarse_run):
  folder, alphas, exact_alphas, out = coarse_run
  s = out.summary
  rec = s["recommendation"]
  hess = np.asarray(out.previews["hessian"])[:, 0]
  assert rec["from"] == "hessian" and rec["alphas"] == alphas[np.argsort(-hess, kind="stable")[:3]].tolist()
  assert len(rec["exact"]) == 3
  assert {"exact", "posteriors hessian", "preview simple", "preview hessian"} <= set(s["costs"])
  assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(s))
  for name in ("contours", "pairs", "histograms", "pareto"):
    assert out.paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert "scaling" not in out.paths and "curves" not in out.paths
  text = out.paths["report"].read_text()
  assert "| simple | means -> simple averaging |" in text and "| hessian | diagonal -> Hessian-weighted |" in text
  assert "## Next to the paper (a made-up table)" in text and "**holds**" in text  # simple > hessian in both
  assert "## Per-task metrics: Pareto fronts" in text
  assert "Joint training: 0.2 s per alpha (3.0 s for 15 alphas)" in text
  assert s["paper_ordering"] == {"paper": ["simple", "hessian"], "ours": ["simple", "hessian"], "holds": True}
  figures = [p for k, p in out.paths.items() if k not in ("report", "metrics", "surfaces")]
  assert all(f"![{p.name}]({p.name})" in text for p in figures)
  lines = report.table(s).splitlines()
  assert lines[1].split()[0] == "simple" and lines[-1].startswith("exact (joint)")


def test_a_second_call_resumes_and_changed_posteriors_are_recomputed(coarse_run, tmp_path):
  folder, alphas, exact_alphas, out = coarse_run
  chunks = folder / "chunks"
  assert sorted(os.listdir(chunks)) == ["preview_hessian", "preview_simple"]
  stamps = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(chunks) for f in fs}
  again = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, workdir=chunks)
  assert {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(chunks) for f in fs} == stamps  # nothing recomputed
  for name in out.previews:
    np.testing.assert_array_equal(again.previews[name], out.previews[name])
  # Same entry name, other posteriors: never the old results.
  moved = [comparison.Entry("hessian", _posteriors(MEANS + 1.0), merge.hessian_weighted)]
  resumed = bmerge.compare(moved, per_task_and_overall, BATCH, alphas, workdir=chunks).previews["hessian"]
  fresh = bmerge.compare(moved, per_task_and_overall, BATCH, alphas).previews["hessian"]
  np.testing.assert_array_equal(resumed, fresh)
  assert not np.allclose(fresh, out.previews["hessian"])


def test_weighted_overall_metric_for_losses_and_two_tasks(tmp_path):
  """overall='weighted': eval_fn returns per-task losses and the overall metric is sum_t alpha_t l_t (Eq. 1)."""
  means, precisions = MEANS[:2], PRECISIONS[:2]
  batch = (jnp.asarray(means, jnp.float32), jnp.asarray(precisions, jnp.float32))
  losses = lambda theta, tasks: 0.5 * jnp.sum(tasks[1] * (theta - tasks[0]) ** 2, axis=1)
  alphas = grid.line(0.1)
  theta = (alphas @ (precisions * means)) / (alphas @ precisions)
  exact = 0.5 * np.sum(precisions[None] * (theta[:, None, :] - means[None]) ** 2, axis=2)  # [G, 2]
  entries = [("simple", _posteriors(means, precisions), simple),
             ("hessian", _posteriors(means, precisions), merge.hessian_weighted)]
  out = bmerge.compare(entries, losses, batch, alphas, exact=exact, overall="weighted", maximize=False,
                       metric="multitask loss", folder=tmp_path)
  simple_theta = alphas @ means
  simple_loss = np.sum(alphas * 0.5 * np.sum(precisions[None] * (simple_theta[:, None] - means[None]) ** 2, -1), 1)
  exact_loss = np.sum(alphas * exact, axis=1)
  m = out.summary["methods"]["simple"]
  assert m["mse"] == pytest.approx(np.mean((simple_loss - exact_loss) ** 2), rel=1e-5)
  assert m["best_alpha"] == alphas[np.argmin(simple_loss)].tolist()
  assert out.summary["exact_best"] == pytest.approx(exact_loss.min())
  assert out.summary["methods"]["hessian"]["mse"] < 1e-10
  assert {"curves", "histograms", "pareto"} <= set(out.paths) and "contours" not in out.paths
  # The report says what "best alpha" compares: both bests minimise the weighted objective, each alpha by its weights.
  text = out.paths["report"].read_text()
  assert '"Best alpha", of the preview and of joint training alike, minimises the weighted objective' in text
  assert "each alpha is scored with its own weights" in text
  with np.load(out.paths["surfaces"]) as f:  # the per-task losses as computed, and the exact ones as given
    np.testing.assert_array_equal(f["exact"], exact)
    np.testing.assert_array_equal(f["preview/simple"], out.previews["simple"])


def test_task_arithmetic_on_the_simplex_is_simple_averaging_and_off_it_the_scaled_sweep(tmp_path, x64):
  """theta_base + sum_t alpha_t (theta_t - theta_base) = sum_t alpha_t theta_t when sum_t alpha_t = 1 (Eq. 3 vs 2);
  the scaled sweep lambda * (1, ..., 1) gives theta_base + lambda sum_t (theta_t - theta_base)."""
  base = jnp.asarray([0.5, -0.5])
  finetuned = jnp.asarray(MEANS)
  on = grid.simplex(3, 0.1)
  ta = merge.task_arithmetic(base, finetuned, on)
  np.testing.assert_allclose(ta, merge.simple_average(finetuned, on), rtol=0, atol=1e-14)
  np.testing.assert_allclose(ta, on @ MEANS, rtol=0, atol=1e-14)

  lambdas = np.linspace(0.0, 1.0, 11)
  directions = np.vstack([np.ones(3), np.eye(3)[0]])
  alphas = grid.scaled(directions, lambdas)
  assert alphas.shape == (22, 3)
  dist = lambda theta, target: -jnp.sum((theta - target) ** 2)[None]
  target = jnp.asarray([1.5, 1.0])
  rule = functools.partial(merge.task_arithmetic, base)
  out = bmerge.compare([("task arithmetic", finetuned, rule)], dist, target, alphas, folder=tmp_path,
                       directions=directions)
  closed = np.asarray(base)[None] + alphas @ (MEANS - np.asarray(base))
  np.testing.assert_allclose(out.previews["task arithmetic"][:, 0], -np.sum((closed - np.asarray(target)) ** 2, 1),
                             rtol=1e-12)
  assert not out.summary["on_simplex"] and "scaling" in out.paths and "contours" not in out.paths
  # The ray decomposition gives the sweep's lambdas back, direction by direction.
  s = grid.scaling(alphas, directions)
  np.testing.assert_allclose(s.lambdas[:11, 0], lambdas)
  np.testing.assert_allclose(s.lambdas[11:, 1], lambdas)
  assert np.all(np.isnan(s.lambdas[12:, 0]))  # (lambda, 0, 0) with lambda > 0 is not on the all-ones ray


def test_previews_without_exact_results(tmp_path):
  out = bmerge.compare(ENTRIES[:1], per_task_and_overall, BATCH, grid.simplex(3, 0.25), folder=tmp_path)
  m = out.summary["methods"]["simple"]
  overall = np.asarray(out.previews["simple"])[:, 0]
  assert set(m) == {"best_alpha", "best_preview"} and m["best_preview"] == pytest.approx(overall.max())
  assert out.exact is None and "exact_best" not in out.summary and "pareto" not in out.summary
  assert {"contours", "pairs", "histograms"} <= set(out.paths)
  assert "| simple | means -> simple averaging |" in out.paths["report"].read_text()


def test_errors_name_the_argument(tmp_path):
  alphas = grid.simplex(3, 0.25)
  with pytest.raises(ValueError, match="`entries` names must not be 'exact'"):
    bmerge.compare([("exact", _posteriors(), simple)], per_task_and_overall, BATCH, alphas)
  with pytest.raises(ValueError, match="`entries` names must be unique"):
    bmerge.compare([ENTRIES[0], ENTRIES[0]], per_task_and_overall, BATCH, alphas)
  with pytest.raises(TypeError, match=r"`entries\[0\].rule`"):
    bmerge.compare([("x", _posteriors(), None)], per_task_and_overall, BATCH, alphas)
  with pytest.raises(ValueError, match=r"`exact_alphas` row 0 \[0.9"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=np.zeros(1), exact_alphas=[[0.9, 0.1, 0.0]])
  with pytest.raises(ValueError, match="`exact` has 3 rows but `alphas` has G = 15"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=np.zeros(3))
  with pytest.raises(ValueError, match=r"eval_fn\(params, batch\) for 'simple'.*\[1 \+ T\] = \[4\]"):
    bmerge.compare(ENTRIES, lambda th, b: th, BATCH, alphas)  # 2 values per alpha: neither 1 nor 1 + T
  with pytest.raises(ValueError, match="overall='weighted'.*shape \\[G, 3\\]"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, overall="weighted")
  with pytest.raises(ValueError, match="`overall`"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, overall="mean")
  with pytest.raises(ValueError, match="`paper` must hold only JSON"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, paper={"x": object()})
  with pytest.raises(ValueError, match="`exact_alphas` was given without `exact`"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact_alphas=alphas)
  with pytest.raises(ValueError, match=r"`details` keys \['costs'\] are the summary's own"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, details={"costs": 1.0})
  with pytest.raises(ValueError, match="`recommend`"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, recommend="mog")
  with pytest.raises(ValueError, match="`costs`"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, costs={"exact": -1.0})
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="`folder`"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, folder=tmp_path / "file")


# ----------------------------------------------------------------------------------------------------------------
# Options, per-example results, intervals and saved surfaces.


def test_options_object_and_keyword_overrides_give_the_same_comparison(tmp_path):
  alphas = grid.simplex(3, 0.25)
  exact = _exact(alphas)
  settings = dict(metric="negative loss", percent=False, task_names=TASKS, top_k=2, title="same", progress=False,
                  recommend="simple")
  by_name = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=exact, **settings)
  by_options = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=exact,
                              options=bmerge.CompareOptions(**settings))
  # Overrides replace the fields of `options`.
  mixed = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=exact,
                         options=bmerge.CompareOptions(**dict(settings, top_k=4, title="other")), top_k=2, title="same")
  drop = lambda s: {k: v for k, v in s.items() if k != "costs"}  # seconds differ from run to run
  assert drop(by_name.summary) == drop(by_options.summary) == drop(mixed.summary)
  assert by_name.summary["title"] == "same" and len(by_name.summary["recommendation"]["alphas"]) == 2
  assert bmerge.CompareOptions().progress is True
  assert bmerge.CompareOptions is comparison.CompareOptions and "CompareOptions" in bmerge.__all__
  with pytest.raises(TypeError, match=r"unexpected keyword argument 'metrics'.*metric, task_metric, percent"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, metrics="accuracy")
  with pytest.raises(TypeError, match="`options` must be a bmerge.CompareOptions"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, options={"metric": "accuracy"})


# Per-example results: example n of task t is "right" when the merged theta lies within tol_n of its point x_n.
# The points scatter around the task means, so the accuracy per task rises as theta approaches that task's mean.
_RNG = np.random.default_rng(0)
N_EXAMPLES = 90
TASK_OF = np.repeat(np.arange(3), N_EXAMPLES // 3)
POINTS = MEANS[TASK_OF] + _RNG.normal(0.0, 0.6, (N_EXAMPLES, 2))
TOL = _RNG.uniform(0.3, 2.0, N_EXAMPLES)
MEMBERS = np.eye(3)[TASK_OF]
MEMBERS[::7, (TASK_OF[::7] + 1) % 3] = 1.0  # every 7th example belongs to a second task too (overlapping tasks)
EXAMPLE_BATCH = (jnp.asarray(POINTS, jnp.float32), jnp.asarray(TOL, jnp.float32))


def right(theta, batch):
  points, tol = batch
  return (jnp.sqrt(jnp.sum((theta - points) ** 2, axis=1)) < tol).astype(jnp.float32)


def _exact_per_example(alphas):
  """[G, N] 1.0 where the closed-form joint-training solution is within tolerance, float64."""
  theta = (alphas @ (PRECISIONS * MEANS)) / (alphas @ PRECISIONS)
  return (np.linalg.norm(theta[:, None, :] - POINTS[None], axis=2) < TOL[None]).astype(np.float64)


def _per_task_by_loops(correct):
  """[G, 1 + T] from [G, N]: the mean over all examples, then over each task's members, with plain loops."""
  out = np.zeros((correct.shape[0], 4))
  for g, row in enumerate(np.asarray(correct, np.float64).tolist()):
    out[g, 0] = sum(row) / len(row)
    for t in range(3):
      members = [row[n] for n in range(len(row)) if MEMBERS[n, t] == 1]
      out[g, 1 + t] = sum(members) / len(members)
  return out


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
  folder = tmp_path_factory.mktemp("examples")
  alphas, exact_alphas = grid.simplex(3, 0.125), grid.simplex(3, 0.25)
  entries = ENTRIES + [comparison.Entry("simple again", _posteriors(), simple, "the same rule twice")]
  run = functools.partial(bmerge.compare, entries, right, EXAMPLE_BATCH, alphas, exact=_exact_per_example(exact_alphas),
                          exact_alphas=exact_alphas, folder=folder, workdir=folder / "chunks", examples=MEMBERS,
                          options=bmerge.CompareOptions(task_names=TASKS, percent=True, num_samples=300,
                                                        progress=False, paper={"methods": {
                                                            "simple": {"mse": 0.2}, "hessian": {"mse": 0.1}}}))
  return folder, alphas, exact_alphas, run(), run


def test_per_example_surfaces_and_scores_match_loops(example_run):
  _, alphas, exact_alphas, out, _ = example_run
  exact = _per_task_by_loops(_exact_per_example(exact_alphas))
  np.testing.assert_allclose(out.surfaces["exact"], exact, rtol=0, atol=1e-15)
  rows = [int(np.flatnonzero(np.all(np.abs(alphas - a) < 1e-12, axis=1))[0]) for a in exact_alphas]
  for name in ("simple", "hessian"):
    assert out.previews[name].shape == (45, N_EXAMPLES)  # as computed: one result per example
    surface = _per_task_by_loops(out.previews[name])
    np.testing.assert_allclose(out.surfaces[name], surface, rtol=0, atol=1e-15)
    m = out.summary["methods"][name]
    assert m["mse"] == pytest.approx(np.mean((surface[rows, 0] - exact[:, 0]) ** 2), rel=1e-12, abs=1e-15)
    fc = metrics.compare_fronts(exact_alphas, surface[rows, 1:], exact[:, 1:])
    assert out.summary["pareto"][name]["recall"] == fc.recall
  assert out.summary["num_examples"] == N_EXAMPLES
  # The Hessian-weighted merge is joint training here (up to float32 at the tolerance edges); simple averaging is not.
  assert out.summary["methods"]["hessian"]["mse"] < out.summary["methods"]["simple"]["mse"]


def test_per_example_intervals_contain_their_estimates_and_differences_are_paired(example_run):
  _, _, _, out, _ = example_run
  s = out.summary
  assert s["interval"] == {"kind": "bootstrap over test examples", "seeds": 1, "samples": 300, "level": 0.95}
  for name, m in s["methods"].items():
    for key in ("mse", "spearman", "regret_at_1"):
      lo, hi = m[f"{key}_ci"]
      assert lo <= m[key] + 1e-12 and m[key] - 1e-12 <= hi, (name, key)
  names = list(s["methods"])
  assert set(s["differences"]) == {f"{a}-{b}" for a in names for b in names if a != b}
  for a in names:
    for b in names:
      if a != b:
        d, back = s["differences"][f"{a}-{b}"], s["differences"][f"{b}-{a}"]
        assert d["mse"] == pytest.approx(s["methods"][a]["mse"] - s["methods"][b]["mse"], abs=1e-12)
        assert d["ci"] == pytest.approx([-back["ci"][1], -back["ci"][0]], abs=1e-12)
  # The same rule twice: every resample gives the same MSE for both, so the difference is exactly 0 and unresolved.
  assert s["differences"]["simple-simple again"] == {"mse": 0.0, "ci": [0.0, 0.0]}
  lo, hi = s["differences"]["simple-hessian"]["ci"]
  resolved = lo > 0
  assert s["paper_ordering"]["verdict"] == ("holds" if resolved else "not resolved")
  text = (pathlib.Path(out.paths["report"])).read_text()
  assert "| simple > simple again | 0 | [0, 0] | not resolved |" in text
  assert f"| simple > hessian | {s['differences']['simple-hessian']['mse']:.3g} | [{lo:.3g}, {hi:.3g}] | " + (
      "holds |" if resolved else "not resolved |") in text
  m = s["methods"]["simple"]
  assert f"| {m['mse']:.4g} [{m['mse_ci'][0]:.3g}, {m['mse_ci'][1]:.3g}] |" in text
  assert "bootstrap over test examples (300 resamples, paired" in text


def test_resampled_surfaces_equal_per_task_accuracy_of_the_resampled_examples():
  rng = np.random.default_rng(1)
  results = (rng.random((5, N_EXAMPLES)) < 0.6).astype(np.float64)
  members = np.concatenate([np.ones((N_EXAMPLES, 1)), MEMBERS], axis=1)
  idx = rng.integers(0, N_EXAMPLES, (4, N_EXAMPLES))
  counts = np.stack([np.bincount(i, minlength=N_EXAMPLES) for i in idx]).astype(np.float64)
  fast = comparison._resampled_surfaces(results, members, counts)  # pylint: disable=protected-access
  for b in range(4):
    np.testing.assert_allclose(fast[b], metrics.per_task_accuracy(results[:, idx[b]], MEMBERS[idx[b]]), atol=1e-14)


def test_surfaces_npz_round_trips_and_a_second_call_resumes(example_run):
  folder, alphas, exact_alphas, out, run = example_run
  assert json.loads((folder / "metrics.json").read_text())["surfaces"] == "surfaces.npz"
  with np.load(folder / "surfaces.npz") as f:
    np.testing.assert_array_equal(f["alphas"], alphas)
    np.testing.assert_array_equal(f["exact_alphas"], exact_alphas)
    np.testing.assert_array_equal(f["exact"], _exact_per_example(exact_alphas))
    np.testing.assert_array_equal(f["examples"], MEMBERS)
    np.testing.assert_array_equal(f["surface/exact"], out.surfaces["exact"])
    for name in out.previews:
      np.testing.assert_array_equal(f[f"preview/{name}"], out.previews[name])
      np.testing.assert_array_equal(f[f"surface/{name}"], out.surfaces[name])
  chunks = folder / "chunks"
  stamps = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(chunks) for f in fs}
  again = run()
  assert {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(chunks) for f in fs} == stamps  # nothing recomputed
  drop = lambda s: {k: v for k, v in s.items() if k != "costs"}
  assert drop(again.summary) == drop(out.summary)  # the same previews and the same seeded resamples


def test_per_example_errors_name_the_argument():
  alphas = grid.simplex(3, 0.25)
  exact = _exact_per_example(alphas)
  with pytest.raises(ValueError, match=r"with `examples` it must return \[N\] = \[90\]"):
    bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=exact, examples=MEMBERS, progress=False)
  with pytest.raises(ValueError, match=r"`exact` has shape \(15, 4\); with `examples`"):
    bmerge.compare(ENTRIES, right, EXAMPLE_BATCH, alphas, exact=_exact(alphas), examples=MEMBERS)
  with pytest.raises(ValueError, match="`examples` has 2 columns"):
    bmerge.compare(ENTRIES, right, EXAMPLE_BATCH, alphas, examples=MEMBERS[:, :2])
  with pytest.raises(ValueError, match="`examples` must hold 0 or 1"):
    bmerge.compare(ENTRIES, right, EXAMPLE_BATCH, alphas, examples=2 * MEMBERS)


def test_each_method_is_charged_its_own_compilation_and_a_resumed_run_reports_the_stored_costs(tmp_path):
  """Two entries with the same rule and shapes: the second reuses the first's compiled preview and is charged the same
  compilation (compile_seconds equal and > 0); run time excludes it. A
  resumed compare() reports exactly the first run's stored seconds, says the previews were loaded, and compares no
  figure of the old run with one of the new."""
  alphas = grid.simplex(3, 0.25)
  bmerge.grid.evaluate.clear_cache()  # as in a fresh process: another test may have compiled this preview already
  entries = [comparison.Entry("first", _posteriors(), merge.hessian_weighted),
             comparison.Entry("second", _posteriors(MEANS + 0.5), merge.hessian_weighted)]
  kw = dict(exact=_exact(alphas), workdir=str(tmp_path / "work"), progress=False,
            costs={"exact": bmerge.timing.Cost("exact", 3.0, 0.5, 15, 0, bmerge.timing.RUN, bmerge.timing.machine())})
  out = bmerge.compare(entries, per_task_and_overall, BATCH, alphas, folder=tmp_path / "a", **kw)
  costs = out.summary["costs"]
  for name in ("first", "second"):
    c = costs[f"preview {name}"]
    assert c["compile_seconds"] > 0 and c["seconds"] > 0 and not c["loaded"] and c["run"] == bmerge.timing.RUN
  assert costs["preview second"]["compile_seconds"] == costs["preview first"]["compile_seconds"]
  assert costs["exact"]["seconds"] == 3.0 and costs["exact"]["compile_seconds"] == 0.5
  assert "x faster per alpha" in out.paths["report"].read_text() or "x slower per alpha" in out.paths[
      "report"].read_text()

  import bmerge.timing as timing_module  # pylint: disable=g-import-not-at-top
  real_run = timing_module.RUN
  try:
    timing_module.RUN = "a-later-run"
    again = bmerge.compare(entries, per_task_and_overall, BATCH, alphas, folder=tmp_path / "b", **kw)
  finally:
    timing_module.RUN = real_run
  for name in ("first", "second"):
    old, new = costs[f"preview {name}"], again.summary["costs"][f"preview {name}"]
    assert new["loaded"] and new["compile_seconds"] == 0.0 and new["run"] == old["run"]
    assert new["seconds"] == pytest.approx(old["seconds"], rel=1e-12)
  text = again.paths["report"].read_text()
  assert "not compared with joint training (measured in another run)" not in text  # exact given in the old run id
  assert "| preview first |" in text and "| yes |" in text


def test_train_at_the_recommended_alphas_scores_and_reports_them(tmp_path):
  alphas = grid.simplex(3, 0.25)
  asked = []

  def joint(a):
    asked.append(np.asarray(a).copy())
    return _exact(np.asarray(a))

  out = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, folder=tmp_path, top_k=3, progress=False)
  assert "mse" not in out.summary["methods"]["hessian"]  # nothing to score against yet
  out = bmerge.train_at(out, joint)
  rec = out.summary["recommendation"]["alphas"]
  np.testing.assert_array_equal(asked[0], rec)
  assert out.summary["num_exact_alphas"] == 3
  # The scores are those of a compare() given the same exact rows.
  want = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, exact=_exact(np.asarray(rec)),
                        exact_alphas=rec, progress=False)
  for name in ("simple", "hessian"):
    assert out.summary["methods"][name]["mse"] == pytest.approx(want.summary["methods"][name]["mse"], rel=1e-12)
  assert out.summary["costs"]["exact at chosen alphas"]["computed_rows"] == 3
  assert json.loads((tmp_path / "metrics.json").read_text())["num_exact_alphas"] == 3
  # Any list of grid rows: those already trained are not trained again.
  more = np.concatenate([np.asarray(rec[:1]), alphas[:2]])
  out = bmerge.train_at(out, joint, more)
  known = {tuple(r) for r in np.asarray(rec)}
  np.testing.assert_array_equal(asked[1], [a for a in alphas[:2] if tuple(a) not in known])
  assert out.summary["num_exact_alphas"] == 3 + len(asked[1])
  with pytest.raises(ValueError, match="`alphas` row 0 .* is not a row of the preview grid"):
    bmerge.train_at(out, joint, [[0.1, 0.2, 0.7]])
  # One run at the top alpha, with a report folder: the figures that cannot show one exact point leave it out.
  one = bmerge.compare(ENTRIES, per_task_and_overall, BATCH, alphas, folder=tmp_path / "one", progress=False)
  one = bmerge.train_at(one, joint, top_k=1)
  assert one.summary["num_exact_alphas"] == 1 and one.paths["contours"].is_file()
