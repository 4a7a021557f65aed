"""The benchmark's Python-loop baselines compute the same round as the engine."""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench  # noqa: E402  (experiments/bench.py)


@pytest.fixture(scope="module")
def setup():
  if not bench.FLAGS.is_parsed():
    bench.FLAGS(["bench"])
  bench.COMPILES = bench.Compiles()
  wl = bench.Workload("T", "fmnist_fc", 10, (28, 28, 1), num_clients=6, clients_per_round=3,
                      examples=40, epochs=2, batch=16)
  return bench.build_setup(wl, "fedavg")


@pytest.mark.parametrize("loop", sorted(bench.LOOPS))
def test_loop_baseline_matches_engine(setup, loop):
  """Same sampled clients, batches (incl. the partial last one), keys and aggregation."""
  key = jax.random.PRNGKey(4)
  step = bench.round_lib.jit_round_step(bench.round_lib.build_round_step(
      setup.algorithm, setup.model, setup.batch_fn, bench.round_config(setup, 3, "vmap"), None),
      donate=False)
  engine, _ = step(setup.state, setup.data, key)
  looped = bench.LOOPS[loop](setup, 3)(setup.state, setup.data, key)
  assert int(looped.round) == int(engine.round) == 1
  moved = False
  for a, b, g in zip(jax.tree.leaves(looped.params), jax.tree.leaves(engine.params),
                     jax.tree.leaves(setup.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved |= not np.allclose(a, g)
  assert moved


def test_step_flops_counts_one_local_step(setup):
  """784-128-128-10 MLP, batch 16: the matmuls are forward + weight gradients of all three
  layers + input gradients of the last two (the image needs none): 2·16·(2·Σ in·out + 128·128
  + 128·10) FLOPs; XLA adds a few % of elementwise work (ReLU, softmax, SGD update)."""
  macs = 784 * 128 + 128 * 128 + 128 * 10
  matmuls = 2 * 16 * (2 * macs + 128 * 128 + 128 * 10)
  assert matmuls <= bench.step_flops(setup) < 1.1 * matmuls
