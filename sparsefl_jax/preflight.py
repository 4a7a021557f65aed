"""Checks that need library knowledge (dataset facts, devices, memory, the file system) but no
data: they run before the 10–20 s of data loading, so a bad launch fails in about a second.

`check_before_data(cfg)` runs first; `check_after_partition(cfg, ds)` re-checks what only the
partition tells exactly (the largest client) before anything is compiled.
"""
import math
import os
from typing import Optional

from sparsefl_jax.config import ConfigError, ExperimentConfig

# Training-split sizes (examples) of the named datasets, for the memory lower bound.
TRAIN_SIZES = {"fashion_mnist": 60000, "mnist": 60000, "cifar10": 50000, "cifar100": 50000,
               "emnist/byclass": 697932, "emnist/balanced": 112800, "digits": 1500}
CONV_MODELS = ("small_cnn", "leaf_cnn", "cifar_cnn", "resnet18", "vgg16")
# XLA temp bytes per (client in flight × epoch × padded example slot) of the local-training
# scan: the epochs' shuffled example orders and their sort buffers (measured: ~19 B for
# mlp_small on digits, independent of the model).
BYTES_PER_SLOT = 20


def check_before_data(cfg: ExperimentConfig, spans_processes: bool = True) -> None:
  """Names, devices, data_dir and a memory lower bound; raises ConfigError (one line).

  `spans_processes=False`: the run is not one mesh over every process (a sweep's members
  are spread over the processes instead), so --num_devices need not span them."""
  from sparsefl_jax import algorithms, models
  from sparsefl_jax.data import sources
  algorithms.algorithm_class(cfg.algorithm)   # ConfigError naming the accepted values
  if cfg.model not in models.MODELS:
    raise ConfigError(f"model={cfg.model!r} is not one of {list(models.MODELS)}")
  if cfg.dataset not in sources.INFO:
    raise ConfigError(f"dataset={cfg.dataset!r} is not one of {list(sources.INFO)}")
  if cfg.data_dir and not os.path.isdir(cfg.data_dir):
    raise ConfigError(f"data_dir={cfg.data_dir!r} does not exist; accepted: an existing folder "
                      "(it is not created), or '' for the default")
  classes = (cfg.synthetic_classes if cfg.dataset == "synthetic"
             else sources.INFO[cfg.dataset].num_classes)
  if cfg.partition == "classes" and cfg.classes_per_client > classes:
    raise ConfigError(f"classes_per_client={cfg.classes_per_client} must lie in [1, {classes}] "
                      f"(dataset={cfg.dataset!r} has {classes} classes)")
  import jax
  if cfg.num_devices > jax.device_count():
    raise ConfigError(f"num_devices={cfg.num_devices} must lie in [1, {jax.device_count()}] "
                      f"(the devices JAX sees); on CPU set XLA_FLAGS="
                      f"--xla_force_host_platform_device_count={cfg.num_devices}")
  from sparsefl_jax.federated import sharding
  try:   # several processes: the mesh takes the same number of devices from each
    if spans_processes:
      sharding.check_processes(cfg.num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  check_memory(cfg, min_client_examples(cfg))


def min_client_examples(cfg: ExperimentConfig) -> Optional[int]:
  """A lower bound on the largest client's example count, from the dataset size alone."""
  if cfg.dataset == "synthetic":
    return cfg.synthetic_examples
  n = TRAIN_SIZES.get(cfg.dataset)
  if n is None:
    return None
  return max(1, math.floor(n / cfg.num_clients * (1.0 - cfg.val_fraction)))


def parallel_clients(cfg: ExperimentConfig) -> int:
  """Clients trained at the same time (their buffers coexist) under the chosen client map."""
  import jax
  mapping = cfg.client_map
  if mapping == "auto":
    conv = cfg.model in CONV_MODELS and jax.default_backend() == "cpu"
    mapping = "map" if conv else "vmap"
  per_device = math.ceil(cfg.clients_per_round / cfg.num_devices)
  return {"vmap": per_device, "map": 1,
          "chunked": min(cfg.client_chunk_size, per_device)}.get(mapping, per_device)


def round_buffer_bytes(cfg: ExperimentConfig, max_examples: int) -> int:
  """Estimated bytes of one device's local-training buffers (grows with local_epochs)."""
  slots = math.ceil(max_examples / cfg.batch_size) * cfg.batch_size
  return parallel_clients(cfg) * cfg.local_epochs * slots * BYTES_PER_SLOT


def available_bytes() -> Optional[int]:
  """Free memory of the accelerator (its allocator limit) or, on CPU, the host's MemAvailable."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  except Exception:  # backends without memory_stats
    pass
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def check_memory(cfg: ExperimentConfig, max_examples: Optional[int]) -> None:
  """Refuses a round whose buffers cannot fit (e.g. local_epochs=1000000) before allocating."""
  if max_examples is None:
    return
  need = round_buffer_bytes(cfg, max_examples)
  have = available_bytes()
  if have is not None and need > have:
    most = max(1, cfg.local_epochs * have // need)
    raise ConfigError(
        f"local_epochs={cfg.local_epochs} needs ~{need / 1e9:.1f} GB for one round's local-"
        f"training buffers ({parallel_clients(cfg)} clients in flight x {max_examples} "
        f"examples), but {have / 1e9:.1f} GB are available; accepted here: local_epochs <= "
        f"{most}, or fewer clients in flight (--client_map=map|chunked)")


def check_after_partition(cfg: ExperimentConfig, ds) -> None:
  """batch_size against the largest client, and the exact memory estimate."""
  counts = [int(c) for c in ds.counts]
  largest = max(counts)
  if cfg.batch_size > largest:
    raise ConfigError(f"batch_size={cfg.batch_size} exceeds every client: the largest (client "
                      f"{counts.index(largest)}) holds {largest} examples; accepted: "
                      f"1..{largest}")
  check_memory(cfg, ds.max_examples)
