"""Synthetic data: random uint8 images and random labels, for benchmarks and dry runs."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Shape of a synthetic dataset; N_train = num_clients * examples_per_client."""
  example_shape: tuple[int, ...] = (28, 28, 1)
  num_classes: int = 10
  examples_per_client: int = 64
  num_test: int = 256

  def __post_init__(self):
    if not self.example_shape or any(
        not isinstance(d, (int, np.integer)) or d < 1 for d in self.example_shape):
      raise ValueError(f"example_shape must be positive ints, got {self.example_shape!r}")
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    if self.examples_per_client < 1:
      raise ValueError(f"examples_per_client must be >= 1, got "
                       f"{self.examples_per_client}")
    if self.num_test < 1:
      raise ValueError(f"num_test must be >= 1, got {self.num_test}")


def make_synthetic(spec: SyntheticSpec, num_clients: int, seed: int = 0):
  """Returns (train_x, train_y, test_x, test_y, groups), deterministic in seed.

  `groups` gives each training example the id of the client it was generated
  for (consecutive blocks), so partition='natural' reproduces that layout.
  """
  rng = np.random.default_rng(seed)
  n = num_clients * spec.examples_per_client
  shape = tuple(int(d) for d in spec.example_shape)
  train_x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
  train_y = rng.integers(0, spec.num_classes, n).astype(np.int32)
  test_x = rng.integers(0, 256, (spec.num_test,) + shape, dtype=np.uint8)
  test_y = rng.integers(0, spec.num_classes, spec.num_test).astype(np.int32)
  groups = np.repeat(np.arange(num_clients), spec.examples_per_client)
  return train_x, train_y, test_x, test_y, groups
