"""Every docstring example of every bmerge module runs and gives what it says (the markdown documents: test_markdown)."""

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import bmerge

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(bmerge.__path__, "bmerge.") if not m.name.endswith("__main__"))


def test_every_module_is_importable_and_public_ones_declare_all():
  missing = []
  for name in MODULES:
    module = importlib.import_module(name)
    public = not any(part.startswith("_") for part in name.split("."))
    if public and not hasattr(module, "__all__"):
      missing.append(name)
    for attr in getattr(module, "__all__", ()):
      assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which {name} does not define"
  assert missing == [], f"public modules without __all__: {missing}"


def test_top_level_namespace():
  for name in ("optim", "fit", "merge", "em", "grid", "preview", "stack", "DiagGaussian"):
    assert hasattr(bmerge, name), f"bmerge.{name} is missing"
    assert name in bmerge.__all__
  # A submodule is never shadowed by a function of the same name.
  import types  # pylint: disable=g-import-not-at-top
  for name in MODULES:
    parent, _, child = name.rpartition(".")
    obj = getattr(importlib.import_module(parent), child, None)
    assert obj is None or isinstance(obj, types.ModuleType), f"{parent}.{child} is a {type(obj).__name__}, not the module"


# Modules allowed to carry no docstring example, each with its reason. Every other module must run at least one.
WITHOUT_EXAMPLES = {}


@pytest.mark.parametrize("name", ["bmerge"] + MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  tests = [t for t in finder.find(module, name) if t.examples]
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
  if name not in WITHOUT_EXAMPLES:
    assert result.attempted >= 1, f"{name} has no docstring example; add one (or a reason to WITHOUT_EXAMPLES)"


def test_modules_without_examples_exist():
  stale = sorted(set(WITHOUT_EXAMPLES) - set(MODULES))
  assert stale == [], f"WITHOUT_EXAMPLES names modules that do not exist: {stale}"

