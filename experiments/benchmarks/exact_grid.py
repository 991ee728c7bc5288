r"""Benchmark: the vmapped exact baseline `bmerge.exact.joint_train` vs training the alphas one after another.

The exact answer at every alpha is theta*_alpha = argmin_theta sum_t alpha_t loss_t(theta) (paper Eq. 1).

Measured side by side in one run (the machines are shared and noisy), printing ratios:
  (a) `exact.joint_train` over the digits grid (every alpha of a chunk trained at once: `vmap` over the chunk,
      `lax.scan` over the steps), for each chunk size in `--chunk_sizes` (the fastest is printed: it informs
      `chunk_size` in `configs/digits_*.py`);
  (b) a Python loop over alphas of one jitted single-alpha training (the same objective sum_t alpha_t loss_t, the
      same optimizer, steps and initialisation) followed by the same evaluation. With `--loop_alphas` it is timed on
      that many alphas spread over the grid and scaled to G (printed as scaled).
The consistency check is max |joint_train - loop| of the test NLL (and of the accuracy, in test examples) on the
alphas the loop trained. Setting as `preview_grid` (digits, tasks {0,1}, {2,3,4}, {5..9}, softmax regression, GD
with momentum on the summed task losses + prior / N_train, from zeros). Run:
  python -m experiments.benchmarks.exact_grid [--spacing 0.05] [--steps 300] [--chunk_sizes 8,16,64,231]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from bmerge import exact
from bmerge import grid
from experiments.benchmarks import preview_grid as pg
from experiments.benchmarks.common import block, matmul_flops

FLAGS = flags.FLAGS


def define_flags():
  """Defined when run as a script only, so the module imports (tests, other benchmarks) without flag clashes."""
  flags.DEFINE_float("spacing", 0.05, "simplex spacing (G = 231 for T = 3 and 0.05)")
  flags.DEFINE_integer("steps", 300, "full-batch GD steps per alpha")
  flags.DEFINE_list("chunk_sizes", ["8", "16", "64", "231"], "joint_train chunk sizes to time")
  flags.DEFINE_integer("repeats", 3, "interleaved timed rounds of every variant (medians are reported)")
  flags.DEFINE_integer("loop_alphas", 0, "time the per-alpha loop on this many alphas and scale to G (0: all)")


def single_alpha_trainer(optimizer, num_steps):
  """One jitted function: train argmin sum_t alpha_t loss_t from `params` for one alpha, then evaluate."""

  @jax.jit
  def train_and_eval(alpha, params, batch, eval_batch):
    objective = lambda p: jnp.dot(alpha, pg.task_losses(p, batch))
    def step(carry, _):
      params, opt_state = carry
      updates, opt_state = optimizer.update(jax.grad(objective)(params), opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=num_steps)
    return pg.evaluate(params, eval_batch)

  return train_and_eval


def run(spacing: float, steps: int, chunk_sizes, repeats: int, loop_alphas: int, floor: bool = True) -> dict:
  (x, y), (x_te, y_te) = pg.load_digits()
  batch = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(pg.task_masks(y)))
  test = (jnp.asarray(x_te), jnp.asarray(y_te))
  alphas = grid.simplex(len(pg.TASKS), spacing).astype(np.float32)
  g = alphas.shape[0]
  init = pg.init_params()
  opt = pg.gd_optimizer()
  print(f"digits: {len(y)} train / {len(y_te)} test, T={len(pg.TASKS)}, P=650, G={g} (spacing {spacing}), "
        f"{steps} GD steps per alpha, devices={jax.devices()}")

  train = lambda c: exact.joint_train(pg.task_losses, init, alphas, opt, steps, batch, eval_fn=pg.evaluate,
                                      eval_batch=test, chunk_size=c, progress=False)
  n = g if loop_alphas <= 0 else min(loop_alphas, g)
  idx = np.linspace(0, g - 1, n).round().astype(int)
  rows = [jnp.asarray(r) for r in alphas[idx]]  # on the device before timing (iterating a jax array compiles per row)
  one = single_alpha_trainer(opt, steps)
  loop = lambda: jax.tree.map(lambda *xs: np.stack([np.asarray(v) for v in xs]),
                              *[block(one(a, init, batch, test)) for a in rows])
  variants = {f"joint_train chunk_size {c}": (lambda c=c: train(c)) for c in chunk_sizes}
  variants["loop"] = loop

  # First calls (they compile), then
  # `repeats` interleaved rounds of every variant: the machine's load drifts, so the ratios are per round.
  first, times, outs = {}, {k: [] for k in variants}, {}
  for k, fn in variants.items():
    t0 = time.perf_counter()
    outs[k] = block(fn())
    first[k] = time.perf_counter() - t0
  for _ in range(repeats):
    for k, fn in variants.items():
      t0 = time.perf_counter()
      block(fn())
      times[k].append(time.perf_counter() - t0)
  scale = g / n
  loop_times = np.asarray(times["loop"]) * scale
  t_loop = float(np.median(loop_times))
  med = {k: float(np.median(v)) for k, v in times.items() if k != "loop"}
  ratio = {k: float(np.median(loop_times / np.asarray(times[k]))) for k in med}
  joint = {c: med[f"joint_train chunk_size {c}"] for c in chunk_sizes}
  best = min(joint, key=joint.get)
  out, want = outs[f"joint_train chunk_size {best}"], outs["loop"]
  nll_diff = float(np.max(np.abs(out["nll"][idx].astype(np.float64) - want["nll"])))
  flips = int(round(float(np.max(np.abs(out["acc"][idx] - want["acc"]))) * len(y_te)))

  print(f"medians of {repeats} interleaved rounds (first calls, which compile, not counted):")
  print("(a) exact.joint_train over the grid: " + " | ".join(
      f"chunk_size {c}: {joint[c]:.2f} s (first call {first[f'joint_train chunk_size {c}']:.2f} s)"
      for c in chunk_sizes) + f" -> fastest chunk_size {best}")
  scaled = "" if n == g else f", timed on {n} alphas spread over the grid and SCALED by {scale:.1f} to {g}"
  print(f"(b) per-alpha loop of the jitted single-alpha training: {t_loop:.2f} s{scaled} "
        f"({1e3 * t_loop / g:.1f} ms/alpha; its first call {first['loop'] * scale:.2f} s)")
  print(f"    joint_train (chunk_size {best}) is {ratio[f'joint_train chunk_size {best}']:.1f}x faster than the loop "
        f"(goal >= 5x; median of per-round ratios); " + ", ".join(
            f"chunk_size {c}: {ratio[f'joint_train chunk_size {c}']:.1f}x" for c in chunk_sizes)
        + f" | max |joint_train - loop| on those {n} alphas: test NLL {nll_diff:.2e}, accuracy {flips} test "
          f"example(s) | best test acc {np.max(out['acc']):.3f}")
  # What bounds the ratio: the loop trains one alpha per call (a `lax.scan` of `steps` steps), so it pays no
  # per-step dispatch; its cost is the matmuls of a 1437 x 64 x 10 model, which batching can only make more efficient.
  floor_s = None
  if floor:
    peak = matmul_flops()
    flops = g * steps * 2 * (2.0 * len(y) * 64 * 10)  # per step: logits x W and the gradient x^T dlogits
    floor_s = flops / peak
    print(f"    floor: {flops / 1e9:.0f} GFLOP of matmul in all ({g} alphas x {steps} steps x 2 GEMMs); at this "
          f"machine's f32 matmul throughput now ({peak / 1e9:.0f} GFLOP/s) that takes {floor_s:.1f} s, so no batched "
          f"training can beat this loop by more than ~{t_loop / floor_s:.1f}x here (the loop runs at "
          f"{flops / t_loop / 1e9:.0f} GFLOP/s)")
  return dict(num_alphas=g, floor_s=floor_s, joint_s=joint, best_chunk_size=best, loop_s=t_loop,
              loop_alphas=n, ratio=ratio[f"joint_train chunk_size {best}"], max_abs_nll_diff=nll_diff,
              acc_flips=flips)


def main(_):
  run(FLAGS.spacing, FLAGS.steps, [int(c) for c in FLAGS.chunk_sizes], FLAGS.repeats, FLAGS.loop_alphas)


if __name__ == "__main__":
  define_flags()
  app.run(main)
