"""Honest costs: run time apart from compilation, measured once when computed and stored with the results.

A stage's `seconds` is its wall time minus the time JAX spent tracing, lowering and compiling during it
(`compile_seconds`, summed from JAX's own compilation events), so no stage pays another's compilation and a stage
that only loaded stored results reports the seconds stored with them, never the load time. Every figure carries the
run (one id per process) and the machine it was measured on; ratios are meaningful only between figures of one run.

`recording()` collects the costs of the chunked drivers (`bmerge.preview`, `bmerge.exact.joint_train`,
`bmerge.chunked_map`) called inside it, e.g. to hand `compare` the cost of a user's own exact stage:

  >>> import numpy as np
  >>> import bmerge
  >>> with bmerge.timing.recording() as log:
  ...   _ = bmerge.chunked_map(lambda a: a.sum(axis=1), np.eye(3), chunk_size=2, progress=False)
  >>> [(c.computed_rows, c.loaded_rows, c.run == bmerge.timing.RUN) for c in log]
  [(3, 0, True)]
  >>> exact_cost = bmerge.timing.combine("exact", log)   # e.g. bmerge.compare(..., costs={"exact": exact_cost})
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import os
import platform
import socket
import threading
import time
import uuid
from typing import Any, Iterator, NamedTuple

import jax

__all__ = ["Cost", "RUN", "combine", "machine", "recording", "stopwatch"]

RUN = uuid.uuid4().hex[:12]  # this process's run: figures with the same RUN were measured side by side


def machine() -> dict:
  """Where this process runs: hostname, CPU model, cores, jax backend, device kind and count, UTC date, run id.

  Example:
    >>> from bmerge import timing
    >>> sorted(timing.machine())
    ['backend', 'cores', 'cpu', 'date', 'device_count', 'device_kind', 'hostname', 'run']
  """
  devices = jax.devices()
  return {"hostname": socket.gethostname(), "cpu": _cpu_model(), "cores": os.cpu_count(),
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "run": RUN}


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.partition(":")[2].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


class Cost(NamedTuple):
  """What one stage cost, and where the figure comes from."""

  stage: str  # e.g. "preview_hessian_weighted"
  seconds: float  # run time without compilation (stored seconds for rows loaded from disk)
  compile_seconds: float  # tracing, lowering and compiling during the stage (0 for loaded rows)
  computed_rows: int  # rows computed in this process
  loaded_rows: int  # rows read back from a workdir
  run: str  # the run that measured it (RUN, or the stored run of loaded rows; "mixed" if several)
  machine: Any  # `machine()` of that run (a dict), or "mixed" if several

  def to_json(self) -> dict:
    return {"seconds": self.seconds, "compile_seconds": self.compile_seconds, "computed_rows": self.computed_rows,
            "loaded_rows": self.loaded_rows, "loaded": self.computed_rows == 0 and self.loaded_rows > 0,
            "run": self.run, "machine": self.machine}


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("bmerge_compile_watches", default=())
_LOCK = threading.Lock()
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class _Watch:
  """Wall time and compile time of one block (compile events of this thread's context only)."""

  def __init__(self):
    self.compile_seconds = 0.0
    self.start = self.wall = 0.0


def _listener(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event in _COMPILE_EVENTS:
    for watch in _ACTIVE.get():
      watch.compile_seconds += duration


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def stopwatch() -> Iterator[_Watch]:
  """Measures a block: `.wall` seconds in all, `.compile_seconds` of them spent compiling (nested watches both count).

  Results must be ready at the end of the block (`jax.block_until_ready`) for `.wall` to include their computation.
  """
  watch = _Watch()
  token = _ACTIVE.set(_ACTIVE.get() + (watch,))
  watch.start = time.perf_counter()
  try:
    yield watch
  finally:
    watch.wall = time.perf_counter() - watch.start
    _ACTIVE.reset(token)


_LOGS: contextvars.ContextVar = contextvars.ContextVar("bmerge_cost_logs", default=())


@contextlib.contextmanager
def recording() -> Iterator[list]:
  """Collects a `Cost` for every chunked computation inside the block, in order."""
  log: list = []
  token = _LOGS.set(_LOGS.get() + (log,))
  try:
    yield log
  finally:
    _LOGS.reset(token)


def report(cost: Cost) -> None:
  """Hands a stage's cost to every enclosing `recording()`."""
  with _LOCK:
    for log in _LOGS.get():
      log.append(cost)


def combine(stage: str, costs) -> Cost:
  """One Cost for several (e.g. the chunked calls of one stage): seconds and rows add up; the run and machine are
  kept when all agree, else "mixed"."""
  costs = list(costs)
  used = [c for c in costs if c.computed_rows or c.loaded_rows]
  runs = {c.run for c in used}
  return Cost(stage, sum(c.seconds for c in costs), sum(c.compile_seconds for c in costs),
              sum(c.computed_rows for c in costs), sum(c.loaded_rows for c in costs),
              runs.pop() if len(runs) == 1 else ("mixed" if runs else RUN),
              used[0].machine if len(runs) <= 1 and used else ("mixed" if used else machine()))
