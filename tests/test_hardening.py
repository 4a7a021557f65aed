"""Issue 17: diverged runs, damaged run files, signals and concurrent launches lose nothing.

Every drill compares the recovered run with an uninterrupted one: same metrics rows (minus
wall-clock seconds) and bit-identical parameters.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.checkpoint import Checkpointer
from sparsefl_jax.config import ConfigError
from sparsefl_jax.guard import Diverged
from sparsefl_jax.metrics import MetricsFileError
from sparsefl_jax.stopping import RunInterrupted
from sparsefl_jax.workdir import WorkdirBusy, WorkdirLock
from reference_runs import comparable_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="synthetic", model="linear", synthetic_shape="6,6,1", synthetic_classes=4,
            synthetic_examples=12, synthetic_test=40, num_clients=4, clients_per_round=2,
            batch_size=5, local_epochs=2, lr=0.2, momentum=0.5, server_optimizer="adam",
            progress=False, eval_every=1, checkpoint_every=2)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items() if k != "progress"] + ["--noprogress"]




_TARGETS = {}


def _final_state(cfg):
  """The newest checkpoint's state; the restore target is built once per model/method."""
  key = (cfg.model, cfg.algorithm, cfg.server_optimizer, cfg.sparsity)
  if key not in _TARGETS:
    _TARGETS[key] = train.build_experiment(cfg.replace(workdir="/unused")).init_state
  ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"))
  state, rnd = ckpt.restore(_TARGETS[key])
  ckpt.close()
  return state, rnd


def _assert_same_run(a, b):
  """Same metrics rows and bit-identical final checkpoints."""
  assert comparable_rows(a.workdir) == comparable_rows(b.workdir)
  (sa, ra), (sb, rb) = _final_state(a), _final_state(b)
  assert ra == rb
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-round run every drill is compared with."""
  cfg = ExperimentConfig(**TINY, rounds=6, workdir=str(tmp_path_factory.mktemp("ref") / "r"))
  train.run(cfg)
  return cfg


def _interrupted(tmp_path, name, rounds_done=4):
  cfg = ExperimentConfig(**TINY, rounds=6, workdir=str(tmp_path / name))
  train.run(cfg, max_rounds=rounds_done)
  return cfg


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def _launch(*args, **kw):
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300, **kw)


def _one_error_line(proc, code=2):
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return errors[0]


# ---- divergence ---------------------------------------------------------------------------
def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "div"
  proc = _launch(*TINY_FLAGS, "--lr=1e30", "--rounds=6", "--checkpoint_every=1",
                 f"--workdir={workdir}")
  line = _one_error_line(proc, code=3)
  assert line.startswith("error: round 1: ") and "not finite" in line, line
  # Nothing non-finite was checkpointed; the row that diverged is logged in strict JSON.
  assert not glob.glob(str(workdir / "checkpoints" / "1"))
  text = (workdir / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  json.loads(text.splitlines()[-1], parse_constant=lambda c: pytest.fail(c))


def test_divergence_in_state_keeps_finite_checkpoints_and_allow_flag_continues(tmp_path):
  # A huge server LR blows up the parameters through the server optimizer.
  bad = ExperimentConfig(**{**TINY, "checkpoint_every": 1}, server_lr=1e38, rounds=4,
                         workdir=str(tmp_path / "e"))
  with pytest.raises(Diverged, match=r"round \d+: .*not finite.*--allow_nonfinite"):
    train.run(bad)
  ckpts = Checkpointer(os.path.join(bad.workdir, "checkpoints"))
  target = train.build_experiment(bad).init_state
  for r in ckpts.all_rounds():   # every kept checkpoint verifies and is finite
    state, _ = ckpts.restore(target, r)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  ckpts.close()
  allowed = bad.replace(workdir=str(tmp_path / "f"), allow_nonfinite=True)
  assert train.run(allowed)["round"] == 4
  text = open(os.path.join(allowed.workdir, "metrics.jsonl")).read()
  assert "null" in text and "NaN" not in text and "Infinity" not in text


def test_fedsparsify_divergence_is_not_hidden_by_pruning(tmp_path):
  """At lr=1000 FedSparsify used to prune NaN weights away and report loss 2.3026."""
  cfg = ExperimentConfig(**{**TINY, "model": "mlp_small", "server_optimizer": "",
                            "eval_every": 0, "lr": 1000.0}, algorithm="fedsparsify_global",
                         sparsity=0.8, rounds=4, workdir=str(tmp_path / "fs"))
  with pytest.raises(Diverged, match=r"round \d+: .*not finite"):
    train.run(cfg)


# ---- concurrent launches ------------------------------------------------------------------
def test_second_launch_on_a_busy_workdir_refuses_and_stale_lock_is_ignored(tmp_path):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; sys.path.insert(0, sys.argv[1]);"
      "from sparsefl_jax.workdir import WorkdirLock;"
      "l = WorkdirLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)"),
      ROOT, str(workdir)], stdout=subprocess.PIPE, text=True, env=_env())
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = _launch(*TINY_FLAGS, "--rounds=1", f"--workdir={workdir}")
    line = _one_error_line(proc)
    assert f"pid {holder.pid}" in line and "in use" in line, line
    assert not (workdir / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder died without cleaning up: its lock file stays, but the lock is gone.
  assert (workdir / ".lock").exists()
  WorkdirLock(str(workdir)).acquire().release()   # (faults.sh: a run after kill -9 resumes)


def test_lock_is_exclusive_within_a_process(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
      WorkdirLock(str(tmp_path)).acquire()
  WorkdirLock(str(tmp_path)).acquire().release()


# ---- metrics.jsonl damage -----------------------------------------------------------------
def test_partial_last_metrics_line_is_dropped_on_resume(tmp_path, reference):
  cfg = _interrupted(tmp_path, "p")
  path = os.path.join(cfg.workdir, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"round": 5, "clients": [1,')    # a row cut short by a crash
  train.run(cfg.replace(resume=True))
  _assert_same_run(cfg, reference)


def test_damaged_middle_metrics_line_names_the_file(tmp_path):
  cfg = _interrupted(tmp_path, "m")
  path = os.path.join(cfg.workdir, "metrics.jsonl")
  lines = open(path).read().splitlines()
  lines[1] = lines[1][:10]
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(MetricsFileError, match=f"{path}: line 2"):
    train.run(cfg.replace(resume=True))


def test_deleted_metrics_resumes_with_counters_from_the_checkpoint(tmp_path, reference):
  cfg = _interrupted(tmp_path, "x")
  os.remove(os.path.join(cfg.workdir, "metrics.jsonl"))
  train.run(cfg.replace(resume=True))
  got, want = comparable_rows(cfg.workdir), comparable_rows(reference.workdir)
  assert [r["round"] for r in got] == [5, 6]   # rows 1..4 are gone, the file is recreated
  assert got == want[4:]                       # cumulative bytes continue, not restart at 0


# ---- damaged checkpoints ------------------------------------------------------------------
def _data_files(cfg, step):
  files = glob.glob(os.path.join(cfg.workdir, "checkpoints", str(step), "state", "**", "d",
                                 "*"), recursive=True)
  return sorted(files, key=os.path.getsize)


def _truncate(cfg, step):
  for path in _data_files(cfg, step):   # a copy or disk-full cut every data file short
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _flip_bits(cfg, step):
  for path in _data_files(cfg, step):   # same size, one bit per data file
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))


def _empty_metadata(cfg, step):
  open(os.path.join(cfg.workdir, "checkpoints", str(step), "state", "_METADATA"), "w").close()


@pytest.mark.parametrize("damage", [_truncate, _flip_bits, _empty_metadata],
                         ids=["truncated", "bit_flip", "empty_metadata"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, caplog,
                                                                  damage):
  cfg = _interrupted(tmp_path, "c")           # checkpoints at rounds 2 and 4
  damage(cfg, 4)
  with caplog.at_level("WARNING"):
    train.run(cfg.replace(resume=True))
  damaged = os.path.join(cfg.workdir, "checkpoints", "4")
  assert any(damaged in r.getMessage() and "damaged" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert os.path.isdir(os.path.join(cfg.workdir, "checkpoints_damaged", "4"))
  _assert_same_run(cfg, reference)



@pytest.mark.parametrize("damage,reason", [(_truncate, "bytes, .* were written"),
                                           (_flip_bits, r"differs from what was written"),
                                           (_empty_metadata, r"_METADATA has 0 bytes")],
                         ids=["truncated", "bit_flip", "empty_metadata"])
def test_file_manifest_names_the_damaged_file_before_orbax_reads_it(tmp_path, damage, reason):
  from sparsefl_jax.checkpoint import FILE_MANIFEST, check_file_manifest
  cfg = _interrupted(tmp_path, "f", rounds_done=2)
  step_dir = os.path.join(cfg.workdir, "checkpoints", "2")
  assert os.path.exists(os.path.join(step_dir, FILE_MANIFEST))
  check_file_manifest(step_dir)   # intact: passes
  damage(cfg, 2)
  with pytest.raises(ValueError, match=reason):
    check_file_manifest(step_dir)


def test_step_without_manifest_is_still_verified_by_array_checksums(tmp_path, reference):
  from sparsefl_jax.checkpoint import FILE_MANIFEST
  cfg = _interrupted(tmp_path, "m")           # checkpoints at rounds 2 and 4
  os.remove(os.path.join(cfg.workdir, "checkpoints", "4", FILE_MANIFEST))
  _flip_bits(cfg, 4)
  train.run(cfg.replace(resume=True))
  assert os.path.isdir(os.path.join(cfg.workdir, "checkpoints_damaged", "4"))
  _assert_same_run(cfg, reference)

# The same through the launch script, with no traceback: scripts/faults.sh (drills
# truncated_ckpt, bitflip_ckpt, empty_metadata).


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  cfg = _interrupted(tmp_path, "n", rounds_done=2)   # one checkpoint (round 2)
  _flip_bits(cfg, 2)
  with pytest.raises(ConfigError, match="no intact checkpoint in .*damaged round 2 "):
    train.run(cfg.replace(resume=True))


# ---- signals ------------------------------------------------------------------------------
def _start_long_run(workdir, rounds=100000):
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "experiments", "run.py"), *TINY_FLAGS,
       "--checkpoint_every=0", "--eval_every=1", f"--rounds={rounds}", f"--workdir={workdir}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _wait_for_rows(workdir, n, proc, timeout=120):
  path = os.path.join(str(workdir), "metrics.jsonl")
  end = time.time() + timeout
  while time.time() < end:
    if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
      return
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  pytest.fail("the run wrote no rows")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_round_saves_and_resumes_bit_identically(tmp_path, monkeypatch,
                                                                     reference, sig, code):
  """In-process: the signal lands during round 3; scripts/faults.sh drills it end to end."""
  real_row = train._round_row

  def row_then_signal(t, metrics, seconds):
    if t == 3:
      os.kill(os.getpid(), sig)
    return real_row(t, metrics, seconds)

  monkeypatch.setattr(train, "_round_row", row_then_signal)
  cfg = ExperimentConfig(**TINY, rounds=6, workdir=str(tmp_path / "sig"))
  before = signal.getsignal(sig)
  with pytest.raises(RunInterrupted, match="stopped after round 3 of 6; checkpoint saved") as e:
    train.run(cfg)
  assert e.value.exit_code == code
  assert signal.getsignal(sig) == before   # the run's handlers are uninstalled
  monkeypatch.setattr(train, "_round_row", real_row)
  train.run(cfg.replace(resume=True))
  _assert_same_run(cfg, reference)


def test_second_signal_stops_at_once(tmp_path):
  workdir = tmp_path / "s2"
  proc = _start_long_run(workdir)
  _wait_for_rows(workdir, 2, proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.001)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err
  assert "stopped at once" in err or "checkpoint saved" in err   # the first may win the race


# ---- resume rules -------------------------------------------------------------------------
def test_moved_workdir_resumes_and_display_flags_may_change(tmp_path, reference):
  cfg = _interrupted(tmp_path, "orig")
  moved = str(tmp_path / "elsewhere" / "run") + "/"     # another path, trailing slash
  os.makedirs(os.path.dirname(moved.rstrip("/")))
  shutil.move(cfg.workdir, moved)
  train.run(cfg.replace(workdir=moved, resume=True, progress=True,
                        checkpoint_every=3, keep_checkpoints=5, mask_every=2))
  _assert_same_run(cfg.replace(workdir=moved), reference)


def test_finished_run_grows_where_the_schedule_allows(tmp_path, reference):
  cfg = ExperimentConfig(**TINY, rounds=4, workdir=str(tmp_path / "g"))
  train.run(cfg)
  train.run(cfg.replace(rounds=6, resume=True))
  _assert_same_run(cfg, reference)


@pytest.mark.parametrize("changes, reason", [
    (dict(lr_schedule="exponential", lr_end=0.01), "lr_schedule='exponential'"),
    (dict(algorithm="fedsparsify_global", sparsity=0.5, model="mlp_small",
          server_optimizer=""), "FedSparsify's Eq. 1"),
])
def test_rounds_cannot_grow_when_the_schedule_depends_on_them(tmp_path, changes, reason):
  cfg = ExperimentConfig(**{**TINY, **changes}, rounds=3, workdir=str(tmp_path / "h"))
  train.run(cfg, max_rounds=2)
  with pytest.raises(ConfigError, match=f"rounds=5.*{reason}"):
    train.run(cfg.replace(rounds=5, resume=True))
  train.run(cfg.replace(resume=True))   # the same total still resumes


def test_strict_json_config_round_trips_infinite_alpha(tmp_path):
  cfg = ExperimentConfig(**TINY, rounds=2, partition="lda", alpha=float("inf"),
                         workdir=str(tmp_path / "j"))
  train.run(cfg, max_rounds=1)
  text = open(os.path.join(cfg.workdir, "config.json")).read()
  assert '"alpha": "inf"' in text and "Infinity" not in text
  assert train.run(cfg.replace(resume=True))["round"] == 2


# ---- bad inputs: one line, exit 2, before any data is loaded ------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--flagfile=/nonexistent.flags"], "/nonexistent.flags"),
    (["--roundz=3"], "roundz"),
    (["--lr=abc"], "accepted: a float"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_flag_parse_errors_are_one_line(args, needle):
  line = _one_error_line(_launch(*args))
  assert needle in line, line


@pytest.fixture
def no_data(monkeypatch):
  """Fails the test if data loading starts: cheap checks must come first."""
  def refuse(cfg):
    raise AssertionError("data loading started before the cheap checks")
  monkeypatch.setattr(train, "build_dataset", refuse)


@pytest.mark.parametrize("changes, needle", [
    (dict(local_epochs=1000000, dataset="fashion_mnist", model="fmnist_fc", num_clients=10,
          clients_per_round=10, batch_size=32, synthetic_shape="28,28,1"),
     "local_epochs=1000000 needs"),
    (dict(data_dir="/nonexistent_sparsefl"), "data_dir='/nonexistent_sparsefl' does not exist"),
    (dict(algorithm="topk", sparsity=0.9, sparse_layers="fc1,typo"), "sparse_layers="),
    (dict(dataset="digits", model="fmnist_fc"), "model='fmnist_fc' takes 28x28x1"),
    (dict(server_optimizer="adamw"), "server_optimizer='adamw'"),
    (dict(num_devices=64), "num_devices=64 must lie in [1, "),
    (dict(partition="classes", classes_per_client=50), "classes_per_client=50 must lie in"),
    (dict(algorithm="topk"), "sparsity=0.0 with algorithm='topk'"),
    (dict(algorithm="sparsyfed"), "sparse methods need an explicit --sparsity"),
    (dict(algorithm="zerofl"), "sparse methods need an explicit --sparsity"),
    (dict(algorithm="swat"), "sparse methods need an explicit --sparsity"),
    (dict(algorithm="fedsparsify_global"), "sparse methods need an explicit --sparsity"),
])
def test_cheap_checks_refuse_before_loading_data(tmp_path, no_data, changes, needle):
  cfg = ExperimentConfig(**{**TINY, **changes}, rounds=1, workdir=str(tmp_path / "w"))
  with pytest.raises(ConfigError) as e:
    train.run(cfg)
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not os.path.exists("/nonexistent_sparsefl")


def test_batch_larger_than_every_client_names_the_largest(tmp_path):
  cfg = ExperimentConfig(**{**TINY, "batch_size": 13}, rounds=1, workdir=str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"batch_size=13 exceeds every client.*holds 12 "
                                        r"examples; accepted: 1..12"):
    train.run(cfg)


def test_sparse_layer_typo_refused_for_swat(tmp_path):
  cfg = ExperimentConfig(**{**TINY, "model": "mlp_small"}, algorithm="swat", sparsity=0.5,
                         sparse_layers="fc1,typo", rounds=1, workdir=str(tmp_path / "t"))
  with pytest.raises(ValueError, match="sparse_layers='fc1,typo' names unknown layers"):
    train.run(cfg)


def test_launch_script_bad_setting_is_one_line_exit_2(tmp_path):
  proc = _launch(*TINY_FLAGS, "--rounds=1", "--dataset=digits", "--model=fmnist_fc",
                 f"--workdir={tmp_path / 'w'}")
  assert "fmnist_fc" in _one_error_line(proc)


def test_corrupt_prepared_tfds_data_is_one_line_naming_the_path(tmp_path):
  from sparsefl_jax.data import fashion_mnist
  if fashion_mnist.find_source_dir() is None:
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  fashion_mnist.prepare(str(data_dir))
  records = sorted(glob.glob(str(data_dir / "**" / "*train.array_record*"), recursive=True))
  assert records
  for path in records:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.seek(size // 3)
      f.write(b"\xff" * 4096)
  cfg = ExperimentConfig(dataset="fashion_mnist", model="fmnist_fc", rounds=1,
                         data_dir=str(data_dir), workdir=str(tmp_path / "w"), progress=False)
  with pytest.raises(ConfigError) as e:
    train.run(cfg)
  assert str(data_dir) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_checkpoint_from_before_checksums_restores_unverified(tmp_path, reference):
  """A run folder written by the previous layout (one 'default' item) still resumes."""
  import orbax.checkpoint as ocp
  from sparsefl_jax.checkpoint import _flat
  cfg = _interrupted(tmp_path, "legacy")
  state, _ = _final_state(cfg)
  ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
  shutil.rmtree(ckpt_dir)
  old = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=True))
  old.save(4, args=ocp.args.StandardSave({k: np.asarray(v) for k, v in _flat(state).items()}))
  old.wait_until_finished()
  old.close()
  train.run(cfg.replace(resume=True))
  _assert_same_run(cfg, reference)
