"""``BlockSparseOp``: a ``LinearOp`` routing Dense and Conv layers through the kernel.

Per call the op takes the kernel's 2-D view W (Cin, Cout) or (kh*kw*Cin, Cout),
keeps the top ``density`` fraction of its (bk, bn) blocks by norm
(``sparsity.block``), and computes the layer as ``block_sparse_matmul`` of the
layer input (Dense) or its im2col patches (Conv, from the module's kernel size,
strides and padding; the conv's ``impl`` is not consulted because both impls
compute the same map) with W.

Backward variants:

* ``'swat'`` (SWAT, ZeroFL): dx = g @ (W * M).T through the kernel with the
  transposed block mask; dW = x~.T @ g DENSE, where x~ is the input (or its
  top-K if ``activation_density`` is set, SWAT's sparse saved activation), so
  pruned blocks keep receiving gradient and can regrow.
* ``'exact'``: the true gradient of x @ (W * M) with M held constant
  (dW masked).

The block mask is recomputed from the current kernel and treated as a constant
(the top-K selection is piecewise constant).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sparsefl_jax.kernels import block_sparse_matmul as bsmm
from sparsefl_jax.models import layers
from sparsefl_jax.sparsity import block as block_lib
from sparsefl_jax.sparsity import topk

Array = jax.Array
BACKWARDS = ('swat', 'exact')


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swat_matmul(x: Array, xs: Array, w: Array, block_mask: Array,
                 cfg: bsmm.KernelConfig) -> Array:
  """x @ (w * M) forward; SWAT backward (dense dW from ``xs``)."""
  del xs
  return bsmm.pallas_block_sparse_matmul(x, w, block_mask, cfg)


def _swat_fwd(x, xs, w, block_mask, cfg):
  y = bsmm.pallas_block_sparse_matmul(x, w, block_mask, cfg)
  return y, (xs, w, block_mask)


def _swat_bwd(cfg, res, g):
  xs, w, block_mask = res
  dx = bsmm.pallas_block_sparse_matmul(g, w.T, block_mask.T, cfg.transposed())
  dw = jnp.dot(xs.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx.astype(xs.dtype), jnp.zeros_like(xs), dw, None


_swat_matmul.defvjp(_swat_fwd, _swat_bwd)


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_patches(module: nn.Module, x: Array, kernel_hw: Tuple[int, int]) -> Array:
  """im2col patches (N, Ho, Wo, kh*kw*Cin) with the module's strides and padding."""
  strides = _pair(module.strides)
  padding = module.padding
  if not isinstance(padding, (str, int)):
    padding = tuple(_pair(p) for p in padding)
  pads = layers.conv_padding(padding, x.shape[1:3], kernel_hw, strides)
  return layers.im2col(x, kernel_hw, strides, pads)


@dataclasses.dataclass(frozen=True)
class BlockSparseOp:
  """Block top-K weights through the Pallas kernel (hashable flax attribute).

  Attributes:
    density: fraction of (bk, bn) weight blocks kept per layer (static).
    block_size: int or (bm, bk, bn) kernel tiles; (bk, bn) is the mask block.
    backward: 'swat' (dense weight gradient) or 'exact'.
    norm: block score, 'l2' or 'l1'.
    activation_density: SWAT's activation top-K for the weight gradient
      (over the whole input tensor, batch included); None keeps it dense.
    interpret / backend: passed to the kernel (see ``block_sparse_matmul``).
  """
  density: float
  block_size: Union[int, Tuple[int, int, int]] = 32
  backward: str = 'swat'
  norm: str = 'l2'
  activation_density: Optional[float] = None
  interpret: Optional[bool] = None
  backend: str = 'auto'

  def __post_init__(self):
    if self.backward not in BACKWARDS:
      raise ValueError(f'backward must be one of {BACKWARDS}; got {self.backward!r}')
    topk.check_fraction('density', self.density)
    if self.activation_density is not None:
      topk.check_fraction('activation_density', self.activation_density)

  def config(self) -> bsmm.KernelConfig:
    return bsmm.make_config(self.block_size, interpret=self.interpret,
                            backend=self.backend)

  def block_mask(self, kernel: Array) -> Array:
    """The (KB, NB) block top-K mask of the kernel's 2-D view (no gradient)."""
    cfg = self.config()
    w2d = lax.stop_gradient(block_lib.as_2d(kernel))
    return block_lib.block_topk_mask(w2d, self.density, (cfg.bk, cfg.bn), self.norm)

  def _sparse_act(self, module: nn.Module, x: Array) -> Array:
    if self.activation_density is None:
      return x
    from sparsefl_jax.sparsity import swat  # local: swat imports this module lazily
    return topk.apply_threshold(
        x, swat.activation_threshold(module, x, self.activation_density, 'top_k'))

  def _matmul(self, x2d: Array, xs2d: Array, w2d: Array, mask: Array) -> Array:
    cfg = self.config()
    if self.backward == 'exact':
      return bsmm.block_sparse_matmul(x2d, w2d, mask, block_size=(cfg.bm, cfg.bk, cfg.bn),
                                      interpret=cfg.interpret, backend=cfg.backend)
    return _swat_matmul(x2d, lax.stop_gradient(xs2d), w2d, mask, cfg)

  def __call__(self, module: nn.Module, contract: layers.Contract, x: Array,
               kernel: Array) -> Array:
    del contract
    w2d = block_lib.as_2d(kernel)
    mask = self.block_mask(kernel)
    xs = self._sparse_act(module, x)
    if isinstance(module, layers.Conv):
      kh, kw = kernel.shape[:2]
      patches = _conv_patches(module, x, (kh, kw))
      spatial = patches.shape[:-1]
      p2d = patches.reshape(-1, patches.shape[-1])
      ps2d = p2d if xs is x else _conv_patches(module, xs, (kh, kw)).reshape(p2d.shape)
      y = self._matmul(p2d, ps2d, w2d, mask)
      return y.reshape(spatial + (w2d.shape[1],))
    if isinstance(module, layers.Dense):
      lead = x.shape[:-1]
      x2d = x.reshape(-1, x.shape[-1])
      y = self._matmul(x2d, xs.reshape(x2d.shape), w2d, mask)
      return y.reshape(lead + (w2d.shape[1],))
    raise TypeError(f'BlockSparseOp supports layers.Dense and layers.Conv; got '
                    f'{type(module).__name__}')
