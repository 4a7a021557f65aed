"""Communication accounting from actual non-zeros.

Encodings (bytes per tensor of ``size`` entries with ``nnz`` non-zeros):

* ``'dense'``:   4 * size (float32, every entry).
* ``'csr'``:     4 * nnz values + 4 * nnz int32 column indices
                 + 4 * (rows + 1) int32 row pointers. As in ZeroFL every
                 tensor is vectorised before encoding, so rows = 1 and a
                 tensor costs 8 * nnz + 8 bytes.
* ``'bitmask'``: ceil(size / 8) bytes of 1-bit mask + 4 * nnz values.
* ``'auto'`` (the default): the cheapest of the three for each tensor, as a
  real system would send it (dense for a dense tensor, bitmask from about
  3% to 97% density, CSR below).

FedSparsify's transmission cost (reported in Megabits, no compression) is
32 bits per transmitted value plus 1 bit per parameter for every uploaded
mask; see ``fedsparsify_cost_bits``.

Count helpers accept Python ints (exact, for host-side totals) or jnp
integer arrays (inside the jitted round). Tree helpers return int32
scalars, which are exact up to 2**31 - 1 bytes per call (any model that fits
in memory); accumulate totals over rounds and clients on the host or in
float32. Megabyte figures use 10**6 bytes (``MB``), matching ZeroFL's
reported sizes; ``MIB`` is 2**20.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk

PyTree = Any

ENCODINGS = ("auto", "dense", "csr", "bitmask")
VALUE_BYTES = 4
INDEX_BYTES = 4
MB = 10**6
MIB = 2**20


def check_encoding(encoding: str) -> None:
  if encoding not in ENCODINGS:
    raise ValueError(f"Unknown encoding {encoding!r}; accepted: "
                     f"{', '.join(ENCODINGS)}.")


def encoded_bytes(nnz: Any, size: Any, encoding: str, rows: Any = 1) -> Any:
  """Bytes to send one tensor with ``nnz`` non-zeros out of ``size``."""
  check_encoding(encoding)
  if encoding == "auto":
    costs = [encoded_bytes(nnz, size, e, rows) for e in ("dense", "csr", "bitmask")]
    if any(isinstance(c, jax.Array) for c in costs):
      return jnp.minimum(jnp.minimum(costs[0], costs[1]), costs[2])
    return min(costs)
  if encoding == "dense":
    return VALUE_BYTES * size
  if encoding == "csr":
    return (VALUE_BYTES + INDEX_BYTES) * nnz + INDEX_BYTES * (rows + 1)
  return (size + 7) // 8 + VALUE_BYTES * nnz


def _selected(tree: PyTree, filter_fn: Optional[topk.FilterFn]) -> list:
  sel = jax.tree.leaves(topk.selection(tree, filter_fn))
  return [x for x, s in zip(jax.tree.leaves(tree), sel) if s]


def tree_nnz(tree: PyTree,
             filter_fn: Optional[topk.FilterFn] = None) -> jax.Array:
  """Non-zero entries over the selected leaves (int32 scalar)."""
  return masks_lib.nnz(tree, filter_fn)


def tree_size(tree: PyTree,
              filter_fn: Optional[topk.FilterFn] = None) -> int:
  """Entries over the selected leaves (Python int)."""
  return masks_lib.size(tree, filter_fn)


def tree_bytes(tree: PyTree, encoding: str = "auto",
               filter_fn: Optional[topk.FilterFn] = None) -> jax.Array:
  """Bytes to send the selected leaves, each encoded as one tensor (int32).

  Jittable and vmappable (per client: vmap over the stacked tree).
  """
  check_encoding(encoding)
  total = jnp.int32(0)
  for x in _selected(tree, filter_fn):
    n = jnp.sum(jnp.asarray(x) != 0, dtype=jnp.int32)
    total = total + encoded_bytes(n, int(np.size(x)), encoding)
  return total


def tree_bytes_host(tree: PyTree, encoding: str = "auto",
                    filter_fn: Optional[topk.FilterFn] = None) -> int:
  """``tree_bytes`` as an exact Python int (host-side, NumPy arrays)."""
  check_encoding(encoding)
  return sum(
      int(encoded_bytes(int(np.count_nonzero(np.asarray(x))),
                        int(np.size(x)), encoding))
      for x in _selected(tree, filter_fn))


def fedsparsify_cost_bits(global_nnz: Any, client_nnz: Any,
                          num_params: Any = 0,
                          masks_uploaded: bool = False) -> Any:
  """FedSparsify's per-round transmission cost in bits (Stripelis et al., FedSparsify).

    32 * (K * nnz(global) + Σ_k nnz(upload_k)) + [masks] K * N

  Args:
    global_nnz: non-zeros of the broadcast global model (sent to each of
      the K participating clients).
    client_nnz: non-zeros uploaded by each participating client, shape [K]
      (a Python sequence or array).
    num_params: N, the dense parameter count (one 1-bit mask of size N per
      uploaded mask); only used when ``masks_uploaded``.
    masks_uploaded: True for FedSparsify-Local, whose clients upload masks.

  Returns:
    Bits as a Python int for Python inputs, else a float32 scalar (int32
    would overflow for ResNet-sized rounds). Divide by 1e6 for Megabits.
  """
  if isinstance(client_nnz, (list, tuple)) and all(
      isinstance(v, int) for v in client_nnz) and isinstance(
          global_nnz, int) and isinstance(num_params, int):
    k = len(client_nnz)
    bits = 32 * (k * global_nnz + sum(client_nnz))
    return bits + (k * num_params if masks_uploaded else 0)
  c = jnp.asarray(client_nnz, jnp.float32).reshape(-1)
  k = c.shape[0]
  bits = 32.0 * (k * jnp.asarray(global_nnz, jnp.float32) + jnp.sum(c))
  if masks_uploaded:
    bits = bits + k * jnp.asarray(num_params, jnp.float32)
  return bits


def megabytes(num_bytes: Any) -> Any:
  """Bytes to MB (10**6 bytes)."""
  return num_bytes / MB


def megabits(num_bits: Any) -> Any:
  """Bits to Megabits (10**6 bits)."""
  return num_bits / 10**6
