"""Pallas block-sparse matmul: ``x @ (w * expand(block_mask))`` skipping zero blocks.

Design (the "non-zero list" kernel). For every output column block ``j`` the
wrapper builds, inside jit, the ascending list of K-blocks ``k`` with
``block_mask[k, j]`` set, padded to a static length ``T`` by repeating its last
entry, plus the count ``cnt[j]``. Only those blocks are ever read or multiplied,
so work and weight traffic scale with the number of non-zero blocks. The lists
come from a stable ``argsort`` of the mask, so they work with traced masks, under
``jit`` and under ``vmap`` (per-client masks).

Two lowerings of the same idea:

* ``backend='tpu'`` (Mosaic): grid ``(M/bm, N/bn, T)`` with
  ``pltpu.PrefetchScalarGridSpec``; the lists live in SMEM and the ``index_map``
  of ``x`` and ``w`` gathers block ``idx[j, t]``, so the pipeline DMAs only
  non-zero blocks (a repeated index is not re-fetched). Accumulation in a VMEM
  f32 scratch, guarded by ``pl.when(t < cnt[j])``.
* ``backend='gpu'`` (Triton): scalar prefetch is TPU-only, so the grid is
  ``(M/bm, N/bn)``; each program receives its row panel of ``x``, its column
  panel of ``w`` and its list, and runs a ``fori_loop`` over the ``cnt[j]``
  non-zero blocks, loading ``bk``-wide slices with ``pl.ds``.

Both run with ``interpret=True`` on any backend (the default on CPU), which is
how the tests check them. Shapes that are not multiples of the block size are
zero-padded inside the wrapper (and the result cropped); the block mask must
have shape ``(ceil(K/bk), ceil(N/bn))``. Accumulation is float32.

The public op is a ``jax.custom_vjp`` (``pallas_call`` has no JVP rule):
``dx = bsmm(g, w.T, block_mask.T)`` with the same kernel family and
``dw = (x.T @ g) * expand(block_mask)`` densely in XLA.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array
BlockSizeLike = Union[int, Sequence[int]]

BACKENDS = ('auto', 'tpu', 'gpu')


# ------------------------------------------------------------------- configuration


def normalize_block_size(block_size: BlockSizeLike) -> Tuple[int, int, int]:
  """An int ``b`` or a triple ``(bm, bk, bn)`` -> ``(bm, bk, bn)`` of positive ints."""
  if isinstance(block_size, (int, np.integer)):
    bs = (int(block_size),) * 3
  else:
    bs = tuple(int(b) for b in block_size)
    if len(bs) != 3:
      raise ValueError(f'block_size must be an int or (bm, bk, bn); got {block_size!r}')
  if any(b < 1 for b in bs):
    raise ValueError(f'block sizes must be positive; got {bs}')
  return bs  # type: ignore[return-value]


def resolve_backend(backend: str) -> str:
  """'auto' -> 'gpu' on a GPU default backend, otherwise 'tpu' (also used on CPU)."""
  if backend not in BACKENDS:
    raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS}')
  if backend != 'auto':
    return backend
  return 'gpu' if jax.default_backend() == 'gpu' else 'tpu'


def resolve_interpret(interpret: Any) -> Any:
  """``None`` -> interpret exactly when the default JAX backend is the CPU."""
  if interpret is None:
    return jax.default_backend() == 'cpu'
  return interpret


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static (hashable) kernel parameters; ``max_nonzero_blocks=None`` means ``K/bk``."""
  bm: int
  bk: int
  bn: int
  max_nonzero_blocks: Optional[int] = None
  interpret: Any = True
  backend: str = 'tpu'

  def transposed(self) -> 'KernelConfig':
    """Config for ``g @ w.T`` (block mask transposed): bk and bn swap, full lists."""
    return dataclasses.replace(self, bk=self.bn, bn=self.bk, max_nonzero_blocks=None)


def make_config(block_size: BlockSizeLike = 128, *,
                max_nonzero_blocks: Optional[int] = None, interpret: Any = None,
                backend: str = 'auto') -> KernelConfig:
  """Resolves defaults into a ``KernelConfig`` and checks compiled-mode constraints."""
  bm, bk, bn = normalize_block_size(block_size)
  cfg = KernelConfig(bm, bk, bn, max_nonzero_blocks, resolve_interpret(interpret),
                     resolve_backend(backend))
  if max_nonzero_blocks is not None and max_nonzero_blocks < 1:
    raise ValueError(f'max_nonzero_blocks must be >= 1; got {max_nonzero_blocks}')
  if not cfg.interpret:
    _check_compiled_blocks(cfg)
  return cfg


def _is_pow2(v: int) -> bool:
  return v > 0 and (v & (v - 1)) == 0


def _check_compiled_blocks(cfg: KernelConfig) -> None:
  """Block-shape rules of the real lowerings (skipped in interpret mode)."""
  if cfg.backend == 'tpu':
    # x block (bm, bk) and w block (bk, bn): second-minor % 8, minor % 128.
    if cfg.bm % 8 or cfg.bk % 128 or cfg.bn % 128:
      raise ValueError(
          'Mosaic (TPU) needs bm % 8 == 0 and bk, bn % 128 == 0; got '
          f'(bm, bk, bn) = {(cfg.bm, cfg.bk, cfg.bn)}')
  else:
    # Triton: power-of-two tiles, tl.dot needs every dim >= 16.
    if not all(_is_pow2(b) and b >= 16 for b in (cfg.bm, cfg.bk, cfg.bn)):
      raise ValueError(
          'Triton (GPU) needs power-of-two block sizes >= 16; got '
          f'(bm, bk, bn) = {(cfg.bm, cfg.bk, cfg.bn)}')


def _row_block(m: int, cfg: KernelConfig) -> int:
  """Shrinks bm for small M (e.g. a dense layer on a small batch), keeping its rules."""
  if cfg.backend == 'gpu':
    fit = max(16, int(pl.next_power_of_2(m)))
  else:
    fit = -(-m // 8) * 8
  return min(cfg.bm, fit)


# ---------------------------------------------------------------- non-zero lists


def nonzero_block_lists(block_mask: Array, max_nonzero_blocks: Optional[int] = None
                        ) -> Tuple[Array, Array]:
  """Per column block, the ascending non-zero K-block indices and their count.

  Args:
    block_mask: (KB, NB) bool (or numeric, non-zero = kept).
    max_nonzero_blocks: static list length T (default KB). Columns with more
      than T non-zero blocks keep only their first T: callers must pick T at
      least the largest column count.

  Returns:
    ``idx`` (NB, T) int32, padded by repeating the column's last non-zero index
    (0 for an empty column), and ``cnt`` (NB,) int32 = min(count, T).
  """
  m = jnp.asarray(block_mask) != 0
  kb = m.shape[0]
  t_len = kb if max_nonzero_blocks is None else min(int(max_nonzero_blocks), kb)
  t_len = max(t_len, 1)
  # Stable sort of "is zero" puts the non-zero rows first, in ascending order.
  order = jnp.argsort(jnp.logical_not(m), axis=0, stable=True).astype(jnp.int32)
  cnt = jnp.minimum(jnp.sum(m, axis=0, dtype=jnp.int32), t_len)
  last = jnp.take_along_axis(order, jnp.maximum(cnt - 1, 0)[None, :], axis=0)
  t = jnp.arange(t_len, dtype=jnp.int32)[:, None]
  idx = jnp.where(t < cnt[None, :], order[:t_len], last)
  return idx.T, cnt


def _check_max_nonzero(block_mask: Any, max_nonzero_blocks: Optional[int]) -> None:
  """Raises if a concrete mask has a column with more than T non-zero blocks."""
  if max_nonzero_blocks is None or isinstance(block_mask, jax.core.Tracer):
    return
  worst = int(np.max(np.sum(np.asarray(block_mask) != 0, axis=0), initial=0))
  if worst > max_nonzero_blocks:
    raise ValueError(f'block_mask has a column with {worst} non-zero blocks but '
                     f'max_nonzero_blocks={max_nonzero_blocks}')


# ----------------------------------------------------------------------- kernels


def _prefetch_kernel(idx_ref, cnt_ref, x_ref, w_ref, o_ref, acc_ref, *, t_len: int):
  """TPU-style step (i, j, t): acc += x[i, idx[j,t]] @ w[idx[j,t], j] if t < cnt[j]."""
  j = pl.program_id(1)
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(t < cnt_ref[j])
  def _accumulate():
    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

  @pl.when(t == t_len - 1)
  def _store():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _loop_kernel(meta_ref, x_ref, w_ref, o_ref, *, bk: int):
  """GPU-style program (i, j): loop over the cnt[j] non-zero K-blocks of column j.

  ``meta_ref`` (1, P) holds ``[cnt, idx_0, ..., idx_{T-1}, pad...]``.
  """
  cnt = meta_ref[0, 0]

  def body(t, acc):
    k = meta_ref[0, t + 1]
    start = pl.multiple_of(k * bk, bk)
    xb = x_ref[:, pl.ds(start, bk)]
    wb = w_ref[pl.ds(start, bk), :]
    return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)

  acc = jnp.zeros(o_ref.shape, jnp.float32)
  acc = lax.fori_loop(0, cnt, body, acc)
  o_ref[...] = acc.astype(o_ref.dtype)


def _pad_to(a: Array, shape: Tuple[int, ...]) -> Array:
  pads = [(0, s - d) for d, s in zip(a.shape, shape)]
  if all(p == (0, 0) for p in pads):
    return a
  return jnp.pad(a, pads)


def _call_tpu(x: Array, w: Array, idx: Array, cnt: Array, bm: int, cfg: KernelConfig,
              out_dtype) -> Array:
  mp, _ = x.shape
  _, np_ = w.shape
  nb, t_len = idx.shape
  flat = idx.reshape(-1)  # 1-D: SMEM pads 2-D arrays heavily.
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(mp // bm, nb, t_len),
      in_specs=[
          pl.BlockSpec((bm, cfg.bk), lambda i, j, t, ix, c: (i, ix[j * t_len + t])),
          pl.BlockSpec((cfg.bk, cfg.bn), lambda i, j, t, ix, c: (ix[j * t_len + t], j)),
      ],
      out_specs=pl.BlockSpec((bm, cfg.bn), lambda i, j, t, ix, c: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, cfg.bn), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_prefetch_kernel, t_len=t_len),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=cfg.interpret,
      name='block_sparse_matmul_tpu',
  )(flat, cnt, x, w)


def _call_gpu(x: Array, w: Array, idx: Array, cnt: Array, bm: int, cfg: KernelConfig,
              out_dtype) -> Array:
  mp, kp = x.shape
  _, np_ = w.shape
  nb, t_len = idx.shape
  width = int(pl.next_power_of_2(t_len + 1))
  meta = jnp.zeros((nb, width), jnp.int32)
  meta = meta.at[:, 0].set(cnt).at[:, 1:t_len + 1].set(idx)
  kwargs = {}
  if not cfg.interpret:
    from jax.experimental.pallas import triton as pltriton  # GPU-only import path
    kwargs['compiler_params'] = pltriton.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(
      functools.partial(_loop_kernel, bk=cfg.bk),
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, nb),
      in_specs=[
          pl.BlockSpec((1, width), lambda i, j: (j, 0)),
          pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((kp, cfg.bn), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, cfg.bn), lambda i, j: (i, j)),
      interpret=cfg.interpret,
      name='block_sparse_matmul_gpu',
      **kwargs,
  )(meta, x, w)


def _check_shapes(x: Array, w: Array, block_mask: Array, bk: int, bn: int) -> None:
  if x.ndim != 2 or w.ndim != 2:
    raise ValueError(f'expected 2-D x and w; got {x.shape} and {w.shape}')
  if x.shape[1] != w.shape[0]:
    raise ValueError(f'contraction mismatch: x {x.shape} @ w {w.shape}')
  want = (-(-w.shape[0] // bk), -(-w.shape[1] // bn))
  if tuple(block_mask.shape) != want:
    raise ValueError(f'block_mask shape {tuple(block_mask.shape)} != (ceil(K/bk), '
                     f'ceil(N/bn)) = {want} for w {w.shape}, (bk, bn) = {(bk, bn)}')


@functools.partial(jax.jit, static_argnames=('cfg',))
def pallas_block_sparse_matmul(x: Array, w: Array, block_mask: Array,
                               cfg: KernelConfig) -> Array:
  """The raw kernel call (no VJP): pads, builds the non-zero lists, runs, crops."""
  _check_shapes(x, w, block_mask, cfg.bk, cfg.bn)
  m, k = x.shape
  n = w.shape[1]
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  bm = _row_block(m, cfg)
  kb, nb = block_mask.shape
  k_blocks = kb
  if cfg.backend == 'gpu':
    k_blocks = int(pl.next_power_of_2(kb))  # Triton loads a power-of-two K panel
  mp = -(-m // bm) * bm
  xp = _pad_to(x, (mp, k_blocks * cfg.bk))
  wp = _pad_to(w, (k_blocks * cfg.bk, nb * cfg.bn))
  idx, cnt = nonzero_block_lists(block_mask, cfg.max_nonzero_blocks)
  call = _call_gpu if cfg.backend == 'gpu' else _call_tpu
  y = call(xp, wp, idx, cnt, bm, cfg, out_dtype)
  return y[:m, :n]


# ----------------------------------------------------------------- reference + op


def expand_mask(block_mask: Array, block_shape: Tuple[int, int],
                shape: Tuple[int, int]) -> Array:
  """(KB, NB) block mask -> (K, N) element mask (edge blocks cropped)."""
  bk, bn = block_shape
  m = jnp.asarray(block_mask) != 0
  full = jnp.repeat(jnp.repeat(m, bk, axis=0), bn, axis=1)
  return full[:shape[0], :shape[1]]


def block_sparse_matmul_reference(x: Array, w: Array, block_mask: Array,
                                  block_size: BlockSizeLike = 128) -> Array:
  """Plain-jnp ``x @ (w * expand(block_mask))`` with float32 accumulation."""
  _, bk, bn = normalize_block_size(block_size)
  _check_shapes(x, w, jnp.asarray(block_mask), bk, bn)
  wm = jnp.where(expand_mask(block_mask, (bk, bn), w.shape), w, jnp.zeros_like(w))
  y = jnp.dot(x, wm, preferred_element_type=jnp.float32)
  return y.astype(jnp.result_type(x.dtype, w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bsmm(x: Array, w: Array, block_mask: Array, cfg: KernelConfig) -> Array:
  return pallas_block_sparse_matmul(x, w, block_mask, cfg)


def _bsmm_fwd(x, w, block_mask, cfg):
  return pallas_block_sparse_matmul(x, w, block_mask, cfg), (x, w, block_mask)


def _bsmm_bwd(cfg, res, g):
  x, w, block_mask = res
  dx = pallas_block_sparse_matmul(g, w.T, block_mask.T, cfg.transposed()).astype(x.dtype)
  keep = expand_mask(block_mask, (cfg.bk, cfg.bn), w.shape)
  dw = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
  dw = jnp.where(keep, dw, 0.0).astype(w.dtype)
  return dx, dw, None


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


def block_sparse_matmul(x: Array, w: Array, block_mask: Array, *,
                        block_size: BlockSizeLike = 128,
                        max_nonzero_blocks: Optional[int] = None,
                        interpret: Any = None, backend: str = 'auto') -> Array:
  """``x @ (w * expand(block_mask))`` through the Pallas kernel, differentiable.

  Args:
    x: (M, K) activations.
    w: (K, N) weights.
    block_mask: (ceil(K/bk), ceil(N/bn)) bool; may be traced (built in jit/vmap).
    block_size: int or (bm, bk, bn). Non-multiples are zero-padded internally.
    max_nonzero_blocks: static cap T on non-zero K-blocks per column block
      (default: all K blocks, always correct). Fewer grid steps, but columns
      with more blocks are silently truncated under jit (checked when the mask
      is concrete).
    interpret: run the Pallas interpreter; default True on a CPU backend.
    backend: 'auto' | 'tpu' (scalar-prefetch kernel) | 'gpu' (loop kernel).

  Gradients: dx through the kernel with the transposed mask, dw dense masked.
  """
  cfg = make_config(block_size, max_nonzero_blocks=max_nonzero_blocks,
                    interpret=interpret, backend=backend)
  _check_max_nonzero(block_mask, max_nonzero_blocks)
  return _bsmm(x, w, jnp.asarray(block_mask), cfg)
