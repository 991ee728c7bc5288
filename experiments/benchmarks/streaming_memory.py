r"""Benchmark: the peak memory of a streaming preview of a 20M-parameter model over 231 alphas.

`bmerge.preview(merge.hessian_weighted, ...)` with a small `chunk_size` merges and evaluates `chunk_size` models at a
time, so the grid of merged models (231 x 20M x 4 B = 18.5 GB) never exists. This script measures the process's
resident memory: the baseline (after importing JAX and building the inputs), the peak of the whole run
(VmHWM, which unlike `ru_maxrss` starts afresh at exec), and, from a 5 ms RSS sampler, the peak of each stage. Goal:
peak <= 3 GB.

The model is synthetic: `--layers` dense d x d matrices (tanh between them) totalling `--params` float32 parameters,
T = 3 `DiagGaussian` posteriors (means near a common model, random positive precisions: 3 x 2 x 80 MB = 480 MB at the
defaults), and `eval_fn` a forward pass of a tiny batch through the layers reduced to a scalar. After the measured
run it also prints XLA's own memory plan of the fused chunk function (arguments, outputs and temporaries) and checks
the preview against a per-alpha merge + evaluate on a few alphas (max |difference|). Run it as its own process (the
peak of a process never goes down):
  python -m experiments.benchmarks.streaming_memory [--params 20000000] [--layers 5] [--chunk_size 4] [--spacing 0.05]
"""

from __future__ import annotations

import json
import math
import resource
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from absl import app, flags

import bmerge
from bmerge import grid
from bmerge import merge

FLAGS = flags.FLAGS
GB = 1e9


def define_flags():
  """Defined when run as a script only, so the module imports (tests) without flag clashes."""
  flags.DEFINE_integer("params", 20_000_000, "total float32 parameters of the synthetic model")
  flags.DEFINE_integer("layers", 5, "dense square layers (each d x d with d = sqrt(params / layers))")
  flags.DEFINE_integer("tasks", 3, "T")
  flags.DEFINE_float("spacing", 0.05, "simplex spacing (G = 231 for T = 3 and 0.05)")
  flags.DEFINE_integer("chunk_size", 4, "alphas merged and evaluated per compiled call")
  flags.DEFINE_integer("batch", 8, "examples in the evaluation batch")
  flags.DEFINE_integer("check_alphas", 3, "alphas checked against a per-alpha merge + evaluate (after the peak)")
  flags.DEFINE_string("result_json", None, "also write the measured numbers to this JSON file (for tests)")


def rss() -> int:
  return psutil.Process().memory_info().rss


def max_rss() -> int:
  """The process's peak resident set so far: VmHWM of /proc/self/status where there is one (it starts afresh at exec,
  while ru_maxrss keeps the forking parent's peak: a script started from a big process would report the parent's),
  else ru_maxrss (in KiB on Linux)."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Sampler:
  """Samples RSS every `period` seconds in a thread and keeps the peak per stage label."""

  def __init__(self, period: float = 0.005):
    self.period, self.stage, self.peaks = period, "start", {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      r = rss()
      self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), r)
      time.sleep(self.period)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()

  def mark(self, stage: str):
    r = rss()
    self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), r)
    self.stage = stage


def make_posteriors(key, num_tasks: int, layers: int, d: int) -> bmerge.DiagGaussian:
  """T stacked DiagGaussians over {'layer_i': [d, d]}: means near a common model, precisions in [0.5, 2]."""

  @jax.jit
  def one_leaf(key):
    k1, k2, k3 = jax.random.split(key, 3)
    base = jax.random.normal(k1, (d, d), jnp.float32) / math.sqrt(d)
    mean = base + 1e-3 * jax.random.normal(k2, (num_tasks, d, d), jnp.float32)
    prec = jax.random.uniform(k3, (num_tasks, d, d), jnp.float32, 0.5, 2.0)
    return mean, prec

  keys = jax.random.split(key, layers)
  leaves = [one_leaf(k) for k in keys]
  names = [f"layer_{i}" for i in range(layers)]
  return bmerge.DiagGaussian({n: m for n, (m, _) in zip(names, leaves)},
                             {n: p for n, (_, p) in zip(names, leaves)})


def forward(params, x):
  """A tiny forward pass through the dense layers, reduced to a scalar."""
  for name in sorted(params):
    x = jnp.tanh(x @ params[name])
  return jnp.mean(x ** 2)


def run(num_params: int, layers: int, num_tasks: int, spacing: float, chunk_size: int, batch: int,
        check_alphas: int) -> dict:
  jnp.ones(3).block_until_ready()  # the runtime's own memory belongs to the baseline
  d = int(round(math.sqrt(num_params / layers)))
  p = layers * d * d
  alphas = grid.simplex(num_tasks, spacing).astype(np.float32)
  g = alphas.shape[0]
  x = jax.random.normal(jax.random.key(1), (batch, d), jnp.float32)
  base_rss = rss()
  with Sampler() as sampler:
    sampler.mark("build posteriors")
    q = make_posteriors(jax.random.key(0), num_tasks, layers, d)
    jax.block_until_ready(q)
    inputs_rss = rss()
    sampler.mark("preview")
    t0 = time.perf_counter()
    out = bmerge.preview(merge.hessian_weighted, q, alphas, forward, x, chunk_size=chunk_size, progress=False)
    seconds = time.perf_counter() - t0
    sampler.mark("done")
  peak = max_rss()
  post_bytes = 2 * num_tasks * p * 4
  print(f"model: {layers} dense {d} x {d} layers = {p:,} float32 params; T={num_tasks} DiagGaussian posteriors = "
        f"{post_bytes / GB:.2f} GB; G={g} alphas (spacing {spacing}); chunk_size={chunk_size}; eval batch {batch}")
  print(f"materialising the merged grid would need {g} x {p:,} x 4 B = {g * p * 4 / GB:.1f} GB "
        f"(one merged model {p * 4 / GB:.2f} GB)")
  print(f"preview: {seconds:.1f} s ({1e3 * seconds / g:.0f} ms/alpha)")
  print(f"RSS: baseline (JAX imported) {base_rss / GB:.2f} GB | with the posteriors built {inputs_rss / GB:.2f} GB | "
        f"stage peaks (5 ms sampler): " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in sampler.peaks.items()
                                                    if k not in ("start", "done")))
  ok = "meets" if peak <= 3 * GB else "MISSES"
  print(f"peak RSS of the process (VmHWM) {peak / GB:.2f} GB = baseline + {(peak - base_rss) / GB:.2f} GB "
        f"= posteriors + {(peak - inputs_rss) / GB:.2f} GB ({(peak - inputs_rss) / (p * 4):.1f} model-sized "
        f"float32 buffers) -> {ok} the goal (<= 3 GB)")

  # XLA's plan for one chunk (what the fused chunk function allocates), after the measured run.
  fused = jax.jit(lambda chunk, q, b: jax.vmap(forward, in_axes=(0, None))(merge.hessian_weighted(q, chunk), b))
  mem = fused.lower(jnp.asarray(alphas[:min(chunk_size, g)]), q, x).compile().memory_analysis()
  plan = {}
  if mem is not None:
    plan = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                temporaries=mem.temp_size_in_bytes)
    print(f"XLA plan of one fused chunk: arguments {plan['arguments'] / GB:.2f} GB, temporaries "
          f"{plan['temporaries'] / GB:.2f} GB ({plan['temporaries'] / (p * 4):.1f} model-sized buffers), outputs "
          f"{plan['outputs']} B")

  # Consistency: a few alphas merged one at a time (jitted) and evaluated.
  one = jax.jit(lambda a, q, b: forward(merge.hessian_weighted(q, a), b))
  idx = np.linspace(0, g - 1, max(1, min(check_alphas, g))).round().astype(int)
  want = np.asarray([float(one(jnp.asarray(alphas[i]), q, x)) for i in idx])
  diff = float(np.max(np.abs(np.asarray(out)[idx] - want)))
  print(f"consistency on {len(idx)} alphas: max |preview - per-alpha merge + evaluate| = {diff:.2e}")
  return dict(num_params=p, num_alphas=g, seconds=seconds, baseline_rss=base_rss, inputs_rss=inputs_rss,
              peak_rss=peak, grid_bytes=g * p * 4, model_bytes=p * 4, stage_peaks=dict(sampler.peaks), xla_plan=plan,
              max_abs_diff=diff)


def main(_):
  result = run(FLAGS.params, FLAGS.layers, FLAGS.tasks, FLAGS.spacing, FLAGS.chunk_size, FLAGS.batch,
               FLAGS.check_alphas)
  if FLAGS.result_json:
    with open(FLAGS.result_json, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  define_flags()
  app.run(main)
