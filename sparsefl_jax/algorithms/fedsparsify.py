"""FedSparsify (Stripelis et al.): progressive magnitude pruning with masked local training.

Both variants keep the global mask M_t in the server state and train locally inside it: the
client masks its gradients (`transform_grads`) and re-applies the mask after every optimizer
step (`post_step`), so pruned weights stay exactly 0 and, because every round's client
optimizer starts fresh, so does their momentum. Pruning follows Eq. 1
(`sparsity.PolynomialSchedule`) on the rounds it marks (t > t_0, every F rounds) with the global
magnitude operator over all trainable parameters (`sparsity.magnitude_masks`); BatchNorm
running statistics live in model_state and are never pruned.

* FedSparsifyGlobal: clients upload their weights; the server averages them (FedAvg) and then
  prunes the average to s_t (`server_post`).
* FedSparsifyLocal: each client prunes its trained model to s_t and uploads the weights plus a
  1-bit mask; the server merges by majority vote (Eq. 2): a weight survives where at least
  `vote_threshold` clients kept it and gets the weighted mean over ALL K clients, zeros of the
  clients that pruned it included. The clients prune and the server votes (the paper's intended
  wiring; the release scripts pass the local purge as the global one, see BUILD.md).

No regrowth: the mask only shrinks (new mask = old mask AND pruning mask) and `server_post`
projects the model onto it every round. The mask is kept explicitly rather than read from the
non-zeros of the broadcast model: the two agree except at exactly-zero kept weights, such as
zero-initialised biases before the first pruning, which a non-zero-pattern mask would freeze
for the whole run. With a stateful server optimizer (FedAdam) Global still never regrows (the
projection zeroes what the optimizer moves), but the optimizer's moments at pruned positions
go stale; Local requires server_optimizer 'none', since a server step would overwrite the
zeros that the vote produced before the new mask is read off them.
"""
import dataclasses
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp

from sparsefl_jax import comm
from sparsefl_jax.algorithms.base import Upload
from sparsefl_jax.algorithms.masked import MaskedTraining
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.sparsity import block
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity.schedules import PolynomialSchedule
from sparsefl_jax.types import Params, PyTree, Scalar


class SparsifyState(NamedTuple):
  """Server state of both variants."""
  mask: PyTree          # bool, params-shaped: the global mask M_t (only ever shrinks)
  sparsity: jax.Array   # float32: the target s_t of the last pruning round (0 before it)


def _and(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.logical_and, a, b)


def schedule_from_config(config: ExperimentConfig) -> PolynomialSchedule:
  """Eq. 1 from the run's flags: s_T=sparsity, T=rounds, s_0, t_0, F, n."""
  if config.rounds <= config.prune_start_round:
    raise ConfigError(f"rounds={config.rounds} must be > prune_start_round="
                      f"{config.prune_start_round} (FedSparsify prunes at rounds > t_0)")
  return PolynomialSchedule(
      config.sparsity, config.rounds, initial_sparsity=config.initial_sparsity,
      start_round=config.prune_start_round, frequency=config.prune_frequency,
      exponent=config.prune_exponent)


@dataclasses.dataclass(frozen=True)
class _MaskedTraining(MaskedTraining):
  """Shared part: the global mask in the server state and masked local training.

  Attributes:
    schedule: Eq. 1 (s_T, T, s_0, t_0, F, n).
    per_layer: one magnitude threshold per tensor instead of one over all parameters.
    method: threshold search of `magnitude_masks` ('bisection' or 'sort'; both exact).
  """
  schedule: PolynomialSchedule = PolynomialSchedule(0.9, 200)
  per_layer: bool = False
  method: str = "bisection"
  structure: str = "unstructured"   # 'block': prune whole block_size² blocks of the kernels
  block_size: int = 32

  sparse = supports_block = True
  rounds_fixed_reason = ("FedSparsify's Eq. 1 pruning schedule reaches sparsity s_T at "
                         "round T = --rounds")

  def __post_init__(self):
    super().__post_init__()
    if self.method not in ("bisection", "sort"):
      raise ConfigError(f"topk_method={self.method!r}: FedSparsify's sparsity is traced; use "
                        "'bisection' or 'sort'")

  @classmethod
  def _kwargs(cls, config) -> Dict[str, Any]:
    return dict(schedule=schedule_from_config(config), per_layer=config.prune_scope == "layer",
                method=config.topk_method, structure=config.sparsity_structure,
                block_size=config.block_size)

  @classmethod
  def from_config(cls, config) -> "_MaskedTraining":
    return cls(**cls._kwargs(config))

  def prune_masks(self, params: Params, sparsity: Scalar) -> PyTree:
    """FedSparsify's magnitude masks at `sparsity` (absolute; zeros take part in the sort).

    With structure='block' the kernels are pruned in whole blocks (block L2 norms, one
    threshold over all kernels, or per kernel with per_layer) and biases/BN stay dense.
    """
    return block.keep_masks(
        params, 1.0 - sparsity, structure=self.structure, block_size=self.block_size,
        per_layer=self.per_layer, method=self.method,
        elementwise=lambda: masks_lib.magnitude_masks(params, sparsity,
                                                      per_layer=self.per_layer,
                                                      method=self.method))

  def init_state(self, params: Params) -> SparsifyState:
    mask = masks_lib.keep_all(params)
    return SparsifyState(mask, jnp.zeros((), jnp.float32))

  def server_metrics(self, old_params: Params, new_params: Params, algo_state: SparsifyState
                     ) -> Dict[str, Any]:
    del old_params
    return {"nnz_params": masks_lib.nnz(new_params),
            "model_csr_bytes": comm.tree_bytes(new_params, "csr"),
            "target_sparsity": algo_state.sparsity}


@dataclasses.dataclass(frozen=True)
class FedSparsifyGlobal(_MaskedTraining):
  """FedAvg of masked local models, then the server prunes the average to s_t."""
  name = "fedsparsify_global"
  description = "FedSparsify-Global: the server prunes the average progressively"

  def server_post(self, params: Params, algo_state: SparsifyState, t: Scalar
                  ) -> tuple[Params, SparsifyState]:
    params = masks_lib.apply_masks(params, algo_state.mask)

    def prune(_):
      s = self.schedule(t)
      return _and(algo_state.mask, self.prune_masks(params, s)), s

    mask, s = jax.lax.cond(self.schedule.is_update_round(t), prune,
                           lambda _: tuple(algo_state), None)
    return masks_lib.apply_masks(params, mask), SparsifyState(mask, s)


@dataclasses.dataclass(frozen=True)
class FedSparsifyLocal(_MaskedTraining):
  """Clients prune to s_t and upload weights + mask; the server merges by majority vote.

  Attributes:
    vote_threshold: a weight survives if at least this many of the K clients kept it;
      -1 = floor(K/2), the authors' code (with K = 10, 5 votes suffice).
  """
  vote_threshold: int = -1

  name = "fedsparsify_local"
  description = "FedSparsify-Local: clients prune, the server merges by majority vote"

  def __post_init__(self):
    super().__post_init__()
    if self.vote_threshold != -1 and self.vote_threshold < 1:
      raise ConfigError(f"vote_threshold={self.vote_threshold} must be -1 (floor(K/2)) or >= 1")

  @classmethod
  def from_config(cls, config) -> "FedSparsifyLocal":
    server = config.resolved_server_optimizer(cls.default_server_optimizer)
    if server != "none":
      raise ConfigError(f"server_optimizer={server!r}: fedsparsify_local needs 'none' (a server "
                        "step would overwrite the zeros of the majority vote)")
    if config.vote_threshold > config.clients_per_round:
      raise ConfigError(f"vote_threshold={config.vote_threshold} must be <= clients_per_round="
                        f"{config.clients_per_round}")
    return cls(**cls._kwargs(config), vote_threshold=config.vote_threshold)

  def threshold(self, num_clients: int) -> int:
    """The votes a weight needs among `num_clients` uploads."""
    return num_clients // 2 if self.vote_threshold == -1 else self.vote_threshold

  def client_upload(self, global_params: Params, local_params: Params, client_state: PyTree,
                    t: Scalar) -> Upload:
    del global_params

    def prune(_):
      return _and(client_state, self.prune_masks(local_params, self.schedule(t)))

    update = self.schedule.is_update_round(t)
    mask = jax.lax.cond(update, prune, lambda _: client_state, None)
    # Outside pruning rounds every client holds the global mask, which the server has: the
    # mask stays home (and the vote over identical masks keeps exactly the global mask).
    return Upload(masks_lib.apply_masks(local_params, mask), mask, mask_sent=update)

  def client_metrics(self, global_params: Params, upload: Upload, client_state: PyTree
                     ) -> Dict[str, Scalar]:
    del global_params, client_state
    return {"local_density": masks_lib.density(upload.values)}

  def upload_stats(self, upload: Upload) -> tuple[Params, PyTree]:
    # Eq. 2 as sums: the weighted mean over ALL clients and each weight's votes.
    return upload.values, upload.mask

  def finalize_aggregate(self, global_params: Params, mean: Params, counts: PyTree,
                         num_clients: int, algo_state: SparsifyState, t: Scalar) -> Params:
    del global_params, t
    kept = jax.tree.map(lambda c: c >= self.threshold(num_clients), counts)
    return masks_lib.apply_masks(masks_lib.apply_masks(mean, kept), algo_state.mask)

  def server_post(self, params: Params, algo_state: SparsifyState, t: Scalar
                  ) -> tuple[Params, SparsifyState]:
    # With server optimizer 'none' the vote's zeros arrive intact: read the new mask off them.
    params = masks_lib.apply_masks(params, algo_state.mask)
    update = self.schedule.is_update_round(t)
    mask = jax.tree.map(lambda m, p: m & ((p != 0) | ~update), algo_state.mask, params)
    s = jnp.where(update, self.schedule(t), algo_state.sparsity)
    return masks_lib.apply_masks(params, mask), SparsifyState(mask, s)
