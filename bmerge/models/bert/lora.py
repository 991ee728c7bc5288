"""LoRA adapters on the BERT encoder, the trainable / frozen split, and the multitask losses and accuracies.

LoRA (Hu et al., 2022). `add_lora` swaps chosen projections (query and value by default; optionally key, the attention
output and the FFN) of chosen layers for `LoRALinear`: an `nnx.LoRALinear` whose adapter `nnx.LoRAParam`s
`lora_a` [in, r] and `lora_b` [r, out] add `scale * x @ lora_a @ lora_b` to the frozen `x @ kernel + bias`, with
scale = alpha / r as in PEFT. `lora_b` starts at zero, so a fresh adapter is exactly the base model.

Trainable and frozen. Only the LoRA and head parameters are trained and merged (`TRAINABLE` is the NNX filter);
`split(model)` returns them as a flat dict {"encoder.layers.5.attention.query.lora.lora_a": array, ...,
"head.kernel": array} together with a pure `apply(trainable, batch) -> logits` that holds the frozen base. One frozen
base serves every task: a task is just its trainable dict, and a merge rule maps T trainable dicts to merged ones.
Merging acts in the (A, B) parameter space, as the paper merges LoRA weights (its GEMMA-2B rows, Sec. 4): a merged
adapter is (sum_t alpha_t A_t, sum_t alpha_t B_t) for simple averaging, and its update (sum alpha_t B_t)(sum alpha_t
A_t) is NOT the average sum_t alpha_t B_t A_t of the task updates (a product of averages is not an average of
products); only when all tasks share A (or B) do the two agree.

With LoRA only in the top layers, `split(model, start_layer=k)` gives an `apply` that runs only the top layers and the
head on the `Hidden` states that `hidden_states(model, tokens, k)` cached (same logits as the full pass).

`apply` is a `jax.tree_util.Partial` whose pytree leaves are the frozen arrays it needs. Passed as an argument of a
jitted function they are ordinary inputs; closed over by a jitted function they become constants of the compiled
program (correct, but compiling a 90 MB constant takes seconds).

References:
  Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. LoRA: low-rank adaptation of large language models. ICLR 2022.
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eq. 1; Sec. 4, the LoRA rows of Fig. 7).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmerge import _checks
from bmerge.models.bert.model import (Bert, Classifier, _build, _encoder, _parts, flatten_state, unflatten_state)

__all__ = ["LoRALinear", "Split", "TARGETS", "TRAINABLE", "add_lora", "cross_entropy", "frozen_layers",
           "merge_trainable", "split", "task_accuracies", "task_losses"]

# ----------------------------------------------------------------------------------------------------------------
# LoRA.


class LoRALinear(nnx.LoRALinear):
  """`nnx.LoRALinear` with PEFT's scale: y = x @ kernel + bias + lora_scale * x @ lora_a @ lora_b.

  `lora_a` [in, r] and `lora_b` [r, out] are `nnx.LoRAParam`s (lora_b zero-initialised); `kernel` and `bias` are
  the frozen `nnx.Param`s of the linear layer it replaces, at the same state paths.
  """

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int, lora_scale: float = 1.0, **kwargs):
    super().__init__(in_features, out_features, lora_rank=lora_rank, **kwargs)
    self.lora_scale = float(lora_scale)

  def __call__(self, x: jax.Array) -> jax.Array:  # pylint: disable=arguments-differ
    return nnx.Linear.__call__(self, x) + self.lora_scale * self.lora(x)


TARGETS = {  # name -> the projection's attribute path inside a `Layer`
    "query": ("attention", "query"),
    "key": ("attention", "key"),
    "value": ("attention", "value"),
    "attention_output": ("attention", "output"),
    "intermediate": ("intermediate",),
    "output": ("output",),
}


def _layer_indices(layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
  if layers is None:
    return list(range(num_layers))
  out = []
  for i in layers:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -num_layers <= i < num_layers:
      raise ValueError(f"`layers` must hold layer indices in [-{num_layers}, {num_layers}), got {list(layers)}.")
    out.append(int(i) % num_layers)
  if len(set(out)) != len(out) or not out:
    raise ValueError(f"`layers` must name distinct layers (at least one), got {list(layers)}.")
  return sorted(out)


def add_lora(model: Union[Bert, Classifier], rank: int, *, rngs: nnx.Rngs, alpha: Optional[float] = None,
             targets: Sequence[str] = ("query", "value"), layers: Optional[Sequence[int]] = None):
  """Adds LoRA adapters to chosen projections of chosen layers, in place (NNX model surgery); returns `model`.

  Each target `nnx.Linear` becomes a `LoRALinear` that keeps its kernel and bias (the same arrays) and adds
  `(alpha / rank) x @ lora_a @ lora_b`, lora_a [in, rank] He-uniform from `rngs`, lora_b [rank, out] zero: the
  adapted model computes exactly what the base computes until lora_b moves.

  Args:
    model: a `Bert` or a `Classifier`.
    rank: the LoRA rank r >= 1.
    rngs: the `nnx.Rngs` that draws lora_a (use the same seed for every task, so tasks share their starting point).
    alpha: PEFT's lora_alpha; the update is scaled by alpha / rank (default: alpha = rank, scale 1).
    targets: names from `TARGETS`: 'query', 'key', 'value', 'attention_output', 'intermediate', 'output'.
    layers: layer indices to adapt (negative counts from the top, e.g. (-2, -1) for the top two); None: all.

  Returns:
    `model`, now with `nnx.LoRAParam`s.

  Example:
    >>> from flax import nnx
    >>> from bmerge.models import bert
    >>> config = bert.Config(vocab_size=8, hidden_size=8, num_layers=3, num_heads=2, intermediate_size=8,
    ...                      max_position_embeddings=8)
    >>> model = bert.Classifier(bert.from_hf_weights(config, bert.random_hf_weights(config)), 2, rngs=nnx.Rngs(1))
    >>> _ = bert.add_lora(model, 4, rngs=nnx.Rngs(2), layers=(-1,))
    >>> sorted(bert.split(model).trainable)
    ['encoder.layers.2.attention.query.lora.lora_a', 'encoder.layers.2.attention.query.lora.lora_b', \
'encoder.layers.2.attention.value.lora.lora_a', 'encoder.layers.2.attention.value.lora.lora_b', 'head.bias', \
'head.kernel']
  """
  encoder = _encoder(model)
  _checks.integer(rank, "rank")
  alpha = float(rank if alpha is None else alpha)
  if not math.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"`alpha` must be finite and > 0, got {alpha!r}.")
  if isinstance(targets, str) or not targets or any(t not in TARGETS for t in targets):
    raise ValueError(f"`targets` must be a non-empty sequence of names from {tuple(TARGETS)}, got {targets!r}.")
  for i in _layer_indices(layers, len(encoder.layers)):
    for target in dict.fromkeys(targets):
      *parents, name = TARGETS[target]
      parent = functools.reduce(getattr, parents, encoder.layers[i])
      old = getattr(parent, name)
      if isinstance(old, nnx.LoRALinear):
        raise ValueError(f"layer {i} {target!r} already has a LoRA adapter.")
      kernel, bias = old.kernel[...], old.bias[...] if old.bias is not None else None
      new = LoRALinear(old.in_features, old.out_features, lora_rank=int(rank), lora_scale=alpha / rank,
                       use_bias=old.use_bias, dtype=old.dtype, param_dtype=old.param_dtype, precision=old.precision,
                       kernel_init=lambda *_, k=kernel: k, bias_init=lambda *_, b=bias: b, rngs=rngs)
      setattr(parent, name, new)
  return model


# ----------------------------------------------------------------------------------------------------------------
# Trainable / frozen split and the pure forward pass.

TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))  # the filter of what is trained, merged and exported


def frozen_layers(model: Union[Bert, Classifier]) -> int:
  """The number of bottom layers with no LoRA parameter (all layers when nothing adapts): what `hidden_states` can
  cache."""
  encoder = _encoder(model)
  for i, layer in enumerate(encoder.layers):
    if jax.tree.leaves(nnx.state(layer, nnx.LoRAParam)):
      return i
  return len(encoder.layers)


class Split(NamedTuple):
  """The trainable parameters and the pure forward pass that holds the frozen base."""

  apply: jax.tree_util.Partial  # apply(trainable, batch) -> logits [B, C]; its pytree leaves are the frozen arrays
  trainable: dict  # {"encoder.layers.5.attention.query.lora.lora_a": [in, r], ..., "head.kernel": [H, C], ...}


def split(model: Classifier, *, start_layer: int = 0) -> Split:
  """Splits a `Classifier` into its trainable LoRA + head parameters and a pure `apply(trainable, batch)`.

  This is `nnx.split(model, TRAINABLE, ...)` with the trainable state flattened to string keys (a plain dict that
  the merge rules, `bmerge.curvature`, optax and checkpoints take as it is) and the frozen state closed into `apply`.
  Every task's trainable dict goes through the same `apply`: the base is shared.

  Args:
    model: a `Classifier` (usually after `add_lora`).
    start_layer: k > 0 runs only layers k.. and the head on `Hidden` states cached by `hidden_states(model, tokens,
      k)`; every LoRA layer must be >= k (`frozen_layers(model)` is the largest valid k).

  Returns:
    `Split(apply, trainable)`: `apply(trainable, batch) -> logits [B, C]` with `batch` a `Tokens` (k = 0) or a
    `Hidden` (k > 0), equal to `model(batch, k)`.

  Example:
    >>> from flax import nnx
    >>> from bmerge.models import bert
    >>> config = bert.Config(vocab_size=8, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8,
    ...                      max_position_embeddings=8)
    >>> model = bert.Classifier(bert.from_hf_weights(config, bert.random_hf_weights(config)), 3, rngs=nnx.Rngs(1))
    >>> model = bert.add_lora(model, 2, rngs=nnx.Rngs(2))
    >>> apply, trainable = bert.split(model)
    >>> tokens = bert.Tokens(np.ones((3, 5), np.int32), np.ones((3, 5), np.int32))
    >>> apply(trainable, tokens).shape  # in a jitted loss, pass `apply` in as an argument (a pytree)
    (3, 3)
  """
  if not isinstance(model, Classifier):
    raise TypeError(f"`model` must be a bmerge.models.bert.Classifier, got {type(model).__name__}.")
  num_layers = len(model.encoder.layers)
  _checks.integer(start_layer, "start_layer", minimum=0, maximum=num_layers)
  if start_layer > frozen_layers(model):
    raise ValueError(f"`start_layer` = {start_layer} would freeze LoRA parameters of layer {frozen_layers(model)}; "
                     f"expected start_layer <= frozen_layers(model) = {frozen_layers(model)}.")
  stack, frozen, trainable = _build(_parts(model, int(start_layer), num_layers, start_layer == 0, True),
                                    start_layer == 0, True)
  return Split(jax.tree_util.Partial(stack, frozen), trainable)


def merge_trainable(model: Classifier, trainable: dict) -> None:
  """Writes a trainable dict (e.g. one merged model, or a PEFT import) into `model`'s LoRA and head parameters."""
  if not isinstance(model, Classifier):
    raise TypeError(f"`model` must be a bmerge.models.bert.Classifier, got {type(model).__name__}.")
  state = nnx.state(model, TRAINABLE)
  want = flatten_state(nnx.to_pure_dict(state))
  if set(want) != set(trainable):
    raise ValueError(f"`trainable` keys differ from the model's: missing {sorted(set(want) - set(trainable))[:4]}, "
                     f"unexpected {sorted(set(trainable) - set(want))[:4]}.")
  for key, value in trainable.items():
    if tuple(np.shape(value)) != tuple(want[key].shape):
      raise ValueError(f"`trainable[{key!r}]` has shape {tuple(np.shape(value))}; the model's is {want[key].shape}.")
  nnx.replace_by_pure_dict(state, unflatten_state({k: jnp.asarray(v, want[k].dtype) for k, v in trainable.items()}))
  nnx.update(model, state)


# ----------------------------------------------------------------------------------------------------------------
# Multitask classification: the losses that training and joint training minimise, the accuracies a preview reports.


def cross_entropy(apply: jax.tree_util.Partial, trainable: dict, batch: tuple) -> jax.Array:
  """One task's minibatch loss: the mean cross-entropy -(1/B) sum_i log softmax(apply(trainable, x))[y_i].

  Args:
    apply: `split(...).apply`.
    trainable: the trainable dict (LoRA + head).
    batch: `(inputs, labels)`: `Tokens` or `Hidden` [B, ...] and integer labels [B].

  Returns:
    A scalar; `functools.partial(cross_entropy, apply)` is the `loss_fn(params, batch)` of `bmerge.fit`.
  """
  inputs, labels = batch
  log_p = jax.nn.log_softmax(apply(trainable, inputs))
  return -jnp.mean(jnp.take_along_axis(log_p, jnp.asarray(labels, jnp.int32)[:, None], axis=-1))


def task_losses(apply: jax.tree_util.Partial, trainable: dict, batch: tuple) -> jax.Array:
  """Every task's mean cross-entropy [T], from `batch = (inputs, labels)` with a leading task axis [T, B, ...].

  `functools.partial(task_losses, apply)` is the `task_losses(params, batch)` of `bmerge.exact.joint_train`: each
  step sees B examples of every task and minimises sum_t alpha_t loss_t (paper Eq. 1).
  """
  return jax.vmap(lambda b: cross_entropy(apply, trainable, b))(batch)


def task_accuracies(apply: jax.tree_util.Partial, trainable: dict, batch: tuple) -> jax.Array:
  """[1 + T] test accuracies: column 0 the mean of the T per-task accuracies, then each task's accuracy.

    acc_t = sum_i m_it [argmax_c logits_ic = y_i] / sum_i m_it,    overall = (1/T) sum_t acc_t

  Every task weighs the same in the overall accuracy whatever its number of test examples (as the paper evaluates
  its RoBERTa tasks, App. B.5). This is the `eval_fn` layout [1 + T] of `bmerge.compare` and `bmerge.preview`.

  Args:
    apply: `split(...).apply`.
    trainable: the trainable dict (one merged model).
    batch: `(inputs, labels, membership)`: `Tokens` or `Hidden` [N, ...], labels [N], membership [N, T] with
      membership[i, t] = 1 when example i is a test example of task t, else 0.

  Returns:
    float32 [1 + T].

  Example:
    >>> from flax import nnx
    >>> from bmerge.models import bert
    >>> config = bert.Config(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
    ...                      max_position_embeddings=8)
    >>> apply, trainable = bert.split(bert.Classifier(bert.from_hf_weights(config, bert.random_hf_weights(config)), 2,
    ...                                               rngs=nnx.Rngs(0)))
    >>> tokens = bert.Tokens(np.arange(12, dtype=np.int32).reshape(4, 3) % 8, np.ones((4, 3), np.int32))
    >>> always_1 = {**trainable, "head.kernel": np.zeros((8, 2)), "head.bias": np.array([0.0, 1.0])}
    >>> labels = np.array([1, 0, 1, 1])
    >>> membership = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)   # task 1: rows 0, 2; task 2: rows 1, 3
    >>> jax.jit(bert.task_accuracies)(apply, always_1, (tokens, labels, membership)).tolist()
    [0.75, 1.0, 0.5]
  """
  inputs, labels, membership = batch
  correct = (jnp.argmax(apply(trainable, inputs), axis=-1) == jnp.asarray(labels)).astype(jnp.float32)
  membership = jnp.asarray(membership, jnp.float32)
  per_task = (correct @ membership) / jnp.maximum(jnp.sum(membership, axis=0), 1.0)
  return jnp.concatenate([jnp.mean(per_task)[None], per_task])
