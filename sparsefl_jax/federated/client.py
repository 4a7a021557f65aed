"""Local training of ONE client: epochs of shuffled mini-batches inside one lax.scan.

A client's data is padded to the cohort's common length M. Each epoch visits the client's own
n examples exactly once, in a fresh random order, in ceil(n/B) batches (the last may be
partial); the remaining steps of the padded schedule carry no examples and leave every piece
of state unchanged. So padding never duplicates, drops or reweights an example.
"""
import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.types import (AlgoState, ClientState, ModelState, Params, PRNGKey, PyTree,
                                Scalar)

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


class LocalStep(NamedTuple):
  """Where a local step sits in the client's schedule; every field is unbatched (shared by
  all clients), so predicates on it stay real `lax.cond`s under the client vmap.

  `index` is the step of the padded schedule; `epoch` and `batch` (the batch index within the
  epoch) do not depend on the padded length, so hooks that must be padding-invariant (SWAT's
  threshold refresh) key on them. `round` is the 1-based federated round t (None outside a
  round, e.g. in a benchmark's lone step), for hooks that act in chosen rounds only (FedDST's
  mask readjustment every R_adj rounds).
  """
  index: jax.Array
  epoch: jax.Array
  batch: jax.Array
  round: Optional[jax.Array] = None


def local_step(cfg: LocalConfig, s, t=None) -> LocalStep:
  """The `LocalStep` of padded step `s` in round `t`."""
  s = jnp.asarray(s, jnp.int32)
  return LocalStep(s, s // cfg.steps_per_epoch, s % cfg.steps_per_epoch,
                   None if t is None else jnp.asarray(t, jnp.int32))


class StepCarry(NamedTuple):
  """What one local step reads and writes."""
  params: Params
  opt_state: PyTree
  model_state: ModelState
  client_state: ClientState
  loss_sum: Scalar


def sgd_step(algorithm: Algorithm, model, batch_fn: BatchFn,
             optimizer: optax.GradientTransformation, global_params: Params,
             carry: StepCarry, x_raw: jax.Array, y: jax.Array, weights: jax.Array,
             rng: PRNGKey, step: LocalStep) -> StepCarry:
  """One local step on one raw batch: forward, loss, gradient, algorithm hooks, optax update.

  `weights` (B,) is 1 for real examples and 0 for padding; `rng` is split into augmentation
  and dropout keys. `local_train` scans this; a per-step loop (benchmarks) can jit it alone.
  """
  aug_key, drop_key = jax.random.split(rng)
  xb = batch_fn(x_raw, aug_key, True)

  def loss_fn(params):
    logits, new_mstate, new_cstate = algorithm.forward(
        model, params, carry.model_state, xb, train=True, example_mask=weights > 0,
        rngs={"dropout": drop_key}, client_state=carry.client_state, step=step)
    data_loss_sum = jnp.sum(cross_entropy(logits, y) * weights)
    loss = data_loss_sum / jnp.maximum(jnp.sum(weights), 1.0)
    loss = loss + algorithm.local_loss(params, global_params, carry.client_state)
    return loss, (new_mstate, new_cstate, data_loss_sum)

  grads, (mstate, cstate, batch_loss_sum) = jax.grad(loss_fn, has_aux=True)(carry.params)
  grads, params, opt_state, cstate = algorithm.local_update(grads, carry.params,
                                                            carry.opt_state, cstate, step)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  params, opt_state, cstate = algorithm.post_step(params, opt_state, cstate)
  return StepCarry(params, opt_state, mstate, cstate, carry.loss_sum + batch_loss_sum)


def step_batch(cfg: LocalConfig, orders: jax.Array, num_examples: jax.Array,
               step_key: PRNGKey, s: jax.Array) -> Tuple[jax.Array, jax.Array, PRNGKey]:
  """(example indices, example weights, rng) of local step `s`.

  Keys depend on (epoch, batch) only, not on the padded length: padding changes nothing.
  """
  bsz = cfg.batch_size
  epoch, b = s // cfg.steps_per_epoch, s % cfg.steps_per_epoch
  idx = jax.lax.dynamic_slice(orders[epoch], (b * bsz,), (bsz,))
  weights = ((b * bsz + jnp.arange(bsz)) < num_examples).astype(jnp.float32)
  return idx, weights, jax.random.fold_in(jax.random.fold_in(step_key, epoch), b)


def init_client(algorithm: Algorithm, cfg: LocalConfig,
                optimizer: optax.GradientTransformation, global_params: Params,
                model_state: ModelState, algo_state: AlgoState, num_examples: jax.Array,
                key: PRNGKey, t: Scalar) -> Tuple[StepCarry, jax.Array, PRNGKey]:
  """The first carry, the epochs' example orders and the step key of one client."""
  order_key, step_key, init_key = jax.random.split(key, 3)
  orders = epoch_orders(order_key, num_examples, cfg)
  client_state = algorithm.client_examples(
      algorithm.client_init(global_params, algo_state, t, init_key), num_examples)
  carry = StepCarry(global_params, optimizer.init(global_params), model_state, client_state,
                    jnp.zeros((), jnp.float32))
  return carry, orders, step_key


def local_train(algorithm: Algorithm, model, batch_fn: BatchFn, cfg: LocalConfig,
                make_optimizer: Callable[[], optax.GradientTransformation],
                global_params: Params, model_state: ModelState, algo_state: AlgoState,
                x: jax.Array, y: jax.Array, num_examples: jax.Array, key: PRNGKey,
                t: Scalar) -> ClientResult:
  """Runs `cfg.num_steps` masked SGD steps for one client; see the module docstring.

  `algo_state` is what the algorithm's `client_context` returned for this round (the server
  state itself for most methods).
  """
  optimizer = make_optimizer()
  init, orders, step_key = init_client(algorithm, cfg, optimizer, global_params, model_state,
                                       algo_state, num_examples, key, t)

  def step(carry, s):
    idx, wb, rng = step_batch(cfg, orders, num_examples, step_key, s)
    new = sgd_step(algorithm, model, batch_fn, optimizer, global_params, carry, x[idx],
                   y[idx], wb, rng, local_step(cfg, s, t))
    has_data = wb[0] > 0          # the batch's first slot is real iff the batch has data
    return jax.tree.map(lambda n, o: jnp.where(has_data, n, o), new, carry), None

  final, _ = jax.lax.scan(step, init, jnp.arange(cfg.num_steps))
  num_trained = (cfg.epochs * num_examples).astype(jnp.float32)
  return ClientResult(final.params, final.model_state, final.client_state, final.loss_sum,
                      num_trained)
