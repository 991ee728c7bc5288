"""bmerge: fast previews of weighted multitask finetuning by Bayesian model merging.

The pipeline, one folder a stage:

- `bmerge.optim`   learners and drivers: a task's training run in, its posterior out (IVON, AdamW + squared
                   gradients, MultiIVON, VON, mixtures); `bmerge.fit` runs them on a user's loss and batches.
- `bmerge.merge`   merging rules over a whole alpha grid (simple averaging, task arithmetic, Hessian-weighted,
                   mixture-weighted with a batched EM).
- `bmerge.grid`    alpha grids, `preview` (merge + evaluate every alpha, chunked and compiled) and the exact answer
                   (`joint_train`).
- `bmerge.assess`  metrics, figures, reports, `compare`, and `pareto.estimate` (the Pareto front from a preview
                   and a few real runs).
- `bmerge.io`      the edges: data, checkpoints, PEFT / safetensors.

Posterior types (`DiagGaussian`, `FullGaussian`, `IsoGaussian`, `Mixture`, `Beta`) live in `bmerge.posteriors` and are
exported here.
"""

from bmerge import assess
from bmerge import io
from bmerge import merge
from bmerge import models
from bmerge import optim
from bmerge import timing
from bmerge import grid
from bmerge.assess import comparison
from bmerge.assess import metrics
from bmerge.assess import pareto
from bmerge.assess import plot
from bmerge.assess import report
from bmerge.assess.comparison import CompareOptions
from bmerge.assess.comparison import Comparison
from bmerge.assess.comparison import Entry
from bmerge.assess.comparison import compare
from bmerge.assess.comparison import train_at
from bmerge.assess.pareto import ParetoEstimate
from bmerge.grid import joint as exact
from bmerge.grid.evaluate import chunked_map
from bmerge.grid.evaluate import preview
from bmerge.io import checkpoint
from bmerge.io import data
from bmerge.io import peft as interop
from bmerge.merge import em
from bmerge.optim import curvature
from bmerge.optim import fit
from bmerge.posteriors import Beta
from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import FullGaussian
from bmerge.posteriors import IsoGaussian
from bmerge.posteriors import Mixture
from bmerge.posteriors import stack
from bmerge.posteriors import unstack

__all__ = [
    "Beta",
    "CompareOptions",
    "Comparison",
    "DiagGaussian",
    "Entry",
    "FullGaussian",
    "IsoGaussian",
    "Mixture",
    "ParetoEstimate",
    "assess",
    "checkpoint",
    "chunked_map",
    "compare",
    "comparison",
    "curvature",
    "data",
    "em",
    "exact",
    "fit",
    "grid",
    "interop",
    "io",
    "merge",
    "metrics",
    "models",
    "optim",
    "pareto",
    "plot",
    "preview",
    "report",
    "stack",
    "timing",
    "train_at",
    "unstack",
]
