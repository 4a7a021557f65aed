"""The jitted round against independent references (numpy FedAvg, optax by hand, ...)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsefl_jax.algorithms import FedAdam, FedAvg, FedProx
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated.optimizers import ClientLRSchedule, server_optimizer
from sparsefl_jax.federated.round import (RoundConfig, build_round_step, init_server_state,
                                          jit_round_step)
from sparsefl_jax.federated.sampling import sample_clients
from sparsefl_jax.federated.state import ClientData

P, M, D, C = 6, 13, 5, 3   # clients, padded length, features, classes


class Softmax(nn.Module):
  """Softmax regression; accepts the engine's model keywords."""

  @nn.compact
  def __call__(self, x, train=False, example_mask=None):
    del train, example_mask
    return nn.Dense(C, name="fc")(x.reshape(x.shape[0], -1))


def batch_fn(x, key, train):
  del key, train
  return x.astype(jnp.float32)


def make_data(seed=0, counts=(13, 9, 5, 13, 1, 7)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(P, M, D)).astype(np.float32)
  y = rng.integers(0, C, size=(P, M)).astype(np.int32)
  counts = np.asarray(counts, np.int32)
  for p in range(P):
    x[p, counts[p]:] = 0.0
    y[p, counts[p]:] = 0
  return ClientData.from_arrays(x, y, counts)


def init_params(seed=1):
  return Softmax().init(jax.random.PRNGKey(seed), jnp.zeros((1, D)))["params"]


def make_round(algorithm, k=3, epochs=2, batch=4, lr=0.1, momentum=0.0, wd=0.0,
               client_map="vmap", chunk=2, server=None, max_examples=M,
               comm_encoding="dense"):
  cfg = RoundConfig(num_clients=P, clients_per_round=k,
                    local=client_lib.LocalConfig(epochs, batch, max_examples),
                    lr_schedule=ClientLRSchedule(lr), momentum=momentum, weight_decay=wd,
                    client_map=client_map, client_chunk_size=chunk,
                    comm_encoding=comm_encoding)
  step = jit_round_step(build_round_step(algorithm, Softmax(), batch_fn, cfg, server),
                        donate=False)
  state = init_server_state(algorithm, init_params(), {}, server, jax.random.PRNGKey(7))
  return step, state, cfg


def numpy_local_sgd(W, b, x, y, n, orders, epochs, batch, lr):
  """Plain numpy mini-batch SGD for softmax regression on the first n examples."""
  W, b = W.astype(np.float64).copy(), b.astype(np.float64).copy()
  for e in range(epochs):
    order = orders[e][:n]
    for start in range(0, n, batch):
      idx = order[start:start + batch]
      xb, yb = x[idx].astype(np.float64), y[idx]
      logits = xb @ W + b
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      p[np.arange(len(idx)), yb] -= 1.0
      g = p / len(idx)
      W -= lr * xb.T @ g
      b -= lr * g.sum(0)
  return W, b


def test_fedavg_matches_numpy_reference():
  data = make_data()
  step, state, cfg = make_round(FedAvg(), k=3, epochs=2, batch=4, lr=0.1)
  key = jax.random.PRNGKey(11)
  new_state, metrics = step(state, data, key)
  ids = np.asarray(metrics["clients"])
  W0 = np.asarray(state.params["fc"]["kernel"])
  b0 = np.asarray(state.params["fc"]["bias"])
  x, y, counts = map(np.asarray, data)
  round_key = jax.random.fold_in(key, 1)
  Ws, bs, ns = [], [], []
  for cid in ids:
    ckey = jax.random.fold_in(round_key, int(cid))
    order_key = jax.random.split(ckey, 3)[0]
    orders = np.asarray(client_lib.epoch_orders(order_key, jnp.int32(counts[cid]), cfg.local))
    W, b = numpy_local_sgd(W0, b0, x[cid], y[cid], counts[cid], orders, 2, 4, 0.1)
    Ws.append(W)
    bs.append(b)
    ns.append(counts[cid])
  w = np.asarray(ns, np.float64) / np.sum(ns)
  np.testing.assert_allclose(new_state.params["fc"]["kernel"],
                             np.tensordot(w, np.stack(Ws), 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.params["fc"]["bias"],
                             np.tensordot(w, np.stack(bs), 1), rtol=1e-5, atol=1e-6)
  assert int(new_state.round) == 1
  assert int(metrics["num_examples"]) == int(np.sum(ns))


def test_epoch_orders_visit_each_example_once_per_epoch():
  cfg = client_lib.LocalConfig(epochs=3, batch_size=4, max_examples=13)
  orders = np.asarray(client_lib.epoch_orders(jax.random.PRNGKey(0), jnp.int32(9), cfg))
  chex.assert_shape(orders, (3, 16))
  for e in range(3):
    assert sorted(orders[e, :9].tolist()) == list(range(9))
  assert not np.array_equal(orders[0, :9], orders[1, :9])


def test_padding_equals_unpadded_training():
  """A client's result does not depend on how far its data is padded."""
  data = make_data()
  n = 5
  x, y = np.asarray(data.x)[2:3, :n], np.asarray(data.y)[2:3, :n]
  small = ClientData.from_arrays(x, y, np.array([n], np.int32))
  padded = ClientData.from_arrays(np.concatenate([x, np.zeros((1, 11, D), np.float32)], 1),
                                  np.concatenate([y, np.zeros((1, 11), np.int32)], 1),
                                  np.array([n], np.int32))
  results = []
  for d in (small, padded):
    cfg = RoundConfig(num_clients=1, clients_per_round=1,
                      local=client_lib.LocalConfig(3, 2, d.max_examples),
                      lr_schedule=ClientLRSchedule(0.1), momentum=0.9)
    step = jax.jit(build_round_step(FedAvg(), Softmax(), batch_fn, cfg, None))
    state = init_server_state(FedAvg(), init_params(), {}, None, jax.random.PRNGKey(0))
    results.append(step(state, d, jax.random.PRNGKey(5)))
  (s1, m1), (s2, m2) = results
  chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m1["train_loss"], m2["train_loss"], rtol=1e-6)


@pytest.mark.parametrize("client_map", ["map", "chunked"])
def test_client_maps_agree_with_vmap(client_map):
  data = make_data()
  key = jax.random.PRNGKey(3)
  step_v, state, _ = make_round(FedAvg(), k=5, momentum=0.5, client_map="vmap")
  step_o, _, _ = make_round(FedAvg(), k=5, momentum=0.5, client_map=client_map, chunk=2)
  sv, mv = step_v(state, data, key)
  so, mo = step_o(state, data, key)
  chex.assert_trees_all_close(sv.params, so.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mv["clients"], mo["clients"])
  np.testing.assert_allclose(mv["train_loss"], mo["train_loss"], rtol=1e-5)


def test_fedprox_with_zero_mu_equals_fedavg():
  data = make_data()
  key = jax.random.PRNGKey(4)
  step_a, state, _ = make_round(FedAvg())
  step_p, _, _ = make_round(FedProx(mu=0.0))
  sa, _ = step_a(state, data, key)
  sp, _ = step_p(state, data, key)
  chex.assert_trees_all_close(sa.params, sp.params, rtol=1e-6, atol=1e-7)


def test_fedprox_pulls_towards_global_model():
  data = make_data()
  key = jax.random.PRNGKey(4)
  step_a, state, _ = make_round(FedAvg(), epochs=3)
  step_p, _, _ = make_round(FedProx(mu=5.0), epochs=3)
  sa, _ = step_a(state, data, key)
  sp, _ = step_p(state, data, key)
  dist = lambda s: float(jnp.linalg.norm(s.params["fc"]["kernel"] - state.params["fc"]["kernel"]))
  assert dist(sp) < 0.8 * dist(sa)


def test_fedadam_optax_impl_equals_optax_adam_applied_by_hand():
  """--server_opt_impl=optax: the bias-corrected optax.adam (Reddi's form: test_fedopt.py)."""
  data = make_data()
  key = jax.random.PRNGKey(5)
  adam = server_optimizer("adam", 0.05, b1=0.9, b2=0.99, eps=1e-3, impl="optax")
  step_adam, state_adam, _ = make_round(FedAdam(), server=adam)
  step_avg, state_avg, _ = make_round(FedAvg())
  # Two rounds, so the moments carry over; FedAvg from the same global model gives the aggregate.
  expected_params, opt_state = state_adam.params, optax.adam(0.05, 0.9, 0.99, 1e-3).init(
      state_adam.params)
  s = state_adam
  for _ in range(2):
    probe = state_avg._replace(params=s.params, round=s.round)
    aggregate = step_avg(probe, data, key)[0].params
    pseudo = jax.tree.map(jnp.subtract, expected_params, aggregate)
    updates, opt_state = optax.adam(0.05, 0.9, 0.99, 1e-3).update(pseudo, opt_state,
                                                                  expected_params)
    expected_params = optax.apply_updates(expected_params, updates)
    s, _ = step_adam(s, data, key)
    chex.assert_trees_all_close(s.params, expected_params, rtol=1e-5, atol=1e-6)


def test_server_sgd_lr1_equals_fedavg_replacement():
  data = make_data()
  key = jax.random.PRNGKey(6)
  step_a, state, _ = make_round(FedAvg())
  sgd = server_optimizer("sgd", 1.0)
  step_s, state_s, _ = make_round(FedAvg(), server=sgd)
  chex.assert_trees_all_close(step_a(state, data, key)[0].params,
                              step_s(state_s, data, key)[0].params, atol=1e-6)


def test_sampling_is_deterministic_distinct_and_round_dependent():
  key = jax.random.PRNGKey(0)
  a = np.asarray(sample_clients(key, jnp.int32(3), 100, 10))
  b = np.asarray(sample_clients(key, jnp.int32(3), 100, 10))
  c = np.asarray(sample_clients(key, jnp.int32(4), 100, 10))
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(sample_clients(key, jnp.int32(1), 5, 5), np.arange(5))
  with pytest.raises(ValueError, match="clients_per_round=6"):
    sample_clients(key, jnp.int32(1), 5, 6)


def test_exponential_lr_schedule_matches_formula():
  sched = ClientLRSchedule(0.1, "exponential", 0.01, total_rounds=700)
  for t in (0, 1, 350, 700):
    want = 0.1 * np.exp(t / 700 * np.log(0.01 / 0.1))
    np.testing.assert_allclose(float(sched(jnp.int32(t))), want, rtol=1e-6)
  assert float(ClientLRSchedule(0.3)(jnp.int32(9))) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="lr_end"):
    ClientLRSchedule(0.1, "exponential", None)


def test_round_metrics_and_dense_byte_counts():
  data = make_data()
  step, state, _ = make_round(FedAvg(), k=4)
  _, metrics = step(state, data, jax.random.PRNGKey(0))
  n_params = D * C + C
  np.testing.assert_array_equal(metrics["uplink_bytes_per_client"], [4 * n_params] * 4)
  assert int(metrics["downlink_bytes_per_client"]) == 4 * n_params
  assert 0.0 < float(metrics["global_density"]) <= 1.0
  assert np.isfinite(float(metrics["train_loss"]))


def test_bad_round_config_is_rejected():
  with pytest.raises(ValueError, match="clients_per_round=7"):
    RoundConfig(num_clients=6, clients_per_round=7, local=client_lib.LocalConfig(1, 4, 13),
                lr_schedule=ClientLRSchedule(0.1))
  with pytest.raises(ValueError, match="client_map='pmap'"):
    RoundConfig(num_clients=6, clients_per_round=2, local=client_lib.LocalConfig(1, 4, 13),
                lr_schedule=ClientLRSchedule(0.1), client_map="pmap")


def test_auto_client_map_picks_map_for_conv_models_on_cpu():
  from sparsefl_jax.federated.client_map import resolve_client_map
  conv = {"conv1": {"kernel": np.zeros((3, 3, 1, 4)), "bias": np.zeros(4)},
          "fc": {"kernel": np.zeros((8, 2))}}
  dense = {"fc": {"kernel": np.zeros((8, 2)), "bias": np.zeros(2)}}
  assert resolve_client_map("auto", conv, "cpu") == "map"
  assert resolve_client_map("auto", conv, "gpu") == "vmap"
  assert resolve_client_map("auto", dense, "cpu") == "vmap"
  for explicit in ("vmap", "map", "chunked"):
    assert resolve_client_map(explicit, conv, "cpu") == explicit
