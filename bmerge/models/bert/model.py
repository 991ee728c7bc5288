"""The BERT encoder in Flax NNX, its classifier, and pure forward passes over its parts.

The encoder is the post-LayerNorm BERT of Devlin et al. (2019): token + position + token-type embeddings and a
LayerNorm, then `num_layers` blocks of

    a = LayerNorm(h + Attention(h) W_o),    h' = LayerNorm(a + GELU(a W_1) W_2),

with `Linear` kernels in the NNX convention y = x @ kernel + bias, kernel [in, out] (a PyTorch / Hugging Face
`weight` is [out, in]; `bmerge.models.bert.params` maps and transposes those). `Classifier` puts a linear head on the
mean-pooled (not normalised) last hidden states,

    logits = W_c m + b_c,    m = sum_l mask_l h_l / max(sum_l mask_l, 1e-9).

Pure passes. A model's parts (the embeddings, each layer, the head) are each split by NNX into a graphdef and two
state dicts: the frozen one and the trainable one (LoRA and head, `bmerge.models.bert.lora`). `_Stack` merges them
back and runs consecutive parts, so the same compiled function serves any trainable dict. When only the top layers
adapt, everything below them is a fixed function of the input: `hidden_states(model, tokens, k)` runs the embeddings
and the bottom k layers once for a data set, and the top layers then run on those cached `Hidden` states (same logits
as the full pass).

Example:
  >>> from flax import nnx
  >>> from bmerge.models import bert
  >>> config = bert.Config(vocab_size=8, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8,
  ...                      max_position_embeddings=8)
  >>> encoder = bert.from_hf_weights(config, bert.random_hf_weights(config))  # or bert.Bert(config, rngs=...)
  >>> model = bert.Classifier(encoder, 3, rngs=nnx.Rngs(1))
  >>> tokens = bert.Tokens(np.ones((4, 5), np.int32), np.ones((4, 5), np.int32))
  >>> model(tokens).shape
  (4, 3)
  >>> cache = bert.hidden_states(model, tokens, 1)  # the embeddings and layer 0, once
  >>> bool(np.allclose(model(cache, 1), model(tokens), atol=1e-5))
  True

References:
  Devlin, Chang, Lee, Toutanova. BERT: pre-training of deep bidirectional transformers. NAACL 2019.
  Reimers, Gurevych. Sentence-BERT: sentence embeddings using Siamese BERT-networks. EMNLP 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmerge import _checks

__all__ = ["Attention", "Bert", "Classifier", "Config", "Embeddings", "Hidden", "Layer", "Tokens", "flatten_state",
           "hidden_states", "mean_pool", "normalize", "unflatten_state"]

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # Hugging Face "gelu" is the exact erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


class Config(NamedTuple):
  """The architecture, read from (and written to) a Hugging Face `config.json`."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0

  @classmethod
  def from_hf(cls, hf: dict) -> "Config":
    """From the dict of a Hugging Face BERT `config.json`."""
    if hf.get("model_type", "bert") != "bert":
      raise ValueError(f"config.json has model_type {hf.get('model_type')!r}; only 'bert' models load here.")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"config.json has position_embedding_type {hf['position_embedding_type']!r}; only "
                       "'absolute' is implemented.")
    if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise ValueError(f"config.json has hidden_act {hf['hidden_act']!r}; expected one of {sorted(_ACTIVATIONS)}.")
    return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
               num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
               max_position_embeddings=hf.get("max_position_embeddings", 512),
               type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
               hidden_act=hf.get("hidden_act", "gelu"), pad_token_id=hf.get("pad_token_id", 0))

  def to_hf(self) -> dict:
    """The dict of a Hugging Face `config.json` for this architecture (model_type 'bert')."""
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps, "hidden_act": self.hidden_act, "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute"}


class Tokens(NamedTuple):
  """A batch of tokenised texts (one segment each, token type 0), padded on the right."""

  input_ids: np.ndarray  # [N, L] int32
  attention_mask: np.ndarray  # [N, L] int32: 1 for real tokens, 0 for padding


class Hidden(NamedTuple):
  """The hidden states after the bottom layers (`hidden_states`), the input of `split(..., start_layer=k).apply`."""

  hidden: np.ndarray  # [N, L, hidden_size] float32
  attention_mask: np.ndarray  # [N, L] int32


# ----------------------------------------------------------------------------------------------------------------
# Modules. Attribute names are the NNX state paths that `bmerge.models.bert.params.HF_TABLE` maps.


def _layer_norm(config: Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # The two-pass variance: E[x^2] - E[x]^2 loses digits in float32 where |mean| >> std.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):
  """input_ids [B, L] -> LayerNorm(word + position + token-type-0 embeddings) [B, L, H]."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs)
    self.position = nnx.Embed(config.max_position_embeddings, config.hidden_size, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, config.hidden_size, rngs=rngs)
    self.norm = _layer_norm(config, rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[-1]
    h = self.word(input_ids) + self.position.embedding[:length] + self.token_type.embedding[0]
    return self.norm(h)


class Attention(nnx.Module):
  """Multi-head self-attention with the residual and post-LayerNorm: LayerNorm(h + softmax(q k^T / sqrt(d)) v W_o)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    if config.hidden_size % config.num_heads:
      raise ValueError(f"hidden_size {config.hidden_size} must be a multiple of num_heads {config.num_heads}.")
    width = config.hidden_size
    self.num_heads = config.num_heads
    self.query = nnx.Linear(width, width, rngs=rngs)
    self.key = nnx.Linear(width, width, rngs=rngs)
    self.value = nnx.Linear(width, width, rngs=rngs)
    self.output = nnx.Linear(width, width, rngs=rngs)
    self.norm = _layer_norm(config, rngs)

  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    b, length, width = h.shape
    heads = lambda x: x.reshape(b, length, self.num_heads, width // self.num_heads)
    q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(width // self.num_heads)
    scores = jnp.where(mask[:, None, None, :].astype(bool), scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v).reshape(b, length, width)
    return self.norm(h + self.output(context))


class Layer(nnx.Module):
  """One transformer block: attention, then LayerNorm(a + act(a W_1) W_2)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.activation = config.hidden_act
    self.attention = Attention(config, rngs=rngs)
    self.intermediate = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
    self.output = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)
    self.norm = _layer_norm(config, rngs)

  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    a = self.attention(h, mask)
    return self.norm(a + self.output(_ACTIVATIONS[self.activation](self.intermediate(a))))


class Bert(nnx.Module):
  """The encoder: `(input_ids [B, L], attention_mask [B, L]) -> last hidden states [B, L, H]`.

  `Bert(config, rngs=nnx.Rngs(0))` initialises it randomly; `load` and `from_hf_weights` fill it from Hugging Face
  weights.
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    h = self.embeddings(input_ids)
    for layer in self.layers:
      h = layer(h, attention_mask)
    return h


class Classifier(nnx.Module):
  """`encoder` + a linear head on the mean-pooled last hidden states: `batch -> logits [B, num_classes]`.

  `batch` is `Tokens`, or the `Hidden` states after the bottom `start_layer` layers (`hidden_states`).
  The head is N(0, 0.02^2)-initialised, as BERT's classifiers.
  """

  def __init__(self, encoder: Bert, num_classes: int, *, rngs: nnx.Rngs):
    _checks.integer(num_classes, "num_classes")
    self.encoder = encoder
    self.head = nnx.Linear(encoder.config.hidden_size, int(num_classes),
                           kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, batch: Union[Tokens, Hidden], start_layer: int = 0) -> jax.Array:
    if start_layer == 0:
      _check_batch(batch, Tokens, 0)
      h = self.encoder.embeddings(batch.input_ids)
    else:
      _check_batch(batch, Hidden, start_layer)
      h = batch.hidden
    for layer in self.encoder.layers[start_layer:]:
      h = layer(h, batch.attention_mask)
    return self.head(mean_pool(h, batch.attention_mask))


def _check_batch(batch: Any, kind: type, start_layer: int) -> None:
  if not isinstance(batch, kind):
    raise TypeError(f"`batch` must be a bmerge.models.bert.{kind.__name__} for start_layer = {start_layer} "
                    f"({'token ids' if kind is Tokens else 'the cached hidden states of hidden_states()'}), "
                    f"got {type(batch).__name__}.")


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_l mask_l h_l / max(sum_l mask_l, 1e-9): hidden [B, L, H], mask [B, L] -> [B, H] (sentence-transformers)."""
  m = mask[..., None].astype(hidden.dtype)
  return jnp.sum(hidden * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||_2, 1e-12) along the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Flat string keys <-> NNX pure dicts (list indices are ints there).


def _path(key: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def flatten_state(pure: dict, prefix: str = "") -> dict:
  """A nested pure dict (`nnx.State.to_pure_dict()`) -> {"a.b.0.c": leaf} (keys joined with '.', `prefix` first)."""
  flat = nnx.traversals.flatten_mapping(pure)
  head = prefix + "." if prefix else ""
  return {head + ".".join(str(p) for p in path): leaf for path, leaf in flat.items()}


def unflatten_state(flat: dict, prefix: str = "") -> dict:
  """The inverse of `flatten_state` for the keys under `prefix` (all keys when `prefix` is '')."""
  head = prefix + "." if prefix else ""
  return nnx.traversals.unflatten_mapping({_path(k[len(head):]): v for k, v in flat.items() if k.startswith(head)})


# ----------------------------------------------------------------------------------------------------------------
# Pure passes over consecutive parts of a model (the frozen state held apart from the trainable LoRA and head).


def _encoder(model: Union[Bert, Classifier]) -> Bert:
  if isinstance(model, Classifier):
    return model.encoder
  if isinstance(model, Bert):
    return model
  raise TypeError(f"`model` must be a bmerge.models.bert.Bert or Classifier, got {type(model).__name__}.")


@dataclasses.dataclass(frozen=True)
class _Stack:
  """[embeddings] -> layers -> [mean pool + head] over NNX parts, each merged from (graphdef, frozen, trainable).

  Hashable (graphdefs are), so it is the static function of a `Partial` and of jitted calls.
  """

  names: tuple  # flat-key prefix of each part: "encoder.embeddings", "encoder.layers.4", ..., "head"
  graphdefs: tuple  # the NNX graphdef of each part
  embed: bool  # the first part is the embeddings (the input is `Tokens`), else the input is `Hidden`
  head: bool  # the last part is the head (logits), else the last hidden states are returned

  def __call__(self, frozen: dict, trainable: dict, batch: Union[Tokens, Hidden]) -> jax.Array:
    modules = [nnx.merge(g, frozen[name], unflatten_state(trainable, name)) for name, g in zip(self.names,
                                                                                                 self.graphdefs)]
    if self.embed:
      _check_batch(batch, Tokens, 0)
      h = modules.pop(0)(batch.input_ids)
    else:
      _check_batch(batch, Hidden, "k > 0")
      h = batch.hidden
    head = modules.pop() if self.head else None
    for layer in modules:
      h = layer(h, batch.attention_mask)
    return h if head is None else head(mean_pool(h, batch.attention_mask))


def _parts(model: Classifier, start: int, stop: int, embed: bool, head: bool) -> list:
  encoder = model.encoder if isinstance(model, Classifier) else model
  parts = [("encoder.embeddings", encoder.embeddings)] if embed else []
  parts += [(f"encoder.layers.{i}", encoder.layers[i]) for i in range(start, stop)]
  return parts + ([("head", model.head)] if head else [])


def _build(parts: list, embed: bool, head: bool) -> tuple[_Stack, dict, dict]:
  names, graphdefs, frozen, trainable = [], [], {}, {}
  for name, module in parts:
    graphdef, train, rest = nnx.split(module, nnx.Param if name == "head" else nnx.LoRAParam, ...)
    names.append(name)
    graphdefs.append(graphdef)
    frozen[name] = nnx.to_pure_dict(rest)
    trainable.update(flatten_state(nnx.to_pure_dict(train), name))
  return _Stack(tuple(names), tuple(graphdefs), embed, head), frozen, trainable


# ----------------------------------------------------------------------------------------------------------------
# Batched passes over a data set.


@functools.partial(jax.jit, static_argnums=0)
def _run(stack: _Stack, frozen: dict, batch):
  return stack(frozen, {}, batch)


def _chunked(fn, batch, batch_size: int) -> np.ndarray:
  """fn over consecutive chunks of `batch_size` rows (the last one zero-padded: one compiled shape), concatenated."""
  _checks.integer(batch_size, "batch_size")
  n = len(batch.attention_mask)
  if n == 0:
    raise ValueError("the data set is empty; expected at least one text.")
  outs = []
  for start in range(0, n, batch_size):
    chunk = jax.tree.map(lambda a: np.asarray(a)[start:start + batch_size], batch)
    pad = batch_size - len(chunk.attention_mask) if n > batch_size else 0
    chunk = jax.tree.map(lambda a: np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), chunk)
    outs.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(outs)


def hidden_states(model: Union[Bert, Classifier], tokens: Tokens, num_layers: int, *, batch_size: int = 64) -> Hidden:
  """The hidden states after the embeddings and the bottom `num_layers` layers, for a whole data set (a cache).

  With LoRA only in layers >= k, these are fixed: compute them once with k = `frozen_layers(model)`, then train
  and preview with `split(model, start_layer=k).apply` on them. float32 [N, L, H] (N L H 4 bytes of memory).

  Args:
    model: a `Bert` or `Classifier`.
    tokens: `Tokens` [N, L].
    num_layers: k, the number of bottom layers to run (0: the embeddings only).
    batch_size: rows per compiled call.

  Returns:
    `Hidden(hidden [N, L, H] float32 numpy, attention_mask [N, L])`.
  """
  encoder = _encoder(model)
  _check_batch(tokens, Tokens, 0)
  _checks.integer(num_layers, "num_layers", minimum=0, maximum=len(encoder.layers))
  stack, frozen, _ = _build(_parts(encoder, 0, int(num_layers), True, False), True, False)
  hidden = _chunked(lambda chunk: _run(stack, frozen, chunk), tokens, batch_size)
  return Hidden(hidden.astype(np.float32), np.asarray(tokens.attention_mask))
