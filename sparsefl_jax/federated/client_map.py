"""How the per-client function is mapped over the round's clients.

'vmap' batches all clients into one program (best for dense layers); 'map' runs them one
after another inside the same XLA program (lax.map; lowest memory); 'chunked' vmaps groups of
`chunk_size` clients and loops over the groups (lax.map with batch_size), trading memory for
parallelism. All three give the same numbers to float tolerance. 'auto' (the experiment
default) picks one from the model and backend: see `resolve_client_map`.
"""
from typing import Callable

import jax
import numpy as np

CLIENT_MAPS = ("vmap", "map", "chunked")


def validate_client_map(client_map: str, chunk_size: int) -> None:
  if client_map not in CLIENT_MAPS:
    raise ValueError(f"client_map={client_map!r} is not one of {CLIENT_MAPS}")
  if client_map == "chunked" and chunk_size < 1:
    raise ValueError(f"client_chunk_size={chunk_size} must be >= 1 for client_map='chunked'")


def resolve_client_map(client_map: str, params, backend: str) -> str:
  """'auto' -> 'map' for models with convolutions on CPU, else 'vmap'; others unchanged.

  On XLA:CPU a convolutional client's step is already one large GEMM per layer, so batching
  clients (vmap) gains nothing and needs K times the memory: the LEAF CNN round runs in 2.3 s
  under map against 3.3 s under vmap (experiments/bench.py). Dense-layer models have small
  GEMMs that batching does speed up (FedSparsify's MLP: 0.14 s vmap, 0.16 s map).
  """
  if client_map != "auto":
    return client_map
  has_conv = any(np.ndim(leaf) == 4 for leaf in jax.tree.leaves(params))
  return "map" if has_conv and backend == "cpu" else "vmap"


def map_clients(fn: Callable, xs, client_map: str = "vmap", chunk_size: int = 1):
  """Applies `fn` to every slice of `xs` along the leading (client) axis; stacks results."""
  validate_client_map(client_map, chunk_size)
  if client_map == "vmap":
    return jax.vmap(fn)(xs)
  if client_map == "map":
    return jax.lax.map(fn, xs)
  return jax.lax.map(fn, xs, batch_size=chunk_size)
