r"""Client-axis sharding designs side by side: rounds/s and agreement with the engine.

Variants (FedAvg, the same local training, the same cohort):
- `engine`: the engine's round (`build_round_step`): `jax.shard_map` over the client axis,
  clients mapped with `--client_map` inside each shard; with map/chunked the weighted sums
  stream and meet in ONE `psum`; with vmap the stacked uploads leave the shard_map.
- `vmap_spmd`: DrJAX/FAX style: `jax.vmap(client, spmd_axis_name='clients')` over the whole
  cohort with the cohort sharded over the mesh and a sharding constraint on the stacked
  client models; XLA's SPMD partitioner inserts the reduction of the weighted mean.
- `reduce_scatter`: the engine's streamed shard_map, but the sums are reduce-scattered
  (`psum_scatter`, each device gets 1/D of the flattened model), divided there and
  all-gathered back: the pattern that pays off when the server update is sharded too.
- `psum`: the same hand-written streamed shard_map with one `psum` (isolates the collective).

  python experiments/bench_sharding.py --devices=1,2,4            # one process per count
  python -m sparsefl_jax.launch --num_processes=2 --devices_per_process=2 -- \
      experiments/bench_sharding.py --child --devices=4           # 2 processes × 2 devices

Each device count runs in a fresh process with `--xla_force_host_platform_device_count`.
Prints rounds/s per variant (median over `--rounds` timed rounds after one compile round) and
the largest |difference| of the final parameters from `engine`.
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


def child(args) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from sparsefl_jax import ExperimentConfig, distributed, train
  from sparsefl_jax.federated import client as client_lib
  from sparsefl_jax.federated import sharding
  from sparsefl_jax.federated.optimizers import client_optimizer
  from sparsefl_jax.federated.round import _stream_clients
  from sparsefl_jax.federated.sampling import sample_clients
  distributed.initialize()
  d = args.devices_one
  cfg = ExperimentConfig(dataset="synthetic", synthetic_shape="28,28,1", model=args.model,
                         synthetic_examples=args.examples, num_clients=args.population,
                         clients_per_round=args.clients, batch_size=32, local_epochs=1,
                         lr=0.05, client_map=args.client_map, num_devices=d,
                         workdir="/unused", progress=False)
  exp = train.build_experiment(cfg)
  rcfg_local = client_lib.LocalConfig(1, 32, exp.dataset.max_examples)
  mesh = exp.mesh if exp.mesh is not None else sharding.client_mesh(1)
  from sparsefl_jax.data import preprocess
  batch_fn = preprocess.make_batch_fn(exp.dataset)
  alg, model = exp.algorithm, exp.model
  rep, per = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.CLIENT_AXIS))
  k = args.clients
  host_x, host_y, host_n = (np.asarray(exp.dataset.train_x), np.asarray(exp.dataset.train_y),
                            np.asarray(exp.dataset.counts))

  def cohort(t):
    ids = np.asarray(sample_clients(jax.random.PRNGKey(0), t, args.population, k))
    put = lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i: a[i])
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(ids))
    return (put(host_x[ids], per), put(host_y[ids], per), put(host_n[ids], per),
            put(keys, per))

  def one(params, mstate, x, y, n, key):
    make_opt = lambda: client_optimizer(0.05)
    return client_lib.local_train(alg, model, batch_fn, rcfg_local, make_opt, params, mstate,
                                  params, x, y, n, key, jnp.int32(1)).params

  def vmap_spmd(params, mstate, xs, ys, ns, keys):
    out = jax.vmap(lambda *a: one(params, mstate, *a), spmd_axis_name=sharding.CLIENT_AXIS)(
        xs, ys, ns, keys)
    out = jax.lax.with_sharding_constraint(out, per)
    w = ns.astype(jnp.float32) / jnp.sum(ns)
    return jax.lax.with_sharding_constraint(
        jax.tree.map(lambda o: jnp.tensordot(w, o, axes=1), out), rep)

  def streamed(collective):
    def body(params, mstate, xs, ys, ns, keys):
      fn = lambda inp: ((one(params, mstate, *inp),), ())
      (sums,), _ = _stream_clients(fn, (xs, ys, ns, keys), (ns.astype(jnp.float32),), 1)
      total = jax.lax.psum(jnp.sum(ns.astype(jnp.float32)), sharding.CLIENT_AXIS)
      leaves, treedef = jax.tree.flatten(sums)
      flat = jnp.concatenate([l.ravel() for l in leaves])
      if collective == "psum":
        flat = jax.lax.psum(flat, sharding.CLIENT_AXIS) / total
      else:   # reduce-scatter, divide the own slice, all-gather
        pad = (-flat.size) % mesh.size
        flat = jnp.pad(flat, (0, pad))
        part = jax.lax.psum_scatter(flat, sharding.CLIENT_AXIS, tiled=True) / total
        flat = jax.lax.all_gather(part, sharding.CLIENT_AXIS, tiled=True)[:flat.size - pad]
      out, i = [], 0
      for l in leaves:
        out.append(flat[i:i + l.size].reshape(l.shape))
        i += l.size
      return jax.tree.unflatten(treedef, out)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(),) * 2 + (P(sharding.CLIENT_AXIS),) * 4,
                         out_specs=P(), check_vma=False)

  results = {}
  params0 = sharding.replicate(jax.device_get(exp.init_state.params), mesh)
  mstate0 = sharding.replicate(jax.device_get(exp.init_state.model_state), mesh)
  variants = {"vmap_spmd": vmap_spmd, "psum": streamed("psum"),
              "reduce_scatter": streamed("reduce_scatter")}
  for name in args.variants.split(","):
    times = []
    if name == "engine":
      state = exp.init_state
      for r in range(args.rounds + 1):
        t0 = time.perf_counter()
        state, _ = exp.round_step(state, exp.client_data, exp.train_key)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
      final = state.params
    else:
      fn = jax.jit(variants[name])
      params = params0
      for r in range(args.rounds + 1):
        xs = cohort(r + 1)
        t0 = time.perf_counter()
        params = fn(params, mstate0, *xs)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
      final = params
    med = float(np.median(times[1:]))
    results[name] = dict(round_s=med, rounds_per_s=1.0 / med, compile_round_s=times[0],
                         params=[np.asarray(l) for l in jax.tree.leaves(final)])
  ref = results.get("psum")
  out = {}
  for name, r in results.items():
    diff = (max(float(np.max(np.abs(a - b))) for a, b in zip(r["params"], ref["params"]))
            if ref is not None and name != "engine" else None)
    moved = max(float(np.max(np.abs(a - np.asarray(b)))) for a, b in
                zip(r["params"], jax.tree.leaves(jax.device_get(params0))))
    out[name] = dict(round_s=r["round_s"], rounds_per_s=r["rounds_per_s"],
                     compile_round_s=r["compile_round_s"], max_diff_vs_psum=diff,
                     max_change_from_init=moved)
  if jax.process_index() == 0:
    print("RESULT " + json.dumps(dict(devices=d, processes=jax.process_count(),
                                      variants=out)), flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", default="1,2,4")
  p.add_argument("--variants", default="engine,vmap_spmd,psum,reduce_scatter")
  p.add_argument("--model", default="fmnist_fc")
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--examples", type=int, default=64)
  p.add_argument("--client_map", default="map")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json_out", default="")
  p.add_argument("--child", action="store_true")
  args = p.parse_args()
  if args.child:
    args.devices_one = int(args.devices)
    child(args)
    return
  rows = []
  for d in [int(s) for s in args.devices.split(",")]:
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--devices={d}",
           f"--variants={args.variants}", f"--model={args.model}", f"--clients={args.clients}",
           f"--population={args.population}", f"--examples={args.examples}",
           f"--client_map={args.client_map}", f"--rounds={args.rounds}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
      sys.exit(f"devices={d} failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(line[-1][len("RESULT "):]))
    for name, v in rows[-1]["variants"].items():
      diff = v["max_diff_vs_psum"]
      print(f"D={d} {name:15s} {v['rounds_per_s']:7.2f} rounds/s ({v['round_s']:.3f} s; "
            f"compile round {v['compile_round_s']:.1f} s)"
            + (f", max |diff| vs psum {diff:.1e}" if diff is not None else ""), flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
