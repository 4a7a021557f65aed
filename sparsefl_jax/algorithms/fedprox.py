"""FedProx (Li et al. 2020): local objective F_k(w) + (μ/2)·‖w − w_t‖²; FedAvg aggregation."""
import dataclasses

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable
from sparsefl_jax.algorithms.fedavg import FedAvg


@dataclasses.dataclass(frozen=True)
class FedProx(FedAvg):
  """FedAvg with the proximal term; `mu` may be a traced scalar (a vmapped sweep)."""
  mu: float = 0.01

  name = "fedprox"
  description = "FedProx: FedAvg + proximal term (prox_mu/2)|w - w_t|^2 in local training"

  def __post_init__(self):
    super().__post_init__()
    traceable.check_range("prox_mu", self.mu, 0)

  @classmethod
  def from_config(cls, config) -> "FedProx":
    return cls(mu=config.prox_mu)

  def local_loss(self, params, global_params, client_state):
    del client_state
    sq = jax.tree.map(lambda w, g: jnp.sum(jnp.square(w - g)), params, global_params)
    return 0.5 * self.mu * sum(jax.tree.leaves(sq))
