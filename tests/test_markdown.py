"""The markdown documents hold only what runs: every Python block runs (in a temporary directory, writing nothing into
the repository), every shell command runs in its quick form or has its flags checked against the code, every
relative link resolves, and the README's results table is exactly what `experiments/summary.py` prints from the
recorded metrics."""

import doctest
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest

from experiments import summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "experiments/README.md", "experiments/benchmarks/README.md", "bmerge/GUIDE.md")
README_MAX_LINES = 200
QUICK_START_MAX_LINES = 25
DEVICES_MARKER = re.compile(r"test: (?:devices=(\d+)|fresh process)")  # run alone, seeing N CPU devices
GUIDE_CODE_MARKER = re.compile(r"guide-code: (tests/\S+\.py)")
CONTINUES_MARKER = re.compile(r"test: continues the quick start")


class Block(NamedTuple):
  doc: str  # path relative to the repository root
  index: int  # among the document's blocks of the same language
  lang: str  # "python", "bash", ...
  code: str
  marker: str  # the HTML comment on the line just above the fence ("" if none)


def _blocks(doc: str) -> list[Block]:
  text = (ROOT / doc).read_text()
  out, count = [], {}
  for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
    above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
    marker = re.fullmatch(r"<!--\s*(.*?)\s*-->", above.strip())
    lang = m.group(1) or "text"
    out.append(Block(doc, count.get(lang, 0), lang, m.group(2), marker.group(1) if marker else ""))
    count[lang] = count.get(lang, 0) + 1
  return out


def _all(langs) -> list[Block]:
  return [b for doc in DOCS for b in _blocks(doc) if b.lang in langs]


def _repo_state() -> set[str]:
  """`git status --porcelain` with untracked and ignored files, less the caches Python and the tools keep."""
  out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "--", ".", ":!.venv",
                        ":!.hypothesis", ":!.pytest_cache"], cwd=ROOT, capture_output=True, text=True, check=True)
  return {line for line in out.stdout.splitlines() if "__pycache__" not in line}


def _written(before: set[str]) -> list[str]:
  """Files that appeared in the repository (untracked or ignored) since `before`.

  Tracked files changing their status are left out: people may edit the working tree while the tests run, and a
  document's block never edits tracked files (`_Guard` catches any write by this process, edits included).
  """
  return sorted(line for line in _repo_state() - before if line[:2] in ("??", "!!"))


class _Guard:
  """Records every file this process opens for writing, creates, renames or removes inside the repository.

  Python's audit hooks cannot be removed, so one hook is installed once and records only while `active`.
  """
  active = False
  events: list = []
  _installed = False
  _WRITES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "shutil.copyfile",
             "shutil.rmtree", "os.symlink"}

  @classmethod
  def _hook(cls, event, args):
    if not cls.active:
      return
    if event == "open":
      path, mode, flags = (tuple(args) + (None, None))[:3]
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    else:
      path, writing = (args[0] if args else None), event in cls._WRITES
    if writing and isinstance(path, (str, bytes, os.PathLike)):
      full = os.path.abspath(os.fsdecode(path))
      if full.startswith(str(ROOT) + os.sep) and "__pycache__" not in full:
        cls.events.append((event, full))

  @classmethod
  def install(cls):
    if not cls._installed:
      sys.addaudithook(cls._hook)
      cls._installed = True


def _exec(block: Block, tmp_path, monkeypatch) -> dict:
  """Runs a block in a fresh namespace with `tmp_path` as working directory; nothing may be written into the
  repository (no write by this process, no new file in `git status`)."""
  monkeypatch.chdir(tmp_path)
  _Guard.install()
  before = _repo_state()
  namespace = {"__name__": f"{block.doc}:python{block.index}"}
  _Guard.events, _Guard.active = [], True
  try:
    exec(compile(block.code, f"{block.doc} python block {block.index}", "exec"), namespace)  # pylint: disable=exec-used
  finally:
    _Guard.active = False
  assert os.getcwd() == str(tmp_path)
  assert _Guard.events == [], f"{block.doc} python block {block.index} wrote into the repository: {_Guard.events[:5]}"
  assert _written(before) == [], f"{block.doc} python block {block.index} wrote into the repository"
  return namespace


def _id(block: Block) -> str:
  return f"{block.doc}:{block.lang}{block.index}"


PYTHON = _all({"python"})
QUICK_START = PYTHON[0]  # the README's first block
CONTINUES = [b for b in PYTHON if CONTINUES_MARKER.search(b.marker)]
IN_PROCESS = [b for b in PYTHON[1:] if not DEVICES_MARKER.search(b.marker) and not GUIDE_CODE_MARKER.search(b.marker)
              and b not in CONTINUES]
ON_DEVICES = [b for b in PYTHON if DEVICES_MARKER.search(b.marker)]
BY_OWN_TEST = [b for b in PYTHON if GUIDE_CODE_MARKER.search(b.marker)]
SHELL = _all({"bash", "sh", "shell"})


def test_the_documents_exist_and_hold_code():
  assert QUICK_START.doc == "README.md"
  assert {b.doc for b in PYTHON} >= {"README.md", "bmerge/GUIDE.md"}
  assert {b.doc for b in SHELL} >= {"README.md", "experiments/README.md", "experiments/benchmarks/README.md"}
  assert ON_DEVICES, "the guide's sharding block (marked `<!-- test: devices=4 -->`) is missing"
  assert all(b.lang in {"python", "bash", "sh", "shell", "text"} for doc in DOCS for b in _blocks(doc))


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
  assert len(QUICK_START.code.splitlines()) <= QUICK_START_MAX_LINES


def test_readme_quick_start(tmp_path, monkeypatch):
  """The quick start runs; the preview's pick, trained jointly, is within 3 points of the best weighting of its grid,
  found by joint training at every alpha with the same settings (the `joint` of the block itself)."""
  ns = _exec(QUICK_START, tmp_path, monkeypatch)
  alphas, preview, best = ns["alphas"], ns["preview"], ns["best"]
  assert preview.shape == (len(alphas),) and len(alphas) == 66
  np.testing.assert_array_equal(best, alphas[np.argmax(preview)])
  everywhere = ns["joint"](alphas)
  picked = float(ns["joint"](best))
  # One alpha vector trains what the grid trains at that row (same start, data, steps; one test example may flip).
  assert abs(picked - everywhere[np.argmax(preview)]) <= 1.0 / len(ns["test"][1]) + 1e-6
  assert picked >= everywhere.max() - 0.03, (picked, everywhere.max())


def test_readme_continuation_trains_at_the_recommended_alphas_and_estimates_the_front(tmp_path, monkeypatch):
  """The block after the quick start runs in its namespace: train_at's two exact results are joint training at the
  recommended alphas, and the Pareto estimate verified three alphas with the same function."""
  (block,) = CONTINUES
  ns = _exec(QUICK_START, tmp_path, monkeypatch)
  exec(compile(block.code, f"{block.doc} python block {block.index}", "exec"), ns)  # pylint: disable=exec-used
  out, front, train = ns["out"], ns["front"], ns["train"]
  rec = np.asarray(out.summary["recommendation"]["alphas"])
  assert out.summary["num_exact_alphas"] == 2 and len(rec) == 2
  np.testing.assert_allclose(out.exact, train(rec), atol=1e-6)
  assert front.verified_alphas.shape == (3, 3)
  np.testing.assert_allclose(front.verified_values, train(front.verified_alphas), atol=1e-6)


@pytest.mark.parametrize("block", IN_PROCESS, ids=_id)
def test_python_block_runs(block, tmp_path, monkeypatch):
  monkeypatch.setenv("PYTHONHASHSEED", "0")
  _exec(block, tmp_path, monkeypatch)


@pytest.mark.parametrize("block", ON_DEVICES, ids=_id)
def test_python_block_runs_on_forced_host_devices(block, tmp_path):
  """Blocks marked `<!-- test: devices=N -->` run in a fresh process that sees N CPU devices; blocks marked
  `<!-- test: fresh process -->` (those that configure JAX before its first computation) in one left as it is."""
  devices = DEVICES_MARKER.search(block.marker).group(1)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  if devices:
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  before = _repo_state()
  proc = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _written(before) == []


@pytest.mark.parametrize("block", BY_OWN_TEST, ids=_id)
def test_guide_code_blocks_are_run_by_the_test_they_name(block):
  """A block marked `<!-- guide-code: tests/test_x.py ... -->` is executed and checked there, from this document."""
  test_file = ROOT / GUIDE_CODE_MARKER.search(block.marker).group(1)
  source = test_file.read_text()
  assert "guide-code:" in source and pathlib.Path(block.doc).name in source, (
      f"{test_file.name} does not read the guide-code block of {block.doc}")


# ---------------------------------------------------------------------------------------------------------------
# Shell commands.


class Command(NamedTuple):
  doc: str
  argv: list


def _commands() -> list[Command]:
  out = []
  for block in SHELL:
    for line in block.code.replace("\\\n", " ").splitlines():
      argv = shlex.split(line, comments=True)
      while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
      if argv:
        out.append(Command(block.doc, argv))
  return out


COMMANDS = _commands()
PYTHON_EXE = {"python", "python3", ".venv/bin/python"}


def _is_module_run(argv) -> bool:
  return len(argv) >= 3 and argv[0] in PYTHON_EXE and argv[1] == "-m"


def test_every_shell_command_is_a_kind_this_file_checks():
  unknown = [" ".join(c.argv) for c in COMMANDS if not (c.argv[0] == "make" or _is_module_run(c.argv))]
  assert unknown == [], f"shell commands neither run nor checked here: {unknown}"


def test_make_targets_exist():
  makefile = (ROOT / "Makefile").read_text()
  targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:", makefile, flags=re.M))
  for command in COMMANDS:
    if command.argv[0] == "make":
      assert len(command.argv) == 2 and command.argv[1] in targets, f"{command.doc}: {command.argv} not in {targets}"


def test_summary_commands_run():
  """`python -m experiments.summary ...` is quick: each runs as written and prints the table of its runs."""
  runs = [c for c in COMMANDS if _is_module_run(c.argv) and c.argv[2] == "experiments.summary"]
  assert runs
  for command in runs:
    proc = subprocess.run([sys.executable, *command.argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(summary.HEADER)


# In a fresh process (absl keeps flags in one global registry): import each module, define its flags (benchmarks
# define them only when run as scripts, in `define_flags`), then parse every documented command line as absl would,
# which loads `--config` files with their variants and applies every `--config.x.y` override; and check each flag
# by name: `--config` files exist and `get_config(variant)` loads, overrides name existing fields, and every other
# flag is one the module itself defines.
_FLAG_CHECK = r"""
import importlib, json, os, sys
from absl import flags
FLAGS = flags.FLAGS
absl_own = set(FLAGS)
errors = []
for module_name, commands in json.load(sys.stdin).items():
  for name in set(FLAGS) - absl_own:  # the previous module's flags (and its validators) go
    delattr(FLAGS, name)
  try:
    module = importlib.import_module(module_name)
    if hasattr(module, "define_flags"):
      module.define_flags()
    shared = getattr(module, "devices", None)  # experiments.devices: its --cpu_devices is every entry point's flag
    if shared is not None and "cpu_devices" not in FLAGS:
      importlib.reload(shared)
  except Exception as e:
    errors.append(f"{module_name}: cannot import and define its flags: {type(e).__name__}: {e}")
    continue
  own = {f.name for name in (module_name, "experiments.devices")
         for f in FLAGS.flags_by_module_dict().get(name, [])
         if name == module_name or getattr(module, "devices", None) is not None}
  for argv in commands:
    where = f"python -m {module_name} {' '.join(argv)}"
    for arg in argv:
      if not arg.startswith("-"):
        continue
      name = arg.lstrip("-").split("=", 1)[0]
      if "." in name:  # --config.a.b=value
        root, path = name.split(".", 1)
        if root not in own:
          errors.append(f"{where}: --{root} is not a flag of {module_name}")
      elif name not in own and not (name.startswith("no") and name[2:] in own):
        errors.append(f"{where}: --{name} is not a flag of {module_name} (it defines {sorted(own)})")
      if name == "config" and "=" in arg:
        path, _, variant = arg.split("=", 1)[1].partition(":")
        if not os.path.isfile(path):
          errors.append(f"{where}: no config file {path}")
          continue
        try:
          config = importlib.import_module(path[:-3].replace("/", ".")).get_config(variant or None)
        except Exception as e:
          errors.append(f"{where}: {path}:{variant} does not load: {type(e).__name__}: {e}")
          continue
        for other in argv:
          if other.startswith("--config."):
            node = config
            for part in other.split("=", 1)[0][len("--config."):].split("."):
              if part not in node:
                errors.append(f"{where}: {other.split('=')[0]} names no field of {path}:{variant}")
                break
              node = node[part]
    try:
      FLAGS.unparse_flags()
      sys.argv = [module_name, *argv]
      FLAGS(sys.argv)
    except Exception as e:
      errors.append(f"{where}: {type(e).__name__}: {e}")
print(json.dumps(errors))
"""


def test_module_commands_have_valid_flags():
  by_module = {}
  for command in COMMANDS:
    if _is_module_run(command.argv) and command.argv[2] != "experiments.summary":
      by_module.setdefault(command.argv[2], []).append(command.argv[3:])
  assert "experiments.preview" in by_module and any(m.startswith("experiments.benchmarks.") for m in by_module)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _FLAG_CHECK], input=json.dumps(by_module), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------------------------------------------------
# Links and the generated table.


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def _anchors(path: pathlib.Path) -> set[str]:
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
  return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
  path = ROOT / doc
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  assert links
  for link in links:
    if re.match(r"[a-z]+:", link):
      continue
    target, _, anchor = link.partition("#")
    file = (path.parent / target).resolve() if target else path
    assert file.exists(), f"{doc}: link {link!r} points to nothing"
    assert ROOT in file.parents or file == ROOT, f"{doc}: link {link!r} leaves the repository"
    if anchor:
      assert anchor in _anchors(file), f"{doc}: no heading for #{anchor} in {file.name}"


def test_slug_follows_github():
  assert _slug("A pretrained transformer with LoRA; PEFT adapters in and out") == (
      "a-pretrained-transformer-with-lora-peft-adapters-in-and-out")
  assert _slug("Posteriors: the fit drivers") == "posteriors-the-fit-drivers"
  assert _slug("MiniLM + LoRA on sentiment (`sentiment`)") == "minilm--lora-on-sentiment-sentiment"
  assert _slug("digits: the main job (`digits_imbalanced`)") == "digits-the-main-job-digits_imbalanced"


def test_readme_results_table_is_generated_from_the_recorded_metrics():
  text = (ROOT / "README.md").read_text()
  m = re.search(r"<!-- summary: --experiments=(\S+) -->\n(.*?)<!-- /summary -->", text, flags=re.S)
  assert m, "README.md lacks the <!-- summary: --experiments=... --> ... <!-- /summary --> block"
  names = m.group(1).split(",")
  assert sorted(names) == summary.available(), "the README's table leaves out a recorded run"
  assert m.group(2).strip() == summary.table(names)


def test_summary_prints_recorded_intervals_and_never_invents_one(tmp_path):
  """Folders with `mse_ci` and `interval` show them; folders without say so; a missing folder is a clear error."""
  for name, extra in (("old", {}), ("new", {"interval": {"kind": "bootstrap over test examples", "seeds": 1,
                                                         "samples": 1000, "level": 0.95}})):
    (tmp_path / name).mkdir()
    methods = {"simple": {"mse": 0.25, **({"mse_ci": [0.2, 0.3125]} if extra else {})}, "ivon": {"mse": 1 / 3}}
    (tmp_path / name / "metrics.json").write_text(json.dumps({"methods": methods, **extra}))
  lines = summary.table(["new", "old"], results=tmp_path).splitlines()
  assert lines[:2] == summary.HEADER.splitlines()
  assert lines[2] == ("| [new](experiments/results/new/report.md) | simple | 0.25 | [0.2, 0.312] (bootstrap over test "
                      "examples, 1000 resamples) | 1 |")
  assert lines[3] == "|  | ivon | 0.333 | n/a (none recorded) | 1 |"  # the run has intervals, this method none
  assert lines[4].endswith(f"| 0.25 | {summary.NOT_RECORDED} | 1 |") and lines[4].startswith("| [old]")
  with pytest.raises(ValueError, match="'missing'.*recorded runs: \\['new', 'old'\\]"):
    summary.table(["missing"], results=tmp_path)


def test_summary_docstring_example():
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for test in finder.find(summary, "experiments.summary"):
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.attempted >= 1 and result.failed == 0

