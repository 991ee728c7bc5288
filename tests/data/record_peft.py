"""Records the PEFT interop fixture tests/data/peft_tiny/ for tests/test_interop.py, with PyTorch, transformers and peft.

Not part of the package and never imported by the tests. It runs in a scratch environment outside the repository
(PyTorch never enters bmerge's environment) and, for bmerge's side, calls the repository's own environment:

  python3 -m venv /tmp/peftenv
  /tmp/peftenv/bin/pip install torch==2.13.0        # the CPU build
  /tmp/peftenv/bin/pip install peft==0.21.2 transformers==5.25.0 safetensors==0.8.0 numpy==2.4.6
  /tmp/peftenv/bin/python tests/data/record_peft.py  # from the repository root, after `make test` built .venv

Three steps, one command:

1. PyTorch side. transformers builds a tiny random BERT (2 layers, hidden 32, 2 heads, vocabulary 100; torch seed 0)
   with bmerge's head, a linear classifier on the mean-pooled last hidden states (`MeanPoolBert`: module names
   `embeddings.*`, `encoder.layer.{i}.*`, `classifier`, as bmerge's key table expects). Its weights go to base/
   (model.safetensors, config.json). `peft` adds LoRA (r 4, lora_alpha 8) to every linear layer of the encoder and
   keeps `classifier` as a module to save; A, B and the classifier copy are drawn at random (non-zero B, so the
   adapter changes the outputs) and `save_pretrained` writes peft_adapter/. The adapted model's logits and last
   hidden states on fixed token ids go to outputs.json ("peft").
2. bmerge side, run with the repository's .venv (BMERGE_PYTHON overrides it): bmerge loads base/, puts its own LoRA
   layout on it (rank 3, alpha 6: query and value in both layers, the attention output in layer 0, the FFN output
   in layer 1), draws a random trainable dict, writes it with `bmerge.interop.export_adapter` to bmerge_adapter/,
   and records its logits ("bmerge").
3. PyTorch side again: `peft.PeftModel.from_pretrained` loads bmerge_adapter/ onto a fresh copy of the base; the
   adapter state peft then holds is compared with the file tensor by tensor, and peft's logits with bmerge's
   ("bmerge_adapter_in_peft").
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "peft_tiny"
CONFIG = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64, "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_act": "gelu",
          "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}
NUM_CLASSES = 3


def _tokens():
  """Fixed token ids [4, 8]: row 0 full, the others padded on the right (id 0, mask 0)."""
  rng = np.random.default_rng(0)
  lengths = np.array([8, 5, 3, 7])
  mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int64)
  ids = rng.integers(1, CONFIG["vocab_size"], size=(4, 8)) * mask
  return ids, mask


def _read_outputs():
  path = OUT / "outputs.json"
  return json.loads(path.read_text()) if path.is_file() else {}


def _write_outputs(outputs):
  (OUT / "outputs.json").write_text(json.dumps(outputs) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The PyTorch side (scratch environment).


def _torch_model_class():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  class MeanPoolBert(transformers.BertModel):
    """BertModel without its CLS pooler, with bmerge's head: classifier(mean of the unmasked last hidden states)."""

    def __init__(self, config):
      super().__init__(config, add_pooling_layer=False)
      self.classifier = torch.nn.Linear(config.hidden_size, NUM_CLASSES)
      self.post_init()

    def forward(self, input_ids, attention_mask):  # pylint: disable=arguments-differ
      hidden = super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
      m = attention_mask[..., None].to(hidden.dtype)
      pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
      return self.classifier(pooled), hidden

  return MeanPoolBert


def _fresh_base(model_class):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model = model_class(transformers.BertConfig(**CONFIG))
  missing, unexpected = model.load_state_dict(safetensors.torch.load_file(str(OUT / "base" / "model.safetensors")),
                                              strict=False)
  assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
  return model.eval()


def peft_side():
  import peft  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model_class = _torch_model_class()
  base = model_class(transformers.BertConfig(**CONFIG)).eval()
  (OUT / "base").mkdir(parents=True, exist_ok=True)
  safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()},
                              str(OUT / "base" / "model.safetensors"))
  (OUT / "base" / "config.json").write_text(json.dumps(dict(CONFIG, model_type="bert",
                                                            architectures=["MeanPoolBert"]), indent=2))

  config = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"],
                           modules_to_save=["classifier"])
  model = peft.get_peft_model(base, config)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_" in name or "modules_to_save" in name:
        param.copy_(0.3 * torch.randn(param.shape, generator=generator))
  model.eval()
  model.save_pretrained(str(OUT / "peft_adapter"))
  (OUT / "peft_adapter" / "README.md").unlink(missing_ok=True)  # peft's model-card template

  ids, mask = _tokens()
  with torch.no_grad():
    logits, hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  outputs = {
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
      "input_ids": ids.tolist(), "attention_mask": mask.tolist(), "num_classes": NUM_CLASSES,
      "peft": {"logits": logits.double().tolist(), "last_hidden_state": hidden.double().tolist()},
  }
  _write_outputs(outputs)
  print(f"peft adapter: {sorted(os.listdir(OUT / 'peft_adapter'))}")


def peft_loads_bmerge_adapter():
  import peft  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  outputs = _read_outputs()
  folder = OUT / "bmerge_adapter"
  model = peft.PeftModel.from_pretrained(_fresh_base(_torch_model_class()), str(folder)).eval()
  in_file = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
  held = peft.get_peft_model_state_dict(model)
  same = sorted(held) == sorted(in_file) and all(torch.equal(held[k], in_file[k]) for k in in_file)
  ids, mask = np.asarray(outputs["input_ids"]), np.asarray(outputs["attention_mask"])
  with torch.no_grad():
    logits, _ = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  logits = logits.double().numpy()
  diff = float(np.max(np.abs(logits - np.asarray(outputs["bmerge"]["logits"]))))
  outputs["bmerge_adapter_in_peft"] = {"state_equals_file": bool(same), "num_tensors": len(in_file),
                                       "logits": logits.tolist(), "max_abs_diff_from_bmerge": diff}
  _write_outputs(outputs)
  print(f"peft on bmerge's adapter: state equals file {same}, max |logits - bmerge's| {diff:.2e}")
  if not same or diff > 1e-5:
    sys.exit("peft does not reproduce bmerge's adapter")


# ----------------------------------------------------------------------------------------------------------------
# bmerge's side (the repository's environment; no PyTorch).


def bmerge_side():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from bmerge import interop  # pylint: disable=g-import-not-at-top
  from bmerge.models import bert  # pylint: disable=g-import-not-at-top

  outputs = _read_outputs()
  model = bert.Classifier(bert.load(OUT / "base"), outputs["num_classes"], rngs=nnx.Rngs(0))
  bert.add_lora(model, 3, alpha=6.0, targets=("query", "value"), rngs=nnx.Rngs(1))
  bert.add_lora(model, 3, alpha=6.0, targets=("attention_output",), layers=(0,), rngs=nnx.Rngs(2))
  bert.add_lora(model, 3, alpha=6.0, targets=("output",), layers=(1,), rngs=nnx.Rngs(3))
  apply, trainable = bert.split(model)
  rng = np.random.default_rng(2)
  trainable = {k: (0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in trainable.items()}
  interop.export_adapter(OUT / "bmerge_adapter", model, trainable)
  tokens = bert.Tokens(np.asarray(outputs["input_ids"], np.int32), np.asarray(outputs["attention_mask"], np.int32))
  outputs["bmerge"] = {"logits": np.asarray(apply(trainable, tokens), np.float64).tolist()}
  _write_outputs(outputs)
  print(f"bmerge adapter: {sorted(os.listdir(OUT / 'bmerge_adapter'))}")


def main():
  if sys.argv[1:] == ["--bmerge"]:
    bmerge_side()
    return
  peft_side()
  python = os.environ.get("BMERGE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
  subprocess.run([python, str(pathlib.Path(__file__).resolve()), "--bmerge"], cwd=ROOT, check=True)
  peft_loads_bmerge_adapter()
  size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
  print(f"wrote {OUT}: {size / 1024:.0f} KB")


if __name__ == "__main__":
  main()
