"""Timing helpers shared by the benchmarks: blocking on results, medians after a warm-up, the machine's GEMM peak."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def block(tree):
  """Waits for every array in `tree` (JAX dispatches asynchronously)."""
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def median_time(fn, repeats: int):
  """(median seconds of `repeats` calls after a warm-up call, last output); repeats=0 times the first call itself."""
  t0 = time.perf_counter()
  out = block(fn())  # compile and warm up
  times = [time.perf_counter() - t0] if repeats < 1 else []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = block(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """This machine's float32 GEMM throughput (FLOP/s) right now, from a jitted n x n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2.0 * n ** 3 / median_time(lambda: f(a), repeats)[0]
