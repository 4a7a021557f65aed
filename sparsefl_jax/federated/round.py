"""`round_step(server_state, client_data, key) -> (server_state, metrics)`: one whole round.

Everything happens inside one jitted function: client sampling from (sampling key, round),
the gather of the sampled clients' data, local training (lax.scan) under the chosen client
map, the uplink (with its byte count), aggregation weighted by example counts, the server
optimizer and the method's server-side post-processing.

Under 'map'/'chunked' the aggregate streams: a lax.scan over client chunks accumulates the
method's `upload_stats` (Σ n_k·weighted_k and Σ_k counted_k), so peak memory is bounded by the
chunk rather than the clients per round; the method's `finalize_aggregate` turns the sums into
the candidate model. With num_devices > 1 the clients (padded with
zero-weight dummies) are split over a device mesh by shard_map (see `sharding`).
"""
import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from sparsefl_jax import comm, traceable
from sparsefl_jax.algorithms.base import Algorithm, Upload
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated import sharding
from sparsefl_jax.federated.aggregation import sum_dtype, weighted_mean
from sparsefl_jax.federated.client_map import map_clients, validate_client_map
from sparsefl_jax.federated.optimizers import ClientLRSchedule, client_optimizer
from sparsefl_jax.federated.sampling import sample_clients
from sparsefl_jax.federated.state import ClientData, ServerState
from sparsefl_jax.sparsity import metrics as sparse_metrics
from sparsefl_jax.types import AlgoState, ModelState, Params, PRNGKey

RoundStep = Callable[[ServerState, ClientData, PRNGKey], Tuple[ServerState, Dict[str, Any]]]


class Cohort(NamedTuple):
  """One round's sampled clients with their data gathered: what a round trains on.

  `ids` and `counts` cover the K sampled clients; `x` and `y` are padded to the round's
  `padded_clients` rows with the dummy clients' rows (client 0's data, trained with 0
  examples), exactly what the device-resident round gathers itself. Built on the host by
  `data.host_placement` when the dataset stays off the device (`--data_placement=host`).
  """
  ids: jax.Array       # (K,) int32 client ids, from `sample_clients`
  counts: jax.Array    # (K,) int32 example counts of those clients
  x: jax.Array         # (K_pad, M, ...) raw examples of ids padded with dummies (id 0)
  y: jax.Array         # (K_pad, M) int32 labels


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static description of a round (hashable unless its lr schedule holds traced values, as in
  a vmapped sweep; changing it recompiles)."""
  num_clients: int
  clients_per_round: int
  local: client_lib.LocalConfig
  lr_schedule: ClientLRSchedule
  momentum: float = 0.0
  weight_decay: float = 0.0
  client_map: str = "vmap"
  client_chunk_size: int = 1
  comm_encoding: str = "auto"
  num_devices: int = 1           # > 1: shard the clients over a mesh of that many devices
  stream_aggregate: bool = True  # 'map'/'chunked': accumulate Σ n_k·upload_k, never stack
  mask_metrics: bool = False     # regrowth / mask_iou / densities for every method

  def __post_init__(self):
    if self.num_clients < 1:
      raise ValueError(f"num_clients={self.num_clients} must be >= 1")
    if not 1 <= self.clients_per_round <= self.num_clients:
      raise ValueError(f"clients_per_round={self.clients_per_round} must lie in "
                       f"[1, num_clients={self.num_clients}]")
    # Traceable (a vmapped sweep): a concrete value is checked as always, a tracer passes.
    traceable.check_range("momentum", self.momentum, 0, 1, high_open=True)
    traceable.check_range("weight_decay", self.weight_decay, 0)
    validate_client_map(self.client_map, self.client_chunk_size)
    comm.check_encoding(self.comm_encoding)
    if self.num_devices < 1:
      raise ValueError(f"num_devices={self.num_devices} must be >= 1")

  @property
  def padded_clients(self) -> int:
    """Clients per round rounded up to a multiple of num_devices (dummies have weight 0)."""
    return sharding.padded_count(self.clients_per_round, self.num_devices)


def init_server_state(algorithm: Algorithm, params: Params, model_state: ModelState,
                      server_opt: Optional[optax.GradientTransformation],
                      sampling_key: PRNGKey, algo_state: Optional[AlgoState] = None
                      ) -> ServerState:
  """The state before round 1. `params` should already have gone through init_params (and
  `init_from_data`, whose server state is passed as `algo_state`; default: init_state)."""
  opt_state = server_opt.init(params) if server_opt is not None else ()
  if algo_state is None:
    algo_state = algorithm.init_state(params)
  return ServerState(round=jnp.zeros((), jnp.int32), params=params,
                     model_state=model_state, opt_state=opt_state,
                     algo_state=algo_state, sampling_key=sampling_key)


def streams_aggregate(algorithm: Algorithm) -> bool:
  """True when the round may stream the aggregate: sum the method's `upload_stats` client by
  client (or chunk by chunk) instead of stacking every upload, so peak memory follows the
  chunk, not the clients per round. Every method does, unless it overrides `aggregate` itself
  (or sets `streaming_aggregate = False`).
  """
  flag = getattr(algorithm, "streaming_aggregate", None)
  if flag is not None:
    return bool(flag)
  return type(algorithm).aggregate is Algorithm.aggregate


def overrides_finalize_state(algorithm: Algorithm) -> bool:
  """Whether the method updates its server state from the round's summed statistics."""
  return type(algorithm).finalize_state is not Algorithm.finalize_state


def _weighted_sum(tree, w: jax.Array):
  """Σ_k w_k·x_k over the leading axis of every leaf (in `sum_dtype`)."""
  def one(x):
    dtype = sum_dtype(x.dtype)
    return jnp.tensordot(w.astype(dtype), x.astype(dtype), axes=1)
  return jax.tree.map(one, tree)


def _stream_clients(fn: Callable, xs, weights: Tuple[jax.Array, ...], chunk: int):
  """Runs `fn` (one client -> (sums, small)) chunk by chunk, accumulating Σ_k w_k·sums_k.

  `sums` is a tuple with one tree per weight vector in `weights` (e.g. example counts for the
  weighted mean, 1 per real client for counted statistics). Returns (the weighted sums,
  stacked per-client `small`). Chunks of `chunk` clients are vmapped (chunk 1: plain calls)
  inside a lax.scan; a remainder chunk runs after it.
  """
  k = weights[0].shape[0]
  n_full, rem = divmod(k, chunk)

  def add_weighted(big, ws):
    return tuple(_weighted_sum(b, w) for b, w in zip(big, ws))

  def run_block(block, ws):
    if ws[0].shape[0] == 1:
      big, small = fn(jax.tree.map(lambda a: a[0], block))
      return add_weighted(jax.tree.map(lambda a: a[None], big), ws), \
          jax.tree.map(lambda a: a[None], small)
    big, small = jax.vmap(fn)(block)
    return add_weighted(big, ws), small

  one = jax.tree.map(lambda a: a[0], xs)
  big_shape, _ = jax.eval_shape(fn, one)
  acc = jax.tree.map(lambda s: jnp.zeros(s.shape, sum_dtype(s.dtype)), big_shape)
  smalls = []
  if n_full:
    blocks = jax.tree.map(lambda a: a[:n_full * chunk].reshape((n_full, chunk) + a.shape[1:]),
                          (xs, weights))

    def body(acc, blk):
      sums, small = run_block(*blk)
      return jax.tree.map(jnp.add, acc, sums), small

    acc, small = jax.lax.scan(body, acc, blocks)
    smalls.append(jax.tree.map(lambda a: a.reshape((n_full * chunk,) + a.shape[2:]), small))
  if rem:
    tail = jax.tree.map(lambda a: a[n_full * chunk:], (xs, weights))
    sums, small = run_block(*tail)
    acc = jax.tree.map(jnp.add, acc, sums)
    smalls.append(small)
  small = smalls[0] if len(smalls) == 1 else jax.tree.map(
      lambda *a: jnp.concatenate(a), *smalls)
  return acc, small


def build_round_step(algorithm: Algorithm, model, batch_fn: client_lib.BatchFn,
                     cfg: RoundConfig,
                     server_opt: Optional[optax.GradientTransformation],
                     cohort_input: bool = False) -> RoundStep:
  """Returns the (un-jitted) pure round function; wrap it in jax.jit (see `jit_round_step`).

  `round_step(state, client_data, key)` samples and gathers the cohort from the whole
  device-resident `ClientData` itself. With `cohort_input=True` it is instead
  `round_step(state, cohort, key)`: the caller passes the round's `Cohort`, sampled with
  `sample_clients` from (state.sampling_key, state.round + 1) and gathered on the host, and
  everything after the gather is the same computation (bit-identical results).

  With cfg.num_devices > 1 the clients are split over a device mesh (see `sharding`); pass
  the client data through `sharding.replicate(data, round_mesh(cfg))` once, so it is not
  copied to every device each round.
  """
  algorithm.require_bound("build_round_step")   # unbound ZeroFL/SparsyFed: refuse, not guess
  with_state = overrides_finalize_state(algorithm)
  if with_state and type(algorithm).aggregate is not Algorithm.aggregate:
    raise ValueError(f"{type(algorithm).__name__} overrides both `aggregate` and "
                     "`finalize_state`; finalize_state needs the summed statistics: override "
                     "`upload_stats` + `finalize_aggregate` instead of `aggregate`")
  k_real = cfg.clients_per_round
  k_pad = cfg.padded_clients
  stream = cfg.stream_aggregate and cfg.client_map != "vmap" and streams_aggregate(algorithm)
  mesh = round_mesh(cfg)

  def local_round(global_in, model_state, context, lr, t, xs, ys, ns, keys, reals):
    """Trains the given clients; returns (aggregate part, per-client scalars).

    `reals` is 1 for the round's real clients and 0 for the zero-weight dummies that pad the
    cohort to a multiple of the devices (counted statistics skip them)."""
    make_opt = lambda: client_optimizer(lr, cfg.momentum, cfg.weight_decay)

    def one_client(inputs):
      x, y, n, k = inputs
      res = client_lib.local_train(algorithm, model, batch_fn, cfg.local, make_opt, global_in,
                                   model_state, context, x, y, n, k, t)
      upload = algorithm.client_upload(global_in, res.params, res.client_state, t)
      up = uplink_cost(upload, res.model_state, cfg.comm_encoding)
      cmetrics = algorithm.client_metrics(global_in, upload, res.client_state)
      if cfg.mask_metrics and "regrowth" not in cmetrics:
        cmetrics = {**cmetrics, **sparse_metrics.regrowth_metrics(
            global_in, uploaded_model(algorithm, global_in, upload))}
      small = (res.loss_sum, res.num_trained, up, cmetrics)
      if stream:   # (example-weighted, counted) sums; the model state is example-weighted
        weighted, counted = algorithm.upload_stats(upload)
        return ((weighted, res.model_state), counted), small
      return (upload, res.model_state), small

    inputs = (xs, ys, ns, keys)
    if stream:
      chunk = 1 if cfg.client_map == "map" else cfg.client_chunk_size
      sums, small = _stream_clients(one_client, inputs,
                                    (ns.astype(jnp.float32), reals.astype(jnp.int32)), chunk)
      if mesh is not None:   # one collective: every statistic is a sum
        sums = jax.lax.psum(sums, sharding.CLIENT_AXIS)
      return sums, small
    return map_clients(one_client, inputs, cfg.client_map, cfg.client_chunk_size)

  if mesh is not None:
    rep, per_client = PartitionSpec(), PartitionSpec(sharding.CLIENT_AXIS)
    local_round = jax.shard_map(
        local_round, mesh=mesh, in_specs=(rep,) * 5 + (per_client,) * 5,
        out_specs=(rep if stream else per_client, per_client), check_vma=False)

  replicate_out = mesh is not None and jax.process_count() > 1

  def cohort_step(state: ServerState, cohort: Cohort, key: PRNGKey):
    t = state.round + 1
    ids, ns_real, xs, ys = cohort
    ids_p, ns = sharding.pad_clients(ids, ns_real, k_pad)   # zero-weight dummies
    round_key = jax.random.fold_in(key, t)
    client_keys = jax.vmap(lambda i: jax.random.fold_in(round_key, i))(ids_p)
    global_in = algorithm.broadcast(state.params, state.algo_state, t)
    lr = cfg.lr_schedule(t)

    context = algorithm.client_context(global_in, state.algo_state, t)
    reals = jnp.arange(k_pad) < k_real
    big, small = local_round(global_in, state.model_state, context, lr, t,
                             xs, ys, ns, client_keys, reals)
    loss_sums, num_trained, up, cmetrics = jax.tree.map(lambda a: a[:k_real], small)
    weights = ns_real.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    if stream:
      (value_sums, mstate_sums), counts = big
      mean = jax.tree.map(lambda s: s / total.astype(s.dtype), value_sums)
      candidate = algorithm.finalize_aggregate(global_in, mean, counts, k_real,
                                               state.algo_state, t)
      algo_state = algorithm.finalize_state(global_in, mean, counts, k_real,
                                            state.algo_state, t)
      model_state = jax.tree.map(lambda s: s / total.astype(s.dtype), mstate_sums)
    else:
      uploads, mstates = jax.tree.map(lambda a: a[:k_real], big)
      if with_state:   # the sums feed the server state too (default aggregate, in two steps)
        mean, counts = algorithm.aggregate_stats(uploads, weights)
        candidate = algorithm.finalize_aggregate(global_in, mean, counts, k_real,
                                                 state.algo_state, t)
        algo_state = algorithm.finalize_state(global_in, mean, counts, k_real,
                                              state.algo_state, t)
      else:
        candidate = algorithm.aggregate(global_in, uploads, weights, state.algo_state, t)
        algo_state = state.algo_state
      model_state = weighted_mean(mstates, weights)
    if server_opt is None:
      params, opt_state = candidate, state.opt_state
    else:
      pseudo_grad = jax.tree.map(jnp.subtract, state.params, candidate)
      updates, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    params, algo_state = algorithm.server_post(params, algo_state, t)

    metrics = {
        "clients": ids,
        "lr": lr,
        "train_loss": jnp.sum(loss_sums) / jnp.maximum(jnp.sum(num_trained), 1.0),
        "num_examples": jnp.sum(ns_real),
        "uplink_bytes_per_client": up["bytes"],
        "uplink_nnz_per_client": up["nnz"],
        "uplink_mask_bits_per_client": up["mask_bits"],
        **{f"downlink_{k}_per_client": v for k, v in downlink_cost(
            algorithm, global_in, state.model_state, cfg.comm_encoding).items()},
        "global_density": comm.tree_nnz(params) / comm.tree_size(params),
        **{k: jnp.sum(v * weights) / jnp.sum(weights) for k, v in cmetrics.items()},
        **algorithm.server_metrics(state.params, params, algo_state),
    }
    if cfg.mask_metrics and "mask_iou" not in metrics:
      metrics.update(sparse_metrics.global_mask_metrics(state.params, params))
    new_state = ServerState(round=t, params=params, model_state=model_state,
                            opt_state=opt_state, algo_state=algo_state,
                            sampling_key=state.sampling_key)
    if replicate_out:   # several processes: every output readable (and saved) by each
      rep = sharding.replicated(mesh)
      new_state, metrics = jax.lax.with_sharding_constraint((new_state, metrics), rep)
    return new_state, metrics

  if cohort_input:
    return cohort_step

  def round_step(state: ServerState, data: ClientData, key: PRNGKey):
    t = state.round + 1
    ids = sample_clients(state.sampling_key, t, cfg.num_clients, k_real)
    ns_real = data.counts[ids]
    ids_p, _ = sharding.pad_clients(ids, ns_real, k_pad)
    return cohort_step(state, Cohort(ids, ns_real, data.x[ids_p], data.y[ids_p]), key)

  return round_step


def uploaded_model(algorithm: Algorithm, global_params: Params, upload: Upload) -> Params:
  """The model a client's upload describes: its values, or global + values for 'delta'."""
  if algorithm.uplink == "delta":
    return jax.tree.map(jnp.add, global_params, upload.values)
  return upload.values


def uplink_cost(upload: Upload, model_state: ModelState, encoding: str
                ) -> Dict[str, jax.Array]:
  """Bytes, sent values and mask bits of one client's upload.

  The upload's values, the client's BatchNorm statistics (averaged by the server like
  weights, so they travel too) and the method's `extras` are each encoded per tensor with
  `encoding`; a mask costs 1 bit per entry (whole bytes per tensor), and only in rounds where
  the method sends it.
  """
  sent_values = (upload.values, model_state)
  if upload.extras is not None:   # a method's own payload travels like the values
    sent_values = sent_values + (upload.extras,)
  cost = {"bytes": comm.tree_bytes(sent_values, encoding), "nnz": comm.tree_nnz(sent_values),
          "mask_bits": jnp.int32(0)}
  if upload.mask is not None:
    leaves = jax.tree.leaves(upload.mask)
    sent = jnp.asarray(True if upload.mask_sent is None else upload.mask_sent)
    mask_bytes = sum(comm.encoded_bytes(0, m.size, "bitmask") for m in leaves)
    cost["bytes"] = cost["bytes"] + jnp.where(sent, mask_bytes, 0).astype(jnp.int32)
    cost["mask_bits"] = jnp.where(sent, sum(m.size for m in leaves), 0).astype(jnp.int32)
  return cost


def downlink_cost(algorithm: Algorithm, global_params: Params, model_state: ModelState,
                  encoding: str) -> Dict[str, jax.Array]:
  """Bytes and sent values of the broadcast to ONE client: the model in the method's
  downlink encoding (default: the run's) and the BatchNorm statistics in the run's."""
  return {"bytes": comm.tree_bytes(global_params, algorithm.downlink_encoding or encoding)
                   + comm.tree_bytes(model_state, encoding),
          "nnz": comm.tree_nnz((global_params, model_state))}


def round_mesh(cfg: RoundConfig) -> Optional[Mesh]:
  """The client mesh of a sharded round (None when cfg.num_devices == 1)."""
  return sharding.client_mesh(cfg.num_devices) if cfg.num_devices > 1 else None


def jit_round_step(round_step: RoundStep, donate: bool = True) -> RoundStep:
  """jax.jit with the server state donated (its buffers are reused for the new state)."""
  return jax.jit(round_step, donate_argnums=(0,) if donate else ())
