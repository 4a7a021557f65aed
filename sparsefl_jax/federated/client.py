"""Local training of ONE client: epochs of shuffled mini-batches inside one lax.scan.

A client's data is padded to the cohort's common length M. Each epoch visits the client's own
n examples exactly once, in a fresh random order, in ceil(n/B) batches (the last may be
partial); the remaining steps of the padded schedule carry no examples and leave every piece
of state unchanged. So padding never duplicates, drops or reweights an example.
"""
import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.types import AlgoState, ClientState, ModelState, Params, PRNGKey, Scalar

BatchFn = Callable[[jax.Array, PRNGKey, bool], jax.Array]


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static shape of local training: the same for every client of a run."""
  epochs: int
  batch_size: int
  max_examples: int          # M, the padded per-client length

  def __post_init__(self):
    if self.epochs < 1:
      raise ValueError(f"local_epochs={self.epochs} must be >= 1")
    if self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size} must be >= 1")

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.max_examples // self.batch_size)

  @property
  def num_steps(self) -> int:
    return self.epochs * self.steps_per_epoch


class ClientResult(NamedTuple):
  params: Params
  model_state: ModelState
  client_state: ClientState
  loss_sum: Scalar          # Σ over trained examples of the per-example loss
  num_trained: Scalar       # examples trained on (= epochs · n)


def epoch_orders(key: PRNGKey, num_examples: jax.Array, cfg: LocalConfig) -> jax.Array:
  """(epochs, steps_per_epoch·B) example indices: each epoch a permutation of 0..n−1 first.

  Padding rows (index ≥ n) sort after the real ones, so batch b of an epoch holds positions
  [bB, (b+1)B); positions ≥ n are padding and get zero weight. The order of the real examples
  does not depend on M (threefry draws are prefix-stable), so padding never changes training.
  """
  length = cfg.steps_per_epoch * cfg.batch_size
  keys = jax.random.split(key, cfg.epochs)
  idx = jnp.arange(cfg.max_examples)

  def one(k):
    scores = jnp.where(idx < num_examples, jax.random.uniform(k, (cfg.max_examples,)), 2.0)
    order = jnp.argsort(scores).astype(jnp.int32)
    return jnp.pad(order, (0, length - cfg.max_examples))

  return jax.vmap(one)(keys)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def local_train(algorithm: Algorithm, model, batch_fn: BatchFn, cfg: LocalConfig,
                make_optimizer: Callable[[], optax.GradientTransformation],
                global_params: Params, model_state: ModelState, algo_state: AlgoState,
                x: jax.Array, y: jax.Array, num_examples: jax.Array, key: PRNGKey,
                t: Scalar) -> ClientResult:
  """Runs `cfg.num_steps` masked SGD steps for one client; see the module docstring."""
  order_key, step_key, init_key = jax.random.split(key, 3)
  orders = epoch_orders(order_key, num_examples, cfg)
  client_state = algorithm.client_init(global_params, algo_state, t, init_key)
  optimizer = make_optimizer()
  opt_state = optimizer.init(global_params)
  bsz = cfg.batch_size

  def loss_fn(params, mstate, cstate, xb, yb, wb, rng, s):
    logits, new_mstate, new_cstate = algorithm.forward(
        model, params, mstate, xb, train=True, example_mask=wb > 0,
        rngs={"dropout": rng}, client_state=cstate, step=s)
    per_example = cross_entropy(logits, yb)
    data_loss_sum = jnp.sum(per_example * wb)
    loss = data_loss_sum / jnp.maximum(jnp.sum(wb), 1.0)
    loss = loss + algorithm.local_loss(params, global_params, cstate)
    return loss, (new_mstate, new_cstate, data_loss_sum)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def step(carry, s):
    params, opt_state, mstate, cstate, loss_sum = carry
    epoch, b = s // cfg.steps_per_epoch, s % cfg.steps_per_epoch
    idx = jax.lax.dynamic_slice(orders[epoch], (b * bsz,), (bsz,))
    wb = ((b * bsz + jnp.arange(bsz)) < num_examples).astype(jnp.float32)
    # Keys depend on (epoch, batch) only, not on the padded length: padding changes nothing.
    rng = jax.random.fold_in(jax.random.fold_in(step_key, epoch), b)
    aug_key, drop_key = jax.random.split(rng)
    xb = batch_fn(x[idx], aug_key, True)
    grads, (new_mstate, new_cstate, batch_loss_sum) = grad_fn(
        params, mstate, cstate, xb, y[idx], wb, drop_key, s)
    grads = algorithm.transform_grads(grads, params, new_cstate)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_params, new_opt_state, new_cstate = algorithm.post_step(new_params, new_opt_state,
                                                                new_cstate)
    has_data = b * bsz < num_examples
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(has_data, n, o), new, old)
    carry = (keep(new_params, params), keep(new_opt_state, opt_state),
             keep(new_mstate, mstate), keep(new_cstate, cstate),
             loss_sum + jnp.where(has_data, batch_loss_sum, 0.0))
    return carry, None

  init = (global_params, opt_state, model_state, client_state, jnp.zeros((), jnp.float32))
  (params, _, model_state, client_state, loss_sum), _ = jax.lax.scan(
      step, init, jnp.arange(cfg.num_steps))
  num_trained = (cfg.epochs * num_examples).astype(jnp.float32)
  return ClientResult(params, model_state, client_state, loss_sum, num_trained)
