"""FedAdam (Reddi et al. 2021): FedAvg clients; the server applies FedAdam (Reddi et al.'s
Algorithm 2, `federated/fedopt.py`; `--server_opt_impl=optax` gives optax.adam) to the
pseudo-gradient Δ = w_t − Σ_k (n_k/n) w_k. Any other server optimizer works the same way
through `--server_optimizer`; this name only changes the default to Adam.
"""
import dataclasses

from sparsefl_jax.algorithms.fedavg import FedAvg


@dataclasses.dataclass(frozen=True)
class FedAdam(FedAvg):
  default_server_optimizer: str = "adam"

  name = "fedadam"
  description = "FedAdam: FedAvg clients, Adam on the server's pseudo-gradient"
