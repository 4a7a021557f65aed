"""The experiment loop and launch script: outputs, resume bit-identity, clear errors."""
import json
import os
import subprocess
import sys

import chex
import pytest

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.checkpoint import Checkpointer
from sparsefl_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(dataset="synthetic", model="linear", synthetic_shape="6,6,1", synthetic_classes=4,
             synthetic_examples=12, synthetic_test=40, num_clients=4, clients_per_round=2,
             batch_size=5, local_epochs=2, lr=0.2, momentum=0.5, server_optimizer="adam",
             progress=False, eval_every=1)


def _strip_time(rows):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_is_bit_identical(tmp_path):
  full = ExperimentConfig(**SMALL, rounds=5, checkpoint_every=2, workdir=str(tmp_path / "a"))
  train.run(full)
  split = full.replace(workdir=str(tmp_path / "b"))
  train.run(split, max_rounds=3)          # "interrupted" after round 3
  assert len(read_metrics(os.path.join(split.workdir, "metrics.jsonl"))) == 3
  train.run(split.replace(resume=True))   # continues from the round-3 checkpoint
  rows_a = read_metrics(os.path.join(full.workdir, "metrics.jsonl"))
  rows_b = read_metrics(os.path.join(split.workdir, "metrics.jsonl"))
  assert [r["round"] for r in rows_b] == [1, 2, 3, 4, 5]
  assert _strip_time(rows_a) == _strip_time(rows_b)
  exp = train.build_experiment(full)
  state_a, round_a = Checkpointer(os.path.join(full.workdir, "checkpoints")).restore(
      exp.init_state)
  state_b, round_b = Checkpointer(os.path.join(split.workdir, "checkpoints")).restore(
      exp.init_state)
  assert round_a == round_b == 5
  chex.assert_trees_all_equal(state_a, state_b)   # structure, shapes, dtypes and values


def test_resume_refuses_changed_settings(tmp_path):
  cfg = ExperimentConfig(**SMALL, rounds=2, workdir=str(tmp_path / "c"))
  train.run(cfg, max_rounds=1)
  with pytest.raises(ValueError, match="lr=0.5"):
    train.run(cfg.replace(resume=True, lr=0.5))


def _run_script(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",   # this checkout's package, not an installed one
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_launch_script_runs_two_rounds_and_writes_outputs(tmp_path):
  workdir = tmp_path / "run"
  flags = [f"--{k}={v}" for k, v in SMALL.items() if k != "progress"]
  proc = _run_script(*flags, "--rounds=2", f"--workdir={workdir}", "--plot_partition")
  assert proc.returncode == 0, proc.stderr[-2000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["rounds"] == 2 and config["model"] == "linear"
  rows = read_metrics(str(workdir / "metrics.jsonl"))
  assert [r["round"] for r in rows] == [1, 2]
  for key in ("train_loss", "test_accuracy", "uplink_bytes", "downlink_bytes",
              "global_density", "seconds"):
    assert key in rows[-1], key
  assert (workdir / "checkpoints").is_dir()
  assert (workdir / "label_distribution.png").stat().st_size > 1000
  assert "done: 2 rounds" in proc.stdout


@pytest.mark.parametrize("flag, needle", [
    (["--clients_per_round=20", "--num_clients=10"], "clients_per_round=20"),
    (["--algorithm=fedfoo"], "algorithm='fedfoo'"),
    (["--model=resnet99"], "model='resnet99'"),
    (["--dataset=imagenet42"], "imagenet42"),
    (["--lr=-1"], "lr=-1"),
    (["--client_map=pmap"], "client_map='pmap'"),
    (["--workdir=/proc/sparsefl_not_writable"], "not writable"),
])
def test_bad_flags_exit_with_one_clear_line(tmp_path, flag, needle):
  base = ["--dataset=synthetic", "--model=linear", f"--workdir={tmp_path / 'w'}", "--rounds=1"]
  proc = _run_script(*base, *flag)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr[-2000:]


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
  from sparsefl_jax.data import fashion_mnist
  monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "no_debian"))
  monkeypatch.delenv("SPARSEFL_FMNIST_DIR", raising=False)
  (tmp_path / "tfds").mkdir()   # data_dir must exist (it is never created)
  cfg = ExperimentConfig(dataset="fashion_mnist", model="fmnist_fc", rounds=1,
                         data_dir=str(tmp_path / "tfds"), workdir=str(tmp_path / "w"))
  with pytest.raises(ValueError, match="dataset-fashion-mnist"):
    train.run(cfg)
