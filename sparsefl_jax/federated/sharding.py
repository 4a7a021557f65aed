"""Sharding the round's client axis over devices (local CPU/GPU devices, or all hosts').

A round with `num_devices = D > 1` builds a 1-D mesh named `CLIENT_AXIS` over the first D
devices of `jax.devices()` (after `jax.distributed.initialize` that list spans every host).
The sampled clients are padded to a multiple of D with zero-weight dummy clients (client id
0, zero examples: every local step is a no-op, so a dummy uploads the global model and its
per-client metrics are dropped), split into D equal blocks and trained under `jax.shard_map`,
one block per device. The shard_map runs with check_vma=False: with the varying-axes type
system on, the gradient with respect to a replicated (device-invariant) global model is
silently psum-ed across devices, and every scan carry initialised from a constant would need
a `pcast` (shard_map's varying-manual-axes checking); the only collective the round
needs is the explicit psum of the streamed weighted sums.
"""
import math
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CLIENT_AXIS = "clients"


def padded_count(num_clients: int, num_devices: int) -> int:
  """The smallest multiple of `num_devices` that is >= `num_clients`."""
  return int(math.ceil(num_clients / num_devices) * num_devices)


def check_num_devices(num_devices: int) -> None:
  """Raises ValueError unless 1 <= num_devices <= jax.device_count()."""
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be >= 1")
  available = jax.device_count()
  if num_devices > available:
    raise ValueError(
        f"num_devices={num_devices} but JAX sees only {available} device(s); on CPU set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before JAX starts, "
        "or call jax.distributed.initialize() on every host first")


def check_processes(num_devices: int) -> None:
  """Several processes (`jax.distributed`): the mesh must take the same number of devices
  from every process, so num_devices must be a multiple of the process count (each process
  then trains its own block of clients). Raises ValueError naming the accepted values."""
  n_proc = jax.process_count()
  if n_proc == 1:
    return
  local = min(sum(1 for d in jax.devices() if d.process_index == p) for p in range(n_proc))
  accepted = [n_proc * i for i in range(1, local + 1)]
  if num_devices not in accepted:
    raise ValueError(f"num_devices={num_devices} in a run of {n_proc} processes must be one "
                     f"of {accepted} (the same number of devices from every process; "
                     f"{n_proc * local} = all of them)")


def client_mesh(num_devices: int) -> Mesh:
  """A 1-D mesh over `num_devices` global devices, Auto axis type.

  One process: the first `num_devices` of `jax.devices()`. Several processes: the first
  num_devices / process_count devices of each process, in process order, so client block i
  trains on a device of process i * process_count // num_devices.
  jax 0.10's `jax.make_mesh` defaults to Explicit axes, which reject ordinary indexing of
  sharded arrays; an Auto mesh lets XLA's SPMD partitioner place everything else.
  """
  check_num_devices(num_devices)
  check_processes(num_devices)
  n_proc = jax.process_count()
  if n_proc == 1:
    devices = jax.devices()[:num_devices]
  else:
    per = num_devices // n_proc
    devices = [d for p in range(n_proc)
               for d in [d for d in jax.devices() if d.process_index == p][:per]]
  return Mesh(np.asarray(devices), (CLIENT_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def shard_clients(tree: Any, mesh: Optional[Mesh], fetch: Callable[[slice], Any]) -> Any:
  """Builds arrays whose leading (client) axis is split over `mesh` from host data.

  `fetch(rows)` returns the host arrays (a tree like `tree`'s shape description) of the
  padded cohort's rows `rows`; each process calls it only for the rows of its own devices, so
  it reads only its own clients' data. `tree` holds `jax.ShapeDtypeStruct`s of the full
  arrays. mesh=None: one device, `fetch(slice(None))` put on it.
  """
  if mesh is None:
    return jax.device_put(fetch(slice(None)))
  spec = NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))
  leaves, treedef = jax.tree.flatten(tree)
  cache = {}

  def rows_of(index):
    rows = index[0]
    key = (rows.start, rows.stop)
    if key not in cache:   # one fetch per block feeds every leaf
      cache[key] = jax.tree.leaves(fetch(rows))
    return cache[key]

  out = []
  for i, leaf in enumerate(leaves):
    out.append(jax.make_array_from_callback(
        leaf.shape, spec, lambda index, i=i: rows_of(index)[i]))
  return jax.tree.unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
  """Places every leaf of `tree` on all devices of `mesh` (a no-op for mesh=None).

  Works across hosts: each process must pass the same values (e.g. ClientData built from
  the same seed), and only its addressable shards are copied.
  """
  if mesh is None:
    return tree
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def pad_clients(ids: jax.Array, counts: jax.Array, padded: int) -> Tuple[jax.Array, jax.Array]:
  """Appends `padded - len(ids)` dummy clients: id 0 with 0 examples (zero weight)."""
  extra = padded - ids.shape[0]
  if extra < 0:
    raise ValueError(f"cannot pad {ids.shape[0]} clients down to {padded}")
  if extra == 0:
    return ids, counts
  return (jnp.concatenate([ids, jnp.zeros((extra,), ids.dtype)]),
          jnp.concatenate([counts, jnp.zeros((extra,), counts.dtype)]))
