"""The Pareto-front benchmark (`experiments/pareto.py`): bmerge.pareto against the baselines on recorded exact grids.

Run: python -m experiments.pareto --config=configs/pareto.py --workdir=experiments/results/pareto
The `:small` variant (tests, CI) replays a synthetic problem: --config=configs/pareto.py:small --workdir=/tmp/pareto

Each problem is a report folder of an experiment with `surfaces.npz` beside its `metrics.json` (written by
`bmerge.compare`); a folder whose subfolders hold `surfaces.npz` too (one per preview seed) gives one seed per file.
Folders without `surfaces.npz` are listed in the report as not replayed. "synthetic" names the generated problem of
`experiments.pareto.synthetic_problem`.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0  # every random choice (Dirichlet draws, preference vectors) comes from it, the problem and the repetition
  # Report folders, relative to the repository root (or absolute).
  c.problems = ("experiments/results/digits_imbalanced", "experiments/results/mnist_imbalanced",
                "experiments/results/mnist_balanced", "experiments/results/resnet20_multiivon",
                "experiments/results/sentiment")
  c.budgets = (3, 5, 10, 20)  # B: exact runs per method
  c.repetitions = 20  # keys per (problem, method); the preview seeds cycle through them where a problem has several
  c.preferences = 200  # Dirichlet(1) weight vectors of the regret
  c.baselines = ("preview_front", "uniform", "random", "quadratic_surrogate", "ehvi_cold")
  c.figure_budget = 10  # the B of the estimated-front figure
  c.workers = 2  # processes over (problem, repetition)
  c.output = ""  # where report.md, metrics.json and the figures go; empty: the workdir
  c.synthetic = ml_collections.ConfigDict(dict(spacing=0.05, seeds=3))

  # The goal, declared before the benchmark runs, for the posterior family each experiment recommends by default
  # (the `recommendation.from` entry of its metrics.json): at B = share_budget, hv_share >= share on share_problem;
  # at B = beat_budget, bmerge.pareto beats every baseline on hv_share with the 95 % interval of the paired difference
  # above 0 on at least beat_problems problems.
  c.goal = ml_collections.ConfigDict(dict(share_problem="mnist_imbalanced", share_budget=10, share=0.95,
                                          beat_budget=5, beat_problems=3))

  if arg == "small":
    c.problems = ("synthetic",)
    c.budgets = (3, 5)
    c.repetitions = 3
    c.preferences = 50
    c.figure_budget = 5
    c.workers = 1
    c.synthetic = ml_collections.ConfigDict(dict(spacing=0.1, seeds=2))
    c.goal = ml_collections.ConfigDict(dict(share_problem="synthetic", share_budget=5, share=0.95, beat_budget=5,
                                            beat_problems=1))
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use ':small' or nothing")
  return c
