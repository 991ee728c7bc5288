r"""Benchmark: one jitted IVON train step (1 MC sample) vs one `optax.adamw` step on the same model and batch.

Goal: IVON / AdamW <= 1.15. Both steps are compiled once, then timed in interleaved rounds in one
run (the machines are shared and noisy): each round times `--steps` IVON steps then `--steps` AdamW steps; the
median over rounds of the per-round ratio is reported. The IVON step is the whole training step a user writes:
draw theta = m + n (`sample_params`), the gradient there, `tx.update(grads, state, params, noise=noise)`.
The model is an MLP on digits-sized inputs (8x8 = 64 features, 10 classes), timed at each of `--batches` (256 and
1797, the whole digits training set). IVON's extra work is one Gaussian draw per parameter (threefry on CPU costs
about as much as several dense FLOPs per parameter), so the ratio falls as FLOPs per parameter (the batch) grow.
Run:
  python -m experiments.benchmarks.ivon_step [--hidden 512] [--batches 256,1797] [--rounds 15]
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from bmerge.optim import ivon, ivon_sample as sample_params

flags.DEFINE_integer("hidden", 512, "width of the MLP's two hidden layers")
flags.DEFINE_list("batches", ["256", "1797"], "examples per step; one timing per batch size")
flags.DEFINE_integer("steps", 20, "steps per timed block")
flags.DEFINE_integer("rounds", 15, "interleaved IVON / AdamW rounds (the median ratio is reported)")
FLAGS = flags.FLAGS


class MLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def main(_):
  for batch in FLAGS.batches:
    bench(int(batch))


def bench(batch):
  model = MLP(FLAGS.hidden)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.uniform(kx, (batch, 64), jnp.float32, 0.0, 16.0)
  y = jax.random.randint(ky, (batch,), 0, 10)
  params = model.init(kp, x[:1])["params"]
  num_params = sum(p.size for p in jax.tree.leaves(params))

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  ess, wd = 1797.0, 1e-4
  ivon_tx = ivon(0.1, ess, hess_init=0.5, beta2=0.9999, weight_decay=wd)
  adamw_tx = optax.adamw(1e-3, weight_decay=wd)

  def ivon_step(carry, _):
    key, p, s = carry
    key, sub = jax.random.split(key)
    sample, noise = sample_params(sub, s, p, ess, wd)  # one sample, no MC axis
    grads = jax.grad(loss_fn)(sample, x, y)
    updates, s = ivon_tx.update(grads, s, p, noise=noise)
    return (key, optax.apply_updates(p, updates), s), None

  def adamw_step(carry, _):
    key, p, s = carry
    grads = jax.grad(loss_fn)(p, x, y)
    updates, s = adamw_tx.update(grads, s, p)
    return (key, optax.apply_updates(p, updates), s), None

  # `steps` steps per call in a lax.scan, so per-call dispatch does not blur a per-step difference.
  def block(step):
    return jax.jit(lambda carry: jax.lax.scan(step, carry, length=FLAGS.steps)[0])

  runs = {"ivon": block(ivon_step), "adamw": block(adamw_step)}
  carries = {"ivon": (jax.random.key(1), params, ivon_tx.init(params)),
             "adamw": (jax.random.key(1), params, adamw_tx.init(params))}
  for name in runs:  # compile and warm up
    carries[name] = jax.block_until_ready(runs[name](carries[name]))

  times = {"ivon": [], "adamw": []}
  for r in range(FLAGS.rounds):
    order = ("ivon", "adamw") if r % 2 == 0 else ("adamw", "ivon")
    for name in order:
      t0 = time.perf_counter()
      carries[name] = jax.block_until_ready(runs[name](carries[name]))
      times[name].append((time.perf_counter() - t0) / FLAGS.steps)
  ratios = np.array(times["ivon"]) / np.array(times["adamw"])
  print(f"MLP 64-{FLAGS.hidden}-{FLAGS.hidden}-10 ({num_params:,} params), batch {batch}, "
        f"{FLAGS.rounds} interleaved rounds of {FLAGS.steps} steps, devices={jax.devices()}")
  print(f"IVON (1 MC sample) step: median {1e3 * np.median(times['ivon']):.3f} ms | "
        f"AdamW step: median {1e3 * np.median(times['adamw']):.3f} ms")
  print(f"ratio IVON / AdamW: median {np.median(ratios):.3f} (per-round min {ratios.min():.3f}, "
        f"max {ratios.max():.3f}); goal <= 1.15")


if __name__ == "__main__":
  app.run(main)
