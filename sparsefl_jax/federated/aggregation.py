"""Weighted aggregation over the leading client axis."""
import jax
import jax.numpy as jnp

from sparsefl_jax.types import PyTree


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """Σ_k w_k·x_k / Σ_k w_k over the leading client axis of every leaf (FedAvg's n_k/n)."""
  w = weights / jnp.maximum(jnp.sum(weights), 1e-12)
  return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), stacked)


def sum_dtype(dtype):
  """The dtype a statistic is summed in over clients: floats in their own, bool/int
  statistics (votes, mask counts) exactly as int32."""
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.int32
