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
