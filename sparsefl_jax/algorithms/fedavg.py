"""FedAvg (McMahan et al. 2017): clients train from w_t; w_{t+1} = Σ_k (n_k/n) w_k.

The base contract's defaults are exactly FedAvg, so this class only names it.
"""
import dataclasses

from sparsefl_jax.algorithms.base import Algorithm


@dataclasses.dataclass(frozen=True)
class FedAvg(Algorithm):
  name = "fedavg"
  description = "FedAvg: example-weighted mean of the client models"
