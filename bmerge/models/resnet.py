"""ResNet-20, the CIFAR ResNet of He et al. (2016, Sec. 4.2), in Flax Linen, with a BatchNorm policy for merging.

Architecture: a 3x3 convolution to w_1 channels, then 3 stages of `blocks_per_stage` basic blocks with widths
(w_1, w_2, w_3) = width x (16, 32, 64); the first block of stages 2 and 3 halves H and W (stride 2). A basic block is

    y = relu(x' + BN(conv(relu(BN(conv(x)))))),   x' = x[:, ::s, ::s] with zero channels appended (shortcut 'A'),

so shortcuts have no parameters. Global average pooling and a dense layer give the logits. Convolutions have no
bias (BatchNorm follows) and pad by 1 on each side, as in the reference PyTorch models. With 3 blocks per stage and
width 1 this is ResNet-20: 269,722 parameters for 10 classes on 3-channel images (the paper's "260k"). Any H, W
(28x28 MNIST, 14x14 pooled, 32x32 CIFAR-10) and any number of channels work: the network ends in a global pool.

BatchNorm and merging. BatchNorm's scale and bias are parameters and are merged like every other parameter. Its
batch statistics are not: this module keeps no running averages at all. Every BatchNorm normalises

    BN(z) = scale (z - mu) / sqrt(var + 1e-5) + bias,   mu, var = per-channel mean and (biased) variance of z,

where (mu, var) come from the current batch in training (`apply`) and from a *calibration batch run through the
same parameters* at evaluation (`statistics`, then `apply_with`). `make_eval_fn` builds an `eval_fn(params, batch)`
for `bmerge.preview` and `bmerge.exact.joint_train` that does exactly that for every merged model of a chunk, so a
merged model never uses statistics computed with the weights of another model (averaging the task models' running
statistics would). Task models (a one-hot alpha), merged models and jointly trained models are all evaluated by
this one rule, so previews and the exact baseline are compared on equal terms. Recomputing the statistics of an
averaged network is the standard repair of interpolated networks (SWA's `bn_update`, Izmailov et al. 2018; REPAIR,
Jordan et al. 2023); it costs one forward pass over the calibration batch per merged model. Use training inputs
from all tasks as the calibration batch, never the test set.

Params are a plain Linen params dict, so they go straight into IVON, the merge rules and `bmerge.preview`. In
training mode the loss of one example depends on the rest of its batch, so per-example squared gradients
(`bmerge.curvature`) need `apply_with` and fixed statistics.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bmerge.models import resnet
  >>> model = resnet.make(num_classes=10)                                          # ResNet-20
  >>> params = jax.eval_shape(lambda key: model.init(key, (32, 32, 3)), jax.random.key(0))   # shapes only
  >>> resnet.num_params(params)
  269722

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (Sec. 4.2, option A shortcuts).
  He, Zhang, Ren, Sun, "Delving Deep into Rectifiers", ICCV 2015 (the N(0, 2 / fan_in) initialisation).
  Ioffe, Szegedy, "Batch Normalization", ICML 2015.
  Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, "Averaging Weights Leads to Wider Optima and Better
    Generalization", UAI 2018 (recomputing BatchNorm statistics of averaged weights).
  Jordan, Sedghi, Saukh, Entezari, Neyshabur, "REPAIR: REnormalizing Permuted Activations for Interpolation
    Repair", ICLR 2023.
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan, "How to Weight Multitask Finetuning? Fast Previews via
    Bayesian Model-Merging", 2024 (Sec. 4.1, Fig. 3, App. B.3: ResNet-20 on CIFAR-10).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bmerge import _checks

__all__ = ["BasicBlock", "ResNet", "ResNetModel", "accuracies", "make", "make_eval_fn", "mean_cross_entropy",
           "num_params", "task_cross_entropies", "widths_for"]

PyTree = Any

_EPS = 1e-5
# Initial values come from `ResNetModel.init`, not from Linen's per-layer initialisers.
_conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False)


def _norm(train: bool, name: str) -> nn.BatchNorm:
  # momentum 0: after a training-mode pass the 'batch_stats' collection holds exactly that batch's statistics.
  return nn.BatchNorm(use_running_average=not train, momentum=0.0, epsilon=_EPS, use_fast_variance=False, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 conv + BatchNorm layers and a parameter-free shortcut (stride `s` subsampling, zero channels).

  y = relu(x' + BN(conv(relu(BN(conv_s(x)))))), x' = x[:, ::s, ::s] padded with zero channels to `width`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> block = resnet.BasicBlock(width=8, stride=2)
    >>> x = jnp.ones((1, 6, 6, 4))
    >>> variables = jax.eval_shape(lambda k: block.init(k, x, train=False), jax.random.key(0))
    >>> jax.eval_shape(lambda v: block.apply(v, x, train=False), variables).shape
    (1, 3, 3, 8)
  """

  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _conv(self.width, strides=self.stride, name="conv1")(x)
    y = nn.relu(_norm(train, "bn1")(y))
    y = _conv(self.width, name="conv2")(y)
    y = _norm(train, "bn2")(y)
    shortcut = x[:, ::self.stride, ::self.stride, :]
    extra = self.width - x.shape[-1]
    if extra < 0:
      raise ValueError(f"A block cannot narrow {x.shape[-1]} channels to `width` {self.width}.")
    shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """x [B, H, W, C] (or grey [B, H, W]) -> logits [B, num_classes]; `train` picks the source of BN statistics.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> net = resnet.ResNet(widths=(2, 4, 8), blocks_per_stage=1, num_classes=3)
    >>> x = jnp.ones((2, 8, 8))
    >>> variables = jax.eval_shape(lambda k: net.init(k, x, train=False), jax.random.key(0))
    >>> sorted(variables), jax.eval_shape(lambda v: net.apply(v, x, train=False), variables).shape
    (['batch_stats', 'params'], (2, 3))
  """

  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]
    x = _conv(self.widths[0], name="stem_conv")(x)
    x = nn.relu(_norm(train, "stem_bn")(x))
    for s, width in enumerate(self.widths):
      for b in range(self.blocks_per_stage):
        stride = 2 if s > 0 and b == 0 else 1
        x = BasicBlock(width, stride, name=f"stage{s + 1}_block{b + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


def widths_for(width: float) -> tuple[int, int, int]:
  """Stage widths round(width x (16, 32, 64)), at least 1 channel each.

  Args:
    width: the width multiplier, > 0 (1 for ResNet-20).

  Returns:
    (w_1, w_2, w_3).

  Example:
    >>> from bmerge.models import resnet
    >>> resnet.widths_for(0.5), resnet.widths_for(0.01)
    ((8, 16, 32), (1, 1, 1))
  """
  if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
    raise ValueError(f"`width` must be a positive number, got {width!r}.")
  return tuple(max(1, int(round(width * w))) for w in (16, 32, 64))


@dataclasses.dataclass(frozen=True)
class ResNetModel:
  """The model as pure functions (the package's `Model` convention plus the two BatchNorm-statistics functions).

  A frozen dataclass: hashable and equal by value, so it can be a static argument of `jax.jit` and a bound
  argument of a `functools.partial`, and its repr names its sizes.

  Example:
    The statistics of a calibration batch, then evaluation with them, equal a training-mode pass on that batch:

    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> model = resnet.make(width=0.25, blocks_per_stage=1)                   # ResNet-8, 10 classes
    >>> params = model.init(jax.random.key(0), (8, 8, 1))
    >>> x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    >>> gap = jax.jit(lambda p, x: model.apply_with(p, model.statistics(p, x), x) - model.apply(p, x))
    >>> float(jnp.max(jnp.abs(gap(params, x)))) < 1e-5
    True
  """

  widths: tuple[int, ...] = (16, 32, 64)
  blocks_per_stage: int = 3
  num_classes: int = 10

  @property
  def module(self) -> ResNet:
    return ResNet(widths=self.widths, blocks_per_stage=self.blocks_per_stage, num_classes=self.num_classes)

  def init(self, key: jax.Array, input_shape: Sequence[int]) -> PyTree:
    """Linen params dict for inputs of one example's shape (H, W, C) or (H, W).

    Kernels ~ N(0, 2 / fan_in) (He et al. 2015), BatchNorm scales 1, biases 0. All kernels come from one normal
    draw of their total size: one random-number kernel to compile instead of one per layer and shape.
    """
    return _init(self, key, tuple(int(d) for d in input_shape))

  def _train_pass(self, params: PyTree, x: jax.Array) -> tuple[jax.Array, PyTree]:
    return self.module.apply({"params": params}, x, train=True, mutable=["batch_stats"])

  def apply(self, params: PyTree, x: jax.Array) -> jax.Array:
    """Logits [B, C] in training mode: every BatchNorm uses the statistics of this batch x [B, ...]."""
    return self._train_pass(params, x)[0]

  def statistics(self, params: PyTree, x: jax.Array) -> PyTree:
    """{BN layer path: {'mean', 'var'}} of the batch x as `apply(params, x)` computes them, layer after layer."""
    return self._train_pass(params, x)[1]["batch_stats"]

  def apply_with(self, params: PyTree, stats: PyTree, x: jax.Array) -> jax.Array:
    """Logits [B, C] in evaluation mode: every BatchNorm uses the given `stats` (from `statistics`)."""
    return self.module.apply({"params": params, "batch_stats": stats}, x, train=False)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: ResNetModel, key: jax.Array, input_shape: tuple[int, ...]) -> PyTree:
  x = jnp.zeros((1, *input_shape), jnp.float32)
  shapes = jax.eval_shape(lambda: model.module.init(jax.random.key(0), x, train=False))["params"]
  leaves, treedef = jax.tree.flatten_with_path(shapes)
  sizes = [leaf.size if path[-1].key == "kernel" else 0 for path, leaf in leaves]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, start = [], 0
  for (path, leaf), size in zip(leaves, sizes):
    if size:
      fan_in = size // leaf.shape[-1]
      out.append(noise[start:start + size].reshape(leaf.shape) * jnp.sqrt(2.0 / fan_in))
      start += size
    else:
      out.append(jnp.full(leaf.shape, 1.0 if path[-1].key == "scale" else 0.0, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def make(num_classes: int = 10, width: float = 1.0, blocks_per_stage: int = 3) -> ResNetModel:
  """ResNet-(6 blocks_per_stage + 2) with stage widths `widths_for(width)`; the defaults are ResNet-20.

  Args:
    num_classes: C.
    width: the width multiplier of (16, 32, 64).
    blocks_per_stage: basic blocks per stage (3 for ResNet-20).

  Returns:
    A `ResNetModel`.

  Example:
    >>> model = make(num_classes=10, width=0.25)
    >>> params = jax.eval_shape(lambda key: model.init(key, (8, 8, 1)), jax.random.key(0))   # shapes only
    >>> num_params(params), jax.eval_shape(model.apply, params, jnp.ones((2, 8, 8, 1))).shape
    (17254, (2, 10))
  """
  num_classes = _checks.integer(num_classes, "num_classes")
  blocks_per_stage = _checks.integer(blocks_per_stage, "blocks_per_stage")
  return ResNetModel(widths_for(width), blocks_per_stage, num_classes)


def num_params(params: PyTree) -> int:
  """Number of scalars in a params pytree (arrays or shape structs).

  Args:
    params: a pytree of arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    The total number of entries.

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> resnet.num_params({"a": jnp.zeros((3, 3)), "b": [jnp.zeros(2)]})
    11
  """
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def _calibrated_eval(model: ResNetModel, metric_fn: Callable[..., Any], params: PyTree, batch: tuple) -> Any:
  calibration_x, x, *targets = batch
  stats = model.statistics(params, calibration_x)
  return metric_fn(model.apply_with(params, stats, x), *targets)


def _one_model_at_a_time(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` whose `jax.vmap` runs `lax.map` over the mapped arguments (one call per model) instead of batching them.

  Why: batching convolutions over a leading axis of *kernels* (merged models) becomes grouped convolutions, which
  XLA runs far slower per model on CPU than one model after the other.
  """
  mapped_fn = jax.custom_batching.custom_vmap(fn)

  @mapped_fn.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size
    leaves, treedef = jax.tree.flatten(list(args))
    flags = jax.tree.leaves(list(in_batched))

    def one(mapped):
      it = iter(mapped)
      return fn(*jax.tree.unflatten(treedef, [next(it) if b else x for x, b in zip(leaves, flags)]))

    out = jax.lax.map(one, [x for x, b in zip(leaves, flags) if b])
    return out, jax.tree.map(lambda _: True, out)

  return mapped_fn


def _mapped_eval(model: ResNetModel, metric_fn: Callable[..., Any], params: PyTree, batch: tuple) -> Any:
  return _one_model_at_a_time(functools.partial(_calibrated_eval, model, metric_fn))(params, batch)


def make_eval_fn(model: ResNetModel, metric_fn: Callable[..., Any], *,
                 map_over_models: bool = True) -> Callable[[PyTree, tuple], Any]:
  """`eval_fn(params, batch)` for `bmerge.preview`: statistics from a calibration batch, then `metric_fn`.

  With `batch = (calibration_x, x, *targets)`, returns `metric_fn(model.apply_with(params, s, x), *targets)` where
  s = `model.statistics(params, calibration_x)` are the BatchNorm statistics of *these* params on the calibration
  inputs. Under `jax.vmap` over a chunk of merged params each merged model gets its own statistics.

  Args:
    model: a `ResNetModel`.
    metric_fn: `metric_fn(logits [N, C], *targets) -> metric`, e.g. `accuracies` with targets (y, membership).
    map_over_models: under `jax.vmap` (as `bmerge.preview` applies it to a chunk of merged models) evaluate the
      models one after the other with `lax.map`, inside the same compiled call: on a CPU, XLA runs convolutions
      batched over a leading axis of kernels (grouped convolutions) slower per model than one model after the
      other. Pass False where batching over models pays (accelerators, large chunks).

  Returns:
    A `functools.partial` (hashable; its bound arguments identify the model and the metric).

  Example:
    >>> model = make(width=0.25, blocks_per_stage=1)  # ResNet-8, to keep the example fast
    >>> params = model.init(jax.random.key(0), (8, 8, 1))
    >>> x, y = jnp.ones((4, 8, 8, 1)), jnp.array([0, 1, 2, 3])
    >>> eval_fn = make_eval_fn(model, accuracies)
    >>> jax.jit(eval_fn)(params, (x, x, y, jax.nn.one_hot(y % 2, 2))).shape  # overall accuracy, then one per task
    (3,)
  """
  if not isinstance(model, ResNetModel):
    raise TypeError(f"`model` must be a ResNetModel (from `make`), got {type(model).__name__}.")
  if not callable(metric_fn):
    raise TypeError("`metric_fn` must be callable: metric_fn(logits, *targets).")
  return functools.partial(_mapped_eval if map_over_models else _calibrated_eval, model, metric_fn)


def mean_cross_entropy(model: ResNetModel, params: PyTree, batch: tuple) -> jax.Array:
  """Training loss of a minibatch batch = (x [B, ...], y [B]): mean -log softmax(apply(params, x))[y] (batch BN).

  Bind the model for `bmerge.fit`: `functools.partial(mean_cross_entropy, model)` is a `loss_fn(params, batch)`.

  Args:
    model: a `ResNetModel`.
    params: its params.
    batch: (x [B, ...], y [B] int labels).

  Returns:
    The scalar mean cross-entropy.

  Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> model = resnet.make(width=0.25, blocks_per_stage=1)                   # ResNet-8, 10 classes
    >>> params = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0), (8, 8, 1)))   # zero logits
    >>> loss_fn = jax.jit(functools.partial(resnet.mean_cross_entropy, model))
    >>> round(float(loss_fn(params, (jnp.ones((2, 8, 8, 1)), jnp.array([0, 3])))), 4)   # log 10
    2.3026
  """
  x, y = batch
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y))


def task_cross_entropies(model: ResNetModel, params: PyTree, batch: tuple) -> jax.Array:
  """[T] per-task mean cross-entropies of one multitask minibatch batch = (x [B, ...], y [B], membership [B, T]).

  loss_t = sum_i m_it CE_i / sum_i m_it, from one training-mode pass over the whole batch, so BatchNorm normalises
  with the statistics of all tasks' examples together, as multitask training on mixed minibatches does; an example
  of a class shared by two tasks counts in both (`bmerge.data.task_membership`). With sum(alpha) = 1,
  alpha . task_cross_entropies is the weighted multitask loss (paper Eq. 1): bind the model,
  `functools.partial(task_cross_entropies, model)`, for `bmerge.exact.joint_train`.

  Args:
    model: a `ResNetModel`.
    params: its params.
    batch: (x [B, ...], y [B], membership [B, T]), membership 1 where example i belongs to task t.

  Returns:
    [T] per-task mean cross-entropies (0 for a task without examples in the batch).

  Example:
    >>> import functools, jax, jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> model = resnet.make(width=0.25, blocks_per_stage=1)                   # ResNet-8, 10 classes
    >>> params = jax.eval_shape(lambda key: model.init(key, (8, 8, 1)), jax.random.key(0))   # shapes only
    >>> batch = (jnp.ones((3, 8, 8, 1)), jnp.array([0, 1, 1]), jnp.array([[1, 0], [0, 1], [0, 1]]))   # T = 2
    >>> jax.eval_shape(functools.partial(resnet.task_cross_entropies, model), params, batch).shape
    (2,)
  """
  x, y, membership = batch
  ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y)  # [B]
  membership = membership.astype(ce.dtype)
  return (ce @ membership) / jnp.maximum(jnp.sum(membership, axis=0), 1.0)


def accuracies(logits: jax.Array, y: jax.Array, membership: jax.Array) -> jax.Array:
  """[overall accuracy, accuracy on the examples of task 1, ..., task T] ([1 + T]).

  acc_t = sum_i m_it [argmax logits_i = y_i] / sum_i m_it. `membership` [N, T] is 1 where example i belongs to
  task t (`bmerge.data.task_membership`; a class shared by two tasks counts for both). A task without examples gets
  accuracy 0.

  Args:
    logits: [N, C].
    y: [N] int labels.
    membership: [N, T].

  Returns:
    [1 + T].

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge.models import resnet
    >>> logits = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])            # predicts 0, 0, 1
    >>> resnet.accuracies(logits, jnp.array([0, 1, 1]), jnp.array([[1, 0], [0, 1], [0, 1]])).tolist()
    [0.6666666865348816, 1.0, 0.5]
  """
  correct = (jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)
  membership = membership.astype(logits.dtype)
  per_task = (correct @ membership) / jnp.maximum(jnp.sum(membership, axis=0), 1.0)
  return jnp.concatenate([jnp.mean(correct)[None], per_task])
