"""Hyperparameters that may be traced values (so a sweep can `jax.vmap` over them).

Inside `jax.vmap(lambda mu: ... FedProx(mu=mu) ...)` the hyperparameter is a `jax.core.Tracer`:
it has no Python truth value and no Python number. Constructors therefore validate through
`check_range`, which checks concrete values exactly as before and lets tracers through (the
user's config is still validated on concrete values in `from_config` and
`ExperimentConfig.validate`); code that needs a Python number (a static top-K count, ERK's
set-up solve) calls `require_concrete`, which fails with one line naming the hyperparameter.
See BUILD.md, "Traced hyperparameters", for which hyperparameters are traceable.
"""
from typing import Any, Optional

import jax
import numpy as np


class TracedValueError(ValueError):
  """A traced hyperparameter reached a place that needs a concrete (Python) value."""


def is_traced(*values: Any) -> bool:
  """True when any leaf of `values` is a JAX tracer (a value known only at run time)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def require_concrete(name: str, value: Any, where: str, hint: str = "") -> Any:
  """Returns `value`; raises TracedValueError (one line) when it is traced.

  `where` says what needs the concrete value, `hint` what to do instead (optional).
  """
  if is_traced(value):
    raise TracedValueError(f"{name} is traced (e.g. under jax.vmap), but {where} needs a "
                           f"concrete value" + (f"; {hint}" if hint else ""))
  return value


def check_range(name: str, value: Any, low: Optional[Any] = None, high: Optional[Any] = None,
                *, low_open: bool = False, high_open: bool = False, suffix: str = "") -> None:
  """Raises ValueError `name=value must ...` when a concrete `value` lies outside the range.

  NaN is out of every range. A traced value is not checked (its value is unknown while
  tracing); it must be a scalar. Bounds print as given, so pass 0 rather than 0.0 to read
  "[0, 1)".
  """
  if is_traced(value):
    if np.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got a traced value of shape "
                       f"{np.shape(value)}")
    return
  ok = True
  try:
    if low is not None:
      ok = value > low if low_open else value >= low
    if high is not None:
      ok = ok and (value < high if high_open else value <= high)
    ok = bool(ok)
  except TypeError:   # not a number (None, a string): out of range
    ok = False
  if ok:
    return
  if low is not None and high is not None:
    rng = (f"lie in {'(' if low_open else '['}{low}, {high}"
           f"{')' if high_open else ']'}")
  elif low is not None:
    rng = f"be {'>' if low_open else '>='} {low}"
  else:
    rng = f"be {'<' if high_open else '<='} {high}"
  raise ValueError(f"{name}={value} must {rng}{suffix}")
