"""Federated algorithms: one module per method, each a few hooks on `base.Algorithm`.

The registry maps each `--algorithm` name to (module, class); modules are imported on first
use, so a method's dependencies load only when it runs.
"""
import importlib
import importlib.util
from typing import Dict, Tuple

from sparsefl_jax.algorithms.base import Algorithm, Upload
from sparsefl_jax.algorithms.fedadam import FedAdam
from sparsefl_jax.algorithms.fedavg import FedAvg
from sparsefl_jax.algorithms.fedprox import FedProx

_REGISTRY: Dict[str, Tuple[str, str]] = {
    "fedavg": ("fedavg", "FedAvg"),
    "fedprox": ("fedprox", "FedProx"),
    "fedadam": ("fedadam", "FedAdam"),
    "swat": ("zerofl", "SwatFL"),
    "zerofl": ("zerofl", "ZeroFL"),
    "fedsparsify_global": ("fedsparsify", "FedSparsifyGlobal"),
    "fedsparsify_local": ("fedsparsify", "FedSparsifyLocal"),
    "sparsyfed": ("sparsyfed", "SparsyFed"),
    "topk": ("topk", "TopK"),
}


def _available() -> Dict[str, Tuple[str, str]]:
  """Registered names whose module exists in this checkout."""
  out = {}
  for name, (module, cls) in _REGISTRY.items():
    if importlib.util.find_spec(f"sparsefl_jax.algorithms.{module}") is not None:
      out[name] = (module, cls)
  return out


ALGORITHMS = tuple(_available())


def get_algorithm(name: str, config=None) -> Algorithm:
  """Builds the named algorithm, reading its hyperparameters from `config` (if given)."""
  if name not in ALGORITHMS:
    raise ValueError(f"algorithm={name!r} is not one of {list(ALGORITHMS)}")
  module, cls_name = _REGISTRY[name]
  cls = getattr(importlib.import_module(f"sparsefl_jax.algorithms.{module}"), cls_name)
  return cls.from_config(config) if config is not None else cls()


__all__ = ["ALGORITHMS", "Algorithm", "FedAdam", "FedAvg", "FedProx", "Upload", "get_algorithm"]
