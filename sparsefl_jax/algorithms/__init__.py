"""Federated algorithms: one module per method, each a few hooks on `base.Algorithm`.

The built-ins are found, not listed: every class in a module of this package that subclasses
`Algorithm` and sets `name` in its own body is the method `--algorithm=<name>` (its
`description` is the --helpfull line). Adding a built-in is adding one file. A method defined
outside the package runs without editing it: `register_algorithm(name, cls)` in-process, or
the import spec `--algorithm=package.module:ClassName` (the module must be on the Python path).
"""
import importlib
import os
import pkgutil
from typing import Dict, Tuple, Type

from sparsefl_jax.algorithms.base import Algorithm, Phase, Upload, init_only_field
from sparsefl_jax.algorithms.fedadam import FedAdam
from sparsefl_jax.algorithms.fedavg import FedAvg
from sparsefl_jax.algorithms.fedprox import FedProx
from sparsefl_jax.algorithms.hyper import Hyper

_NOT_METHODS = ("base", "hyper")   # modules of this package that define no method


def _discover() -> Dict[str, Type[Algorithm]]:
  """{name: class} of the built-ins, sorted by name; two classes with one name are an error."""
  found: Dict[str, Type[Algorithm]] = {}
  for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
    if info.name in _NOT_METHODS or info.name.startswith("_"):
      continue
    module = importlib.import_module(f"{__name__}.{info.name}")
    for obj in vars(module).values():
      if (isinstance(obj, type) and issubclass(obj, Algorithm) and obj.__module__ ==
          module.__name__ and "name" in vars(obj) and not obj.__name__.startswith("_")):
        if obj.name in found and found[obj.name] is not obj:
          raise RuntimeError(f"two built-in algorithms are named {obj.name!r}: "
                             f"{found[obj.name].__qualname__} and {obj.__qualname__}")
        found[obj.name] = obj
  return dict(sorted(found.items()))


_BUILTIN = _discover()
ALGORITHMS = tuple(_BUILTIN)


def descriptions() -> Dict[str, str]:
  """{name: one-line description} of the built-ins (the --helpfull text of --algorithm)."""
  return {name: cls.description for name, cls in _BUILTIN.items()}


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
  return _BUILTIN[name]


def with_capability(attribute: str) -> Tuple[str, ...]:
  """The known names whose class has the capability `attribute` (e.g. 'supports_block')."""
  return tuple(n for n in names() if getattr(algorithm_class(n), attribute))


def get_algorithm(name: str, config=None) -> Algorithm:
  """Builds the named algorithm, reading its hyperparameters from `config` (if given)."""
  cls = algorithm_class(name)
  return cls.from_config(config) if config is not None else cls()


__all__ = ["ALGORITHMS", "Algorithm", "FedAdam", "FedAvg", "FedProx", "Hyper", "Phase",
           "Upload", "algorithm_class", "init_only_field", "descriptions", "get_algorithm", "names",
           "register_algorithm", "with_capability"]
