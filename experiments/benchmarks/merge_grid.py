r"""Benchmark: merging a whole alpha grid at once vs merging alpha by alpha.

The rules timed: the mixture EM of Algorithm 1 / Eq. 12 (r_tk ∝ pi_tk N(theta | theta_tk, H_tk^-1),
theta <- (sum_tk r_tk alpha_t H_tk)^-1 sum_tk r_tk alpha_t H_tk theta_tk) and the Hessian-weighted rule of Eq. 10.

Measured side by side in one run (the machines are shared and noisy), printing ratios:
  (a) `bmerge.em.find_modes` (the batched GEMM form) vs a Python loop over alphas of the jitted single-alpha
      Algorithm 1 (`em.find_mode_reference`), and vs `vmap` of that single-alpha function;
  (b) the batched EM's FLOP/s as a fraction of this machine's float32 matmul throughput, measured here;
  (c) `bmerge.merge.hessian_weighted` (diagonal) on the grid vs a loop over alphas of a jitted single-alpha Eq. 10;
  (d) full-covariance mixture EM (`FullGaussian` components, [P, P] precisions) for each P of `--full_params`: the
      chunked matrix-product kernel vs the per-alpha `lax.map` formulation (einsums and one LAPACK Cholesky per
      alpha and iteration) vs a Python loop of that single-alpha computation, jitted; and its FLOP/s as a fraction of
      the matmul peak measured in the same run, counting the GEMM form's FLOPs: per alpha and iteration
      4 T K P^2 (weighted precisions and quadratic forms) + P^3 / 3 (the factorisation);
  (e) the full-covariance Hessian-weighted rule (Eq. 10, T [P, P] precisions) the same way (2 T P^2 + P^3 / 3 per
      alpha).

The baselines call LAPACK through OpenBLAS; on a machine shared with other jobs its threaded Cholesky can be far
slower than single-threaded, so run once as is and once with OPENBLAS_NUM_THREADS=1 (the header prints the setting).

Defaults: (a)-(c) T=3, K=10, P=260,000, G=231 (simplex spacing 0.05), 10 iterations; (d)-(e) T=3, K=20, P=650 and
1,970, G=1,326 (spacing 0.02), 10 iterations. Slow variants are timed on slices of the grid and scaled to G (printed
as such). `vmap` of the elementwise single-alpha EM materialises G x T x K x P floats (7.2 GB at the default sizes),
so it is timed on `--vmap_alphas` alphas. `--nodiag` runs only (d)-(e), `--nofull` only (a)-(c). Run:
  python -m experiments.benchmarks.merge_grid [--params 260000] [--components 10] [--spacing 0.05]
  python -m experiments.benchmarks.merge_grid --nodiag [--full_params 650,1970] [--full_spacing 0.02] [--cpu_devices 1]

The library's kernels split the grid across `--cpu_devices` devices of this CPU (default: one per core; each loops
over its own chunks, concurrently); the `lax.map` + LAPACK baseline stays on one device, so compare its time with a
run at `--cpu_devices 1` too.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import bmerge
from bmerge.merge import _fullcov
from bmerge import em
from bmerge import grid
from bmerge import merge
from experiments import devices
from experiments.benchmarks.common import block, matmul_flops, median_time

FLAGS = flags.FLAGS


def define_flags():
  """Defined when run as a script only, so the module imports (tests) without flag clashes."""
  flags.DEFINE_integer("tasks", 3, "T")
  flags.DEFINE_integer("components", 10, "K per task")
  flags.DEFINE_integer("params", 260_000, "P")
  flags.DEFINE_float("spacing", 0.05, "simplex spacing (G = 231 for T = 3 and 0.05)")
  flags.DEFINE_integer("iters", 10, "EM iterations")
  flags.DEFINE_integer("repeats", 3, "timed repeats of the fast variants (the median is reported)")
  flags.DEFINE_integer("loop_alphas", 0, "time the per-alpha loops on this many alphas and scale to G (0: all)")
  flags.DEFINE_integer("vmap_alphas", 33, "alphas in the vmap slice (its memory is vmap_alphas * T * K * P floats)")
  flags.DEFINE_bool("diag", True, "run (a)-(c), the diagonal cases")
  flags.DEFINE_bool("full", True, "run (d)-(e), the full-covariance cases")
  flags.DEFINE_list("full_params", ["650", "1970"], "P of the full-covariance cases")
  flags.DEFINE_integer("full_components", 20, "K per task in (d)")
  flags.DEFINE_float("full_spacing", 0.02, "simplex spacing of (d)-(e) (G = 1,326 for T = 3)")
  flags.DEFINE_integer("full_new_alphas", 0, "time the new kernels on at most this many alphas (0: all); for "
                       "P > 1,024 at most 64 unless set")
  flags.DEFINE_integer("full_old_alphas", 8, "alphas on which the lax.map and per-alpha-loop baselines are timed "
                       "(a sixth of them, at least 2, for P > 1,024)")


def em_flops(g: int, t: int, k: int, p: int, iters: int) -> float:
  """GEMM FLOPs of find_modes: per iteration two [G,P]x[P,TK] and two [G,TK]x[TK,P]; plus the start and final
  density."""
  gemm = 2.0 * g * (2 * p) * (t * k)
  return iters * 2 * gemm + 2 * gemm


def run_diag():
  """(a)-(c): the diagonal mixture EM and Hessian-weighted grid at the flags' sizes."""
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



# ---------------------------------------------------------------------------------------------------------------
# (d)-(e): full covariance.


def full_inputs(t: int, k: int, p: int, seed: int = 0, rank: int = 64):
  """T x K synthetic full-covariance components in float32: means 1e-3 apart around a common model (as finetuned
  models are), precisions c (I + U U^T / rank) with U [P, rank] random and c over three orders of magnitude (SPD and
  cheap to build at P = 1,970; the timings do not depend on the values), random mixture weights."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=p) + 1e-3 * rng.normal(size=(t, k, p))
  u = jnp.asarray(rng.normal(size=(t, k, p, rank)), jnp.float32)
  scale = jnp.asarray(10.0 ** rng.uniform(0, 3, size=(t, k, 1, 1)), jnp.float32)
  precs = jax.jit(lambda u, c: c * (jnp.eye(p, dtype=jnp.float32) + u @ jnp.swapaxes(u, -1, -2) / rank))(u, scale)
  return jnp.asarray(means, jnp.float32), block(precs), jnp.asarray(rng.normal(size=(t, k)), jnp.float32)


def _spread(g: int, n: int) -> np.ndarray:
  """n row indices spread over a grid of g rows (the slices the slow variants are timed on)."""
  return np.unique(np.linspace(0, g - 1, max(1, min(n, g))).round().astype(int))


def _timed(compiled, *args) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = block(compiled(*args))
  return time.perf_counter() - t0, out


def _compile(fn, *args, **static):
  t0 = time.perf_counter()
  compiled = fn.lower(*args, **static).compile()
  return compiled, time.perf_counter() - t0


def run_full(params=(650, 1970), tasks: int = 3, components: int = 20, spacing: float = 0.02, iters: int = 10,
             new_alphas: int = 0, old_alphas: int = 8, chunk_size: int = 128, peak: float = None) -> dict:
  """(d) full-covariance mixture EM and (e) full Hessian-weighted rule for each P; prints one block per P and returns
  the numbers (for tests). Every variant is compiled first (compile times printed apart) and run once."""
  alphas_np = grid.simplex(tasks, spacing).astype(np.float32)
  g = alphas_np.shape[0]
  results = {"num_alphas": g}
  remeasure = peak is None  # a peak passed in (tests) is used as it is
  peak = peak or matmul_flops()
  print(f"(d)-(e) full covariance: T={tasks} K={components} G={g} (spacing {spacing}) iters={iters} chunk_size="
        f"{chunk_size}; f32 matmul peak (2048^3) {peak / 1e9:.1f} GFLOP/s (measured again before each percentage, the "
        "largest reading used); slow variants timed on slices of the grid "
        f"and scaled to G; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')} (the LAPACK "
        "baselines' threads: on a shared machine OpenBLAS's threaded Cholesky can be many times slower than one thread)")
  for p in params:
    means, precs, log_weights = full_inputs(tasks, components, p)
    n_new = g if not new_alphas and p <= 1024 else min(new_alphas or 64, g)
    n_old = old_alphas if p <= 1024 else max(2, old_alphas // 6)
    new_idx, old_idx = _spread(g, n_new), _spread(g, n_old)
    a_new, a_old = jnp.asarray(alphas_np[new_idx]), jnp.asarray(alphas_np[old_idx])
    res = {}

    # (d) mixture EM.
    em_args = (means, precs, log_weights, None, None, None)
    new_c, new_compile = _compile(_fullcov.mixture_em, a_new, *em_args, num_iters=iters, init_given=False,
                                  chunk_size=chunk_size)
    t_new, new_out = _timed(new_c, a_new, *em_args)
    old_c, _ = _compile(_fullcov.reference_mixture_em, a_old, *em_args, num_iters=iters, init_given=False,
                        chunk_size=8)
    t_old, old_out = _timed(old_c, a_old, *em_args)
    one_c, _ = _compile(_fullcov.reference_mixture_em, a_old[:1], *em_args, num_iters=iters, init_given=False,
                        chunk_size=1)
    rows = [a_old[i:i + 1] for i in range(len(old_idx))]
    block(one_c(rows[0], *em_args))
    t0 = time.perf_counter()
    for r in rows:
      block(one_c(r, *em_args))
    t_loop = time.perf_counter() - t0
    s_new, s_old = t_new * g / len(new_idx), t_old * g / len(old_idx)
    s_loop = t_loop * g / len(old_idx)
    flops = g * (iters + 1) * (4 * tasks * components * p * p + p ** 3 / 3)
    pos = np.searchsorted(new_idx, old_idx)
    diff = float(np.max(np.abs(np.asarray(new_out[0])[pos] - np.asarray(old_out[0])))) if np.all(
        new_idx[np.minimum(pos, len(new_idx) - 1)] == old_idx) else float("nan")
    on = lambda n: "all alphas" if n == g else f"{n} alphas, scaled"
    if remeasure:  # a peak is the best reading: one taken while the machine was busy is low
      peak = max(peak, matmul_flops())
    print(f"P={p:,} (d) mixture EM: chunked matrix products {s_new:.1f} s ({on(len(new_idx))}; compile "
          f"{new_compile:.1f} s apart) | lax.map of einsums + LAPACK Cholesky (before) {s_old:.1f} s "
          f"({on(len(old_idx))}) -> {s_old / s_new:.1f}x | per-alpha loop of the jitted single-alpha EM {s_loop:.1f} s "
          f"({on(len(old_idx))}) -> {s_loop / s_new:.1f}x | {flops / s_new / 1e9:.0f} GFLOP/s by the GEMM form's count "
          f"= {100 * flops / s_new / peak:.0f}% of matmul peak | max |new - before| = {diff:.1e}")
    res["em"] = dict(new_s=s_new, old_s=s_old, loop_s=s_loop, ratio_old=s_old / s_new, ratio_loop=s_loop / s_new,
                     peak_fraction=flops / s_new / peak, max_abs_diff=diff, compile_s=new_compile)

    # (e) Hessian-weighted rule, Eq. 10: the first component of each task.
    hw_args = (means[:, 0], precs[:, 0], None, None)
    new_c, new_compile = _compile(_fullcov.hessian_weighted, a_new, *hw_args, chunk_size=chunk_size)
    t_new, new_out = _timed(new_c, a_new, *hw_args)
    old_c, _ = _compile(_fullcov.reference_hessian_weighted, a_old, *hw_args, chunk_size=8)
    t_old, old_out = _timed(old_c, a_old, *hw_args)
    one_c, _ = _compile(_fullcov.reference_hessian_weighted, a_old[:1], *hw_args, chunk_size=1)
    alone_c, _ = _compile(_fullcov.hessian_weighted, a_old[:1], *hw_args, chunk_size=1)
    loops = []
    for fn in (one_c, alone_c):
      block(fn(rows[0], *hw_args))
      t0 = time.perf_counter()
      for r in rows:
        block(fn(r, *hw_args))
      loops.append((time.perf_counter() - t0) * g / len(old_idx))
    s_new, s_old = t_new * g / len(new_idx), t_old * g / len(old_idx)
    flops = g * (2 * tasks * p * p + p ** 3 / 3)
    if remeasure:
      peak = max(peak, matmul_flops())
    diff = float(np.max(np.abs(np.asarray(new_out[0])[pos] - np.asarray(old_out[0])))) if not math.isnan(diff) \
        else float("nan")
    print(f"P={p:,} (e) full Hessian-weighted: chunked {s_new:.2f} s ({on(len(new_idx))}; compile {new_compile:.1f} s "
          f"apart) | lax.map + LAPACK (before) {s_old:.2f} s -> {s_old / s_new:.1f}x | per-alpha loop of the jitted "
          f"single-alpha Eq. 10 (LAPACK) {loops[0]:.2f} s -> {loops[0] / s_new:.1f}x | the new kernel called per alpha "
          f"{loops[1]:.2f} s -> {loops[1] / s_new:.1f}x (batching alone) | {flops / s_new / 1e9:.0f} GFLOP/s = "
          f"{100 * flops / s_new / peak:.0f}% of peak | max |new - before| = {diff:.1e}")
    res["hw"] = dict(new_s=s_new, old_s=s_old, loop_s=loops[0], alone_s=loops[1], ratio_old=s_old / s_new,
                     ratio_loop=loops[0] / s_new, ratio_alone=loops[1] / s_new, peak_fraction=flops / s_new / peak,
                     max_abs_diff=diff)
    results[p] = res
    del precs
  return results


def main(_):
  devices.apply()
  print(f"devices: {jax.devices()}")
  if FLAGS.diag:
    run_diag()
  if FLAGS.full:
    run_full([int(p) for p in FLAGS.full_params], FLAGS.tasks, FLAGS.full_components, FLAGS.full_spacing,
             FLAGS.iters, FLAGS.full_new_alphas, FLAGS.full_old_alphas)
    print(f"f32 matmul peak again after the full-covariance cases: {matmul_flops() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
