r"""Benchmark: the end-to-end preview (merge + evaluate) over the digits grid vs a per-alpha Python loop.

The preview evaluates the Hessian-weighted merge of Eq. 10, theta_alpha = (sum_t alpha_t H_t)^-1 sum_t alpha_t H_t
theta_t, at every alpha of the grid.

Measured side by side in one run (the machines are shared and noisy), printing ratios:
  (a) `bmerge.preview(merge.hessian_weighted, ...)` with diagonal Laplace posteriors (P = 650) vs a Python loop over
      alphas of one jitted function that merges (the same `merge.hessian_weighted`, one alpha) and evaluates;
  (b) the same with full-covariance posteriors (`FullGaussian`, 650 x 650 precisions: one Cholesky per alpha,
      computed for a chunk of alphas at once by the library's batched blocked Cholesky), against two per-alpha loops:
      the library's rule called per alpha, and Eq. 10 for one alpha as written (one LAPACK Cholesky); timed on
      `--full_alphas` alphas spread over the grid. Its `bound` line times LAPACK's own Cholesky of one merged
      precision and prints what running it on every core at once, with nothing else to do, would give against the
      Eq. 10 loop: the ceiling of any preview that factorises at LAPACK's speed per core.
Each line also prints max |preview - loop| of the metrics: they must agree. The metric is the test accuracy, as in the
digits experiment; `--nll` adds the test NLL (a log-softmax over G x N_test x C, which then dominates the batched time).

Setting (the paper's imbalanced digits split, `configs/digits_imbalanced.py`): scikit-learn digits (X / 16, 64
features), a stratified 20 % test split of all 10 classes, three tasks by class {0,1}, {2,3,4}, {5..9}, softmax
regression (650 parameters). Posteriors are Laplace approximations: per task, the MAP of the summed cross-entropy
plus prior_precision / 2 |theta|^2 (full-batch GD with momentum, `--map_steps` steps), and the exact Hessian of
that loss there (its diagonal for `DiagGaussian`). The timings do not depend on their quality. Run:
  python -m experiments.benchmarks.preview_grid [--spacing 0.02] [--chunk_size 128] [--nofull] [--full_alphas 128]
                                               [--cpu_devices 1]
The preview splits its chunks across `--cpu_devices` devices (default: one per core); the per-alpha loops run on one.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from absl import app, flags
from threadpoolctl import threadpool_limits
from jax.flatten_util import ravel_pytree

import bmerge
from bmerge import data
from bmerge import grid
from bmerge import merge
from bmerge.models import logistic
from experiments import devices
from experiments.benchmarks.common import block, matmul_flops, median_time

FLAGS = flags.FLAGS


def define_flags():
  """Defined when run as a script only, so the module imports (tests, other benchmarks) without flag clashes."""
  flags.DEFINE_float("spacing", 0.02, "simplex spacing (G = 1,326 for T = 3 and 0.02)")
  flags.DEFINE_integer("chunk_size", 128, "alphas per compiled preview call")
  flags.DEFINE_integer("repeats", 3, "timed repeats (the median is reported)")
  flags.DEFINE_integer("map_steps", 300, "GD steps for each task's MAP")
  flags.DEFINE_bool("full", True, "also time full-covariance (650 x 650) posteriors")
  flags.DEFINE_bool("nll", False, "evaluate the test NLL too (not only the accuracy)")
  flags.DEFINE_integer("full_alphas", 128, "the full-covariance line times both sides on this many alphas of the grid "
                       "(one Cholesky each; 0: all of them)")

TASKS = ((0, 1), (2, 3, 4), (5, 6, 7, 8, 9))
PRIOR_PRECISION = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Digits, the model and its losses (shared with `exact_grid`).


def load_digits(seed: int = 0, test_fraction: float = 0.2):
  """(x_train, y_train), (x_test, y_test): scikit-learn digits scaled to [0, 1], stratified split."""
  ds = data.load("digits", seed=seed, test_fraction=test_fraction)
  return (ds.train_x, ds.train_y), (ds.test_x, ds.test_y)


def init_params(num_features: int = 64, num_classes: int = 10):
  return {"w": jnp.zeros((num_features, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}


def per_example_nll(params, x, y):
  return logistic.cross_entropy(params, x, y)


def task_masks(y: np.ndarray) -> np.ndarray:
  """[T, N] float32: 1 where example n belongs to task t."""
  return np.stack([np.isin(y, c) for c in TASKS]).astype(np.float32)


def task_losses(params, batch):
  """[T]: each task's summed cross-entropy plus prior_precision / 2 |theta|^2, divided by N_train (the GD scale)."""
  x, y, masks = batch
  reg = 0.5 * PRIOR_PRECISION * sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
  return (masks @ per_example_nll(params, x, y) + reg) / x.shape[0]


def evaluate(params, batch):
  """Test accuracy and mean NLL over all 10 classes."""
  x, y = batch
  return {"acc": logistic.accuracy(params, x, y), "nll": logistic.mean_ce(params, x, y)}


def evaluate_accuracy(params, batch):
  """Test accuracy over all 10 classes (the digits experiment's metric)."""
  x, y = batch
  return {"acc": logistic.accuracy(params, x, y)}


def gd_optimizer():
  return optax.sgd(learning_rate=3.0, momentum=0.9)


def laplace_posteriors(train, num_steps: int):
  """Per-task MAP (GD) and the exact Hessian there: (DiagGaussian, FullGaussian, unravel), both stacked over T."""
  x, y = train
  masks = task_masks(y)
  p0 = init_params()
  flat0, unravel = ravel_pytree(p0)
  opt = gd_optimizer()

  @jax.jit
  def fit(mask):
    loss = lambda v: (mask @ per_example_nll(unravel(v), x, y) + 0.5 * PRIOR_PRECISION * jnp.sum(v ** 2)) / x.shape[0]

    def step(carry, _):
      v, s = carry
      u, s = opt.update(jax.grad(loss)(v), s, v)
      return (optax.apply_updates(v, u), s), None

    (v, _), _ = jax.lax.scan(step, (flat0, opt.init(flat0)), None, length=num_steps)
    return v, jax.hessian(loss)(v) * x.shape[0]  # the precision is the Hessian of the summed loss

  means, precs = zip(*[fit(jnp.asarray(m)) for m in masks])
  means, precs = jnp.stack(means), jnp.stack(precs)
  precs = 0.5 * (precs + jnp.swapaxes(precs, 1, 2))
  full = bmerge.FullGaussian(means, precs)
  diag_prec = jnp.diagonal(precs, axis1=1, axis2=2)
  diag = bmerge.DiagGaussian(jax.vmap(unravel)(means), jax.vmap(unravel)(diag_prec))
  return diag, full, unravel


# ---------------------------------------------------------------------------------------------------------------


def _loop(one, posteriors, alphas, test, repeats):
  """A Python loop over alphas of the jitted single-alpha merge + evaluate; returns (median seconds, metrics).

  The rows are put on the device before timing: iterating a jax array compiles one indexing op per row the first
  time (seconds for a thousand rows), which is not the cost of the loop.
  """
  rows = [jnp.asarray(r) for r in np.asarray(alphas)]
  return median_time(lambda: jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                           *[block(one(a, posteriors, test)) for a in rows]), repeats)


def _eq10_one_alpha(q: bmerge.FullGaussian, alpha):
  """Eq. 10 for one alpha [T] as written: one Cholesky of sum_t alpha_t H_t (LAPACK on the CPU), centred."""
  ref = jnp.mean(q.mean, axis=0)
  s = jnp.tensordot(alpha, q.precision, axes=1)
  rhs = alpha @ jnp.einsum("tij,tj->ti", q.precision, q.mean - ref)
  return ref + jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(s), True), rhs)


def _lapack_cholesky_seconds(q: bmerge.FullGaussian, alphas, repeats: int = 5) -> float:
  """Seconds of LAPACK's Cholesky (the `spotrf` the Eq. 10 loop calls) of one merged precision: the mean over
  `alphas`, median of `repeats`, with its threads limited to one or left as they are, whichever is faster."""
  hs = np.asarray(q.precision, np.float32)
  mats = [np.tensordot(np.asarray(a, np.float32), hs, axes=1) for a in alphas]
  factor_all = lambda: [scipy.linalg.cholesky(s, lower=True, check_finite=False) for s in mats]
  best = np.inf
  for threads in (1, None):
    with threadpool_limits(threads):
      best = min(best, median_time(factor_all, repeats)[0] / len(mats))
  return best


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _agreement(got, want, num_test):
  """max |preview - loop| of the test NLL (nan without it), and of the accuracy in test examples (a near-tie argmax
  may flip)."""
  return (_max_diff(got["nll"], want["nll"]) if "nll" in got else float("nan"),
          int(round(_max_diff(got["acc"], want["acc"]) * num_test)))


def run(spacing: float, chunk_size: int, repeats: int, map_steps: int, full: bool, full_alphas: int,
        floor: bool = True, nll: bool = True) -> dict:
  """Runs the benchmark, prints one line per posterior type, returns the numbers (for tests)."""
  train, (x_te, y_te) = load_digits()
  test = (jnp.asarray(x_te), jnp.asarray(y_te))
  alphas_np = grid.simplex(len(TASKS), spacing).astype(np.float32)
  g = alphas_np.shape[0]
  t0 = time.perf_counter()
  diag, fullg, unravel = laplace_posteriors(train, map_steps)
  block(fullg)
  print(f"digits: {len(train[1])} train / {len(y_te)} test, T={len(TASKS)} tasks {TASKS}, P=650, G={g} "
        f"(spacing {spacing}), chunk_size={chunk_size}, devices={jax.devices()}")
  print(f"posteriors: Laplace at the per-task MAP ({map_steps} GD steps) with the exact Hessian "
        f"(built in {time.perf_counter() - t0:.1f} s)")
  results = {"num_alphas": g}

  # (a) diagonal.
  ev = evaluate if nll else evaluate_accuracy
  t_prev, got = median_time(lambda: bmerge.preview(merge.hessian_weighted, diag, alphas_np, ev, test,
                                                    chunk_size=chunk_size, progress=False), repeats)
  one = jax.jit(lambda a, q, b: ev(merge.hessian_weighted(q, a), b))
  t_loop, want = _loop(one, diag, alphas_np, test, repeats)
  diff, flips = _agreement(got, want, len(y_te))
  print(f"(a) diagonal Hessian-weighted preview of {g} alphas ({'accuracy and NLL' if nll else 'accuracy'}): "
        f"bmerge.preview {t_prev:.3f} s | per-alpha loop {t_loop:.3f} s ({1e3 * t_loop / g:.3f} ms/alpha) -> "
        f"{t_loop / t_prev:.1f}x faster (goal >= 20x) | max |preview - loop| test NLL {diff:.2e}, accuracy {flips} "
        f"test example(s) | best test acc {np.max(got['acc']):.3f}")
  results["diag"] = dict(preview_s=t_prev, loop_s=t_loop, ratio=t_loop / t_prev, max_abs_nll_diff=diff,
                         acc_flips=flips)
  if floor:
    peak = matmul_flops()
    flops = 2.0 * g * len(y_te) * 64 * 10  # the evaluation's logits GEMMs, the bulk of the work
    results["diag"]["floor_s"] = flops / peak
    print(f"    floor: evaluating {g} models is {flops / 1e9:.2f} GFLOP of matmul; at this machine's f32 matmul "
          f"throughput now ({peak / 1e9:.0f} GFLOP/s) that alone takes {flops / peak:.3f} s, so no batched preview "
          f"can beat this loop by more than ~{t_loop * peak / flops:.0f}x here")

  if full:
    eval_flat = lambda v, b: ev(unravel(v), b)
    n = g if full_alphas <= 0 else min(full_alphas, g)
    sub = alphas_np[np.linspace(0, g - 1, n).round().astype(int)]  # spread over the simplex
    f_reps = repeats if n <= 256 else 1  # one Cholesky per alpha: slow, so fewer repeats on a big slice
    # Interleaved: one Cholesky per alpha makes both sides sensitive to other jobs' BLAS load, so each round times
    # the preview then the loop and the ratio is the median of per-round ratios.
    prev_f = lambda: bmerge.preview(merge.hessian_weighted, fullg, sub, eval_flat, test, chunk_size=chunk_size,
                                    progress=False)
    rows = [jnp.asarray(r) for r in sub]
    # Two per-alpha loops: the library's rule called per alpha (its chunked kernel with one alpha: batching alone),
    # and Eq. 10 for one alpha as a user would write it (one LAPACK Cholesky), each jitted with the evaluation.
    one_lib = jax.jit(lambda a, q, b: eval_flat(merge.hessian_weighted(q, a), b))
    one_eq10 = jax.jit(lambda a, q, b: eval_flat(_eq10_one_alpha(q, a), b))
    loops = [lambda one=one: jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                          *[block(one(a, fullg, test)) for a in rows]) for one in (one_lib, one_eq10)]
    block(prev_f())  # compile preview's fused chunk and the loops' functions before timing
    for one in (one_lib, one_eq10):
      block(one(rows[0], fullg, test))
    rounds = [[median_time(f, 0) for f in (prev_f, *loops)] for _ in range(max(f_reps, 1))]
    got_f, want_f, want_eq10 = (x[1] for x in rounds[-1])
    t_prev_f, t_loop_f, t_eq10_f = (float(np.median([r[i][0] for r in rounds])) for i in range(3))
    ratio_f, ratio_eq10 = (float(np.median([r[i][0] / r[0][0] for r in rounds])) for i in (1, 2))
    diff_f, flips_f = _agreement(got_f, want_f, len(y_te))
    diff_eq10, flips_eq10 = _agreement(got_f, want_eq10, len(y_te))
    on = "all" if n == g else f"{n} of the {g} (--full_alphas; scale both by {g / n:.1f} for the whole grid)"
    print(f"(b) full-covariance (650 x 650) Hessian-weighted preview, timed on {on} alphas: bmerge.preview "
          f"{t_prev_f:.3f} s | per-alpha loop of merge.hessian_weighted {t_loop_f:.3f} s ({1e3 * t_loop_f / n:.2f} "
          f"ms/alpha) -> {ratio_f:.1f}x faster | per-alpha loop of Eq. 10 as written (LAPACK Cholesky) {t_eq10_f:.3f} s "
          f"({1e3 * t_eq10_f / n:.2f} ms/alpha) -> {ratio_eq10:.1f}x faster (goal >= 3x; medians of {len(rounds)} "
          f"interleaved rounds) | max |preview - loops| test NLL {max(diff_f, diff_eq10):.2e}, accuracy "
          f"{max(flips_f, flips_eq10)} test example(s) | best test acc {np.max(got_f['acc']):.3f}")
    results["full"] = dict(preview_s=t_prev_f, loop_s=t_loop_f, eq10_loop_s=t_eq10_f, ratio=ratio_f,
                           ratio_eq10=ratio_eq10, max_abs_nll_diff=max(diff_f, diff_eq10),
                           acc_flips=max(flips_f, flips_eq10), num_alphas=n)
    if floor:
      # What 3x the loop asks of each core: the loop runs one alpha at a time, the preview spreads alphas over cores.
      t_chol = _lapack_cholesky_seconds(fullg, sub[:8])
      cores = os.cpu_count() or 1
      ceiling = t_eq10_f / n / (t_chol / cores)
      results["full"].update(lapack_cholesky_s=t_chol, lapack_all_cores_ratio=ceiling)
      print(f"    bound: LAPACK's own Cholesky of one merged 650 x 650 precision (spotrf, the loop's kernel; one "
            f"thread or all, the faster) takes {1e3 * t_chol:.2f} ms. Run on all {cores} cores at once with nothing "
            f"else to do, it would be {ceiling:.2f}x the Eq. 10 loop; 3x asks a batched preview to factorise at "
            f"{3.0 / ceiling:.2f}x LAPACK's speed per core and form, solve and evaluate for free. This preview: "
            f"{1e3 * cores * t_prev_f / n:.2f} ms per alpha per core, {cores * t_prev_f / n / t_chol:.2f}x LAPACK's "
            f"factorisation alone")
  return results


def main(_):
  devices.apply()
  run(FLAGS.spacing, FLAGS.chunk_size, FLAGS.repeats, FLAGS.map_steps, FLAGS.full, FLAGS.full_alphas, nll=FLAGS.nll)


if __name__ == "__main__":
  define_flags()
  app.run(main)
