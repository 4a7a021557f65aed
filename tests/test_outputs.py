"""TensorBoard events equal to metrics.jsonl (across a resume) and the progress line."""
import io
import os
import shutil

import chex
import numpy as np

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.metrics import read_metrics
from sparsefl_jax.progress import Progress
from sparsefl_jax.writers import TENSORBOARD_DIR, read_scalars, scalar_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected(rows):
  out = {}
  for row in rows:
    for tag, value in scalar_items(row):
      out.setdefault(tag, {})[row["round"]] = value
  return out


def _assert_events_match(workdir):
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  want = _expected(rows)
  got = read_scalars(os.path.join(workdir, TENSORBOARD_DIR))
  assert sorted(got) == sorted(want)
  for tag in want:
    assert sorted(got[tag]) == sorted(want[tag]), tag
    steps = sorted(want[tag])
    # Event scalars are float32 (TensorBoard's simple_value).
    np.testing.assert_allclose([got[tag][s] for s in steps], [want[tag][s] for s in steps],
                               rtol=1e-6, err_msg=tag)
  return rows, got


def test_quickstart_flags_write_tensorboard_events_equal_to_metrics(tmp_path):
  """The quick-start flagfile (on bundled digits, 3 rounds) writes every scalar to TB."""
  cfg = ExperimentConfig.from_flagfile(
      os.path.join(ROOT, "experiments", "flags", "quickstart.flags"), dataset="digits",
      model="mlp_small", rounds=3, eval_every=1, plot_partition=False, progress=False, resume=False,
      workdir=str(tmp_path / "qs"))
  train.run(cfg)
  rows, got = _assert_events_match(cfg.workdir)
  assert len(rows) == 3
  for tag in ("train_loss", "test_accuracy", "uplink_bytes", "cumulative_downlink_bytes"):
    assert tag in got, tag


def test_tensorboard_survives_resume_and_groups_layer_densities(tmp_path):
  cfg = ExperimentConfig(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
                         synthetic_classes=4, synthetic_examples=12, synthetic_test=40,
                         num_clients=4, clients_per_round=2, batch_size=6, lr=0.1,
                         algorithm="topk", sparsity=0.8, rounds=4, checkpoint_every=2,
                         keep_checkpoints=5, progress=False, workdir=str(tmp_path / "r"))
  train.run(cfg)
  # Crash after round 4 was logged but before its checkpoint: resume from round 2.
  shutil.rmtree(os.path.join(cfg.workdir, "checkpoints", "4"))
  train.run(cfg.replace(resume=True))
  rows, got = _assert_events_match(cfg.workdir)
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert all(sorted(v) == [1, 2, 3, 4] for v in got.values())
  layers = [t for t in got if t.startswith("density/")]
  assert len(layers) >= 2, sorted(got)
  assert len(os.listdir(os.path.join(cfg.workdir, TENSORBOARD_DIR))) == 2


def test_tensorboard_flag_off_writes_nothing(tmp_path):
  cfg = ExperimentConfig(dataset="synthetic", model="linear", synthetic_shape="4,4,1",
                         synthetic_examples=8, synthetic_test=20, num_clients=2,
                         clients_per_round=2, batch_size=4, rounds=1, progress=False,
                         tensorboard=False,
                         workdir=str(tmp_path / "off"))
  train.run(cfg)
  assert not os.path.exists(os.path.join(cfg.workdir, TENSORBOARD_DIR))


ROW = {"train_loss": 0.5, "cumulative_uplink_bytes": 2e6, "cumulative_downlink_bytes": 1e6,
       "seconds": 0.1}


def test_progress_in_a_log_writes_plain_lines_every_n_rounds():
  out = io.StringIO()
  p = Progress(10, every=4, stream=out)   # StringIO is not a TTY
  for t in range(1, 11):
    p.update(t, {**ROW, "test_accuracy": 0.9} if t == 10 else ROW)
  p.close()
  lines = out.getvalue().split("\n")
  assert "\r" not in out.getvalue()
  assert [l.split("round ")[1].split(" ")[0] for l in lines if l] == ["4/10", "8/10", "10/10"]
  assert "acc 0.9000" in lines[2] and "sent 3.0 MB" in lines[2]


def test_progress_on_a_terminal_redraws_one_line():
  out = io.StringIO()
  p = Progress(3, stream=out, tty=True)
  for t in range(1, 4):
    p.update(t, ROW)
  p.close()
  text = out.getvalue()
  chex.assert_equal(text.count("\r"), 3)
  assert text.endswith("\n") and text.count("\n") == 1


def test_progress_disabled_is_silent():
  out = io.StringIO()
  p = Progress(3, stream=out, enabled=False, tty=True)
  p.update(1, ROW)
  p.close()
  assert out.getvalue() == ""


def test_launch_script_log_has_plain_progress_lines(tmp_path):
  """stderr redirected (not a TTY): one plain line per --progress_every rounds, no \\r."""
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--dataset=synthetic",
       "--model=linear", "--synthetic_shape=4,4,1", "--synthetic_examples=8",
       "--batch_size=4", "--synthetic_test=20", "--num_clients=2", "--clients_per_round=2", "--rounds=4",
       "--progress_every=2", f"--workdir={tmp_path / 'log'}"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "\r" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if "] round " in l]
  assert [l.split("round ")[1].split(" ")[0] for l in lines] == ["2/4", "4/4"], proc.stderr
