"""Federated algorithms: one module per method, each a few hooks on `base.Algorithm`.

The registry maps each built-in `--algorithm` name to (module, class); modules are imported on
first use, so a method's dependencies load only when it runs. A method defined outside the
package runs without editing it: `register_algorithm(name, cls)` in-process, or the import
spec `--algorithm=package.module:ClassName` (the module must be on the Python path).
"""
import importlib
import importlib.util
from typing import Dict, Tuple, Type

from sparsefl_jax.algorithms.base import Algorithm, Upload
from sparsefl_jax.algorithms.fedadam import FedAdam
from sparsefl_jax.algorithms.fedavg import FedAvg
from sparsefl_jax.algorithms.fedprox import FedProx
from sparsefl_jax.algorithms.hyper import Hyper

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


# Methods registered at run time (`register_algorithm`), by name.
_REGISTERED: Dict[str, Type[Algorithm]] = {}


def names() -> Tuple[str, ...]:
  """Every name `algorithm_class` accepts: the built-ins, then those registered at run time."""
  return ALGORITHMS + tuple(n for n in _REGISTERED if n not in ALGORITHMS)


def _check_class(cls, what: str) -> Type[Algorithm]:
  from sparsefl_jax.config import ConfigError
  if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
    raise ConfigError(f"{what}: {cls!r} is not a subclass of "
                      "sparsefl_jax.algorithms.Algorithm")
  return cls


def register_algorithm(name: str, cls: Type[Algorithm]) -> None:
  """Makes `cls` (an `Algorithm` subclass) runnable as `algorithm=name` in this process
  (`build_experiment`, `config.validate`, `get_algorithm`); re-registering a name replaces it.
  A built-in name cannot be taken, and ':' is reserved for import specs."""
  from sparsefl_jax.config import ConfigError
  if not name or ":" in name or name in ALGORITHMS:
    raise ConfigError(f"register_algorithm name={name!r} must be non-empty, without ':', and "
                      f"not a built-in {list(ALGORITHMS)}")
  _REGISTERED[name] = _check_class(cls, f"register_algorithm({name!r})")


def _import_spec(spec: str) -> Type[Algorithm]:
  """The class named by 'package.module:ClassName'."""
  from sparsefl_jax.config import ConfigError
  module_name, _, attr = spec.partition(":")
  accepted = "accepted: 'package.module:ClassName' importable from the Python path"
  if not module_name or not attr:
    raise ConfigError(f"algorithm={spec!r} is not a full import spec; {accepted}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"algorithm={spec!r}: cannot import {module_name!r} ({e}); "
                      f"{accepted}") from None
  if not hasattr(module, attr):
    raise ConfigError(f"algorithm={spec!r}: module {module_name!r} has no {attr!r}; "
                      f"{accepted}")
  return _check_class(getattr(module, attr), f"algorithm={spec!r}")


def algorithm_class(name: str) -> Type[Algorithm]:
  """The class `name` stands for: a built-in or registered name, or a 'module:Class' spec.
  Raises ConfigError (one line) naming the accepted values."""
  from sparsefl_jax.config import ConfigError   # config imports no JAX, nor this package
  if ":" in name:
    return _import_spec(name)
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in ALGORITHMS:
    raise ConfigError(f"algorithm={name!r} is not one of {list(names())} (or a "
                      "'package.module:ClassName' import spec)")
  module, cls_name = _REGISTRY[name]
  return getattr(importlib.import_module(f"sparsefl_jax.algorithms.{module}"), cls_name)


def with_capability(attribute: str) -> Tuple[str, ...]:
  """The known names whose class has the capability `attribute` (e.g. 'supports_block')."""
  return tuple(n for n in names() if getattr(algorithm_class(n), attribute))


def get_algorithm(name: str, config=None) -> Algorithm:
  """Builds the named algorithm, reading its hyperparameters from `config` (if given)."""
  cls = algorithm_class(name)
  return cls.from_config(config) if config is not None else cls()


__all__ = ["ALGORITHMS", "Algorithm", "FedAdam", "FedAvg", "FedProx", "Hyper", "Upload",
           "algorithm_class", "get_algorithm", "names", "register_algorithm",
           "with_capability"]
