"""Block-structured magnitude top-K masks (``--sparsity_structure=block``).

A weight is viewed as a 2-D matrix (dense kernels as they are, conv kernels
(kh, kw, Cin, Cout) as (kh*kw*Cin, Cout), the im2col layout) and tiled into
(bk, bn) blocks; edge blocks that overhang the matrix are scored over their
existing entries only (zero padding). Each block gets a score (L2 or L1 norm of
its entries) and the top k = ceil(density * num_blocks) blocks are kept, with the
exact semantics of ``sparsity.topk``: threshold = k-th largest score, mask =
score >= threshold, so ties with the k-th score are all kept.

Block masks are (ceil(K/bk), ceil(N/bn)) bool arrays, the layout the Pallas
``block_sparse_matmul`` takes; ``expand_block_mask`` turns them into element
masks of the parameter shape for SWAT, SparsyFed's upload top-K or FedSparsify's
pruning.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk

Array = jax.Array
PyTree = Any
BlockShapeLike = Union[int, Sequence[int]]

NORMS = ('l2', 'l1')


def block_shape(block_size: BlockShapeLike) -> Tuple[int, int]:
  """An int ``b`` -> (b, b); a pair (bk, bn) unchanged; positive ints only."""
  if isinstance(block_size, (int, np.integer)):
    bs = (int(block_size), int(block_size))
  else:
    bs = tuple(int(b) for b in block_size)
    if len(bs) != 2:
      raise ValueError(f'block_size must be an int or (bk, bn); got {block_size!r}')
  if min(bs) < 1:
    raise ValueError(f'block sizes must be positive; got {bs}')
  return bs  # type: ignore[return-value]


def as_2d(w: Array) -> Array:
  """The matrix view of a kernel: (..., Cout) -> (prod(...), Cout)."""
  w = jnp.asarray(w)
  if w.ndim < 2:
    raise ValueError(f'need a kernel with ndim >= 2; got shape {w.shape}')
  return w.reshape(-1, w.shape[-1])


def grid_shape(shape2d: Tuple[int, int], block_size: BlockShapeLike) -> Tuple[int, int]:
  """Number of blocks (ceil(K/bk), ceil(N/bn)) covering a (K, N) matrix."""
  bk, bn = block_shape(block_size)
  return (-(-shape2d[0] // bk), -(-shape2d[1] // bn))


def block_scores(w2d: Array, block_size: BlockShapeLike, norm: str = 'l2') -> Array:
  """(KB, NB) float32 block norms of a 2-D matrix ('l2' or 'l1')."""
  if norm not in NORMS:
    raise ValueError(f'unknown norm {norm!r}; expected one of {NORMS}')
  w2d = jnp.asarray(w2d)
  if w2d.ndim != 2:
    raise ValueError(f'block_scores needs a 2-D matrix; got shape {w2d.shape}')
  bk, bn = block_shape(block_size)
  kb, nb = grid_shape(w2d.shape, (bk, bn))
  a = topk.abs32(w2d)
  a = jnp.pad(a, ((0, kb * bk - a.shape[0]), (0, nb * bn - a.shape[1])))
  a = a.reshape(kb, bk, nb, bn)
  if norm == 'l1':
    return jnp.sum(a, axis=(1, 3))
  return jnp.sqrt(jnp.sum(a * a, axis=(1, 3)))


def block_topk_mask(w2d: Array, density: Any, block_size: BlockShapeLike,
                    norm: str = 'l2', method: str = 'top_k') -> Array:
  """(KB, NB) bool: the top ceil(density * KB * NB) blocks by norm (ties kept).

  ``method`` is ``topk``'s: 'top_k' needs a static density, 'sort' and
  'bisection' accept a traced one.
  """
  return topk.topk_mask(block_scores(w2d, block_size, norm), density, method)


def expand_block_mask(block_mask: Array, block_size: BlockShapeLike,
                      shape: Sequence[int]) -> Array:
  """Block mask -> element mask of ``shape`` (a 2-D shape or a kernel shape).

  For a kernel shape with ndim > 2 the mask is built on the (prod(...), Cout)
  view and reshaped back.
  """
  shape = tuple(int(s) for s in shape)
  k2 = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
  bk, bn = block_shape(block_size)
  want = grid_shape((k2, shape[-1]), (bk, bn))
  m = jnp.asarray(block_mask) != 0
  if tuple(m.shape) != want:
    raise ValueError(f'block mask shape {tuple(m.shape)} does not tile {shape} with '
                     f'blocks {(bk, bn)}; expected {want}')
  full = jnp.repeat(jnp.repeat(m, bk, axis=0), bn, axis=1)[:k2, :shape[-1]]
  return full.reshape(shape)


# ------------------------------------------------------------------------ trees


def _densities_tree(tree: PyTree, densities: Any) -> PyTree:
  if topk.static_scalar(densities) is not None or (
      isinstance(densities, jax.Array) and densities.ndim == 0):
    return jax.tree.map(lambda _: densities, tree)
  return densities


def layerwise_block_masks(tree: PyTree, densities: Any, block_size: BlockShapeLike,
                          norm: str = 'l2', filter_fn: Optional[topk.FilterFn] = None,
                          method: str = 'top_k', expand: bool = True) -> PyTree:
  """Per-leaf block top-K masks for conv/dense kernels.

  Args:
    tree: parameter tree.
    densities: one density for every selected leaf, or a tree like ``tree``
      whose leaves are densities or ``None`` (dense).
    block_size: block edge or (bk, bn) on each kernel's 2-D view.
    norm: 'l2' or 'l1' block score.
    filter_fn: leaves to sparsify; default ``masks.weights_filter`` (kernels).
    method: ``topk`` method ('top_k' needs static densities).
    expand: True -> element masks of each leaf's shape (unselected: all True);
      False -> 2-D block masks (unselected leaves: ``None``).
  """
  filter_fn = masks_lib.weights_filter if filter_fn is None else filter_fn
  sel = topk.selection(tree, filter_fn)
  dens = _densities_tree(tree, densities)

  def one(d, x, s):
    if not s or d is None:
      return jnp.ones(jnp.shape(x), bool) if expand else None
    bm = block_topk_mask(as_2d(x), d, block_size, norm, method)
    return expand_block_mask(bm, block_size, jnp.shape(x)) if expand else bm

  return jax.tree.map(one, dens, tree, sel, is_leaf=lambda v: v is None)


def global_block_masks(tree: PyTree, density: Any, block_size: BlockShapeLike,
                       norm: str = 'l2', filter_fn: Optional[topk.FilterFn] = None,
                       method: str = 'top_k', expand: bool = True) -> PyTree:
  """One joint block top-K over all selected kernels (global pruning / upload top-K).

  k = ceil(density * total blocks); blocks of different layers compete on their
  raw norms. Unselected leaves: all-True element masks (or ``None`` if not
  ``expand``).
  """
  filter_fn = masks_lib.weights_filter if filter_fn is None else filter_fn
  topk.check_method(method)
  topk.check_fraction('density', density)
  sel = topk.selection(tree, filter_fn)
  leaves, treedef = jax.tree.flatten(tree)
  flags = jax.tree.leaves(sel)
  scores = [block_scores(as_2d(x), block_size, norm) if s else None
            for x, s in zip(leaves, flags)]
  chosen = [s for s in scores if s is not None]
  n = sum(int(s.size) for s in chosen)
  thr = topk.kth_largest(chosen, topk.num_to_keep(n, density), method)
  out = []
  for x, s in zip(leaves, scores):
    if s is None:
      out.append(jnp.ones(jnp.shape(x), bool) if expand else None)
      continue
    bm = s >= thr
    out.append(expand_block_mask(bm, block_size, jnp.shape(x)) if expand else bm)
  return jax.tree.unflatten(treedef, out)


def keep_masks(tree: PyTree, density: Any, *, structure: str, block_size: BlockShapeLike,
               per_layer: bool, method: str, elementwise: Callable[[], PyTree]) -> PyTree:
  """The one place a method's --sparsity_structure is decided.

  'block': whole block_size² blocks of the kernels by block L2 norm, one top-K over all
  kernels (or one per kernel with `per_layer`); biases and BatchNorm stay dense.
  'unstructured': `elementwise()`, the method's own element-wise rule (Top-K keeps
  ceil(d·N), FedSparsify prunes floor(s·N): the papers round differently).
  """
  if structure == 'block':
    fn = layerwise_block_masks if per_layer else global_block_masks
    return fn(tree, density, block_size, method=method)
  if structure != 'unstructured':
    raise ValueError(f"sparsity_structure={structure!r} is not one of "
                     "['unstructured', 'block']")
  return elementwise()
