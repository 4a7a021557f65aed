"""Sparsity schedules over federation rounds.

Schedules are frozen (hashable) dataclasses, safe to close over in jit.
Calling one on a round number returns the sparsity as a float32 jnp scalar;
the round may be a Python int or an unbatched traced integer (the round
counter of the jitted FL round). ``is_update_round(t)`` says whether the
mask should be recomputed at round t.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable


def _check_sparsity(name: str, value: float) -> None:
  """[0, 1) for a concrete number; a traced scalar (a vmapped sweep) passes unchecked."""
  if traceable.is_traced(value):
    traceable.check_range(name, value)   # shape only
    return
  if not isinstance(value, (int, float)) or math.isnan(value) or not (
      0.0 <= value < 1.0):
    raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """The same sparsity at every round (SWAT, ZeroFL, SparsyFed)."""
  sparsity: float

  def __post_init__(self):
    _check_sparsity("sparsity", self.sparsity)

  def __call__(self, t: Any) -> jax.Array:
    del t
    return jnp.float32(self.sparsity)

  def is_update_round(self, t: Any) -> jax.Array:
    return jnp.asarray(t) >= 0


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
  """0 before ``at_round``, ``sparsity`` from ``at_round`` on."""
  sparsity: float
  at_round: int

  def __post_init__(self):
    _check_sparsity("sparsity", self.sparsity)
    _check_int("at_round", self.at_round, 0)

  def __call__(self, t: Any) -> jax.Array:
    return jnp.where(jnp.asarray(t) >= self.at_round,
                     jnp.float32(self.sparsity), jnp.float32(0.0))

  def is_update_round(self, t: Any) -> jax.Array:
    return jnp.asarray(t) == self.at_round


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
  """FedSparsify's progressive schedule (Eq. 1, Zhu & Gupta's polynomial).

    s_t = s_T + (s_0 - s_T) * (1 - (t_F - t_0) / (T - t_0)) ** n,
    t_F = F * floor(t / F).

  Boundaries: s_t = s_0 while t_F <= t_0 (so pruning only bites for rounds
  after ``start_round``; FedSparsify prunes at rounds > t_0) and s_t = s_T
  for every t >= T. Between pruning rounds (t mod F != 0) the value of the
  last multiple of F is held.

  Attributes:
    final_sparsity: s_T in [0, 1); may be a traced scalar (a vmapped sweep), like
      initial_sparsity. The round counts and the exponent are static.
    total_rounds: T > start_round.
    initial_sparsity: s_0 in [0, 1).
    start_round: t_0 >= 0.
    frequency: F >= 1.
    exponent: n >= 1 (FedSparsify uses 3).
  """
  final_sparsity: float
  total_rounds: int
  _: dataclasses.KW_ONLY
  initial_sparsity: float = 0.0
  start_round: int = 1
  frequency: int = 1
  exponent: float = 3

  def __post_init__(self):
    _check_sparsity("final_sparsity", self.final_sparsity)
    _check_sparsity("initial_sparsity", self.initial_sparsity)
    _check_int("start_round", self.start_round, 0)
    _check_int("total_rounds", self.total_rounds, self.start_round + 1)
    _check_int("frequency", self.frequency, 1)
    if isinstance(self.exponent, bool) or not isinstance(
        self.exponent, (int, float)) or not self.exponent >= 1:
      raise ValueError(f"exponent must be >= 1, got {self.exponent!r}.")

  def __call__(self, t: Any) -> jax.Array:
    t = jnp.asarray(t, jnp.int32)
    t_f = (t // self.frequency) * self.frequency
    frac = (t_f - self.start_round).astype(jnp.float32) / jnp.float32(
        self.total_rounds - self.start_round)
    frac = jnp.clip(frac, 0.0, 1.0)
    s0 = jnp.float32(self.initial_sparsity)
    s_t = jnp.float32(self.final_sparsity)
    value = s_t + (s0 - s_t) * jnp.power(1.0 - frac, jnp.float32(self.exponent))
    return jnp.where(t >= self.total_rounds, s_t, value)

  def is_update_round(self, t: Any) -> jax.Array:
    """Rounds after t_0 that F divides (the sparsity steps there)."""
    t = jnp.asarray(t, jnp.int32)
    return (t > self.start_round) & (t % self.frequency == 0)
