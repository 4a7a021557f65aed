"""Benchmark the Pallas block-sparse matmul against XLA's dense masked matmul.

Shapes are the matmuls of real layers: ResNet-18's 3x3 convs as im2col matmuls
(M = batch*H*W, K = 9*Cin, N = Cout) and the LEAF FEMNIST CNN (conv2 and fc1
3136x2048). For each shape, density and block size it times

* ``kernel``: ``block_sparse_matmul`` (non-zero lists built inside the jitted
  call; the static list length T is the largest per-column block count),
* ``masked``: ``x @ (w * expand(mask))`` in XLA (what the simulator uses on CPU),
* ``dense``: ``x @ w``,

and prints a roofline-style table: useful FLOPs = 2*M*K*N*d (d = fraction of
blocks kept), an estimate of the bytes the kernel moves, their ratio
(arithmetic intensity), achieved TFLOP/s and, with ``--peak_tflops`` and
``--peak_gbps``, the roofline bound min(peak, AI * bandwidth).

On a CPU backend the kernel runs in Pallas INTERPRET mode: the script then
switches to tiny shapes, checks correctness only and says that its timings are
not performance numbers. On GPU/TPU it compiles the kernel and times it.

  python experiments/bench_kernels.py --json_out=runs/bench_kernels.json
  python experiments/bench_kernels.py --preset=resnet18 --batch=128 --dtype=bfloat16 \
      --peak_tflops=989 --peak_gbps=3350
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from sparsefl_jax.kernels import block_sparse_matmul as bsmm  # noqa: E402
from sparsefl_jax.sparsity import block as block_lib  # noqa: E402

Shape = Tuple[str, int, int, int]  # name, M, K, N


def preset_shapes(preset: str, batch: int) -> List[Shape]:
  """(name, M, K, N) of the layers in a preset."""
  resnet = [
      ('resnet18.layer1.conv3x3', batch * 32 * 32, 9 * 64, 64),
      ('resnet18.layer2.conv3x3', batch * 16 * 16, 9 * 128, 128),
      ('resnet18.layer3.conv3x3', batch * 8 * 8, 9 * 256, 256),
      ('resnet18.layer4.conv3x3', batch * 4 * 4, 9 * 512, 512),
  ]
  leaf = [
      ('leaf_cnn.conv2', batch * 14 * 14, 25 * 32, 64),
      ('leaf_cnn.fc1', batch, 3136, 2048),
  ]
  tiny = [  # interpret mode: shapes scaled down so grids stay small
      ('tiny.resnet18.layer3-like', 32, 9 * 32, 64),
      ('tiny.leaf_cnn.fc1-like', 16, 392, 128),
  ]
  return {'resnet18': resnet, 'leaf': leaf, 'all': resnet + leaf, 'tiny': tiny}[preset]


def time_fn(fn: Callable, args: Tuple, repeats: int) -> float:
  """Median wall time (ms) of a jitted call, after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def kernel_bytes(m: int, k: int, n: int, bm: int, bk: int, bn: int, cnt: np.ndarray,
                 itemsize: int) -> float:
  """Bytes the non-zero-list kernel reads/writes: per (row, column) tile its x and w blocks."""
  row_tiles = -(-m // bm)
  x_bytes = float(np.sum(cnt)) * row_tiles * bm * bk * itemsize
  w_bytes = float(np.sum(cnt)) * row_tiles * bk * bn * itemsize
  return x_bytes + w_bytes + m * n * itemsize


def bench_one(name: str, m: int, k: int, n: int, density: float, block: int,
              args: argparse.Namespace, interpret: bool) -> Optional[Dict[str, Any]]:
  dtype = jnp.dtype(args.dtype)
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(m, k), dtype)
  w = jnp.asarray(rng.randn(k, n), dtype)
  bm = min(args.block_m, block) if args.block_m else block
  mask = np.asarray(block_lib.block_topk_mask(w.astype(jnp.float32), density, block))
  cnt = mask.sum(axis=0)
  t_len = max(int(cnt.max(initial=0)), 1)
  kept = float(mask.mean())
  cfg = dict(block_size=(bm, block, block), max_nonzero_blocks=t_len,
             interpret=interpret, backend=args.backend)
  try:
    bsmm.make_config(**cfg)
  except ValueError as e:  # e.g. Mosaic needs bk, bn multiples of 128
    print(f'  skip {name} block={block}: {e}', file=sys.stderr)
    return None

  kernel = jax.jit(lambda x, w, m: bsmm.block_sparse_matmul(x, w, m, **cfg))
  masked = jax.jit(lambda x, w, m: jnp.dot(
      x, jnp.where(bsmm.expand_mask(m, (block, block), w.shape), w, 0),
      preferred_element_type=jnp.float32).astype(x.dtype))
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32
                                       ).astype(x.dtype))

  mask_j = jnp.asarray(mask)
  y = kernel(x, w, mask_j)
  ref = bsmm.block_sparse_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                           mask_j, (bm, block, block))
  denom = float(jnp.linalg.norm(ref)) or 1.0
  err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref)) / denom

  repeats = 1 if interpret else args.repeats
  t_kernel = time_fn(kernel, (x, w, mask_j), repeats)
  t_masked = time_fn(masked, (x, w, mask_j), repeats)
  t_dense = time_fn(dense, (x, w), repeats)

  flops = 2.0 * m * k * n * kept
  nbytes = kernel_bytes(m, k, n, bm, block, block, cnt, dtype.itemsize)
  ai = flops / nbytes
  row = dict(layer=name, M=m, K=k, N=n, density=density, blocks_kept=kept, block=block,
             bm=bm, T=t_len, dtype=str(dtype), rel_err=err, kernel_ms=t_kernel,
             masked_ms=t_masked, dense_ms=t_dense, speedup_vs_masked=t_masked / t_kernel,
             useful_flops=flops, kernel_bytes=nbytes, intensity=ai,
             kernel_tflops=flops / (t_kernel * 1e-3) / 1e12)
  if args.peak_tflops and args.peak_gbps:
    bound = min(args.peak_tflops * 1e12, ai * args.peak_gbps * 1e9)
    row['roofline_tflops'] = bound / 1e12
    row['roofline_frac'] = row['kernel_tflops'] * 1e12 / bound
  return row


def print_table(rows: List[Dict[str, Any]]) -> None:
  """Fixed-width table: (key, header, width, format spec)."""
  cols = [('layer', 'layer', 28, ''), ('M', 'M', 7, 'd'), ('K', 'K', 5, 'd'),
          ('N', 'N', 5, 'd'), ('density', 'dens', 5, '.2f'), ('block', 'blk', 4, 'd'),
          ('T', 'T', 3, 'd'), ('rel_err', 'rel_err', 8, '.1e'),
          ('kernel_ms', 'kernel_ms', 10, '.3f'), ('masked_ms', 'masked_ms', 10, '.3f'),
          ('dense_ms', 'dense_ms', 9, '.3f'), ('speedup_vs_masked', 'x_masked', 8, '.2f'),
          ('intensity', 'flop/B', 7, '.1f'), ('kernel_tflops', 'TFLOP/s', 8, '.3f')]
  if any('roofline_frac' in r for r in rows):
    cols.append(('roofline_frac', 'roofl%', 7, '.2f'))
  print(' '.join(h.ljust(w) if k == 'layer' else h.rjust(w) for k, h, w, _ in cols))
  for r in rows:
    cells = []
    for k, _, w, spec in cols:
      v = r.get(k, float('nan'))
      cells.append(f'{v:<{w}}' if k == 'layer' else f'{v:>{w}{spec}}')
    print(' '.join(cells))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--preset', default=None, choices=['resnet18', 'leaf', 'all', 'tiny'],
                 help="default: 'all' on GPU/TPU, 'tiny' on CPU (interpret mode)")
  p.add_argument('--batch', type=int, default=32, help='images per batch (sets M)')
  p.add_argument('--densities', default='1.0,0.5,0.2,0.1,0.05')
  p.add_argument('--block_sizes', default=None, help="default '32,64,128' ('32' on CPU)")
  p.add_argument('--block_m', type=int, default=0, help='row tile bm (0: = block)')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--backend', default='auto', choices=list(bsmm.BACKENDS))
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--peak_tflops', type=float, default=0.0)
  p.add_argument('--peak_gbps', type=float, default=0.0)
  p.add_argument('--json_out', default='')
  args = p.parse_args(argv)

  platform_name = jax.default_backend()
  interpret = platform_name == 'cpu'
  preset = args.preset or ('tiny' if interpret else 'all')
  blocks = [int(b) for b in (args.block_sizes or ('32' if interpret else '32,64,128')
                             ).split(',')]
  densities = [float(d) for d in args.densities.split(',')]
  if interpret:
    print('NOTE: CPU backend -> Pallas INTERPRET mode. This run checks correctness '
          'only; kernel timings are interpreter overhead, NOT performance numbers. '
          'Run on a GPU/TPU for real timings.')
  print(f'backend={platform_name} kernel={bsmm.resolve_backend(args.backend)} '
        f'devices={jax.devices()} preset={preset} dtype={args.dtype}')

  rows = []
  for name, m, k, n in preset_shapes(preset, args.batch):
    for block in blocks:
      for d in densities:
        row = bench_one(name, m, k, n, d, block, args, interpret)
        if row is not None:
          rows.append(row)
          print(f'  done {name} block={block} density={d}', file=sys.stderr)
  if not rows:
    raise SystemExit('no valid (shape, block) combination for this backend')
  print_table(rows)
  worst = max(r['rel_err'] for r in rows)
  tol = 2e-2 if args.dtype == 'bfloat16' else 1e-4
  print(f'max rel_err vs reference: {worst:.2e} ({"OK" if worst < tol else "FAILED"})')
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    meta = dict(jax=jax.__version__, backend=platform_name, interpret=interpret,
                devices=[str(dv) for dv in jax.devices()], host=platform.node(),
                preset=preset, timings_meaningful=not interpret)
    with open(args.json_out, 'w') as f:
      json.dump({'meta': meta, 'rows': rows}, f, indent=1)
    print(f'wrote {args.json_out}')


if __name__ == '__main__':
  main()
