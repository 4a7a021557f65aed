r"""Population-scale benchmark of `--data_placement=host`: memory flat in the population size.

Writes (once) a synthetic FEMNIST-like population — 28×28×1 uint8 examples, 62 classes,
`--min_examples`..`--max_examples` per client, as a flat `.npy` folder
(`sparsefl_jax.data.host_placement.FlatWriter`) — and trains a few rounds on the first P
clients of it for each P in `--populations`, each in a fresh process, with `--cohort` clients
per round streamed from disk. Per population it reports the round time (median over the
timed rounds, the first round's compilation excluded), the host time to prepare a cohort
(sample + read + transfer, on the prefetch thread), how long the loop waited for it, and
the process's peak RSS (and its anonymous / file-backed parts at the end). With
`--resident_population=P` it also runs the device-resident path at that population (its
whole training set in memory and on the device) to compare round times.

  python experiments/bench_population.py --folder=/data/population \
      --populations=20000,100000,200000 --resident_population=20000 --rounds=4
  # smoke (small, minutes):
  python experiments/bench_population.py --folder=/tmp/pop --populations=2000,10000,20000 \
      --min_examples=10 --max_examples=30 --cohort=20 --rounds=3 --resident_population=2000

The full-size population (200,000 clients × 100–300 examples ≈ 40 M examples) is ~31 GB on
disk; writing it takes several minutes.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE, CLASSES = (28, 28, 1), 62


def write_population(folder: str, clients: int, low: int, high: int, seed: int) -> None:
  """FEMNIST-like random clients, written chunk by chunk (memory O(chunk))."""
  from sparsefl_jax.data.host_placement import FlatWriter
  rng = np.random.default_rng(seed)
  sizes = rng.integers(low, high + 1, clients)
  writer = FlatWriter(folder, int(sizes.sum()), SHAPE, np.uint8, num_classes=CLASSES)
  start = time.perf_counter()
  chunk = 2000
  for first in range(0, clients, chunk):
    part = sizes[first:first + chunk]
    x = rng.integers(0, 256, (int(part.sum()),) + SHAPE, dtype=np.uint8)
    y = rng.integers(0, CLASSES, int(part.sum())).astype(np.int32)
    offs = np.concatenate([[0], np.cumsum(part)])
    for i, n in enumerate(part):
      writer.add(x[offs[i]:offs[i + 1]], y[offs[i]:offs[i + 1]])
  src = writer.close(max_examples=high)
  print(f"wrote {clients} clients, {int(sizes.sum())} examples, "
        f"{src.nbytes_on_disk / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s",
        flush=True)


def _rss() -> dict:
  """Peak RSS of this process (VmHWM: getrusage's ru_maxrss would carry the parent's peak
  over exec) and its anonymous / file-backed parts now, in MB."""
  out = {}
  names = {"VmHWM": "peak_rss_mb", "RssAnon": "rssanon_mb", "RssFile": "rssfile_mb"}
  with open("/proc/self/status") as f:
    for line in f:
      key = line.split(":")[0]
      if key in names:
        out[names[key]] = int(line.split()[1]) / 1024
  return out


def child(args) -> None:
  """One population, one placement, in this (fresh) process; prints a RESULT line."""
  import jax
  from sparsefl_jax import ExperimentConfig, train
  from sparsefl_jax.data import FederatedDataset
  from sparsefl_jax.data.host_placement import FlatClients
  src = FlatClients(args.folder, num_clients=args.population)
  rng = np.random.default_rng(0)
  test_x = rng.integers(0, 256, (64,) + SHAPE, dtype=np.uint8)
  test_y = rng.integers(0, CLASSES, 64).astype(np.int32)
  if args.placement == "device":   # the whole population in memory and on the device
    x, y = src.gather(np.arange(src.num_clients))
    counts = src.counts
  else:   # a one-client stand-in: shapes, normalisation and the test split only
    x, y = src.gather(np.asarray([0]))
    counts = src.counts[:1]
  ds = FederatedDataset("population", x, y, counts, test_x, test_y, CLASSES,
                        np.asarray([0.5], np.float32), np.asarray([0.29], np.float32))
  cfg = ExperimentConfig(dataset="synthetic", synthetic_shape="28,28,1",
                         synthetic_classes=CLASSES, model=args.model,
                         num_clients=args.population, clients_per_round=args.cohort,
                         batch_size=args.batch_size, local_epochs=1, lr=0.05,
                         client_map=args.client_map, data_placement=args.placement,
                         num_devices=args.num_devices, workdir="/unused", progress=False)
  start = time.perf_counter()
  exp = train.build_experiment(cfg, ds, client_source=src if args.placement == "host"
                               else None)
  build_s = time.perf_counter() - start
  state, times = exp.init_state, []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    state, metrics = exp.round_step(state, exp.client_data, exp.train_key)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t0)
  loads = getattr(exp.round_step, "loads", [])
  if hasattr(exp.round_step, "close"):
    exp.round_step.close()
  timed = times[1:] or times
  result = dict(population=args.population, placement=args.placement,
                cohort=args.cohort, model=args.model, rounds=args.rounds,
                build_s=build_s, first_round_s=times[0],
                round_s_median=float(np.median(timed)), round_s=times,
                train_loss=float(metrics["train_loss"]),
                prepare_s_median=float(np.median([ld.prepare_s for ld in loads[1:]]))
                if len(loads) > 1 else None,
                wait_s_median=float(np.median([ld.wait_s for ld in loads[1:]]))
                if len(loads) > 1 else None,
                cohort_mb=loads[0].bytes / 1e6 if loads else None, **_rss())
  print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--folder", required=True)
  p.add_argument("--populations", default="20000,100000,200000")
  p.add_argument("--resident_population", type=int, default=0,
                 help="also run the device-resident path at this population (0 = skip)")
  p.add_argument("--min_examples", type=int, default=100)
  p.add_argument("--max_examples", type=int, default=300)
  p.add_argument("--cohort", type=int, default=100)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--model", default="mlp_small")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--client_map", default="map")
  p.add_argument("--num_devices", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json_out", default="")
  # child mode
  p.add_argument("--child", action="store_true")
  p.add_argument("--population", type=int, default=0)
  p.add_argument("--placement", default="host")
  args = p.parse_args()
  if args.child:
    child(args)
    return
  pops = [int(s) for s in args.populations.split(",")]
  meta = os.path.join(args.folder, "meta.json")
  if not os.path.exists(meta) or json.load(open(meta))["num_clients"] < max(pops):
    write_population(args.folder, max(pops), args.min_examples, args.max_examples, args.seed)
  runs = [(n, "host") for n in pops]
  if args.resident_population:
    runs = [(args.resident_population, "device"), (args.resident_population, "host")] + [
        r for r in runs if r != (args.resident_population, "host")]
  results = []
  for population, placement in runs:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--folder={args.folder}",
           f"--population={population}", f"--placement={placement}",
           f"--cohort={args.cohort}", f"--rounds={args.rounds}", f"--model={args.model}",
           f"--batch_size={args.batch_size}", f"--client_map={args.client_map}",
           f"--num_devices={args.num_devices}"]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
      sys.exit(f"population {population} ({placement}) failed:\n{proc.stderr[-3000:]}")
    results.append(json.loads(line[-1][len("RESULT "):]))
    r = results[-1]
    print(f"{placement:6s} P={population:>7d}: round {r['round_s_median']:.3f} s "
          f"(first {r['first_round_s']:.1f} s), cohort prepare "
          f"{r['prepare_s_median'] or 0:.3f} s, wait {r['wait_s_median'] or 0:.3f} s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB (anon {r['rssanon_mb']:.0f}, file "
          f"{r['rssfile_mb']:.0f})", flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
