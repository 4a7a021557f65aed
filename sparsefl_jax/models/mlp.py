"""Fully connected models: softmax regression, a tiny MLP, FedSparsify's FMNIST 2-FC."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sparsefl_jax.models.layers import Dense, LinearOp

Array = jnp.ndarray


def _flatten(x: Array) -> Array:
  return x.reshape((x.shape[0], -1))


class MLP(nn.Module):
  """Flatten, then Dense+ReLU hidden layers ``fc1..fcK`` and an output ``fc{K+1}``.

  ``conv_impl`` is accepted (and unused) so every model shares one constructor.
  ``example_mask`` is unused: there is no batch-statistic layer.
  """
  num_classes: int
  hidden: Sequence[int] = (128, 128)
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               example_mask: Optional[Array] = None) -> Array:
    del train, example_mask
    x = _flatten(x)
    for i, width in enumerate(self.hidden):
      x = nn.relu(Dense(width, op=self.op, name=f'fc{i + 1}')(x))
    return Dense(self.num_classes, op=self.op, name=f'fc{len(self.hidden) + 1}')(x)


class Linear(nn.Module):
  """Softmax regression: flatten + one Dense named ``fc`` (logits)."""
  num_classes: int
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               example_mask: Optional[Array] = None) -> Array:
    del train, example_mask
    return Dense(self.num_classes, op=self.op, name='fc')(_flatten(x))


def mlp_small(num_classes: int, **kw) -> MLP:
  """Tiny 1-hidden-layer (32) MLP for fast tests."""
  return MLP(num_classes, hidden=(32,), **kw)


def fmnist_fc(num_classes: int = 10, **kw) -> MLP:
  """FedSparsify FashionMNIST model 784-128-128-10 (118,282 params for 10 classes)."""
  return MLP(num_classes, hidden=(128, 128), **kw)
