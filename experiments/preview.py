r"""The main job: build per-task posteriors, preview every alpha of a grid, compare with joint training, report.

  python -m experiments.preview --config=configs/digits_imbalanced.py --workdir=runs/digits_imbalanced
  python -m experiments.preview --config=configs/digits_imbalanced.py:small --workdir=/tmp/smoke
  python -m experiments.preview --config=configs/toy2d.py --workdir=runs/toy2d
  python -m experiments.preview --config=configs/digits_imbalanced.py --workdir=runs/d --config.run_recommended=True

The config's `experiment` names the module in `experiments/` whose `run(config, workdir)` does the work and returns
the `bmerge.comparison.Comparison` of its previews against joint training. Everything finished is saved in the
workdir; running the same command again resumes and recomputes nothing already done. `--cpu_devices N` splits the CPU
into N JAX devices first (default: one per core; see `experiments/devices.py`).
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

from bmerge import report
from experiments import devices

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where posteriors, chunks, metrics, figures and the report go.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines out of the table
  devices.apply()  # one JAX device per core (--cpu_devices): the grid stages spread their alphas over them
  config = FLAGS.config
  module = importlib.import_module(f"experiments.{config.experiment}")
  result = module.run(config, FLAGS.workdir)
  if isinstance(result, dict):  # {"metrics": summary, "report": path, ...}
    summary, report_path = result["metrics"], result["report"]
  else:  # a bmerge.comparison.Comparison
    summary, report_path = result.summary, result.paths["report"]
  print()
  print(report.table(summary))
  rec = summary.get("recommendation")
  if rec:
    print(f"\nrecommended alphas (top {len(rec['alphas'])} of the {rec['from']} preview): {rec['alphas']}")
  joint = summary.get("recommended_joint")
  if joint:
    print(f"joint training there: {joint['joint_accuracy']}; regret vs the best exact alpha: {joint['regret']:.4f}")
  print(f"\nreport: {os.path.abspath(report_path)}")
  print(f"run folder: {os.path.abspath(FLAGS.workdir)}")


if __name__ == "__main__":
  app.run(main)
