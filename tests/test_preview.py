"""Fused, chunked, resumable previews and the exact joint-training baseline."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bmerge
from bmerge import exact, grid, grid_eval as pv, merge


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


def test_preview_bad_input_fails_before_compiling():
  q = _posteriors()
  with pytest.raises(ValueError, match=r"row \d+ sums to 0.9.*pass `prior=`"):
    pv.preview(merge.hessian_weighted, q, 0.9 * grid.simplex(3, 0.5), _eval, _batch(), progress=False)
  bad = bmerge.DiagGaussian(q.mean, {**q.precision, "b": -np.ones((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"`posteriors.precision\['b'\]` must be > 0"):
    pv.preview(merge.hessian_weighted, bad, grid.simplex(3, 0.5), _eval, _batch(), progress=False)
  with pytest.raises(ValueError, match=r"`alphas` must be a \[G, T\] grid"):
    pv.preview(merge.hessian_weighted, q, np.ones(3) / 3, _eval, _batch(), progress=False)


class _Crash(Exception):
  pass


def _crash_after(monkeypatch, n):
  """Makes the (n+1)-th chunk save raise, as if the process were killed after n chunks reached disk."""
  real = pv._save_chunk
  calls = []

  def save(path, tree):
    if len(calls) >= n:
      raise _Crash(path)
    calls.append(path)
    real(path, tree)

  monkeypatch.setattr(pv, "_save_chunk", save)
  return calls


def test_preview_resumes_without_recomputing(tmp_path, monkeypatch):
  q, batch, alphas = _posteriors(), _batch(), grid.simplex(3, 0.05)  # 231 alphas, 8 chunks of 32
  full = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, progress=False)
  workdir = str(tmp_path)
  _crash_after(monkeypatch, 3)
  with pytest.raises(_Crash):
    pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, workdir=workdir, progress=False)
  folder = tmp_path / "preview"
  done = sorted(folder.glob("chunk_*.npz"))
  assert len(done) == 3
  mtimes = {p: p.stat().st_mtime_ns for p in done}
  monkeypatch.undo()
  saved = _crash_after(monkeypatch, 10**9)
  resumed = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, workdir=workdir,
                       progress=False)
  assert len(saved) == 5  # only the missing chunks were computed
  assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  # A third run loads everything and computes nothing.
  saved.clear()
  again = pv.preview(merge.hessian_weighted, q, alphas, _eval, batch, chunk_size=32, workdir=workdir, progress=False)
  assert saved == []
  jax.tree.map(np.testing.assert_array_equal, again, full)
  # Another grid in the same folder is refused rather than mixed.
  with pytest.raises(ValueError, match="holds chunks of a different run"):
    pv.preview(merge.hessian_weighted, q, grid.simplex(3, 0.1), _eval, batch, chunk_size=32, workdir=workdir,
               progress=False)


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


def test_joint_train_checks_task_count():
  _, task_losses = _quadratic_tasks()
  with pytest.raises(ValueError, match=r"`task_losses` returns shape \(3,\) but `alphas` has T = 2"):
    exact.joint_train(task_losses, {"x": jnp.zeros(5)}, grid.line(0.5), optax.sgd(0.1), 1, jnp.float32(1.0))
