"""Grids of task weights alpha: rows of a [G, T] array, usually on the simplex (sum_t alpha_t = 1)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _divisions(spacing: float, name: str = "spacing") -> int:
  if not isinstance(spacing, (int, float, np.floating)) or not math.isfinite(spacing) or spacing <= 0 or spacing > 1:
    raise ValueError(f"`{name}` must be a number in (0, 1], got {spacing!r}.")
  n = round(1.0 / spacing)
  if n < 1 or abs(n * spacing - 1.0) > 1e-9:
    raise ValueError(f"`{name}` must be 1/n for an integer n so the lattice reaches every vertex; got {spacing!r} "
                     f"(1/{spacing!r} = {1.0 / spacing:.6g}). Try {1.0 / max(n, 1):.6g}.")
  return n


def simplex(num_tasks: int, spacing: float) -> np.ndarray:
  """Every point of the simplex lattice with step `spacing` = 1/n: rows of non-negative multiples of 1/n summing to 1.

  There are C(n + T - 1, T - 1) points (231 for T = 3, spacing 0.05), vertices included, in lexicographic order of
  (alpha_1, ..., alpha_T) descending. Returns float64 [G, T]; rows sum to 1 exactly in float64 up to rounding.
  """
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks!r}.")
  n = _divisions(spacing)
  # Compositions of n into T non-negative parts, by stars and bars.
  rows = []
  for bars in itertools.combinations(range(n + num_tasks - 1), num_tasks - 1):
    edges = (-1,) + bars + (n + num_tasks - 1,)
    rows.append([edges[i + 1] - edges[i] - 1 for i in range(num_tasks)])
  counts = np.asarray(rows, dtype=np.int64)[::-1].reshape(-1, num_tasks)
  return counts / float(n)


def line(spacing: float) -> np.ndarray:
  """The two-task line alpha = (a, 1 - a) for a = 0, spacing, ..., 1 ([G, 2], a ascending)."""
  n = _divisions(spacing)
  a = np.arange(n + 1) / float(n)
  return np.stack([a, 1.0 - a], axis=1)


def dirichlet(key: jax.Array, num_tasks: int, num_points: int, concentration: float = 1.0) -> jax.Array:
  """`num_points` samples from Dirichlet(concentration * 1) on the simplex ([G, T]); concentration 1 is uniform."""
  if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
    raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks!r}.")
  if not isinstance(num_points, (int, np.integer)) or num_points < 1:
    raise ValueError(f"`num_points` must be a positive integer, got {num_points!r}.")
  if not concentration > 0:
    raise ValueError(f"`concentration` must be > 0, got {concentration!r}.")
  return jax.random.dirichlet(key, jnp.full((num_tasks,), concentration), shape=(num_points,))


def refine(points: np.ndarray, spacing: float, radius: int = 1) -> np.ndarray:
  """A finer simplex lattice (step `spacing`) restricted to within `radius` steps of any of `points` ([N, T]).

  Use it to zoom in around the best alphas of a coarse preview: `refine(top_k_alphas, 0.01)`. Points are snapped to
  the fine lattice; returns the unique lattice points, each with max_t |alpha_t - p_t| <= radius * spacing for some p.
  """
  points = np.atleast_2d(np.asarray(points, dtype=np.float64))
  num_tasks = points.shape[1]
  n = _divisions(spacing)
  if not isinstance(radius, (int, np.integer)) or radius < 0:
    raise ValueError(f"`radius` must be a non-negative integer, got {radius!r}.")
  out = set()
  offsets = itertools.product(range(-radius, radius + 1), repeat=num_tasks - 1)
  offsets = [np.asarray(o) for o in offsets]
  for p in points:
    base = np.rint(p * n).astype(np.int64)
    for off in offsets:
      head = base[:-1] + off
      last = n - head.sum()
      cand = np.append(head, last)
      if np.all(cand >= 0) and np.max(np.abs(cand - p * n)) <= radius + 0.5 + 1e-9:
        out.add(tuple(cand.tolist()))
  counts = np.asarray(sorted(out, reverse=True), dtype=np.int64).reshape(-1, num_tasks)
  return counts / float(n)
