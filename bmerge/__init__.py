"""bmerge: fast previews of weighted multitask finetuning by Bayesian model merging."""

from bmerge import checkpoint
from bmerge import comparison
from bmerge import curvature
from bmerge import data
from bmerge import em
from bmerge import exact
from bmerge import fit
from bmerge import grid
from bmerge import interop
from bmerge import merge
from bmerge import metrics
from bmerge import models
from bmerge import optim
from bmerge import plot
from bmerge import report
from bmerge.comparison import compare
from bmerge.grid_eval import chunked_map
from bmerge.grid_eval import preview
from bmerge.posteriors import Beta
from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import FullGaussian
from bmerge.posteriors import IsoGaussian
from bmerge.posteriors import Mixture
from bmerge.posteriors import stack
from bmerge.posteriors import unstack

__all__ = [
    "Beta",
    "DiagGaussian",
    "FullGaussian",
    "IsoGaussian",
    "Mixture",
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
    "merge",
    "metrics",
    "models",
    "optim",
    "plot",
    "preview",
    "report",
    "stack",
    "unstack",
]
