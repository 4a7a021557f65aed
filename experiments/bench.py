"""Round-throughput benchmark of the jitted federated round (README "Performance", BUILD.md).

For each workload (W0 fmnist_fc, W1 leaf_cnn, W2 resnet18) and algorithm it times one whole
round under each client map (vmap, map, chunked) and three Python-loop baselines, side by side
in one run, with synthetic data of the right shapes:

  loop_steps    what a per-client framework does (a Flower client's fit): a Python loop over
                the clients and over each client's batches, gathered on the host like a data
                loader's, calling a jitted train step (`client.sgd_step`); jitted aggregation.
  loop_clients  a Python loop over the clients, each ONE jitted `client.local_train` (a
                lax.scan over its steps): the strongest loop, one XLA program per client.
  torch_loop    the loop_steps round written in PyTorch (experiments/bench_torch.py), in a
                subprocess with --torch_python; skipped when torch is not installed.

The JAX baselines run the same model and math as the engine (the table's Δ column checks it).
Then: scaling in
clients per round (time, XLA buffer memory, compile counts), the streamed vs stacked
aggregate's memory, and rounds/s on 1, 2, 4 simulated CPU devices (one subprocess each).

Reported per row: seconds per round (median of --rounds after --warmup), compile seconds,
GFLOP/s and the fraction of the jnp.dot 2048^3 float32 peak measured in the same run, XLA
temp buffer MB (memory_analysis of the compiled round), peak RSS while the rows' rounds ran.

FLOPs are counted ANALYTICALLY FROM XLA: cost_analysis() of one compiled local step (one
client, one batch: forward, backward, optimizer update; no loop, so nothing is undercounted)
times the number of real local steps in the round (Σ_k epochs·ceil(n_k/B)). The compiled
round's own cost_analysis would count each while-loop body once. Aggregation FLOPs (~K·|θ|)
are ignored; dummy (padding) clients are not counted as work.

  python experiments/bench.py               # the full benchmark (< 15 min on a quiet machine)
  python experiments/bench.py --quick       # a short validation run (~2-3 min)
"""
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax import algorithms as algorithms_lib
from sparsefl_jax import train
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated import round as round_lib
from sparsefl_jax.federated import sharding
from sparsefl_jax.federated.aggregation import weighted_mean
from sparsefl_jax.federated.optimizers import ClientLRSchedule, client_optimizer
from sparsefl_jax.federated.sampling import sample_clients
from sparsefl_jax.federated.state import ClientData, ServerState

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["W0", "W1", "W2"], "Workloads for the main table.")
flags.DEFINE_list("algorithms", ["fedavg"], "Algorithms (unknown/unavailable ones are skipped "
                  "with a note), e.g. fedavg,swat,sparsyfed.")
flags.DEFINE_float("sparsity", 0.9, "Sparsity passed to sparse algorithms' configs in the "
                   "main table (--algorithms).")
flags.DEFINE_integer("topk_period", 10, "SWAT/ZeroFL: recompute top-K thresholds every N local "
                     "steps (SWAT's CIFAR setting is 10; 1 = exact top-K every step).")
flags.DEFINE_list("sparse", ["swat:0.9", "sparsyfed:0.95"], "Sparse-vs-dense section: "
                  "algorithm:sparsity pairs timed beside dense FedAvg; empty to skip.")
flags.DEFINE_list("sparse_workloads", ["W1"], "Workloads of the sparse-vs-dense section.")
flags.DEFINE_list("sparse_maps", ["vmap", "map", "chunked"],
                  "Client maps of the sparse-vs-dense section.")
flags.DEFINE_list("sparse_baselines", ["loop_clients"], "JAX loop baselines of the "
                  "sparse-vs-dense section (loop_steps, loop_clients).")
flags.DEFINE_integer("sparse_rounds", 2, "Timed rounds per row of the sparse-vs-dense section.")
flags.DEFINE_list("client_maps", ["vmap", "map", "chunked"], "Client maps to time.")
flags.DEFINE_integer("chunk_size", 5, "Clients per vmapped chunk for client_map=chunked.")
flags.DEFINE_list("baselines", ["loop_steps", "loop_clients", "torch_loop"],
                  "Python-loop baselines timed beside the engine (W0/W1): loop_steps (a "
                  "per-client framework: Python loop over clients and batches, jitted train "
                  "step), loop_clients (Python loop over clients, each one jitted lax.scan), "
                  "torch_loop (the same loop in PyTorch, experiments/bench_torch.py).")
flags.DEFINE_string("torch_python", "", "Python with torch for the torch_loop baseline "
                    "(default: .venv-torch/bin/python when present, else this interpreter).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per row (median reported).")
flags.DEFINE_integer("warmup", 1, "Untimed rounds first (the first one compiles).")
flags.DEFINE_list("w2_maps", ["chunked"], "Client maps for W2 (a ResNet-18 round is ~1 min "
                  "on 2 cores; vmap of 10 clients needs ~9 GB).")
flags.DEFINE_integer("w2_rounds", 2, "Timed rounds for W2 rows (2 keeps the default run under "
                     "15 min; use 5 for the full protocol).")
flags.DEFINE_bool("w2_baselines", False, "Also time the baselines on W2 (+5 min).")
flags.DEFINE_bool("scaling", True, "Run the clients-per-round scaling sweep.")
flags.DEFINE_list("scaling_workloads", ["W0", "W1"], "Workloads of the scaling sweep.")
flags.DEFINE_list("scaling_clients", ["1", "2", "4", "8", "16", "32", "64"],
                  "Clients per round in the sweep.")
flags.DEFINE_list("scaling_maps", ["chunked"], "Client maps of the sweep.")
flags.DEFINE_integer("scaling_rounds", 2, "Timed rounds per sweep point (after 1 warm-up).")
flags.DEFINE_list("memory_clients", ["16", "64"], "K for the streamed-vs-stacked memory "
                  "check (compile only, W1): streamed memory stays flat in K.")
flags.DEFINE_list("memory_algorithms", ["fedavg", "fedsparsify_local", "feddst"],
                  "Methods of the memory check: aggregates with counted statistics (majority "
                  "vote, FedDST's mask-count mean) stream like FedAvg's mean.")
flags.DEFINE_list("memory_maps", ["map", "chunked"], "Client maps of the memory check.")
flags.DEFINE_list("devices", ["1", "2", "4"], "Simulated CPU device counts (subprocesses); "
                  "empty to skip.")
flags.DEFINE_string("device_workload", "W1", "Workload of the device sweep.")
flags.DEFINE_integer("device_clients", 8, "Clients per round in the device sweep.")
flags.DEFINE_string("device_map", "vmap", "Client map in the device sweep.")
flags.DEFINE_integer("device_rounds", 3, "Timed rounds per device-sweep point.")
flags.DEFINE_bool("quick", False, "Short validation run: W0 and W1 at 2 clients, 2 rounds, "
                  "small sweeps (W0 only), 1 vs 2 devices on W0.")
flags.DEFINE_string("out", "bench_results.json", "JSON output path.")
flags.DEFINE_string("child", "", "Internal: run one device-sweep point and print JSON.")


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  model: str
  num_classes: int
  shape: tuple
  num_clients: int
  clients_per_round: int
  examples: int
  epochs: int
  batch: int
  lr: float = 0.01


WORKLOADS = {
    "W0": Workload("W0", "fmnist_fc", 10, (28, 28, 1), 100, 10, 600, 4, 32),
    "W1": Workload("W1", "leaf_cnn", 62, (28, 28, 1), 10, 10, 256, 1, 32),
    "W2": Workload("W2", "resnet18", 10, (32, 32, 3), 10, 10, 128, 1, 32),
}


# ----------------------------------------------------------------------------- measuring


class Compiles:
  """Counts XLA backend compilations (and their seconds) via jax.monitoring."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event: str, duration: float, **kw) -> None:
    del kw
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1
      self.seconds += duration


COMPILES: Optional[Compiles] = None


from benchlib import RssPeak, matmul_peak  # noqa: E402  (experiments/benchlib.py)


def _cost_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0))


def _temp_mb(compiled) -> float:
  ma = compiled.memory_analysis()
  return ma.temp_size_in_bytes / 2**20 if ma is not None else float("nan")


# ----------------------------------------------------------------------------- building


@dataclasses.dataclass
class Setup:
  """A workload with one algorithm: model, data, initial state and round pieces."""
  wl: Workload
  algorithm: Any
  model: Any
  batch_fn: Callable
  data: ClientData
  state: ServerState
  local: client_lib.LocalConfig
  lr: ClientLRSchedule


def _batch_fn(x, key, train):
  del key, train
  return (x.astype(jnp.float32) / 255.0 - 0.5) / 0.25


def build_setup(wl: Workload, algo_name: str, num_clients: Optional[int] = None,
                sparsity: Optional[float] = None) -> Setup:
  """Synthetic uint8 images, random labels; every client holds `wl.examples` examples."""
  p = num_clients or wl.num_clients
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (p, wl.examples) + wl.shape, dtype=np.uint8)
  y = rng.integers(0, wl.num_classes, (p, wl.examples)).astype(np.int32)
  data = ClientData.from_arrays(x, y, np.full(p, wl.examples, np.int32))
  cfg = ExperimentConfig(algorithm=algo_name, model=wl.model,
                         sparsity=FLAGS.sparsity if sparsity is None else sparsity,
                         topk_period=FLAGS.topk_period)
  algorithm = algorithms_lib.get_algorithm(algo_name, cfg)
  dummy = jnp.zeros((1,) + wl.shape, jnp.float32)
  algorithm, model, params, variables = train.assemble_model(
      algorithm, wl.model, wl.num_classes, dummy, jax.random.PRNGKey(0))
  state = round_lib.init_server_state(algorithm, params, variables, None, jax.random.PRNGKey(3))
  local = client_lib.LocalConfig(wl.epochs, wl.batch, wl.examples)
  return Setup(wl, algorithm, model, _batch_fn, data, state, local, ClientLRSchedule(wl.lr))


def step_flops(s: Setup) -> float:
  """XLA cost_analysis FLOPs of ONE local step of one client (a 1-step local_train)."""
  one = client_lib.LocalConfig(1, s.wl.batch, s.wl.batch)

  def f(params, mstate, algo_state, x, y):
    res = client_lib.local_train(
        s.algorithm, s.model, s.batch_fn, one, lambda: client_optimizer(0.01), params, mstate,
        algo_state, x, y, jnp.int32(s.wl.batch), jax.random.PRNGKey(0), jnp.int32(1))
    return res.params

  st = s.state
  context = s.algorithm.client_context(st.params, st.algo_state, jnp.int32(1))
  args = (st.params, st.model_state, context, s.data.x[0, :s.wl.batch],
          s.data.y[0, :s.wl.batch])
  return _cost_flops(jax.jit(f).lower(*args).compile())


def round_flops(s: Setup, k: int, per_step: float) -> float:
  return per_step * k * s.local.num_steps   # every client holds wl.examples examples


def round_config(s: Setup, k: int, client_map: str, num_devices: int = 1,
                 stream: bool = True) -> round_lib.RoundConfig:
  return round_lib.RoundConfig(
      num_clients=s.data.num_clients, clients_per_round=k, local=s.local, lr_schedule=s.lr,
      client_map=client_map, client_chunk_size=min(FLAGS.chunk_size, k),
      num_devices=num_devices, stream_aggregate=stream)


def _fresh(tree):
  return jax.tree.map(jnp.copy, tree)


def time_engine(s: Setup, k: int, client_map: str, rounds: int, warmup: int,
                num_devices: int = 1) -> Dict[str, Any]:
  """Times the jitted round_step; checks that timed rounds trigger no compilation."""
  cfg = round_config(s, k, client_map, num_devices)
  step = round_lib.jit_round_step(round_lib.build_round_step(s.algorithm, s.model, s.batch_fn,
                                                             cfg, None))
  data, state = s.data, _fresh(s.state)
  if num_devices > 1:
    mesh = round_lib.round_mesh(cfg)
    data, state = sharding.replicate(data, mesh), sharding.replicate(state, mesh)
  key = jax.random.PRNGKey(4)
  c0, cs0 = COMPILES.count, COMPILES.seconds
  t = time.perf_counter()
  compiled = step.lower(state, data, key).compile()
  compile_s = time.perf_counter() - t
  first_params = None
  for i in range(warmup):
    state, _ = step(state, data, key)
    if i == 0:
      first_params = jax.device_get(state.params)
  c1 = COMPILES.count
  times = []
  with RssPeak() as rss:
    for _ in range(rounds):
      t = time.perf_counter()
      state, metrics = step(state, data, key)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
  return {"seconds": statistics.median(times), "times": times, "compile_s": compile_s,
          "compiles": c1 - c0, "compiles_during_timing": COMPILES.count - c1,
          "backend_compile_s": COMPILES.seconds - cs0, "jit_cache_size": step._cache_size(),
          "xla_temp_mb": _temp_mb(compiled), "rss_peak_mb": rss.peak_mb,
          "first_params": first_params}


class _Loop:
  """A per-client framework's round: jitted server prep, a Python loop over the sampled
  clients, jitted aggregation (the same math as round_step). Subclasses train one client."""

  def __init__(self, s: Setup, k: int):
    self.cfg = cfg = round_config(s, k, "vmap")
    alg = s.algorithm

    @jax.jit
    def prep(state, key):
      t = state.round + 1
      ids = sample_clients(state.sampling_key, t, cfg.num_clients, k)
      global_in = alg.broadcast(state.params, state.algo_state, t)
      return (t, ids, global_in, alg.client_context(global_in, state.algo_state, t),
              cfg.lr_schedule(t), jax.random.fold_in(key, t))

    @jax.jit
    def aggregate(state, global_in, t, weights, uploads, mstates):
      uploads = jax.tree.map(lambda *a: jnp.stack(a), *uploads)
      mstates = jax.tree.map(lambda *a: jnp.stack(a), *mstates)
      candidate = alg.aggregate(global_in, uploads, weights, state.algo_state, t)
      params, algo_state = alg.server_post(candidate, state.algo_state, t)
      return state._replace(round=t, params=params, model_state=weighted_mean(mstates, weights),
                            algo_state=algo_state)

    self.prep, self.aggregate = prep, aggregate

  def client(self, global_in, mstate, context, lr, t, data, cid: int, round_key):
    """-> (Upload, model_state) of client `cid`."""
    raise NotImplementedError

  def __call__(self, state, data, key):
    t, ids, global_in, context, lr, round_key = self.prep(state, key)
    outs = [self.client(global_in, state.model_state, context, lr, t, data, int(cid),
                        round_key) for cid in np.asarray(ids)]
    return self.aggregate(state, global_in, t, data.counts[ids].astype(jnp.float32),
                          [o[0] for o in outs], [o[1] for o in outs])


class LoopClients(_Loop):
  """Each client is ONE jitted call: `client.local_train` (a lax.scan over its local steps)."""

  def __init__(self, s: Setup, k: int):
    super().__init__(s, k)
    alg, cfg = s.algorithm, self.cfg

    @jax.jit
    def one_client(global_in, mstate, context, lr, t, data, cid, round_key):
      res = client_lib.local_train(
          alg, s.model, s.batch_fn, cfg.local, lambda: client_optimizer(lr), global_in, mstate,
          context, data.x[cid], data.y[cid], data.counts[cid],
          jax.random.fold_in(round_key, cid), t)
      return alg.client_upload(global_in, res.params, res.client_state, t), res.model_state

    self.client = one_client


class LoopSteps(_Loop):
  """What a per-client framework does (a Flower client's fit): a Python loop over the client's
  batches, each gathered on the host like a data loader's and passed to a jitted train step
  (`client.sgd_step`, the step `local_train` scans), then a jitted upload."""

  def __init__(self, s: Setup, k: int):
    super().__init__(s, k)
    alg, cfg = s.algorithm, self.cfg
    self.host_x, self.host_y = np.asarray(s.data.x), np.asarray(s.data.y)

    @jax.jit
    def start(global_in, mstate, context, lr, t, n, key):
      return client_lib.init_client(alg, cfg.local, client_optimizer(lr), global_in, mstate,
                                    context, n, key, t)

    @jax.jit
    def train_step(global_in, carry, lr, xb, yb, orders, n, step_key, step):
      _, wb, rng = client_lib.step_batch(cfg.local, orders, n, step_key, step)
      return client_lib.sgd_step(alg, s.model, s.batch_fn, client_optimizer(lr), global_in,
                                 carry, xb, yb, wb, rng, client_lib.local_step(cfg.local, step))

    @jax.jit
    def upload(global_in, carry, t):
      return alg.client_upload(global_in, carry.params, carry.client_state, t)

    self.start, self.train_step, self.upload = start, train_step, upload

  def client(self, global_in, mstate, context, lr, t, data, cid, round_key):
    local, n = self.cfg.local, int(data.counts[cid])
    carry, orders, step_key = self.start(global_in, mstate, context, lr, t, data.counts[cid],
                                         jax.random.fold_in(round_key, cid))
    host_orders = np.asarray(orders)
    for step in range(local.num_steps):
      b = step % local.steps_per_epoch
      if b * local.batch_size >= n:
        continue                                   # padding steps: nothing to train on
      idx = host_orders[step // local.steps_per_epoch,
                        b * local.batch_size:(b + 1) * local.batch_size]
      carry = self.train_step(global_in, carry, lr, self.host_x[cid][idx],
                              self.host_y[cid][idx], orders, data.counts[cid], step_key,
                              np.int32(step))
    return self.upload(global_in, carry, t), carry.model_state


LOOPS = {"loop_steps": LoopSteps, "loop_clients": LoopClients}


def time_loop(s: Setup, k: int, mode: str, rounds: int, warmup: int) -> Dict[str, Any]:
  """Times a Python-loop baseline (`LOOPS[mode]`) like `time_engine` times the engine."""
  run = LOOPS[mode](s, k)
  state, key = _fresh(s.state), jax.random.PRNGKey(4)
  c0, cs0 = COMPILES.count, COMPILES.seconds
  t = time.perf_counter()
  state = run(state, s.data, key)
  jax.block_until_ready(state)
  first = time.perf_counter() - t
  first_params = jax.device_get(state.params)
  for _ in range(warmup - 1):
    state = run(state, s.data, key)
  c1 = COMPILES.count
  times = []
  with RssPeak() as rss:
    for _ in range(rounds):
      t = time.perf_counter()
      state = run(state, s.data, key)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return {"seconds": med, "times": times, "compile_s": max(first - med, 0.0),
          "compiles": c1 - c0, "compiles_during_timing": COMPILES.count - c1,
          "backend_compile_s": COMPILES.seconds - cs0, "jit_cache_size": None,
          "xla_temp_mb": float("nan"), "rss_peak_mb": rss.peak_mb,
          "first_params": first_params}


def time_torch(wl: Workload, rounds: int, warmup: int) -> Optional[Dict[str, Any]]:
  """The PyTorch loop (experiments/bench_torch.py) in a subprocess; None when torch is absent."""
  cmd = [FLAGS.torch_python, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "bench_torch.py"),
         f"--workload={wl.name}", f"--clients={wl.clients_per_round}",
         f"--rounds={rounds}", f"--warmup={warmup}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
  except OSError as e:
    print(f"  {wl.name} torch_loop: skipped ({e})")
    return None
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TORCH ")]
  if proc.returncode != 0 or not lines:
    why = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    print(f"  {wl.name} torch_loop: skipped ({why[0]}; install with "
          f"`pip install torch==2.13.0` and pass --torch_python)")
    return None
  return json.loads(lines[-1][len("TORCH "):])


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- sections


def main_table(workloads: Sequence[Workload], algos: Sequence[str], peak: float,
               rounds: int, warmup: int) -> List[Dict[str, Any]]:
  rows = []
  for wl in workloads:
    for algo in algos:
      s = build_setup(wl, algo)
      per_step = step_flops(s)
      flops = round_flops(s, wl.clients_per_round, per_step)
      maps = FLAGS.w2_maps if wl.name == "W2" else FLAGS.client_maps
      n = FLAGS.w2_rounds if wl.name == "W2" and not FLAGS.quick else rounds
      loops = FLAGS.baselines if (wl.name != "W2" or FLAGS.w2_baselines) else []
      ref_params, base = None, {}
      for mode in list(maps) + list(loops):
        if mode == "torch_loop":
          r = time_torch(wl, n, warmup)
          if r is None:
            continue
          first = None
        else:
          if mode in LOOPS:
            r = time_loop(s, wl.clients_per_round, mode, n, warmup)
          else:
            r = time_engine(s, wl.clients_per_round, mode, n, warmup)
          first = r.pop("first_params")
          if ref_params is None:
            ref_params = first
        r["max_abs_diff_vs_first_mode"] = (float("nan") if first is None
                                           else _max_diff(ref_params, first))
        r.update(workload=wl.name, model=wl.model, algorithm=algo, mode=mode,
                 clients=wl.clients_per_round, round_gflop=flops / 1e9,
                 gflops=flops / r["seconds"] / 1e9)
        r["peak_fraction"] = r["gflops"] / peak
        base[mode] = r["seconds"]
        rows.append(r)
        _print_row(r)
      for r in rows[-len(base):]:
        for b in loops:
          if b in base:
            r[f"speedup_vs_{b}"] = base[b] / r["seconds"]
  return rows


def sparse_vs_dense(workloads: Sequence[Workload], peak: float, rounds: int, warmup: int
                    ) -> List[Dict[str, Any]]:
  """Round time of each sparse algorithm (FLAGS.sparse) against dense FedAvg, per client map,
  side by side; GFLOP/s counts each method's own (dense-equivalent) XLA step FLOPs."""
  rows = []
  pairs = [p.split(":") for p in FLAGS.sparse]
  for wl in workloads:
    setups = [("fedavg", 0.0, build_setup(wl, "fedavg"))]
    for name, sp in pairs:
      if name not in algorithms_lib.ALGORITHMS:
        print(f"NOTE: sparse algorithm {name!r} is not available; skipped")
        continue
      setups.append((name, float(sp), build_setup(wl, name, sparsity=float(sp))))
    for mode in list(FLAGS.sparse_maps) + list(FLAGS.sparse_baselines):
      dense_s = None
      for name, sp, s in setups:
        if mode in LOOPS:
          r = time_loop(s, wl.clients_per_round, mode, rounds, warmup)
        else:
          r = time_engine(s, wl.clients_per_round, mode, rounds, warmup)
        r.pop("first_params")
        flops = round_flops(s, wl.clients_per_round, step_flops(s))
        dense_s = dense_s or r["seconds"]
        r.update(workload=wl.name, algorithm=name, sparsity=sp, mode=mode,
                 topk_period=FLAGS.topk_period, gflops=flops / r["seconds"] / 1e9,
                 x_dense=r["seconds"] / dense_s)
        r["peak_fraction"] = r["gflops"] / peak
        rows.append(r)
        print(f"  sparse {wl.name} {mode:8s} {name:10s} sp={sp:.2f}: {r['seconds']:8.3f} "
              f"s/round = {r['x_dense']:.2f}x dense (compile {r['compile_s']:.1f} s, "
              f"recompiles {r['compiles_during_timing']})", flush=True)
  for r in rows:       # engine vs loop, same workload and algorithm
    for b in FLAGS.sparse_baselines:
      ref = [q for q in rows if q["mode"] == b and q["workload"] == r["workload"]
             and q["algorithm"] == r["algorithm"]]
      if ref:
        r[f"speedup_vs_{b}"] = ref[0]["seconds"] / r["seconds"]
  return rows


def scaling(workloads: Sequence[Workload], algo: str, peak: float) -> List[Dict[str, Any]]:
  rows = []
  ks = [int(k) for k in FLAGS.scaling_clients]
  for wl in workloads:
    s = build_setup(wl, algo, num_clients=max(max(ks), wl.num_clients))
    per_step = step_flops(s)
    for mode in FLAGS.scaling_maps:
      for k in ks:
        r = time_engine(s, k, mode, FLAGS.scaling_rounds, 1)
        r.pop("first_params")
        flops = round_flops(s, k, per_step)
        r.update(workload=wl.name, algorithm=algo, mode=mode, clients=k,
                 gflops=flops / r["seconds"] / 1e9, seconds_per_client=r["seconds"] / k)
        r["peak_fraction"] = r["gflops"] / peak
        rows.append(r)
        print(f"  scaling {wl.name} {mode:8s} K={k:3d}: {r['seconds']:8.3f} s/round "
              f"({r['seconds_per_client']:.3f} s/client) {r['gflops']:6.1f} GFLOP/s "
              f"temp {r['xla_temp_mb']:8.1f} MB  compiles in timed rounds: "
              f"{r['compiles_during_timing']}", flush=True)
  return rows


def memory_check(algos: Sequence[str]) -> List[Dict[str, Any]]:
  """XLA temp buffer MB of the compiled W1 round, streamed vs stacked aggregate, per method."""
  rows = []
  wl = WORKLOADS["W1"]
  ks = [int(k) for k in FLAGS.memory_clients]
  for algo in algos:
    s = build_setup(wl, algo, num_clients=max(ks))
    for mode in FLAGS.memory_maps:
      for k in ks:
        for stream in (True, False):
          cfg = round_config(s, k, mode, stream=stream)
          step = round_lib.jit_round_step(round_lib.build_round_step(
              s.algorithm, s.model, s.batch_fn, cfg, None))
          compiled = step.lower(s.state, s.data, jax.random.PRNGKey(0)).compile()
          rows.append({"workload": "W1", "algorithm": algo, "mode": mode, "clients": k,
                       "stream": stream, "xla_temp_mb": _temp_mb(compiled)})
          print(f"  memory W1 {algo:18s} {mode:8s} K={k:3d} "
                f"{'streamed' if stream else 'stacked ':8s}: "
                f"XLA temp {rows[-1]['xla_temp_mb']:8.1f} MB", flush=True)
  return rows


def device_sweep(counts: Sequence[int]) -> List[Dict[str, Any]]:
  rows = []
  for d in counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={d}",
           f"--device_workload={FLAGS.device_workload}",
           f"--device_clients={FLAGS.device_clients}", f"--device_map={FLAGS.device_map}",
           f"--rounds={FLAGS.device_rounds}", f"--chunk_size={FLAGS.chunk_size}",
           ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if proc.returncode != 0 or not lines:
      print(f"  devices={d}: FAILED\n{proc.stderr[-3000:]}")
      continue
    r = json.loads(lines[-1][len("CHILD "):])
    rows.append(r)
    print(f"  devices={d}: {r['seconds']:.3f} s/round = {1 / r['seconds']:.3f} rounds/s "
          f"({r['clients']} clients padded to {r['padded_clients']}, {r['mode']})", flush=True)
  if rows:
    for r in rows:
      r["speedup_vs_1_device"] = rows[0]["seconds"] / r["seconds"]
  return rows


def child(num_devices: int) -> None:
  """One device-sweep point, in a process started with that many simulated devices."""
  global COMPILES
  COMPILES = Compiles()
  wl = WORKLOADS[FLAGS.device_workload]
  k = FLAGS.device_clients
  s = build_setup(wl, "fedavg", num_clients=max(k, wl.num_clients))
  r = time_engine(s, k, FLAGS.device_map, FLAGS.rounds, 1, num_devices=num_devices)
  r.pop("first_params")
  r.update(devices=num_devices, jax_devices=jax.device_count(), workload=wl.name,
           mode=FLAGS.device_map, clients=k,
           padded_clients=sharding.padded_count(k, num_devices))
  print("CHILD " + json.dumps(r))


# ----------------------------------------------------------------------------- output


def _print_row(r: Dict[str, Any]) -> None:
  print(f"  {r['workload']} {r['algorithm']:9s} {r['mode']:10s} {r['seconds']:8.3f} s/round "
        f"compile {r['compile_s']:6.1f} s  {r['gflops']:6.1f} GFLOP/s "
        f"({100 * r['peak_fraction']:4.1f}% peak)  temp {r['xla_temp_mb']:8.1f} MB  "
        f"RSS {r['rss_peak_mb']:7.0f} MB  Δ {r['max_abs_diff_vs_first_mode']:.1e}  "
        f"recompiles {r['compiles_during_timing']}", flush=True)


def print_memory_table(rows: List[Dict[str, Any]]) -> None:
  """Streamed vs stacked XLA temp MB per (method, map, K): streamed stays flat in K."""
  print("\n| algorithm | map | K | streamed temp MB | stacked temp MB |\n|---|---|---|---|---|")
  keys = sorted({(r["algorithm"], r["mode"], r["clients"]) for r in rows},
                key=lambda k: (k[0], k[1], k[2]))
  for algo, mode, k in keys:
    mb = {r["stream"]: r["xla_temp_mb"] for r in rows
          if (r["algorithm"], r["mode"], r["clients"]) == (algo, mode, k)}
    print(f"| {algo} | {mode} | {k} | {mb.get(True, float('nan')):.1f} | "
          f"{mb.get(False, float('nan')):.1f} |")


def print_table(rows: List[Dict[str, Any]]) -> None:
  loops = [b for b in FLAGS.baselines if any(f"speedup_vs_{b}" in r for r in rows)]
  print("| workload | algorithm | map | s/round | compile s | GFLOP/s | % peak | "
        + "".join(f"× vs {b} | " for b in loops) + "XLA temp MB | peak RSS MB | max Δ params |")
  print("|" + "---|" * (10 + len(loops)))
  for r in rows:
    ratios = "".join(f"{r[f'speedup_vs_{b}']:.2f} | " if f"speedup_vs_{b}" in r else "- | "
                     for b in loops)
    print(f"| {r['workload']} {r['model']} | {r['algorithm']} | {r['mode']} | "
          f"{r['seconds']:.3f} | {r['compile_s']:.1f} | {r['gflops']:.1f} | "
          f"{100 * r['peak_fraction']:.1f} | {ratios}{r['xla_temp_mb']:.0f} | "
          f"{r['rss_peak_mb']:.0f} | {r['max_abs_diff_vs_first_mode']:.1e} |")


def main(argv) -> None:
  del argv
  global COMPILES
  if FLAGS.child:
    child(int(FLAGS.child))
    return
  COMPILES = Compiles()
  start = time.perf_counter()
  if not FLAGS.torch_python:
    local = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         ".venv-torch", "bin", "python")
    FLAGS.torch_python = local if os.path.exists(local) else sys.executable
  if FLAGS.quick:
    for name in ("W0", "W1"):
      WORKLOADS[name] = dataclasses.replace(WORKLOADS[name], clients_per_round=2)
    FLAGS.workloads = [w for w in FLAGS.workloads if w != "W2"]
    FLAGS.client_maps = ["vmap", "chunked"]
    FLAGS.chunk_size = 2
    FLAGS.scaling_workloads = ["W0"]
    FLAGS.scaling_clients = ["1", "2", "4", "8"]
    FLAGS.memory_clients = ["4", "8"]
    FLAGS.memory_maps = ["map"]
    FLAGS.devices = ["1", "2"]
    FLAGS.device_workload, FLAGS.device_clients, FLAGS.device_rounds = "W0", 4, 2
    FLAGS.sparse_workloads, FLAGS.sparse_maps = ["W0"], ["vmap"]
    FLAGS.sparse_baselines = ["loop_clients"]
    rounds, warmup = 2, 1
  else:
    rounds, warmup = FLAGS.rounds, FLAGS.warmup
  algos, skipped = [], []
  for a in FLAGS.algorithms:
    (algos if a in algorithms_lib.ALGORITHMS else skipped).append(a)
  for a in skipped:
    print(f"NOTE: algorithm {a!r} is not available in this checkout; skipped "
          f"(available: {list(algorithms_lib.ALGORITHMS)})")
  print(f"jax {jax.__version__}, {jax.device_count()} device(s), {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()}")
  peak = matmul_peak()
  print(f"matmul peak (jnp.dot 2048^3 f32): {peak:.1f} GFLOP/s", flush=True)
  results: Dict[str, Any] = {"jax": jax.__version__, "matmul_peak_gflops": peak,
                             "skipped_algorithms": skipped, "quick": FLAGS.quick,
                             "flop_count": "XLA cost_analysis of one local step x real steps"}
  wls = [WORKLOADS[w] for w in FLAGS.workloads]
  results["rounds"] = main_table(wls, algos, peak, rounds, warmup)
  if FLAGS.sparse:
    print(f"sparse vs dense rounds (topk_period={FLAGS.topk_period}):")
    results["sparse_vs_dense"] = sparse_vs_dense(
        [WORKLOADS[w] for w in FLAGS.sparse_workloads], peak,
        rounds if FLAGS.quick else FLAGS.sparse_rounds, warmup)
  if FLAGS.scaling and algos:
    print("scaling in clients per round:")
    results["scaling"] = scaling([WORKLOADS[w] for w in FLAGS.scaling_workloads], algos[0],
                                 peak)
  mem_algos = [a for a in FLAGS.memory_algorithms if a in algorithms_lib.ALGORITHMS]
  if mem_algos:
    print("streamed vs stacked aggregate (XLA temp buffers of the compiled round):")
    results["memory"] = memory_check(mem_algos)
  if FLAGS.devices:
    print("simulated CPU devices (one subprocess each):")
    results["devices"] = device_sweep([int(d) for d in FLAGS.devices])
  results["matmul_peak_gflops_end"] = matmul_peak()
  results["total_seconds"] = time.perf_counter() - start
  results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print()
  print_table(results["rounds"])
  if results.get("memory"):
    print_memory_table(results["memory"])
  if results.get("sparse_vs_dense"):
    bl = list(FLAGS.sparse_baselines)
    print("\n| workload | map | algorithm | sparsity | s/round | × dense | "
          + "".join(f"× vs {b} | " for b in bl) + "\n|" + "---|" * (6 + len(bl)))
    for r in results["sparse_vs_dense"]:
      ratios = "".join(f"{r[f'speedup_vs_{b}']:.2f} | " if f"speedup_vs_{b}" in r else "- | "
                       for b in bl)
      print(f"| {r['workload']} | {r['mode']} | {r['algorithm']} | {r['sparsity']:.2f} | "
            f"{r['seconds']:.3f} | {r['x_dense']:.2f} | {ratios}")
  print(f"\nmatmul peak {peak:.1f} GFLOP/s at start, "
        f"{results['matmul_peak_gflops_end']:.1f} at end; total "
        f"{results['total_seconds']:.0f} s; max RSS {results['max_rss_mb']:.0f} MB")
  with open(FLAGS.out, "w") as f:
    json.dump(results, f, indent=1, default=float)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
