"""Honest costs: compilation apart from run time, stored with the results, reported as stored when loaded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmerge
from bmerge import timing as _timing


def test_compilation_is_counted_apart_and_a_cache_hit_compiles_nothing():
  f = jax.jit(lambda x: jnp.sin(x) @ x.T)
  x = jnp.ones((64, 64))
  with _timing.stopwatch() as first:
    jax.block_until_ready(f(x))
  with _timing.stopwatch() as again:
    jax.block_until_ready(f(x))
  assert first.compile_seconds > 0 and first.wall >= first.compile_seconds
  assert again.compile_seconds == 0.0
  # Nested watches both see the compilation.
  g = jax.jit(lambda x: jnp.cos(x) + 1)
  with _timing.stopwatch() as outer:
    with _timing.stopwatch() as inner:
      jax.block_until_ready(g(x))
  assert inner.compile_seconds > 0 and outer.compile_seconds >= inner.compile_seconds


def test_a_resumed_run_reports_the_stored_seconds_run_and_machine(tmp_path, monkeypatch):
  alphas = bmerge.grid.simplex(3, 0.25)
  fn = lambda a: jnp.cumsum(a, axis=1)
  with _timing.recording() as first:
    bmerge.chunked_map(fn, alphas, chunk_size=4, workdir=str(tmp_path), progress=False)
  (cost,) = first
  assert (cost.computed_rows, cost.loaded_rows, cost.run) == (len(alphas), 0, _timing.RUN)
  assert cost.compile_seconds > 0 and cost.seconds > 0
  monkeypatch.setattr(_timing, "RUN", "another-process")
  with _timing.recording() as again:
    bmerge.chunked_map(fn, alphas, chunk_size=4, workdir=str(tmp_path), progress=False)
  (loaded,) = again
  assert (loaded.computed_rows, loaded.loaded_rows, loaded.compile_seconds) == (0, len(alphas), 0.0)
  assert loaded.run == cost.run and loaded.machine == cost.machine
  assert loaded.seconds == pytest.approx(cost.seconds, rel=1e-9)
  assert loaded.to_json()["loaded"] and not cost.to_json()["loaded"]
  # A grid with one more row computes only that row: the stage mixes two runs and says so.
  more = np.concatenate([alphas, [[0.1, 0.1, 0.8]]])
  with _timing.recording() as mixed:
    bmerge.chunked_map(fn, more, chunk_size=4, workdir=str(tmp_path), progress=False)
  assert (mixed[0].computed_rows, mixed[0].loaded_rows, mixed[0].run) == (1, len(alphas), "mixed")


def test_recording_collects_every_chunked_stage_in_order():
  q = bmerge.stack([bmerge.DiagGaussian({"w": jnp.full(2, float(t))}, {"w": jnp.ones(2)}) for t in range(2)])
  with _timing.recording() as log:
    bmerge.preview(lambda p, a: bmerge.merge.simple_average(p.mean, a), q, bmerge.grid.simplex(2, 0.5),
                   lambda p, b: jnp.sum(p["w"]), None, progress=False, tag="first")
    bmerge.chunked_map(lambda a: a, np.eye(2), progress=False, tag="second")
  assert [c.stage for c in log] == ["first", "second"]
  assert [c.computed_rows for c in log] == [3, 2]
