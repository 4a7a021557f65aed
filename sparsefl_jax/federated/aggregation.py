"""Weighted aggregation over the leading client axis."""
import jax
import jax.numpy as jnp

from sparsefl_jax.types import PyTree


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """Σ_k w_k·x_k / Σ_k w_k over the leading client axis of every leaf (FedAvg's n_k/n)."""
  w = weights / jnp.maximum(jnp.sum(weights), 1e-12)
  return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), stacked)
