"""Figures of the paper: ternary contours over the 3-task simplex, two-task curves, histograms (PNG files).

Everything draws on a fresh `matplotlib.figure.Figure` rendered by the Agg canvas: no pyplot, no global backend or
figure state, nothing shown; each function writes one PNG and returns its path.

Ternary coordinates: the simplex point alpha = (alpha_1, alpha_2, alpha_3) is drawn at the convex combination of the
corners of an equilateral triangle with unit sides,

  x = alpha_2 + alpha_3 / 2,   y = (sqrt(3) / 2) alpha_3,

i.e. task 1 at the bottom-left corner (0, 0), task 2 at the bottom-right (1, 0) and task 3 at the top (1/2, sqrt(3)/2);
the uniform weighting (1/3, 1/3, 1/3) lands on the triangle's centroid (1/2, sqrt(3)/6).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Mapping, Optional, Sequence

import matplotlib
import matplotlib.ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import matplotlib.tri as mtri
import numpy as np

from bmerge import metrics

__all__ = ["CORNERS", "barycentric_to_cartesian", "histograms", "ternary_contours", "two_task_curves"]

# [3, 2] the triangle corners of tasks 1, 2, 3 (rows).
CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])

_EXACT_STYLE = {"color": "black", "linewidth": 2.2, "linestyle": "--", "zorder": 3}


def barycentric_to_cartesian(alphas) -> np.ndarray:
  r"""Projects simplex points [N, 3] to the plane [N, 2]: :math:`(x, y) = \sum_t \alpha_t c_t` with `CORNERS` c_t.

  Rows need not be normalised for the projection itself (it is linear); `ternary_contours` checks they sum to 1.
  """
  alphas = np.asarray(alphas, dtype=np.float64)
  if alphas.ndim != 2 or alphas.shape[1] != 3:
    raise ValueError(f"`alphas` must have shape [N, 3] (three task weights per row), got shape {alphas.shape}.")
  return alphas @ CORNERS


def _simplex_alphas(alphas, name: str = "alphas") -> np.ndarray:
  arr = np.asarray(alphas, dtype=np.float64)
  if arr.ndim != 2 or arr.shape[1] != 3:
    raise ValueError(f"`{name}` must have shape [G, 3]: a ternary plot needs exactly T = 3 tasks, got shape "
                     f"{arr.shape}. Use `two_task_curves` for T = 2.")
  if arr.shape[0] < 3:
    raise ValueError(f"`{name}` has {arr.shape[0]} rows; a contour plot needs at least 3 grid points.")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"`{name}` must be finite.")
  if np.any(arr < -1e-9):
    raise ValueError(f"`{name}` must be non-negative (points of the simplex); row {int(np.argmin(arr.min(1)))} is not.")
  sums = arr.sum(axis=1)
  if np.any(np.abs(sums - 1.0) > 1e-6):
    bad = int(np.argmax(np.abs(sums - 1.0)))
    raise ValueError(f"`{name}` rows must sum to 1 (points of the simplex); row {bad} sums to {sums[bad]:.6g}.")
  return arr


def _surfaces(surfaces: Mapping[str, object], size: Optional[int], size_of: str,
              arg: str = "surfaces") -> dict[str, np.ndarray]:
  """Validated [G] surfaces, a key named 'exact' (any case) first, the rest in the given order."""
  if not isinstance(surfaces, Mapping) or not surfaces:
    raise ValueError(f"`{arg}` must be a non-empty dict of name -> [G] metric, got {surfaces!r:.80}.")
  out = {}
  for name, values in surfaces.items():
    if not isinstance(name, str):
      raise TypeError(f"`{arg}` keys must be names (str), got {name!r}.")
    # pylint: disable-next=protected-access
    out[name] = metrics._vector(values, f"{arg}[{name!r}]", size=size, size_of=size_of)
  exact = [k for k in out if k.lower() == "exact"]
  return {k: out[k] for k in exact + [k for k in out if k not in exact]}


def _best_index(values: np.ndarray, maximize: bool) -> int:
  return int(np.argmax(values) if maximize else np.argmin(values))


def _save(fig: Figure, path) -> pathlib.Path:
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(f"`path` must be a non-empty file path (str or os.PathLike), got {path!r}.")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)  # attach the Agg canvas explicitly; no pyplot backend involved
  fig.savefig(path, format="png")
  return path


def _levels(surfaces: dict[str, np.ndarray], num: int) -> np.ndarray:
  lo = min(float(v.min()) for v in surfaces.values())
  hi = max(float(v.max()) for v in surfaces.values())
  if hi <= lo:  # constant surfaces: a band around the value so contourf has increasing levels
    pad = 1e-3 * max(abs(lo), 1.0)
    lo, hi = lo - pad, hi + pad
  return np.linspace(lo, hi, num + 1)


def _ternary_frame(ax, task_names: Sequence[str]) -> None:
  """Triangle outline, faint iso-weight lines at 0.2, 0.4, ..., and the task names at the corners."""
  ax.plot(*np.vstack([CORNERS, CORNERS[:1]]).T, color="black", linewidth=1.0, zorder=4)
  for level in (0.2, 0.4, 0.6, 0.8):
    for t in range(3):
      # the segment alpha_t = level joins the two edges that touch corner t
      u, v = (t + 1) % 3, (t + 2) % 3
      a = np.zeros((2, 3))
      a[:, t] = level
      a[0, u], a[1, v] = 1 - level, 1 - level
      ax.plot(*barycentric_to_cartesian(a).T, color="white", linewidth=0.5, alpha=0.45, zorder=2)
  # Bottom labels run inward from their corner so neighbouring panels never collide.
  offsets = [(-0.03, -0.05, "left", "top"), (0.03, -0.05, "right", "top"), (0.0, 0.04, "center", "bottom")]
  for t, ((x, y), (dx, dy, ha, va), name) in enumerate(zip(CORNERS, offsets, task_names)):
    ax.text(x + dx, y + dy, f"{name} ($\\alpha_{t + 1}$)", ha=ha, va=va, fontsize=9)
  ax.set_xlim(-0.08, 1.08)
  ax.set_ylim(-0.14, math.sqrt(3.0) / 2 + 0.1)
  ax.set_aspect("equal")
  ax.set_axis_off()


def ternary_contours(alphas, surfaces: Mapping[str, object], path, *, task_names: Optional[Sequence[str]] = None,
                     best: bool = True, maximize: bool = True, title: Optional[str] = None, label: str = "accuracy",
                     levels: int = 12, cmap: str = "viridis", dpi: int = 120) -> pathlib.Path:
  """Side-by-side filled contours of metric surfaces over the 3-task simplex (paper Figs. 1, 3, 4, 6, 8, 9).

  One panel per surface (a key named "exact" first, then the previews in the given order), all on one colour scale
  with one colour bar; each panel marks its best alpha with a star and states it in its title. The grid is triangulated
  in the plane (Delaunay on the projected points, `matplotlib.tri`), so any grid works; a simplex lattice with its
  vertices (`bmerge.grid.simplex`) fills the whole triangle.

  Args:
    alphas: [G, 3] points of the simplex (rows >= 0 summing to 1).
    surfaces: name -> [G] metric at each alpha, e.g. {"exact": ..., "simple": ..., "hessian": ...}.
    path: the PNG file to write (parent directories are created).
    task_names: names of the three tasks for the corners; default "task 1", "task 2", "task 3".
    best: mark the best alpha of each surface.
    maximize: whether larger is better (accuracy) or smaller (loss), for `best`.
    title: figure title.
    label: the colour bar's label (the metric's name).
    levels: number of contour bands.
    cmap: a matplotlib colour map name.
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import plot
    >>> n = 10
    >>> alphas = np.array([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)])
    >>> exact = 0.9 - ((alphas - 1 / 3) ** 2).sum(1)
    >>> plot.ternary_contours(alphas, {"exact": exact, "simple": exact - alphas[:, 0] / 10}, "/tmp/fig.png").name
    'fig.png'
  """
  alphas = _simplex_alphas(alphas)
  surfaces = _surfaces(surfaces, alphas.shape[0], "`alphas`")
  names = list(task_names) if task_names is not None else ["task 1", "task 2", "task 3"]
  if len(names) != 3 or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`task_names` must be three strings, got {task_names!r}.")
  if not isinstance(levels, int) or levels < 1:
    raise ValueError(f"`levels` must be a positive integer, got {levels!r}.")
  xy = barycentric_to_cartesian(alphas)
  tri = mtri.Triangulation(xy[:, 0], xy[:, 1])
  bounds = _levels(surfaces, levels)
  norm = matplotlib.colors.Normalize(vmin=bounds[0], vmax=bounds[-1])

  n = len(surfaces)
  fig = Figure(figsize=(3.9 * n + 1.0, 4.0), dpi=dpi, layout="constrained")
  axes = fig.subplots(1, n, squeeze=False)[0]
  filled = None
  for ax, (name, z) in zip(axes, surfaces.items()):
    filled = ax.tricontourf(tri, z, levels=bounds, cmap=cmap, norm=norm, zorder=1)
    ax.tricontour(tri, z, levels=bounds, colors="white", linewidths=0.4, alpha=0.6, zorder=2)
    _ternary_frame(ax, names)
    heading = name
    if best:
      g = _best_index(z, maximize)
      ax.plot(*xy[g], marker="*", markersize=17, color="red", markeredgecolor="white", markeredgewidth=1.0,
              linestyle="none", zorder=5)
      heading += f"\nbest {z[g]:.3g} at ({', '.join(f'{a:.2f}' for a in alphas[g])})"
    ax.set_title(heading, fontsize=10)
  fig.colorbar(filled, ax=list(axes), shrink=0.85, label=label, ticks=matplotlib.ticker.MaxNLocator(6))
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def two_task_curves(alpha1, curves: Mapping[str, object], path, *, task_names: Optional[Sequence[str]] = None,
                    best: bool = True, maximize: bool = True, title: Optional[str] = None, label: str = "accuracy",
                    dpi: int = 120) -> pathlib.Path:
  """Metric against the weight alpha_1 of the first of two tasks (the second gets 1 - alpha_1; paper Figs. 5, 7).

  One line per curve on shared axes: a key named "exact" first, drawn black and dashed; the best alpha of each curve
  is starred.

  Args:
    alpha1: [G] weights of task 1, in [0, 1] (any order; lines are drawn in increasing alpha_1).
    curves: name -> [G] metric at each alpha_1.
    path: the PNG file to write.
    task_names: the two task names for the axis label.
    best: star the best point of each curve.
    maximize: whether larger is better, for `best`.
    title: figure title.
    label: the y-axis label (the metric's name).
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.
  """
  alpha1 = metrics._vector(alpha1, "alpha1")  # pylint: disable=protected-access
  if np.any(alpha1 < 0) or np.any(alpha1 > 1):
    raise ValueError("`alpha1` must lie in [0, 1] (the weight of task 1; task 2 gets 1 - alpha1).")
  curves = _surfaces(curves, alpha1.shape[0], "`alpha1`", "curves")
  names = list(task_names) if task_names is not None else ["task 1", "task 2"]
  if len(names) != 2 or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`task_names` must be two strings, got {task_names!r}.")
  order = np.argsort(alpha1, kind="stable")
  fig = Figure(figsize=(6.0, 4.0), dpi=dpi, layout="constrained")
  ax = fig.subplots()
  for name, y in curves.items():
    style = dict(_EXACT_STYLE) if name.lower() == "exact" else {"linewidth": 1.6, "marker": "o", "markersize": 3}
    (line,) = ax.plot(alpha1[order], y[order], label=name, **style)
    if best:
      g = _best_index(y, maximize)
      ax.plot(alpha1[g], y[g], marker="*", markersize=14, color=line.get_color(), markeredgecolor="white",
              linestyle="none", zorder=5)
  ax.set_xlabel(f"$\\alpha_1$ (weight of {names[0]}; {names[1]} gets $1 - \\alpha_1$)")
  ax.set_ylabel(label)
  ax.set_xlim(0.0, 1.0)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  return _save(fig, path)


def histograms(surfaces: Mapping[str, object], path, *, bins: int = 10,
               range: Optional[tuple[float, float]] = None,  # pylint: disable=redefined-builtin
               title: Optional[str] = None, label: str = "accuracy", dpi: int = 120) -> pathlib.Path:
  """How many alphas reach each metric level, one panel per surface on shared bins and axes (paper Figs. 3, 4, 6).

  Args:
    surfaces: name -> [G] metric values ("exact" first if present); G may differ between surfaces.
    path: the PNG file to write.
    bins: number of equal-width bins shared by every panel.
    range: (low, high) of the bins; default the min and max over all surfaces.
    title: figure title.
    label: the x-axis label (the metric's name).
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.
  """
  surfaces = _surfaces(surfaces, None, "")
  if range is None:
    lo = min(float(v.min()) for v in surfaces.values())
    hi = max(float(v.max()) for v in surfaces.values())
    range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
  hists = {name: metrics.histogram(v, bins=bins, range=range) for name, v in surfaces.items()}
  n = len(hists)
  fig = Figure(figsize=(3.2 * n + 0.4, 3.0), dpi=dpi, layout="constrained")
  axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)[0]
  for ax, (name, h) in zip(axes, hists.items()):
    color = "0.25" if name.lower() == "exact" else None
    ax.stairs(h.counts, h.edges, fill=True, alpha=0.8, color=color)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("number of alphas")
  if title:
    fig.suptitle(title)
  return _save(fig, path)
