"""Runs over 2 processes × 2 simulated CPU devices (jax.distributed + Gloo) match one process.

Every launch goes through `sparsefl_jax.launch` (a free port, each process in its own session,
all stopped when one fails or the time limit passes, so CI never hangs on a lost peer):

- one process with 4 devices (the reference) and 2 processes × 2 devices run FedAvg (stacked
  vmap aggregate) and FedSparsify-Local under `client_map=map` (streamed sums with counted
  votes, K = 5 on 4 devices: a zero-weight dummy); the 2-process FedSparsify run keeps its
  data on the host (`data_placement=host`: each process reads only its own shard);
- only process 0 writes metrics.jsonl, TensorBoard events and the partition plot;
- `experiments/run.py` on 2 processes: a SIGTERM to one of them stops both after the same
  round with a checkpoint; resumed, both killed (SIGKILL) after a checkpoint, resumed again:
  identical to the uninterrupted 2-process run.
"""
import json
import os
import signal
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsefl_jax import launch
from reference_runs import comparable_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240   # seconds for one launch (a lost peer would otherwise wait 300 s in JAX)
BASE = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
            synthetic_classes=4, synthetic_examples=12, synthetic_test=40, num_clients=8,
            clients_per_round=5, batch_size=5, local_epochs=2, lr=0.2, momentum=0.5,
            partition="dirichlet", alpha=0.5, num_devices=4, eval_every=1, progress=False)
RUNS = {   # name -> (overrides, 2-process overrides)
    "fedavg": (dict(algorithm="fedavg", rounds=12, checkpoint_every=0,
                    plot_partition=True), {}),
    "fedsparsify": (dict(algorithm="fedsparsify_local", sparsity=0.6, client_map="map",
                         prune_start_round=0, rounds=3, checkpoint_every=0,
                         tensorboard=False), dict(data_placement="host")),
}
WORKER = textwrap.dedent("""
    import json, sys
    from sparsefl_jax import ExperimentConfig, distributed, train
    distributed.initialize()   # from JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID
    for cfg in json.loads(sys.argv[1]):
      train.run(ExperimentConfig(**cfg))
    print("worker done", flush=True)
""")


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def _launch(cmd, n, devices, log_dir, timeout=TIMEOUT):
  os.makedirs(log_dir, exist_ok=True)
  procs = launch.start(cmd, n, devices, log_dir=log_dir, env=_env(), cwd=ROOT)
  codes = launch.wait(procs, timeout)
  logs = "".join(open(os.path.join(log_dir, f"process_{i}.log")).read()[-3000:]
                 for i in range(n))
  assert codes == [0] * n, f"exit statuses {codes}\n{logs}"
  return logs




def _final_arrays(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  last = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
  with ocp.PyTreeCheckpointer() as reader:
    return last, reader.restore(os.path.join(ckpt, str(last), "state"))


def _close_rows(a, b, rtol=1e-5, atol=1e-6):
  """Same keys, same ints/lists (client ids, byte counts), floats within tolerance."""
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    assert sorted(ra) == sorted(rb)
    for k in ra:
      if isinstance(ra[k], float) or isinstance(rb[k], float):
        assert rb[k] == pytest.approx(ra[k], rel=rtol, abs=atol), (ra["round"], k)
      else:
        assert ra[k] == rb[k], (ra["round"], k)


def _close_arrays(a, b, tol=1e-5):
  (ra, xa), (rb, xb) = a, b
  assert ra == rb and sorted(xa) == sorted(xb)
  for k in xa:
    np.testing.assert_allclose(xb[k], xa[k], rtol=tol, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Both methods on 1 process × 4 devices and on 2 processes × 2 devices (two launches)."""
  root = tmp_path_factory.mktemp("mp")
  dirs, launched = {}, []
  for procs, devices in ((1, 4), (2, 2)):   # both launches at once: compiles overlap
    cfgs = []
    for name, (over, two) in RUNS.items():
      workdir = str(root / f"{name}_{procs}p")
      cfgs.append(dict(BASE, **over, **(two if procs == 2 else {}), workdir=workdir))
      dirs[name, procs] = workdir
    log_dir = str(root / f"logs_{procs}")
    os.makedirs(log_dir)
    launched.append((launch.start([sys.executable, "-c", WORKER, json.dumps(cfgs)], procs,
                                  devices, log_dir=log_dir, env=_env(), cwd=ROOT), log_dir))
  for procs, log_dir in launched:
    codes = launch.wait(procs, TIMEOUT)
    if codes != [0] * len(procs):
      for other, _ in launched:
        launch.stop(other)
      logs = "".join(open(os.path.join(log_dir, f)).read()[-3000:]
                     for f in sorted(os.listdir(log_dir)))
      pytest.fail(f"exit statuses {codes}\n{logs}")
  return dirs


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_processes_match_one_process(runs, name):
  one, two = runs[name, 1], runs[name, 2]
  _close_rows(comparable_rows(one), comparable_rows(two))
  _close_arrays(_final_arrays(one), _final_arrays(two))


def test_sparse_run_really_pruned_and_streamed_dummy(runs):
  rows = comparable_rows(runs["fedsparsify", 2])
  assert rows[-1]["global_density"] < 0.9          # the votes pruned
  assert all(len(r["clients"]) == 5 for r in rows)   # K = 5 on 4 devices: one dummy, dropped


def test_only_process_zero_writes(runs):
  two = runs["fedavg", 2]
  rounds = RUNS["fedavg"][0]["rounds"]
  assert [r["round"] for r in comparable_rows(two)] == list(range(1, rounds + 1))   # no double rows
  events = os.listdir(os.path.join(two, "tensorboard"))
  assert len(events) == 1, events
  assert os.path.exists(os.path.join(two, "label_distribution.png"))
  leftovers = [f for f in os.listdir(two) if f.endswith(".tmp")]
  assert not leftovers
  assert sorted(f for f in os.listdir(two) if f.startswith(".lock")) == [".lock", ".lock.1"]


def _wait_rows(procs, workdir, rows, log_dir):
  """Until metrics.jsonl has `rows` rows; fails if a process ends first."""
  deadline = time.monotonic() + TIMEOUT
  metrics = os.path.join(workdir, "metrics.jsonl")
  while time.monotonic() < deadline:
    if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= rows:
      return
    if any(p.poll() is not None for p in procs):
      pytest.fail(open(os.path.join(log_dir, "process_0.log")).read()[-3000:])
    time.sleep(0.02)
  pytest.fail(f"no {rows} rows within {TIMEOUT} s")


def test_run_py_two_processes_signalled_killed_and_resumed(runs, tmp_path):
  """run.py on 2 processes: SIGTERM to process 1 only stops BOTH after the same round with a
  checkpoint (exit 143); resumed, both are then killed with SIGKILL after the round-6
  checkpoint; resumed again, the result is the uninterrupted 2-process run's, bit for bit
  (and the 1-process run's within float tolerance)."""
  over = dict(RUNS["fedavg"][0], checkpoint_every=2, plot_partition=False)
  flags = [f"--{k}={v}" for k, v in dict(BASE, **over).items()
           if k not in ("progress", "plot_partition")] + ["--noprogress", "--noplot_partition"]
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "experiments/run.py", *flags, f"--workdir={workdir}"]
  env = _env()
  # 1. SIGTERM reaches process 1 only
  logs1 = str(tmp_path / "term")
  os.makedirs(logs1)
  procs = launch.start(cmd, 2, 2, log_dir=logs1, env=env, cwd=ROOT)
  try:
    _wait_rows(procs, workdir, 3, logs1)
    os.kill(procs[1].pid, signal.SIGTERM)
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
  finally:
    launch.stop(procs)
  log0 = open(os.path.join(logs1, "process_0.log")).read()
  assert codes == [143, 143], (codes, log0[-2000:])
  stopped = len(comparable_rows(workdir))
  assert f"stopped after round {stopped} of 12" in log0
  assert _final_arrays(workdir)[0] == stopped   # the agreed round was checkpointed by both
  # 2. resume, then SIGKILL both after the round-6 checkpoint (row 7 follows it)
  logs2 = str(tmp_path / "kill")
  os.makedirs(logs2)
  procs = launch.start(cmd + ["--resume"], 2, 2, log_dir=logs2, env=env, cwd=ROOT)
  try:
    _wait_rows(procs, workdir, 7, logs2)
  finally:
    launch.stop(procs)   # SIGKILL to both process groups
  done = len(comparable_rows(workdir))
  assert 7 <= done < over["rounds"], f"killed after {done} rows"
  # 3. resume to the end
  logs = _launch(cmd + ["--resume"], 2, 2, str(tmp_path / "resume"))
  assert "done: 12 rounds" in logs
  assert comparable_rows(workdir) == comparable_rows(runs["fedavg", 2])
  resumed, whole = _final_arrays(workdir), _final_arrays(runs["fedavg", 2])
  assert resumed[0] == whole[0]
  for k in whole[1]:
    np.testing.assert_array_equal(resumed[1][k], whole[1][k], err_msg=k)
  _close_arrays(_final_arrays(runs["fedavg", 1]), resumed)


def test_mesh_must_span_every_process(tmp_path):
  """--num_devices=1 on 2 processes: both exit 2 with one line, before loading any data."""
  flags = [f"--{k}={v}" for k, v in dict(BASE, num_devices=1, rounds=1).items()
           if k != "progress"]
  cmd = [sys.executable, "experiments/run.py", *flags, f"--workdir={tmp_path / 'w'}"]
  _both_fail_with(cmd, 2, tmp_path,
                  "error: num_devices=1 in a run of 2 processes must be one of [2, 4] "
                  "(the same number of devices from every process; 4 = all of them)")


def _both_fail_with(cmd, devices, log_dir, line):
  """Both processes exit 2 printing exactly one error line, `line`."""
  procs = launch.start(cmd, 2, devices, log_dir=str(log_dir), env=_env(), cwd=ROOT)
  try:   # each exits by itself (launch.wait would stop the second when the first fails)
    assert [p.wait(timeout=TIMEOUT) for p in procs] == [2, 2]
  finally:
    launch.stop(procs)
  for i in range(2):
    errors = [ln for ln in open(os.path.join(log_dir, f"process_{i}.log")).read().splitlines()
              if ln.startswith("error:")]
    assert errors == [line]


def test_bad_process_settings_are_one_line(tmp_path):
  from sparsefl_jax import distributed
  from sparsefl_jax.config import ConfigError
  with pytest.raises(ConfigError, match=r"process_id=2 must lie in \[0, 1\]"):
    distributed.resolve("127.0.0.1:1234", 2, 2)
  with pytest.raises(ConfigError, match="need --coordinator_address"):
    distributed.resolve("", 2, 0)
  with pytest.raises(ConfigError, match=r"coordinator_address='localhost' must be host:port"):
    distributed.resolve("localhost", 2, 0)
  assert distributed.resolve("", 0, -1) is None or os.environ.get("JAX_COORDINATOR_ADDRESS")
  assert distributed.resolve("127.0.0.1:99", 2, 1) == dict(
      coordinator_address="127.0.0.1:99", num_processes=2, process_id=1)


def test_sweep_py_on_two_processes_matches_one_process_and_resumes(tmp_path):
  """sweep.py on 2 processes × 1 device: the 4 members are split over the 2 devices (one
  SPMD program), process 0 writes every file; killed (SIGKILL, both) after some rounds and
  resumed, the members' rows and final checkpoints equal the 1-process sweep's within float
  tolerance (2 members per device instead of 4 on one: XLA may pick other kernels)."""
  over = dict(BASE, num_devices=1, algorithm="fedsparsify_global", rounds=8,
              checkpoint_every=1, tensorboard=False, plot_partition=False)
  flags = [f"--{k}={v}" for k, v in over.items()
           if k not in ("progress", "tensorboard", "plot_partition")]
  flags += ["--noprogress", "--notensorboard", "--noplot_partition",
            "--sweep=sparsity=0.5,0.8", "--seeds=2"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  names = ["sparsity=0.5,seed_offset=0", "sparsity=0.5,seed_offset=1",
           "sparsity=0.8,seed_offset=0", "sparsity=0.8,seed_offset=1"]
  cmd = [sys.executable, "experiments/sweep.py", *flags, f"--workdir={two}"]
  logs = str(tmp_path / "kill")
  os.makedirs(logs)
  procs = launch.start(cmd, 2, 1, log_dir=logs, env=_env(), cwd=ROOT)
  try:
    _wait_rows(procs, os.path.join(two, names[0]), 3, logs)
  finally:
    launch.stop(procs)   # SIGKILL to both process groups
  assert 3 <= len(comparable_rows(os.path.join(two, names[0]))) < 8
  out = _launch(cmd + ["--resume"], 2, 1, str(tmp_path / "resume"))
  assert "done: 4 members, 0 diverged" in out
  _launch([sys.executable, "experiments/sweep.py", *flags, f"--workdir={one}"], 1, 1,
          str(tmp_path / "one_log"))
  with open(os.path.join(two, "sweep_summary.json")) as f:
    summary = json.load(f)["members"]
  assert [m["status"] for m in summary] == ["done"] * 4
  assert [os.path.basename(m["workdir"]) for m in summary] == names
  for name in names:
    _close_rows(comparable_rows(os.path.join(one, name)),
                comparable_rows(os.path.join(two, name)), rtol=1e-6, atol=1e-7)
    _close_arrays(_final_arrays(os.path.join(one, name)), _final_arrays(os.path.join(two, name)),
                  1e-6)
  assert not any(f.startswith("metrics") for f in os.listdir(two))   # members' files only


def test_sweep_py_members_must_split_over_the_devices(tmp_path):
  """3 members on 2 devices: both processes stop with the same one line, exit 2."""
  flags = [f"--{k}={v}" for k, v in dict(BASE, num_devices=1, rounds=1).items()
           if k != "progress"] + ["--sweep=sparsity=0.5,0.7,0.8", "--algorithm=topk"]
  cmd = [sys.executable, "experiments/sweep.py", *flags, f"--workdir={tmp_path / 'w'}"]
  _both_fail_with(cmd, 1, tmp_path,
                  "error: a chunk of 3 sweep members cannot be split over the 2 devices of 2 "
                  "processes; accepted: members (or --sweep_chunk) a multiple of 2 in every "
                  "group")
