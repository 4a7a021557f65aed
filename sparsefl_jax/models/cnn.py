"""Plain CNNs: a tiny test CNN, the LEAF/FEMNIST CNN and FedSparsify's CIFAR-10 CNN."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from sparsefl_jax.models.layers import Conv, Dense, LinearOp, batch_norm, max_pool

Array = jnp.ndarray


class ConvPoolNet(nn.Module):
  """[conv(k, SAME)+ReLU -> 2x2 max-pool] per entry of ``convs``, then FC layers.

  Layers are ``conv1..convK``, ``fc1..fcM`` (the last FC gives the logits).
  Used for the small test CNN and the LEAF FEMNIST CNN (Caldas et al.).
  """
  num_classes: int
  convs: Sequence[int] = (16, 32)
  kernel_size: int = 3
  hidden: Sequence[int] = (128,)
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               example_mask: Optional[Array] = None) -> Array:
    del train, example_mask
    for i, c in enumerate(self.convs):
      x = Conv(c, self.kernel_size, padding='SAME', impl=self.conv_impl, op=self.op,
               name=f'conv{i + 1}')(x)
      x = max_pool(nn.relu(x))
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(Dense(width, op=self.op, name=f'fc{i + 1}')(x))
    return Dense(self.num_classes, op=self.op, name=f'fc{len(self.hidden) + 1}')(x)


def small_cnn(num_classes: int, **kw) -> ConvPoolNet:
  """conv3x3x16 -> pool -> conv3x3x32 -> pool -> FC128 -> FC out (213,630 params, 28x28x1, 62 cl.)."""
  return ConvPoolNet(num_classes, convs=(16, 32), kernel_size=3, hidden=(128,), **kw)


def leaf_cnn(num_classes: int = 62, **kw) -> ConvPoolNet:
  """LEAF FEMNIST CNN: conv5x5x32 -> pool -> conv5x5x64 -> pool -> FC2048 -> FC out.

  6,603,710 params for 28x28x1 input and 62 classes.
  """
  return ConvPoolNet(num_classes, convs=(32, 64), kernel_size=5, hidden=(2048,), **kw)


class CifarCNN(nn.Module):
  """FedSparsify CIFAR-10 6-conv CNN (1,609,930 trainable params + 384 BN statistics).

  conv1 64, conv2 64, pool, bn1, conv3 128, conv4 128, pool, bn2, conv5 128,
  conv6 128, pool, flatten, fc1 512 + ReLU, dropout 0.2, fc2 (logits). 3x3 SAME
  convs, each followed by ReLU.
  """
  num_classes: int = 10
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               example_mask: Optional[Array] = None) -> Array:
    stages: Tuple[Tuple[int, int, bool], ...] = ((64, 1, True), (128, 3, True), (128, 5, False))
    for width, first, with_bn in stages:
      for j in range(2):
        x = Conv(width, 3, padding='SAME', impl=self.conv_impl, op=self.op,
                 name=f'conv{first + j}')(x)
        x = nn.relu(x)
      x = max_pool(x)
      if with_bn:
        x = batch_norm(x, name=f'bn{(first + 1) // 2}', train=train,
                       example_mask=example_mask)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(Dense(512, op=self.op, name='fc1')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return Dense(self.num_classes, op=self.op, name='fc2')(x)
