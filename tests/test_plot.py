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
