"""Per-layer sparsity distributions (run once at set-up, plain Python).

Each function returns a tree with the structure of ``tree`` holding a Python
float sparsity for every selected leaf and ``None`` for leaves the filter
leaves dense. ``to_densities`` turns that into the densities that
``topk.layerwise_topk_masks`` takes (``None`` stays ``None``: all-True).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np

from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk

PyTree = Any
_is_none = lambda v: v is None  # noqa: E731


def _check(sparsity: float) -> None:
  if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
    raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}.")


def uniform(tree: PyTree, sparsity: float,
            filter_fn: Optional[topk.FilterFn] = masks_lib.weights_filter
            ) -> PyTree:
  """The same sparsity for every selected leaf (SWAT-U, ZeroFL)."""
  _check(sparsity)
  return jax.tree.map(lambda s: float(sparsity) if s else None,
                      topk.selection(tree, filter_fn))


def erk(tree: PyTree, sparsity: float,
        filter_fn: Optional[topk.FilterFn] = masks_lib.weights_filter,
        power_scale: float = 1.0) -> PyTree:
  """Erdős–Rényi-Kernel sparsities (RigL, SWAT-ERK).

  Layer l gets density eps * p_l with raw density
  p_l = (Σ dims / Π dims) ** power_scale and one eps chosen so that the
  selected leaves hold (1 - sparsity) * N_selected non-zeros in total.
  Layers with eps * p_l > 1 are made dense (sparsity 0.0) and eps is
  solved again on the rest until no layer exceeds density 1.
  """
  _check(sparsity)
  sel = topk.selection(tree, filter_fn)
  leaves, treedef = jax.tree.flatten(tree)
  chosen = [i for i, s in enumerate(jax.tree.leaves(sel)) if s]
  sizes = {i: int(np.size(leaves[i])) for i in chosen}
  raw = {}
  for i in chosen:
    shape = np.shape(leaves[i])
    raw[i] = (sum(shape) / math.prod(shape)) ** power_scale if shape else 1.0
  budget = (1.0 - sparsity) * sum(sizes.values())
  dense: set = set()
  eps = 0.0
  while True:
    rest = [i for i in chosen if i not in dense]
    divisor = sum(raw[i] * sizes[i] for i in rest)
    if not rest or divisor == 0:
      break
    eps = (budget - sum(sizes[i] for i in dense)) / divisor
    over = [i for i in rest if eps * raw[i] > 1.0]
    if not over:
      break
    dense.update(over)
  out = [None] * len(leaves)
  for i in chosen:
    out[i] = 0.0 if i in dense else float(
        min(max(1.0 - eps * raw[i], 0.0), 1.0))
  return jax.tree.unflatten(treedef, out)


def to_densities(sparsities: PyTree) -> PyTree:
  """1 - s for every float leaf; ``None`` (dense) leaves stay ``None``."""
  return jax.tree.map(lambda s: None if s is None else 1.0 - s, sparsities,
                      is_leaf=_is_none)
