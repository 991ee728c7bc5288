"""bmerge.interop: PEFT adapters and precisions in (transposes and scale against numpy in PyTorch layout), adapters and
fused models out, round trips, one folder per merged alpha; against peft itself through the files and outputs that
tests/data/record_peft.py recorded with PyTorch, transformers and peft (tests/data/peft_tiny)."""

import json
import math
import pathlib
import re

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import bmerge
from bmerge import interop
from bmerge.models import bert

PEFT_TINY = pathlib.Path(__file__).resolve().parent / "data" / "peft_tiny"
TINY = bert.Config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   max_position_embeddings=16)
P = interop.PEFT_PREFIX


def _classifier(seed: int = 0) -> bert.Classifier:
  return bert.Classifier(bert.from_hf_weights(TINY, bert.random_hf_weights(TINY, seed)), 3, rngs=nnx.Rngs(seed + 1))


def _tokens(seed: int = 0, n: int = 4, length: int = 6) -> bert.Tokens:
  rng = np.random.default_rng(seed)
  mask = (np.arange(length)[None] < rng.integers(2, length + 1, size=(n, 1))).astype(np.int32)
  return bert.Tokens((rng.integers(1, TINY.vocab_size, size=(n, length)) * mask).astype(np.int32), mask)


def _peft_folder(path, seed: int, *, rank: int = 4, alpha: float = 16.0, rslora: bool = False,
                 modules=("encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value",
                          "encoder.layer.1.output.dense"), head: bool = True) -> dict:
  """A PEFT adapter folder in PyTorch layout (A [r, in], B [out, r], classifier [C, H]); returns its tensors."""
  rng = np.random.default_rng(seed)
  sizes = {"query": (32, 32), "value": (32, 32), "output.dense": (64, 32)}  # (in, out)
  tensors = {}
  for name in modules:
    n_in, n_out = next(v for k, v in sizes.items() if name.endswith(k))
    tensors[P + name + ".lora_A.weight"] = rng.normal(size=(rank, n_in)).astype(np.float32)
    tensors[P + name + ".lora_B.weight"] = rng.normal(size=(n_out, rank)).astype(np.float32)
  if head:
    tensors[P + "classifier.weight"] = rng.normal(size=(3, 32)).astype(np.float32)
    tensors[P + "classifier.bias"] = rng.normal(size=(3,)).astype(np.float32)
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / interop.ADAPTER_WEIGHTS))
  config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
            "target_modules": ["query", "value", "output.dense"], "modules_to_save": ["classifier"]}
  (path / interop.ADAPTER_CONFIG).write_text(json.dumps(config))
  return tensors


def test_peft_import_transposes_and_scales_like_pytorch(tmp_path):
  tensors = _peft_folder(tmp_path / "a", 0, rank=4, alpha=16.0)
  model = interop.add_peft_lora(_classifier(), tmp_path / "a", rngs=nnx.Rngs(3))
  assert interop.lora_modules(model) == [interop.LoRAModule(0, "query", 4, 4.0), interop.LoRAModule(1, "value", 4, 4.0),
                                         interop.LoRAModule(1, "output", 4, 4.0)]
  trainable = interop.import_adapter(tmp_path / "a", model)
  name = "encoder.layer.1.output.dense"
  for m in "ab":  # lora_a = A^T [in, r], lora_b = B^T [r, out]
    np.testing.assert_array_equal(trainable[f"encoder.layers.1.output.lora.lora_{m}"],
                                  tensors[P + name + f".lora_{m.upper()}.weight"].T)
  np.testing.assert_array_equal(trainable["head.kernel"], tensors[P + "classifier.weight"].T)
  # The imported layer computes PyTorch's W x + b + (lora_alpha / r) B A x.
  bert.merge_trainable(model, trainable)
  layer = model.encoder.layers[1].output
  w, b = np.asarray(layer.kernel[...], np.float64).T, np.asarray(layer.bias[...], np.float64)
  a_t, b_t = (np.asarray(tensors[P + name + f".lora_{m}.weight"], np.float64) for m in "AB")
  x = np.random.default_rng(1).normal(size=(5, 64))
  np.testing.assert_allclose(layer(x.astype(np.float32)), x @ w.T + b + 4.0 * (b_t @ (a_t @ x.T)).T, rtol=1e-5,
                             atol=1e-4)
  # use_rslora: scale lora_alpha / sqrt(r).
  _peft_folder(tmp_path / "rs", 0, rank=4, alpha=16.0, rslora=True)
  assert {m.scale for m in interop.peft_modules(tmp_path / "rs")} == {8.0}


def test_import_checks_the_model_and_the_files(tmp_path):
  _peft_folder(tmp_path / "a", 0, rank=4)
  with pytest.raises(ValueError, match="add_peft_lora"):
    interop.import_adapter(tmp_path / "a", bert.add_lora(_classifier(), 2, rngs=nnx.Rngs(0)))
  model = interop.add_peft_lora(_classifier(), tmp_path / "a", rngs=nnx.Rngs(3))
  bert.add_lora(model, 4, alpha=16.0, layers=(0,), targets=("key",), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lacks"):
    interop.import_adapter(tmp_path / "a", model)
  _peft_folder(tmp_path / "bad", 0, modules=("encoder.layer.0.attention.self.query",))
  config = json.loads((tmp_path / "bad" / interop.ADAPTER_CONFIG).read_text())
  (tmp_path / "bad" / interop.ADAPTER_CONFIG).write_text(json.dumps(dict(config, use_dora=True)))
  with pytest.raises(NotImplementedError, match="use_dora"):
    interop.peft_modules(tmp_path / "bad")
  with pytest.raises(FileNotFoundError, match=interop.ADAPTER_CONFIG):
    interop.peft_modules(tmp_path)


def test_precisions_import_as_a_diag_gaussian_under_the_adapter_keys(tmp_path):
  tensors = _peft_folder(tmp_path / "a", 0)
  model = interop.add_peft_lora(_classifier(), tmp_path / "a", rngs=nnx.Rngs(3))
  rng = np.random.default_rng(5)
  fisher = {k: rng.uniform(size=v.shape).astype(np.float32) for k, v in tensors.items()}
  save_file(fisher, str(tmp_path / "a" / interop.ADAPTER_PRECISION))
  q = interop.import_adapter(tmp_path / "a", model, precision=True, prior_precision=0.5)
  assert isinstance(q, bmerge.DiagGaussian) and set(q.precision) == set(q.mean)
  np.testing.assert_allclose(q.precision["encoder.layers.0.attention.query.lora.lora_b"],
                             fisher[P + "encoder.layer.0.attention.self.query.lora_B.weight"].T + 0.5, rtol=1e-7)
  np.testing.assert_allclose(q.precision["head.bias"], fisher[P + "classifier.bias"] + 0.5, rtol=1e-7)
  # It merges: two such posteriors through the Hessian-weighted rule (Eq. 10).
  merged = bmerge.merge.hessian_weighted(bmerge.stack([q, q]), np.array([[0.3, 0.7]]))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], merged), q.mean, atol=1e-5)
  partial = {k: v for k, v in fisher.items() if "classifier" not in k}
  save_file(partial, str(tmp_path / "partial.safetensors"))
  with pytest.raises(ValueError, match="head"):
    interop.import_adapter(tmp_path / "a", model, precision=tmp_path / "partial.safetensors")
  save_file(dict(fisher, **{P + "classifier.bias": -np.ones(3, np.float32)}), str(tmp_path / "neg.safetensors"))
  with pytest.raises(ValueError, match=r"classifier\.bias.*>= 0"):
    interop.import_adapter(tmp_path / "a", model, precision=tmp_path / "neg.safetensors")


def _trained(seed: int = 0):
  """A classifier with LoRA on the query (all layers) and the FFN output (top layer), scale 2, and a random
  trainable dict for it."""
  model = _classifier(seed)
  bert.add_lora(model, 3, alpha=6.0, targets=("query",), rngs=nnx.Rngs(7))
  bert.add_lora(model, 3, alpha=6.0, targets=("output",), layers=(-1,), rngs=nnx.Rngs(8))
  _, trainable = bert.split(model)
  rng = np.random.default_rng(seed + 10)
  return model, {k: (np.asarray(v) + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in trainable.items()}


def test_adapter_export_then_import_gives_the_same_arrays(tmp_path):
  model, trainable = _trained()
  precision = {k: np.full(v.shape, 2.0, np.float32) + np.abs(v) for k, v in trainable.items()}
  interop.export_adapter(tmp_path / "out", model, trainable, precision=precision)
  config = json.loads((tmp_path / "out" / interop.ADAPTER_CONFIG).read_text())
  assert config["r"] == 3 and config["lora_alpha"] == 6.0 and config["peft_type"] == "LORA"
  # PEFT's module matching: exactly the adapted modules, not the attention output that the suffix 'output.dense' hits.
  names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
           "encoder.layer.1.output.dense"]
  assert all(re.fullmatch(config["target_modules"], n) for n in names)
  assert not re.fullmatch(config["target_modules"], "encoder.layer.1.attention.output.dense")
  stored = load_file(str(tmp_path / "out" / interop.ADAPTER_WEIGHTS))
  assert stored[P + "encoder.layer.1.output.dense.lora_A.weight"].shape == (3, 64)  # [r, in]
  assert stored[P + "encoder.layer.1.output.dense.lora_B.weight"].shape == (32, 3)  # [out, r]
  fresh = interop.add_peft_lora(_classifier(), tmp_path / "out", rngs=nnx.Rngs(0))
  q = interop.import_adapter(tmp_path / "out", fresh, precision=True)
  chex.assert_trees_all_equal(q.mean, trainable)
  chex.assert_trees_all_equal(q.precision, precision)


def test_fused_export_is_base_plus_scaled_ab_and_loads_back(tmp_path):
  model, trainable = _trained()
  base = bert.flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Not(bert.TRAINABLE))))
  weights = interop.fused_weights(model, trainable)
  for key in ("encoder.layers.0.attention.query", "encoder.layers.1.attention.query", "encoder.layers.1.output"):
    a, b = (np.asarray(trainable[f"{key}.lora.lora_{m}"], np.float64) for m in "ab")
    expect = np.asarray(base[key + ".kernel"], np.float64) + 2.0 * a @ b  # NNX kernel [in, out] = W^T + s A^T B^T
    hf_key = bert.to_hf_key(key + ".kernel")[0]
    np.testing.assert_allclose(weights[hf_key].T, expect, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(weights["encoder.layer.0.attention.self.value.weight"],
                                np.asarray(base["encoder.layers.0.attention.value.kernel"]).T)  # not adapted: as is
  assert not any("lora" in k for k in weights) and weights["classifier.weight"].shape == (3, 32)
  interop.export_fused(tmp_path / "fused", model, trainable)
  tokens = _tokens(1)
  apply, _ = bert.split(model)
  loaded = interop.load_fused(tmp_path / "fused")
  assert not interop.lora_modules(loaded)
  np.testing.assert_allclose(loaded(tokens), apply(trainable, tokens), atol=2e-5)
  assert bert.load(tmp_path / "fused").config == TINY


def test_export_merged_writes_one_loadable_folder_per_alpha(tmp_path):
  model, t0 = _trained(0)
  t1 = {k: v + 0.2 for k, v in t0.items()}
  alphas = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
  merged = bmerge.merge.simple_average(bmerge.stack([t0, t1]), alphas)
  folders = interop.export_merged(tmp_path / "grid", model, merged, alphas)
  assert [f.name for f in folders] == ["alpha_000", "alpha_001", "alpha_002"]
  assert json.loads((tmp_path / "grid" / "alphas.json").read_text())["alphas"] == alphas.tolist()
  fresh = interop.add_peft_lora(_classifier(), folders[2], rngs=nnx.Rngs(0))
  chex.assert_trees_all_close(interop.import_adapter(folders[2], fresh), t1, atol=1e-6)
  apply, _ = bert.split(model)
  middle = {k: np.asarray(v[1]) for k, v in merged.items()}
  np.testing.assert_allclose(interop.load_fused(folders[1])(_tokens(2)), apply(middle, _tokens(2)), atol=2e-5)
  with pytest.raises(ValueError, match="leading axis"):
    interop.export_merged(tmp_path / "bad", model, merged, alphas[:2])
  with pytest.raises(ValueError, match="trainable"):
    interop.export_adapter(tmp_path / "bad", model, {"head.kernel": t0["head.kernel"]})
  assert math.isclose(interop.lora_modules(model)[0].scale, 2.0)


# ----------------------------------------------------------------------------------------------------------------
# Against peft itself: a tiny random BERT (2 layers, hidden 32) with bmerge's head (a linear classifier on the
# mean-pooled last hidden states), its adapters and outputs recorded with PyTorch by tests/data/record_peft.py.


@pytest.fixture(scope="module")
def recorded():
  return json.loads((PEFT_TINY / "outputs.json").read_text())


def _recorded_model(recorded, adapter):
  """bmerge's Classifier on the recorded base weights, with the LoRA layout of a PEFT adapter folder."""
  model = bert.Classifier(bert.load(PEFT_TINY / "base"), recorded["num_classes"], rngs=nnx.Rngs(0))
  return interop.add_peft_lora(model, adapter, rngs=nnx.Rngs(1))


def _recorded_tokens(recorded) -> bert.Tokens:
  return bert.Tokens(np.asarray(recorded["input_ids"], np.int32), np.asarray(recorded["attention_mask"], np.int32))


def test_an_adapter_written_by_peft_gives_peft_outputs(recorded):
  adapter = PEFT_TINY / "peft_adapter"
  model = _recorded_model(recorded, adapter)
  # peft adapted every linear layer of the encoder (target_modules query, key, value, dense), r 4, lora_alpha 8.
  assert interop.lora_modules(model) == [interop.LoRAModule(i, t, 4, 2.0) for i in range(2) for t in bert.TARGETS]
  trainable = interop.import_adapter(adapter, model)
  tokens = _recorded_tokens(recorded)
  apply, _ = bert.split(model)
  np.testing.assert_allclose(apply(trainable, tokens), recorded["peft"]["logits"], atol=1e-5, rtol=0)
  bert.merge_trainable(model, trainable)
  hidden = np.asarray(model.encoder(tokens.input_ids, tokens.attention_mask))
  np.testing.assert_allclose(hidden, recorded["peft"]["last_hidden_state"], atol=1e-5, rtol=0)
  # The adapter matters: the base encoder alone is far from peft's outputs.
  base = np.asarray(bert.load(PEFT_TINY / "base")(tokens.input_ids, tokens.attention_mask))
  assert np.max(np.abs(base - hidden)) > 0.1


def test_an_adapter_bmerge_exports_is_what_peft_loaded_and_reproduced(recorded, tmp_path):
  accepted = PEFT_TINY / "bmerge_adapter"
  peft_check = recorded["bmerge_adapter_in_peft"]
  # Recorded by peft: it loaded every tensor of the file into its model, and its logits were bmerge's.
  assert peft_check["state_equals_file"] and peft_check["max_abs_diff_from_bmerge"] <= 1e-5
  model = _recorded_model(recorded, accepted)
  trainable = interop.import_adapter(accepted, model)
  apply, _ = bert.split(model)
  np.testing.assert_allclose(apply(trainable, _recorded_tokens(recorded)), peft_check["logits"], atol=1e-5, rtol=0)
  # export_adapter writes what peft accepted: the same tensors byte for byte, the same adapter_config.json.
  interop.export_adapter(tmp_path, model, trainable)
  written, kept = (load_file(str(d / interop.ADAPTER_WEIGHTS)) for d in (tmp_path, accepted))
  assert sorted(written) == sorted(kept) and len(kept) == peft_check["num_tensors"]
  for key, value in kept.items():
    assert (written[key].dtype, written[key].shape) == (value.dtype, value.shape), key
    assert written[key].tobytes() == value.tobytes(), key
  config, kept_config = (json.loads((d / interop.ADAPTER_CONFIG).read_text()) for d in (tmp_path, accepted))
  assert config == kept_config


def test_no_bmerge_module_imports_torch():
  """Every bmerge module imports (and the PEFT / BERT paths run) without PyTorch: checked in a fresh interpreter."""
  import pkgutil
  import subprocess
  import sys
  names = [m.name for m in pkgutil.walk_packages(bmerge.__path__, "bmerge.") if not m.name.endswith("__main__")]
  code = (f"import importlib, sys\nfor n in {names!r}:\n  importlib.import_module(n)\n"
          "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
          f"assert not bad, bad\nprint(len({names!r}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) == len(names) > 10
