"""The package's import graph, read from the source: imports point one way, from the pipeline's later stages down.

Edges are every `import` / `from ... import` of a bmerge module anywhere in a file (function bodies included): `from
bmerge.x import y` is an edge to `bmerge.x.y` when that is a module, else to `bmerge.x`. A package's `__init__` that
runs on the way is not an edge (Python's own rule: importing `bmerge.x.y` runs `bmerge/x/__init__.py`, but the module
that asked depends on `bmerge.x.y` only).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "bmerge"

# The pipeline, bottom to top: a module may import only from its own layer or those before it.
LAYERS = ("ground", "models", "optim", "merge", "grid", "assess", "io")
GROUND = {"bmerge.posteriors", "bmerge._checks", "bmerge._fingerprint", "bmerge._tree", "bmerge._sharding",
          "bmerge.timing"}


def _modules():
  out = {}
  for path in ROOT.rglob("*.py"):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _edges(modules):
  edges = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
      else:
        continue
      edges[name].update(t for t in targets if t in modules and t != name)
  return edges


def _layer(name):
  if name in GROUND:
    return 0
  parts = name.split(".")
  if len(parts) >= 2 and parts[1] in LAYERS:
    return LAYERS.index(parts[1])
  return len(LAYERS)  # bmerge/__init__ itself: the top


def _cycles(edges):
  """Every strongly connected component with more than one module, or a self-loop (Tarjan)."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in edges[v]:
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def test_cycle_finder_finds_a_planted_cycle():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(edges) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_edges_see_lazy_imports_inside_functions(tmp_path):
  del tmp_path
  modules = _modules()
  assert "bmerge.io.data" in modules and "bmerge.grid.evaluate" in modules
  # bmerge/__init__ imports the assess package; its edges are found from the source.
  assert "bmerge.assess" in _edges(modules)["bmerge"]


def test_no_import_cycle():
  assert _cycles(_edges(_modules())) == []


def test_imports_point_down_the_pipeline():
  edges = _edges(_modules())
  upward = [(a, b) for a, targets in edges.items() for b in targets if _layer(b) > _layer(a)]
  assert upward == [], f"imports from a later stage: {upward}"
