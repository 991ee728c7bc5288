"""Safetensors in and out: PEFT LoRA adapters (and per-task Fisher / Hessians) in, merged models out.

For people whose finetuning ran elsewhere (PyTorch + PEFT) and who want a preview, and for exporting the model a
preview recommends.

PEFT layout (Hugging Face `peft`, LoRA on a `BertModel`): `adapter_model.safetensors` holds, per adapted linear layer,

    base_model.model.encoder.layer.{i}.attention.self.query.lora_A.weight   [r, in]
    base_model.model.encoder.layer.{i}.attention.self.query.lora_B.weight   [out, r]

and `adapter_config.json` holds r and lora_alpha; the layer computes W x + b + (lora_alpha / r) B A x (lora_alpha /
sqrt(r) with use_rslora). In bmerge's NNX convention (y = x @ kernel) the same layer is x @ kernel + bias + scale *
x @ lora_a @ lora_b with kernel = W^T, lora_a = A^T [in, r], lora_b = B^T [r, out]: every matrix is transposed once,
by the key table `HF_TABLE` of `bmerge.models.bert.params`. bmerge's classification head (on the mean-pooled states) is
stored as PEFT stores a `modules_to_save` classifier, `base_model.model.classifier.weight` [C, H] and `.bias` [C].

Posteriors from elsewhere. A per-task diagonal Fisher or IVON Hessian saved under the SAME keys and layout as the
adapter (a [r, in] precision for each lora_A.weight, ...) imports as `DiagGaussian(mean=adapter, precision=...)`, the
input of `bmerge.merge.hessian_weighted` (the paper's Eq. 10).

Export. `export_adapter` writes a trainable dict (one task, or one merged model) back in the PEFT layout;
`export_fused` folds it into the base weights, W' = W + scale B A (kernel' = kernel + scale lora_a @ lora_b), a plain
Hugging Face BERT folder that `bmerge.models.bert.load` (or `transformers`) reads; `export_merged` does both for every
alpha of a merged grid. Merging acts on (A, B), not on B A: see `bmerge.models.bert`.

Checked against peft itself (0.21.2, with PyTorch; the recorder is tests/data/record_peft.py): an adapter that peft
wrote for a BERT imports here and gives peft's logits and hidden states, and an adapter `export_adapter` wrote loads in
peft (every tensor in place) and gives bmerge's logits.

Example:
  A tiny BERT with LoRA on every layer: its trainable dict written as a PEFT adapter and read back.

  >>> import tempfile
  >>> import numpy as np
  >>> from flax import nnx
  >>> from bmerge import interop
  >>> from bmerge.models import bert
  >>> config = bert.Config(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
  ...                      max_position_embeddings=8)
  >>> model = bert.Classifier(bert.from_hf_weights(config, bert.random_hf_weights(config)), 2, rngs=nnx.Rngs(1))
  >>> model = bert.add_lora(model, 2, rngs=nnx.Rngs(2))
  >>> trainable = bert.split(model).trainable
  >>> with tempfile.TemporaryDirectory() as folder:
  ...   _ = interop.export_adapter(folder, model, trainable)
  ...   back = interop.import_adapter(folder, model)
  >>> sorted(back) == sorted(trainable), all(np.allclose(back[k], trainable[k]) for k in trainable)
  (True, True)
  >>> [(m.layer, m.target, m.rank) for m in interop.lora_modules(model)]
  [(0, 'query', 2), (0, 'value', 2)]

References:
  Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. LoRA: low-rank adaptation of large language models. ICLR 2022.
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024 (Eq. 10; the LoRA rows of Sec. 4).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx

from bmerge.models import bert
from bmerge.posteriors import DiagGaussian

PathLike = Union[str, pathlib.Path]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PRECISION = "adapter_precision.safetensors"  # bmerge's name for a Fisher / Hessian under the adapter's keys
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentence_bert_config.json", "modules.json")
# bmerge target -> Hugging Face module name inside a layer, e.g. 'query' -> 'attention.self.query' (from the key table)
_HF_TARGETS = {t: bert.to_hf_key(f"encoder.layers.0.{'.'.join(p)}.kernel")[0][len("encoder.layer.0."):-len(".weight")]
               for t, p in bert.TARGETS.items()}


class LoRAModule(NamedTuple):
  """One adapted linear layer of a `Classifier`."""

  layer: int
  target: str  # a name of `bmerge.models.bert.TARGETS`
  rank: int
  scale: float  # alpha / rank


def lora_modules(model: bert.Classifier) -> list[LoRAModule]:
  """The model's adapted layers, in layer order."""
  out = []
  for i, layer in enumerate(model.encoder.layers):
    for target, path in bert.TARGETS.items():
      module = layer
      for name in path:
        module = getattr(module, name)
      if isinstance(module, bert.LoRALinear):
        out.append(LoRAModule(i, target, int(module.lora.lora_a.shape[1]), module.lora_scale))
  return out


def _read(path: pathlib.Path) -> dict:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} does not exist.")
  return load_file(str(path))


def _strip(key: str) -> str:
  return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _peft_config(directory: pathlib.Path) -> dict:
  path = directory / ADAPTER_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{str(directory)!r} must be a PEFT adapter folder with {ADAPTER_CONFIG}; none there.")
  config = json.loads(path.read_text())
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{ADAPTER_CONFIG} has peft_type {config['peft_type']!r}; only 'LORA' imports.")
  for field, ok in (("use_dora", False), ("fan_in_fan_out", False)):
    if config.get(field, ok) != ok:
      raise NotImplementedError(f"{ADAPTER_CONFIG} sets {field} = {config[field]!r}; only {ok} is supported.")
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    raise NotImplementedError(f"{ADAPTER_CONFIG} sets rank_pattern / alpha_pattern; one r and lora_alpha for every "
                              "layer is supported.")
  if config.get("bias", "none") != "none":
    raise NotImplementedError(f"{ADAPTER_CONFIG} sets bias = {config['bias']!r}; only 'none' is supported.")
  return config


def _peft_scale(config: dict, rank: int) -> float:
  alpha = float(config.get("lora_alpha", 8))
  return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


def peft_modules(directory: PathLike) -> list[LoRAModule]:
  """The adapted layers of a PEFT adapter folder (from its tensor names, ranks and adapter_config.json)."""
  directory = pathlib.Path(directory)
  config = _peft_config(directory)
  tensors = _read(directory / ADAPTER_WEIGHTS)
  by_suffix = {v: k for k, v in _HF_TARGETS.items()}
  out = []
  for key, value in tensors.items():
    match = re.fullmatch(r"(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.lora_A\.weight", _strip(key))
    if match:
      if match.group(2) not in by_suffix:
        raise ValueError(f"{key!r}: bmerge's BERT has no adaptable module {match.group(2)!r}; expected one of "
                         f"{sorted(by_suffix)}.")
      rank = int(value.shape[0])
      out.append(LoRAModule(int(match.group(1)), by_suffix[match.group(2)], rank, _peft_scale(config, rank)))
  if not out:
    raise ValueError(f"{str(directory / ADAPTER_WEIGHTS)!r} holds no '...lora_A.weight' tensor.")
  return sorted(out, key=lambda m: (m.layer, list(bert.TARGETS).index(m.target)))


def add_peft_lora(model: bert.Classifier, directory: PathLike, *, rngs: nnx.Rngs) -> bert.Classifier:
  """Adds LoRA adapters shaped like a PEFT adapter folder's (same layers, projections, rank and scale), in place.

  Then `import_adapter(directory, model)` fills them. Returns `model`.
  """
  for module in peft_modules(directory):
    bert.add_lora(model, module.rank, alpha=module.scale * module.rank, targets=(module.target,),
                  layers=(module.layer,), rngs=rngs)
  return model


def _to_trainable(tensors: dict, model: bert.Classifier, source: str, *, what: str) -> dict:
  """PEFT-layout tensors -> {trainable key: array in the NNX layout}, checked against the model's trainable dict."""
  want = bert.split(model).trainable
  out = {}
  for key, value in tensors.items():
    mapped = bert.from_hf_key(_strip(key))
    if mapped is None or mapped[0] not in want:
      raise ValueError(f"{source}: {key!r} is not a LoRA or head parameter of `model` (adapted: "
                       f"{sorted({k.rsplit('.lora.', 1)[0] for k in want if '.lora.' in k})}).")
    name, transposed = mapped
    value = value.T if transposed else value
    if value.shape != want[name].shape:
      raise ValueError(f"{source}: {key!r} has shape {tuple(np.shape(tensors[key]))}; `model` expects "
                       f"{tuple(want[name].shape[::-1] if transposed else want[name].shape)} (its {what}).")
    out[name] = np.ascontiguousarray(value, dtype=np.asarray(want[name]).dtype)
  return out


def import_adapter(directory: PathLike, model: bert.Classifier, *, precision: Union[bool, PathLike] = False,
                   prior_precision: float = 0.0):
  """Reads a PEFT LoRA adapter into the model's trainable dict (and, optionally, its precision as a posterior).

  `model` must carry LoRA adapters at the same places with the same rank and scale (`add_peft_lora` builds them).
  The head comes from the file when it holds `classifier.weight` / `classifier.bias`, else from `model`.

  Args:
    directory: a PEFT folder with adapter_model.safetensors and adapter_config.json.
    model: a `bmerge.models.bert.Classifier` with matching adapters.
    precision: False; True for `adapter_precision.safetensors` in `directory`; or the path of a safetensors file with
      a diagonal Fisher / Hessian (>= 0) under the adapter's keys and shapes, covering every trainable parameter.
    prior_precision: added to the imported precision (e.g. the weight decay as a prior precision), >= 0.

  Returns:
    The trainable dict ({"encoder.layers.i....lora.lora_a": [in, r], ...}, `bert.split(model).trainable` keys),
    or `DiagGaussian(mean=that dict, precision=same keys)` when `precision` is given.
  """
  directory = pathlib.Path(directory)
  config = _peft_config(directory)
  tensors = _read(directory / ADAPTER_WEIGHTS)
  source = str(directory / ADAPTER_WEIGHTS)
  have = {(m.layer, m.target): m for m in lora_modules(model)}
  for module in peft_modules(directory):
    mine = have.get((module.layer, module.target))
    if mine is None or mine.rank != module.rank or not math.isclose(mine.scale, module.scale, rel_tol=1e-6):
      raise ValueError(f"{source}: layer {module.layer} {module.target!r} has rank {module.rank} and scale "
                       f"{module.scale:g} (lora_alpha {config.get('lora_alpha', 8)}); `model` has "
                       f"{'no adapter there' if mine is None else f'rank {mine.rank}, scale {mine.scale:g}'}. "
                       "Build the adapters with bmerge.interop.add_peft_lora.")
  if len(have) != len(peft_modules(directory)):
    extra = sorted(set(have) - {(m.layer, m.target) for m in peft_modules(directory)})
    raise ValueError(f"{source}: `model` has adapters the file lacks: (layer, target) {extra[:4]}.")
  trainable = dict(bert.split(model).trainable)
  trainable.update(_to_trainable(tensors, model, source, what="LoRA or head parameter"))
  trainable = {k: np.asarray(v) for k, v in trainable.items()}
  if precision is False or precision is None:
    return trainable
  path = directory / ADAPTER_PRECISION if precision is True else pathlib.Path(precision)
  h = _to_trainable(_read(path), model, str(path), what="LoRA or head parameter")
  if set(h) != set(trainable):
    raise ValueError(f"{str(path)!r} lacks precisions for {sorted(set(trainable) - set(h))[:4]}; it must cover every "
                     "trainable parameter (the adapter's keys, plus classifier.* for the head).")
  if not (isinstance(prior_precision, (int, float)) and math.isfinite(prior_precision) and prior_precision >= 0):
    raise ValueError(f"`prior_precision` must be a finite number >= 0, got {prior_precision!r}.")
  for key, value in h.items():
    if not np.all(np.isfinite(value)) or np.any(value < 0):
      raise ValueError(f"{str(path)!r}: the precision of {bert.to_hf_key(key)[0]!r} must be finite and >= 0; its "
                       f"smallest entry is {np.min(value):g}.")
  return DiagGaussian(mean=trainable, precision={k: v + np.asarray(prior_precision, v.dtype) for k, v in h.items()})


# ----------------------------------------------------------------------------------------------------------------
# Export.


def _check_trainable(model: bert.Classifier, trainable: dict, name: str = "trainable") -> dict:
  want = bert.split(model).trainable
  if not isinstance(trainable, dict) or set(trainable) != set(want):
    got = set(trainable) if isinstance(trainable, dict) else set()
    raise ValueError(f"`{name}` must be a trainable dict of `model` (bert.split(model).trainable); missing "
                     f"{sorted(set(want) - got)[:4]}, unexpected {sorted(got - set(want))[:4]}.")
  for key, value in trainable.items():
    if tuple(np.shape(value)) != tuple(want[key].shape):
      raise ValueError(f"`{name}[{key!r}]` has shape {tuple(np.shape(value))}; `model` expects {want[key].shape}.")
  return {k: np.asarray(v, dtype=np.asarray(want[k]).dtype) for k, v in trainable.items()}


def _peft_tensors(trainable: dict) -> dict:
  out = {}
  for key, value in trainable.items():
    hf_key, transposed = bert.to_hf_key(key)
    out[PEFT_PREFIX + hf_key] = np.ascontiguousarray(value.T if transposed else value)
  return out


def export_adapter(directory: PathLike, model: bert.Classifier, trainable: dict, *,
                   precision: Optional[dict] = None, base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
  """Writes a trainable dict as a PEFT LoRA adapter folder (adapter_model.safetensors + adapter_config.json).

  Args:
    directory: the folder to write (created; existing files of these names are replaced).
    model: the `Classifier` whose adapters `trainable` belongs to (for the rank, scale and placement).
    trainable: a dict with the keys and shapes of `bert.split(model).trainable` (one task or one merged model).
    precision: optional precisions under the same keys, written to adapter_precision.safetensors.
    base_model_name_or_path: recorded in adapter_config.json.

  Returns:
    The folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  trainable = _check_trainable(model, trainable)
  modules = lora_modules(model)
  if not modules:
    raise ValueError("`model` has no LoRA adapter; add them with bmerge.models.bert.add_lora.")
  if len({(m.rank, m.scale) for m in modules}) != 1:
    pairs = sorted({(m.rank, m.scale) for m in modules})
    raise NotImplementedError(f"the adapters have different (rank, scale) pairs {pairs}; a PEFT adapter_config.json "
                              "with one r and lora_alpha is written here.")
  rank, scale = modules[0].rank, modules[0].scale
  names = [f"encoder.layer.{m.layer}.{_HF_TARGETS[m.target]}" for m in modules]
  config = {
      "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": scale * rank, "use_rslora": False,
      "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
      # A regular expression PEFT matches against whole module names: exactly these layers (a plain suffix such as
      # 'output.dense' would also match 'attention.output.dense').
      "target_modules": "(" + "|".join(re.escape(n) for n in names) + ")",
      "modules_to_save": ["classifier"], "base_model_name_or_path": base_model_name_or_path,
      "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
  }
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(_peft_tensors(trainable), str(directory / ADAPTER_WEIGHTS))
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
  if precision is not None:
    save_file(_peft_tensors(_check_trainable(model, precision, "precision")), str(directory / ADAPTER_PRECISION))
  return directory


def fused_weights(model: bert.Classifier, trainable: dict) -> dict:
  """The Hugging Face BERT tensors of `model` with `trainable` folded in: W + scale B A per adapter, the head as
  classifier.weight / .bias. Computed in float64, stored in the params' dtype."""
  trainable = _check_trainable(model, trainable)
  scales = {f"encoder.layers.{m.layer}.{'.'.join(bert.TARGETS[m.target])}": m.scale for m in lora_modules(model)}
  frozen = bert.flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Not(bert.TRAINABLE))))
  out = {}
  for key, value in {**frozen, **trainable}.items():
    if ".lora." in key:
      continue
    value = np.asarray(value)
    module = key.rsplit(".", 1)[0]
    if key.endswith(".kernel") and module in scales:
      a, b = (np.asarray(trainable[f"{module}.lora.lora_{m}"], np.float64) for m in "ab")
      value = (value.astype(np.float64) + scales[module] * (a @ b)).astype(value.dtype)
    hf_key, transposed = bert.to_hf_key(key)
    out[hf_key] = np.ascontiguousarray(value.T if transposed else value)
  return out


def export_fused(directory: PathLike, model: bert.Classifier, trainable: dict, *,
                 tokenizer_from: Optional[PathLike] = None) -> pathlib.Path:
  """Writes `model` with `trainable` fused into its weights as a Hugging Face BERT folder.

  model.safetensors holds `fused_weights` (BertModel names, W' = W + scale B A, plus classifier.weight / .bias),
  config.json the architecture; `bmerge.models.bert.load(directory)` reads the encoder back and `load_fused` the
  classifier. The tokenizer files (tokenizer.json, vocab.txt, ...) are copied from `tokenizer_from` if given.

  Returns:
    The folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  save_file(fused_weights(model, trainable), str(directory / "model.safetensors"))
  hf_config = dict(model.encoder.config.to_hf(), num_labels=int(model.head.out_features))
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
  if tokenizer_from is not None:
    source = bert.model_dir(tokenizer_from)
    for name in TOKENIZER_FILES:
      if (source / name).is_file():
        shutil.copyfile(source / name, directory / name)
  return directory


def load_fused(directory: PathLike) -> bert.Classifier:
  """A `Classifier` (no LoRA) from a folder written by `export_fused`: the fused encoder and the head."""
  directory = bert.model_dir(directory)
  weights = bert.read_hf_weights(directory)
  if "head.kernel" not in weights:
    raise ValueError(f"{str(directory)!r} has no classifier.weight; it holds an encoder only (use bert.load).")
  model = bert.Classifier(bert.load(directory), weights["head.kernel"].shape[1], rngs=nnx.Rngs(0))
  model.head.kernel[...] = weights["head.kernel"]
  model.head.bias[...] = weights["head.bias"]
  return model


def export_merged(directory: PathLike, model: bert.Classifier, merged: dict, alphas, *, fused: bool = True,
                  tokenizer_from: Optional[PathLike] = None) -> list[pathlib.Path]:
  """Exports the merged models of a grid: one folder per alpha, the LoRA unfused (PEFT) and, if `fused`, fused (HF).

  Folder g (`alpha_000`, `alpha_001`, ...) holds the PEFT adapter of merged model g and, with `fused`, its
  model.safetensors + config.json; `alphas.json` in `directory` lists the folders and their alphas.

  Args:
    directory: the output folder.
    model: the `Classifier` the trainable dicts belong to (its frozen base is fused in).
    merged: a trainable dict with a leading G axis on every array (the output of a `bmerge.merge` rule).
    alphas: [G, T] the task weights of the rows of `merged` (one row [T] for a single model).
    fused: also write the fused Hugging Face folder.
    tokenizer_from: a model folder whose tokenizer files are copied next to each fused model.

  Returns:
    The G folders.
  """
  alphas = np.asarray(alphas, np.float64)
  alphas = alphas[None] if alphas.ndim == 1 else alphas
  lead = {np.shape(v)[0] if np.ndim(v) else None for v in jax.tree.leaves(merged)}
  if alphas.ndim != 2 or lead != {len(alphas)}:
    raise ValueError(f"`merged` must carry a leading axis G = len(alphas) = {len(alphas)} on every array; got leading "
                     f"sizes {sorted(lead, key=str)} and `alphas` of shape {alphas.shape}.")
  directory = pathlib.Path(directory)
  folders = []
  for g, alpha in enumerate(alphas):
    one = {k: np.asarray(v)[g] for k, v in merged.items()}
    folder = export_adapter(directory / f"alpha_{g:03d}", model, one)
    if fused:
      export_fused(folder, model, one, tokenizer_from=tokenizer_from)
    folders.append(folder)
  (directory / "alphas.json").write_text(json.dumps(
      {"folders": [f.name for f in folders], "alphas": alphas.tolist()}, indent=2))
  return folders


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_PRECISION", "ADAPTER_WEIGHTS", "LoRAModule", "add_peft_lora", "export_adapter",
    "export_fused", "export_merged", "fused_weights", "import_adapter", "load_fused", "lora_modules", "peft_modules",
]
