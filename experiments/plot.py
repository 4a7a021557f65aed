r"""Compare runs: accuracy vs round, accuracy vs cumulative MB sent, global density vs round.

  python experiments/plot.py --workdirs=runs/fedavg,runs/sparsyfed --out=plots/
Reads each workdir's metrics.jsonl and writes three PNGs to --out (labels: the workdirs'
folder names unless --labels is given). Bad arguments exit 2 with one line.
"""
import os
import sys
from typing import Dict, List

from absl import app, flags

flags.DEFINE_list("workdirs", None, "Comma-separated run folders holding metrics.jsonl.")
flags.DEFINE_list("labels", None, "Legend labels, one per workdir (default: folder names).")
flags.DEFINE_string("out", "plots", "Output folder for the PNGs.")
FLAGS = flags.FLAGS

# (file name, x, y, title)
FIGURES = (
    ("accuracy_vs_round.png", "round", "test_accuracy", "Test accuracy per round"),
    ("accuracy_vs_mb.png", "cumulative_mb", "test_accuracy",
     "Test accuracy against communication"),
    ("density_vs_round.png", "round", "global_density", "Global model density per round"),
)


def load_runs(workdirs: List[str], labels: List[str]) -> Dict[str, list]:
  """{label: metrics rows}; raises ValueError naming a workdir without metrics."""
  from sparsefl_jax.metrics import read_metrics
  runs = {}
  for label, workdir in zip(labels, workdirs):
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if not rows:
      raise ValueError(f"workdir={workdir!r} has no metrics.jsonl rows")
    runs[label] = rows
  return runs


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are --flags")
  from sparsefl_jax import plots   # matplotlib after flag parsing
  workdirs = [w for w in FLAGS.workdirs or [] if w]
  labels = FLAGS.labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  try:
    if not workdirs:
      raise ValueError("workdirs=[] must name at least one run folder")
    if len(labels) != len(workdirs):
      raise ValueError(f"labels={labels} must have one label per workdir ({len(workdirs)})")
    runs = load_runs(workdirs, labels)
    for name, x, y, title in FIGURES:
      path = plots.plot_runs(runs, os.path.join(FLAGS.out, name), x=x, y=y, title=title)
      print(f"wrote {path}")
  except ValueError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
