"""A method defined outside the package, as a user would write it in their own file.

FedAvg whose aggregate is scaled by `scale` (0.5): one file, no edit of `sparsefl_jax`; the
contract tests run it by import spec (`--algorithm=my_method:MyMethod`) and by registration.
"""
import dataclasses

import jax

from sparsefl_jax.algorithms import FedAvg


@dataclasses.dataclass(frozen=True)
class MyMethod(FedAvg):
  """The example-weighted mean of the client models, times `scale`."""
  scale: float = 0.5

  name = "my_method"

  def finalize_aggregate(self, global_params, mean, counts, num_clients, algo_state, t):
    candidate = super().finalize_aggregate(global_params, mean, counts, num_clients,
                                           algo_state, t)
    return jax.tree.map(lambda w: self.scale * w, candidate)
