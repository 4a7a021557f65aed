r"""Benchmark: a sweep (E experiments in one jitted program per round) against the same E
experiments run one after another, side by side in one process.

  python experiments/bench_sweep.py                  # the issue's measurement (~20+ min on 2 cores)
  python experiments/bench_sweep.py --quick          # smoke: 3 rounds, 2+2 members, E = 1, 2

Sections:
  fmnist   FedSparsify's Fashion-MNIST environment (fedsparsify_fmnist_10c_noniid.flags: 2-FC,
           10 clients all sampled, 4 local epochs, batch 32, 2 classes per client) with
           --fmnist_sparsities × --seeds members (default 4 × 3 = 12) for --rounds rounds.
  leaf     the LEAF CNN at W1's shapes (experiments/bench.py: 62 classes, 10 clients × 256
           synthetic examples, 1 epoch, batch 32, FedAvg) with --leaf_members members that
           differ in lr and the training/init/sampling seeds.
  scaling  the fmnist environment at E = --scaling members (one sweep each).

Per section: wall time of the sweep and of the sequential runs (data loading excluded,
compilation included and also shown apart), throughput in member-rounds/s over the timed
rounds (all but the first, which compiles), their ratio, GFLOP/s from XLA's cost analysis
(one compiled local step × the real local steps, as bench.py counts) and % of the jnp.dot
2048³ float32 peak measured in the same run, XLA temp MB of the compiled round and the
process's peak RSS. Results go to --json_out.
"""
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from sparsefl_jax import sweep, train  # noqa: E402
from sparsefl_jax.config import ExperimentConfig  # noqa: E402
from sparsefl_jax.federated import client as client_lib  # noqa: E402
from sparsefl_jax.federated.optimizers import client_optimizer  # noqa: E402

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_integer("rounds", 20, "Rounds per experiment (the first compiles).")
flags.DEFINE_list("fmnist_sparsities", ["0.8", "0.9", "0.95", "0.99"], "FMNIST members' s_T.")
flags.DEFINE_integer("seeds", 3, "Seed replicas per sparsity (all four seeds offset).")
flags.DEFINE_integer("leaf_members", 4, "Members of the LEAF CNN sweep.")
flags.DEFINE_list("scaling", ["1", "2", "4", "8", "16"], "E values of the scaling section.")
flags.DEFINE_list("sections", ["fmnist", "leaf", "scaling"], "Sections to run.")
flags.DEFINE_bool("quick", False, "Smoke run: 3 rounds, 2 FMNIST and 2 LEAF members, E=1,2.")
flags.DEFINE_string("json_out", "experiments/results/bench_sweep.json", "Results file.")


from benchlib import RssPeak, matmul_peak  # noqa: E402  (experiments/benchlib.py)


def fmnist_configs(sparsities: Sequence[float], seeds: int, rounds: int) -> List[ExperimentConfig]:
  base = ExperimentConfig.from_flagfile(
      os.path.join(ROOT, "experiments/flags/fedsparsify_fmnist_10c_noniid.flags"),
      rounds=rounds, progress=False, tensorboard=False, eval_every=0, workdir="/tmp/unused")
  return [base.replace(sparsity=float(s), **{f: getattr(base, f) + k for f in sweep.SEED_FIELDS})
          for s in sparsities for k in range(seeds)]


def leaf_configs(members: int, rounds: int) -> List[ExperimentConfig]:
  base = ExperimentConfig(algorithm="fedavg", dataset="synthetic", model="leaf_cnn",
                          synthetic_shape="28,28,1", synthetic_classes=62,
                          synthetic_examples=256, num_clients=10, clients_per_round=10,
                          local_epochs=1, batch_size=32, lr=0.05, rounds=rounds,
                          progress=False, tensorboard=False, eval_every=0,
                          workdir="/tmp/unused")
  return [base.replace(lr=0.05 * (1 + 0.25 * e), seed=e, init_seed=e, sampling_seed=e)
          for e in range(members)]


def member_round_flops(exp: train.Experiment) -> float:
  """FLOPs of one round of one experiment: XLA's cost of one local step × the real steps."""
  cfg, alg = exp.config, exp.algorithm
  one = client_lib.LocalConfig(1, cfg.batch_size, cfg.batch_size)
  st = exp.init_state
  from sparsefl_jax.data import preprocess
  bfn = preprocess.make_batch_fn(exp.dataset)

  def f(params, mstate, context, x, y):
    return client_lib.local_train(alg, exp.model, bfn, one, lambda: client_optimizer(0.01),
                                  params, mstate, context, x, y, jnp.int32(cfg.batch_size),
                                  jax.random.PRNGKey(0), jnp.int32(1)).params

  context = alg.client_context(st.params, st.algo_state, jnp.int32(1))
  x = exp.client_data.x[0, :cfg.batch_size]
  y = exp.client_data.y[0, :cfg.batch_size]
  ca = jax.jit(f).lower(st.params, st.model_state, context, x, y).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  per_step = float(ca.get("flops", 0.0))
  counts = np.asarray(exp.dataset.counts)
  steps = cfg.local_epochs * np.ceil(counts / cfg.batch_size)
  mean_steps = float(np.sort(steps)[::-1][:cfg.clients_per_round].mean())  # all sampled here
  return per_step * cfg.clients_per_round * mean_steps


def time_sequential(configs: Sequence[ExperimentConfig]) -> Dict[str, Any]:
  """The members one after another, each its own jitted round (run.py's path)."""
  datasets = [train.build_dataset(c) for c in configs]   # loading is not timed
  wall = compile_s = timed = 0.0
  flops = None
  for cfg, ds in zip(configs, datasets):
    t0 = time.perf_counter()
    exp = train.build_experiment(cfg, ds)
    state = exp.init_state
    t1 = time.perf_counter()
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    jax.block_until_ready(state.params)
    t2 = time.perf_counter()
    for _ in range(cfg.rounds - 1):
      state, m = exp.round_step(state, exp.client_data, exp.train_key)
    jax.block_until_ready(state.params)
    t3 = time.perf_counter()
    wall += t3 - t0
    compile_s += t2 - t1
    timed += t3 - t2
    if flops is None:
      flops = member_round_flops(exp)
  timed_rounds = len(configs) * (configs[0].rounds - 1)
  return {"wall_s": wall, "first_round_s": compile_s, "timed_s": timed,
          "member_rounds_per_s": timed_rounds / timed if timed else float("nan"),
          "flops_per_member_round": flops}


def time_sweep(configs: Sequence[ExperimentConfig]) -> Dict[str, Any]:
  """All members in one sweep (one jitted program per round)."""
  examples = sweep.load_examples(configs[0])   # loading is not timed
  t0 = time.perf_counter()
  sw = sweep.build_sweep(configs, examples=examples)
  state = sw.init_state
  t1 = time.perf_counter()
  state, _ = sw.round_step(state)
  jax.block_until_ready(state.params)
  t2 = time.perf_counter()
  for _ in range(configs[0].rounds - 1):
    state, _ = sw.round_step(state)
  jax.block_until_ready(state.params)
  t3 = time.perf_counter()
  timed_rounds = len(configs) * (configs[0].rounds - 1)
  # Memory of the compiled round (an extra AOT compile, after the timing).
  ma = sw.program.step_for_round(1).lower(state, sw.data, sw.train_keys,
                                          sw.hp).compile().memory_analysis()
  return {"wall_s": t3 - t0, "build_s": t1 - t0, "first_round_s": t2 - t1, "timed_s": t3 - t2,
          "member_rounds_per_s": timed_rounds / (t3 - t2) if t3 > t2 else float("nan"),
          "xla_temp_mb": ma.temp_size_in_bytes / 2**20 if ma is not None else float("nan"),
          "xla_argument_mb": ma.argument_size_in_bytes / 2**20 if ma is not None
          else float("nan")}


def side_by_side(name: str, configs: Sequence[ExperimentConfig], peak: float,
                 sequential: bool = True) -> Dict[str, Any]:
  row: Dict[str, Any] = {"section": name, "members": len(configs),
                         "rounds": configs[0].rounds}
  with RssPeak() as rss:
    row["sweep"] = time_sweep(configs)
  row["sweep"]["rss_peak_mb"] = rss.peak_mb
  if sequential:
    with RssPeak() as rss:
      row["sequential"] = time_sequential(configs)
    row["sequential"]["rss_peak_mb"] = rss.peak_mb
    flops = row["sequential"]["flops_per_member_round"]
    for k in ("sweep", "sequential"):
      g = flops * row[k]["member_rounds_per_s"] / 1e9
      row[k]["gflops"], row[k]["peak_fraction"] = g, g / peak
    row["throughput_ratio"] = (row["sweep"]["member_rounds_per_s"]
                               / row["sequential"]["member_rounds_per_s"])
    row["wall_ratio"] = row["sequential"]["wall_s"] / row["sweep"]["wall_s"]
  return row


def _print(row: Dict[str, Any]) -> None:
  s = row["sweep"]
  line = (f"{row['section']:>8} E={row['members']:>2}: sweep {s['wall_s']:7.1f} s wall "
          f"({s['member_rounds_per_s']:7.2f} member-rounds/s, temp {s['xla_temp_mb']:7.1f} MB, "
          f"RSS {s['rss_peak_mb']:6.0f} MB)")
  if "sequential" in row:
    q = row["sequential"]
    line += (f" | sequential {q['wall_s']:7.1f} s ({q['member_rounds_per_s']:7.2f}/s) | "
             f"throughput x{row['throughput_ratio']:.2f}, wall x{row['wall_ratio']:.2f} | "
             f"GFLOP/s {s['gflops']:.1f} vs {q['gflops']:.1f} ({100 * s['peak_fraction']:.1f}% "
             f"vs {100 * q['peak_fraction']:.1f}% of peak)")
  print(line, flush=True)


def main(argv) -> None:
  del argv
  rounds, sparsities, seeds = FLAGS.rounds, FLAGS.fmnist_sparsities, FLAGS.seeds
  leaf_members, scaling = FLAGS.leaf_members, [int(e) for e in FLAGS.scaling]
  if FLAGS.quick:
    rounds, sparsities, seeds, leaf_members, scaling = 3, ["0.8", "0.9"], 1, 2, [1, 2]
  peak = matmul_peak()
  print(f"jnp.dot 2048^3 float32: {peak:.1f} GFLOP/s; jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}", flush=True)
  results: Dict[str, Any] = {"matmul_peak_gflops": peak, "jax": jax.__version__,
                             "device": jax.devices()[0].device_kind, "rounds": rounds,
                             "command": " ".join(sys.argv), "rows": []}
  if "fmnist" in FLAGS.sections:
    row = side_by_side("fmnist", fmnist_configs(sparsities, seeds, rounds), peak)
    results["rows"].append(row)
    _print(row)
  if "leaf" in FLAGS.sections:
    row = side_by_side("leaf", leaf_configs(leaf_members, rounds), peak)
    results["rows"].append(row)
    _print(row)
  if "scaling" in FLAGS.sections:
    all_cfgs = fmnist_configs(["0.8", "0.9", "0.95", "0.99"], max(1, -(-max(scaling) // 4)),
                              rounds)
    for e in scaling:
      row = side_by_side("scaling", all_cfgs[:e], peak, sequential=(e == 1))
      results["rows"].append(row)
      _print(row)
  if FLAGS.json_out:
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
  app.run(main)
