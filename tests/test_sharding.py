"""Client-axis sharding, zero-weight padding and the streaming aggregate.

The multi-device checks run in a subprocess with 4 simulated CPU devices (the device count
is fixed when JAX starts, and this pytest process keeps 1 device).
"""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.algorithms import FedAdam, FedAvg, FedProx
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated import sharding
from sparsefl_jax.federated.optimizers import ClientLRSchedule, server_optimizer
from sparsefl_jax.federated.round import (RoundConfig, build_round_step, init_server_state,
                                          jit_round_step, streams_aggregate)
from sparsefl_jax.federated.state import ClientData
from sparsefl_jax.models.layers import batch_norm

P, M, D, C = 7, 11, 5, 3   # clients, padded length, features, classes
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BNSoftmax(nn.Module):
  """BatchNorm on the features, then softmax regression (exercises model_state)."""

  @nn.compact
  def __call__(self, x, train=False, example_mask=None):
    x = x.reshape(x.shape[0], -1)
    x = batch_norm(x, name="bn", train=train, example_mask=example_mask)
    return nn.Dense(C, name="fc")(x)


def _batch_fn(x, key, train):
  del key, train
  return x.astype(jnp.float32)


def make_data(seed: int = 0) -> ClientData:
  rng = np.random.default_rng(seed)
  counts = np.asarray([11, 9, 5, 11, 1, 7, 3], np.int32)
  x = rng.normal(size=(P, M, D)).astype(np.float32)
  y = rng.integers(0, C, size=(P, M)).astype(np.int32)
  return ClientData.from_arrays(x, y, counts)


def run_rounds(algorithm, client_map="vmap", chunk=2, k=5, num_devices=1, stream=True,
               server=None, rounds=2, data=None):
  """Runs `rounds` rounds; returns (final state, list of host metrics)."""
  cfg = RoundConfig(num_clients=P, clients_per_round=k,
                    local=client_lib.LocalConfig(2, 4, M), lr_schedule=ClientLRSchedule(0.1),
                    momentum=0.5, client_map=client_map, client_chunk_size=chunk,
                    num_devices=num_devices, stream_aggregate=stream)
  model = BNSoftmax()
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((2, D)))
  params, mstate = variables["params"], {"batch_stats": variables["batch_stats"]}
  state = init_server_state(algorithm, params, mstate, server, jax.random.PRNGKey(7))
  step = jit_round_step(build_round_step(algorithm, model, _batch_fn, cfg, server),
                        donate=False)
  data = data if data is not None else make_data()
  if num_devices > 1:
    mesh = sharding.client_mesh(num_devices)
    data, state = sharding.replicate(data, mesh), sharding.replicate(state, mesh)
  history = []
  for _ in range(rounds):
    state, metrics = step(state, data, jax.random.PRNGKey(3))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def assert_same(a, b, tol=1e-6):
  sa, ha = a
  sb, hb = b
  for x, y in zip(jax.tree.leaves((sa.params, sa.model_state, sa.opt_state)),
                  jax.tree.leaves((sb.params, sb.model_state, sb.opt_state))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)
  for ma, mb in zip(ha, hb):
    assert set(ma) == set(mb)
    for key in ma:
      np.testing.assert_allclose(np.asarray(ma[key]), np.asarray(mb[key]), atol=tol, rtol=tol,
                                 err_msg=key)


def test_padded_count_and_pad_clients():
  assert [sharding.padded_count(k, 4) for k in (1, 4, 5, 8, 10)] == [4, 4, 8, 8, 12]
  ids, ns = sharding.pad_clients(jnp.array([3, 1, 2]), jnp.array([5, 6, 7]), 4)
  np.testing.assert_array_equal(ids, [3, 1, 2, 0])
  np.testing.assert_array_equal(ns, [5, 6, 7, 0])


def test_num_devices_beyond_device_count_is_rejected():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    sharding.client_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match="num_devices=0"):
    RoundConfig(num_clients=4, clients_per_round=2, local=client_lib.LocalConfig(1, 4, 8),
                lr_schedule=ClientLRSchedule(0.1), num_devices=0)


def test_streams_aggregate_predicate():
  assert streams_aggregate(FedAvg())
  assert streams_aggregate(FedProx())

  class Custom(FedAvg):
    def aggregate(self, global_params, uploads, weights, algo_state, t):
      return super().aggregate(global_params, uploads, weights, algo_state, t)

  assert not streams_aggregate(Custom())


@pytest.mark.parametrize("client_map,chunk", [("map", 1), ("chunked", 2), ("chunked", 3)])
def test_streaming_aggregate_equals_stacked(client_map, chunk):
  """Σ n_k·upload_k accumulated over chunks == weighted mean of stacked uploads."""
  streamed = run_rounds(FedAvg(), client_map, chunk, stream=True)
  stacked = run_rounds(FedAvg(), client_map, chunk, stream=False)
  assert_same(streamed, stacked)


def vote_method():
  """FedSparsify-Local: clients prune (rounds 1 and 2), the server merges by majority vote —
  an aggregate with counted statistics (votes) besides the weighted mean."""
  from sparsefl_jax.algorithms.fedsparsify import FedSparsifyLocal
  from sparsefl_jax.sparsity.schedules import PolynomialSchedule
  return FedSparsifyLocal(schedule=PolynomialSchedule(0.6, 2, start_round=0))


def test_fedsparsify_local_streams():
  assert streams_aggregate(vote_method())


@pytest.mark.parametrize("client_map,chunk", [("map", 1), ("chunked", 2)])
def test_streamed_majority_vote_equals_stacked_and_vmap(client_map, chunk):
  streamed = run_rounds(vote_method(), client_map, chunk, stream=True)
  assert_same(streamed, run_rounds(vote_method(), client_map, chunk, stream=False))
  assert_same(streamed, run_rounds(vote_method(), "vmap", chunk))
  density = [float(np.mean(np.asarray(x) != 0)) for x in
             jax.tree.leaves(streamed[0].params["fc"]["kernel"])]
  assert density[0] < 0.9   # the vote really pruned


def test_streaming_with_delta_uplink_and_server_optimizer():
  opt = server_optimizer("adam", 0.05, 0.0, 0.9, 0.99, 1e-3)
  streamed = run_rounds(FedAdam(), "chunked", 2, stream=True, server=opt)
  stacked = run_rounds(FedAdam(), "vmap", 2, stream=False, server=opt)
  assert_same(streamed, stacked)


_SUBPROCESS = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_sharding as t
    from sparsefl_jax.algorithms import FedAvg, FedAdam
    from sparsefl_jax.federated.optimizers import server_optimizer
    assert jax.device_count() == 4, jax.devices()
    out = {{}}
    cases = [("vmap", 2, 5, None), ("map", 1, 6, None), ("chunked", 2, 5, None),
             ("chunked", 2, 4, "adam"), ("vmap", 2, 1, None), ("map", 1, 5, "vote"),
             ("vmap", 2, 5, "vote")]
    for cm, chunk, k, server in cases:
      algo = {{None: FedAvg(), "adam": FedAdam(), "vote": t.vote_method()}}[server]
      name, server = type(algo).__name__, (None if server == "vote" else server)
      opt = server_optimizer("adam", 0.05, 0.0, 0.9, 0.99, 1e-3) if server else None
      ref = t.run_rounds(algo, cm, chunk, k=k, num_devices=1, server=opt)
      diffs = {{}}
      for d in (2, 4):
        got = t.run_rounds(algo, cm, chunk, k=k, num_devices=d, server=opt)
        t.assert_same(ref, got)
        diffs[d] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                       zip(jax.tree.leaves(ref[0].params), jax.tree.leaves(got[0].params)))
        assert got[1][0]["uplink_bytes_per_client"].shape == (k,)
      out[f"{{name}}/{{cm}}/{{chunk}}/k={{k}}/{{server}}"] = diffs
    print("RESULT " + json.dumps(out))
""")


def test_sharded_round_matches_single_device_in_subprocess():
  """1 vs 2 vs 4 simulated devices, K not divisible by the device count (dummy padding)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  script = _SUBPROCESS.format(tests=os.path.join(REPO, "tests"))
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  diffs = json.loads(line[len("RESULT "):])
  assert len(diffs) == 7
  for case, per_d in diffs.items():
    for d, diff in per_d.items():
      assert diff < 1e-6, (case, d, diff)
