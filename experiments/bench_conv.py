"""Benchmark: im2col vs lax.conv for the LEAF FEMNIST CNN on XLA:CPU.

Times (median seconds, compile excluded):
  step    one client's jitted value_and_grad step (batch 32)
  scan8   8 SGD steps inside lax.scan, one client
  vmap10  the scanned 8 steps vmapped over 10 clients (per-client kernels)

The lax vmap10 case is ~2 minutes per call on 2 cores, so it only runs with
--all. Usage: python experiments/bench_conv.py [--repeats N] [--all]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp

from sparsefl_jax.models import count_params, get_model

BATCH, STEPS, CLIENTS, CLASSES, LR = 32, 8, 10, 62, 0.01


def _time(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm-up
  times: List[float] = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench(impl: str, repeats: int, with_vmap: bool) -> Dict[str, float]:
  model = get_model('leaf_cnn', CLASSES, conv_impl=impl)
  k = jax.random.split(jax.random.key(0), 4)
  xs = jax.random.normal(k[0], (CLIENTS, STEPS, BATCH, 28, 28, 1))
  ys = jax.random.randint(k[1], (CLIENTS, STEPS, BATCH), 0, CLASSES)
  params = jax.jit(model.init)(k[2], xs[0, 0])['params']

  def loss(p, x, y):
    logits = model.apply({'params': p}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  vg = jax.value_and_grad(loss)

  def local(p, x, y):
    def step(p, batch):
      l, g = vg(p, *batch)
      return jax.tree.map(lambda a, b: a - LR * b, p, g), l
    return jax.lax.scan(step, p, (x, y))

  step_fn = jax.jit(vg)
  scan_fn = jax.jit(local)
  out = {
      'step': _time(lambda: step_fn(params, xs[0, 0], ys[0, 0]), repeats),
      'scan8': _time(lambda: scan_fn(params, xs[0], ys[0]), repeats),
  }
  if with_vmap:
    stacked = jax.tree.map(lambda t: jnp.broadcast_to(t, (CLIENTS,) + t.shape), params)
    vmap_fn = jax.jit(jax.vmap(local))
    out['vmap10'] = _time(lambda: vmap_fn(stacked, xs, ys),
                          repeats if impl == 'im2col' else 1)
  out['params'] = count_params(params)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--all', action='store_true', help='also time the slow lax vmap10')
  args = ap.parse_args()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; LEAF CNN, batch {BATCH}, '
        f'{STEPS} steps, {CLIENTS} clients; median of {args.repeats}')
  rows = {'im2col': bench('im2col', args.repeats, True),
          'lax': bench('lax', args.repeats, args.all)}
  print(f"params: {rows['im2col']['params']:,}")
  print(f"{'impl':8s} {'step (s)':>10s} {'scan8 (s)':>10s} {'vmap10 (s)':>11s}")
  for impl, r in rows.items():
    v = f"{r['vmap10']:11.3f}" if 'vmap10' in r else f"{'skipped':>11s}"
    print(f"{impl:8s} {r['step']:10.3f} {r['scan8']:10.3f} {v}")


if __name__ == '__main__':
  main()
