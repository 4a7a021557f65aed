"""Server state and device-resident client data: plain pytrees (NamedTuples)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.types import AlgoState, ModelState, Params, PRNGKey, PyTree


class ServerState(NamedTuple):
  """Everything a round needs from the past; checkpointing this resumes a run bit-exactly.

  `round` counts completed rounds (0 before the first). The client-sampling key lives here
  (not in the step's `key` argument) so that sampling has its own seed, separate from training.
  """
  round: jax.Array            # int32 scalar, unbatched
  params: Params
  model_state: ModelState     # e.g. BatchNorm statistics, aggregated like weights
  opt_state: PyTree           # server optax state
  algo_state: AlgoState
  sampling_key: PRNGKey


class ClientData(NamedTuple):
  """All clients' training data, stacked and padded: (P, M, ...) arrays plus counts (P,)."""
  x: jax.Array
  y: jax.Array
  counts: jax.Array

  @classmethod
  def from_arrays(cls, x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> "ClientData":
    """Validates shapes and puts the arrays on the default device."""
    x, y, counts = np.asarray(x), np.asarray(y), np.asarray(counts)
    if x.ndim < 2 or y.shape != x.shape[:2] or counts.shape != x.shape[:1]:
      raise ValueError(
          f"client data shapes disagree: x {x.shape}, y {y.shape}, counts {counts.shape}; "
          "expected x (P, M, ...), y (P, M), counts (P,)")
    if counts.min() < 1 or counts.max() > x.shape[1]:
      raise ValueError(
          f"client example counts must lie in [1, {x.shape[1]}]; got min {counts.min()}, "
          f"max {counts.max()}")
    return cls(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(counts, jnp.int32))

  @property
  def num_clients(self) -> int:
    return self.x.shape[0]

  @property
  def max_examples(self) -> int:
    return self.x.shape[1]
