"""Federated algorithms: one module per method, each a few hooks on `base.Algorithm`."""
from typing import Dict, Type

from sparsefl_jax.algorithms.base import Algorithm, Upload
from sparsefl_jax.algorithms.fedadam import FedAdam
from sparsefl_jax.algorithms.fedavg import FedAvg
from sparsefl_jax.algorithms.fedprox import FedProx

ALGORITHMS: Dict[str, Type[Algorithm]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
}


def get_algorithm(name: str, config=None) -> Algorithm:
  """Builds the named algorithm, reading its hyperparameters from `config` (if given)."""
  if name not in ALGORITHMS:
    raise ValueError(f"algorithm={name!r} is not one of {sorted(ALGORITHMS)}")
  cls = ALGORITHMS[name]
  return cls.from_config(config) if config is not None else cls()


__all__ = ["ALGORITHMS", "Algorithm", "FedAdam", "FedAvg", "FedProx", "Upload", "get_algorithm"]
