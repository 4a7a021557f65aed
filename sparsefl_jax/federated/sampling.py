"""Deterministic per-round client sampling, inside jit, from (sampling key, round)."""
import jax
import jax.numpy as jnp

from sparsefl_jax.types import PRNGKey


def sample_clients(sampling_key: PRNGKey, round_index: jax.Array, num_clients: int,
                   clients_per_round: int) -> jax.Array:
  """Returns `clients_per_round` distinct client ids, a pure function of the key and round.

  When every client participates the ids are 0..P-1 in order (no randomness needed), which
  keeps full-participation runs independent of the sampling seed.
  """
  if not 1 <= clients_per_round <= num_clients:
    raise ValueError(f"clients_per_round={clients_per_round} must lie in [1, num_clients="
                     f"{num_clients}]")
  if clients_per_round == num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  key = jax.random.fold_in(sampling_key, round_index)
  ids = jax.random.choice(key, num_clients, (clients_per_round,), replace=False)
  return ids.astype(jnp.int32)
