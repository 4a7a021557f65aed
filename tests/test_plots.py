"""plots.plot_runs refuses unknown metrics; experiments/plot.py draws the comparison PNGs."""
import json
import os
import subprocess
import sys

import matplotlib.image
import pytest

from sparsefl_jax import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(n, density):
  rows = []
  for t in range(1, n + 1):
    row = {"round": t, "train_loss": 1.0 / t, "global_density": density,
           "cumulative_uplink_bytes": 1000 * t, "cumulative_downlink_bytes": 2000 * t}
    if t % 2 == 0:
      row["test_accuracy"] = 0.5 + 0.05 * t
    rows.append(row)
  return rows


RUNS = {"fedavg": _rows(6, 1.0), "topk": _rows(6, 0.2)}


def test_plot_runs_refuses_an_unknown_metric_listing_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match=r"metric 'test_acuracy' is not one of \[.*'test_accuracy'"):
    plots.plot_runs(RUNS, str(tmp_path / "a.png"), y="test_acuracy")
  with pytest.raises(ValueError, match="metric 'rounds'"):
    plots.plot_runs(RUNS, str(tmp_path / "a.png"), x="rounds")
  assert not (tmp_path / "a.png").exists()


def test_plot_runs_refuses_a_known_metric_no_run_has(tmp_path):
  with pytest.raises(ValueError, match="no run has both 'round' and 'mask_iou'"):
    plots.plot_runs(RUNS, str(tmp_path / "a.png"), y="mask_iou")


def test_plot_runs_accepts_layer_keys_and_derived_mb(tmp_path):
  runs = {"r": [{**r, "density/Dense_0": 0.3} for r in RUNS["topk"]]}
  assert os.path.getsize(plots.plot_runs(runs, str(tmp_path / "d.png"),
                                         y="density/Dense_0")) > 1000
  assert os.path.getsize(plots.plot_runs(runs, str(tmp_path / "mb.png"),
                                         x="cumulative_mb")) > 1000


def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plot.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_plot_cli_draws_three_figures_for_any_set_of_workdirs(tmp_path):
  dirs = []
  for name, rows in RUNS.items():
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dirs.append(str(d))
  out = tmp_path / "figs"
  proc = _run_cli(f"--workdirs={','.join(dirs)}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "density_vs_round.png"):
    img = matplotlib.image.imread(str(out / name))
    assert img.shape[0] > 100 and img[..., :3].std() > 0.05, name


def test_plot_cli_names_a_workdir_without_metrics(tmp_path):
  proc = _run_cli(f"--workdirs={tmp_path / 'missing'}", f"--out={tmp_path}")
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "missing" in lines[0] and "no metrics.jsonl" in lines[0]
