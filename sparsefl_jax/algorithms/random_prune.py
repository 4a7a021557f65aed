"""Random pruning: FedSparsify's ablation baseline (Stripelis, Gupta, Ver Steeg and Ambite,
"Federated Progressive Sparsification (Purge-Merge-Tune)+"), FedSparsify-Global with the
magnitude criterion replaced by a random order.

Everything but the choice of pruned weights is FedSparsify-Global (`fedsparsify.py`): masked
local training inside the global mask, FedAvg of the client models, then the server prunes
the average on the rounds Eq. 1 marks (t > t_0, every F rounds) to
s_t = s_T + (s_0 − s_T)·(1 − (t_F − t_0)/(T − t_0))^n, t_F = F·floor(t/F), T = --rounds
(`fedsparsify.schedule_from_config`; --sparsity is s_T, --initial_sparsity s_0,
--prune_start_round t_0, --prune_frequency F, --prune_exponent n). No regrowth.

Pruned set: before round 1 ONE random permutation π of the N trainable parameter entries is
drawn (N: every entry FedSparsify-Global prunes over, i.e. all of `params`: kernels, biases,
BatchNorm scale/offset; BatchNorm statistics are model state and never pruned). At sparsity
s_t the pruned set is {π_0, …, π_{c−1}} with c = floor(s_t·N) (`topk.num_to_prune`): the
first c entries of the same permutation every time, so the pruned sets are nested and the
mask only shrinks. Entries are numbered in the order of `jax.tree.leaves(params)`, each leaf
row-major. The permutation comes from the init seed: key = fold_in(fold_in(PRNGKey(
--init_seed), train.INIT_STREAM), PERMUTATION_TAG), so it is fixed for the run, independent
of the training and sampling seeds, and a resumed run recomputes nothing (the positions
rank[j] = position of entry j in π live in the server state and are checkpointed).

Against the authors' code (github.com/dstripelis/FedSparsify, utils/model_purge.py,
`PurgeByWeightMagnitudeRandomGradual`): it draws `np.random.permutation(num_params)` once
over the Keras trainable weights and zeroes `permutation[0:int(s_t·num_params)]` of the
concatenated weights, as here. It then reads the mask off the non-zeros of the edited
weights, which also prunes kept weights that happen to be exactly 0 (zero-initialised
biases); here the mask is the permutation's complement itself (FedSparsify's explicit mask,
see `fedsparsify.py`). The code's test `round >= t_0` (instead of FedSparsify's `> t_0`)
makes no difference with s_0 = 0, since Eq. 1 gives s_{t_0} = s_0.
"""
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.algorithms.base import init_only_field
from sparsefl_jax.algorithms.fedsparsify import FedSparsifyGlobal, schedule_from_config
from sparsefl_jax.config import ConfigError
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk
from sparsefl_jax.types import Params, PRNGKey, PyTree, Scalar

# fold_in data of the permutation's key within the init stream ('RAND'; train.py's
# DATA_INIT_TAG = 1 is the probe batch, and the init key's split feeds the model init).
PERMUTATION_TAG = 0x52414E44
NEVER = np.iinfo(np.int32).max   # the rank of an entry outside the pruning scope


class RandomPruneState(NamedTuple):
  """Server state: FedSparsify's mask and s_t, plus every entry's position in π."""
  mask: PyTree          # bool, params-shaped: the global mask (only ever shrinks)
  sparsity: jax.Array   # float32: s_t of the last pruning round (0 before it)
  rank: PyTree          # int32, params-shaped: rank[j] = i where π_i = j


def permutation_ranks(params: Params, key: PRNGKey) -> PyTree:
  """rank[j] = position of entry j in one random permutation of all trainable entries
  (flat order: `jax.tree.leaves` order, each leaf row-major); `NEVER` outside the scope."""
  leaves, treedef = jax.tree.flatten(params)
  sel = jax.tree.leaves(topk.selection(params, masks_lib.trainable_filter))
  sizes = [int(np.size(x)) for x, s in zip(leaves, sel) if s]
  n = sum(sizes)
  perm = jax.random.permutation(key, n)
  rank = jnp.zeros((n,), jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32))
  out, start = [], 0
  for x, s in zip(leaves, sel):
    if s:
      out.append(rank[start:start + int(np.size(x))].reshape(np.shape(x)))
      start += int(np.size(x))
    else:
      out.append(jnp.full(np.shape(x), NEVER, jnp.int32))
  return jax.tree.unflatten(treedef, out)


def num_prunable(params: Params) -> int:
  """N: the entries FedSparsify-Global prunes over (every trainable parameter)."""
  return masks_lib.size(params, masks_lib.trainable_filter)


@dataclasses.dataclass(frozen=True)
class RandomPrune(FedSparsifyGlobal):
  """FedSparsify-Global's schedule; the pruned set is a prefix of one random permutation.

  Attributes:
    init_seed: the run's --init_seed; the permutation's key is derived from it. Read only
      by `init_state` (the ranks live in the state), so a sweep's members may differ in it.
  """
  init_seed: int = init_only_field(0)

  name = "random_prune"
  description = ("Random: FedSparsify-Global's Eq. 1 schedule, pruning the first "
                 "floor(s_t*N) entries of one fixed random permutation of all parameters")
  supports_block = False
  metric_fields = {"nnz_params": None, "model_csr_bytes": None, "target_sparsity": None}

  @classmethod
  def from_config(cls, config) -> "RandomPrune":
    if config.prune_scope != "global":
      raise ConfigError(f"prune_scope={config.prune_scope!r}: random_prune prunes a prefix of "
                        "one permutation of all trainable parameters; accepted: 'global'")
    # No threshold is computed: the top-K method and block structure do not apply.
    return cls(schedule=schedule_from_config(config), init_seed=config.init_seed)

  def permutation_key(self) -> PRNGKey:
    """fold_in(fold_in(PRNGKey(init_seed), INIT_STREAM), PERMUTATION_TAG)."""
    from sparsefl_jax.train import INIT_STREAM   # lazy: train imports this package
    init_key = jax.random.fold_in(jax.random.PRNGKey(self.init_seed), INIT_STREAM)
    return jax.random.fold_in(init_key, PERMUTATION_TAG)

  def init_state(self, params: Params) -> RandomPruneState:
    return RandomPruneState(masks_lib.keep_all(params), jnp.zeros((), jnp.float32),
                            permutation_ranks(params, self.permutation_key()))

  def prune_masks(self, params: Params, sparsity: Scalar, rank: PyTree = None) -> PyTree:
    """Keep-masks at `sparsity`: entry j is pruned iff rank[j] < floor(sparsity·N)."""
    if rank is None:
      rank = permutation_ranks(params, self.permutation_key())
    count = topk.num_to_prune(num_prunable(params), sparsity)
    return jax.tree.map(lambda r: r >= count, rank)

  def server_post(self, params: Params, algo_state: RandomPruneState, t: Scalar
                  ) -> tuple[Params, RandomPruneState]:
    update = self.schedule.is_update_round(t)
    # Outside pruning rounds s stays, so the prefix (and the mask) stays.
    s = jnp.where(update, self.schedule(t), algo_state.sparsity)
    mask = jax.tree.map(jnp.logical_and, algo_state.mask,
                        self.prune_masks(params, s, algo_state.rank))
    return masks_lib.apply_masks(params, mask), RandomPruneState(mask, s, algo_state.rank)
