"""Runs over several processes (hosts): `jax.distributed` start-up and the few host-side
agreements the training loop needs.

One process per host (or, for testing, several on one machine), each started with the same
flags plus its own `--process_id`. `initialize` calls `jax.distributed.initialize` before any
other JAX call; afterwards `jax.devices()` lists every process's devices and the round's
client mesh (`--num_devices`, `federated.sharding.client_mesh`) spans them, so one SPMD
program runs on all of them with XLA's own collectives. On CPU the processes exchange data
through JAX's Gloo collectives (`jax_cpu_collectives_implementation='gloo'`); on GPU through
NCCL and on TPU through ICI/DCN, with no change here. There is no home-made transport.

The settings come from the flags `--coordinator_address`, `--num_processes`,
`--process_id` or, when a flag is not given, from the environment: `JAX_COORDINATOR_ADDRESS`
(read by JAX itself), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`. With none of them set the run
is single-process and nothing here does anything. Under a cluster manager JAX detects by
itself (Slurm, Open MPI, Cloud TPU), a Python caller may instead call
`jax.distributed.initialize()` itself before `train.run`: everything below reads
`jax.process_index()` / `jax.process_count()`, not this module's flags.
"""
import os
from typing import Optional

from sparsefl_jax.config import ConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_INITIALIZED = False


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} must be an integer") from None


def resolve(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
            ) -> Optional[dict]:
  """The `jax.distributed.initialize` arguments from flags, else the environment, or None
  for a single-process run. Raises ConfigError (one line) on an inconsistent setting."""
  address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
  n = num_processes if num_processes else _env_int(ENV_NUM_PROCESSES)
  pid = process_id if process_id >= 0 else _env_int(ENV_PROCESS_ID)
  if not address and not n and pid is None:
    return None
  if n is not None and n == 1 and not address:
    return None
  if not address:
    raise ConfigError(f"num_processes={n} process_id={pid} need --coordinator_address "
                      f"(host:port of process 0, the same for every process) or "
                      f"${ENV_COORDINATOR}")
  if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
    raise ConfigError(f"coordinator_address={address!r} must be host:port (e.g. "
                      "127.0.0.1:12345)")
  if n is None or n < 1:
    raise ConfigError(f"num_processes={n} must be >= 1 with coordinator_address={address!r} "
                      f"(set --num_processes or ${ENV_NUM_PROCESSES})")
  if pid is None or not 0 <= pid < n:
    raise ConfigError(f"process_id={pid} must lie in [0, {n - 1}] (set --process_id or "
                      f"${ENV_PROCESS_ID}, different on every process)")
  return {"coordinator_address": address, "num_processes": n, "process_id": pid}


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> bool:
  """Starts `jax.distributed` (Gloo collectives on CPU) when the settings ask for several
  processes; returns whether it did. Must run before any other JAX computation."""
  global _INITIALIZED
  args = resolve(coordinator_address, num_processes, process_id)
  if args is None or _INITIALIZED:
    return _INITIALIZED
  import jax
  # CPU devices of different processes talk through Gloo (the default, 'none', cannot);
  # GPU/TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(initialization_timeout=timeout_s, **args)
  _INITIALIZED = True
  return True


def process_index() -> int:
  import jax
  return jax.process_index()


def process_count() -> int:
  import jax
  return jax.process_count()


def is_lead() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reached the barrier `name` (no-op in one process)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True when `flag` is true on at least one process: every process gets the same answer,
  so decisions taken on it (stop after this round, skip a damaged checkpoint) agree."""
  if process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(int(bool(flag)), np.int32))
  return bool(np.asarray(flags).max())


def lock_name(base: str = ".lock") -> str:
  """The workdir lock file of this process: `base` for process 0 (one run per workdir),
  `base.<i>` for the others, which share the run folder."""
  i = process_index()
  return base if i == 0 else f"{base}.{i}"


# --- absl flags for the launch scripts (experiments/run.py, sweep.py) ---

def define_flags(flag_values=None) -> None:
  """Registers --coordinator_address, --num_processes, --process_id (launch-only settings:
  they are not part of the ExperimentConfig, so config.json and --resume ignore them)."""
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process "
                      f"0, the same on every process (default: ${ENV_COORDINATOR}).",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", 0, "Multi-process runs: number of processes "
                       f"(default: ${ENV_NUM_PROCESSES}; 0/unset = one process).",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", -1, "Multi-process runs: this process's index in "
                       f"[0, num_processes) (default: ${ENV_PROCESS_ID}).", flag_values=fv)
  flags.DEFINE_integer("distributed_timeout", 300, "Multi-process runs: seconds to wait for "
                       "every process to join.", flag_values=fv)


def initialize_from_flags(flag_values=None) -> bool:
  """`initialize` with the values of the flags `define_flags` registered."""
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  if fv.distributed_timeout < 1:
    raise ConfigError(f"distributed_timeout={fv.distributed_timeout} must be >= 1")
  return initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                    fv.distributed_timeout)
