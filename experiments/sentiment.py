"""Figs. 5/6 on real text: previews of LoRA-finetuned MiniLM on sentiment in three domains vs joint LoRA finetuning.

Config: `configs/sentiment.py`. The pieces are library calls: `bmerge.data.load_sentiment` (tasks),
`bmerge.models.bert` (MiniLM, LoRA, the frozen layers' cache, the losses and accuracies), `bmerge.fit.adamw_sg` /
`bmerge.fit.ivon` (posteriors over LoRA + head), `bmerge.exact.joint_train` (the exact baseline) and
`bmerge.compare` (previews, scores, figures, report). The cached hidden states and the posteriors are saved in the
workdir, preview and joint-training chunks too, so a second run recomputes nothing.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

import bmerge
from bmerge import checkpoint
from bmerge import data
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import merge
from bmerge import report
from bmerge.assess.comparison import Entry
from bmerge.models import bert

PAPER = {  # Table 1 (MSE) and Table 2 (best preview accuracy, the exact accuracy there; best exact), Fig. 6
    "source": "Tables 1-2, Fig. 6: RoBERTa-base after IMDB, finetuned on RT / SST-2 / Yelp with AdamW, full model",
    "methods": {"simple": {"label": "Simple", "mse": 0.0314, "best_preview": 93.5, "exact_at_best": 95.2},
                "adamw_sg": {"label": "Hessian-weighted (AdamW-SG)", "mse": 0.0281, "best_preview": 93.6,
                             "exact_at_best": 95.3}},
    "exact_best": 95.5,
    "gemma": "Fig. 7, GEMMA-2B-it + LoRA (IVON-Hess), one two-task line (BLEU): MSE Simple 0.5380, Hessian 0.4657",
}
DESCRIBE = {"simple": "AdamW LoRA + head -> simple averaging (Eq. 2)",
            "adamw_sg": "AdamW + squared-gradient Fisher -> Hessian-weighted (Eq. 10)",
            "ivon": "IVON -> Hessian-weighted (Eq. 10), IVON-Hess"}


def _timed(costs: dict, name: str, fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  costs[name] = costs.get(name, 0.0) + time.perf_counter() - t0
  return out


def build_model(config) -> bert.Classifier:
  """MiniLM (or `config.model_path`) + a 2-class head + LoRA adapters, all initialised from `config.seed`."""
  encoder = bert.load(config.model_path or None)
  model = bert.Classifier(encoder, 2, rngs=nnx.Rngs(config.seed))
  return bert.add_lora(model, config.lora.rank, rngs=nnx.Rngs(config.seed + 1), alpha=config.lora.alpha,
                       targets=tuple(config.lora.targets), layers=tuple(config.lora.layers))


def load_texts(config) -> dict:
  """{split: (texts per task, labels per task)}: seeded subsets of `num_train` / `num_test` texts of every task."""
  tasks = data.load_sentiment(tuple(config.tasks), seed=config.seed, test_fraction=config.test_fraction)
  rng = np.random.default_rng(config.seed)
  out = {"train": ([], []), "test": ([], [])}
  for name, ds in tasks.items():
    for split, x, y, n in (("train", ds.train_x, ds.train_y, config.num_train),
                           ("test", ds.test_x, ds.test_y, config.num_test)):
      if n > len(y):
        raise ValueError(f"config.num_{split} = {n} but task {name!r} has only {len(y)} {split} texts.")
      pick = rng.permutation(len(y))[:n]
      out[split][0].append(list(x[pick]))
      out[split][1].append(np.asarray(y[pick], np.int32))
  return out


def cached_hidden(model, texts: list, config, workdir: str) -> bert.Hidden:
  """`bert.hidden_states` of every text after the frozen layers ([N, max_length, hidden]), saved in the workdir."""
  k = bert.frozen_layers(model)
  key = checkpoint.config_fingerprint({"texts": texts, "k": k, "max_length": config.max_length,
                                       "model_path": config.model_path})
  path = os.path.join(workdir, f"hidden-{key[:16]}")
  if os.path.isdir(path):
    arrays = checkpoint.restore_arrays(path)
    return bert.Hidden(arrays["hidden"], arrays["attention_mask"])
  tokens = bert.tokenize(texts, config.model_path or None, max_length=config.max_length, padding="max_length")
  hidden = bert.hidden_states(model, tokens, k, batch_size=config.cache_batch_size)
  checkpoint.save_arrays(path, hidden._asdict())
  return hidden


def minibatches(config, num_tasks: int) -> np.ndarray:
  """[num_steps, T, batch_size] indices into every task's training texts: epochs of a seeded permutation per task."""
  rng = np.random.default_rng([config.seed, 1])
  need = config.num_steps * config.batch_size
  epochs = -(-need // config.num_train)
  idx = [np.concatenate([rng.permutation(config.num_train) for _ in range(epochs)])[:need] for _ in range(num_tasks)]
  return np.stack(idx).reshape(num_tasks, config.num_steps, config.batch_size).transpose(1, 0, 2)


def _schedule(learning_rate: float, num_steps: int):
  return optax.cosine_decay_schedule(learning_rate, num_steps)


def adamw(config) -> optax.GradientTransformation:
  """The optimizer of the single-task AdamW runs and of joint training: `bmerge.fit.adamw_sg` builds the same."""
  a = config.adamw
  return optax.adamw(_schedule(a.learning_rate, config.num_steps), a.b1, a.b2, a.eps, weight_decay=a.weight_decay)


def build_posteriors(config, apply, init: dict, train, batches, cache: str, costs: dict) -> dict:
  """{"adamw_sg": DiagGaussian, "ivon": DiagGaussian}, each stacked over the T tasks (one compiled call, vmapped
  over tasks) and cached by config in `cache`.

  `train` = (Hidden [T, N, ...], labels [T, N]); `batches` = (Hidden [T, S, B, ...], labels [T, S, B]).
  """
  num_tasks = train[1].shape[0]
  keys = jax.random.split(jax.random.key(config.seed), (2, num_tasks))
  a, v = config.adamw, config.ivon
  subset = lambda *names: {**{n: config.to_dict()[n] for n in names}, **{n: config.to_dict()[n] for n in (
      "seed", "tasks", "test_fraction", "model_path", "max_length", "num_train", "lora", "num_steps", "batch_size")}}

  def adamw_sg(key, batches, inputs, labels, apply):
    return fit.adamw_sg(key, functools.partial(bert.cross_entropy, apply), init, batches,
                        learning_rate=_schedule(a.learning_rate, config.num_steps), fisher_data=(inputs, labels),
                        logits_fn=apply, weight_decay=a.weight_decay, b1=a.b1, b2=a.b2, eps=a.eps, fisher=a.fisher,
                        fisher_chunk_size=a.fisher_chunk_size)

  def ivon(key, batches, apply):
    return fit.ivon(key, functools.partial(bert.cross_entropy, apply), init, batches,
                    ess=v.ess_scale * config.num_train, learning_rate=_schedule(v.learning_rate, config.num_steps),
                    hess_init=v.hess_init, weight_decay=v.weight_decay, mc_samples=v.mc_samples)

  out = {}
  out["adamw_sg"] = _timed(costs, "posteriors adamw_sg", lambda: checkpoint.cached_posterior(
      cache, "adamw_sg", subset("adamw"),
      lambda: jax.jit(jax.vmap(adamw_sg, in_axes=(0, 0, 0, 0, None)))(keys[0], batches, *train, apply)))
  out["ivon"] = _timed(costs, "posteriors ivon", lambda: checkpoint.cached_posterior(
      cache, "ivon", subset("ivon"), lambda: jax.jit(jax.vmap(ivon, in_axes=(0, 0, None)))(keys[1], batches, apply)))
  return out


def _edge_notes(exact_alphas, previews: dict, alphas, exact_acc: np.ndarray, names) -> tuple[list, dict]:
  """Per two-task line (a simplex edge): each preview's MSE against joint training in the pair's mean accuracy (as
  pairs.png draws it) and its largest gap; markdown lines and the numbers."""
  rows = {tuple(np.round(a, 8)): i for i, a in enumerate(alphas)}
  at = np.asarray([rows[tuple(np.round(a, 8))] for a in exact_alphas])
  lines = ["| line | " + " | ".join(f"{m}: MSE, largest gap (alpha_1 there)" for m in previews) + " |",
           "|---|" + "---|" * len(previews)]
  out = {}
  for (i, j), edge in grid.pair_edges(exact_alphas).items():
    pair = lambda acc, r: 0.5 * (acc[r, 1 + i] + acc[r, 1 + j])
    line, cells = {}, []
    for m, values in previews.items():
      gap = pair(values, at[edge]) - pair(exact_acc, edge)
      worst = int(np.argmax(np.abs(gap)))
      line[m] = {"mse": float(np.mean(gap ** 2)), "largest_gap": float(gap[worst]),
                 "alpha_1": float(exact_alphas[edge[worst], i])}
      cells.append(f"{line[m]['mse']:.4f}, {100 * gap[worst]:+.1f} ({line[m]['alpha_1']:.1f})")
    out[f"{names[i]} & {names[j]}"] = line
    lines.append(f"| {names[i]} & {names[j]} | " + " | ".join(cells) + " |")
  return lines, out


def _number(x) -> str:
  return "n/a" if x is None else f"{x:.2f}"  # Spearman is None where a surface is constant


def reading(summary: dict, lines: dict, vertex_gaps: dict) -> str:
  """The report's reading, written from the numbers: does Hessian weighting track joint training better than simple
  averaging, over the simplex and along each two-task line?"""
  m = summary["methods"]
  pct = lambda x: f"{100 * x:.1f} %"
  out = []
  for hess in [n for n in m if n != "simple"]:
    better = m[hess]["mse"] < m["simple"]["mse"]
    out.append(f"- Over the {summary['num_exact_alphas']} joint-training alphas, {hess} "
               f"{'tracks joint training better than' if better else 'does not track joint training better than'} "
               f"simple averaging by MSE: {m[hess]['mse']:.4f} vs {m['simple']['mse']:.4f} (Spearman "
               f"{_number(m[hess]['spearman'])} vs {_number(m['simple']['spearman'])}).")
    wins = [e for e, v in lines.items() if v[hess]["mse"] < v["simple"]["mse"]]
    ties = [e for e, v in lines.items() if v[hess]["mse"] == v["simple"]["mse"]]
    out.append(f"  Along the two-task lines its MSE is the smaller on {len(wins)} of {len(lines)}"
               f"{' (' + ', '.join(wins) + ')' if wins else ''}{f', equal on {len(ties)}' if ties else ''}.")
  out.append("- Joint training at each preview's best alpha: " + ", ".join(
      f"{n} {pct(v['exact_at_best'])} at {v['best_alpha']}" for n, v in m.items()) +
      f"; the best joint training: {pct(summary['exact_best'])} at {summary['exact_best_alpha']}.")
  gaps = {n: max((v[n] for v in lines.values()), key=lambda g: abs(g["largest_gap"])) for n in m}
  out.append("- The largest gap to joint training on any line (points of the pair's mean accuracy, preview minus "
             "exact, at the first-named task's weight): " + ", ".join(
                 f"{n} {100 * g['largest_gap']:+.1f} ({g['alpha_1']:.1f})" for n, g in gaps.items()) + ".")
  out.append("- At the vertices (one task only), mean |preview - exact| of the mean accuracy: " + ", ".join(
      f"{n} {100 * g:.1f} points" for n, g in vertex_gaps.items()) + ". Simple averaging and AdamW-SG return the "
      "single-task AdamW models there, which joint training at a vertex reproduces (same init, optimizer and "
      "minibatches), so their gap there is numerical; IVON's vertices are the IVON models, so its gap includes the "
      "difference between the learners.")
  return "\n".join(out)


class Setup(NamedTuple):
  """Everything the learners, the previews and joint training share."""

  model: bert.Classifier  # MiniLM + LoRA + head at their common initialisation
  apply: jax.tree_util.Partial  # apply(trainable, Hidden) -> logits: the adapted top layers and the head
  init: dict  # the common initial LoRA + head parameters
  train: tuple  # (Hidden [T, N, L, H], labels [T, N]): every task's training texts after the frozen layers
  test: tuple  # (Hidden [T * N_test, L, H], labels, membership [T * N_test, T]): the eval batch of task_accuracies
  task_batches: tuple  # (Hidden [T, S, B, L, H], labels [T, S, B]): the minibatch sequence of every task


def prepare(config, workdir: str) -> Setup:
  """The model at its initialisation and the texts after its frozen layers (cached in `<workdir>/hidden`)."""
  num_tasks = len(config.tasks)
  model = build_model(config)
  texts = load_texts(config)
  flat = [t for split in ("train", "test") for task in texts[split][0] for t in task]
  hidden = cached_hidden(model, flat, config, os.path.join(workdir, "hidden"))
  apply, init = bert.split(model, start_layer=bert.frozen_layers(model))
  n_train = num_tasks * config.num_train
  train = (jax.tree.map(lambda x: x[:n_train].reshape((num_tasks, config.num_train) + x.shape[1:]), hidden),
           np.stack(texts["train"][1]))
  test = (jax.tree.map(lambda x: x[n_train:], hidden), np.concatenate(texts["test"][1]),
          np.repeat(np.eye(num_tasks, dtype=np.float32), config.num_test, axis=0))
  idx = minibatches(config, num_tasks)  # [S, T, B]
  take = lambda x: np.stack([x[t][idx[:, t]] for t in range(num_tasks)])  # [T, S, B, ...]
  return Setup(model, apply, init, train, test, (jax.tree.map(take, train[0]), take(train[1])))


def run(config, workdir: str) -> bmerge.comparison.Comparison:
  """Caches the frozen layers, trains the posteriors, previews, trains jointly at the exact alphas, reports."""
  os.makedirs(workdir, exist_ok=True)
  costs: dict[str, float] = {}
  names = list(config.tasks)
  num_tasks = len(names)
  alphas = grid.simplex(num_tasks, config.spacing)
  exact_alphas = grid.simplex(num_tasks, config.exact_spacing)
  if any(not np.any(np.all(np.isclose(alphas, a), axis=1)) for a in exact_alphas):  # fail before any training
    raise ValueError(f"config.exact_spacing = {config.exact_spacing} must be a multiple of config.spacing = "
                     f"{config.spacing}: every joint-training alpha must be a preview alpha.")
  t0 = time.perf_counter()
  apply, init, train, test, task_batches = prepare(config, workdir)[1:]
  costs["load + cache frozen layers"] = time.perf_counter() - t0

  posts = build_posteriors(config, apply, init, train, task_batches, os.path.join(workdir, "posteriors"), costs)
  eval_fn = functools.partial(bert.task_accuracies, apply)

  t0 = time.perf_counter()
  joint_batches = jax.tree.map(lambda x: np.swapaxes(x, 0, 1), task_batches)  # [S, T, B, ...]
  exact_acc = np.asarray(exact.joint_train(functools.partial(bert.task_losses, apply), init, exact_alphas,
                                           adamw(config), None, joint_batches, stepwise=True, eval_fn=eval_fn,
                                           eval_batch=test, chunk_size=config.exact_chunk_size, workdir=workdir,
                                           tag="exact", progress=False))
  costs["exact"] = time.perf_counter() - t0

  entries = [Entry("simple", posts["adamw_sg"], merge.simple_average, DESCRIBE["simple"]),
             Entry("adamw_sg", posts["adamw_sg"], merge.hessian_weighted, DESCRIBE["adamw_sg"]),
             Entry("ivon", posts["ivon"], merge.hessian_weighted, DESCRIBE["ivon"])]
  out = bmerge.compare(
      entries, eval_fn, test, alphas, exact=exact_acc, exact_alphas=exact_alphas, folder=workdir, workdir=workdir,
      percent=True, metric="test accuracy (mean over tasks)", task_names=names, costs=costs, paper=PAPER,
      title="MiniLM + LoRA on sentiment in three domains (paper Figs. 5-6)", details={"config": config.to_dict()},
      chunk_size=config.chunk_size, recommend="adamw_sg")
  # The reading needs the scores, so it is written into the report once they exist.
  edge_lines, edges = _edge_notes(exact_alphas, out.previews, alphas, exact_acc, names)
  vertices = [int(np.flatnonzero(np.all(np.isclose(exact_alphas, e), axis=1))[0]) for e in np.eye(num_tasks)]
  at = [int(np.flatnonzero(np.all(np.isclose(alphas, e), axis=1))[0]) for e in np.eye(num_tasks)]
  vertex_gaps = {n: float(np.mean(np.abs(v[at, 0] - exact_acc[vertices, 0]))) for n, v in out.previews.items()}
  notes = [reading(out.summary, edges, vertex_gaps), "",
           "Along the two-task lines (the simplex edges where the third weight is 0; paper Fig. 5): the MSE of the "
           "mean per-task accuracy against joint training, and the largest gap (preview minus exact, in points) with "
           "the weight of the first-named task there:", ""] + edge_lines + [
           "", f"Paper, {PAPER['gemma']}: Hessian weighting tracked joint training better along the line.", "",
           "Our accuracies are fractions in [0, 1] and the MSE is over the joint-training alphas. The paper's RoBERTa "
           "row finetunes the whole model after an IMDB stage; here only LoRA on "
           f"{'/'.join(config.lora.targets)} of layers {list(config.lora.layers)} and the head train, on "
           f"{config.num_train} texts per task for {config.num_steps} steps of {config.batch_size} texts per task, "
           f"tested on {config.num_test} texts per task; joint training takes {config.batch_size} texts of every "
           f"task per step. IVON's effective sample size is {config.ivon.ess_scale:g} x N (a tempered posterior; a "
           "common scale of every task's precision leaves the Hessian-weighted merge unchanged). The simple average "
           "uses the AdamW runs of AdamW-SG (their cost is in 'posteriors adamw_sg', with the Fisher pass)."]
  summary = {**out.summary, "notes": "\n".join(notes), "pair_lines": edges}
  out.paths["metrics"].write_text(json.dumps(summary, indent=1, allow_nan=False))
  report.write(workdir, summary, [pathlib.Path(workdir) / f for f in summary["figures"]])
  return out._replace(summary=summary)
