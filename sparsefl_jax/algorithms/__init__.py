"""Federated algorithms: one module per method, each a few hooks on `base.Algorithm`.

The registry maps each `--algorithm` name to (module, class); modules are imported on first
use, so a method's dependencies load only when it runs.
"""
import importlib
import importlib.util
from typing import Dict, Tuple, Type

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


def algorithm_class(name: str) -> Type[Algorithm]:
  """The class registered as `name`; ConfigError (one line) naming the accepted names."""
  from sparsefl_jax.config import ConfigError   # config imports no JAX, nor this package
  if name not in ALGORITHMS:
    raise ConfigError(f"algorithm={name!r} is not one of {list(ALGORITHMS)}")
  module, cls_name = _REGISTRY[name]
  return getattr(importlib.import_module(f"sparsefl_jax.algorithms.{module}"), cls_name)


def with_capability(attribute: str) -> Tuple[str, ...]:
  """The registered names whose class has the capability `attribute` (e.g. 'supports_block')."""
  return tuple(n for n in ALGORITHMS if getattr(algorithm_class(n), attribute))


def get_algorithm(name: str, config=None) -> Algorithm:
  """Builds the named algorithm, reading its hyperparameters from `config` (if given)."""
  cls = algorithm_class(name)
  return cls.from_config(config) if config is not None else cls()


__all__ = ["ALGORITHMS", "Algorithm", "FedAdam", "FedAvg", "FedProx", "Upload",
           "algorithm_class", "get_algorithm", "with_capability"]
