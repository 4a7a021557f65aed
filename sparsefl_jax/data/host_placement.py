"""Cohort streaming from host storage (`--data_placement=host`).

The federated training set stays on the host — in memory, or in flat `.npy` files on disk —
and each round only the sampled cohort's examples are gathered and moved to the devices:

- **Sampling outside the round, identical to the engine.** `host_sample_clients` runs the
  engine's own `sample_clients` (threefry + a permutation: integer arithmetic, the same bits
  on every backend) from (sampling key, round) on one local device, so round t trains
  exactly the clients the device-resident round would pick inside jit. Its cost is the
  in-jit sampler's: a permutation of the population, O(P log P).
- **The same program after the gather.** The round is `build_round_step(...,
  cohort_input=True)`: everything after the gather is the resident round's computation, fed
  the same `Cohort` (ids, counts, padded x, y with the dummy rows), so results are
  bit-identical to `--data_placement=device` (tests/test_host_placement.py).
- **Only the own shard.** With a client mesh (`--num_devices` > 1, possibly over several
  processes) the cohort array is built with `jax.make_array_from_callback`: each process reads
  only the rows of the clients its own devices train.
- **One round ahead.** `HostRoundStep` prepares round t + 1 (sample, read, transfer) on a
  background thread while round t computes; reads of flat files are `os.pread`s, which drop
  the GIL, so they overlap the previous round's compute.

Storage: `ArrayClients` wraps in-memory stacked arrays (P, M, ...) as `FederatedDataset`
holds them; `FlatClients` reads a folder written by `FlatWriter` / `write_flat`: `x.npy`
(all examples back to back, N × example shape), `y.npy` (N,), `offsets.npy` (P + 1,) and
`meta.json`. Its host memory is O(P) (counts and offsets), whatever the population's size.
"""
import concurrent.futures
import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.federated import sharding
from sparsefl_jax.federated.sampling import sample_clients

FLAT_FORMAT = 1


def _device_dtype(dtype) -> np.dtype:
  """The dtype `jnp.asarray` gives a host array of `dtype` (float64 -> float32 without x64),
  so host-gathered rows match what `ClientData.from_arrays` puts on the device."""
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


class ArrayClients:
  """Clients held in memory as stacked, zero-padded arrays x (P, M, ...), y (P, M), counts (P,):
  the layout of `FederatedDataset` (no copy is made)."""

  def __init__(self, x: np.ndarray, y: np.ndarray, counts: np.ndarray):
    if x.ndim < 2 or y.shape != x.shape[:2] or counts.shape != x.shape[:1]:
      raise ValueError(f"client data shapes disagree: x {x.shape}, y {y.shape}, counts "
                       f"{counts.shape}; expected x (P, M, ...), y (P, M), counts (P,)")
    self.x, self.y = x, y
    self.counts = np.asarray(counts, np.int32)
    self.x_dtype = _device_dtype(x.dtype)

  @classmethod
  def from_dataset(cls, ds) -> "ArrayClients":
    return cls(ds.train_x, ds.train_y, ds.counts)

  @property
  def num_clients(self) -> int:
    return int(self.x.shape[0])

  @property
  def max_examples(self) -> int:
    return int(self.x.shape[1])

  @property
  def example_shape(self) -> Tuple[int, ...]:
    return tuple(self.x.shape[2:])

  def gather(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(x (k, M, ...), y (k, M) int32) of clients `ids`, zero-padded past each count."""
    ids = np.asarray(ids)
    return (np.asarray(self.x[ids], self.x_dtype), np.asarray(self.y[ids], np.int32))


def _npy_data_offset(path: str) -> Tuple[int, np.dtype, Tuple[int, ...]]:
  """(byte offset of the data, dtype, shape) of a C-order `.npy` file."""
  m = np.load(path, mmap_mode="r")
  if not m.flags.c_contiguous:
    raise ValueError(f"{path} is not C-ordered; write it in C order")
  out = (int(m.offset), m.dtype, tuple(m.shape))
  del m
  return out


class FlatClients:
  """Clients in a folder of flat `.npy` files (see the module docstring), read with `pread`.

  Each client's examples are one contiguous byte range of `x.npy` and `y.npy`, so gathering a
  cohort costs 2 reads per client and touches nothing else; only `offsets` (P + 1 int64) and
  `counts` live in memory.
  """

  def __init__(self, folder: str, num_clients: Optional[int] = None):
    """`num_clients`: use only the first that many clients (a smaller population from the
    same files; the padded length M stays the folder's)."""
    self.folder = folder
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
      raise ValueError(f"{folder!r} holds no flat client data (meta.json missing); write it "
                       "with sparsefl_jax.data.host_placement.FlatWriter")
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format") != FLAT_FORMAT:
      raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FLAT_FORMAT}")
    self.meta = meta
    self.offsets = np.load(os.path.join(folder, "offsets.npy"))
    total = len(self.offsets) - 1
    if num_clients is not None:
      if not 1 <= num_clients <= total:
        raise ValueError(f"num_clients={num_clients} must lie in [1, {total}] (the clients "
                         f"in {folder})")
      self.offsets = self.offsets[:num_clients + 1]
    self.counts = np.diff(self.offsets).astype(np.int32)
    self._max = int(meta["max_examples"])
    if self.counts.min() < 1 or self.counts.max() > self._max:
      raise ValueError(f"{folder}: client sizes must lie in [1, {self._max}]; got "
                       f"{self.counts.min()}..{self.counts.max()}")
    self._x_off, self._x_dtype, x_shape = _npy_data_offset(os.path.join(folder, "x.npy"))
    self._y_off, self._y_dtype, y_shape = _npy_data_offset(os.path.join(folder, "y.npy"))
    if x_shape[0] < self.offsets[-1] or y_shape[0] < self.offsets[-1]:
      raise ValueError(f"{folder}: x {x_shape} / y {y_shape} do not hold the "
                       f"{self.offsets[-1]} examples offsets.npy names")
    self._example_shape = tuple(int(d) for d in x_shape[1:])
    self._x_row = int(np.prod(self._example_shape)) * self._x_dtype.itemsize
    self.x_dtype = _device_dtype(self._x_dtype)
    self._fds = threading.local()   # one descriptor pair per thread: pread is thread-safe

  def _fd(self, name: str) -> int:
    fds = getattr(self._fds, "fds", None)
    if fds is None:
      fds = self._fds.fds = {n: os.open(os.path.join(self.folder, f"{n}.npy"), os.O_RDONLY)
                             for n in ("x", "y")}
    return fds[name]

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def max_examples(self) -> int:
    return self._max

  @property
  def example_shape(self) -> Tuple[int, ...]:
    return self._example_shape

  @property
  def nbytes_on_disk(self) -> int:
    return sum(os.path.getsize(os.path.join(self.folder, f"{n}.npy"))
               for n in ("x", "y", "offsets"))

  def gather(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(x (k, M, ...), y (k, M) int32) of clients `ids`, zero-padded past each count."""
    ids = np.asarray(ids)
    k, m = len(ids), self._max
    x = np.zeros((k, m) + self._example_shape, self._x_dtype)
    y = np.zeros((k, m), self._y_dtype)
    xv = x.reshape(k, -1).view(np.uint8)
    yv = y.view(np.uint8).reshape(k, -1)
    fx, fy = self._fd("x"), self._fd("y")
    ysz = self._y_dtype.itemsize
    for row, c in enumerate(ids):
      start, n = int(self.offsets[c]), int(self.counts[c])
      _pread_into(fx, xv[row, :n * self._x_row], self._x_off + start * self._x_row)
      _pread_into(fy, yv[row, :n * ysz], self._y_off + start * ysz)
    return np.asarray(x, self.x_dtype), np.asarray(y, np.int32)

  def close(self) -> None:
    fds = getattr(self._fds, "fds", None)
    if fds:
      for fd in fds.values():
        os.close(fd)
      self._fds.fds = None


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
  view = memoryview(buf)
  done = 0
  while done < len(view):
    got = os.preadv(fd, [view[done:]], offset + done)
    if got <= 0:
      raise OSError(f"short read at byte {offset + done} (file truncated?)")
    done += got


class FlatWriter:
  """Writes a flat client folder client by client (never holding the population in memory).

  `add(x, y)` appends one client's examples (n, *example_shape) and labels (n,); `close()`
  writes `offsets.npy` and `meta.json`. The `.npy` headers are written up front from the
  total example count, so the files are memory-mappable with `np.load(mmap_mode='r')`.
  """

  def __init__(self, folder: str, total_examples: int, example_shape: Tuple[int, ...],
               x_dtype=np.uint8, num_classes: Optional[int] = None):
    os.makedirs(folder, exist_ok=True)
    self.folder, self.total = folder, int(total_examples)
    self.example_shape = tuple(int(d) for d in example_shape)
    self.x_dtype, self.num_classes = np.dtype(x_dtype), num_classes
    self._x = np.lib.format.open_memmap(os.path.join(folder, "x.npy"), "w+", self.x_dtype,
                                        (self.total,) + self.example_shape)
    self._y = np.lib.format.open_memmap(os.path.join(folder, "y.npy"), "w+", np.int32,
                                        (self.total,))
    self._offsets: List[int] = [0]

  def add(self, x: np.ndarray, y: np.ndarray) -> None:
    n, start = len(y), self._offsets[-1]
    if n < 1 or x.shape != (n,) + self.example_shape:
      raise ValueError(f"client {len(self._offsets) - 1}: x {x.shape} / y {y.shape}; "
                       f"expected (n >= 1, {self.example_shape}) and (n,)")
    if start + n > self.total:
      raise ValueError(f"more than total_examples={self.total} examples added")
    self._x[start:start + n] = x
    self._y[start:start + n] = y
    self._offsets.append(start + n)

  def close(self, max_examples: Optional[int] = None) -> "FlatClients":
    if self._offsets[-1] != self.total:
      raise ValueError(f"{self._offsets[-1]} examples added, total_examples={self.total}")
    self._x.flush()
    self._y.flush()
    del self._x, self._y
    offsets = np.asarray(self._offsets, np.int64)
    np.save(os.path.join(self.folder, "offsets.npy"), offsets)
    largest = int(np.diff(offsets).max())
    meta = {"format": FLAT_FORMAT, "num_clients": len(offsets) - 1,
            "max_examples": int(max_examples or largest), "num_classes": self.num_classes,
            "example_shape": list(self.example_shape)}
    if meta["max_examples"] < largest:
      raise ValueError(f"max_examples={max_examples} is below the largest client ({largest})")
    with open(os.path.join(self.folder, "meta.json"), "w") as f:
      json.dump(meta, f)
    return FlatClients(self.folder)


def write_flat(folder: str, x: np.ndarray, y: np.ndarray, counts: np.ndarray,
               num_classes: Optional[int] = None) -> "FlatClients":
  """Writes stacked padded arrays (a `FederatedDataset`'s train split) as a flat folder with
  the same padded length M, so both sources gather identical cohorts."""
  counts = np.asarray(counts)
  w = FlatWriter(folder, int(counts.sum()), x.shape[2:], x.dtype, num_classes)
  for p in range(len(counts)):
    w.add(x[p, :counts[p]], y[p, :counts[p]])
  return w.close(max_examples=x.shape[1])


# --- sampling and the streamed round -------------------------------------------------------

def _sampling_device():
  """Where the host-side sampler runs: this process's first device of the default backend
  (the in-jit sampler's backend; on an accelerator its sort is much faster than the CPU's)."""
  return jax.local_devices()[0]


_SAMPLERS: Dict[Tuple[int, int], Callable] = {}


def host_sample_clients(sampling_key, round_index: int, num_clients: int,
                        clients_per_round: int) -> np.ndarray:
  """The client ids the engine's in-jit sampler picks in round `round_index` (1-based),
  computed with the same function (`sampling.sample_clients`) outside the round, on one
  local device, and returned as host numpy."""
  fn = _SAMPLERS.get((num_clients, clients_per_round))
  if fn is None:
    fn = _SAMPLERS[(num_clients, clients_per_round)] = jax.jit(
        lambda key, t: sample_clients(key, t, num_clients, clients_per_round))
  dev = _sampling_device()
  key = jax.device_put(np.asarray(sampling_key), dev)
  ids = fn(key, jax.device_put(np.int32(round_index), dev))
  return np.asarray(ids)


@dataclasses.dataclass
class RoundLoad:
  """Host-side cost of one round's cohort: `prepare_s` to sample, read and transfer it (on
  the prefetch thread), `wait_s` the time the training loop waited for it (0 when the
  prefetch finished during the previous round's compute)."""
  round: int
  prepare_s: float
  wait_s: float = 0.0
  bytes: int = 0


class HostRoundStep:
  """`round_step(state, source, key)` for host-resident client data.

  `phased` is a `train.PhasedRoundStep` whose rounds take a `Cohort` (built with
  `build_round_step(..., cohort_input=True)`); `mesh` the client mesh or None. The call reads
  the state's round counter (one scalar), takes the prefetched cohort of that round (or
  prepares it now), starts preparing the next round's cohort and runs the round.
  `loads` records the host cost of each round (`RoundLoad`).
  """

  def __init__(self, phased, mesh, prefetch: bool = True):
    self.phased, self.mesh, self.prefetch = phased, mesh, prefetch
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cohort")
    self._pending: Dict[int, concurrent.futures.Future] = {}
    self._sampling_key: Optional[np.ndarray] = None
    self.loads: List[RoundLoad] = []

  def config_for_round(self, t: int):
    phase = self.phased.algorithm.round_phase(int(t)) if self.phased.has_phases else "train"
    return self.phased.config_for_phase(phase)

  def prepare(self, source, t: int):
    """(Cohort placed on the devices, RoundLoad) of round t."""
    start = time.perf_counter()
    rcfg = self.config_for_round(t)
    ids = host_sample_clients(self._sampling_key, t, rcfg.num_clients, rcfg.clients_per_round)
    counts = source.counts[ids]
    pad = rcfg.padded_clients - len(ids)
    ids_p = np.concatenate([ids, np.zeros(pad, ids.dtype)]) if pad else ids
    m = source.max_examples
    shapes = (jax.ShapeDtypeStruct((len(ids_p), m) + source.example_shape, source.x_dtype),
              jax.ShapeDtypeStruct((len(ids_p), m), np.int32))
    nbytes = [0]

    def fetch(rows):
      x, y = source.gather(ids_p[rows])
      nbytes[0] += x.nbytes + y.nbytes
      return x, y

    x, y = sharding.shard_clients(shapes, self.mesh, fetch)
    small = (jnp.asarray(ids, jnp.int32), jnp.asarray(counts, jnp.int32))
    if self.mesh is not None:
      small = sharding.replicate(small, self.mesh)
    else:
      small = jax.device_put(small)
    from sparsefl_jax.federated.round import Cohort
    cohort = Cohort(small[0], small[1], x, y)
    jax.block_until_ready(cohort)   # the transfer happens here, off the training thread
    return cohort, RoundLoad(t, time.perf_counter() - start, 0.0, nbytes[0])

  def cohort_for(self, source, t: int):
    """Round t's cohort: the prefetched one, else prepared now; then prefetch round t + 1."""
    start = time.perf_counter()
    future = self._pending.pop(t, None)
    for stale in list(self._pending):   # a resumed or re-run state: drop other rounds
      self._pending.pop(stale).cancel()
    cohort, load = future.result() if future is not None else self.prepare(source, t)
    load.wait_s = time.perf_counter() - start
    self.loads.append(load)
    if self.prefetch:
      self._pending[t + 1] = self._pool.submit(self.prepare, source, t + 1)
    return cohort

  def __call__(self, state, source, key):
    t = int(state.round) + 1
    if self._sampling_key is None:   # constant over a run (ServerState carries it unchanged)
      self._sampling_key = np.asarray(jax.device_get(state.sampling_key))
    cohort = self.cohort_for(source, t)
    return self.phased.step_for_round(t)(state, cohort, key)

  def close(self) -> None:
    for f in self._pending.values():
      f.cancel()
    self._pending.clear()
    self._pool.shutdown(wait=True)


def probe_client_data(source, key):
  """A one-client `ClientData` holding the client the probe of `init_from_data` (SNIP)
  draws from the whole population with `key` (the key `probe.run_init_from_data` gets), so
  the probe batch equals the device-resident run's without the population on the device.

  It repeats `probe.run_init_from_data`'s key derivation: batch key = split(key, 3)[0],
  client key = split(batch key)[0], client = randint(client key, 0, P); in a one-client
  dataset `probe_batch` draws client 0, with the same order key.
  """
  from sparsefl_jax.federated.state import ClientData
  batch_key = jax.random.split(key, 3)[0]
  client_key = jax.random.split(batch_key)[0]
  cid = int(jax.random.randint(client_key, (), 0, source.num_clients))
  x, y = source.gather(np.asarray([cid]))
  return ClientData.from_arrays(x, y, source.counts[[cid]])


def open_host_data(cfg) -> "FlatClients":
  """The `--host_data_dir` folder of a run, its first `cfg.num_clients` clients; bad
  settings are one ConfigError line."""
  from sparsefl_jax.config import ConfigError
  try:
    return FlatClients(cfg.host_data_dir, num_clients=cfg.num_clients)
  except (ValueError, OSError) as e:
    raise ConfigError(f"host_data_dir={cfg.host_data_dir!r}: {e}") from None


def check_matches(source, ds, cfg) -> None:
  """The folder's examples fit the dataset that supplies the test split and the model:
  same example shape, labels within its classes, batch_size within the largest client."""
  from sparsefl_jax.config import ConfigError
  where = f"host_data_dir={cfg.host_data_dir!r}"
  if tuple(source.example_shape) != tuple(ds.example_shape):
    raise ConfigError(f"{where} holds examples of shape {source.example_shape}, but "
                      f"dataset={cfg.dataset!r} has {ds.example_shape}; accepted: a dataset "
                      "of the folder's example shape")
  classes = getattr(source, "meta", {}).get("num_classes")
  if classes is not None and classes > ds.num_classes:
    raise ConfigError(f"{where} has {classes} classes but dataset={cfg.dataset!r} only "
                      f"{ds.num_classes}; accepted: a dataset with >= {classes} classes")
  largest = int(source.counts.max())
  if cfg.batch_size > largest:
    raise ConfigError(f"batch_size={cfg.batch_size} exceeds every client of {where}: the "
                      f"largest holds {largest} examples; accepted: 1..{largest}")
