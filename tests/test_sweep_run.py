"""experiments/sweep.py end to end: a tiny sweep runs, resumes (growing --rounds), and each
member's workdir holds what run.py writes for the member's flags, with the same rows and
final parameters as an uninterrupted `train.run` of that member (the reference)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from sparsefl_jax import sweep, train
from sparsefl_jax.checkpoint import Checkpointer
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.metrics import load_global_masks
from reference_runs import comparable_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--dataset=digits", "--model=mlp_small", "--num_clients=6", "--clients_per_round=3",
         "--batch_size=16", "--lr=0.1", "--momentum=0.5", "--partition=lda", "--alpha=0.5",
         "--notensorboard", "--noprogress", "--checkpoint_every=1", "--eval_every=2"]


def _sweep(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                         *FLAGS, *args], capture_output=True, text=True, env=env, timeout=300)




def test_sweep_runs_resumes_and_matches_run_py(tmp_path):
  root = str(tmp_path / "sw")
  first = _sweep("--sweep=lr=0.1,0.05", "--seeds=2", "--rounds=2", f"--workdir={root}",
                 "--sweep_chunk=3")
  assert first.returncode == 0, first.stderr
  names = ["lr=0.1,seed_offset=0", "lr=0.1,seed_offset=1", "lr=0.05,seed_offset=0",
           "lr=0.05,seed_offset=1"]
  assert sorted(os.listdir(root)) == sorted(names + ["sweep.json", "sweep_summary.json",
                                                     "sweep_summary.md", ".lock"])
  again = _sweep("--sweep=lr=0.1,0.05", "--seeds=2", "--rounds=4", f"--workdir={root}",
                 "--sweep_chunk=3", "--resume")
  assert again.returncode == 0, again.stderr
  assert "| lr=0.05 | 2 |" in again.stdout   # the mean ± std table over the seeds
  summary = json.load(open(os.path.join(root, "sweep_summary.json")))
  assert [m["round"] for m in summary["members"]] == [4, 4, 4, 4]

  # The member lr=0.05, seed_offset=1 against run.py's path for the same flags.
  member = os.path.join(root, names[3])
  cfg = train.load_run_config(os.path.join(member, "config.json"))
  assert (cfg.lr, cfg.seed, cfg.data_seed, cfg.init_seed, cfg.sampling_seed, cfg.rounds) == (
      0.05, 1, 1, 1, 1, 4)
  ref = cfg.replace(workdir=str(tmp_path / "single"), resume=False)
  train.run(ref)
  got, want = comparable_rows(member), comparable_rows(ref.workdir)
  assert [r["round"] for r in got] == [1, 2, 3, 4]
  # A chunk of 3 members is not bitwise on this CPU (XLA:CPU picks other dot kernels for a
  # batch of 3; measured: train_loss and params within 2e-7 relative after 4 rounds), so
  # floats are compared to 1e-5 relative; counts, bytes and client ids exactly.
  for a, b in zip(got, want):
    assert set(a) == set(b)
    for k in b:
      if isinstance(b[k], float):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
      else:
        assert a[k] == b[k], k
  exp = train.build_experiment(ref)
  states = []
  for d in (member, ref.workdir):
    ckpt = Checkpointer(os.path.join(d, "checkpoints"))
    states.append(ckpt.restore(exp.init_state)[0])
    ckpt.close()
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               states[0], states[1])


def test_library_resume_of_members_at_different_rounds(tmp_path):
  """Members paused at different rounds resume in lock step from the newest common round;
  the one ahead re-makes its later rounds bit for bit."""
  base = ExperimentConfig(dataset="digits", model="linear", num_clients=4, clients_per_round=2,
                          rounds=3, batch_size=32, progress=False, tensorboard=False,
                          checkpoint_every=1, eval_every=0)
  configs = [base.replace(seed=s, workdir=str(tmp_path / f"m{s}")) for s in range(2)]
  sweep.run_sweep(configs, max_rounds=1)
  sweep.run_sweep([configs[0].replace(resume=True)], max_rounds=1)   # m0 at 2, m1 at 1
  before = comparable_rows(configs[0].workdir)
  out = sweep.run_sweep([c.replace(resume=True) for c in configs])
  assert [r["status"] for r in out] == ["done", "done"]
  after = comparable_rows(configs[0].workdir)
  assert after == before + after[2:]
  assert [r["round"] for r in comparable_rows(configs[1].workdir)] == [1, 2, 3]


def test_member_masks_equal_run_py_masks(tmp_path):
  """--mask_every in a sweep: each member's saved global masks are its single run's."""
  base = ExperimentConfig(dataset="digits", model="mlp_small", num_clients=4,
                          clients_per_round=2, rounds=2, batch_size=32, progress=False,
                          tensorboard=False, eval_every=0, algorithm="fedsparsify_global",
                          mask_every=1)
  configs = [base.replace(sparsity=s, seed=i, workdir=str(tmp_path / f"m{i}"))
             for i, s in enumerate((0.5, 0.8))]
  sweep.run_sweep(configs)
  single = configs[1].replace(workdir=str(tmp_path / "single"))
  train.run(single)
  got = load_global_masks(os.path.join(configs[1].workdir, "masks"))
  want = load_global_masks(os.path.join(single.workdir, "masks"))
  assert sorted(got) == sorted(want) == [1, 2]
  for r in want:
    assert sorted(got[r]) == sorted(want[r])
    for k in want[r]:
      np.testing.assert_array_equal(got[r][k], want[r][k], err_msg=f"round {r} {k}")


def test_bad_sweep_axis_is_one_line(tmp_path):
  bad = _sweep("--sweep=bogus=1,2", f"--workdir={tmp_path}")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "error: --sweep='bogus=1,2': --bogus is not a flag of run.py; accepted: any other "
      "run.py flag or declared hyperparameter"]
