"""Multinomial logistic regression: logits = x W + b (the model of the paper's MNIST experiments, Figs. 8/9).

Params are either a dict {'w': [D, C], 'b': [C]} or one flat vector theta [P], P = D C + C, laid out as the rows of
the [D + 1, C] matrix [W; b] (row-major), so `theta.reshape(D + 1, C)` is [W; b]. The flat form is what the
full-covariance learners (VON, mixtures, Laplace) work with; every function here takes either.

Task losses are *summed* cross-entropies plus an isotropic Gaussian prior,

    loss_t(theta) = sum_{i in task t} -log softmax(x_i W + b)[y_i] + prior_precision / 2 |theta|^2,

so exp(-loss_t) is the unnormalised posterior given task t's data, and its Hessian (`hessian`) is the exact
precision of the Laplace approximation:

    H = sum_i (x~_i x~_i^T) ⊗ (diag(p_i) - p_i p_i^T) + prior_precision I,   x~_i = [x_i, 1], p_i = softmax(logits_i).

Example:
  The flat layout: theta.reshape(D + 1, C) is [W; b].

  >>> import jax.numpy as jnp
  >>> from bmerge.models import logistic
  >>> theta = jnp.arange(logistic.num_params(2, 3), dtype=jnp.float32)       # D = 2, C = 3: P = 9
  >>> logistic.unflatten(theta, 3)["b"].tolist(), logistic.flatten(logistic.unflatten(theta, 3)).shape
  ([6.0, 7.0, 8.0], (9,))

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (App. B.2: merging logistic-regression models on MNIST, Figs. 8-9).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bmerge.models._model import Model

__all__ = ["MultitaskBatch", "accuracy", "apply", "cross_entropy", "flatten", "hessian", "init", "logits", "make",
           "mean_ce", "multitask_batch", "multitask_losses", "num_params", "task_loss_fn", "unflatten"]

PyTree = Any


def num_params(num_features: int, num_classes: int) -> int:
  """P = D C + C (weights and biases); 650 for digits (D = 64, C = 10).

  Args:
    num_features: D.
    num_classes: C.

  Returns:
    P.

  Example:
    >>> from bmerge.models import logistic
    >>> logistic.num_params(64, 10), logistic.num_params(784, 10)
    (650, 7850)
  """
  return num_features * num_classes + num_classes


def init(key: jax.Array, input_shape: Sequence[int], num_classes: int = 10, dtype=jnp.float32) -> dict:
  """{'w': [D, C], 'b': [C]} with D = prod(input_shape); w ~ N(0, 1/D) (LeCun normal), b = 0.

  Args:
    key: PRNG key of the weights.
    input_shape: the shape of one example (no batch axis); images are flattened.
    num_classes: C.
    dtype: the params' dtype.

  Returns:
    The params dict.

  Example:
    >>> import jax
    >>> from bmerge.models import logistic
    >>> params = logistic.init(jax.random.key(0), (8, 8), num_classes=10)
    >>> params["w"].shape, params["b"].tolist() == [0.0] * 10
    ((64, 10), True)
  """
  d = int(np.prod(input_shape))
  if d < 1 or num_classes < 1:
    raise ValueError(f"`input_shape` {tuple(input_shape)} and `num_classes` {num_classes} must be non-empty.")
  w = jax.random.normal(key, (d, num_classes), dtype) / jnp.sqrt(jnp.asarray(d, dtype))
  return {"w": w, "b": jnp.zeros((num_classes,), dtype)}


def flatten(params: dict) -> jax.Array:
  """{'w': [D, C], 'b': [C]} -> theta [P]: the rows of [W; b], row-major.

  Args:
    params: the params dict.

  Returns:
    theta [P], P = (D + 1) C.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> logistic.flatten({"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([3.0, 4.0])}).tolist()
    [1.0, 2.0, 3.0, 4.0]
  """
  return jnp.concatenate([params["w"], params["b"][None, :]], axis=0).reshape(-1)


def unflatten(theta: jax.Array, num_classes: int) -> dict:
  """theta [..., P] -> {'w': [..., D, C], 'b': [..., C]}, the inverse of `flatten` (leading axes kept).

  Args:
    theta: flat params [..., P], P a multiple of `num_classes`.
    num_classes: C.

  Returns:
    The params dict.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> p = logistic.unflatten(jnp.array([1.0, 2.0, 3.0, 4.0]), 2)
    >>> p["w"].tolist(), p["b"].tolist()
    ([[1.0, 2.0]], [3.0, 4.0])
  """
  if theta.shape[-1] % num_classes:
    raise ValueError(f"`theta` has {theta.shape[-1]} entries, not a multiple of num_classes = {num_classes}.")
  m = theta.reshape(theta.shape[:-1] + (-1, num_classes))
  return {"w": m[..., :-1, :], "b": m[..., -1, :]}


def _as_dict(params, num_classes: Optional[int]) -> dict:
  if isinstance(params, dict):
    return params
  if num_classes is None:
    raise ValueError("`num_classes` is required when `params` is a flat vector theta [P].")
  return unflatten(jnp.asarray(params), num_classes)


def logits(params, x: jax.Array, num_classes: Optional[int] = None) -> jax.Array:
  """x [B, ...] -> logits [B, C] = flatten(x) W + b.

  Args:
    params: {'w', 'b'} or flat theta [P] (then `num_classes` is required).
    x: inputs [B, ...], flattened per example.
    num_classes: C, for flat params.

  Returns:
    logits [B, C].

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> logistic.logits(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([[2.0]]), num_classes=2).tolist()  # 2 [1,2] + [3,4]
    [[5.0, 8.0]]
  """
  p = _as_dict(params, num_classes)
  x = jnp.reshape(x, (x.shape[0], -1))
  return x @ p["w"] + p["b"]


apply = logits


def make(num_classes: int = 10) -> Model:
  """The model as `Model(init(key, input_shape) -> params dict, apply(params, x) -> logits)`.

  Args:
    num_classes: C.

  Returns:
    A `bmerge.models.Model`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> model = logistic.make(num_classes=3)
    >>> model.apply(model.init(jax.random.key(0), (4,)), jnp.ones((2, 4))).shape
    (2, 3)
  """
  return Model(init=lambda key, input_shape: init(key, input_shape, num_classes), apply=logits)


def cross_entropy(params, x: jax.Array, y: jax.Array, num_classes: Optional[int] = None) -> jax.Array:
  """Per-example CE_i = -log softmax(x_i W + b)[y_i], shape [B].

  Args:
    params: {'w', 'b'} or flat theta [P] (then `num_classes`).
    x: inputs [B, ...].
    y: int labels [B].
    num_classes: C, for flat params.

  Returns:
    [B] cross-entropies.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> params = {"w": jnp.zeros((2, 4)), "b": jnp.zeros(4)}                 # uniform over C = 4 classes
    >>> print(logistic.cross_entropy(params, jnp.ones((2, 2)), jnp.array([0, 3])).round(4))   # log 4
    [1.3863 1.3863]
  """
  lg = logits(params, x, num_classes)
  return -jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None].astype(jnp.int32), axis=1)[:, 0]


def mean_ce(params, x, y, num_classes: Optional[int] = None) -> jax.Array:
  """(1/B) sum_i CE_i, the mean cross-entropy over the batch (the minibatch training loss).

  Args:
    params, x, y, num_classes: as in `cross_entropy`.

  Returns:
    The scalar mean.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    >>> round(float(logistic.mean_ce(params, jnp.ones((3, 2)), jnp.array([0, 1, 1]))), 4)   # log 2
    0.6931
  """
  return jnp.mean(cross_entropy(params, x, y, num_classes))


def accuracy(params, x, y, num_classes: Optional[int] = None) -> jax.Array:
  """(1/B) sum_i [argmax_c logits_ic = y_i], the fraction of examples whose argmax logit is the label.

  Args:
    params, x, y, num_classes: as in `cross_entropy`.

  Returns:
    The scalar accuracy in [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> params = {"w": jnp.eye(2), "b": jnp.zeros(2)}                        # predicts the larger feature
    >>> float(logistic.accuracy(params, jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 0])))
    0.5
  """
  return jnp.mean((jnp.argmax(logits(params, x, num_classes), axis=1) == y).astype(jnp.float32))


def _sq_norm(params) -> jax.Array:
  return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(params))


def task_loss_fn(x, y, num_classes: int, prior_precision=0.0, weights=None):
  """theta -> sum_i w_i CE(theta; x_i, y_i) + prior_precision / 2 |theta|^2 for one task's data (flat or dict theta).

  Args:
    x: the task's inputs [N, ...].
    y: its int labels [N].
    num_classes: C.
    prior_precision: the precision of the isotropic Gaussian prior.
    weights: [N] per-example weights w_i (default 1): tasks padded to a common length share one compiled learner
      (0 marks padding).

  Returns:
    `loss(theta) -> scalar`, the task's loss-bar (-log joint up to a constant) for the full-covariance learners.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> loss = logistic.task_loss_fn(jnp.ones((2, 1)), jnp.array([0, 1]), num_classes=2, prior_precision=2.0)
    >>> round(float(loss(jnp.zeros(4))), 4), round(float(loss(jnp.ones(4))), 4)   # 2 log 2, then + 2 / 2 * 4
    (1.3863, 5.3863)
  """
  x, y = jnp.asarray(x), jnp.asarray(y)

  def loss(theta):
    ce = cross_entropy(theta, x, y, num_classes)
    ce = ce if weights is None else ce * weights
    return jnp.sum(ce) + 0.5 * prior_precision * _sq_norm(theta)
  return loss


def hessian(theta: jax.Array, x: jax.Array, num_classes: int, prior_precision=0.0, weights=None) -> jax.Array:
  """Exact Hessian [P, P] of `task_loss_fn(x, ., num_classes, prior_precision, weights)` at flat theta (closed form).

  H = sum_i w_i (x~_i x~_i^T) ⊗ (diag(p_i) - p_i p_i^T) + prior_precision I, in the flat layout of this module. For
  this model it equals the generalised Gauss-Newton matrix and the (true) Fisher of the summed loss: the precision
  H_t of the Laplace posterior N(theta_t, H_t^-1) that Eq. 10 merges.

  Args:
    theta: flat params [P].
    x: the task's inputs [N, ...].
    num_classes: C.
    prior_precision: added to the diagonal.
    weights: optional per-example weights [N].

  Returns:
    [P, P] symmetric positive semi-definite (definite with prior_precision > 0).

  Example:
    The closed form against automatic differentiation of `task_loss_fn`:

    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> x, y = jnp.array([[1.0, 0.0], [0.5, 1.0]]), jnp.array([0, 2])
    >>> theta = jnp.linspace(-1.0, 1.0, logistic.num_params(2, 3))             # P = 9
    >>> loss = logistic.task_loss_fn(x, y, num_classes=3, prior_precision=1.0)
    >>> h = jax.jit(logistic.hessian, static_argnums=2)(theta, x, 3, 1.0)
    >>> bool(jnp.allclose(h, jax.jit(jax.hessian(loss))(theta), atol=1e-6))
    True
  """
  x = jnp.reshape(x, (x.shape[0], -1))
  p = jax.nn.softmax(logits(theta, x, num_classes))  # [N, C]
  pw = p if weights is None else p * weights[:, None]
  xt = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)  # [N, D + 1]
  # sum_i w_i xt_id xt_ie (p_ia [a = b] - p_ia p_ib), as two contractions over i (never [N, D, D, C, C]).
  diag_part = jnp.einsum("nd,ne,na->dae", xt, xt, pw)  # [D + 1, C, D + 1]
  outer_part = jnp.einsum("nd,na,ne,nb->daeb", xt, pw, xt, p)  # [D + 1, C, D + 1, C]
  d1, c = xt.shape[1], num_classes
  h = outer_part * -1.0
  h = h + jnp.einsum("dae,ab->daeb", diag_part, jnp.eye(c, dtype=p.dtype))
  h = h.reshape(d1 * c, d1 * c)
  return h + prior_precision * jnp.eye(d1 * c, dtype=h.dtype)


class MultitaskBatch(NamedTuple):
  """T tasks' data padded to a common length, for `multitask_losses` (full-batch joint training, Eq. 1).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import logistic
    >>> b = logistic.MultitaskBatch(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)))
    >>> b.x.shape, b.mask.shape
    ((2, 3, 4), (2, 3))
  """

  x: jax.Array  # [T, N_max, D]
  y: jax.Array  # [T, N_max] int32
  mask: jax.Array  # [T, N_max] 1 for real examples, 0 for padding


def multitask_batch(task_data: Sequence[tuple], num_classes: int) -> MultitaskBatch:
  """Pads the tasks' (x_t, y_t) to the longest task and stacks them (labels checked against `num_classes`).

  Args:
    task_data: one (x_t [N_t, ...], y_t [N_t]) per task.
    num_classes: C; every label must lie in [0, C).

  Returns:
    A `MultitaskBatch` with N_max = max_t N_t; `mask` is 1 on real examples and 0 on padding.

  Example:
    >>> import numpy as np
    >>> from bmerge.models import logistic
    >>> b = logistic.multitask_batch([(np.ones((2, 3)), np.array([0, 1])), (np.ones((1, 3)), np.array([1]))], 2)
    >>> b.x.shape, b.mask.tolist()
    ((2, 2, 3), [[1.0, 1.0], [1.0, 0.0]])
  """
  task_data = list(task_data)
  if not task_data:
    raise ValueError("`task_data` is empty; expected a list of (x_t, y_t) per task.")
  n_max = max(len(np.asarray(y)) for _, y in task_data)
  xs, ys, ms = [], [], []
  for t, (x, y) in enumerate(task_data):
    x = np.asarray(x).reshape(len(x), -1)
    y = np.asarray(y)
    if len(x) != len(y):
      raise ValueError(f"`task_data[{t}]` has {len(x)} inputs but {len(y)} labels.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"`task_data[{t}]` labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}].")
    pad = n_max - len(y)
    xs.append(np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]))
    ys.append(np.concatenate([y, np.zeros((pad,), y.dtype)]).astype(np.int32))
    ms.append(np.concatenate([np.ones(len(y)), np.zeros(pad)]))
  x = jnp.asarray(np.stack(xs))
  return MultitaskBatch(x, jnp.asarray(np.stack(ys)), jnp.asarray(np.stack(ms), x.dtype))


def multitask_losses(theta, batch: MultitaskBatch, prior_precision=0.0) -> jax.Array:
  """[T] task losses loss_t(theta) (summed CE of task t + prior_precision / 2 |theta|^2), see the module docstring.

  With sum_t alpha_t = 1, sum_t alpha_t loss_t is the weighted multitask loss of Eq. 1 plus the prior once: the
  `task_losses(params, batch)` of `bmerge.exact.joint_train`.

  Args:
    theta: {'w', 'b'} or flat theta [P].
    batch: a `MultitaskBatch` (padding is masked out).
    prior_precision: the precision of the isotropic Gaussian prior, added to every task's loss.

  Returns:
    [T] task losses.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from bmerge.models import logistic
    >>> b = logistic.multitask_batch([(np.ones((2, 1)), np.array([0, 1])), (np.ones((1, 1)), np.array([1]))], 2)
    >>> print(logistic.multitask_losses(jnp.zeros(4), b).round(4))   # 2 log 2 and log 2: padding adds nothing
    [1.3863 0.6931]
  """
  # C from the parameter layout: P = (D + 1) C.
  num_classes = theta["b"].shape[-1] if isinstance(theta, dict) else theta.shape[-1] // (batch.x.shape[-1] + 1)
  ce = jax.vmap(lambda x, y: cross_entropy(theta, x, y, num_classes))(batch.x, batch.y)  # [T, N_max]
  return jnp.sum(ce * batch.mask, axis=1) + 0.5 * prior_precision * _sq_norm(theta)
