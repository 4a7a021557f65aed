"""CIFAR ResNet-18 (torchvision layout; 3x3 stride-1 stem, no max-pool)."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sparsefl_jax.models.layers import Conv, Dense, LinearOp, batch_norm

Array = jnp.ndarray


class BasicBlock(nn.Module):
  """conv1(3x3, stride) -> bn1 -> ReLU -> conv2 -> bn2, plus identity or
  ``shortcut`` (1x1 conv, stride) -> ``shortcut_bn``; ReLU after the sum."""
  features: int
  strides: int = 1
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None

  @nn.compact
  def __call__(self, x: Array, train: bool, example_mask: Optional[Array]) -> Array:
    def conv(feat: int, k: int, s: int, name: str) -> Conv:
      return Conv(feat, k, strides=s, padding=k // 2, use_bias=False,
                  impl=self.conv_impl, op=self.op, name=name)

    y = conv(self.features, 3, self.strides, 'conv1')(x)
    y = nn.relu(batch_norm(y, name='bn1', train=train, example_mask=example_mask))
    y = conv(self.features, 3, 1, 'conv2')(y)
    y = batch_norm(y, name='bn2', train=train, example_mask=example_mask)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, 'shortcut')(x)
      x = batch_norm(x, name='shortcut_bn', train=train, example_mask=example_mask)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet with BasicBlocks: ``stem``/``stem_bn``, ``layer{i}_{j}/...``, ``fc``.

  Conv layers have no bias (as in torchvision); BN everywhere; global average
  pool before ``fc``. [2, 2, 2, 2] gives ResNet-18: 11,173,962 params for 10
  classes (BN statistics not counted).
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               example_mask: Optional[Array] = None) -> Array:
    x = Conv(self.widths[0], 3, padding=1, use_bias=False, impl=self.conv_impl,
             op=self.op, name='stem')(x)
    x = nn.relu(batch_norm(x, name='stem_bn', train=train, example_mask=example_mask))
    for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(width, strides, conv_impl=self.conv_impl, op=self.op,
                       name=f'layer{i + 1}_{j}')(x, train, example_mask)
    x = jnp.mean(x, axis=(1, 2))
    return Dense(self.num_classes, op=self.op, name='fc')(x)


def resnet18(num_classes: int = 10, **kw) -> ResNet:
  return ResNet(num_classes, stage_sizes=(2, 2, 2, 2), **kw)
