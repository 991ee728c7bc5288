"""Every core of a CPU at work: the experiments and benchmarks split the CPU into one JAX device per core.

bmerge's grid stages (`bmerge.preview`, the merges, the mixture EM) split their alphas across all devices JAX sees; on
a CPU, JAX sees one device unless asked for more, and one device runs the many small factorisations and matrix
products of a grid one after another. Split into C devices (C = the cores this process may use), each core runs its
own share. A library user adds one line before the first JAX computation:

  jax.config.update("jax_num_cpu_devices", len(os.sched_getaffinity(0)))

The scripts here take `--cpu_devices N` (default: the core count; 1 keeps a single device). Results do not depend on
it (each alpha is computed by the same code on whichever device holds it); only the time does. Accelerators are
untouched: the flag splits the host CPU only.

Example:
  >>> from experiments import devices
  >>> devices.core_count() >= 1
  True
"""

from __future__ import annotations

import os

import jax
from absl import flags


def core_count() -> int:
  """The cores this process may run on (its CPU affinity where the platform reports it, else `os.cpu_count()`)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


flags.DEFINE_integer("cpu_devices", core_count(),
                     "split this CPU into N JAX devices before anything runs (jax_num_cpu_devices; default: the cores "
                     "this process may use); the grid stages spread their alphas over them. 1 keeps one device.",
                     lower_bound=1)


def apply(n: int | None = None) -> int:
  """Splits the CPU into `n` JAX devices (default: the `--cpu_devices` flag); call before any JAX computation.

  Returns the number of CPU devices JAX reports afterwards. Raises RuntimeError if JAX's CPU backend already started
  with another count (the split must come first).
  """
  n = flags.FLAGS.cpu_devices if n is None else int(n)
  if n < 1:
    raise ValueError(f"`cpu_devices` must be >= 1, got {n}.")
  jax.config.update("jax_num_cpu_devices", n)
  got = len(jax.devices("cpu"))
  if got != n:
    raise RuntimeError(f"asked for {n} CPU devices but JAX had already started with {got}: split the CPU before the "
                       f"first JAX computation.")
  return got
