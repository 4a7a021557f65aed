"""Model zoo: registry of flax.linen models whose weight layers share one plug-in op.

Every model is ``model(x, train=False, example_mask=None) -> logits`` with
attributes ``conv_impl`` ('im2col' | 'lax') and ``op`` (a ``LinearOp`` passed to
every Conv/Dense). Weight layers have stable names (``conv1``, ``fc2``,
``layer1_0/conv1``...) because algorithms select layers by path.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from sparsefl_jax.models import cnn, mlp, resnet, vgg
from sparsefl_jax.models.layers import (CONV_IMPLS, Conv, Dense, LinearOp, batch_norm,
                                        check_conv_impl, dense_op, im2col, max_pool)

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    'linear': mlp.Linear,
    'mlp_small': mlp.mlp_small,
    'fmnist_fc': mlp.fmnist_fc,
    'small_cnn': cnn.small_cnn,
    'leaf_cnn': cnn.leaf_cnn,
    'cifar_cnn': cnn.CifarCNN,
    'resnet18': resnet.resnet18,
    'vgg16': vgg.vgg16,
}
MODELS: Tuple[str, ...] = tuple(_BUILDERS)

_INPUT_SHAPES: Dict[str, Tuple[int, ...]] = {
    'linear': (28, 28, 1),
    'mlp_small': (28, 28, 1),
    'fmnist_fc': (28, 28, 1),
    'small_cnn': (28, 28, 1),
    'leaf_cnn': (28, 28, 1),
    'cifar_cnn': (32, 32, 3),
    'resnet18': (32, 32, 3),
    'vgg16': (32, 32, 3),
}


def _check_name(name: str) -> str:
  if name not in _BUILDERS:
    raise ValueError(f'unknown model {name!r}; expected one of {MODELS}')
  return name


def get_model(name: str, num_classes: int, *, conv_impl: str = 'im2col',
              op: Optional[LinearOp] = None) -> nn.Module:
  """Builds model ``name`` with ``num_classes`` logits; ``op`` wraps every weight layer."""
  _check_name(name)
  check_conv_impl(conv_impl)
  return _BUILDERS[name](num_classes, conv_impl=conv_impl, op=op)


def input_shape_for(name: str) -> Tuple[int, ...]:
  """Default per-example input shape (H, W, C) for ``name`` (no batch axis)."""
  return _INPUT_SHAPES[_check_name(name)]


def count_params(tree: Any) -> int:
  """Total number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct``s."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))


__all__ = [
    'MODELS', 'CONV_IMPLS', 'Conv', 'Dense', 'LinearOp', 'batch_norm', 'count_params',
    'dense_op', 'get_model', 'im2col', 'input_shape_for', 'max_pool',
]
