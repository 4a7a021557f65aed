"""Data layer: real and synthetic datasets, federated partitioners, preprocessing.

`build_federated_dataset` loads a dataset into numpy, partitions it over
clients and returns a `FederatedDataset` of stacked, padded per-client arrays
that the engine places on the device once.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from sparsefl_jax.data import partition as _part
from sparsefl_jax.data.federated import (DatasetNotFoundError, FederatedDataset,
                                         channel_stats, log_memory, stack_clients)
from sparsefl_jax.data.preprocess import crop_flip, make_batch_fn, normalize
from sparsefl_jax.data.sources import INFO, RawData, load_raw
from sparsefl_jax.data.synthetic import SyntheticSpec

DATASETS = tuple(INFO)
PARTITIONS = ("iid", "lda", "dirichlet", "classes", "natural")

__all__ = [
    "DATASETS", "PARTITIONS", "DatasetNotFoundError", "FederatedDataset",
    "SyntheticSpec", "build_federated_dataset", "crop_flip", "federate",
    "make_batch_fn", "normalize", "partition_indices",
]


def partition_indices(labels: np.ndarray, *, num_clients: int, partition: str,
                      num_classes: int, alpha: float = 1.0,
                      classes_per_client: int = 2, seed: int = 0,
                      min_partition_size: int = 1,
                      groups: Optional[np.ndarray] = None):
  """Dispatch to a partitioner; returns (index arrays, LDA matrix or None)."""
  if partition == "iid":
    return _part.iid_partition(labels, num_clients, seed), None
  if partition == "lda":
    return _part.lda_partition(labels, num_clients, alpha, seed, num_classes)
  if partition == "dirichlet":
    return _part.dirichlet_partition(labels, num_clients, alpha, seed, num_classes,
                                     min_partition_size), None
  if partition == "classes":
    return _part.classes_partition(labels, num_clients, classes_per_client, seed,
                                   num_classes), None
  if partition == "natural":
    return _part.natural_partition(groups, num_clients, seed), None
  raise ValueError(f"unknown partition {partition!r}; choose one of {PARTITIONS}")


def _check_args(name, num_clients, partition, alpha, classes_per_client,
                val_fraction, min_partition_size, partition_test, synthetic):
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
  if partition not in PARTITIONS:
    raise ValueError(f"unknown partition {partition!r}; choose one of {PARTITIONS}")
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
      or num_clients < 1:
    raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
  if not isinstance(alpha, numbers.Real) or not alpha > 0:
    raise ValueError(f"alpha must be a number > 0 (inf allowed for 'lda'), got {alpha!r}")
  if math.isinf(alpha) and partition == "dirichlet":
    raise ValueError("alpha=inf is not accepted by partition='dirichlet'; use "
                     "'iid' or 'lda'")
  if not isinstance(classes_per_client, (int, np.integer)) or classes_per_client < 1:
    raise ValueError(f"classes_per_client must be an integer >= 1, got "
                     f"{classes_per_client!r}")
  if not isinstance(val_fraction, numbers.Real) or not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  if not isinstance(min_partition_size, (int, np.integer)) or min_partition_size < 1:
    raise ValueError(f"min_partition_size must be an integer >= 1, got "
                     f"{min_partition_size!r}")
  if partition_test and partition not in ("iid", "lda"):
    raise ValueError(f"partition_test=True supports partition 'iid' or 'lda', "
                     f"got {partition!r}")
  if synthetic is not None and name != "synthetic":
    raise ValueError(f"synthetic=SyntheticSpec(...) only applies to "
                     f"name='synthetic', got name={name!r}")


def federate(raw: RawData, name: str, *, num_clients: int, partition: str = "iid",
             alpha: float = 1.0, classes_per_client: int = 2, data_seed: int = 0,
             val_fraction: float = 0.0, min_partition_size: int = 1,
             partition_test: bool = False) -> FederatedDataset:
  """Partition centralised arrays into a FederatedDataset (no I/O)."""
  parts, dist = partition_indices(
      raw.train_y, num_clients=num_clients, partition=partition,
      num_classes=raw.num_classes, alpha=alpha,
      classes_per_client=classes_per_client, seed=data_seed,
      min_partition_size=min_partition_size, groups=raw.groups)
  empty = [p for p, idx in enumerate(parts) if idx.size == 0]
  if empty:
    raise ValueError(f"partition {partition!r} left clients {empty[:10]} without "
                     f"examples; use fewer clients or another partition")
  val = {}
  if val_fraction > 0:
    parts, val_parts = _part.split_validation(parts, val_fraction, [data_seed, 1])
    vx, vy, vc = stack_clients(raw.train_x, raw.train_y, val_parts)
    val = dict(val_x=vx, val_y=vy, val_counts=vc)
  ctest = {}
  if partition_test:
    if partition == "lda":
      tparts, _ = _part.lda_partition(raw.test_y, num_clients, alpha, [data_seed, 2],
                                      raw.num_classes, dirichlet_dist=dist)
    else:
      tparts = _part.iid_partition(raw.test_y, num_clients, [data_seed, 2])
    cx, cy, cc = stack_clients(raw.test_x, raw.test_y, tparts)
    ctest = dict(client_test_x=cx, client_test_y=cy, client_test_counts=cc)
  tx, ty, counts = stack_clients(raw.train_x, raw.train_y, parts)
  mean, std = channel_stats(raw.train_x)
  ds = FederatedDataset(name=name, train_x=tx, train_y=ty, counts=counts,
                        test_x=raw.test_x, test_y=raw.test_y,
                        num_classes=raw.num_classes, mean=mean, std=std,
                        augment=raw.augment, **val, **ctest)
  log_memory(ds)
  return ds


def build_federated_dataset(
    name: str = "fashion_mnist", *, num_clients: int, partition: str = "iid",
    alpha: float = 1.0, classes_per_client: int = 2, data_seed: int = 0,
    data_dir: Optional[str] = None, val_fraction: float = 0.0,
    min_partition_size: int = 1, partition_test: bool = False,
    synthetic: Optional[SyntheticSpec] = None) -> FederatedDataset:
  """Load dataset `name`, partition it over `num_clients`, stack and pad it.

  Args:
    name: one of DATASETS.
    num_clients: P >= 1.
    partition: one of PARTITIONS.
    alpha: Dirichlet concentration for 'lda' (inf = IID) and 'dirichlet'.
    classes_per_client: k for 'classes'.
    data_seed: seeds partitioning, hold-out and synthetic data.
    data_dir: TFDS data dir (prepared datasets); for fashion_mnist it may also
      hold the IDX gz files.
    val_fraction: per-client validation hold-out fraction in [0, 1).
    min_partition_size: 'dirichlet' redraws until each client has this many.
    partition_test: also split the test set per client ('iid', or 'lda' with
      the train split's Dirichlet matrix).
    synthetic: the shape of name='synthetic' data.
  """
  _check_args(name, num_clients, partition, alpha, classes_per_client,
              val_fraction, min_partition_size, partition_test, synthetic)
  raw = load_raw(name, num_clients=num_clients, data_seed=data_seed,
                 data_dir=data_dir, spec=synthetic)
  return federate(raw, name, num_clients=num_clients, partition=partition,
                  alpha=alpha, classes_per_client=classes_per_client,
                  data_seed=data_seed, val_fraction=val_fraction,
                  min_partition_size=min_partition_size,
                  partition_test=partition_test)
