"""Fidelity to the papers: padding never changes training, activation top-K over real rows,
byte accounting, ZeroFL's per-layer upload under ERK, BatchNorm statistics on the wire and
FedSparsify-Local's round-1 mask."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsefl_jax import algorithms
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.models.layers import Dense
from sparsefl_jax.sparsity import powerprop, swat, topk
from sparsefl_jax.train import assemble_model

C, D = 3, 12          # classes, features


def _batch_fn(x, key, train):
  del key, train
  return x.astype(jnp.float32)


def _local_result(name: str, epochs: int, period: int, max_examples: int, n: int = 37):
  """One client's local training (params and upload) with its n examples padded to M."""
  cfg = ExperimentConfig(algorithm=name, sparsity=0.7, topk_period=period, mask_ratio=0.1,
                         prune_start_round=0, workdir="/tmp/unused")
  alg = algorithms.get_algorithm(name, cfg)
  alg, model, params, mstate = assemble_model(alg, "mlp_small", C, jnp.zeros((1, D)),
                                              jax.random.PRNGKey(3))
  rng = np.random.default_rng(0)
  x = np.zeros((max_examples, D), np.float32)
  y = np.zeros((max_examples,), np.int32)
  x[:n] = rng.normal(size=(n, D))
  y[:n] = rng.integers(0, C, n)
  t = jnp.int32(2)
  ctx = alg.client_context(params, alg.init_state(params), t)
  local = client_lib.LocalConfig(epochs, 8, max_examples)
  res = client_lib.local_train(alg, model, _batch_fn, local, lambda: optax.sgd(0.05, 0.9),
                               params, mstate, ctx, jnp.asarray(x), jnp.asarray(y),
                               jnp.int32(n), jax.random.PRNGKey(5), t)
  upload = alg.client_upload(params, res.params, res.client_state, t)
  return res.params, upload.values, res.loss_sum


@pytest.mark.parametrize("name", algorithms.ALGORITHMS)
def test_training_is_invariant_to_the_padded_length(name):
  """Every method, topk_period 1 and 10, 1-3 epochs: a client trains the same whether its 37
  examples are padded to 37 (5 steps per epoch) or to 60 (8 steps per epoch)."""
  swat_like = name in ("swat", "zerofl")
  for epochs in ((1, 2, 3) if swat_like else (1, 3)):
    for period in ((1, 10) if swat_like else (1,)):   # the period only exists for SWAT
      short = _local_result(name, epochs, period, 37)
      long = _local_result(name, epochs, period, 60)
      chex.assert_trees_all_close(short, long, rtol=1e-6, atol=1e-7,
                                  custom_message=f"{name} epochs={epochs} period={period}")


class _OneDense(nn.Module):
  op: object = None

  @nn.compact
  def __call__(self, x):
    return Dense(4, op=self.op, name="fc1")(x)


@pytest.mark.parametrize("kind", ["swat", "powerprop"])
def test_partial_batch_gives_the_gradients_of_its_real_rows_alone(kind):
  """1 real row + 3 padding rows: the weight gradient equals the real row's alone (the
  padding is excluded from the activation top-K's ranking and from its k)."""
  rng = np.random.default_rng(1)
  x_real = rng.normal(size=(1, 16)).astype(np.float32)
  x_pad = np.concatenate([x_real, 3.0 * rng.normal(size=(3, 16)).astype(np.float32)])
  rows = np.array([True, False, False, False])
  op = (swat.SwatOp((("fc1", 0.3),)) if kind == "swat"
        else powerprop.PowerpropOp(beta=1.25, act_pruning=True))
  model = _OneDense(op=op)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16)))["params"]
  if kind == "powerprop":   # make the layer 60% sparse, so activations are pruned to 40%
    k = params["fc1"]["kernel"]
    params = {"fc1": dict(params["fc1"], kernel=jnp.where(
        topk.topk_mask(k, 0.4), k, 0.0))}

  def grad(x, row_mask):
    w = jnp.asarray(row_mask, jnp.float32)
    extra = {swat.ROWS_COLLECTION: swat.row_mask_variables(["fc1"], row_mask)}

    def loss(p):
      out = model.apply({"params": p, **extra}, x)
      return jnp.sum(jnp.sum(out ** 2, axis=1) * w)
    return jax.grad(loss)(params)

  alone = grad(jnp.asarray(x_real), np.array([True]))
  padded = grad(jnp.asarray(x_pad), rows)
  chex.assert_trees_all_close(padded, alone, rtol=1e-6, atol=1e-7)
  # The row-aware threshold equals the top-K of the real rows alone, for a traced density too.
  for method in topk.METHODS:
    want = topk.topk_threshold(x_real, 0.3, method)
    got = topk.rows_topk_threshold(jnp.asarray(x_pad), 0.3, jnp.asarray(rows), method)
    assert float(got) == float(want), method
  traced = jax.jit(lambda d: topk.rows_topk_threshold(jnp.asarray(x_pad), d, rows,
                                                      "bisection"))(jnp.float32(0.3))
  assert float(traced) == float(topk.topk_threshold(x_real, 0.3, "sort"))


# ---- byte accounting ------------------------------------------------------------------------
def _resnet18():
  from sparsefl_jax import models
  from sparsefl_jax.models import introspect
  model = models.get_model("resnet18", 10)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  order = introspect.weight_layer_order(model, shapes, x)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 400))
  rand = lambda tree: jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), tree)
  return rand(shapes["params"]), rand({"batch_stats": shapes["batch_stats"]}), order


def _np_bytes(tree, encoding):
  """Independent per-tensor byte count: dense 4n, CSR 8·nnz + 8, bitmask ceil(n/8) + 4·nnz."""
  total = 0
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    n, nnz = x.size, int(np.count_nonzero(x))
    costs = {"dense": 4 * n, "csr": 8 * nnz + 8, "bitmask": -(-n // 8) + 4 * nnz}
    total += min(costs.values()) if encoding == "auto" else costs[encoding]
  return total


def test_resnet18_bytes_dense_model_both_ways_and_zerofl_upload():
  """ResNet-18 (CIFAR): the dense model is 44.7 MB (10^6 B) in every encoding a real system
  would pick, both ways (ZeroFL's downlink stays dense even under csr); ZeroFL sp 0.95,
  r_mask 0 uploads 5.9 MB as CSR (the paper's counting) and less under auto (bitmask)."""
  from sparsefl_jax.algorithms.zerofl import ZeroFL
  from sparsefl_jax.algorithms.fedavg import FedAvg
  from sparsefl_jax.federated.round import downlink_cost, uplink_cost
  params, bn, order = _resnet18()
  alg, _ = ZeroFL(sparsity=0.95, mask_ratio=0.0).setup(params, order)
  bn_bytes = 4 * sum(x.size for x in jax.tree.leaves(bn))
  for encoding in ("auto", "csr", "dense"):
    down = downlink_cost(alg, params, bn, encoding)
    assert (int(down["bytes"]) - bn_bytes) / 1e6 == pytest.approx(44.7, rel=0.01), encoding
  assert int(downlink_cost(FedAvg(), params, bn, "csr")["bytes"]) > 1.9 * 44.7e6
  upload = jax.jit(lambda p: alg.client_upload(p, p, (), jnp.int32(1)))(params)
  for encoding in ("csr", "auto"):
    up = uplink_cost(upload, {}, encoding)
    assert int(up["bytes"]) == _np_bytes(upload.values, encoding)
  assert int(uplink_cost(upload, {}, "csr")["bytes"]) / 1e6 == pytest.approx(5.9, rel=0.02)
  assert int(uplink_cost(upload, {}, "auto")["bytes"]) < int(
      uplink_cost(upload, {}, "csr")["bytes"])
  # BatchNorm statistics travel with the upload: counted in bytes and values.
  with_bn = uplink_cost(upload, bn, "auto")
  assert int(with_bn["bytes"]) == _np_bytes(upload.values, "auto") + bn_bytes
  assert int(with_bn["nnz"]) == int(uplink_cost(upload, {}, "auto")["nnz"]) + bn_bytes // 4


SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=24, synthetic_test=40, num_clients=4,
             clients_per_round=2, batch_size=8, lr=0.1, rounds=2, progress=False,
             workdir="/tmp/unused")


def test_zerofl_with_default_flags_shows_its_uplink_saving():
  """A new user's `--algorithm=zerofl --sparsity=0.9 --mask_ratio=0.1` (default encoding):
  the upload is counted from its non-zeros, so it is well below a dense model's."""
  from sparsefl_jax import train
  cfg = ExperimentConfig(**SMALL, algorithm="zerofl", sparsity=0.9, mask_ratio=0.1)
  exp = train.build_experiment(cfg)
  dense = 4 * sum(x.size for x in jax.tree.leaves(exp.init_state.params))
  _, m = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  ratio = np.asarray(m["uplink_bytes_per_client"]) / dense
  assert np.all(ratio < 0.6), ratio
  assert int(m["downlink_bytes_per_client"]) == dense       # ZeroFL's downlink: dense


def test_bn_statistics_are_counted_both_ways_in_a_round():
  """cifar_cnn's BatchNorm running statistics are averaged and broadcast every round: the
  round's byte and value counts include them in both directions."""
  from sparsefl_jax import train
  cfg = ExperimentConfig(**dict(SMALL, model="cifar_cnn", synthetic_shape="32,32,3",
                                synthetic_examples=8), algorithm="fedavg",
                         comm_encoding="dense")
  exp = train.build_experiment(cfg)
  n_params = sum(x.size for x in jax.tree.leaves(exp.init_state.params))
  n_stats = sum(x.size for x in jax.tree.leaves(exp.init_state.model_state))
  nnz = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(
      (exp.init_state.params, exp.init_state.model_state)))
  _, m = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  assert n_stats == 384
  assert int(m["downlink_bytes_per_client"]) == 4 * (n_params + n_stats)
  np.testing.assert_array_equal(m["uplink_bytes_per_client"], [4 * (n_params + n_stats)] * 2)
  assert int(m["downlink_nnz_per_client"]) == nnz


# ---- ZeroFL under ERK -----------------------------------------------------------------------
def test_zerofl_erk_uploads_each_layers_own_density_plus_mask_ratio():
  """ERK gives each SWAT-sparse layer its own sp_ℓ; the upload keeps 1 − sp_ℓ + r_mask of it."""
  cfg = ExperimentConfig(algorithm="zerofl", sparsity=0.9, mask_ratio=0.05,
                         sparsity_distribution="erk", workdir="/tmp/unused")
  alg = algorithms.get_algorithm("zerofl", cfg)
  alg, _, params, _ = assemble_model(alg, "fmnist_fc", 10, jnp.zeros((1, 28, 28, 1)),
                                     jax.random.PRNGKey(0))
  # Independent ERK (no layer saturates here): d_ℓ = ε (fan_in + fan_out) / (fan_in·fan_out)
  # with Σ d_ℓ n_ℓ = (1 − s) Σ n_ℓ over the sparse layers fc1, fc2.
  shapes = {"fc1": (784, 128), "fc2": (128, 128)}
  n = {k: a * b for k, (a, b) in shapes.items()}
  eps = 0.1 * sum(n.values()) / sum(a + b for a, b in shapes.values())
  dens = {k: eps * (a + b) / (a * b) for k, (a, b) in shapes.items()}
  assert abs(dens["fc1"] - dens["fc2"]) > 0.05
  upload = alg.client_upload(params, params, (), jnp.int32(1))
  for layer in shapes:
    got = int(jnp.sum(upload.values[layer]["kernel"] != 0))
    want = (dens[layer] + 0.05) * n[layer]
    assert abs(got - want) <= 2, (layer, got, want)
  assert int(jnp.sum(upload.values["fc3"]["kernel"] != 0)) == 128 * 10   # classifier: whole


# ---- FedSparsify-Local's mask ---------------------------------------------------------------
def test_fedsparsify_local_sends_its_mask_only_when_it_pruned():
  """Round 1 (t ≤ t_0 = 1) prunes nothing: no mask on the wire, no mask bits charged; round 2
  prunes and sends one N-bit mask per client."""
  from sparsefl_jax import train
  cfg = ExperimentConfig(**dict(SMALL, rounds=3), algorithm="fedsparsify_local",
                         sparsity=0.5, comm_encoding="dense", prune_start_round=1)
  exp = train.build_experiment(cfg)
  n = sum(x.size for x in jax.tree.leaves(exp.init_state.params))
  mask_bytes = sum(-(-x.size // 8) for x in jax.tree.leaves(exp.init_state.params))
  state, m1 = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  np.testing.assert_array_equal(m1["uplink_mask_bits_per_client"], [0, 0])
  np.testing.assert_array_equal(m1["uplink_bytes_per_client"], [4 * n] * 2)
  _, m2 = exp.round_step(state, exp.client_data, exp.train_key)
  np.testing.assert_array_equal(m2["uplink_mask_bits_per_client"], [n, n])
  np.testing.assert_array_equal(m2["uplink_bytes_per_client"], [4 * n + mask_bytes] * 2)
