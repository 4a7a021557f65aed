"""Weight layers with a single plug-in point for sparse training, plus pooling and BN.

Every weight layer (``Conv``, ``Dense``) computes its pre-bias output as

    y = (module.op or dense_op)(module, contract, x, kernel)

where ``contract(x, kernel)`` is the plain dense layer map from the layer INPUT
activation ``x`` to the pre-bias output. Sparse-training algorithms (SWAT's
custom VJP, SparsyFed's activation pruning, Powerprop, a Pallas block-sparse
kernel) wrap the layer by supplying an ``op``; models never change. The bias is
added outside the op so its gradient always uses the dense output gradient.

Convolution defaults to im2col (shifted strided slices concatenated on the
channel axis, then one ``dot_general``): on XLA:CPU a ``lax.conv`` backward inside
``lax.scan`` is 8-20x slower, and ``vmap`` over per-client kernels turns it into a
slow grouped conv. A matmul has neither problem (measured in BUILD.md,
"Convolution").

Initialisation uses flax's defaults (LeCun normal kernels, zero biases) unless a
``kernel_init``/``bias_init`` is given.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Array = jnp.ndarray
Initializer = Callable[..., Array]
Contract = Callable[[Array, Array], Array]
Padding = Union[str, int, Sequence[Tuple[int, int]]]

CONV_IMPLS = ('im2col', 'lax')
conv_impl = 'im2col'  # library-wide default convolution implementation


class LinearOp(Protocol):
  """Computes a weight layer's pre-bias output; the sparse-training plug-in point.

  Args:
    module: the calling ``Conv``/``Dense`` (bound), so the op can read or write
      flax variables (e.g. a cached threshold in a ``sparse_state`` collection)
      or decide by ``module.path``.
    contract: the dense layer map ``(x, kernel) -> pre-bias output``.
    x: the layer input activation (raw NHWC input for a conv, not the patches).
    kernel: the stored kernel parameter.

  Ops are flax attributes, so they must be hashable: a frozen dataclass
  instance or a module-level function.
  """

  def __call__(self, module: nn.Module, contract: Contract, x: Array,
               kernel: Array) -> Array:
    ...


def dense_op(module: nn.Module, contract: Contract, x: Array, kernel: Array) -> Array:
  """Default op: the ordinary dense layer."""
  del module
  return contract(x, kernel)


def _apply_op(module: nn.Module, op: Optional[LinearOp], contract: Contract,
              x: Array, kernel: Array) -> Array:
  return (op if op is not None else dense_op)(module, contract, x, kernel)


# ----------------------------------------------------------------------------- Dense


def dense_contract(x: Array, kernel: Array) -> Array:
  """``x @ kernel`` over the last axis of ``x``."""
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Dense(nn.Module):
  """Fully connected layer on the last axis; ``kernel`` (Cin, Cout), ``bias`` (Cout,)."""
  features: int
  use_bias: bool = True
  op: Optional[LinearOp] = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features),
                        jnp.float32)
    y = _apply_op(self, self.op, dense_contract, x, kernel)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return y


# ------------------------------------------------------------------------------ Conv


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f'expected an int or a pair, got {v!r}')
  return v  # type: ignore[return-value]


def conv_padding(padding: Padding, in_hw: Tuple[int, int], kernel_hw: Tuple[int, int],
                 strides: Tuple[int, int]) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """Explicit ((lo, hi), (lo, hi)) spatial padding, with XLA's SAME convention."""
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == 'VALID':
      return ((0, 0), (0, 0))
    if mode == 'SAME':
      pads = []
      for n, k, s in zip(in_hw, kernel_hw, strides):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)  # type: ignore[return-value]
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs; got {padding!r}")
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(_pair(p) for p in padding)
  if len(pads) != 2:
    raise ValueError(f'expected two (lo, hi) padding pairs, got {padding!r}')
  return pads  # type: ignore[return-value]


def im2col(x: Array, kernel_hw: Tuple[int, int], strides: Tuple[int, int],
           pads: Tuple[Tuple[int, int], Tuple[int, int]]) -> Array:
  """NHWC ``x`` -> patches (N, Ho, Wo, kh*kw*C), ordered (i, j, c) like an HWIO kernel.

  Built from kh*kw strided slices of the padded input; their gradients are pads
  and adds, which stay fast inside ``lax.scan`` on CPU.
  """
  kh, kw = kernel_hw
  sh, sw = strides
  if any(p != 0 for pair in pads for p in pair):
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  n, hp, wp, c = x.shape
  ho = (hp - kh) // sh + 1
  wo = (wp - kw) // sw + 1
  if ho <= 0 or wo <= 0:
    raise ValueError(f'kernel {kernel_hw} larger than padded input {(hp, wp)}')
  if (kh, kw) == (1, 1):
    return lax.slice(x, (0, 0, 0, 0), (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c),
                     (1, sh, sw, 1))
  cols = [
      lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]
  return jnp.concatenate(cols, axis=-1)


def conv_contract_im2col(x: Array, kernel: Array, strides: Tuple[int, int],
                         padding: Padding) -> Array:
  """Conv as patches @ kernel.reshape(kh*kw*Cin, Cout): one dot_general."""
  kh, kw, cin, cout = kernel.shape
  pads = conv_padding(padding, x.shape[1:3], (kh, kw), strides)
  patches = im2col(x, (kh, kw), strides, pads)
  return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout),
                         (((3,), (0,)), ((), ())))


def conv_contract_lax(x: Array, kernel: Array, strides: Tuple[int, int],
                      padding: Padding) -> Array:
  """Reference conv through ``lax.conv_general_dilated`` (NHWC, HWIO)."""
  pad = padding.upper() if isinstance(padding, str) else conv_padding(
      padding, x.shape[1:3], kernel.shape[:2], strides)
  return lax.conv_general_dilated(x, kernel, strides, pad,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def check_conv_impl(impl: str) -> str:
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}')
  return impl


class Conv(nn.Module):
  """2-D convolution on NHWC input; ``kernel`` (kh, kw, Cin, Cout), ``bias`` (Cout,).

  ``impl='im2col'`` (default, fast on CPU under scan/vmap) or ``'lax'``
  (``lax.conv_general_dilated``, for comparison). ``padding``: 'SAME', 'VALID',
  an int, or ((lo, hi), (lo, hi)).
  """
  features: int
  kernel_size: Union[int, Tuple[int, int]] = 3
  strides: Union[int, Tuple[int, int]] = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  impl: str = conv_impl
  op: Optional[LinearOp] = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim != 4:
      raise ValueError(f'Conv expects NHWC input, got shape {x.shape}')
    kh, kw = _pair(self.kernel_size)
    strides = _pair(self.strides)
    padding = self.padding
    if not isinstance(padding, (str, int)):
      padding = tuple(_pair(p) for p in padding)
    base = {'im2col': conv_contract_im2col,
            'lax': conv_contract_lax}[check_conv_impl(self.impl)]

    def contract(inp: Array, k: Array) -> Array:
      return base(inp, k, strides, padding)

    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32)
    y = _apply_op(self, self.op, contract, x, kernel)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32)
    return y


# --------------------------------------------------------------------------- Pooling


def max_pool(x: Array, window: int = 2, stride: int = 2) -> Array:
  """Max pooling over the two spatial axes of (..., H, W, C), VALID padding.

  The common 2x2/stride-2 case is a reshape + max, whose gradient is a cheap
  elementwise select (``nn.max_pool``'s is a select-and-scatter). At ties the
  reshape gradient is shared among the tied inputs, unlike ``nn.max_pool``'s.
  """
  if window == stride:
    h, w = x.shape[-3], x.shape[-2]
    ho, wo = h // window, w // window
    lead = x.shape[:-3]
    x = x[..., :ho * window, :wo * window, :]
    x = x.reshape(lead + (ho, window, wo, window, x.shape[-1]))
    nd = len(lead)
    return jnp.max(x, axis=(nd + 1, nd + 3))
  return nn.max_pool(x, (window, window), (stride, stride), padding='VALID')


# ------------------------------------------------------------------------- BatchNorm


def batch_norm(x: Array, *, name: str, train: bool,
               example_mask: Optional[Array] = None) -> Array:
  """``nn.BatchNorm`` (momentum 0.9) whose batch statistics skip padded examples.

  Must be called inside a compact method. ``example_mask`` (N,) marks real
  examples; it is broadcast over the non-batch axes and passed as flax's
  ``mask``, so statistics are means over the real examples only (masked rows
  are still normalised, with those statistics). If a batch has no real example
  the running statistics are left unchanged (flax would write NaN).
  """
  bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                    name=name)
  if example_mask is None or not train:
    return bn(x)
  m = jnp.asarray(example_mask).astype(bool)
  if m.shape != x.shape[:1]:
    raise ValueError(f'example_mask shape {m.shape} does not match batch {x.shape[:1]}')
  any_real = jnp.any(m)
  # All-padded batch: compute harmless statistics over every row, then restore the
  # running averages below, so neither outputs nor state become NaN.
  m = jnp.logical_or(m, jnp.logical_not(any_real))
  m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - 1)), x.shape)
  parent = bn.parent
  old = None
  if not parent.is_initializing():
    stats = parent.variables.get('batch_stats', {}).get(name)
    # Read the arrays now: the collection is a live view that bn() overwrites.
    old = None if stats is None else {k: stats[k] for k in ('mean', 'var')}
  y = bn(x, mask=m)
  if old is not None and bn.is_mutable_collection('batch_stats'):
    for key in ('mean', 'var'):
      new = bn.get_variable('batch_stats', key)
      bn.put_variable('batch_stats', key, jnp.where(any_real, new, old[key]))
  return y
