"""The exact answer at one alpha vector as at a grid: `joint_train` and `joint_train_ivon` accept either."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bmerge import exact

TARGETS = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])


def _task_losses(p, batch):
  del batch
  return 0.5 * jnp.sum((p["x"][None, :] - TARGETS) ** 2, axis=1)


def test_joint_train_one_vector_is_that_row_of_the_grid_and_the_closed_form():
  grid = np.array([[0.25, 0.75], [1.0, 0.0]])
  rows = exact.joint_train(_task_losses, {"x": jnp.zeros(3)}, grid, optax.sgd(0.5), 80, None, progress=False)
  one = exact.joint_train(_task_losses, {"x": jnp.zeros(3)}, grid[0], optax.sgd(0.5), 80, None, progress=False)
  assert one["x"].shape == (3,)
  np.testing.assert_allclose(one["x"], rows["x"][0], rtol=0, atol=1e-7)
  # sum_t alpha_t / 2 |x - m_t|^2 is minimised at sum_t alpha_t m_t (the alphas sum to 1).
  np.testing.assert_allclose(one["x"], grid[0] @ np.asarray(TARGETS), atol=1e-5)


def test_joint_train_ivon_one_vector_is_that_row_of_the_grid():
  grid = np.array([[0.5, 0.5], [0.0, 1.0]])
  batches = [None] * 5
  kw = dict(ess=100.0, learning_rate=0.05, progress=False)
  rows = exact.joint_train_ivon(jax.random.key(1), _task_losses, {"x": jnp.zeros(3)}, grid, batches, **kw)
  one = exact.joint_train_ivon(jax.random.key(1), _task_losses, {"x": jnp.zeros(3)}, grid[1], batches, **kw)
  assert one["x"].shape == (3,)
  np.testing.assert_allclose(one["x"], rows["x"][1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((1, 2, 2)), np.float32(1.0)])
def test_joint_train_names_alphas_for_other_shapes(bad):
  with pytest.raises(ValueError, match=r"`alphas` must be one weight vector \[T\] or a grid \[G, T\]"):
    exact.joint_train(_task_losses, {"x": jnp.zeros(3)}, bad, optax.sgd(0.5), 2, None, progress=False)
