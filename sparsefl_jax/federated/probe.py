"""Pruning at initialisation from data: one batch of one client, and the loss on it.

SNIP and GraSP score weights from a mini-batch before training. `run_init_from_data` draws a
client uniformly (the init seed decides, so the batch is reproducible and independent of the
training and sampling seeds), takes `batch_size` of its examples in a random order (all of
them, zero-padded, when it holds fewer), and hands the method's `init_from_data` hook a
`loss_fn(params)`: the mean cross-entropy of the model on that batch in training mode
(BatchNorm normalises with the batch's statistics, as a training step would).
`loss_fn(params, temperature=T)` divides the logits by the Python float T first (GraSP's
official code scores at T = 200); the default 1.0 leaves the loss exactly as above.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.federated.client import BatchFn, cross_entropy
from sparsefl_jax.federated.state import ClientData
from sparsefl_jax.types import AlgoState, ModelState, Params, PRNGKey


def overrides_init_from_data(algorithm: Algorithm) -> bool:
  """Whether the method prunes from data at initialisation (others draw no batch)."""
  return type(algorithm).init_from_data is not Algorithm.init_from_data


def probe_batch(data: ClientData, batch_size: int, key: PRNGKey
                ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(client id, raw x (B, ...), labels (B,), example weights (B,)) of the probe batch."""
  client_key, order_key = jax.random.split(key)
  cid = jax.random.randint(client_key, (), 0, data.num_clients)
  n = data.counts[cid]
  idx = jnp.arange(data.max_examples)
  scores = jnp.where(idx < n, jax.random.uniform(order_key, (data.max_examples,)), 2.0)
  order = jnp.argsort(scores)
  take = jnp.resize(order, (batch_size,)) if batch_size > data.max_examples else order[
      :batch_size]
  weights = (jnp.arange(batch_size) < n).astype(jnp.float32)
  return cid, data.x[cid][take], data.y[cid][take], weights


def run_init_from_data(algorithm: Algorithm, model, batch_fn: BatchFn, data: ClientData,
                       params: Params, model_state: ModelState, algo_state: AlgoState,
                       batch_size: int, key: PRNGKey) -> Tuple[Params, AlgoState]:
  """Calls the method's `init_from_data` hook with the loss on the probe batch (jitted)."""
  batch_key, dropout_key, hook_key = jax.random.split(key, 3)

  @jax.jit
  def run(params, algo_state):
    _, x_raw, y, weights = probe_batch(data, batch_size, batch_key)
    x = batch_fn(x_raw, batch_key, False)

    def loss_fn(p: Params, temperature: float = 1.0) -> jax.Array:
      logits, _, _ = Algorithm.apply_model(model, p, model_state, x, train=True,
                                           example_mask=weights > 0,
                                           rngs={"dropout": dropout_key})
      if temperature != 1.0:   # static: T = 1 adds no operation (SNIP's loss is unchanged)
        logits = logits / jnp.float32(temperature)
      return jnp.sum(cross_entropy(logits, y) * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return algorithm.init_from_data(params, algo_state, loss_fn, hook_key)

  return run(params, algo_state)
