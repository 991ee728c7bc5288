"""bmerge.plot: the ternary projection is exact, figures are real PNGs, bad inputs name the argument."""

import math
import struct

import numpy as np
import pytest

from bmerge import plot

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lattice(n):
  """Every (i, j, n - i - j) / n: the 3-task simplex lattice with its vertices, (n + 1)(n + 2) / 2 points."""
  return np.array([(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)])


def _png_size(path):
  data = path.read_bytes()
  assert data[:8] == _PNG_SIGNATURE
  assert data[12:16] == b"IHDR"  # the first chunk, holding width and height
  return struct.unpack(">II", data[16:24])


def test_projection_maps_vertices_to_corners_and_centroid_to_centroid():
  xy = plot.barycentric_to_cartesian(np.eye(3))
  np.testing.assert_allclose(xy, [[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], atol=1e-15)
  # Equilateral: every side has length 1.
  for a, b in ((0, 1), (1, 2), (2, 0)):
    assert np.linalg.norm(xy[a] - xy[b]) == pytest.approx(1.0)
  np.testing.assert_allclose(plot.barycentric_to_cartesian([[1 / 3, 1 / 3, 1 / 3]]), [[0.5, math.sqrt(3) / 6]])
  # An edge midpoint lands on the middle of that side, and every lattice point inside the triangle.
  np.testing.assert_allclose(plot.barycentric_to_cartesian([[0.5, 0.5, 0.0]]), [[0.5, 0.0]])
  xy = plot.barycentric_to_cartesian(_lattice(10))
  assert np.all(xy[:, 1] >= -1e-12)
  assert np.all(xy[:, 1] <= math.sqrt(3) * xy[:, 0] + 1e-12)
  assert np.all(xy[:, 1] <= math.sqrt(3) * (1 - xy[:, 0]) + 1e-12)


def test_ternary_contours_writes_a_png(tmp_path):
  alphas = _lattice(10)
  exact = 0.9 - ((alphas - [0.3, 0.4, 0.3]) ** 2).sum(1)
  preview = 0.85 - ((alphas - [0.5, 0.3, 0.2]) ** 2).sum(1)
  out = plot.ternary_contours(alphas, {"simple": preview, "exact": exact}, tmp_path / "sub" / "t.png",
                              task_names=["a", "b", "c"], title="test")
  assert out == tmp_path / "sub" / "t.png"
  width, height = _png_size(out)
  # two panels side by side plus a colour bar: clearly wider than tall
  assert width > 1.5 * height > 0
  # a constant surface and a loss still plot
  out = plot.ternary_contours(alphas, {"flat": np.full(len(alphas), 0.5)}, tmp_path / "flat.png", maximize=False)
  assert _png_size(out)[0] > 0


def test_ternary_contours_rejects_bad_inputs(tmp_path):
  alphas = _lattice(4)
  z = np.zeros(len(alphas))
  with pytest.raises(ValueError, match="`alphas`.*T = 3"):
    plot.ternary_contours(np.full((5, 2), 0.5), {"exact": np.zeros(5)}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="`alphas`.*T = 3"):
    plot.ternary_contours(np.full((5, 4), 0.25), {"exact": np.zeros(5)}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="`alphas` rows must sum to 1"):
    plot.ternary_contours(alphas * 2, {"exact": z}, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"surfaces\['exact'\]` has 14 entries"):
    plot.ternary_contours(alphas, {"exact": z[:-1]}, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"surfaces\['p'\]` must be finite"):
    plot.ternary_contours(alphas, {"p": np.where(np.arange(len(z)) == 3, np.nan, z)}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="`surfaces`"):
    plot.ternary_contours(alphas, {}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="`task_names`"):
    plot.ternary_contours(alphas, {"exact": z}, tmp_path / "x.png", task_names=["a", "b"])
  assert not (tmp_path / "x.png").exists()


def test_two_task_curves_and_histograms_write_pngs(tmp_path):
  alpha1 = np.linspace(1.0, 0.0, 21)  # unsorted input is fine
  curves = {"exact": 0.8 + 0.1 * np.sin(3 * alpha1), "simple": 0.78 + 0.1 * np.sin(2.5 * alpha1)}
  out = plot.two_task_curves(alpha1, curves, tmp_path / "c.png", task_names=["SST-2", "RT"])
  assert out == tmp_path / "c.png" and min(_png_size(out)) > 0
  with pytest.raises(ValueError, match="`alpha1`"):
    plot.two_task_curves(alpha1 + 1, curves, tmp_path / "bad.png")
  with pytest.raises(ValueError, match=r"curves\['simple'\]` has 3 entries"):
    plot.two_task_curves(alpha1, {"simple": np.zeros(3)}, tmp_path / "bad.png")
  out = plot.histograms({"exact": curves["exact"], "simple": curves["simple"][:7]}, tmp_path / "h.png", bins=8)
  width, height = _png_size(out)
  assert width > height > 0
  assert not (tmp_path / "bad.png").exists()


def test_a_surface_may_bring_its_own_grid(tmp_path):
  """Exact results on a coarser lattice next to previews on a finer one (e.g. joint training at step 0.25)."""
  fine, coarse = _lattice(8), _lattice(4)
  f = lambda a: 0.9 - ((a - [0.3, 0.4, 0.3]) ** 2).sum(1)
  out = plot.ternary_contours(fine, {"simple": f(fine), "exact": (coarse, f(coarse))}, tmp_path / "t.png")
  assert min(_png_size(out)) > 0
  out = plot.two_task_curves(np.linspace(0, 1, 9), {"exact": (np.linspace(0, 1, 3), [0.1, 0.3, 0.2]),
                                                    "simple": np.zeros(9)}, tmp_path / "c.png")
  assert min(_png_size(out)) > 0
  with pytest.raises(ValueError, match=r"surfaces\['exact'\]\[1\]` has 14 entries but its grid has G = 15"):
    plot.ternary_contours(fine, {"exact": (coarse, f(coarse)[:-1])}, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"surfaces\['exact'\]\[0\]` rows must sum to 1"):
    plot.ternary_contours(fine, {"exact": (coarse * 2, f(coarse))}, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def _aspect(path):
  width, height = _png_size(path)
  return width / height


def test_pair_curves_draw_one_panel_per_pair(tmp_path):
  from bmerge import grid
  a3, a4 = grid.simplex(3, 0.25), grid.simplex(4, 0.25)
  wide = plot.pair_curves(a3, {"exact": np.sqrt(a3), "simple": a3[:, 0]}, tmp_path / "p3.png")
  # 3 pairs in one row, 6 pairs in two rows of three panels (4.6 x 3.6 inches each).
  assert _aspect(wide) == pytest.approx(3 * 4.6 / 3.6, rel=0.02)
  tall = plot.pair_curves(a4, {"exact": np.sqrt(a4)}, tmp_path / "p4.png", task_names=list("abcd"))
  assert _aspect(tall) == pytest.approx(3 * 4.6 / (2 * 3.6), rel=0.02)
  with pytest.raises(ValueError, match=r"curves\['exact'\]` has 2 columns; expected \[G\] or \[G, 3\]"):
    plot.pair_curves(a3, {"exact": np.ones((len(a3), 2))}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="`task_names` must be 3 strings"):
    plot.pair_curves(a3, {"exact": a3[:, 0]}, tmp_path / "x.png", task_names=["a"])
  with pytest.raises(ValueError, match="`alphas` rows must sum to 1"):
    plot.pair_curves(2 * a3, {"exact": a3[:, 0]}, tmp_path / "x.png")


def test_scaling_curves_draw_one_panel_per_direction(tmp_path):
  from bmerge import grid
  directions = np.array([[1.0, 1.0], [1.0, 0.0]])
  alphas = grid.scaled(directions, np.linspace(0, 1, 6))
  out = plot.scaling_curves(alphas, {"exact": alphas.sum(1), "ta": (alphas[::2], alphas[::2, 0])}, tmp_path / "s.png",
                            directions=directions, direction_names=["all tasks", "task 1"])
  assert _aspect(out) == pytest.approx(2 * 4.6 / 3.6, rel=0.02)
  # Without directions: the distinct simplex points alpha / sum(alpha), here (1/2, 1/2) and (1, 0).
  assert _aspect(plot.scaling_curves(alphas, {"exact": alphas.sum(1)}, tmp_path / "s2.png")) == pytest.approx(
      2 * 4.6 / 3.6, rel=0.02)
  with pytest.raises(ValueError, match="`alphas` must be non-negative"):
    plot.scaling_curves(-alphas, {"exact": alphas.sum(1)}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="`direction_names`"):
    plot.scaling_curves(alphas, {"exact": alphas.sum(1)}, tmp_path / "x.png", directions=directions,
                        direction_names=["one"])


def test_pareto_fronts_and_the_parameter_plane(tmp_path):
  from bmerge import grid
  a = grid.simplex(3, 0.25)
  exact = 0.5 + 0.4 * np.sqrt(a)
  out = plot.pareto_fronts(exact, {"simple": 0.5 + 0.4 * a, "hessian": exact}, tmp_path / "p.png")
  assert _aspect(out) == pytest.approx(3 * 3.4 / (2 * 3.0), rel=0.02)  # a row per preview, a column per pair
  with pytest.raises(ValueError, match=r"`previews\['simple'\]` must have shape \[G, 3\]"):
    plot.pareto_fronts(exact, {"simple": exact[:, 0]}, tmp_path / "x.png")

  centres = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]])
  losses = lambda p: 0.5 * ((np.asarray(p)[:, None, :] - centres[None]) ** 2).sum(-1)
  out = plot.solutions_2d(tmp_path / "plane.png", losses, centres, a @ centres,
                          {"simple": a @ centres, "shifted": a @ centres + 0.1}, extra={"simple": centres})
  assert _aspect(out) == pytest.approx(2.0, rel=0.05)  # two square panels
  out = plot.surrogates_2d(tmp_path / "surr.png", {"exact": losses, "simple": losses}, a[:2], a[:2] @ centres,
                           {"simple": a[:2] @ centres}, minimisers=centres)
  assert _aspect(out) == pytest.approx(2 * 3.8 / (2 * 3.6), rel=0.05)  # 2 alphas x (exact, simple)
  with pytest.raises(ValueError, match=r"`task_losses` must map points \[M, 2\] to per-task values \[M, 3\]"):
    plot.solutions_2d(tmp_path / "x.png", lambda p: losses(p)[:, :2], centres, a @ centres, {"s": a @ centres})
  with pytest.raises(ValueError, match=r"`merged\['s'\]` has 2 rows but `exact` has G = 15"):
    plot.solutions_2d(tmp_path / "x.png", losses, centres, a @ centres, {"s": centres[:2]})
  with pytest.raises(ValueError, match="`surfaces` must be a dict .* with the key 'exact'"):
    plot.surrogates_2d(tmp_path / "x.png", {"simple": losses}, a[:2], a[:2] @ centres, {})
  assert not (tmp_path / "x.png").exists()


def test_front_view_shows_the_body_of_the_front_in_either_direction():
  front = np.array([[0.0, 0.95], [0.9, 0.9], [0.92, 0.88], [0.95, 0.0], [0.91, 0.89]] + [[0.9 + 0.001 * i, 0.9 - 0.001 * i]
                                                                                        for i in range(20)])
  lo, hi = plot.front_view(front, quantile=0.1)
  q = np.quantile(front, 0.1, axis=0)
  np.testing.assert_allclose(lo, q - 0.15 * (front.max(0) - q))
  np.testing.assert_allclose(hi, front.max(0) + 0.05 * (front.max(0) - q))
  assert np.all(lo > 0.5)  # the two points that give a task up stay outside
  lo_min, hi_min = plot.front_view(-front, maximize=False, quantile=0.1)
  np.testing.assert_allclose(lo_min, -hi)
  np.testing.assert_allclose(hi_min, -lo)
