"""Squared-gradient diagonal Fisher over one pass of data ("AdamW-SG" of the paper, Sec. 3.5; Daheim et al. 2024).

After training (e.g. with AdamW) one extra pass turns the trained params theta into a diagonal Gaussian posterior

    h = scale * sum_{i=1}^N (grad_theta loss_i(theta))^2 + prior_precision,     q = N(theta, diag(h)^-1),

from per-example gradients (`vmap` of `grad`). Two variants for a classifier with logits f(theta, x_i) (Daheim et
al., 2024, offer both):

  'empirical'  loss_i = -log softmax(f(theta, x_i))[y_i] with the observed label y_i;
  'true'       the same with y_i ~ softmax(f(theta, x_i)) drawn from the model itself (one label per example), an
               unbiased one-sample estimate of the Fisher E_{y ~ p(y|x_i)}[g g^T] (diagonal), the Gauss-Newton matrix.

The default is 'empirical': it needs no key, is deterministic, and is the quantity AdamW's second moment tracks, so
"AdamW-SG" means this. Near a well-fitted model both agree; away from it the empirical Fisher can mislead (Kunstner
et al., 2019) and 'true' is the safer choice.

Normalisation. The sum over examples (scale = 1) is the Fisher of the *summed* loss sum_i loss_i, i.e. N times the
Fisher of the mean loss: this is the "scale by dataset size" of Daheim et al. (2024), built in, so posteriors of tasks
with different N are weighted by how much data they saw. `scale` multiplies the sum (e.g. 1/N for the Fisher of the
mean loss, or a temperature); `prior_precision` adds the precision of an isotropic Gaussian prior N(0, I /
prior_precision) (the weight decay of training, as a precision of the summed loss), which also keeps h > 0 for
parameters that never receive a gradient (e.g. constant input pixels), as `bmerge.merge.hessian_weighted` requires.

Memory. The data are processed `chunk_size` examples at a time inside one `lax.fori_loop`: only [chunk_size, P]
per-example gradients exist at once, whatever N. Chunk i reads examples [min(i c, N - c), +c) with a dynamic slice
of the inputs (no padded copy of the data set) and masks the examples an earlier chunk already counted, so any N works.

Example:
  Squared gradients of 1/2 (w x_i - y_i)^2 in w are (w x_i - y_i)^2 x_i^2; at w = 0 with y = 1: sum_i x_i^2.

  >>> import jax.numpy as jnp
  >>> from bmerge import curvature
  >>> loss_fn = lambda w, x, y: 0.5 * (w * x - y) ** 2
  >>> float(curvature.sum_squared_gradients(loss_fn, jnp.asarray(0.0), (jnp.array([1.0, 2.0, 3.0]), jnp.ones(3))))
  14.0

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Sec. 3.5: AdamW-SG; its posteriors merge by Eq. 10).
  Daheim, Möllenhoff, Ponti, Gurevych, Khan. Model merging by uncertainty-based gradient matching. ICLR 2024.
  Kunstner, Hennig, Balles. Limitations of the empirical Fisher approximation. NeurIPS 2019.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bmerge import _checks
from bmerge.posteriors import DiagGaussian

__all__ = [
    "VARIANTS",
    "diagonal_fisher",
    "sample_label",
    "sum_squared_gradients",
]

PyTree = Any
VARIANTS = ("empirical", "true")


# ---------------------------------------------------------------------------------------------------------------
# Boundary checks (once, in Python; shapes only, so they also run under a caller's jit).


def _num_examples(inputs: PyTree, labels: PyTree) -> int:
  leaves = [("inputs", jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(inputs)]
  leaves += [("labels", jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(labels)]
  if not any(name == "inputs" for name, _, _ in leaves):
    raise ValueError("`data` inputs have no arrays; expected data = (inputs [N, ...], labels [N]).")
  if not any(name == "labels" for name, _, _ in leaves):
    raise ValueError("`data` labels have no arrays; expected data = (inputs [N, ...], labels [N]).")
  sizes = {}
  for name, path, x in leaves:
    shape = np.shape(x)
    if len(shape) == 0:
      raise ValueError(f"`data` {name}{path} is a scalar; expected a leading example axis N.")
    sizes.setdefault(shape[0], f"{name}{path}")
  if len(sizes) != 1:
    desc = ", ".join(f"{where} has N = {n}" for n, where in sizes.items())
    raise ValueError(f"`data` inputs and labels must share the leading example axis N; {desc}.")
  n = next(iter(sizes))
  if n < 1:
    raise ValueError("`data` has N = 0 examples; expected at least one.")
  return n


def _check_common(data: Any, chunk_size: Any) -> tuple[PyTree, PyTree, int]:
  if not isinstance(data, (tuple, list)) or len(data) != 2:
    raise ValueError(f"`data` must be a pair (inputs, labels) with a leading example axis N, got {type(data).__name__}"
                     f"{' of length ' + str(len(data)) if isinstance(data, (tuple, list)) else ''}.")
  _checks.integer(chunk_size, "chunk_size")
  inputs, labels = data
  return inputs, labels, _num_examples(inputs, labels)


def _check_scalar(value: Any, name: str, *, positive: bool) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value)
  if v.ndim != 0 or not np.issubdtype(v.dtype, np.number):
    raise ValueError(f"`{name}` must be a real scalar, got {value!r}.")
  v = float(v)
  if not math.isfinite(v) or (v <= 0 if positive else v < 0):
    raise ValueError(f"`{name}` must be finite and {'> 0' if positive else '>= 0'}, got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# The chunked pass.


@partial(jax.jit, static_argnums=(0, 1))
def _sum_squares(example_loss: Callable, chunk_size: int, params: PyTree, inputs: PyTree, labels: PyTree,
                 key: Optional[jax.Array]) -> PyTree:
  """sum_i (grad example_loss(params, x_i, y_i, i, key))^2, `chunk_size` examples per loop step."""
  n = jax.tree.leaves(inputs)[0].shape[0]
  c = min(chunk_size, n)
  num_chunks = -(-n // c)
  grad_fn = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0, 0, None))

  def body(i, acc):
    # The last chunk is shifted back to end at N (a full-size slice, no padding copy); the examples it shares with
    # the previous chunk are masked out.
    start = jnp.minimum(i * c, n - c)
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, c, axis=0)
    idx = start + jnp.arange(c)
    grads = grad_fn(params, jax.tree.map(take, inputs), jax.tree.map(take, labels), idx, key)
    mask = idx >= i * c
    return jax.tree.map(lambda a, g: a + jnp.einsum("b,b...->...", mask.astype(g.dtype), jnp.square(g)), acc, grads)

  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
  # A counted loop, not a scan over chunk indices: an index array would be O(N / chunk_size) memory.
  return jax.lax.fori_loop(0, num_chunks, body, zeros)


def sum_squared_gradients(loss_fn: Callable[[PyTree, Any, Any], jax.Array], params: PyTree, data: tuple, *,
                          chunk_size: int = 256) -> PyTree:
  """The generic squared-gradient pass: sum_i (grad_theta loss_fn(params, x_i, y_i))^2 (elementwise).

  This is the empirical Fisher of any per-example loss (regression, a custom likelihood, a masked LM loss ...);
  `diagonal_fisher` builds the classification case (both variants) and the posterior on top of it.

  Args:
    loss_fn: `loss_fn(params, x, y) -> scalar`, the loss of ONE example (x, y: one entry of each leaf of `inputs` /
      `labels`, without the example axis).
    params: the params pytree theta at which gradients are taken.
    data: `(inputs, labels)`, pytrees of arrays sharing the leading example axis N.
    chunk_size: examples per step of the pass; memory ~ chunk_size * P.

  Returns:
    A pytree shaped like `params`: the per-parameter sum of squared per-example gradients.

  Example:
    Any N with any chunk size: the last chunk is shifted back and its overlap masked.

    >>> import jax.numpy as jnp
    >>> from bmerge import curvature
    >>> loss_fn = lambda p, x, y: p["w"] @ x - y                          # gradient x_i
    >>> x = jnp.arange(10.0).reshape(5, 2)
    >>> curvature.sum_squared_gradients(loss_fn, {"w": jnp.zeros(2)}, (x, jnp.zeros(5)), chunk_size=2)["w"].tolist()
    [120.0, 165.0]
  """
  inputs, labels, _ = _check_common(data, chunk_size)
  example_loss = _ExampleLoss(loss_fn)
  return _sum_squares(example_loss, int(chunk_size), params, inputs, labels, None)


class _ExampleLoss:
  """loss_fn(params, x, y) with the (index, key) slots of the true-Fisher loss; hashable by the wrapped function."""

  def __init__(self, loss_fn):
    self.loss_fn = loss_fn

  def __call__(self, params, x, y, index, key):
    del index, key
    return self.loss_fn(params, x, y)

  def __hash__(self):
    return hash((_ExampleLoss, self.loss_fn))

  def __eq__(self, other):
    return isinstance(other, _ExampleLoss) and other.loss_fn == self.loss_fn


class _CategoricalLoss:
  """-log softmax(logits_fn(params, x[None])[0])[y]; y observed ('empirical') or drawn from the model ('true')."""

  def __init__(self, logits_fn, variant):
    self.logits_fn, self.variant = logits_fn, variant

  def __call__(self, params, x, y, index, key):
    logits = self.logits_fn(params, jax.tree.map(lambda a: a[None], x))[0]
    if self.variant == "true":
      y = sample_label(key, index, jax.lax.stop_gradient(logits))
    return -jax.nn.log_softmax(logits)[y]

  def __hash__(self):
    return hash((_CategoricalLoss, self.logits_fn, self.variant))

  def __eq__(self, other):
    return (isinstance(other, _CategoricalLoss) and other.logits_fn == self.logits_fn
            and other.variant == self.variant)


def sample_label(key: jax.Array, index, logits: jax.Array) -> jax.Array:
  """The label the 'true' variant draws for example `index`: categorical(fold_in(key, index), logits).

  One key per example (folded in by its position in the data set), so the labels do not depend on `chunk_size`.

  Args:
    key: the pass's PRNG key.
    index: the example's position in the data set.
    logits: its logits [C].

  Returns:
    The sampled int label.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge import curvature
    >>> int(curvature.sample_label(jax.random.key(0), 3, jnp.array([-1e9, 0.0, -1e9])))    # a certain class
    1
  """
  return jax.random.categorical(jax.random.fold_in(key, index), logits)


def diagonal_fisher(key: Optional[jax.Array], logits_fn: Callable[[PyTree, Any], jax.Array], params: PyTree,
                    data: tuple, *, variant: str = "empirical", chunk_size: int = 256, prior_precision=0.0,
                    scale=1.0) -> DiagGaussian:
  """Squared-gradient diagonal Fisher of a classifier, as a posterior N(params, diag(h)^-1).

    h = scale * sum_{i=1}^N (grad_theta -log softmax(f(theta, x_i))[y_i])^2 + prior_precision,

  with y_i the observed label ('empirical') or y_i ~ softmax(f(theta, x_i)) ('true', drawn by `sample_label(key, i,
  logits_i)`). With scale = 1 this is the Fisher of the summed loss (N times that of the mean loss, the
  dataset-size scaling of Daheim et al., 2024); see the module docstring.

  Args:
    key: PRNG key for the 'true' variant (one label per example); may be None for 'empirical'.
    logits_fn: `logits_fn(params, x) -> [B, C]` on a batch of inputs (called with B = 1 per example), e.g.
      `model.apply` of a Flax model or `bmerge.models.logistic.logits`.
    params: the trained params theta (any pytree: a Linen params dict, an NNX state, a flat vector).
    data: `(inputs, labels)`: inputs a pytree of arrays [N, ...], labels int [N] (unused by 'true', may be None).
    variant: 'empirical' (default) or 'true'.
    chunk_size: examples per step of the pass; peak memory ~ chunk_size * P, independent of N.
    prior_precision: precision of the isotropic Gaussian prior added to h (>= 0; > 0 guarantees h > 0).
    scale: multiplies the sum over examples (> 0), e.g. 1 / N for the Fisher of the mean loss.

  Returns:
    `DiagGaussian(mean=params, precision=h)`, h shaped like `params`.

  Example:
    For a linear softmax classifier the per-example gradient of the bias is softmax(logits) - onehot(y), so at
    zero weights (uniform predictions over C = 2 classes) each example adds 0.25 to both bias entries:

    >>> import jax.numpy as jnp
    >>> from bmerge.optim.curvature import diagonal_fisher
    >>> logits_fn = lambda p, x: x @ p["w"] + p["b"]
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
    >>> q = diagonal_fisher(None, logits_fn, params, (x, y), prior_precision=1.0)
    >>> q.precision["b"].tolist()                                 # 4 * 0.25 + 1
    [2.0, 2.0]

  References:
    Daheim, Möllenhoff, Ponti, Gurevych, Khan. Model merging by uncertainty-based gradient matching. ICLR 2024.
    Kunstner, Hennig, Balles. Limitations of the empirical Fisher approximation. NeurIPS 2019.
  """
  if variant not in VARIANTS:
    raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
  if variant == "true" and key is None:
    raise ValueError("`key` is required for variant='true' (labels are sampled from the model); got None.")
  if not callable(logits_fn):
    raise ValueError(f"`logits_fn` must be a function (params, x [B, ...]) -> logits [B, C], got {logits_fn!r}.")
  if variant == "true" and isinstance(data, (tuple, list)) and len(data) == 2 and data[1] is None:
    n = np.shape(jax.tree.leaves(data[0])[0])[0] if jax.tree.leaves(data[0]) else 0
    data = (data[0], jnp.zeros((n,), jnp.int32))  # labels are drawn from the model; a placeholder keeps one code path
  inputs, labels, _ = _check_common(data, chunk_size)
  _check_scalar(prior_precision, "prior_precision", positive=False)
  _check_scalar(scale, "scale", positive=True)
  if variant == "empirical":
    for path, y in jax.tree_util.tree_leaves_with_path(labels):
      if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"`data` labels{jax.tree_util.keystr(path)} must be integer class ids, got dtype "
                         f"{jnp.result_type(y)}.")
  h = _sum_squares(_CategoricalLoss(logits_fn, variant), int(chunk_size), params, inputs, labels, key)
  h = jax.tree.map(lambda s: (scale * s + prior_precision).astype(s.dtype), h)
  return DiagGaussian(mean=params, precision=h)
