"""VGG with BatchNorm for 32x32 inputs (FedSparsify's CIFAR-100 VGG-16)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from sparsefl_jax.models.layers import Conv, Dense, LinearOp, batch_norm, max_pool

Array = jnp.ndarray

VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
             512, 512, 512, 'M')


class VGG(nn.Module):
  """``conv{i}`` (3x3 SAME, bias) -> ``bn{i}`` -> ReLU per width, 'M' = 2x2 max-pool,
  then flatten and one ``fc`` to the logits.

  VGG-16 for 100 classes: 14,774,436 trainable params + 8,448 BN statistics
  (= 14,782,884, the number FedSparsify reports).
  """
  num_classes: int = 100
  cfg: Sequence[Union[int, str]] = VGG16_CFG
  conv_impl: str = 'im2col'
  op: Optional[LinearOp] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               example_mask: Optional[Array] = None) -> Array:
    i = 0
    for v in self.cfg:
      if v == 'M':
        x = max_pool(x)
        continue
      i += 1
      x = Conv(int(v), 3, padding='SAME', impl=self.conv_impl, op=self.op,
               name=f'conv{i}')(x)
      x = nn.relu(batch_norm(x, name=f'bn{i}', train=train, example_mask=example_mask))
    x = x.reshape((x.shape[0], -1))
    return Dense(self.num_classes, op=self.op, name='fc')(x)


def vgg16(num_classes: int = 100, **kw) -> VGG:
  return VGG(num_classes, cfg=VGG16_CFG, **kw)
