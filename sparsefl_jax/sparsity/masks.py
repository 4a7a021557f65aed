"""Masks, magnitude pruning, majority voting and mask metrics.

Conventions (shared with ``topk.py``):

* A mask tree has the structure of the parameter tree; leaves a filter does
  not select get all-True masks (never ``None``).
* ``filter_fn(path, leaf) -> bool`` gets the key path as a '/'-joined string
  such as ``'params/Conv_0/kernel'``.
* Counts are int32 scalars and fractions float32 scalars, so every function
  here can run inside the jitted round and under ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.sparsity import topk
from sparsefl_jax.tree_paths import is_kernel, path_str

PyTree = Any
FilterFn = topk.FilterFn


# --------------------------------------------------------------------------
# Filters.
# --------------------------------------------------------------------------


# Conv and dense kernels (`tree_paths.is_kernel`), under the name the filters go by here.
weights_filter = is_kernel


def trainable_filter(path: str, leaf: Any) -> bool:
  """Every trainable parameter (kernels, biases, BN scale/bias).

  Excludes anything under a 'batch_stats' collection so that a full flax
  variables dict can be passed without pruning BN running statistics.
  """
  del leaf
  return "batch_stats" not in path.split("/")


def _bool(x: Any) -> jax.Array:
  x = jnp.asarray(x)
  return x if x.dtype == jnp.bool_ else x != 0


def _ones_like_mask(x: Any) -> jax.Array:
  return jnp.ones(jnp.shape(x), jnp.bool_)


def keep_all(tree: PyTree) -> PyTree:
  """An all-True mask of every leaf (nothing pruned yet)."""
  return jax.tree.map(_ones_like_mask, tree)


def apply_masks(tree: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the entries where the mask is False."""
  return jax.tree.map(
      lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, masks)


# --------------------------------------------------------------------------
# FedSparsify magnitude pruning.
# --------------------------------------------------------------------------


def _prune_threshold(leaves: list, sparsity: Any, method: str) -> jax.Array:
  """sorted(|w|)[floor(s * N)] over ``leaves`` jointly (zeros included)."""
  abs_leaves = [topk.abs32(x) for x in leaves]
  n = sum(int(a.size) for a in abs_leaves)
  if n == 0:
    return jnp.float32(jnp.inf)
  idx = topk.num_to_prune(n, sparsity)
  # The ascending idx-th value is the descending (n - idx)-th value.
  if isinstance(idx, int):
    k = n - min(idx, n - 1)
  else:
    k = n - jnp.minimum(idx, n - 1)
  return topk.kth_largest(abs_leaves, k, method)


def magnitude_masks(tree: PyTree, sparsity: Any,
                    filter_fn: Optional[FilterFn] = trainable_filter,
                    per_layer: bool = False,
                    method: str = "bisection") -> PyTree:
  """FedSparsify's pruning masks: |w| >= sorted(|w|)[floor(s * N)].

  Already-zero weights take part in the sort, so ``sparsity`` is the
  absolute target fraction of the N selected entries (not an increment).
  s = 0 keeps everything. Ties with the threshold are kept.

  Args:
    tree: parameter tree.
    sparsity: in [0, 1); may be traced (a schedule's value inside jit).
    filter_fn: selects the leaves to prune (None: all leaves).
    per_layer: one threshold per leaf instead of one global threshold.
    method: how the threshold is found: 'bisection' (default), 'sort' or
      'top_k' (static sparsity only); all three are exact.

  Returns:
    A bool tree; unselected leaves are all-True.
  """
  topk.check_method(method)
  topk.check_fraction("sparsity", sparsity, upper_open=True)
  sel = topk.selection(tree, filter_fn)
  if per_layer:
    def one(x, s):
      if not s:
        return _ones_like_mask(x)
      return topk.abs32(x) >= _prune_threshold([x], sparsity, method)
    return jax.tree.map(one, tree, sel)
  chosen = [x for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sel))
            if s]
  thr = _prune_threshold(chosen, sparsity, method)
  return jax.tree.map(
      lambda x, s: topk.abs32(x) >= thr if s else _ones_like_mask(x),
      tree, sel)


def magnitude_prune(tree: PyTree, sparsity: Any,
                    filter_fn: Optional[FilterFn] = trainable_filter,
                    per_layer: bool = False,
                    method: str = "bisection") -> PyTree:
  """``tree`` with the entries outside ``magnitude_masks`` set to zero."""
  return apply_masks(
      tree, magnitude_masks(tree, sparsity, filter_fn, per_layer, method))


# --------------------------------------------------------------------------
# FedSparsify-Local merge.
# --------------------------------------------------------------------------


def _num_clients(stacked: PyTree) -> int:
  leaves = jax.tree.leaves(stacked)
  if not leaves:
    raise ValueError("Empty tree: cannot infer the number of clients.")
  return int(jnp.shape(leaves[0])[0])


def majority_vote(masks_stacked: PyTree,
                  threshold: Optional[int] = None) -> PyTree:
  """Entries kept by at least ``threshold`` of the K stacked masks.

  ``threshold`` defaults to floor(K / 2) as in FedSparsify's code (so with
  K = 10 a weight survives if 5 clients kept it, and with K = 1 everything
  survives). Masks are stacked on a leading client axis.
  """
  if threshold is None:
    threshold = _num_clients(masks_stacked) // 2
  return jax.tree.map(
      lambda m: jnp.sum(_bool(m), axis=0, dtype=jnp.int32) >= threshold,
      masks_stacked)


def weighted_average(stacked: PyTree,
                     weights: Optional[jax.Array] = None) -> PyTree:
  """Σ_k w_k x_k / Σ_k w_k over the leading client axis, zeros included."""
  k = _num_clients(stacked)
  w = jnp.ones((k,), jnp.float32) if weights is None else jnp.asarray(
      weights, jnp.float32)
  w = w / jnp.sum(w)

  def avg(x):
    x = jnp.asarray(x)
    out = jnp.tensordot(w, x.astype(jnp.float32), axes=1)
    return out.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) \
        else out
  return jax.tree.map(avg, stacked)


def majority_vote_merge(params_stacked: PyTree, masks_stacked: PyTree,
                        weights: Optional[jax.Array] = None,
                        threshold: Optional[int] = None) -> PyTree:
  """FedSparsify-Local aggregation (Eq. 2).

  The weighted mean over ALL K clients (zeros of clients that pruned an
  entry included), zeroed where fewer than ``threshold`` masks keep it.
  """
  return apply_masks(weighted_average(params_stacked, weights),
                     majority_vote(masks_stacked, threshold))


# --------------------------------------------------------------------------
# Sparsity metrics.
# --------------------------------------------------------------------------


def mask_of(tree: PyTree) -> PyTree:
  """The non-zero pattern of every leaf."""
  return jax.tree.map(lambda x: jnp.asarray(x) != 0, tree)


def nnz(tree: PyTree, filter_fn: Optional[FilterFn] = None) -> jax.Array:
  """Number of non-zero entries over the selected leaves (int32)."""
  sel = jax.tree.leaves(topk.selection(tree, filter_fn))
  counts = [jnp.sum(_bool(x), dtype=jnp.int32)
            for x, s in zip(jax.tree.leaves(tree), sel) if s]
  return sum(counts, jnp.int32(0))


def size(tree: PyTree, filter_fn: Optional[FilterFn] = None) -> int:
  """Number of entries over the selected leaves (a Python int)."""
  sel = jax.tree.leaves(topk.selection(tree, filter_fn))
  return sum(int(np.size(x)) for x, s in zip(jax.tree.leaves(tree), sel)
             if s)


def density(tree: PyTree, filter_fn: Optional[FilterFn] = None) -> jax.Array:
  """Global non-zero fraction over the selected leaves (float32)."""
  n = size(tree, filter_fn)
  if n == 0:
    return jnp.float32(jnp.nan)
  return nnz(tree, filter_fn).astype(jnp.float32) / jnp.float32(n)


def per_layer_density(tree: PyTree) -> PyTree:
  """Non-zero fraction of every leaf (float32 scalars)."""
  return jax.tree.map(lambda x: jnp.mean(_bool(x), dtype=jnp.float32), tree)


def layer_zero_fraction(w: jax.Array) -> jax.Array:
  """SparsyFed's layer sparsity s_l: the fraction of exact zeros in w."""
  return jnp.mean(jnp.asarray(w) == 0, dtype=jnp.float32)


def mask_iou(mask_a: PyTree, mask_b: PyTree) -> jax.Array:
  """Σ|a ∧ b| / Σ|a ∨ b| pooled over leaves; 1.0 if both are empty.

  Leaves may be bool masks or arrays (their non-zero pattern is used).
  """
  inter = jax.tree.leaves(jax.tree.map(
      lambda a, b: jnp.sum(_bool(a) & _bool(b), dtype=jnp.int32),
      mask_a, mask_b))
  union = jax.tree.leaves(jax.tree.map(
      lambda a, b: jnp.sum(_bool(a) | _bool(b), dtype=jnp.int32),
      mask_a, mask_b))
  i = sum(inter, jnp.int32(0)).astype(jnp.float32)
  u = sum(union, jnp.int32(0)).astype(jnp.float32)
  return jnp.where(u > 0, i / jnp.maximum(u, 1.0), jnp.float32(1.0))


def regrowth(global_tree: PyTree, client_tree: PyTree) -> jax.Array:
  """#{j : global[j] == 0 and client[j] != 0} over all leaves (int32)."""
  counts = jax.tree.leaves(jax.tree.map(
      lambda g, c: jnp.sum(~_bool(g) & _bool(c), dtype=jnp.int32),
      global_tree, client_tree))
  return sum(counts, jnp.int32(0))


def deactivation(global_tree: PyTree, client_tree: PyTree) -> jax.Array:
  """#{j : global[j] != 0 and client[j] == 0}: the reverse of regrowth."""
  return regrowth(client_tree, global_tree)


# --------------------------------------------------------------------------
# Packed masks.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedMask:
  """A bool mask stored as uint8 bits (8x smaller); ``shape`` is static."""
  bits: jax.Array
  shape: tuple


jax.tree_util.register_dataclass(
    PackedMask, data_fields=["bits"], meta_fields=["shape"])


def pack_masks(masks: PyTree) -> PyTree:
  """Packs every bool leaf into a ``PackedMask`` (big-endian bit order)."""
  return jax.tree.map(
      lambda m: PackedMask(jnp.packbits(_bool(m).ravel()), tuple(jnp.shape(m))),
      masks)


def unpack_masks(packed: PyTree) -> PyTree:
  """Inverse of ``pack_masks``."""
  def one(p: PackedMask) -> jax.Array:
    n = math.prod(p.shape)
    return jnp.unpackbits(p.bits, count=n).astype(jnp.bool_).reshape(p.shape)
  return jax.tree.map(one, packed,
                      is_leaf=lambda v: isinstance(v, PackedMask))
