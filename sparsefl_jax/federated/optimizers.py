"""Client and server optimizers (optax transformations) and the client learning-rate schedules."""
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from sparsefl_jax import traceable
from sparsefl_jax.federated import fedopt

CLIENT_LR_SCHEDULES = ("constant", "exponential")
SERVER_OPTIMIZERS = ("none", "sgd", "adam", "yogi", "adagrad")
SERVER_OPT_IMPLS = ("reddi", "optax")   # for adam | yogi | adagrad


@dataclasses.dataclass(frozen=True)
class ClientLRSchedule:
  """Per-round client learning rate, evaluated on the unbatched round number t (1-based).

  'constant': lr. 'exponential' (ZeroFL): lr_t = lr·exp((t/T)·ln(lr_end/lr)), which goes from
  lr towards lr_end over T rounds. ZeroFL's paper prints the ratio inverted, which would make
  the LR grow; this is the intended sign, as the SparsyFed authors' re-implementation has it.
  `lr` and `lr_end` may be traced scalars (a vmapped sweep); `kind` and `total_rounds` are
  static.
  """
  lr: float
  kind: str = "constant"
  lr_end: Optional[float] = None
  total_rounds: int = 1

  def __post_init__(self):
    if self.kind not in CLIENT_LR_SCHEDULES:
      raise ValueError(f"client lr schedule {self.kind!r} is not one of {CLIENT_LR_SCHEDULES}")
    traceable.check_range("lr", self.lr, 0, low_open=True)
    if self.kind == "exponential":
      traceable.check_range("lr_end", self.lr_end, 0, low_open=True,
                            suffix=" for the exponential schedule")
    if self.total_rounds < 1:
      raise ValueError(f"total_rounds={self.total_rounds} must be >= 1")

  def __call__(self, t: jax.Array) -> jax.Array:
    if self.kind == "constant":
      return jnp.asarray(self.lr, jnp.float32)
    if traceable.is_traced(self.lr, self.lr_end):   # float32 in the trace
      ratio = jnp.log(jnp.asarray(self.lr_end, jnp.float32) / self.lr)
    else:                                            # float64, as always (bit-identical)
      ratio = math.log(self.lr_end / self.lr)
    return (self.lr * jnp.exp(jnp.asarray(t, jnp.float32) / self.total_rounds * ratio)
            ).astype(jnp.float32)


def client_optimizer(learning_rate: jax.Array, momentum: float = 0.0,
                     weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with optional momentum and (PyTorch-style, coupled) weight decay on every parameter."""
  parts = []
  if traceable.is_traced(weight_decay) or weight_decay:   # traced: a sweep over it
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate, momentum=_momentum(momentum)))
  return optax.chain(*parts)


def _momentum(momentum):
  """optax's `momentum` argument: None for a concrete 0 (no trace), a traced value as is (a
  sweep: a zero momentum then adds 0·trace, the same numbers)."""
  return momentum if traceable.is_traced(momentum) else (momentum or None)


def server_optimizer(name: str, learning_rate: float = 1.0, momentum: float = 0.0,
                     b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
                     impl: str = "reddi") -> Optional[optax.GradientTransformation]:
  """The server optimizer applied to the pseudo-gradient (global − aggregate).

  'none' returns None: the aggregate replaces the global model exactly (FedAvg). 'sgd' with
  lr 1 and no momentum equals it up to float rounding; with momentum it is FedAvgM. 'adam',
  'yogi', 'adagrad' are FedOpt with eps = τ: impl='reddi' (default) is Reddi et al.'s
  Algorithm 2 as written (`fedopt.fedopt`: m_0 = v_0 = 0, no bias correction, β1 momentum
  for all three); impl='optax' is `optax.adam` / `optax.yogi` / `optax.adagrad` (bias-
  corrected moments, i.e. an effective τ·sqrt(1 − β2^t) for Adam; optax's Yogi starts its
  moments at 1e-6, its Adagrad has no momentum and puts eps inside the square root).
  """
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(f"server optimizer {name!r} is not one of {SERVER_OPTIMIZERS}")
  if impl not in SERVER_OPT_IMPLS:
    raise ValueError(f"server_opt_impl={impl!r} is not one of {SERVER_OPT_IMPLS}")
  if name == "none":
    return None
  traceable.check_range("server_lr", learning_rate, 0, low_open=True)   # may be traced
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=_momentum(momentum))
  if impl == "reddi":
    return fedopt.fedopt(name, learning_rate, b1=b1, b2=b2, tau=eps)
  if name == "adam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  if name == "yogi":
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=eps)
  return optax.adagrad(learning_rate, eps=eps)
