"""A lean install: the library core imports and runs without the experiments' and the text extras' packages."""

import configparser
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = {"jax", "flax", "optax", "chex", "numpy", "scipy", "orbax-checkpoint", "ml_collections", "tqdm", "matplotlib",
        "moocore", "safetensors"}
# absl-py and psutil come with the core anyway (optax, chex and orbax depend on them).
EXTRAS_ONLY = ("sklearn", "tensorflow_datasets", "mlxtend", "tokenizers", "threadpoolctl", "torch")


def _requirements(text):
  return {re.split(r"[<>=!~\[ ]", line.strip())[0] for line in text.strip().splitlines() if line.strip()
          and not line.strip().startswith("#")}


def test_core_requirements_are_what_the_library_needs():
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  assert _requirements(cfg["options"]["install_requires"]) == CORE
  extras = cfg["options.extras_require"]
  assert {"tensorflow-datasets", "mlxtend", "scikit-learn", "absl-py"} <= _requirements(extras["experiments"])
  assert "tokenizers" in _requirements(extras["text"])


def test_core_runs_without_the_extras_and_names_the_extra_when_one_is_needed():
  """In a fresh interpreter where the extras' packages cannot be imported: merging and previewing work, and a loader
  that needs an extra raises an ImportError that names it."""
  code = textwrap.dedent(f"""
      import importlib.abc, sys
      BLOCKED = {EXTRAS_ONLY!r}
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Block())
      import jax.numpy as jnp
      import numpy as np
      import bmerge
      q = bmerge.stack([bmerge.DiagGaussian({{"w": jnp.full(2, float(t))}}, {{"w": jnp.ones(2)}}) for t in range(3)])
      out = bmerge.preview(bmerge.merge.hessian_weighted, q, bmerge.grid.simplex(3, 0.5),
                           lambda p, b: jnp.sum(p["w"]), None, progress=False)
      want = 2 * (bmerge.grid.simplex(3, 0.5) @ np.arange(3.0))
      assert np.allclose(np.asarray(out), want), (out, want)
      try:
        bmerge.data.load("digits")
      except ImportError as e:
        assert "bmerge[experiments]" in str(e) and "scikit-learn" in str(e), str(e)
      else:
        raise AssertionError("load('digits') ran without scikit-learn")
      from bmerge.models.bert import tokenizer
      try:
        tokenizer._tokenizer("tokenizer.json")
      except ImportError as e:
        assert "bmerge[text]" in str(e) and "tokenizers" in str(e), str(e)
      else:
        raise AssertionError("the tokenizer loaded without the tokenizers package")
      loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
      assert not loaded, loaded
      print("ok")
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
