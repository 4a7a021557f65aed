"""FedAdagrad, FedAdam and FedYogi exactly as in Reddi et al. (ICLR 2021), Algorithm 2.

With the aggregate's displacement Δ_t = Σ_k (n_k/n)(w_k − w_t) and τ the adaptivity:

    m_t = β1·m_{t−1} + (1 − β1)·Δ_t
    v_t = v_{t−1} + Δ_t²                                   (FedAdagrad)
    v_t = β2·v_{t−1} + (1 − β2)·Δ_t²                       (FedAdam)
    v_t = v_{t−1} − (1 − β2)·Δ_t²·sign(v_{t−1} − Δ_t²)     (FedYogi)
    w_{t+1} = w_t + η·m_t / (√v_t + τ)

with m_0 = v_0 = 0 (as Flower's FedOpt strategies; Reddi et al. allow any v_{−1} ≥ τ², here
`initial_v`) and no bias correction: this is why it is not `optax.adam`, whose bias-corrected
moments equal the form above with τ replaced by τ·√(1 − β2^t) (0.1τ at round 1 and still
0.79τ at round 100 for β2 = 0.99), i.e. larger steps on coordinates with |Δ| ≲ τ.

The engine passes the pseudo-gradient g = w_t − aggregate = −Δ_t and adds the returned
updates to w_t (`optax.apply_updates`); m is kept in g's sign (m_g = −m_Δ, v is the same), so
the update is −η·m_g/(√v + τ) = +η·m_Δ/(√v + τ).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsefl_jax import traceable

KINDS = ("adagrad", "adam", "yogi")


class FedOptState(NamedTuple):
  """First moment m (in the pseudo-gradient's sign) and second moment v, per parameter."""
  m: optax.Params
  v: optax.Params


def _second_moment(kind: str, b2: float):
  if kind == "adagrad":
    return lambda v, g2: v + g2
  if kind == "adam":
    return lambda v, g2: b2 * v + (1.0 - b2) * g2
  return lambda v, g2: v - (1.0 - b2) * g2 * jnp.sign(v - g2)


def fedopt(kind: str, learning_rate: float, b1: float = 0.9, b2: float = 0.99,
           tau: float = 1e-3, initial_v: float = 0.0) -> optax.GradientTransformation:
  """Reddi et al.'s server update `kind` ('adagrad' | 'adam' | 'yogi'); b2 is unused by
  'adagrad'. See the module docstring for the formulas and the sign convention."""
  if kind not in KINDS:
    raise ValueError(f"fedopt kind {kind!r} is not one of {KINDS}")
  # learning_rate, b1, b2 and tau may be traced (a vmapped sweep): then unchecked here.
  traceable.check_range("server_lr", learning_rate, 0, low_open=True)
  traceable.check_range("server_eps", tau, 0, low_open=True, suffix=" (it is τ)")
  if initial_v < 0:
    raise ValueError(f"initial_v={initial_v} must be >= 0")
  second = _second_moment(kind, b2)

  def init(params) -> FedOptState:
    return FedOptState(m=jax.tree.map(jnp.zeros_like, params),
                       v=jax.tree.map(lambda p: jnp.full_like(p, initial_v), params))

  def update(updates, state: FedOptState, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, updates)
    v = jax.tree.map(lambda v, g: second(v, g * g), state.v, updates)
    step = jax.tree.map(lambda m, v: -learning_rate * m / (jnp.sqrt(v) + tau), m, v)
    return step, FedOptState(m=m, v=v)

  return optax.GradientTransformation(init, update)
