"""`round_step(server_state, client_data, key) -> (server_state, metrics)`: one whole round.

Everything happens inside one jitted function: client sampling from (sampling key, round),
the gather of the sampled clients' data, local training (lax.scan) under the chosen client
map, the uplink (with its byte count), aggregation weighted by example counts, the server
optimizer and the method's server-side post-processing.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from sparsefl_jax import comm
from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated.aggregation import weighted_mean
from sparsefl_jax.federated.client_map import map_clients, validate_client_map
from sparsefl_jax.federated.optimizers import ClientLRSchedule, client_optimizer
from sparsefl_jax.federated.sampling import sample_clients
from sparsefl_jax.federated.state import ClientData, ServerState
from sparsefl_jax.types import ModelState, Params, PRNGKey

RoundStep = Callable[[ServerState, ClientData, PRNGKey], Tuple[ServerState, Dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static description of a round (hashable; changing it recompiles)."""
  num_clients: int
  clients_per_round: int
  local: client_lib.LocalConfig
  lr_schedule: ClientLRSchedule
  momentum: float = 0.0
  weight_decay: float = 0.0
  client_map: str = "vmap"
  client_chunk_size: int = 1
  comm_encoding: str = "dense"

  def __post_init__(self):
    if self.num_clients < 1:
      raise ValueError(f"num_clients={self.num_clients} must be >= 1")
    if not 1 <= self.clients_per_round <= self.num_clients:
      raise ValueError(f"clients_per_round={self.clients_per_round} must lie in "
                       f"[1, num_clients={self.num_clients}]")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"momentum={self.momentum} must lie in [0, 1)")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
    validate_client_map(self.client_map, self.client_chunk_size)
    comm.check_encoding(self.comm_encoding)


def init_server_state(algorithm: Algorithm, params: Params, model_state: ModelState,
                      server_opt: Optional[optax.GradientTransformation],
                      sampling_key: PRNGKey) -> ServerState:
  """The state before round 1. `params` should already have gone through init_params."""
  opt_state = server_opt.init(params) if server_opt is not None else ()
  return ServerState(round=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state, opt_state=opt_state,
                     algo_state=algorithm.init_state(params), sampling_key=sampling_key)


def build_round_step(algorithm: Algorithm, model, batch_fn: client_lib.BatchFn,
                     cfg: RoundConfig,
                     server_opt: Optional[optax.GradientTransformation]) -> RoundStep:
  """Returns the (un-jitted) pure round function; wrap it in jax.jit (see `jit_round_step`)."""

  def round_step(state: ServerState, data: ClientData, key: PRNGKey):
    t = state.round + 1
    ids = sample_clients(state.sampling_key, t, cfg.num_clients, cfg.clients_per_round)
    xs, ys, ns = data.x[ids], data.y[ids], data.counts[ids]
    round_key = jax.random.fold_in(key, t)
    client_keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids)
    global_in = algorithm.broadcast(state.params, state.algo_state, t)
    lr = cfg.lr_schedule(t)
    make_opt = lambda: client_optimizer(lr, cfg.momentum, cfg.weight_decay)

    def one_client(inputs):
      x, y, n, k = inputs
      res = client_lib.local_train(algorithm, model, batch_fn, cfg.local, make_opt, global_in,
                                   state.model_state, state.algo_state, x, y, n, k, t)
      upload = algorithm.client_upload(global_in, res.params, res.client_state, t)
      up = {"bytes": comm.tree_bytes(upload.values, cfg.comm_encoding),
            "nnz": comm.tree_nnz(upload.values), "mask_bits": jnp.int32(0)}
      if upload.mask is not None:   # 1 bit per entry, whole bytes per tensor
        mask_size = sum(m.size for m in jax.tree.leaves(upload.mask))
        up["bytes"] = up["bytes"] + sum(comm.encoded_bytes(0, m.size, "bitmask")
                                        for m in jax.tree.leaves(upload.mask))
        up["mask_bits"] = jnp.int32(mask_size)
      cmetrics = algorithm.client_metrics(global_in, upload, res.client_state)
      return upload, res.model_state, res.loss_sum, res.num_trained, up, cmetrics

    uploads, mstates, loss_sums, num_trained, up, cmetrics = map_clients(
        one_client, (xs, ys, ns, client_keys), cfg.client_map, cfg.client_chunk_size)

    weights = ns.astype(jnp.float32)
    candidate = algorithm.aggregate(global_in, uploads, weights, state.algo_state, t)
    model_state = weighted_mean(mstates, weights)
    if server_opt is None:
      params, opt_state = candidate, state.opt_state
    else:
      pseudo_grad = jax.tree.map(jnp.subtract, state.params, candidate)
      updates, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    params, algo_state = algorithm.server_post(params, state.algo_state, t)

    metrics = {
        "clients": ids,
        "lr": lr,
        "train_loss": jnp.sum(loss_sums) / jnp.maximum(jnp.sum(num_trained), 1.0),
        "num_examples": jnp.sum(ns),
        "uplink_bytes_per_client": up["bytes"],
        "uplink_nnz_per_client": up["nnz"],
        "uplink_mask_bits_per_client": up["mask_bits"],
        "downlink_bytes_per_client": comm.tree_bytes(global_in, cfg.comm_encoding),
        "downlink_nnz_per_client": comm.tree_nnz(global_in),
        "global_density": comm.tree_nnz(params) / comm.tree_size(params),
        **{k: jnp.sum(v * weights) / jnp.sum(weights) for k, v in cmetrics.items()},
        **algorithm.server_metrics(state.params, params, algo_state),
    }
    new_state = ServerState(round=t, params=params, model_state=model_state,
                            opt_state=opt_state, algo_state=algo_state,
                            sampling_key=state.sampling_key)
    return new_state, metrics

  return round_step


def jit_round_step(round_step: RoundStep, donate: bool = True) -> RoundStep:
  """jax.jit with the server state donated (its buffers are reused for the new state)."""
  return jax.jit(round_step, donate_argnums=(0,) if donate else ())
