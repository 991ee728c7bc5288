import jax
import numpy as np
import pytest

import bmerge
from bmerge import posteriors as post


def test_stack_unstack_roundtrip():
  qs = [bmerge.DiagGaussian({"w": np.full((2, 3), i, float)}, {"w": np.full((2, 3), i + 1.0)}) for i in range(3)]
  s = bmerge.stack(qs)
  assert isinstance(s, bmerge.DiagGaussian)
  assert s.mean["w"].shape == (3, 2, 3)
  for a, b in zip(bmerge.unstack(s), qs):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stack_errors():
  q = bmerge.DiagGaussian({"w": np.ones(3)}, {"w": np.ones(3)})
  with pytest.raises(ValueError, match="`posteriors` is empty"):
    bmerge.stack([])
  with pytest.raises(TypeError, match="mixes types"):
    bmerge.stack([q, bmerge.IsoGaussian({"w": np.ones(3)}, np.ones(()))])
  with pytest.raises(ValueError, match="posterior 1 has pytree structure"):
    bmerge.stack([q, bmerge.DiagGaussian({"v": np.ones(3)}, {"v": np.ones(3)})])
  with pytest.raises(ValueError, match="posterior 1 has leaf shapes"):
    bmerge.stack([q, bmerge.DiagGaussian({"w": np.ones(4)}, {"w": np.ones(4)})])


@pytest.mark.parametrize("q", [
    bmerge.DiagGaussian({"w": np.array([1.0, -2.0])}, {"w": np.array([0.5, 4.0])}),
    bmerge.FullGaussian(np.array([1.0, -2.0]), np.array([[2.0, 0.5], [0.5, 1.0]])),
    bmerge.Beta(np.array(3.0), np.array(5.0)),
])
def test_natural_params_roundtrip_and_values(q, x64):
  lam = post.natural_params(q)
  back = post.from_natural(type(q), lam)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), back, q)
  if isinstance(q, bmerge.FullGaussian):
    np.testing.assert_allclose(lam.eta1, q.precision @ q.mean)
    np.testing.assert_allclose(lam.eta2, -0.5 * q.precision)
  if isinstance(q, bmerge.Beta):
    assert (float(lam.eta1), float(lam.eta2)) == (2.0, 4.0)
    np.testing.assert_allclose(post.mode(q), np.log(2.0 / 4.0))


def test_aggregate_is_weighted_sum_plus_gamma_prior(x64):
  lam = post.BetaNatural(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))
  lam0 = post.BetaNatural(np.array(10.0), np.array(20.0))
  alphas = np.array([[0.5, 0.25, 0.0], [0.0, 0.0, 1.0]])
  out = post.aggregate(lam, alphas, lam0)
  np.testing.assert_allclose(out.eta1, [0.5 + 0.5 + 0.25 * 10, 3.0])
  np.testing.assert_allclose(out.eta2, [2 + 1.25 + 0.25 * 20, 6.0])
