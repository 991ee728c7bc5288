"""Fused, chunked, resumable previews and the exact joint-training baseline."""

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bmerge
from bmerge import exact
from bmerge import grid
from bmerge.grid import evaluate as pv
from bmerge import merge


def _posteriors(seed=0, t=3):
  rng = np.random.default_rng(seed)
  mean = {"w": rng.normal(size=(t, 4, 3)).astype(np.float32), "b": rng.normal(size=(t, 3)).astype(np.float32)}
  prec = jax.tree.map(lambda x: np.exp(rng.normal(size=x.shape)).astype(np.float32), mean)
  return bmerge.DiagGaussian(mean, prec)


def _eval(params, batch):
  """Accuracy of a linear classifier and a per-class score vector: a scalar and a vector metric."""
  x, y = batch
  logits = x @ params["w"] + params["b"]
  return {"acc": jnp.mean(jnp.argmax(logits, -1) == y), "score": jnp.mean(logits, 0)}


def _batch(seed=1):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(50, 4)).astype(np.float32), rng.integers(0, 3, size=50)


def test_preview_equals_unfused_merge_then_eval():
  q, batch, alphas = _posteriors(), _batch(), grid.simplex(3, 0.1)
  got = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=7, progress=False)
  merged = merge.hessian_weighted(q, alphas)
  want = jax.vmap(_eval, in_axes=(0, None))(merged, batch)
  np.testing.assert_allclose(got["acc"], want["acc"])
  np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)
  assert got["score"].shape == (len(alphas), 3)
  # The chunk size changes nothing.
  again = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=64, progress=False)
  np.testing.assert_allclose(again["score"], got["score"], atol=1e-6)


def test_preview_with_mixture_rule():
  q = _posteriors()
  mix = bmerge.Mixture(jax.tree.map(lambda x: x[:, None], q), np.zeros((3, 1), np.float32))
  alphas = grid.simplex(3, 0.25)
  got = pv.preview(functools.partial(merge.mixture_weighted, num_iters=3), mix, alphas, _eval, _batch(),
                   chunk_size=4, progress=False)
  want = pv.preview(merge.hessian_weighted, q, alphas, _eval, _batch(), progress=False)
  np.testing.assert_allclose(got["score"], want["score"], atol=1e-5)


def test_preview_bad_input_fails_before_compiling(tmp_path):
  q = _posteriors()
  with pytest.raises(ValueError, match=r"row \d+ sums to 0.9.*pass `prior=`"):
    pv.preview(merge.hessian_weighted, q, 0.9 * grid.simplex(3, 0.5), _eval, _batch(), progress=False)
  # The error names the row of the user's grid that is wrong, not row 0 of the row checked.
  alphas = grid.simplex(3, 0.25)
  alphas[9] *= 0.8
  with pytest.raises(ValueError, match=r"`alphas` row 9 sums to 0.8"):
    pv.preview(merge.hessian_weighted, q, alphas, _eval, _batch(), progress=False)
  bad = bmerge.DiagGaussian(q.mean, {**q.precision, "b": -np.ones((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"`posteriors.precision\['b'\]` must be > 0"):
    pv.preview(merge.hessian_weighted, bad, grid.simplex(3, 0.5), _eval, _batch(), progress=False)
  with pytest.raises(ValueError, match=r"`alphas` must be a \[G, T\] grid or one \[T\] vector"):
    pv.preview(merge.hessian_weighted, q, np.ones((1, 1, 3)) / 3, _eval, _batch(), progress=False)
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ValueError, match=r"`workdir` = .*afile' is a file, not a directory"):
    pv.preview(merge.hessian_weighted, q, grid.simplex(3, 0.5), _eval, _batch(), workdir=str(afile), progress=False)
  with pytest.raises(ValueError, match=r"`workdir` = .*afile' is a file"):
    exact.joint_train(lambda p, b: jnp.stack([p["x"].sum()] * 3), {"x": jnp.zeros(2)}, grid.simplex(3, 0.5),
                      optax.sgd(0.1), 1, None, workdir=str(afile), progress=False)


def test_preview_takes_one_alpha_vector():
  q, batch = _posteriors(), _batch()
  one = pv.preview(merge.hessian_weighted, q, np.array([0.2, 0.3, 0.5]), _eval, batch, progress=False)
  grid_ = pv.preview(merge.hessian_weighted, q, np.array([[0.2, 0.3, 0.5]]), _eval, batch, progress=False)
  assert one["score"].shape == (3,)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[0]), one, grid_)


class _Crash(Exception):
  pass


def _crash_after(monkeypatch, n):
  """Makes the (n+1)-th chunk save raise, as if the process were killed after n chunks reached disk."""
  real = pv._save_chunk
  calls = []

  def save(path, rows, tree, *cost):
    if len(calls) >= n:
      raise _Crash(path)
    calls.append(path)
    real(path, rows, tree, *cost)

  monkeypatch.setattr(pv, "_save_chunk", save)
  return calls


def _chunk_files(workdir):
  return sorted(p for p in pathlib.Path(workdir).rglob("rows-*.npz"))


def test_preview_resumes_without_recomputing(tmp_path, monkeypatch):
  q, batch, alphas = _posteriors(), _batch(), grid.simplex(3, 0.05)  # 231 alphas, 8 chunks of 32
  full = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, progress=False)
  workdir = str(tmp_path)
  _crash_after(monkeypatch, 3)
  with pytest.raises(_Crash):
    pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, workdir=workdir, progress=False)
  done = _chunk_files(workdir)
  assert len(done) == 3
  mtimes = {p: p.stat().st_mtime_ns for p in done}
  monkeypatch.undo()
  saved = _crash_after(monkeypatch, 10**9)
  resumed = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, workdir=workdir,
                       progress=False)
  assert len(saved) == 5  # only the missing chunks were computed
  assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  # A third run loads everything and computes nothing, whatever the chunk size.
  saved.clear()
  again = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=7, workdir=workdir, progress=False)
  assert saved == []
  jax.tree.map(np.testing.assert_array_equal, again, full)
  # A finer grid reuses the rows it shares with the finished one and computes only the new ones.
  fine = grid.simplex(3, 0.025)
  shared = np.isin(pv._row_keys(fine.astype(np.float32)), pv._row_keys(alphas.astype(np.float32)))
  assert shared.sum() == len(alphas)
  out = pv.preview(merge.hessian_weighted, q, fine, _eval, batch, chunk_size=64, workdir=workdir, progress=False)
  assert len(saved) == -(-int((~shared).sum()) // 64)
  want = pv.preview(merge.hessian_weighted, q, fine, _eval, batch, chunk_size=64, progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out, want)


def _hessian_fresh(q, alphas, batch, **kw):
  return pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, progress=False, **kw)


@pytest.mark.parametrize("change", ["posteriors", "rule", "batch", "partial_arg", "one_leaf_entry", "eval_fn"])
def test_resume_never_returns_results_of_other_inputs(tmp_path, change):
  """Each reproduction of the stale-resume bug: the second call must equal a run in an empty workdir."""
  q, batch, alphas, workdir = _posteriors(0), _batch(), grid.simplex(3, 0.25), str(tmp_path)
  rule, ev = merge.hessian_weighted, _eval
  if change == "partial_arg":
    mix = bmerge.Mixture(jax.tree.map(lambda x: np.stack([x, 1.1 * x], 1), q), np.zeros((3, 2), np.float32))
    q, rule = mix, functools.partial(merge.mixture_weighted, num_iters=1)
  pv.preview(rule, q, alphas, ev, batch, workdir=workdir, progress=False)
  q2, rule2, batch2, ev2 = q, rule, batch, ev
  if change == "posteriors":  # another learner's posteriors, same rule and default tag
    q2 = _posteriors(5)
  elif change == "rule":  # simple averaging of the means: another rule, default tag
    q2, rule2 = q.mean, merge.simple_average
  elif change == "batch":
    batch2 = _batch(7)
  elif change == "partial_arg":
    rule2 = functools.partial(merge.mixture_weighted, num_iters=4)
  elif change == "one_leaf_entry":
    w = np.array(q.mean["w"])
    w[1, 2, 0] += 0.5
    q2 = q._replace(mean={**q.mean, "w": w})
  elif change == "eval_fn":
    ev2 = lambda p, b: {"acc": _eval(p, b)["acc"], "score": 2.0 * _eval(p, b)["score"]}
  got = pv.preview(rule2, q2, alphas, ev2, batch2, workdir=workdir, progress=False)
  want = pv.preview(rule2, q2, alphas, ev2, batch2, workdir=str(tmp_path / "empty"), progress=False)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  first = pv.preview(rule, q, alphas, ev, batch, progress=False)
  assert not np.allclose(got["score"], first["score"])  # the change does change the results


def test_chunked_map_keys_its_folder_by_the_inputs_and_names_what_changed(tmp_path, caplog, monkeypatch):
  calls = _crash_after(monkeypatch, 10**9)  # counts the chunks computed (each is saved once)
  fn = lambda a: a.sum(axis=1)

  alphas = grid.simplex(3, 0.5)
  kw = dict(chunk_size=4, workdir=str(tmp_path), tag="m", progress=False)
  out = pv.chunked_map(fn, alphas, inputs={"data": np.arange(3), "scale": 1.0}, **kw)
  assert len(calls) == 2
  pv.chunked_map(fn, alphas, inputs={"data": np.arange(3), "scale": 1.0}, **kw)
  assert len(calls) == 2  # same inputs: loaded
  with caplog.at_level("INFO"):
    again = pv.chunked_map(fn, alphas, inputs={"data": np.arange(3) + 1, "scale": 1.0}, **kw)
  assert len(calls) == 4  # changed inputs: computed again, into another folder
  assert "changed: data" in caplog.text and "scale" not in caplog.text.split("changed:")[1].split(")")[0]
  folders = sorted(p.name for p in (tmp_path / "m").iterdir())
  assert len(folders) == 2
  # Logged at INFO (a different eval_fn in one workdir is normal use), naming the new folder it computes into.
  (record,) = [r for r in caplog.records if "inputs differ" in r.getMessage()]
  new = [f for f in folders if f not in record.getMessage().split("computing into")[0]]
  assert record.levelname == "INFO" and len(new) == 1
  assert record.getMessage().endswith(f"computing into {tmp_path / 'm' / new[0]}.")
  np.testing.assert_array_equal(out, again)
  with pytest.raises(ValueError, match="`tag` must be a non-empty name"):
    pv.chunked_map(fn, alphas, inputs={}, chunk_size=4, workdir=str(tmp_path), tag="../x", progress=False)


def test_default_tags_differ_per_rule(tmp_path):
  q, batch, alphas = _posteriors(), _batch(), grid.simplex(3, 0.5)
  pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, workdir=str(tmp_path), progress=False)
  pv.preview(merge.simple_average, q.mean, alphas, _eval, batch, workdir=str(tmp_path), progress=False)
  pv.preview(functools.partial(merge.task_arithmetic, jax.tree.map(lambda x: x[0], q.mean)), q.mean, alphas, _eval,
             batch, workdir=str(tmp_path), progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "preview_hessian_weighted", "preview_simple_average", "preview_task_arithmetic"]


def _quadratic_tasks():
  centres = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32)

  def task_losses(params, batch):
    return 0.5 * jnp.sum((params["x"][None] - centres) ** 2, axis=1) * batch

  return centres, task_losses


def test_joint_train_reaches_closed_form_weighted_optimum():
  centres, task_losses = _quadratic_tasks()
  alphas = grid.simplex(3, 0.1)
  out = exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.sgd(0.5), 60, jnp.float32(1.0),
                          chunk_size=16, progress=False)
  # argmin sum_t a_t |x - c_t|^2 / 2 = sum_t a_t c_t (rows sum to one).
  np.testing.assert_allclose(out["x"], alphas @ np.asarray(centres), atol=1e-5)


def test_joint_train_with_eval_and_resume(tmp_path, monkeypatch):
  centres, task_losses = _quadratic_tasks()
  alphas = grid.simplex(3, 0.1)
  eval_fn = lambda p, c: jnp.sum((p["x"] - c) ** 2)
  kw = dict(eval_fn=eval_fn, eval_batch=centres[0], chunk_size=16, progress=False)
  full = exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.adam(0.1), 30, jnp.float32(1.0), **kw)
  single = [exact.joint_train(task_losses, {"x": jnp.zeros(5)}, a[None], optax.adam(0.1), 30, jnp.float32(1.0), **kw)
            for a in alphas[::13]]
  np.testing.assert_allclose(np.concatenate(single), full[::13], rtol=1e-5)
  _crash_after(monkeypatch, 2)
  with pytest.raises(_Crash):
    exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.adam(0.1), 30, jnp.float32(1.0),
                      workdir=str(tmp_path), **kw)
  monkeypatch.undo()
  saved = _crash_after(monkeypatch, 10**9)
  resumed = exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.adam(0.1), 30, jnp.float32(1.0),
                              workdir=str(tmp_path), **kw)
  assert len(saved) == 3  # 66 alphas in 5 chunks of 16: 2 were on disk, 3 computed
  np.testing.assert_array_equal(resumed, full)
  # Another chunk size reuses every finished row.
  saved.clear()
  again = exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.adam(0.1), 30, jnp.float32(1.0),
                            workdir=str(tmp_path), **{**kw, "chunk_size": 5})
  assert saved == []
  np.testing.assert_array_equal(again, full)
  # Another learning rate, init or data: a fresh computation equal to a run without a workdir.
  for opt, init, target in [(optax.adam(0.05), jnp.zeros(5), centres[0]), (optax.adam(0.1), jnp.ones(5), centres[0]),
                            (optax.adam(0.1), jnp.zeros(5), centres[1])]:
    kw2 = {**kw, "eval_batch": target}
    got = exact.joint_train(task_losses, {"x": init}, alphas, opt, 30, jnp.float32(1.0), workdir=str(tmp_path), **kw2)
    want = exact.joint_train(task_losses, {"x": init}, alphas, opt, 30, jnp.float32(1.0), **kw2)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, full)


def test_joint_train_stepwise_minibatches_equal_a_hand_loop():
  centres, _ = _quadratic_tasks()
  steps = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, size=(7,)), jnp.float32)  # a per-step data scale

  def task_losses(params, scale):
    return 0.5 * scale * jnp.sum((params["x"][None] - centres) ** 2, axis=1)

  alphas = grid.simplex(3, 0.5)
  got = exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.sgd(0.3), None, steps, stepwise=True,
                          progress=False)
  for g, a in enumerate(alphas):
    x = np.zeros(5)
    for s in np.asarray(steps):
      x = x - 0.3 * s * np.sum(a[:, None] * (x[None] - np.asarray(centres)), axis=0)
    np.testing.assert_allclose(got["x"][g], x, rtol=1e-5, atol=1e-6)
  # The Python step loop gives the same results.
  loop = exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.sgd(0.3), None, steps, stepwise=True,
                           progress=False, step_loop="python", chunk_size=4)
  np.testing.assert_allclose(loop["x"], got["x"], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match=r"`num_steps` = 3 but `batch` holds 7 steps"):
    exact.joint_train(task_losses, {"x": jnp.zeros(5)}, alphas, optax.sgd(0.3), 3, steps, stepwise=True)


def test_joint_train_checks_task_count():
  _, task_losses = _quadratic_tasks()
  with pytest.raises(ValueError, match=r"`task_losses` returns shape \(3,\) but `alphas` has T = 2"):
    exact.joint_train(task_losses, {"x": jnp.zeros(5)}, grid.line(0.5), optax.sgd(0.1), 1, jnp.float32(1.0))


def test_chunked_map_spreads_rows_evenly_over_its_calls():
  """ceil(G / chunk_size) calls of one size, at most chunk_size: G = 9 with chunk_size 8 is two calls of 5 (one row
  padded), not 8 + 8 (seven padded); results in order, the padding dropped."""
  shapes = []

  def fn(a):
    shapes.append(a.shape)
    return {"sum": a.sum(axis=1), "first": a[:, 0]}

  alphas = np.random.default_rng(0).dirichlet(np.ones(3), size=9).astype(np.float32)
  out = pv.chunked_map(fn, alphas, chunk_size=8, progress=False)
  assert shapes == [(5, 3), (5, 3)]
  np.testing.assert_allclose(out["sum"], alphas.sum(axis=1), rtol=1e-6)
  np.testing.assert_array_equal(out["first"], alphas[:, 0])
  shapes.clear()
  pv.chunked_map(fn, alphas, chunk_size=3, progress=False)
  assert shapes == [(3, 3)] * 3  # already even
  shapes.clear()
  pv.chunked_map(fn, alphas, chunk_size=64, progress=False)
  assert shapes == [(9, 3)]
