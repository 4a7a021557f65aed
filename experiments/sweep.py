r"""Run a sweep: every run.py flag is the base configuration, plus sweep axes.

  python experiments/sweep.py --flagfile=experiments/flags/fedsparsify_fmnist_10c_noniid.flags \
      --sweep=sparsity=0.8,0.9,0.95,0.99 --seeds=3 --workdir=runs/fs_sweep

runs 4 sparsities × 3 seeds = 12 members. Members that share the algorithm, model and shapes
run together, one jitted program per round (`sparsefl_jax.sweep`); each member gets its own
folder `--workdir/<name>` (e.g. `sparsity=0.9,seed_offset=1`) with exactly what run.py writes
for the member's flags (config.json, metrics.jsonl, TensorBoard events, checkpoints), and
`--workdir` gets `sweep.json` (the members) and `sweep_summary.{md,json}` (last round of each
member, mean ± std over the seeds).

Flags of its own:
  --sweep=FLAG=V1,V2,...   one axis (repeat the flag for more axes; any run.py flag or
                           declared hyperparameter, e.g. --sweep=lr=0.01,0.02)
  --sweep_mode=grid|zip    axes combined as a grid (every combination, default) or zipped
                           (the i-th value of every axis together; equal lengths)
  --seeds=N                N seed replicas: replica s adds s to --seed, --data_seed,
                           --init_seed and --sampling_seed together (crossed with the axes)
  --sweep_chunk=C          members of a group run C at a time (0 = all at once): memory
                           grows linearly in C
  --resume                 continues every member from its latest checkpoint (members already
                           finished are only reported)

Several processes (`--coordinator_address`, `--num_processes`, `--process_id`, or JAX's
environment variables; on one machine `python -m sparsefl_jax.launch --num_processes=N --
experiments/sweep.py ...`): each chunk's members are split over every process's devices
(one SPMD program; members are independent, so the round needs no collective), so a chunk's
member count must be a multiple of the device count. Process 0 writes every file; orbax
saves the checkpoints collectively, as for `run.py`, so `--workdir` must be on a file system
all processes see.

Exit statuses: 0 done, 2 bad setting / busy workdir, 3 a member diverged (the others ran to
the end), 130/143 stopped by SIGINT/SIGTERM (every member checkpointed; rerun with --resume).
"""
import itertools
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

import run  # noqa: E402  (run.py: the base flags, their parsing and the one-line errors)
from sparsefl_jax import distributed  # noqa: E402
from sparsefl_jax.config import SEED_FIELDS, ConfigError, ExperimentConfig  # noqa: E402

NOT_SWEPT = ("workdir", "resume", "flagfile")

flags.DEFINE_multi_string("sweep", [], "A sweep axis FLAG=V1,V2,... (repeat for more axes).")
flags.DEFINE_enum("sweep_mode", "grid", ["grid", "zip"], "How several axes combine: every "
                  "combination (grid) or the i-th values together (zip).")
flags.DEFINE_integer("seeds", 1, "Seed replicas: replica s adds s to every seed flag.",
                     lower_bound=1)
flags.DEFINE_integer("sweep_chunk", 0, "Members of a group run this many at a time "
                     "(0 = all at once); memory grows linearly in it.", lower_bound=0)


def parse_axes(specs: Sequence[str], flag_values=flags.FLAGS) -> List[Tuple[str, List[Any]]]:
  """[(flag, [typed values])] from --sweep=FLAG=V1,V2 specs; ConfigError (one line) for an
  unknown flag, a bad value or an axis given twice."""
  axes: List[Tuple[str, List[Any]]] = []
  for spec in specs:
    name, eq, values = spec.partition("=")
    name = name.strip().lstrip("-")
    if not eq or not values:
      raise ConfigError(f"--sweep={spec!r} must be FLAG=V1,V2,... (e.g. sparsity=0.9,0.95)")
    if name in NOT_SWEPT or name not in flag_values:
      what = "is set once for the sweep" if name in NOT_SWEPT else "is not a flag of run.py"
      raise ConfigError(f"--sweep={spec!r}: --{name} {what}; accepted: any other run.py "
                        "flag or declared hyperparameter")
    if name in [a for a, _ in axes]:
      raise ConfigError(f"--sweep names --{name} twice; give all its values in one --sweep")
    if name in SEED_FIELDS and flag_values["seeds"].value > 1:
      raise ConfigError(f"--sweep={spec!r} with --seeds={flag_values['seeds'].value}: --seeds "
                        "already offsets every seed flag; use one of them")
    parser = flag_values[name].parser
    typed = []
    for raw in values.split(","):
      try:
        typed.append(parser.parse(raw.strip()))
      except ValueError as e:
        raise ConfigError(f"--sweep={spec!r}: value {raw!r} of --{name}: "
                          f"{' '.join(str(e).split())}") from None
    if len(set(map(repr, typed))) != len(typed):
      raise ConfigError(f"--sweep={spec!r} repeats a value")
    axes.append((name, typed))
  return axes


def members(axes: Sequence[Tuple[str, List[Any]]], mode: str, seeds: int
            ) -> List[Dict[str, Any]]:
  """The members' overrides in order (axes varying slowest first, seeds fastest); the seed
  replica is the key 'seed_offset'."""
  if mode == "zip" and axes and len({len(v) for _, v in axes}) > 1:
    lengths = ", ".join(f"{n}: {len(v)}" for n, v in axes)
    raise ConfigError(f"--sweep_mode=zip needs axes of equal length, got {lengths}")
  names = [n for n, _ in axes]
  if mode == "zip" and axes:
    combos = list(zip(*[v for _, v in axes]))
  else:
    combos = list(itertools.product(*[v for _, v in axes]))
  out = []
  for combo in combos:
    for s in range(seeds):
      m = dict(zip(names, combo))
      if seeds > 1:
        m["seed_offset"] = s
      out.append(m)
  return out


def member_configs(base: ExperimentConfig, overrides: Sequence[Dict[str, Any]], root: str
                   ) -> Tuple[List[ExperimentConfig], List[str]]:
  """Each member's config (its workdir `root/<name>`) and name."""
  from sparsefl_jax import sweep
  configs, names = [], []
  for ov in overrides:
    name = sweep.member_name(ov)
    values = {k: v for k, v in ov.items() if k != "seed_offset"}
    offset = ov.get("seed_offset", 0)
    values["workdir"] = os.path.join(root, name)
    configs.append(sweep.offset_seeds(sweep.apply_overrides(base, values), offset))
    names.append(name)
  return configs, names


def main(argv) -> None:
  del argv
  import signal
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, run._signal_before_training)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:   # several processes: jax.distributed before any other JAX call
    distributed.initialize_from_flags()
  except ValueError as e:
    run._fail(" ".join(str(e).split()))
  from sparsefl_jax import sweep
  from sparsefl_jax.guard import DIVERGED_EXIT
  from sparsefl_jax.metrics import write_json_atomic
  from sparsefl_jax.stopping import RunInterrupted
  from sparsefl_jax.workdir import WorkdirLock
  FLAGS = flags.FLAGS
  try:
    base = run.config_from_flags()
    axes = parse_axes(FLAGS.sweep)
    overrides = members(axes, FLAGS.sweep_mode, FLAGS.seeds)
    root = base.workdir
    configs, names = member_configs(base, overrides, root)
    os.makedirs(root, exist_ok=True)
    with WorkdirLock(root, distributed.lock_name()):
      if distributed.is_lead():   # several processes: process 0 writes the files
        write_json_atomic(os.path.join(root, sweep.SWEEP_JSON), {
            "axes": {n: v for n, v in axes}, "mode": FLAGS.sweep_mode, "seeds": FLAGS.seeds,
            "sweep_chunk": FLAGS.sweep_chunk,
            "members": [{"name": n, "overrides": o, "workdir": c.workdir}
                        for n, o, c in zip(names, overrides, configs)]})
      results = sweep.run_sweep(configs, chunk=FLAGS.sweep_chunk, names=names,
                                summary_dir=root)
  except ValueError as e:   # ConfigError and data/model errors: one line, exit 2
    run._fail(" ".join(str(e).split()))
  except RunInterrupted as e:
    run._fail(str(e), e.exit_code)
  if not distributed.is_lead():   # process 0 prints (and wrote) the sweep's summary
    sys.exit(DIVERGED_EXIT if any(r["status"] == "diverged" for r in results) else 0)
  with open(os.path.join(root, sweep.SUMMARY_MD)) as f:
    print(f.read(), end="")
  diverged = [r for r in results if r["status"] == "diverged"]
  for r in diverged:
    sys.stderr.write(f"error: member {r['name']}: {r['message']}\n")
  print(f"done: {len(results)} members, {len(diverged)} diverged; outputs in {root}")
  if diverged:
    sys.exit(DIVERGED_EXIT)


if __name__ == "__main__":
  try:
    run.define_flags(sys.argv)
  except ValueError as e:
    run._fail(" ".join(str(e).split()))
  app.run(main, flags_parser=run.parse_flags)
