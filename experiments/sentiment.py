"""Figs. 5/6 on real text: previews of LoRA-finetuned MiniLM on sentiment in three domains vs joint LoRA finetuning.

Read top-down, one stage after the other (config: `configs/sentiment.py`):

1. data: seeded subsets of every domain's texts (`bmerge.data.load_sentiment`), run once through MiniLM's frozen
   bottom layers (`bmerge.models.bert.hidden_states`), and every task's minibatch indices
   (`bmerge.data.minibatch_indices`): one sequence shared by the single-task runs and every joint-training alpha;
2. posteriors over LoRA + head: AdamW-SG (`bmerge.fit.adamw_sg`) and IVON-Hess (`bmerge.fit.ivon`), every task in
   one compiled call;
3. previews: simple averaging of the AdamW models (Eq. 2) and Hessian-weighted merging (Eq. 10) of both posteriors;
4. the exact answer: weighted joint LoRA finetuning (`bmerge.exact.joint_train`, paper Eq. 1) with AdamW from the
   same start on the same minibatches;
5. report: `bmerge.compare` scores every preview from per-example results (correct or not, per test text), with
   intervals over test examples; the reading and the two-task lines are added to its report.

The hidden states, the posteriors and the exact answer are cached in `<workdir>/cache` by `bmerge.checkpoint.cached`
(keyed on the model, the data's content, the minibatch indices and every learner argument, stored with the seconds
their build took), preview and joint-training chunks in the workdir, so a second run recomputes nothing.

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging, 2024 (Eqs. 1, 2, 10; Sec. 4; Figs. 5-7; Tables 1-2; App. B.5).
  Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. ICLR 2022.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
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
from bmerge import timing
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


# ---------------------------------------------------------------------------------------------------------------
# Data.


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


class Data(NamedTuple):
  """The model at its initialisation and every text after its frozen layers: what the learners, the previews and
  joint training share."""

  model: bert.Classifier  # MiniLM + LoRA + head at their common initialisation
  apply: jax.tree_util.Partial  # apply(trainable, Hidden) -> logits: the adapted top layers and the head
  init: dict  # the common initial LoRA + head parameters
  train: tuple  # (Hidden [T, N, L, H], labels [T, N]): every task's training texts after the frozen layers
  test: tuple  # (Hidden [T * N_test, L, H], labels [T * N_test]): the evaluation batch of `correct`
  test_tasks: np.ndarray  # [T * N_test, T]: 1 where test text n belongs to task t
  minibatches: np.ndarray  # [T, S, B] indices into every task's training texts (`bmerge.data.minibatch_indices`)
  cost: timing.Cost  # what running the texts through the frozen layers cost (as measured when it ran)


def load_data(config, cache: str) -> Data:
  """The texts of `load_texts` through the frozen layers of `build_model` (cached in `cache`), split by task."""
  num_tasks = len(config.tasks)
  model = build_model(config)
  texts = load_texts(config)
  tokens = bert.tokenize([t for split in ("train", "test") for task in texts[split][0] for t in task],
                         config.model_path or None, max_length=config.max_length, padding="max_length")
  k = bert.frozen_layers(model)
  hidden = checkpoint.cached(cache, "hidden", {"model": model, "tokens": tokens, "num_layers": k},
                             lambda: bert.hidden_states(model, tokens, k, batch_size=config.cache_batch_size))
  apply, init = bert.split(model, start_layer=k)
  n_train = num_tasks * config.num_train
  train = (jax.tree.map(lambda x: x[:n_train].reshape((num_tasks, config.num_train) + x.shape[1:]), hidden.value),
           np.stack(texts["train"][1]))
  test = (jax.tree.map(lambda x: x[n_train:], hidden.value), np.concatenate(texts["test"][1]))
  idx = data.minibatch_indices(config.seed, [config.num_train] * num_tasks, config.num_steps, config.batch_size)
  return Data(model, apply, init, train, test, np.repeat(np.eye(num_tasks), config.num_test, axis=0), idx,
              hidden.cost("hidden states (frozen layers)"))


def task_batches(d: Data) -> tuple:
  """(Hidden [T, S, B, L, H], labels [T, S, B]): every task's minibatch at every step."""
  take = lambda x: np.stack([x[t][d.minibatches[t]] for t in range(len(d.minibatches))])
  return jax.tree.map(take, d.train[0]), take(d.train[1])


# ---------------------------------------------------------------------------------------------------------------
# Posteriors.


def _schedule(learning_rate: float, num_steps: int):
  return optax.cosine_decay_schedule(learning_rate, num_steps)


def adamw(config) -> optax.GradientTransformation:
  """The optimizer of the single-task AdamW runs and of joint training: `bmerge.fit.adamw_sg` builds the same."""
  a = config.adamw
  return optax.adamw(_schedule(a.learning_rate, config.num_steps), a.b1, a.b2, a.eps, weight_decay=a.weight_decay)


def _adamw_sg(a, num_steps: int, init: dict, apply, train: tuple, keys, batches):
  """AdamW-SG (`a` = config.adamw) of every task, vmapped over the leading task axis of `train`, `keys`, `batches`;
  the Fisher pass runs over all of the task's training texts."""
  def one(key, batches, inputs, labels, apply):
    return fit.adamw_sg(key, functools.partial(bert.cross_entropy, apply), init, batches,
                        learning_rate=_schedule(a.learning_rate, num_steps), fisher_data=(inputs, labels),
                        logits_fn=apply, weight_decay=a.weight_decay, b1=a.b1, b2=a.b2, eps=a.eps, fisher=a.fisher,
                        fisher_chunk_size=a.fisher_chunk_size)
  return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))(keys, batches, *train, apply)


def _ivon(v, num_steps: int, ess: float, init: dict, apply, keys, batches):
  """IVON (`v` = config.ivon) of every task, vmapped over the leading task axis of `keys` and `batches`."""
  def one(key, batches, apply):
    return fit.ivon(key, functools.partial(bert.cross_entropy, apply), init, batches, ess=ess,
                    learning_rate=_schedule(v.learning_rate, num_steps), hess_init=v.hess_init,
                    weight_decay=v.weight_decay, mc_samples=v.mc_samples)
  return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))(keys, batches, apply)


def build_posteriors(config, d: Data, cache: str) -> dict[str, checkpoint.Cached]:
  """{"adamw_sg": DiagGaussian, "ivon": DiagGaussian}, each stacked over the T tasks and cached in `cache`.

  A cache entry is keyed on the learner with its bound arguments (its settings, the common start, the frozen top
  layer in `apply`, the keys), the content of the training texts' hidden states and labels, and the minibatch indices.
  """
  keys = jax.random.split(jax.random.key(config.seed), (2, len(config.tasks)))
  learners = {
      "adamw_sg": functools.partial(_adamw_sg, config.adamw, config.num_steps, d.init, d.apply, d.train, keys[0]),
      "ivon": functools.partial(_ivon, config.ivon, config.num_steps, config.ivon.ess_scale * config.num_train,
                                d.init, d.apply, keys[1])}
  batches = task_batches(d)
  return {name: checkpoint.cached(cache, name, {"fit": learn, "train": d.train, "minibatches": d.minibatches},
                                  lambda learn=learn: learn(batches))
          for name, learn in learners.items()}


# ---------------------------------------------------------------------------------------------------------------
# Previews.


def correct(apply: jax.tree_util.Partial, trainable: dict, batch: tuple) -> jax.Array:
  """[N] per test text: 1.0 where the predicted label argmax_c apply(trainable, inputs)[n, c] is labels[n], else 0.0.

  `functools.partial(correct, apply)` is the `eval_fn` of `bmerge.compare` with per-example results.
  """
  inputs, labels = batch
  return (jnp.argmax(apply(trainable, inputs), axis=-1) == jnp.asarray(labels)).astype(jnp.float32)


def entries(posteriors: dict) -> list[Entry]:
  """Simple averaging of the AdamW models, and Hessian-weighted merging of AdamW-SG and of IVON."""
  return [Entry("simple", posteriors["adamw_sg"], merge.simple_average, DESCRIBE["simple"]),
          Entry("adamw_sg", posteriors["adamw_sg"], merge.hessian_weighted, DESCRIBE["adamw_sg"]),
          Entry("ivon", posteriors["ivon"], merge.hessian_weighted, DESCRIBE["ivon"])]


# ---------------------------------------------------------------------------------------------------------------
# The exact answer.


def joint_training(config, d: Data, alphas, cache: str, workdir: str) -> checkpoint.Cached:
  """Per-example results [G', N] of weighted joint LoRA finetuning (AdamW) at every alpha, cached in `cache`.

  Every alpha starts from the common initialisation and takes `config.batch_size` texts of every task per step, the
  single-task runs' minibatches, so at a vertex it trains exactly what that task's AdamW run trained.
  """
  train = functools.partial(exact.joint_train, functools.partial(bert.task_losses, d.apply), d.init, alphas,
                            adamw(config), None, stepwise=True, eval_fn=functools.partial(correct, d.apply),
                            eval_batch=d.test, chunk_size=config.exact_chunk_size)
  joint_batches = jax.tree.map(lambda x: np.swapaxes(x, 0, 1), task_batches(d))  # [S, T, B, ...]
  return checkpoint.cached(cache, "exact", {"train": train, "data": d.train, "minibatches": d.minibatches},
                           lambda: train(joint_batches, workdir=workdir, tag="exact", progress=False))


# ---------------------------------------------------------------------------------------------------------------
# Report.


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


def _notes(config) -> str:
  return ("Our accuracies are fractions in [0, 1] and the MSE is over the joint-training alphas. The paper's RoBERTa "
          "row finetunes the whole model after an IMDB stage; here only LoRA on "
          f"{'/'.join(config.lora.targets)} of layers {list(config.lora.layers)} and the head train, on "
          f"{config.num_train} texts per task for {config.num_steps} steps of {config.batch_size} texts per task, "
          f"tested on {config.num_test} texts per task; joint training takes {config.batch_size} texts of every "
          f"task per step. IVON's effective sample size is {config.ivon.ess_scale:g} x N (a tempered posterior; a "
          "common scale of every task's precision leaves the Hessian-weighted merge unchanged). The simple average "
          "uses the AdamW runs of AdamW-SG (their cost is in 'posteriors adamw_sg', with the Fisher pass). Costs are "
          "the seconds each build took when it ran (a resumed run reports them as stored).")


def _add_reading(out: bmerge.Comparison, alphas, exact_alphas, names) -> bmerge.Comparison:
  """The reading (which needs the scores) and the two-task lines, added to metrics.json and the report."""
  previews = {n: v for n, v in out.surfaces.items() if n != "exact"}
  exact_acc = out.surfaces["exact"]
  edge_lines, edges = _edge_notes(exact_alphas, previews, alphas, exact_acc, names)
  vertices = [int(np.flatnonzero(np.all(np.isclose(exact_alphas, e), axis=1))[0]) for e in np.eye(len(names))]
  at = [int(np.flatnonzero(np.all(np.isclose(alphas, e), axis=1))[0]) for e in np.eye(len(names))]
  vertex_gaps = {n: float(np.mean(np.abs(v[at, 0] - exact_acc[vertices, 0]))) for n, v in previews.items()}
  notes = [reading(out.summary, edges, vertex_gaps), "",
           "Along the two-task lines (the simplex edges where the third weight is 0; paper Fig. 5): the MSE of the "
           "mean per-task accuracy against joint training, and the largest gap (preview minus exact, in points) with "
           "the weight of the first-named task there:", ""] + edge_lines + [
           "", f"Paper, {PAPER['gemma']}: Hessian weighting tracked joint training better along the line.", "",
           out.summary.get("notes", "")]
  summary = {**out.summary, "notes": "\n".join(notes), "pair_lines": edges}
  out.paths["metrics"].write_text(json.dumps(summary, indent=1, allow_nan=False))
  report.write(out.paths["metrics"].parent, summary,
               [out.paths["metrics"].parent / f for f in summary["figures"]])
  return out._replace(summary=summary)


def run(config, workdir: str) -> bmerge.Comparison:
  """Data, posteriors, previews, the exact answer and the report, in that order; everything cached in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  cache = os.path.join(workdir, "cache")
  names = list(config.tasks)
  # The preview grid and the joint-training grid inside it (checked before any training).
  alphas, exact_alphas = grid.nested_simplex(len(names), config.spacing, config.exact_spacing)

  d = load_data(config, cache)
  posteriors = build_posteriors(config, d, cache)
  items = entries({name: p.value for name, p in posteriors.items()})
  joint = joint_training(config, d, exact_alphas, cache, workdir)

  costs = {"hidden states (frozen layers)": d.cost, "exact": joint.cost("exact"),
           **{f"posteriors {name}": p.cost(f"posteriors {name}") for name, p in posteriors.items()}}
  options = bmerge.CompareOptions(
      metric="test accuracy (mean over tasks)", percent=True, task_names=names, costs=costs, paper=PAPER,
      title="MiniLM + LoRA on sentiment in three domains (paper Figs. 5-6)", notes=_notes(config),
      details={"config": config.to_dict()}, chunk_size=config.chunk_size, recommend="adamw_sg")
  out = bmerge.compare(items, functools.partial(correct, d.apply), d.test, alphas, exact=joint.value,
                       exact_alphas=exact_alphas, examples=d.test_tasks, folder=workdir, workdir=workdir,
                       options=options)
  return _add_reading(out, alphas, exact_alphas, names)
