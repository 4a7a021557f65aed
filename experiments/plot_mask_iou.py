r"""Draw the pairwise-round IoU heat-map of a run's saved global masks (SparsyFed Fig. 3).

  python experiments/plot_mask_iou.py --workdir=runs/sparsyfed   # needs a run with --mask_every
Writes <workdir>/mask_iou.png and prints the mean IoU of consecutive saved masks.
"""
import os
import sys

from absl import app, flags

from sparsefl_jax import metrics, plots

flags.DEFINE_string("workdir", None, "Run folder holding masks/ (from --mask_every=N).")
flags.DEFINE_string("out", "", "Output PNG (default <workdir>/mask_iou.png).")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  mask_dir = os.path.join(FLAGS.workdir, "masks")
  if not os.path.isdir(mask_dir) or not os.listdir(mask_dir):
    sys.stderr.write(f"error: no saved masks in {mask_dir}; run with --mask_every=N\n")
    sys.exit(2)
  rounds, iou = metrics.pairwise_mask_iou(metrics.load_global_masks(mask_dir))
  out = FLAGS.out or os.path.join(FLAGS.workdir, "mask_iou.png")
  plots.plot_mask_iou_heatmap(rounds, iou, out)
  consecutive = [iou[i, i + 1] for i in range(len(rounds) - 1)]
  mean = sum(consecutive) / len(consecutive) if consecutive else 1.0
  print(f"wrote {out}: {len(rounds)} masks, mean consecutive IoU {mean:.4f}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
