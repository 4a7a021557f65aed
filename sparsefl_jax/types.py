"""Type aliases that document the role of each pytree in the federated round."""
from typing import Any

import jax

PyTree = Any
Params = PyTree         # flax 'params' collection of one model
ModelState = PyTree     # other flax collections (e.g. {'batch_stats': ...}); {} for stateless models
AlgoState = PyTree      # per-method server state (global masks, schedules' memory, ...)
ClientState = PyTree    # per-method state of one client during a round (masks, cached thresholds)
PRNGKey = jax.Array
Scalar = jax.Array
