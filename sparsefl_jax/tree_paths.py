"""Parameter-tree paths and weight layers: the one definition every module imports.

A leaf's path is its '/'-joined key path ('layer1_0/conv1/kernel'); a weight layer is named by
its module path ('layer1_0/conv1'), the path of its kernel without the last part. "Kernel"
means a conv or dense weight: a leaf named 'kernel' with ndim ≥ 2 (biases, BatchNorm scales
and statistics are not kernels). Sparse methods, Powerprop, the metrics and the uplink all
decide "is this a kernel" here, so they can never disagree about which tensors are sparse.
"""
from typing import Any, Dict, Iterator, Sequence, Tuple

import jax
import numpy as np

KERNEL = "kernel"


def path_str(key_path: Sequence[Any]) -> str:
  """Turns a `tree_flatten_with_path` key path into 'a/b/c'."""
  parts = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(str(key.name))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def is_kernel(path: str, leaf: Any) -> bool:
  """Whether the leaf at `path` is a conv/dense kernel: named 'kernel', ndim ≥ 2.

  A `filter_fn(path, leaf)` for the sparsity primitives (works on arrays, tracers and
  `jax.ShapeDtypeStruct`s).
  """
  return path.rsplit("/", 1)[-1] == KERNEL and np.ndim(leaf) >= 2


def kernel_layer(path: str) -> str:
  """The module path of the kernel at `path` ('a/b/kernel' → 'a/b')."""
  return path.rsplit("/", 1)[0] if "/" in path else ""


def kernels(params: Any) -> Iterator[Tuple[str, Any]]:
  """(module path, kernel) of every kernel of `params`, in parameter (name) order."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = path_str(key_path)
    if is_kernel(path, leaf):
      yield kernel_layer(path), leaf


def layer_kernel(params: Any, layer: str) -> jax.Array:
  """The kernel of the weight layer at module path `layer` ('layer1_0/conv1')."""
  node = params
  for p in layer.split("/"):
    node = node[p]
  return node[KERNEL]


def module_path(module: Any) -> str:
  """'layer1_0/conv1' for a flax module bound at that path."""
  return "/".join(str(p) for p in module.path)


def weight_layers(params: Any, order: Sequence[str] = ()) -> Dict[str, Tuple[int, ...]]:
  """{module path: kernel shape} of every weight layer, in call order when `order` (from
  `models.introspect.weight_layer_order`) is given, else in parameter (name) order."""
  found = {layer: tuple(np.shape(leaf)) for layer, leaf in kernels(params)}
  if not order:
    return found
  missing = [p for p in found if p not in order]
  if missing:
    raise ValueError(f"layer order {list(order)} lacks weight layers {missing}")
  return {p: found[p] for p in order if p in found}


def nest_by_layer(values: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """{'layer1_0/conv1': {'beta': b}} -> {'layer1_0': {'conv1': {'beta': b}}}: per-layer
  variables in the nested form a flax collection takes (each module reads its own node)."""
  out: Dict[str, Any] = {}
  for layer, leaves in values.items():
    node = out
    for part in layer.split("/"):
      node = node.setdefault(part, {})
    node.update(leaves)
  return out
