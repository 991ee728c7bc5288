r"""Benchmark: merging a whole alpha grid at once vs merging alpha by alpha (issue: core engine, item 8).

Measured side by side in one run (the machines are shared and noisy), printing ratios:
  (a) `bmerge.em.find_modes` (the batched GEMM form) vs a Python loop over alphas of the jitted single-alpha
      Algorithm 1 (`em.find_mode_reference`), and vs `vmap` of that single-alpha function;
  (b) the batched EM's FLOP/s as a fraction of this machine's float32 matmul throughput, measured here;
  (c) `bmerge.merge.hessian_weighted` (diagonal) on the grid vs a loop over alphas of a jitted single-alpha Eq. 10.

Defaults are the issue's sizes: T=3, K=10, P=260,000, G=231 (simplex spacing 0.05), 10 iterations.
`vmap` of the elementwise single-alpha EM materialises G x T x K x P floats (7 GB here), so it is timed on a slice of
`--vmap_alphas` alphas and scaled to G (printed as such). Run:
  python -m experiments.benchmarks.merge_grid [--params 260000] [--components 10] [--spacing 0.05]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import bmerge
from bmerge import em, grid, merge
from experiments.benchmarks.common import block, matmul_flops, median_time

flags.DEFINE_integer("tasks", 3, "T")
flags.DEFINE_integer("components", 10, "K per task")
flags.DEFINE_integer("params", 260_000, "P")
flags.DEFINE_float("spacing", 0.05, "simplex spacing (G = 231 for T = 3 and 0.05)")
flags.DEFINE_integer("iters", 10, "EM iterations")
flags.DEFINE_integer("repeats", 3, "timed repeats of the fast variants (the median is reported)")
flags.DEFINE_integer("loop_alphas", 0, "time the per-alpha loops on this many alphas and scale to G (0: all)")
flags.DEFINE_integer("vmap_alphas", 33, "alphas in the vmap slice (its memory is vmap_alphas * T * K * P floats)")
FLAGS = flags.FLAGS


def em_flops(g: int, t: int, k: int, p: int, iters: int) -> float:
  """GEMM FLOPs of find_modes: per iteration two [G,P]x[P,TK] and two [G,TK]x[TK,P]; plus the start and final density."""
  gemm = 2.0 * g * (2 * p) * (t * k)
  return iters * 2 * gemm + 2 * gemm


def main(_):
  t, k, p, iters = FLAGS.tasks, FLAGS.components, FLAGS.params, FLAGS.iters
  alphas = jnp.asarray(grid.simplex(t, FLAGS.spacing), jnp.float32)
  g = alphas.shape[0]
  rng = np.random.default_rng(0)
  base = rng.normal(size=p).astype(np.float32)
  means = (base + 1e-3 * rng.normal(size=(t, k, p))).astype(np.float32)
  precs = (10.0 ** rng.uniform(0, 4, size=(t, k, p))).astype(np.float32)
  mix = bmerge.Mixture(bmerge.DiagGaussian(jnp.asarray(means), jnp.asarray(precs)),
                       jnp.zeros((t, k), jnp.float32))
  print(f"T={t} K={k} P={p:,} G={g} iters={iters} devices={jax.devices()}")

  peak = matmul_flops()
  print(f"f32 matmul throughput (2048^3): {peak / 1e9:.1f} GFLOP/s")

  # (a) batched vs per-alpha loop vs vmap.
  batched = median_time(lambda: em.find_modes(mix, alphas, iters).params, FLAGS.repeats)[0]
  single = jax.jit(em.find_mode_reference, static_argnums=2)
  rows = [jnp.asarray(r) for r in np.asarray(alphas)]  # device rows made before timing: no indexing ops in the loop
  n_loop = FLAGS.loop_alphas or g
  scaled = f" (timed on {n_loop} alphas, scaled)" if n_loop < g else ""
  block(single(mix, rows[0], iters))
  t0 = time.perf_counter()
  for a in rows[:n_loop]:
    block(single(mix, a, iters))
  loop = (time.perf_counter() - t0) * g / n_loop
  # The batched form's own compiled core on one alpha at a time: the gain from batching alone, apart from the
  # GEMM formulation.
  one_row = lambda a: em._diag_em(a[None], mix.components.mean, mix.components.precision, mix.log_weights, None, None,
                                  None, iters, False)
  block(one_row(rows[0]))
  t0 = time.perf_counter()
  for a in rows[:n_loop]:
    block(one_row(a))
  loop_gemm = (time.perf_counter() - t0) * g / n_loop
  n_v = min(FLAGS.vmap_alphas, g)
  vmapped = jax.jit(jax.vmap(em.find_mode_reference, in_axes=(None, 0, None)), static_argnums=2)
  vmap_slice = median_time(lambda: vmapped(mix, alphas[:n_v], iters), 1)[0]
  vmap_est = vmap_slice * g / n_v
  # Check they agree while we are here.
  got = np.asarray(em.find_modes(mix, alphas[:n_v], iters).params)
  want = np.asarray(vmapped(mix, alphas[:n_v], iters))
  print(f"(a) mixture EM over the grid: batched GEMM form {batched:.2f} s | per-alpha loop of Algorithm 1 as written "
        f"{loop:.2f} s{scaled} ({loop / batched:.1f}x slower) | vmap of single-alpha {vmap_est:.2f} s (timed on {n_v} "
        f"alphas, scaled; {vmap_est / batched:.1f}x slower) | max |batched - vmap| = {np.max(np.abs(got - want)):.2e}")
  print(f"    batching alone: the GEMM-form core called per alpha {loop_gemm:.2f} s{scaled} "
        f"({loop_gemm / batched:.1f}x slower than one call for the grid)")

  # (b) fraction of matmul throughput.
  flops = em_flops(g, t, k, p, iters)
  print(f"(b) batched EM: {flops / 1e9:.1f} GFLOP in GEMMs -> {flops / batched / 1e9:.1f} GFLOP/s = "
        f"{100 * flops / batched / peak:.0f}% of the measured matmul throughput")

  # (c) diagonal Hessian-weighted grid vs per-alpha loop.
  diag = bmerge.DiagGaussian(jnp.asarray(means[:, 0]), jnp.asarray(precs[:, 0]))
  grid_time = median_time(lambda: merge.hessian_weighted(diag, alphas), FLAGS.repeats)[0]

  @jax.jit
  def one_alpha(a, m, h):  # Eq. 10 for one alpha, as written
    w = a[:, None] * h
    return jnp.sum(w * m, 0) / jnp.sum(w, 0)

  block(one_alpha(rows[0], diag.mean, diag.precision))
  t0 = time.perf_counter()
  for a in rows[:n_loop]:
    block(one_alpha(a, diag.mean, diag.precision))
  loop_h = (time.perf_counter() - t0) * g / n_loop
  print(f"(c) diagonal Hessian-weighted over the grid: batched {grid_time:.3f} s | per-alpha loop {loop_h:.3f} s{scaled} "
        f"({loop_h / grid_time:.1f}x slower)")


if __name__ == "__main__":
  app.run(main)
