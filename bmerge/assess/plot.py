"""Figures of the paper (PNG files): ternary contours over the 3-task simplex, two-task curves (for two tasks, and
for every pair of tasks along the edges of the simplex), histograms, per-task Pareto fronts, task arithmetic's scaling
curves, and the parameter plane of two-parameter problems.

Everything draws on a fresh `matplotlib.figure.Figure` rendered by the Agg canvas: no pyplot, no global backend or
figure state, nothing shown; each function writes one PNG and returns its path.

Ternary coordinates: the simplex point alpha = (alpha_1, alpha_2, alpha_3) is drawn at the convex combination of the
corners of an equilateral triangle with unit sides,

  x = alpha_2 + alpha_3 / 2,   y = (sqrt(3) / 2) alpha_3,

i.e. task 1 at the bottom-left corner (0, 0), task 2 at the bottom-right (1, 0) and task 3 at the top (1/2, sqrt(3)/2);
the uniform weighting (1/3, 1/3, 1/3) lands on the triangle's centroid (1/2, sqrt(3)/6).

Example:
  >>> import numpy as np
  >>> from bmerge import plot
  >>> np.round(plot.barycentric_to_cartesian([[1 / 3, 1 / 3, 1 / 3]]), 4).tolist()   # the centroid
  [[0.5, 0.2887]]

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Figs. 1-9).
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

import matplotlib
import matplotlib.collections
import matplotlib.colors
import matplotlib.ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import matplotlib.tri as mtri
import numpy as np

from bmerge import _checks
from bmerge.grid import lattice as grid_lib
from bmerge.assess import metrics

__all__ = ["CORNERS", "barycentric_to_cartesian", "front_view", "histograms", "pair_curves", "pareto_fronts",
           "scaling_curves", "solutions_2d", "surrogates_2d", "ternary_contours", "two_task_curves"]

# [3, 2] the triangle corners of tasks 1, 2, 3 (rows).
CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])

_EXACT_STYLE = {"color": "black", "linewidth": 2.2, "linestyle": "--", "zorder": 3}


def barycentric_to_cartesian(alphas) -> np.ndarray:
  r"""Projects simplex points [N, 3] to the plane [N, 2]: :math:`(x, y) = \sum_t \alpha_t c_t` with `CORNERS` c_t.

  Rows need not be normalised for the projection itself (it is linear); `ternary_contours` checks they sum to 1.

  Args:
    alphas: [N, 3] task weights.

  Returns:
    [N, 2] points of the plane.

  Example:
    >>> from bmerge import plot
    >>> plot.barycentric_to_cartesian([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]).tolist()
    [[1.0, 0.0], [0.5, 0.0]]
  """
  alphas = _checks.numeric(alphas, "alphas")
  if alphas.ndim != 2 or alphas.shape[1] != 3:
    raise ValueError(f"`alphas` must have shape [N, 3] (three task weights per row), got shape {alphas.shape}.")
  return alphas @ CORNERS


def _simplex_alphas(alphas, name: str = "alphas") -> np.ndarray:
  arr = _checks.numeric(alphas, name)
  if arr.ndim != 2 or arr.shape[1] != 3:
    raise ValueError(f"`{name}` must have shape [G, 3]: a ternary plot needs exactly T = 3 tasks, got shape "
                     f"{arr.shape}. Use `two_task_curves` for T = 2.")
  if arr.shape[0] < 3:
    raise ValueError(f"`{name}` has {arr.shape[0]} rows; a contour plot needs at least 3 grid points.")
  arr = _checks.matrix(arr, name, what="[G, 3]")
  _checks.on_simplex(arr, name)
  return arr


def _surfaces(surfaces: Mapping[str, Any], grid: Optional[np.ndarray], grid_name: str, arg: str = "surfaces",
              check_grid: Optional[Callable[[Any, str], np.ndarray]] = None,
              columns: Optional[int] = None) -> dict[str, tuple[Optional[np.ndarray], np.ndarray]]:
  """Validated surfaces as name -> (grid, values), a key named 'exact' (any case) first, the rest in order.

  A surface is either values on the shared `grid` or a pair (its own grid, values) checked with `check_grid`. Values
  are [G] vectors, or [G, `columns`] per-task matrices when `columns` is given.
  """
  if not isinstance(surfaces, Mapping) or not surfaces:
    raise ValueError(f"`{arg}` must be a non-empty dict of name -> [G] metric, got {surfaces!r:.80}.")
  out = {}
  for name, values in surfaces.items():
    if not isinstance(name, str):
      raise TypeError(f"`{arg}` keys must be names (str), got {name!r}.")
    label = f"{arg}[{name!r}]"
    own = grid
    if isinstance(values, tuple) and check_grid is not None:
      if len(values) != 2:
        raise ValueError(f"`{label}` must be values on `{grid_name}` or a pair (grid, values), got {len(values)} "
                         "items.")
      own, values = check_grid(values[0], f"{label}[0]"), values[1]
      label += "[1]"
    size, size_of = (None, "") if own is None else (own.shape[0], f"its grid" if own is not grid else f"`{grid_name}`")
    arr = _checks.numeric(values, label)
    if columns is not None and arr.ndim == 2:
      arr = _checks.matrix(arr, label, rows=size, rows_of=size_of, what=f"[G] or [G, {columns}]")
      if arr.shape[1] != columns:
        raise ValueError(f"`{label}` has {arr.shape[1]} columns; expected [G] or [G, {columns}] (one per task).")
    else:
      arr = _checks.vector(arr, label, size=size, size_of=size_of)
    out[name] = (own, arr)
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


def _levels(surfaces: dict[str, tuple], num: int) -> np.ndarray:
  lo = min(float(v.min()) for _, v in surfaces.values())
  hi = max(float(v.max()) for _, v in surfaces.values())
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


def _names(task_names: Optional[Sequence[str]], num: int) -> list[str]:
  names = [f"task {t + 1}" for t in range(num)] if task_names is None else list(task_names)
  if len(names) != num or not all(isinstance(n, str) for n in names):
    raise ValueError(f"`task_names` must be {num} strings, got {task_names!r}.")
  return names


def _positive(value: Any, name: str) -> int:
  return _checks.positive_int(value, name)


def ternary_contours(alphas, surfaces: Mapping[str, Any], path, *, task_names: Optional[Sequence[str]] = None,
                     best: bool = True, maximize: bool = True, title: Optional[str] = None, label: str = "accuracy",
                     levels: int = 12, cmap: str = "viridis", dpi: int = 120) -> pathlib.Path:
  """Side-by-side filled contours of metric surfaces over the 3-task simplex (paper Figs. 1, 3, 4, 6, 8, 9).

  One panel per surface (a key named "exact" first, then the previews in the given order), all on one colour scale
  with one colour bar; each panel marks its best alpha with a star and states it in its title. Each grid is
  triangulated in the plane (Delaunay on the projected points, `matplotlib.tri`), so any grid works, and a surface
  may bring its own grid (e.g. the exact baseline on a coarser lattice than the previews); a simplex lattice with
  its vertices (`bmerge.grid.simplex`) fills the whole triangle.

  Args:
    alphas: [G, 3] points of the simplex (rows >= 0 summing to 1).
    surfaces: name -> [G] metric at each alpha, or name -> (its own alphas [G', 3], [G'] metric); e.g.
      {"exact": (coarse, exact), "simple": ..., "hessian": ...}.
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
    >>> from bmerge import grid, plot
    >>> alphas = grid.simplex(3, 0.1)
    >>> exact = 0.9 - ((alphas - 1 / 3) ** 2).sum(1)
    >>> plot.ternary_contours(alphas, {"exact": exact, "simple": exact - alphas[:, 0] / 10}, "fig.png").name
    'fig.png'
  """
  alphas = _simplex_alphas(alphas)
  surfaces = _surfaces(surfaces, alphas, "alphas", check_grid=_simplex_alphas)
  names = _names(task_names, 3)
  levels = _positive(levels, "levels")
  maximize = _checks.flag(maximize, "maximize")
  bounds = _levels(surfaces, levels)
  norm = matplotlib.colors.Normalize(vmin=bounds[0], vmax=bounds[-1])

  n = len(surfaces)
  fig = Figure(figsize=(3.9 * n + 1.0, 4.0), dpi=dpi, layout="constrained")
  axes = fig.subplots(1, n, squeeze=False)[0]
  filled = None
  for ax, (name, (a, z)) in zip(axes, surfaces.items()):
    xy = barycentric_to_cartesian(a)
    tri = mtri.Triangulation(xy[:, 0], xy[:, 1])
    filled = ax.tricontourf(tri, z, levels=bounds, cmap=cmap, norm=norm, zorder=1)
    ax.tricontour(tri, z, levels=bounds, colors="white", linewidths=0.4, alpha=0.6, zorder=2)
    _ternary_frame(ax, names)
    heading = name
    if best:
      g = _best_index(z, maximize)
      ax.plot(*xy[g], marker="*", markersize=17, color="red", markeredgecolor="white", markeredgewidth=1.0,
              linestyle="none", zorder=5)
      heading += f"\nbest {z[g]:.3g} at ({', '.join(f'{x:.2f}' for x in a[g])})"
    ax.set_title(heading, fontsize=10)
  fig.colorbar(filled, ax=list(axes), shrink=0.85, label=label, ticks=matplotlib.ticker.MaxNLocator(6))
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def _draw_curves(ax, curves: dict[str, tuple], best: bool, maximize: bool) -> None:
  """One line per (x, y) curve in increasing x, "exact" black and dashed; the best point of each starred."""
  for name, (x, y) in curves.items():
    order = np.argsort(x, kind="stable")
    style = dict(_EXACT_STYLE) if name.lower() == "exact" else {"linewidth": 1.6, "marker": "o", "markersize": 3}
    (line,) = ax.plot(x[order], y[order], label=name, **style)
    if best:
      g = _best_index(y, maximize)
      ax.plot(x[g], y[g], marker="*", markersize=14, color=line.get_color(), markeredgecolor="white",
              linestyle="none", zorder=5)
  ax.grid(alpha=0.3)


def _unit_interval(values, name: str) -> np.ndarray:
  arr = _checks.vector(values, name)
  if np.any(arr < 0) or np.any(arr > 1):
    raise ValueError(f"`{name}` must lie in [0, 1] (the weight of task 1; task 2 gets 1 - alpha1).")
  return arr


def two_task_curves(alpha1, curves: Mapping[str, Any], path, *, task_names: Optional[Sequence[str]] = None,
                    best: bool = True, maximize: bool = True, title: Optional[str] = None, label: str = "accuracy",
                    dpi: int = 120) -> pathlib.Path:
  """Metric against the weight alpha_1 of the first of two tasks (the second gets 1 - alpha_1; paper Figs. 5, 7).

  One line per curve on shared axes: a key named "exact" first, drawn black and dashed; the best alpha of each curve
  is starred. A curve may bring its own alpha_1 values (e.g. joint training at step 0.1 next to a preview at 0.05).

  Args:
    alpha1: [G] weights of task 1, in [0, 1] (any order; lines are drawn in increasing alpha_1).
    curves: name -> [G] metric at each alpha_1, or name -> (its own alpha_1 [G'], [G'] metric).
    path: the PNG file to write.
    task_names: the two task names for the axis label.
    best: star the best point of each curve.
    maximize: whether larger is better, for `best`.
    title: figure title.
    label: the y-axis label (the metric's name).
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import plot
    >>> a1 = np.linspace(0, 1, 11)
    >>> plot.two_task_curves(a1, {"exact": 0.9 - (a1 - 0.4) ** 2, "simple": (a1[::2], 0.8 - a1[::2] ** 2 / 4)},
    ...                      "curves.png").name
    'curves.png'
  """
  alpha1 = _unit_interval(alpha1, "alpha1")
  curves = _surfaces(curves, alpha1, "alpha1", "curves", check_grid=_unit_interval)
  names = _names(task_names, 2)
  maximize = _checks.flag(maximize, "maximize")
  fig = Figure(figsize=(6.0, 4.0), dpi=dpi, layout="constrained")
  ax = fig.subplots()
  _draw_curves(ax, curves, best, maximize)
  ax.set_xlabel(f"$\\alpha_1$ (weight of {names[0]}; {names[1]} gets $1 - \\alpha_1$)")
  ax.set_ylabel(label)
  ax.set_xlim(0.0, 1.0)
  ax.legend()
  if title:
    ax.set_title(title)
  return _save(fig, path)


def _simplex_grid(alphas, name: str) -> np.ndarray:
  arr = _checks.matrix(alphas, name, what="[G, T]")
  if arr.shape[1] < 2:
    raise ValueError(f"`{name}` must have T >= 2 task weights per row, got shape {arr.shape}.")
  _checks.on_simplex(arr, name)
  return arr


def _panels(n: int, dpi: int, width: float = 4.6, height: float = 3.6, **kwargs) -> tuple[Figure, list]:
  """A figure of n panels, three per row."""
  cols = min(3, n)
  fig = Figure(figsize=(width * cols, height * -(-n // cols)), dpi=dpi, layout="constrained")
  axes = fig.subplots(-(-n // cols), cols, squeeze=False, **kwargs).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, list(axes[:n])


def _finish(fig: Figure, axes: list, path, label: str, title: Optional[str]) -> pathlib.Path:
  """The metric's label and the legend on the first panel, the title, and the PNG."""
  axes[0].set_ylabel(label)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def pair_curves(alphas, curves: Mapping[str, Any], path, *, task_names: Optional[Sequence[str]] = None,
                best: bool = True, maximize: bool = True, title: Optional[str] = None, label: str = "accuracy",
                dpi: int = 110) -> pathlib.Path:
  """Two-task curves for every pair of tasks: the edges of the simplex, where all other tasks weigh 0 (paper Fig. 5).

  The panel of tasks (i, j) shows the rows of the grid with alpha_i + alpha_j = 1, against alpha_i. A curve holding
  one metric per alpha ([G]) is drawn as it is; one holding a metric per task ([G, T]) is drawn, in the panel of
  (i, j), as the mean of its columns i and j: the pair's own metric, as if only those two tasks were trained.

  Args:
    alphas: [G, T] points of the simplex, T >= 2 (e.g. `bmerge.grid.simplex(3, 0.05)`).
    curves: name -> [G] or [G, T] metric, or name -> (its own alphas [G', T], [G'] or [G', T] metric).
    path: the PNG file to write.
    task_names: the T task names.
    best: star the best point of each curve in each panel.
    maximize: whether larger is better, for `best`.
    title: figure title.
    label: the y-axis label (the metric's name).
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import grid, plot
    >>> alphas = grid.simplex(3, 0.25)
    >>> per_task = 0.5 + 0.4 * np.sqrt(alphas)             # each task's accuracy grows with its weight
    >>> plot.pair_curves(alphas, {"exact": per_task, "simple": per_task - 0.05}, "pairs.png").name
    'pairs.png'
  """
  alphas = _simplex_grid(alphas, "alphas")
  t = alphas.shape[1]
  curves = _surfaces(curves, alphas, "alphas", "curves", check_grid=_simplex_grid, columns=t)
  names = _names(task_names, t)
  maximize = _checks.flag(maximize, "maximize")
  pairs = list(itertools.combinations(range(t), 2))
  edges = {name: grid_lib.pair_edges(a) for name, (a, _) in curves.items()}
  fig, axes = _panels(len(pairs), dpi, sharey=True)
  for ax, (i, j) in zip(axes, pairs):
    edge = {}
    for name, (a, v) in curves.items():
      rows = edges[name][(i, j)]
      if rows.size:
        y = v[rows] if v.ndim == 1 else 0.5 * (v[rows, i] + v[rows, j])
        edge[name] = (a[rows, i], y)
    _draw_curves(ax, edge, best, maximize)
    ax.set_xlabel(f"$\\alpha$ of {names[i]} ({names[j]}: $1 - \\alpha$)")
    ax.set_xlim(0.0, 1.0)
    ax.set_title(f"{names[i]} and {names[j]}", fontsize=10)
  return _finish(fig, axes, path, label, title)


def _nonnegative_grid(alphas, name: str) -> np.ndarray:
  arr = _checks.matrix(alphas, name, what="[G, T]")
  if np.any(arr < 0):
    raise ValueError(f"`{name}` must be non-negative task weights.")
  return arr


def scaling_curves(alphas, curves: Mapping[str, Any], path, *, directions=None,
                   direction_names: Optional[Sequence[str]] = None, best: bool = True, maximize: bool = True,
                   title: Optional[str] = None, label: str = "accuracy", max_panels: int = 12,
                   dpi: int = 110) -> pathlib.Path:
  """Metric against the scale lambda of task arithmetic's sweep alpha = lambda * d, one panel per direction d.

  Rows are placed on the rays with `bmerge.grid.scaling`: along the given `directions` (those passed to
  `bmerge.grid.scaled`, so the x axis is its lambda), or, without them, along the distinct simplex points
  alpha / sum(alpha) with lambda = sum_t alpha_t (the total weight). Rows on no ray are left out.

  Args:
    alphas: [G, T] non-negative task weights.
    curves: name -> [G] metric, or name -> (its own alphas [G', T], [G'] metric).
    path: the PNG file to write.
    directions: optional [D, T] directions of the sweep.
    direction_names: optional D panel titles; default the direction's weights.
    best: star the best point of each curve in each panel.
    maximize: whether larger is better, for `best`.
    title: figure title.
    label: the y-axis label (the metric's name).
    max_panels: draw at most this many directions (the first ones).
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import grid, plot
    >>> lambdas = np.linspace(0, 1, 11)
    >>> alphas = grid.scaled(np.ones(3), lambdas)          # the usual task-arithmetic sweep
    >>> acc = 0.6 + 0.3 * lambdas - 0.25 * lambdas ** 2
    >>> plot.scaling_curves(alphas, {"task arithmetic": acc}, "scaling.png", directions=np.ones(3)).name
    'scaling.png'
  """
  alphas = _nonnegative_grid(alphas, "alphas")
  curves = _surfaces(curves, alphas, "alphas", "curves", check_grid=_nonnegative_grid)
  maximize = _checks.flag(maximize, "maximize")
  max_panels = _positive(max_panels, "max_panels")
  dirs = grid_lib.scaling(alphas, directions).directions[:max_panels]
  if direction_names is not None and (len(direction_names) < len(dirs) or
                                      not all(isinstance(n, str) for n in direction_names)):
    raise ValueError(f"`direction_names` must hold a name (str) for each of the {len(dirs)} directions drawn.")
  lam = {name: grid_lib.scaling(a, dirs).lambdas for name, (a, _) in curves.items()}
  fig, axes = _panels(len(dirs), dpi, sharey=True)
  for d, ax in enumerate(axes):
    ray = {}
    for name, (_, v) in curves.items():
      rows = np.flatnonzero(np.isfinite(lam[name][:, d]))
      if rows.size:
        ray[name] = (lam[name][rows, d], v[rows])
    _draw_curves(ax, ray, best, maximize)
    heading = direction_names[d] if direction_names is not None else f"d = ({', '.join(f'{x:.2g}' for x in dirs[d])})"
    ax.set_title(heading, fontsize=10)
    ax.set_xlabel("$\\lambda$ ($\\alpha = \\lambda d$)" if directions is not None else
                  "$\\lambda = \\sum_t \\alpha_t$")
  return _finish(fig, axes, path, label, title)


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

  Example:
    >>> import numpy as np
    >>> from bmerge import plot
    >>> plot.histograms({"exact": np.linspace(0.8, 0.9, 50), "simple": np.linspace(0.6, 0.9, 20)},
    ...                 "hist.png").name
    'hist.png'
  """
  surfaces = {name: v for name, (_, v) in _surfaces(surfaces, None, "").items()}
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


def pareto_fronts(exact, previews: Mapping[str, Any], path, *, task_names: Optional[Sequence[str]] = None,
                  maximize: bool = True, title: Optional[str] = None, label: str = "accuracy",
                  dpi: int = 110) -> pathlib.Path:
  """Per-task metrics of every alpha, the exact Pareto front, and the alphas each preview calls Pareto-optimal.

  One row of panels per preview, one column per pair of tasks (T > 2 shows every pair as a projection, the fronts
  being computed in all T dimensions): the exact per-task metrics of every alpha (grey), those on the exact front
  (black), and the *exact* metrics at the alphas on the preview's own front (`bmerge.metrics.compare_fronts`): a
  preview whose front choices sit on the black points loses nothing. The axes show the region of the exact front
  (`front_view`); how many alphas lie outside it is written in each panel.

  Args:
    exact: [G, T] exact per-task metrics.
    previews: name -> [G, T] preview per-task metrics on the same alphas.
    path: the PNG file to write.
    task_names: the T task names.
    maximize: whether larger is better in every column.
    title: figure title.
    label: the metric's name for the axis labels.
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import grid, plot
    >>> a = grid.simplex(2, 0.1)
    >>> exact = 0.5 + 0.4 * np.sqrt(a)
    >>> plot.pareto_fronts(exact, {"simple": 0.5 + 0.4 * a}, "pareto.png").name
    'pareto.png'
  """
  exact = _checks.matrix(exact, "exact", what="[G, T]")
  if exact.shape[1] < 2:
    raise ValueError(f"`exact` must hold T >= 2 per-task metrics per row, got shape {exact.shape}.")
  t = exact.shape[1]
  previews = {name: v for name, (_, v) in _surfaces(previews, exact, "exact", "previews", columns=t).items()}
  for name, v in previews.items():
    if v.ndim != 2:
      raise ValueError(f"`previews[{name!r}]` must have shape [G, {t}] (per-task metrics), got {v.shape}.")
  names = _names(task_names, t)
  maximize = _checks.flag(maximize, "maximize")
  front = metrics.pareto_front(exact, maximize)
  chosen = {name: metrics.pareto_front(v, maximize) for name, v in previews.items()}
  pairs = list(itertools.combinations(range(t), 2))
  lo, hi = front_view(exact[front], maximize)
  rows = max(1, len(chosen))
  fig = Figure(figsize=(3.4 * len(pairs), 3.0 * rows), dpi=dpi, layout="constrained")
  axes = fig.subplots(rows, len(pairs), squeeze=False)
  for r, (name, idx) in enumerate(chosen.items() if chosen else [("exact", np.zeros(0, np.int64))]):
    for c, (i, j) in enumerate(pairs):
      ax = axes[r, c]
      ax.scatter(exact[:, i], exact[:, j], s=6, color="0.8", label="exact, every alpha", zorder=1)
      ax.scatter(exact[front, i], exact[front, j], s=14, color="black", label="exact Pareto front", zorder=2)
      ax.scatter(exact[idx, i], exact[idx, j], s=28, facecolors="none", edgecolors=f"C{r}", linewidths=1.1,
                 label=f"{name}: its front's alphas (exact values)", zorder=3)
      ax.set_xlim(lo[i], hi[i])
      ax.set_ylim(lo[j], hi[j])
      outside = int(np.sum(np.any((exact[:, [i, j]] < lo[[i, j]]) | (exact[:, [i, j]] > hi[[i, j]]), axis=1)))
      if outside:
        ax.text(0.02, 0.02, f"{outside} alphas outside the view", transform=ax.transAxes, fontsize=7, color="0.4")
      ax.set_xlabel(f"{label}, {names[i]}", fontsize=8)
      ax.set_ylabel(f"{label}, {names[j]}", fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
    axes[r, 0].legend(fontsize=7, loc="upper right" if maximize else "lower left")  # beyond the front: empty
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def front_view(front, maximize: bool = True, margin: float = 0.15, quantile: float = 0.1) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
  """Axis limits per column that show the body of a Pareto front.

  Per column, from `margin` of the front's robust range beyond its `quantile` worst value to 5 % beyond its best:
  the few front points that give one task up entirely (a task's accuracy at alphas that leave it out, on the front
  because another task is at its best there) stay outside the view instead of squeezing the front into a corner.

  Args:
    front: [F, M] the front's points.
    maximize: whether larger is better in every column.
    margin: how far beyond the robust worst value to show, as a share of the robust range.
    quantile: the share of the front's worst values per column left out of the robust range.

  Returns:
    (lo [M], hi [M]) axis limits.

  Example:
    >>> import numpy as np
    >>> from bmerge import plot
    >>> lo, hi = plot.front_view(np.array([[0.9, 0.5], [0.7, 0.8]]), quantile=0.0)
    >>> np.round(lo, 3).tolist(), np.round(hi, 3).tolist()
    ([0.67, 0.455], [0.91, 0.815])
  """
  front = _checks.matrix(front, "front", what="[F, M]")
  values = front if maximize else -front
  best, worst = values.max(0), np.quantile(values, quantile, axis=0)
  span = np.maximum(best - worst, 1e-6 * np.maximum(np.abs(best), 1.0))
  lo, hi = worst - margin * span, best + 0.05 * span
  return (lo, hi) if maximize else (-hi, -lo)


# ----------------------------------------------------------------------------------------------------------------
# Two-parameter problems (paper Fig. 2): the parameter plane itself.


def _plane(points: np.ndarray, margin: float, n: int = 101):
  lo, hi = points.min(0), points.max(0)
  pad = margin * np.maximum(hi - lo, 1.0)
  lo, hi = lo - pad, hi + pad
  xx, yy = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n))
  return lo, hi, xx, yy, np.stack([xx, yy], -1).reshape(-1, 2)


def _plane_points(value, name: str, rows: Optional[int] = None, rows_of: str = "") -> np.ndarray:
  arr = _checks.matrix(value, name, rows=rows, rows_of=rows_of, what="[N, 2]")
  if arr.shape[1] != 2:
    raise ValueError(f"`{name}` must hold points of the plane, shape [N, 2]; got {arr.shape}.")
  return arr


def _field(fn: Callable, flat: np.ndarray, num_tasks: int, name: str) -> np.ndarray:
  out = _checks.numeric(fn(flat), f"{name}(points)")
  if out.shape != (flat.shape[0], num_tasks):
    raise ValueError(f"`{name}` must map points [M, 2] to per-task values [M, {num_tasks}], got shape {out.shape}.")
  return out


_TASK_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def solutions_2d(path, task_losses: Callable[[np.ndarray], Any], minimisers, exact, merged: Mapping[str, Any], *,
                 task_names: Optional[Sequence[str]] = None, extra: Optional[Mapping[str, Any]] = None,
                 title: Optional[str] = None, dpi: int = 110) -> pathlib.Path:
  """For a model with two parameters: task-loss contours, the exact solutions and each rule's merged models (Fig. 2).

  One panel per merge rule: contour lines of every task's loss, the task minimisers (stars), the exact solutions
  theta*_alpha of the grid (grey dots), the merged theta_alpha (coloured dots) and a segment joining each pair.

  Args:
    path: the PNG file to write.
    task_losses: maps points of the plane [M, 2] to the per-task losses [M, T] (numpy or jax arrays).
    minimisers: [T, 2] the task minimisers.
    exact: [G, 2] the exact solutions at every alpha of the grid.
    merged: rule name -> [G, 2] the merged models at the same alphas.
    task_names: the T task names.
    extra: optional rule name -> [K, 2] points to mark in that rule's panel (e.g. the Gaussian means it merges).
    title: figure title.
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import grid, plot
    >>> centres = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]])
    >>> losses = lambda p: 0.5 * ((p[:, None, :] - centres[None]) ** 2).sum(-1)
    >>> alphas = grid.simplex(3, 0.25)
    >>> plot.solutions_2d("plane.png", losses, centres, alphas @ centres, {"simple": alphas @ centres}).name
    'plane.png'
  """
  minimisers = _plane_points(minimisers, "minimisers")
  exact = _plane_points(exact, "exact")
  if not isinstance(merged, Mapping) or not merged:
    raise ValueError("`merged` must be a non-empty dict of rule name -> [G, 2] merged models.")
  merged = {k: _plane_points(v, f"merged[{k!r}]", exact.shape[0], "`exact`") for k, v in merged.items()}
  extra = {k: _plane_points(v, f"extra[{k!r}]") for k, v in (extra or {}).items()}
  t = minimisers.shape[0]
  names = _names(task_names, t)
  lo, hi, xx, yy, flat = _plane(np.concatenate([exact, minimisers, *merged.values()]), 0.35)
  losses = _field(task_losses, flat, t, "task_losses")
  fig = Figure(figsize=(5.0 * len(merged), 5.0), dpi=dpi, layout="constrained")
  axes = fig.subplots(1, len(merged), sharex=True, sharey=True, squeeze=False)[0]
  for ax, (name, theta) in zip(axes, merged.items()):
    for k in range(t):
      z = losses[:, k].reshape(xx.shape)
      color = _TASK_COLORS[k % len(_TASK_COLORS)]
      ax.contour(xx, yy, z, levels=np.min(z) + np.array([0.05, 0.25, 0.6, 1.2, 2.0]), colors=color, linewidths=0.9,
                 alpha=0.8)
      ax.plot(*minimisers[k], marker="*", markersize=14, color=color, markeredgecolor="black",
              label=f"{names[k]} minimiser", zorder=5)
    ax.add_collection(matplotlib.collections.LineCollection(np.stack([exact, theta], axis=1), colors="0.5",
                                                            linewidths=0.5, alpha=0.6))
    ax.scatter(*exact.T, s=9, color="0.25", label="exact $\\theta^*_\\alpha$", zorder=3)
    ax.scatter(*theta.T, s=9, color="tab:red", label="merged $\\theta_\\alpha$", zorder=4)
    if name in extra:
      ax.scatter(*extra[name].T, marker="D", s=40, color="white", edgecolors="black", label=f"{name}: means", zorder=6)
    dist = np.linalg.norm(theta - exact, axis=1)
    ax.set_title(f"{name}: mean $|\\theta_\\alpha - \\theta^*_\\alpha|$ = {np.mean(dist):.3f}", fontsize=10)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_xlabel("$\\theta_1$")
  axes[0].set_ylabel("$\\theta_2$")
  axes[0].legend(fontsize=7, loc="lower left")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def surrogates_2d(path, surfaces: Mapping[str, Callable[[np.ndarray], Any]], alphas, exact,
                  merged: Mapping[str, Any], *, minimisers=None, clip: float = 3.0, title: Optional[str] = None,
                  dpi: int = 110) -> pathlib.Path:
  """For a model with two parameters: the true multitask loss next to each rule's surrogate, at a few alphas.

  Row r, column "exact" shows sum_t alpha_t loss_t(theta) at alphas[r]; the other columns show each rule's surrogate
  sum_t alpha_t s_t(theta) (e.g. s_t = -log q_t, whose minimiser is the merged model; paper Eqs. 4-8), each minus its
  minimum over the plane and clipped at `clip`, with the exact minimiser (x) and the rule's merged model (o).

  Args:
    path: the PNG file to write.
    surfaces: name -> function mapping points [M, 2] to per-task values [M, T]; the key "exact" holds the true
      losses, the others the surrogates of the merge rules.
    alphas: [A, T] the alphas to show (one row of panels each).
    exact: [A, 2] the exact minimisers at those alphas.
    merged: rule name (keys of `surfaces`) -> [A, 2] its merged models at those alphas.
    minimisers: optional [T, 2] task minimisers to mark.
    clip: the colour scale's upper end.
    title: figure title.
    dpi: resolution of the PNG.

  Returns:
    `path` as a `pathlib.Path`.

  Example:
    >>> import numpy as np
    >>> from bmerge import plot
    >>> centres = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]])
    >>> losses = lambda p: 0.5 * ((p[:, None, :] - centres[None]) ** 2).sum(-1)
    >>> a = np.array([[1 / 3, 1 / 3, 1 / 3]])
    >>> plot.surrogates_2d("surr.png", {"exact": losses, "simple": losses}, a, a @ centres,
    ...                    {"simple": a @ centres}).name
    'surr.png'
  """
  alphas = _nonnegative_grid(alphas, "alphas")
  exact = _plane_points(exact, "exact", alphas.shape[0], "`alphas`")
  if not isinstance(surfaces, Mapping) or "exact" not in surfaces or not all(callable(f) for f in surfaces.values()):
    raise ValueError("`surfaces` must be a dict of name -> function of points [M, 2], with the key 'exact'.")
  merged = {k: _plane_points(v, f"merged[{k!r}]", alphas.shape[0], "`alphas`") for k, v in merged.items()}
  if set(merged) - set(surfaces):
    raise ValueError(f"`merged` names rules without a surface: {sorted(set(merged) - set(surfaces))}.")
  points = [exact, *merged.values()] + ([] if minimisers is None else [_plane_points(minimisers, "minimisers")])
  _, _, xx, yy, flat = _plane(np.concatenate(points), 0.15)
  t = alphas.shape[1]
  fields = {k: _field(f, flat, t, f"surfaces[{k!r}]") for k, f in surfaces.items()}
  cols = ["exact"] + [k for k in surfaces if k != "exact"]
  fig = Figure(figsize=(3.8 * len(cols), 3.6 * len(alphas)), dpi=dpi, layout="constrained")
  axes = np.asarray(fig.subplots(len(alphas), len(cols), sharex=True, sharey=True, squeeze=False))
  for r, alpha in enumerate(alphas):
    for c, name in enumerate(cols):
      ax = axes[r, c]
      z = (fields[name] @ alpha).reshape(xx.shape)
      z = z - z.min()
      ax.contourf(xx, yy, np.minimum(z, clip), levels=np.linspace(0, clip, 13), cmap="viridis_r")
      ax.plot(*exact[r], marker="x", color="black", markersize=10, mew=2, label="exact minimiser")
      if name in merged:
        ax.plot(*merged[name][r], marker="o", color="white", markeredgecolor="black", markersize=7,
                label="merged (surrogate's minimiser)")
      if minimisers is not None:
        for k, m in enumerate(points[-1]):
          ax.plot(*m, marker="*", markersize=9, color=_TASK_COLORS[k % len(_TASK_COLORS)], markeredgecolor="black")
      heading = "true $\\sum_t \\alpha_t$ loss$_t$" if name == "exact" else f"{name} surrogate"
      ax.set_title(f"{heading}\nalpha = ({', '.join(f'{x:.2f}' for x in alpha)})", fontsize=9)
      ax.set_aspect("equal")
  axes[0, -1].legend(fontsize=7, loc="lower right")
  if title:
    fig.suptitle(title)
  return _save(fig, path)
